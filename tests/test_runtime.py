"""The multi-process runtime: same arithmetic as the in-process trainers,
traces that check and round-trip, clean failures.

Multi-process runs are small (digits, a few dozen steps, 2 ranks) and share
one fork server, so the file stays well under two minutes on two cores.
Timeouts here only detect hangs; no test asserts a speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from bpsim import data, nets
from bpsim.runtime import RunConfig, RunFailed, run
from bpsim.runtime.comm import BLOCKED, LocalComm, Recv, Send, msg_id
from bpsim.runtime.record import serialize_comm
from bpsim.trace import Trace

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _in_process(trainer_cls, steps: int, full_only: bool = False, **kw):
    """Train the in-process trainer on the runtime's batch order for `steps` steps."""
    train, _ = data.load("digits")
    desc = data.describe("digits")
    net = nets.build("mlp", desc.input_shape, desc.n_classes, 2,
                     aux=trainer_cls.aux_default, output_layer=trainer_cls.output_layer, seed=0)
    tr = trainer_cls(net, lr=trainer_cls.default_lr, batch_size=64, seed=0, progress=False, **kw)
    x, y = train.tensors
    done, epoch = 0, 0
    while done < steps:
        tr.epoch = epoch
        for idx in tr.batches(len(x), epoch):
            if full_only and len(idx) != tr.batch_size:
                continue
            if done == steps:
                break
            tr.train_step(x[idx], y[idx], idx)
            done += 1
        epoch += 1
    return tr


# ------------------------------------------------------------ equivalence
@pytest.mark.slow
def test_bp_two_workers_gives_backprop_weights(tmp_path):
    from bpsim.algorithms.backprop import BackpropTrainer

    out = tmp_path / "bp.json"
    res = run(RunConfig("bp", workers=2, steps=20, seed=0, trace=str(out), evaluate=False))
    ref = _in_process(BackpropTrainer, 20)
    assert _max_diff(res.state_dict, ref.net.state_dict()) < 1e-5
    s = res.summary
    assert s["ok"] and s["steps"] == 20 and s["workers"] == 2
    assert [p["updates"] for p in s["per_rank"]] == [20, 20]
    assert all(0 < b <= 1 for b in s["busy_fraction"])
    assert s["throughput"] > 0 and s["wall_time"] > 0
    # The trace: every op of the vocabulary on both ranks, no overlaps per
    # (rank, lane), every send paired with its recv, lossless file round trip.
    t = Trace.load(out).check()
    assert t == res.trace
    assert {r[0] for r in t.rows} == {0, 1}
    assert {r[2] for r in t.rows} >= {"fwd", "bwd", "update", "send", "recv"}
    sends = {r[8] for r in t.rows if r[2] == "send"}
    recvs = {r[8] for r in t.rows if r[2] == "recv"}
    assert sends == recvs and len(sends) == 2 * 20
    chrome = json.loads(out.read_text())
    flows = [e for e in chrome["traceEvents"] if e["ph"] in ("s", "f")]
    assert len(flows) == 2 * len(sends)
    assert {e["pid"] for e in chrome["traceEvents"]} == {0}
    assert Trace.from_chrome(chrome) == t


@pytest.mark.slow
def test_dgl_two_workers_matches_in_process_accuracy():
    from bpsim.algorithms.dgl import DGLTrainer

    train, test = data.load("digits")
    epochs = 3
    steps = epochs * len(range(0, len(train), 64))
    ref = _in_process(DGLTrainer, steps)
    ref_acc, _ = ref.evaluate(test)
    res = run(RunConfig("dgl", workers=2, steps=steps, seed=0))
    acc = res.summary["test_accuracy"]
    assert abs(acc - ref_acc) <= 0.01, (acc, ref_acc)
    assert _max_diff(res.state_dict, ref.net.state_dict()) < 1e-5
    clock = res.summary["per_rank"][1]["clock"]
    assert clock["method"] == "same-host" and clock["offset"] == 0
    ops = {r[2] for r in res.trace.rows}
    assert ops >= {"fwd", "aux", "bwd", "update", "send", "recv"}
    res.trace.check()


@pytest.mark.slow
def test_blockprop_cached_two_workers_gives_in_process_weights():
    from bpsim.algorithms.blockprop import CachedBlockPropTrainer

    steps = 26   # epoch 0 (h-steps, cache filled) and 4 W-step-only steps of epoch 1
    ref = _in_process(CachedBlockPropTrainer, steps, nh=2)
    res = run(RunConfig("blockprop-cached", workers=2, steps=steps, seed=0,
                        options={"nh": 2}, evaluate=False))
    assert _max_diff(res.state_dict, ref.net.state_dict()) < 1e-5
    t = res.trace.check()
    hsteps = [r for r in t.rows if r[2] == "hstep"]
    assert {r[3] for r in hsteps} == {2} and len(hsteps) == 2 * 22   # N_h spans per h-step
    assert not [r for r in t.rows if r[1] == "comm" and r[4] >= 22]   # Alg. 2: no messages


@pytest.mark.slow
def test_gpipe_matches_backprop_on_full_batches():
    from bpsim.algorithms.backprop import BackpropTrainer

    res = run(RunConfig("gpipe", workers=2, steps=10, microbatches=4, evaluate=False))
    ref = _in_process(BackpropTrainer, 10, full_only=True)
    assert _max_diff(res.state_dict, ref.net.state_dict()) < 1e-5
    t = res.trace.check()
    fwd = [r for r in t.rows if r[2] == "fwd"]
    assert {r[5] for r in fwd} == {0, 1, 2, 3}          # micro-batches
    assert len({r[8] for r in t.rows if r[2] == "send"}) == 2 * 10 * 4
    # one update per rank and step, after that step's last backward on the rank
    ups = {(r[0], r[4]): r for r in t.rows if r[2] == "update"}
    assert len(ups) == 2 * 10
    for r in t.rows:
        if r[2] == "bwd":
            assert r[7] <= ups[(r[0], r[4])][6] + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["gpipe", "1f1b"])
def test_pipelines_run_the_simulators_op_order_and_train_as_backprop(algo):
    from bpsim.algorithms.backprop import BackpropTrainer
    from bpsim.sim import simulate

    res = run(RunConfig(algo, workers=2, steps=3, microbatches=4, evaluate=False))
    ref = _in_process(BackpropTrainer, 3, full_only=True)
    assert _max_diff(res.state_dict, ref.net.state_dict()) < 1e-5
    sim = simulate(algo, blocks=2, steps=3, microbatches=4, costs="fwd=1,bwd=2,comm=0.1")

    def order(rows, rank):
        ops = sorted((r for r in rows if r[0] == rank and r[1] == "compute" and r[2] != "wait"),
                     key=lambda r: r[6])
        return [(r[2], r[4], r[5]) for r in ops]

    for rank in (0, 1):
        assert order(res.trace.rows, rank) == order(sim.trace.rows, rank)


@pytest.mark.slow
def test_one_worker_runs_every_block_with_the_same_steps():
    """--workers 1: one process, round robin over the blocks; same weights as 2 workers
    for dgl (the runs are deterministic) and no comm spans."""
    from bpsim.algorithms.dgl import DGLTrainer

    res = run(RunConfig("dgl", workers=1, blocks=2, steps=12, evaluate=False))
    ref = _in_process(DGLTrainer, 12)
    assert _max_diff(res.state_dict, ref.net.state_dict()) < 1e-5
    t = res.trace.check()
    assert {r[0] for r in t.rows} == {0} and {r[3] for r in t.rows} == {1, 2}
    assert not [r for r in t.rows if r[1] == "comm"]


@pytest.mark.slow
def test_dgl_async_slowed_rank_reuses_buffer_entries():
    res = run(RunConfig("dgl-async", workers=2, steps=16, buffer=4, slowdown={1: 3.0},
                        evaluate=False))
    s = res.summary
    assert [p["updates"] for p in s["per_rank"]] == [16, 16]
    buf = s["buffers"]["2"]
    assert buf["puts"] == 16 and buf["gets"] == 16
    res.trace.check()


@pytest.mark.slow
def test_dgl_async_max_reuse_makes_the_consumer_wait_for_fresh_entries():
    # producer 3x slower; each entry may be read once, so the consumer waits for every
    # new entry and reads each exactly once (without the cap it would reuse them)
    res = run(RunConfig("dgl-async", workers=2, steps=12, buffer=4, slowdown={1: 3.0},
                        max_reuse=1, evaluate=False))
    buf = res.summary["buffers"]["2"]
    assert buf["max_reuse"] == 1 and buf["puts"] == 12 and buf["gets"] == 12
    assert buf["reuse_mean"] == pytest.approx(1.0)
    waits = [r for r in res.trace.rows if r[0] == 1 and r[2] == "wait"]
    assert len(waits) >= 6
    with pytest.raises(ValueError, match="max_reuse"):
        RunConfig("dgl-async", max_reuse=0).resolved()


@pytest.mark.slow
def test_cpus_confines_every_rank_to_the_given_cores():
    one = sorted(os.sched_getaffinity(0))[:1]
    res = run(RunConfig("dgl", workers=2, steps=3, cpus=one, evaluate=False))
    assert res.summary["cpus"] == one and res.summary["threads"] == 1
    assert [p["affinity"] for p in res.summary["per_rank"]] == [one, one]
    with pytest.raises(ValueError, match="may not use"):
        RunConfig("dgl", cpus=[10 ** 6]).resolved()
    with pytest.raises(ValueError, match="names no CPU"):
        RunConfig("dgl", cpus=[]).resolved()


# -------------------------------------------------------------- CLI, faults
def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _with_token(token: str) -> list[int]:
    """PIDs of live processes whose environment carries ``token``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
            state = (d / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if token.encode() in env and state != "Z":
            found.append(int(d.name))
    return found


def _wait_for_spans(p: subprocess.Popen, tmp_path: Path, ranks: tuple[int, ...] = (0, 1),
                    hang: float = 240.0) -> None:
    """Wait until every rank in ``ranks`` has spans on disk in the spool of a
    run started with ``TMPDIR=tmp_path`` (``hang``: hang detection only)."""
    deadline = time.monotonic() + hang
    while time.monotonic() < deadline:
        assert p.poll() is None, p.communicate()[1][-2000:]
        have = {int(f.name[4:-len(".spans.jsonl")]) for f in tmp_path.glob(
            "bpsim-run-*/rank*.spans.jsonl") if f.stat().st_size > 0}
        if set(ranks) <= have:
            return
        time.sleep(0.1)
    raise AssertionError("no spans of every rank appeared (hang)")


def _gone(token: str, wait: float = 60.0) -> list[int]:
    end = time.monotonic() + wait
    while True:
        left = _with_token(token)
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_rank_ends_the_run_and_names_it(tmp_path):
    token = f"BPSIM_TEST_TOKEN_{uuid.uuid4().hex}"
    out = tmp_path / "killed.json"
    p = subprocess.Popen(
        [str(BIN / "bpsim"), "run", "dgl", "--workers", "2", "--steps", "100000",
         "--trace", str(out), "--timeout", "20"],
        env=_env(BPSIM_RUNTIME_FAULT="kill:1:3", **{token: "1"}), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Watch the processes: the first one to vanish is the killed rank; the
    # launcher must then bring everything down within the 30 s of the spec.
    seen: set[int] = set()
    killed_at = None
    deadline = time.monotonic() + 180          # hang detection only
    while p.poll() is None and time.monotonic() < deadline:
        live = set(_with_token(token))
        if killed_at is None and len(seen) >= 4 and seen - live:
            killed_at = time.monotonic()
        seen |= live
        if killed_at is not None and time.monotonic() - killed_at > 30:
            break
        time.sleep(0.1)
    ended_at = time.monotonic()
    if p.poll() is None:
        p.kill()
    _, err = p.communicate(timeout=30)
    assert killed_at is not None and ended_at - killed_at < 30, "the run did not end in 30 s"
    assert p.returncode == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "rank 1" in lines[0] and "SIGKILL" in lines[0], err
    assert not _gone(token), "worker processes were left behind"
    t = Trace.load(out).check()           # the trace gathered so far was written
    assert {r[0] for r in t.rows} == {0, 1}
    assert max(r[4] for r in t.rows if r[0] == 1 and r[1] == "compute") == 2   # 3 steps


@pytest.mark.slow
def test_raising_rank_is_reported_and_others_stop():
    with pytest.raises(RunFailed) as e:
        os.environ["BPSIM_RUNTIME_FAULT"] = "raise:0:2"
        try:
            run(RunConfig("bp", workers=2, steps=1000, evaluate=False))
        finally:
            del os.environ["BPSIM_RUNTIME_FAULT"]
    assert e.value.rank == 0 and "injected failure" in e.value.error
    assert e.value.result is not None and e.value.result.trace is not None


@pytest.mark.slow
def test_ctrl_c_stops_every_rank(tmp_path):
    token = f"BPSIM_TEST_TOKEN_{uuid.uuid4().hex}"
    out = tmp_path / "int.json"
    p = subprocess.Popen([str(BIN / "bpsim"), "run", "dgl", "--workers", "2", "--steps",
                          "100000", "--trace", str(out)],
                         env=_env(TMPDIR=str(tmp_path), **{token: "1"}), cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _wait_for_spans(p, tmp_path)
        os.killpg(p.pid, signal.SIGINT)      # what the terminal sends on Ctrl-C
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err
    assert "interrupted" in err
    assert not _gone(token)
    Trace.load(out).check()


@pytest.mark.slow
def test_torchrun_two_processes_one_host(tmp_path):
    out = tmp_path / "tr.json"
    p = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "bpsim", "run",
         "dgl", "--workers", "2", "--steps", "10", "--trace", str(out), "--json"],
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    objs = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(objs) == 1, p.stdout
    s = objs[0]
    assert s["ok"] and s["workers"] == 2 and s["test_accuracy"] is not None
    t = Trace.load(out).check()
    assert {r[0] for r in t.rows} == {0, 1}


def test_cli_rejects_bad_input_with_one_line():
    from bpsim.cli import main

    for argv in (["run", "bp", "--workers", "3", "--blocks", "2"],
                 ["run", "dgl", "--slowdown", "5:2"],
                 ["run", "dgl", "--slowdown", "0:2"],
                 ["run", "gpipe", "--batch-size", "10", "--microbatches", "4"],
                 ["run", "dgl", "--lam", "1.0"]):
        assert main(argv) == 2


# ------------------------------------------------------------ no processes
def test_ping_pong_offset_comes_from_the_shortest_round_trip():
    from bpsim.runtime.clock import best_offset

    # rank 0's clock is 5 s ahead; the second round has the shortest round trip
    rounds = [(0.0, 5.3, 0.4), (1.0, 6.05, 1.1), (2.0, 7.5, 2.6)]
    offset, rtt = best_offset(rounds)
    assert offset == pytest.approx(6.05 - 1.05) and rtt == pytest.approx(0.1)
    with pytest.raises(ValueError):
        best_offset([])


def test_message_ids_are_unique_per_link():
    ids = {msg_id(s, d, q, 4) for q in range(50) for s in range(1, 5) for d in (s - 1, s + 1)
           if 1 <= d <= 4}
    assert len(ids) == 50 * 6


def test_serialize_comm_keeps_arrivals_and_removes_overlaps():
    rows = [
        (0, "comm", "send", 1, 0, 0, 1.0, 1.1, 7),
        (1, "comm", "recv", 2, 0, 0, 0.0, 1.5, 7),    # posted long before the send
        (1, "comm", "send", 2, 0, 0, 1.2, 1.3, 8),    # rank 1 sends while receiving
        (1, "comm", "recv", 2, 1, 0, 0.0, 1.25, 9),   # arrives during that send
        (1, "compute", "fwd", 2, 0, 0, 0.0, 1.0, None),
    ]
    out = serialize_comm(rows)
    t = Trace(out).check()
    by = {(r[0], r[8]): r for r in t.rows}
    assert by[(1, 7)][6:8] == (1.3, 1.5)              # after its send and rank 1's send
    assert by[(1, 9)][6] == by[(1, 9)][7] == 1.25     # zero length at its arrival
    assert by[(0, 7)][6:8] == (1.0, 1.1)


def test_local_comm_blocks_until_the_message_is_there():
    c = LocalComm()
    assert c.recv(1, 2, step=0) is BLOCKED
    c.send(1, 2, torch.ones(2), step=0)
    assert torch.equal(c.recv(1, 2, step=0), torch.ones(2))
    assert Send(2, torch.ones(1), 0).dst == 2 and Recv(1, 0).src == 1


def _blocks_in_one_process(algo: str, blocks: int, steps: int, n_train: int, batch: int):
    """Contexts of every block of a small run (digits, four layers of width 8)."""
    from bpsim.runtime import RunConfig
    from bpsim.runtime.schedules import BatchPlan, BlockCtx
    from bpsim.runtime.worker import build

    cfg = RunConfig(algo, workers=1, blocks=blocks, depth=4, width=8, batch_size=batch,
                    n_train=n_train, steps=steps).resolved()
    desc = data.describe("digits")
    train, _ = data.load("digits", n_train=n_train, seed=0)
    net, tr = build(cfg, desc.input_shape, desc.n_classes, desc.task)
    plan = BatchPlan(tr, *train.tensors, steps, torch.device("cpu"))
    ctxs = [BlockCtx(b, blocks, 0, net, tr, plan, time.perf_counter, None, torch.device("cpu"),
                     algo=algo) for b in range(1, blocks + 1)]
    return ctxs, plan, tr


def _local_step(step_fn, ctx, comm: LocalComm, t: int) -> None:
    """Run step ``t`` of one block to its end (every message must be there)."""
    from bpsim.runtime.comm import Take

    gen, val = step_fn(ctx, t), None
    while True:
        try:
            req = gen.send(val)
        except StopIteration:
            return
        if isinstance(req, Send):
            comm.send(ctx.block, req.dst, req.tensor, req.step, req.mb, req.origin)
            val = None
        elif isinstance(req, Take):
            val = comm.take(req.src, ctx.block, t)
        else:
            val = comm.recv(req.src, ctx.block, req.step, req.mb)
        assert val is not BLOCKED


def test_dgl_async_middle_block_passes_on_the_batch_its_input_came_from():
    """Block 1 runs a whole epoch ahead (4 batches, the last one short); block 2
    reads the newest entry (batch 3) at its step 0, and block 3, reading block
    2's step-0 output, trains on batch 3's labels, not batch 0's."""
    from bpsim.runtime.schedules import dgl_async_step

    ctxs, plan, _ = _blocks_in_one_process("dgl-async", 3, 4, n_train=120, batch=32)
    comm = LocalComm(buffered=[1, 2], buffer=4)
    for t in range(4):
        _local_step(dgl_async_step, ctxs[0], comm, t)
    _local_step(dgl_async_step, ctxs[1], comm, 0)
    _local_step(dgl_async_step, ctxs[2], comm, 0)
    assert plan.size(3) == 24 != plan.size(0)
    assert [c.label_batches for c in ctxs] == [[0, 1, 2, 3], [3], [3]]
    assert comm.reads == {2: [[0, 3, 1]], 3: [[0, 0, 1]]}   # consumer step, producer step, reuse
    with pytest.raises(ValueError, match="origin"):
        comm.send(1, 2, torch.ones(2), step=4)


def test_a_greedy_block_waits_through_the_stages_before_its_own():
    """Block j's first message comes after the (j - 1) stages before its own:
    its wait may span that many steps of --timeout each, later ones one."""
    from bpsim.runtime.schedules import greedy_step, inbound_links

    blocks, per_stage = 3, 2
    _, plan, tr = _blocks_in_one_process("greedy", blocks, blocks * per_stage, 64, 32)
    for block in (2, 3):
        (link,) = inbound_links(greedy_step, block, blocks, plan, (8,), (8,), tr)
        first = (block - 1) * per_stage
        assert [s for s, _, _ in link.items] == list(range(first, blocks * per_stage))
        assert [link.patience(i) for i in range(len(link.items))] == \
            [first + 1] + [1] * (len(link.items) - 1)


# ------------------------------------------------------- stops from outside
def _start_run(tmp_path, token: str, out: Path) -> subprocess.Popen:
    p = subprocess.Popen([str(BIN / "bpsim"), "run", "dgl", "--workers", "2", "--steps",
                          "100000", "--trace", str(out)],
                         env=_env(TMPDIR=str(tmp_path), **{token: "1"}), cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_spans(p, tmp_path)
    return p


def _spools(folder: Path) -> list[Path]:
    from bpsim.runtime.launch import SPOOL_PREFIX

    return sorted(folder.glob(f"{SPOOL_PREFIX}*"))


@pytest.mark.slow
def test_sigkill_of_the_launcher_ends_the_ranks_and_the_next_run_removes_its_spool(tmp_path):
    from bpsim.runtime.launch import clean_stale_spools

    token = f"BPSIM_TEST_TOKEN_{uuid.uuid4().hex}"
    p = _start_run(tmp_path, token, tmp_path / "kill.json")
    try:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert not _gone(token, wait=30), "ranks outlived their launcher"
    left = _spools(tmp_path)
    assert left, "a SIGKILLed launcher cannot clean up; its spool should still be there"
    live = tmp_path / f"bpsim-run-{os.getpid()}-live"    # a live launcher's spool stays
    live.mkdir()
    assert sorted(map(Path, clean_stale_spools(str(tmp_path)))) == left
    assert _spools(tmp_path) == [live]


@pytest.mark.slow
def test_divergence_stops_the_run_naming_the_block():
    from bpsim.algorithms.base import DivergenceError

    with pytest.raises(DivergenceError) as e:     # a ValueError: bad settings, exit 2
        run(RunConfig("dgl", workers=2, steps=50, lr=1e6, evaluate=False))
    assert e.value.result.trace is not None
    msg = str(e.value)
    assert "diverged at step" in msg and "block" in msg and "learning rate" in msg
    assert "after" not in msg and "\n" not in msg


@pytest.mark.parametrize("kw, match", [
    (dict(timeout=float("nan")), "--timeout"), (dict(timeout=float("inf")), "--timeout"),
    (dict(host=""), "--host"), (dict(host="  "), "--host"),
    (dict(algo="dgl", microbatches=3), "--microbatches does not apply"),
    (dict(algo="nope"), "unknown method"),
])
def test_bad_run_config_is_a_value_error_naming_the_flag(kw, match):
    kw.setdefault("algo", "bp")
    with pytest.raises(ValueError, match=match):
        RunConfig(**kw).resolved()


def test_bad_outputs_and_oversized_batches_are_refused_before_launch(tmp_path):
    with pytest.raises(ValueError, match="larger than the training set"):
        run(RunConfig("dgl", batch_size=100, n_train=50))
    with pytest.raises(ValueError, match="is a folder"):
        run(RunConfig("dgl", trace=str(tmp_path)))


@pytest.mark.slow
def test_host_on_every_interface_warns(capsys):
    res = run(RunConfig("dgl", workers=2, steps=1, host="0.0.0.0", evaluate=False))
    assert res.summary["ok"]
    err = capsys.readouterr().err
    assert "every interface" in err and "network" in err


def test_a_non_finite_weight_stops_the_run_naming_the_block():
    """The runtime's last check: weights spoiled by the last step, with no loss
    left to show it, stop the run with the block's name (as a diverged loss does)."""
    from types import SimpleNamespace

    import torch

    from bpsim.algorithms.base import DivergenceError
    from bpsim.runtime.schedules import BlockCtx

    layer = torch.nn.Linear(3, 2)
    ctx = SimpleNamespace(module=layer, algo="dgl", block=2, trainer=SimpleNamespace(lrs=[0.1, 0.1]))
    BlockCtx.check_weights(ctx, 9)                     # finite: nothing happens
    with torch.no_grad():
        layer.weight[0, 1] = float("inf")
    with pytest.raises(DivergenceError, match=r"after step 10.*block 2") as e:
        BlockCtx.check_weights(ctx, 9)
    assert "\n" not in str(e.value)
