"""Every method of the registry on the runtime: the op order the simulator
predicts, and (for the synchronous methods) the weights of the in-process
trainer.

One small run per method and worker count (digits, 128 examples, width 16,
two blocks, a few steps) is shared by the tests of this file. Timeouts and
durations are never asserted.
"""

from __future__ import annotations

import pytest
import torch

from bpsim import data, methods
from bpsim.runtime import RunConfig, run
from bpsim.runtime.worker import build

METHODS = methods.names(runtime=True)
N_TRAIN, BATCH = 128, 32           # 4 steps per epoch
STEPS = {"blockprop-cached": 12}   # epochs 0 (h-step), 1 (W-step only), 2 (h-step from the cache)


def _config(algo: str, workers: int) -> RunConfig:
    return RunConfig(algo, workers=workers, blocks=2, steps=STEPS.get(algo, 4), width=16,
                     batch_size=BATCH, n_train=N_TRAIN, seed=0, evaluate=False,
                     options={"nh": 2} if algo.startswith("blockprop") else {})


_RUNS: dict[tuple[str, int], object] = {}


def _run(algo: str, workers: int):
    key = (algo, workers)
    if key not in _RUNS:
        _RUNS[key] = run(_config(algo, workers))
    return _RUNS[key]


def _in_process(algo: str) -> dict[str, torch.Tensor]:
    """``Trainer.fit`` (what ``bpsim train`` runs) of ``algo`` over as many whole
    epochs as the run has steps: the same net, options, seed and batch order."""
    cfg = _config(algo, 1).resolved()
    desc = data.describe("digits")
    train, _ = data.load("digits", n_train=N_TRAIN, seed=0)
    net, tr = build(cfg, desc.input_shape, desc.n_classes, desc.task)
    steps = cfg.steps * (cfg.blocks if algo == "greedy" else 1)   # greedy: K stages
    per_epoch = len(tr.batches(len(train), 0))
    assert steps % per_epoch == 0
    tr.fit(train, steps // per_epoch)
    return net.state_dict()


def _ops(rows, block: int) -> list[tuple]:
    """Block ``block``'s compute ops in time order, waits left out."""
    ops = sorted((r for r in rows if r[3] == block and r[1] == "compute" and r[2] != "wait"),
                 key=lambda r: (r[6], r[7]))
    return [(r[3], r[2], r[4], r[5]) for r in ops]


@pytest.mark.slow
@pytest.mark.parametrize("algo", METHODS)
def test_measured_op_sequence_is_the_simulated_one(algo):
    """The simulator, given nothing but the trace's meta (``simulate_like``),
    runs every block's ops in the measured order."""
    from bpsim.sim import simulate_like

    res = _run(algo, 2)
    sim = simulate_like(res.trace, costs="fwd=1,bwd=2,comm=0.1")
    for block in (1, 2):
        measured = _ops(res.trace.rows, block)
        assert measured, f"block {block} recorded no op"
        assert measured == _ops(sim.trace.rows, block)


@pytest.mark.slow
@pytest.mark.parametrize("algo", [m for m in METHODS if methods.get(m).synchronous])
def test_one_and_two_workers_reach_the_in_process_weights(algo):
    ref = _in_process(algo)
    for workers in (1, 2):
        got = _run(algo, workers).state_dict
        assert got.keys() == ref.keys()
        diff = max((got[k].double() - ref[k].double()).abs().max().item() for k in ref)
        assert diff < 1e-5, (algo, workers, diff)


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
    res = run(RunConfig("dgl-async", workers=workers, blocks=2, steps=6, width=16,
                        batch_size=BATCH, n_train=N_TRAIN, buffer=2, slowdown={1: 2.0},
                        evaluate=False))
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
