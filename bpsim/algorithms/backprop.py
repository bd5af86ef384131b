"""End-to-end backpropagation: the baseline every other method is measured against.

All blocks wait for the forward pass to reach the loss and for the gradient
to come back (forward, update and backward locking, DGL Sec. 1): the step is
one forward, one backward, then every block's SGD update.
"""

from __future__ import annotations

import torch

from bpsim.algorithms.base import StepResult, Trainer, method_keywords

__all__ = ["BackpropTrainer"]


class BackpropTrainer(Trainer):
    """Plain SGD on the global loss through all blocks (``bp``)."""

    name = "bp"
    options = method_keywords(name)   # none; gpipe's and 1f1b's microbatches shape the pipeline

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepResult:
        self.zero_grad()
        loss = self.loss(self.net(x), y)
        loss.backward()
        for o in self.optimizers:
            o.step()
        return StepResult(loss.item())
