"""Networks split into blocks: ``BlockNet``, model builders, auxiliary heads.

A ``BlockNet`` is an ordered list of blocks ``b_1 .. b_K`` (``net.blocks[0..K-1]``
in code), optionally a head per block (DGL's auxiliary nets, BWBPF's local
dense heads) and optionally a separate output layer (BWBPF trains it with the
global loss only). ``net(x)`` is the ordinary end-to-end forward pass.

The builders seed their own initialisation, so ``mlp(..., seed=0)`` gives the
same weights every time without touching the global random state.

FLOPs are counted as 2 per multiply-accumulate of ``nn.Linear`` and
``nn.Conv2d`` layers (biases, normalisation, activations and pooling are
ignored: they are a few percent at most), which is the convention behind
DGL's Table 1 (auxiliary FLOPs relative to the primary module).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from bpsim.methods import AUX_HEADS

__all__ = [
    "BlockNet", "mlp", "vgg", "resnet", "build", "make_head", "count_flops",
    "HEADS", "MODELS", "split_evenly",
]

HEADS = AUX_HEADS   # one list, in the registry (which imports no torch)
MODELS = ("mlp", "cnn", "resnet")


@contextmanager
def _seeded(seed: int):
    """Run a block of code under ``torch.manual_seed(seed)``, restoring the RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------ BlockNet
class BlockNet(nn.Module):
    """A network as K consecutive blocks, with optional heads and output layer.

    Parameters
    ----------
    blocks : the blocks ``b_1 .. b_K`` in order.
    heads : one module (or ``None``) per block; a head maps a block's output
        to class scores for a local loss.
    output : an optional layer after the last block (BWBPF's output layer).
    input_shape : shape of one example; when given, consecutive blocks (and
        heads) are checked to fit, and a mismatch raises ``ValueError``
        naming both blocks.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        heads: Sequence[nn.Module | None] | None = None,
        output: nn.Module | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ValueError("a BlockNet needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        if heads is not None:
            if len(heads) != len(blocks):
                raise ValueError(f"got {len(heads)} heads for {len(blocks)} blocks; give one per block (None for no head)")
            heads = nn.ModuleList([h if h is not None else nn.Identity() for h in heads])
        self.heads = heads
        self.output = output
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        if self.input_shape is not None:
            self.shapes()  # validates

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.output(x) if self.output is not None else x

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs ``[b_1(x), b_2(b_1(x)), ..., b_K(...)]`` of every block."""
        outs = []
        for b in self.blocks:
            x = b(x)
            outs.append(x)
        return outs

    def block_parameters(self, k: int, with_head: bool = True) -> list[nn.Parameter]:
        """Parameters of block ``k`` (0-based) and, by default, of its head."""
        params = list(self.blocks[k].parameters())
        if with_head and self.heads is not None:
            params += list(self.heads[k].parameters())
        return params

    @torch.no_grad()
    def shapes(self, input_shape: Sequence[int] | None = None) -> list[tuple[int, ...]]:
        """Output shape (per example) of every block; raises on a mismatch."""
        shape = tuple(input_shape or self.input_shape or ())
        if not shape:
            raise ValueError("give input_shape (the shape of one example) to check the blocks")
        was = self.training
        self.eval()
        try:
            x = torch.zeros(2, *shape)
            out = []
            for k, b in enumerate(self.blocks):
                try:
                    x = b(x)
                except RuntimeError as e:
                    first = str(e).splitlines()[0]
                    if k == 0:
                        raise ValueError(f"input of shape {shape} does not fit block 1: {first}") from None
                    raise ValueError(
                        f"block {k} outputs shape {tuple(x.shape[1:])} but block {k + 1} cannot take it "
                        f"({first}); make block {k + 1}'s input size match block {k}'s output"
                    ) from None
                out.append(tuple(x.shape[1:]))
                if self.heads is not None:
                    try:
                        self.heads[k](x)
                    except RuntimeError as e:
                        raise ValueError(
                            f"the head of block {k + 1} cannot take its output of shape {out[-1]}: "
                            f"{str(e).splitlines()[0]}"
                        ) from None
            if self.output is not None:
                try:
                    self.output(x)
                except RuntimeError as e:
                    raise ValueError(
                        f"the output layer cannot take block {len(self)}'s output of shape {out[-1]}: "
                        f"{str(e).splitlines()[0]}"
                    ) from None
            return out
        finally:
            self.train(was)

    def block_flops(self, input_shape: Sequence[int] | None = None) -> list[int]:
        """Forward FLOPs per example of every block."""
        shape = tuple(input_shape or self.input_shape or ())
        flops, x = [], torch.zeros(2, *shape)
        for b in self.blocks:
            f, x = _flops_and_output(b, x)
            flops.append(f)
        return flops

    def input_grad_flops(self, input_shape: Sequence[int] | None = None) -> list[int]:
        """FLOPs per example of the gradient with respect to each block's input.

        That is the input-gradient product of every weighted layer (Linear
        or Conv2d) that reads the block's input, directly or through layers
        without weights (flatten, pooling, ReLU, batch norm): the first
        layer of an MLP or VGG block; the first 3x3 convolution *and* the
        1x1 skip convolution of a ResNet block that starts with a
        downsampling unit. Each has the FLOPs of that layer's forward. A
        block whose input is detached (DGL, BWBPF) skips these products;
        one that backpropagates to the previous block (backprop) does them
        in addition. ``bpsim.sim.Costs.with_input_grad`` turns them into time.
        """
        shape = tuple(input_shape or self.input_shape or ())
        out, x = [], torch.zeros(2, *shape)
        for b in self.blocks:
            f, x = _flops_and_output(b, x, input_readers=True)   # x: the block's output
            out.append(f)
        return out

    def head_flops(self, input_shape: Sequence[int] | None = None) -> list[int]:
        """Forward FLOPs per example of every block's head (0 where none)."""
        if self.heads is None:
            return [0] * len(self)
        shape = tuple(input_shape or self.input_shape or ())
        flops, x = [], torch.zeros(2, *shape)
        for b, h in zip(self.blocks, self.heads):
            _, x = _flops_and_output(b, x)
            flops.append(_flops_and_output(h, x)[0])
        return flops


# --------------------------------------------------------------------- FLOPs
def _flops_and_output(module: nn.Module, x: torch.Tensor,
                      input_readers: bool = False) -> tuple[int, torch.Tensor]:
    """Forward FLOPs per example of ``module`` on ``x`` and its output.

    FLOPs are 2 per multiply-add of the Linear and Conv2d weights (biases,
    batch norm, activations and pooling are not counted). With
    ``input_readers`` only the weighted layers that read ``x`` count: those
    whose input is ``x`` or was computed from ``x`` by leaf modules without
    weights (the layers whose input gradient is the gradient of ``x``).
    """
    total = 0
    fed = {id(x): x}        # tensors computed from x without a weighted layer (kept alive)

    def hook(m: nn.Module, inp, out) -> None:
        nonlocal total
        reads = any(isinstance(t, torch.Tensor) and fed.get(id(t)) is t for t in inp)
        if not isinstance(m, _WEIGHTED):
            if reads and isinstance(out, torch.Tensor):
                fed[id(out)] = out
            return
        if input_readers and not reads:
            return
        if isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features * (out.numel() // out.shape[-1]) // out.shape[0]
        else:
            per_out = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            total += 2 * per_out * out[0].numel()

    leaves = [m for m in module.modules() if isinstance(m, _WEIGHTED) or not any(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            y = module(x)
    finally:
        module.train(was)
        for h in handles:
            h.remove()
    return total, y


_WEIGHTED = (nn.Linear, nn.Conv2d)


def count_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward FLOPs for one example of shape ``input_shape`` (2 per MAC)."""
    return _flops_and_output(module, torch.zeros(2, *input_shape))[0]


# --------------------------------------------------------------------- heads
def make_head(kind: str, in_shape: Sequence[int], n_classes: int, width: int | None = None) -> nn.Module:
    """An auxiliary head mapping a block output of shape ``in_shape`` to scores.

    ``linear``  a linear classifier (after global average pooling for feature maps);
                BWBPF's dense head.
    ``mlp``     DGL's MLP-aux: average-pool to 2x2, then a 3-layer MLP of constant width.
    ``mlp-sr``  DGL's MLP-SR-aux: average-pool to a quarter of the resolution, three
                1x1 conv+BN+ReLU, pool to 2x2, then the 3-layer MLP.
    ``cnn``     DGL's CNN-aux: two 3x3 conv+BN+ReLU, pool to 2x2, linear.

    On vector features (MLP blocks) ``mlp`` / ``mlp-sr`` are a 3-layer MLP and
    ``cnn`` is refused.
    """
    if kind not in HEADS:
        raise ValueError(f"unknown auxiliary head {kind!r}; choose one of {', '.join(HEADS)}")
    in_shape = tuple(in_shape)
    if len(in_shape) == 1:  # vector features
        d = in_shape[0]
        if kind == "linear":
            return nn.Linear(d, n_classes)
        if kind == "cnn":
            raise ValueError("the 'cnn' head needs feature maps (C, H, W); use 'linear' or 'mlp' for MLP blocks")
        w = width or d
        return _mlp3(d, w, n_classes)
    if len(in_shape) != 3:
        raise ValueError(f"a head takes (features,) or (C, H, W) inputs, got {in_shape}")
    c, h, w_ = in_shape
    if kind == "linear":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_classes))
    if kind == "mlp":
        w = width or 4 * c
        return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), _mlp3(4 * c, w, n_classes))
    if kind == "mlp-sr":
        w = width or 4 * c
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d((max(1, h // 4), max(1, w_ // 4)))]
        for _ in range(3):
            layers += [nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), _mlp3(4 * c, w, n_classes)]
        return nn.Sequential(*layers)
    # cnn
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, n_classes),
    )


def _mlp3(d_in: int, width: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, d_out))


# ------------------------------------------------------------------ builders
def split_evenly(n: int, k: int) -> list[int]:
    """Sizes of ``k`` consecutive groups of ``n`` items, as equal as possible.

    The first ``n % k`` groups get one item more: ``split_evenly(5, 2) == [3, 2]``.
    """
    if k < 1 or k > n:
        raise ValueError(f"cannot split {n} layers into {k} blocks; choose blocks between 1 and {n}")
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _group(layers: list[list[nn.Module]], k: int) -> list[nn.Sequential]:
    sizes, out, i = split_evenly(len(layers), k), [], 0
    for s in sizes:
        mods = [m for unit in layers[i : i + s] for m in unit]
        out.append(nn.Sequential(*mods))
        i += s
    return out


def _heads_for(blocks: Sequence[nn.Module], input_shape, aux: str | None, n_classes: int,
               last_is_classifier: bool, aux_width: int | None = None) -> list[nn.Module | None] | None:
    if aux is None:
        return None
    heads: list[nn.Module | None] = []
    x = torch.zeros(2, *input_shape)
    with torch.no_grad():
        for k, b in enumerate(blocks):
            b.eval()
            x = b(x)
            b.train()
            if k == len(blocks) - 1 and last_is_classifier:
                heads.append(None)  # the last block already ends with the classifier
            else:
                heads.append(make_head(aux, tuple(x.shape[1:]), n_classes, aux_width))
    return heads


def mlp(
    sizes: Sequence[int] | None = None,
    blocks: int = 1,
    *,
    width: int | None = None,
    depth: int | None = None,
    input_shape: Sequence[int] | None = None,
    n_classes: int = 10,
    aux: str | None = None,
    aux_width: int | None = None,
    output_layer: bool = False,
    seed: int = 0,
) -> BlockNet:
    """A ReLU multilayer perceptron split into ``blocks`` consecutive blocks.

    ``sizes = [d_in, h_1, ..., d_out]`` gives ``L = len(sizes) - 1`` linear
    layers, ReLU after every one but the last; they are split into K blocks
    as evenly as possible and the last block ends with the output layer (no
    activation after it). Alternatively give ``width`` and ``depth`` (number
    of hidden layers) with ``input_shape`` or a first size.

    ``aux`` adds a head (``linear``/``mlp``/``mlp-sr``) to blocks 1..K-1 (DGL);
    ``output_layer=True`` keeps the last linear layer out of the blocks as
    ``net.output`` and gives *every* block a head (BWBPF).
    """
    if sizes is None:
        if width is None or depth is None:
            raise ValueError("give either sizes=[d_in, ..., d_out] or width= and depth=")
        if width < 1 or depth < 0:
            raise ValueError(f"width must be >= 1 and depth >= 0, got width={width}, depth={depth}")
        d_in = _numel(input_shape) if input_shape is not None else 64
        sizes = [d_in] + [width] * depth + [n_classes]
    sizes = list(sizes)
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least an input and an output size, all >= 1, got {sizes}")
    in_shape = tuple(input_shape) if input_shape is not None else (sizes[0],)
    if _numel(in_shape) != sizes[0]:
        raise ValueError(f"input_shape {in_shape} has {_numel(in_shape)} features but sizes[0] is {sizes[0]}")
    n_layers = len(sizes) - 1
    in_blocks = n_layers - 1 if output_layer else n_layers
    if blocks < 1 or blocks > in_blocks:
        raise ValueError(
            f"blocks must be between 1 and {in_blocks} for an MLP with {n_layers} layers"
            f"{' and a separate output layer' if output_layer else ''}, got {blocks}; "
            f"give more hidden layers (depth >= {blocks if output_layer else blocks - 1}) or fewer blocks"
        )
    with _seeded(seed):
        units: list[list[nn.Module]] = []
        for i in range(in_blocks):
            unit: list[nn.Module] = [nn.Flatten()] if i == 0 else []
            unit.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < n_layers - 1:
                unit.append(nn.ReLU())
            units.append(unit)
        bl = _group(units, blocks)
        output = nn.Linear(sizes[-2], sizes[-1]) if output_layer else None
        heads = _heads_for(bl, in_shape, aux or ("linear" if output_layer else None), n_classes,
                           last_is_classifier=not output_layer, aux_width=aux_width)
    return BlockNet(bl, heads, output, input_shape=in_shape)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def vgg(
    blocks: int = 1,
    *,
    width: int = 128,
    layers: int = 6,
    input_shape: Sequence[int] = (1, 28, 28),
    n_classes: int = 10,
    aux: str | None = None,
    aux_width: int | None = None,
    output_layer: bool = False,
    seed: int = 0,
) -> BlockNet:
    """DGL's VGG-like CNN (Sec. 4.1): ``layers`` 3x3 conv+BN+ReLU layers.

    2x2 max-pooling after layers 1 and 3; the first layer has ``width``
    channels (128 in the paper) and the width doubles at each downsampling.
    The last block ends with average pooling to 2x2 and a classifier with two
    hidden layers (kept out of the blocks as ``net.output`` when
    ``output_layer=True``). Layers are split into ``blocks`` blocks evenly.
    """
    if width < 1 or layers < 1:
        raise ValueError(f"width and layers must be >= 1, got width={width}, layers={layers}")
    if blocks < 1 or blocks > layers:
        raise ValueError(f"blocks must be between 1 and {layers} (the number of conv layers), got {blocks}")
    in_shape = tuple(input_shape)
    with _seeded(seed):
        units: list[list[nn.Module]] = []
        c_in, c = in_shape[0], width
        for i in range(1, layers + 1):
            unit = _conv_bn_relu(c_in, c)
            c_in = c
            if i in (1, 3):
                unit.append(nn.MaxPool2d(2))
                if i < layers:
                    c *= 2
            units.append(unit)
        classifier = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), _mlp3(4 * c_in, c_in, n_classes))
        if not output_layer:
            units[-1].append(classifier)
        bl = _group(units, blocks)
        heads = _heads_for(bl, in_shape, aux or ("linear" if output_layer else None), n_classes,
                           last_is_classifier=not output_layer, aux_width=aux_width)
    return BlockNet(bl, heads, classifier if output_layer else None, input_shape=in_shape)


class _BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 conv+BN with a skip connection."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.skip = (
            nn.Identity() if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet(
    blocks: int = 1,
    *,
    width: int = 16,
    input_shape: Sequence[int] = (3, 32, 32),
    n_classes: int = 10,
    aux: str | None = None,
    output_layer: bool = False,
    seed: int = 0,
) -> BlockNet:
    """A small CIFAR-style ResNet (3 stages of 2 basic blocks, widths w, 2w, 4w).

    It is split only at stage boundaries, so ``blocks`` is 1, 2 or 3; the
    stem goes with the first stage, the pooling + linear classifier with the
    last (or into ``net.output`` when ``output_layer=True``).
    """
    if blocks < 1 or blocks > 3:
        raise ValueError(f"the small ResNet has 3 stages; blocks must be 1, 2 or 3, got {blocks}")
    in_shape = tuple(input_shape)
    with _seeded(seed):
        w = width
        stem = [nn.Conv2d(in_shape[0], w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        stages = [
            stem + [_BasicBlock(w, w, 1), _BasicBlock(w, w, 1)],
            [_BasicBlock(w, 2 * w, 2), _BasicBlock(2 * w, 2 * w, 1)],
            [_BasicBlock(2 * w, 4 * w, 2), _BasicBlock(4 * w, 4 * w, 1)],
        ]
        classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, n_classes))
        if not output_layer:
            stages[-1].append(classifier)
        bl = _group(stages, blocks)
        heads = _heads_for(bl, in_shape, aux or ("linear" if output_layer else None), n_classes,
                           last_is_classifier=not output_layer)
    return BlockNet(bl, heads, classifier if output_layer else None, input_shape=in_shape)


def build(
    model: str,
    input_shape: Sequence[int],
    n_classes: int,
    blocks: int,
    *,
    width: int | None = None,
    depth: int | None = None,
    aux: str | None = None,
    output_layer: bool = False,
    seed: int = 0,
) -> BlockNet:
    """Build ``mlp`` / ``cnn`` (DGL's VGG-like net) / ``resnet`` by name (the CLI's path)."""
    if model == "mlp":
        if depth is None:   # two hidden layers, or as many as the blocks need
            depth = max(2, blocks if output_layer else blocks - 1)
        return mlp(width=width or 256, depth=depth, input_shape=input_shape,
                   n_classes=n_classes, blocks=blocks, aux=aux, output_layer=output_layer, seed=seed)
    if model == "cnn":
        return vgg(blocks, width=width or 128, layers=depth or 6, input_shape=input_shape,
                   n_classes=n_classes, aux=aux, output_layer=output_layer, seed=seed)
    if model == "resnet":
        return resnet(blocks, width=width or 16, input_shape=input_shape, n_classes=n_classes,
                      aux=aux, output_layer=output_layer, seed=seed)
    raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
