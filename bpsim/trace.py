"""Timelines of training runs: the span schema, traces and their statistics.

One schema serves the measured runtime and the SimPy simulator, so a
predicted and a measured run compare field by field and open together in
Perfetto (https://ui.perfetto.dev) or ``chrome://tracing``.

A :class:`Span` is one interval of work ``(rank, lane, op, block, step,
microbatch, t0, t1)``; ``lane`` is ``"compute"`` or ``"comm"`` and times are
seconds (any unit for simulated runs; exported as microseconds). A ``send``
and its ``recv`` share a message id ``msg``. The op vocabulary is that of
DESIGN.md: ``fwd bwd aux update hstep send recv wait loss``.

The Chrome trace-event file format lives in :mod:`bpsim.chrome`;
:meth:`Trace.save`, :meth:`Trace.load` and :meth:`Trace.to_chrome` go
through it. A trace that breaks the schema (overlapping spans on one lane, a
span that ends before it starts, a receive that ends before its send) or a
file of another shape raises :class:`TraceError`, a ``ValueError``. This
module never imports torch: the runtime and the simulator append raw rows.
"""

from __future__ import annotations

import bisect
import math
import os
from collections import defaultdict
from dataclasses import astuple, dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from bpsim import chrome
from bpsim.chrome import LANES, TraceError
# the file helpers moved to bpsim.files; kept importable from here for callers
from bpsim.files import atomic_write_text, json_safe

__all__ = ["OPS", "LANES", "Span", "Trace", "TraceError", "check_meta", "atomic_write_text",
           "json_safe"]

OPS = ("fwd", "bwd", "aux", "update", "hstep", "send", "recv", "wait", "loss")


@dataclass(frozen=True, slots=True)
class Span:
    """One interval of work on one lane of one rank.

    ``t0``/``t1`` (seconds) and ``msg`` are keyword-only:
    ``Span(0, "compute", "fwd", 1, 0, t0=0.0, t1=1.0)``.
    """

    rank: int
    lane: str
    op: str
    block: int
    step: int
    microbatch: int = 0
    t0: float = field(kw_only=True)
    t1: float = field(kw_only=True)
    msg: int | None = field(default=None, kw_only=True)

    @property
    def duration(self) -> float:
        return self.t1 - self.t0


# A row is the plain tuple form of a Span, in field order:
# (rank, lane, op, block, step, microbatch, t0, t1, msg).
Row = tuple


def _as_row(s: Any) -> Row:
    if isinstance(s, Span):
        return astuple(s)
    row = tuple(s)
    if len(row) == 8:
        row = row + (None,)
    if len(row) != 9:
        raise ValueError(
            "a span row must be (rank, lane, op, block, step, microbatch, t0, t1[, msg]), "
            f"got {len(row)} fields: {row!r}")
    return row


def _meta_int(meta: dict[str, Any], key: str, lo: int) -> None:
    v = meta.get(key)
    if v is None:
        return
    if isinstance(v, float) and v.is_integer():
        v = meta[key] = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise TraceError(f"meta field {key!r} must be an integer >= {lo}, got {v!r}")


def check_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Check the fields of a trace's meta that replay and re-simulation read.

    ``algo`` is a string; ``blocks`` and ``workers`` integers >= 1;
    ``steps`` an integer >= 0; ``steps_per_epoch`` an integer >= 1;
    ``options`` and ``slowdown`` objects, the slowdown's keys block numbers
    and its values finite numbers > 0; ``placement`` an integer, a string
    or a list of integers. Absent or null fields pass; integral floats
    (``1e3``) become integers. The meta is returned, checked.

    Raises
    ------
    TraceError
        Naming the first field of the wrong kind.
    """
    algo = meta.get("algo")
    if algo is not None and not isinstance(algo, str):
        raise TraceError(f"meta field 'algo' must be a method name, got {algo!r:.60}")
    for key, lo in (("blocks", 1), ("workers", 1), ("steps", 0), ("steps_per_epoch", 1)):
        _meta_int(meta, key, lo)
    for key in ("options", "slowdown"):
        v = meta.get(key)
        if v is not None and not isinstance(v, dict):
            raise TraceError(f"meta field {key!r} must be an object, got {type(v).__name__}")
    for k, v in (meta.get("slowdown") or {}).items():
        if not str(k).isdigit() or isinstance(v, bool) or not isinstance(v, (int, float)) \
                or not math.isfinite(v) or v <= 0:
            raise TraceError(f"meta field 'slowdown' must map block numbers to finite numbers "
                             f"> 0, got {k!r}: {v!r:.40}")
    place = meta.get("placement")
    if place is not None and not isinstance(place, (int, str)) and not (
            isinstance(place, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                            for d in place)):
        raise TraceError(f"meta field 'placement' must be a device count, a string or a list "
                         f"of device numbers, got {place!r:.60}")
    return meta


class Trace:
    """A list of spans plus run metadata.

    Parameters
    ----------
    spans : iterable of Span or rows
        Spans, or tuples in Span field order (rows are what the simulator
        records; :class:`Span` objects are built only when asked for).
    meta : dict
        Free-form, JSON-serialisable run description (algorithm, K, costs...).
    """

    def __init__(self, spans: Iterable[Any] = (), meta: dict[str, Any] | None = None) -> None:
        self._rows: list[Row] = [_as_row(s) for s in spans]
        self.meta: dict[str, Any] = dict(meta or {})
        self._spans: list[Span] | None = None

    @classmethod
    def from_rows(cls, rows: list[Row], meta: dict[str, Any] | None = None) -> "Trace":
        """Wrap a list of 9-tuples without copying or validating it."""
        t = cls.__new__(cls)
        t._rows = rows
        t.meta = dict(meta or {})
        t._spans = None
        return t

    # -------------------------------------------------------------- access
    @property
    def rows(self) -> list[Row]:
        """The spans as plain tuples (fast; do not mutate)."""
        return self._rows

    @property
    def spans(self) -> list[Span]:
        """The spans as :class:`Span` objects, built on first access."""
        if self._spans is None or len(self._spans) != len(self._rows):
            self._spans = [Span(r[0], r[1], r[2], r[3], r[4], r[5], t0=r[6], t1=r[7], msg=r[8])
                           for r in self._rows]
        return self._spans

    def append(self, span: Span | Sequence[Any]) -> None:
        self._rows.append(_as_row(span))

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Span]:
        return iter(self.spans)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Trace) and self._rows == other._rows
                and self.meta == other.meta)

    def __repr__(self) -> str:
        return f"Trace({len(self)} spans, ranks={self.ranks}, makespan={self.makespan:.6g})"

    # --------------------------------------------------------- statistics
    @property
    def ranks(self) -> list[int]:
        return sorted({r[0] for r in self._rows})

    @property
    def start(self) -> float:
        return min((r[6] for r in self._rows), default=0.0)

    @property
    def end(self) -> float:
        return max((r[7] for r in self._rows), default=0.0)

    @property
    def makespan(self) -> float:
        """Time from the first span's start to the last span's end."""
        return self.end - self.start if self._rows else 0.0

    def busy(self, rank: int, lane: str = "compute") -> float:
        """Total span time on one lane of ``rank`` (``wait`` spans excluded)."""
        return sum(r[7] - r[6] for r in self._rows
                   if r[0] == rank and r[1] == lane and r[2] != "wait")

    def busy_fraction(self, lane: str = "compute") -> dict[int, float]:
        """``busy(rank) / makespan`` for every rank."""
        tot: dict[int, float] = defaultdict(float)
        for r in self._rows:
            if r[1] == lane and r[2] != "wait":
                tot[r[0]] += r[7] - r[6]
        span = self.makespan
        return {k: (tot[k] / span if span > 0 else 0.0) for k in self.ranks}

    def overlap(self, lane: str = "compute") -> float:
        """Share of the busy time on ``lane`` (``wait`` spans excluded) spent
        while at least one other rank was busy on that lane too.

        0 with one rank or when the ranks take turns (backprop's locked
        schedule), near 1 when every op runs beside another rank's (DGL
        with balanced blocks). Ranks that share caches, a memory bus or
        cores may slow each other down in the overlapped part, so two runs
        with the same ops but different overlap need not have the same op
        times (the simulator does not model that).
        """
        fr = self.span_overlaps(lane)
        busy = shared = 0.0
        for r, f in zip(self._rows, fr):
            if f is not None:
                busy += r[7] - r[6]
                shared += (r[7] - r[6]) * f
        return shared / busy if busy > 0 else 0.0

    def span_overlaps(self, lane: str = "compute") -> list[float | None]:
        """For each row, the fraction of its time during which another rank
        was busy on ``lane`` (``wait`` spans do not count as busy); None for
        rows on other lanes, ``wait`` spans and zero-length spans."""
        def busy(r: Row) -> bool:
            return r[1] == lane and r[2] != "wait" and r[7] > r[6]

        by_rank: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for r in self._rows:
            if busy(r):
                by_rank[r[0]].append((r[6], r[7]))
        others: dict[int, tuple[list[float], list[float]]] = {}
        for rank in by_rank:   # the union of every other rank's busy time
            merged: list[list[float]] = []
            for a, b in sorted(iv for k, ivs in by_rank.items() if k != rank for iv in ivs):
                if merged and a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            others[rank] = ([m[0] for m in merged], [m[1] for m in merged])
        out: list[float | None] = []
        for r in self._rows:
            if not busy(r):
                out.append(None)
                continue
            starts, ends = others[r[0]]
            a, b = r[6], r[7]
            i = max(bisect.bisect_right(starts, a) - 1, 0)
            shared = 0.0
            while i < len(starts) and starts[i] < b:
                shared += max(0.0, min(b, ends[i]) - max(a, starts[i]))
                i += 1
            out.append(shared / (b - a))
        return out

    def steps(self) -> list[int]:
        return sorted({r[4] for r in self._rows})

    def without_warmup(self, n: int) -> "Trace":
        """The trace without each rank's first ``n`` steps, steps renumbered
        from 0.

        Benchmarks time a run after a few warm-up steps (first calls
        allocate memory and pick kernels, and take several times the usual
        time): measure ``n + N`` steps, keep the last ``N``, and compare
        them with a simulation of ``N`` steps. Message ids whose send or
        recv fell in the warm-up are cleared, so every kept pair is whole.
        The meta follows: its ``steps`` loses ``n``, and its replay-buffer
        reads (``buffer_reads``) keep only reads of entries written after
        the warm-up, renumbered like the spans.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"warm-up steps must be an integer >= 0, got {n!r}")
        kept = [r for r in self._rows if r[4] >= n]
        sends = {r[8] for r in kept if r[2] == "send" and r[8] is not None}
        recvs = {r[8] for r in kept if r[2] == "recv" and r[8] is not None}
        whole = sends & recvs
        rows = [r[:4] + (r[4] - n,) + r[5:8] + (r[8] if r[8] in whole else None,) for r in kept]
        meta = dict(self.meta, warmup_steps_dropped=n)
        if isinstance(meta.get("steps"), int):
            meta["steps"] = max(meta["steps"] - n, 0)
        if meta.get("buffer_reads"):
            meta["buffer_reads"] = {k: [[s - n, p - n, c] for s, p, c in v if s >= n and p >= n]
                                    for k, v in meta["buffer_reads"].items()}
        return Trace.from_rows(rows, meta)

    # -------------------------------------------------------------- checks
    def check(self, tol: float = 1e-9) -> "Trace":
        """Validate the trace and return it.

        Raises :class:`TraceError` (a ``ValueError``) when a span is on an
        unknown lane or has a time that is not a finite number, when a span
        ends before it starts, when two spans overlap on one (rank, lane)
        (zero-length marker spans never count as overlapping), or when a
        ``recv`` ends before its ``send`` starts.
        """
        lanes: dict[tuple[int, str], list[tuple[float, float, str, int, int]]] = defaultdict(list)
        sends: dict[Any, Row] = {}
        recvs: list[Row] = []
        for r in self._rows:
            if r[1] not in LANES:
                raise TraceError(f"span lane must be one of {LANES}, got {r[1]!r} in {r!r}")
            if not (math.isfinite(r[6]) and math.isfinite(r[7])):
                raise TraceError(f"span times must be finite numbers, got {r!r}")
            if r[7] < r[6] - tol:
                raise TraceError(f"span ends before it starts: {r!r}")
            if r[7] - r[6] > tol:
                lanes[(r[0], r[1])].append((r[6], r[7], r[2], r[3], r[4]))
            if r[8] is not None:
                if r[2] == "send":
                    sends[r[8]] = r
                elif r[2] == "recv":
                    recvs.append(r)
        for (rank, lane), items in lanes.items():
            items.sort()
            for a, b in zip(items, items[1:]):
                if b[0] < a[1] - tol:
                    raise TraceError(
                        f"overlapping spans on rank {rank} lane {lane!r}: {a[2]} of block "
                        f"{a[3]} step {a[4]} [{a[0]:.9g}, {a[1]:.9g}] and {b[2]} of block "
                        f"{b[3]} step {b[4]} [{b[0]:.9g}, {b[1]:.9g}]")
        for r in recvs:
            s = sends.get(r[8])
            if s is not None and r[7] < s[6] - tol:
                raise TraceError(
                    f"recv of message {r[8]} ends at {r[7]:.9g}, before its send starts "
                    f"at {s[6]:.9g}")
        return self

    # ------------------------------------------------------ chrome format
    def to_chrome(self, pid: int = 0, name: str | None = None) -> dict[str, Any]:
        """Chrome trace-event JSON (Perfetto opens it; layout in :mod:`bpsim.chrome`).

        One ``pid`` for the run, one ``tid`` per (rank, lane), an ``X``
        event per span (exact seconds kept in ``args`` so :meth:`from_chrome`
        round-trips), and an ``s``/``f`` flow pair from every send to its recv.
        """
        return chrome.to_chrome(self._rows, self.meta, pid=pid, name=name)

    @classmethod
    def from_chrome(cls, obj: dict[str, Any] | list[Any]) -> "Trace":
        """Read back what :meth:`to_chrome` wrote (exactly), or any Chrome
        trace whose ``X`` events carry ``block``/``step`` args
        (:class:`TraceError` otherwise)."""
        rows, meta = chrome.rows_from_chrome(obj)
        return cls.from_rows(rows, meta)

    def save(self, path: str | os.PathLike[str], pid: int = 0) -> None:
        """Write Chrome-trace JSON atomically (temp file, then ``os.replace``).

        The JSON is streamed, one event at a time, never held whole in
        memory (:func:`bpsim.chrome.write_rows`). A path that cannot be
        written raises ``ValueError`` before anything is written
        (:func:`bpsim.files.check_writable`); a write that fails (a full
        disk) raises a one-line ``ValueError`` and leaves the old file as it
        was.
        """
        chrome.write_rows(path, self._rows, self.meta, pid=pid)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Trace":
        """Read a trace written by :meth:`save` (or by the runtime) and :meth:`check` it.

        ``FileNotFoundError`` when ``path`` does not exist; :class:`TraceError`
        naming the file when it is not a regular file of at most
        :data:`bpsim.files.MAX_INPUT_BYTES`, not a Chrome trace of valid
        spans, or its meta has a field of the wrong kind (:func:`check_meta`).
        """
        obj = chrome.read(path)
        try:
            trace = cls.from_chrome(obj).check()
            check_meta(trace.meta)
            return trace
        except TraceError as e:
            raise TraceError(f"trace file {os.fspath(path)!r}: {e}") from None
