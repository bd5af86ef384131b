"""The exercise checks of lessons 01-03: correct, a hint for each known mistake, not attempted."""

from __future__ import annotations

import pytest
import torch

from bpsim import data, nets, theory
from bpsim.algorithms import blockprop
from bpsim.course import checks


@pytest.fixture(scope="module")
def batch():
    train, _ = data.load("digits", n_train=100)
    return train.tensors[0][:32], train.tensors[1][:32]


@pytest.fixture(scope="module")
def net():
    return nets.mlp([64, 16, 10], blocks=2, seed=0)


# ------------------------------------------------------------- lesson 01
LAM, NH, LR = 1.0, 10, 0.05


def test_h_step_correct_close_and_not_attempted(net, batch):
    x, y = batch
    right = blockprop.h_step(net, x, y, LAM, NH, LR)[0]
    fb = checks.h_step(net, x, y, LAM, NH, LR, right)
    assert fb.status == "correct" and bool(fb)
    assert checks.h_step(net, x, y, LAM, NH, LR, [right]).status == "correct"  # a one-element list is accepted
    start = blockprop.h_step(net, x, y, LAM, 0, LR)[0]                          # b_1(x)
    near = right + 0.02 * (right - start)                 # off by 2 % of the distance h*_2 moves from b_1(x)
    fb = checks.h_step(net, x, y, LAM, NH, LR, near)
    assert fb.status == "close" and "distance h*_2 moves" in fb.message, fb
    assert checks.h_step(net, x, y, LAM, NH, LR, ...).status == "not attempted"
    assert checks.h_step(net, x, y, LAM, NH, LR, None).status == "not attempted"


def test_h_step_close_is_judged_against_the_move_not_the_size_of_h(net, batch):
    """An h that went only 70 % of the way from b_1(x) is within 5 % of |h*_2| but not close to the answer."""
    x, y = batch
    right = blockprop.h_step(net, x, y, LAM, NH, LR)[0]
    start = blockprop.h_step(net, x, y, LAM, 0, LR)[0]
    partway = start + 0.7 * (right - start)
    assert float((partway - right).abs().max() / right.abs().max()) < 5e-2   # "close" by the size of h alone
    fb = checks.h_step(net, x, y, LAM, NH, LR, partway)
    assert fb.status == "incorrect" and abs(fb.details["off"] - 0.3) < 1e-3, fb


def test_h_step_by_hand_matches(net, batch):
    """The lesson's solution (autograd on block_lagrangian, per-example step) is what the check expects."""
    from bpsim import objectives

    x, y = batch
    with torch.no_grad():
        h = net.blocks[0](x)
    for _ in range(NH):
        h.requires_grad_(True)
        (g,) = torch.autograd.grad(objectives.block_lagrangian(net, 2, x, y, [h], LAM), h)
        h = (h - LR * len(x) * g).detach()
    assert checks.h_step(net, x, y, LAM, NH, LR, h).status == "correct"


@pytest.mark.parametrize("mistake, words", [
    ("unmoved", "never left"),
    ("unscaled", "B times too small"),
    ("zero_start", "forward activation"),
    ("no_spring", "ignores the spring"),
    ("short", "one step short"),
    ("long", "one step too many"),
])
def test_h_step_hints(net, batch, mistake, words):
    x, y = batch
    a = net.blocks[0](x).detach()
    top = net.blocks[1]
    wrong = {
        "unmoved": lambda: a,
        "unscaled": lambda: blockprop.h_update(top, a, y, LAM, None, NH, LR / len(x)),
        "zero_start": lambda: blockprop.h_update(top, a, y, LAM, None, NH, LR, h0=torch.zeros_like(a)),
        "no_spring": lambda: blockprop.h_update(top, a, y, 1e-12, None, NH, LR),
        "short": lambda: blockprop.h_step(net, x, y, LAM, NH - 1, LR)[0],
        "long": lambda: blockprop.h_step(net, x, y, LAM, NH + 1, LR)[0],
    }[mistake]()
    fb = checks.h_step(net, x, y, LAM, NH, LR, wrong)
    assert fb.status == "incorrect"
    assert words in fb.message


# ------------------------------------------------------------- lesson 02
LAM2 = 3.0


def _grad_parts(net, x, hs, lam):
    lin = net.blocks[0][1]
    xf = x.flatten(1)
    z = xf @ lin.weight.T + lin.bias
    r = hs[0] - torch.relu(z)
    return xf, z, r


def test_w_grad_block1_correct_close_and_not_attempted(net, batch):
    x, y = batch
    hs = blockprop.h_step(net, x, y, LAM2, 8, None)
    with torch.no_grad():
        xf, z, r = _grad_parts(net, x, hs, LAM2)
        by_hand = -(2 * LAM2 / len(x)) * ((z > 0) * r).T @ xf
    assert checks.w_grad_block1(net, x, y, hs, LAM2, by_hand).status == "correct"
    assert checks.w_grad_block1(net, x, y, hs, LAM2, by_hand * 1.01).status == "close"
    assert checks.w_grad_block1(net, x, y, hs, LAM2, ...).status == "not attempted"


@pytest.mark.parametrize("mistake, words", [
    ("sign", "sign"),
    ("no_two", "factor 2"),
    ("sum", "factor B"),
    ("no_mask", "ReLU"),
    ("no_lam", "lam is missing"),
    ("zero", "zero"),
    ("transposed", "transposed"),
])
def test_w_grad_block1_hints(net, batch, mistake, words):
    x, y = batch
    hs = blockprop.h_step(net, x, y, LAM2, 8, None)
    with torch.no_grad():
        xf, z, r = _grad_parts(net, x, hs, LAM2)
        right = -(2 * LAM2 / len(x)) * ((z > 0) * r).T @ xf
        wrong = {
            "sign": -right,
            "no_two": right / 2,
            "sum": right * len(x),
            "no_mask": -(2 * LAM2 / len(x)) * r.T @ xf,
            "no_lam": right / LAM2,
            "zero": torch.zeros_like(right),
            "transposed": right.T,
        }[mistake]
    fb = checks.w_grad_block1(net, x, y, hs, LAM2, wrong)
    assert fb.status == "incorrect"
    assert words in fb.message


# ------------------------------------------------------------- lesson 03
@pytest.fixture(scope="module")
def cost_net():
    return nets.mlp([784, 64, 64, 64, 10], blocks=2, seed=0)


def test_cost_ratio_correct_and_not_attempted(cost_net):
    F = cost_net.block_flops()
    right = (4 * sum(F) + 4 * 2 * sum(F[1:])) / (3 * sum(F))
    assert right == pytest.approx(theory.cost_model(cost_net, 4)["ratio"])
    assert checks.blockprop_cost_ratio(cost_net, 4, right).status == "correct"
    assert checks.blockprop_cost_ratio(cost_net, 4, right * 1.01).status == "close"
    assert checks.blockprop_cost_ratio(cost_net, 4, ...).status == "not attempted"


@pytest.mark.parametrize("mistake, words", [
    ("all_blocks", "block 1 has no gluing input"),
    ("no_forward", "initialises"),
    ("weight_grad", "input gradient only"),
    ("forward_only", "forward *and* a backward"),
    ("upper", "upper bound"),
    ("inverse", "backprop / BlockProp"),
])
def test_cost_ratio_hints(cost_net, mistake, words):
    F = cost_net.block_flops()
    f, up, n = sum(F), sum(F[1:]), 4
    wrong = {
        "all_blocks": (4 * f + n * 2 * f) / (3 * f),
        "no_forward": (3 * f + n * 2 * up) / (3 * f),
        "weight_grad": (4 * f + n * 3 * up) / (3 * f),
        "forward_only": (4 * f + n * up) / (3 * f),
        "upper": (f + (n + 1) * 3 * f) / (3 * f),
        "inverse": (3 * f) / (4 * f + n * 2 * up),
    }[mistake]
    fb = checks.blockprop_cost_ratio(cost_net, n, wrong)
    assert fb.status == "incorrect"
    assert words in fb.message


def test_checks_registered():
    names = checks.registry()
    for name in ("h_step", "w_grad_block1", "blockprop_cost_ratio"):
        assert name in names
