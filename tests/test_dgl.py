"""Synchronous DGL, sequential greedy training and the Corollary 3.1 drift proxy."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bpsim import data, nets
from bpsim.algorithms import get_trainer
from bpsim.algorithms.dgl import (
    DGLTrainer, GreedyTrainer, block_forward, input_drift, local_head, local_update, probe_outputs,
)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _net(seed=0, aux="mlp", **kw):
    return nets.build("mlp", (1, 8, 8), 10, 2, aux=aux, seed=seed, **kw)


def _small(train, n=320):
    return TensorDataset(*(t[:n] for t in train.tensors))


def test_registry():
    assert get_trainer("dgl") is DGLTrainer and get_trainer("greedy") is GreedyTrainer
    assert DGLTrainer.aux_default in nets.HEADS and not DGLTrainer.output_layer


def test_dgl_learns_digits(digits):
    train, test = digits
    t = DGLTrainer(_net(), lr=0.05, seed=0)
    hist = t.fit(train, 15, test=test)
    assert hist.final_accuracy >= 0.93
    rec = hist.records[-1]
    assert len(rec.local_losses) == 2 and rec.train_loss == rec.local_losses[-1]
    assert hist.local_losses[-1][0] < hist.local_losses[0][0]  # block 1's own loss went down
    assert all(a > 0.9 for a in rec.extra["head_train_accuracy"])


def test_greedy_learns_digits(digits):
    train, test = digits
    hist = GreedyTrainer(_net(), lr=0.05, seed=0).fit(train, 15, test=test)
    assert len(hist) == 15
    assert hist.final_accuracy >= 0.90
    assert [r.extra["active_block"] for r in hist.records] == [1] * 8 + [2] * 7


def test_dgl_with_one_block_is_backprop(digits):
    """K = 1: the only local loss is the global loss, so DGL and backprop coincide."""
    from bpsim.algorithms.backprop import BackpropTrainer

    small = _small(digits[0])
    a = DGLTrainer(nets.mlp([64, 32, 10], blocks=1, seed=0), lr=0.05, seed=1)
    b = BackpropTrainer(nets.mlp([64, 32, 10], blocks=1, seed=0), lr=0.05, seed=1)
    ha, hb = a.fit(small, 2), b.fit(small, 2)
    assert ha.train_loss == hb.train_loss
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters()))


def test_local_update_steps_only_its_block(digits):
    net = _net()
    x, y = digits[0].tensors[0][:32], digits[0].tensors[1][:32]
    opts = DGLTrainer(net).optimizers
    before = [p.detach().clone() for p in net.parameters()]
    out = block_forward(net.blocks[1], net.blocks[0](x))
    loss = local_update(out, local_head(net, 1), opts[1], y, nn.functional.cross_entropy)
    assert isinstance(loss, float) and loss > 0
    mine = {id(p) for p in net.block_parameters(1)}
    for p, q in zip(net.parameters(), before):
        assert torch.equal(p, q) != (id(p) in mine)


def test_greedy_trains_one_block_at_a_time(digits):
    net = _net(aux="linear")
    params = net.block_parameters(0) + net.block_parameters(1)  # block 1 + head, then block 2
    n1 = len(net.block_parameters(0))
    init = [p.detach().clone() for p in params]
    snaps = []
    GreedyTrainer(net, lr=0.05, seed=0).fit(
        _small(digits[0]), 2, callbacks=[lambda tr, rec: snaps.append([p.detach().clone() for p in params])])
    after1, after2 = snaps

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a, b))

    # epoch 1: block 1 (+ head) moves, block 2 waits; epoch 2: block 1 frozen, block 2 moves
    assert not same(init[:n1], after1[:n1]) and same(init[n1:], after1[n1:])
    assert same(after1[:n1], after2[:n1]) and not same(after1[n1:], after2[n1:])


def test_greedy_schedule_and_errors():
    t = GreedyTrainer(_net())
    assert t.schedule(15) == [8, 7] and t.schedule(4) == [2, 2]
    with pytest.raises(ValueError, match="epochs >= 2"):
        t.schedule(1)
    with pytest.raises(ValueError, match="adds up to"):
        GreedyTrainer(_net(), epochs_per_block=[1, 2]).schedule(5)
    with pytest.raises(ValueError, match="positive integers"):
        GreedyTrainer(_net(), epochs_per_block=[0, 2])


def _resume_matches(cls, train, tmp_path, epochs=4, stop_after=3, **kw):
    full = cls(_net(), **kw)
    h_full = full.fit(train, epochs)

    class Stop(Exception):
        pass

    def interrupt(tr, rec):
        if rec.epoch == stop_after:
            raise Stop  # before epoch 3's checkpoint is written: resume from epoch 2

    with pytest.raises(Stop):
        cls(_net(), checkpoint_dir=tmp_path, **kw).fit(train, epochs, callbacks=[interrupt])
    resumed = cls(_net(), checkpoint_dir=tmp_path, **kw)
    h_res = resumed.fit(train, epochs, resume=True)
    assert len(h_res) == epochs and h_res.same_as(h_full)
    for p, q in zip(full.net.parameters(), resumed.net.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [DGLTrainer, GreedyTrainer])
def test_resume_is_exact(cls, digits, tmp_path):
    _resume_matches(cls, _small(digits[0]), tmp_path, lr=0.05, weight_decay=1e-4, seed=2)


def test_dgl_refuses_nets_it_cannot_train():
    with pytest.raises(ValueError, match="output_layer=False"):
        DGLTrainer(_net(aux="linear", output_layer=True))
    with pytest.raises(ValueError, match="aux="):
        DGLTrainer(nets.build("mlp", (1, 8, 8), 10, 2, aux=None))
    assert isinstance(local_head(nets.mlp([64, 10]), 0), nn.Identity)
    with pytest.raises(ValueError, match="0..1"):
        local_head(_net(), 2)


# ------------------------------------------------------ Corollary 3.1 proxy
def test_input_drift_on_known_snapshots():
    final = torch.tensor([[3.0, 4.0], [0.0, 5.0]])  # mean norm 5
    snaps = [final + 5.0 * torch.tensor([1.0, 0.0]), final + torch.tensor([0.0, 1.0]), final]
    d = input_drift(snaps, lrs=[0.1, 0.1, 0.1])
    assert d["c"] == pytest.approx([1.0, 0.2, 0.0])
    assert d["cumsum"] == pytest.approx([1.0, 1.2, 1.2])
    assert d["rate"][0] == pytest.approx(1.0) and d["rate"][2] == pytest.approx((1 + 0.2 ** 0.5) / 3)
    assert input_drift(snaps, relative=False)["c"] == pytest.approx([5.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="same probe batch"):
        input_drift([torch.zeros(3, 2), final])
    with pytest.raises(ValueError, match="one step size per snapshot"):
        input_drift(snaps, lrs=[0.1])
    with pytest.raises(ValueError, match="at least one"):
        input_drift([])


def test_input_drift_of_dgl_block_1_settles(digits):
    train, _ = digits
    net = _net()
    probe = train.tensors[0][:64]
    snaps = [probe_outputs(net, probe)[0]]
    DGLTrainer(net, lr=0.05, seed=0).fit(
        _small(train, 640), 6, callbacks=[lambda tr, rec: snaps.append(probe_outputs(tr.net, probe)[0])])
    c = input_drift(snaps)["c"]
    assert c[-1] == 0 and c[0] > c[-2]  # block 1's outputs move less and less
    assert len(probe_outputs(net, probe)) == 2
