"""Asynchronous DGL with replay (DGL Alg. 2): the pmf, fairness, learning, resume, CLI."""

import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from bpsim import data, nets
from bpsim.algorithms import get_trainer
from bpsim.algorithms.async_dgl import AsyncDGLTrainer, check_pmf, slowdown_pmf
from bpsim.cli import main


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _net(blocks=2, seed=0):
    return nets.build("mlp", (1, 8, 8), 10, blocks, width=64 if blocks > 2 else None,
                      aux="mlp", seed=seed)


def _small(train, n=320):
    return TensorDataset(*(t[:n] for t in train.tensors))


# ------------------------------------------------------------------ the pmf
def test_slowdown_pmf():
    assert slowdown_pmf(3, 2, 2.0) == pytest.approx([0.4, 0.2, 0.4])
    assert slowdown_pmf(4, 1, 1.0) == pytest.approx([0.25] * 4)
    p = slowdown_pmf(5, 3, 1.2)
    assert sum(p) == pytest.approx(1) and p[0] / p[2] == pytest.approx(1.2)
    for args, match in [((3, 0, 2.0), "between 1 and 3"), ((3, 4, 2.0), "between 1 and 3"),
                        ((3, 1, 0.0), "> 0"), ((3, 1, math.inf), "finite")]:
        with pytest.raises(ValueError, match=match):
            slowdown_pmf(*args)


@pytest.mark.parametrize("pmf, match", [
    ([0.5, 0.6], "sum to 1"),
    ([0.2, 0.3, 0.5], "one probability per block"),
    ([1.2, -0.2], "> 0"),
    ([1.0, 0.0], "> 0"),
    ([math.nan, 1.0], "finite"),
    (["a", "b"], "numbers"),
])
def test_bad_pmf_is_a_clear_error(pmf, match):
    with pytest.raises(ValueError, match=match):
        check_pmf(pmf, 2)
    with pytest.raises(ValueError, match=match):
        AsyncDGLTrainer(_net(), pmf=pmf)


def test_pmf_options():
    assert check_pmf([0.25, 0.75 + 5e-7], 2) == pytest.approx([0.25, 0.75])
    assert AsyncDGLTrainer(_net()).pmf == [0.5, 0.5]
    assert AsyncDGLTrainer(_net(), slowdown=(2, 2.0)).pmf == pytest.approx([2 / 3, 1 / 3])
    assert AsyncDGLTrainer(_net(), pmf=[0.3, 0.7]).pmf == pytest.approx([0.3, 0.7])
    with pytest.raises(ValueError, match="not both"):
        AsyncDGLTrainer(_net(), pmf=[0.3, 0.7], slowdown=(1, 2.0))
    with pytest.raises(ValueError, match="buffer"):
        AsyncDGLTrainer(_net(), buffer=0)
    with pytest.raises(ValueError, match="max_reuse"):
        AsyncDGLTrainer(_net(), max_reuse=0)
    assert get_trainer("dgl-async") is AsyncDGLTrainer
    assert set(AsyncDGLTrainer.options) == {"buffer", "max_reuse", "slowdown", "pmf"}


def test_slowdown_draws_the_slow_block_less(digits):
    t = AsyncDGLTrainer(_net(3), slowdown=(2, 2.0), seed=0)
    draws = [t._draw([0, 1, 2]) for _ in range(4000)]
    freq = [draws.count(k) / len(draws) for k in range(3)]
    assert freq == pytest.approx([0.4, 0.2, 0.4], abs=0.03)


# ------------------------------------------------------------ the emulation
def test_async_dgl_learns_digits(digits):
    train, test = digits
    hist = AsyncDGLTrainer(_net(), lr=0.05, buffer=50, seed=0).fit(train, 15, test=test)
    assert hist.final_accuracy >= 0.92
    rec = hist.records[-1]
    assert rec.extra["updates"] == [22, 22]  # ceil(1347 / 64) mini-batches, every block
    assert len(rec.local_losses) == 2 and rec.train_loss == rec.local_losses[-1]


@pytest.mark.parametrize("kw", [dict(slowdown=(2, 2.0)), dict(slowdown=(1, 3.0)), dict(pmf=[0.6, 0.3, 0.1])])
def test_every_block_makes_the_same_number_of_updates(digits, kw):
    t = AsyncDGLTrainer(_net(3), lr=0.05, buffer=5, seed=0, **kw)
    hist = t.fit(_small(digits[0]), 2)
    for rec in hist.records:
        assert rec.extra["updates"] == [5, 5, 5]
        assert len(rec.extra["reuse_mean"]) == len(rec.extra["staleness_mean"]) == 2
        assert all(r >= 1 for r in rec.extra["reuse_mean"])
        assert all(s >= 0 for s in rec.extra["staleness_mean"])
    assert t.updates == [10, 10, 10]


def test_a_slow_producer_means_reuse(digits):
    """Block 1 drawn 4x less: block 2 must read entries more than once (Sec. 2.3)."""
    fast = AsyncDGLTrainer(_net(), lr=0.05, buffer=2, seed=0).fit(_small(digits[0], 640), 1)
    slow = AsyncDGLTrainer(_net(), lr=0.05, buffer=2, seed=0, slowdown=(1, 4.0)).fit(_small(digits[0], 640), 1)
    assert slow.records[0].extra["reuse_mean"][0] > fast.records[0].extra["reuse_mean"][0]
    assert slow.records[0].extra["reuse_mean"][0] > 1.5


def test_max_reuse_cap_never_hangs(digits):
    t = AsyncDGLTrainer(_net(), lr=0.05, buffer=2, max_reuse=1, slowdown=(1, 4.0), seed=0)
    rec = t.fit(_small(digits[0]), 1).records[0]
    assert rec.extra["updates"][0] == 5 and 1 <= rec.extra["updates"][1] <= 5
    assert rec.extra["reuse_mean"] == [1.0]


def test_resume_is_exact(digits, tmp_path):
    train = _small(digits[0])
    kw = dict(lr=0.05, buffer=3, slowdown=(2, 1.5), seed=4, milestones=[2], gamma=0.5)
    full = AsyncDGLTrainer(_net(3), **kw)
    h_full = full.fit(train, 4)

    class Stop(Exception):
        pass

    def interrupt(tr, rec):
        if rec.epoch == 3:
            raise Stop  # epoch 3's checkpoint is never written: resume from epoch 2

    with pytest.raises(Stop):
        AsyncDGLTrainer(_net(3), checkpoint_dir=tmp_path, **kw).fit(train, 4, callbacks=[interrupt])
    resumed = AsyncDGLTrainer(_net(3), checkpoint_dir=tmp_path, **kw)
    h_res = resumed.fit(train, 4, resume=True)
    assert len(h_res) == 4 and h_res.same_as(h_full)
    for p, q in zip(full.net.parameters(), resumed.net.parameters()):
        assert torch.equal(p, q)
    assert resumed.updates == full.updates
    for a, b in zip(full.buffers, resumed.buffers):
        assert a.stats() == b.stats() and a.reads() == b.reads()


def test_resume_refuses_another_pmf(digits, tmp_path):
    AsyncDGLTrainer(_net(), checkpoint_dir=tmp_path, seed=0).fit(_small(digits[0], 128), 1)
    with pytest.raises(ValueError, match="same --slowdown"):
        AsyncDGLTrainer(_net(), checkpoint_dir=tmp_path, slowdown=(2, 2.0)).fit(_small(digits[0], 128), 2,
                                                                                  resume=True)


# -------------------------------------------------------------------- CLI
def test_cli_slowdown_json(capsys):
    assert main(["train", "dgl-async", "--slowdown", "2:2", "--epochs", "1", "--n-train", "300", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["algorithm"] == "dgl-async" and out["epochs"] == 1
    extra = out["history"]["extra"][0]
    assert extra["pmf"] == pytest.approx([2 / 3, 1 / 3]) and extra["updates"] == [5, 5]


@pytest.mark.parametrize("flags", [["--pmf", "0.5,0.6"], ["--pmf", "1"], ["--slowdown", "3:2"],
                                   ["--slowdown", "2:0"]])
def test_cli_bad_pmf_exits_2_with_one_line(capsys, flags):
    assert main(["train", "dgl-async", "--epochs", "1", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
