"""The Trainer protocol shared by every method, and the training History.

A trainer owns a ``BlockNet`` and one SGD optimizer per block (plus one for
a separate output layer), so the same per-block update can run in one
process or on the rank that holds the block. Subclasses implement only
``train_step(x, y, idx)``; ``fit`` supplies the rest:

* repeatable runs: the order of examples in epoch ``e`` depends only on
  ``(seed, e)``, so a run resumed from a checkpoint sees exactly the batches
  an uninterrupted run would;
* optimizer settings: SGD with momentum, weight decay, per-block learning
  rates, a step schedule (``milestones``, ``gamma``);
* a tqdm progress bar that switches itself off when stderr is not a terminal;
* a checkpoint per epoch (written atomically, loaded with
  ``weights_only=True``) and ``fit(..., resume=True)``; the checkpoint
  records every setting that shapes the run (:meth:`Trainer.run_settings`)
  and a resume checks it as a whole; one run at a time writes a checkpoint
  folder (a lock file holding its pid);
* divergence checks: a non-finite loss stops training with an error, and so
  do weights that are not finite, or give a non-finite loss, after the last
  update of an epoch (:meth:`Trainer.check_final_state`).
"""

from __future__ import annotations

import io
import inspect
import math
import os
import pickle
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from bpsim import methods
from bpsim.files import check_writable, open_input, write_bytes
from bpsim.nets import BlockNet

__all__ = ["Trainer", "History", "EpochRecord", "StepResult", "DivergenceError", "diverged",
           "evaluate", "head_accuracies", "method_keywords", "method_aux"]


#: the largest checkpoint file ``load_checkpoint`` reads
MAX_CHECKPOINT_BYTES = 16 << 30

#: registry options that shape the net (``aux``) or the pipeline (``microbatches``)
#: rather than a trainer's constructor
_NOT_KEYWORDS = ("aux", "microbatches")


def method_keywords(name: str, *extra: str) -> tuple[str, ...]:
    """A trainer's method keywords: the options :mod:`bpsim.methods` lists for
    method ``name`` that its constructor takes, then ``extra`` (trainer-only)."""
    return tuple(o for o in methods.get(name).options if o not in _NOT_KEYWORDS) + extra


def method_aux(name: str) -> str | None:
    """The auxiliary head method ``name`` builds its net with (registry default)."""
    m = methods.get(name)
    return m.default("aux") if "aux" in m.options else None


#: the largest float32: a step size above it cannot multiply a float32 tensor
_FLOAT32_MAX = 3.4028234663852886e38

class DivergenceError(ValueError):
    """Training produced NaN or inf; the message says where and what to try."""


def diverged(method: str, where: str, what: str, advice: str) -> DivergenceError:
    """The divergence error of every trainer and of the runtime, in one form:
    ``"<method> diverged <where>: <what>; <advice>"``, e.g. ``dgl diverged at
    step 3: block 2's local loss is nan; lower the learning rate (...)``."""
    return DivergenceError(f"{method} diverged {where}: {what}; {advice}")


@dataclass
class StepResult:
    """What one training step reports: the global loss and per-block local losses."""

    loss: float
    local_losses: list[float] | None = None


@dataclass
class EpochRecord:
    """One epoch of a ``History``."""

    epoch: int
    train_loss: float
    test_accuracy: float | None
    test_loss: float | None
    local_losses: list[float] | None
    wall_time: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class History:
    """Per-epoch records of a run; the lists below are views over ``records``."""

    records: list[EpochRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def train_loss(self) -> list[float]:
        return [r.train_loss for r in self.records]

    @property
    def test_accuracy(self) -> list[float | None]:
        return [r.test_accuracy for r in self.records]

    @property
    def local_losses(self) -> list[list[float] | None]:
        return [r.local_losses for r in self.records]

    @property
    def wall_time(self) -> list[float]:
        return [r.wall_time for r in self.records]

    @property
    def final_accuracy(self) -> float | None:
        return self.records[-1].test_accuracy if self.records else None

    def to_dict(self) -> dict[str, list]:
        """Column-wise dict (JSON-friendly, and safe for ``torch.load(weights_only=True)``)."""
        cols: dict[str, list] = {k: [] for k in EpochRecord.__dataclass_fields__}
        for r in self.records:
            for k, v in asdict(r).items():
                cols[k].append(v)
        return cols

    @classmethod
    def from_dict(cls, cols: dict[str, list]) -> History:
        n = len(cols.get("epoch", []))
        return cls([EpochRecord(**{k: cols[k][i] for k in cols}) for i in range(n)])

    def same_as(self, other: History) -> bool:
        """Equal up to wall-clock time (what an exact resume guarantees)."""
        a, b = self.to_dict(), other.to_dict()
        a.pop("wall_time"), b.pop("wall_time")
        return a == b


def _finite(v: float) -> bool:
    return not (math.isnan(v) or math.isinf(v))


@torch.no_grad()
def evaluate(model: Callable[[torch.Tensor], torch.Tensor], data: TensorDataset, task: str = "classification",
             batch_size: int = 1000) -> tuple[float | None, float]:
    """``(accuracy, mean loss)`` of ``model`` on ``data`` (accuracy is None for regression)."""
    x_all, y_all = data.tensors[0], data.tensors[1]
    correct, loss_sum = 0, 0.0
    for i in range(0, len(x_all), batch_size):
        x, y = x_all[i : i + batch_size], y_all[i : i + batch_size]
        out = model(x)
        if task == "classification":
            loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
        else:
            loss_sum += nn.functional.mse_loss(out, y, reduction="sum").item() / max(1, y[0].numel())
    n = len(x_all)
    return (correct / n if task == "classification" else None), loss_sum / n


@torch.no_grad()
def head_accuracies(net: BlockNet, data: TensorDataset, batch_size: int = 1000) -> list[float]:
    """Test accuracy of every block's head (the last block's own output where it has none)."""
    was = net.training
    net.eval()
    x_all, y_all = data.tensors[0], data.tensors[1]
    correct = [0] * len(net)
    for i in range(0, len(x_all), batch_size):
        h, y = x_all[i : i + batch_size], y_all[i : i + batch_size]
        for k, b in enumerate(net.blocks):
            h = b(h)
            head = net.heads[k] if net.heads is not None else nn.Identity()
            out = head(h)
            if k == len(net) - 1 and net.output is not None and net.heads is None:
                out = net.output(h)
            if out.dim() == 2:
                correct[k] += (out.argmax(1) == y).sum().item()
    net.train(was)
    return [c / len(x_all) for c in correct]


def _per_block(value: float | Sequence[float], k: int, what: str) -> list[float]:
    vals = [float(value)] * k if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) != k:
        raise ValueError(f"{what} needs one value or {k} values (one per block), got {len(vals)}")
    return vals


def _flag_value(v: Any, key: str = "") -> str:
    if v is None:
        return "(none)"
    if key == "slowdown" and isinstance(v, list) and len(v) == 2:
        return f"{v[0]}:{v[1]:g}"
    if isinstance(v, list):
        if not v:
            return "(none)"
        return ",".join(f"{x:g}" if isinstance(x, float) else _flag_value(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _fingerprint(data: TensorDataset) -> str:
    """A short mark of a training set (its size, example shape and sums), so a
    checkpoint knows the data it was trained on."""
    x, y = data.tensors[0], data.tensors[1]
    return (f"{len(x)}x{'x'.join(map(str, x.shape[1:]))}:"
            f"{float(x.double().sum()):.12g}:{float(y.double().sum()):.12g}")


def _plain(v: Any) -> Any:
    """A run setting in the form a checkpoint stores and compares: tuples as
    lists, numbers as they are (so ``(2, 3.0)`` equals its saved copy)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _keyword_defaults(cls: type) -> dict[str, Any]:
    """The default of every keyword the constructors along ``cls``'s MRO take."""
    out: dict[str, Any] = {}
    for c in reversed(cls.__mro__):
        init = c.__dict__.get("__init__")
        if init is None:
            continue
        for name, p in inspect.signature(init).parameters.items():
            if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD:
                if p.default is not p.empty:
                    out[name] = p.default
    return out


def _check_history(cols: Any, epochs: int) -> None:
    """``ValueError`` unless ``cols`` is the column dict of ``epochs`` records."""
    fields = list(EpochRecord.__dataclass_fields__)
    ok = isinstance(cols, dict) and set(cols) == set(fields) and all(
        isinstance(cols[k], list) and len(cols[k]) == epochs for k in fields)
    if ok:
        ok = list(cols["epoch"]) == list(range(1, epochs + 1))
    if not ok:
        raise ValueError(f"the checkpoint's history is not a record of its {epochs} epochs; "
                         "it is damaged: delete it to start afresh")


class _CheckpointLock:
    """A lock file in a checkpoint folder, so that one run at a time writes it.

    Created with ``O_EXCL`` holding the owner's pid; a lock whose pid is no
    longer running (or this process's own, left by an interrupted run) is
    taken over; a live owner is a one-line ``ValueError``.
    """

    NAME = ".bpsim-train.lock"

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / self.NAME

    def __enter__(self) -> "_CheckpointLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._owner() is None:     # being written this moment, or garbage
                    time.sleep(0.05)
                owner = self._owner()
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise ValueError(f"another run (pid {owner}) is writing checkpoints in "
                                     f"{self.path.parent}; wait for it, choose another "
                                     f"--checkpoint-dir, or delete {self.path} if no run "
                                     "is") from None
                self.path.unlink(missing_ok=True)    # stale: its run is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return self
        raise ValueError(f"cannot take the lock {self.path}; delete it if no run is writing "
                         f"checkpoints in {self.path.parent}")

    def _owner(self) -> int | None:
        """The pid in the lock file (None: no file, or no pid in it)."""
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc: Any) -> None:
        if self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


class Trainer:
    """Base of every training method (see the module docstring).

    Parameters
    ----------
    net : the ``BlockNet`` to train (modified in place).
    lr : SGD learning rate, or one per block (and one more for ``net.output``).
    momentum, weight_decay : SGD settings.
    batch_size : examples per mini-batch.
    milestones, gamma : multiply every learning rate by ``gamma`` at these epochs.
    seed : seeds the order of examples (and any randomness inside a step).
    task : ``classification`` (cross-entropy) or ``regression`` (MSE).
    checkpoint_dir : write ``last.pt`` there after every epoch.
    progress : show a progress bar; ``None`` = only when stderr is a terminal.
    """

    name = "base"
    #: how ``bpsim train`` builds a net for this method: default auxiliary head
    #: kind (None: no heads) and whether the output layer is kept separate.
    aux_default: str | None = None
    output_layer: bool = False
    #: learning rate ``bpsim train`` uses when ``--lr`` is not given.
    default_lr: float = 0.05
    #: method-specific constructor keywords the CLI may pass (argparse dests).
    options: tuple[str, ...] = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> "Trainer":
        obj = super().__new__(cls)
        obj._given = dict(kwargs)     # the keywords as given: run_settings records them
        return obj

    def __init__(
        self,
        net: BlockNet,
        *,
        lr: float | Sequence[float] = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_size: int = 64,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        seed: int = 0,
        task: str = "classification",
        checkpoint_dir: str | os.PathLike | None = None,
        progress: bool | None = None,
    ) -> None:
        n_opt = len(net) + (net.output is not None)
        self.lrs = _per_block(lr, n_opt, "lr")
        if any(v <= 0 or not _finite(v) or v > _FLOAT32_MAX for v in self.lrs):
            raise ValueError(f"learning rates must be finite numbers > 0 (at most "
                             f"{_FLOAT32_MAX:.3g}, the largest float32), got {self.lrs}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not (0 <= weight_decay <= _FLOAT32_MAX):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        self.net = net
        self.momentum, self.weight_decay = momentum, weight_decay
        self.batch_size, self.seed, self.task = batch_size, seed, task
        self.milestones, self.gamma = list(milestones), gamma
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress = progress
        self.optimizers = self.make_optimizers()
        self.schedulers = [torch.optim.lr_scheduler.MultiStepLR(o, self.milestones, gamma) for o in self.optimizers]
        self.epoch = 0
        self.history = History()

    # ------------------------------------------------------------ to override
    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        """One SGD per block (block + head), then one for ``net.output`` if any."""
        groups = [self.net.block_parameters(k) for k in range(len(self.net))]
        if self.net.output is not None:
            groups.append(list(self.net.output.parameters()))
        return [
            torch.optim.SGD(p, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
            for p, lr in zip(groups, self.lrs)
        ]

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepResult:
        """One update on a mini-batch; ``idx`` are the examples' dataset indices."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_step")

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Network output used for evaluation."""
        return self.net(x)

    def epoch_extra(self) -> dict[str, Any]:
        """Method-specific numbers stored with each epoch (e.g. cache staleness)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Method-specific state saved in checkpoints (tensors, numbers, lists)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` saved."""

    # ---------------------------------------------------------------- helpers
    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The task loss: cross-entropy, or MSE for regression (batch means)."""
        if self.task == "classification":
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out, y)

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def evaluate(self, data: TensorDataset) -> tuple[float | None, float]:
        """``(accuracy, loss)`` on ``data`` in eval mode."""
        was = self.net.training
        self.net.eval()
        try:
            return evaluate(self.predict, data, self.task)
        finally:
            self.net.train(was)

    def batches(self, n: int, epoch: int) -> list[torch.Tensor]:
        """The mini-batches (dataset indices) of ``epoch`` over ``n`` examples:
        a permutation seeded by ``(seed, epoch)`` cut into ``batch_size``
        pieces. ``fit`` and the runtime (every rank) use this one order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        return [perm[i : i + self.batch_size] for i in range(0, n, self.batch_size)]

    # -------------------------------------------------------------------- fit
    def fit(
        self,
        train: TensorDataset,
        epochs: int,
        test: TensorDataset | None = None,
        callbacks: Sequence[Callable[[Trainer, EpochRecord], None]] = (),
        resume: bool = False,
    ) -> History:
        """Train until ``epochs`` epochs in total have run; return the History.

        With ``resume=True`` and a checkpoint in ``checkpoint_dir`` the run
        continues from it and ends exactly as an uninterrupted run would.
        """
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        self._fit_epochs = epochs
        if self.checkpoint_dir is not None:
            check_writable(self.checkpoint_dir, "--checkpoint-dir", folder=True)
            if (self.checkpoint_dir / "last.pt").is_dir():
                raise ValueError(f"{self.checkpoint_dir / 'last.pt'} is a folder, where the "
                                 "checkpoint goes; remove it or choose another --checkpoint-dir")
            check_writable(self.checkpoint_dir / "last.pt", "checkpoint", parents=True)
        if resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        self._fit_n_train = len(train.tensors[0])
        self._fit_data = _fingerprint(train)
        if self.checkpoint_dir is None:
            return self._fit(train, epochs, test, callbacks, resume)
        with _CheckpointLock(self.checkpoint_dir):
            return self._fit(train, epochs, test, callbacks, resume)

    def _fit(self, train: TensorDataset, epochs: int, test: TensorDataset | None,
             callbacks: Sequence[Callable[[Trainer, EpochRecord], None]],
             resume: bool) -> History:
        """``fit`` once its arguments are checked (and its checkpoint folder locked)."""
        if resume:
            last = self.checkpoint_dir / "last.pt"
            if os.path.islink(last) and not last.exists():
                raise ValueError(f"checkpoint {last} is a symbolic link that leads nowhere (or "
                                 "to itself); remove it to start afresh")
            if last.exists():
                self.load_checkpoint(last)
        from tqdm.auto import tqdm

        x_all, y_all = train.tensors[0], train.tensors[1]
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        for epoch in range(self.epoch, epochs):
            batches = self.batches(len(x_all), epoch)
            torch.manual_seed(self.seed * 1_000_003 + epoch + 7)  # randomness inside steps
            self.net.train()
            t0 = time.perf_counter()
            loss_sum, local_sum, count = 0.0, None, 0
            bar = tqdm(batches, desc=f"{self.name} epoch {epoch + 1}/{epochs}", disable=not show, leave=False)
            for step, idx in enumerate(bar):
                r = self.train_step(x_all[idx], y_all[idx], idx)
                if not _finite(r.loss):
                    raise diverged(self.name, f"at epoch {epoch + 1}, step {step + 1}",
                                   f"the loss is {r.loss}", f"lower the learning rate (lr={self.lrs})")
                n = len(idx)
                loss_sum += r.loss * n
                count += n
                if r.local_losses is not None:
                    local_sum = [0.0] * len(r.local_losses) if local_sum is None else local_sum
                    local_sum = [a + b * n for a, b in zip(local_sum, r.local_losses)]
            self.check_final_state(f"at epoch {epoch + 1}, step {len(batches)}",
                                   x_all[batches[-1]], y_all[batches[-1]])
            for s in self.schedulers:
                s.step()
            wall = time.perf_counter() - t0
            acc, tloss = self.evaluate(test) if test is not None else (None, None)
            rec = EpochRecord(
                epoch=epoch + 1,
                train_loss=loss_sum / count,
                test_accuracy=acc,
                test_loss=tloss,
                local_losses=[v / count for v in local_sum] if local_sum is not None else None,
                wall_time=wall,
                extra=self.epoch_extra(),
            )
            self.history.records.append(rec)
            self.epoch = epoch + 1
            for cb in callbacks:
                cb(self, rec)
            if self.checkpoint_dir is not None:
                self.save_checkpoint(self.checkpoint_dir / "last.pt")
        return self.history

    # ------------------------------------------------------------ checkpoints
    #: whether a resumed run needs the checkpoint's ``epochs`` (its schedule
    #: depends on them, e.g. greedy's shares); others may go on for longer
    resume_needs_epochs: bool = False

    def check_final_state(self, where: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Stop with :class:`DivergenceError` when the weights are not finite,
        or give a non-finite loss on the minibatch ``x, y`` of the last step
        (evaluated in eval mode, without gradients): the last step of a run
        can spoil the weights without a loss to show it. ``where`` says when
        (``"at epoch 2, step 5"``, ``"after step 100"``)."""
        advice = f"lower the learning rate (lr={self.lrs})"
        for name, p in self.net.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise diverged(self.name, where, f"weight {name} is not finite after the update",
                               advice)
        was = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                loss = float(self.loss(self.predict(x), y))
        finally:
            self.net.train(was)
        if not _finite(loss):
            raise diverged(self.name, where, f"the loss after the update is {loss}", advice)

    def run_settings(self) -> dict[str, Any]:
        """Every option that shapes the run, as a checkpoint records it: what a
        resumed run must share with the run that wrote it (``epochs`` only when
        :attr:`resume_needs_epochs`). The method's keywords (:attr:`options`
        and every other keyword of a subclass's constructor) are recorded as
        given, or as their defaults."""
        out: dict[str, Any] = {
            "epochs": getattr(self, "_fit_epochs", None), "seed": self.seed,
            "lr": list(self.lrs), "batch_size": self.batch_size, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "milestones": list(self.milestones),
            "gamma": self.gamma, "task": self.task,
            "n_train": getattr(self, "_fit_n_train", None),
            "data": getattr(self, "_fit_data", None)}
        given = getattr(self, "_given", {})
        defaults = _keyword_defaults(type(self))
        base = _keyword_defaults(Trainer)
        for k in dict.fromkeys((*self.options, *(k for k in defaults if k not in base))):
            out[k] = _plain(given[k] if k in given else defaults.get(k))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.name,
            "settings": self.run_settings(),
            "epoch": self.epoch,
            "net": self.net.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "history": self.history.to_dict(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state`` after checking it as a whole against this run.

        The method, every run setting (:meth:`run_settings`), the epoch, the
        history, the number of optimizers and schedulers and the net's
        architecture must all fit; ``ValueError`` names the first that does
        not, with both values.
        """
        if state.get("algorithm") != self.name:
            raise ValueError(f"checkpoint is for {state.get('algorithm')!r}, not {self.name!r}")
        held, mine = state.get("settings"), self.run_settings()
        if not isinstance(held, dict):
            raise ValueError("the checkpoint records no run settings (written by another "
                             "version of bpsim?); delete it to start afresh")
        done = state.get("epoch")
        if isinstance(done, bool) or not isinstance(done, int) or done < 0:
            raise ValueError(f"the checkpoint's epoch is {done!r}, not a count of epochs >= 0; "
                             "it is damaged: delete it to start afresh")
        if mine["epochs"] is not None and mine["epochs"] < done:
            raise ValueError(f"the checkpoint has done {done} epochs already, more than the "
                             f"{mine['epochs']} asked for; ask for --epochs {done} or more, or "
                             "delete the checkpoint")
        # epochs and the training set are known only inside fit
        keys = [k for k in mine if not (k in ("epochs", "n_train", "data") and mine[k] is None)
                and (k != "epochs" or self.resume_needs_epochs)]
        lacks = [k for k in keys if k not in held]
        if lacks:
            raise ValueError(f"the checkpoint does not record --{lacks[0].replace('_', '-')} "
                             "(written by another version of bpsim?); delete it to start afresh")
        differ = [k for k in keys if held[k] != mine[k]]
        if differ:
            flags = [f"--{k.replace('_', '-')}" for k in differ]
            holds = ", ".join(f"{f} {_flag_value(held[k], k)}" for f, k in zip(flags, differ))
            asked = ", ".join(f"{f} {_flag_value(mine[k], k)}" for f, k in zip(flags, differ))
            raise ValueError(f"the checkpoint was written by a run with {holds}, not {asked}; "
                             f"resume with the same {', '.join(flags)} or delete the checkpoint")
        for key, mine_n in (("optimizers", len(self.optimizers)),
                            ("schedulers", len(self.schedulers))):
            theirs_n = state.get(key)
            if not isinstance(theirs_n, list) or len(theirs_n) != mine_n:
                got = len(theirs_n) if isinstance(theirs_n, list) else repr(theirs_n)
                raise ValueError(f"the checkpoint holds {got} {key}, this run has {mine_n}; "
                                 "it is damaged or of another setup: delete it to start afresh")
        _check_history(state.get("history"), done)
        ours = self.net.state_dict()
        theirs = state["net"]
        bad = sorted(set(ours) ^ set(theirs)) or [
            k for k in ours if tuple(ours[k].shape) != tuple(theirs[k].shape)]
        if bad:
            k = bad[0]
            what = (f"{k} of shape {tuple(theirs[k].shape)}, this net's is {tuple(ours[k].shape)}"
                    if k in ours and k in theirs else
                    f"{k} {'only in the checkpoint' if k in theirs else 'missing from it'}")
            raise ValueError(f"the checkpoint holds a net of another architecture ({what}); "
                             "resume with the same --model, --blocks, --width, --depth and "
                             "--aux, or delete the checkpoint")
        self.net.load_state_dict(state["net"])
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        self.epoch = int(state["epoch"])
        self.history = History.from_dict(state["history"])
        self.load_extra_state(state["extra"])

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write a checkpoint atomically (temp file in the same folder, then rename).

        A failed write (a full disk) raises a one-line ``ValueError`` naming
        ``path``; the previous checkpoint stays as it was and no temporary
        file is left (:func:`bpsim.files.write_bytes`).
        """
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        write_bytes(path, buf.getbuffer(), "checkpoint")

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by ``save_checkpoint`` (``weights_only=True``)."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"checkpoint {path} is a folder; remove it or choose another "
                             "--checkpoint-dir")
        fh = open_input(path, "checkpoint", limit=MAX_CHECKPOINT_BYTES)
        try:
            if os.fstat(fh.fileno()).st_size == 0:
                raise ValueError(f"checkpoint {path} is empty (was its run killed while "
                                 "writing?); delete it to start afresh")
            with warnings.catch_warnings():   # a refused file is one line, not torch's warning
                warnings.simplefilter("ignore")
                state = torch.load(fh, map_location="cpu", weights_only=True)
        except ValueError:
            raise
        except pickle.UnpicklingError as e:
            fh.seek(0)   # torch.save writes a zip archive: anything else is damaged or foreign
            if "weights only" not in str(e).lower() or not zipfile.is_zipfile(fh):
                raise ValueError(f"cannot read checkpoint {path} (damaged: "
                                 f"{' '.join(str(e).split())[:120]}); delete it to start "
                                 "afresh") from None
            raise ValueError(f"checkpoint {path} holds objects other than tensors and plain "
                             "values; it was refused unread, since loading it could run code; "
                             "delete it to start afresh") from None
        except Exception as e:  # a truncated or foreign file
            why = " ".join(str(e).split())[:200] or type(e).__name__
            raise ValueError(f"cannot read checkpoint {path} ({why}); it is damaged or not a "
                             "bpsim checkpoint; delete it to start afresh") from None
        finally:
            fh.close()
        if not isinstance(state, dict) or "net" not in state:
            raise ValueError(f"{path} is not a bpsim checkpoint; delete it to start afresh")
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {path} lacks {e} (written by another version of "
                             "bpsim?); delete it to start afresh") from None
