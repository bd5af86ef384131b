"""The replay buffer that sits between two blocks in asynchronous DGL.

DGL (Belilovsky et al.), Sec. 2.3 and Algorithm 2: block ``j`` writes its
outputs into a buffer ``B_j`` of size ``M`` and block ``j + 1`` samples its
inputs from it, so neither waits for the other (forward unlocking). The
paper leaves the sampling rule loose; bpsim follows the rule of the authors'
public code:

* ``put`` on a full buffer overwrites the **oldest** entry;
* ``get`` serves the **least-reused** entry, the **newest** among ties, and
  counts the read;
* with ``max_reuse=R`` an entry read ``R`` times is no longer served, and
  ``get`` answers ``None`` when the buffer is empty or every entry is used up.

Statistics kept for the lessons (DGL Fig. 5/6): how often each entry was
read (``reuse``) and how many producer updates old an entry was when read
(``staleness``). The buffer is thread-safe: a runtime receiver thread may
``put`` while the training thread calls ``get``. No torch import here.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections import deque
from typing import Any

__all__ = ["ReplayBuffer"]


class ReplayBuffer:
    """Fixed-size buffer with least-reused-first, newest-first sampling.

    Parameters
    ----------
    capacity : int
        Number of entries ``M`` kept (DGL Alg. 2, "buffer size M"); >= 1.
    max_reuse : int or None
        Largest number of reads of one entry; ``None`` for no cap.

    Examples
    --------
    >>> buf = ReplayBuffer(2)
    >>> buf.put("a", step=0); buf.put("b", step=1)
    >>> buf.get(), buf.get(), buf.get()   # newest first, then least reused
    ('b', 'a', 'b')
    >>> buf.reuse_counts()
    [1, 2]
    """

    def __init__(self, capacity: int, max_reuse: int | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(
                f"ReplayBuffer capacity must be an integer >= 1 (the buffer size M), "
                f"got {capacity!r}; pass e.g. ReplayBuffer(50)")
        if max_reuse is not None and (
                isinstance(max_reuse, bool) or not isinstance(max_reuse, int) or max_reuse < 1):
            raise ValueError(
                f"max_reuse must be None (no cap) or an integer >= 1, got {max_reuse!r}")
        self.capacity = capacity
        self.max_reuse = max_reuse
        self._lock = threading.Lock()
        # seq -> [item, producer step, reads]; seq grows with every put.
        self._entries: dict[int, list] = {}
        self._order: deque[int] = deque()          # insertion order, oldest left
        self._heap: list[tuple[int, int]] = []     # (reads, -seq), lazily cleaned
        self._seq = 0
        self._last_step: int | None = None
        self._retired_reads: list[int] = []        # read counts of evicted entries
        self._staleness: list[int] = []
        self.n_puts = 0
        self.n_gets = 0
        self.n_misses = 0

    # ------------------------------------------------------------------ core
    def put(self, item: Any, step: int | None = None) -> None:
        """Store ``item``; overwrite the oldest entry when the buffer is full.

        ``step`` is the producer's update counter when it computed ``item``;
        it is needed only for staleness statistics.
        """
        with self._lock:
            if len(self._order) == self.capacity:
                old = self._order.popleft()
                self._retired_reads.append(self._entries.pop(old)[2])
            seq = self._seq
            self._seq += 1
            self._entries[seq] = [item, step, 0]
            self._order.append(seq)
            heapq.heappush(self._heap, (0, -seq))
            if step is not None:
                self._last_step = step
            self.n_puts += 1
            if len(self._heap) > 4 * self.capacity + 64:
                self._compact()

    def get(self, *, with_staleness: bool = False, now: int | None = None) -> Any:
        """Read the least-reused entry (newest among ties) and count the read.

        Parameters
        ----------
        with_staleness : bool
            Return ``(item, staleness)`` instead of ``item``.
        now : int or None
            The producer's current update counter. Staleness is
            ``now - step`` of the entry; when ``now`` is None the newest
            ``step`` put so far stands in for it.

        Returns
        -------
        The item (or ``(item, staleness)``), or ``None`` when the buffer is
        empty or every entry has been read ``max_reuse`` times. Staleness is
        ``None`` when the entry was put without a step.
        """
        with self._lock:
            heap = self._heap
            entries = self._entries
            while heap:
                reads, negseq = heap[0]
                entry = entries.get(-negseq)
                if entry is None or entry[2] != reads:
                    heapq.heappop(heap)            # evicted or outdated key
                    continue
                if self.max_reuse is not None and reads >= self.max_reuse:
                    break                          # the least-read one is used up
                entry[2] = reads + 1
                heapq.heapreplace(heap, (reads + 1, negseq))
                self.n_gets += 1
                stale = None
                ref = self._last_step if now is None else now
                if entry[1] is not None and ref is not None:
                    stale = ref - entry[1]
                    self._staleness.append(stale)
                return (entry[0], stale) if with_staleness else entry[0]
            self.n_misses += 1
            return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._order)

    def _compact(self) -> None:
        self._heap = [(e[2], -s) for s, e in self._entries.items()]
        heapq.heapify(self._heap)

    # ------------------------------------------------------------ statistics
    def reads(self) -> list[int]:
        """Read counts of the entries now in the buffer, oldest first."""
        with self._lock:
            return [self._entries[s][2] for s in self._order]

    def reuse_counts(self) -> list[int]:
        """Read counts of every entry ever stored (evicted ones first)."""
        with self._lock:
            return self._retired_reads + [self._entries[s][2] for s in self._order]

    @property
    def reuse_mean(self) -> float:
        """Mean reads per entry, over entries read at least once (nan if none)."""
        used = [r for r in self.reuse_counts() if r > 0]
        return sum(used) / len(used) if used else math.nan

    def staleness(self) -> list[int]:
        """Staleness of every successful read, in read order."""
        with self._lock:
            return list(self._staleness)

    @property
    def staleness_mean(self) -> float:
        """Mean staleness over reads whose entry carried a step (nan if none)."""
        s = self.staleness()
        return sum(s) / len(s) if s else math.nan

    def stats(self) -> dict[str, Any]:
        """A JSON-friendly summary: sizes, counts, reuse and staleness."""
        return {
            "capacity": self.capacity, "max_reuse": self.max_reuse,
            "size": len(self), "puts": self.n_puts, "gets": self.n_gets,
            "misses": self.n_misses, "reuse_mean": self.reuse_mean,
            "staleness_mean": self.staleness_mean,
        }

    # ------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: entries, read counts, statistics.

        Holds only lists, numbers and the stored items, so a checkpoint of
        tensors loads with ``torch.load(..., weights_only=True)``.
        """
        with self._lock:
            seqs = list(self._order)
            entries = [self._entries[s] for s in seqs]
            return {
                "capacity": self.capacity, "max_reuse": self.max_reuse, "seqs": seqs,
                "items": [e[0] for e in entries], "steps": [e[1] for e in entries],
                "reads": [e[2] for e in entries], "seq": self._seq, "last_step": self._last_step,
                "retired_reads": list(self._retired_reads), "staleness": list(self._staleness),
                "n_puts": self.n_puts, "n_gets": self.n_gets, "n_misses": self.n_misses,
            }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ReplayBuffer":
        """A buffer equal to the one whose ``state_dict()`` gave ``state``."""
        buf = cls(int(state["capacity"]), state["max_reuse"])
        for s, item, step, reads in zip(state["seqs"], state["items"], state["steps"], state["reads"]):
            buf._entries[int(s)] = [item, step, int(reads)]
        buf._order = deque(int(s) for s in state["seqs"])
        buf._compact()
        buf._seq, buf._last_step = int(state["seq"]), state["last_step"]
        buf._retired_reads = [int(r) for r in state["retired_reads"]]
        buf._staleness = [int(v) for v in state["staleness"]]
        buf.n_puts, buf.n_gets, buf.n_misses = int(state["n_puts"]), int(state["n_gets"]), int(state["n_misses"])
        return buf

    def __repr__(self) -> str:
        return (f"ReplayBuffer(capacity={self.capacity}, max_reuse={self.max_reuse}, "
                f"size={len(self)}, puts={self.n_puts}, gets={self.n_gets})")
