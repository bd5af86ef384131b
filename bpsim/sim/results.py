"""What a simulation returns: the trace and its per-block, per-buffer summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bpsim.trace import Trace

if TYPE_CHECKING:  # pragma: no cover
    from bpsim.sim.engine import Engine

__all__ = ["SimResult"]


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
    def from_engine(cls, eng: "Engine", algo: str, steps: int,
                    meta: dict[str, Any]) -> "SimResult":
        K = eng.K
        rows = eng.rows
        busy = [0.0] * (K + 1)
        finish = [0.0] * (K + 1)
        end = 0.0
        for r in rows:
            t1 = r[7]
            if t1 > end:
                end = t1
            if r[1] == "compute":
                j = r[3]
                busy[j] += t1 - r[6]
                if t1 > finish[j]:
                    finish[j] = t1
        makespan = end
        per_block = []
        for j in range(1, K + 1):
            per_block.append({
                "block": j, "device": eng.dev[j], "busy": busy[j],
                "utilization": busy[j] / makespan if makespan > 0 else 0.0,
                "finish": finish[j], "updates": eng.updates[j],
                "idle": makespan - busy[j],
                "idle_by_cause": dict(eng.idle[j]),
            })
        buffers = []
        for j in sorted(eng.bufs):
            rb = eng.bufs[j].rb
            reuse = rb.reuse_counts()
            stale = rb.staleness()
            buffers.append({
                "block": j, "capacity": rb.capacity, "max_reuse": rb.max_reuse,
                "reuse_mean": rb.reuse_mean, "staleness_mean": _mean(stale),
                "reuse": reuse, "staleness": stale, "puts": rb.n_puts, "gets": rb.n_gets,
            })
        stalled = [j for j in range(1, K + 1) if eng.updates[j] < _expected(algo, steps)]
        meta = dict(meta, makespan=makespan)
        if stalled:
            meta["stalled_blocks"] = stalled
        trace = Trace.from_rows(rows, meta)
        return cls(algo=algo, steps=steps, trace=trace, makespan=makespan,
                   throughput=steps / makespan if makespan > 0 else math.inf,
                   per_block=per_block, buffers=buffers, meta=meta)

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


def _expected(algo: str, steps: int) -> int:
    return steps
