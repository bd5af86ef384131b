"""The launcher: jobs across hosts (torchrun, a hand launch), the backend and
thread choices, signals, cleanup of temporaries, and whom a failure blames.

The multi-process tests wait for states (spans of every rank on disk, a
process gone), never for a fixed time; their deadlines only detect hangs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from bpsim.runtime import launch
from bpsim.runtime.launch import RunConfig, job_env
from bpsim.trace import Trace
from test_runtime import _gone, _wait_for_spans, _with_token   # processes by an environment token

BIN = Path(sys.executable).parent
HANG = 240.0                 # seconds: hang detection only, never a measurement


# ---------------------------------------------------------------- helpers
def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "BPSIM_RUNTIME_FAULT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TMPDIR"] = str(tmp_path)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _temporaries(folder: Path) -> list[Path]:
    """What bpsim or multiprocessing could leave in ``folder``."""
    return sorted(list(folder.glob("bpsim-run-*")) + list(folder.glob(".bpsim-run-*"))
                  + list(folder.glob("pymp-*")) + list(folder.glob(".bpsim-*.tmp")))


def _start(tmp_path: Path, token: str, out: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "bpsim"), "run", "dgl", "--workers", "2", "--steps",
                             "100000", "--threads", "1", "--trace", str(out), *extra],
                            env=_env(tmp_path, **{token: "1"}), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _stop_run(tmp_path: Path, act: Callable[[subprocess.Popen, str], None], out: Path,
              group: bool = False) -> tuple[int, str, str]:
    """Start a long dgl run, wait until both ranks have spans on disk, call
    ``act(process, token)``, and wait for the run to end; returns
    ``(exit code, stderr, token)``."""
    token = f"BPSIM_TEST_TOKEN_{uuid.uuid4().hex}"
    p = _start(tmp_path, token, out, start_new_session=group)
    try:
        _wait_for_spans(p, tmp_path)
        act(p, token)
        _, err = p.communicate(timeout=HANG)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL) if group else p.kill()
            p.wait(timeout=HANG)
    return p.returncode, err, token


def _holder_of(path_end: str, token: str) -> int:
    """The pid among ``token``'s processes that holds a file ending in ``path_end`` open."""
    for pid in _with_token(token):
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd).endswith(path_end):
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no process holds {path_end}")


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


# ------------------------------------------------------ jobs across hosts
def _torchrun_node(tmp_path: Path, node: int, port: int, rdzv_id: str, algo: str,
                   steps: int, trace: Path, *extra: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
         "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
         "--monitor-interval", "0.5", "-m", "bpsim", "run", algo, "--workers", "2", "--steps",
         str(steps), "--threads", "1", "--trace", str(trace), "--json", *extra],
        env=_env(tmp_path, **env), cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["dgl", "1f1b"])
def test_two_nodes_on_loopback_run_as_one_job(tmp_path, algo):
    """Two torchrun agents (two "hosts", one rank each) meet over c10d and
    run one job; the node of rank 0 prints the summary and writes the trace."""
    port = _free_port()
    nodes = [tmp_path / "a", tmp_path / "b"]
    for d in nodes:
        d.mkdir()
    procs = [_torchrun_node(tmp_path, i, port, f"bpsim-{algo}-{port}", algo, 6, d / "t.json")
             for i, d in enumerate(nodes)]
    outs = [p.communicate(timeout=HANG) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    objs = [json.loads(ln) for out, _ in outs for ln in out.splitlines() if ln.startswith("{")]
    assert len(objs) == 1, outs                      # rank 0 alone prints the summary
    s = objs[0]
    assert s["ok"] and s["algorithm"] == algo and s["workers"] == 2 and s["backend"] == "gloo"
    written = [d / "t.json" for d in nodes if (d / "t.json").exists()]
    assert len(written) == 1
    t = Trace.load(written[0]).check()
    assert {r[0] for r in t.rows} == {0, 1}
    assert not [q for d in nodes for q in d.glob("*.parts")]   # the trace holds every span


@pytest.mark.slow
def test_a_rank_dying_on_one_node_stops_the_other_and_its_parts_merge(tmp_path):
    """Rank 1 SIGKILLs itself on node b: rank 0 on node a stops long before
    --timeout (its watch sees rank 1's beat stand still, or the store go),
    names rank 1, and both nodes' .parts folders merge into one trace."""
    port = _free_port()
    nodes = [tmp_path / "a", tmp_path / "b"]
    for d in nodes:
        d.mkdir()
    procs = [_torchrun_node(tmp_path, i, port, f"bpsim-kill-{port}", "dgl", 100000,
                            d / "t.json", "--timeout", "600", BPSIM_RUNTIME_FAULT="kill:1:3")
             for i, d in enumerate(nodes)]
    outs = [p.communicate(timeout=HANG) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    ours = [ln for _, err in outs for ln in err.splitlines() if ln.startswith("bpsim run:")]
    assert len(ours) == 1, outs                      # rank 0's line; rank 1 died silently
    assert "rank 1 failed" in ours[0] and "rank 0 stopped" in ours[0], ours
    assert "timed out" not in ours[0] and "bpsim trace merge" in ours[0]
    from bpsim.cli import main

    merged = tmp_path / "merged.json"
    parts = [str(d / "t.json.parts") for d in nodes]
    assert main(["trace", "merge", *parts, "-o", str(merged)]) == 0
    t = Trace.load(merged).check()
    assert {r[0] for r in t.rows} == {0, 1} and t.meta["partial"] and t.meta["algo"] == "dgl"


@pytest.mark.slow
def test_a_job_from_rank_and_world_size_variables(tmp_path):
    """RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT without LOCAL_RANK (a SLURM
    script, a hand launch): each process runs its rank of one job."""
    port = _free_port()
    out = tmp_path / "hand.json"
    procs = [subprocess.Popen(
        [str(BIN / "bpsim"), "run", "dgl", "--workers", "2", "--steps", "5", "--threads", "1",
         "--trace", str(out), "--json"],
        env=_env(tmp_path, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port)),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)]
    outs = [p.communicate(timeout=HANG) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert outs[1][0].strip() == ""                  # only rank 0 reports
    s = json.loads(outs[0][0])
    assert s["ok"] and s["workers"] == 2 and s["test_accuracy"] is not None
    assert {r[0] for r in Trace.load(out).check().rows} == {0, 1}
    assert not _temporaries(tmp_path) and not (tmp_path / "hand.json.parts").exists()


@pytest.mark.parametrize("env, missing", [
    ({"RANK": "0"}, "WORLD_SIZE, MASTER_ADDR, MASTER_PORT"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK"),
])
def test_a_partial_set_of_job_variables_ends_with_one_line(env, missing, monkeypatch, capsys):
    from bpsim.cli import main

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["run", "dgl", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert len(_lines(err)) == 1 and f"but {missing} not" in err and "unset RANK" in err


def test_job_env_reads_torchrun_slurm_and_hand_launches():
    base = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert job_env({}) is None and job_env({"MASTER_ADDR": "x", "MASTER_PORT": "1"}) is None
    j = job_env(base)
    assert (j.rank, j.world, j.local_rank, j.local_world, j.launcher) == (3, 4, 0, 1, "environment")
    j = job_env({**base, "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                 "TORCHELASTIC_RUN_ID": "x"})
    assert (j.local_rank, j.local_world, j.launcher) == (1, 2, "torchrun")
    j = job_env({**base, "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
                 "SLURM_NTASKS_PER_NODE": "2(x2)"})
    assert (j.local_rank, j.local_world, j.launcher) == (1, 2, "srun")
    for bad, name in (({"RANK": "4"}, "RANK"), ({"MASTER_PORT": "0"}, "MASTER_PORT"),
                      ({"WORLD_SIZE": "two"}, "WORLD_SIZE")):
        with pytest.raises(ValueError, match=name):
            job_env({**base, **bad})


# ------------------------------------------------------ backend, threads
@pytest.fixture
def gpus(monkeypatch):
    """Pretend this host has ``n`` GPUs and NCCL."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)

    def set_(n: int) -> None:
        monkeypatch.setattr(launch, "torch_gpus", lambda: n)

    return set_


def test_backend_counts_the_ranks_on_this_host_not_the_job(gpus):
    gpus(2)
    cfg = RunConfig("dgl", workers=4, device="cuda", local_workers=2).resolved()
    assert cfg.backend == "nccl"                   # 2 hosts x 2 GPUs: NCCL
    assert RunConfig("dgl", workers=4, device="cuda").resolved().backend == "gloo"
    assert RunConfig("1f1b", workers=4, device="cuda", local_workers=2).resolved().backend == "nccl"
    with pytest.raises(ValueError, match=r"one GPU per rank on each host.*--nproc-per-node 2"):
        RunConfig("1f1b", workers=4, device="cuda").resolved()
    assert RunConfig("dgl", workers=2, device="cuda", backend="gloo").resolved().backend == "gloo"
    with pytest.raises(ValueError, match="drop --backend gloo"):
        RunConfig("gpipe", workers=2, device="cuda", backend="gloo").resolved()
    with pytest.raises(ValueError, match="needs one GPU per rank on this host"):
        RunConfig("dgl", workers=4, device="cuda", backend="nccl").resolved()
    with pytest.raises(ValueError, match="--device cuda"):
        RunConfig("dgl", backend="nccl").resolved()
    with pytest.raises(ValueError, match="--backend must be one of"):
        RunConfig("dgl", backend="mpi").resolved()
    assert RunConfig("dgl", backend="auto").resolved().backend == "gloo"
    gpus(0)
    with pytest.raises(ValueError, match="sees no GPU"):
        RunConfig("dgl", device="cuda").resolved()


def test_default_threads_leave_busy_cores_alone_and_oversubscription_is_named(monkeypatch):
    monkeypatch.setattr(launch, "_idle_cores", lambda: 8.0)
    assert launch.default_threads(8, 2) == 4 and launch.default_threads(8, 16) == 1
    monkeypatch.setattr(launch, "_idle_cores", lambda: 0.4)   # a busy machine
    assert launch.default_threads(8, 1) == 1
    cfg = RunConfig("dgl", workers=2, local_workers=1).resolved()
    assert cfg.threads == 1 and launch.oversubscription(cfg) is None
    many = launch._cores() + 1
    cfg = RunConfig("dgl", workers=1, threads=many).resolved()
    warn = launch.oversubscription(cfg)
    assert warn is not None and "oversubscribe" in warn and "--threads" in warn
    assert "\n" not in warn


# ------------------------------------------------------------ temporaries
def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    made = [tmp_path / f"bpsim-run-{dead.pid}-abc", tmp_path / f"bpsim-run-{dead.pid}-mp-xyz",
            tmp_path / f".bpsim-run-{dead.pid}-w1"]
    live = [tmp_path / f"bpsim-run-{os.getpid()}-abc", tmp_path / f".bpsim-run-{os.getpid()}-x"]
    for d in made + live:
        d.mkdir()
        (d / "f").write_text("x")
    assert sorted(map(Path, launch.clean_stale_spools(str(tmp_path)))) == sorted(made)
    assert sorted(p for p in tmp_path.iterdir()) == sorted(live)


def test_save_trace_leaves_only_the_trace(tmp_path):
    t = Trace.from_rows([(0, "compute", "fwd", 1, 0, 0, 0.0, 1.0, None)], {"algo": "dgl"})
    launch.save_trace(t, tmp_path / "t.json")
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]
    assert len(Trace.load(tmp_path / "t.json")) == 1


def test_merge_refuses_folders_without_spans(tmp_path):
    from bpsim.cli import main

    assert main(["trace", "merge", str(tmp_path), "-o", str(tmp_path / "m.json")]) == 2
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_a_bad_master_port_leaves_no_spool(tmp_path):
    """A rank that cannot reach the job's store fails in one line (saying what
    to check), and removes its spool and empty .parts folder."""
    port = _free_port()                               # nothing listens there
    out = tmp_path / "t.json"
    p = subprocess.run(
        [str(BIN / "bpsim"), "run", "dgl", "--steps", "5", "--timeout", "1", "--trace", str(out)],
        env=_env(tmp_path, RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), TORCH_CPP_LOG_LEVEL="FATAL"),
        cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert p.returncode == 1
    ours = [ln for ln in p.stderr.splitlines() if ln.startswith("bpsim run:")]
    assert len(ours) == 1 and "rank 1 failed" in ours[0] and "MASTER_PORT" in ours[0], p.stderr
    assert not _temporaries(tmp_path) and not (tmp_path / "t.json.parts").exists()
    assert not out.exists()


# --------------------------------------------------------------- signals
@pytest.mark.slow
def test_sigterm_stops_the_ranks_and_keeps_the_trace(tmp_path):
    out = tmp_path / "term.json"
    code, err, token = _stop_run(tmp_path, lambda p, _: p.send_signal(signal.SIGTERM), out)
    assert code == 143, err
    lines = _lines(err)
    assert len(lines) == 1 and "SIGTERM" in lines[0], err
    assert not _gone(token, 60), "worker processes were left behind"
    t = Trace.load(out).check()
    assert {r[0] for r in t.rows} == {0, 1}
    assert not _temporaries(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "SIGTERM"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_a_second_signal_while_starting_is_absorbed(tmp_path, sig, code, word):
    """Two signals 50 ms apart as soon as the run has its spool (the ranks
    are starting): the stop is quick, and the second signal lands while the
    process exits; it must not kill it or leave a temporary behind."""
    token = f"BPSIM_TEST_TOKEN_{uuid.uuid4().hex}"
    p = _start(tmp_path, token, tmp_path / "early.json", start_new_session=True)
    try:
        deadline = time.monotonic() + HANG
        while not list(tmp_path.glob("bpsim-run-*")) and time.monotonic() < deadline:
            assert p.poll() is None, p.communicate()[1][-2000:]
            time.sleep(0.002)
        for _ in range(2):
            os.killpg(p.pid, sig) if sig == signal.SIGINT else p.send_signal(sig)
            time.sleep(0.05)
        _, err = p.communicate(timeout=HANG)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == code, err
    lines = _lines(err)
    assert len(lines) == 1 and word in lines[0], err
    assert not _gone(token, 60)
    assert not _temporaries(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "SIGTERM"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_a_second_signal_during_cleanup_is_absorbed(tmp_path, sig, code, word):
    """More signals while the run stops (an impatient user, a scheduler): the
    first stops the run; one 50 ms later and one as soon as the trace is
    written (the launcher then removes its temporaries and exits) are
    absorbed; the partial trace is written, one line is printed, and no
    temporary (spool, fork server folder) is left."""
    out = tmp_path / "two.json"

    def twice(p: subprocess.Popen, _: str) -> None:
        def send() -> None:
            os.killpg(p.pid, sig) if sig == signal.SIGINT else p.send_signal(sig)

        send()
        time.sleep(0.05)                             # the gap between the two signals
        send()
        deadline = time.monotonic() + HANG
        while not out.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if p.poll() is None:
            send()

    got, err, token = _stop_run(tmp_path, twice, out, group=True)
    assert got == code, err
    lines = _lines(err)
    assert len(lines) == 1 and word in lines[0], err
    assert not _gone(token, 60)
    assert {r[0] for r in Trace.load(out).check().rows} == {0, 1}
    assert not _temporaries(tmp_path)


@pytest.mark.slow
def test_sigkill_of_the_launcher_leaves_temporaries_the_next_run_removes(tmp_path):
    _, _, token = _stop_run(tmp_path, lambda p, _: p.send_signal(signal.SIGKILL),
                            tmp_path / "kill.json")
    assert not _gone(token, 60), "ranks outlived their launcher"
    left = _temporaries(tmp_path)
    assert left and not list(tmp_path.glob("pymp-*"))   # every folder carries the pid
    assert sorted(map(Path, launch.clean_stale_spools(str(tmp_path)))) == left
    assert not _temporaries(tmp_path)


# ------------------------------------------------------------------ blame
@pytest.mark.slow
def test_sigterm_to_one_rank_blames_that_rank(tmp_path):
    out = tmp_path / "r1.json"
    code, err, token = _stop_run(
        tmp_path, lambda _, tok: os.kill(_holder_of("rank1.spans.jsonl", tok), signal.SIGTERM),
        out)
    assert code == 1, err
    lines = _lines(err)
    assert len(lines) == 1 and "rank 1 failed" in lines[0] and "SIGTERM" in lines[0], err
    assert not _gone(token, 60)
    assert {r[0] for r in Trace.load(out).check().rows} == {0, 1}


@pytest.mark.slow
def test_a_killed_fork_server_is_named_and_its_ranks_stopped(tmp_path):
    def kill_fork_server(p: subprocess.Popen, token: str) -> None:
        server = [pid for pid in _with_token(token)          # the launcher's child
                  if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
                  == str(p.pid) and b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(server) == 1
        os.kill(server[0], signal.SIGKILL)

    code, err, token = _stop_run(tmp_path, kill_fork_server, tmp_path / "fs.json")
    assert code == 1, err
    lines = _lines(err)
    assert len(lines) == 1 and "fork server" in lines[0] and "rank 0" not in lines[0], err
    assert not _gone(token, 60), "the ranks of the killed fork server were left running"
    assert not _temporaries(tmp_path)


@pytest.mark.slow
def test_under_torchrun_a_sigkilled_worker_is_blamed_and_the_trace_merged(tmp_path):
    out = tmp_path / "tr.json"
    p = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--monitor-interval",
         "0.5", "-m", "bpsim", "run", "dgl", "--workers", "2", "--steps", "100000",
         "--threads", "1", "--timeout", "600", "--trace", str(out)],
        env=_env(tmp_path, BPSIM_RUNTIME_FAULT="kill:1:3"), cwd=tmp_path,
        capture_output=True, text=True, timeout=HANG)
    assert p.returncode != 0
    ours = [ln for ln in p.stderr.splitlines() if ln.startswith("bpsim run:")]
    assert len(ours) == 1 and "rank 1 failed" in ours[0], p.stderr[-3000:]
    assert "Terminated" not in ours[0]
    assert {r[0] for r in Trace.load(out).check().rows} == {0, 1}


@pytest.mark.slow
def test_host_takes_an_ipv6_address():
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert RunConfig("dgl", host=" [::1] ").resolved().host == "::1"   # as in a URL
    res = launch.run(RunConfig("dgl", workers=2, steps=1, host="::1", threads=1,
                               evaluate=False))
    assert res.summary["ok"]


def test_job_watch_trips_on_a_stale_beat_and_on_a_posted_failure_and_blames_the_first(
        monkeypatch):
    """Two ranks' watches on one store (no processes): a rank whose beat
    stands still without saying it is done trips its peer; a posted failure
    trips the others; blame picks the earliest primary failure."""
    from datetime import timedelta

    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=10),
                           wait_for_workers=False)
    tripped: dict[int, str] = {}
    monkeypatch.setattr(launch._JobWatch, "_trip",
                        lambda self, cause: tripped.setdefault(self.job.rank, cause))

    def watches(prefix: str) -> list:
        return [launch._JobWatch(launch.JobEnv(r, 3, 0, 1, "127.0.0.1", master.port, "hand"),
                                 prefix, beat=0.05, stale=0.3) for r in range(3)]

    def wait_for(cond) -> None:
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline, "hang"
            time.sleep(0.02)

    a, b, c = watches("t1/")
    c.close()                                  # done: never judged stale
    wait_for(lambda: a.store.add("beat/1", 0) > 2)
    b._end.set()                               # beat stops, no done: gone
    wait_for(lambda: 0 in tripped)
    assert "rank 1 stopped answering" in tripped[0] and 2 not in tripped
    a.close()
    tripped.clear()
    a, b, c = watches("t2/")
    wait_for(lambda: a.store.add("beat/2", 0) > 2)
    late = {"error": "RuntimeError: late", "time": 2.0, "secondary": False}
    first = {"error": "RuntimeError: first", "time": 1.0, "secondary": False}
    peer = {"error": "PeerError: lost rank 2", "time": 0.5, "secondary": True}
    c.fail(late)
    b.fail(first)
    wait_for(lambda: 0 in tripped)
    assert tripped[0].startswith("rank ")
    assert a.blame(peer) == (1, "RuntimeError: first")
    for w in (a, b, c):
        w.close()
