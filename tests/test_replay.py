"""Replay (``bpsim.sim.replay``), ``simulate_like`` and the refusals of
simulate and compare: a simulated trace replays to itself exactly."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpsim import methods
from bpsim.sim import Costs, replay, simulate, simulate_like
from bpsim.sim.api import SpanLimitError
from bpsim.sim.compare import compare, format_report
from bpsim.sim.results import buffer_stats
from bpsim.trace import Trace

COST = "fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05"

# An op costs nothing or at least a microsecond: a positive cost far below the
# resolution of the time axis (5e-324 at t = 10) leaves a span of length zero,
# which the replay cannot tell from an op that costs nothing.
op_cost = st.one_of(st.just(0.0), st.floats(1e-6, 1))

cost_st = st.fixed_dictionaries({
    "fwd": st.floats(0.01, 3), "bwd": st.floats(0.01, 3), "aux": op_cost,
    "bwd_in": st.sampled_from([0.0, 0.5]), "update": op_cost,
    "comm": op_cost, "recv": st.sampled_from([0.0, 0.2]),
    "spread": st.sampled_from([0.0, 0.3]),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(algo=st.sampled_from(methods.NAMES), K=st.integers(2, 4), N=st.integers(1, 5),
       costs=cost_st, seed=st.integers(0, 3), slow=st.floats(0.5, 3), m=st.integers(1, 3))
def test_a_simulated_trace_replays_to_itself(algo, K, N, costs, seed, slow, m):
    r = simulate(algo, blocks=K, steps=N, costs=costs, seed=seed, slowdown={2: slow},
                 microbatches=m, buffer=3, nh=2, steps_per_epoch=2)
    # through a file, as the CLI reads it
    rp = replay(Trace.from_chrome(r.trace.to_chrome()))
    rep = rp.report
    assert rep["missing"] == 0 and rep["unused"] == 0
    assert rep["makespan"] == pytest.approx(r.makespan, rel=1e-9, abs=1e-9)
    assert rep["makespan_error"] == pytest.approx(0.0, abs=1e-9)
    assert rep["start_offset_median"] == pytest.approx(0.0, abs=1e-9)
    assert all(b["error"] == pytest.approx(0.0, abs=1e-9) for b in rep["busy_error"])
    rp.trace.check()
    if algo == "dgl-async":
        assert rep["buffers"] == rep["measured_buffers"]


def test_replay_report_keys_and_buffers_of_a_slowed_async_run():
    r = simulate("dgl-async", blocks=3, steps=60, costs=COST, slowdown={2: 2.0})
    rep = replay(r.trace).to_dict()
    for k in ("makespan", "measured_makespan", "makespan_error", "busy_error",
              "start_offset_median", "buffers", "measured_buffers"):
        assert k in rep
    b = rep["buffers"]
    assert len(b) == 2 and {"reuse_mean", "staleness_mean", "misses"} <= set(b[0])
    # block 3 reads each output of the twice-slower block 2 about twice
    assert b[1]["reuse_mean"] == pytest.approx(2.0, rel=0.1)
    # the reads logged in the meta give the simulator's own statistics
    assert b[1]["reuse_mean"] == pytest.approx(r.buffers[1]["reuse_mean"])
    assert b[0]["staleness_mean"] == pytest.approx(r.buffers[0]["staleness_mean"], abs=0.05)
    assert buffer_stats(Trace()) == []


def test_replay_charges_untraced_gaps_and_unexplained_waits():
    # a measured-like trace: block 2's ops start 0.5 after block 1's message
    # arrives (a thread hand-off), and rank 0 has a wait no message ends
    rows = [(0, "compute", "fwd", 1, 0, 0, 0.0, 1.0, None),
            (0, "comm", "send", 1, 0, 0, 1.0, 1.0, 7),
            (1, "comm", "recv", 2, 0, 0, 1.0, 1.2, 7),
            (1, "compute", "wait", 2, 0, 0, 0.0, 1.5, None),
            (1, "compute", "fwd", 2, 0, 0, 1.5, 2.0, None),
            (0, "compute", "aux", 1, 0, 0, 1.0, 1.5, None),
            (0, "compute", "wait", 1, 0, 0, 1.5, 1.8, None),
            (0, "compute", "bwd", 1, 0, 0, 1.8, 2.8, None),
            (0, "compute", "update", 1, 0, 0, 2.8, 3.0, None),
            (1, "compute", "aux", 2, 0, 0, 2.0, 2.5, None),
            (1, "compute", "bwd", 2, 0, 0, 2.7, 3.2, None),
            (1, "compute", "update", 2, 0, 0, 3.2, 3.4, None)]
    t = Trace.from_rows(rows, {"algo": "dgl", "blocks": 2, "steps": 1, "placement": [0, 1]})
    rep = replay(t).report
    assert rep["makespan"] == pytest.approx(3.4)
    assert rep["start_offset_median"] == pytest.approx(0.0)
    assert rep["busy_error"][0]["unexplained_wait"] == pytest.approx(0.3)


@pytest.mark.parametrize("algo", ["bp", "gpipe", "dgl-async", "blockprop-cached"])
def test_simulate_like_reads_everything_from_the_meta(algo):
    r = simulate(algo, blocks=3, steps=6, costs=COST, slowdown={2: 1.5}, microbatches=2,
                 nh=1, cache_every=2, steps_per_epoch=2, buffer=4, placement=[0, 1, 1])
    again = simulate_like(r.trace, COST)
    assert again.makespan == pytest.approx(r.makespan, rel=1e-12)
    assert again.trace.rows == r.trace.rows
    # costs default to a calibration on the trace itself
    assert simulate_like(r.trace).makespan > 0


def test_defaults_come_from_the_registry():
    r = simulate("gpipe", blocks=2, steps=1, costs=COST)
    assert r.meta["microbatches"] == methods.DEFAULTS["microbatches"]
    b = simulate("blockprop", blocks=2, steps=1, costs=COST)
    hsteps = [s for s in b.trace if s.op == "hstep"]
    assert len(hsteps) == methods.DEFAULTS["nh"]


@pytest.mark.parametrize("text,msg", [("", "empty"), ("  , ", "empty"),
                                      ("fwd=1,fwd=2", "twice"), ("fwd@2=1,fwd@2=3", "twice")])
def test_cost_strings_refused(text, msg):
    with pytest.raises(ValueError, match=msg):
        Costs.parse(text)


def test_too_many_spans_refused_before_running():
    with pytest.raises(SpanLimitError, match="limit of 20,000,000"):
        simulate("dgl", blocks=4, steps=100_000_000, costs=COST)


def _t(rows, **meta):
    return Trace.from_rows(rows, dict({"blocks": 1}, **meta))


def test_compare_refuses_bad_times_and_block_counts_and_warns_on_methods():
    good = _t([(0, "compute", "fwd", 1, 0, 0, 0.0, 1.0, None)], algo="dgl")
    for bad in ([(0, "compute", "fwd", 1, 0, 0, 1.0, 0.5, None)],
                [(0, "compute", "fwd", 1, 0, 0, 0.0, math.nan, None)]):
        with pytest.raises(ValueError, match="negative duration|non-finite"):
            compare(_t(bad), good)
    two = Trace.from_rows([(0, "compute", "fwd", 2, 0, 0, 0.0, 1.0, None)], {"blocks": 2})
    with pytest.raises(ValueError, match="blocks"):
        compare(good, two)
    res = compare(good, _t([(0, "compute", "fwd", 1, 0, 0, 0.0, 2.0, None)], algo="bp"))
    assert len(res["warnings"]) == 1
    text = format_report(res)
    assert text.startswith("warning:") and "nan" not in text


# ------------------------------------------------------- measured runs
@pytest.mark.slow
@pytest.mark.parametrize("algo,slowdown", [(a, {}) for a in methods.names(runtime=True)]
                         + [("dgl-async", {2: 2.0})])
def test_a_short_measured_run_replays_within_twice_the_targets(algo, slowdown):
    """The replay of a real run (2 workers, 24 steps) keeps its makespan within
    4 % and its ops' starts within 10 % of a step (twice the benchmark's
    targets, benchmarks/fidelity.py); buffer reads replay as measured."""
    from bpsim.runtime import RunConfig, run

    res = run(RunConfig(algo, workers=2, steps=24, slowdown=slowdown, evaluate=False))
    rep = replay(res.trace).report
    assert rep["missing"] == 0 and rep["unused"] == 0, rep
    assert abs(rep["makespan_error"]) <= 0.04, rep
    assert rep["start_offset_median"] <= 0.10, rep
    if algo == "dgl-async":
        for sim_b, meas_b in zip(rep["buffers"], rep["measured_buffers"]):
            for k in ("reuse_mean", "staleness_mean"):
                assert sim_b[k] == pytest.approx(meas_b[k], rel=0.10, abs=0.05), rep


def test_cli_replay_prints_the_report_and_refuses_mixed_arguments(tmp_path, capsys):
    import json

    from bpsim.cli import main

    r = simulate("dgl-async", blocks=2, steps=8, costs=COST, slowdown={1: 2.0})
    src, out = tmp_path / "m.json", tmp_path / "r.json"
    r.trace.save(src)
    assert main(["simulate", "--replay", str(src), "--json", "--trace", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    for k in ("makespan", "measured_makespan", "makespan_error", "busy_error",
              "start_offset_median", "buffers", "measured_buffers"):
        assert k in rep
    assert rep["makespan_error"] == pytest.approx(0.0, abs=1e-9)
    assert Trace.load(out).makespan == pytest.approx(r.makespan)
    assert main(["simulate", "dgl", "--replay", str(src)]) == 2
    assert "leave out ALGO" in capsys.readouterr().err
    assert main(["simulate"]) == 2
