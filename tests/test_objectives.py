"""BlockProp's objectives (eq. 4-7): values, which terms hold which variables, errors."""

import pytest
import torch
from torch import nn

from bpsim import nets, objectives
from bpsim.objectives import augmented_loss, block_lagrangian, block_objective, penalty


def _setup(K=3, seed=0, n=5, output_layer=False):
    sizes = [6] + [7] * (K - 1) + ([5] if output_layer else []) + [3]
    net = nets.mlp(sizes, blocks=K, seed=seed, output_layer=output_layer).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    with torch.no_grad():
        acts = net.activations(x)[:-1]
    # gluing variables near, but not at, the forward activations
    hs = [(a + 0.3 * torch.randn(a.shape, generator=g, dtype=a.dtype)).requires_grad_(True) for a in acts]
    return net, x, y, hs


def test_penalty_is_lambda_times_squared_distance_averaged_over_the_batch():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    # example sums 5 and 9 -> mean 7, times lam 0.5
    assert penalty(a, b, 0.5).item() == pytest.approx(3.5)
    img = torch.ones(4, 2, 3, 3)
    assert penalty(img, torch.zeros_like(img), 2.0).item() == pytest.approx(2 * 18)


def test_augmented_loss_by_hand_and_as_the_sum_of_block_objectives():
    net, x, y, hs = _setup(K=3)
    lams = [0.7, 2.0]
    b1, b2, b3 = net.blocks
    by_hand = (0.7 * (hs[0] - b1(x)).pow(2).sum(1).mean() + 2.0 * (hs[1] - b2(hs[0])).pow(2).sum(1).mean()
               + nn.functional.cross_entropy(b3(hs[1]), y))
    L = augmented_loss(net, x, y, hs, lams)
    assert torch.allclose(L, by_hand)
    # eq. 6: J = sum_k J_k
    assert torch.allclose(L, sum(block_objective(net, k, x, y, hs, lams) for k in (1, 2, 3)))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_block_lagrangian_holds_every_term_with_h_k(k):
    """d L / d h_k = d L_k / d h_k: argmin over h_k of eq. 4 and eq. 5 agree."""
    net, x, y, hs = _setup(K=4)
    lams = [0.5, 1.0, 3.0]
    g_full = torch.autograd.grad(augmented_loss(net, x, y, hs, lams), hs[k - 2])[0]
    g_k = torch.autograd.grad(block_lagrangian(net, k, x, y, hs, lams), hs[k - 2])[0]
    assert torch.allclose(g_full, g_k, atol=1e-12)
    # and L_k ignores the other gluing variables entirely
    others = [h for j, h in enumerate(hs) if j not in (k - 3, k - 2, k - 1)]
    if others:
        gs = torch.autograd.grad(block_lagrangian(net, k, x, y, hs, lams), others, allow_unused=True)
        assert all(g is None for g in gs)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_block_objective_holds_every_term_with_W_k(k):
    net, x, y, hs = _setup(K=3)
    lams = 1.5
    params = list(net.blocks[k - 1].parameters())
    g_full = torch.autograd.grad(augmented_loss(net, x, y, hs, lams), params)
    g_k = torch.autograd.grad(block_objective(net, k, x, y, hs, lams), params)
    for a, b in zip(g_full, g_k):
        assert torch.allclose(a, b, atol=1e-12)
    # J_k holds no other block's weights
    rest = [p for j, b in enumerate(net.blocks) if j != k - 1 for p in b.parameters()]
    assert all(g is None for g in torch.autograd.grad(block_objective(net, k, x, y, hs, lams), rest,
                                                      allow_unused=True))


def test_output_layer_is_part_of_the_last_block():
    net, x, y, hs = _setup(K=2, output_layer=True)
    assert net.output is not None
    expected = nn.functional.cross_entropy(net.output(net.blocks[1](hs[0])), y)
    assert torch.allclose(block_objective(net, 2, x, y, hs, 1.0), expected)
    assert list(objectives.block_map(net, 2).parameters()) == (
        list(net.blocks[1].parameters()) + list(net.output.parameters()))


def test_regression_targets_use_mse():
    net = nets.mlp([4, 6, 2], blocks=2).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    h = net.blocks[0](x).detach()
    assert torch.allclose(block_objective(net, 2, x, y, [h], 1.0), nn.functional.mse_loss(net(x), y))


@pytest.mark.parametrize("lams, match", [
    (-1.0, "must be > 0"), (0.0, "must be > 0"), ([1.0, -2.0], "got -2.0 for block 2"),
    ([1.0], "K-1 = 2 values"), ([1.0, 1.0, 1.0], "K-1 = 2 values"), (float("nan"), "must be > 0"),
])
def test_bad_lambdas_are_value_errors(lams, match):
    net, x, y, hs = _setup(K=3)
    for f in (lambda: augmented_loss(net, x, y, hs, lams), lambda: block_lagrangian(net, 2, x, y, hs, lams),
              lambda: block_objective(net, 1, x, y, hs, lams)):
        with pytest.raises(ValueError, match=match):
            f()


def test_bad_indices_and_shapes_are_value_errors():
    net, x, y, hs = _setup(K=3)
    with pytest.raises(ValueError, match="k in 2..K"):
        block_lagrangian(net, 1, x, y, hs, 1.0)
    with pytest.raises(ValueError, match="k in 2..K"):
        block_lagrangian(net, 4, x, y, hs, 1.0)
    with pytest.raises(ValueError, match="k in 1..K"):
        block_objective(net, 0, x, y, hs, 1.0)
    with pytest.raises(ValueError, match="h_2..h_3"):
        augmented_loss(net, x, y, hs[:1], 1.0)
    with pytest.raises(ValueError, match="shape"):
        augmented_loss(net, x, y, [hs[0][:, :3], hs[1]], 1.0)
    with pytest.raises(ValueError, match="> 0"):
        penalty(hs[0], hs[0], -1.0)
