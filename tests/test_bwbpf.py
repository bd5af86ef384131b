"""BWBPF as its paper describes it: local dense heads, output layer on the global loss."""

import pytest
import torch
from torch import nn

from bpsim import data, nets
from bpsim.algorithms import get_trainer
from bpsim.algorithms.bwbpf import BWBPFTrainer


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _net(seed=0, **kw):
    kw = {"aux": "linear", "output_layer": True, **kw}
    return nets.build("mlp", (1, 8, 8), 10, 2, seed=seed, **kw)


def test_registry_and_build_defaults():
    assert get_trainer("bwbpf") is BWBPFTrainer
    assert BWBPFTrainer.aux_default == "linear" and BWBPFTrainer.output_layer
    net = _net()
    assert net.output is not None and all(isinstance(h, nn.Linear) for h in net.heads)
    cnn = nets.build("cnn", (1, 8, 8), 10, 2, width=4, aux="linear", output_layer=True)
    assert all(isinstance(h[0], nn.AdaptiveAvgPool2d) and isinstance(h[-1], nn.Linear) for h in cnn.heads)


def test_bwbpf_learns_digits(digits):
    train, test = digits
    t = BWBPFTrainer(_net(), lr=0.05, seed=0)
    hist = t.fit(train, 15, test=test)
    assert hist.final_accuracy >= 0.90
    rec = hist.records[-1]
    assert len(rec.local_losses) == 2
    assert rec.extra["output_train_accuracy"] > 0.9 and len(rec.extra["head_train_accuracy"]) == 2
    x = test.tensors[0][:10]
    t.net.eval()
    with torch.no_grad():  # predict = the output layer on the last block's features
        assert torch.equal(t.predict(x), t.net.output(t.net.blocks[1](t.net.blocks[0](x))))


def test_blocks_never_hear_from_the_output_layer(digits):
    """The blocks' trajectory does not depend on how the output layer is trained:
    two runs that differ only in the output layer's learning rate give blocks
    and heads identical to the bit, and different output layers."""
    x, y = digits[0].tensors[0][:128], digits[0].tensors[1][:128]
    nets_ = []
    for lr_out in (0.05, 0.5):
        t = BWBPFTrainer(_net(), lr=[0.05, 0.05, lr_out])
        for i in range(0, 128, 32):
            t.train_step(x[i:i + 32], y[i:i + 32], torch.arange(32))
        nets_.append(t.net)
    a, b = nets_
    assert all(torch.equal(p, q) for p, q in zip(a.blocks.parameters(), b.blocks.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.heads.parameters(), b.heads.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.output.parameters(), b.output.parameters()))


def test_cnn_step_runs():
    net = nets.build("cnn", (1, 8, 8), 10, 3, width=4, aux="linear", output_layer=True)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    r = BWBPFTrainer(net).train_step(x, y, torch.arange(16))
    assert r.loss > 0 and len(r.local_losses) == 3


def test_bwbpf_refuses_nets_without_its_parts():
    with pytest.raises(ValueError, match="output_layer=True"):
        BWBPFTrainer(nets.build("mlp", (1, 8, 8), 10, 2, aux="linear"))
    no_heads = nets.BlockNet(list(_net().blocks), None, nn.Linear(256, 10))
    with pytest.raises(ValueError, match="aux='linear'"):
        BWBPFTrainer(no_heads)
