"""GPipe and 1F1B pipelines on ``torch.distributed.pipelining``.

Rank k wraps its block in a :class:`TracedStage` (a ``PipelineStage`` that
records spans) and drives ``ScheduleGPipe`` (all forwards, then all
backwards, then one update per step) or ``Schedule1F1B`` (one forward, one
backward in the steady state) over ``--microbatches`` micro-batches; the
schedule does the sends and receives itself. After each step every rank
takes one optimizer step (``update``). Gradients are averaged over the
micro-batches, so a step is the same SGD step as backprop on the whole
batch.

The stage records ``fwd``/``bwd`` spans per micro-batch around
``forward_one_chunk``/``backward_one_chunk``; a ``recv`` span runs from the
moment the schedule asks for a receive (``get_*_recv_ops``) to the start of
the compute that needed it (on the compute lane that time is a ``wait``;
without a receive the op starts where the last span ended, so the schedule's
own bookkeeping between chunks counts towards the next op, as elsewhere in
the runtime), and a ``send`` span marks when an output was
handed to the schedule (``get_*_send_ops``). On CUDA the schedule's
``work.wait()`` returns at once (NCCL only makes the compute stream wait for
the transfer), so before a compute op that needed a receive the stream is
synchronised on the host: the op starts when the data is there, and the
time until then stays a ``wait``. Messages keep per-link
sequence numbers, so every send is paired with its receive. At the end of a
step the schedule waits until the last backward sends are taken by the
previous stage: that time is a ``wait`` span, not part of the ``update``
(the schedule's own gradient scaling is switched off and done inside the
``update`` span instead, so the span holds exactly the optimizer's work).

Limits: micro-batch shapes are fixed after the first step, so batches
smaller than ``--batch-size`` (the end of an epoch) are skipped. With
``--workers 1`` the single stage holds all blocks (its spans say block 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bpsim.runtime.comm import msg_id
from bpsim.runtime.schedules import BlockCtx

__all__ = ["run_pipeline"]


def _traced_stage_class() -> type:
    from torch.distributed.pipelining import PipelineStage

    class TracedStage(PipelineStage):
        """A ``PipelineStage`` that records bpsim spans (see the module docstring)."""

        def _setup_trace(self, ctx: BlockCtx, stage_block: int, blocks: int) -> None:
            self.ctx, self.sb, self.nb = ctx, stage_block, blocks
            self.step_no = 0
            self._recv: tuple[float, int, int] | None = None   # (t0, msg, mb)
            self._seq = {"fwd_in": 0, "fwd_out": 0, "bwd_in": 0, "bwd_out": 0}

        def _next(self, key: str) -> int:
            n = self._seq[key]
            self._seq[key] = n + 1
            return n

        def _close_recv(self, t: float) -> None:
            c = self.ctx
            if self._recv is not None and c.rows is not None:
                t0, msg, mb = self._recv
                c.rows.append((c.rank, "comm", "recv", self.sb, self.step_no, mb, t0, t, msg))
            self._recv = None

        def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list:
            ops = super().get_fwd_recv_ops(fwd_chunk_id)
            if ops:
                msg = msg_id(self.sb - 1, self.sb, self._next("fwd_in"), self.nb)
                self._recv = (self.ctx.now(), msg, fwd_chunk_id)
            return ops

        def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list:
            ops = super().get_bwd_recv_ops(bwd_chunk_id)
            if ops:
                msg = msg_id(self.sb + 1, self.sb, self._next("bwd_in"), self.nb)
                self._recv = (self.ctx.now(), msg, bwd_chunk_id)
            return ops

        def _send_span(self, ops: list, key: str, dst: int, mb: int, t0: float) -> None:
            c = self.ctx
            if ops:
                msg = msg_id(self.sb, dst, self._next(key), self.nb)
                if c.rows is not None:
                    c.rows.append((c.rank, "comm", "send", self.sb, self.step_no, mb, t0,
                                   c.now(), msg))

        def get_fwd_send_ops(self, fwd_chunk_id: int) -> list:
            t0 = self.ctx.now()
            ops = super().get_fwd_send_ops(fwd_chunk_id)
            self._send_span(ops, "fwd_out", self.sb + 1, fwd_chunk_id, t0)
            return ops

        def get_bwd_send_ops(self, bwd_chunk_id: int) -> list:
            t0 = self.ctx.now()
            ops = super().get_bwd_send_ops(bwd_chunk_id)
            self._send_span(ops, "bwd_out", self.sb - 1, bwd_chunk_id, t0)
            return ops

        def _start(self, mb: int) -> float:
            """Start of a compute span. After a receive the thread waited
            for the message: that time (from the end of the last span) is a
            ``wait`` span and the op starts now. Otherwise the op starts where
            the last span ended, absorbing the schedule's bookkeeping in
            between (as every other runtime op does), so the compute lane
            has no holes."""
            c = self.ctx
            if self._recv is None:
                return c.begin()
            c.settle()       # CUDA: the receive completes on the stream, not at work.wait()
            t0 = c.now()
            self._close_recv(t0)
            c.waited(self.step_no, mb, until=t0)
            return t0

        def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
            t0 = self._start(fwd_chunk_id)
            out = super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
            self.ctx._finish("fwd", t0, self.step_no, fwd_chunk_id)
            return out

        def backward_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
            t0 = self._start(bwd_chunk_id)
            out = super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)
            self.ctx._finish("bwd", t0, self.step_no, bwd_chunk_id)
            return out

    return TracedStage


def run_pipeline(algo: str, ctx: BlockCtx, stage_module: nn.Module, stage_index: int,
                 num_stages: int, microbatches: int, steps: int,
                 on_step_end: Any = None) -> None:
    """Train ``steps`` steps of ``algo`` (``gpipe`` or ``1f1b``) on this rank's stage.

    Collective over the default process group: every rank calls it with its
    own ``stage_index``. ``ctx`` supplies batches, optimizer, loss, spans.
    """
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    if algo not in ("gpipe", "1f1b"):       # the two methods whose runtime is this function
        raise ValueError(f"unknown pipeline schedule {algo!r}; choose gpipe or 1f1b")
    stage = _traced_stage_class()(stage_module, stage_index, num_stages, ctx.device)
    stage._setup_trace(ctx, ctx.block, ctx.K)
    first, last = stage_index == 0, stage_index == num_stages - 1
    cls = ScheduleGPipe if algo == "gpipe" else Schedule1F1B
    if algo == "1f1b" and microbatches < num_stages:
        raise ValueError(f"1f1b needs at least as many micro-batches as stages: "
                         f"--microbatches {microbatches} < {num_stages} workers")
    schedule = cls(stage, microbatches, loss_fn=ctx.loss_fn, scale_grads=False)
    for t in range(steps):
        stage.step_no = t
        ctx.optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        if first and last:
            schedule.step(ctx.plan.x(t), target=ctx.plan.y(t), losses=losses)
        elif first:
            schedule.step(ctx.plan.x(t))
        elif last:
            schedule.step(target=ctx.plan.y(t), losses=losses)
        else:
            schedule.step()
        ctx.settle()      # CUDA: the last sends complete on the stream, not at work.wait()
        ctx.waited(t)     # the schedule's wait for its last sends to be taken
        if losses:
            ctx.record_loss(float(torch.stack([v.detach() for v in losses]).mean()), t, "loss",
                            block=ctx.K)     # the last block computes it, whatever the stage
        ctx.update(t, grad_scale=1.0 / microbatches)
        if on_step_end is not None:
            on_step_end(t)
    ctx.check_weights(steps - 1)
