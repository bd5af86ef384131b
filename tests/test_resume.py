"""A checkpoint records every option that shapes the run and is checked as a whole.

``bpsim train --resume`` with any run-shaping option other than the one the
checkpoint recorded is refused with one line naming the option and both
values; a damaged checkpoint (no optimizers, a negative epoch, a history
that is not its epochs) and a ``last.pt`` that is a symbolic link to
nowhere are refused; one run at a time writes a checkpoint folder (a lock
file holding its pid; a lock left by a dead process is taken over); and a
last step that spoils the weights stops training even when its loss was
finite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bpsim import nets
from bpsim.algorithms.backprop import BackpropTrainer
from bpsim.algorithms.base import DivergenceError, _CheckpointLock
from bpsim.cli import main

BASE = ["--epochs", "1", "--n-train", "64", "--batch-size", "32"]


def _train(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["train", *argv])
    err = capsys.readouterr().err
    return rc, err


# (method, flags of the first run, flags of the resumed run, the option, its two values)
CHANGED = [
    ("bp", [], ["--momentum", "0.5"], "--momentum", "0.9", "0.5"),
    ("bp", [], ["--weight-decay", "0.001"], "--weight-decay", "0", "0.001"),
    ("bp", [], ["--n-train", "96"], "--n-train", "64", "96"),
    ("bp", ["--milestones", "3"], ["--milestones", "4"], "--milestones", "3", "4"),
    ("bp", [], ["--gamma", "0.5"], "--gamma", "0.1", "0.5"),
    ("blockprop", [], ["--lam", "2"], "--lam", "1", "2"),
    ("blockprop", [], ["--nh", "2"], "--nh", "4", "2"),
]


@pytest.mark.parametrize("algo,first,then,flag,held,asked", CHANGED,
                         ids=[f"{c[0]}{c[3]}" for c in CHANGED])
def test_resume_with_another_option_is_one_line(algo, first, then, flag, held, asked,
                                                tmp_path, capsys):
    ck = str(tmp_path / "ck")
    rc, err = _train(capsys, algo, *BASE, "--checkpoint-dir", ck, *first)
    assert rc == 0, err
    argv = [algo, *BASE, "--checkpoint-dir", ck, "--resume", "--epochs", "2", *first, *then]
    rc, err = _train(capsys, *argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{flag} {held}" in err and f"{flag} {asked}" in err, err


def test_resume_with_the_same_options_goes_on(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    assert _train(capsys, "blockprop", *BASE, "--checkpoint-dir", ck, "--nh", "2")[0] == 0
    rc, err = _train(capsys, "blockprop", *BASE, "--checkpoint-dir", ck, "--nh", "2",
                     "--resume", "--epochs", "2")
    assert rc == 0, err
    assert not (tmp_path / "ck" / _CheckpointLock.NAME).exists()


# ------------------------------------------------------------ damaged checkpoints
def _small() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.rand(64, 1, 8, 8, generator=g),
                                          torch.randint(0, 10, (64,), generator=g))


def _trainer(ck: Path, **kw) -> BackpropTrainer:
    return BackpropTrainer(nets.mlp([64, 16, 10], blocks=2, seed=0), checkpoint_dir=ck, **kw)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    _trainer(tmp_path).fit(_small(), 2)
    return tmp_path


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.update(optimizers=[]), "0 optimizers"),
    (lambda s: s.update(schedulers=[]), "0 schedulers"),
    (lambda s: s.update(epoch=-5), "epoch is -5"),
    (lambda s: s.update(epoch="2"), "epoch is '2'"),
    (lambda s: s.update(history={"epoch": [7]}), "history"),
    (lambda s: s["history"].update(epoch=[1, 5]), "history"),
    (lambda s: s.pop("settings"), "no run settings"),
    (lambda s: s["settings"].pop("momentum"), "does not record --momentum"),
], ids=["no-optimizers", "no-schedulers", "epoch-negative", "epoch-str", "history-short",
        "history-epochs", "no-settings", "setting-missing"])
def test_damaged_checkpoint_is_refused(checkpoint, edit, match):
    path = checkpoint / "last.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    with pytest.raises(ValueError, match=match) as e:
        _trainer(checkpoint).fit(_small(), 4, resume=True)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")
def test_symlink_loop_is_refused_and_kept(tmp_path):
    link = tmp_path / "last.pt"
    os.symlink(link, link)
    with pytest.raises(ValueError, match="symbolic link"):
        _trainer(tmp_path).fit(_small(), 1, resume=True)
    assert link.is_symlink()


# ------------------------------------------------------------------ the lock
def test_a_live_run_holds_the_folder(tmp_path, capsys):
    (tmp_path / _CheckpointLock.NAME).write_text(f"{os.getppid()}\n")
    with pytest.raises(ValueError, match=f"pid {os.getppid()}"):
        _trainer(tmp_path).fit(_small(), 1)
    assert not (tmp_path / "last.pt").exists()
    rc, err = _train(capsys, "bp", *BASE, "--checkpoint-dir", str(tmp_path))
    assert rc == 2 and "another run" in err and len(err.strip().splitlines()) == 1


def test_a_dead_runs_lock_is_taken_over(tmp_path):
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                       capture_output=True, text=True, check=True)
    lock = tmp_path / _CheckpointLock.NAME
    lock.write_text(p.stdout)
    _trainer(tmp_path).fit(_small(), 1)
    assert (tmp_path / "last.pt").exists() and not lock.exists()


def test_the_lock_is_released_after_an_error(tmp_path):
    with pytest.raises(DivergenceError):
        _trainer(tmp_path, lr=1e30, momentum=0.0).fit(_small(), 1)
    assert not (tmp_path / _CheckpointLock.NAME).exists()


# ------------------------------------------------------- the last step's state
def test_a_last_step_that_spoils_the_weights_is_divergence():
    t = BackpropTrainer(nets.mlp([64, 16, 10], blocks=2, seed=0), lr=1e30, batch_size=64)
    with pytest.raises(DivergenceError, match="after the update"):
        t.fit(_small(), 1)      # one step: its loss is finite, its update is not


def test_cli_last_step_divergence_is_one_line(capsys):
    rc, err = _train(capsys, "bp", "--lr", "1e30", "--epochs", "1", "--n-train", "64")
    assert rc == 2 and "diverged" in err and len(err.strip().splitlines()) == 1


def test_resume_on_other_data_of_the_same_shape_is_refused(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    assert _train(capsys, "bp", *BASE, "--checkpoint-dir", ck, "--seed", "0")[0] == 0
    t = BackpropTrainer(nets.mlp([64, 256, 256, 10], blocks=2, seed=0), checkpoint_dir=ck,
                        batch_size=32)
    with pytest.raises(ValueError, match="--data"):
        t.fit(_small(), 2, resume=True)


def test_resume_with_another_trainer_keyword_is_refused(tmp_path):
    from bpsim.algorithms.dgl import GreedyTrainer

    def greedy(**kw):
        net = nets.mlp([64, 16, 16, 10], blocks=2, seed=0, aux="linear")
        return GreedyTrainer(net, checkpoint_dir=tmp_path, **kw)

    greedy(epochs_per_block=[1, 2]).fit(_small(), 3)
    with pytest.raises(ValueError, match="--epochs-per-block 1,2, not --epochs-per-block 2,1"):
        greedy(epochs_per_block=[2, 1]).fit(_small(), 3, resume=True)


def test_the_runtime_checks_the_gathered_weights_after_its_last_step():
    from bpsim.runtime.launch import RunConfig, RunResult, _check_final_state

    cfg = RunConfig(algo="bp", steps=1, batch_size=16)
    t = BackpropTrainer(nets.mlp([64, 16, 10], blocks=2, seed=0))
    done = RunResult(summary={}, state_dict=t.net.state_dict())
    _check_final_state(cfg, t, _small(), done)                  # finite: goes on
    with torch.no_grad():
        t.net.blocks[1][0].weight[0, 0] = float("nan")
    with pytest.raises(DivergenceError, match="bp diverged after step 1"):
        _check_final_state(cfg, t, _small(), done)
    _check_final_state(cfg, t, _small(), RunResult(summary={}))  # a failed run: its own error
