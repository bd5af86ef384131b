"""Start a run: one process per rank on this host, watch them, gather the results.

:func:`run` is what ``bpsim run`` calls. It checks the configuration
(building the net and trainer once, so bad options fail fast with a clear
message), hosts the rendezvous (a ``TCPStore`` bound to ``127.0.0.1`` on a
free port by default), starts the ranks with ``torch.multiprocessing``
(``forkserver``: torch is imported once, in the fork server) and waits.

Faults. The launcher watches every rank. When one exits with an error or is
killed, it stops the others (SIGTERM, then SIGKILL after a grace period),
writes the trace recorded so far and raises :class:`RunFailed` naming the
rank whose failure came first (a rank that fails *because* a peer vanished
is reported only when nothing else explains the failure). Ranks also time
out on their own (``--timeout``) if a peer stops sending, and end when the
launcher disappears. Ctrl-C stops every rank the same way and re-raises
``KeyboardInterrupt`` after writing the partial trace; SIGTERM does the same
and raises :class:`RunStopped` (exit code 143). Traces and results are
written atomically. The spool folder (``bpsim-run-<pid>-*`` in the
temporary directory) is removed at the end; folders left by launchers
killed with SIGKILL are removed by the next run (:func:`clean_stale_spools`).

Under ``torchrun`` (:func:`run_torchrun`) there is no launcher of ours: each
process runs one rank, rank 0 gathers spans, results and weights at the end
and writes the trace and the summary.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from bpsim import methods
from bpsim.files import check_writable, json_safe

__all__ = ["RunConfig", "RunResult", "RunFailed", "RunStopped", "ALGORITHMS", "run",
           "run_torchrun", "under_torchrun", "SPOOL_PREFIX", "clean_stale_spools"]

#: the methods ``bpsim run`` runs (those with a runtime step in :mod:`bpsim.methods`)
ALGORITHMS = methods.names(runtime=True)

#: temporary folder of a run's spans and results: ``bpsim-run-<launcher pid>-<random>``
SPOOL_PREFIX = "bpsim-run-"

#: registry options that RunConfig also holds as fields of their own
_FIELDS = ("aux", "microbatches", "buffer", "max_reuse")


class RunStopped(RuntimeError):
    """The run was stopped from outside (SIGTERM); the ranks are gone and the
    trace recorded so far is written. ``exit_code`` is what the command exits with."""

    def __init__(self, message: str, exit_code: int = 143,
                 result: "RunResult | None" = None) -> None:
        super().__init__(message)
        self.exit_code, self.result = exit_code, result


class _Terminate(Exception):
    """Raised in the launcher's main thread by SIGTERM."""


class RunFailed(RuntimeError):
    """A rank failed; ``rank`` and ``error`` say which and why."""

    def __init__(self, message: str, rank: int | None, error: str,
                 result: "RunResult | None" = None) -> None:
        super().__init__(message)
        self.rank, self.error, self.result = rank, error, result


@dataclass
class RunConfig:
    """Everything ``bpsim run`` accepts (see ``bpsim run --help``).

    ``blocks`` defaults to ``workers``; with ``workers=1`` one process runs
    all ``blocks`` blocks with the same step code (the speedup reference).
    ``cpus`` confines every worker to those CPU ids (``sched_setaffinity``),
    e.g. ``[0, 1]`` runs K ranks on two cores: the runtime side of the
    simulator's shared ``placement``. ``slowdown`` maps a block (1-based,
    as in ``bpsim simulate`` and ``bpsim train``; rank k holds block k + 1
    when every block has its own process) to its slowdown factor S >= 1.
    ``options`` are method options of :mod:`bpsim.methods` (``lam``, ``nh``,
    ``lr_h``, ``cache_every``, ...); ``aux``, ``microbatches``, ``buffer`` and
    ``max_reuse`` may also be given as fields. :meth:`resolved` fills in the
    registry's defaults: afterwards ``options`` holds every option of the
    method and the four fields hold their resolved values (None where the
    method does not take them). ``threads`` defaults to ``cores // workers``
    (at least 1; cores = ``len(cpus)`` when given).
    """

    algo: str
    workers: int = 2
    blocks: int | None = None
    steps: int = 100
    device: str = "cpu"
    data: str = "digits"
    model: str = "mlp"
    width: int | None = None
    depth: int | None = None
    aux: str | None = None
    batch_size: int = 64
    seed: int = 0
    lr: float | list[float] | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    microbatches: int | None = None
    buffer: int | None = None
    max_reuse: int | None = None
    slowdown: dict[int, float] = field(default_factory=dict)
    threads: int | None = None
    cpus: list[int] | None = None
    timeout: float = 20.0
    host: str = "127.0.0.1"
    trace: str | None = None
    record: bool = True
    evaluate: bool = True
    n_train: int | None = None
    n_test: int | None = None
    backend: str | None = None

    def resolved(self) -> "RunConfig":
        """A checked copy with every default filled in (ValueError on bad input)."""
        c = RunConfig(**asdict(self))
        m = methods.get(c.algo)
        if m.runtime is None:
            raise ValueError(f"{m.name} does not run on the runtime; choose one of "
                             f"{', '.join(ALGORITHMS)}")
        c.algo = m.name
        for name in ("workers", "steps", "batch_size", "microbatches", "buffer", "max_reuse"):
            v = getattr(c, name)
            if name in _FIELDS and v is None:    # the registry's default (max_reuse: unlimited)
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}"
                                 + (" (or None: unlimited)" if name == "max_reuse" else ""))
        c.blocks = c.workers if c.blocks is None else c.blocks
        if c.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {c.blocks}")
        if c.workers not in (1, c.blocks):
            raise ValueError(f"--workers {c.workers} with --blocks {c.blocks}: each rank holds "
                             f"one block, so use --workers {c.blocks} (one block per process) "
                             "or --workers 1 (every block in one process)")
        if c.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {c.device!r}")
        given = dict(c.options)
        for name in _FIELDS:
            v = getattr(c, name)
            if v is None or (name not in m.options and v == methods.DEFAULTS[name]):
                continue                     # not given, or a front end's default
            given[name] = v
        c.options = m.resolved_options(given)
        for name in _FIELDS:
            setattr(c, name, c.options.get(name))
        pipelined = "microbatches" in m.options
        if isinstance(c.timeout, bool) or not isinstance(c.timeout, (int, float)) \
                or not math.isfinite(c.timeout) or c.timeout <= 0:
            raise ValueError(f"--timeout must be a finite number of seconds > 0, got {c.timeout}")
        if not isinstance(c.host, str) or not c.host.strip():
            raise ValueError(f"--host must name an address of this machine, e.g. 127.0.0.1; "
                             f"got {c.host!r}")
        slow = {}
        for b, s in dict(c.slowdown).items():
            b, s = int(b), float(s)
            if not 1 <= b <= c.blocks:
                raise ValueError(f"--slowdown names block {b}, but blocks are 1..{c.blocks} "
                                 f"(BLOCK:S is 1-based, as in bpsim simulate)")
            if not (s >= 1 and math.isfinite(s)):
                raise ValueError(f"--slowdown factor of block {b} must be >= 1 (S times slower), "
                                 f"got {s}")
            slow[b] = s
        c.slowdown = slow
        if c.cpus is not None:
            c.cpus = _check_cpus(c.cpus)
        if c.threads is None:
            n_cores = len(c.cpus) if c.cpus is not None else _cores()
            c.threads = max(1, n_cores // c.workers)
        if c.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {c.threads}")
        if c.backend is None:
            c.backend = "gloo"
            if c.device == "cuda":
                import torch

                if not torch.cuda.is_available():
                    raise ValueError("--device cuda but torch sees no GPU (or was built without "
                                     "CUDA); use --device cpu")
                # NCCL needs one GPU per rank; with fewer GPUs, gloo through host memory.
                if torch.cuda.device_count() >= c.workers:
                    c.backend = "nccl"
        if c.device == "cuda" and c.backend != "nccl" and pipelined and c.workers > 1:
            raise ValueError(f"{c.algo} on CUDA needs NCCL, i.e. one GPU per worker; use "
                             f"--workers {torch_gpus()} or --device cpu")
        if c.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {c.backend!r}")
        if c.trace:
            check_writable(c.trace, "--trace")
        if pipelined and c.batch_size % c.microbatches:
            raise ValueError(f"--batch-size {c.batch_size} does not split into "
                             f"{c.microbatches} equal micro-batches; make it a multiple")
        return c


@dataclass
class RunResult:
    """What :func:`run` returns: the JSON summary, the merged trace and the
    trained net's ``state_dict`` (None after a failure)."""

    summary: dict[str, Any]
    trace: Any = None
    state_dict: dict[str, Any] | None = None


def torch_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _check_cpus(cpus: Any) -> list[int]:
    """``cpus`` as a sorted list of distinct CPU ids this process may use."""
    try:
        ids = sorted({int(x) for x in cpus})
    except (TypeError, ValueError):
        raise ValueError(f"--cpus must be CPU ids like 0,1, got {cpus!r}") from None
    if not ids:
        raise ValueError("--cpus names no CPU; give ids like 0,1 or leave it out")
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpus needs sched_setaffinity (Linux); leave it out on this system")
    allowed = os.sched_getaffinity(0)
    bad = [i for i in ids if i not in allowed]
    if bad:
        raise ValueError(f"--cpus names CPU(s) {bad} that this process may not use; "
                         f"choose among {sorted(allowed)}")
    return ids


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its env variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


# ------------------------------------------------------------ the launcher
def run(cfg: RunConfig) -> RunResult:
    """Run ``cfg`` with one process per rank on this host (see the module docstring).

    Raises ``ValueError``/``FileNotFoundError`` on bad input before any rank
    starts, :class:`~bpsim.algorithms.base.DivergenceError` (a ``ValueError``,
    with the partial ``result``) when training diverged on a rank,
    :class:`RunFailed` when a rank fails otherwise, ``KeyboardInterrupt`` on
    Ctrl-C and :class:`RunStopped` on SIGTERM (each after stopping the ranks
    and writing the trace recorded so far).
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from bpsim import data
    from bpsim.algorithms.base import DivergenceError
    from bpsim.runtime import worker

    cfg = cfg.resolved()
    desc = data.describe(cfg.data)
    train, test = data.load(cfg.data, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
    if cfg.batch_size > len(train):
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training set "
                         f"({len(train)} examples); lower --batch-size")
    net, trainer = worker.build(cfg, desc.input_shape, desc.n_classes, desc.task)
    if cfg.host.strip() in ("0.0.0.0", "::"):
        print(f"bpsim run: warning: --host {cfg.host} binds every interface: the rendezvous "
              "(and the ranks' links) can be reached from the network; use 127.0.0.1 on one "
              "host", file=sys.stderr)
    clean_stale_spools()
    spool = tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-")
    procs: list[Any] = []
    listener = None
    restore = _on_sigterm()
    try:
        # Our own listening socket, bound to --host only (TCPStore alone would
        # listen on every interface), on a free port chosen by the OS.
        listener = _listen(cfg.host)
        port = listener.getsockname()[1]
        store = dist.TCPStore(cfg.host, port, None, True, timedelta(seconds=cfg.timeout),
                              wait_for_workers=False, master_listen_fd=listener.fileno())
        listener.detach()              # the store owns the socket now
        listener = None
        rdzv = worker.Rendezvous(cfg.host, port)
        ctx = mp.get_context("forkserver")
        # torch._dynamo: building a rank's first optimizer imports it (about
        # 2 s on a small CPU); preloaded, every rank of every run skips that.
        ctx.set_forkserver_preload(["bpsim.runtime.worker", "torch._dynamo"])
        # Small training sets travel to the ranks in shared memory; large ones
        # are loaded by each rank (/dev/shm is often small in containers).
        tensors = (train.tensors[0], train.tensors[1])
        if sum(t.numel() * t.element_size() for t in tensors) > 16 * 2**20:
            tensors = None
        for rank in range(cfg.workers):
            p = ctx.Process(target=worker.entry, name=f"bpsim-rank{rank}",
                            args=(rank, cfg, rdzv, spool, tensors, os.getpid(),
                                  worker.forwarded_env()))
            p.start()
            procs.append(p)
        failure, stop = _watch(procs, spool)
        del store                      # the ranks are gone; close the rendezvous
        res = _finish(cfg, spool, net, trainer, test, failure)
        if isinstance(stop, KeyboardInterrupt):
            raise KeyboardInterrupt
        if stop is not None:
            raise RunStopped(_stopped_text(cfg), 143, res)
        if failure is not None:
            rank, err = failure
            if _diverged(spool, rank):     # bad settings, not a broken run: as bpsim train
                e = DivergenceError(f"rank {rank} failed: {err}")
                e.result = res             # type: ignore[attr-defined]
                raise e
            raise RunFailed(f"rank {rank} failed: {err}", rank, err, res)
        return res
    except _Terminate:                 # SIGTERM before the ranks ran or while finishing
        _stop(procs)
        raise RunStopped(_stopped_text(cfg), 143) from None
    finally:
        _stop(procs)
        shutil.rmtree(spool, ignore_errors=True)
        if listener is not None:
            listener.close()
        restore()


def _diverged(spool: str, rank: int) -> bool:
    """Whether rank ``rank`` stopped because training diverged."""
    try:
        return bool(json.loads((Path(spool) / f"rank{rank}.error.json").read_text())
                    .get("divergence"))
    except (OSError, ValueError):
        return False


def _stopped_text(cfg: RunConfig) -> str:
    kept = f"; the trace recorded so far is in {cfg.trace}" if cfg.trace else ""
    return f"stopped by SIGTERM: every rank was stopped{kept}"


def _on_sigterm() -> Any:
    """Make SIGTERM raise :class:`_Terminate` in this (main) thread, once;
    returns a function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM waits for the first
        raise _Terminate()

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def clean_stale_spools(folder: str | None = None) -> list[str]:
    """Remove the spool folders of launchers that are gone (killed with
    SIGKILL, say); returns the folders removed. A spool's name carries its
    launcher's pid (:data:`SPOOL_PREFIX`), so live runs are left alone."""
    from bpsim.runtime.record import process_gone

    removed = []
    for d in Path(folder or tempfile.gettempdir()).glob(f"{SPOOL_PREFIX}*"):
        pid = d.name[len(SPOOL_PREFIX):].split("-")[0]
        if not pid.isdigit() or not d.is_dir() or not process_gone(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    return removed


def _listen(host: str) -> Any:
    import socket

    try:
        return socket.create_server((host, 0), backlog=128)
    except OSError as e:
        raise ValueError(f"cannot listen on --host {host!r} ({e}); give an address of this "
                         "machine, e.g. 127.0.0.1") from None


def _watch(procs: list[Any], spool: str, grace: float = 0.5
           ) -> tuple[tuple[int, str] | None, BaseException | None]:
    """Wait for every rank; on the first failure stop the rest. Returns
    ``(failure, stop)`` with ``failure = (rank, one-line error)`` and ``stop``
    the ``KeyboardInterrupt`` or SIGTERM that ended the wait (else None)."""
    from multiprocessing.connection import wait

    alive = {p.sentinel: (r, p) for r, p in enumerate(procs)}
    failed: dict[int, float] = {}
    try:
        while alive:
            ready = wait(list(alive), timeout=1.0)
            for s in ready:
                r, p = alive.pop(s)
                p.join()
                if p.exitcode != 0:
                    failed[r] = time.time()
            if failed:
                deadline = time.monotonic() + grace      # let concurrent failures land
                while alive and time.monotonic() < deadline:
                    for s in wait(list(alive), timeout=max(0.0, deadline - time.monotonic())):
                        r, p = alive.pop(s)
                        p.join()
                        if p.exitcode != 0:
                            failed.setdefault(r, time.time())
                break
    except (KeyboardInterrupt, _Terminate) as e:
        _stop(procs)
        return None, e
    if not failed:
        return None, None
    _stop(procs)
    return _root_cause(procs, failed, spool), None


def _root_cause(procs: list[Any], failed: dict[int, float], spool: str) -> tuple[int, str]:
    """The rank whose failure explains the others (see the module docstring)."""
    cands = []
    for r, seen in failed.items():
        code = procs[r].exitcode
        path = Path(spool) / f"rank{r}.error.json"
        rec = None
        if path.exists():
            try:
                rec = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                rec = None
        if rec is not None and rec.get("terminated"):
            continue
        if rec is None:
            if code is not None and code < 0:
                try:
                    name = signal.Signals(-code).name
                except ValueError:
                    name = f"signal {-code}"
                err = f"killed by {name}"
            else:
                err = f"exited with code {code} without reporting an error"
            cands.append((0, seen, r, err))
        else:
            step = rec.get("step")
            where = f" (after {step} steps)" if rec.get("phase") == "train" else (
                f" (during {rec.get('phase')})" if rec.get("phase") else "")
            if rec.get("divergence"):        # its message says where already
                where = ""
            cands.append((1 if rec.get("secondary") else 0, rec.get("time", seen), r,
                          rec["error"] + where))
    if not cands:
        r = min(failed, key=failed.get)
        return r, f"exited with code {procs[r].exitcode}"
    cands.sort()
    _, _, r, err = cands[0]
    return r, err


def _stop(procs: Sequence[Any], grace: float = 3.0) -> None:
    """SIGTERM every live rank, SIGKILL what is left after ``grace`` seconds."""
    live = [p for p in procs if p.pid is not None and p.exitcode is None]
    for p in live:
        try:
            p.terminate()
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + grace
    for p in live:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in live:
        if p.exitcode is None:
            try:
                p.kill()
            except (OSError, ValueError):
                pass
            p.join(timeout=5.0)


# ------------------------------------------------------------- the results
def _load_results(spool: str) -> tuple[dict[int, dict[str, Any]], dict[int, Any]]:
    import torch

    results, weights = {}, {}
    for p in sorted(Path(spool).glob("rank*.result.json")):
        r = json.loads(p.read_text())
        results[int(r["rank"])] = r
        wp = Path(spool) / f"rank{r['rank']}.weights.pt"
        if wp.exists():
            weights.update(torch.load(wp, map_location="cpu", weights_only=True))
    return results, weights


def _finish(cfg: RunConfig, spool: str, net: Any, trainer: Any, test: Any,
            failure: tuple[int, str] | None) -> RunResult:
    from bpsim.runtime.record import merge_spool, read_spool

    results, weights = _load_results(spool)
    rows = read_spool(spool) if cfg.record else []
    return summarize(cfg, results, weights, rows, net, trainer, test, failure,
                     trace_of=lambda meta: merge_spool(spool, meta))


def summarize(cfg: RunConfig, results: dict[int, dict[str, Any]], weights: dict[int, Any],
              rows: list, net: Any, trainer: Any, test: Any,
              failure: tuple[int, str] | None, trace_of: Any) -> RunResult:
    """Merge per-rank results into the run's summary, trace and weights."""
    meta = _meta(cfg, results)
    trace = trace_of(meta) if cfg.record else None
    if trace is not None:
        if cfg.trace:
            trace.save(cfg.trace)
    done = failure is None and len(results) == cfg.workers
    t0 = min((r["t_start"] for r in results.values()), default=0.0)
    t1 = max((r["t_end"] for r in results.values()), default=0.0)
    if not done and trace is not None and len(trace):
        t0, t1 = min(t0, trace.start), max(t1, trace.end)
    wall = max(t1 - t0, 1e-12)
    samples = max((r["samples"] for r in results.values()), default=0)
    per_rank = []
    busy = _busy(trace) if trace is not None else {}
    for rank in range(cfg.workers):
        r = results.get(rank)
        ups = sum(r["updates"].values()) if r else None
        own = (r["t_end"] - r["t_start"]) if r else None
        per_rank.append({
            "rank": rank, "blocks": r["blocks"] if r else ([rank + 1] if cfg.workers > 1
                                                            else list(range(1, cfg.blocks + 1))),
            "updates": ups, "updates_per_s": (ups / own) if r and own and own > 0 else None,
            "busy": busy.get(rank), "busy_fraction": (busy[rank] / wall) if rank in busy else None,
            "threads": cfg.threads, "pid": r["pid"] if r else None,
            "affinity": r.get("affinity") if r else None,
            "clock": r["clock"] if r else None,
        })
    last = results.get(cfg.workers - 1)
    window = last["steps_per_epoch"] if last else 1
    losses = {}
    for r in results.values():
        for b, ls in r["losses"].items():
            losses[int(b)] = ls
    local = [(_mean(losses[b][-window:]) if losses.get(b) else None) for b in range(1, cfg.blocks + 1)]
    summary: dict[str, Any] = {
        "algorithm": cfg.algo, "workers": cfg.workers, "blocks": cfg.blocks,
        "device": cfg.device, "backend": cfg.backend, "threads": cfg.threads,
        "cpus": cfg.cpus, "data": cfg.data, "model": cfg.model, "batch_size": cfg.batch_size,
        "steps": cfg.steps, "samples": samples, "wall_time": wall if results else None,
        "throughput": samples / wall if done else None,
        "steps_per_s": cfg.steps / wall if done else None,
        "busy_fraction": [p["busy_fraction"] for p in per_rank],
        "per_rank": per_rank,
        "train_loss": next((v for v in reversed(local) if v is not None), None),
        "local_losses": local,
        "test_accuracy": None, "test_loss": None,
        "slowdown": {str(k): v for k, v in cfg.slowdown.items()},
        "trace": cfg.trace if (trace is not None and cfg.trace) else None,
        "ok": done,
    }
    if cfg.microbatches is not None:
        summary["microbatches"] = cfg.microbatches
    bufs = {b: s for r in results.values() for b, s in r.get("buffers", {}).items()}
    if bufs:
        summary["buffers"] = bufs
    if failure is not None:
        summary["failed_rank"], summary["error"] = failure
    if trace is not None:
        try:
            trace.check()
        except ValueError as e:
            summary["trace_warning"] = str(e)
    state = None
    if done and len(weights) == cfg.blocks:
        for b, w in weights.items():
            net.blocks[int(b) - 1].load_state_dict(w["block"])
            if "head" in w and net.heads is not None:
                net.heads[int(b) - 1].load_state_dict(w["head"])
            if "output" in w and net.output is not None:
                net.output.load_state_dict(w["output"])
        state = net.state_dict()
        if cfg.evaluate and test is not None:
            acc, loss = trainer.evaluate(test)
            summary["test_accuracy"], summary["test_loss"] = acc, loss
    return RunResult(summary=json_safe(summary), trace=trace, state_dict=state)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _busy(trace: Any) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in trace.rows:
        if r[1] == "compute" and r[2] != "wait":
            out[r[0]] = out.get(r[0], 0.0) + (r[7] - r[6])
    return out


def _meta(cfg: RunConfig, results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The trace's meta: everything needed to simulate the run again
    (``bpsim.sim.simulate_like``), every option resolved."""
    placement = list(range(cfg.blocks)) if cfg.workers > 1 else [0] * cfg.blocks
    per_epoch = next((r["steps_per_epoch"] for r in results.values()), None)
    meta = {
        "source": "bpsim.runtime", "algo": cfg.algo, "workers": cfg.workers,
        "blocks": cfg.blocks, "steps": cfg.steps, "steps_per_epoch": per_epoch,
        "batch_size": cfg.batch_size,
        "microbatches": cfg.microbatches if cfg.microbatches is not None else 1,
        "buffer": cfg.buffer if cfg.buffer is not None else methods.DEFAULTS["buffer"],
        "max_reuse": cfg.max_reuse,
        "device": cfg.device, "backend": cfg.backend,
        "threads": cfg.threads, "cpus": cfg.cpus, "data": cfg.data, "model": cfg.model,
        "width": cfg.width, "depth": cfg.depth, "seed": cfg.seed,
        "slowdown": {str(b): s for b, s in cfg.slowdown.items()},   # by block, as the simulator
        "placement": placement,
        "clock": {str(r): res["clock"] for r, res in sorted(results.items())},
        "options": dict(cfg.options),
    }
    if cfg.buffer is not None:       # a method with replay buffers: every read, in order
        reads: dict[str, list] = {}
        misses: dict[str, int] = {}
        for r in results.values():
            reads.update(r.get("buffer_reads", {}))
            misses.update(r.get("buffer_misses", {}))
        meta["buffer_reads"] = {str(b): reads.get(str(b), []) for b in range(2, cfg.blocks + 1)}
        meta["buffer_misses"] = {str(b): misses.get(str(b), 0) for b in range(2, cfg.blocks + 1)}
        # the batch whose labels each update of each block trained on
        meta["label_batches"] = {b: v for r in results.values()
                                 for b, v in r.get("label_batches", {}).items()}
    return json_safe(meta)


# ------------------------------------------------------------- torchrun
def run_torchrun(cfg: RunConfig) -> RunResult | None:
    """Run this process's rank under ``torchrun``; rank 0 returns the result.

    ``--workers`` must equal torchrun's world size. Rank k computes on
    ``cuda:(LOCAL_RANK mod GPUs)`` with ``--device cuda``.
    """
    import torch.distributed as dist

    from bpsim import data
    from bpsim.runtime import worker

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if cfg.workers != world:
        raise ValueError(f"--workers {cfg.workers} but torchrun started {world} processes; make "
                         "them equal (--nnodes x --nproc-per-node)")
    cfg = cfg.resolved()
    desc = data.describe(cfg.data)
    train, test = data.load(cfg.data, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
    net, trainer = worker.build(cfg, desc.input_shape, desc.n_classes, desc.task)
    if cfg.trace and rank == 0:
        check_writable(cfg.trace, "--trace")
    spool = Path(cfg.trace + ".parts") if cfg.trace else Path(tempfile.mkdtemp(prefix="bpsim-run-"))
    spool.mkdir(parents=True, exist_ok=True)
    status: dict[str, Any] = {"step": 0, "phase": "start"}
    signal.signal(signal.SIGTERM, worker._on_sigterm)
    try:
        result = worker.run_rank(rank, cfg, (train.tensors[0], train.tensors[1]), str(spool),
                                 None, local_rank=local_rank, status=status)
    except BaseException as e:  # noqa: BLE001
        worker._write_error(str(spool), rank, e, status,
                            terminated=isinstance(e, worker.Terminated))
        raise RunFailed(f"rank {rank} failed: {worker._error_record(rank, e, status)['error']}"
                        f" (its spans so far are in {spool})", rank, str(e)) from None
    from bpsim.runtime.record import merge_rows, read_spool

    own_rows = [r for r in read_spool(spool) if r[0] == rank] if cfg.record else []
    weights = result.pop("_weights")
    final = dist.new_group(backend="gloo", timeout=timedelta(hours=1))
    gathered: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object((result, own_rows, weights), gathered if rank == 0 else None, dst=0,
                       group=final)
    res = None
    if rank == 0:
        results = {g[0]["rank"]: g[0] for g in gathered}
        rows = [r for g in gathered for r in g[1]]
        all_w = {b: w for g in gathered for b, w in g[2].items()}

        def trace_of(meta: dict[str, Any]) -> Any:
            return merge_rows(rows, meta)

        res = summarize(cfg, results, all_w, rows, net, trainer, test, None, trace_of)
    dist.barrier(group=final)
    for f in spool.glob(f"rank{rank}.*"):      # the merged trace holds them now
        f.unlink(missing_ok=True)
    try:
        spool.rmdir()                            # the last rank out removes the folder
    except OSError:
        pass
    dist.destroy_process_group()
    return res
