"""GPU checks of the runtime: skipped where torch sees no CUDA device (CI has
none). ``benchmarks/gpu_box.sh`` runs them on a lent GPU machine.

With one GPU every rank computes on ``cuda:0`` and tensors travel through
host memory over gloo; with one GPU per rank the runtime picks NCCL. Either
way a deterministic algorithm must train the same weights as on the CPU, up
to float32 rounding of different kernels.
"""

from __future__ import annotations

import pytest
import torch

from bpsim.runtime import RunConfig, run

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].detach().cpu().double() - b[k].detach().cpu().double()).abs().max().item()
               for k in a)


@pytest.mark.parametrize("algo,extra", [("dgl", {}), ("bp", {}),
                                        ("blockprop", {"options": {"nh": 2}}),
                                        ("blockprop-cached", {"options": {"nh": 1}}),
                                        ("greedy", {}), ("bwbpf", {})])
def test_cuda_run_trains_the_same_weights_as_the_cpu_run(algo, extra):
    kw = dict(workers=2, steps=12, evaluate=False, **extra)
    gpu = run(RunConfig(algo, device="cuda", **kw))
    cpu = run(RunConfig(algo, **kw))
    want = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    assert gpu.summary["backend"] == want and gpu.summary["device"] == "cuda"
    assert [p["updates"] for p in gpu.summary["per_rank"]] == [12, 12]
    assert _max_diff(gpu.state_dict, cpu.state_dict) < 1e-4
    gpu.trace.check()


def test_cuda_dgl_async_runs_and_records_its_buffer():
    res = run(RunConfig("dgl-async", workers=2, steps=16, buffer=4, device="cuda",
                        slowdown={1: 2.0}))
    s = res.summary
    assert [p["updates"] for p in s["per_rank"]] == [16, 16]
    assert s["buffers"]["2"]["puts"] == 16
    assert s["test_accuracy"] is not None
    res.trace.check()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="gpipe on CUDA needs one GPU per rank")
def test_cuda_gpipe_over_nccl_matches_the_cpu_run():
    kw = dict(workers=2, steps=8, microbatches=4, evaluate=False)
    gpu = run(RunConfig("gpipe", device="cuda", **kw))
    cpu = run(RunConfig("gpipe", **kw))
    assert gpu.summary["backend"] == "nccl"
    assert _max_diff(gpu.state_dict, cpu.state_dict) < 1e-4


def test_cuda_with_one_gpu_per_rank_missing_gives_a_clear_error():
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has a GPU per rank")
    with pytest.raises(ValueError, match="needs NCCL"):
        RunConfig("gpipe", workers=2, device="cuda").resolved()
