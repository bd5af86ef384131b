"""Calibration helpers (``bpsim.sim.calibrate``, ``bpsim.runtime.profile``):
how repeats and micro-batch profiles combine into the costs a prediction uses."""

from __future__ import annotations

import pytest

from bpsim.sim import Costs, simulate
from bpsim.sim.calibrate import (interleaved, mean_costs, median_costs, median_run, noise,
                                 op_durations, pooled_ratios, profiled)

COST = "fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05"


def test_pooled_ratios_is_the_per_key_mean():
    profiles = [{1: {"fwd": 0.3, "bwd": 0.40}, 2: {"fwd": 0.35, "bwd": 0.70}},
                {1: {"fwd": 0.5, "bwd": 0.42}, 2: {"fwd": 0.37, "bwd": 0.34}},
                {1: {"fwd": 0.4, "bwd": 0.90}, 2: {"fwd": 0.36, "bwd": 0.36}}]
    out = pooled_ratios(profiles)
    assert out == {1: {"fwd": pytest.approx(0.4), "bwd": pytest.approx(1.72 / 3)},
                   2: {"fwd": pytest.approx(0.36), "bwd": pytest.approx(1.4 / 3)}}
    assert pooled_ratios([]) == {}


def test_profiled_scales_each_op():
    c = Costs(per_block={1: {"fwd": 4.0, "bwd": 8.0, "bwd_in": 0.0, "update": 1.0},
                         2: {"fwd": 4.0, "bwd": 4.0, "bwd_in": 4.0, "update": 1.0}})
    mb = profiled(c, {1: {"fwd": 0.25, "bwd": 0.5, "bwd+in": 0.5},
                      2: {"fwd": 0.5, "bwd": 0.5, "bwd+in": 0.75}})
    assert mb.get("fwd", 1) == 1.0 and mb.get("bwd", 1) == 4.0 and mb.get("bwd_in", 1) == 0.0
    # block 2: bwd + bwd_in = (4 + 4) * 0.75 = 6, of which bwd = 4 * 0.5 = 2
    assert mb.get("bwd", 2) == 2.0 and mb.get("bwd_in", 2) == 4.0
    assert mb.get("update", 2) == 1.0   # once per step: not scaled


def test_interleaved_rotates_the_order():
    seen, after = [], []
    out = interleaved([("c", "C"), ("a", "A"), ("b", "B")], 3,
                      lambda cfg: seen.append(cfg) or f"run of {cfg}", after=after.append)
    # round r starts at r * 3 // 3 = r: every run is measured first once
    assert seen == ["C", "A", "B", "A", "B", "C", "B", "C", "A"]
    assert after == ["c", "a", "b", "a", "b", "c", "b", "c", "a"]
    assert out == {"c": ["run of C"] * 3, "a": ["run of A"] * 3, "b": ["run of B"] * 3}


def test_median_and_mean_costs_of_simulated_runs():
    runs = [simulate("dgl", blocks=2, steps=20, costs=COST + f",spread=0.2", seed=s).trace
            for s in range(3)]
    cs = [Costs.from_trace(t) for t in runs]
    med = median_costs(cs)
    for j in (1, 2):
        assert med.get("fwd", j) in {c.get("fwd", j) for c in cs}
    assert sum(len(v) for v in med.jitter.values()) > 0
    with pytest.raises(ValueError):
        median_costs([])
    fixed = simulate("dgl", blocks=2, steps=10, costs=COST).trace
    assert mean_costs(fixed).get("bwd", 2) == pytest.approx(2.0)
    assert noise(fixed) == pytest.approx(1.0)
    assert noise(runs[0]) > 1.0                   # lognormal draws: mean above median
    assert len(op_durations(fixed)[(1, "fwd")]) == 10
    assert median_run(runs).makespan == sorted(t.makespan for t in runs)[1]


def test_calibrate_does_not_import_torch():
    import subprocess
    import sys
    code = "import bpsim.sim.calibrate, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_profile_ratios_of_a_small_net():
    from bpsim.runtime import RunConfig
    from bpsim.runtime.profile import input_grad_fractions, profile_ratios

    cfg = RunConfig("gpipe", workers=2, blocks=2, batch_size=32)
    r = profile_ratios(cfg, microbatches=4, reps=3)
    assert set(r) == {1, 2} and all(set(v) == {"fwd", "bwd", "bwd+in"} for v in r.values())
    assert all(x > 0 for v in r.values() for x in v.values())
    fr = input_grad_fractions(cfg)
    assert len(fr) == 2 and all(f > 0 for f in fr)
