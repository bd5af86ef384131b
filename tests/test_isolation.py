"""Gradient isolation: no local loss reaches another block's parameters.

DGL (Sec. 2.2) and BWBPF rest on one property: the loss of block j depends on
the parameters of block j (and its head) only, because every block reads a
detached input. The check runs inside the real training steps: every loss
that ``dgl.local_update`` builds is intercepted (``dgl.local_loss`` is
wrapped) and differentiated with ``torch.autograd.grad(..., allow_unused=True)``
against every parameter group of the net before it is used. For each pair
(loss of block j, parameters of block i != j) the gradient must be None or
zero, and for i == j it must be non-zero (so the check has teeth). The
negative controls show the same measurement does see a leak when the
detaches are left out.
"""

import pytest
import torch
from torch import nn

from bpsim import data, nets
from bpsim.algorithms import dgl as dgl_mod
from bpsim.algorithms.async_dgl import AsyncDGLTrainer
from bpsim.algorithms.bwbpf import BWBPFTrainer
from bpsim.algorithms.dgl import DGLTrainer, GreedyTrainer


@pytest.fixture(scope="module")
def batch():
    train, _ = data.load("digits")
    x, y = train.tensors
    return x[:32], y[:32]


def _groups(net):
    """Parameter groups: block k with its head (k = 0..K-1), then the output layer."""
    groups = [net.block_parameters(k) for k in range(len(net))]
    if net.output is not None:
        groups.append(list(net.output.parameters()))
    return groups


def _touched(loss, groups):
    """Indices of the groups that receive a non-zero gradient from ``loss``."""
    flat = [p for g in groups for p in g]
    grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
    out, i = set(), 0
    for gi, g in enumerate(groups):
        for _ in g:
            if grads[i] is not None and grads[i].abs().sum().item() > 0:
                out.add(gi)
            i += 1
    return out


class _Spy:
    """Wraps ``dgl.local_loss``: records (owner group, groups touched) per loss."""

    def __init__(self, net, monkeypatch):
        self.net, self.rows = net, []
        self._orig = dgl_mod.local_loss
        monkeypatch.setattr(dgl_mod, "local_loss", self)

    def owner(self, head):
        if self.net.output is not None and head is self.net.output:
            return len(self.net)
        for k, h in enumerate(self.net.heads):
            if h is head:
                return k
        raise AssertionError("a local loss was built with a head that is not part of the net")

    def __call__(self, out, head, y, loss_fn):
        loss = self._orig(out, head, y, loss_fn)
        self.rows.append((self.owner(head), _touched(loss, _groups(self.net))))
        return loss


def _assert_isolated(spy, expect_owners):
    assert spy.rows, "no local loss was built"
    for owner, touched in spy.rows:
        # (loss of j, params of i != j): None or zero; (j, j): non-zero
        assert touched == {owner}, f"loss of group {owner} reaches groups {sorted(touched)}"
    assert {o for o, _ in spy.rows} == set(expect_owners)


def _mlp(blocks, depth, **kw):
    return nets.build("mlp", (1, 8, 8), 10, blocks, width=32, depth=depth, seed=0, **kw)


def test_dgl_steps_are_isolated(batch, monkeypatch):
    net = _mlp(3, 2, aux="mlp")
    spy = _Spy(net, monkeypatch)
    t = DGLTrainer(net, lr=0.05)
    for _ in range(2):
        t.train_step(*batch, torch.arange(32))
    assert [o for o, _ in spy.rows] == [0, 1, 2, 0, 1, 2]
    _assert_isolated(spy, range(3))


def test_greedy_steps_are_isolated(batch, monkeypatch):
    net = _mlp(2, 2, aux="linear")
    spy = _Spy(net, monkeypatch)
    t = GreedyTrainer(net, lr=0.05)
    t._total_epochs, t.epoch = 2, 1  # block 2's turn
    t.train_step(*batch, torch.arange(32))
    _assert_isolated(spy, [1])


def test_async_dgl_steps_are_isolated(batch, monkeypatch):
    net = _mlp(3, 2, aux="mlp")
    spy = _Spy(net, monkeypatch)
    t = AsyncDGLTrainer(net, lr=0.05, buffer=4, seed=1)
    x, y = batch
    for i in range(12):
        t.train_step(x[i % 4 * 8:(i % 4 + 1) * 8], y[i % 4 * 8:(i % 4 + 1) * 8], torch.arange(8))
    _assert_isolated(spy, range(3))
    for buf in t.buffers:  # what travels between blocks carries no graph
        for _ in range(len(buf)):
            h, _ = buf.get()
            assert not h.requires_grad and h.grad_fn is None


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_bwbpf_steps_are_isolated(batch, monkeypatch, model):
    if model == "mlp":
        net = _mlp(3, 3, aux="linear", output_layer=True)
    else:
        net = nets.build("cnn", (1, 8, 8), 10, 3, width=4, aux="linear", output_layer=True, seed=0)
    spy = _Spy(net, monkeypatch)
    t = BWBPFTrainer(net, lr=0.05)
    t.train_step(*batch, torch.arange(32))
    # K block losses, then the global loss, which reaches the output layer only
    assert [o for o, _ in spy.rows] == [0, 1, 2, 3]
    _assert_isolated(spy, range(4))


def test_block_forward_cuts_the_graph(batch):
    net = _mlp(2, 2, aux="mlp")
    h1 = dgl_mod.block_forward(net.blocks[0], batch[0])
    h2 = dgl_mod.block_forward(net.blocks[1], h1)
    assert _touched(h2.sum(), _groups(net)) == {1}


# ------------------------------------------------------- negative controls
def test_negative_control_without_detach_the_loss_leaks(batch):
    """The same measurement on a chain without detaches: block 2's loss reaches block 1."""
    net = _mlp(2, 2, aux="mlp")
    x, y = batch
    h = x
    for b in net.blocks:
        h = b(h)  # no detach: end-to-end graph
    loss = dgl_mod.local_loss(h, net.heads[1], y, nn.functional.cross_entropy)
    assert _touched(loss, _groups(net)) == {0, 1}


def test_negative_control_bwbpf_authors_code_leaks(batch):
    """Without the detach before the output layer (the authors' public code) the
    global loss trains every block, which BWBPF's paper rules out."""
    net = _mlp(2, 3, aux="linear", output_layer=True)
    x, y = batch
    h = x
    for b in net.blocks:
        h = b(h)
    loss = nn.functional.cross_entropy(net.output(h), y)
    assert _touched(loss, _groups(net)) == {0, 1, 2}
