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

Devices are independent unless ``Costs.contention`` is set: then an op
runs at ``1 / (1 + contention)`` of its speed while another device
computes, and the ops in progress are re-rated whenever that changes
(processor sharing; ops of blocks on one device take turns as before).

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
from typing import TYPE_CHECKING, Any, Generator, Mapping, Sequence

import simpy

from bpsim.replay import ReplayBuffer
from bpsim.sim.costs import Costs, CostTable

if TYPE_CHECKING:  # pragma: no cover
    from bpsim.sim.results import SimResult

__all__ = ["Engine", "simulate", "ALGORITHMS", "ALIASES", "parse_placement"]

ALIASES = {"dgl-sync": "dgl", "backprop": "bp"}
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

    __slots__ = ("rb", "pending", "waiter")

    def __init__(self, capacity: int, max_reuse: int | None) -> None:
        self.rb = ReplayBuffer(capacity, max_reuse)
        self.pending: deque = deque()
        self.waiter: simpy.Event | None = None


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
    """

    def __init__(self, blocks: int, table: CostTable, placement: Sequence[int],
                 seed: int = 0, rendezvous: bool = False) -> None:
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
        self.wake = table.ops["wake"] if any(w > 0 for w in table.ops["wake"]) else None
        self.wake_tau = table.costs.wake_tau
        self.busy_until = {d: 0.0 for d in counts}   # end of each device's last op
        # Costs.contention: devices computing now, and the speed of an op while
        # another device computes too
        self.contention = table.costs.contention
        self.computing: dict[int, simpy.Process] = {}
        self.shared_speed = 1.0 / (1.0 + self.contention)
        self.rows: list[tuple] = []
        self.updates = [0] * (blocks + 1)
        self.idle = [dict.fromkeys(IDLE_CAUSES, 0.0) for _ in range(blocks + 1)]
        self.boxes: dict[tuple[int, str], _Box] = {}
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
        spread = self.spread
        jitter = self.jitter
        extra = 0.0
        if self.wake is not None:    # off unless Costs.wake is set: keep the hot path lean
            gap = now - self.busy_until[dev]
            if gap > 1e-12 * (now if now > 1.0 else 1.0):   # not back to back, up to rounding
                extra = Costs.after_idle(self.wake[j], self.wake_tau, gap)
        if self.contention:
            yield from self._run_shared(j, dev, ops, step, mb, extra)
            if req is not None:
                res.release(req)
            return
        for op in ops:
            d = self.ops[op][j]
            if d > 0:
                if jitter:    # the measured distribution (Costs.jitter)
                    f = jitter[op]
                    d *= f[int(self.rng.random() * len(f))]
                elif spread:
                    d *= math.exp(spread * self.rng.gauss(0.0, 1.0))
            d += extra
            extra = 0.0
            rows.append((dev, "compute", _SPAN_NAME.get(op, op), j, step, mb, t, t + d, None))
            t += d
        if self.wake is not None:
            self.busy_until[dev] = t
        yield env.timeout(t - now)
        if req is not None:
            res.release(req)

    def _run_shared(self, j: int, dev: int, ops: Sequence[str], step: int, mb: int,
                    extra: float) -> Generator[simpy.Event, Any, None]:
        """``run`` with ``Costs.contention``: each op is an amount of work, done
        at full speed while no other device computes and at ``shared_speed``
        while one does. Whenever the number of computing devices crosses
        between one and two, the ops in progress are interrupted and carry
        on at their new speed with the work they have left (processor
        sharing, as in fluid models of shared resources)."""
        env = self.env
        self._set_computing(dev, env.active_process)
        for op in ops:
            # the same draw as run's loop, which keeps its own copy inline: a
            # helper shared by both cost dgl-async (one op per call) 15-20 %
            # of its simulation speed
            work = self.ops[op][j]
            if work > 0:
                if self.jitter:
                    f = self.jitter[op]
                    work *= f[int(self.rng.random() * len(f))]
                elif self.spread:
                    work *= math.exp(self.spread * self.rng.gauss(0.0, 1.0))
            work += extra
            extra = 0.0
            t0 = env.now
            while work > 0:
                speed = self.shared_speed if len(self.computing) > 1 else 1.0
                t = env.now
                try:
                    yield env.timeout(work / speed)
                    work = 0.0
                except simpy.Interrupt:
                    work -= (env.now - t) * speed
                    if work <= 1e-12 * (1.0 + env.now):   # done, up to rounding
                        work = 0.0
            self.rows.append((dev, "compute", _SPAN_NAME.get(op, op), j, step, mb, t0,
                              env.now, None))
        self._set_computing(dev, None)
        if self.wake is not None:
            self.busy_until[dev] = env.now

    def _set_computing(self, dev: int, proc: simpy.Process | None) -> None:
        """Mark ``dev`` computing (``proc``) or idle (None); when that changes
        whether devices share the host, re-rate the others' ops."""
        before = len(self.computing)
        if proc is None:
            self.computing.pop(dev, None)
        else:
            self.computing[dev] = proc
        after = len(self.computing)
        if (before > 1) != (after > 1):
            for d, p in self.computing.items():
                if d != dev:
                    p.interrupt("speed")

    # ------------------------------------------------------------ messages
    def _transmit(self, src: int, dst: int, step: int, mb: int) -> float:
        """Record the send/recv spans of one message; return its arrival time."""
        now = self.env.now
        ds, dd = self.dev[src], self.dev[dst]
        if ds == dd:
            return now
        o = self.xfer[src]
        c = self.latency
        msg = self.n_msgs
        self.n_msgs = msg + 1
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
        return r + o

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
            box.q.append((self.env.now, payload, 0.0))
        elif self.rendezvous:
            box.q.append((None, payload, (src, step, mb)))
        else:   # a message between devices also costs its receiver the hand-off ``recv``
            box.q.append((self._transmit(src, dst, step, mb), payload, self.handoff))
        if box.waiter is not None:
            w, box.waiter = box.waiter, None
            w.succeed()

    def recv(self, j: int, kind: str, cause: str) -> Generator[simpy.Event, Any, Any]:
        """Wait for the next message of ``kind`` to block j; idle time goes to ``cause``."""
        env = self.env
        t = env.now
        box = self.boxes.get((j, kind))
        if box is None:
            box = self.boxes[(j, kind)] = _Box()
        if not box.q:
            box.waiter = env.event()
            yield box.waiter
        arrival, payload, handoff = box.q.popleft()
        if arrival is None:   # rendezvous: the transfer starts now that both sides are ready
            src, step, mb = handoff
            arrival, handoff = self._transmit(src, j, step, mb), self.handoff
        # usable a hand-off after it has arrived and block j asks for it
        ready = (arrival if arrival > env.now else env.now) + handoff
        if ready > env.now:
            yield env.timeout(ready - env.now)
        if env.now > t:
            self.idle[j][cause] += env.now - t
        return payload

    # ------------------------------------------------------ replay buffers
    def make_buffers(self, capacity: int, max_reuse: int | None) -> None:
        for j in range(1, self.K):
            self.bufs[j] = _Buf(capacity, max_reuse)

    def put(self, j: int, step: int) -> None:
        """Block j writes its output of ``step`` into buffer j (held by block j+1)."""
        arrival = self._transmit(j, j + 1, step, 0)
        b = self.bufs[j]
        b.pending.append((arrival, step))
        if b.waiter is not None:
            w, b.waiter = b.waiter, None
            w.succeed()

    def take(self, j: int) -> Generator[simpy.Event, Any, Any]:
        """Block j reads buffer j-1 (DGL Alg. 2 line 7); waits while it serves nothing."""
        env = self.env
        t = env.now
        b = self.bufs[j - 1]
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
            if pending:
                yield env.timeout(pending[0][0] - now)
            else:
                b.waiter = env.event()
                yield b.waiter
        if env.now > t:
            self.idle[j]["buffer"] += env.now - t
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


ALGORITHMS = ("bp", "gpipe", "1f1b", "dgl", "dgl-async", "greedy", "blockprop",
              "blockprop-cached", "bwbpf")
PROTOCOLS = ("auto", "eager", "rendezvous")


def _positive_int(name: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def simulate(algo: str, blocks: int = 4, steps: int = 100,
             costs: "Costs | str | Mapping[str, Any] | None" = None, *,
             microbatches: int = 1, buffer: int = 50,
             slowdown: Mapping[int, float] | None = None, nh: int = 1,
             cache_every: int = 1, epochs_steps: int | None = None,
             placement: Any = None, seed: int = 0,
             max_reuse: int | None = None, protocol: str = "auto") -> "SimResult":
    """Simulate the device timeline of one training regime.

    Parameters
    ----------
    algo : str
        One of ``bp gpipe 1f1b dgl dgl-async greedy blockprop blockprop-cached
        bwbpf`` (``dgl-sync`` is an alias of ``dgl``).
    blocks : int
        K, the number of blocks (>= 1; >= 2 for the BlockProp variants).
    steps : int
        N, minibatch steps (for ``dgl-async``: updates per block; for
        ``greedy``: steps per block, the stages run one after the other).
    costs : Costs, str or dict
        Per-block costs (:class:`bpsim.sim.Costs`); a string is parsed
        like ``--cost``. Default: fwd=1, bwd=2, everything else 0.
    microbatches : int
        m, micro-batches per step for ``gpipe`` and ``1f1b`` (costs are per
        micro-batch).
    buffer : int
        M, replay buffer size for ``dgl-async``.
    slowdown : dict
        ``{J: S}`` multiplies block J's compute costs by S (1-based J).
    nh : int
        BlockProp h-step iterations per gluing variable (N_h, Alg. 1).
    cache_every : int
        E of ``blockprop-cached``: the h-step runs in epochs 0, E, 2E, ...
    epochs_steps : int or None
        Steps per epoch for ``blockprop-cached`` (default: all steps).
    placement : None, int, str or list of int
        Device of each block (see :func:`parse_placement`).
    seed : int
        Seed of the cost draws (only used when ``costs.spread > 0`` or
        ``costs.jitter`` is set).
    max_reuse : int or None
        Reuse cap of the ``dgl-async`` buffers.
    protocol : str
        How messages between devices move. ``"eager"``: a message leaves
        when it is sent and waits at the receiver (bpsim's runtime receives
        on a background thread, posted early). ``"rendezvous"``: it leaves
        only once its receiver asks for it, so a receiver that comes to a
        message late still waits the latency (and transfer); this is how
        torch's pipelining schedules behind the runtime's ``gpipe`` and
        ``1f1b`` move data, posting each receive right before the op that
        needs it. ``"auto"`` (default): rendezvous for ``gpipe`` and
        ``1f1b``, eager for the others.

    Returns
    -------
    SimResult
    """
    from bpsim.sim import schedules
    from bpsim.sim.results import SimResult

    name = ALIASES.get(str(algo).lower(), str(algo).lower())
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGORITHMS)} "
                         "(or dgl-sync)")
    _positive_int("blocks", blocks)
    _positive_int("steps", steps)
    _positive_int("microbatches", microbatches)
    _positive_int("buffer", buffer)
    _positive_int("nh", nh, lo=0)
    _positive_int("cache_every", cache_every)
    if epochs_steps is not None:
        _positive_int("epochs_steps", epochs_steps)
    if max_reuse is not None:
        _positive_int("max_reuse", max_reuse)
    if name.startswith("blockprop") and blocks < 2:
        raise ValueError(f"{name} needs at least 2 blocks (gluing variables h_2..h_K), "
                         f"got blocks={blocks}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    proto = protocol if protocol != "auto" else (
        "rendezvous" if name in ("gpipe", "1f1b") else "eager")
    cost = Costs.coerce(costs)
    slow = {int(k): float(v) for k, v in (slowdown or {}).items()}
    table = cost.table(blocks, slow)
    place = parse_placement(placement, blocks)
    eng = Engine(blocks, table, place, seed=seed, rendezvous=proto == "rendezvous")
    params = dict(microbatches=microbatches, buffer=buffer, nh=nh, cache_every=cache_every,
                  epochs_steps=epochs_steps or steps, max_reuse=max_reuse)
    schedules.SCHEDULES[name](eng, steps, **params)
    eng.env.run()
    meta = {"source": "bpsim.sim", "algo": name, "blocks": blocks, "steps": steps,
            "costs": cost.to_dict(), "slowdown": {str(k): v for k, v in slow.items()},
            "placement": place, "seed": seed, "protocol": proto, **params}
    return SimResult.from_engine(eng, name, steps, meta)
