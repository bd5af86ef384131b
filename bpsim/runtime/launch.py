"""Start a run: one process per rank on this host, watch them, gather the results.

:func:`run` is what ``bpsim run`` calls. It checks the configuration
(building the net and trainer once, so bad options fail fast with a clear
message), hosts the rendezvous (a ``TCPStore`` bound to ``127.0.0.1`` on a
free port by default; ``--host`` takes IPv4 and IPv6 addresses), starts the
ranks with ``torch.multiprocessing`` (``forkserver``: torch is imported
once, in the fork server) and waits.

Faults. The launcher watches every rank. When one exits with an error or is
killed, it stops the others (SIGTERM, then SIGKILL after a grace period),
writes the trace recorded so far and raises :class:`RunFailed` naming the
rank whose failure came first in time (a rank that fails *because* a peer
vanished is reported only when nothing else explains the failure; a rank
stopped by a SIGTERM that the launcher did not send is a failure of its
own). A fork server killed under the ranks is reported as such, and the
ranks it started are stopped by their pids. Ranks also time out on their
own (``--timeout``) if a peer stops sending, and end when the launcher
disappears.

Signals. Ctrl-C stops every rank the same way and re-raises
``KeyboardInterrupt`` after writing the partial trace; SIGTERM does the same
and raises :class:`RunStopped` (exit code 143). A second Ctrl-C or SIGTERM
while the run stops is absorbed, so the partial trace is still written and
every temporary is removed.

Temporaries. Every file and folder a run makes for itself carries the pid
of the process that made it: the spool folder (``bpsim-run-<pid>-*`` in the
temporary directory), the folder of the fork server's socket
(``bpsim-run-<pid>-mp-*``, instead of ``multiprocessing``'s ``pymp-*``) and
the folder a trace is written through (``.bpsim-run-<pid>-*`` beside it).
The run removes them; those of processes killed with SIGKILL are removed by
the next run (:func:`clean_stale_spools`).

Jobs started elsewhere. Under ``torchrun``, SLURM's ``srun`` or by hand
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
:func:`job_env`) there is no launcher of ours: each process runs one rank
(:func:`run_job`), and rank 0 gathers spans, results and weights at the
end and writes the trace and the summary. The ranks watch each other over
the job's store (heartbeats and failure records), so when a rank fails or
its process vanishes on one host, the ranks on the other hosts stop within
seconds instead of waiting for ``--timeout``, and every rank names the same
root cause. Their spans stay in ``<trace>.parts/``; ``bpsim trace merge``
turns the folders of all hosts into one trace.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

from bpsim import methods
from bpsim.files import check_writable, json_safe

__all__ = ["RunConfig", "RunResult", "RunFailed", "RunStopped", "ALGORITHMS", "BACKENDS", "run",
           "run_job", "run_torchrun", "JobEnv", "job_env", "under_torchrun", "SPOOL_PREFIX",
           "clean_stale_spools", "default_threads", "oversubscription", "hold_signals",
           "merge_parts", "save_trace"]

#: the methods ``bpsim run`` runs (those with a runtime step in :mod:`bpsim.methods`)
ALGORITHMS = methods.names(runtime=True)

#: what ``--backend`` accepts; ``auto`` picks NCCL for CUDA when every rank on this host has a GPU
BACKENDS = ("auto", "gloo", "nccl")

#: temporary folder of a run's spans and results: ``bpsim-run-<launcher pid>-<random>``
SPOOL_PREFIX = "bpsim-run-"

#: registry options that RunConfig also holds as fields of their own
_FIELDS = ("aux", "microbatches", "buffer", "max_reuse")

#: the variables that place a process in a job started elsewhere
_JOB_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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
    """A rank failed; ``rank`` and ``error`` say which and why (``rank`` is
    None when no rank is to blame, e.g. the fork server was killed)."""

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
    method does not take them).

    ``local_workers`` is the number of ranks on this host: ``workers`` with
    :func:`run`, ``LOCAL_WORLD_SIZE`` in a job started elsewhere
    (:func:`run_job`). ``threads`` defaults to :func:`default_threads` of
    the cores (``len(cpus)`` when given) and ``local_workers``. ``backend``
    is ``auto`` (None), ``gloo`` or ``nccl``; ``auto`` resolves to NCCL for
    ``device="cuda"`` when this host has a GPU for each of its ranks, else
    gloo.
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
    local_workers: int | None = None

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
        if not isinstance(c.host, str) or not c.host.strip().strip("[]"):
            raise ValueError(f"--host must name an address of this machine, e.g. 127.0.0.1; "
                             f"got {c.host!r}")
        c.host = c.host.strip().strip("[]")          # [::1] as in a URL: ::1
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
        if c.local_workers is None:
            c.local_workers = c.workers
        if isinstance(c.local_workers, bool) or not isinstance(c.local_workers, int) \
                or not 1 <= c.local_workers <= c.workers:
            raise ValueError(f"local_workers (ranks on this host) must be 1..{c.workers}, "
                             f"got {c.local_workers!r}")
        if c.threads is None:
            c.threads = default_threads(len(c.cpus) if c.cpus is not None else _cores(),
                                        c.local_workers)
        if isinstance(c.threads, bool) or not isinstance(c.threads, int) or c.threads < 1:
            raise ValueError(f"--threads must be an integer >= 1, got {c.threads!r}")
        c.backend = _resolve_backend(c, pipelined)
        if c.trace:
            check_writable(c.trace, "--trace")
        if pipelined and c.batch_size % c.microbatches:
            raise ValueError(f"--batch-size {c.batch_size} does not split into "
                             f"{c.microbatches} equal micro-batches; make it a multiple")
        return c


def _resolve_backend(c: RunConfig, pipelined: bool) -> str:
    """The backend of a resolved config (see :class:`RunConfig`).

    NCCL puts one rank on one GPU and cannot share a GPU between ranks, so
    ``auto`` asks whether *this host* has a GPU per rank on it (other hosts
    decide the same for theirs); gloo carries CUDA tensors through host
    memory.
    """
    b = "auto" if c.backend is None else c.backend
    if b not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {b!r}")
    if c.device == "cpu":
        if b == "nccl":
            raise ValueError("--backend nccl carries CUDA tensors only; use it with --device cuda, "
                             "or use --backend gloo (the default on CPU)")
        return "gloo"
    gpus = torch_gpus()
    if gpus == 0:
        raise ValueError("--device cuda but torch sees no GPU (or was built without CUDA); "
                         "use --device cpu")
    here = c.local_workers or c.workers
    enough = gpus >= here
    if b == "nccl":
        import torch.distributed as dist

        if not dist.is_nccl_available():
            raise ValueError("--backend nccl but this torch was built without NCCL; use "
                             "--backend gloo")
        if not enough:
            raise ValueError(f"--backend nccl needs one GPU per rank on this host: {here} "
                             f"rank(s) here, {gpus} GPU(s); start at most {gpus} rank(s) per "
                             "host or use --backend gloo")
    backend = "nccl" if b == "nccl" or (b == "auto" and enough) else "gloo"
    if backend != "nccl" and pipelined and c.workers > 1:
        fix = ("drop --backend gloo" if b == "gloo" else
               f"start at most {gpus} rank(s) on each host (torchrun --nproc-per-node {gpus})")
        raise ValueError(f"{c.algo} on CUDA needs NCCL between its ranks, i.e. one GPU per rank "
                         f"on each host ({here} rank(s) here, {gpus} GPU(s)); {fix}, or use "
                         "--device cpu")
    return backend


@dataclass
class RunResult:
    """What :func:`run` returns: the JSON summary, the merged trace and the
    trained net's ``state_dict`` (None after a failure)."""

    summary: dict[str, Any]
    trace: Any = None
    state_dict: dict[str, Any] | None = None


def torch_gpus() -> int:
    """The number of CUDA devices torch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


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


def _idle_cores() -> float:
    """Cores of this machine not already busy, by the 1-minute load average."""
    total = os.cpu_count() or _cores()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return float(total)
    return max(0.0, total - load)


def default_threads(cores: int, ranks_here: int) -> int:
    """Torch threads per rank that do not oversubscribe this machine.

    The cores this process may use (``cores``), less those the 1-minute
    load average says are busy, shared among the ``ranks_here`` ranks on
    this host; at least 1. A torch thread that waits for a busy core stalls
    every other thread of its op, so on a loaded machine one thread per rank
    is far faster than two.
    """
    usable = min(float(cores), _idle_cores())
    return max(1, int(usable + 0.5) // max(1, ranks_here))


def oversubscription(cfg: RunConfig) -> str | None:
    """A one-line warning when the threads of the ranks on this host exceed
    its cores (``cfg`` resolved), else None."""
    cores = len(cfg.cpus) if cfg.cpus is not None else _cores()
    here = cfg.local_workers or cfg.workers
    want = here * (cfg.threads or 1)
    if want <= cores:
        return None
    return (f"{here} rank(s) x {cfg.threads} torch thread(s) = {want} threads on {cores} core(s) "
            "oversubscribe them: a thread waiting for a core stalls its op, and steps can be many "
            f"times slower; use --threads {max(1, cores // here)} or fewer ranks per host")


@dataclass(frozen=True)
class JobEnv:
    """This process's place in a job started by torchrun, srun or by hand."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    addr: str
    port: int
    launcher: str          # "torchrun", "srun" or "environment"


def _env_int(env: Any, name: str, lo: int, hi: int | None = None) -> int:
    text = env.get(name, "").strip()
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or v < lo or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={text!r} must be an integer {rng}; fix the job script that "
                         "sets it")
    return v


def _leading_int(text: str | None) -> int | None:
    """``2`` of SLURM's ``2(x3)`` or ``2,1``; None when ``text`` does not start with one."""
    digits = ""
    for ch in (text or "").strip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def job_env(env: Any = None) -> JobEnv | None:
    """Where this process stands in a job started elsewhere, or None.

    None when neither ``RANK`` nor ``WORLD_SIZE`` is set (``bpsim run``
    then starts every rank itself). When either is set, ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` must all be
    (``ValueError`` naming the missing ones otherwise). The rank on this
    host is ``LOCAL_RANK`` (torchrun), else ``SLURM_LOCALID`` (srun), else
    0; the number of ranks on this host is ``LOCAL_WORLD_SIZE``, else
    ``SLURM_NTASKS_PER_NODE``, else 1 (one rank per host).
    """
    env = os.environ if env is None else env
    if not (env.get("RANK", "").strip() or env.get("WORLD_SIZE", "").strip()):
        return None
    missing = [k for k in _JOB_VARS if not env.get(k, "").strip()]
    if missing:
        have = [k for k in _JOB_VARS if k not in missing]
        raise ValueError(f"{', '.join(have)} set but {', '.join(missing)} not: a job started by "
                         "hand or by a scheduler needs RANK, WORLD_SIZE, MASTER_ADDR and "
                         "MASTER_PORT (rank 0's address and a free port on it); set the missing "
                         "ones, or unset RANK and WORLD_SIZE to start every rank on this host")
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0, world - 1)
    port = _env_int(env, "MASTER_PORT", 1, 65535)
    if env.get("LOCAL_RANK", "").strip():
        local_rank = _env_int(env, "LOCAL_RANK", 0)
    elif env.get("SLURM_LOCALID", "").strip():
        local_rank = _env_int(env, "SLURM_LOCALID", 0)
    else:
        local_rank = 0
    if env.get("LOCAL_WORLD_SIZE", "").strip():
        local_world = _env_int(env, "LOCAL_WORLD_SIZE", 1, world)
    else:
        local_world = min(world, _leading_int(env.get("SLURM_NTASKS_PER_NODE")) or 1)
    local_world = max(local_world, min(local_rank + 1, world))
    launcher = ("torchrun" if env.get("TORCHELASTIC_RUN_ID") else
                "srun" if env.get("SLURM_PROCID") else "environment")
    return JobEnv(rank, world, local_rank, min(local_world, world), env["MASTER_ADDR"].strip(),
                  port, launcher)


def under_torchrun() -> bool:
    """Whether this process is one rank of a job started elsewhere (torchrun,
    srun or by hand; see :func:`job_env`, which raises on a partial set of
    variables)."""
    return job_env() is not None


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
    warn = oversubscription(cfg)
    if warn:
        print(f"bpsim run: warning: {warn}", file=sys.stderr)
    clean_stale_spools()
    if cfg.trace:
        clean_stale_spools(str(Path(cfg.trace).absolute().parent))
    procs: list[Any] = []
    listener = None
    spool = None
    restore = _catch_signals()
    try:
        _own_mp_tempdir()
        with _signals_deferred():
            spool = tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-")
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
            if rank is not None and _diverged(spool, rank):   # bad settings: as bpsim train
                e = DivergenceError(f"rank {rank} failed: {err}")
                e.result = res             # type: ignore[attr-defined]
                raise e
            raise RunFailed(err if rank is None else f"rank {rank} failed: {err}", rank, err, res)
        _check_final_state(cfg, trainer, train, res)
        return res
    except _Terminate:                 # SIGTERM before the ranks ran or while finishing
        _stop(procs)
        raise RunStopped(_stopped_text(cfg, written=False), 143) from None
    finally:
        _stop(procs)
        if spool is not None:
            shutil.rmtree(spool, ignore_errors=True)
        if listener is not None:
            try:
                listener.close()
            except OSError:            # the store took the socket before the stop
                pass
        restore()


def _check_final_state(cfg: RunConfig, trainer: Any, train: Any, res: RunResult) -> None:
    """``DivergenceError`` when the gathered weights of a finished run are not
    finite or give a non-finite loss on a training minibatch: the last update
    can spoil them without a loss of the run to show it."""
    if res.state_dict is not None:
        n = cfg.batch_size
        trainer.check_final_state(f"after step {cfg.steps}", train.tensors[0][:n],
                                  train.tensors[1][:n])


def _diverged(spool: str, rank: int) -> bool:
    """Whether rank ``rank`` stopped because training diverged."""
    rec = _read_record(Path(spool) / f"rank{rank}.error.json")
    return bool(rec and rec.get("divergence"))


def _read_record(path: Path) -> dict[str, Any] | None:
    """A rank's JSON record (error or result), or None when missing or cut short."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _stopped_text(cfg: RunConfig, written: bool = True) -> str:
    kept = f"; the trace recorded so far is in {cfg.trace}" if cfg.trace and written else ""
    return f"stopped by SIGTERM: every rank was stopped{kept}"


# ---------------------------------------------------------------- signals
_stopping = False     # a stop signal reached this process: later ones are absorbed


def _ignore_stop_signals() -> None:
    """This process is stopping: SIGTERM and SIGINT are ignored by the kernel
    from here on (a Python handler would be reset to the default at
    interpreter shutdown, where a late signal would still kill)."""
    global _stopping
    _stopping = True
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)


def _on_signal(signum: int, frame: Any) -> None:
    if _stopping:                      # a second signal while stopping: absorbed
        return
    _ignore_stop_signals()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Terminate()


def _catch_signals() -> Callable[[], None]:
    """Make the first SIGTERM raise :class:`_Terminate` and the first SIGINT
    ``KeyboardInterrupt`` in this (main) thread, and absorb later ones;
    returns a function that puts the previous handlers back."""
    global _stopping
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _stopping = False
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        if _stopping and _on_signal in old.values():
            return                     # the command ends after this stop: keep ignoring
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)

    return restore


def hold_signals() -> None:
    """For a command whose process ends after the run: until it exits, the
    first SIGTERM raises :class:`_Terminate` and the first SIGINT
    ``KeyboardInterrupt``, and every signal after the first is ignored, so
    that the cleanup after a stop (the trace, the temporaries, the exit
    handlers of ``multiprocessing``, the interpreter's shutdown) runs to its
    end. (A library caller's handlers are put back after :func:`run`.)"""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, _on_signal)


# ------------------------------------------------------------ temporaries
@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back (in this thread) while a temporary is made
    and registered for removal, so a stop cannot fall between the two."""
    held = {signal.SIGTERM, signal.SIGINT}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _own_mp_tempdir() -> None:
    """Give ``multiprocessing`` (the fork server's socket) a temporary folder
    named with this process's pid, which :func:`clean_stale_spools` removes
    when the process was killed; ``pymp-*`` would stay forever."""
    import multiprocessing.process as mp_process
    import multiprocessing.util as mp_util

    config = mp_process.current_process()._config    # what mp's get_temp_dir reads
    with _signals_deferred():
        if config.get("tempdir") is None:
            folder = tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-mp-", dir=_mp_base())
            mp_util.Finalize(None, shutil.rmtree, args=(folder,),
                             kwargs={"ignore_errors": True}, exitpriority=-100)
            config["tempdir"] = folder


#: a Unix socket's path holds at most 107 bytes; the fork server's socket is
#: ``<base>/bpsim-run-<pid>-mp-<8 random>/listener-<8 random>``, about 50 past the base
_SHORT_TMP = "/tmp"


def _mp_base() -> str:
    """The folder for the fork server's socket folder: the temporary
    directory, or ``/tmp`` when that is too long a path for a socket."""
    base = tempfile.gettempdir()
    if len(os.fsencode(base)) > 50 and os.access(_SHORT_TMP, os.W_OK | os.X_OK):
        return _SHORT_TMP
    return base


def clean_stale_spools(folder: str | None = None) -> list[str]:
    """Remove the temporaries of bpsim processes that are gone (killed with
    SIGKILL, say) from ``folder`` (default: the temporary directory); returns
    the paths removed. Each name carries its maker's pid (``bpsim-run-<pid>-*``,
    or ``.bpsim-run-<pid>-*`` beside a trace), so live runs are left alone."""
    from bpsim.runtime.record import process_gone

    removed = []
    bases = {Path(folder)} if folder else {Path(tempfile.gettempdir()), Path(_mp_base())}
    for d in sorted(d for base in bases for pattern in (f"{SPOOL_PREFIX}*", f".{SPOOL_PREFIX}*")
                    for d in base.glob(pattern)):
        pid = d.name.lstrip(".")[len(SPOOL_PREFIX):].split("-")[0]
        if not pid.isdigit() or not d.is_dir() or d.is_symlink() or not process_gone(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    return removed


def save_trace(trace: Any, path: str | os.PathLike[str]) -> None:
    """Write ``trace`` to ``path`` through a folder beside it whose name holds
    this process's pid (``.bpsim-run-<pid>-*``), then rename it into place:
    a write cut short by SIGKILL leaves only that folder, which the next
    run writing there removes (:func:`clean_stale_spools`)."""
    target = Path(path)
    folder = target.absolute().parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with _signals_deferred():
            tmp = tempfile.mkdtemp(prefix=f".{SPOOL_PREFIX}{os.getpid()}-", dir=folder)
        inner = Path(tmp) / target.name
        trace.save(inner)
        os.replace(inner, target)
    except (OSError, ValueError) as e:   # a full or failing disk: name the user's path
        why = e.strerror if isinstance(e, OSError) and e.strerror else "the disk refused it"
        if isinstance(e, ValueError) and "no space" in str(e):
            why = "no space left on its file system"
        raise ValueError(f"--trace {path} could not be written ({why}); the old file, if any, "
                         "is unchanged; free some space or choose another place") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _listen(host: str) -> Any:
    h = host.strip().strip("[]")
    family = socket.AF_INET6 if ":" in h else socket.AF_INET
    try:
        return socket.create_server((h, 0), family=family, backlog=128)
    except OSError as e:
        raise ValueError(f"cannot listen on --host {host!r} ({e}); give an address of this "
                         "machine, e.g. 127.0.0.1 or ::1") from None


# ------------------------------------------------------------- the ranks
def _watch(procs: list[Any], spool: str, grace: float = 0.5
           ) -> tuple[tuple[int | None, str] | None, BaseException | None]:
    """Wait for every rank; on the first failure stop the rest. Returns
    ``(failure, stop)`` with ``failure = (rank or None, one-line error)``
    and ``stop`` the ``KeyboardInterrupt`` or SIGTERM that ended the wait
    (else None)."""
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
    server = None
    if any(procs[r].exitcode == 255 for r in failed):   # what a lost fork server reads as
        deadline = time.monotonic() + 2.0                 # its exit may still be under way
        while server is None and time.monotonic() < deadline:
            server = _fork_server_gone()
            time.sleep(0.05)
    if server is not None:
        _stop_pids([p.pid for p in procs if p.pid is not None])
        return (None, f"the fork server that starts the ranks (pid {server}) ended while they "
                      "ran (killed?); every rank was stopped; run again"), None
    _stop(procs)
    return _root_cause(procs, failed, spool), None


def _fork_server_gone() -> int | None:
    """The pid of this process's fork server when it has ended, else None.
    (Its ranks' exit codes then read 255: the fork server reports them.)"""
    from multiprocessing import forkserver

    from bpsim.runtime.record import process_gone

    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    return pid if pid is not None and process_gone(pid) else None


def _stop_pids(pids: Sequence[int], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, processes that are not
    our children (ranks whose fork server is gone)."""
    from bpsim.runtime.record import process_gone

    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        live = [p for p in pids if not process_gone(p)]
        for p in live:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while live and time.monotonic() < deadline:
            time.sleep(0.05)
            live = [p for p in live if not process_gone(p)]
        if not live:
            return


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def _root_cause(procs: list[Any], failed: dict[int, float], spool: str) -> tuple[int, str]:
    """The rank whose failure came first and explains the others.

    ``failed`` holds the ranks that ended with an error *before* the
    launcher stopped anyone (rank -> when the launcher saw it). A rank that
    reported an error of its own comes first, by the time it recorded;
    then one that was killed without a word (by the time it was seen); a
    rank whose error is a consequence of a peer's loss (a closed link, a
    timeout) only when nothing else is there. A rank that was stopped by
    SIGTERM here was stopped from outside: the launcher had sent none.
    """
    cands = []
    for r, seen in failed.items():
        code = procs[r].exitcode
        rec = _read_record(Path(spool) / f"rank{r}.error.json")
        if rec is None:
            err = (f"killed by {_signal_name(-code)}" if code is not None and code < 0 else
                   f"exited with code {code} without reporting an error")
            cands.append((0, seen, r, err))
        elif rec.get("terminated"):
            step = rec.get("step")
            where = f" after {step} steps" if rec.get("phase") == "train" else ""
            cands.append((0, rec.get("time", seen), r,
                          f"stopped by a SIGTERM from outside the run{where} (kill, a scheduler)"))
        else:
            step = rec.get("step")
            where = f" (after {step} steps)" if rec.get("phase") == "train" else (
                f" (during {rec.get('phase')})" if rec.get("phase") else "")
            if rec.get("divergence"):        # its message says where already
                where = ""
            cands.append((1 if rec.get("secondary") else 0, rec.get("time", seen), r,
                          str(rec.get("error")) + where))
    cands.sort(key=lambda c: (c[0], c[1], c[2]))
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
              failure: tuple[int | None, str] | None, trace_of: Any) -> RunResult:
    """Merge per-rank results into the run's summary, trace and weights."""
    meta = _meta(cfg, results)
    trace = trace_of(meta) if cfg.record else None
    trace_error = None
    if trace is not None and cfg.trace:
        try:
            save_trace(trace, cfg.trace)
        except ValueError as e:        # the disk filled during the write: keep the summary
            trace_error = str(e)
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
        "trace": cfg.trace if (trace is not None and cfg.trace and trace_error is None) else None,
        "ok": done,
    }
    if cfg.microbatches is not None:
        summary["microbatches"] = cfg.microbatches
    bufs = {b: s for r in results.values() for b, s in r.get("buffers", {}).items()}
    if bufs:
        summary["buffers"] = bufs
    if failure is not None:
        summary["failed_rank"], summary["error"] = failure
    if trace_error is not None:
        summary["trace_error"] = trace_error
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


# ------------------------------------------------- jobs started elsewhere
class _JobWatch:
    """The ranks of a job watching each other over the job's store.

    A thread beats (``beat/<rank>``, every ``beat`` seconds) and reads the
    other ranks' beats. This rank is stopped (SIGTERM to itself, then, if
    its main thread is stuck in a collective, the process ends after
    ``grace`` seconds with its partial trace written) when another rank
    posted a failure (``abort``), when a peer's beat stood still for
    ``stale`` seconds (its process or host is gone), or when the store stops
    answering (the process hosting it ended). Failures are recorded as
    ``fail/<rank>`` with the time they happened, so every rank can name the
    one that failed first (:meth:`blame`).
    """

    def __init__(self, job: JobEnv, prefix: str, beat: float = 0.5, stale: float = 5.0,
                 grace: float = 3.0, on_give_up: Callable[[], None] | None = None) -> None:
        import torch.distributed as dist

        self.job, self.beat, self.stale, self.grace = job, beat, stale, grace
        self.on_give_up = on_give_up
        self.store = dist.PrefixStore(prefix, dist.TCPStore(
            job.addr, job.port, is_master=False, timeout=timedelta(seconds=10)))
        self.lock = threading.Lock()
        self.cause: str | None = None           # why the watch stopped this rank
        self.vanished: dict[int, float] = {}    # peer -> when its beat was found stale
        self.reported = threading.Event()
        self._end = threading.Event()
        self._store_set("pid/" + str(job.rank), f"{socket.gethostname()} {os.getpid()}")
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bpsim-jobwatch")
        self._thread.start()

    def _store_set(self, key: str, value: str) -> bool:
        try:
            with self.lock:
                self.store.set(key, value)
            return True
        except Exception:  # noqa: BLE001 - the store may be gone
            return False

    def _store_get(self, key: str) -> str | None:
        try:
            with self.lock:
                if not self.store.check([key]):
                    return None
                return self.store.get(key).decode()
        except Exception:  # noqa: BLE001
            return None

    def _loop(self) -> None:
        me, peers = self.job.rank, [r for r in range(self.job.world) if r != self.job.rank]
        last: dict[int, tuple[int, float]] = {}
        while not self._end.wait(self.beat):
            try:
                with self.lock:
                    self.store.add(f"beat/{me}", 1)
                    abort = self.store.get("abort").decode() if self.store.check(["abort"]) \
                        else None
                    beats = {p: self.store.add(f"beat/{p}", 0) for p in peers}
            except Exception as e:  # noqa: BLE001 - the store is gone
                if not self._end.is_set():
                    self._trip(f"the job's store at {self.job.addr}:{self.job.port} stopped "
                               f"answering ({' '.join(str(e).split())[:120]}): the process "
                               "hosting it (rank 0, or torchrun on the first host) has ended")
                return
            if abort is not None:
                self._trip(abort)
                return
            now = time.monotonic()
            for p, n in beats.items():
                prev = last.get(p)
                if prev is None or prev[0] != n:
                    last[p] = (n, now)
                elif n > 0 and now - prev[1] >= self.stale:
                    if self._store_get(f"done/{p}") is not None:
                        last[p] = (n, float("inf"))      # finished its part: not judged
                        continue
                    self.vanished[p] = time.time() - self.stale
                    cause = (f"rank {p} stopped answering for {self.stale:.0f} s (its process "
                             "or its host is gone)")
                    self._store_set("abort", cause)
                    self._trip(cause)
                    return

    def _trip(self, cause: str) -> None:
        """Stop this rank: SIGTERM to itself, the hard way if that does not work."""
        with self.lock:
            if self._end.is_set():
                return
            self.cause = cause
            os.kill(os.getpid(), signal.SIGTERM)
        if not self.reported.wait(self.grace) and not self._end.is_set():
            if self.on_give_up is not None:      # the main thread is stuck in a collective
                try:
                    self.on_give_up()
                finally:
                    os._exit(1)
            os._exit(1)

    def fail(self, record: dict[str, Any]) -> None:
        """Post this rank's failure (and, unless the watch stopped it, ``abort``)."""
        self._store_set(f"fail/{self.job.rank}", json.dumps(record))
        if self.cause is None:
            self._store_set("abort", f"rank {self.job.rank} failed: {record.get('error')}")

    def blame(self, own: dict[str, Any]) -> tuple[int, str]:
        """The rank whose failure came first, by the same rules as
        :func:`_root_cause`, from the records posted and the peers that
        vanished (a peer on this host whose process is gone, or whose beat
        stood still)."""
        from bpsim.runtime.record import process_gone

        host = socket.gethostname()
        cands = []
        for r in range(self.job.world):
            rec = own if r == self.job.rank else None
            if rec is None:
                text = self._store_get(f"fail/{r}")
                try:
                    rec = json.loads(text) if text else None
                except ValueError:
                    rec = None
            if rec is not None:
                if rec.get("watch"):
                    continue                    # stopped by its watch: a consequence
                step = rec.get("step")
                where = f" (after {step} steps)" if rec.get("phase") == "train" else ""
                if rec.get("terminated"):
                    how = str(rec.get("error")).removeprefix("Terminated: ")
                    cands.append((3, rec.get("time", 0.0), r,
                                  f"{how}{where} (from torchrun after another rank on its "
                                  "host failed, a scheduler or kill)"))
                else:
                    cands.append((2 if rec.get("secondary") else 0, rec.get("time", 0.0), r,
                                  str(rec.get("error")) + ("" if rec.get("divergence") else where)))
                continue
            if r in self.vanished:
                cands.append((1, self.vanished[r], r, "its process or host vanished without "
                              f"reporting an error (its beat stood still for {self.stale:.0f} s)"))
                continue
            where = (self._store_get(f"pid/{r}") or "").split()
            if len(where) == 2 and where[0] == host and where[1].isdigit() \
                    and process_gone(int(where[1])):
                cands.append((1, time.time(), r, "its process ended without reporting an error "
                              "(killed?)"))
        if not cands:
            return self.job.rank, str(own.get("error"))
        cands.sort(key=lambda c: (c[0], c[1], c[2]))
        return cands[0][2], cands[0][3]

    def stand_down(self) -> None:
        """Stop beating and judging: this rank is reporting its own end."""
        with self.lock:
            self._end.set()
            self.reported.set()

    def close(self) -> None:
        """Stop beating (the rank is done or reporting); peers no longer judge
        this rank by its beat."""
        self._store_set(f"done/{self.job.rank}", "1")
        self._end.set()
        self.reported.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.beat + 10)


def _job_prefix(job: JobEnv) -> str:
    """Store keys of this job (torchrun's store outlives restarts)."""
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "job")
    return f"bpsim/{rid}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def merge_parts(folders: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str] | None,
                meta: dict[str, Any] | None = None) -> Any:
    """Merge the span files of one or more ``.parts`` folders (a job's hosts)
    into one trace; write it to ``out`` when given; return the trace.

    ``meta`` defaults to the ``run.json`` that rank 0 leaves in its folder
    (the run's settings), marked ``partial``. ``ValueError`` when no folder
    holds any span file.
    """
    from bpsim.runtime.record import merge_rows, read_spool

    rows: list[tuple] = []
    found = False
    for f in folders:
        p = Path(f)
        if not p.is_dir():
            raise ValueError(f"{f} is not a folder; give the <trace>.parts folder(s) a run "
                             "left behind")
        found = found or any(p.glob("rank*.spans.jsonl"))
        rows.extend(read_spool(p))
        if meta is None:
            meta = _read_record(p / "run.json")
    if not found:
        raise ValueError(f"no rank*.spans.jsonl in {', '.join(map(str, folders))}; give the "
                         "<trace>.parts folder(s) a failed run left behind")
    meta = dict(meta or {})
    meta["partial"] = True
    trace = merge_rows(sorted(set(rows), key=lambda r: (r[6], r[0])), meta)
    if out is not None:
        save_trace(trace, out)
    return trace


def run_job(cfg: RunConfig, job: JobEnv | None = None) -> RunResult | None:
    """Run this process's rank of a job started by torchrun, srun or by hand;
    rank 0 returns the result, the other ranks None.

    ``--workers`` must equal ``WORLD_SIZE``. The rank computes on
    ``cuda:(local rank mod GPUs)`` with ``--device cuda``. A failure raises
    :class:`RunFailed` naming the rank that failed first (see
    :class:`_JobWatch`) and where the spans recorded so far are.
    """
    import torch.distributed as dist

    from bpsim import data
    from bpsim.runtime import worker
    from bpsim.runtime.record import merge_rows, read_spool

    job = job or job_env()
    if job is None:
        raise ValueError("run_job needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; use run()")
    if cfg.workers != job.world:
        raise ValueError(f"--workers {cfg.workers} but the job has {job.world} processes "
                         f"(WORLD_SIZE); make them equal (torchrun: --nnodes x --nproc-per-node)")
    cfg = RunConfig(**{**asdict(cfg), "local_workers": min(job.local_world, cfg.workers)})
    cfg = cfg.resolved()
    warn = oversubscription(cfg)
    if warn and job.local_rank == 0:
        print(f"bpsim run: warning: {warn}", file=sys.stderr)
    desc = data.describe(cfg.data)
    train, test = data.load(cfg.data, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
    net, trainer = worker.build(cfg, desc.input_shape, desc.n_classes, desc.task)
    clean_stale_spools()
    if cfg.trace:
        clean_stale_spools(str(Path(cfg.trace).absolute().parent))
        parts = Path(cfg.trace + ".parts")
        parts.mkdir(parents=True, exist_ok=True)
    else:
        parts = Path(tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-"))
    status: dict[str, Any] = {"step": 0, "phase": "rendezvous"}
    watch: _JobWatch | None = None
    stopping = {"n": 0}

    def on_term(signum: int, frame: Any) -> None:
        stopping["n"] += 1
        if stopping["n"] == 1:           # later signals, during the cleanup, are absorbed
            _ignore_stop_signals()
            raise worker.Terminated(f"stopped by {_signal_name(signum)}")

    old = {s: signal.signal(s, on_term) for s in (signal.SIGTERM, signal.SIGINT)}

    def partial_trace() -> str:
        """Write what this host's parts hold into the trace; say where things are."""
        if not cfg.trace:
            return ""
        try:
            merge_parts([parts], cfg.trace, meta=_meta(cfg, {}))
            kept = f"; the spans of this host are in {parts} and merged into {cfg.trace}"
        except (ValueError, OSError):
            kept = f"; the spans of this host are in {parts}"
        return kept + (f" (merge all hosts' folders with: bpsim trace merge PARTS... -o "
                       f"{cfg.trace})" if job.world > job.local_world else "")

    try:
        worker.pick_device(cfg.device, job.local_rank)
        if cfg.trace and job.rank == 0:
            from bpsim.files import atomic_write_text

            atomic_write_text(parts / "run.json", json.dumps(_meta(cfg, {})))
        worker._gloo_on_loopback(job.addr)
        if not dist.is_initialized():
            dist.init_process_group(cfg.backend, init_method="env://", rank=job.rank,
                                    world_size=job.world, timeout=timedelta(seconds=cfg.timeout))
        if job.world > 1:
            def give_up() -> None:
                spool = status.get("spool")
                if spool is not None:
                    try:
                        spool.flush()
                    except Exception:  # noqa: BLE001
                        pass
                print(f"bpsim run: error: {watch.cause if watch else 'stopped'}"
                      f"{partial_trace()}", file=sys.stderr, flush=True)

            watch = _JobWatch(job, _job_prefix(job), stale=5.0,
                              on_give_up=give_up)
        result = worker.run_rank(job.rank, cfg, (train.tensors[0], train.tensors[1]),
                                 str(parts), None, local_rank=job.local_rank, status=status)
    except BaseException as e:  # noqa: BLE001 - reported as one line
        stopping["n"] += 1               # signals from here on are absorbed
        if _on_signal in old.values():   # the command ends after this report
            _ignore_stop_signals()
        if watch is not None:
            watch.stand_down()
        terminated = isinstance(e, worker.Terminated)
        worker._write_error(str(parts), job.rank, e, status, terminated=terminated)
        rec = worker._error_record(job.rank, e, status)
        rec["terminated"] = terminated
        if watch is not None and watch.cause is not None:
            rec["watch"] = True
        if watch is not None:
            watch.fail(rec)
            rank, err = watch.blame(rec)
            if watch.cause is not None and rank == job.rank:
                rank, err = None, watch.cause
            watch.close()
        else:
            rank, err = job.rank, rec["error"]
        if rank == job.rank and rec.get("phase") == "rendezvous" and not terminated:
            err += (f"; check that {job.addr}:{job.port} (MASTER_ADDR:MASTER_PORT) is rank 0's "
                    "host and a port open to every rank, and that rank 0 was started")
        where = partial_trace()
        if not cfg.trace or not any(parts.glob("rank*.spans.jsonl")):
            shutil.rmtree(parts, ignore_errors=True)    # nothing worth keeping
            where = ""
        head = err if rank is None else f"rank {rank} failed: {err}"
        if rank is not None and rank != job.rank:
            head += f"; rank {job.rank} stopped"
        raise RunFailed(head + where, rank, err) from None
    finally:
        if not (_stopping and _on_signal in old.values()):
            for s, h in old.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
    own_rows = [r for r in read_spool(parts) if r[0] == job.rank] if cfg.record else []
    weights = result.pop("_weights")
    final = dist.new_group(backend="gloo", timeout=timedelta(hours=1))
    gathered: list[Any] = [None] * job.world if job.rank == 0 else []
    dist.gather_object((result, own_rows, weights), gathered if job.rank == 0 else None, dst=0,
                       group=final)
    res = None
    if job.rank == 0:
        results = {g[0]["rank"]: g[0] for g in gathered}
        rows = [r for g in gathered for r in g[1]]
        all_w = {b: w for g in gathered for b, w in g[2].items()}

        def trace_of(meta: dict[str, Any]) -> Any:
            return merge_rows(rows, meta)

        res = summarize(cfg, results, all_w, rows, net, trainer, test, None, trace_of)
    if watch is not None:
        watch.close()                    # done: peers no longer judge this rank by its beat
    dist.barrier(group=final)
    for f in parts.glob(f"rank{job.rank}.*"):      # the merged trace holds them now
        f.unlink(missing_ok=True)
    if job.rank == 0:
        (parts / "run.json").unlink(missing_ok=True)
    try:
        parts.rmdir()                            # the last rank out removes the folder
    except OSError:
        pass
    dist.destroy_process_group()
    if res is not None:                          # rank 0, every rank past the barrier
        _check_final_state(cfg, trainer, train, res)
    return res


def run_torchrun(cfg: RunConfig) -> RunResult | None:
    """:func:`run_job` (the name it had when only torchrun started jobs)."""
    return run_job(cfg)
