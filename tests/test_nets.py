"""BlockNet and builders: splits, shapes, heads, FLOPs, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bpsim import nets


@given(n=st.integers(1, 40), k=st.integers(1, 40))
def test_split_evenly_is_balanced(n, k):
    if k > n:
        with pytest.raises(ValueError):
            nets.split_evenly(n, k)
        return
    sizes = nets.split_evenly(n, k)
    assert sum(sizes) == n and len(sizes) == k and max(sizes) - min(sizes) <= 1


@settings(max_examples=20, deadline=None)
@given(layers=st.integers(1, 7), data=st.data())
def test_mlp_blocks_hold_consecutive_layers(layers, data):
    k = data.draw(st.integers(1, layers))
    sizes = [12] + [9] * (layers - 1) + [3]
    net = nets.mlp(sizes, blocks=k)
    assert len(net) == k
    linears = [[m for m in b.modules() if isinstance(m, nn.Linear)] for b in net.blocks]
    counts = [len(l) for l in linears]
    assert sum(counts) == layers and max(counts) - min(counts) <= 1
    # the last block ends with the output layer, no activation after it
    assert isinstance(list(net.blocks[-1].children())[-1], nn.Linear)
    x = torch.randn(5, 12)
    out = net(x)
    assert out.shape == (5, 3)
    h = x
    for b in net.blocks:
        h = b(h)
    assert torch.equal(h, out)


def test_mlp_width_depth_and_seed():
    a = nets.mlp(width=32, depth=3, input_shape=(1, 8, 8), blocks=2, seed=3)
    b = nets.mlp(width=32, depth=3, input_shape=(1, 8, 8), blocks=2, seed=3)
    c = nets.mlp(width=32, depth=3, input_shape=(1, 8, 8), blocks=2, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.shapes() == [(32,), (10,)]
    rng = torch.get_rng_state()
    nets.mlp(width=8, depth=1, blocks=1, seed=0)
    assert torch.equal(rng, torch.get_rng_state())  # builders leave the global RNG alone


def test_bad_splits_are_value_errors():
    with pytest.raises(ValueError, match="between 1 and 3"):
        nets.mlp([64, 32, 32, 10], blocks=4)
    with pytest.raises(ValueError, match="between 1 and 3"):
        nets.mlp([64, 32, 32, 10], blocks=0)
    with pytest.raises(ValueError, match="1, 2 or 3"):
        nets.resnet(4)
    with pytest.raises(ValueError, match="unknown model"):
        nets.build("transformer", (1, 8, 8), 10, 2)


def test_shape_mismatch_names_both_blocks():
    with pytest.raises(ValueError, match=r"block 2 .*block 3|block 2 outputs .* block 3"):
        nets.BlockNet([nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(7, 2)], input_shape=(4,))
    with pytest.raises(ValueError, match="block 1"):
        nets.BlockNet([nn.Linear(3, 6)], input_shape=(4,))


def test_heads_and_output_layer():
    dgl = nets.mlp([64, 32, 32, 10], blocks=3, aux="mlp")
    assert isinstance(dgl.heads[-1], nn.Identity)  # the last block ends with the classifier
    h = dgl.blocks[0](torch.randn(2, 64))
    assert dgl.heads[0](h).shape == (2, 10)
    bw = nets.mlp([64, 32, 32, 10], blocks=2, output_layer=True)
    assert bw.output is not None and all(isinstance(hd, nn.Linear) for hd in bw.heads)
    assert bw(torch.randn(2, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown auxiliary head"):
        nets.make_head("transformer", (8,), 10)
    with pytest.raises(ValueError, match="feature maps"):
        nets.make_head("cnn", (8,), 10)


def test_vgg_follows_dgl_and_resnet_splits_at_stages():
    net = nets.vgg(3, width=8, input_shape=(1, 28, 28), aux="cnn")
    # widths 8 -> pool -> 16, 16 -> pool -> 32 ...: 6 conv layers, 2 per block
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    main = [m for b in net.blocks for m in b.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in main] == [8, 16, 16, 32, 32, 32]
    assert len(convs) == 6 + 2 * 2  # two cnn-aux heads with two convs each
    assert net.shapes() == [(16, 14, 14), (32, 7, 7), (10,)]
    for aux in nets.HEADS:
        n = nets.vgg(2, width=8, aux=aux)
        assert n(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    r = nets.resnet(3, width=4, input_shape=(3, 32, 32))
    assert r.shapes() == [(4, 32, 32), (8, 16, 16), (10,)]


def test_flops_of_one_linear_and_one_conv_by_hand():
    # Linear 64 -> 10: 640 multiply-adds = 1280 FLOPs per example
    assert nets.count_flops(nn.Linear(64, 10), (64,)) == 2 * 64 * 10
    # Conv 3 -> 8, 3x3, padding 1 on 5x5: each of 8*5*5 outputs takes 3*3*3 MACs
    assert nets.count_flops(nn.Conv2d(3, 8, 3, padding=1), (3, 5, 5)) == 2 * (3 * 3 * 3) * (8 * 5 * 5)
    # strided, grouped conv: 4 -> 4 channels in 2 groups, 3x3, stride 2 on 6x6 -> 3x3 outputs
    assert nets.count_flops(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), (4, 6, 6)) == 2 * (2 * 9) * (4 * 3 * 3)
    net = nets.mlp([64, 32, 10], blocks=2)
    assert net.block_flops() == [2 * 64 * 32, 2 * 32 * 10]


def test_table1_kind_of_ratio():
    net = nets.vgg(4, width=16, aux="mlp")
    ratio_mlp = max(net.head_flops()) / max(net.block_flops())
    net_cnn = nets.vgg(4, width=16, aux="cnn")
    ratio_cnn = max(net_cnn.head_flops()) / max(net_cnn.block_flops())
    assert ratio_mlp < 0.1 < ratio_cnn  # DGL Table 1: MLP-aux is far cheaper than CNN-aux


def test_input_grad_flops_is_the_first_weighted_layer():
    net = nets.mlp([64, 128, 32, 10], blocks=2)
    fl, ig = net.block_flops(), net.input_grad_flops()
    first = [m for m in net.blocks[1].modules() if isinstance(m, torch.nn.Linear)][0]
    assert ig[1] == 2 * first.in_features * first.out_features
    assert all(0 < i <= f for i, f in zip(ig, fl))
    v = nets.vgg(2, width=4)
    conv = [m for m in v.blocks[1].modules() if isinstance(m, torch.nn.Conv2d)][0]
    x = torch.zeros(1, 1, 28, 28)
    h = v.blocks[0](x)
    assert v.input_grad_flops()[1] == 2 * conv.in_channels * 9 * conv.out_channels * h.shape[2] * h.shape[3]


def test_build_gives_the_default_mlp_enough_layers_for_its_blocks():
    for K in (2, 3, 4, 6):
        net = nets.build("mlp", (64,), 10, K, seed=0)
        assert len(net) == K
    with pytest.raises(ValueError, match=r"depth >= 3"):
        nets.build("mlp", (64,), 10, 4, depth=2, seed=0)
