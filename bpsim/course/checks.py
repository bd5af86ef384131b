"""Exercise checks that teach: correct, close (with a hint), or not attempted.

Each lesson's exercises call a function here, e.g. ``checks.idle_fraction(4, answer)``.
The answer is compared with a value computed by the library itself, and a
wrong answer that matches a *known mistake* gets a hint about that mistake
(the style of Kaggle's learntools and nn-zero-to-hero's ``cmp``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Feedback", "compare", "idle_fraction", "gpipe_bubble", "dgl_speedup", "replay_order", "slowdown_pmf",
           "makespan_error", "bp_makespan"]


@dataclass
class Feedback:
    """The verdict on an answer; shows itself nicely in a notebook."""

    status: str  # "correct", "close", "incorrect", "not attempted"
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.status == "correct"

    def __repr__(self) -> str:
        icon = {"correct": "✅", "close": "🟡", "incorrect": "❌", "not attempted": "⬜"}[self.status]
        return f"{icon} {self.status}: {self.message}"

    def _repr_markdown_(self) -> str:
        return repr(self)


def _as_array(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    if isinstance(v, (list, tuple)) and v and hasattr(v[0], "detach"):
        return np.concatenate([np.ravel(t.detach().cpu().numpy()) for t in v])
    return np.asarray(v, dtype=float)


def compare(
    answer: Any,
    expected: Any,
    *,
    rtol: float = 1e-4,
    close_rtol: float = 5e-2,
    mistakes: Sequence[tuple[Any, str]] = (),
    hint: str = "",
    close_scale: tuple[float, str] | None = None,
) -> Feedback:
    """Compare an answer (number, array, tensor or list of tensors) with the expected value.

    ``mistakes`` lists ``(wrong value, hint)`` pairs: an answer equal to a
    known wrong value gets that hint. Within ``close_rtol`` it is "close":
    relative to the largest ``|expected|``, or, with ``close_scale=(size, what)``,
    relative to ``size`` (an answer that should differ from a starting point is
    close only when it is off by a small part of the distance it should move).
    """
    if answer is None or answer is Ellipsis:
        return Feedback("not attempted", "replace the ... / None with your answer and run the cell again")
    try:
        a, e = _as_array(answer), _as_array(expected)
    except (TypeError, ValueError):
        return Feedback("incorrect", f"expected a number or array, got {type(answer).__name__}")
    if a.shape != e.shape:
        return Feedback("incorrect", f"expected shape {e.shape}, got {a.shape}")
    scale = max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-12)
    err = float(np.max(np.abs(a - e))) / scale if e.size else 0.0
    if not np.all(np.isfinite(a)):
        return Feedback("incorrect", "your answer contains NaN or inf", {"rel_error": float("inf")})
    if err <= rtol:
        return Feedback("correct", f"matches (relative error {err:.1e})", {"rel_error": err})
    for wrong, why in mistakes:
        w = _as_array(wrong)
        if w.shape == a.shape and float(np.max(np.abs(a - w))) / scale <= rtol:
            return Feedback("incorrect", why, {"rel_error": err})
    if close_scale is not None:
        size, what = close_scale
        off = float(np.max(np.abs(a - e))) / max(float(size), 1e-12)
        msg = f"off by {off:.1e} of {what}. {hint}".strip()
        return Feedback("close" if off <= close_rtol else "incorrect", msg, {"rel_error": err, "off": off})
    if err <= close_rtol:
        return Feedback("close", f"relative error {err:.1e}. {hint}".strip(), {"rel_error": err})
    return Feedback("incorrect", f"relative error {err:.1e}. {hint}".strip(), {"rel_error": err})


def idle_fraction(blocks: int, answer: Any) -> Feedback:
    """Lesson 00: the fraction of time each of K equally fast devices idles under
    fully locked model-parallel backprop (communication and update ignored).

    Every device works on its block's forward and backward, F + B, and waits
    while the other K - 1 blocks do theirs: it is busy 1/K of the time.
    """
    expected = 1 - 1 / blocks
    return compare(answer, expected, rtol=1e-3, mistakes=[
        (1 / blocks, "that is the fraction of time a device is *busy*; the question asks how long it idles"),
        (1 - 1 / (2 * blocks), "forward and backward both belong to the same device: count them together"),
    ], hint="with K blocks of equal cost, how many of the K time slots of a step does one device work in?")


def gpipe_bubble(blocks: int, microbatches: int, answer: Any) -> Feedback:
    """Lesson 06: the share of one GPipe step a device spends idle (the *bubble*),
    K blocks, m micro-batches, no latency, free update.

    The expected value is read off the simulator: one step of ``gpipe`` with
    ``fwd=1, bwd=2``, one minus block 1's utilization; the clock-tick picture
    gives ``(K - 1) / (m + K - 1)``.
    """
    from bpsim import sim

    K, m = blocks, microbatches
    r = sim.simulate("gpipe", blocks=K, steps=1, microbatches=m, costs="fwd=1,bwd=2")
    expected = 1 - r.per_block[0]["utilization"]
    return compare(answer, expected, rtol=1e-3, mistakes=[
        ((K - 1) / m, "that is the idle time divided by the *busy* time (GPipe's overhead ratio); "
                      "the question asks for the idle share of the whole step"),
        ((K - 1) / K, "that is the bubble without micro-batches (m = 1): with m micro-batches the pipeline "
                      "fills and drains once per step, not once per micro-batch"),
        (m / (m + K - 1), "that is the share of the step a device is *busy*; the bubble is the rest"),
        ((K - 1) / (2 * (m + K - 1)), "the forward and the backward phase each have their own fill or drain: "
                                       "count the idle ticks of both"),
    ], hint="a step has m + K - 1 forward ticks and as many backward ticks; in how many of them does one device work?")


def dgl_speedup(blocks: int, steps: int, costs: Any, answer: Any) -> Feedback:
    """Lesson 06: the speedup ``T_bp / T_dgl`` of synchronous DGL over fully locked
    backprop on K devices for N steps with uniform ``costs`` (a string like
    ``"fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05"`` or a dict).

    The expected value is the ratio of the two simulated makespans; the closed
    forms are ``T_bp = N (K (F + B) + 2 (K - 1) c + U)`` and
    ``T_dgl = (K - 1)(F + c) + N (F + A + B + U)``.
    """
    from bpsim import sim

    K, N = blocks, steps
    t_bp = sim.simulate("bp", blocks=K, steps=N, costs=costs).makespan
    t_dgl = sim.simulate("dgl", blocks=K, steps=N, costs=costs).makespan
    k = sim.Costs.coerce(costs)
    F, B, A, U, c = k.fwd, k.bwd, k.aux, k.update, k.comm
    return compare(answer, t_bp / t_dgl, rtol=1e-4, close_rtol=2e-2, mistakes=[
        (K, "K is the ideal speedup; DGL pays for its heads, its pipeline fill and the messages"),
        (t_bp / (N * (F + A + B + U)), "you left out the pipeline fill: block K starts (K - 1)(F + c) after block 1"),
        (t_bp / ((K - 1) * (F + c) + N * (F + B + U)), "every DGL block also runs its auxiliary head (A) each step"),
        (N * (K * (F + B) + U) / t_dgl, "backprop sends 2 (K - 1) messages per step, each costing the latency c"),
        (t_dgl / t_bp, "that is T_dgl / T_bp; the speedup is the backprop makespan over the DGL makespan"),
    ], hint="T_bp = N (K (F + B) + 2 (K - 1) c + U) and T_dgl = (K - 1)(F + c) + N (F + A + B + U)")


def replay_order(answer: Any) -> Feedback:
    """Lesson 07: the five items a ``ReplayBuffer(3)`` serves after
    ``put 0, 1, 2; get; get; put 3; get; get; get`` (DGL Sec. 2.3: least-reused
    entry first, the newest among ties; a full buffer overwrites its oldest entry)."""

    def served_by(rule: str) -> list[int]:
        """What the buffer serves under ``rule``: ``bpsim`` (the library) or a known mistake."""
        if rule == "bpsim":
            from bpsim.replay import ReplayBuffer

            buf = ReplayBuffer(3)
            for item in (0, 1, 2):
                buf.put(item)
            served = [buf.get(), buf.get()]
            buf.put(3)
            return served + [buf.get(), buf.get(), buf.get()]
        # entries as [item, reads]; capacity 3 unless the rule forgets it
        entries: list[list[int]] = []
        served = []

        def put(item: int) -> None:
            entries.append([item, 0])
            if rule != "no-eviction" and len(entries) > 3:
                entries.pop(0)

        def get() -> int:
            if rule == "lifo":
                e = entries[-1]
            else:  # least reused first; ties: oldest (fifo) or newest (no-eviction keeps bpsim's tie rule)
                least = min(r for _, r in entries)
                ties = [e for e in entries if e[1] == least]
                e = ties[0] if rule == "fifo" else ties[-1]
            e[1] += 1
            return e[0]

        for item in (0, 1, 2):
            put(item)
        served += [get(), get()]
        put(3)
        return served + [get(), get(), get()]

    hint = "track each entry's read count; serve the smallest count, the newest among ties; " \
           "a full buffer drops its oldest entry"
    if answer is None or answer is Ellipsis:
        return compare(answer, 0.0)
    expected = served_by("bpsim")
    try:
        got = [float(v) for v in answer]
    except (TypeError, ValueError):
        return Feedback("incorrect", f"expected the list of the {len(expected)} items served, in order, "
                                     f"got {type(answer).__name__}")
    if len(got) != len(expected):
        return Feedback("incorrect", f"the {len(expected)} gets serve {len(expected)} items; your list has {len(got)}")
    wrong = [i + 1 for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    if not wrong:
        return Feedback("correct", f"the buffer serves {expected}", {"wrong_gets": []})
    for rule, why in (
        ("lifo", "always serving the newest entry ignores the reuse counts: an entry that has been "
                 "read fewer times goes first"),
        ("fifo", "among entries read equally often the buffer serves the *newest* (last in, first out), "
                 "not the oldest"),
        ("no-eviction", "the buffer holds only M = 3 entries: putting 3 overwrites the oldest entry, 0, "
                        "even though nobody has read it"),
    ):
        if got == served_by(rule):
            return Feedback("incorrect", why, {"wrong_gets": wrong})
    which = ", ".join(map(str, wrong[:-1])) + (" and " if len(wrong) > 1 else "") + str(wrong[-1])
    items = f"items {which} of {len(expected)} differ" if len(wrong) > 1 else f"item {which} of {len(expected)} differs"
    return Feedback("incorrect", f"{items} from what the buffer serves. {hint[0].upper()}{hint[1:]}",
                    {"wrong_gets": wrong})


def slowdown_pmf(blocks: int, block: int, factor: float, answer: Any) -> Feedback:
    """Lesson 07: DGL Sec. 4.3's draw probabilities p(1..K) when block J is slowed
    down by a factor S: uniform, except block J is drawn S times less often than
    each other block (``bpsim.algorithms.async_dgl.slowdown_pmf``)."""
    from bpsim.algorithms.async_dgl import slowdown_pmf as pmf

    K, J, S = blocks, block, float(factor)
    expected = pmf(K, J, S)
    times = [1.0] * K
    times[J - 1] = S
    unnormalised = [1.0] * K
    unnormalised[J - 1] = 1 / S
    shared = [(1 - 1 / (K * S)) / (K - 1)] * K if K > 1 else [1.0]
    shared[J - 1] = 1 / (K * S)
    return compare(answer, expected, rtol=1e-6, close_rtol=2e-2, mistakes=[
        ([t / sum(times) for t in times], "a slowed block is drawn *less* often: divide its weight by S, "
                                          "do not multiply it"),
        (unnormalised, "probabilities must sum to 1: divide every weight by their sum"),
        (shared, "bpsim's convention fixes the *ratio*: p(J) / p(j) = 1 / S for every other j; dividing 1/K by S "
                 "and sharing the rest changes that ratio"),
    ], hint="give every block weight 1, block J weight 1/S, then normalise")


def h_step(net: Any, x: Any, y: Any, lam: float, n_h: int, lr_h: float, answer: Any) -> Feedback:
    """Lesson 01: ``h*_2`` of a two-block net after ``n_h`` per-example gradient
    steps of size ``lr_h`` on the block Lagrangian ``L_2`` (BlockProp eq. 5,
    Alg. 1 lines 5-16), started at the forward activation ``b_1(x)``.

    The expected value is ``blockprop.h_step``; known mistakes are recomputed
    with ``blockprop.h_update`` (zero start, unscaled batch-mean step, a step
    too few or too many, the spring left out). "Close" means off by at most 5 %
    of the distance ``h*_2`` moves from ``b_1(x)``, not 5 % of ``h*_2`` itself:
    an h that stayed near its start is not close.
    """
    import torch

    from bpsim.algorithms import blockprop

    if isinstance(answer, (list, tuple)) and len(answer) == 1:
        answer = answer[0]
    if answer is None or answer is Ellipsis:
        return compare(answer, 0.0)
    expected = blockprop.h_step(net, x, y, lam, n_h, lr_h)[0]
    a = blockprop.h_step(net, x, y, lam, 0, lr_h)[0]
    B, top = len(x), net.blocks[1]
    mistakes = [
        (a, "h never left b_1(x): assign the updated tensor inside the loop (h = h - ...) and return it"),
        (blockprop.h_update(top, a, y, lam, None, n_h, lr_h / B),
         "your steps are B times too small: block_lagrangian is a batch mean, so autograd returns the "
         "per-example gradient divided by the batch size; step by lr_h * len(x) * grad"),
        (blockprop.h_update(top, a, y, lam, None, n_h, lr_h, h0=torch.zeros_like(a)),
         "the h-step starts at the forward activation b_1(x) (Alg. 1 line 5), not at zero"),
        (blockprop.h_update(top, a, y, 1e-12, None, n_h, lr_h),
         "h ignores the spring: minimise the whole block Lagrangian L_2 = lam ||h - b_1(x)||^2 + loss, "
         "not the loss alone"),
    ]
    if n_h >= 1:
        mistakes.append((blockprop.h_update(top, a, y, lam, None, n_h - 1, lr_h),
                         f"one step short: take exactly n_h = {n_h} gradient steps"))
    mistakes.append((blockprop.h_update(top, a, y, lam, None, n_h + 1, lr_h),
                     f"one step too many: take exactly n_h = {n_h} gradient steps"))
    moved = float((expected - a).abs().max())   # how far h*_2 moved from b_1(x): "close" is judged against it
    return compare(answer, expected, rtol=1e-4, close_rtol=5e-2, mistakes=mistakes,
                   close_scale=(moved, "the distance h*_2 moves from b_1(x)"),
                   hint="start at b_1(x), then repeat n_h times: gradient of L_2 with respect to h, "
                        "h <- h - lr_h * B * grad (B = batch size)")


def w_grad_block1(net: Any, x: Any, y: Any, hs: Any, lam: float, answer: Any) -> Feedback:
    """Lesson 02: block 1's W-step gradient with respect to the weight matrix
    of its linear layer, ``dJ_1/dW`` with ``J_1 = lam * mean ||h*_2 - relu(W x + c)||^2``
    (BlockProp eq. 7), for a block ``Flatten, Linear, ReLU``.

    The expected value is ``blockprop.w_grads(...)[0][0]``. By hand,
    ``dJ_1/dW = -(2 lam / B) (mask * (h*_2 - b_1(x)))^T x`` with ``mask`` the
    ReLU's active units; known mistakes drop a factor or the mask.
    """
    import torch

    from bpsim.algorithms import blockprop

    if answer is None or answer is Ellipsis:
        return compare(answer, 0.0)
    expected = blockprop.w_grads(net, x, y, hs, lam)[0][0]
    shape = tuple(getattr(answer, "shape", np.shape(answer)))
    if shape == tuple(expected.T.shape) and shape != tuple(expected.shape):
        return Feedback("incorrect", f"shape {shape} is transposed: nn.Linear keeps its weight as "
                                     f"(out_features, in_features) = {tuple(expected.shape)}")
    with torch.no_grad():
        lin = [m for m in net.blocks[0] if isinstance(m, torch.nn.Linear)][0]
        xf = x.flatten(1)
        z = lin(xf)
        r = hs[0] - torch.relu(z)
        no_mask = -(2 * lam / len(x)) * r.T @ xf
    mistakes = [
        (-expected, "the sign is flipped: J_1 grows as b_1(x) moves away from h*_2, so its gradient with respect "
                    "to b_1(x) is -2 lam (h*_2 - b_1(x)) / B"),
        (expected / 2, "a factor 2 is missing: the derivative of ||u||^2 is 2u"),
        (expected * len(x), "a factor B is off: J_1 is a batch *mean*, divide the sum over examples by B"),
        (no_mask, "the ReLU is missing: multiply the residual by the mask (W x + c > 0) before the product with x"),
        (torch.zeros_like(expected), "your gradient is zero: did you use b_1(x) instead of h*_2 as the target?"),
    ]
    if abs(lam - 1.0) > 1e-9 and abs(lam - 2.0) > 1e-9:  # lam = 1 or 2: indistinguishable from others
        mistakes.append((expected / lam, "lam is missing: the spring J_1 is weighted by lam"))
    return compare(answer, expected, rtol=1e-4, close_rtol=5e-2, mistakes=mistakes,
                   hint="dJ_1/dW = -(2 lam / B) (mask * (h*_2 - relu(W x + c)))^T x, an (out, in) matrix")


def cnn_aux_ratio(channels: int, height: int, width: int, answer: Any) -> Feedback:
    """Lesson 04: FLOPs of DGL's CNN-aux head on a block output of shape
    ``(C, H, W)``, relative to the FLOPs of the block when the block is one
    3x3 convolution ``C -> C`` at that resolution (layer-wise DGL).

    The expected value comes from ``nets.count_flops`` on
    ``nets.make_head('cnn', ...)`` and on an ``nn.Conv2d``; by hand the head
    is two such convolutions plus a negligible linear layer, about 2 (the
    200% of DGL Table 1).
    """
    from torch import nn

    from bpsim import nets

    if answer is None or answer is Ellipsis:
        return compare(answer, 0.0)
    shape = (channels, height, width)
    conv = nets.count_flops(nn.Conv2d(channels, channels, 3, padding=1), shape)
    head = nets.count_flops(nets.make_head("cnn", shape, 10), shape)
    expected = head / conv
    return compare(answer, expected, rtol=1e-3, close_rtol=2e-2, mistakes=[
        (1.0, "CNN-aux has *two* 3x3 convolutions C -> C, each as costly as the block's own convolution"),
        (8 / (height * width), "the pooling to 2x2 comes *after* the two convolutions: they run at the "
                               "block's full resolution H x W"),
        (0.5, "that is the block relative to the head; the question asks for the head relative to the block"),
        (4.0, "the two convolutions of the head keep C channels (C -> C); each costs 2 * 9 * C * C * H * W, "
              "the same as the block's convolution"),
    ], hint="a 3x3 convolution C -> C on an H x W map costs 2 * 9 * C * C * H * W FLOPs; "
            "the head's final linear layer is tiny next to it")


def drift_proxy(snapshots: Any, answer: Any) -> Feedback:
    """Lesson 04: the measured proxy for DGL's ``c^t_{j-1}`` (Sec. 3, Corollary 3.1):
    for every snapshot ``t`` of block ``j - 1``'s outputs on a fixed probe
    batch, ``mean_i ||h_t(x_i) - h_T(x_i)|| / mean_i ||h_T(x_i)||`` with
    ``h_T`` the last snapshot.

    The expected value is ``dgl.input_drift(snapshots)['c']``; known
    mistakes (no scaling, squared norms, one norm over the whole batch,
    distances between consecutive snapshots) are recomputed from the snapshots.
    """
    import torch

    from bpsim.algorithms.dgl import input_drift

    if answer is None or answer is Ellipsis:
        return compare(answer, 0.0)
    snaps = [torch.as_tensor(s).detach().flatten(1).double() for s in snapshots]
    expected = input_drift(snapshots)["c"]
    ref = snaps[-1]
    scale = ref.norm(dim=1).mean().item()
    squared = [((s - ref).norm(dim=1) ** 2).mean().item() / (ref.norm(dim=1) ** 2).mean().item() for s in snaps]
    frob = [(s - ref).norm().item() / ref.norm().item() for s in snaps]
    previous = [0.0] + [(b - a).norm(dim=1).mean().item() / scale for a, b in zip(snaps, snaps[1:])]
    following = [(b - a).norm(dim=1).mean().item() / scale for a, b in zip(snaps, snaps[1:])] + [0.0]
    return compare(answer, expected, rtol=1e-4, close_rtol=5e-2, mistakes=[
        (input_drift(snapshots, relative=False)["c"],
         "divide by the mean norm of the final outputs, mean_i ||h_T(x_i)||, so the numbers do not depend on "
         "the scale of the features"),
        (squared, "use the norms themselves, not their squares"),
        (frob, "take the norm of each example's output (dim=1), then the mean over the probe batch; "
               "one norm over the whole batch is a different number"),
        (previous, "compare every snapshot with the *final* one, not with the snapshot before it"),
        (following, "compare every snapshot with the *final* one, not with the snapshot after it"),
    ], hint="c_t = mean_i ||h_t(x_i) - h_T(x_i)|| / mean_i ||h_T(x_i)||, one value per snapshot (the last is 0)")


def global_loss_reach(net: Any, x: Any, y: Any, answer: Any) -> Feedback:
    """Lesson 05: the norm of the gradient of BWBPF's global loss with respect to
    the parameters of block 1, ..., block K and of the output layer (K + 1
    numbers, 0 where the gradient does not exist), on the batch ``(x, y)``.

    The expected values use the library's ``block_forward`` (detached block
    inputs) and ``local_loss`` on the output layer; the known mistake is the
    forward pass without detaching (the BWBPF authors' public code), where
    the global loss reaches every block.
    """
    def _reach_norms(net: Any, x: Any, y: Any, detach: bool) -> list[float]:
        """Norms of the gradient of the global loss w.r.t. every block and the output layer."""
        import copy

        import torch
        from torch.nn import functional as F

        from bpsim.algorithms.dgl import block_forward, local_loss

        net = copy.deepcopy(net)  # leave the learner's net (and its BatchNorm statistics) alone
        h = x
        for block in net.blocks:
            h = block_forward(block, h) if detach else block(h)
        loss = local_loss(h.detach() if detach else h, net.output, y, F.cross_entropy)
        groups = [list(b.parameters()) for b in net.blocks] + [list(net.output.parameters())]
        flat = [p for g in groups for p in g]
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
        norms, i = [], 0
        for g in groups:
            sq = sum(float((d ** 2).sum()) for d in grads[i : i + len(g)] if d is not None)
            norms.append(sq ** 0.5)
            i += len(g)
        return norms

    if answer is None or answer is Ellipsis:
        return compare(answer, 0.0)
    expected = _reach_norms(net, x, y, detach=True)
    leaky = _reach_norms(net, x, y, detach=False)
    K = len(net.blocks)
    return compare(answer, expected, rtol=1e-4, close_rtol=5e-2, mistakes=[
        (leaky, "your forward pass kept the graph between blocks, so the global loss reached every block "
                "(what the BWBPF authors' code does); detach each block's input (block_forward) and the "
                "last block's output before the output layer"),
        ([0.0] * (K + 1), "the output layer *is* trained by the global loss: its gradient is not zero"),
        (expected[::-1], "list block 1 first and the output layer last"),
    ], hint="K + 1 numbers: one gradient norm per block (blocks 1..K), then the output layer; "
            "a parameter the loss does not reach has no gradient (None), count it as 0")


def blockprop_cost_ratio(net: Any, n_h: int, answer: Any) -> Feedback:
    """Lesson 03: the cost of one BlockProp step relative to one backprop step,
    ``C(total) / C(backprop)`` in FLOPs (BlockProp Appendix A), for ``net`` and ``N_h``.

    The expected value is ``theory.cost_model(net, n_h)["ratio"]``:
    ``(3F + F + N_h * 2 sum_{k>=2} F_k) / 3F`` with ``F_k`` the forward FLOPs
    of block ``k``; known mistakes count the h-step over block 1 too, forget
    the forward initialisation, or give the paper's upper bound.
    """
    from bpsim import theory

    if answer is None or answer is Ellipsis:
        return compare(answer, 0.0)
    cost = theory.cost_model(net, n_h)
    F, Fk = cost["forward"], cost["block_forward"]
    upper = sum(Fk[1:])
    bp = 3 * F
    mistakes = [
        ((4 * F + n_h * 2 * F) / bp, "block 1 has no gluing input (h_1 = x is data): an h-step runs through "
                                     "blocks 2..K only, 2 sum_{k>=2} F_k FLOPs"),
        ((bp + n_h * 2 * upper) / bp, "the forward pass that initialises the gluing variables (Alg. 1 line 5) "
                                      "costs F on top of the W-step"),
        ((4 * F + n_h * 3 * upper) / bp, "an h-step needs the input gradient only, not the weight gradient: "
                                         "2 F_k per block, not 3 F_k"),
        ((4 * F + n_h * upper) / bp, "an h-step is a forward *and* a backward (input gradient) through the block: "
                                     "2 F_k, not F_k"),
        (cost["upper_bound"] / bp, "that is the paper's upper bound, which charges a full backprop for every "
                                   "h-step; count the h-step's own FLOPs"),
        (bp / cost["total"], "that is backprop / BlockProp; the question asks for BlockProp / backprop"),
    ]
    return compare(answer, cost["ratio"], rtol=1e-3, close_rtol=3e-2, mistakes=mistakes,
                   hint="C(total) = C(backprop) + C(forward) + N_h C(h-backprop) with C(backprop) = 3F, "
                        "C(forward) = F and C(h-backprop) = 2 sum_{k>=2} F_k")


def h_step_limit(lam_in: float, lam_out: float, sigma2: float, answer: Any) -> Feedback:
    """Lesson 03: the largest stable fixed h-step for a middle gluing variable ``h_k``.

    ``L_k(h) = lam_in ||h - a||^2 + lam_out ||h_{k+1} - b_k(h)||^2`` (BlockProp
    eq. 5) curves by at most ``2 lam_in + 2 lam_out sigma2`` (Gauss-Newton,
    ``sigma2`` the largest squared singular value of block ``k``'s Jacobian),
    and gradient descent on it is stable for steps below
    ``2 / (2 lam_in + 2 lam_out sigma2)``. Known mistakes: the curvature step
    (half the limit), a spring left out, ``sigma`` for ``sigma^2``,
    ``lam`` for ``2 lam``, the penalty-only fixed step.
    """
    if answer is None or answer is Ellipsis:
        return compare(answer, 0.0)
    curv = 2 * lam_in + 2 * lam_out * sigma2
    mistakes = [
        (1 / curv, "that is the step that reaches the minimum along the steepest direction in one step "
                   "(1 / curvature); steps up to twice it still lower L_k"),
        (2 / (2 * lam_in), "the outgoing spring is missing: lam_k ||h_(k+1) - b_k(h)||^2 moves with b_k(h), so it "
                           "curves by 2 lam_k sigma^2 through block k's Jacobian"),
        (2 / (2 * lam_out * sigma2), "the incoming spring lam_(k-1) ||h - a||^2 curves too, by 2 lam_(k-1)"),
        (2 / (2 * lam_in + 2 * lam_out * sigma2 ** 0.5), "the curvature grows with sigma squared: the output "
                                                          "moves by J dh, and the spring squares that"),
        (2 / (lam_in + lam_out * sigma2), "lam ||v||^2 has second derivative 2 lam, not lam"),
        (1 / (4 * max(lam_in, lam_out)), "that is the fixed step 1 / (4 lam), which ignores the Jacobian; the "
                                         "question asks for the largest step that is still stable"),
    ]
    return compare(answer, 2 / curv, rtol=1e-3, close_rtol=3e-2, mistakes=mistakes,
                   hint="gradient descent on a quadratic with largest curvature c is stable for steps below 2 / c; "
                        "add the curvatures of both springs")


def makespan_error(measured: Any, simulated: Any, answer: Any) -> Feedback:
    """Lesson 08: the relative makespan error of a prediction,
    ``(T_simulated - T_measured) / T_measured``, the convention of
    ``bpsim.sim.compare`` (negative when the simulator is too fast).

    ``measured`` and ``simulated`` are traces (their ``makespan`` is used) or
    makespans as numbers.
    """

    def span(t: Any) -> float:
        """A trace's makespan, or the number itself."""
        return float(t.makespan) if hasattr(t, "makespan") else float(t)

    m, s = span(measured), span(simulated)
    if not m > 0:
        raise ValueError(f"the measured makespan must be > 0, got {m!r}; pass the measured trace or its makespan")
    expected = (s - m) / m
    return compare(answer, expected, rtol=1e-6, close_rtol=5e-2, mistakes=[
        ((m - s) / m, "the sign is flipped: the error is simulated minus measured, so a simulator that is too "
                      "fast has a negative error"),
        ((s - m) / s, "divide by the *measured* makespan: the measurement is the reference"),
        (100 * expected, "give a fraction (e.g. -0.12), not a percentage"),
        (s / m, "that is the ratio T_simulated / T_measured; the relative error is that ratio minus 1"),
    ], hint="(T_simulated - T_measured) / T_measured, with the exact makespans (trace.makespan), not rounded printouts")


def bp_makespan(costs: Any, blocks: int, steps: int, answer: Any) -> Feedback:
    """Lesson 08: the makespan of fully locked backprop on K devices for N steps
    with per-block ``costs`` (a ``bpsim.sim.Costs``, e.g. from
    ``Costs.from_trace``, a cost string or a dict); spread and jitter are
    ignored, every op takes its median cost.

    The expected value is the simulator's makespan; the closed form (lesson 06,
    with per-block costs) is ``T_bp = N (sum_k (F_k + B_k) + 2 (K - 1) c + U_1)``,
    where a message costs ``c = costs.comm + costs.recv`` (the receive hand-off
    ``recv`` is 0 for costs calibrated on dgl or bp runs).
    """
    from dataclasses import replace

    from bpsim import sim

    fixed = replace(sim.Costs.coerce(costs), spread=0.0, jitter={})
    K, N = blocks, steps
    expected = sim.simulate("bp", blocks=K, steps=N, costs=fixed).makespan

    def total(op: str) -> float:
        """An op's cost summed over the K blocks."""
        return sum(fixed.get(op, k) for k in range(1, K + 1))

    F, B, A, U = total("fwd"), total("bwd"), total("aux"), total("update")
    U1, c, msgs = fixed.get("update", 1), fixed.comm + fixed.recv, 2 * (K - 1)
    return compare(answer, expected, rtol=1e-6, close_rtol=2e-2, mistakes=[
        (N * (F + B + U1), "each step sends an activation forward and a gradient back across every boundary: "
                           "2 (K - 1) messages of latency c"),
        (N * (F + B + (K - 1) * c + U1), "the gradient travels back too: count 2 (K - 1) messages per step, "
                                         "not K - 1"),
        (N * (F + B + msgs * c + U), "only block 1's update is on the critical path: block k > 1 updates while "
                                     "the gradient travels further down"),
        (N * (F + B + msgs * c), "block 1's update ends the step: the next forward waits for it"),
        (N * (F + B + A + msgs * c + U1), "backprop has no auxiliary heads: leave the aux costs (DGL's) out"),
        (N * (K * (fixed.get("fwd", 1) + fixed.get("bwd", 1)) + msgs * c + U1),
         "the blocks cost different amounts: add each block's own F_k + B_k instead of K times block 1's"),
        (sim.simulate("dgl", blocks=K, steps=N, costs=fixed).makespan,
         "that is the makespan of synchronous DGL; backprop's step is the whole forward-backward chain"),
    ], hint="T_bp = N (sum_k (F_k + B_k) + 2 (K - 1) c + U_1), with costs.get(op, k) and costs.comm")


def buffer_reuse(costs: Any, slowdown: float, answer: Any) -> Feedback:
    """Lesson 08: the mean reads per entry of the replay buffer between two
    ``dgl-async`` blocks when block 1 (the producer) is slowed by ``slowdown``,
    with per-block ``costs`` (every op at its median).

    The expected value is the simulator's; block 2 repeats a period
    ``P_2 = F_2 + A_2 + B_2 + U_2`` and reads an entry each time, while block 1
    writes one every ``S P_1``, so each entry is read about ``S P_1 / P_2``
    times (at least once).
    """
    from dataclasses import replace

    from bpsim import sim

    fixed = replace(sim.Costs.coerce(costs), spread=0.0, jitter={})
    S = float(slowdown)
    expected = sim.simulate("dgl-async", blocks=2, steps=200, costs=fixed,
                            slowdown={1: S}).buffers[0]["reuse_mean"]

    def period(k: int) -> float:
        return sum(fixed.get(op, k) for op in ("fwd", "aux", "bwd", "update"))

    P1, P2 = period(1), period(2)
    return compare(answer, expected, rtol=0.05, close_rtol=0.2, mistakes=[
        (P2 / (S * P1), "upside down: the slow producer writes less often, so each entry is read *more* "
                        "often: S P_1 / P_2"),
        (S, "S alone assumes equal blocks; weigh it by the periods: S P_1 / P_2"),
    ], hint="entries are written every S P_1 and read every P_2: about S P_1 / P_2 reads each")


def registry() -> dict[str, Callable[..., Feedback]]:
    """Every check by name (used by tests to make sure each has a lesson)."""
    import inspect
    import sys

    mod = sys.modules[__name__]
    return {n: f for n, f in inspect.getmembers(mod, inspect.isfunction)
            if f.__module__ == __name__ and not n.startswith("_") and n not in {"compare", "registry"}}
