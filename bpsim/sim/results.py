"""What a simulation returns: the trace and its per-block, per-buffer summary."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from bpsim.trace import Trace

__all__ = ["SimResult", "buffer_stats"]


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


@dataclass
class SimResult:
    """Outcome of :func:`bpsim.sim.simulate`.

    Attributes
    ----------
    algo : str
    steps : int
    trace : Trace
        Every span; ``rank`` is the device index, ``block`` is 1..K.
    makespan : float
        End of the last span (the run starts at 0).
    throughput : float
        ``steps / makespan``: minibatch steps per time unit.
    per_block : list of dict
        ``per_block[j-1]`` is block j: ``block``, ``device``, ``busy``
        (compute time), ``utilization`` (busy / makespan), ``finish``
        (end of its last compute span), ``updates``, ``idle`` (makespan -
        busy) and ``idle_by_cause`` (waiting for ``input``, for a
        ``gradient`` or target, for a ``buffer`` entry, for a shared
        ``device``).
    buffers : list of dict
        ``dgl-async`` only, ``buffers[j-1]`` is the buffer block j writes:
        ``reuse_mean``, ``staleness_mean``, raw ``reuse`` (reads of every
        entry ever stored) and ``staleness`` (of every read), ``puts``,
        ``gets``.
    meta : dict
        The run's parameters (also in ``trace.meta``).
    """

    algo: str
    steps: int
    trace: Trace
    makespan: float
    throughput: float
    per_block: list[dict[str, Any]]
    buffers: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, algo: str, steps: int, rows: list[tuple], meta: dict[str, Any], *,
                  placement: list[int], updates: list[int],
                  idle: list[dict[str, float]], buffers: list[dict[str, Any]] = (),
                  expected_updates: int | None = None) -> "SimResult":
        """Summarise a simulation from its spans and counters.

        ``updates[j-1]`` and ``idle[j-1]`` (seconds by cause) belong to block
        j; ``buffers`` are the per-buffer dicts described above; a block with
        fewer than ``expected_updates`` (default ``steps``) updates is listed
        in ``meta["stalled_blocks"]``.
        """
        K = len(placement)
        busy = [0.0] * (K + 1)
        finish = [0.0] * (K + 1)
        end = 0.0
        for r in rows:
            t1 = r[7]
            if t1 > end:
                end = t1
            if r[1] == "compute" and r[2] != "wait":
                j = r[3]
                busy[j] += t1 - r[6]
                if t1 > finish[j]:
                    finish[j] = t1
        makespan = end
        per_block = []
        for j in range(1, K + 1):
            per_block.append({
                "block": j, "device": placement[j - 1], "busy": busy[j],
                "utilization": busy[j] / makespan if makespan > 0 else 0.0,
                "finish": finish[j], "updates": updates[j - 1],
                "idle": makespan - busy[j],
                "idle_by_cause": dict(idle[j - 1]),
            })
        want = steps if expected_updates is None else expected_updates
        stalled = [j for j in range(1, K + 1) if updates[j - 1] < want]
        meta = dict(meta, makespan=makespan)
        if stalled:
            meta["stalled_blocks"] = stalled
        trace = Trace.from_rows(rows, meta)
        return cls(algo=algo, steps=steps, trace=trace, makespan=makespan,
                   throughput=steps / makespan if makespan > 0 else math.inf,
                   per_block=per_block, buffers=list(buffers), meta=meta)

    @property
    def n_spans(self) -> int:
        return len(self.trace)

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        """JSON-ready summary (NaN and inf become None). ``samples=True``
        keeps the raw per-buffer reuse and staleness lists."""
        bufs = []
        for b in self.buffers:
            d = {k: v for k, v in b.items() if samples or k not in ("reuse", "staleness")}
            d["reuse_mean"] = _finite(d["reuse_mean"])
            d["staleness_mean"] = _finite(d["staleness_mean"])
            bufs.append(d)
        return {
            "algo": self.algo, "steps": self.steps, "makespan": self.makespan,
            "throughput": _finite(self.throughput), "n_spans": self.n_spans,
            "per_block": [dict(b, idle_by_cause=dict(b["idle_by_cause"]))
                          for b in self.per_block],
            "buffers": bufs,
            "stalled_blocks": self.meta.get("stalled_blocks", []),
        }

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [f"{self.algo}: K={len(self.per_block)} blocks, {self.steps} steps, "
                 f"makespan {self.makespan:.6g}, throughput {self.throughput:.6g} steps/unit, "
                 f"{self.n_spans} spans"]
        lines.append("block  device  busy        util   finish      updates  idle(input/grad/"
                     "buffer/device)")
        for b in self.per_block:
            i = b["idle_by_cause"]
            lines.append(f"{b['block']:>5}  {b['device']:>6}  {b['busy']:<10.6g}  "
                         f"{b['utilization']:<5.1%}  {b['finish']:<10.6g}  {b['updates']:>7}  "
                         f"{i['input']:.4g}/{i['gradient']:.4g}/{i['buffer']:.4g}/"
                         f"{i['device']:.4g}")
        for b in self.buffers:
            lines.append(f"buffer {b['block']} (M={b['capacity']}): reuse_mean "
                         f"{b['reuse_mean']:.3g}, staleness_mean {b['staleness_mean']:.3g}, "
                         f"{b['puts']} puts, {b['gets']} reads")
        if self.meta.get("stalled_blocks"):
            lines.append(f"warning: blocks {self.meta['stalled_blocks']} did not finish their "
                         "updates (starved: raise --buffer or --max-reuse)")
        return "\n".join(lines)


def buffer_stats(trace: Trace) -> list[dict[str, Any]]:
    """Reuse, staleness and misses of every replay buffer of a ``dgl-async``
    trace, from the reads it logged (the same for a measured and a
    simulated trace).

    ``trace.meta["buffer_reads"]`` maps the reading block ``"j"`` to its
    reads ``[step, producer step, reads of that entry so far]`` and
    ``trace.meta["buffer_misses"]`` to how many reads found nothing to
    serve. Returns ``out[j-1]`` for the buffer block j writes: ``block``,
    ``reads``, ``reuse_mean`` (reads per entry read at least once),
    ``staleness_mean`` (producer updates completed when the reader started
    its forward, less the entry's producer step) and ``misses``. Empty
    without logged reads.
    """
    reads = trace.meta.get("buffer_reads") or {}
    misses = trace.meta.get("buffer_misses") or {}
    if not reads:
        return []
    K = int(trace.meta.get("blocks") or max(int(k) for k in reads))
    fwd_start: dict[tuple[int, int], float] = {}
    upd_ends: dict[int, list[float]] = {}
    for r in trace.rows:
        if r[1] != "compute":
            continue
        if r[2] == "fwd":
            key = (r[3], r[4])
            if key not in fwd_start or r[6] < fwd_start[key]:
                fwd_start[key] = r[6]
        elif r[2] == "update":
            upd_ends.setdefault(r[3], []).append(r[7])
    for v in upd_ends.values():
        v.sort()
    out = []
    for j in range(1, K):
        log = reads.get(str(j + 1), [])
        most: dict[int, int] = {}
        stale = []
        ends = upd_ends.get(j, [])
        for step, produced, n in log:
            most[produced] = max(most.get(produced, 0), n)
            t = fwd_start.get((j + 1, step))
            if t is not None:
                stale.append(bisect.bisect_right(ends, t + 1e-12 * max(1.0, abs(t))) - produced)
        out.append({"block": j, "reads": len(log),
                    "reuse_mean": _mean(list(most.values())),
                    "staleness_mean": _mean(stale),
                    "misses": int(misses.get(str(j + 1), 0))})
    return out
