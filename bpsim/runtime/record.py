"""Span spools that survive a crash, and merging them into one trace.

Every rank appends its spans (plain 9-tuples, see :mod:`bpsim.trace`) to
``rank<R>.spans.jsonl`` in the run's spool folder, one JSON array per line,
at most every ``interval`` seconds and once more at the end. When a rank is
killed, the launcher still finds everything it recorded up to its last
flush; a half-written last line is skipped.

:func:`merge_spool` reads the files back and builds the run's
:class:`~bpsim.trace.Trace`. Receive spans are stamped by receiver threads
and may overlap the rank's other comm spans, so the comm lane of each rank
is made disjoint (:func:`serialize_comm`): sends keep their start, and a
``recv`` keeps its end (the arrival) but starts no earlier than its
``send``, the rank's previous receive, or a send of the rank that overlaps
it. Compute spans are left as measured. Ranks whose clock offset came from a ping-pong estimate (other
hosts) are first shifted, within the estimate's error, so that no message
arrives before it was sent (:func:`repair_causality`).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from bpsim.files import process_gone
from bpsim.trace import Trace

__all__ = ["Spool", "read_spool", "merge_spool", "merge_rows", "serialize_comm", "repair_causality",
           "process_gone"]


class Spool:
    """Appends new rows of ``rows`` to ``path`` (JSON lines)."""

    def __init__(self, path: str | os.PathLike[str], rows: list, interval: float = 0.5,
                 clock: Any = None) -> None:
        import time

        self.path = Path(path)
        self.rows = rows
        self.interval = interval
        self._clock = clock or time.monotonic
        self._n = 0
        self._last = self._clock()
        self._fh = open(self.path, "a", encoding="utf-8")

    def maybe_flush(self) -> None:
        """Flush if ``interval`` seconds passed since the last flush."""
        if self._clock() - self._last >= self.interval:
            self.flush()

    def flush(self) -> None:
        rows = self.rows
        n = len(rows)
        if n > self._n and not self._fh.closed:
            self._fh.write("".join(json.dumps(r) + "\n" for r in rows[self._n:n]))
            self._fh.flush()
            self._n = n
        self._last = self._clock()

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()


def read_spool(folder: str | os.PathLike[str]) -> list[tuple]:
    """All complete rows of every ``*.spans.jsonl`` file in ``folder``."""
    rows: list[tuple] = []
    for p in sorted(Path(folder).glob("rank*.spans.jsonl")):
        with open(p, encoding="utf-8") as fh:
            for line in fh:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue            # a line cut short by a kill
                if isinstance(r, list) and len(r) == 9:
                    rows.append(tuple(r))
    return rows


def serialize_comm(rows: Sequence[tuple]) -> list[tuple]:
    """Make the comm spans of each rank disjoint (see the module docstring).

    Sends keep their start (the moment the message was handed to its link);
    a send that overlaps the rank's next send ends where that one starts. A
    receive keeps its end (the arrival) and starts no earlier than its
    send, the rank's previous receive, or the end of any of the rank's sends
    it overlaps; an arrival in the middle of a send becomes a zero-length
    receive.
    """
    send_t0 = {r[8]: r[6] for r in rows if r[2] == "send" and r[8] is not None}
    out: list[tuple] = []
    recvs: dict[int, list[tuple]] = defaultdict(list)
    sends: dict[int, list[tuple]] = defaultdict(list)
    for r in rows:
        if r[1] == "comm" and r[2] == "recv":
            recvs[r[0]].append(r)
        elif r[1] == "comm":
            sends[r[0]].append(r)
        else:
            out.append(r)
    spans: dict[int, list[tuple[float, float]]] = {}
    for rank, rank_rows in sends.items():
        rank_rows.sort(key=lambda r: (r[6], r[7]))
        fixed = []
        for i, r in enumerate(rank_rows):
            t1 = r[7]
            if i + 1 < len(rank_rows):
                t1 = max(r[6], min(t1, rank_rows[i + 1][6]))
            fixed.append(r[:7] + (t1, r[8]))
        out.extend(fixed)
        spans[rank] = [(r[6], r[7]) for r in fixed if r[7] > r[6]]
    for rank, rank_rows in recvs.items():
        rank_sends = spans.get(rank, [])
        rank_rows.sort(key=lambda r: (r[7], r[6]))
        prev = float("-inf")
        for r in rank_rows:
            a, b = r[6], r[7]
            a = max(a, prev, send_t0.get(r[8], a))
            for c, d in rank_sends:
                if c >= b:
                    break
                if d > a:
                    a = d if d <= b else b
            a = min(a, b)
            out.append(r[:6] + (a, b, r[8]))
            prev = b
    return out


def repair_causality(rows: Sequence[tuple], adjustable: set[int]) -> tuple[list[tuple], dict[int, float]]:
    """Shift the clocks of ``adjustable`` ranks so that no message arrives
    before it was sent.

    A ping-pong offset is only known to within half a round trip, which can
    exceed a message's latency. For each adjustable rank (in rank order)
    the messages exchanged with ranks already fixed bound its shift ``d``:
    ``recv.t1 + d >= send.t0`` for messages it received and
    ``recv.t1 >= send.t0 + d`` for messages it sent. The smallest ``|d|``
    inside the bounds is applied (none when the bounds already hold or
    contradict each other). Returns the rows and ``{rank: d}``.
    """
    sends = {r[8]: r for r in rows if r[2] == "send" and r[8] is not None}
    recvs = {r[8]: r for r in rows if r[2] == "recv" and r[8] is not None}
    ranks = sorted({r[0] for r in rows})
    fixed = {r for r in ranks if r not in adjustable}
    shift: dict[int, float] = {}
    for rank in ranks:
        if rank in fixed:
            continue
        lo, hi = float("-inf"), float("inf")
        for msg, rv in recvs.items():
            sd = sends.get(msg)
            if sd is None:
                continue
            if rv[0] == rank and sd[0] in fixed:
                lo = max(lo, (sd[6] + shift.get(sd[0], 0.0)) - rv[7])
            elif sd[0] == rank and rv[0] in fixed:
                hi = min(hi, (rv[7] + shift.get(rv[0], 0.0)) - sd[6])
        d = 0.0
        if lo <= hi:
            d = lo if lo > 0 else (hi if hi < 0 else 0.0)
        shift[rank] = d
        fixed.add(rank)
    if not any(shift.values()):
        return list(rows), shift
    out = [r[:6] + (r[6] + shift.get(r[0], 0.0), r[7] + shift.get(r[0], 0.0), r[8]) for r in rows]
    return out, shift


def merge_rows(rows: Sequence[tuple], meta: dict[str, Any] | None = None) -> Trace:
    """The run's trace from raw per-rank rows: causality repair for ranks
    whose clock came from a ping-pong estimate, disjoint comm lanes, sorted."""
    meta = dict(meta or {})
    clocks = meta.get("clock") or {}
    adjustable = {int(r) for r, c in clocks.items()
                  if isinstance(c, dict) and c.get("method") == "ping-pong"}
    rows = [tuple(r) for r in rows]
    if adjustable:
        rows, shift = repair_causality(rows, adjustable)
        meta["clock_repair"] = {str(r): d for r, d in shift.items()}
    rows = serialize_comm(rows)
    rows.sort(key=lambda r: (r[6], r[0], 0 if r[1] == "compute" else 1))
    return Trace.from_rows(rows, meta)


def merge_spool(folder: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Trace:
    """The run's trace from the spool files in ``folder`` (partial after a failure)."""
    return merge_rows(read_spool(folder), meta)
