"""Asynchronous DGL with replay buffers, emulated in one process (DGL Alg. 2).

DGL Sec. 2.3: block ``j`` writes its detached outputs (with their labels)
into a buffer ``B_j`` of size ``M`` and block ``j + 1`` reads its inputs from
it, so no block waits for its neighbours (forward unlocking). Speed
differences between workers are emulated as in the paper: at every
iteration one block is drawn from a probability mass function ``p`` over the
blocks and does one step; a block that is slowed down by a factor ``S`` gets
``S`` times less probability than the others (Sec. 4.3, Fig. 5/6).

One iteration for the drawn block ``j`` (1-based), with the per-block
functions of ``dgl`` (the same arithmetic as the synchronous trainer and the
runtime)::

    (h, y) = next mini-batch of the stream        if j == 1     (Alg. 2, line 5)
           = B_{j-1}.get()                        otherwise     (line 7)
    out    = block_forward(block_j, h)                          (line 9)
    local_update(out, head_j, optimizer_j, y, loss)             (lines 10-11)
    B_j.put((out.detach(), y), step=updates_j)    if j < K      (line 12)

Buffers follow ``bpsim.replay.ReplayBuffer``: least-reused entry first, the
newest among ties, oldest overwritten when full.

How the emulation meets ``Trainer.fit``
---------------------------------------
``fit`` hands out the epoch's seeded mini-batches one at a time; each
``train_step`` is the stretch of the schedule that ends when block 1 takes
that mini-batch. For a fair comparison (Sec. 4.3) every block makes the
same number of updates: the number of mini-batches per epoch, in every
epoch. A block that has made its share stops being drawn; after the epoch's
last mini-batch the blocks still behind finish their share on what their
buffers hold. Draws are restricted to blocks that can work (a share left,
and an input available), which has the same distribution over performed
updates as drawing from ``p`` and discarding idle draws.

The shares are per epoch, so a slowed block lags its neighbours by at most
one epoch and every record compares blocks that have made the same number
of updates. In the paper's runs (Sec. 4.3) the shares are counted over the
whole run instead, so a block slowed by S = 2 may be half the run behind;
per-epoch shares keep the History and resume simple at the price of that
milder lag. Within an epoch, reuse and staleness arise exactly as in Alg. 2.

Because several blocks may step inside one ``train_step``, the epoch's
``train_loss`` (last block) and ``local_losses`` (every block) are averaged
over each block's own updates and written into the record by an internal
``fit`` callback; a step's ``StepResult.loss`` is only the mean of the
losses in that stretch, used for the divergence check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import TensorDataset

from bpsim.algorithms.base import EpochRecord, StepResult, Trainer, method_aux, method_keywords
from bpsim.algorithms.dgl import DGLTrainer, block_forward, local_head, local_update
from bpsim.methods import DEFAULTS
from bpsim.nets import BlockNet
from bpsim.replay import ReplayBuffer

__all__ = ["AsyncDGLTrainer", "check_pmf", "slowdown_pmf"]


# ------------------------------------------------------------------ the pmf
def check_pmf(pmf: float | Sequence[float], blocks: int) -> list[float]:
    """Validate a pmf over ``blocks`` blocks and return it as floats summing to 1.

    Every entry must be a finite number > 0 (a block drawn with probability 0
    would never train) and the entries must sum to 1 within 1e-6.
    """
    vals = [pmf] if isinstance(pmf, (int, float)) else list(pmf)
    try:
        vals = [float(v) for v in vals]
    except (TypeError, ValueError):
        raise ValueError(f"pmf must be a list of {blocks} numbers (one per block), got {pmf!r}") from None
    if len(vals) != blocks:
        raise ValueError(f"pmf needs one probability per block: {blocks} values, got {len(vals)} ({vals}); "
                         f"e.g. --pmf {','.join([f'{1 / blocks:.4g}'] * blocks)}")
    if any(not math.isfinite(v) or v <= 0 for v in vals):
        raise ValueError(f"pmf entries must be finite and > 0 (a block with probability 0 never trains), "
                         f"got {vals}")
    total = sum(vals)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"pmf must sum to 1 (within 1e-6), got {vals} summing to {total:.6g}; "
                         f"divide every entry by {total:.6g}, or use --slowdown BLOCK:S instead")
    return [v / total for v in vals]


def slowdown_pmf(blocks: int, block: int, factor: float) -> list[float]:
    """DGL Sec. 4.3's pmf: uniform, except block ``block`` (1-based) is drawn ``factor`` times less.

    ``slowdown_pmf(3, 2, 2.0) == [0.4, 0.2, 0.4]``: block 2 has half the
    probability of each other block. ``factor == 1`` is the uniform pmf.
    """
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= blocks:
        raise ValueError(f"slowdown block must be an integer between 1 and {blocks} (1-based), got {block!r}")
    factor = float(factor)
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"slowdown factor S must be a finite number > 0 (S > 1 slows the block down), got {factor}")
    w = [1.0] * blocks
    w[block - 1] = 1.0 / factor
    total = sum(w)
    return [v / total for v in w]


# --------------------------------------------------- buffer (de)serializing
def _servable(buf: ReplayBuffer) -> bool:
    """Whether ``buf.get()`` would return an entry (without counting a read)."""
    if buf.max_reuse is None:
        return len(buf) > 0
    return any(r < buf.max_reuse for r in buf.reads())


def _mean(v: Sequence[float]) -> float | None:
    return sum(v) / len(v) if v else None


# ----------------------------------------------------------------- trainer
class AsyncDGLTrainer(DGLTrainer):
    """Asynchronous DGL with replay (``dgl-async``), DGL Alg. 2 in one process.

    Parameters
    ----------
    net : BlockNet
        Built with auxiliary heads (``aux='mlp'`` by default) and no separate
        output layer, as for ``dgl``.
    buffer : int
        Buffer size ``M`` of every buffer ``B_1 .. B_{K-1}`` (default 50, the
        paper's Fig. 5 setting).
    max_reuse : int or None
        Reads allowed per buffer entry (None: unlimited). With a cap, a block
        whose producer has finished its epoch may run out of inputs and end
        the epoch with fewer updates; ``epoch_extra['updates']`` shows it.
    slowdown : (int, float), optional
        ``(J, S)``: block ``J`` (1-based) is drawn ``S`` times less often than
        each other block (``slowdown_pmf``). ``--slowdown 2:1.5`` on the CLI.
    pmf : sequence of float, optional
        The draw probabilities directly (``check_pmf``). Give at most one of
        ``slowdown`` and ``pmf``; neither means uniform.
    **kwargs
        ``Trainer`` settings (lr, momentum, batch_size, seed, ...). The draws
        use their own generator seeded from ``seed``.

    ``epoch_extra`` reports, for the epoch: ``updates`` per block,
    ``reuse_mean`` per buffer (mean reads per entry read this epoch),
    ``staleness_mean`` per buffer (producer updates made since an entry was
    written, averaged over this epoch's reads; 0 = the freshest output
    possible), the ``pmf`` and the running head accuracies of ``dgl``.
    Checkpoints hold the buffers and the draw generator, so a resumed run
    continues exactly as an uninterrupted one.
    """

    name = "dgl-async"
    aux_default = method_aux(name)
    options = method_keywords(name, "slowdown", "pmf")

    def __init__(
        self,
        net: BlockNet,
        *,
        buffer: int = DEFAULTS["buffer"],
        max_reuse: int | None = DEFAULTS["max_reuse"],
        slowdown: tuple[int, float] | Sequence[float] | None = None,
        pmf: float | Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        K = len(net)
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"buffer (the replay buffer size M, --buffer) must be an integer >= 1, got {buffer!r}")
        if max_reuse is not None and (isinstance(max_reuse, bool) or not isinstance(max_reuse, int)
                                      or max_reuse < 1):
            raise ValueError(f"max_reuse must be None (no cap) or an integer >= 1, got {max_reuse!r}")
        if slowdown is not None and pmf is not None:
            raise ValueError("give either slowdown (BLOCK:S) or pmf, not both")
        if pmf is not None:
            self.pmf = check_pmf(pmf, K)
        elif slowdown is not None:
            try:
                j, s = slowdown
                j = int(j) if float(j).is_integer() else j
                s = float(s)
            except (TypeError, ValueError):
                raise ValueError(f"slowdown must be (BLOCK, S) such as (2, 1.5), got {slowdown!r}") from None
            self.pmf = slowdown_pmf(K, j, s)
        else:
            self.pmf = [1.0 / K] * K
        super().__init__(net, **kwargs)
        self.buffer_size, self.max_reuse = buffer, max_reuse
        self.buffers = [ReplayBuffer(buffer, max_reuse) for _ in range(K - 1)]
        self._gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 424_242)
        self.updates = [0] * K                   # since the start of training
        self._epoch_updates = [0] * K
        self._epoch_loss = [0.0] * K
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._per_epoch: int | None = None        # set by fit: mini-batches per epoch
        self._summary: tuple[float | None, list[float | None]] | None = None
        self._mark_stats()

    # ------------------------------------------------------------- schedule
    def _eligible(self) -> list[int]:
        out = []
        for k in range(len(self.net)):
            if self._per_epoch is not None and self._epoch_updates[k] >= self._per_epoch:
                continue
            if (self._pending is not None) if k == 0 else _servable(self.buffers[k - 1]):
                out.append(k)
        return out

    def _draw(self, eligible: list[int]) -> int:
        """Block drawn from ``p`` restricted to ``eligible`` (Alg. 2, line 3)."""
        total = sum(self.pmf[k] for k in eligible)
        u = torch.rand((), generator=self._gen, dtype=torch.float64).item() * total
        acc = 0.0
        for k in eligible:
            acc += self.pmf[k]
            if u < acc:
                return k
        return eligible[-1]

    def _run_block(self, k: int) -> float:
        """One iteration of Alg. 2 (lines 4-12) for block ``k`` (0-based)."""
        if k == 0:
            h, y = self._pending
            self._pending = None
        else:
            # staleness = producer updates since the entry was written
            (h, y), _ = self.buffers[k - 1].get(with_staleness=True, now=self.updates[k - 1])
        out = block_forward(self.net.blocks[k], h)
        loss = local_update(out, local_head(self.net, k), self.optimizers[k], y, self._tally.loss_fn(k))
        self.updates[k] += 1
        self._epoch_updates[k] += 1
        self._epoch_loss[k] += loss
        if k < len(self.net) - 1:
            self.buffers[k].put((out.detach(), y), step=self.updates[k])
        return loss

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepResult:
        """Run the schedule until block 1 has taken this mini-batch (then, at the
        end of an epoch, until every block has made its share of updates)."""
        self._pending = (x, y)
        losses = []
        while True:
            eligible = self._eligible()
            if not eligible:
                break
            k = self._draw(eligible)
            losses.append(self._run_block(k))
            if k == 0 and (self._per_epoch is None or self._epoch_updates[0] < self._per_epoch):
                break  # the stream's next mini-batch comes with the next call
        if self._pending is not None:  # cannot happen: block 1 always has a share for its batch
            raise RuntimeError("dgl-async: block 1 did not take its mini-batch; is fit's batch count consistent?")
        return StepResult(sum(losses) / len(losses))

    # ------------------------------------------------------------------ fit
    def fit(self, train: TensorDataset, epochs: int, test: TensorDataset | None = None,
            callbacks: Sequence[Any] = (), resume: bool = False):
        """``Trainer.fit`` with every block limited to one epoch's worth of
        updates per epoch, and per-block loss means in the records."""
        self._per_epoch = math.ceil(len(train) / self.batch_size)
        return super().fit(train, epochs, test=test, callbacks=[_write_losses, *callbacks], resume=resume)

    def epoch_extra(self) -> dict[str, Any]:
        extra = super().epoch_extra()
        reuse, stale = [], []
        for b, mark_r, mark_s in zip(self.buffers, self._reuse_mark, self._stale_mark):
            counts = b.reuse_counts()  # indexed by insertion order, so deltas line up
            delta = [c - (mark_r[i] if i < len(mark_r) else 0) for i, c in enumerate(counts)]
            reuse.append(_mean([d for d in delta if d > 0]))
            stale.append(_mean(b.staleness()[mark_s:]))
        extra.update(updates=list(self._epoch_updates), reuse_mean=reuse, staleness_mean=stale,
                     pmf=list(self.pmf))
        K = len(self.net)
        means = [self._epoch_loss[k] / self._epoch_updates[k] if self._epoch_updates[k] else None
                 for k in range(K)]
        self._summary = (means[-1], means)
        self._epoch_updates = [0] * K
        self._epoch_loss = [0.0] * K
        self._mark_stats()
        return extra

    def _mark_stats(self) -> None:
        self._reuse_mark = [b.reuse_counts() for b in self.buffers]
        self._stale_mark = [len(b.staleness()) for b in self.buffers]

    # ---------------------------------------------------------- checkpoints
    def extra_state(self) -> dict[str, Any]:
        return {
            "pmf": list(self.pmf), "updates": list(self.updates),
            "epoch_updates": list(self._epoch_updates), "epoch_loss": list(self._epoch_loss),
            "generator": self._gen.get_state(),
            "buffers": [b.state_dict() for b in self.buffers],
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if len(state["buffers"]) != len(self.buffers):
            raise ValueError(f"checkpoint has {len(state['buffers'])} buffers but this net needs "
                             f"{len(self.buffers)}; resume with the same number of blocks")
        if [round(p, 12) for p in state["pmf"]] != [round(p, 12) for p in self.pmf]:
            raise ValueError(f"checkpoint was trained with pmf {state['pmf']}, not {self.pmf}; "
                             "resume with the same --slowdown / --pmf")
        self.updates = [int(v) for v in state["updates"]]
        self._epoch_updates = [int(v) for v in state["epoch_updates"]]
        self._epoch_loss = [float(v) for v in state["epoch_loss"]]
        self._gen.set_state(state["generator"])
        self.buffers = [ReplayBuffer.from_state_dict(s) for s in state["buffers"]]
        self._mark_stats()


def _write_losses(trainer: Trainer, rec: EpochRecord) -> None:
    """Replace the record's losses with each block's mean over its own updates."""
    summary = getattr(trainer, "_summary", None)
    if summary is None:
        return
    last, means = summary
    if last is not None:
        rec.train_loss = last
    rec.local_losses = means
    trainer._summary = None
