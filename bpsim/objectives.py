"""Penalties and the augmented Lagrangian of BlockProp (eq. 4-7).

Indices (the convention of the whole library)
---------------------------------------------
Blocks are numbered ``1..K`` in text and live in ``net.blocks[0..K-1]`` in
code. The gluing variables ``h_2..h_K`` are the list ``hs[0..K-2]``, so
``h_k`` is ``hs[k-2]``; the input is ``h_1 = x`` and the target after block
``K`` is ``y``. Block ``k`` maps ``h_k`` to (something that should equal)
``h_{k+1}``; when ``net.output`` exists it is treated as the tail of block
``K``'s map, ``b_K = output o blocks[K-1]`` (see :func:`block_map`).

Penalty weights ``lams`` are one float for every gluing variable or a list
of ``K-1`` floats, ``lams[k-1] = lambda_k`` being the weight of the
constraint ``h_{k+1} = b_k(h_k)``; all must be > 0.

Every term is a *batch mean* of per-example terms, so a mini-batch objective
is the average of the per-example objectives of the paper (which is written
for one example ``n`` at a time).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from bpsim.nets import BlockNet

__all__ = [
    "penalty", "task_loss", "as_lams", "block_map",
    "augmented_loss", "block_lagrangian", "block_objective",
]

Lams = float | Sequence[float]


# --------------------------------------------------------------- the pieces
def penalty(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """The quadratic gluing penalty ``lam * ||a - b||^2`` (BlockProp eq. 4).

    Parameters
    ----------
    a, b : tensors of the same shape ``(batch, ...)``.
    lam : the weight ``lambda_k`` (> 0).

    Returns
    -------
    A scalar: the squared distance summed over features, averaged over the
    batch, times ``lam``.
    """
    if isinstance(lam, numbers.Real) and not (lam > 0 and math.isfinite(lam)):
        raise ValueError(f"a penalty weight must be > 0, got {lam}; pass a positive lambda such as 1.0")
    if a.shape != b.shape:
        raise ValueError(
            f"penalty between tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}: a gluing variable "
            "must have the shape of the block output it stands for; check the order of hs (h_2..h_K)"
        )
    d = (a - b).reshape(a.shape[0], -1) if a.dim() > 0 else (a - b).reshape(1, 1)
    return lam * d.pow(2).sum(1).mean()


def task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss ``ell(y, b_K(h_K))`` of eq. 4 as a batch mean.

    Cross-entropy when ``y`` holds integer class labels, mean squared error
    otherwise (the same losses as ``Trainer.loss``).
    """
    if not torch.is_floating_point(y):
        return nn.functional.cross_entropy(out, y)
    return nn.functional.mse_loss(out, y)


def per_gap(value: float | Sequence[float], K: int, name: str) -> list[float]:
    """One number per gluing variable: a float repeated ``K - 1`` times, or ``K - 1`` floats.

    Raises ``ValueError`` (naming ``name``) for a wrong count.
    """
    if isinstance(value, numbers.Real):
        return [float(value)] * (K - 1)
    vals = [float(v) for v in value]
    if len(vals) != K - 1:
        raise ValueError(
            f"{name} needs one value or K-1 = {K - 1} values (one per gluing variable h_2..h_{K}), got {len(vals)}"
        )
    return vals


def as_lams(lams: Lams, K: int) -> list[float]:
    """``lams`` as a list of ``K - 1`` positive floats (``lambda_1..lambda_{K-1}``).

    Raises ``ValueError`` for a wrong count or a weight that is not > 0.
    """
    vals = per_gap(lams, K, "lams")
    for k, v in enumerate(vals, start=1):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(
                f"lams must be > 0, got {v} for block {k} (the penalty between b_{k}(h_{k}) and h_{k + 1}); "
                "pass a positive penalty weight such as 1.0"
            )
    return vals


def block_map(net: BlockNet, k: int) -> nn.Module:
    """The module computing ``b_k`` (1-based ``k``).

    For ``k = K`` with a separate ``net.output`` this is
    ``Sequential(blocks[K-1], output)`` (sharing the same parameters), so the
    output layer belongs to the last block's map.
    """
    K = len(net)
    if not 1 <= k <= K:
        raise ValueError(f"block index k must be between 1 and K = {K}, got {k}")
    if k == K and net.output is not None:
        return nn.Sequential(net.blocks[K - 1], net.output)
    return net.blocks[k - 1]


def _check_k(k: int, lo: int, K: int, what: str) -> None:
    if not isinstance(k, numbers.Integral) or not lo <= k <= K:
        raise ValueError(f"{what} is defined for k in {lo}..K = {lo}..{K}, got k = {k}")


def _check_hs(hs: Sequence[torch.Tensor], K: int) -> None:
    if len(hs) != K - 1:
        raise ValueError(
            f"hs must hold the K-1 = {K - 1} gluing variables h_2..h_{K} (hs[0] is h_2), got {len(hs)}"
        )


def _h(x: torch.Tensor, hs: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """``h_k`` in the paper's numbering: ``h_1 = x``, ``h_k = hs[k-2]``."""
    return x if k == 1 else hs[k - 2]


def _term(net: BlockNet, k: int, x: torch.Tensor, y: torch.Tensor, hs: Sequence[torch.Tensor],
          lam: list[float]) -> torch.Tensor:
    """Block ``k``'s own term: ``penalty(h_{k+1}, b_k(h_k))`` or, for k = K, the task loss."""
    K = len(net)
    out = block_map(net, k)(_h(x, hs, k))
    if k == K:
        return task_loss(out, y)
    return penalty(hs[k - 1], out, lam[k - 1])


# ------------------------------------------------------------ the objectives
def augmented_loss(net: BlockNet, x: torch.Tensor, y: torch.Tensor, hs: Sequence[torch.Tensor],
                   lams: Lams) -> torch.Tensor:
    """The augmented loss ``L(h; W)`` of BlockProp eq. 4.

    ``sum_{k=1}^{K-1} lambda_k ||h_{k+1} - b_k(h_k)||^2 + ell(y, b_K(h_K))``,
    each term a batch mean. Gradients flow to the weights and to any ``hs``
    that require grad.

    Parameters
    ----------
    net : the ``BlockNet`` (K blocks).
    x, y : a mini-batch (``h_1 = x``; ``y`` class labels or regression targets).
    hs : the gluing variables ``[h_2, ..., h_K]``.
    lams : one weight or ``K - 1`` weights, all > 0.
    """
    K = len(net)
    lam = as_lams(lams, K)
    _check_hs(hs, K)
    total = _term(net, 1, x, y, hs, lam)
    for k in range(2, K + 1):
        total = total + _term(net, k, x, y, hs, lam)
    return total


def block_lagrangian(net: BlockNet, k: int, x: torch.Tensor, y: torch.Tensor,
                     hs: Sequence[torch.Tensor], lams: Lams) -> torch.Tensor:
    """The block Lagrangian ``L_k(h_k)`` of BlockProp eq. 5, for ``k`` in ``2..K``.

    The terms of eq. 4 that contain ``h_k``: the penalty tying ``h_k`` to
    ``b_{k-1}(h_{k-1})`` plus either the penalty tying ``b_k(h_k)`` to
    ``h_{k+1}`` (k < K) or the task loss on ``b_K(h_K)`` (k = K). Minimising it
    over ``h_k`` is the h-step (Alg. 1, lines 9-14).
    """
    K = len(net)
    _check_k(k, 2, K, "the block Lagrangian L_k (eq. 5)")
    lam = as_lams(lams, K)
    _check_hs(hs, K)
    into = penalty(hs[k - 2], block_map(net, k - 1)(_h(x, hs, k - 1)), lam[k - 2])
    return into + _term(net, k, x, y, hs, lam)


def block_objective(net: BlockNet, k: int, x: torch.Tensor, y: torch.Tensor,
                    hs: Sequence[torch.Tensor], lams: Lams) -> torch.Tensor:
    """The block objective ``J_k(B_k)`` of BlockProp eq. 7, for ``k`` in ``1..K``.

    The one term of eq. 4 that contains block ``k``'s weights: the penalty
    between ``h_{k+1}`` and ``b_k(h_k)`` (k < K) or the task loss (k = K).
    With ``hs`` the h-step's ``h*`` (detached) its gradient is block ``k``'s
    W-step (Alg. 1, line 20); the K objectives share no weights, so the K
    W-steps can run in parallel.
    """
    K = len(net)
    _check_k(k, 1, K, "the block objective J_k (eq. 7)")
    lam = as_lams(lams, K)
    _check_hs(hs, K)
    return _term(net, k, x, y, hs, lam)
