"""Calibration helpers: from measured traces to the costs a prediction uses.

:meth:`Costs.from_trace <bpsim.sim.costs.Costs.from_trace>` reads one
trace; the functions here combine several (repeats of one run), carry
whole-batch costs to micro-batches with a profile of ratios
(:func:`bpsim.runtime.profile.profile_ratios` measures them), and schedule
repeated measurements so that a drifting machine hits every case alike.
Nothing here imports torch.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence, TypeVar

from bpsim.sim.costs import COMPUTE_OPS, Costs, bin_factors
from bpsim.trace import Trace

__all__ = ["op_durations", "median_costs", "mean_costs", "profiled", "pooled_ratios",
           "noise", "interleaved", "median_run"]

T = TypeVar("T")


def op_durations(trace: Trace) -> dict[tuple[int, str], list[float]]:
    """``{(block, op): [durations]}`` of the compute ops (no waits) of ``trace``."""
    out: dict[tuple[int, str], list[float]] = {}
    for r in trace.rows:
        if r[1] == "compute" and r[2] in COMPUTE_OPS:
            out.setdefault((r[3], r[2]), []).append(r[7] - r[6])
    return out


def median_costs(all_costs: Sequence[Costs]) -> Costs:
    """Per-key low median of several calibrations (repeats of one run), with
    their jitter factors pooled.

    The *low* median, so that with an even number of repeats the result is
    one repeat's value, as the held-out side compares the repeat with the
    low-median makespan (:func:`median_run`).
    """
    if not all_costs:
        raise ValueError("median_costs needs at least one Costs (one calibration)")
    first = all_costs[0]
    med = statistics.median_low
    per = {b: {k: med(c.per_block.get(b, {}).get(k, 0.0) for c in all_costs) for k in over}
           for b, over in first.per_block.items()}
    jitter = {op: bin_factors(sorted(f for c in all_costs for f in c.jitter.get(op, ())))
              for op in {op for c in all_costs for op in c.jitter}}
    return replace(first, comm=med(c.comm for c in all_costs),
                   recv=med(c.recv for c in all_costs),
                   spread=med(c.spread for c in all_costs), jitter=jitter, per_block=per)


def mean_costs(trace: Trace) -> Costs:
    """:meth:`Costs.from_trace` with each op's *mean* duration instead of its
    median and no spread: every op costs what it cost on average, slow
    outliers included."""
    base = Costs.from_trace(trace)
    per = {b: dict(over) for b, over in base.per_block.items()}
    for (b, op), ds in op_durations(trace).items():
        per.setdefault(b, {})[op] = statistics.fmean(ds)
    return replace(base, per_block=per, spread=0.0, jitter={})


def profiled(costs: Costs, ratios: Mapping[int, Mapping[str, float]]) -> Costs:
    """Micro-batch costs: each block's whole-batch ``fwd``, ``bwd`` and
    ``bwd + bwd_in`` times the profiled ratios ``{block: {"fwd": r,
    "bwd": r, "bwd+in": r}}`` (r = micro-batch time over whole-batch time).
    The update runs once per step and keeps its cost."""
    per = {b: dict(v) for b, v in costs.per_block.items()}
    for j, r in ratios.items():
        d = per.setdefault(j, {})
        f, bw, bi = costs.get("fwd", j), costs.get("bwd", j), costs.get("bwd_in", j)
        d["fwd"], d["bwd"] = f * r["fwd"], bw * r["bwd"]
        d["bwd_in"] = max((bw + bi) * r["bwd+in"] - d["bwd"], 0.0)
    return replace(costs, per_block=per)


def pooled_ratios(profiles: Sequence[Mapping[int, Mapping[str, float]]]) -> dict[int, dict[str, float]]:
    """Per-key mean of several profiles (each from a fresh process).

    The mean, not the median: how fast a GEMM runs can differ from one
    process to the next and stay so for the process's life, so one
    profile is one draw, and a run's ranks are fresh processes too.
    """
    return {j: {op: statistics.fmean(p[j][op] for p in profiles) for op in ops}
            for j, ops in profiles[0].items()} if profiles else {}


def noise(trace: Trace) -> float:
    """Busy time over (op count x median op time): 1.0 when every op takes
    its median, more when other processes slowed some ops down."""
    by = op_durations(trace)
    tot = sum(sum(v) for v in by.values())
    med = sum(statistics.median(v) * len(v) for v in by.values())
    return tot / med if med > 0 else float("nan")


def interleaved(runs: Sequence[tuple[str, Any]], rounds: int, measure: Callable[[Any], T],
                after: Callable[[str], None] | None = None) -> dict[str, list[T]]:
    """Measure every ``(label, config)`` ``rounds`` times, round by round, each
    round starting at another place in the order (round r at ``r * len(runs)
    // rounds``), so that a machine whose speed drifts over a round does not
    always measure the same case first. Returns ``{label: [results]}``;
    ``after(label)`` runs after each measurement."""
    out: dict[str, list[T]] = {label: [] for label, _ in runs}
    runs = list(runs)
    for r in range(rounds):
        k = r * len(runs) // rounds
        for label, cfg in runs[k:] + runs[:k]:
            out[label].append(measure(cfg))
            if after is not None:
                after(label)
    return out


def median_run(traces: Sequence[Trace]) -> Trace:
    """The repeat with the low-median makespan."""
    if not traces:
        raise ValueError("median_run needs at least one trace")
    spans = sorted(t.makespan for t in traces)
    return next(t for t in traces if t.makespan == spans[(len(spans) - 1) // 2])
