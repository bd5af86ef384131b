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

``dgl-async`` is ``dgl`` with block j > 1 reading its input from a replay
buffer instead of waiting for block j - 1 (:class:`bpsim.replay.ReplayBuffer`,
least-reused entry first). ``gpipe`` and ``1f1b`` use
``torch.distributed.pipelining`` instead (:mod:`bpsim.runtime.pipeline`).

Spans: every compute op is timed by :meth:`BlockCtx.op`. A span starts
where the thread's previous span (or wait) ended, so the bookkeeping
between two ops -- indexing the next batch, queueing a message -- counts
towards the next op: a busy rank's compute lane has no holes, and the
simulator, which knows only op costs, sees every second the rank spent.
``wait`` spans cover the time the thread waited for a message. A slowed block
(``--slowdown BLOCK:S``) does ``S - 1`` times each op's duration of extra
real work (small matrix products) inside the same span. ``dgl``'s
``local_update`` runs head, loss, backward and step in one call; the runtime
hands it an optimizer stand-in whose ``zero_grad``/``step`` mark the cuts,
which gives an ``aux`` span (head forward and loss), a ``bwd`` span (the
backward through head and block) and an ``update`` span without a second
copy of the math. BlockProp's N_h h-step iterations run in one call of
``h_update``; their time is drawn as N_h equal ``hstep`` spans (the
simulator's unit is one iteration).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Generator, Iterator

import torch
from torch import nn

from bpsim.algorithms.base import DivergenceError
from bpsim.algorithms.blockprop import frozen_running_stats, h_update, w_loss
from bpsim.algorithms.dgl import block_forward, local_head, local_update
from bpsim.objectives import block_map
from bpsim.runtime.comm import Cursor, Inbound, Recv, Send, Take

__all__ = ["BatchPlan", "BlockCtx", "SCHEDULES", "inbound_links", "burn", "STEP_ALGOS"]

Step = Generator[Any, Any, None]


# ----------------------------------------------------------------- batches
class BatchPlan:
    """The mini-batches of a run: the in-process trainer's seeded order.

    Step ``t`` uses batch ``t`` of the concatenated epochs
    ``Trainer._batches(n, 0) + Trainer._batches(n, 1) + ...``, so a run of
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
            batches = trainer._batches(n, epoch)
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
        self.steps_per_epoch = len(trainer._batches(n, 0))

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
    """

    def __init__(self, block: int, blocks: int, rank: int, net: Any, trainer: Any,
                 plan: BatchPlan, now: Callable[[], float], rows: list | None,
                 device: torch.device, slow: float = 1.0, cursor: Cursor | None = None) -> None:
        self.block, self.K, self.rank = block, blocks, rank
        self.first, self.last = block == 1, block == blocks
        self.net, self.trainer, self.plan = net, trainer, plan
        self.module: nn.Module = net.blocks[block - 1]
        self.optimizer = trainer.optimizers[block - 1]
        self.loss_fn = trainer.loss
        self.now, self.rows, self.device = now, rows, device
        self.slow = float(slow)
        self.sync = device.type == "cuda"
        self.updates = 0
        self.losses: list[float] = []
        self.state: dict[str, Any] = {}
        self._burn_work = torch.full((64, 64), 1.0 / 64) if self.slow != 1.0 else None
        self.cursor = cursor if cursor is not None else Cursor()

    def begin(self) -> float:
        """Start of the next compute span: where the last one (or a wait) ended."""
        t = self.cursor.t
        return self.now() if t is None else t

    def _finish(self, name: str, t0: float, step: int, mb: int = 0) -> float:
        """Close a compute span opened at ``t0``: sync, slowdown work, record."""
        if self.sync:
            torch.cuda.synchronize(self.device)
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

    def waited(self, step: int, mb: int = 0, until: float | None = None) -> None:
        """Record the time from the end of the last span to ``until`` (default:
        now) as a ``wait`` span (the thread was blocked in a library call,
        e.g. a pipeline schedule's receives or final send waits), so that
        the next compute span does not absorb it."""
        t1 = self.now() if until is None else until
        self.cursor.wait(self.rows, self.rank, self.block, step, mb, t1, t1)


class _PhaseOptimizer:
    """Optimizer stand-in that cuts ``dgl.local_update`` into spans.

    ``local_update`` computes the head and the loss, calls ``zero_grad``,
    runs the backward, then ``step``: the calls mark where ``aux`` ends and
    ``bwd`` begins, and where ``update`` begins.
    """

    def __init__(self, ctx: BlockCtx, step: int) -> None:
        self.ctx, self.step_no = ctx, step
        self.t = ctx.begin()
        self.phase = "aux"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.t = self.ctx._finish("aux", self.t, self.step_no)
        self.ctx.optimizer.zero_grad(set_to_none=set_to_none)
        self.phase = "bwd"

    def step(self) -> None:
        c = self.ctx
        t = c._finish(self.phase, self.t, self.step_no)
        c.optimizer.step()
        self.t = c._finish("update", t, self.step_no)
        self.phase = "done"

    def close(self) -> None:
        if self.phase != "done":  # local_update did not call zero_grad/step as expected
            self.ctx._finish(self.phase, self.t, self.step_no)


def _local_update(c: BlockCtx, out: torch.Tensor, y: torch.Tensor, t: int) -> None:
    phases = _PhaseOptimizer(c, t)
    loss = local_update(out, local_head(c.net, c.block - 1), phases, y, c.loss_fn)  # type: ignore[arg-type]
    phases.close()
    c.updates += 1
    c.losses.append(loss)


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
        c.losses.append(loss.item())
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


def dgl_async_step(c: BlockCtx, t: int) -> Step:
    """Asynchronous DGL (DGL Alg. 2/4): block j > 1 reads the least-reused
    entry of its replay buffer and waits only while the buffer is empty
    (``bpsim.sim.schedules.dgl_async``). Every block makes ``steps`` updates."""
    if c.first:
        h, y = c.plan.x(t), c.plan.y(t)
    else:
        s, h = yield Take(c.block - 1)
        y = c.plan.y(s)
    with c.op("fwd", t):
        out = block_forward(c.module, h)
    if not c.last:
        yield Send(c.block + 1, out.detach(), t)
    _local_update(c, out, y, t)


# ------------------------------------------------------------- blockprop
def _cache_mode(c: BlockCtx, t: int) -> str:
    """``plain`` (Alg. 1 step), ``hstep-cached`` (h-step from the cache) or
    ``wstep-only`` (W-step on cached h*, Alg. 2)."""
    every = getattr(c.trainer, "cache_every", None)
    if every is None:
        return "plain"
    epoch = c.plan.epochs[t]
    if epoch == 0:
        return "plain"
    return "hstep-cached" if epoch % every == 0 else "wstep-only"


def _cache(c: BlockCtx, name: str, like: torch.Tensor) -> torch.Tensor:
    buf = c.state.get(name)
    if buf is None:
        buf = torch.zeros((len(c.plan.x_all), *like.shape[1:]), dtype=like.dtype, device=like.device)
        c.state[name] = buf
    return buf


def _w_step(c: BlockCtx, h_in: torch.Tensor, target: torch.Tensor, t: int) -> None:
    """BlockProp's W-step of one block (Alg. 1 line 20): SGD on J_k (eq. 7)."""
    k, tr = c.block, c.trainer
    with c.op("fwd", t):
        J = w_loss(block_map(c.net, k), h_in, target, None if c.last else tr.lams[k - 1], c.loss_fn)
    v = J.item()
    if v != v or v in (float("inf"), float("-inf")):
        raise DivergenceError(f"{tr.name} diverged at step {t + 1}: block {k}'s W-step objective "
                              f"J_{k} is {v}; use a smaller lr_h (now {tr.lr_h}), a different lam "
                              f"(now {tr.lams}) or a lower learning rate (lr={tr.lrs})")
    with c.op("bwd", t):
        c.optimizer.zero_grad(set_to_none=True)
        J.backward()
    c.losses.append(v)
    c.update(t)


def blockprop_step(c: BlockCtx, t: int) -> Step:
    """BlockProp (Alg. 1), and with a cache Alg. 2 (``blockprop-cached``).

    Forward init (block k < K sends ``b_k(h_k)`` up), h-step from block K
    down to 2 (block k receives ``h*_{k+1}``, runs ``h_update`` and sends
    ``h*_k`` down), then the W-step on ``(h*_k, h*_{k+1})``
    (``bpsim.sim.schedules.blockprop`` / ``blockprop_cached``).
    """
    k, tr = c.block, c.trainer
    mode = _cache_mode(c, t)
    idx = c.plan.idx[t]
    x = c.plan.x(t) if c.first else None
    y = c.plan.y(t) if c.last else None
    if mode == "wstep-only":   # Alg. 2: no messages at all
        h_in = x if c.first else c.state["h_in"][idx]
        target = y if c.last else c.state["target"][idx]
        _w_step(c, h_in, target, t)
        return
    cached = mode == "hstep-cached"
    h_own = None if (c.first or not cached) else c.state["h_in"][idx]
    a = None
    if not c.first and not cached:
        a = yield Recv(k - 1, t)                     # a_k = b_{k-1}(h_{k-1}), chained
    if not c.last:                                   # initialise h_{k+1} (Alg. 1 line 5)
        with c.op("fwd", t):
            with torch.no_grad(), frozen_running_stats(c.module):
                nxt = c.module(x if c.first else (h_own if cached else a))
        yield Send(k + 1, nxt, t)
    if not c.first and cached:
        a = yield Recv(k - 1, t)                     # a_k from block k-1's cached input
    if c.last:
        target = y
    else:
        target = yield Recv(k + 1, t)                # h*_{k+1}
        if getattr(tr, "cache_every", None) is not None:
            _cache(c, "target", target)[idx] = target
    if c.first:
        h_in = x
    else:
        nh = tr.nh
        t0 = c.begin()
        h_star = h_update(block_map(c.net, k), a, target, tr.lams[k - 2],
                          None if c.last else tr.lams[k - 1], nh, tr.lr_h[k - 2],
                          loss_fn=c.loss_fn, h0=h_own)
        if nh > 0:
            t1 = c._finish("hstep", t0, t)
            if c.rows is not None:   # one span per iteration, equal shares
                c.rows.pop()
                d = (t1 - t0) / nh
                for i in range(nh):
                    c.rows.append((c.rank, "compute", "hstep", k, t, 0, t0 + i * d,
                                   t1 if i == nh - 1 else t0 + (i + 1) * d, None))
        yield Send(k - 1, h_star, t)
        if getattr(tr, "cache_every", None) is not None:
            _cache(c, "h_in", h_star)[idx] = h_star
        h_in = h_star
    _w_step(c, h_in, target, t)


SCHEDULES: dict[str, Callable[[BlockCtx, int], Step]] = {
    "bp": bp_step, "dgl": dgl_step, "dgl-async": dgl_async_step,
    "blockprop": blockprop_step, "blockprop-cached": blockprop_step,
}
STEP_ALGOS = tuple(SCHEDULES)


def inbound_links(algo: str, block: int, blocks: int, plan: BatchPlan,
                  in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                  cache_every: int | None = None) -> list[Inbound]:
    """The messages block ``block`` receives during a run, link by link, in order.

    ``in_shape``/``out_shape`` are the per-example shapes of the block's
    input and output; a message of step t has ``plan.size(t)`` rows.
    """
    k = block
    links: list[Inbound] = []

    def items(shape: tuple[int, ...], steps: list[int]) -> list[tuple[int, int, tuple[int, ...]]]:
        return [(t, 0, (plan.size(t), *shape)) for t in steps]

    every = range(plan.steps)
    if algo in ("bp", "dgl", "dgl-async"):
        if k > 1:
            links.append(Inbound(k - 1, items(in_shape, list(every)), buffered=algo == "dgl-async"))
        if algo == "bp" and k < blocks:
            links.append(Inbound(k + 1, items(out_shape, list(every))))
    elif algo in ("blockprop", "blockprop-cached"):
        steps = [t for t in every
                 if cache_every is None or plan.epochs[t] == 0 or plan.epochs[t] % cache_every == 0]
        if k > 1:
            links.append(Inbound(k - 1, items(in_shape, steps)))
        if k < blocks:
            links.append(Inbound(k + 1, items(out_shape, steps)))
    else:
        raise ValueError(f"{algo!r} has no step schedule; choose one of {', '.join(STEP_ALGOS)}")
    return links
