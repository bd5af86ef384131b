"""Decoupled Greedy Learning: each block learns from its own auxiliary loss.

DGL (Belilovsky, Eickenberg, Oyallon), Sec. 2.2. Block ``j`` is followed by a
small auxiliary classifier (its *head*); the pair is trained on the local
cross-entropy of the head's prediction, with the block's input treated as a
constant. No gradient ever crosses a block boundary, so a block may update as
soon as its own forward pass is done (update unlocking).

The math lives in two per-block functions, written once and shared by every
executor (this module's trainers, the single-process asynchronous emulation
in ``async_dgl``, BWBPF in ``bwbpf`` and the one-process-per-block runtime)::

    out  = block_forward(block, h_in)                         # detach, then f_theta_j
    loss = local_update(out, head, optimizer, y, loss_fn)     # aux loss, step

Trainers here:

* ``DGLTrainer`` (``dgl``) -- DGL Alg. 1 (synchronous): per mini-batch, every
  block in turn runs on the detached output of the block below and steps on
  its own loss.
* ``GreedyTrainer`` (``greedy``) -- the sequential solver of the same greedy
  problems (P_j) (Sec. 2.2, and the "sequential vs. parallel" comparison of
  Sec. 4.1): block ``j`` is trained to the end of its share of the epochs
  before block ``j + 1`` starts, on the frozen outputs of blocks ``1..j-1``.

``input_drift`` measures the quantity behind Corollary 3.1: how far block
``j - 1``'s outputs still are from their final values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, ContextManager

import torch
from torch import nn
from torch.utils.data import TensorDataset

from bpsim.algorithms.base import StepResult, Trainer, method_aux, method_keywords
from bpsim.nets import BlockNet, split_evenly

__all__ = [
    "block_forward", "local_loss", "local_update", "head_backward", "block_backward", "local_head", "untimed",
    "DGLTrainer", "GreedyTrainer", "probe_outputs", "input_drift",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------- per-block functions
def block_forward(block: nn.Module, h_in: torch.Tensor) -> torch.Tensor:
    """Run one block on its input, cut from the graph below (DGL Alg. 1, line 4).

    Parameters
    ----------
    block : nn.Module
        The block ``f_theta_j``.
    h_in : torch.Tensor
        Its input: the data for block 1, otherwise the previous block's output
        (live, from a buffer, or received from another process).

    Returns
    -------
    torch.Tensor
        The block's output. Its graph reaches ``block``'s parameters only:
        ``h_in`` is detached first, so no gradient can flow into earlier blocks.
    """
    return block(h_in.detach())


def local_loss(out: torch.Tensor, head: nn.Module, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """The local objective of one block: its head's prediction scored against ``y``.

    This is the empirical risk ``L^(y, x_j; gamma_j, theta_j)`` of DGL Sec. 2.2
    (Alg. 1, line 5) on one mini-batch, before any backward pass.
    """
    return loss_fn(head(out), y)


def head_backward(loss: torch.Tensor, out: torch.Tensor, head: nn.Module) -> torch.Tensor | None:
    """Backpropagate a local ``loss`` through ``head`` only, down to ``out``.

    Accumulates the head's parameter gradients and returns the loss
    gradient at the block's output ``out`` (``None`` when ``out`` needs no
    gradient, in which case the whole backward is done here). With
    :func:`block_backward` it splits one backward pass at the block's
    output (the chain rule), so the two halves can be timed as the trace's
    ``aux`` and ``bwd`` ops.
    """
    if not out.requires_grad:
        loss.backward()
        return None
    params = [p for p in head.parameters() if p.requires_grad]
    grad_out, *grads = torch.autograd.grad(loss, [out, *params], allow_unused=True)
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    return grad_out


def block_backward(out: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Backpropagate ``grad`` (the loss gradient at ``out``) through the block
    that produced ``out``; nothing to do when the block has no parameters."""
    if grad is not None and out.requires_grad:
        out.backward(grad)


def untimed(phase: str) -> ContextManager[None]:
    """The default ``timed`` of :func:`local_update`: phases are not observed."""
    return nullcontext()


def local_update(
    out: torch.Tensor,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    y: torch.Tensor,
    loss_fn: LossFn,
    timed: Callable[[str], ContextManager[None]] = untimed,
) -> float:
    """One local step of a block: aux loss, backward, update (DGL Alg. 1, lines 5-6).

    Parameters
    ----------
    out : torch.Tensor
        The block's output from ``block_forward`` (graph to the block only).
    head : nn.Module
        The block's auxiliary classifier. For the last block it is the
        network's own classifier: ``net.heads[K-1]`` (the builders make it an
        ``nn.Identity`` because the last block already ends with the
        classifier), or ``net.output`` when the net has no heads at all; see
        ``local_head``.
    optimizer : torch.optim.Optimizer
        Holds the block's and the head's parameters (``Trainer.make_optimizers``
        builds one such optimizer per block).
    y : torch.Tensor
        Targets of the mini-batch.
    loss_fn : callable
        ``loss_fn(scores, y) -> scalar tensor``, e.g. ``F.cross_entropy``.
    timed : callable
        ``timed(phase)`` returns a context manager entered around each of the
        three phases, in order: ``"aux"`` (the head's forward, loss and
        backward down to the block's output: the auxiliary head's whole
        cost, the trace's ``aux`` op), ``"bwd"`` (backward through the block
        alone, the same op as backprop's) and ``"update"`` (the optimizer
        step). The runtime times each phase as a span of that name; the
        trainers leave the default, which observes nothing. The split is the
        chain rule at the block's output, so the gradients are those of one
        backward through head and block.

    Returns
    -------
    float
        The local loss before the update.
    """
    with timed("aux"):
        optimizer.zero_grad(set_to_none=True)
        loss = local_loss(out, head, y, loss_fn)
        grad_out = head_backward(loss, out, head)
    with timed("bwd"):
        block_backward(out, grad_out)
    with timed("update"):
        optimizer.step()
    return loss.item()


def local_head(net: BlockNet, k: int) -> nn.Module:
    """The module that turns block ``k``'s output (0-based) into class scores.

    Blocks ``0..K-2`` use ``net.heads[k]``. The last block uses
    ``net.heads[K-1]`` when the net has heads (an ``nn.Identity`` from the
    builders, whose last block ends with the classifier), otherwise
    ``net.output`` if there is one, otherwise ``nn.Identity`` (the block's
    output already is the prediction).
    """
    K = len(net)
    if not 0 <= k < K:
        raise ValueError(f"block index k must be in 0..{K - 1} (0-based), got {k}")
    if net.heads is not None:
        return net.heads[k]
    if k < K - 1:
        raise ValueError(
            f"block {k + 1} of {K} has no auxiliary head; build the net with aux='mlp' "
            "(or 'linear', 'mlp-sr', 'cnn') so every block but the last gets one")
    return net.output if net.output is not None else nn.Identity()


# ------------------------------------------------------------ shared helpers
class _HeadTally:
    """Running training accuracy of every head, counted inside the loss function.

    The trainers pass ``tally.loss_fn(k)`` to ``local_update``; it scores the
    head's logits (which are computed anyway) before returning the loss, so
    per-head accuracy costs one ``argmax`` per step.
    """

    def __init__(self, n: int, loss: LossFn, classification: bool) -> None:
        self.n, self.loss, self.classification = n, loss, classification
        self.reset()

    def reset(self) -> None:
        self.correct = [0] * self.n
        self.seen = [0] * self.n

    def loss_fn(self, k: int) -> LossFn:
        def fn(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if self.classification and scores.dim() == 2:
                self.correct[k] += int((scores.detach().argmax(1) == y).sum())
                self.seen[k] += len(y)
            return self.loss(scores, y)

        return fn

    def accuracies(self) -> list[float | None]:
        return [c / s if s else None for c, s in zip(self.correct, self.seen)]


def _check_dgl_net(net: BlockNet, who: str) -> None:
    if net.output is not None:
        raise ValueError(
            f"{who}: this net keeps its output layer apart (output_layer=True, BWBPF's design), "
            "but DGL trains the last block together with the classifier it ends with; "
            "build the net with output_layer=False")
    for k in range(len(net) - 1):
        local_head(net, k)  # raises a clear error when a head is missing


# ----------------------------------------------------------------- trainers
class DGLTrainer(Trainer):
    """Synchronous DGL (``dgl``), DGL Alg. 1.

    For each mini-batch, block ``j = 1..K`` runs on the detached output of
    block ``j - 1`` and takes one SGD step on its auxiliary loss; the last
    block's loss is the network's classification loss. As in the parallel
    form of the algorithm (DGL Appendix D, Alg. 3) the output passed upward is
    the one computed *before* the block's own step, so this trainer and the
    one-process-per-block runtime perform exactly the same arithmetic.

    ``StepResult.loss`` is the last block's loss, ``local_losses`` the K
    block losses; ``epoch_extra`` reports every head's running training
    accuracy over the epoch (``head_train_accuracy``; free, see
    ``_HeadTally``). Build nets with ``aux='mlp'`` (``aux_default``): on
    MLP blocks it is a 3-layer MLP head, on CNN blocks DGL's MLP-aux.
    """

    name = "dgl"
    aux_default = method_aux(name)
    output_layer = False
    options: tuple[str, ...] = method_keywords(name)

    def __init__(self, net: BlockNet, **kwargs: Any) -> None:
        _check_dgl_net(net, self.name)
        super().__init__(net, **kwargs)
        self._tally = _HeadTally(len(net), self.loss, self.task == "classification")

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepResult:
        losses, h = [], x
        for k, block in enumerate(self.net.blocks):
            out = block_forward(block, h)
            losses.append(local_update(out, local_head(self.net, k), self.optimizers[k], y,
                                       self._tally.loss_fn(k)))
            h = out
        return StepResult(losses[-1], losses)

    def epoch_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self._tally.classification:
            extra["head_train_accuracy"] = self._tally.accuracies()
        self._tally.reset()
        return extra


class GreedyTrainer(DGLTrainer):
    """Sequential greedy training (``greedy``): solve (P_1), then (P_2), ... (DGL Sec. 2.2).

    ``fit(train, epochs)`` splits its ``epochs`` among the K blocks with
    ``nets.split_evenly`` (the first ``epochs % K`` blocks get one epoch
    more): with 15 epochs and K = 2, block 1 trains in epochs 1-8 and block 2
    in epochs 9-15. During block ``j``'s share, blocks ``1..j-1`` are frozen
    (evaluation mode, no gradient) and blocks ``j+1..K`` are only evaluated.
    Pass ``epochs_per_block`` to choose the shares yourself.

    The schedule depends only on the epoch number and ``epochs``, so a resumed
    run (``fit(..., resume=True)`` with the same ``epochs``) follows it
    exactly. ``StepResult.loss`` is the network's output loss (the last
    block's), which stays near chance until the last block's turn;
    ``local_losses`` holds every block's local loss (computed without
    gradient for the blocks not in training). ``epoch_extra`` adds
    ``active_block`` (1-based).
    """

    name = "greedy"
    resume_needs_epochs = True        # the shares of the blocks depend on the epochs
    aux_default = method_aux(name)
    options = method_keywords(name)

    def __init__(self, net: BlockNet, *, epochs_per_block: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        if epochs_per_block is not None:
            epochs_per_block = [int(e) for e in epochs_per_block]
            if len(epochs_per_block) != len(net) or min(epochs_per_block) < 1:
                raise ValueError(
                    f"epochs_per_block needs {len(net)} positive integers (one per block), "
                    f"got {epochs_per_block}")
        self.epochs_per_block = epochs_per_block
        self._total_epochs: int | None = None

    def schedule(self, epochs: int) -> list[int]:
        """Epochs given to each block when ``fit`` runs ``epochs`` epochs in all."""
        if self.epochs_per_block is not None:
            if sum(self.epochs_per_block) != epochs:
                raise ValueError(
                    f"epochs_per_block={self.epochs_per_block} adds up to {sum(self.epochs_per_block)}, "
                    f"but fit was asked for {epochs} epochs; make them agree")
            return list(self.epochs_per_block)
        K = len(self.net)
        if epochs < K:
            raise ValueError(
                f"greedy training gives each of the {K} blocks at least one epoch; "
                f"ask for epochs >= {K}, got {epochs}")
        return split_evenly(epochs, K)

    def active_block(self, epoch: int) -> int:
        """0-based block trained during (0-based) ``epoch`` of the current ``fit``."""
        if self._total_epochs is None:
            raise ValueError("the greedy schedule is set by fit(train, epochs); call fit first")
        end = 0
        for k, n in enumerate(self.schedule(self._total_epochs)):
            end += n
            if epoch < end:
                return k
        return len(self.net) - 1

    def fit(self, train: TensorDataset, epochs: int, *args: Any, **kwargs: Any):
        """``Trainer.fit``, after fixing the greedy schedule for ``epochs``."""
        if isinstance(epochs, int) and epochs >= 1:
            self.schedule(epochs)  # validate before training starts
        self._total_epochs = epochs
        with warnings.catch_warnings():
            # A block waiting for its turn has not stepped its optimizer yet when
            # fit steps every learning-rate schedule at the end of an epoch.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            return super().fit(train, epochs, *args, **kwargs)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepResult:
        a = self.active_block(self.epoch)
        losses, h = [], x
        for k, block in enumerate(self.net.blocks):
            head = local_head(self.net, k)
            if k == a:
                out = block_forward(block, h)
                losses.append(local_update(out, head, self.optimizers[k], y, self._tally.loss_fn(k)))
                h = out.detach()
                continue
            # Blocks below the active one are frozen at their solution of (P_k);
            # those above are only scored. Evaluation mode for both, so neither
            # changes (no BatchNorm statistics drift).
            block.eval()
            head.eval()
            with torch.no_grad():
                h = block(h)
                losses.append(self._tally.loss_fn(k)(head(h), y).item())
        return StepResult(losses[-1], losses)

    def epoch_extra(self) -> dict[str, Any]:
        extra = super().epoch_extra()
        extra["active_block"] = self.active_block(self.epoch) + 1  # fit bumps self.epoch afterwards
        return extra


# ------------------------------------------------- Corollary 3.1 measurement
@torch.no_grad()
def probe_outputs(net: BlockNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output on a fixed probe batch ``x``, in evaluation mode.

    Call it at checkpoints during training (e.g. from a ``fit`` callback) and
    keep block ``j - 1``'s entry: those snapshots are what ``input_drift``
    compares.
    """
    was = net.training
    net.eval()
    try:
        return [h.detach().clone() for h in net.activations(x)]
    finally:
        net.train(was)


def input_drift(
    snapshots: Sequence[torch.Tensor],
    final: torch.Tensor | None = None,
    *,
    relative: bool = True,
    lrs: Sequence[float] | None = None,
) -> dict[str, list[float]]:
    """A measured proxy for ``c^t_{j-1}`` of DGL Sec. 3 and its running sum.

    DGL's analysis of block ``j`` depends on ``c^t_{j-1}``, the L1 distance
    between the density of block ``j - 1``'s outputs at time ``t`` and its
    converged density; Assumption 4 asks for ``sum_t c^t_{j-1} < inf`` and
    Corollary 3.1 (eq. 2) bounds the gradient norm of block ``j`` by
    ``sum_t sqrt(c^t) eta_t / sum_t eta_t``. Densities cannot be measured
    directly, so this uses the outputs themselves on a fixed probe batch:

        c_t = mean_i ||h_t(x_i) - h_final(x_i)||  (divided by mean_i ||h_final(x_i)||
              when ``relative``)

    which is zero exactly when the probe outputs have stopped moving.

    Parameters
    ----------
    snapshots : sequence of tensors
        Block ``j - 1``'s outputs on the same probe batch at ``t = 0, 1, ...``
        (e.g. ``probe_outputs(net, x)[j - 2]`` after every epoch).
    final : tensor, optional
        The converged outputs; default: the last snapshot.
    relative : bool
        Divide by the mean norm of the final outputs (scale-free numbers).
    lrs : sequence of float, optional
        The step sizes ``eta_t`` at the snapshots; adds the eq. (2) bound.

    Returns
    -------
    dict
        ``c`` (one value per snapshot), ``cumsum`` (running sum of ``c``) and,
        with ``lrs``, ``rate``: ``sum_{t<=T} sqrt(c_t) eta_t / sum_{t<=T} eta_t``.
    """
    if len(snapshots) == 0:
        raise ValueError("input_drift needs at least one snapshot of the probe outputs")
    ref = (snapshots[-1] if final is None else final).detach().flatten(1).double()
    scale = ref.norm(dim=1).mean().item() if relative else 1.0
    if relative and scale == 0:
        raise ValueError("the final probe outputs are all zero; use relative=False")
    c, cumsum, total = [], [], 0.0
    for t, s in enumerate(snapshots):
        s = s.detach().flatten(1).double()
        if s.shape != ref.shape:
            raise ValueError(f"snapshot {t} has shape {tuple(s.shape)} but the final outputs have "
                             f"{tuple(ref.shape)}; take every snapshot on the same probe batch")
        v = (s - ref).norm(dim=1).mean().item() / scale
        total += v
        c.append(v)
        cumsum.append(total)
    out = {"c": c, "cumsum": cumsum}
    if lrs is not None:
        if len(lrs) != len(c):
            raise ValueError(f"lrs needs one step size per snapshot ({len(c)}), got {len(lrs)}")
        num = den = 0.0
        rate = []
        for v, eta in zip(c, lrs):
            num += math.sqrt(v) * eta
            den += eta
            rate.append(num / den if den > 0 else math.nan)
        out["rate"] = rate
    return out
