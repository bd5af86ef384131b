"""Every method of the registry on the runtime at K = 2, 3 and 4 blocks: the
op order the simulator predicts, (for the synchronous methods) the weights
of the in-process trainer, and (for ``dgl-async``) every block trained on
the labels of the mini-batch its input came from.

One small run per method, block count and worker count (digits, 120
examples in batches of 32, so every epoch ends with a short batch of 24; a
four-layer MLP of width 16 split into K blocks; a few steps; one thread per
rank) is shared by the tests of this file. Timeouts and durations are never
asserted.
"""

from __future__ import annotations

import pytest
import torch

from bpsim import data, methods
from bpsim.runtime import RunConfig, run
from bpsim.runtime.schedules import BatchPlan
from bpsim.runtime.worker import build

METHODS = methods.names(runtime=True)
KS = (2, 3, 4)
N_TRAIN, BATCH = 120, 32           # 4 steps per epoch, the last a short batch of 24
DEPTH = 4                          # the same four layers, split into K blocks
STEPS = {"blockprop-cached": 12}   # epochs 0 (h-step), 1 (W-step only), 2 (h-step from the cache)


def _config(algo: str, workers: int, blocks: int = 2, **kw) -> RunConfig:
    kw.setdefault("options", {"nh": 2} if algo.startswith("blockprop") else {})
    kw.setdefault("steps", STEPS.get(algo, 4))
    return RunConfig(algo, workers=workers, blocks=blocks, depth=DEPTH, width=16,
                     batch_size=BATCH, n_train=N_TRAIN, seed=0, evaluate=False, threads=1, **kw)


_RUNS: dict[tuple[str, int, int], object] = {}


def _run(algo: str, workers: int, blocks: int = 2):
    key = (algo, workers, blocks)
    if key not in _RUNS:
        _RUNS[key] = run(_config(algo, workers, blocks))
    return _RUNS[key]


def _pipelined(algo: str) -> bool:
    return "microbatches" in methods.get(algo).options


def _in_process(algo: str, blocks: int) -> dict[str, torch.Tensor]:
    """``Trainer.fit`` (what ``bpsim train`` runs) of ``algo`` over as many whole
    epochs as the run has steps: the same net, options, seed and batch order.

    The pipelines skip the short batch at the end of an epoch (their
    micro-batch shapes are fixed), so for them the trainer's ``train_step``
    runs on the runtime's batches instead."""
    cfg = _config(algo, 1, blocks).resolved()
    desc = data.describe("digits")
    train, _ = data.load("digits", n_train=N_TRAIN, seed=0)
    net, tr = build(cfg, desc.input_shape, desc.n_classes, desc.task)
    if _pipelined(algo):
        x, y = train.tensors
        plan = BatchPlan(tr, x, y, cfg.steps, torch.device("cpu"), full_only=True)
        for t in range(cfg.steps):
            tr.epoch = plan.epochs[t]
            tr.train_step(plan.x(t), plan.y(t), plan.idx[t])
        return net.state_dict()
    steps = cfg.steps * (cfg.blocks if algo == "greedy" else 1)   # greedy: K stages
    per_epoch = len(tr.batches(len(train), 0))
    assert steps % per_epoch == 0 and len(train) % BATCH   # whole epochs, each with a short batch
    tr.fit(train, steps // per_epoch)
    return net.state_dict()


def _ops(rows, block: int) -> list[tuple]:
    """Block ``block``'s compute ops in time order, waits left out."""
    ops = sorted((r for r in rows if r[3] == block and r[1] == "compute" and r[2] != "wait"),
                 key=lambda r: (r[6], r[7]))
    return [(r[3], r[2], r[4], r[5]) for r in ops]


@pytest.mark.slow
@pytest.mark.parametrize("blocks", KS)
@pytest.mark.parametrize("algo", METHODS)
def test_measured_op_sequence_is_the_simulated_one(algo, blocks):
    """The simulator, given nothing but the trace's meta (``simulate_like``),
    runs every block's ops in the measured order."""
    from bpsim.sim import simulate_like

    res = _run(algo, blocks, blocks)
    res.trace.check()
    sim = simulate_like(res.trace, costs="fwd=1,bwd=2,comm=0.1")
    for block in range(1, blocks + 1):
        measured = _ops(res.trace.rows, block)
        assert measured, f"block {block} recorded no op"
        assert measured == _ops(sim.trace.rows, block), (algo, blocks, block)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", KS)
@pytest.mark.parametrize("algo", [m for m in METHODS if methods.get(m).synchronous])
def test_one_and_k_workers_reach_the_in_process_weights(algo, blocks):
    """Both sides are built from the registry and the trainer class when the
    test runs, so they share whatever defaults are current (e.g. BlockProp's
    h-step size)."""
    ref = _in_process(algo, blocks)
    for workers in (1, blocks):
        got = _run(algo, workers, blocks).state_dict
        assert got.keys() == ref.keys()
        diff = max((got[k].double() - ref[k].double()).abs().max().item() for k in ref)
        assert diff < 1e-5, (algo, blocks, workers, diff)


@pytest.mark.slow
def test_meta_holds_every_resolved_option():
    res = _run("blockprop-cached", 2)
    m = res.trace.meta
    assert m["algo"] == "blockprop-cached" and m["blocks"] == 2 and m["workers"] == 2
    assert m["steps"] == 12 and m["steps_per_epoch"] == 4 and m["placement"] == [0, 1]
    assert m["options"] == methods.get("blockprop-cached").resolved_options({"nh": 2})
    for key in ("batch_size", "microbatches", "buffer", "max_reuse", "slowdown"):
        assert key in m
    # Alg. 2: the W-step-only epoch sends nothing; the h-step epochs do
    comm_steps = {r[4] for r in res.trace.rows if r[1] == "comm"}
    assert comm_steps == {0, 1, 2, 3, 8, 9, 10, 11}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_dgl_async_records_every_buffer_read(workers):
    res = run(_config("dgl-async", workers, 2, steps=6, buffer=2, slowdown={1: 2.0}))
    m = res.trace.meta
    reads = m["buffer_reads"]["2"]
    assert [r[0] for r in reads] == list(range(6))             # one read per consumer step
    assert all(0 <= p < 6 and n >= 1 for _, p, n in reads)
    # a reuse count is the number of reads of that producer step so far
    seen: dict[int, int] = {}
    for _, p, n in reads:
        seen[p] = seen.get(p, 0) + 1
        assert n == seen[p]
    misses = m["buffer_misses"]
    assert set(misses) == {"2"} and isinstance(misses["2"], int) and misses["2"] >= 0
    assert res.summary["buffers"]["2"]["gets"] == 6


def _origins(meta: dict, blocks: int, steps: int) -> dict[int, list[int]]:
    """The mini-batch behind each update of each block, followed from the
    recorded buffer reads alone: block 1 takes batch t at step t; block j > 1
    at step t computes on what block j - 1 made at the producer step it read
    (known from the order of the link, not from the message's header)."""
    origin = {1: list(range(steps))}
    for j in range(2, blocks + 1):
        reads = meta["buffer_reads"][str(j)]
        assert [r[0] for r in reads] == list(range(steps))
        origin[j] = [origin[j - 1][p] for _, p, _ in reads]
    return origin


@pytest.mark.slow
@pytest.mark.parametrize("one_process", [True, False])
@pytest.mark.parametrize("blocks", KS)
def test_dgl_async_trains_every_block_on_the_labels_of_its_input(blocks, one_process):
    """Every update of every block uses the labels of the batch its input came
    from, with a slowed middle block (the blocks above it reuse and skip
    entries) and a short batch at every epoch's end (a wrong pairing would
    also mismatch shapes)."""
    steps = 12
    workers = 1 if one_process else blocks
    res = run(_config("dgl-async", workers, blocks, steps=steps, buffer=2, slowdown={2: 3.0}))
    m = res.trace.meta
    assert sum(p["updates"] for p in res.summary["per_rank"]) == steps * blocks
    used = {int(b): v for b, v in m["label_batches"].items()}
    assert used == _origins(m, blocks, steps)
