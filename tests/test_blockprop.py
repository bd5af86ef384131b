"""BlockProp (Alg. 1, Alg. 2): the h-step, the W-step, the trainers, resume, errors, CLI."""

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from bpsim import data, nets, objectives, theory
from bpsim.algorithms import get_trainer
from bpsim.algorithms.base import DivergenceError
from bpsim.algorithms.blockprop import (
    BlockPropTrainer, CachedBlockPropTrainer, curvature_step, fixed_lr_h, gradient_cosines, h_step, h_update,
    outer_curvature, w_grads, w_loss,
)
from bpsim.cli import main


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _toy(K=3, n=6, seed=0, output_layer=False):
    sizes = [6] + [8] * (K - 1) + ([5] if output_layer else []) + [3]
    net = nets.mlp(sizes, blocks=K, seed=seed, output_layer=output_layer).double()
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return net, x, y


# ------------------------------------------------------------------ h-step
def test_h_update_touches_no_parameter_or_grad():
    net, x, y = _toy(K=2)
    before = [p.detach().clone() for p in net.parameters()]
    a = net.blocks[0](x).detach()
    h = h_update(net.blocks[1], a, y, 1.0, None, n_h=5, lr_h=0.1)
    assert not h.requires_grad and h.shape == a.shape and not torch.equal(h, a)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert torch.equal(h_update(net.blocks[1], a, y, 1.0, None, n_h=0, lr_h=0.1), a)


def test_h_update_middle_block_is_gradient_descent_on_its_lagrangian():
    """One step by hand: h <- h - lr_h * B * grad(L_k) with L_k from eq. 5."""
    net, x, y = _toy(K=3)
    a = net.blocks[0](x).detach()
    target = torch.randn(6, 8, dtype=torch.float64)
    h = a.clone().requires_grad_(True)
    L = objectives.penalty(h, a, 0.5) + objectives.penalty(target, net.blocks[1](h), 2.0)
    expected = h - 0.05 * 6 * torch.autograd.grad(L, h)[0]
    got = h_update(net.blocks[1], a, target, 0.5, 2.0, n_h=1, lr_h=0.05)
    assert torch.allclose(got, expected.detach(), atol=1e-13)


def test_h_step_converges_to_the_inner_argmin():
    net, x, y = _toy(K=2)
    exact = theory.inner_solve(net, x, y, 1.0)
    hs = h_step(net, x, y, 1.0, n_h=400, lr_h=0.1)
    assert torch.allclose(hs[0], exact[0], atol=1e-9)
    few = h_step(net, x, y, 1.0, n_h=2, lr_h=0.1)
    assert (few[0] - exact[0]).abs().max() > 1e-3  # two steps are not there yet


@pytest.mark.parametrize("lr_h", [[0.2, 0.1], None])
def test_h_step_is_per_example(lr_h):
    """A mini-batch's h-step equals the h-steps of its examples run one at a time."""
    net, x, y = _toy(K=3, n=5)
    batch = h_step(net, x, y, [0.5, 2.0], n_h=3, lr_h=lr_h)
    for i in range(5):
        one = h_step(net, x[i : i + 1], y[i : i + 1], [0.5, 2.0], n_h=3, lr_h=lr_h)
        for hb, h1 in zip(batch, one):
            assert torch.allclose(hb[i : i + 1], h1, atol=1e-12)


def test_h_step_lowers_every_block_lagrangian():
    """Sweeping k = K..2, each h_k lowers L_k given h*_{k+1} above and the start below."""
    net, x, y = _toy(K=4)
    lams = [0.5, 1.0, 2.0]
    with torch.no_grad():
        init = net.activations(x)[:-1]
    hs = h_step(net, x, y, lams, n_h=4, lr_h=0.05)
    with torch.no_grad():
        for k in (4, 3, 2):
            before = init[: k - 1] + hs[k - 1 :]      # h_k not yet moved, h_{k+1..K} already final
            after = init[: k - 2] + hs[k - 2 :]
            assert objectives.block_lagrangian(net, k, x, y, after, lams) < \
                objectives.block_lagrangian(net, k, x, y, before, lams)
            assert not torch.equal(hs[k - 2], init[k - 2])


def test_fixed_lr_h_uses_the_largest_penalty_on_each_h():
    assert fixed_lr_h([1.0, 4.0, 0.5], 4) == [1 / 16, 1 / 16, 1 / 2]
    assert fixed_lr_h(2.0, 2) == [1 / 8]


# ------------------------------------------- the default step: curvature
def _sharp(K, seed=0, scale=3.0):
    """A toy net whose middle blocks have large Jacobians (sigma^2 >> 1), as trained ones do."""
    net, x, y = _toy(K=K, n=6, seed=seed)
    with torch.no_grad():
        for b in list(net.blocks)[1:-1]:
            for p in b.parameters():
                p.mul_(scale)
    return net, x, y


def _gauss_newton_top(block, h, lam_out, y=None):
    """Exact per-example top eigenvalue of J^T H J from the full Jacobian (one example at a time)."""
    out = []
    for i in range(len(h)):
        J = torch.autograd.functional.jacobian(block, h[i : i + 1]).reshape(-1, h.shape[1])
        if lam_out is not None:
            H = 2 * lam_out * torch.eye(J.shape[0], dtype=J.dtype)
        else:                                     # cross-entropy: softmax Hessian diag(p) - p p^T
            p = torch.softmax(block(h[i : i + 1]), -1)[0]
            H = torch.diag(p) - torch.outer(p, p)
        out.append(float(torch.linalg.eigvalsh(J.T @ H.detach() @ J).max()))
    return torch.tensor(out, dtype=h.dtype)


@pytest.mark.parametrize("last", [False, True])
def test_outer_curvature_is_the_top_gauss_newton_eigenvalue(last):
    """Power iteration reaches the exact top eigenvalue of J^T H J per example, from below."""
    net, x, y = _sharp(K=3)
    h = net.blocks[0](x).detach()
    block, lam_out, target = net.blocks[1], 2.0, torch.randn(6, 8, dtype=torch.float64)
    if last:
        h = net.blocks[1](h).detach()
        block, lam_out, target = net.blocks[2], None, y
    exact = _gauss_newton_top(block, h, lam_out)
    assert torch.allclose(outer_curvature(block, h, target, lam_out, iters=200), exact, rtol=1e-6)
    # a few steps (the default): Rayleigh quotients of a PSD matrix, rising towards the top
    est = [outer_curvature(block, h, target, lam_out, iters=n) for n in (1, 2, 3)]
    for lo, hi in zip(est, est[1:] + [exact]):
        assert (lo <= hi * (1 + 1e-9)).all()
    if not last:                                                 # spring: 2 lam sigma_max(J)^2
        sig = [torch.linalg.matrix_norm(torch.autograd.functional.jacobian(block, h[i : i + 1])
                                        .reshape(8, 8), ord=2) for i in range(6)]
        assert torch.allclose(exact, 2 * lam_out * torch.stack(sig) ** 2)


def test_curvature_step_is_inside_the_stability_limit_by_construction():
    """step * (2 lam_in + mu) = 1 < 2: stable for any mu >= 0, even when mu is off by up to 2x."""
    mu = torch.tensor([0.0, 0.5, 3.0, 1e4], dtype=torch.float64)
    for lam_in in (0.01, 1.0, 100.0):
        step = curvature_step(lam_in, mu)
        assert torch.allclose(step * (2 * lam_in + mu), torch.ones_like(mu))
        assert (step * (2 * lam_in + 2 * mu) < 2).all()
    assert float(curvature_step(1.0, torch.tensor(0.0))) == 0.5     # penalty alone: one step to its minimum


def _per_example_L(block, h, a, target, lam_in, lam_out):
    out = block(h)
    outer = (lam_out * ((target - out) ** 2).sum(1) if lam_out is not None
             else torch.nn.functional.cross_entropy(out, target, reduction="none"))
    return lam_in * ((h - a) ** 2).sum(1) + outer


def _rises(block, a, target, lam_in, lam_out, lr_h, steps):
    """How many (example, step) pairs raise the example's L_k, over ``steps`` single h-steps."""
    prev, h, n = _per_example_L(block, a, a, target, lam_in, lam_out), a, 0
    for _ in range(steps):
        h = h_update(block, a, target, lam_in, lam_out, 1, lr_h, h0=h)
        now = _per_example_L(block, h, a, target, lam_in, lam_out)
        n += int((now > prev + 1e-12).sum())
        prev = now
    return n


@pytest.mark.parametrize("lam_out", [1.0, 10.0])
def test_default_step_lowers_every_examples_lagrangian_on_a_linear_block(lam_out):
    """A linear block makes L_k quadratic with curvature 2 lam_in + 2 lam_out sigma^2 (sigma^2 >> 1
    here): the fixed step overshoots and raises L_k; the curvature step lowers it for every
    example at every step. The first step provably: power iteration starts at the gradient, so
    mu bounds the curvature along it."""
    g = torch.Generator().manual_seed(3)
    block = torch.nn.Linear(8, 8).double()
    with torch.no_grad():
        block.weight.copy_(3 * torch.randn(8, 8, generator=g, dtype=torch.float64) / 8 ** 0.5)
    a = torch.randn(6, 8, generator=g, dtype=torch.float64)
    target = block(a).detach() + 0.3 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    sig2 = float(torch.linalg.matrix_norm(block.weight.detach(), ord=2)) ** 2
    fixed = fixed_lr_h([1.0, lam_out], 3)[0]
    assert fixed * (2 + 2 * lam_out * sig2) > 2                  # past the stable limit
    assert _rises(block, a, target, 1.0, lam_out, fixed, 8) > 0
    assert _rises(block, a, target, 1.0, lam_out, None, 8) == 0


@pytest.mark.parametrize("K", [3, 4])
def test_default_h_step_rarely_raises_an_examples_lagrangian_in_a_relu_net(K):
    """Through ReLU blocks L_k is only piecewise quadratic (a step that crosses a kink may rise a
    little), yet the curvature step lowers most examples's L_k at every step of every
    middle h_k, where the fixed step raises most of them once the Jacobians are large."""
    net, x, y = _sharp(K)
    lams = [1.0] * (K - 1)
    with torch.no_grad():
        a = net.activations(x)[:-1]
    rise = {"default": 0, "fixed": 0}
    total = 0
    for k in range(2, K):                               # the middle gluing variables
        # the target: where the h-step above moved h_{k+1}, near the forward activation
        block, target = net.blocks[k - 1], a[k - 1] + 0.3 * torch.randn_like(a[k - 1])
        mu = outer_curvature(block, a[k - 2], target, lams[k - 1], iters=200)
        assert (mu > 6 * lams[k - 2]).all()            # beyond what the fixed step allows
        rise["default"] += _rises(block, a[k - 2], target, lams[k - 2], lams[k - 1], None, 6)
        rise["fixed"] += _rises(block, a[k - 2], target, lams[k - 2], lams[k - 1], fixed_lr_h(lams, K)[k - 2], 6)
        total += 6 * len(x)
    assert rise["default"] <= 0.2 * total and rise["fixed"] >= 0.5 * total, (rise, total)


def test_default_step_on_the_last_block_lowers_the_loss_term_too():
    net, x, y = _sharp(K=2, scale=1.0)
    a = net.blocks[0](x).detach()
    prev, h = _per_example_L(net.blocks[1], a, a, y, 1.0, None), a
    for _ in range(5):
        h = h_update(net.blocks[1], a, y, 1.0, None, 1, None, h0=h)
        now = _per_example_L(net.blocks[1], h, a, y, 1.0, None)
        assert (now <= prev + 1e-12).all()
        prev = now


# ---------------------------------------------- gradient cosine statistic
def test_gradient_cosines_at_the_forward_pass_and_at_the_exact_h_star():
    """At h = the forward pass only the last block has a W-step gradient, and it is backprop's
    (cosine 1; the others are 0 by convention). At the exact joint h* with a large lam the
    W-step is grad J (Lemma B.1), which tends to backprop's gradient: cosines near 1."""
    net, x, y = _toy(K=4)
    with torch.no_grad():
        fwd = net.activations(x)[:-1]
    cos = gradient_cosines(net, x, y, fwd, 1.0)
    assert cos[:-1] == [0.0, 0.0, 0.0] and cos[-1] == pytest.approx(1.0, abs=1e-12)
    lam = 1e3
    exact = theory.inner_solve(net, x, y, lam)
    assert min(gradient_cosines(net, x, y, exact, lam)) > 0.999
    before = [p.detach().clone() for p in net.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert all(p.grad is None for p in net.parameters())


def test_trainer_records_cosines_and_curvature_without_changing_training(digits):
    train, test = digits
    small = TensorDataset(*(t[:256] for t in train.tensors))
    runs = []
    for probe in (64, 0):
        t = BlockPropTrainer(nets.mlp([64, 32, 32, 10], blocks=3, seed=0), seed=0)
        t.probe_size = probe
        runs.append((t, t.fit(small, 2)))
    (t1, h1), (t0, h0) = runs
    ex = h1.records[-1].extra
    assert len(ex["grad_cosine"]) == 3 and len(ex["outer_curvature"]) == 2
    assert all(-1 <= c <= 1 for c in ex["grad_cosine"]) and all(m >= 0 for m in ex["outer_curvature"])
    assert h0.records[-1].extra == {} and h0.train_loss == h1.train_loss
    assert all(torch.equal(p, q) for p, q in zip(t1.net.parameters(), t0.net.parameters()))


# ------------------------------------------------------------------ W-step
@pytest.mark.parametrize("output_layer", [False, True])
def test_w_grads_are_the_block_objective_gradients(output_layer):
    net, x, y = _toy(K=3, output_layer=output_layer)
    hs = h_step(net, x, y, [0.5, 2.0], n_h=2, lr_h=0.1)
    grads = w_grads(net, x, y, hs, [0.5, 2.0])
    assert len(grads) == 3
    for k in range(1, 4):
        params = list(net.blocks[k - 1].parameters())
        if k == 3 and output_layer:
            params += list(net.output.parameters())
        ref = torch.autograd.grad(objectives.block_objective(net, k, x, y, hs, [0.5, 2.0]), params)
        assert len(grads[k - 1]) == len(params)
        for g, r, p in zip(grads[k - 1], ref, params):
            assert g.shape == p.shape and torch.allclose(g, r, atol=1e-12)
    assert all(p.grad is None for p in net.parameters())
    # w_loss is the same J_k
    J2 = w_loss(net.blocks[1], hs[0], hs[1], 2.0)
    assert torch.allclose(J2, objectives.block_objective(net, 2, x, y, hs, [0.5, 2.0]))


def test_cnn_h_step_keeps_batchnorm_statistics():
    net = nets.vgg(2, width=4, layers=2, input_shape=(1, 8, 8), seed=0)
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    before = [(m.running_mean.clone(), int(m.num_batches_tracked)) for m in bn]
    hs = h_step(net, x, y, 1.0, n_h=3, lr_h=0.1)
    assert hs[0].shape == (8, *net.shapes()[0]) and torch.isfinite(hs[0]).all()
    assert all(torch.equal(m.running_mean, mu) and int(m.num_batches_tracked) == n for m, (mu, n) in zip(bn, before))
    t = BlockPropTrainer(net, lam=1.0, nh=2)
    r = t.train_step(x, y, torch.arange(8))
    assert len(r.local_losses) == 2 and all(v == v for v in r.local_losses)
    assert all(int(m.num_batches_tracked) == n + 1 for m, (_, n) in zip(bn, before))  # once, in the W-step


# ---------------------------------------------------------------- trainers
def _mlp():
    return nets.mlp([64, 128, 128, 10], blocks=2, seed=0)


def test_blockprop_learns_digits(digits):
    train, test = digits
    hist = BlockPropTrainer(_mlp(), lam=1.0, nh=4, seed=0).fit(train, 15, test=test)
    assert hist.final_accuracy >= 0.93
    assert len(hist.local_losses[-1]) == 2
    assert hist.train_loss[-1] == pytest.approx(sum(hist.local_losses[-1]))
    assert hist.train_loss[-1] < hist.train_loss[0]


def test_cached_blockprop_learns_digits_and_reports_staleness(digits):
    train, test = digits
    hist = CachedBlockPropTrainer(_mlp(), lam=1.0, nh=4, cache_every=2, seed=0).fit(train, 15, test=test)
    assert hist.final_accuracy >= 0.90
    extras = [r.extra for r in hist.records]
    assert extras[0]["cache_size"] == len(train)
    assert [e["staleness_max"] for e in extras[:4]] == [0, 1, 0, 1]
    assert [e["hstep_epoch"] for e in extras[:4]] == [True, False, True, False]


def test_cache_starts_from_cached_h_and_falls_back_to_the_forward_pass():
    net = nets.mlp([64, 32, 10], blocks=2, seed=0)
    t = CachedBlockPropTrainer(net, lam=1.0, nh=2, cache_every=2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 1, 8, 8, generator=g), torch.randint(0, 10, (12,), generator=g)
    t.train_step(x[:8], y[:8], torch.arange(8))                       # epoch 0: h-step, fills 0..7
    assert t.refreshed[:8].tolist() == [0] * 8
    t.epoch = 1                                                       # an epoch without h-step ...
    cached = t.cache[0][:8].clone()
    t.train_step(x[:8], y[:8], torch.arange(8))
    assert torch.equal(t.cache[0][:8], cached)                        # ... uses the cache as it is
    # rows 8..11 have no cache: the batch gets an h-step, from the cache for 4..7, forward for 8..11
    with torch.no_grad():
        start = torch.cat([cached[4:], net.blocks[0](x[8:])])
    expected = h_step(net, x[4:], y[4:], 1.0, 2, None, h0=[start])[0]
    t.train_step(x[4:], y[4:], torch.arange(4, 12))
    assert t.refreshed[:12].tolist() == [0] * 4 + [1] * 8
    assert torch.allclose(t.cache[0][4:12], expected, atol=1e-6)


def test_cached_resume_equals_uninterrupted(digits, tmp_path):
    train, test = digits
    small = TensorDataset(*(t[:256] for t in train.tensors))
    kw = dict(lam=1.0, nh=2, cache_every=2, seed=3, lr=[0.05, 0.02], batch_size=32)
    full = CachedBlockPropTrainer(_mlp(), **kw)
    h_full = full.fit(small, 5, test=test)
    CachedBlockPropTrainer(_mlp(), checkpoint_dir=tmp_path, **kw).fit(small, 3, test=test)  # "interrupted"
    resumed = CachedBlockPropTrainer(_mlp(), checkpoint_dir=tmp_path, **kw)
    h_res = resumed.fit(small, 5, test=test, resume=True)
    assert h_res.same_as(h_full)
    assert torch.equal(resumed.refreshed, full.refreshed)
    assert all(torch.equal(a, b) for a, b in zip(resumed.cache, full.cache))
    assert all(torch.equal(p, q) for p, q in zip(full.net.parameters(), resumed.net.parameters()))


def test_huge_lr_h_raises_divergence_error_naming_the_block(digits):
    train, _ = digits
    t = BlockPropTrainer(_mlp(), lam=1.0, nh=4, lr_h=1e6)
    with pytest.raises(DivergenceError, match=r"block \d.*smaller lr_h"):
        t.fit(train, 1)


def test_h_step_divergence_names_the_gluing_variable_and_block():
    net, x, y = _toy(K=3)
    with pytest.raises(DivergenceError, match=r"h_3 \(the input of block 3\).*smaller lr_h"):
        h_step(net, x, y, 1.0, n_h=200, lr_h=[0.1, 50.0])


@pytest.mark.parametrize("kw, match", [
    (dict(lam=-1.0), "must be > 0"), (dict(lam=[1.0, 2.0]), "K-1 = 1"), (dict(nh=-1), "n_h"),
    (dict(lr_h=-0.1), "lr_h must be >= 0"), (dict(lr_h=[0.1, 0.1]), "lr_h needs"),
])
def test_bad_options_are_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        BlockPropTrainer(_mlp(), **kw)


def test_one_block_and_bad_cache_every_are_refused():
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockPropTrainer(nets.mlp([64, 10], blocks=1))
    with pytest.raises(ValueError, match="cache_every"):
        CachedBlockPropTrainer(_mlp(), cache_every=0)


def test_registry_and_options():
    assert get_trainer("blockprop") is BlockPropTrainer
    assert get_trainer("blockprop-cached") is CachedBlockPropTrainer
    assert BlockPropTrainer.options == ("lam", "nh", "lr_h")
    assert "cache_every" in CachedBlockPropTrainer.options


# --------------------------------------------------------------------- CLI
def test_cli_train_blockprop_json(capsys):
    assert main(["train", "blockprop", "--lam", "1", "--nh", "4", "--epochs", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["algorithm"] == "blockprop" and out["epochs"] == 2 and out["test_accuracy"] > 0.5
    assert len(out["history"]["local_losses"][-1]) == 2


def test_cli_cached_takes_cache_every(capsys):
    assert main(["train", "blockprop-cached", "--cache-every", "2", "--epochs", "2", "--n-train", "300",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["history"]["extra"][1]["staleness_max"] == 1


@pytest.mark.parametrize("args", [["--lam", "-1"], ["--nh", "-2"], ["--lam", "1,2"], ["--lr-h", "-0.5"]])
def test_cli_bad_blockprop_options_exit_2_with_one_line(args, capsys):
    assert main(["train", "blockprop", "--epochs", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


# ------------------------------------------------- lesson 03's exercise check
def test_h_step_limit_check_correct_and_hints():
    from bpsim.course import checks
    lam_in, lam_out, s2 = 1.0, 2.0, 3.0
    limit = 2 / (2 * lam_in + 2 * lam_out * s2)
    assert checks.h_step_limit(lam_in, lam_out, s2, limit).status == "correct"
    assert checks.h_step_limit(lam_in, lam_out, s2, None).status == "not attempted"
    for wrong, words in [(1 / (2 * lam_in + 2 * lam_out * s2), "twice"), (2 / (2 * lam_in), "outgoing"),
                         (2 / (2 * lam_out * s2), "incoming"), (2 / (lam_in + lam_out * s2), "2 lam"),
                         (1 / (4 * lam_out), "fixed step")]:
        fb = checks.h_step_limit(lam_in, lam_out, s2, wrong)
        assert fb.status != "correct" and words in fb.message, (wrong, fb)
    # the limit is where the fixed-step iteration on a linear block stops lowering L_k
    block = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        block.weight.copy_(torch.diag(torch.tensor([s2 ** 0.5, 1.0, 0.5, 0.1], dtype=torch.float64)))
    a = torch.zeros(1, 4, dtype=torch.float64)
    target = block(a).detach() + 1.0
    for factor, rises in ((0.98, False), (1.02, True)):
        assert (_rises(block, a, target, lam_in, lam_out, factor * limit, 200) > 0) == rises
