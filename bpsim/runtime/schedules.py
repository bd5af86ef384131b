"""What one block does in one training step, for every runtime algorithm.

Each schedule is a generator ``step(ctx, t)`` over one block's work in step
``t``. It computes with the per-block functions of :mod:`bpsim.algorithms`
(written once, shared with the in-process trainers) and yields
:class:`~bpsim.runtime.comm.Send` / :class:`~bpsim.runtime.comm.Recv` /
:class:`~bpsim.runtime.comm.Take` requests; an executor
(:mod:`bpsim.runtime.worker`) answers them over ``torch.distributed`` (one
block per process) or in memory (every block in one process, the
``--workers 1`` reference). The op order of each block is the one drawn in
:mod:`bpsim.sim.schedules`, so a measured and a simulated run line up span
by span (K = 3, one step; F fwd, B bwd, A aux, U update, H h-step)::

    bp         block 1 |F......BBU     dgl        block 1 |FABBU
               block 2 |.F...BBU..                block 2 |.FABBU
               block 3 |..FBBU....                block 3 |..FABBU

    blockprop  block 1 |F.......FBBU   (forward init, h-steps K -> 2 with
               block 2 |.F...HHHFBBU    h*_k sent back to block k - 1,
               block 3 |..HHHFBBU...    then the W-step fwd/bwd/update)

    bwbpf      block 1 |FABBU           greedy (K = 2, 2 steps per stage)
               block 2 |.FABBU          block 1 |FABBUFABBUFF.........
               block 3 |..FALBBU        block 2 |...........FABBUFABBU

``dgl-async`` is ``dgl`` with block j > 1 reading its input from a replay
buffer instead of waiting for block j - 1 (:class:`bpsim.replay.ReplayBuffer`,
least-reused entry first). An entry keeps the mini-batch its tensor came
from (its *origin*); the block trains on that batch's labels and passes the
origin on with its output, as the in-process trainer's entries hold
``(h, y)``. ``gpipe`` and ``1f1b`` use
``torch.distributed.pipelining`` instead (:mod:`bpsim.runtime.pipeline`).

Spans: every compute op is timed by :meth:`BlockCtx.op` (on CUDA it ends
when the compute stream has finished the op's kernels; only that stream is
synchronised, never the streams where the link threads' receives are
posted, so waiting for a message never counts as compute). A span starts
where the thread's previous span (or wait) ended, so the bookkeeping
between two ops -- indexing the next batch, queueing a message -- counts
towards the next op: a busy rank's compute lane has no holes, and the
simulator, which knows only op costs, sees every second the rank spent.
``wait`` spans cover the time the thread waited for a message. A slowed block
(``--slowdown BLOCK:S``) does ``S - 1`` times each op's duration of extra
real work (small matrix products) inside the same span. ``dgl``'s
``local_update`` (and BWBPF's ``last_block_update``) takes a ``timed``
callback that wraps each of its phases; the runtime times each as a span
(``aux``: head forward and loss, ``loss``: BWBPF's output layer, ``bwd``,
``update``) without a second copy of the math. BlockProp's N_h h-step iterations run in one call of
``h_update``; their time is drawn as N_h equal ``hstep`` spans (the
simulator's unit is one iteration).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any, Callable, Generator, Iterable, Iterator

import torch
from torch import nn

from bpsim.algorithms.base import diverged
from bpsim.algorithms.blockprop import cache_rule, forward_init, start_point
from bpsim.algorithms.bwbpf import last_block_update
from bpsim.algorithms.dgl import block_forward, local_head, local_update
from bpsim.runtime.comm import Cursor, Inbound, Recv, Send, Take

__all__ = ["BatchPlan", "BlockCtx", "inbound_links", "burn", "bp_step", "dgl_step", "bwbpf_step",
           "greedy_step", "greedy_stage", "dgl_async_step", "blockprop_step"]

Step = Generator[Any, Any, None]


# ----------------------------------------------------------------- batches
class BatchPlan:
    """The mini-batches of a run: the in-process trainer's seeded order.

    Step ``t`` uses batch ``t`` of the concatenated epochs
    ``Trainer.batches(n, 0) + Trainer.batches(n, 1) + ...``, so a run of
    ``steps`` steps sees exactly the batches ``Trainer.fit`` would. With
    ``full_only`` batches smaller than ``batch_size`` are skipped (the
    pipeline schedules need equal micro-batch shapes).
    """

    def __init__(self, trainer: Any, x: torch.Tensor, y: torch.Tensor, steps: int,
                 device: torch.device, full_only: bool = False) -> None:
        n = len(x)
        if n == 0:
            raise ValueError("the training set is empty")
        self.x_all, self.y_all, self.device = x, y, device
        self.idx: list[torch.Tensor] = []
        self.epochs: list[int] = []
        epoch = 0
        while len(self.idx) < steps:
            batches = trainer.batches(n, epoch)
            if full_only:
                batches = [b for b in batches if len(b) == trainer.batch_size]
                if not batches:
                    raise ValueError(f"no full batch of {trainer.batch_size} examples in a training "
                                     f"set of {n}; lower --batch-size")
            for b in batches:
                if len(self.idx) == steps:
                    break
                self.idx.append(b)
                self.epochs.append(epoch)
            epoch += 1
        self.steps = steps
        self.steps_per_epoch = len(trainer.batches(n, 0))
        self._present: list[torch.Tensor] | None = None

    def present(self, t: int) -> torch.Tensor:
        """Which examples of batch ``t`` were in an earlier batch of the run:
        with Alg. 2 exactly those have a cached ``h*`` (every batch either
        refreshes its examples' ``h*`` or needs them all cached)."""
        if self._present is None:
            seen = torch.zeros(len(self.x_all), dtype=torch.bool)
            self._present = []
            for i in self.idx:
                self._present.append(seen[i].clone())
                seen[i] = True
        return self._present[t]

    def cache_kind(self, t: int, every: int | None) -> str:
        """Alg. 2's rule for batch ``t`` (:func:`bpsim.algorithms.blockprop.cache_rule`)."""
        if every is None:
            return "forward"
        return cache_rule(self.epochs[t], every, self.present(t))

    def x(self, t: int) -> torch.Tensor:
        return self.x_all[self.idx[t]].to(self.device)

    def y(self, t: int) -> torch.Tensor:
        return self.y_all[self.idx[t]].to(self.device)

    def size(self, t: int) -> int:
        return len(self.idx[t])

    def samples(self) -> int:
        return sum(len(i) for i in self.idx)


# ------------------------------------------------------------------ burning
def burn(seconds: float, clock: Callable[[], float] = time.perf_counter,
         work: torch.Tensor | None = None) -> None:
    """Do ``seconds`` of real CPU work (64x64 matrix products), the extra work
    of a slowed rank."""
    if seconds <= 0:
        return
    a = work if work is not None else torch.full((64, 64), 1.0 / 64)
    out = torch.empty_like(a)
    end = clock() + seconds
    while clock() < end:
        torch.mm(a, a, out=out)


# --------------------------------------------------------------- the block
class BlockCtx:
    """Everything one block needs during a run.

    Parameters
    ----------
    block, blocks : int
        This block (1-based) and K.
    rank : int
        The rank whose timeline its spans go to (0 for every block when all
        blocks run in one process).
    net, trainer :
        The ``BlockNet`` (every rank builds the whole net from the same seed
        and trains only its block) and the in-process trainer of the
        algorithm, whose optimizers, loss and options the runtime reuses.
    plan : BatchPlan
    now : callable
        Shared clock.
    rows : list or None
        Span sink (None: not recorded).
    slow : float
        Slowdown factor S >= 1 of this block.
    cursor : Cursor
        The timeline position of the thread that runs this block (shared by
        the blocks of one process and by its wait spans).

    Attributes
    ----------
    label_batches : list of int
        For each local update of the block (``dgl-async``), the mini-batch
        of the run whose labels it trained on: the batch its input came from.
    """

    def __init__(self, block: int, blocks: int, rank: int, net: Any, trainer: Any,
                 plan: BatchPlan, now: Callable[[], float], rows: list | None,
                 device: torch.device, slow: float = 1.0, cursor: Cursor | None = None,
                 algo: str | None = None) -> None:
        self.block, self.K, self.rank = block, blocks, rank
        self.algo = algo or getattr(trainer, "name", "")
        self.first, self.last = block == 1, block == blocks
        self.net, self.trainer, self.plan = net, trainer, plan
        self.module: nn.Module = net.blocks[block - 1]
        self.optimizer = trainer.optimizers[block - 1]
        self.loss_fn = trainer.loss
        self.now, self.rows, self.device = now, rows, device
        self.slow = float(slow)
        self.sync = device.type == "cuda"
        self.updates = 0
        self.label_batches: list[int] = []
        self.losses: list[float] = []
        self.state: dict[str, Any] = {}
        self._burn_work = torch.full((64, 64), 1.0 / 64) if self.slow != 1.0 else None
        self.cursor = cursor if cursor is not None else Cursor()

    def begin(self) -> float:
        """Start of the next compute span: where the last one (or a wait) ended."""
        t = self.cursor.t
        return self.now() if t is None else t

    def settle(self) -> None:
        """On CUDA, wait until the compute stream has done the work queued on
        it (the device's other streams, where receives wait for their
        senders, are left alone); nothing on CPU."""
        if self.sync:
            torch.cuda.current_stream(self.device).synchronize()

    def _finish(self, name: str, t0: float, step: int, mb: int = 0) -> float:
        """Close a compute span opened at ``t0``: sync, slowdown work, record."""
        self.settle()
        if self.slow != 1.0:
            burn((self.slow - 1.0) * (self.now() - t0), self.now, self._burn_work)
        t1 = self.now()
        if self.rows is not None:
            self.rows.append((self.rank, "compute", name, self.block, step, mb, t0, t1, None))
        self.cursor.t = t1
        return t1

    @contextmanager
    def op(self, name: str, step: int, mb: int = 0) -> Iterator[None]:
        """Time one compute op (with the slowdown's extra work) as a span that
        starts where the thread's previous span ended."""
        t0 = self.begin()
        yield
        self._finish(name, t0, step, mb)

    def update(self, step: int, grad_scale: float | None = None) -> None:
        """The block's optimizer step, as an ``update`` span (gradients first
        multiplied by ``grad_scale`` when given: a pipeline's mean over its
        micro-batches)."""
        with self.op("update", step):
            if grad_scale is not None:
                for group in self.optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.mul_(grad_scale)
            self.optimizer.step()
        self.updates += 1

    def record_loss(self, value: float, step: int, what: str = "local loss",
                    block: int | None = None) -> None:
        """Keep a loss of this block (computed by ``block``, default this one);
        a non-finite one stops the run (as ``bpsim train``)."""
        if not math.isfinite(value):
            raise diverged(self.algo, f"at step {step + 1}",
                           f"block {block or self.block}'s {what} is {value}",
                           f"lower the learning rate (lr={self.trainer.lrs})")
        self.losses.append(value)

    def check_weights(self, step: int) -> None:
        """Stop the run, naming this block, when one of its weights is no
        longer finite (a last step can spoil the weights without a loss to
        show it)."""
        for p in self.module.parameters():
            if not bool(torch.isfinite(p).all()):
                raise diverged(self.algo, f"after step {step + 1}",
                               f"a weight of block {self.block} is not finite",
                               f"lower the learning rate (lr={self.trainer.lrs})")

    def waited(self, step: int, mb: int = 0, until: float | None = None) -> None:
        """Record the time from the end of the last span to ``until`` (default:
        now) as a ``wait`` span (the thread was blocked in a library call,
        e.g. a pipeline schedule's receives or final send waits), so that
        the next compute span does not absorb it."""
        t1 = self.now() if until is None else until
        self.cursor.wait(self.rows, self.rank, self.block, step, mb, t1, t1)


def _local_update(c: BlockCtx, out: torch.Tensor, y: torch.Tensor, t: int) -> None:
    """DGL's local step (``dgl.local_update``) with each phase timed as a span."""
    loss = local_update(out, local_head(c.net, c.block - 1), c.optimizer, y, c.loss_fn,
                        timed=lambda phase: c.op(phase, t))
    c.updates += 1
    c.record_loss(loss, t)


# -------------------------------------------------------------------- bp
def bp_step(c: BlockCtx, t: int) -> Step:
    """Backprop, fully locked: activations forward, gradients back, each block
    updates right after its backward (``bpsim.sim.schedules.bp``)."""
    if c.first:
        h = c.plan.x(t)
    else:
        h = (yield Recv(c.block - 1, t)).requires_grad_()
    with c.op("fwd", t):
        out = c.module(h)
        if c.last:
            loss = c.loss_fn(out, c.plan.y(t))
    if c.last:
        with c.op("bwd", t):
            c.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        c.record_loss(loss.item(), t, "loss")
    else:
        yield Send(c.block + 1, out.detach(), t)
        g = yield Recv(c.block + 1, t)
        with c.op("bwd", t):
            c.optimizer.zero_grad(set_to_none=True)
            out.backward(g)
    if not c.first:
        yield Send(c.block - 1, h.grad, t)
    c.update(t)


# ------------------------------------------------------------------- dgl
def dgl_step(c: BlockCtx, t: int) -> Step:
    """Synchronous DGL (DGL Alg. 1/3): forward, send at once, then the local
    aux loss, backward and update (``bpsim.sim.schedules.dgl``)."""
    h = c.plan.x(t) if c.first else (yield Recv(c.block - 1, t))
    with c.op("fwd", t):
        out = block_forward(c.module, h)
    if not c.last:
        yield Send(c.block + 1, out.detach(), t)
    _local_update(c, out, c.plan.y(t), t)


def bwbpf_step(c: BlockCtx, t: int) -> Step:
    """BWBPF (Sec. 3): as :func:`dgl_step`, except that the last block also
    feeds its detached output to the output layer, which alone learns from
    the global loss (``bwbpf.last_block_update``: ``aux``, ``loss``, ``bwd``,
    ``update``; ``bpsim.sim.schedules.bwbpf``)."""
    if not c.last:
        yield from dgl_step(c, t)
        return
    h = c.plan.x(t) if c.first else (yield Recv(c.block - 1, t))
    with c.op("fwd", t):
        out = block_forward(c.module, h)
    y = c.plan.y(t)
    local, glob = last_block_update(out, c.net.heads[c.block - 1], c.net.output, c.optimizer,
                                    c.trainer.optimizers[c.K], y, c.loss_fn, c.loss_fn,
                                    timed=lambda phase: c.op(phase, t))
    c.updates += 1
    c.record_loss(local, t)
    c.record_loss(glob, t, "global loss")


def greedy_stage(steps: int, t: int) -> int:
    """The block (1-based) that trains at step ``t`` of a greedy run whose
    stages have ``steps`` steps each (``bpsim.sim.schedules.greedy``)."""
    return t // steps + 1


def greedy_step(c: BlockCtx, t: int) -> Step:
    """Sequential greedy training (DGL Sec. 2.2) over ``K`` stages of ``steps``
    steps each (steps ``0..K steps - 1``, numbered across the stages).

    In stage ``s`` block ``s`` trains on its auxiliary loss as in
    :func:`dgl_step`; blocks ``1..s-1`` are frozen (evaluation mode, no
    gradient) and only forward their output; blocks above ``s`` wait for
    their stage (``GreedyTrainer`` scores them, which changes nothing).
    """
    stage = greedy_stage(c.plan.steps // c.K, t)
    if stage < c.block:
        return
    h = c.plan.x(t) if c.first else (yield Recv(c.block - 1, t))
    if stage == c.block:
        with c.op("fwd", t):
            out = block_forward(c.module, h)
        _local_update(c, out, c.plan.y(t), t)
        return
    c.module.eval()
    local_head(c.net, c.block - 1).eval()
    with c.op("fwd", t):
        with torch.no_grad():
            out = c.module(h)
    yield Send(c.block + 1, out, t)


def dgl_async_step(c: BlockCtx, t: int) -> Step:
    """Asynchronous DGL (DGL Alg. 2/4): block j > 1 reads the least-reused
    entry of its replay buffer and waits only while the buffer is empty
    (``bpsim.sim.schedules.dgl_async``). Every block makes ``steps`` updates.

    Block 1 trains on batch ``t``; block j > 1 on the labels of the batch
    its entry came from (``origin``), which travels on with its output."""
    if c.first:
        origin, h = t, c.plan.x(t)
    else:
        _, origin, h = yield Take(c.block - 1)
    y = c.plan.y(origin)
    with c.op("fwd", t):
        out = block_forward(c.module, h)
    if not c.last:
        yield Send(c.block + 1, out.detach(), t, origin=origin)
    c.label_batches.append(origin)
    _local_update(c, out, y, t)


# ------------------------------------------------------------- blockprop
def _cache(c: BlockCtx, name: str, like: torch.Tensor) -> torch.Tensor:
    buf = c.state.get(name)
    if buf is None:
        buf = torch.zeros((len(c.plan.x_all), *like.shape[1:]), dtype=like.dtype, device=like.device)
        c.state[name] = buf
    return buf


def _w_step(c: BlockCtx, h_in: torch.Tensor, target: torch.Tensor, t: int) -> None:
    """BlockProp's W-step of one block (Alg. 1 line 20): SGD on J_k (eq. 7)."""
    with c.op("fwd", t):
        J = c.trainer.w_objective(c.block, h_in, target, f"at step {t + 1}")
    with c.op("bwd", t):
        c.optimizer.zero_grad(set_to_none=True)
        J.backward()
    c.record_loss(J.item(), t, f"W-step objective J_{c.block}")
    c.update(t)


def blockprop_step(c: BlockCtx, t: int) -> Step:
    """BlockProp (Alg. 1), and with a cache Alg. 2 (``blockprop-cached``).

    Forward init (block k < K sends ``a_{k+1} = b_k(h_k)`` up), h-step from
    block K down to 2 (block k receives ``h*_{k+1}``, runs its h-step and
    sends ``h*_k`` down), then the W-step on ``(h*_k, h*_{k+1})``
    (``bpsim.sim.schedules.blockprop`` / ``blockprop_cached``). What a
    mini-batch does with the cache is :func:`~bpsim.algorithms.blockprop.cache_rule`,
    the trainer's rule: ``wstep`` sends nothing; ``cached`` lets every block
    compute ``b_k`` on its own cached input before the h-step chain;
    ``forward`` and ``mixed`` run the forward chain.
    """
    k, tr = c.block, c.trainer
    every = getattr(tr, "cache_every", None)
    kind = c.plan.cache_kind(t, every)
    idx = c.plan.idx[t]
    x = c.plan.x(t) if c.first else None
    y = c.plan.y(t) if c.last else None
    if kind == "wstep":   # Alg. 2: no messages at all
        h_in = x if c.first else c.state["h_in"][idx]
        target = y if c.last else c.state["target"][idx]
        _w_step(c, h_in, target, t)
        return
    present = c.plan.present(t).to(c.device) if kind != "forward" else None
    cached_in = c.state["h_in"][idx] if (present is not None and not c.first) else None
    start = a = None
    if not c.first and kind != "cached":
        a = yield Recv(k - 1, t)                     # a_k = b_{k-1}(h_{k-1}), chained
        start = start_point(a, cached_in, present)
    elif not c.first:
        start = cached_in
    if not c.last:                                   # initialise h_{k+1} (Alg. 1 line 5)
        with c.op("fwd", t):
            nxt = forward_init(c.module, x if c.first else start)
        yield Send(k + 1, nxt, t)
    if not c.first and kind == "cached":
        a = yield Recv(k - 1, t)                     # a_k from block k-1's cached input
    if c.last:
        target = y
    else:
        target = yield Recv(k + 1, t)                # h*_{k+1}
        if every is not None:
            _cache(c, "target", target)[idx] = target
    if c.first:
        h_in = x
    else:
        nh = tr.nh
        t0 = c.begin()
        h_star = tr.h_update(k, a, target, start if kind != "forward" else None,
                             f"at step {t + 1}")
        if nh > 0:
            t1 = c._finish("hstep", t0, t)
            if c.rows is not None:   # one span per iteration, equal shares
                c.rows.pop()
                d = (t1 - t0) / nh
                for i in range(nh):
                    c.rows.append((c.rank, "compute", "hstep", k, t, 0, t0 + i * d,
                                   t1 if i == nh - 1 else t0 + (i + 1) * d, None))
        yield Send(k - 1, h_star, t)
        if every is not None:
            _cache(c, "h_in", h_star)[idx] = h_star
        h_in = h_star
    _w_step(c, h_in, target, t)


# ----------------------------------------------------------- message plans
def _items(plan: BatchPlan, shape: tuple[int, ...], steps: Iterable[int]
           ) -> list[tuple[int, int, tuple[int, ...]]]:
    return [(t, 0, (plan.size(t), *shape)) for t in steps]


def _chain_in(block: int, blocks: int, plan: BatchPlan, in_shape: tuple[int, ...],
              out_shape: tuple[int, ...], trainer: Any) -> list[Inbound]:
    """One activation per step from the block below (``dgl``, ``bwbpf``)."""
    return [Inbound(block - 1, _items(plan, in_shape, range(plan.steps)))] if block > 1 else []


def _bp_in(block: int, blocks: int, plan: BatchPlan, in_shape: tuple[int, ...],
           out_shape: tuple[int, ...], trainer: Any) -> list[Inbound]:
    """Activations from below and gradients from above, every step."""
    links = _chain_in(block, blocks, plan, in_shape, out_shape, trainer)
    if block < blocks:
        links.append(Inbound(block + 1, _items(plan, out_shape, range(plan.steps))))
    return links


def _async_in(block: int, blocks: int, plan: BatchPlan, in_shape: tuple[int, ...],
              out_shape: tuple[int, ...], trainer: Any) -> list[Inbound]:
    """Every output of the block below, into a replay buffer."""
    return [Inbound(block - 1, _items(plan, in_shape, range(plan.steps)), buffered=True)] \
        if block > 1 else []


def _greedy_in(block: int, blocks: int, plan: BatchPlan, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], trainer: Any) -> list[Inbound]:
    """Activations from below in the stages of this block and those above it."""
    n = plan.steps // blocks
    steps = [t for t in range(plan.steps) if greedy_stage(n, t) >= block]
    return [Inbound(block - 1, _items(plan, in_shape, steps))] if block > 1 else []


def _blockprop_in(block: int, blocks: int, plan: BatchPlan, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...], trainer: Any) -> list[Inbound]:
    """a_k from below and h*_{k+1} from above, in every step with an h-step."""
    every = getattr(trainer, "cache_every", None)
    steps = [t for t in range(plan.steps) if plan.cache_kind(t, every) != "wstep"]
    links = []
    if block > 1:
        links.append(Inbound(block - 1, _items(plan, in_shape, steps)))
    if block < blocks:
        links.append(Inbound(block + 1, _items(plan, out_shape, steps)))
    return links


def _plan(inbound: Callable[..., list[Inbound]], stages: bool = False) -> Callable[[Callable], Callable]:
    """Attach a step's message plan: ``step.inbound(block, K, plan, in_shape,
    out_shape, trainer)`` lists the links the block receives on, and
    ``step.stages`` says whether a run of ``steps`` steps is ``K`` stages of
    ``steps`` steps (``greedy``)."""
    def mark(step: Callable) -> Callable:
        step.inbound = inbound          # type: ignore[attr-defined]
        step.stages = stages            # type: ignore[attr-defined]
        return step
    return mark


bp_step = _plan(_bp_in)(bp_step)
dgl_step = _plan(_chain_in)(dgl_step)
bwbpf_step = _plan(_chain_in)(bwbpf_step)
dgl_async_step = _plan(_async_in)(dgl_async_step)
greedy_step = _plan(_greedy_in, stages=True)(greedy_step)
blockprop_step = _plan(_blockprop_in)(blockprop_step)


def inbound_links(step: Callable, block: int, blocks: int, plan: BatchPlan,
                  in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                  trainer: Any = None) -> list[Inbound]:
    """The messages block ``block`` receives when it runs ``step``, link by link, in order.

    ``in_shape``/``out_shape`` are the per-example shapes of the block's
    input and output; a message of step t has ``plan.size(t)`` rows.
    """
    return step.inbound(block, blocks, plan, in_shape, out_shape, trainer)
