"""One rank of a run: join the group, train its block, report.

The launcher (:mod:`bpsim.runtime.launch`) starts :func:`entry` in one
process per rank; under ``torchrun`` the ``bpsim run`` command itself calls
:func:`run_rank`. Rank ``k`` holds block ``k + 1`` (with ``--workers 1``
the one rank holds every block). A rank

1. limits torch to its share of the cores, joins the process group (gloo on
   CPU, NCCL on CUDA) and opens one group per directed link;
2. builds the whole net from the seed (so every rank starts from the same
   weights) and the in-process trainer of the algorithm, whose optimizers,
   loss and options it reuses, and moves its block to its device;
3. agrees with the others on a shared clock (:mod:`bpsim.runtime.clock`);
4. runs the steps with one of two executors -- :func:`drive_dist` (its
   block, messages over ``torch.distributed``) or :func:`drive_local`
   (every block, round robin, messages in memory) -- or the pipeline
   schedules of :mod:`bpsim.runtime.pipeline`;
5. writes its spans (continuously, see :mod:`bpsim.runtime.record`), its
   result and its block's weights into the spool folder.

Failures: an exception becomes ``rank<R>.error.json`` (one line of text,
whether it was a consequence of another rank's failure, the traceback) and
exit code 1. SIGTERM (the launcher stopping the run) ends the rank after
flushing its spans. SIGINT is ignored: the launcher handles Ctrl-C. A
watchdog thread ends the rank if the launcher disappears.

Test hook: ``BPSIM_RUNTIME_FAULT=kill:R:S`` makes rank R kill itself with
SIGKILL after S steps; ``raise:R:S`` makes it raise ``RuntimeError``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bpsim import methods
from bpsim.algorithms.base import DivergenceError
from bpsim.runtime.clock import SharedClock, sync_clock
from bpsim.runtime.comm import BLOCKED, Cursor, DistComm, LocalComm, PeerError, Recv, Send, Take
from bpsim.runtime.pipeline import run_pipeline
from bpsim.runtime.record import Spool, process_gone
from bpsim.runtime.schedules import BatchPlan, BlockCtx, inbound_links
from bpsim.files import atomic_write_text

__all__ = ["entry", "run_rank", "build", "drive_dist", "drive_local", "FAULT_ENV",
           "Rendezvous", "step_of", "plan_steps"]

FAULT_ENV = "BPSIM_RUNTIME_FAULT"
DEBUG_ENV = "BPSIM_RUNTIME_DEBUG"

_SECONDARY_HINTS = ("gloo", "connection closed", "connection reset", "timed out", "nccl",
                    "pair closure", "broken pipe", "peer", "socket")


class Terminated(BaseException):
    """Raised in a rank's main thread when the launcher sends SIGTERM."""


@dataclass(frozen=True)
class Rendezvous:
    """Where ranks meet: the launcher's ``TCPStore`` (None under torchrun: env://)."""

    host: str
    port: int


# ------------------------------------------------------------------- build
def build(cfg: Any, input_shape: Sequence[int], n_classes: int, task: str) -> tuple[Any, Any]:
    """The net and in-process trainer a run trains (same on every rank and in
    the launcher, which uses them to check the options and to evaluate).

    ``cfg`` is a resolved :class:`~bpsim.runtime.launch.RunConfig`: its
    ``options`` hold the method's registry options with their defaults
    (:meth:`bpsim.methods.Method.resolved_options`); the trainer takes those
    its constructor knows, the net is built with ``options["aux"]``.
    """
    from bpsim import nets

    cls = methods.load(methods.get(cfg.algo).trainer)
    net = nets.build(cfg.model, input_shape, n_classes, cfg.blocks, width=cfg.width,
                     depth=cfg.depth, aux=cfg.options.get("aux"),
                     output_layer=cls.output_layer, seed=cfg.seed)
    lr = cfg.lr if cfg.lr is not None else cls.default_lr
    kwargs = {k: v for k, v in cfg.options.items() if k in cls.options}
    trainer = cls(net, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                  batch_size=cfg.batch_size, seed=cfg.seed, task=task, progress=False, **kwargs)
    return net, trainer


def step_of(algo: str) -> Callable:
    """The runtime step of method ``algo`` (``Method.runtime`` of the registry)."""
    m = methods.get(algo)
    if m.runtime is None:
        raise ValueError(f"{m.name} does not run on the runtime; choose one of "
                         f"{', '.join(methods.names(runtime=True))}")
    return methods.load(m.runtime)


def plan_steps(step: Callable, steps: int, blocks: int) -> int:
    """Mini-batches a run of ``steps`` steps uses: ``blocks * steps`` for a
    schedule of one stage per block (``greedy``), else ``steps``."""
    return steps * blocks if getattr(step, "stages", False) else steps


class _AllOptimizers:
    """Steps every block's optimizer (one pipeline stage holding all blocks)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


# --------------------------------------------------------------- executors
def drive_dist(ctx: BlockCtx, comm: DistComm, step_fn: Callable, steps: int,
               on_step_end: Callable[[int], None]) -> None:
    """Run ``steps`` steps of one block, answering its requests over ``comm``."""
    for t in range(steps):
        gen = step_fn(ctx, t)
        val: Any = None
        while True:
            try:
                req = gen.send(val)
            except StopIteration:
                break
            kind = type(req)
            if kind is Recv:
                val = comm.recv(req.src, req.step, req.mb)
            elif kind is Send:
                comm.send(req.dst, req.tensor, req.step, req.mb, req.origin)
                val = None
            elif kind is Take:
                val = comm.take(req.src, t)
                if val is None:
                    raise RuntimeError(_starved(ctx.block, t))
            else:
                raise TypeError(f"a schedule yielded {req!r}; expected Send, Recv or Take")
        on_step_end(t)
    ctx.check_weights(steps - 1)


def _starved(block: int, step: int) -> str:
    return (f"block {block} ran out of inputs at step {step}: block {block - 1} has finished and "
            "every entry of the replay buffer has been read --max-reuse times; raise --max-reuse "
            "or --buffer, or leave --max-reuse unset")


def drive_local(ctxs: Sequence[BlockCtx], comm: LocalComm, step_fn: Callable, steps: int,
                on_step_end: Callable[[int, int], None]) -> None:
    """Run every block in this process, one step of one block at a time.

    Round robin over the blocks: a block runs until it finishes a step or
    asks for a message that is not there yet, then the next block runs.
    For ``bp`` this is the in-process trainer's order (forward up, backward
    down); for ``dgl`` block 1 step t, block 2 step t, ...
    """
    K = len(ctxs)
    t = [0] * K
    gens: list[Any] = [None] * K
    vals: list[Any] = [None] * K
    pending: list[Any] = [None] * K
    while True:
        progressed, done = False, True
        for i, c in enumerate(ctxs):
            if t[i] >= steps:
                continue
            done = False
            if gens[i] is None:
                gens[i], vals[i], pending[i] = step_fn(c, t[i]), None, None
            req = pending[i]
            while True:
                if req is None:
                    try:
                        req = gens[i].send(vals[i])
                    except StopIteration:
                        gens[i] = None
                        on_step_end(c.block, t[i])
                        t[i] += 1
                        if t[i] >= steps:
                            comm.done.add(c.block)   # a finished producer puts no more
                        progressed = True
                        break
                    vals[i] = None
                kind = type(req)
                if kind is Send:
                    comm.send(c.block, req.dst, req.tensor, req.step, req.mb, req.origin)
                    ans = None
                elif kind is Recv:
                    ans = comm.recv(req.src, c.block, req.step, req.mb)
                elif kind is Take:
                    ans = comm.take(req.src, c.block, t[i])
                    if ans is None:
                        raise RuntimeError(_starved(c.block, t[i]))
                else:
                    raise TypeError(f"a schedule yielded {req!r}; expected Send, Recv or Take")
                if ans is BLOCKED:
                    pending[i] = req
                    break
                pending[i], vals[i], req = None, ans, None
                progressed = True
        if done:
            for c in ctxs:
                c.check_weights(steps - 1)
            return
        if not progressed:
            raise RuntimeError("the blocks wait for each other (deadlock in the local executor); "
                               "this is a bug in a runtime schedule")


# ----------------------------------------------------------------- a rank
def _fault() -> tuple[str, int, int] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    try:
        what, r, s = spec.split(":")
        if what not in ("kill", "raise"):
            raise ValueError
        return what, int(r), int(s)
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={spec!r} must be kill:RANK:STEP or raise:RANK:STEP") from None


def pick_device(device: str, local_rank: int) -> torch.device:
    """``cpu``, or ``cuda:(local_rank mod number of GPUs)``."""
    if device == "cpu":
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if n == 0:
        raise ValueError("--device cuda but torch sees no GPU; use --device cpu")
    d = torch.device("cuda", local_rank % n)
    torch.cuda.set_device(d)
    return d


def run_rank(rank: int, cfg: Any, data: tuple[torch.Tensor, torch.Tensor] | None, spool_dir: str,
             rdzv: Rendezvous | None, local_rank: int | None = None,
             status: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything one rank does; returns its result (also written to the spool).

    ``status`` (if given) is updated with the current step, for error reports.
    """
    import torch.distributed as dist

    from bpsim import data as datasets

    status = status if status is not None else {}
    world, K, algo = cfg.workers, cfg.blocks, cfg.algo
    step_fn = step_of(algo)
    pipelined = step_fn is run_pipeline
    total = plan_steps(step_fn, cfg.steps, K)
    if cfg.cpus:
        os.sched_setaffinity(0, cfg.cpus)
    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, rank if local_rank is None else local_rank)
    backend = cfg.backend
    timeout = timedelta(seconds=cfg.timeout)
    status["phase"] = "rendezvous"
    if rdzv is not None:
        _gloo_on_loopback(rdzv.host)
        store = dist.TCPStore(rdzv.host, rdzv.port, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    elif not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    # Clock sync and other small CPU messages go over gloo even with NCCL.
    ctrl = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    groups: dict[tuple[int, int], Any] = {}
    if world > 1 and not pipelined:
        # A link thread always has the next receive posted, also while its
        # block is idle by plan (greedy: until its stage), so the links get
        # --timeout per step of the run; the compute thread's own waits
        # (DistComm) detect a stuck peer within --timeout per step waited.
        # (capped at a year: C++ timeouts and timedelta overflow long before
        # a run this long could end)
        link_timeout = timedelta(seconds=min(cfg.timeout * (total + 1), 365 * 86400.0))
        for b in range(1, K):   # collective: every rank creates every group, in order
            groups[(b, b + 1)] = dist.new_group([b - 1, b], timeout=link_timeout)
            groups[(b + 1, b)] = dist.new_group([b - 1, b], timeout=link_timeout)
    status["phase"] = "setup"
    desc = datasets.describe(cfg.data)
    net, trainer = build(cfg, desc.input_shape, desc.n_classes, desc.task)
    shapes = net.shapes()
    in_shapes = [tuple(desc.input_shape)] + [tuple(s) for s in shapes[:-1]]
    if data is None:
        train, _ = datasets.load(cfg.data, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
        data = (train.tensors[0], train.tensors[1])
    x_all, y_all = data
    plan = BatchPlan(trainer, x_all, y_all, total, device, full_only=pipelined)
    here = [rank + 1] if world > 1 else list(range(1, K + 1))
    for b in here:
        net.blocks[b - 1].to(device)
        if net.heads is not None:
            net.heads[b - 1].to(device)
    if net.output is not None and K in here:
        net.output.to(device)
    status["phase"] = "clock"
    clock: SharedClock = sync_clock(rank, world, group=ctrl)
    now = clock.now_fn()
    rows: list | None = [] if cfg.record else None
    spool = Spool(Path(spool_dir) / f"rank{rank}.spans.jsonl", rows if rows is not None else [])
    status["spool"] = spool
    cursor = Cursor()    # one compute thread per rank: one timeline cursor
    ctxs = [BlockCtx(b, K, rank if world > 1 else 0, net, trainer, plan, now, rows, device,
                     slow=cfg.slowdown.get(b, 1.0), cursor=cursor, algo=algo) for b in here]
    fault = _fault()

    def check_fault(step_done: int) -> None:
        if fault is not None and fault[1] == rank and step_done == fault[2]:
            spool.flush()
            if fault[0] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {step_done} ({FAULT_ENV})")

    def step_end(t: int) -> None:
        status["step"] = t + 1
        spool.maybe_flush()
        check_fault(t + 1)

    status["phase"] = "train"
    t_start = now()
    comm_stats: dict[int, Any] = {}
    reads: dict[int, list] = {}
    misses: dict[int, int] = {}
    if pipelined:
        c = ctxs[0]
        if world == 1:
            stage = torch.nn.Sequential(*net.blocks)
            c.optimizer = _AllOptimizers(trainer.optimizers)
        else:
            stage = net.blocks[rank]
        run_pipeline(algo, c, stage, rank, world, cfg.microbatches, total, step_end)
    elif world > 1:
        b = here[0]
        wire = device if backend == "nccl" else torch.device("cpu")
        inbound = inbound_links(step_fn, b, K, plan, in_shapes[b - 1], tuple(shapes[b - 1]),
                                trainer)
        comm = DistComm(b, K, now, rows, groups, inbound, device, wire, cfg.timeout,
                        buffer=cfg.buffer, max_reuse=cfg.max_reuse, cursor=cursor)
        drive_dist(ctxs[0], comm, step_fn, total, step_end)
        comm.flush()
        comm_stats = comm.buffer_stats()
        reads, misses = comm.reads, comm.misses
    else:
        buffered = [b - 1 for b in range(2, K + 1)
                    if any(ib.buffered for ib in inbound_links(step_fn, b, K, plan,
                                                               in_shapes[b - 1],
                                                               tuple(shapes[b - 1]), trainer))]
        local = LocalComm(buffered=buffered, buffer=cfg.buffer, max_reuse=cfg.max_reuse)

        def local_end(block: int, t: int) -> None:
            if block == 1:
                step_end(t)
            else:
                spool.maybe_flush()

        drive_local(ctxs, local, step_fn, total, local_end)
        comm_stats = local.buffer_stats()
        reads, misses = local.reads, local.misses
    t_end = now()
    status["phase"] = "report"
    spool.close()
    result = {
        "rank": rank, "blocks": here, "pid": os.getpid(), "host": _hostname(),
        "t_start": t_start, "t_end": t_end, "threads": cfg.threads, "device": str(device),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "clock": clock.to_dict(), "samples": plan.samples(),
        "updates": {str(c.block): c.updates for c in ctxs},
        "losses": {str(c.block): c.losses for c in ctxs},
        "buffers": {str(src + 1): s for src, s in comm_stats.items()},
        "buffer_reads": {str(b): r for b, r in reads.items()},
        "label_batches": {str(c.block): c.label_batches for c in ctxs if c.label_batches},
        "buffer_misses": {str(b): n for b, n in misses.items()},
        "steps_per_epoch": plan.steps_per_epoch,
    }
    weights = {}
    for b in here:
        w = {"block": {k: v.detach().cpu() for k, v in net.blocks[b - 1].state_dict().items()}}
        if net.heads is not None:
            w["head"] = {k: v.detach().cpu() for k, v in net.heads[b - 1].state_dict().items()}
        if net.output is not None and b == K:
            w["output"] = {k: v.detach().cpu() for k, v in net.output.state_dict().items()}
        weights[b] = w
    result["_weights"] = weights
    return result


def _gloo_on_loopback(host: str) -> None:
    """Make gloo listen on the loopback interface when the run binds a loopback
    address (gloo otherwise picks the interface of the host name)."""
    import ipaddress
    import socket

    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    try:
        loop = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loop = False
    if loop:
        names = [n for _, n in socket.if_nameindex()]
        for name in ("lo", "lo0"):
            if name in names:
                os.environ["GLOO_SOCKET_IFNAME"] = name
                return


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _error_record(rank: int, e: BaseException, status: dict[str, Any]) -> dict[str, Any]:
    text = " ".join(str(e).split()) or type(e).__name__
    lower = text.lower()
    secondary = isinstance(e, PeerError) or (
        isinstance(e, RuntimeError) and any(h in lower for h in _SECONDARY_HINTS)
        and "injected failure" not in lower)
    divergence = isinstance(e, DivergenceError)
    return {"rank": rank, "error": (text if divergence else f"{type(e).__name__}: {text}")[:600],
            "secondary": secondary, "divergence": divergence,
            "time": time.time(), "step": status.get("step", 0), "phase": status.get("phase"),
            "traceback": traceback.format_exc()}


def write_result(spool_dir: str, rank: int, result: dict[str, Any]) -> None:
    """Write a rank's result JSON and weights atomically into the spool folder."""
    weights = result.pop("_weights", None)
    if weights is not None:
        tmp = Path(spool_dir) / f".rank{rank}.weights.pt.tmp"
        torch.save(weights, tmp)
        os.replace(tmp, Path(spool_dir) / f"rank{rank}.weights.pt")
    atomic_write_text(Path(spool_dir) / f"rank{rank}.result.json", json.dumps(result))


def _watch(launcher_pid: int) -> None:
    """End this rank when the launcher process is gone (it cannot clean up then)."""
    def loop() -> None:
        while True:
            time.sleep(1.0)
            if process_gone(launcher_pid):
                os._exit(1)

    threading.Thread(target=loop, daemon=True, name="bpsim-watchdog").start()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated("stopped by the launcher")


_ENV_PREFIXES = ("BPSIM_", "GLOO_", "NCCL_", "TORCH_", "OMP_", "MKL_", "CUDA_")


def forwarded_env() -> dict[str, str]:
    """The launcher's variables that ranks must see. Ranks are forked from a
    fork server started by the first run of the process, so they would
    otherwise see the environment of that moment."""
    return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}


def _apply_env(env: dict[str, str]) -> None:
    for k in [k for k in os.environ if k.startswith(_ENV_PREFIXES) and k not in env]:
        del os.environ[k]
    os.environ.update(env)


def entry(rank: int, cfg: Any, rdzv: Rendezvous, spool_dir: str,
          data: tuple[torch.Tensor, torch.Tensor] | None, launcher_pid: int,
          env: dict[str, str] | None = None) -> None:
    """Process target of one rank under the launcher; never returns normally."""
    if env is not None:
        _apply_env(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _watch(launcher_pid)
    status: dict[str, Any] = {"step": 0, "phase": "start"}
    code = 0
    try:
        result = run_rank(rank, cfg, data, spool_dir, rdzv, status=status)
        write_result(spool_dir, rank, result)
    except Terminated as e:
        code = 143
        _write_error(spool_dir, rank, e, status, terminated=True)
    except BaseException as e:  # noqa: BLE001 - reported to the launcher
        code = 1
        _write_error(spool_dir, rank, e, status)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _write_error(spool_dir: str, rank: int, e: BaseException, status: dict[str, Any],
                 terminated: bool = False) -> None:
    spool = status.pop("spool", None)
    if spool is not None:
        try:
            spool.close()          # keep what this rank recorded so far
        except Exception:  # noqa: BLE001
            pass
    rec = _error_record(rank, e, status)
    rec["terminated"] = terminated
    if os.environ.get(DEBUG_ENV):
        print(f"[bpsim rank {rank}] {rec['traceback']}", file=sys.stderr)
    try:
        atomic_write_text(Path(spool_dir) / f"rank{rank}.error.json", json.dumps(rec))
    except OSError:
        pass
