"""Exercise checks of lesson 08 (measured vs simulated): correct, known mistakes
with their hints, close, not attempted."""

import pytest

from bpsim import sim
from bpsim.course import checks

# Per-block costs as Costs.from_trace returns them (seconds, unequal blocks, a spread).
COSTS = sim.Costs.parse("fwd=0,bwd=0,aux=0,update=0,comm=0.0008,spread=0.4,"
                        "fwd@1=0.006,aux@1=0.0005,bwd@1=0.013,update@1=0.0025,"
                        "fwd@2=0.0065,aux@2=0.0002,bwd@2=0.011,update@2=0.0024")
K, N = 2, 40


def g(op, k):
    return COSTS.get(op, k)


F = g("fwd", 1) + g("fwd", 2)
B = g("bwd", 1) + g("bwd", 2)
A = g("aux", 1) + g("aux", 2)
C = COSTS.comm
RIGHT = N * (F + B + 2 * C + g("update", 1))


# --------------------------------------------------------------- bp_makespan
def test_bp_makespan_closed_form_is_correct_and_spread_is_ignored():
    fb = checks.bp_makespan(COSTS, K, N, RIGHT)
    assert fb.status == "correct", fb
    assert fb


def test_bp_makespan_accepts_strings_and_dicts():
    assert checks.bp_makespan("fwd=1,bwd=2,update=0.5,comm=0.1", 3, 5, 5 * (9 + 4 * 0.1 + 0.5)).status == "correct"
    costs = {"fwd": 1.0, "bwd": 2.0, "update": 0.5, "comm": 0.1, "spread": 0.3}
    assert checks.bp_makespan(costs, 2, 4, 4 * (6 + 0.2 + 0.5)).status == "correct"
    # costs from a pipeline run carry a receive hand-off and measured draws: a message
    # costs comm + recv, every op its median
    piped = dict(costs, recv=0.05, jitter={"fwd": [0.5, 3.0]})
    assert checks.bp_makespan(piped, 2, 4, 4 * (6 + 0.3 + 0.5)).status == "correct"


@pytest.mark.parametrize("wrong, words", [
    (N * (F + B + g("update", 1)), "2 (K - 1) messages"),
    (N * (F + B + C + g("update", 1)), "the gradient travels back too"),
    (N * (F + B + 2 * C + g("update", 1) + g("update", 2)), "only block 1's update"),
    (N * (F + B + 2 * C), "block 1's update ends the step"),
    (N * (F + B + A + 2 * C + g("update", 1)), "no auxiliary heads"),
    (N * (2 * (g("fwd", 1) + g("bwd", 1)) + 2 * C + g("update", 1)), "each block's own F_k + B_k"),
    (sim.simulate("dgl", blocks=K, steps=N, costs=COSTS.parse("spread=0", base=COSTS)).makespan,
     "synchronous DGL"),
])
def test_bp_makespan_mistakes(wrong, words):
    fb = checks.bp_makespan(COSTS, K, N, wrong)
    assert fb.status == "incorrect" and words in fb.message, fb


def test_bp_makespan_close_and_not_attempted():
    close = checks.bp_makespan(COSTS, K, N, RIGHT * 1.005)
    assert close.status == "close" and "T_bp" in close.message, close
    assert checks.bp_makespan(COSTS, K, N, RIGHT * 1.2).status == "incorrect"
    assert checks.bp_makespan(COSTS, K, N, ...).status == "not attempted"
    assert checks.bp_makespan(COSTS, K, N, None).status == "not attempted"


# ------------------------------------------------------------ makespan_error
def test_makespan_error_from_traces_and_numbers():
    measured = sim.simulate("dgl", blocks=2, steps=10, costs=COSTS, seed=1).trace   # random durations
    simulated = sim.simulate("dgl", blocks=2, steps=10, costs=COSTS.parse("spread=0", base=COSTS)).trace
    right = (simulated.makespan - measured.makespan) / measured.makespan
    assert checks.makespan_error(measured, simulated, right).status == "correct"
    assert checks.makespan_error(measured.makespan, simulated.makespan, right).status == "correct"
    assert checks.makespan_error(2.0, 1.5, -0.25).status == "correct"


@pytest.mark.parametrize("wrong, words", [
    (0.25, "sign is flipped"),
    (-0.5 / 1.5, "*measured* makespan"),
    (-25.0, "not a percentage"),
    (0.75, "ratio"),
])
def test_makespan_error_mistakes(wrong, words):
    fb = checks.makespan_error(2.0, 1.5, wrong)
    assert fb.status == "incorrect" and words in fb.message, fb


def test_makespan_error_close_not_attempted_and_bad_input():
    close = checks.makespan_error(2.0, 1.5, -0.252)
    assert close.status == "close" and "T_measured" in close.message, close
    assert checks.makespan_error(2.0, 1.5, -0.4).status == "incorrect"
    assert checks.makespan_error(2.0, 1.5, ...).status == "not attempted"
    with pytest.raises(ValueError, match="measured makespan"):
        checks.makespan_error(0.0, 1.5, 0.1)


def test_checks_are_registered():
    names = checks.registry()
    assert "bp_makespan" in names and "makespan_error" in names
    assert "bp_makespan" in checks.__all__ and "makespan_error" in checks.__all__


# -------------------------------------------------------------- buffer_reuse
def test_buffer_reuse_period_ratio_is_correct_and_known_mistakes_get_hints():
    S = 3.0
    P1 = sum(g(op, 1) for op in ("fwd", "aux", "bwd", "update"))
    P2 = sum(g(op, 2) for op in ("fwd", "aux", "bwd", "update"))
    assert checks.buffer_reuse(COSTS, S, S * P1 / P2).status == "correct"
    upside = checks.buffer_reuse(COSTS, S, P2 / (S * P1))
    assert upside.status == "incorrect" and "upside down" in upside.message
    assert checks.buffer_reuse(COSTS, S, None).status == "not attempted"
    assert checks.buffer_reuse("fwd=1,bwd=2", 2.0, 2.0).status == "correct"
