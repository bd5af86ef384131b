"""Lemma B.1, the large-lambda limit (Theorem 5.1) and the Appendix A cost model, checked as math."""

import pytest
import torch

from bpsim import nets, theory
from bpsim.algorithms.blockprop import h_step


def _toy(sizes, K, seed=1, n=8):
    """A K-block MLP with one layer per block; tanh (smooth) when K > 2.

    With ReLU between blocks the joint minimiser over h_2..h_K can sit on a
    kink, where J(W) has no gradient; tanh keeps the checks about the math.
    """
    if K == 2:
        net = nets.mlp(sizes, blocks=K, seed=seed)
    else:
        torch.manual_seed(seed)
        blocks = [torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.Tanh()) for a, b in zip(sizes[:-2], sizes[1:-1])]
        net = nets.BlockNet(blocks + [torch.nn.Linear(sizes[-2], sizes[-1])], input_shape=(sizes[0],))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, sizes[0], generator=g)
    y = torch.randint(0, sizes[-1], (n,), generator=g)
    return net, x, y


@pytest.mark.parametrize("sizes, K, lams", [([6, 7, 3], 2, 1.0), ([6, 7, 5, 3], 3, [0.5, 2.0])])
def test_lemma_b1_envelope_gradient_matches_finite_differences_of_J(sizes, K, lams):
    """grad J(W) = dL/dW at the converged h* (J(W) = min_h L(h, W)), float64."""
    net, x, y = _toy(sizes, K)
    net64, x64, y64 = theory.as_float64(net, x, y)
    hstar = theory.inner_solve(net64, x64, y64, lams)
    g = theory.blockprop_gradient(net64, x64, y64, hstar, lams)
    params = theory.flat_params(net64)
    w = torch.nn.utils.parameters_to_vector(params).detach().clone()
    d = torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def J(v):
        torch.nn.utils.vector_to_parameters(v, params)
        return theory.reduced_objective(net64, x64, y64, lams, hs=hstar)

    eps = 1e-5
    fd = (J(w + eps * d) - J(w - eps * d)) / (2 * eps)
    torch.nn.utils.vector_to_parameters(w, params)
    assert float(g @ d) == pytest.approx(fd, rel=1e-6)
    # the envelope term matters: dL/dW at the forward activations (N_h = 0) is far off
    g0 = theory.blockprop_gradient(net64, x64, y64, h_step(net64, x64, y64, lams, 0, None), lams)
    assert abs(float(g0 @ d) - fd) > 1e-2 * abs(fd)


def test_lemma_b1_error_falls_to_zero_with_more_h_steps():
    net, x, y = _toy([6, 7, 3], 2)
    before = [p.detach().clone() for p in net.parameters()]
    curve = theory.lemma_b1_curve(net, x, y, 1.0, [0, 1, 4, 16, 256], lr_h=0.1)
    err = curve["rel_error"]
    assert all(a > b for a, b in zip(err, err[1:]))
    assert err[0] > 0.1 and err[-1] < 1e-8 and curve["cosine"][-1] == pytest.approx(1.0)
    assert theory.lemma_b1_error(net, x, y, 1.0, 4, lr_h=0.1) == pytest.approx(err[2])
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))  # works on a copy


def test_one_sweep_plateaus_for_three_blocks_and_repeated_sweeps_converge():
    net, x, y = _toy([6, 7, 5, 3], 3)
    one = theory.lemma_b1_curve(net, x, y, 1.0, [32, 128], lr_h=0.2)["rel_error"]
    assert one[1] > 1e-2 and one[0] == pytest.approx(one[1], rel=1e-2)  # block-coordinate floor
    assert theory.lemma_b1_error(net, x, y, 1.0, 8, lr_h=0.2, sweeps=20) < 1e-6


@pytest.mark.parametrize("sizes, K", [([6, 7, 3], 2), ([6, 7, 5, 3], 3)])
def test_large_lambda_limit_approaches_backprop_linearly_in_beta(sizes, K):
    net, x, y = _toy(sizes, K)
    res = theory.large_lambda_limit(net, x, y, betas=[1e-1, 1e-2, 1e-3, 1e-4])
    err, cos = res["rel_error"], res["cosine"]
    assert all(a > b for a, b in zip(err, err[1:]))
    assert err[-1] < 1e-3 and cos[-1] > 1 - 1e-6
    assert 0.8 < res["slope"] < 1.3
    assert res["lam"] == pytest.approx([10, 100, 1000, 10000])
    c, e = theory.blockprop_vs_backprop(net, x, y, 1e4)
    assert e == pytest.approx(err[-1], rel=1e-3) and c == pytest.approx(cos[-1])


def test_large_lambda_limit_needs_two_positive_betas():
    net, x, y = _toy([6, 7, 3], 2)
    with pytest.raises(ValueError, match="two betas"):
        theory.large_lambda_limit(net, x, y, betas=[0.1])
    with pytest.raises(ValueError, match="two betas"):
        theory.large_lambda_limit(net, x, y, betas=[0.1, -1.0])


def test_cost_model_of_the_papers_mlp_by_hand():
    net = nets.mlp([784, 256, 10], blocks=2, input_shape=(1, 28, 28))
    F1, F2 = 2 * 784 * 256, 2 * 256 * 10
    for n_h in (0, 1, 4):
        c = theory.cost_model(net, n_h)
        F = F1 + F2
        assert c["block_forward"] == [F1, F2] and c["forward"] == F
        assert c["backprop"] == 3 * F and c["h_backprop"] == 2 * F2
        assert c["total"] == 3 * F + F + n_h * 2 * F2 == c["w_step"] + c["h_step"]
        assert c["lower_bound"] <= c["total"] <= c["upper_bound"]
        assert c["ratio"] == pytest.approx(c["total"] / c["backprop"])
    assert theory.cost_model(net, 2)["total"] < theory.cost_model(net, 2)["upper_bound"]  # C(h-bp) < C(bp)


def test_cost_model_counts_the_output_layer_and_cnns():
    net = nets.mlp([64, 32, 16, 10], blocks=2, output_layer=True)
    c = theory.cost_model(net, 1)
    assert c["block_forward"] == [2 * 64 * 32, 2 * 32 * 16 + 2 * 16 * 10]
    cnn = nets.vgg(2, width=4, layers=2, input_shape=(1, 8, 8))
    cc = theory.cost_model(cnn, 3)
    assert cc["block_forward"] == cnn.block_flops() and cc["total"] > cc["lower_bound"]
    with pytest.raises(ValueError, match="n_h"):
        theory.cost_model(net, -1)


def test_theory_on_a_cnn_leaves_batchnorm_statistics_alone():
    cnn = nets.vgg(2, width=2, layers=2, input_shape=(1, 8, 8), seed=0).double()
    bn = [m for m in cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    g = theory.reduced_gradient(cnn, x, y, 1.0)
    assert torch.isfinite(g).all() and g.numel() == sum(p.numel() for p in theory.flat_params(cnn))
    assert all(int(m.num_batches_tracked) == 0 and torch.all(m.running_mean == 0) for m in bn)
