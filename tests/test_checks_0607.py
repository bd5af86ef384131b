"""Exercise checks of lessons 06 (locking timelines) and 07 (async DGL with replay):
correct, known mistakes with their hints, close, not attempted."""

import pytest

from bpsim.course import checks

COSTS = "fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05"
F, B, A, U, C = 1.0, 2.0, 0.2, 0.1, 0.05


# ------------------------------------------------------------- gpipe_bubble
@pytest.mark.parametrize("K, m", [(4, 8), (2, 1), (6, 3)])
def test_gpipe_bubble_correct(K, m):
    fb = checks.gpipe_bubble(K, m, (K - 1) / (m + K - 1))
    assert fb.status == "correct", fb
    assert fb


@pytest.mark.parametrize("wrong, words", [
    (3 / 8, "divided by the *busy* time"),
    (3 / 4, "without micro-batches"),
    (8 / 11, "*busy*"),
    (3 / 22, "count the idle ticks of both"),
])
def test_gpipe_bubble_mistakes(wrong, words):
    fb = checks.gpipe_bubble(4, 8, wrong)
    assert fb.status == "incorrect" and words in fb.message, fb


def test_gpipe_bubble_close_and_not_attempted():
    close = checks.gpipe_bubble(4, 8, 3 / 11 * 1.02)
    assert close.status == "close" and "m + K - 1" in close.message, close
    assert checks.gpipe_bubble(4, 8, ...).status == "not attempted"
    assert checks.gpipe_bubble(4, 8, None).status == "not attempted"


# -------------------------------------------------------------- dgl_speedup
def _t_bp(K, N):
    return N * (K * (F + B) + 2 * (K - 1) * C + U)


def _t_dgl(K, N):
    return (K - 1) * (F + C) + N * (F + A + B + U)


@pytest.mark.parametrize("K, N", [(4, 100), (2, 10), (6, 30)])
def test_dgl_speedup_correct(K, N):
    fb = checks.dgl_speedup(K, N, COSTS, _t_bp(K, N) / _t_dgl(K, N))
    assert fb.status == "correct", fb


def test_dgl_speedup_accepts_a_dict():
    costs = {"fwd": F, "bwd": B, "aux": A, "update": U, "comm": C}
    assert checks.dgl_speedup(4, 100, costs, _t_bp(4, 100) / _t_dgl(4, 100)).status == "correct"


@pytest.mark.parametrize("wrong, words", [
    (4.0, "ideal speedup"),
    (_t_bp(4, 100) / (100 * (F + A + B + U)), "pipeline fill"),
    (_t_bp(4, 100) / (3 * (F + C) + 100 * (F + B + U)), "auxiliary head"),
    (100 * (4 * (F + B) + U) / _t_dgl(4, 100), "latency c"),
    (_t_dgl(4, 100) / _t_bp(4, 100), "T_dgl / T_bp"),
])
def test_dgl_speedup_mistakes(wrong, words):
    fb = checks.dgl_speedup(4, 100, COSTS, wrong)
    assert fb.status == "incorrect" and words in fb.message, fb


def test_dgl_speedup_close_and_not_attempted():
    right = _t_bp(4, 100) / _t_dgl(4, 100)
    close = checks.dgl_speedup(4, 100, COSTS, right * 0.995)
    assert close.status == "close" and "T_bp" in close.message, close
    assert checks.dgl_speedup(4, 100, COSTS, right * 0.8).status == "incorrect"
    assert checks.dgl_speedup(4, 100, COSTS, ...).status == "not attempted"


# ------------------------------------------------------------- replay_order
def test_replay_order_correct_and_matches_the_library():
    from bpsim.replay import ReplayBuffer

    buf = ReplayBuffer(3)
    for item in (0, 1, 2):
        buf.put(item)
    served = [buf.get(), buf.get()]
    buf.put(3)
    served += [buf.get(), buf.get(), buf.get()]
    assert served == [2, 1, 3, 3, 2]
    assert checks.replay_order(served).status == "correct"
    assert checks.replay_order((2, 1, 3, 3, 2)).status == "correct"


@pytest.mark.parametrize("wrong, words", [
    ([2, 2, 3, 3, 3], "newest entry ignores the reuse counts"),   # pure LIFO
    ([0, 1, 2, 3, 1], "*newest*"),                                # oldest first among ties
    ([2, 1, 3, 0, 3], "overwrites the oldest entry"),             # forgot the capacity
])
def test_replay_order_mistakes(wrong, words):
    fb = checks.replay_order(wrong)
    assert fb.status == "incorrect" and words in fb.message, fb


def test_replay_order_other_answers():
    assert checks.replay_order(...).status == "not attempted"
    other = checks.replay_order([2, 1, 3, 2, 3])
    assert other.status == "incorrect" and "read count" in other.message, other
    assert "items 4 and 5 of 5" in other.message and "relative error" not in other.message, other
    assert other.details["wrong_gets"] == [4, 5]
    one = checks.replay_order([2, 1, 3, 3, 1])
    assert "item 5 of 5 differs" in one.message, one
    short = checks.replay_order([2, 1])                                 # wrong length
    assert short.status == "incorrect" and "your list has 2" in short.message, short
    assert checks.replay_order("2, 1, 3, 3, 2").status == "incorrect"  # not a list of items


# ------------------------------------------------------------- slowdown_pmf
def test_slowdown_pmf_correct():
    assert checks.slowdown_pmf(4, 2, 2.0, [2 / 7, 1 / 7, 2 / 7, 2 / 7]).status == "correct"
    assert checks.slowdown_pmf(5, 3, 1.5, [3 / 14, 3 / 14, 2 / 14, 3 / 14, 3 / 14]).status == "correct"
    assert checks.slowdown_pmf(3, 1, 1.0, [1 / 3] * 3).status == "correct"


@pytest.mark.parametrize("wrong, words", [
    ([0.2, 0.4, 0.2, 0.2], "divide its weight by S"),
    ([1.0, 0.5, 1.0, 1.0], "sum to 1"),
    ([7 / 24, 1 / 8, 7 / 24, 7 / 24], "ratio"),
])
def test_slowdown_pmf_mistakes(wrong, words):
    fb = checks.slowdown_pmf(4, 2, 2.0, wrong)
    assert fb.status == "incorrect" and words in fb.message, fb


def test_slowdown_pmf_close_and_not_attempted():
    close = checks.slowdown_pmf(4, 2, 2.0, [0.29, 0.14, 0.29, 0.28])
    assert close.status == "close" and "normalise" in close.message, close
    assert checks.slowdown_pmf(4, 2, 2.0, ...).status == "not attempted"


def test_checks_are_registered():
    names = checks.registry()
    assert {"gpipe_bubble", "dgl_speedup", "replay_order", "slowdown_pmf"} <= set(names)
