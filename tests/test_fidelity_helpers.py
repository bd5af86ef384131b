"""The small pure helpers of ``benchmarks/fidelity.py``: how several micro-batch
profiles are combined, how the machine-speed probe is summarised, and how
profiled ratios turn whole-batch costs into micro-batch costs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def fidelity():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("fidelity")


def test_pooled_ratios_is_the_per_key_mean(fidelity):
    profiles = [{1: {"fwd": 0.3, "bwd": 0.40}, 2: {"fwd": 0.35, "bwd": 0.70}},
                {1: {"fwd": 0.5, "bwd": 0.42}, 2: {"fwd": 0.37, "bwd": 0.34}},
                {1: {"fwd": 0.4, "bwd": 0.90}, 2: {"fwd": 0.36, "bwd": 0.36}}]
    out = fidelity.pooled_ratios(profiles)
    assert out == {1: {"fwd": pytest.approx(0.4), "bwd": pytest.approx(1.72 / 3)},
                   2: {"fwd": pytest.approx(0.36), "bwd": pytest.approx(1.4 / 3)}}
    assert fidelity.pooled_ratios([]) == {}


def test_probe_spread(fidelity):
    assert fidelity.probe_spread([3.0, 3.3, 3.6]) == pytest.approx(0.6 / 3.3)
    assert fidelity.probe_spread([2.0]) == 0.0


def test_speed_probe_one_second(fidelity):
    xs = fidelity.speed_probe(1)
    assert len(xs) == 1 and 0 < xs[0] < 1


def test_profiled_scales_each_op(fidelity):
    from bpsim.sim import Costs

    c = Costs(per_block={1: {"fwd": 4.0, "bwd": 8.0, "bwd_in": 0.0, "update": 1.0},
                         2: {"fwd": 4.0, "bwd": 4.0, "bwd_in": 4.0, "update": 1.0}})
    mb = fidelity.profiled(c, {1: {"fwd": 0.25, "bwd": 0.5, "bwd+in": 0.5},
                               2: {"fwd": 0.5, "bwd": 0.5, "bwd+in": 0.75}})
    assert mb.get("fwd", 1) == 1.0 and mb.get("bwd", 1) == 4.0 and mb.get("bwd_in", 1) == 0.0
    # block 2: bwd + bwd_in = (4 + 4) * 0.75 = 6, of which bwd = 4 * 0.5 = 2
    assert mb.get("bwd", 2) == 2.0 and mb.get("bwd_in", 2) == 4.0
    assert mb.get("update", 2) == 1.0   # once per step: not scaled


def test_measure_rounds_rotates_the_order(fidelity, monkeypatch):
    seen = []
    monkeypatch.setattr(fidelity, "measure", lambda cfg: seen.append(cfg) or f"run of {cfg}")
    after = []
    out = fidelity.measure_rounds([("c", "C"), ("a", "A"), ("b", "B")], 3, after=after.append)
    # round r starts at r * 3 // 3 = r: every run is measured first once
    assert seen == ["C", "A", "B", "A", "B", "C", "B", "C", "A"]
    assert after == ["c", "a", "b", "a", "b", "c", "b", "c", "a"]
    assert out == {"c": ["run of C"] * 3, "a": ["run of A"] * 3, "b": ["run of B"] * 3}
    seen.clear()
    fidelity.measure_rounds([("c", "C"), ("a", "A")], 1)
    assert seen == ["C", "A"]


@pytest.mark.parametrize("alpha", [0.0, 0.15, 0.4])
def test_fit_contention_recovers_the_simulated_one(fidelity, alpha):
    from bpsim.sim import Costs, simulate

    # block 2 is light: it idles, so block 1's backward is only partly overlapped
    work = {1: {"fwd": 3.0, "bwd": 6.0, "aux": 0.5, "update": 1.0},
            2: {"fwd": 1.0, "bwd": 1.5, "aux": 0.2, "update": 0.3}}
    costs = Costs(comm=0.1, contention=alpha, per_block=work)
    traces = [simulate("dgl", blocks=2, steps=30, costs=costs).trace]
    solo = {j: {"t_fwd": w["fwd"], "t_bwd": w["bwd"]} for j, w in work.items()}
    fit = fidelity.fit_contention(traces, solo)
    assert fit["contention"] == pytest.approx(alpha, rel=1e-9, abs=1e-12)
    assert 0.4 < fit["blocks"][1]["f"] < 0.6 and fit["blocks"][2]["f"] == 1.0
    f1 = fit["blocks"][1]["f"]   # work = d (1 - f A / (1 + A)), as Costs.from_trace has it
    assert fit["blocks"][1]["d"] * (1 - f1 * alpha / (1 + alpha)) == pytest.approx(6.0)


def test_fit_contention_clips_a_solo_profile_slower_than_the_run(fidelity):
    from bpsim.sim import Costs, simulate

    work = {j: {"fwd": 2.0, "bwd": 4.0, "aux": 0.5, "update": 1.0} for j in (1, 2)}
    trace = simulate("dgl", blocks=2, steps=10, costs=Costs(per_block=work)).trace
    fit = fidelity.fit_contention([trace], {j: {"t_bwd": 5.0} for j in (1, 2)})
    assert fit["contention"] == 0.0 and fit["two_process"] == 0.0
    assert fidelity.fit_contention([trace], {})["contention"] == 0.0   # no profile: none


def test_fit_contention_two_process_factor(fidelity):
    """Ops of a two-process run that all take 1.3 times their time alone
    (whatever the overlap) read as a two-process factor of exactly 0.3."""
    from bpsim.sim import Costs, simulate

    alone = {1: {"fwd": 3.0, "bwd": 6.0, "aux": 0.5, "update": 1.0},
             2: {"fwd": 1.0, "bwd": 1.5, "aux": 0.2, "update": 0.3}}
    crowded = {j: {k: 1.3 * v for k, v in w.items()} for j, w in alone.items()}
    trace = simulate("dgl", blocks=2, steps=20, costs=Costs(comm=0.1, per_block=crowded)).trace
    fit = fidelity.fit_contention([trace], {j: {"t_bwd": w["bwd"]} for j, w in alone.items()})
    assert fit["two_process"] == pytest.approx(0.3)
    # the one-process prediction divides by it and gets the costs alone back
    back = fidelity._scaled(Costs(per_block=crowded), 1 / 1.3, update=True)
    assert all(back.get(k, j) == pytest.approx(v) for j, w in alone.items() for k, v in w.items())
