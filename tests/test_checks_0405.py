"""Exercise checks of lessons 04 (DGL) and 05 (BWBPF): correct, known mistakes with hints, not attempted."""

import pytest
import torch
from torch.nn import functional as F

from bpsim import nets
from bpsim.algorithms import dgl
from bpsim.course import checks


# ------------------------------------------------------------ cnn_aux_ratio
def _by_hand(c, h, w):
    conv = 2 * 9 * c * c * h * w
    return conv, (2 * conv + 2 * 4 * c * 10) / conv


def test_cnn_aux_ratio_correct():
    _, ratio = _by_hand(256, 8, 8)
    fb = checks.cnn_aux_ratio(256, 8, 8, ratio)
    assert fb.status == "correct", fb
    assert checks.cnn_aux_ratio(256, 8, 8, 2.0).status == "correct"  # the linear layer is negligible


@pytest.mark.parametrize("wrong, words", [
    (1.0, "two"),
    (8 / 64, "after"),
    (0.5, "relative to the block"),
    (4.0, "C -> C"),
])
def test_cnn_aux_ratio_mistakes(wrong, words):
    fb = checks.cnn_aux_ratio(256, 8, 8, wrong)
    assert fb.status == "incorrect" and words in fb.message, fb


def test_cnn_aux_ratio_close_and_not_attempted():
    _, ratio = _by_hand(256, 8, 8)
    assert checks.cnn_aux_ratio(256, 8, 8, ratio * 1.01).status == "close"
    assert checks.cnn_aux_ratio(256, 8, 8, ...).status == "not attempted"


# -------------------------------------------------------------- drift_proxy
@pytest.fixture
def snaps():
    g = torch.Generator().manual_seed(0)
    final = torch.randn(16, 4, 2, 2, generator=g) + 1
    return [final + s * torch.randn(16, 4, 2, 2, generator=g) for s in (1.0, 0.5, 0.2)] + [final]


def test_drift_proxy_correct(snaps):
    final = snaps[-1].flatten(1)
    scale = final.norm(dim=1).mean()
    answer = [((s.flatten(1) - final).norm(dim=1).mean() / scale).item() for s in snaps]
    fb = checks.drift_proxy(snaps, answer)
    assert fb.status == "correct", fb
    assert answer[-1] == 0
    # the library agrees and the values shrink as the snapshots approach the final one
    c = dgl.input_drift(snaps)["c"]
    assert c == pytest.approx(answer, rel=1e-5) and c[0] > c[1] > c[2] > c[3] == 0


def test_drift_proxy_mistakes(snaps):
    final = snaps[-1].flatten(1)
    absolute = [(s.flatten(1) - final).norm(dim=1).mean().item() for s in snaps]
    assert "divide" in checks.drift_proxy(snaps, absolute).message
    squared = [((s.flatten(1) - final).norm(dim=1) ** 2).mean().item() / (final.norm(dim=1) ** 2).mean().item()
               for s in snaps]
    assert "squares" in checks.drift_proxy(snaps, squared).message
    frob = [((s.flatten(1) - final).norm() / final.norm()).item() for s in snaps]
    assert "each example" in checks.drift_proxy(snaps, frob).message
    scale = final.norm(dim=1).mean().item()
    previous = [0.0] + [(b.flatten(1) - a.flatten(1)).norm(dim=1).mean().item() / scale
                        for a, b in zip(snaps, snaps[1:])]
    fb = checks.drift_proxy(snaps, previous)
    assert fb.status == "incorrect" and "final" in fb.message, fb


def test_drift_proxy_not_attempted(snaps):
    assert checks.drift_proxy(snaps, ...).status == "not attempted"
    assert "shape" in checks.drift_proxy(snaps, [0.1, 0.2]).message


# -------------------------------------------------------- global_loss_reach
@pytest.fixture
def bwbpf_net():
    net = nets.mlp([64, 32, 32, 32, 10], blocks=3, output_layer=True, seed=0)
    g = torch.Generator().manual_seed(1)
    return net, torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)


def _norms(net, x, y, detach):
    h = x
    for block in net.blocks:
        h = dgl.block_forward(block, h) if detach else block(h)
    loss = F.cross_entropy(net.output(h.detach() if detach else h), y)
    out = []
    for params in [list(b.parameters()) for b in net.blocks] + [list(net.output.parameters())]:
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        out.append(sum(float((g ** 2).sum()) for g in grads if g is not None) ** 0.5)
    return out


def test_global_loss_reach_correct(bwbpf_net):
    net, x, y = bwbpf_net
    answer = _norms(net, x, y, detach=True)
    assert answer[:3] == [0.0, 0.0, 0.0] and answer[3] > 0  # isolation: only the output layer
    fb = checks.global_loss_reach(net, x, y, answer)
    assert fb.status == "correct", fb


def test_global_loss_reach_mistakes(bwbpf_net):
    net, x, y = bwbpf_net
    leaky = _norms(net, x, y, detach=False)
    assert min(leaky) > 0
    fb = checks.global_loss_reach(net, x, y, leaky)
    assert fb.status == "incorrect" and "detach" in fb.message, fb
    fb = checks.global_loss_reach(net, x, y, [0.0] * 4)
    assert fb.status == "incorrect" and "output layer" in fb.message, fb
    right = _norms(net, x, y, detach=True)
    fb = checks.global_loss_reach(net, x, y, right[::-1])
    assert fb.status == "incorrect" and "block 1 first" in fb.message, fb
    assert "shape" in checks.global_loss_reach(net, x, y, right[:3]).message


def test_global_loss_reach_not_attempted_and_leaves_net_alone(bwbpf_net):
    net, x, y = bwbpf_net
    before = [p.detach().clone() for p in net.parameters()]
    assert checks.global_loss_reach(net, x, y, ...).status == "not attempted"
    checks.global_loss_reach(net, x, y, [0.0, 0.0, 0.0, 1.0])
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(p.grad is None for p in net.parameters())
