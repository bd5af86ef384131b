"""The discrete-event engine: devices, lanes, links and :func:`simulate`.

A *device* (a rank) has a ``compute`` lane and a ``comm`` lane. A placement
maps blocks 1..K to devices; blocks placed on one device share its compute
lane through a SimPy resource (K ranks on fewer cores or GPUs), blocks on
their own device skip that resource, which keeps the common case fast.

A message from block ``i`` to block ``j`` on another device occupies the
sender's comm lane for its transfer time ``o = bytes / bandwidth`` (a
``send`` span), travels for the latency ``c``, and occupies the receiver's
comm lane for ``o`` (a ``recv`` span ending when the data has arrived).
Lanes are reserved first-come-first-served, so comm spans never overlap.
Blocks on one device exchange data in memory: no comm spans, no delay.
The transfer starts when the message is sent (eager) or, with
``rendezvous``, when its receiver asks for it; either way the receiver can
use it a hand-off ``recv`` after it has arrived (``Costs.recv``, default 0).

A block that has to wait for a message or a buffer entry records a
``wait`` span on its compute lane (when it has its device to itself), as
the runtime does. In replay mode (:mod:`bpsim.sim.playback`) every op,
every message and every untraced gap between ops takes the time a
measured run recorded for it instead of its cost.

Determinism: SimPy orders simultaneous events by scheduling order, the
schedules create processes in block order, and every random draw comes
from one ``random.Random(seed)`` in event order -- so equal seeds give
identical traces.

Spans are recorded as plain tuples (see :mod:`bpsim.trace`) and
consecutive ops with no dependency between them share one SimPy timeout;
both keep the per-span overhead small (``benchmarks/simspeed.py``).
"""

from __future__ import annotations

import math
import random
from collections import deque
from typing import Any, Generator, Mapping, Sequence

import simpy

from bpsim.replay import ReplayBuffer
from bpsim.sim.costs import CostTable

__all__ = ["Engine", "parse_placement", "IDLE_CAUSES"]

IDLE_CAUSES = ("input", "gradient", "buffer", "device")
# cost-table entries recorded under another op name (the trace vocabulary)
_SPAN_NAME = {"bwd+in": "bwd"}


class _Box:
    """Mailbox of one (block, kind): messages as (arrival time, payload)."""

    __slots__ = ("q", "waiter")

    def __init__(self) -> None:
        self.q: deque = deque()
        self.waiter: simpy.Event | None = None


class _Buf:
    """A replay buffer with the messages still on the wire towards it."""

    __slots__ = ("rb", "pending", "waiter", "reads_of", "log", "misses", "due")

    def __init__(self, capacity: int, max_reuse: int | None) -> None:
        self.rb = ReplayBuffer(capacity, max_reuse)
        self.pending: deque = deque()
        self.waiter: simpy.Event | None = None
        self.reads_of: dict[int, int] = {}     # producer step -> reads so far
        self.log: list[tuple[int, int, int]] = []   # (step, producer step, reads)
        self.misses = 0                         # reads that had to wait
        self.due: dict[int, float] = {}         # replay: measured delivery by step


class Engine:
    """Shared state of one simulation; schedules drive it from SimPy processes.

    Parameters
    ----------
    blocks : int
        Number of blocks K.
    table : CostTable
        Resolved per-block costs.
    placement : list of int
        Device index of each block (``placement[j-1]`` for block j).
    seed : int
        Seed of the cost draws (lognormal or from ``Costs.jitter``).
    rendezvous : bool
        Messages between devices leave when their receiver asks for them
        (see :meth:`send` and ``simulate(protocol=)``); eager otherwise.
    replay : Measured or None
        Durations of a measured run (:class:`bpsim.sim.playback.Measured`):
        every op, message and untraced gap takes its measured time.
    """

    def __init__(self, blocks: int, table: CostTable, placement: Sequence[int],
                 seed: int = 0, rendezvous: bool = False, replay: Any = None) -> None:
        self.env = simpy.Environment()
        self.K = blocks
        self.table = table
        self.ops = table.ops
        self.xfer = table.xfer
        self.latency = table.latency
        self.handoff = table.handoff
        self.rendezvous = rendezvous
        self.spread = table.spread
        self.jitter = table.jitter
        self.rng = random.Random(seed)
        self.dev = [-1] + [int(d) for d in placement]
        counts: dict[int, int] = {}
        for d in placement:
            counts[d] = counts.get(d, 0) + 1
        res = {d: simpy.Resource(self.env, capacity=1) for d, n in counts.items() if n > 1}
        self.res = [None] + [res.get(d) for d in placement]
        self.comm_free = {d: 0.0 for d in counts}
        self.replay = replay
        # replay: when each device is done with the untraced time after its last op
        self.ready = {d: (replay.start_delay(d) if replay is not None else 0.0) for d in counts}
        # replay: when the message block j consumes next was delivered in the
        # measured run (its next op cannot have started earlier), and that of
        # the message _transmit handled last
        self.due: dict[int, float] = {}
        self._due = -math.inf
        self.rows: list[tuple] = []
        self.updates = [0] * (blocks + 1)
        self.idle = [dict.fromkeys(IDLE_CAUSES, 0.0) for _ in range(blocks + 1)]
        self.boxes: dict[tuple[int, str], _Box] = {}
        # messages each block sent: how many have not left yet (rendezvous),
        # when the last one is delivered, and a flush waiting for them
        self.unsent = [0] * (blocks + 1)
        self.sent_until = [0.0] * (blocks + 1)
        self.flushing: dict[int, simpy.Event] = {}
        self.bufs: dict[int, _Buf] = {}
        self.n_msgs = 0

    # ------------------------------------------------------------ compute
    def run(self, j: int, ops: Sequence[str], step: int,
            mb: int = 0) -> Generator[simpy.Event, Any, None]:
        """Run ``ops`` back to back on block j's device (one timeout)."""
        env = self.env
        res = self.res[j]
        req = None
        if res is not None:
            t_req = env.now
            req = res.request()
            yield req
            self.idle[j]["device"] += env.now - t_req
        now = t = env.now
        rows = self.rows
        dev = self.dev[j]
        if self.replay is not None:
            yield from self._replay_run(j, dev, ops, step, mb)
            if req is not None:
                res.release(req)
            return
        spread = self.spread
        jitter = self.jitter
        for op in ops:
            d = self.ops[op][j]
            if d > 0:
                if jitter:    # the measured distribution (Costs.jitter)
                    f = jitter[op]
                    d *= f[int(self.rng.random() * len(f))]
                elif spread:
                    d *= math.exp(spread * self.rng.gauss(0.0, 1.0))
            rows.append((dev, "compute", _SPAN_NAME.get(op, op), j, step, mb, t, t + d, None))
            t += d
        yield env.timeout(t - now)
        if req is not None:
            res.release(req)

    def _replay_run(self, j: int, dev: int, ops: Sequence[str], step: int,
                    mb: int) -> Generator[simpy.Event, Any, None]:
        """``run`` in replay mode: each op its measured duration, preceded by
        the untraced time measured before it (after a wait) and followed by
        the untraced time measured after it, which keeps the device busy but
        does not delay what the op sends."""
        env = self.env
        now = env.now
        t = now if now > self.ready[dev] else self.ready[dev]
        tail = 0.0
        due = self.due.pop(j, -math.inf)
        for op in ops:
            name = _SPAN_NAME.get(op, op)
            head, d, after, t0, t1 = self.replay.op(dev, j, name, step, mb)
            if t0 < due:
                # the measured span began before its input was there: the
                # runtime starts an op at the end of the rank's previous span,
                # so it holds untraced time before the input came (e.g. the
                # thread was descheduled); only the part after delivery is op
                d = max(t1 - due, 0.0)
                head = 0.0
            due = -math.inf
            t += tail + head
            self.rows.append((dev, "compute", name, j, step, mb, t, t + d, None))
            t += d
            tail = after
        self.ready[dev] = t + tail
        yield env.timeout(t - now)

    def _wait_span(self, j: int, t: float, step: int, mb: int) -> None:
        """Record block j's wait from ``t`` to now (a block with its own device)."""
        if self.res[j] is not None:
            return
        dev = self.dev[j]
        t0 = t if t > self.ready[dev] else self.ready[dev]
        if self.env.now > t0:
            self.rows.append((dev, "compute", "wait", j, step, mb, t0, self.env.now, None))

    # ------------------------------------------------------------ messages
    def _transmit(self, src: int, dst: int, step: int, mb: int) -> float:
        """Record the send/recv spans of one message; return its arrival time."""
        now = self.env.now
        ds, dd = self.dev[src], self.dev[dst]
        if ds == dd:
            return now
        msg = self.n_msgs
        self.n_msgs = msg + 1
        if self.replay is not None:
            s0, s1, r0, r1, done, self._due = self.replay.message(src, dst, step, mb)
            self.rows.append((ds, "comm", "send", src, step, mb, now + s0, now + s1, msg))
            self.rows.append((dd, "comm", "recv", dst, step, mb, now + r0, now + r1, msg))
            self._landed(src, now + r1)
            return now + done
        o = self.xfer[src]
        c = self.latency
        if o > 0:
            free = self.comm_free
            s = now if now > free[ds] else free[ds]
            free[ds] = s + o
            r = s + c if s + c > free[dd] else free[dd]
            free[dd] = r + o
        else:
            s = now
            r = now + c
        self.rows.append((ds, "comm", "send", src, step, mb, s, s + o, msg))
        self.rows.append((dd, "comm", "recv", dst, step, mb, r, r + o, msg))
        self._landed(src, r + o)
        return r + o

    def _landed(self, src: int, t: float) -> None:
        """A message of block src arrives at ``t`` (what :meth:`flush` waits for)."""
        if t > self.sent_until[src]:
            self.sent_until[src] = t

    def send(self, src: int, dst: int, kind: str, step: int, mb: int = 0,
             payload: Any = None) -> None:
        """Send a message of ``kind`` ('act', 'grad', 'target') from src to dst.

        Eager (the default): the message leaves now and arrives after the
        latency (and transfer). Rendezvous (``Engine.rendezvous``, a message
        between devices): it leaves only when dst asks for it (``recv``),
        or now if dst is already waiting.
        """
        box = self.boxes.get((dst, kind))
        if box is None:
            box = self.boxes[(dst, kind)] = _Box()
        if self.dev[src] == self.dev[dst]:
            box.q.append((self.env.now, payload, 0.0, -math.inf))
        elif self.rendezvous:
            box.q.append((None, payload, (src, step, mb), -math.inf))
            self.unsent[src] += 1
        else:   # a message between devices also costs its receiver the hand-off ``recv``
            arrival = self._transmit(src, dst, step, mb)
            box.q.append((arrival, payload, self.handoff, self._due))
        if box.waiter is not None:
            w, box.waiter = box.waiter, None
            w.succeed()

    def recv(self, j: int, kind: str, cause: str, step: int = 0,
             mb: int = 0) -> Generator[simpy.Event, Any, Any]:
        """Wait for the next message of ``kind`` to block j (for its op of
        ``step``, ``mb``); idle time goes to ``cause``."""
        env = self.env
        t = env.now
        box = self.boxes.get((j, kind))
        if box is None:
            box = self.boxes[(j, kind)] = _Box()
        if not box.q:
            box.waiter = env.event()
            yield box.waiter
        arrival, payload, handoff, due = box.q.popleft()
        if self.replay is not None:
            self.due[j] = due
        if arrival is None:   # rendezvous: the transfer starts now that both sides are ready
            src, s, i = handoff
            arrival, handoff = self._transmit(src, j, s, i), self.handoff
            self.unsent[src] -= 1
            if self.unsent[src] == 0 and src in self.flushing:
                self.flushing.pop(src).succeed()
        # usable a hand-off after it has arrived and block j asks for it
        ready = (arrival if arrival > env.now else env.now) + handoff
        if ready > env.now:
            yield env.timeout(ready - env.now)
        if env.now > t:
            self.idle[j][cause] += env.now - t
            self._wait_span(j, t, step, mb)
        return payload

    def flush(self, j: int, step: int) -> Generator[simpy.Event, Any, None]:
        """Wait until every message block j sent has been delivered (under
        rendezvous: taken by its receiver, then moved). torch's pipelining
        schedules end each step this way, before the optimizer step."""
        env = self.env
        t = env.now
        if self.unsent[j] > 0:
            self.flushing[j] = env.event()
            yield self.flushing[j]
        if self.sent_until[j] > env.now:
            yield env.timeout(self.sent_until[j] - env.now)
        if env.now > t:
            self.idle[j]["gradient"] += env.now - t
            self._wait_span(j, t, step, 0)

    # ------------------------------------------------------ replay buffers
    def make_buffers(self, capacity: int, max_reuse: int | None) -> None:
        for j in range(1, self.K):
            self.bufs[j] = _Buf(capacity, max_reuse)

    def put(self, j: int, step: int) -> None:
        """Block j writes its output of ``step`` into buffer j (held by block j+1)."""
        arrival = self._transmit(j, j + 1, step, 0)
        b = self.bufs[j]
        b.pending.append((arrival, step))
        if self.replay is not None:
            b.due[step] = self._due
        if b.waiter is not None:
            w, b.waiter = b.waiter, None
            w.succeed()

    def take(self, j: int, step: int = 0) -> Generator[simpy.Event, Any, Any]:
        """Block j reads buffer j-1 for its ``step`` (DGL Alg. 2 line 7);
        waits while it serves nothing (a miss). Every read is logged as
        ``(step, producer step, reads of that entry so far)``."""
        env = self.env
        t = env.now
        b = self.bufs[j - 1]
        missed = False
        while True:
            now = env.now
            pending = b.pending
            # An arrival equal to now up to rounding counts as arrived, so exact
            # ties (equal periods) do not hinge on floating-point noise.
            horizon = now + 1e-12 * (now if now > 1.0 else 1.0)
            while pending and pending[0][0] <= horizon:
                _, s = pending.popleft()
                b.rb.put(s, step=s)
            got = b.rb.get(with_staleness=True, now=self.updates[j - 1])
            if got is not None:
                break
            missed = True
            if pending:
                yield env.timeout(pending[0][0] - now)
            else:
                b.waiter = env.event()
                yield b.waiter
        b.misses += missed
        produced = got[0]
        n = b.reads_of[produced] = b.reads_of.get(produced, 0) + 1
        b.log.append((step, produced, n))
        if self.replay is not None:
            self.due[j] = b.due.get(produced, -math.inf)
        if env.now > t:
            self.idle[j]["buffer"] += env.now - t
            self._wait_span(j, t, step, 0)
        return got


def parse_placement(placement: Any, blocks: int) -> list[int]:
    """Device of each block from None (one device each), a list of device
    indices, a string ``"0,0,1,1"``, or an int D (blocks packed in order onto
    D devices)."""
    if placement is None:
        return list(range(blocks))
    if isinstance(placement, str):
        text = placement.strip()
        if "," not in text and text.isdigit():
            placement = int(text)
        else:
            try:
                placement = [int(p) for p in text.split(",") if p.strip()]
            except ValueError:
                raise ValueError(f"placement {text!r} must be D (a device count) or one "
                                 f"device index per block, e.g. 0,0,1,1") from None
    if isinstance(placement, int) and not isinstance(placement, bool):
        if not 1 <= placement <= blocks:
            raise ValueError(f"placement onto {placement} devices: need 1..{blocks} devices "
                             f"for {blocks} blocks")
        return [(j * placement) // blocks for j in range(blocks)]
    out = [int(d) for d in placement]
    if len(out) != blocks or any(d < 0 for d in out):
        raise ValueError(f"placement needs one device index >= 0 per block ({blocks}), "
                         f"got {list(placement)!r}")
    return out
