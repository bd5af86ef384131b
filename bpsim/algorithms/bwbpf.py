"""Block-wise BP-free training (BWBPF), as its paper describes it.

BWBPF (arXiv 2312.13311, "Method Summary" in papers/bwbpf-summary.md): the
network is cut into K blocks; each block has a dense head (global average
pooling + ``nn.Linear`` after conv blocks, ``nn.Linear`` after MLP blocks;
``nets.make_head('linear', ...)``) scored with a local cross-entropy loss;
the global loss is used for the output layer only. Per mini-batch::

    h_0 = x
    for k = 1..K-1: out = block_forward(block_k, h_{k-1})           # detached input
                    local_update(out, head_k, optimizer_k, y, CE)   # block k + its head
                    h_k = out
    out = block_forward(block_K, h_{K-1})
    last_block_update(out, head_K, output_layer, ...)               # local + global loss

:func:`last_block_update` is the last block's step, written once for the
trainer and the runtime: its head's local loss (``aux``), the output
layer's global loss on the detached features (``loss``), one backward for
both (their graphs are disjoint, so each parameter gets exactly the
gradient of its own loss) and both optimizer steps (``update``).

The authors' public code never detaches between blocks, so there the global
loss still trains every block; bpsim follows the paper (isolated blocks, the
global loss reaching only the output layer), which ``tests/test_isolation``
checks gradient by gradient. BWBPF's difference from DGL is where the
classifier sits: every block (the last included) has its own linear head,
and the network's prediction comes from a separate output layer fed by the
last block's features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ContextManager

import torch
from torch import nn

from bpsim.algorithms import dgl
from bpsim.algorithms.base import StepResult, Trainer, method_aux, method_keywords
from bpsim.algorithms.dgl import LossFn, _HeadTally, block_forward, local_update, untimed
from bpsim.nets import BlockNet

__all__ = ["BWBPFTrainer", "last_block_update"]


def last_block_update(out: torch.Tensor, head: nn.Module, output: nn.Module,
                      block_optimizer: torch.optim.Optimizer,
                      output_optimizer: torch.optim.Optimizer, y: torch.Tensor,
                      head_loss: LossFn, output_loss: LossFn,
                      timed: Callable[[str], ContextManager[None]] = untimed) -> tuple[float, float]:
    """The last block's BWBPF step: local loss of its head and global loss of
    the output layer (BWBPF Sec. 3, "the global loss is used for the output
    layer only").

    ``out`` is block K's output (graph to block K only). The output layer
    sees ``out.detach()``, so the global loss reaches the output layer alone.
    ``timed(phase)`` wraps the phases ``"aux"`` (head, local loss and its
    backward to the block's output), ``"loss"`` (output layer, global loss
    and its backward to the output layer), ``"bwd"`` (backward through the
    block) and ``"update"``, as in :func:`bpsim.algorithms.dgl.local_update`.

    Returns
    -------
    (local loss, global loss), before the update.
    """
    with timed("aux"):
        block_optimizer.zero_grad(set_to_none=True)
        output_optimizer.zero_grad(set_to_none=True)
        local = dgl.local_loss(out, head, y, head_loss)
        grad_out = dgl.head_backward(local, out, head)
    with timed("loss"):
        glob = dgl.local_loss(out.detach(), output, y, output_loss)
        glob.backward()
    with timed("bwd"):
        dgl.block_backward(out, grad_out)
    with timed("update"):
        block_optimizer.step()
        output_optimizer.step()
    return local.item(), glob.item()


class BWBPFTrainer(Trainer):
    """BWBPF (``bwbpf``): local CE per block, global CE for the output layer only.

    The net must have a head on every block and a separate output layer:
    ``nets.build(..., aux='linear', output_layer=True)`` (what ``bpsim train
    bwbpf`` builds). ``predict`` is the ordinary forward pass, whose last step
    is the output layer. ``StepResult.loss`` is the global loss (the output
    layer's), ``local_losses`` the K block losses; ``epoch_extra`` reports the
    running training accuracy of every block head and of the output layer.
    """

    name = "bwbpf"
    aux_default = method_aux(name)
    output_layer = True
    options: tuple[str, ...] = method_keywords(name)

    def __init__(self, net: BlockNet, **kwargs: Any) -> None:
        if net.output is None:
            raise ValueError("bwbpf trains a separate output layer with the global loss; "
                             "build the net with output_layer=True (nets.build(..., output_layer=True))")
        if net.heads is None:
            raise ValueError("bwbpf needs a dense head on every block; build the net with aux='linear'")
        super().__init__(net, **kwargs)
        # K block heads, then the output layer
        self._tally = _HeadTally(len(net) + 1, self.loss, self.task == "classification")

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepResult:
        K, h, local = len(self.net), x, []
        for k, block in enumerate(self.net.blocks[:-1]):
            out = block_forward(block, h)
            local.append(local_update(out, self.net.heads[k], self.optimizers[k], y, self._tally.loss_fn(k)))
            h = out
        out = block_forward(self.net.blocks[K - 1], h)
        last, glob = last_block_update(out, self.net.heads[K - 1], self.net.output,
                                       self.optimizers[K - 1], self.optimizers[K], y,
                                       self._tally.loss_fn(K - 1), self._tally.loss_fn(K))
        return StepResult(glob, local + [last])

    def epoch_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self._tally.classification:
            acc = self._tally.accuracies()
            extra["head_train_accuracy"] = acc[:-1]
            extra["output_train_accuracy"] = acc[-1]
        self._tally.reset()
        return extra
