"""The papers' theory as numbers you can check: Lemma B.1, Theorem 5.1, Appendix A.

BlockProp (Gotmare et al.)

* **Lemma B.1** (envelope theorem): with ``J(W) = min_h L(h, W)`` the
  gradient of ``J`` is the partial derivative ``dL/dW`` taken at the
  minimiser ``h*(W)``, because ``dL/dh`` vanishes there. The W-step uses
  this gradient at the *approximate* ``h*`` of ``N_h`` h-steps;
  :func:`lemma_b1_error` measures how far that is from the true gradient,
  obtained from a high-precision inner solve in float64 (:func:`inner_solve`).
* **Theorem 5.1** (link with Equilibrium Propagation): with ``lambda = 1/beta``
  BlockProp's W-gradient is ``1/beta`` times the EP expression, and it tends
  to backprop's gradient as ``beta -> 0``; :func:`large_lambda_limit`
  measures cosine and relative error along a sequence of ``beta`` and fits
  the log-log slope (first order in ``beta``: slope ~1).
* **Appendix A** (cost without caching):
  ``C(total) = C(backprop) + C(forward) + N_h * C(h-backprop)`` in FLOPs from
  a ``BlockNet``'s FLOP counters (:func:`cost_model`).

DGL (Belilovsky et al.)

* **Corollary 3.1**: block j converges when the distribution of its input
  (block j-1's output) settles fast enough that ``sum_t c_t`` stays finite.
  :func:`input_drift` (defined next to the DGL trainer, re-exported here)
  turns probe-batch snapshots of block outputs into a measured proxy for
  ``c_t`` and its running sum.

The checks (:func:`lemma_b1_curve`, :func:`lemma_b1_error`,
:func:`blockprop_vs_backprop`, :func:`large_lambda_limit`) work on a float64
*copy* of the network, so the caller's net is never changed. The building
blocks they use (:func:`inner_solve`, :func:`reduced_objective`,
:func:`reduced_gradient`, ...) work on the net they are given, in its dtype
(:func:`as_float64` makes the copy), and never write ``.grad`` or BatchNorm
statistics.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bpsim.algorithms.blockprop import block_params, frozen_running_stats, h_step, w_grads
from bpsim.algorithms.dgl import input_drift
from bpsim.nets import BlockNet, count_flops
from bpsim.objectives import Lams, as_lams, augmented_loss, task_loss

__all__ = [
    "as_float64", "flat_params", "inner_solve", "reduced_objective", "reduced_gradient",
    "blockprop_gradient", "backprop_gradient", "lemma_b1_error", "lemma_b1_curve",
    "blockprop_vs_backprop", "large_lambda_limit", "cost_model", "input_drift",
]


# ---------------------------------------------------------------- helpers
def as_float64(net: BlockNet, x: torch.Tensor, y: torch.Tensor
               ) -> tuple[BlockNet, torch.Tensor, torch.Tensor]:
    """A float64 deep copy of ``net`` and the batch in float64 (labels stay integers)."""
    net64 = copy.deepcopy(net).double()
    y64 = y.double() if torch.is_floating_point(y) else y
    return net64, x.double(), y64


def flat_params(net: BlockNet) -> list[torch.nn.Parameter]:
    """All weights in W-step order: block 1, ..., block K, then ``net.output``."""
    return [p for k in range(1, len(net) + 1) for p in block_params(net, k)]


def _flat(grads: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for block in grads for g in block])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(torch.finfo(b.dtype).tiny))


# ----------------------------------------------------- the inner problem
def inner_solve(net: BlockNet, x: torch.Tensor, y: torch.Tensor, lams: Lams,
                hs0: Sequence[torch.Tensor] | None = None, tol: float = 1e-10,
                max_rounds: int = 20) -> list[torch.Tensor]:
    """``h*(W) = argmin_h L(h, W)`` jointly over ``h_2..h_K``, to high precision.

    L-BFGS with a strong-Wolfe line search on the *sum* over examples of
    eq. 4 (so each example's gradient has its own scale), then L-BFGS with
    unit steps to polish, until the largest gradient entry is below ``tol``
    or ``max_rounds`` polishing rounds have run (or stop improving). It
    works in the dtype of ``net`` and ``x``: pass float64 (see
    :func:`as_float64`) for the precision the checks need.

    Parameters
    ----------
    net, x, y, lams : as in :func:`bpsim.objectives.augmented_loss`.
    hs0 : start point (default: the forward activations).
    tol : gradient tolerance (max-abs of ``dL/dh`` per example); the
        result is the best point found if it cannot be reached.
    max_rounds : polishing rounds of up to 20 L-BFGS iterations each.

    Returns
    -------
    The minimiser ``[h*_2, ..., h*_K]``, detached.
    """
    K = len(net)
    as_lams(lams, K)
    if hs0 is None:
        with torch.no_grad(), frozen_running_stats(net):
            hs0, h = [], x
            for b in list(net.blocks)[:-1]:
                h = b(h)
                hs0.append(h)
    hs = [h.detach().clone().requires_grad_(True) for h in hs0]
    if not hs:
        return []
    n = x.shape[0]

    def closure() -> torch.Tensor:
        with torch.enable_grad(), frozen_running_stats(net):
            L = n * augmented_loss(net, x, y, hs, lams)
            gs = torch.autograd.grad(L, hs)
        for h, g in zip(hs, gs):
            h.grad = g
        return L.detach()

    def gmax() -> float:
        closure()
        return max(float(h.grad.abs().max()) for h in hs)

    # Phase 1: L-BFGS with a line search gets close. It stalls once the
    # objective changes by less than its rounding error (~1e-16 relative),
    # long before the gradient is tiny, so phase 2 polishes with unit
    # quasi-Newton steps that need gradients only, keeping the best point.
    search = torch.optim.LBFGS(hs, lr=1.0, max_iter=200, tolerance_grad=tol, tolerance_change=0.0,
                               history_size=50, line_search_fn="strong_wolfe")
    search.step(closure)
    best, best_hs = gmax(), [h.detach().clone() for h in hs]
    polish = torch.optim.LBFGS(hs, lr=1.0, max_iter=20, tolerance_grad=tol, tolerance_change=0.0,
                               history_size=50)
    misses = 0
    for _ in range(max_rounds):
        if best <= tol or misses >= 3:
            break
        polish.step(closure)
        err = gmax()
        if not math.isfinite(err):
            break
        if err < best:
            best, best_hs, misses = err, [h.detach().clone() for h in hs], 0
        else:
            misses += 1
    hs = best_hs
    return [h.detach() for h in hs]


def reduced_objective(net: BlockNet, x: torch.Tensor, y: torch.Tensor, lams: Lams,
                      hs: Sequence[torch.Tensor] | None = None, **solve: Any) -> float:
    """``J(W) = min_h L(h, W)`` (the paper's ``J^(n)``, as a batch mean).

    Solves the inner problem with :func:`inner_solve` in the net's own dtype
    (give a float64 net for finite differences), starting at ``hs`` if given.
    """
    h = inner_solve(net, x, y, lams, hs0=hs, **solve)
    with torch.no_grad(), frozen_running_stats(net):
        return float(augmented_loss(net, x, y, h, lams))


def blockprop_gradient(net: BlockNet, x: torch.Tensor, y: torch.Tensor, hs: Sequence[torch.Tensor],
                       lams: Lams) -> torch.Tensor:
    """BlockProp's W-step gradient ``dL/dW`` at ``hs``, flattened in :func:`flat_params` order."""
    with frozen_running_stats(net):
        return _flat(w_grads(net, x, y, hs, lams))


def reduced_gradient(net: BlockNet, x: torch.Tensor, y: torch.Tensor, lams: Lams,
                     **solve: Any) -> torch.Tensor:
    """The true ``grad J(W)``: ``dL/dW`` at the converged ``h*`` (Lemma B.1), flattened."""
    return blockprop_gradient(net, x, y, inner_solve(net, x, y, lams, **solve), lams)


def backprop_gradient(net: BlockNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Backprop's gradient of the task loss ``ell(y, f(x))``, flattened in W-step order."""
    params = flat_params(net)
    with torch.enable_grad(), frozen_running_stats(net):
        g = torch.autograd.grad(task_loss(net(x), y), params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for p, gi in zip(params, g)])


# ------------------------------------------------------------ Lemma B.1
def lemma_b1_curve(net: BlockNet, x: torch.Tensor, y: torch.Tensor, lams: Lams,
                   n_hs: Sequence[int], lr_h: float | Sequence[float] | None = None,
                   sweeps: int = 1) -> dict[str, Any]:
    """Relative error of the W-step gradient after ``N_h`` h-steps, for each ``N_h`` in ``n_hs``.

    The error is ``||g(h_{N_h}) - grad J|| / ||grad J||`` with ``g(h) = dL/dW``
    at ``h`` and ``grad J`` its value at the exact minimiser (Lemma B.1).
    Computed in float64 on a copy of ``net``. For ``K = 2`` the h-step is
    plain gradient descent on ``L``, so the error goes to 0 as ``N_h`` grows
    (for a small enough ``lr_h``). For ``K > 2`` one sweep ``K -> 2``
    (Alg. 1) is one pass of block-coordinate descent and the error levels
    off above 0; ``sweeps > 1`` repeats the sweep, each starting from the
    previous ``h*`` (as the cache of Alg. 2 does), and brings it down.

    Returns
    -------
    ``{"n_h": [...], "rel_error": [...], "cosine": [...], "grad_norm": float}``.
    """
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 1:
        raise ValueError(f"sweeps must be an integer >= 1, got {sweeps!r}")
    net64, x64, y64 = as_float64(net, x, y)
    true = reduced_gradient(net64, x64, y64, lams)
    errs, coss = [], []
    for n_h in n_hs:
        hs = None
        for _ in range(sweeps):
            hs = h_step(net64, x64, y64, lams, int(n_h), lr_h, h0=hs)
        g = blockprop_gradient(net64, x64, y64, hs, lams)
        errs.append(_rel(g, true))
        coss.append(_cos(g, true))
    return {"n_h": [int(n) for n in n_hs], "rel_error": errs, "cosine": coss, "grad_norm": float(true.norm())}


def lemma_b1_error(net: BlockNet, x: torch.Tensor, y: torch.Tensor, lams: Lams, n_h: int,
                   lr_h: float | Sequence[float] | None = None, sweeps: int = 1) -> float:
    """Relative error between the W-step gradient at ``N_h`` h-steps and ``grad J(W)``.

    See :func:`lemma_b1_curve` (this is its value for a single ``N_h``).
    """
    return lemma_b1_curve(net, x, y, lams, [n_h], lr_h, sweeps)["rel_error"][0]


# ---------------------------------------------------------- Theorem 5.1
def blockprop_vs_backprop(net: BlockNet, x: torch.Tensor, y: torch.Tensor, lam: float
                          ) -> tuple[float, float]:
    """``(cosine, relative error)`` of BlockProp's exact-``h*`` gradient at ``lam`` vs backprop's.

    All penalties get the same ``lam``; float64 copy of ``net``.
    """
    net64, x64, y64 = as_float64(net, x, y)
    g_bp = backprop_gradient(net64, x64, y64)
    g = reduced_gradient(net64, x64, y64, lam)
    return _cos(g, g_bp), _rel(g, g_bp)


def large_lambda_limit(net: BlockNet, x: torch.Tensor, y: torch.Tensor,
                       betas: Sequence[float] = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)) -> dict[str, Any]:
    """BlockProp -> backprop as ``lambda = 1/beta`` grows (Theorem 5.1).

    For each ``beta`` solve the inner problem exactly (float64) with every
    penalty weight ``1/beta`` and compare the W-step gradient with
    backprop's. With ``lambda = 1/beta`` the augmented loss is ``1/beta``
    times EP's ``E + beta * C``, and its minimiser moves off the forward
    activations by ``O(beta)``, so the error should fall like ``beta``.

    Returns
    -------
    ``{"beta", "lam", "cosine", "rel_error"}`` (lists, in the order of
    ``betas``) and ``"slope"``: the least-squares slope of
    ``log(rel_error)`` against ``log(beta)`` (expect about 1).
    """
    betas = [float(b) for b in betas]
    if len(betas) < 2 or min(betas) <= 0:
        raise ValueError(f"give at least two betas > 0 (for example 1e-1, 1e-2, 1e-3), got {betas}")
    net64, x64, y64 = as_float64(net, x, y)
    g_bp = backprop_gradient(net64, x64, y64)
    cos, err = [], []
    for b in betas:
        g = reduced_gradient(net64, x64, y64, 1.0 / b)
        cos.append(_cos(g, g_bp))
        err.append(_rel(g, g_bp))
    slope = float(np.polyfit(np.log(betas), np.log(np.maximum(err, 1e-300)), 1)[0])
    return {"beta": betas, "lam": [1.0 / b for b in betas], "cosine": cos, "rel_error": err, "slope": slope}


# ----------------------------------------------------------- Appendix A
def cost_model(net: BlockNet, n_h: int, input_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """FLOPs per example of one BlockProp step without caching (Appendix A).

    Conventions (``F_k`` = forward FLOPs of block ``k`` from
    ``BlockNet.block_flops``, the output layer counted in block ``K``;
    a backward pass costs twice its forward: one product for the input
    gradient, one for the weight gradient):

    * ``C(forward) = F = sum_k F_k``;
    * ``C(backprop) = 3 F`` (forward + backward of the whole net) = the W-step
      (the K small backprops sum to one big one);
    * ``C(h-backprop) = 2 * sum_{k>=2} F_k``: one gradient step on every
      ``h_k`` needs block ``k``'s forward and its *input* gradient only;
    * ``C(total) = C(backprop) + C(forward) + N_h * C(h-backprop)``.

    The paper's bounds ``C(bp) + C(fwd) <= C(total) < C(fwd) + (N_h + 1) C(bp)``
    are returned too (both are equalities at ``N_h = 0``).

    Returns
    -------
    dict with ``block_forward`` (list), ``forward``, ``backprop``,
    ``h_backprop``, ``w_step``, ``h_step``, ``total``, ``ratio``
    (``total / backprop``), ``lower_bound``, ``upper_bound`` and ``n_h``.
    """
    if isinstance(n_h, bool) or not isinstance(n_h, int) or n_h < 0:
        raise ValueError(f"n_h must be an integer >= 0, got {n_h!r}")
    shape = tuple(input_shape or net.input_shape or ())
    if not shape:
        raise ValueError("give input_shape (the shape of one example) or build the net with one")
    fk = [int(f) for f in net.block_flops(shape)]
    if net.output is not None:
        fk[-1] += count_flops(net.output, net.shapes(shape)[-1])
    F = sum(fk)
    bp = 3 * F
    hb = 2 * sum(fk[1:])
    total = bp + F + n_h * hb
    return {
        "n_h": n_h, "block_forward": fk, "forward": F, "backprop": bp, "h_backprop": hb,
        "w_step": bp, "h_step": F + n_h * hb, "total": total, "ratio": total / bp,
        "lower_bound": bp + F, "upper_bound": F + (n_h + 1) * bp,
    }
