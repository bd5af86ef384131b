"""The Chrome trace-event format: span rows to events and back, and trace files.

Perfetto (https://ui.perfetto.dev) and ``chrome://tracing`` open these
files. The layout, for the spans of one run:

* one ``pid`` per run, named by a ``process_name`` metadata event;
* one ``tid`` per (rank, lane): ``tid = 2 * rank + LANES.index(lane)``,
  named ``"rank R lane"`` so the lanes sort rank by rank;
* one complete (``"ph": "X"``) event per span, times in microseconds, with
  the exact seconds and every span field in ``args`` so a file reads back
  to the same rows;
* a flow pair (``"s"`` then ``"f"``) from every ``send`` to its ``recv``;
* the run's metadata under ``otherData.bpsim_meta``.

This module knows span rows (the tuples of :mod:`bpsim.trace`) but not the
:class:`~bpsim.trace.Trace` class, which builds on it (``Trace.save``,
``Trace.load``, ``Trace.to_chrome``). Anything of another shape raises
:class:`TraceError` naming the file and what is wrong. Never imports torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

from bpsim.files import MAX_INPUT_BYTES, open_output, read_json, write_text, jsonable

__all__ = ["TraceError", "LANES", "tid", "to_chrome", "rows_from_chrome", "read", "write",
           "write_rows"]

#: the two lanes of a rank, in thread-id order
LANES = ("compute", "comm")
_LANE_INDEX = {lane: i for i, lane in enumerate(LANES)}
_US = 1e6
_HINT = "write one with Trace.save, `bpsim run ... --trace` or `bpsim simulate ... --trace`"


class TraceError(ValueError):
    """A trace, or a trace file, that does not hold valid spans; the message says
    which file and what is wrong."""


def tid(rank: int, lane: str) -> int:
    """The Chrome thread id of one lane of one rank."""
    return 2 * int(rank) + _LANE_INDEX.get(lane, 1)


def _events(rows: list[tuple], meta: dict[str, Any], pid: int,
            name: str | None) -> Iterator[dict[str, Any]]:
    """The trace events of span rows, one at a time (see :func:`to_chrome`)."""
    label = name or str(meta.get("name") or meta.get("algo") or "bpsim run")
    yield {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": label}}
    for rank, lane in sorted({(r[0], r[1]) for r in rows},
                             key=lambda k: (k[0], _LANE_INDEX.get(k[1], 9))):
        t = tid(rank, lane)
        yield {"ph": "M", "name": "thread_name", "pid": pid, "tid": t,
               "args": {"name": f"rank {rank} {lane}"}}
        yield {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": t,
               "args": {"sort_index": t}}
    sends: dict[Any, tuple] = {}
    recvs: dict[Any, tuple] = {}
    for r in rows:
        rank, lane, op, block, step, mb, t0, t1, msg = r
        args = {"rank": rank, "lane": lane, "block": block, "step": step,
                "microbatch": mb, "t0": t0, "t1": t1}
        if msg is not None:
            args["msg"] = msg
            (sends if op == "send" else recvs)[msg] = r
        yield {"ph": "X", "name": op, "cat": lane, "pid": pid, "tid": tid(rank, lane),
               "ts": t0 * _US, "dur": (t1 - t0) * _US, "args": args}
    for msg, s in sends.items():
        rv = recvs.get(msg)
        if rv is None:
            continue
        yield {"ph": "s", "name": "msg", "cat": "msg", "id": msg, "pid": pid,
               "tid": tid(s[0], s[1]), "ts": s[6] * _US}
        yield {"ph": "f", "bp": "e", "name": "msg", "cat": "msg", "id": msg,
               "pid": pid, "tid": tid(rv[0], rv[1]), "ts": rv[6] * _US}


def _other(meta: dict[str, Any]) -> dict[str, Any]:
    return {"bpsim_meta": jsonable(meta), "bpsim_version": 1}


def to_chrome(rows: list[tuple], meta: dict[str, Any], pid: int = 0,
              name: str | None = None) -> dict[str, Any]:
    """Chrome trace-event JSON of span rows (see the module docstring).

    ``name`` labels the process (default: ``meta``'s ``name`` or ``algo``).
    """
    return {"traceEvents": list(_events(rows, meta, pid, name)), "displayTimeUnit": "ms",
            "otherData": _other(meta)}


def write_rows(path: str | os.PathLike[str], rows: list[tuple], meta: dict[str, Any],
               pid: int = 0, name: str | None = None) -> None:
    """Write the Chrome trace of span rows to ``path``, one event at a time.

    The same JSON as :func:`to_chrome` (so :func:`read` gives it back), but
    never held in memory whole: a trace file grows to about 300 bytes a
    span. Written through :func:`bpsim.files.open_output` (temporary file,
    then rename; one-line ``ValueError`` on any write error).
    """
    with open_output(path, "trace file") as fh:
        fh.write('{"traceEvents": [\n')
        chunk: list[str] = []
        first = True
        for ev in _events(rows, meta, pid, name):
            chunk.append(json.dumps(ev, allow_nan=False))
            if len(chunk) >= 4096:
                fh.write(("" if first else ",\n") + ",\n".join(chunk))
                chunk, first = [], False
        if chunk:
            fh.write(("" if first else ",\n") + ",\n".join(chunk))
        fh.write('\n], "displayTimeUnit": "ms", "otherData": ')
        fh.write(json.dumps(_other(meta), allow_nan=False))
        fh.write("}\n")


def _number(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise TraceError(f"{what} must be a finite number, got {x!r}")
    return float(x)


def _int(x: Any, what: str) -> int:
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    if isinstance(x, bool) or not isinstance(x, int):
        raise TraceError(f"{what} must be an integer, got {x!r}")
    return x


def _row(i: int, ev: dict[str, Any]) -> tuple:
    """The span row of the ``X`` event ``ev`` (the ``i``-th event)."""
    name = ev.get("name")
    where = f"event {i} ({name!r})"
    if not isinstance(name, str) or not name:
        raise TraceError(f"event {i} has no op name")
    a = ev.get("args")
    if not isinstance(a, dict) or "block" not in a or "step" not in a:
        raise TraceError(f"{where} has no args with its block and step: bpsim reads the Chrome "
                         f"traces it writes ({_HINT})")
    if "rank" in a:
        rank = _int(a["rank"], f"{where}: rank")
    else:
        rank = _int(ev.get("tid", 0), f"{where}: tid") // 2
    if "lane" in a:
        lane = a["lane"]
    elif ev.get("cat") in _LANE_INDEX:
        lane = ev["cat"]
    else:
        lane = LANES[_int(ev.get("tid", 0), f"{where}: tid") % 2]
    if "t0" in a:
        t0 = _number(a["t0"], f"{where}: t0")
    else:
        t0 = _number(ev.get("ts"), f"{where}: ts") / _US
    if "t1" in a:
        t1 = _number(a["t1"], f"{where}: t1")
    else:
        t1 = t0 + _number(ev.get("dur", 0), f"{where}: dur") / _US
    msg = a.get("msg")
    if msg is not None and (isinstance(msg, bool) or not isinstance(msg, (int, str))):
        raise TraceError(f"{where}: msg must be an integer or a string (the message id), got "
                         f"{type(msg).__name__}")
    return (rank, lane, name, _int(a["block"], f"{where}: block"),
            _int(a["step"], f"{where}: step"),
            _int(a.get("microbatch", 0), f"{where}: microbatch"), t0, t1, msg)


def rows_from_chrome(obj: Any) -> tuple[list[tuple], dict[str, Any]]:
    """The span rows and run metadata of Chrome trace JSON (what :func:`to_chrome`
    wrote, or any Chrome trace whose ``X`` events carry ``block`` and ``step``
    args); :class:`TraceError` for anything else."""
    if isinstance(obj, list):
        events, meta = obj, {}
    elif isinstance(obj, dict) and "traceEvents" in obj:
        events = obj["traceEvents"]
        other = obj.get("otherData") or {}
        meta = other.get("bpsim_meta") if isinstance(other, dict) else None
        if not isinstance(meta, (dict, type(None))):
            raise TraceError(f"otherData.bpsim_meta must be an object, got {type(meta).__name__}")
        meta = dict(meta or {})
    else:
        raise TraceError("not a Chrome trace: expected an object with 'traceEvents' or a list "
                         f"of events ({_HINT})")
    if not isinstance(events, list):
        raise TraceError(f"'traceEvents' must be a list of events, got {type(events).__name__}")
    rows: list[tuple] = []
    for i, ev in enumerate(events):
        if not isinstance(ev, dict):
            raise TraceError(f"event {i} must be an object, got {ev!r:.60}")
        if ev.get("ph") == "X":
            rows.append(_row(i, ev))
    return rows, meta


def read(path: str | os.PathLike[str], limit: int = MAX_INPUT_BYTES) -> Any:
    """The JSON in trace file ``path``, a regular file of at most ``limit`` bytes.

    ``FileNotFoundError`` when it does not exist; :class:`TraceError` when it
    is a folder, a FIFO, a device or a link loop, too large, binary data,
    not JSON, or JSON nested too deeply (:func:`bpsim.files.read_json`).
    """
    try:
        return read_json(path, "trace file", limit=limit, hint=_HINT)
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise TraceError(str(e)) from None


def write(path: str | os.PathLike[str], obj: dict[str, Any]) -> None:
    """Write Chrome trace JSON atomically (temp file, then ``os.replace``)."""
    write_text(path, json.dumps(obj, allow_nan=False), "trace file")
