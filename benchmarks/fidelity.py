"""How well the simulator predicts measured runs (issue 5, item 7).

1. **Calibrate** the simulator on one measured run: ``dgl`` with 2 workers
   (``Costs.from_trace``: median cost per op and block, lognormal spread,
   message latency). Two things such a run cannot show are added from
   models: the input-gradient product that backprop's blocks 2..K compute
   and DGL's detached blocks skip (``Costs.with_input_grad`` with FLOP
   fractions from ``BlockNet.input_grad_flops``), and how op times shrink at
   the pipelines' micro-batch size (a short profile of each block at both
   batch sizes, ``profile_ratios``: a ratio, the level stays the measured
   one; run in fresh processes, two per repeat, and the per-key mean
   taken, since one process's ratios are one draw of a per-process speed
   with two modes).
2. **Predict** held-out measured runs with ``bpsim.sim.simulate`` and those
   costs: more steps, the other algorithms, a slowed rank (``--slowdown``,
   real extra work; the simulator multiplies that block's costs), the
   one-process reference (both blocks on one device). Report the makespan
   error and the per-rank busy-time error of each (``bpsim.sim.compare``).
   Every run is measured ``--repeats`` times, interleaved with the others
   (each round starting at another place in the order, against drift),
   after ``WARMUP`` untimed steps, and the repeat with the median makespan
   is compared; the calibration takes the per-key median over its repeats.
3. Separately, **self-calibrated** predictions: each algorithm calibrated
   on its own short run and asked for a longer and a slowed run. The gap
   between the two tables is the error of carrying op costs from one
   algorithm to another, not of the schedules.
4. **More ranks than cores**: 4 workers confined to 2 cores (``cpus``, so
   any machine can run it). Costs come from the one-process run of the same
   4-block net (undisturbed); the simulator shares devices (``placement=2``: blocks 1-2 on device 0,
   3-4 on device 1). Makespan and per-block busy errors are reported, and
   the makespan error with those costs times ``fit_contention``'s
   two-process factor.

A ``speed_probe`` (one fixed matrix product, timed second by second for
``PROBE_SECONDS`` before and after the measurements) reports how much the
machine's own speed moved meanwhile: the noise any prediction sits in.

Blocks are compute-heavy (MLP width 1024, batch 128, two layers per block,
DGL heads ``linear``), one torch thread per worker, and the training set is
cut to a multiple of the batch size so that every step costs the same.
Results: ``benchmarks/results/fidelity.{json,md}``.

    python benchmarks/fidelity.py            # full (about 8 minutes, 5 repeats)
    python benchmarks/fidelity.py --quick    # < 1 min: calibration + 3 held-out runs; writes nothing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _render import gpu_suffix, render  # noqa: E402

WIDTH, BATCH, N_TRAIN = 1024, 128, 1280
WARMUP = 3   # untimed first steps of every measured run (see measure)
DEVICE = "cpu"
PIPES = ("gpipe", "1f1b")   # micro-batched: costs per micro-batch from profile_ratios
PROFILES_PER_ROUND = 2      # profile_ratios processes per repeat (median over all of them)
PROBE_SECONDS = 5           # speed_probe before and after the measurements
CONTENTION = (0.1, 0.25)    # Costs.contention of the side-by-side what-if predictions
OVER_CORES = 2   # the oversubscribed runs put 4 ranks on this many cores (--cpus)


def _cfg(algo: str, steps: int, workers: int = 2, blocks: int = 2, **kw: Any) -> Any:
    from bpsim.runtime import RunConfig

    base = dict(blocks=blocks, steps=steps, data="digits", model="mlp", width=WIDTH,
                depth=2 * blocks - 1, batch_size=BATCH, threads=1, evaluate=False, seed=0,
                n_train=N_TRAIN, device=DEVICE)
    if algo.startswith("dgl"):
        base["aux"] = "linear"
    base.update(kw)
    return RunConfig(algo, workers=workers, **base)


def measure(cfg: Any) -> Any:
    """Run ``cfg`` for ``WARMUP`` more steps and drop them from the trace.

    A run's first steps take up to twice the usual time (allocation, kernel
    choice); a benchmark times the steady state after them. The exception
    is blockprop-cached, whose epochs with and without h-step must stay
    where the simulator puts them (``epochs_steps``): it keeps every step.
    """
    from bpsim.runtime import run

    w = 0 if cfg.algo == "blockprop-cached" else WARMUP
    res = run(replace(cfg, steps=cfg.steps + w))
    res.trace = res.trace.without_warmup(w)
    return res


CALIB = "calibration"


def measure_rounds(runs: list[tuple[str, Any]], rounds: int,
                   after: Any = None) -> dict[str, list[Any]]:
    """Measure every ``(label, cfg)`` of ``runs`` ``rounds`` times, round by
    round, and return ``{label: [results]}``; ``after(label)`` runs after each.

    Each round starts at another place in the order (round r at
    ``r * len(runs) // rounds``). On a machine whose speed drifts over the
    minutes of a round (``speed_probe`` saw 3.06 ms at the start of one
    benchmark run and 3.91 ms at its end) a fixed order always measures the
    first runs, the calibration above all, at another speed than the last:
    in two of three full runs with the calibration always first, 9 and 11
    of the 12 held-out errors had the same sign.
    """
    out: dict[str, list[Any]] = {label: [] for label, _ in runs}
    for r in range(rounds):
        k = r * len(runs) // rounds
        for label, cfg in runs[k:] + runs[:k]:
            out[label].append(measure(cfg))
            if after is not None:
                after(label)
        print(f"repeat {r + 1}/{rounds} measured", flush=True)
    return out


def _sim_kwargs(cfg: Any, res: Any) -> dict[str, Any]:
    """simulate() arguments describing the measured run ``cfg``."""
    kw: dict[str, Any] = {"blocks": cfg.blocks, "steps": cfg.steps}
    if cfg.slowdown:
        kw["slowdown"] = dict(cfg.slowdown)   # by block, as the runtime's
    if cfg.workers == 1:
        kw["placement"] = [0] * cfg.blocks
    if cfg.algo == "dgl-async":
        kw["buffer"] = cfg.buffer
    if cfg.algo.startswith("blockprop"):
        kw["nh"] = cfg.options.get("nh", 4)
    if cfg.algo == "blockprop-cached":
        kw["cache_every"] = cfg.options.get("cache_every", 2)
        kw["epochs_steps"] = N_TRAIN // BATCH
    if cfg.algo in PIPES:
        kw["microbatches"] = cfg.microbatches
    return kw


def _net(cfg: Any) -> Any:
    """``cfg``'s BlockNet (the runs' seed-0 weights do not matter here)."""
    from bpsim import data, nets

    desc = data.describe(cfg.data)
    return nets.build(cfg.model, desc.input_shape, desc.n_classes, cfg.blocks,
                      width=cfg.width, depth=cfg.depth)


def _profile_setup(cfg: Any) -> tuple[Any, Any]:
    """For the in-process profiles: one torch thread (as each worker has),
    ``cfg``'s net and a seeded input batch."""
    import torch

    torch.set_num_threads(1)
    net = _net(cfg)
    x = torch.randn(BATCH, *net.input_shape, generator=torch.Generator().manual_seed(0))
    return net, x


def _with_op_costs(costs: Any, durations: dict[tuple[int, str], list[float]],
                   reduce: Any) -> dict[int, dict[str, float]]:
    """``costs.per_block`` with each (block, op) cost replaced by ``reduce``
    of its measured ``durations``."""
    per = {b: dict(over) for b, over in costs.per_block.items()}
    for (b, op), ds in durations.items():
        per.setdefault(b, {})[op] = reduce(ds)
    return per


def input_grad_fractions(cfg: Any) -> list[float]:
    """Input-gradient FLOPs over forward FLOPs of each block of ``cfg``'s net."""
    net = _net(cfg)
    return [i / f for i, f in zip(net.input_grad_flops(), net.block_flops())]


def _op_durations(trace: Any) -> dict[tuple[int, str], list[float]]:
    """``{(block, op): [durations]}`` of the compute ops (no waits) of ``trace``."""
    from bpsim.sim.costs import COMPUTE_OPS

    out: dict[tuple[int, str], list[float]] = {}
    for r in trace.rows:
        if r[1] == "compute" and r[2] in COMPUTE_OPS:
            out.setdefault((r[3], r[2]), []).append(r[7] - r[6])
    return out


def mean_costs(trace: Any) -> Any:
    """``Costs.from_trace`` with each op's *mean* duration instead of its
    median and no spread: a diagnostic. On a shared machine a few ops are
    much slower than the rest (another process took the core), so the
    median underestimates the time a run really spends."""
    from bpsim.sim import Costs

    base = Costs.from_trace(trace)
    return replace(base, per_block=_with_op_costs(base, _op_durations(trace), statistics.mean),
                   spread=0.0, jitter={})


def predict(costs: Any, cfg: Any, res: Any, label: str, alt: Any = None,
            mb_costs: Any = None) -> dict[str, Any]:
    """Simulate the run ``cfg`` with ``costs`` and compare with its measurement
    (and, with ``alt``, also with those costs: the mean-cost diagnostic).
    ``res`` is one measured run or a list of repeats: the repeat with the
    median makespan is compared. For ``gpipe``, ``mb_costs(costs)`` turns
    minibatch costs into micro-batch costs (None: the costs are per
    micro-batch already)."""
    from bpsim.sim import simulate
    from bpsim.sim.compare import compare

    runs = res if isinstance(res, list) else [res]
    spans = sorted(r.trace.makespan for r in runs)
    res = next(r for r in runs if r.trace.makespan == spans[(len(spans) - 1) // 2])
    algo = cfg.algo

    def sim_compare(cs: Any) -> dict[str, Any]:
        if algo in PIPES and mb_costs is not None:
            cs = mb_costs(cs)
        return compare(res.trace, simulate(algo, costs=cs, **_sim_kwargs(cfg, res)).trace)

    c = sim_compare(costs)
    out = {"case": label, "algo": algo, "workers": cfg.workers, "steps": cfg.steps,
           "slowdown": {str(k): v for k, v in cfg.slowdown.items()},
           "makespan_measured": c["makespan_measured"],
           "makespans_measured": spans,
           "makespan_simulated": c["makespan_simulated"],
           "makespan_error": c["makespan_error"], "busy": c["busy"],
           "busy_error_mean": c["busy_error_mean"],
           "start_offset_frac": c["start_offset_frac"],
           "noise": noise(res.trace), "overlap": res.trace.overlap()}
    if alt is not None:
        _diagnostic(out, "mean_costs", sim_compare(alt))
    return out


def _diagnostic(case: dict[str, Any], key: str, other: dict[str, Any]) -> None:
    """Keep the errors of another prediction of ``case``'s run under ``key``."""
    case[key] = {"makespan_error": other["makespan_error"],
                 "busy_error_mean": other["busy_error_mean"]}


def noise(trace: Any) -> float:
    """Busy time over (op count x median op time): 1.0 on a quiet machine,
    more when other processes slow some ops down."""
    by = _op_durations(trace)
    tot = sum(sum(v) for v in by.values())
    med = sum(statistics.median(v) * len(v) for v in by.values())
    return tot / med if med > 0 else float("nan")


def _scaled(costs: Any, f: float, update: bool = False) -> Any:
    """``costs`` with each block's fwd, bwd, aux, hstep and bwd_in times ``f``,
    and with ``update`` its update too. Without: per-micro-batch costs
    assuming time proportional to batch size (the update is once per step
    and keeps its cost)."""
    ops = ("fwd", "bwd", "aux", "hstep", "bwd_in") + (("update",) if update else ())
    per = {b: {k: (v * f if k in ops else v) for k, v in over.items()}
           for b, over in costs.per_block.items()}
    return replace(costs, per_block=per)


def profile_ratios(cfg: Any, microbatches: int, reps: int = 40) -> dict[int, dict[str, float]]:
    """How much one micro-batch op costs relative to the whole-batch op.

    Times each block of ``cfg``'s net in this process (one thread): forward,
    backward with a detached input, and backward that also computes the
    input gradient, at batch ``B`` and ``B / microbatches`` (median of
    ``reps``). Returns ``{block: {"fwd": r, "bwd": r, "bwd+in": r}}`` with
    r = t(B / m) / t(B). A pipeline's first micro-batch backward writes the
    weight gradients and the other m - 1 add to them (a read and a write of
    every gradient), so a micro-batch backward is timed both ways and r is
    their mean over the m micro-batches; the whole-batch backward (dgl, bp)
    only writes. A GEMM of a quarter of the rows is less than a
    quarter of the time on a CPU, the weight gradient above all, so these
    are well above 1 / m; the measured run supplies the absolute level, the
    profile only the shape dependence.

    Each block's entry also has ``t_fwd`` and ``t_bwd`` from
    ``_solo_step_times``.
    """
    import torch

    net, x = _profile_setup(cfg)
    out: dict[int, dict[str, float]] = {}
    mb, m = BATCH // microbatches, microbatches
    configs = [(op, b, acc) for b in (BATCH, mb) for op in ("fwd", "bwd", "bwd+in")
               for acc in ((False, True) if b < BATCH and op != "fwd" else (False,))]
    for j, blk in enumerate(net.blocks, start=1):
        # Interleaved: each round times every configuration once, so a slow
        # spell of the machine hits numerator and denominator alike.
        ds: dict[tuple[str, int, bool], list[float]] = {c: [] for c in configs}
        for i in range(reps + 1):                  # round 0 warms up
            for op, b, acc in configs:
                if not acc:
                    blk.zero_grad(set_to_none=True)
                elif any(p.grad is None for p in blk.parameters()):
                    blk(x[:b]).square().mean().backward()   # something to add to
                inp = x[:b].detach().clone().requires_grad_(op == "bwd+in")
                t0 = time.perf_counter()
                y = blk(inp)
                if op != "fwd":
                    t0 = time.perf_counter()
                    y.square().mean().backward()
                if i:
                    ds[(op, b, acc)].append(time.perf_counter() - t0)
        blk.zero_grad(set_to_none=True)
        t = {c: statistics.median(v) for c, v in ds.items()}
        out[j] = {"fwd": t[("fwd", mb, False)] / t[("fwd", BATCH, False)]}
        for op in ("bwd", "bwd+in"):   # chunk 1 writes .grad, chunks 2..m add to it
            chunk = (t[(op, mb, False)] + (m - 1) * t[(op, mb, True)]) / m
            out[j][op] = chunk / t[(op, BATCH, False)]
        out[j]["t_fwd"], out[j]["t_bwd"] = _solo_step_times(blk, x, reps)
        with torch.no_grad():
            x = blk(x)
    return out


def _solo_step_times(blk: Any, x: Any, reps: int) -> tuple[float, float]:
    """Median whole-batch forward and backward time (s) of ``blk`` on ``x``,
    timed as a DGL worker runs them (``fit_contention`` compares them with
    the calibration run's): step after step, back to back, each step
    dropping the old gradients (``set_to_none``, as the runtime's optimizers
    do) and taking an SGD step, with no other process computing. Not the
    interleaved timings above: there every op follows a different
    configuration's, and block 2's backward came out 6-14 % slower than in
    the DGL runs themselves (three benchmark runs)."""
    import torch

    opt = torch.optim.SGD(blk.parameters(), lr=1e-6, momentum=0.9)
    fs, bs = [], []
    for i in range(reps + 1):                      # round 0 warms up
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        y = blk(x)
        t1 = time.perf_counter()
        y.square().mean().backward()
        t2 = time.perf_counter()
        opt.step()
        if i:
            fs.append(t1 - t0)
            bs.append(t2 - t1)
    opt.zero_grad(set_to_none=True)
    return statistics.median(fs), statistics.median(bs)


def _profile_in_child(cfg: Any, microbatches: int) -> dict[int, dict[str, float]]:
    """``profile_ratios`` in a fresh interpreter (``spawn``).

    How fast a given GEMM runs differs from one process to the next on this
    kind of machine (block 2's input-gradient ratio came out anywhere from
    0.34 to 0.74 in eleven fresh processes), and stays so for the process's
    lifetime. One profile is one draw of that; the
    workers of every measured run are fresh processes too. So the profile,
    like the runs, is repeated in new processes and averaged
    (``pooled_ratios``)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(profile_ratios, cfg, microbatches).result()


def speed_probe(seconds: float) -> list[float]:
    """How fast this machine is, second by second: the median time (s) of one
    fixed single-thread matrix product (128 x WIDTH by WIDTH x WIDTH, the
    size of a block's forward) in each second of ``seconds``. Taken before and
    after the measurements, the spread of these says how much the machine's
    speed moved on its own, whatever the runs did."""
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(BATCH, WIDTH, generator=g), torch.randn(WIDTH, WIDTH, generator=g)
    out = []
    for _ in range(max(1, round(seconds))):
        ds, end = [], time.perf_counter() + 1.0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            torch.mm(a, b)
            ds.append(time.perf_counter() - t0)
        out.append(statistics.median(ds))
    return out


def probe_spread(xs: list[float]) -> float:
    """(max - min) / median of ``speed_probe`` results."""
    return (max(xs) - min(xs)) / statistics.median(xs)


def pooled_ratios(profiles: list[dict[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    """Per-key mean of several ``profile_ratios`` results.

    The mean, not the median: block 2's input-gradient ratio has two modes
    (about 0.37 and 0.62, one per process), and a median of a few draws
    lands on either by chance, while the mean estimates what a fresh
    process costs on average, which is what a run's ranks are."""
    return {j: {op: statistics.fmean(p[j][op] for p in profiles) for op in ops}
            for j, ops in profiles[0].items()} if profiles else {}


def fit_contention(traces: list[Any], solo: dict[int, dict[str, float]]) -> dict[str, Any]:
    """``Costs.contention`` fitted from the calibration runs and a solo profile.

    A calibration op of duration ``d`` that another rank overlapped for a
    fraction ``f`` of its time did ``d (1 - f A / (1 + A))`` of work at full
    speed (``Costs.from_trace``); the solo profile (``profile_ratios``'s
    ``t_bwd``, no other process computing, mean over the fresh processes)
    times that work directly. Over the backward ops of all blocks (in a DGL
    step a backward never follows a wait, so no after-idle cost is mixed
    in), with d the median over the runs of each run's median and f the mean
    overlap of the block's backward spans, the pooled fit is
    ``x = A / (1 + A) = sum(d - s) / sum(d f)``; A is clipped at 0 (ops no
    slower beside another rank).

    The same numbers read another way: if a run's ops are slower because a
    second process shares the host, whether or not it computes at that
    moment, every op of a run with two or more processes takes ``1 + P``
    times its time alone, ``P = sum(d) / sum(s) - 1`` (clipped at 0).
    Returns ``{"contention": A, "two_process": P, "blocks": {block: {"d",
    "f", "s"}}}``.
    """
    meds: dict[int, list[float]] = {}     # per block: each run's median backward
    shares: dict[int, list[float]] = {}   # per block: every backward's overlap
    for tr in traces:
        shared = tr.span_overlaps()
        by: dict[int, list[float]] = {}
        for row, f in zip(tr.rows, shared):
            if row[1] == "compute" and row[2] == "bwd" and row[3] in solo:
                by.setdefault(row[3], []).append(row[7] - row[6])
                shares.setdefault(row[3], []).append(f or 0.0)
        for j, ds in by.items():
            meds.setdefault(j, []).append(statistics.median(ds))
    blocks = {j: {"d": statistics.median_low(ds), "f": statistics.fmean(shares[j]),
                  "s": solo[j]["t_bwd"]} for j, ds in meds.items() if "t_bwd" in solo[j]}
    den = sum(b["d"] * b["f"] for b in blocks.values())
    x = sum(b["d"] - b["s"] for b in blocks.values()) / den if den > 0 else 0.0
    x = min(max(x, 0.0), 0.9)   # A <= 9: a profile far off the run says nothing sensible
    alone = sum(b["s"] for b in blocks.values())
    p2 = max(sum(b["d"] for b in blocks.values()) / alone - 1.0, 0.0) if alone > 0 else 0.0
    return {"contention": x / (1.0 - x), "two_process": p2, "blocks": blocks}


WAKE_GAPS = (0.005, 0.02)   # idle gaps (s) that wake_profile sleeps before an op


def _fit_tau(r: float, g1: float, g2: float) -> float:
    """The time constant tau with (1 - e^(-g1/tau)) / (1 - e^(-g2/tau)) = r
    (between g1/g2, tau -> inf, and 1, tau -> 0), by bisection on log tau."""
    f = lambda tau: math.expm1(-g1 / tau) / math.expm1(-g2 / tau)   # noqa: E731
    lo, hi = 1e-4, 10.0
    if r >= f(lo):
        return lo
    if r <= f(hi):
        return hi
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if f(mid) > r else (lo, mid)
    return math.sqrt(lo * hi)


def wake_profile(cfg: Any, reps: int = 30) -> tuple[dict[int, float], float, dict[int, Any]]:
    """How much longer a block's forward takes after its core idled.

    In this process (one thread), each round times every block's forward
    right after the same forward ran (back to back) and after sleeping each
    of ``WAKE_GAPS``, interleaved. The extra time after a gap g is fitted
    as ``W_j (1 - exp(-g / tau))``: ``tau`` from the ratio of the two
    gaps' extra times (median over blocks), ``W_j`` per block. Returns
    ``({block: W_j}, tau, {block: {gap: extra}})``, the ``wake`` and
    ``wake_tau`` of ``Costs``.
    """
    import torch

    net, x = _profile_setup(cfg)
    extra: dict[int, dict[float, float]] = {}
    for j, blk in enumerate(net.blocks, start=1):
        ds: dict[float, list[float]] = {g: [] for g in (0.0,) + WAKE_GAPS}
        for i in range(reps + 1):                  # round 0 warms up
            for g in ds:
                with torch.no_grad():
                    blk(x)
                if g:
                    time.sleep(g)
                t0 = time.perf_counter()
                y = blk(x)
                d = time.perf_counter() - t0
                y.square().mean().backward()
                blk.zero_grad(set_to_none=True)
                if i:
                    ds[g].append(d)
        base = statistics.median(ds[0.0])
        extra[j] = {g: statistics.median(ds[g]) - base for g in WAKE_GAPS}
        with torch.no_grad():
            x = blk(x)
    g1, g2 = WAKE_GAPS
    ratios = [e[g1] / e[g2] for e in extra.values() if e[g2] > 0]
    tau = _fit_tau(statistics.median(ratios), g1, g2) if ratios else 1e-4
    W = {j: max(0.0, -e[g2] / math.expm1(-g2 / tau)) for j, e in extra.items()}
    return W, tau, extra


def with_wake(costs: Any, trace: Any, W: dict[int, float], tau: float) -> Any:
    """``costs`` (from ``trace``) with the after-idle cost ``W``, ``tau`` added,
    and each op's median taken after removing that cost from the ops of
    ``trace`` that followed a wait, so it is not counted twice."""
    from bpsim.sim import Costs

    by_rank: dict[int, list[tuple]] = {}
    for r in trace.rows:
        if r[1] == "compute":
            by_rank.setdefault(r[0], []).append(r)
    ds: dict[tuple[int, str], list[float]] = {}
    for rows in by_rank.values():
        rows.sort(key=lambda r: r[6])
        prev = None
        for r in rows:
            if r[2] in ("fwd", "bwd", "aux", "update", "hstep"):
                gap = prev[7] - prev[6] if prev is not None and prev[2] == "wait" else 0.0
                pen = Costs.after_idle(W.get(r[3], 0.0), tau, gap)
                ds.setdefault((r[3], r[2]), []).append(r[7] - r[6] - pen)
            prev = r
    per = _with_op_costs(costs, ds, lambda v: max(0.0, statistics.median(v)))
    for b, w in W.items():
        per.setdefault(b, {})["wake"] = w
    return replace(costs, per_block=per, wake_tau=tau)


def profiled(costs: Any, ratios: dict[int, dict[str, float]]) -> Any:
    """Micro-batch costs: each block's whole-batch costs times the profiled ratios."""
    per = {b: dict(v) for b, v in costs.per_block.items()}
    for j, r in ratios.items():
        d = per.setdefault(j, {})
        f, bw, bi = costs.get("fwd", j), costs.get("bwd", j), costs.get("bwd_in", j)
        d["fwd"], d["bwd"] = f * r["fwd"], bw * r["bwd"]
        d["bwd_in"] = max((bw + bi) * r["bwd+in"] - d["bwd"], 0.0)
    return replace(costs, per_block=per)


def median_costs(all_costs: list[Any]) -> Any:
    """Per-key median of several calibrations (repeats of one run).

    The *low* median, like the held-out side (``predict`` compares the
    repeat at index (R - 1) // 2 of the sorted makespans): with an even
    number of repeats an average here against the faster run there would
    bias every prediction towards slow."""
    from bpsim.sim.costs import bin_factors

    first = all_costs[0]
    med = statistics.median_low
    per = {b: {k: med(c.per_block.get(b, {}).get(k, 0.0) for c in all_costs)
               for k in over} for b, over in first.per_block.items()}
    jitter = {op: bin_factors(sorted(f for c in all_costs for f in c.jitter.get(op, ())))
              for op in {op for c in all_costs for op in c.jitter}}
    return replace(first, comm=med(c.comm for c in all_costs), recv=med(c.recv for c in all_costs),
                   spread=med(c.spread for c in all_costs), jitter=jitter, per_block=per)


def per_block_busy(trace: Any, by_block: bool) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in trace.rows:
        if r[1] == "compute" and r[2] != "wait":
            key = r[3] if by_block else r[0]
            out[key] = out.get(key, 0.0) + r[7] - r[6]
    return out


def oversubscribed(steps: int, two_process: float = 0.0) -> dict[str, Any]:
    """4 workers on ``OVER_CORES`` cores, predicted from the one-process run of
    the same net; also with its op costs times ``1 + two_process``
    (``fit_contention``: what a second process on the host adds)."""
    from bpsim.sim import Costs, simulate

    cpus = sorted(os.sched_getaffinity(0))[:OVER_CORES]

    ref_cfg = _cfg("dgl", steps, workers=1, blocks=4)
    ref = measure(ref_cfg)
    costs = Costs.from_trace(ref.trace)
    out = {"calibration": "each algorithm's own 4-block run with --workers 1 (undisturbed "
                          "op costs)", "cases": []}
    for algo in ("dgl", "bp"):
        cfg = _cfg(algo, steps, workers=4, blocks=4, cpus=cpus)
        res = measure(cfg)
        if algo != "dgl":
            costs_a = Costs.from_trace(measure(_cfg(algo, steps, workers=1, blocks=4)).trace)
        else:
            costs_a = costs
        crowded = _scaled(costs_a, 1.0 + two_process, update=True)
        for placement in (2, [0, 1, 0, 1]):
            sim = simulate(algo, blocks=4, steps=steps, costs=costs_a, placement=placement)
            s2 = simulate(algo, blocks=4, steps=steps, costs=crowded, placement=placement)
            mb = per_block_busy(res.trace, True)
            sb = per_block_busy(sim.trace, True)
            errs = [(sb[b] - mb[b]) / mb[b] for b in sorted(mb)]
            m_span, s_span = res.trace.makespan, sim.trace.makespan
            out["cases"].append({
                "algo": algo, "workers": 4, "cores": len(cpus),
                "placement": placement, "makespan_measured": m_span,
                "makespan_simulated": s_span, "makespan_error": (s_span - m_span) / m_span,
                "makespan_error_two_process": (s2.trace.makespan - m_span) / m_span,
                "busy_error_per_block": errs,
                "busy_error_mean": sum(abs(e) for e in errs) / len(errs)})
            print(f"  {algo} 4 workers on {out['cases'][-1]['cores']} cores, placement "
                  f"{placement}: makespan error {100 * out['cases'][-1]['makespan_error']:+.1f}%",
                  flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    global WIDTH, DEVICE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="calibration + 3 held-out runs (< 1 min)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None,
                   help="measure every run this many times, interleaved, and compare the "
                        "repeat with the median makespan (default 5; --quick 1)")
    p.add_argument("--width", type=int, default=1024, help="hidden width (default 1024)")
    p.add_argument("--wake", action="store_true",
                   help="also predict with an after-idle cost (Costs.wake) from an in-process "
                        "profile, side by side (a diagnostic)")
    p.add_argument("--held-only", action="store_true",
                   help="only the calibration and held-out runs (no self-calibrated or "
                        "oversubscribed sections)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the workers compute (cuda: gloo through host memory when there "
                        "are fewer GPUs than workers; gpipe, 1f1b and the oversubscribed runs then "
                        "are skipped)")
    p.add_argument("--out", default=None,
                   help="results folder (default benchmarks/results; --quick writes none)")
    p.add_argument("--render", metavar="JSON",
                   help="only rewrite the .md beside JSON from its saved results")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda, but torch sees no CUDA GPU here; leave --device out")
    if args.render:
        return render(args.render, markdown)
    WIDTH, DEVICE = args.width, args.device
    from bpsim.sim import Costs
    from bpsim.trace import atomic_write_text, json_safe

    t_start = time.time()
    N = args.steps or (16 if args.quick else 40)
    if args.repeats is None:
        # 5, not 3: on a noisy machine the median of 3 is itself a few percent off
        # (one --repeats 9 run gave 4.6 % in an hour whose 3-repeat run gave 10.8 %)
        args.repeats = 1 if args.quick else 5
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    R = args.repeats
    calib_cfg = _cfg("dgl", N)
    held = [("dgl, 2x the steps", _cfg("dgl", 2 * N)),
            ("dgl, block 2 slowed S=2", _cfg("dgl", N, slowdown={2: 2.0})),
            ("bp", _cfg("bp", N))]
    if not args.quick:
        held += [("dgl-async", _cfg("dgl-async", N)),
                 ("dgl-async, block 1 slowed S=2", _cfg("dgl-async", N, slowdown={1: 2.0})),
                 ("dgl-async, block 2 slowed S=2", _cfg("dgl-async", N, slowdown={2: 2.0})),
                 ("bp, block 1 slowed S=2", _cfg("bp", N, slowdown={1: 2.0})),
                 ("gpipe, 4 micro-batches", _cfg("gpipe", N, microbatches=4)),
                 ("1f1b, 4 micro-batches", _cfg("1f1b", N, microbatches=4)),
                 ("blockprop, N_h=1", _cfg("blockprop", N, options={"nh": 1})),
                 ("blockprop-cached, N_h=1, E=2",
                  _cfg("blockprop-cached", 4 * (N_TRAIN // BATCH), options={"nh": 1})),
                 ("dgl, 1 worker (both blocks in one process)", _cfg("dgl", N, workers=1))]
    if DEVICE == "cuda":
        import torch

        if torch.cuda.device_count() < 2:   # pipelines on CUDA need NCCL, one GPU per rank
            held = [(label, cfg) for label, cfg in held if cfg.algo not in PIPES]
    probe = speed_probe(PROBE_SECONDS)
    profiles = []   # the block profile, in fresh processes like the runs

    def profile(label: str) -> None:   # right after each calibration run
        if label == CALIB:
            profiles.extend(_profile_in_child(calib_cfg, 4) for _ in range(PROFILES_PER_ROUND))

    # Repeats are interleaved (calibration, every held-out run, again..., each
    # round rotated) so that a slow spell of the shared machine hits all cases alike.
    runs = measure_rounds([(CALIB, calib_cfg)] + held, R, after=profile)
    calib_runs = runs.pop(CALIB)
    measured = runs
    probe += speed_probe(PROBE_SECONDS)
    # DGL's blocks have detached inputs; backprop and the pipelines also compute the
    # gradient with respect to block 2's input: add it from the FLOP model.
    frac = input_grad_fractions(calib_cfg)
    fitted = [Costs.from_trace(r.trace) for r in calib_runs]
    round_costs = [c.with_input_grad(frac) for c in fitted]
    costs = median_costs(fitted).with_input_grad(frac)
    alt = median_costs([mean_costs(r.trace) for r in calib_runs]).with_input_grad(frac)
    # diagnostic: the same calibration with lognormal draws instead of the
    # measured distribution (what Costs.from_trace(draws="lognormal") returns)
    logn = replace(costs, jitter={})
    # what-if: ranks slow each other down by a in the overlapped part
    # (Costs.contention), the calibration ops turned into work at full speed
    contended = {a: median_costs([Costs.from_trace(r.trace, contention=a)
                                  for r in calib_runs]).with_input_grad(frac)
                 for a in CONTENTION}
    ratios = pooled_ratios(profiles)
    # diagnostic: contention fitted from the solo profile's backward times
    cfit = fit_contention([r.trace for r in calib_runs], ratios)
    fitted_c = median_costs([Costs.from_trace(r.trace, contention=cfit["contention"])
                             for r in calib_runs]).with_input_grad(frac)
    print(f"contention fitted from the solo profile: {cfit['contention']:.3f}; two-process "
          f"factor 1 + {cfit['two_process']:.3f}", flush=True)
    print(f"calibrated on dgl, 2 workers, {N} steps: {costs}", flush=True)
    woke, wake_fit = None, None
    if args.wake:   # diagnostic: the same predictions with an after-idle cost
        wake_w, wake_tau, wake_extra = wake_profile(calib_cfg)
        woke = median_costs([with_wake(Costs.from_trace(r.trace), r.trace, wake_w, wake_tau)
                             for r in calib_runs]).with_input_grad(frac)
        wake_fit = {"W": {str(j): w for j, w in wake_w.items()}, "tau": wake_tau,
                    "extra": {str(j): {str(g): v for g, v in e.items()}
                              for j, e in wake_extra.items()}}
        print(f"after-idle cost: W = {', '.join(f'{1e3 * w:.2f}' for w in wake_w.values())} "
              f"ms, tau = {1e3 * wake_tau:.1f} ms", flush=True)
    cases = []
    for label, cfg in held:
        mb = (lambda cs: profiled(cs, ratios)) if cfg.algo in PIPES else None
        cases.append(predict(costs, cfg, measured[label], label, alt, mb_costs=mb))
        c = cases[-1]
        if R > 1:   # each round's held-out run predicted from that round's calibration
            per = [predict(cr, cfg, mr, label, mb_costs=mb)
                   for cr, mr in zip(round_costs, measured[label])]
            per.sort(key=lambda x: x["makespan_error"])
            c["paired"] = {"makespan_error": per[(R - 1) // 2]["makespan_error"],
                           "busy_error_mean": statistics.median(x["busy_error_mean"] for x in per),
                           "makespan_errors": [x["makespan_error"] for x in per]}
        _diagnostic(c, "lognormal", predict(logn, cfg, measured[label], label, mb_costs=mb))
        for a, ca in contended.items():
            _diagnostic(c, f"contention_{a:g}", predict(ca, cfg, measured[label], label,
                                                        mb_costs=mb))
        _diagnostic(c, "contention_fitted", predict(fitted_c, cfg, measured[label], label,
                                                    mb_costs=mb))
        if cfg.workers == 1:   # one process: no second one to slow its ops (two_process)
            _diagnostic(c, "two_process", predict(
                _scaled(costs, 1.0 / (1.0 + cfit["two_process"]), update=True), cfg,
                measured[label], label, mb_costs=mb))
        else:                  # as many processes as the calibration: the same prediction
            _diagnostic(c, "two_process", c)
        if woke is not None:
            _diagnostic(c, "wake", predict(woke, cfg, measured[label], label, mb_costs=mb))
        if cfg.algo == "gpipe":   # diagnostic: micro-batch = minibatch / m
            _diagnostic(c, "linear_microbatch", predict(
                costs, cfg, measured[label], label,
                mb_costs=lambda cs, m=cfg.microbatches: _scaled(cs, 1.0 / m)))
        print(f"{label:45s} makespan error {100 * c['makespan_error']:+6.1f}%, "
              f"busy error {100 * c['busy_error_mean']:5.1f}% (mean costs: "
              f"{100 * c['mean_costs']['makespan_error']:+6.1f}%, "
              f"{100 * c['mean_costs']['busy_error_mean']:5.1f}%; "
              + (f"after-idle: {100 * c['wake']['makespan_error']:+6.1f}%, "
                 f"{100 * c['wake']['busy_error_mean']:5.1f}%; " if "wake" in c else "")
              + f"lognormal: {100 * c['lognormal']['makespan_error']:+6.1f}%; fitted "
              f"contention: {100 * c['contention_fitted']['makespan_error']:+6.1f}%; noise "
              f"{c['noise']:.3f})", flush=True)
    self_cal = []
    if not args.quick and not args.held_only:
        for algo, extra in (("bp", {}), ("blockprop", {"options": {"nh": 1}}),
                            ("dgl-async", {}), ("gpipe", {"microbatches": 4}),
                            ("1f1b", {"microbatches": 4})):
            if algo in PIPES and not any(c.algo in PIPES for _, c in held):
                continue
            cases_a = [(f"{algo}, 2x the steps", _cfg(algo, 2 * N, **extra)),
                       (f"{algo}, block 2 slowed S=2", _cfg(algo, N, slowdown={2: 2.0}, **extra))]
            runs_a = measure_rounds([(CALIB, _cfg(algo, N, **extra))] + cases_a, R)
            shorts = runs_a.pop(CALIB)
            c_self = median_costs([Costs.from_trace(r.trace) for r in shorts])
            c_logn = replace(c_self, jitter={})   # lognormal draws
            for label, cfg in cases_a:
                self_cal.append(predict(c_self, cfg, runs_a[label], label))
                c = self_cal[-1]
                _diagnostic(c, "lognormal", predict(c_logn, cfg, runs_a[label], label))
                print(f"[self] {label:38s} makespan error {100 * c['makespan_error']:+6.1f}%, "
                      f"busy error {100 * c['busy_error_mean']:5.1f}% (lognormal: "
                      f"{100 * c['lognormal']['makespan_error']:+6.1f}%)", flush=True)
    over = (oversubscribed(N, cfit["two_process"])
            if not (args.quick or args.held_only) and DEVICE == "cpu" else None)

    import torch

    out = {
        "benchmark": "simulator fidelity", "quick": args.quick,
        "setup": {"model": f"mlp width {WIDTH}, 2 layers per block, dgl heads linear",
                  "data": f"digits (first {N_TRAIN} training examples)", "batch_size": BATCH,
                  "steps": N, "threads_per_worker": 1, "warmup_steps": WARMUP,
                  "device": DEVICE},
        "machine": {"cores": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "load_avg_at_start": os.getloadavg(),
                    "speed_probe_s": probe, "speed_probe_shape": [BATCH, WIDTH, WIDTH],
                    "speed_probe_spread": probe_spread(probe)},
        "calibration": {"run": f"dgl, 2 workers, {N} steps", "costs": costs.to_dict(),
                        "repeats": R, "input_grad_fractions": frac,
                        "microbatch_ratios": {str(j): r for j, r in ratios.items()},
                        "microbatch_profiles": [{str(j): r for j, r in pr.items()}
                                                for pr in profiles],
                        "after_idle": wake_fit,
                        "noise": statistics.median(noise(r.trace) for r in calib_runs),
                        "overlap": statistics.median(r.trace.overlap() for r in calib_runs),
                        "contention_what_if": list(CONTENTION), "rounds_rotated": True,
                        "microbatch_pool": "mean",
                        "contention_fit": {"contention": cfit["contention"],
                                           "two_process": cfit["two_process"],
                                           "blocks": {str(j): b for j, b
                                                      in cfit["blocks"].items()}}},
        "held_out": cases, "self_calibrated": self_cal, "oversubscribed": over,
        "summary": {**_errors("held_out", cases),
                    **_errors("mean_costs", [c["mean_costs"] for c in cases]),
                    **_errors("paired", [c["paired"] for c in cases if "paired" in c]),
                    **_errors("self", self_cal),
                    **_errors("lognormal", [c["lognormal"] for c in cases]),
                    **{k: v for a in CONTENTION for k, v in _errors(
                        f"contention_{a:g}", [c[f"contention_{a:g}"] for c in cases]).items()},
                    **_errors("contention_fitted", [c["contention_fitted"] for c in cases]),
                    **_errors("two_process", [c["two_process"] for c in cases]),
                    **_errors("self_lognormal", [c["lognormal"] for c in self_cal]),
                    **_errors("after_idle", [c["wake"] for c in cases if "wake" in c])},
        "seconds": time.time() - t_start,
    }
    s = out["summary"]
    print(f"held-out: mean |makespan error| {100 * s['held_out_mean_abs_makespan_error']:.1f}%, "
          f"mean busy error {100 * s['held_out_mean_busy_error']:.1f}% "
          f"({out['seconds']:.0f} s)")
    out_dir = args.out or (None if args.quick else str(HERE / "results"))
    if out_dir is None:
        print("--quick writes no results; give --out to keep them")
        return 0
    name = "fidelity-quick" if args.quick else "fidelity"
    folder = Path(out_dir)
    atomic_write_text(folder / f"{name}.json", json.dumps(json_safe(out), indent=1))
    atomic_write_text(folder / f"{name}.md", markdown(out))
    print(f"wrote {folder / name}.json and .md")
    return 0


def _mean_abs(xs: list[dict[str, Any]], key: str) -> float:
    vals = [abs(x[key]) for x in xs if x[key] is not None and math.isfinite(x[key])]
    return sum(vals) / len(vals) if vals else math.nan


def _errors(prefix: str, xs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Summary entries ``PREFIX_mean_abs_makespan_error`` and
    ``PREFIX_mean_busy_error`` over the predictions ``xs`` (None without any)."""
    return {f"{prefix}_mean_abs_makespan_error": _mean_abs(xs, "makespan_error") if xs else None,
            f"{prefix}_mean_busy_error": _mean_abs(xs, "busy_error_mean") if xs else None}


def _spread(c: dict[str, Any]) -> str:
    """(max - min) / median of the repeats' measured makespans: the noise floor."""
    ms = c.get("makespans_measured") or []
    if len(ms) < 2:
        return "-"
    return f"{100 * (max(ms) - min(ms)) / statistics.median(ms):.0f}%"


def noise_floor(cases: list[dict[str, Any]]) -> float | None:
    """Median over cases of half the repeat spread: how far a single run of a
    case typically lies from the middle one."""
    hs = [(max(c["makespans_measured"]) - min(c["makespans_measured"]))
          / (2 * statistics.median(c["makespans_measured"]))
          for c in cases if len(c.get("makespans_measured") or []) > 1]
    return statistics.median(hs) if hs else None


def _table(cases: list[dict[str, Any]]) -> list[str]:
    alt = all("mean_costs" in c for c in cases)
    ov = all("overlap" in c for c in cases)
    head = ("| held-out run | measured makespan (s) | repeat spread | simulated (s) | makespan error | "
            "busy error per rank | mean busy error | noise |" + (" overlap |" if ov else ""))
    rule = "|---|---:|---:|---:|---:|---|---:|---:|" + ("---:|" if ov else "")
    if alt:
        head += " with mean op costs: makespan / busy error |"
        rule += "---:|"
    lines = [head, rule]
    for c in cases:
        busy = ", ".join(f"{100 * b['error']:+.1f}%" for b in c["busy"])
        line = (f"| {c['case']} | {c['makespan_measured']:.3f} | {_spread(c)} | "
                f"{c['makespan_simulated']:.3f} | {100 * c['makespan_error']:+.1f}% | {busy} | "
                f"{100 * c['busy_error_mean']:.1f}% | {c['noise']:.3f} |")
        if ov:
            line += f" {c['overlap']:.2f} |"
        if alt:
            m = c["mean_costs"]
            line += f" {100 * m['makespan_error']:+.1f}% / {100 * m['busy_error_mean']:.1f}% |"
        lines.append(line)
    return lines


def overlap_line(o: dict[str, Any]) -> str:
    """How the held-out errors go with the runs' overlap (``Trace.overlap``)."""
    cases = o["held_out"]
    line = (f"*overlap* = share of the compute time during which another rank computed too "
            f"(`Trace.overlap`; {o['calibration']['overlap']:.2f} in the calibration runs). "
            "If ranks that compute at the same time slow each other down, runs with less "
            "overlap than the calibration come out faster than predicted (positive errors).")
    xs = [o["calibration"]["overlap"] - c["overlap"] for c in cases]
    ys = [c["makespan_error"] for c in cases]
    try:
        r = statistics.correlation(xs, ys)
    except statistics.StatisticsError:   # fewer than 2 cases, or a constant
        return line
    return line + (f" Correlation of the makespan error with (calibration overlap - run "
                   f"overlap) over the {len(cases)} held-out runs: r = {r:+.2f}.")


def _diagnostic_lines(o: dict[str, Any], key: str, prefix: str, intro: str) -> list[str]:
    """A paragraph on the held-out cases' ``key`` predictions: ``intro``, then
    the summary's ``prefix`` means and each case's makespan error."""
    sm = o["summary"]
    return ["", intro + f"mean |makespan error| {100 * sm[prefix + '_mean_abs_makespan_error']:.1f}%, "
                f"mean busy error {100 * sm[prefix + '_mean_busy_error']:.1f}%. Per case: "
                + "; ".join(f"{c['case']} {100 * c[key]['makespan_error']:+.1f}%"
                            for c in o["held_out"] if key in c) + "."]


def markdown(o: dict[str, Any]) -> str:
    s, m = o["setup"], o["machine"]
    lines = [f"# Simulator fidelity{' (quick)' if o['quick'] else ''}", "",
             f"{s['model']}; {s['data']}, batch {s['batch_size']}, {s['steps']} steps unless "
             f"said otherwise, {s['threads_per_worker']} torch thread per worker, on "
             f"{s.get('device', 'cpu')}{gpu_suffix(o)}; "
             f"{m['cores']} cores, load average at start {m['load_avg_at_start'][0]:.2f}.", "",
             f"Calibrated on: {o['calibration']['run']} (`Costs.from_trace`, per-key median "
             f"over {o['calibration'].get('repeats', 1)} repeats"
             + ("" if "lognormal" not in o["held_out"][0] else
                ", the op times drawn from the measured distribution of duration / median "
                "(`Costs.jitter`, pooled over the repeats)")
             + f"; noise {o['calibration']['noise']:.3f}). Blocks after the first of backprop and the pipelines "
             "also "
             "compute their input gradient, which DGL's detached blocks never do: its cost is "
             "the block's forward time times the FLOP fraction of that product "
             f"({', '.join(f'{f:.2f}' for f in o['calibration'].get('input_grad_fractions', []))}"
             " per block, `Costs.with_input_grad`). gpipe's and 1f1b's micro-batch costs are the DGL "
             "costs "
             "times the ratio t(B/m) / t(B) of a short "
             + ("in-process profile of each block (`profile_ratios`)"
                if "microbatch_profiles" not in o["calibration"] else
                f"profile of each block in {len(o['calibration']['microbatch_profiles'])} fresh "
                "single-thread processes interleaved with the repeats (`profile_ratios`; per-key "
                + o["calibration"].get("microbatch_pool", "median") + ")")
             + "; scaling by 1/m instead gives the gpipe diagnostic below.", "",
             f"Every run was measured {o['calibration'].get('repeats', 1)} times, interleaved "
             "with the others"
             + ("" if not o["calibration"].get("rounds_rotated") else
                " (each round starting at another place in the order, so that a drift of the "
                "machine's speed does not always favour the same runs)")
             + "; each row compares the repeat with the median makespan (all "
             "repeats' makespans are in the JSON). *repeat spread* = (max - min) / median of "
             "those makespans: identical runs differ by this much on this machine, so it bounds "
             "how small a prediction error can be told apart from noise. Each measured run first took "
             f"{s.get('warmup_steps', 0)} untimed warm-up steps (dropped from its trace with "
             "`Trace.without_warmup`; blockprop-cached keeps all its steps so that its epochs "
             "line up with the simulator's).", "",
             "*noise* = busy time / (ops x median op time) of the measured run: 1.000 when "
             "every op takes its median time; more when other processes on the machine "
             "slowed some ops down. "
             + ("Drawn from the measured distribution, the simulated ops take the "
                "calibration run's mean time, so the simulator is off by about the ratio of "
                "the two runs' noise; lognormal draws of the same log-spread (the diagnostic "
                "below the table) fall short of the mean by most of the noise. "
                if "lognormal" in o["held_out"][0] else
                "`Costs.from_trace` uses medians, so the simulator then "
                "predicts a run that is faster by about that factor. ")
             + "The last column uses each "
             "op's mean duration instead (a diagnostic, not the calibration under test).", ""]
    lines += _table(o["held_out"])
    for c in o["held_out"]:
        if "linear_microbatch" in c:
            lm = c["linear_microbatch"]
            lines += ["", f"Diagnostic, {c['case']} with micro-batch costs = minibatch costs / m: "
                          f"makespan error {100 * lm['makespan_error']:+.1f}%, busy error "
                          f"{100 * lm['busy_error_mean']:.1f}%."]
    sm = o["summary"]
    lines += ["", f"Mean |makespan error| {100 * sm['held_out_mean_abs_makespan_error']:.1f}% "
                  f"(target <= 3%), mean busy error {100 * sm['held_out_mean_busy_error']:.1f}% "
                  "(target <= 5%). With mean op costs: "
                  f"{100 * sm['mean_costs_mean_abs_makespan_error']:.1f}% and "
                  f"{100 * sm['mean_costs_mean_busy_error']:.1f}%."]
    if sm.get("lognormal_mean_abs_makespan_error") is not None:
        lines += _diagnostic_lines(o, "lognormal", "lognormal", (
            "Diagnostic, the same calibration with lognormal draws (`Costs.from_trace(trace, "
            "draws=\"lognormal\")`, the default before `Costs.jitter`): "))
    for a in o["calibration"].get("contention_what_if", []):
        key = f"contention_{a:g}"
        lines += _diagnostic_lines(o, key, key, (
            f"What if ranks slowed each other down by {100 * a:g}% while both compute "
            f"(`Costs.contention = {a:g}`, the calibration's ops turned into their work at full "
            "speed by `Costs.from_trace(trace, contention=...)`; not fitted, a sensitivity "
            "check): "))
    cf = o["calibration"].get("contention_fit")
    if cf is not None and sm.get("contention_fitted_mean_abs_makespan_error") is not None:
        per = "; ".join(f"block {j}: {1e3 * b['d']:.2f} ms in the run, overlapped "
                        f"{100 * b['f']:.0f}%, {1e3 * b['s']:.2f} ms alone"
                        for j, b in cf["blocks"].items())
        lines += _diagnostic_lines(o, "contention_fitted", "contention_fitted", (
            f"Contention fitted (`fit_contention`: the calibration's backward ops against the "
            f"same ops timed alone in the block profile's processes; {per}) at "
            f"`Costs.contention = {cf['contention']:.3f}`: "))
    if cf is not None and sm.get("two_process_mean_abs_makespan_error") is not None:
        lines += _diagnostic_lines(o, "two_process", "two_process", (
            "Or the slowdown comes with a second process on the host, whether or not it "
            "computes at that moment: the same numbers give a two-process factor 1 + "
            f"{cf['two_process']:.3f} (the calibration's backward times, summed over the "
            "blocks, over the same ops' times alone), and the one-process run is predicted with the calibration's op costs "
            "divided by it (the others as in the table): "))
    if sm.get("after_idle_mean_abs_makespan_error") is not None:
        fit = o["calibration"]["after_idle"]
        lines += _diagnostic_lines(o, "wake", "after_idle", (
            "Diagnostic (`--wake`), the same runs predicted with an after-idle cost "
            "(`Costs.wake`: an op after an idle gap g costs W (1 - exp(-g / tau)) more; "
            "W = " + ", ".join(f"{1e3 * w:.2f}" for w in fit["W"].values())
            + f" ms per block, tau = {1e3 * fit['tau']:.1f} ms, from an in-process "
            "profile; the calibration run's ops after waits are debiased): "))
    if sm.get("paired_mean_abs_makespan_error") is not None:
        lines += _diagnostic_lines(o, "paired", "paired", (
            "Paired by round (each round's held-out runs predicted from the same round's "
            "calibration run, measured seconds apart; median over the rounds): "))
    if "overlap" in o["calibration"]:
        lines += ["", overlap_line(o)]
    nf = noise_floor(o["held_out"])
    if nf is not None:
        lines += ["", f"Noise floor: half the repeat spread, median over the held-out cases, is "
                      f"{100 * nf:.1f}% of the makespan."]
    if "speed_probe_s" in m:
        ps = [1e3 * x for x in m["speed_probe_s"]]
        lines += ["", f"Machine speed (`speed_probe`: median time of one "
                      f"{' x '.join(map(str, m['speed_probe_shape'][:2]))} by "
                      f"{' x '.join(map(str, m['speed_probe_shape'][1:]))} matrix product, one "
                      "thread, in each second of "
                      f"{len(ps) // 2} s before and {len(ps) - len(ps) // 2} s after the measurements): "
                      f"{min(ps):.2f}-{max(ps):.2f} ms, a spread of "
                      f"{100 * m['speed_probe_spread']:.0f}% of the median with nothing else running."]
    if o["self_calibrated"]:
        lines += ["", "## Each algorithm calibrated on its own short run", ""]
        lines += _table(o["self_calibrated"])
        lines += ["", f"Mean |makespan error| {100 * sm['self_mean_abs_makespan_error']:.1f}%, "
                      f"mean busy error {100 * sm['self_mean_busy_error']:.1f}%."]
        if sm.get("self_lognormal_mean_abs_makespan_error") is not None:
            lines[-1] += (" With lognormal draws: "
                          f"{100 * sm['self_lognormal_mean_abs_makespan_error']:.1f}% and "
                          f"{100 * sm['self_lognormal_mean_busy_error']:.1f}% ("
                          + ", ".join(f"{100 * c['lognormal']['makespan_error']:+.1f}%"
                                      for c in o["self_calibrated"]) + ").")
    if o["oversubscribed"]:
        cases = o["oversubscribed"]["cases"]
        two = all("makespan_error_two_process" in c for c in cases)
        lines += ["", "## More workers than cores", "",
                  f"Calibrated on {o['oversubscribed']['calibration']}.", "",
                  "| run | simulator placement | makespan error | busy error per block | "
                  "mean busy error |" + (" with the two-process factor |" if two else ""),
                  "|---|---|---:|---|---:|" + ("---:|" if two else "")]
        for c in cases:
            errs = ", ".join(f"{100 * e:+.0f}%" for e in c["busy_error_per_block"])
            lines.append(f"| {c['algo']}, {c['workers']} workers on {c['cores']} cores | "
                         f"{c['placement']} | {100 * c['makespan_error']:+.1f}% | {errs} | "
                         f"{100 * c['busy_error_mean']:.0f}% |"
                         + (f" {100 * c['makespan_error_two_process']:+.1f}% |" if two else ""))
        if two:
            lines += ["", "*with the two-process factor*: the one-process op costs times "
                          f"1 + {o['calibration']['contention_fit']['two_process']:.3f} "
                          "(`fit_contention`, see above)."]
        lines += ["", "A measured span on a shared core includes the time its process waited "
                      "for the core, so measured busy times exceed the simulator's (which "
                      "queues whole ops on a device) even when the makespans agree."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
