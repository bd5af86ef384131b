"""Block-wise BP-free training (BWBPF), as its paper describes it.

BWBPF (arXiv 2312.13311, "Method Summary" in papers/bwbpf-summary.md): the
network is cut into K blocks; each block has a dense head (global average
pooling + ``nn.Linear`` after conv blocks, ``nn.Linear`` after MLP blocks;
``nets.make_head('linear', ...)``) scored with a local cross-entropy loss;
the global loss is used for the output layer only. Per mini-batch::

    h_0 = x
    for k = 1..K:   out = block_forward(block_k, h_{k-1})           # detached input
                    local_update(out, head_k, optimizer_k, y, CE)   # block k + its head
                    h_k = out
    local_update(h_K.detach(), output_layer, optimizer_out, y, CE)  # global loss

The authors' public code never detaches between blocks, so there the global
loss still trains every block; bpsim follows the paper (isolated blocks, the
global loss reaching only the output layer), which ``tests/test_isolation``
checks gradient by gradient. BWBPF's difference from DGL is where the
classifier sits: every block (the last included) has its own linear head,
and the network's prediction comes from a separate output layer fed by the
last block's features.
"""

from __future__ import annotations

from typing import Any

import torch

from bpsim.algorithms.base import StepResult, Trainer
from bpsim.algorithms.dgl import _HeadTally, block_forward, local_update
from bpsim.nets import BlockNet

__all__ = ["BWBPFTrainer"]


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
    aux_default = "linear"
    output_layer = True
    options: tuple[str, ...] = ()

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
        for k, block in enumerate(self.net.blocks):
            out = block_forward(block, h)
            local.append(local_update(out, self.net.heads[k], self.optimizers[k], y, self._tally.loss_fn(k)))
            h = out
        # The global loss sees the last block's features as a constant input.
        glob = local_update(h.detach(), self.net.output, self.optimizers[K], y, self._tally.loss_fn(K))
        return StepResult(glob, local)

    def epoch_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self._tally.classification:
            acc = self._tally.accuracies()
            extra["head_train_accuracy"] = acc[:-1]
            extra["output_train_accuracy"] = acc[-1]
        self._tally.reset()
        return extra
