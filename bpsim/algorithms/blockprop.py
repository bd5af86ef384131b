"""BlockProp: backprop as constrained optimization (Gotmare et al., Alg. 1 and 2).

The network is cut into K blocks glued by variables ``h_2..h_K`` (indices as
in :mod:`bpsim.objectives`). One training step on a mini-batch is

1. **h-step** (Alg. 1, lines 5-16): start every ``h_k`` at the forward
   activations, then for ``k = K`` down to ``2`` take ``N_h`` gradient steps
   on the block Lagrangian ``L_k(h_k)`` (eq. 5), using the ``h*_{k+1}`` that
   was just found above it;
2. **W-step** (Alg. 1, line 20): every block takes an SGD step on its own
   objective ``J_k`` (eq. 7), which needs only ``h*_k`` (its input) and
   ``h*_{k+1}`` (its target), so the K updates are independent.

For K = 3::

    x --b_1--> h_2 --b_2--> h_3 --b_3--> loss(., y)
    springs: lam_1 ||h_2 - b_1(x)||^2,  lam_2 ||h_3 - b_2(h_2)||^2
    h-step:  h_3 first (pulled by b_2(h_2) and by the loss),
             then h_2 (pulled by b_1(x) and by the new h*_3)
    W-step:  J_1: x -> h*_2 | J_2: h*_2 -> h*_3 | J_3: h*_3 -> y   (in parallel)

Per-block functions come first: :func:`h_update` and :func:`w_loss` are the
work of *one* block and are what a process holding a single block calls
(the multi-process runtime); :func:`h_step` and :func:`w_grads` chain them
over a whole ``BlockNet`` in one process; the trainers drive them in ``fit``.

Step size of the h-step
    ``lr_h`` is a **per-example** step: the h-step of a mini-batch moves each
    example's ``h`` exactly as the paper's online algorithm would for that
    example alone. The objectives are batch means, so the per-example
    gradient is the batch gradient times the batch size.

    The paper fixes one step ``gamma_h`` (Alg. 1 line 12). But ``L_k``
    (eq. 5) curves by ``2 lambda_{k-1}`` through its incoming spring *plus*
    the curvature of its outgoing term: ``2 lambda_k sigma^2`` for a middle
    ``h_k``, with ``sigma`` the largest singular value of block ``k``'s
    Jacobian at that example, and the loss's curvature through block ``K``
    for ``h_K``. ``sigma`` grows as the weights train, and once
    ``gamma_h (2 lambda_{k-1} + 2 lambda_k sigma^2) > 2`` gradient descent
    on ``h_k`` overshoots and *raises* ``L_k``: ``h*_k`` then moves against
    the error signal, and every block below, whose W-step target it is,
    gets a gradient pointing away from backprop's. With ``K = 2`` only
    ``h_K`` exists and the loss curves little, so a fixed step is safe; with
    more blocks the middle ``h_k`` are the ones that break.

    So when ``lr_h`` is not given, every example and every boundary gets
    its own step ``1 / (2 lambda_{k-1} + mu)`` (:func:`curvature_step`),
    with ``mu`` the largest curvature of the outgoing term estimated by a
    few steps of power iteration at the start point
    (:func:`outer_curvature`). It is the step that is stable by
    construction: below ``2 / curvature`` with a factor 2 to spare. The
    same rule holds for ``h_K`` (then ``mu`` is the loss's curvature), so
    ``K = 2`` uses it too, which keeps one rule for every boundary; there
    it changes little, as the loss's curvature is small. It costs about as
    much as the ``N_h = 4`` gradient steps themselves. :func:`fixed_lr_h`
    gives the former fixed step ``1 / (4 max(lambda_{k-1}, lambda_k))``
    for comparison.

Batch normalisation
    The h-step evaluates block ``k`` in the *same mode* as the W-step (train
    mode while training, so with batch statistics), because Lemma B.1 needs
    ``h*`` to minimise the very function whose weight gradient the W-step
    takes. The running statistics are, however, frozen during the h-step and
    the forward initialisation (saved and restored), so they move once per
    step, in the W-step's forward, as they would under backprop. With batch
    statistics the examples of a mini-batch are coupled, so the
    "one example at a time" equivalence of the h-step holds exactly only for
    blocks without batch-dependent layers (MLPs, or BN in eval mode).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bpsim.algorithms.base import DivergenceError, StepResult, Trainer, diverged, method_keywords
from bpsim.methods import DEFAULTS
from bpsim.nets import BlockNet
from bpsim.objectives import Lams, as_lams, block_map, penalty, per_gap, task_loss

__all__ = [
    "h_update", "w_loss", "h_step", "w_grads", "block_params", "fixed_lr_h", "outer_curvature",
    "curvature_step", "gradient_cosines", "frozen_running_stats",
    "forward_init", "start_point", "cache_rule",
    "BlockPropTrainer", "CachedBlockPropTrainer",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- helpers
@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Run a block of code without changing any BatchNorm running statistics.

    The buffers (``running_mean``, ``running_var``, ``num_batches_tracked``)
    are copied on entry and written back on exit; normalisation itself is
    untouched (batch statistics in train mode, running ones in eval mode).
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None:
            saved.append((m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, n in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)


def _check_nh(n_h: Any) -> int:
    if isinstance(n_h, bool) or not isinstance(n_h, numbers.Integral) or n_h < 0:
        raise ValueError(f"n_h (the number of h-steps N_h) must be an integer >= 0, got {n_h!r}")
    return int(n_h)


def fixed_lr_h(lams: Lams, K: int) -> list[float]:
    """A fixed per-example h-step size for ``h_2..h_K`` from the penalties alone.

    ``h_k`` gets ``1 / (4 max(lambda_{k-1}, lambda_k))`` (only
    ``lambda_{K-1}`` for ``h_K``): a step that ignores the blocks'
    Jacobians, stable only while the outgoing term of ``L_k`` curves less
    than about ``6 lambda`` (see the module docstring). It was the default
    before :func:`curvature_step` and is kept for comparison; pass it as
    ``lr_h`` to use it.
    """
    lam = as_lams(lams, K)
    out = []
    for k in range(2, K + 1):
        m = lam[k - 2] if k == K else max(lam[k - 2], lam[k - 1])
        out.append(1.0 / (4.0 * m))
    return out


def _lr_h_list(lr_h: float | Sequence[float] | None, lam: list[float], K: int) -> list[float | None]:
    """``K - 1`` step sizes; ``None`` entries mean the curvature step (:func:`curvature_step`)."""
    if lr_h is None:
        return [None] * (K - 1)
    vals = per_gap(lr_h, K, "lr_h")
    for k, v in enumerate(vals, start=2):
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"lr_h must be >= 0, got {v} for h_{k}; pass a small positive step such as 0.1")
    return vals


#: power-iteration steps behind each curvature estimate of :func:`outer_curvature`
POWER_ITERS = 3


def _per_example(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-example quantity ``v`` (shape ``(B,)``) shaped to broadcast against ``x``."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def outer_curvature(block: nn.Module, h: torch.Tensor, target: torch.Tensor, lam_out: float | None,
                    loss_fn: LossFn | None = None, iters: int = POWER_ITERS) -> torch.Tensor:
    """Per-example curvature of the outgoing term of ``L_k`` at ``h`` (shape ``(B,)``).

    The outgoing term is ``lam_out ||target - b_k(h)||^2`` (``k < K``) or
    the task loss ``ell(y, b_K(h))``. Its Gauss-Newton matrix for one
    example is ``G = J^T H J``, with ``J`` block ``k``'s Jacobian at that
    example and ``H`` the Hessian of the term in the block's output:
    ``2 lam_out I`` for the spring, so ``G``'s largest eigenvalue is
    ``2 lam_out sigma_max(J)^2``; the softmax Hessian (eigenvalues below 1/2)
    for cross-entropy. Returned is that largest eigenvalue, estimated by
    ``iters`` steps of power iteration on ``G`` per example, started at the
    example's own gradient of the term (deterministic: every process that
    holds the block gets the same number). Each step is one
    Jacobian-vector product (by differentiating the vector-Jacobian product
    with respect to its vector: plain reverse mode, so it works for any
    block autograd handles, BatchNorm included), one Hessian-vector product
    in the small output space and one vector-Jacobian product.

    Power iteration approaches the top eigenvalue from below (its Rayleigh
    quotients rise towards it and never exceed it); :func:`curvature_step`
    leaves a factor 2 for that and for the Jacobian changing along the
    ``N_h`` steps. The
    objectives are batch means, so ``H`` is scaled by the batch size to
    give each example's own curvature. ``.grad`` and BatchNorm statistics
    are untouched.
    """
    fn = loss_fn if loss_fn is not None else task_loss
    B = h.shape[0]
    mu = torch.zeros(B, dtype=h.dtype, device=h.device)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / _per_example(v.flatten(1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny), v)

    with torch.enable_grad(), frozen_running_stats(block):
        hh = h.detach().requires_grad_(True)
        out = block(hh)
        t = target.detach()
        outer = fn(out, t) if lam_out is None else penalty(t, out, lam_out)
        (g_out,) = torch.autograd.grad(outer, out, create_graph=True)
        if not g_out.requires_grad:         # a term linear in the output has no curvature
            return mu
        u = torch.zeros_like(out, requires_grad=True)
        (jt_u,) = torch.autograd.grad(out, hh, u, create_graph=True)      # J^T u, linear in u
        (v,) = torch.autograd.grad(out, hh, g_out.detach(), retain_graph=True)
        v = unit(v.detach()) + 1e-3 / math.sqrt(v[0].numel())   # the gradient; never exactly 0
        for _ in range(iters):
            v = unit(v)
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
            (hjv,) = torch.autograd.grad(g_out, out, jv, retain_graph=True)
            (w,) = torch.autograd.grad(out, hh, hjv, retain_graph=True)
            w = w.detach() * B
            mu = (v * w).flatten(1).sum(1)          # Rayleigh quotient of the unit v
            v = w
    return mu.detach().clamp_min(0.0)


def curvature_step(lam_in: float, mu: torch.Tensor) -> torch.Tensor:
    """The default per-example h-step size ``1 / (2 lam_in + mu)``.

    ``2 lam_in + mu`` bounds the curvature of ``L_k`` (eq. 5) along the
    step: ``2 lam_in`` from the incoming spring, ``mu`` from the outgoing
    term (:func:`outer_curvature`). Gradient descent on a quadratic with
    largest curvature ``c`` lowers it at every step for any step below
    ``2 / c`` and reaches the minimum along the top direction in one step
    at ``1 / c``; this is that step, so an underestimate of ``mu`` by up to
    a factor of 2 still leaves the step stable.
    """
    return 1.0 / (2.0 * lam_in + mu)


# ------------------------------------------------------ one block's work
def h_update(
    block: nn.Module,
    a: torch.Tensor,
    target: torch.Tensor,
    lam_in: float,
    lam_out: float | None,
    n_h: int,
    lr_h: float | None,
    loss_fn: LossFn | None = None,
    h0: torch.Tensor | None = None,
) -> torch.Tensor:
    """One block's h-step: ``N_h`` gradient steps on its gluing input ``h_k``.

    Minimises (BlockProp eq. 5, Alg. 1 lines 10-14)::

        L_k(h) = lam_in * ||h - a||^2 + lam_out * ||target - block(h)||^2   (k < K)
        L_K(h) = lam_in * ||h - a||^2 + loss_fn(block(h), target)           (k = K, lam_out None)

    Parameters
    ----------
    block : the block ``b_k`` (for the last block, including any output layer).
    a : ``b_{k-1}(h_{k-1})``, the previous block's output (treated as a constant).
    target : ``h*_{k+1}`` from the block above, or ``y`` for the last block.
    lam_in : ``lambda_{k-1}`` (> 0), the weight tying ``h`` to ``a``.
    lam_out : ``lambda_k`` (> 0), or ``None`` for the last block (task loss).
    n_h : number of gradient steps ``N_h`` (0 returns the start point).
    lr_h : per-example step size: each example's ``h`` moves as in the
        online algorithm, i.e. the step uses the batch-mean gradient times
        the batch size. ``None`` (the default of the trainers) sizes it per
        example to the curvature of ``L_k`` at the start point,
        :func:`curvature_step` of :func:`outer_curvature`.
    loss_fn : the task loss for the last block (default: cross-entropy for
        integer labels, MSE otherwise).
    h0 : start point (default ``a``, the forward activation; the cached
        ``h*`` in Alg. 2).

    Returns
    -------
    ``h*``, detached. Only ``torch.autograd.grad`` with respect to ``h`` is
    used, so no parameter's ``.grad`` is touched; BatchNorm running
    statistics are left as they were.

    Raises
    ------
    DivergenceError : when ``h`` or ``L_k`` stops being finite.
    """
    n_h = _check_nh(n_h)
    if lr_h is not None and not (lr_h >= 0 and math.isfinite(lr_h)):
        raise ValueError(f"lr_h must be >= 0, got {lr_h}; pass a small positive step such as 0.1")
    fn = loss_fn if loss_fn is not None else task_loss
    a = a.detach()
    target = target.detach()
    h = (a if h0 is None else h0.detach()).clone()
    if h.shape != a.shape:
        raise ValueError(f"h0 has shape {tuple(h.shape)} but a = b_(k-1)(h_(k-1)) has shape {tuple(a.shape)}")
    if lr_h is None and n_h:
        lr = _per_example(curvature_step(lam_in, outer_curvature(block, h, target, lam_out, fn)), h)
    else:
        lr = lr_h or 0.0
    step = lr * h.shape[0]  # per-example step = batch-mean gradient x batch size
    with torch.enable_grad(), frozen_running_stats(block):
        for _ in range(n_h):
            h.requires_grad_(True)
            out = block(h)
            outer = fn(out, target) if lam_out is None else penalty(target, out, lam_out)
            L = penalty(h, a, lam_in) + outer
            (g,) = torch.autograd.grad(L, h)
            h = (h - step * g).detach()
    # Checked once, after the loop: a nan or inf in h propagates to the last step
    # (and the W-step checks every J_k as well).
    if n_h and not (torch.isfinite(L) and torch.isfinite(h).all()):
        what = f"L_k = {L.item()}" if not torch.isfinite(L) else "h is no longer finite"
        raise DivergenceError(
            f"h diverged in {n_h} h-steps ({what}; lr_h={'curvature step' if lr_h is None else lr_h}, "
            f"lam_in={lam_in}, lam_out={lam_out}); "
            f"use a smaller lr_h (the penalty alone is stable for lr_h < {1 / lam_in:.3g}) or a different lam"
        )
    return h


def w_loss(
    block: nn.Module,
    h_in: torch.Tensor,
    target: torch.Tensor,
    lam_out: float | None,
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """One block's W-step objective ``J_k`` (BlockProp eq. 7) as a scalar.

    ``lam_out * ||target - block(h_in)||^2`` for ``k < K``, or
    ``loss_fn(block(h_in), y)`` for the last block (``lam_out=None``).
    ``h_in`` is ``h*_k`` (``x`` for the first block) and is detached, so
    ``.backward()`` reaches this block's parameters only (Alg. 1, line 20).
    """
    out = block(h_in.detach())
    if lam_out is None:
        return (loss_fn if loss_fn is not None else task_loss)(out, target)
    return penalty(target.detach(), out, lam_out)


def forward_init(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One block's part of the forward initialisation (Alg. 1 line 5):
    ``b_k(h)`` without gradient and without moving BatchNorm statistics.
    Block ``k`` runs it on its start point ``h_k`` to give ``a_{k+1}``."""
    with torch.no_grad(), frozen_running_stats(block):
        return block(h)


def start_point(a: torch.Tensor, cached: torch.Tensor | None = None,
                present: torch.Tensor | None = None) -> torch.Tensor:
    """Where the h-step of ``h_k`` starts (Alg. 2, "initialize with the last
    known activations for this example; if there is no cache, with the
    forward propagation"): the cached ``h*_k`` of the examples whose
    ``present`` flag is set, ``a_k = b_{k-1}(h_{k-1})`` for the others.
    Without a cache it is ``a_k`` (Alg. 1)."""
    if cached is None or present is None or not bool(present.any()):
        return a
    if bool(present.all()):
        return cached
    return torch.where(present.view(-1, *([1] * (a.dim() - 1))), cached, a)


#: what Alg. 2 does with one mini-batch (see :func:`cache_rule`)
CACHE_KINDS = ("wstep", "forward", "cached", "mixed")


def cache_rule(epoch: int, every: int | None, present: torch.Tensor | None) -> str:
    """Alg. 2's rule for one mini-batch, the one rule of the trainer and the runtime.

    ``present[i]`` says whether example ``i`` of the batch has a cached
    ``h*``. The paper (BlockProp App. C) caches ``h*`` per example and runs
    the h-step only every ``E`` epochs; an example without a cache is
    initialised with the forward pass, which needs an h-step. So the batch
    gets

    * ``"wstep"``: no h-step, every block's W-step on the cached ``h*``
      (``epoch % E != 0`` and every example cached; the blocks exchange
      nothing);
    * ``"forward"``: an h-step from the forward pass (no example cached, or
      no cache at all: Alg. 1);
    * ``"cached"``: an h-step from the cached ``h*`` (every example cached:
      each block computes ``a_{k+1}`` from its own cached input, no chain);
    * ``"mixed"``: an h-step from the cache where there is one and the
      forward pass elsewhere (:func:`start_point`; the forward chain runs).

    ``every=None`` (plain BlockProp) always gives ``"forward"``.
    """
    if every is None or present is None or not bool(present.any()):
        return "forward"
    if bool(present.all()):
        return "wstep" if epoch % every else "cached"
    return "mixed"


# --------------------------------------------------- the whole network
def _forward_init(net: BlockNet, x: torch.Tensor, h0: Sequence[torch.Tensor] | None,
                  present: torch.Tensor | None = None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Start points and ``a_k = b_{k-1}(h_{k-1})`` for ``h_2..h_K`` (Alg. 1 line 5).

    Block by block, ``a_k = b_{k-1}(start_{k-1})`` (``start_1 = x``) and
    ``start_k = start_point(a_k, h0[k-2], present)``: without ``h0`` the start
    points are the forward activations and equal ``a``; with ``h0`` (Alg. 2's
    cache) every example flagged in ``present`` (default: all) starts from it.
    """
    K = len(net)
    if h0 is not None and len(h0) != K - 1:
        raise ValueError(f"h0 must hold K-1 = {K - 1} tensors (h_2..h_{K}), got {len(h0)}")
    if h0 is not None and present is None:
        present = torch.ones(len(x), dtype=torch.bool)
    start, a, h = [], [], x
    for k in range(2, K + 1):
        ak = forward_init(net.blocks[k - 2], h)
        h = start_point(ak, None if h0 is None else h0[k - 2].detach(), present)
        a.append(ak)
        start.append(h)
    return start, a


def h_step(
    net: BlockNet,
    x: torch.Tensor,
    y: torch.Tensor,
    lams: Lams,
    n_h: int,
    lr_h: float | Sequence[float] | None,
    h0: Sequence[torch.Tensor] | None = None,
    loss_fn: LossFn | None = None,
) -> list[torch.Tensor]:
    """The h-step of BlockProp (Alg. 1, lines 5-16) on a mini-batch.

    Initialise ``h_2..h_K`` with the forward pass (or with ``h0``), then for
    ``k = K, K-1, ..., 2`` run :func:`h_update` on ``h_k`` with block ``k``,
    ``a = b_{k-1}(h_{k-1})`` and the target ``h*_{k+1}`` just computed
    (``y`` for ``k = K``).

    Parameters
    ----------
    net : the ``BlockNet`` (K >= 2 blocks; K = 1 returns ``[]``).
    x, y : the mini-batch.
    lams : one penalty weight or ``K - 1`` of them, all > 0.
    n_h : h-steps per gluing variable, ``N_h >= 0``.
    lr_h : per-example step size, one for all or ``K - 1`` values
        (``lr_h[k-2]`` for ``h_k``); ``None`` for the curvature step
        (:func:`curvature_step`, per example and boundary).
    h0 : optional start points (Alg. 2's cache); default the forward pass.
    loss_fn : task loss of the last block (default by the dtype of ``y``).

    Returns
    -------
    ``[h*_2, ..., h*_K]``, detached.
    """
    K = len(net)
    lam = as_lams(lams, K)
    lrs = _lr_h_list(lr_h, lam, K)
    n_h = _check_nh(n_h)
    if K == 1:
        return []
    start, a = _forward_init(net, x, h0)
    hs = list(start)
    target = y
    for k in range(K, 1, -1):
        try:
            hk = h_update(block_map(net, k), a[k - 2], target, lam[k - 2], None if k == K else lam[k - 1],
                          n_h, lrs[k - 2], loss_fn=loss_fn, h0=None if h0 is None else start[k - 2])
        except DivergenceError as e:
            raise DivergenceError(f"h-step of h_{k} (the input of block {k}): {e}") from None
        hs[k - 2] = target = hk
    return hs


def block_params(net: BlockNet, k: int) -> list[nn.Parameter]:
    """Block ``k``'s (1-based) weights; the last block's list goes on with ``net.output``'s."""
    params = list(net.blocks[k - 1].parameters())
    if k == len(net) and net.output is not None:
        params += list(net.output.parameters())
    return params


def w_grads(net: BlockNet, x: torch.Tensor, y: torch.Tensor, hs: Sequence[torch.Tensor],
            lams: Lams, loss_fn: LossFn | None = None) -> list[list[torch.Tensor]]:
    """Every block's W-step gradient ``grad_{B_k} J_k`` (eq. 7, Alg. 1 line 20).

    Returns one list per block, aligned with ``list(net.blocks[k].parameters())``;
    when ``net.output`` exists the last block's list continues with
    ``list(net.output.parameters())``. Parameters that do not require grad
    get zeros. Computed with ``torch.autograd.grad`` (``.grad`` untouched);
    in train mode the forward passes move BatchNorm running statistics, as
    the W-step's forward does.
    By Lemma B.1, at the exact ``h*`` their concatenation is the gradient
    of ``J(W) = min_h L(h, W)``.
    """
    K = len(net)
    lam = as_lams(lams, K)
    if len(hs) != K - 1:
        raise ValueError(f"hs must hold the K-1 = {K - 1} gluing variables h_2..h_{K}, got {len(hs)}")
    grads = []
    for k in range(1, K + 1):
        params = block_params(net, k)
        live = [p for p in params if p.requires_grad]
        h_in = x if k == 1 else hs[k - 2]
        target = y if k == K else hs[k - 1]
        with torch.enable_grad():
            J = w_loss(block_map(net, k), h_in, target, None if k == K else lam[k - 1], loss_fn)
            g = torch.autograd.grad(J, live, allow_unused=True) if live else ()
        it = iter(g)
        out = []
        for p in params:
            gp = next(it) if p.requires_grad else None
            out.append(torch.zeros_like(p) if gp is None else gp)
        grads.append(out)
    return grads


def gradient_cosines(net: BlockNet, x: torch.Tensor, y: torch.Tensor, hs: Sequence[torch.Tensor],
                     lams: Lams, loss_fn: LossFn | None = None) -> list[float]:
    """Per block, the cosine between the W-step gradient at ``hs`` and backprop's.

    Block ``k``'s W-step gradient ``grad_{B_k} J_k`` (:func:`w_grads`) against
    the gradient of the plain loss ``ell(y, f(x))`` with respect to the same
    weights, both at the net's current weights. By Lemma B.1 the W-step is
    ``grad J`` at the exact joint ``h*``, and ``grad J`` tends to backprop's
    gradient as the penalties grow (Theorem 5.1), so values near 1 say a
    block learns as under backprop, values below 0 that its W-step climbs
    the loss. BatchNorm running statistics are left as they were.
    """
    fn = loss_fn if loss_fn is not None else task_loss
    K = len(net)
    with frozen_running_stats(net):
        wg = w_grads(net, x, y, hs, lams, fn)
        with torch.enable_grad():
            params = [p for k in range(1, K + 1) for p in block_params(net, k)]
            live = [p for p in params if p.requires_grad]
            g = iter(torch.autograd.grad(fn(net(x), y), live, allow_unused=True))
    out = []
    for k in range(1, K + 1):
        a, b = [], []
        for p, gw in zip(block_params(net, k), wg[k - 1]):
            gp = next(g) if p.requires_grad else None
            a.append(gw.reshape(-1))
            b.append((torch.zeros_like(p) if gp is None else gp).reshape(-1))
        a, b = torch.cat(a), torch.cat(b)
        den = float(a.norm() * b.norm())
        out.append(float(torch.dot(a, b)) / den if den > 0 else 0.0)
    return out


# ------------------------------------------------------------- trainers
class BlockPropTrainer(Trainer):
    """BlockProp (Alg. 1) on mini-batches: h-step, then a W-step per block.

    Parameters
    ----------
    net : a ``BlockNet`` with K >= 2 blocks (MLP or CNN).
    lam : penalty weight(s) ``lambda_k`` > 0, one or ``K - 1``.
    nh : h-steps per gluing variable ``N_h`` (>= 0).
    lr_h : per-example h-step size, one or ``K - 1``; default: sized per
        example to the curvature each ``h_k`` faces (:func:`curvature_step`).
    **kwargs : the ``Trainer`` settings (``lr`` may be one per block).

    ``StepResult.local_losses`` are the ``J_k`` (eq. 7) of the W-step and
    ``StepResult.loss`` their sum, ``J(W) ~ L(h*, W)`` (eq. 6), so the
    History's ``train_loss`` is the augmented loss at ``h*``; the test loss
    is the network's ordinary loss.

    ``epoch_extra`` measures, at the end of each epoch on a fixed probe of
    :attr:`probe_size` training examples, ``grad_cosine`` (per block, the
    cosine between the W-step gradient after this trainer's h-step and
    backprop's gradient: :func:`gradient_cosines`) and ``outer_curvature``
    (per gluing variable ``h_2..h_K``, the median over the probe of
    :func:`outer_curvature` at the forward activations, the ``mu`` of the
    step ``1 / (2 lambda_{k-1} + mu)``). The probe changes no weight,
    statistic or random state.
    """

    #: training examples in the end-of-epoch probe (0: no probe)
    probe_size = 256

    name = "blockprop"
    options = method_keywords(name)
    default_lr = 0.05

    def __init__(self, net: BlockNet, *, lam: Lams = DEFAULTS["lam"], nh: int = DEFAULTS["nh"],
                 lr_h: float | Sequence[float] | None = None, **kwargs: Any) -> None:
        K = len(net)
        if K < 2:
            raise ValueError("BlockProp needs a net of at least 2 blocks (there is nothing to glue in one); "
                             "use --blocks 2 or more, or the bp trainer")
        self.lams = as_lams(lam, K)
        self.nh = _check_nh(nh)
        self.lr_h = _lr_h_list(lr_h, self.lams, K)
        super().__init__(net, **kwargs)

    def fit(self, train: Any, *args: Any, **kwargs: Any) -> Any:
        x_all, y_all = train.tensors[0], train.tensors[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 999_983)
        idx = torch.randperm(len(x_all), generator=g)[: self.probe_size]
        self._probe = (x_all[idx], y_all[idx]) if len(idx) else None
        return super().fit(train, *args, **kwargs)

    def epoch_extra(self) -> dict[str, Any]:
        probe = getattr(self, "_probe", None)
        if probe is None:
            return {}
        x, y = probe
        K = len(self.net)
        with frozen_running_stats(self.net):
            hs = BlockPropTrainer._h_step(self, x, y)
            cos = gradient_cosines(self.net, x, y, hs, self.lams, self.loss)
            start, a = _forward_init(self.net, x, None)
            mus = []
            for k in range(2, K + 1):
                target = y if k == K else a[k - 1]
                mu = outer_curvature(block_map(self.net, k), a[k - 2], target,
                                     None if k == K else self.lams[k - 1], self.loss)
                mus.append(float(mu.median()))
        return {"grad_cosine": cos, "outer_curvature": mus}

    def _advice(self) -> str:
        return f"use a smaller lr_h (now {self.lr_h}) or a different lam (now {self.lams})"

    def diverged(self, where: str, what: str) -> DivergenceError:
        """The one divergence error of BlockProp, trainer and runtime alike:
        ``where`` says when (``"at epoch 3"``, ``"at step 12"``), ``what`` which
        block and which quantity."""
        return diverged(self.name, where, what,
                        f"{self._advice()}, or lower the learning rate (lr={self.lrs})")

    def h_update(self, k: int, a: torch.Tensor, target: torch.Tensor,
                 h0: torch.Tensor | None, where: str) -> torch.Tensor:
        """Block ``k``'s h-step (Alg. 1 lines 10-14) with this trainer's settings."""
        try:
            return h_update(block_map(self.net, k), a, target, self.lams[k - 2],
                            None if k == len(self.net) else self.lams[k - 1], self.nh,
                            self.lr_h[k - 2], loss_fn=self.loss, h0=h0)
        except DivergenceError as e:     # its message already says what to try
            raise diverged(self.name, where, f"in the h-step of h_{k} (the input of block {k}): "
                           f"{e}", f"or lower the learning rate (lr={self.lrs})") from None

    def w_objective(self, k: int, h_in: torch.Tensor, target: torch.Tensor,
                    where: str) -> torch.Tensor:
        """Block ``k``'s W-step objective ``J_k`` (eq. 7), checked to be finite."""
        K = len(self.net)
        J = w_loss(block_map(self.net, k), h_in, target, None if k == K else self.lams[k - 1],
                   self.loss)
        v = J.item()
        if not math.isfinite(v):
            raise self.diverged(where, f"block {k}'s W-step objective J_{k} is {v}")
        return J

    def _h_step(self, x: torch.Tensor, y: torch.Tensor, h0: Sequence[torch.Tensor] | None = None,
                present: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Alg. 1 lines 5-16 over the whole net, block by block with :meth:`h_update`."""
        K = len(self.net)
        start, a = _forward_init(self.net, x, h0, present)
        hs, target = list(start), y
        use_h0 = h0 is not None
        for k in range(K, 1, -1):
            hs[k - 2] = target = self.h_update(k, a[k - 2], target,
                                               start[k - 2] if use_h0 else None,
                                               f"at epoch {self.epoch + 1}")
        return hs

    def _w_step(self, x: torch.Tensor, y: torch.Tensor, hs: Sequence[torch.Tensor]) -> StepResult:
        """SGD step of every block on its ``J_k`` (Alg. 1 line 20)."""
        K = len(self.net)
        self.zero_grad()
        local = []
        for k in range(1, K + 1):
            J = self.w_objective(k, x if k == 1 else hs[k - 2], y if k == K else hs[k - 1],
                                 f"at epoch {self.epoch + 1}")
            J.backward()
            local.append(J.item())
        for o in self.optimizers:
            o.step()
        return StepResult(sum(local), local)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepResult:
        return self._w_step(x, y, self._h_step(x, y))


class CachedBlockPropTrainer(BlockPropTrainer):
    """BlockProp with a per-example cache of ``h*`` (Appendix C, Alg. 2).

    ``h*`` is stored per training example (by its dataset index ``idx``).
    In epochs ``0, E, 2E, ...`` (``E = cache_every``) the h-step runs as in
    Alg. 1 but starts from the cached ``h*`` (the forward pass where there
    is none yet) and refreshes the cache; in the other epochs it is skipped
    and every block takes its W-step on the cached ``h*`` alone, so the
    blocks need not talk to each other at all.

    ``epoch_extra`` reports how stale the cache is at the end of each epoch
    (epochs since each cached ``h*`` was refreshed: mean and max), and the
    cache is part of the checkpoint, so a resumed run is exact.
    """

    name = "blockprop-cached"
    options = method_keywords(name)

    def __init__(self, net: BlockNet, *, cache_every: int = DEFAULTS["cache_every"],
                 **kwargs: Any) -> None:
        if isinstance(cache_every, bool) or not isinstance(cache_every, numbers.Integral) or cache_every < 1:
            raise ValueError(f"cache_every (E, epochs between h-steps) must be an integer >= 1, got {cache_every!r}")
        self.cache_every = int(cache_every)
        self.cache: list[torch.Tensor] = []      # one (N, *shape of h_k) tensor per gluing variable
        self.refreshed = torch.empty(0, dtype=torch.long)  # epoch of the last refresh, -1 = empty
        super().__init__(net, **kwargs)

    def _grow(self, n: int, like: Sequence[torch.Tensor]) -> None:
        old = len(self.refreshed)
        if n <= old:
            return
        size = max(n, 2 * old)
        if not self.cache:
            self.cache = [torch.zeros((size, *h.shape[1:]), dtype=h.dtype) for h in like]
        else:
            self.cache = [torch.cat([c, c.new_zeros((size - old, *c.shape[1:]))]) for c in self.cache]
        self.refreshed = torch.cat([self.refreshed, torch.full((size - old,), -1, dtype=torch.long)])

    def present(self, idx: torch.Tensor) -> torch.Tensor:
        """Which examples of ``idx`` have a cached ``h*``."""
        n_cached = len(self.refreshed)
        inside = idx < n_cached
        out = torch.zeros(len(idx), dtype=torch.bool)
        out[inside] = self.refreshed[idx[inside]] >= 0
        return out

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepResult:
        present = self.present(idx)
        kind = cache_rule(self.epoch, self.cache_every, present)
        if kind == "wstep":
            return self._w_step(x, y, [c[idx] for c in self.cache])   # W-step on cached h* only
        h0 = None
        if kind != "forward":
            safe = idx.clamp(max=len(self.refreshed) - 1)
            h0 = [c[safe] for c in self.cache]
        hs = self._h_step(x, y, h0, present)
        self._grow(int(idx.max()) + 1, hs)
        for c, h in zip(self.cache, hs):
            c[idx] = h
        self.refreshed[idx] = self.epoch
        return self._w_step(x, y, hs)

    def epoch_extra(self) -> dict[str, Any]:
        probe = super().epoch_extra()
        valid = self.refreshed[self.refreshed >= 0]
        if len(valid) == 0:
            return {"cache_size": 0, "staleness_mean": 0.0, "staleness_max": 0,
                    "hstep_epoch": self.epoch % self.cache_every == 0} | probe
        age = self.epoch - valid
        return {"cache_size": int(len(valid)), "staleness_mean": float(age.double().mean()),
                "staleness_max": int(age.max()), "hstep_epoch": self.epoch % self.cache_every == 0} | probe

    def extra_state(self) -> dict[str, Any]:
        return {"cache": [c.clone() for c in self.cache], "refreshed": self.refreshed.clone()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.cache = [c.clone() for c in state.get("cache", [])]
        self.refreshed = state.get("refreshed", torch.empty(0, dtype=torch.long)).clone()
