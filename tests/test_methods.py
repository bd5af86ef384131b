"""The method registry: every entry loads, and what it says is what the executors do."""

from __future__ import annotations

import pytest

from bpsim import methods


@pytest.mark.parametrize("m", methods.METHODS, ids=lambda m: m.name)
def test_every_reference_loads_and_names_agree(m):
    trainer = methods.load(m.trainer)
    assert callable(methods.load(m.schedule))
    if m.runtime is not None:
        assert callable(methods.load(m.runtime))
    # a trainer class keys its options by its own method name; gpipe and 1f1b train as bp
    assert trainer.name in methods.NAMES
    assert set(trainer.options) <= set(m.options) | {"slowdown", "pmf"}
    assert set(m.options) <= set(methods.DEFAULTS)
    assert m.protocol in ("eager", "rendezvous")
    assert m.min_blocks >= 1


def test_aliases_and_unknown_names():
    assert methods.resolve("backprop") == "bp"
    assert methods.resolve(" DGL-Sync ") == "dgl"
    assert all(methods.resolve(n) == n for n in methods.NAMES)
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of bp, gpipe"):
        methods.get("nope")


def test_one_set_of_defaults_and_refused_options():
    assert methods.defaults_for("blockprop-cached") == {
        k: methods.DEFAULTS[k] for k in ("lam", "nh", "lr_h", "cache_every")}
    assert methods.get("dgl").resolved_options({"aux": "linear"}) == {"aux": "linear"}
    assert methods.get("bwbpf").default("aux") == "linear"
    with pytest.raises(ValueError, match="--nh does not apply to dgl; it takes --aux"):
        methods.get("dgl").resolved_options({"nh": 2})
    assert methods.get("bp").resolved_options({"nh": None}) == {}


def test_runtime_names_are_those_with_a_runtime_step():
    assert set(methods.names(runtime=True)) == {m.name for m in methods.METHODS if m.runtime}
    assert set(methods.names(runtime=True)) | set(methods.names(runtime=False)) == set(methods.NAMES)


def test_the_simulator_follows_protocol_and_fewest_blocks():
    from bpsim import sim

    for m in methods.METHODS:
        r = sim.simulate(m.name, blocks=max(2, m.min_blocks), steps=2, costs="fwd=1,bwd=2,comm=0.1")
        assert r.trace.meta["protocol"] == m.protocol
        if m.min_blocks > 1:
            with pytest.raises(ValueError, match=f"at least {m.min_blocks} blocks"):
                sim.simulate(m.name, blocks=m.min_blocks - 1, steps=2)


@pytest.mark.parametrize("m", methods.METHODS, ids=lambda m: m.name)
def test_span_estimate_matches_a_simulation(m):
    from bpsim import sim
    from bpsim.sim.api import estimate_spans

    blocks, steps = max(3, m.min_blocks), 7
    opts = m.resolved_options()
    est = estimate_spans(m.name, blocks, steps, **opts)
    real = len(sim.simulate(m.name, blocks=blocks, steps=steps, costs="fwd=1,bwd=2,comm=0.1",
                            steps_per_epoch=steps).trace.rows)
    assert real <= est <= 2 * real + 50
