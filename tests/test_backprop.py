"""The Trainer protocol through the backprop baseline: learning, seeding, resume, errors."""

import pytest
import torch

from bpsim import data, nets
from bpsim.algorithms import get_trainer
from bpsim.algorithms.backprop import BackpropTrainer
from bpsim.algorithms.base import DivergenceError, History


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _net(seed=0):
    return nets.mlp([64, 128, 128, 10], blocks=2, seed=seed)


def test_backprop_learns_digits(digits):
    train, test = digits
    hist = BackpropTrainer(_net(), lr=0.05, seed=0, milestones=[10]).fit(train, 15, test=test)
    assert hist.final_accuracy >= 0.95
    assert hist.train_loss[-1] < hist.train_loss[0]
    assert len(hist) == 15 and all(t > 0 for t in hist.wall_time)


def test_same_seed_same_history(digits):
    train, test = digits
    small = torch.utils.data.TensorDataset(*(t[:300] for t in train.tensors))
    a = BackpropTrainer(_net(), seed=1).fit(small, 2, test=test)
    b = BackpropTrainer(_net(), seed=1).fit(small, 2, test=test)
    c = BackpropTrainer(_net(), seed=2).fit(small, 2, test=test)
    assert a.same_as(b)
    assert not a.same_as(c)


def test_resume_equals_uninterrupted(digits, tmp_path):
    train, test = digits
    small = torch.utils.data.TensorDataset(*(t[:400] for t in train.tensors))
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, milestones=[2], gamma=0.5, seed=3)
    full = BackpropTrainer(_net(), **kw)
    h_full = full.fit(small, 4, test=test)

    first = BackpropTrainer(_net(), checkpoint_dir=tmp_path, **kw)
    first.fit(small, 2, test=test)  # "interrupted" after epoch 2
    assert (tmp_path / "last.pt").exists()
    resumed = BackpropTrainer(_net(), checkpoint_dir=tmp_path, **kw)
    h_res = resumed.fit(small, 4, test=test, resume=True)
    assert len(h_res) == 4
    assert h_res.same_as(h_full)
    for p, q in zip(full.net.parameters(), resumed.net.parameters()):
        assert torch.equal(p, q)
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, digits):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    t = BackpropTrainer(_net(), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        t.fit(digits[0], 1, resume=True)


def test_history_round_trip():
    h = BackpropTrainer(_net()).fit(torch.utils.data.TensorDataset(torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))), 1)
    assert History.from_dict(h.to_dict()).same_as(h)


@pytest.mark.parametrize("kw, match", [
    (dict(lr=0.0), "learning rates"), (dict(lr=[0.1]), "one per block"), (dict(momentum=1.0), "momentum"),
    (dict(batch_size=0), "batch_size"), (dict(weight_decay=-1), "weight_decay"), (dict(task="ranking"), "task"),
])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        BackpropTrainer(_net(), **kw)


def test_bad_epochs(digits):
    with pytest.raises(ValueError, match="epochs"):
        BackpropTrainer(_net()).fit(digits[0], 0)


def test_divergence_stops_with_advice(digits):
    train, _ = digits
    t = BackpropTrainer(_net(), lr=1e6, momentum=0.0)
    with pytest.raises(DivergenceError, match="lower the learning rate"):
        t.fit(train, 3)


def test_regression_task_on_teacher():
    train, test = data.load("teacher", n_train=500, n_test=200)
    net = nets.mlp([20, 64, 1], blocks=2)
    hist = BackpropTrainer(net, lr=0.02, task="regression").fit(train, 5, test=test)
    assert hist.final_accuracy is None and hist.records[-1].test_loss < hist.records[0].test_loss


def test_registry():
    assert get_trainer("bp") is BackpropTrainer
    with pytest.raises(ValueError, match="choose one of"):
        get_trainer("adam")


def test_resume_refuses_other_settings_and_architectures(tmp_path, digits):
    train = torch.utils.data.TensorDataset(*(t[:128] for t in digits[0].tensors))
    BackpropTrainer(_net(), checkpoint_dir=tmp_path, seed=0, lr=0.05).fit(train, 2)
    for kw, epochs, words in ((dict(seed=1), 3, "--seed 0"), (dict(lr=0.1), 3, "--lr 0.05"),
                              ({}, 1, "done 2 epochs")):
        t = BackpropTrainer(_net(), checkpoint_dir=tmp_path, **kw)
        with pytest.raises(ValueError, match=words):
            t.fit(train, epochs, resume=True)
    other = nets.mlp([64, 32, 10], blocks=2, seed=0)
    with pytest.raises(ValueError, match="another architecture"):
        BackpropTrainer(other, checkpoint_dir=tmp_path).fit(train, 3, resume=True)


def test_empty_checkpoint_and_bad_checkpoint_dirs(tmp_path, digits):
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        BackpropTrainer(_net(), checkpoint_dir=tmp_path).fit(digits[0], 1, resume=True)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        BackpropTrainer(_net(), checkpoint_dir=f).fit(digits[0], 1)
    (tmp_path / "ck" / "last.pt").mkdir(parents=True)
    with pytest.raises(ValueError, match="is a folder"):
        BackpropTrainer(_net(), checkpoint_dir=tmp_path / "ck").fit(digits[0], 1)
