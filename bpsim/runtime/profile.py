"""Profiles of a run's blocks timed alone, for calibrating the simulator.

A measured ``dgl`` or ``bp`` run times each op at the whole batch; a
pipeline runs the same blocks on micro-batches. :func:`profile_ratios`
times every block at both sizes in this process and returns the ratios
that :func:`bpsim.sim.calibrate.profiled` applies to the measured costs;
:func:`input_grad_fractions` gives what :meth:`Costs.with_input_grad
<bpsim.sim.costs.Costs.with_input_grad>` needs to carry detached (DGL)
costs to backprop.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

__all__ = ["net_of", "input_grad_fractions", "profile_ratios", "profile_in_child"]


def net_of(cfg: Any) -> Any:
    """The :class:`~bpsim.nets.BlockNet` a :class:`~bpsim.runtime.RunConfig` trains."""
    from bpsim import data, nets

    desc = data.describe(cfg.data)
    blocks = cfg.blocks if cfg.blocks is not None else cfg.workers   # as RunConfig.resolved
    return nets.build(cfg.model, desc.input_shape, desc.n_classes, blocks,
                      width=cfg.width, depth=cfg.depth)


def input_grad_fractions(cfg: Any) -> list[float]:
    """Input-gradient FLOPs over forward FLOPs of each block of ``cfg``'s net."""
    net = net_of(cfg)
    return [i / f for i, f in zip(net.input_grad_flops(), net.block_flops())]


def profile_ratios(cfg: Any, microbatches: int, reps: int = 40) -> dict[int, dict[str, float]]:
    """Micro-batch op time over whole-batch op time of each block of ``cfg``.

    Times forward, backward with a detached input and backward that also
    computes the input gradient, at ``cfg.batch_size`` and at that over
    ``microbatches`` (median of ``reps``, one torch thread, every
    configuration once per round so that a slow spell hits all alike).
    A pipeline's first micro-batch backward writes the weight gradients
    and the others add to them, so the micro-batch backward is the mean
    of the two kinds over the m micro-batches. Returns ``{block: {"fwd": r,
    "bwd": r, "bwd+in": r}}``.
    """
    import torch

    torch.set_num_threads(1)
    net = net_of(cfg)
    B = cfg.batch_size
    x = torch.randn(B, *net.input_shape, generator=torch.Generator().manual_seed(0))
    m = microbatches
    mb = B // m
    configs = [(op, b, acc) for b in (B, mb) for op in ("fwd", "bwd", "bwd+in")
               for acc in ((False, True) if b < B and op != "fwd" else (False,))]
    out: dict[int, dict[str, float]] = {}
    for j, blk in enumerate(net.blocks, start=1):
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
        out[j] = {"fwd": t[("fwd", mb, False)] / t[("fwd", B, False)]}
        for op in ("bwd", "bwd+in"):
            chunk = (t[(op, mb, False)] + (m - 1) * t[(op, mb, True)]) / m
            out[j][op] = chunk / t[(op, B, False)]
        with torch.no_grad():
            x = blk(x)
    return out


def profile_in_child(cfg: Any, microbatches: int, reps: int = 40) -> dict[int, dict[str, float]]:
    """:func:`profile_ratios` in a fresh interpreter (one draw of a fresh
    process's speed, as each rank of a run is)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(profile_ratios, cfg, microbatches, reps).result()
