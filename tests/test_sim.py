"""The SimPy simulator: closed-form makespans, trace
invariants over random costs, determinism, calibration, comparison, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpsim.methods import NAMES as ALGORITHMS
from bpsim.sim import Costs, SimResult, replay, simulate
from bpsim.sim.costs import bin_factors
from bpsim.sim.compare import compare
from bpsim.trace import Trace

F, B, A, U, C = 1.0, 2.0, 0.2, 0.1, 0.05
COST = f"fwd={F},bwd={B},aux={A},update={U},comm={C}"
KN = [(1, 3), (2, 5), (4, 7), (6, 3)]


# ------------------------------------------------------------- closed forms
@pytest.mark.parametrize("K,N", KN)
def test_bp_closed_form(K, N):
    r = simulate("bp", blocks=K, steps=N, costs=COST)
    assert r.makespan == pytest.approx(N * (K * (F + B) + 2 * (K - 1) * C + U), rel=1e-12)


@pytest.mark.parametrize("K,N", KN)
@pytest.mark.parametrize("algo", ["dgl", "dgl-sync"])
def test_dgl_closed_form(algo, K, N):
    r = simulate(algo, blocks=K, steps=N, costs=COST)
    assert r.makespan == pytest.approx((K - 1) * (F + C) + N * (F + A + B + U), rel=1e-12)


@pytest.mark.parametrize("K,N", KN)
def test_bp_input_gradient_cost_on_blocks_after_the_first(K, N):
    """bwd_in (the input-gradient product) lies on bp's critical path once per
    block 2..K and not at all in DGL, whose block inputs are detached."""
    Bi = 0.7
    cost = COST + f",bwd_in={Bi}"
    r = simulate("bp", blocks=K, steps=N, costs=cost)
    assert r.makespan == pytest.approx(N * (K * (F + B) + (K - 1) * Bi + 2 * (K - 1) * C + U),
                                       rel=1e-12)
    assert {s.op for s in r.trace if s.lane == "compute"} <= {"fwd", "bwd", "update", "wait"}
    d = simulate("dgl", blocks=K, steps=N, costs=cost)
    assert d.makespan == pytest.approx((K - 1) * (F + C) + N * (F + A + B + U), rel=1e-12)


def test_gpipe_input_gradient_cost_two_blocks():
    # K = 2, c = 0: block 2 runs F, then (B + Bi) per micro-batch, block 1 waits
    # for each gradient. Step = F (block 1, mb 0) + m F (block 2 forwards)
    # + m (B + Bi) (block 2 backwards) + B (block 1, last mb) + U.
    Bi, m, N = 0.5, 3, 4
    r = simulate("gpipe", blocks=2, steps=N, microbatches=m,
                 costs=f"fwd={F},bwd={B},update={U},bwd_in={Bi}")
    assert r.makespan == pytest.approx(N * (F + m * F + m * (B + Bi) + B + U), rel=1e-12)


@pytest.mark.parametrize("K,N", [(2, 3), (3, 4), (4, 2)])
def test_recv_handoff_closed_forms(K, N):
    # recv = h: a message between devices is usable h after it arrived and
    # its receiver asked for it. bp's receivers are always waiting: each of
    # the 2(K-1) messages of a step costs c + h.
    h = 0.3
    bp = simulate("bp", blocks=K, steps=N, costs=COST + f",recv={h}")
    assert bp.makespan == pytest.approx(N * (K * (F + B) + 2 * (K - 1) * (C + h) + U), rel=1e-12)
    # dgl: block j+1 asks for step t's activation as it finishes step t-1,
    # when the activation is there (or arrives at that very moment), so
    # blocks 2..K run a period F + A + B + U + h and the fill pays c + h
    dgl = simulate("dgl", blocks=K, steps=N, costs=COST + f",recv={h}")
    assert dgl.makespan == pytest.approx((K - 1) * (F + C + h) + N * (F + A + B + U)
                                         + (N - 1) * h, rel=1e-12)
    # blocks on one device hand over in memory: no hand-off
    one = simulate("dgl", blocks=K, steps=N, costs=COST + f",recv={h}", placement=1)
    assert one.makespan == pytest.approx(N * K * (F + A + B + U), rel=1e-12)


def test_jitter_draws_the_given_factors():
    # forwards draw from their own factors, backwards (no entry) from all the
    # ops' factors together; messages keep their latency; spread is unused
    costs = Costs(fwd=1.0, bwd=2.0, comm=0.1, spread=0.5,
                  jitter={"fwd": (0.5, 1.5), "update": (1.0,)})
    r = simulate("dgl", blocks=2, steps=200, costs=costs, seed=3)
    durations = defaultdict(set)
    for s in r.trace:
        if s.lane == "compute":
            durations[s.op].add(round(s.duration, 9))
    assert durations["fwd"] == {0.5, 1.5} and durations["bwd"] == {1.0, 2.0, 3.0}
    sends = {s.msg: s.t0 for s in r.trace if s.op == "send"}
    assert {round(s.t0 - sends[s.msg], 9) for s in r.trace if s.op == "recv"} == {0.1}
    assert simulate("dgl", blocks=2, steps=200, costs=costs, seed=3).trace.rows == r.trace.rows
    fixed = Costs(fwd=1.0, bwd=2.0, spread=0.5, jitter={"fwd": (1.0,)})
    assert simulate("dgl", blocks=2, steps=5, costs=fixed).makespan == pytest.approx(
        1.0 + 5 * 3.0, rel=1e-12)


@settings(max_examples=80, deadline=None)
@given(xs=st.lists(st.floats(0.01, 100), min_size=1, max_size=600), bins=st.integers(1, 300))
def test_bin_factors_keeps_the_distribution(xs, bins):
    xs.sort()
    out = bin_factors(xs, bins)
    assert len(out) == min(len(xs), bins) and list(out) == sorted(out)
    assert xs[0] - 1e-9 <= out[0] and out[-1] <= xs[-1] + 1e-9
    if len(xs) % bins == 0 or len(xs) <= bins:
        assert math.fsum(out) / len(out) == pytest.approx(math.fsum(xs) / len(xs), rel=1e-9)


def test_with_input_grad_scales_forward_costs():
    c = Costs.parse("fwd=2,bwd=3,fwd@2=4").with_input_grad([0.0, 0.5])
    assert c.get("bwd_in", 1) == 0 and c.get("bwd_in", 2) == pytest.approx(2.0)
    assert c.get("bwd", 2) == 3   # the detached backward is unchanged
    with pytest.raises(ValueError, match="fractions"):
        Costs().with_input_grad([-1.0])


@pytest.mark.parametrize("K,N", KN)
@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("algo", ["gpipe", "1f1b"])
def test_pipeline_closed_form(algo, K, N, m):
    # 1F1B has GPipe's bubble, (K - 1)(F + B) per step, for any F and B
    r = simulate(algo, blocks=K, steps=N, microbatches=m,
                 costs=f"fwd={F},bwd={B},aux={A},update={U},comm=0")
    assert r.makespan == pytest.approx(N * ((m + K - 1) * (F + B) + U), rel=1e-12)


@pytest.mark.parametrize("N,m", [(1, 1), (3, 4), (2, 6)])
def test_gpipe_rendezvous_and_eager_closed_forms(N, m):
    # K = 2, latency c. Eager: block 2's forwards follow block 1's back to back, and
    # only the first activation and the first gradient of a step wait c. Rendezvous
    # (torch's pipelining, the default for gpipe): a message leaves when its receiver
    # asks, and every receiver asks only when it is done with the previous micro-batch,
    # so each of the m activations and m gradients waits c.
    costs = f"fwd={F},bwd={B},update={U},comm={C}"
    rdv = simulate("gpipe", blocks=2, steps=N, microbatches=m, costs=costs)
    assert rdv.trace.meta["protocol"] == "rendezvous"
    assert rdv.makespan == pytest.approx(N * ((m + 1) * (F + B) + 2 * m * C + U), rel=1e-12)
    eager = simulate("gpipe", blocks=2, steps=N, microbatches=m, costs=costs, protocol="eager")
    assert eager.makespan == pytest.approx(N * ((m + 1) * (F + B) + 2 * C + U), rel=1e-12)
    # block 2 asks for micro-batch i when it has done i - 1, then waits c for it
    fwd2 = sorted((s.t0, s.t1) for s in rdv.trace if s.op == "fwd" and s.block == 2 and s.step == 0)
    assert all(b[0] - a[1] == pytest.approx(C) for a, b in zip(fwd2, fwd2[1:]))
    for algo in ("bp", "dgl"):   # eager by default: the closed forms above
        assert simulate(algo, blocks=2, steps=N, costs=COST).trace.meta["protocol"] == "eager"
    with pytest.raises(ValueError, match="protocol"):
        simulate("gpipe", protocol="lazy")


def test_1f1b_order_is_torch_schedule_1f1b():
    from bpsim.sim.schedules import _1f1b_order

    # K = 2, m = 4: the first stage warms up with K = 2 forwards, the last with one
    assert _1f1b_order(1, 2, 4) == [("f", 0), ("f", 1), ("b", 0), ("f", 2), ("b", 1), ("f", 3),
                                    ("b", 2), ("b", 3)]
    assert _1f1b_order(2, 2, 4) == [("f", 0), ("b", 0), ("f", 1), ("b", 1), ("f", 2), ("b", 2),
                                    ("f", 3), ("b", 3)]
    assert _1f1b_order(1, 4, 2) == [("f", 0), ("f", 1), ("b", 0), ("b", 1)]   # W = min(m, K)


@settings(max_examples=30, deadline=None)
@given(K=st.integers(1, 6), m=st.integers(1, 8))
def test_1f1b_holds_at_most_warmup_activations(K, m):
    # the point of 1F1B: block j keeps at most min(m, K - j + 1) micro-batches
    # in flight, GPipe keeps m
    r = simulate("1f1b", blocks=K, steps=2, microbatches=m, costs=COST.replace(f"comm={C}", "comm=0.3"))
    for j in range(1, K + 1):
        ops = sorted((x for x in r.trace.rows if x[1] == "compute" and x[3] == j
                      and x[2] in ("fwd", "bwd")), key=lambda x: x[6])
        live = peak = 0
        for x in ops:
            live += 1 if x[2] == "fwd" else -1
            peak = max(peak, live)
        assert peak == min(m, K - j + 1)


@pytest.mark.parametrize("K,N", [(2, 3), (3, 4), (5, 2)])
@pytest.mark.parametrize("nh", [0, 1, 3])
def test_blockprop_extra_hstep_adds_chain(K, N, nh):
    a = simulate("blockprop", blocks=K, steps=N, costs=COST, nh=nh).makespan
    b = simulate("blockprop", blocks=K, steps=N, costs=COST, nh=nh + 1).makespan
    assert b - a == pytest.approx(N * (K - 1) * (F + B), rel=1e-9)


@pytest.mark.parametrize("J,S", [(2, 1.5), (2, 2.0), (3, 3.0)])
def test_dgl_async_slowdown(J, S):
    K, N = 5, 300
    r = simulate("dgl-async", blocks=K, steps=N, costs=COST, slowdown={J: S}, buffer=50)
    assert [b["updates"] for b in r.per_block] == [N] * K
    assert r.buffers[J - 1]["reuse_mean"] == pytest.approx(S, rel=0.1)
    period = F + A + B + U
    for b in r.per_block[J:]:                              # blocks after J
        assert b["finish"] < N * period * 1.05
        assert b["finish"] < 0.8 * N * S * period
    assert r.per_block[J - 1]["finish"] == pytest.approx(N * S * period, rel=0.02)
    assert len(r.buffers) == K - 1
    assert len(r.buffers[J - 1]["staleness"]) == N
    assert sum(r.buffers[J - 1]["reuse"]) == N


def test_dgl_async_without_slowdown_matches_sync_and_reuses_once():
    r = simulate("dgl-async", blocks=4, steps=50, costs=COST)
    s = simulate("dgl", blocks=4, steps=50, costs=COST)
    assert r.makespan == pytest.approx(s.makespan)
    assert all(b["reuse_mean"] == 1.0 for b in r.buffers)


def test_blockprop_cached_skips_hsteps_between_refreshes():
    K, N = 3, 20
    plain = simulate("blockprop", blocks=K, steps=N, costs=COST, nh=2)
    cached = simulate("blockprop-cached", blocks=K, steps=N, costs=COST, nh=2,
                      cache_every=2, steps_per_epoch=5)
    same = simulate("blockprop-cached", blocks=K, steps=N, costs=COST, nh=2)
    assert same.makespan == pytest.approx(plain.makespan)      # one epoch: no caching
    assert cached.makespan < plain.makespan
    hsteps = defaultdict(int)
    for s in cached.trace:
        if s.op == "hstep":
            hsteps[s.step // 5] += 1
    assert set(hsteps) == {0, 2}                               # epochs 0 and 2 of 0..3
    # an epoch without h-step runs the W-step only: period F + B + U
    w = [s for s in cached.trace if s.block == 1 and s.step in (5, 6) and s.op == "update"]
    assert w[1].t1 - w[0].t1 == pytest.approx(F + B + U)


def test_greedy_trains_blocks_one_after_another():
    K, N = 3, 4
    r = simulate("greedy", blocks=K, steps=N, costs=COST)
    upd = {b: [s for s in r.trace if s.block == b and s.op == "update"] for b in (1, 2, 3)}
    assert all(len(v) == N for v in upd.values())
    assert max(s.t1 for s in upd[1]) <= min(s.t0 for s in upd[2])
    assert max(s.t1 for s in upd[2]) <= min(s.t0 for s in upd[3])


# ----------------------------------------------------------- invariants
EPOCH, EVERY = 2, 2      # steps_per_epoch and cache_every of the random runs


def expected_ops(algo, K, j, step, mb, nh, ops_seen):
    if algo in ("dgl", "dgl-async"):
        return ["fwd", "aux", "bwd", "update"]
    if algo == "bwbpf":
        return ["fwd", "aux", "loss", "bwd", "update"] if j == K else ["fwd", "aux", "bwd", "update"]
    if algo == "bp":
        return ["fwd", "bwd", "update"]
    if algo in ("gpipe", "1f1b"):
        return ["fwd", "bwd", "update"] if mb == 0 else ["fwd", "bwd"]
    if algo == "greedy":
        return ["fwd", "aux", "bwd", "update"] if "update" in ops_seen else ["fwd"]
    if algo in ("blockprop", "blockprop-cached"):
        if algo == "blockprop-cached" and (step // EPOCH) % EVERY:
            return ["fwd", "bwd", "update"]                    # W-step on cached h*
        head = [] if j == K else ["fwd"]
        return head + (["hstep"] * nh if j > 1 else []) + ["fwd", "bwd", "update"]
    raise AssertionError(algo)


def check_invariants(r: SimResult, algo, K, N, nh=1):
    r.trace.check()                                            # no overlap, recv after send
    groups = defaultdict(list)
    for row in r.trace.rows:
        if row[1] == "compute" and row[2] != "wait":
            groups[(row[3], row[4], row[5])].append(row)
    for (j, step, mb), rows in groups.items():
        rows.sort(key=lambda x: (x[6], x[7]))
        ops = [x[2] for x in rows]
        assert ops == expected_ops(algo, K, j, step, mb, nh, ops), (j, step, mb, ops)
        for a, b in zip(rows, rows[1:]):
            assert a[7] <= b[6] + 1e-9
    assert [b["updates"] for b in r.per_block] == [N] * K
    for b in r.per_block:
        assert 0 <= b["utilization"] <= 1 + 1e-9 and b["finish"] <= r.makespan + 1e-9
    assert all(s.block in range(1, K + 1) for s in r.trace)


cost_st = st.fixed_dictionaries({
    "fwd": st.floats(0.01, 3), "bwd": st.floats(0.01, 3), "aux": st.floats(0, 1),
    "bwd_in": st.sampled_from([0.0, 0.5]),
    "update": st.floats(0, 1), "comm": st.floats(0, 1), "bytes": st.floats(0, 100),
    "bandwidth": st.sampled_from([math.inf, 50.0, 400.0]),
    "spread": st.sampled_from([0.0, 0.3]),
    "recv": st.sampled_from([0.0, 0.2]),
    "jitter": st.sampled_from([{}, {"fwd": (0.5, 2.0), "hstep": (1.0, 3.0)}]),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(algo=st.sampled_from(ALGORITHMS), K=st.integers(2, 4), N=st.integers(1, 4),
       costs=cost_st, shared=st.booleans(), m=st.integers(1, 3), nh=st.integers(0, 2),
       seed=st.integers(0, 5), slow=st.floats(0.5, 3),
       protocol=st.sampled_from(["auto", "eager", "rendezvous"]))
def test_trace_invariants_random_costs(algo, K, N, costs, shared, m, nh, seed, slow, protocol):
    placement = [(j * 2) // K for j in range(K)] if shared else None
    r = simulate(algo, blocks=K, steps=N, costs=costs, microbatches=m, nh=nh, seed=seed,
                 placement=placement, slowdown={K: slow}, buffer=3,
                 cache_every=EVERY, steps_per_epoch=EPOCH, protocol=protocol)
    check_invariants(r, algo, K, N, nh)
    if shared:
        assert {s.rank for s in r.trace if s.lane == "compute"} <= {0, 1}


def test_determinism_equal_seeds_identical_traces():
    kw = dict(blocks=4, steps=30, costs=COST + ",spread=0.4,bytes=10,bandwidth=100",
              slowdown={2: 1.3})
    jittered = dict(kw, costs=Costs.parse(kw["costs"] + ",recv=0.1",
                                          base=Costs(jitter={"bwd": (0.8, 1.3), "aux": (1, 4)})))
    for algo in ("dgl-async", "gpipe", "blockprop"):
        a, b = simulate(algo, seed=7, **kw), simulate(algo, seed=7, **kw)
        assert a.trace.rows == b.trace.rows and a.to_dict() == b.to_dict()
        assert simulate(algo, seed=8, **kw).trace.rows != a.trace.rows
        a, b = simulate(algo, seed=7, **jittered), simulate(algo, seed=7, **jittered)
        assert a.trace.rows == b.trace.rows
        assert simulate(algo, seed=8, **jittered).trace.rows != a.trace.rows


def test_shared_placement_serialises_compute():
    one = simulate("dgl", blocks=4, steps=10, costs=COST, placement=1)
    own = simulate("dgl", blocks=4, steps=10, costs=COST)
    assert one.makespan == pytest.approx(10 * 4 * (F + A + B + U))   # all on one device
    assert not [s for s in one.trace if s.lane == "comm"]            # in-memory hand-over
    assert one.makespan > 3 * own.makespan
    assert sum(b["idle_by_cause"]["device"] for b in one.per_block) > 0


def test_bandwidth_adds_transfer_time():
    r = simulate("bp", blocks=3, steps=2, costs=COST + ",bytes=10,bandwidth=20")
    o = 10 / 20
    assert r.makespan == pytest.approx(2 * (3 * (F + B) + 2 * 2 * (C + o) + U))
    sends = [s for s in r.trace if s.op == "send"]
    assert all(s.duration == pytest.approx(o) for s in sends)


# ------------------------------------------------------------------ costs
def test_costs_parsing_and_overrides():
    c = Costs.parse("fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05,fwd@2=3,bandwidth=1e9,bytes=4")
    assert c.get("fwd", 2) == 3 and c.get("fwd", 1) == 1 and c.get("hstep", 2) == 5
    assert c.comm == 0.05 and c.transfer(1) == pytest.approx(4e-9)
    assert Costs.parse(str(c)) == c
    r = simulate("dgl", blocks=3, steps=4, costs="fwd=1,bwd=1,fwd@2=4")
    assert r.per_block[1]["busy"] == pytest.approx(4 * 5)
    for bad, msg in [("fwd", "no '='"), ("speed=3", "unknown cost key"), ("fwd=-1", ">= 0"),
                     ("fwd@x=1", "integer"), ("bandwidth=0", "> 0")]:
        with pytest.raises(ValueError, match=msg):
            Costs.parse(bad)


def test_costs_from_flops():
    c = Costs.from_flops([2e9, 4e9], [1e8, 1e8], 1e9, update_flops=[1e7, 1e7],
                         activation_bytes=[1000, 0], comm=0.01, bandwidth=1e6)
    assert c.get("fwd", 2) == pytest.approx(4.0) and c.get("bwd", 1) == pytest.approx(4.0)
    assert c.get("aux", 1) == pytest.approx(0.3) and c.get("update", 2) == pytest.approx(0.01)
    assert c.transfer(1) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="one per block"):
        Costs.from_flops([1, 2], [1], 1.0)


def test_from_trace_recovers_costs():
    truth = "fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05,fwd@3=1.5"
    meas = simulate("dgl", blocks=3, steps=20, costs=truth)
    c = Costs.from_trace(meas.trace)
    assert c.get("fwd", 1) == pytest.approx(1) and c.get("fwd", 3) == pytest.approx(1.5)
    assert c.get("aux", 2) == pytest.approx(0.2) and c.comm == pytest.approx(0.05)
    assert c.spread == pytest.approx(0, abs=1e-9)
    again = simulate("dgl", blocks=3, steps=20, costs=c)
    assert again.makespan == pytest.approx(meas.makespan)
    # latency + bandwidth from messages of two sizes (block 1 sends 100 B, block 2 300 B)
    rows = [(0, "compute", "fwd", 1, 0, 0, 0.0, 1.0, None)]
    for i in range(6):
        src = 1 + i % 2
        nbytes = 100 * (2 * src - 1)
        rows.append((src - 1, "comm", "send", src, i, 0, 10.0 * i, 10.0 * i + 0.1, i))
        rows.append((src, "comm", "recv", src + 1, i, 0, 10.0 * i, 10.0 * i + 0.5 + nbytes / 1000, i))
    c = Costs.from_trace(Trace(rows, meta={"bytes": {"1": 100, "2": 300}}))
    assert c.comm == pytest.approx(0.5) and c.bandwidth == pytest.approx(1000)
    assert c.transfer(2) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no compute spans"):
        Costs.from_trace(Trace([]))


def test_from_trace_jitter_keeps_the_measured_distribution():
    # nine forwards of 1.0 and one of 5.0: median 1.0, mean 1.4
    rows, t = [], 0.0
    for i, d in enumerate([1.0] * 9 + [5.0]):
        rows.append((0, "compute", "fwd", 1, i, 0, t, t + d, None))
        t += d
    c = Costs.from_trace(Trace(rows))
    assert c.get("fwd", 1) == 1.0 and sorted(c.jitter["fwd"]) == [1.0] * 9 + [5.0]
    # drawn from it, a long run spends the mean per forward; a lognormal
    # with the same log-spread (exp(sigma^2 / 2) = 1.12) falls short of it
    N = 4000
    emp = simulate("dgl", blocks=1, steps=N, costs=c, seed=0).per_block[0]["busy"] / N
    logn = Costs.from_trace(Trace(rows), draws="lognormal")
    assert logn.jitter == {} and logn.spread > 0
    ln = simulate("dgl", blocks=1, steps=N, costs=logn, seed=0).per_block[0]["busy"] / N
    assert emp == pytest.approx(1.4, abs=0.05) and ln == pytest.approx(1.12, abs=0.05)
    with pytest.raises(ValueError, match="draws"):
        Costs.from_trace(Trace(rows), draws="normal")
    assert Costs.coerce(c.to_dict()) == c                        # JSON round trip


def test_from_trace_splits_receive_handoff_from_latency():
    rows = [(0, "compute", "fwd", 1, 0, 0, 0.0, 1.0, None)]
    # three receives posted when the send started: 0.5 from send to use
    for i in range(3):
        t = 10.0 * i
        rows += [(0, "comm", "send", 1, i, 0, t, t + 0.1, i),
                 (1, "comm", "recv", 2, i, 0, t, t + 0.5, i)]
    # two the receiver's compute thread asked for (began waiting, posted the
    # receive) 2.0 after their send started: usable 0.1 and 0.3 after asking
    for i, h in ((3, 0.1), (4, 0.3)):
        t = 10.0 * i
        rows += [(0, "comm", "send", 1, i, 0, t, t + 0.1, i),
                 (1, "comm", "recv", 2, i, 0, t + 2.0, t + 2.0 + h, i),
                 (1, "compute", "wait", 2, i, 0, t + 2.0, t + 2.0 + h, None)]
    c = Costs.from_trace(Trace(rows))
    assert c.recv == pytest.approx(0.2) and c.comm == pytest.approx(0.3)   # mean, median
    # a receive posted (and waited for) before its send began times the whole trip,
    # and so does a late receive that no wait ended (the message was already there)
    for i, (ask, end, wait) in enumerate(((-1.0, 0.5, True), (2.0, 2.1, False)), start=5):
        t = 10.0 * i
        rows += [(0, "comm", "send", 1, i, 0, t, t + 0.1, i),
                 (1, "comm", "recv", 2, i, 0, t + ask, t + end, i)]
        if wait:
            rows.append((1, "compute", "wait", 2, i, 0, t + ask, t + end, None))
    c2 = Costs.from_trace(Trace(rows))
    assert c2.recv == pytest.approx(0.2) and c2.comm == pytest.approx(0.3)
    # so a simulated waiting receiver gets it after comm + recv = 0.5 again
    again = simulate("bp", blocks=2, steps=3, costs=replace(c, jitter={}))
    sends = {s.msg: s.t0 for s in again.trace if s.op == "send"}
    waits = [s for s in again.trace if s.op == "recv"]
    assert waits and all(s.t0 - sends[s.msg] == pytest.approx(0.3) for s in waits)


@pytest.mark.parametrize("jitter,msg", [
    ("1,2", "must be a dict"), ({"speed": [1.0]}, "not an op"), ({"fwd": []}, "at least one"),
    ({"fwd": [1.0, 0.0]}, "each > 0"), ({"fwd": 3}, "list of numbers"),
    ({"fwd": [1.0, -2]}, ">= 0")])
def test_bad_jitter_raises_valueerror(jitter, msg):
    with pytest.raises(ValueError, match=msg):
        Costs(jitter=jitter)


def test_from_trace_latency_ends_when_the_waiting_receiver_resumes():
    # recv completes 0.5 after the send, but the receiver's compute thread, which was
    # waiting, resumes only at 0.8: the simulator's latency is the 0.8
    rows = [(0, "compute", "fwd", 1, 0, 0, 0.0, 1.0, None)]
    for i in range(3):
        t = 10.0 * i
        rows += [(0, "comm", "send", 1, i, 0, t, t + 0.1, i),
                 (1, "comm", "recv", 2, i, 0, t, t + 0.5, i),
                 (1, "compute", "wait", 2, i, 0, t - 2.0, t + 0.8, None)]
    assert Costs.from_trace(Trace(rows)).comm == pytest.approx(0.8)
    no_wait = [r for r in rows if r[2] != "wait"]
    assert Costs.from_trace(Trace(no_wait)).comm == pytest.approx(0.5)


def test_compare_identical_and_shifted():
    a = simulate("dgl", blocks=3, steps=10, costs=COST).trace
    res = compare(a, a)
    assert res["makespan_error"] == 0 and res["busy_error_mean"] == 0
    assert res["start_offset_frac"] == 0 and res["matched"] == len(a)
    b = simulate("dgl", blocks=3, steps=10, costs="fwd=1.1,bwd=2.2,aux=0.22,update=0.11,comm=0.05").trace
    res = compare(a, b)
    assert res["makespan_error"] == pytest.approx(0.1, rel=0.05)
    assert res["busy_error_mean"] == pytest.approx(0.1, rel=1e-6)


@pytest.mark.parametrize("kw,msg", [
    (dict(algo="sgd"), "unknown method"), (dict(blocks=0), "blocks"),
    (dict(steps=-1), "steps"), (dict(algo="blockprop", blocks=1), "at least 2 blocks"),
    (dict(slowdown={9: 2}), "blocks are 1..4"), (dict(slowdown={1: 0}), "> 0"),
    (dict(placement="0,1"), "one device index >= 0 per block"), (dict(algo="dgl-async", buffer=0), "buffer"),
])
def test_bad_input_raises_valueerror(kw, msg):
    args = dict(algo="dgl", blocks=4, steps=3) | kw
    with pytest.raises(ValueError, match=msg):
        simulate(args.pop("algo"), **args)


# --------------------------------------------------------------- cli, viz
def _parser():
    from bpsim.cli import build_parser

    return build_parser()


def test_add_parsers_simulate_json(capsys, tmp_path):
    p = _parser()
    out = tmp_path / "s.json"
    a = p.parse_args(["simulate", "dgl-async", "--blocks", "3", "--steps", "20", "--cost",
                      COST, "--slowdown", "2:1.5", "--buffer", "5", "--max-reuse", "4",
                      "--trace", str(out), "--json"])
    assert a.func(a) == 0
    d = json.loads(capsys.readouterr().out)
    assert {"makespan", "throughput", "n_spans", "per_block", "buffers"} <= d.keys()
    assert {"busy", "utilization", "finish"} <= d["per_block"][0].keys()
    assert {"reuse_mean", "staleness_mean"} <= d["buffers"][0].keys() and len(d["buffers"]) == 2
    assert Trace.load(out).check() and len(Trace.load(out)) == d["n_spans"]
    html = tmp_path / "r.html"
    a = p.parse_args(["compare", str(out), str(out), "--html", str(html), "--json"])
    assert a.func(a) == 0
    assert json.loads(capsys.readouterr().out)["makespan_error"] == 0
    assert "measured" in html.read_text() and "plotly" in html.read_text()


def test_simulate_calibrate_draws(capsys, tmp_path):
    # a "measured" trace with spread: calibrated on it, the simulator draws op times
    # from its measured distribution, from a lognormal, or takes the medians
    p = _parser()
    meas = tmp_path / "m.json"
    simulate("dgl", blocks=2, steps=40, costs=COST + ",spread=0.5", seed=1).trace.save(meas)
    fwd = {}
    for draws in ("empirical", "lognormal", "median"):
        out = tmp_path / f"{draws}.json"
        a = p.parse_args(["simulate", "dgl", "--blocks", "2", "--steps", "40", "--calibrate",
                          str(meas), "--draws", draws, "--trace", str(out), "--json"])
        assert a.func(a) == 0
        capsys.readouterr()
        fwd[draws] = [(s.block, s.duration) for s in Trace.load(out) if s.op == "fwd"]
    c = Costs.from_trace(Trace.load(meas))
    factors = {round(f, 9) for f in c.jitter["fwd"]}
    assert {(b, round(d, 12)) for b, d in fwd["median"]} == {
        (b, round(c.get("fwd", b), 12)) for b in (1, 2)}     # one median per block
    assert {round(d / c.get("fwd", b), 9) for b, d in fwd["empirical"]} <= factors
    assert len({d for _, d in fwd["empirical"]}) > 10
    assert not {round(d / c.get("fwd", b), 9) for b, d in fwd["lognormal"]} & factors
    a = p.parse_args(["simulate", "dgl", "--draws", "median"])
    with pytest.raises(ValueError, match="--calibrate"):
        a.func(a)


def test_cli_subprocess_json_and_errors(tmp_path):
    out = tmp_path / "s.json"
    cmd = [sys.executable, "-m", "bpsim", "simulate", "dgl", "--blocks", "4", "--steps", "100",
           "--cost", COST, "--trace", str(out), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 and "bpsim.cli" in p.stderr:
        pytest.skip("top-level CLI not wired yet")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["makespan"] == pytest.approx(3 * (F + C) + 100 * (F + A + B + U))
    assert {"makespan", "throughput", "n_spans", "per_block", "buffers"} <= d.keys()
    json.loads(out.read_text())["traceEvents"]
    bad = subprocess.run([sys.executable, "-m", "bpsim", "simulate", "dgl", "--cost", "fwd"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_sim_never_imports_torch():
    code = ("import bpsim.sim, bpsim.cli.simulate, bpsim.sim.compare, bpsim.viz, sys; "
            "bpsim.sim.simulate('dgl-async', blocks=3, steps=5); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_viz_figures():
    from bpsim import viz
    a = simulate("dgl", blocks=2, steps=3, costs=COST).trace
    b = simulate("bp", blocks=2, steps=3, costs=COST).trace
    fig = viz.timeline(a, title="dgl")
    assert {t.name for t in fig.data} >= {"fwd", "aux", "bwd", "update", "send", "recv"}
    fig2 = viz.timelines([a, b], ["dgl", "bp"])
    assert len(fig2.data) > len(fig.data)
    with pytest.raises(ValueError, match="one title per trace"):
        viz.timelines([a, b], ["x"])
