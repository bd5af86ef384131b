"""A clock that every rank of a run shares.

Each rank times its spans with its own monotonic clock
(``time.perf_counter``, CLOCK_MONOTONIC on Linux). The runtime turns those
readings into one time axis for the whole run:

* **zero**: after a barrier, rank 0 reads its clock and broadcasts the
  reading; every span time is measured from it, so the run starts at 0;
* **offset**: ranks on rank 0's host share its monotonic clock (offset 0).
  A rank on another host estimates the offset of rank 0's clock to its own
  with a ping-pong exchange (Cristian's algorithm): it sends its time ``t1``,
  rank 0 answers with its time ``s``, the answer arrives at ``t2``, and
  ``offset = s - (t1 + t2) / 2``, kept from the round with the shortest
  round trip (its error is at most half that round trip)::

      rank r   t1 --------------------> t2
                   \\                  /
      rank 0        `---- s (reply) -'

A span recorded at local time ``t`` is then at ``t + offset - zero`` on the
shared axis.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["SharedClock", "sync_clock", "local_clock", "best_offset"]


@dataclass(frozen=True)
class SharedClock:
    """The shared time axis of one rank.

    ``now()`` is seconds since the run's zero on that axis; ``offset`` is
    what this rank adds to its own clock to read rank 0's, and ``rtt`` the
    round trip of the ping-pong round it came from (0 when it was not
    needed).
    """

    zero: float
    offset: float = 0.0
    rtt: float = 0.0
    method: str = "local"

    @property
    def base(self) -> float:
        """Local clock reading that maps to 0 on the shared axis."""
        return self.zero - self.offset

    def now_fn(self) -> Callable[[], float]:
        """A cheap function returning the shared time (one subtraction per call)."""
        base = self.base
        pc = time.perf_counter
        return lambda: pc() - base

    def to_dict(self) -> dict[str, float | str]:
        return {"offset": self.offset, "rtt": self.rtt, "method": self.method}


def local_clock() -> SharedClock:
    """The shared clock of a run in one process: zero is now."""
    return SharedClock(zero=time.perf_counter())


def best_offset(rounds: list[tuple[float, float, float]]) -> tuple[float, float]:
    """``(offset, round trip)`` from ping-pong rounds ``(t1, s, t2)``: the
    round with the shortest round trip ``t2 - t1`` gives
    ``offset = s - (t1 + t2) / 2`` (Cristian's algorithm, see above)."""
    if not rounds:
        raise ValueError("best_offset needs at least one ping-pong round")
    t1, s, t2 = min(rounds, key=lambda r: r[2] - r[0])
    return s - (t1 + t2) / 2, t2 - t1


def sync_clock(rank: int, world: int, *, rounds: int = 8, group: Any = None) -> SharedClock:
    """Agree on a zero and estimate this rank's clock offset to rank 0.

    Collective: every rank of ``group`` (default: the default process group,
    which must then carry CPU tensors, i.e. gloo) must call it. Ranks whose
    host name equals rank 0's use offset 0.
    """
    import torch
    import torch.distributed as dist

    hosts: list[str | None] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    pong = [r for r in range(1, world) if hosts[r] != hosts[0]]
    offset, rtt = 0.0, 0.0
    # Ping-pong rounds, one remote rank at a time (float64 keeps microseconds).
    for r in pong:
        buf = torch.zeros(1, dtype=torch.float64)
        if rank == 0:
            for _ in range(rounds):
                dist.recv(buf, src=r, group=group)
                buf[0] = time.perf_counter()
                dist.send(buf, dst=r, group=group)
        elif rank == r:
            seen = []
            for _ in range(rounds):
                t1 = time.perf_counter()
                buf[0] = t1
                dist.send(buf, dst=0, group=group)
                dist.recv(buf, src=0, group=group)
                seen.append((t1, float(buf[0]), time.perf_counter()))
            offset, rtt = best_offset(seen)
    dist.barrier(group=group)
    zero = torch.tensor([time.perf_counter()], dtype=torch.float64)
    dist.broadcast(zero, src=0, group=group)
    method = "ping-pong" if rank in pong else "same-host"
    return SharedClock(zero=float(zero[0]), offset=offset, rtt=rtt, method=method)
