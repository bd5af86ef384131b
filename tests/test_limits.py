"""Sizes are checked before anything is allocated; every option acts or is refused.

* **Sizes.** The simulator checks a request as a whole (blocks at most
  ``MAX_BLOCKS``, the exact count of compute spans and then the span
  estimate at most ``MAX_SPANS``, costs whose longest op times the spans
  stays below ``MAX_TIME``) before it builds an engine; the trainer checks
  the net's parameter count on torch's meta device, N_h against
  ``MAX_NH``; ``run`` bounds ``--slowdown`` and ``--timeout``.
* **Options.** An option that would change nothing (``simulate --replay``
  with sizes, ``--steps-per-epoch`` of a method without epochs, ``--aux``
  of an unknown head, ``--calibrate`` from fewer blocks, ``run --no-spans
  --trace``, ``train gpipe`` micro-batches that do not split the batch,
  ``compare`` of a trace with an unknown op or a negative step) is refused.

Each refusal is one line on stderr and exit code 2; nothing here starts a
process or trains more than one tiny epoch.
"""

from __future__ import annotations

import json

import pytest

from bpsim import methods, sim
from bpsim.cli import main
from bpsim.sim import api, schedules
from bpsim.sim.api import MAX_SPANS, SpanLimitError, check_request, estimate_spans
from bpsim.sim.schedules import compute_spans


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) <= 1, err
    return rc, err


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if the simulator builds an engine (i.e. allocates)."""
    def refuse(*a, **k):
        raise AssertionError("an engine was built before the request was refused")
    monkeypatch.setattr(api, "Engine", refuse)


# ------------------------------------------------------------ simulator sizes
TOO_BIG = [
    ("bp", dict(blocks=1_000_000_000, steps=1), "blocks=1,000,000,000"),
    ("gpipe", dict(microbatches=100_000_000), "microbatches=100,000,000"),
    ("1f1b", dict(blocks=4, steps=10 ** 7), "steps=10,000,000"),
    ("blockprop", dict(nh=1000, steps=10 ** 5), "nh=1,000"),
    ("blockprop-cached", dict(nh=1000, steps=10 ** 5, cache_every=3), "nh=1,000"),
    ("greedy", dict(blocks=9000, steps=1), "blocks=9,000"),
    ("dgl-async", dict(blocks=10_000, steps=10 ** 4), "steps=10,000"),
    ("bwbpf", dict(blocks=2, steps=10 ** 12), "steps=1,000,000,000,000"),
]


@pytest.mark.parametrize("algo,kw,words", TOO_BIG, ids=[c[0] for c in TOO_BIG])
def test_too_large_a_simulation_is_refused_before_allocating(algo, kw, words, no_engine):
    with pytest.raises(SpanLimitError, match=words):
        sim.simulate(algo, **kw)


@pytest.mark.parametrize("argv,words", [
    (["bp", "--blocks", "1000000000", "--steps", "1"], "blocks=1,000,000,000"),
    (["gpipe", "--microbatches", "100000000"], "microbatches=100,000,000"),
    (["blockprop", "--nh", "1000000000"], "--nh 1000000000"),
    (["greedy", "--blocks", "9000", "--steps", "1"], "blocks=9,000"),
], ids=["blocks", "microbatches", "nh", "greedy-blocks"])
def test_cli_too_large_is_one_line(argv, words, capsys, no_engine):
    rc, err = _cli(capsys, "simulate", *argv)
    assert rc == 2 and words in err, err


def test_compute_spans_is_exact():
    cost = "fwd=1,bwd=2,aux=0.5,update=0.5,comm=0.1"
    for m in methods.METHODS:
        for K, N, spe in ((2, 3, None), (3, 5, 2)):
            opts = methods.get(m.name).resolved_options(
                {k: v for k, v in dict(microbatches=3, nh=2, cache_every=2).items()
                 if k in m.options})
            res = sim.simulate(m.name, blocks=K, steps=N, costs=cost, steps_per_epoch=spe,
                               **{k: v for k, v in opts.items() if k in api._TIMED})
            n = sum(1 for r in res.trace.rows if r[1] == "compute" and r[2] != "wait")
            name = m.schedule.rpartition(":")[2]
            assert compute_spans(name, K, N, steps_per_epoch=spe, **opts) == n, m.name


def test_the_probe_stops_at_the_limit():
    # 2000 blocks of 1f1b with 50 micro-batches: ~200,000 spans per step;
    # with a limit of 1000 the probe records only about that many
    n = estimate_spans("1f1b", 2000, 1, limit=1000, microbatches=50)
    assert n > 1000
    m = methods.get("1f1b")
    with pytest.raises(SpanLimitError, match="would record"):
        check_request(m, 2000, 1, m.resolved_options({"microbatches": 50}), max_spans=1000)


def test_blocks_and_sizes_are_integers_in_range(no_engine):
    for kw, words in ((dict(blocks=0), "blocks"), (dict(steps=1.5), "steps"),
                      (dict(blocks=api.MAX_BLOCKS + 1, steps=1), "limit of 10,000 blocks")):
        with pytest.raises(ValueError, match=words):
            sim.simulate("dgl", **kw)


def test_replay_of_a_trace_that_claims_huge_sizes_is_refused(monkeypatch):
    trace = sim.simulate("dgl", blocks=2, steps=3).trace
    trace.meta["blocks"] = 10 ** 9

    def refuse(*a, **k):
        raise AssertionError("an engine was built before the request was refused")
    monkeypatch.setattr(api, "Engine", refuse)
    with pytest.raises(SpanLimitError, match="blocks"):
        sim.replay(trace)


# ------------------------------------------------------------- cost ranges
@pytest.mark.parametrize("costs,kw,words", [
    ("spread=1e6", {}, "spread"),
    ("fwd=1e308,bwd=1e308", {}, "hstep"),
    ("bandwidth=1e-300,bytes=1e300", {}, "bytes/bandwidth"),
    ("fwd=1e200", dict(slowdown={2: 1e200}), "--slowdown 2"),
    ("comm=1e300,recv=1e300", {}, "latency"),
], ids=["spread", "sum-overflows", "transfer", "slowdown", "latency"])
def test_costs_that_would_overflow_are_refused(costs, kw, words):
    with pytest.raises(ValueError, match=words):
        sim.simulate("dgl", blocks=2, steps=3, costs=costs, **kw)


def test_cli_cost_overflow_is_one_line_naming_the_cost(capsys):
    rc, err = _cli(capsys, "simulate", "dgl", "--cost", "fwd=1e308,bwd=1e308", "--json")
    assert rc == 2 and "cost" in err and "JSON" not in err
    rc, err = _cli(capsys, "simulate", "dgl", "--cost", "bandwidth=1e-300,bytes=1e300", "--json")
    assert rc == 2 and "bandwidth" in err


def test_large_but_finite_costs_still_simulate(capsys):
    res = sim.simulate("dgl", blocks=2, steps=3, costs="fwd=1e200,bwd=1e200")
    assert res.makespan > 0 and res.makespan < float("inf")


# --------------------------------------------------------------- ignored options
@pytest.fixture
def measured(tmp_path):
    path = tmp_path / "m.json"
    sim.simulate("dgl", blocks=2, steps=3).trace.save(path)
    return str(path)


REPLAY_EXTRA = [["--steps", "5"], ["--blocks", "3"], ["--slowdown", "1:2"], ["--buffer", "4"],
                ["--placement", "1"], ["--draws", "median"], ["--seed", "1"],
                ["--protocol", "eager"], ["--steps-per-epoch", "2"], ["--aux", "linear"]]


@pytest.mark.parametrize("extra", REPLAY_EXTRA, ids=[e[0] for e in REPLAY_EXTRA])
def test_replay_refuses_what_the_trace_gives(extra, measured, capsys):
    rc, err = _cli(capsys, "simulate", "--replay", measured, *extra)
    assert rc == 2 and extra[0] in err, err


def test_replay_alone_still_runs(measured, capsys):
    assert main(["simulate", "--replay", measured, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["makespan"] > 0


@pytest.mark.parametrize("argv,words", [
    (["simulate", "dgl", "--aux", "nope"], "--aux nope"),
    (["simulate", "dgl", "--steps-per-epoch", "7"], "--steps-per-epoch"),
    (["simulate", "dgl-async", "--aux", "cnnx"], "unknown auxiliary head"),
    (["train", "gpipe", "--microbatches", "128", "--batch-size", "64"], "--batch-size 64"),
    (["train", "1f1b", "--microbatches", "3", "--batch-size", "64"], "micro-batches"),
    (["train", "dgl", "--aux", "nope", "--epochs", "1"], "--aux nope"),
    (["run", "dgl", "--no-spans", "--trace", "@/t.json"], "--no-spans"),
], ids=["sim-aux", "sim-steps-per-epoch", "sim-async-aux", "train-gpipe-mb", "train-1f1b-mb",
        "train-aux", "run-no-spans-trace"])
def test_options_that_would_do_nothing_are_refused(argv, words, tmp_path, capsys):
    argv = [a.replace("@/", f"{tmp_path}/") for a in argv]
    rc, err = _cli(capsys, *argv)
    assert rc == 2 and words in err, err
    assert not (tmp_path / "t.json").exists()


def test_calibrate_from_fewer_blocks_is_refused(measured, capsys):
    rc, err = _cli(capsys, "simulate", "dgl", "--blocks", "8", "--calibrate", measured)
    assert rc == 2 and "block 3" in err, err
    rc, err = _cli(capsys, "simulate", "dgl", "--blocks", "3", "--calibrate", measured,
                   "--cost", "fwd@3=1,bwd@3=2")
    assert rc == 0, err
    assert main(["simulate", "dgl", "--blocks", "2", "--calibrate", measured]) == 0


def test_steps_per_epoch_acts_on_blockprop_cached(capsys):
    a = sim.simulate("blockprop-cached", blocks=2, steps=8, steps_per_epoch=2).makespan
    b = sim.simulate("blockprop-cached", blocks=2, steps=8).makespan
    assert a != b
    assert main(["simulate", "blockprop-cached", "--steps", "8", "--steps-per-epoch", "2"]) == 0


def _edited(src: str, dst: str, **changes) -> str:
    d = json.load(open(src))
    ev = next(e for e in d["traceEvents"] if e.get("ph") == "X")
    if "name" in changes:
        ev["name"] = changes.pop("name")
    ev["args"].update(changes)
    json.dump(d, open(dst, "w"))
    return dst


@pytest.mark.parametrize("change,words", [
    (dict(name="frobnicate"), "unknown op 'frobnicate'"),
    (dict(step=-3), "step -3"),
    (dict(microbatch=-1), "microbatch -1"),
    (dict(block=0), "block 0"),
], ids=["op", "step", "microbatch", "block"])
def test_compare_refuses_spans_outside_the_vocabulary(change, words, measured, tmp_path, capsys):
    bad = _edited(measured, str(tmp_path / "bad.json"), **change)
    rc, err = _cli(capsys, "compare", bad, measured)
    assert rc == 2 and words in err and "measured" in err, err
    rc, err = _cli(capsys, "compare", measured, bad)
    assert rc == 2 and words in err and "simulated" in err, err


# ------------------------------------------------------------ trainer and run sizes
@pytest.mark.parametrize("argv,words", [
    (["train", "blockprop", "--nh", "100000000000000000000000"], "over the limit of 1000"),
    (["train", "bp", "--width", "100000000"], "--width 100000000 is over the limit"),
    (["train", "bp", "--depth", "100000"], "--depth 100000 is over the limit"),
    (["train", "bp", "--width", "60000"], "parameters, over the limit"),
    (["train", "bp", "--blocks", "100000"], "--blocks 100000 is over the limit"),
    (["run", "dgl", "--width", "60000"], "parameters, over the limit"),
    (["run", "dgl", "--slowdown", "2:1e300"], "--slowdown"),
    (["run", "dgl", "--timeout", "1e-9"], "--timeout"),
    (["run", "dgl", "--timeout", "1e15"], "--timeout"),
], ids=["train-nh", "train-width", "train-depth", "train-params", "train-blocks", "run-params",
        "run-slowdown", "run-timeout-small", "run-timeout-large"])
def test_trainer_and_run_sizes_are_refused_first(argv, words, capsys):
    rc, err = _cli(capsys, *argv, "--epochs", "1") if argv[0] == "train" else _cli(capsys, *argv)
    assert rc == 2 and words in err, err


def test_limits_are_stated():
    assert api.MAX_SPANS == MAX_SPANS and api.MAX_BLOCKS >= 1000 and api.MAX_TIME < 1.8e308
    assert methods.MAX_NH >= 100
    assert schedules.compute_spans("bp", 10 ** 9, 10 ** 9) == 3 * 10 ** 18
