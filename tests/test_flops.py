"""BlockNet's FLOP counts against torch's own counter (``FlopCounterMode``).

``block_flops``, ``head_flops`` and ``input_grad_flops`` count FLOPs *per
example* as 2 per multiply-add of the Linear and Conv2d weights (biases,
batch norm, activations and pooling are not counted). ``FlopCounterMode``
counts the matrix products and convolutions that torch runs, also as 2 per
multiply-add and also without the bias additions, for the whole batch. So
for a batch of ``N`` examples the two agree exactly with a factor ``N``:

* forward:   ``FlopCounterMode(block(x)) == N * block_flops[k]``, same for heads;
* input gradient: the backward with ``x.requires_grad`` minus the backward
  with ``x`` detached (weights require grad in both) is exactly the extra
  work of backpropagating into the block's input, ``N * input_grad_flops[k]``.

Tiny inputs keep this fast.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bpsim import nets

N = 3   # examples per batch


def _count(fn) -> int:
    with FlopCounterMode(display=False) as c:
        fn()
    return c.get_total_flops()


def _backward_flops(block: torch.nn.Module, x: torch.Tensor, input_grad: bool) -> int:
    x = x.detach().clone().requires_grad_(input_grad)
    out = block(x)
    return _count(lambda: out.sum().backward())


NETS = {
    "mlp K=1": lambda aux: nets.mlp([64, 12, 10], blocks=1, aux=aux),
    "mlp K=3": lambda aux: nets.mlp([64, 16, 12, 8, 10], blocks=3, aux=aux),
    "mlp output layer": lambda aux: nets.mlp([64, 16, 12, 10], blocks=2, aux=aux, output_layer=True),
    "vgg K=4": lambda aux: nets.vgg(4, width=4, layers=4, input_shape=(1, 8, 8), aux=aux),
    "vgg output layer": lambda aux: nets.vgg(2, width=4, layers=3, input_shape=(3, 8, 8),
                                             aux=aux, output_layer=True),
    "resnet K=3": lambda aux: nets.resnet(3, width=4, input_shape=(3, 8, 8), aux=aux),
    "resnet K=2": lambda aux: nets.resnet(2, width=2, input_shape=(1, 8, 8), aux=aux),
}
CONV_HEADS = ("linear", "mlp", "mlp-sr", "cnn")
MLP_HEADS = ("linear", "mlp", "mlp-sr")


def _inputs(net: nets.BlockNet) -> list[torch.Tensor]:
    """Each block's input for a batch of N random examples (eval mode)."""
    torch.manual_seed(0)
    x = torch.randn(N, *net.input_shape)
    out = []
    with torch.no_grad():
        for b in net.blocks:
            out.append(x)
            x = b(x)
    out.append(x)
    return out


@pytest.mark.parametrize("name", NETS)
def test_block_flops_match_torch(name):
    net = NETS[name](None).eval()
    xs = _inputs(net)
    measured = []
    with torch.no_grad():
        for b, x in zip(net.blocks, xs):
            measured.append(_count(lambda b=b, x=x: b(x)))
    assert measured == [N * f for f in net.block_flops()]


@pytest.mark.parametrize("name", [n for n in NETS if n.startswith("mlp")])
@pytest.mark.parametrize("aux", MLP_HEADS)
def test_head_flops_match_torch_mlp(name, aux):
    _check_heads(NETS[name](aux).eval())


@pytest.mark.parametrize("name", [n for n in NETS if not n.startswith("mlp")])
@pytest.mark.parametrize("aux", CONV_HEADS)
def test_head_flops_match_torch_conv(name, aux):
    _check_heads(NETS[name](aux).eval())


def _check_heads(net: nets.BlockNet) -> None:
    xs = _inputs(net)
    measured = []
    with torch.no_grad():
        for k, h in enumerate(net.heads):
            measured.append(0 if h is None else _count(lambda h=h, x=xs[k + 1]: h(x)))
        if net.output is not None:       # BWBPF's output layer, on the last block's output
            assert _count(lambda: net.output(xs[-1])) == N * nets.count_flops(
                net.output, xs[-1].shape[1:])
    assert measured == [N * f for f in net.head_flops()]


@pytest.mark.parametrize("name", NETS)
def test_input_grad_flops_match_torch(name):
    net = NETS[name](None).eval()
    xs = _inputs(net)
    extra = [_backward_flops(b, x, True) - _backward_flops(b, x, False)
             for b, x in zip(net.blocks, xs)]
    assert extra == [N * f for f in net.input_grad_flops()]


def test_resnet_counts_the_skip_convolution_of_a_downsampling_block():
    net = nets.resnet(3, width=4, input_shape=(3, 8, 8))
    ig = net.input_grad_flops()
    unit = net.blocks[1][0]              # stage 2 starts with a stride-2 unit: 3x3 body, 1x1 skip
    h = w = 4                            # 8x8 input halved
    body = 2 * unit.body[0].in_channels * 9 * unit.body[0].out_channels * h * w
    skip = 2 * unit.skip[0].in_channels * 1 * unit.skip[0].out_channels * h * w
    assert ig[1] == body + skip
    assert ig[2] == ig[1]    # stage 3: twice the channels in and out on a quarter of the pixels
