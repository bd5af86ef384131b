"""Messages between blocks: the requests a schedule yields and two transports.

A runtime schedule (:mod:`bpsim.runtime.schedules`) is a generator that
yields requests and gets answers back::

    h = yield Recv(src=1, step=t)          # block 1's output of step t
    yield Send(dst=3, tensor=out, step=t)  # hand my output to block 3
    s, b, h = yield Take(src=1)            # dgl-async: read the replay buffer

Addresses are **block numbers** (1-based). Two transports answer them:

* :class:`DistComm` -- one block per process, over ``torch.distributed``
  point-to-point (gloo on CPU, NCCL on CUDA). Every incoming link has a
  *receiver thread* that always has the next receive posted, so it stamps
  the moment a message arrives; the compute thread picks messages up from a
  queue (or, for ``dgl-async``, a :class:`bpsim.replay.ReplayBuffer` the
  thread fills). Every outgoing link has a *sender thread*: the compute
  thread queues a tensor and goes on computing while the thread transfers
  it. Every wait has a timeout, so a dead peer ends the run instead of
  hanging it (:class:`PeerError`).
* :class:`LocalComm` -- all blocks in one process (``--workers 1``):
  in-memory mailboxes; a request that cannot be answered yet returns
  :data:`BLOCKED` and the cooperative executor runs another block.

Each directed link ``src -> dst`` carries one kind of message (activations
forward; gradients or BlockProp targets backward) in a fixed order that
both ends know in advance (the batch plan), so the receiver allocates each
buffer with the right shape and both ends agree on the message id
(:func:`msg_id`) that ties a ``send`` span to its ``recv`` span.

A link that feeds a replay buffer (``dgl-async``) is the exception: a
middle block sends outputs computed from whichever entry it read, so the
mini-batch behind a message (its *origin*) and hence its number of rows
are known only to the sender. Such a message carries its origin: a
two-integer header ``(origin, rows)`` travels ahead of the tensor, the
receiver allocates the tensor from it, and the buffer entry keeps the
origin, so the consumer trains on the labels of the batch its input came
from (as the in-process trainer, whose entries hold ``(h, y)``).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

from bpsim.replay import ReplayBuffer

__all__ = ["Send", "Recv", "Take", "BLOCKED", "PeerError", "msg_id", "Inbound", "HEADER",
           "Cursor", "DistComm", "LocalComm"]


class Send(NamedTuple):
    """Send ``tensor`` (step ``step``, micro-batch ``mb``) to block ``dst``.

    ``origin`` (links into a replay buffer only) is the index of the
    mini-batch of the run that the tensor was computed from; it travels
    with the tensor.
    """

    dst: int
    tensor: torch.Tensor
    step: int
    mb: int = 0
    origin: int | None = None


class Recv(NamedTuple):
    """Receive the message of step ``step`` (micro-batch ``mb``) from block ``src``."""

    src: int
    step: int
    mb: int = 0


class Take(NamedTuple):
    """Read the least-reused entry ``(producer step, origin, tensor)`` of the
    replay buffer that block ``src`` fills (``dgl-async``); ``origin`` is the
    mini-batch the tensor was computed from."""

    src: int


BLOCKED = object()
"""What :class:`LocalComm` answers when a request cannot be served yet."""


class PeerError(RuntimeError):
    """Another rank failed, or a message did not arrive within the timeout.

    The launcher treats it as a *consequence* of a failure elsewhere and
    names the rank whose own error came first.
    """


def msg_id(src: int, dst: int, seq: int, blocks: int) -> int:
    """Run-wide id of message number ``seq`` on link ``src -> dst`` (blocks, 1-based).

    Links join neighbours only, so ``(seq, src, direction)`` is unique.
    """
    return (seq * (blocks + 1) + src) * 2 + (1 if dst > src else 0)


@dataclass(frozen=True)
class Inbound:
    """The messages a block expects on one incoming link, in order:
    ``(step, microbatch, shape)`` per message. ``buffered`` links feed a
    replay buffer (``dgl-async``) instead of a queue; their messages carry
    their origin and row count in a header, so only ``shape[1:]`` is used."""

    src: int
    items: Sequence[tuple[int, int, tuple[int, ...]]]
    buffered: bool = False

    def patience(self, seq: int) -> int:
        """How many of the sender's steps the wait for message ``seq`` may
        span: the steps since the link's previous message (one for a
        message every step; more where the plan leaves steps out, e.g. a
        ``greedy`` block idle until its stage)."""
        prev = self.items[seq - 1][0] if seq > 0 else -1
        return max(1, self.items[seq][0] - prev)


HEADER = 2
"""Integers in the header of a message into a replay buffer: ``(origin, rows)``."""


Row = tuple


class Cursor:
    """Where a compute thread's timeline stands: the end of its last span.

    Compute spans start at the cursor, so the bookkeeping between two ops
    (indexing a batch, handing a message to a link) counts towards the next
    op and a busy rank's timeline has no holes; see :mod:`bpsim.runtime.schedules`.
    """

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t: float | None = None

    def wait(self, rows: list | None, rank: int, block: int, step: int, mb: int,
             t1: float, t_start: float) -> None:
        """Record a ``wait`` span on the compute lane from the end of the last
        span (``t_start`` if there was none) to ``t1``, and move to ``t1``."""
        t0 = min(self.t if self.t is not None else t_start, t1)
        if rows is not None and t1 > t0:
            rows.append((rank, "compute", "wait", block, step, mb, t0, t1, None))
        self.t = t1


class DistComm:
    """Point-to-point links of one rank that holds block ``block``.

    Parameters
    ----------
    block : int
        This rank's block (1-based); block ``b`` lives on rank ``b - 1``.
    blocks : int
        K.
    now : callable
        The shared clock (:class:`bpsim.runtime.clock.SharedClock`).
    rows : list or None
        Where spans are appended (None: do not record).
    groups : dict
        ``{(src_block, dst_block): process group}``, one group per directed
        link, so each link is used by one thread on each side.
    inbound : list of Inbound
        The links this block receives on.
    device : torch.device
        Where the block computes.
    wire : torch.device
        Where tensors travel: the compute device for NCCL, CPU for gloo.
    timeout : float
        Seconds the compute thread waits for a message (or for room in a
        send queue) before raising :class:`PeerError`, per step of the
        sender that the wait spans (:meth:`Inbound.patience`): a block idle
        until its turn (``greedy``) waits through the earlier stages, one
        ``timeout`` per step. The link groups' own timeout must cover the
        longest such wait (:func:`bpsim.runtime.worker.run_rank` gives them
        ``timeout`` per step of the run).
    buffer, max_reuse : int, int or None
        Replay buffer size and reuse cap of buffered links.
    max_pending : int
        Messages queued on one outgoing link before a send waits.
    cursor : Cursor
        The compute thread's cursor (wait spans start there).

    Sending: each outgoing link has a *sender thread*; ``send`` only queues
    the tensor, and the thread posts the ``isend`` and waits for it, so the
    compute thread never pays for a transfer. The ``send`` span runs from
    the moment the tensor was queued to the moment the transfer completed.
    """

    def __init__(self, block: int, blocks: int, now: Callable[[], float], rows: list | None,
                 groups: dict[tuple[int, int], Any], inbound: Sequence[Inbound],
                 device: torch.device, wire: torch.device, timeout: float,
                 buffer: int = 50, max_reuse: int | None = None, max_pending: int = 8,
                 cursor: Cursor | None = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.block, self.K, self.rank = block, blocks, block - 1
        self.now, self.rows = now, rows
        self.cursor = cursor if cursor is not None else Cursor()
        self.groups, self.device, self.wire = groups, device, wire
        self.timeout, self.max_pending = timeout, max_pending
        self._queues: dict[int, queue.Queue] = {}
        self.buffers: dict[int, ReplayBuffer] = {}
        self._buf_cv = threading.Condition()
        self._buf_done: dict[int, bool] = {}
        self._errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._senders: dict[int, tuple[queue.Queue, threading.Thread]] = {}
        self._last_arrival = now()
        self._inbound = {ib.src: ib for ib in inbound}
        self._asked: dict[int, int] = {ib.src: 0 for ib in inbound}   # receives asked per link
        #: each buffer read: consumer block -> [consumer step, producer step, reuse]
        self.reads: dict[int, list[list[int]]] = {}
        #: reads that found nothing readable and waited, per consumer block
        self.misses: dict[int, int] = {}
        for ib in inbound:
            if ib.buffered:
                self.buffers[ib.src] = ReplayBuffer(buffer, max_reuse)
                self._buf_done[ib.src] = False
            else:
                self._queues[ib.src] = queue.Queue()
            th = threading.Thread(target=self._receiver, args=(ib,), daemon=True,
                                  name=f"bpsim-recv-{ib.src}->{block}")
            self._threads.append(th)
        for (src, dst) in groups:
            if src == block:
                q: queue.Queue = queue.Queue(maxsize=max_pending)
                th = threading.Thread(target=self._sender, args=(dst, q), daemon=True,
                                      name=f"bpsim-send-{block}->{dst}")
                self._senders[dst] = (q, th)
        for th in self._threads + [t for _, t in self._senders.values()]:
            th.start()

    def _fail(self, text: str, e: BaseException) -> PeerError:
        """Record a link thread's failure and wake the compute thread."""
        err = PeerError(f"{text}: {' '.join(str(e).split())[:300]}")
        self._errors.append(err)
        for q in self._queues.values():
            q.put(err)
        with self._buf_cv:
            self._buf_cv.notify_all()
        return err

    # ---------------------------------------------------------- receiving
    def _receiver(self, ib: Inbound) -> None:
        """Receive every message of one link in order, stamping arrivals
        (on CUDA the link's own stream is synchronised, so the stamp is the
        moment the data is there, and no other stream waits for it)."""
        dist, now, rows = self._dist, self.now, self.rows
        group = self.groups[(ib.src, self.block)]
        src_rank = ib.src - 1
        stream = torch.cuda.Stream(device=self.wire) if self.wire.type == "cuda" else None

        def receive(buf: torch.Tensor) -> None:
            dist.irecv(buf, src=src_rank, group=group).wait()
            if stream is not None:
                stream.synchronize()

        try:
            for seq, (step, mb, shape) in enumerate(ib.items):
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    t0 = now()
                    if ib.buffered:
                        head = torch.empty(HEADER, dtype=torch.int64, device=self.wire)
                        receive(head)
                        origin, n = (int(v) for v in head.tolist())
                        shape = (n, *shape[1:])
                    buf = torch.empty(shape, device=self.wire)
                    receive(buf)
                t1 = now()
                self._last_arrival = t1
                if rows is not None:
                    rows.append((self.rank, "comm", "recv", self.block, step, mb, t0, t1,
                                 msg_id(ib.src, self.block, seq, self.K)))
                if ib.buffered:
                    self.buffers[ib.src].put((step, origin, buf, [0]), step=step)
                    with self._buf_cv:
                        self._buf_cv.notify_all()
                else:
                    self._queues[ib.src].put((step, mb, buf))
        except BaseException as e:  # noqa: BLE001 - handed to the compute thread
            self._fail(f"lost the link from rank {src_rank} (block {ib.src})", e)
        finally:
            if ib.buffered:
                with self._buf_cv:
                    self._buf_done[ib.src] = True
                    self._buf_cv.notify_all()

    def _arrived(self, buf: torch.Tensor) -> torch.Tensor:
        if buf.device != self.device:
            return buf.to(self.device, non_blocking=False)
        if buf.device.type == "cuda":
            buf.record_stream(torch.cuda.current_stream(buf.device))
        return buf

    def _wait_span(self, t_ask: float, step: int, mb: int) -> None:
        """Record that the compute thread waited until now."""
        self.cursor.wait(self.rows, self.rank, self.block, step, mb, self.now(), t_ask)

    def recv(self, src: int, step: int, mb: int = 0) -> torch.Tensor:
        """The next message from block ``src``; it must be the one of (step, mb).

        Waits at most ``timeout`` seconds per step of the sender the wait
        spans (:meth:`Inbound.patience`)."""
        q = self._queues.get(src)
        if q is None:
            raise RuntimeError(f"block {self.block} has no incoming link from block {src}")
        seq = self._asked[src]
        self._asked[src] = seq + 1
        ib = self._inbound[src]
        limit = self.timeout * (ib.patience(seq) if seq < len(ib.items) else 1)
        t0 = self.now()
        waited = q.empty()
        try:
            item = q.get(timeout=limit)
        except queue.Empty:
            raise PeerError(f"no message from rank {src - 1} (block {src}) for step {step} within "
                            f"{limit:g} s; that rank is stuck or gone (raise --timeout if "
                            "its steps are really that slow)") from None
        if isinstance(item, BaseException):
            raise item
        got_step, got_mb, buf = item
        if (got_step, got_mb) != (step, mb):
            raise RuntimeError(f"block {self.block} expected the message of step {step} "
                               f"micro-batch {mb} from block {src}, got step {got_step} "
                               f"micro-batch {got_mb}: the two ranks disagree on the batch plan")
        if waited:
            self._wait_span(t0, step, mb)
        return self._arrived(buf)

    def take(self, src: int, step: int) -> tuple[int, int, torch.Tensor] | None:
        """The least-reused buffer entry ``(producer step, origin, tensor)``
        from block ``src`` (``dgl-async``).

        Waits only while no entry is eligible; returns None when the link is
        finished and nothing eligible is left (the block is starved).
        """
        buf = self.buffers.get(src)
        if buf is None:
            raise RuntimeError(f"block {self.block} has no replay buffer fed by block {src}")
        got = buf.get()
        if got is not None:
            return self._read(step, got)
        self.misses[self.block] = self.misses.get(self.block, 0) + 1
        t0 = self.now()
        deadline = t0 + self.timeout
        with self._buf_cv:
            while True:
                got = buf.get()
                if got is not None:
                    break
                if self._errors:
                    raise self._errors[0]
                if self._buf_done[src]:
                    return None
                left = deadline - self.now()
                if left <= 0:
                    raise PeerError(f"replay buffer of block {self.block} stayed empty for "
                                    f"{self.timeout:g} s; rank {src - 1} (block {src}) is stuck "
                                    "or gone")
                self._buf_cv.wait(timeout=min(left, 1.0))
        self._wait_span(t0, step, 0)
        return self._read(step, got)

    def _read(self, step: int, got: tuple[int, int, torch.Tensor, list[int]]
              ) -> tuple[int, int, torch.Tensor]:
        produced, origin, tensor, reuse = got
        reuse[0] += 1
        self.reads.setdefault(self.block, []).append([step, produced, reuse[0]])
        return produced, origin, self._arrived(tensor)

    # ------------------------------------------------------------ sending
    def _sender(self, dst: int, q: queue.Queue) -> None:
        """Post and complete the sends of one link, in order."""
        dist, now, rows = self._dist, self.now, self.rows
        group = self.groups[(self.block, dst)]
        stream = torch.cuda.Stream(device=self.wire) if self.wire.type == "cuda" else None
        seq = 0
        while True:
            item = q.get()
            if item is None:
                return
            data, head, step, mb, t0, ready = item
            try:
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    if stream is not None:
                        stream.wait_event(ready)
                        for tensor in (data, head):
                            if tensor is not None:
                                tensor.record_stream(stream)
                    if head is not None:
                        dist.isend(head, dst=dst - 1, group=group).wait()
                    dist.isend(data, dst=dst - 1, group=group).wait()
                    if stream is not None:
                        stream.synchronize()
            except BaseException as e:  # noqa: BLE001 - handed to the compute thread
                self._fail(f"sending to rank {dst - 1} (block {dst}) failed", e)
                return
            if rows is not None:
                rows.append((self.rank, "comm", "send", self.block, step, mb, t0, now(),
                             msg_id(self.block, dst, seq, self.K)))
            seq += 1

    def send(self, dst: int, tensor: torch.Tensor, step: int, mb: int = 0,
             origin: int | None = None) -> None:
        """Queue ``tensor`` for block ``dst`` and return at once (unless the
        link already has ``max_pending`` messages queued). With ``origin``
        (a link into a replay buffer) the header ``(origin, rows)`` goes
        ahead of the tensor."""
        if self._errors:
            raise self._errors[0]
        link = self._senders.get(dst)
        if link is None:
            raise RuntimeError(f"block {self.block} has no link to block {dst}")
        q = link[0]
        t0 = self.now()
        data = tensor.detach()
        if data.device != self.wire:
            data = data.to(self.wire)
        data = data.contiguous()
        head = None
        if origin is not None:
            head = torch.tensor([origin, len(data)], dtype=torch.int64).to(self.wire)
        ready = None
        if data.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        full = q.full()
        try:
            q.put((data, head, step, mb, t0, ready), timeout=self.timeout)
        except queue.Full:
            raise PeerError(f"rank {dst - 1} (block {dst}) took no message for {self.timeout:g} s; "
                            "it is stuck or gone") from None
        if full:
            self._wait_span(t0, step, mb)

    def flush(self) -> None:
        """Wait until every queued send has completed and every expected
        message has arrived (as long as messages keep coming)."""
        for q, _ in self._senders.values():
            q.put(None)
        for th in [t for _, t in self._senders.values()] + self._threads:
            # A slow producer may still be sending (dgl-async): wait as long
            # as messages keep coming, and at most `timeout` s after the last.
            t_start = self.now()
            while th.is_alive():
                th.join(timeout=0.5)
                if self._errors:
                    raise self._errors[0]
                quiet = self.now() - max(self._last_arrival, t_start)
                if quiet > self.timeout:
                    raise PeerError(f"{th.name}: nothing moved for {self.timeout:g} s while the "
                                    "run was ending; the peer rank is stuck or gone")
        if self._errors:
            raise self._errors[0]

    def buffer_stats(self) -> dict[int, dict[str, Any]]:
        return {src: b.stats() for src, b in self.buffers.items()}


class LocalComm:
    """Mailboxes between blocks that run in one process (``--workers 1``).

    Sends never block; a receive or take that finds nothing answers
    :data:`BLOCKED` so that the cooperative executor can run another block.
    Blocks in one process exchange data in memory: no comm spans, as in the
    simulator when two blocks share a device.
    """

    def __init__(self, buffered: Sequence[int] = (), buffer: int = 50,
                 max_reuse: int | None = None) -> None:
        self._boxes: dict[tuple[int, int], deque] = {}
        self.buffers = {src: ReplayBuffer(buffer, max_reuse) for src in buffered}
        self.done: set[int] = set()
        self.reads: dict[int, list[list[int]]] = {}    # as DistComm.reads
        self.misses: dict[int, int] = {}
        self._waiting: set[int] = set()

    def send(self, src: int, dst: int, tensor: torch.Tensor, step: int, mb: int = 0,
             origin: int | None = None) -> None:
        """Post ``tensor`` from block ``src`` to block ``dst``; into ``src``'s
        replay buffer (with its ``origin``) when it has one."""
        data = tensor.detach()
        if src in self.buffers and dst == src + 1:
            if origin is None:
                raise ValueError(f"a message into the replay buffer of block {src} needs the "
                                 "mini-batch it came from (origin)")
            self.buffers[src].put((step, origin, data, [0]), step=step)
        else:
            self._boxes.setdefault((src, dst), deque()).append((step, mb, data))

    def recv(self, src: int, dst: int, step: int, mb: int = 0) -> Any:
        box = self._boxes.get((src, dst))
        if not box:
            return BLOCKED
        got_step, got_mb, data = box.popleft()
        if (got_step, got_mb) != (step, mb):
            raise RuntimeError(f"block {dst} expected step {step} micro-batch {mb} from block "
                               f"{src}, got step {got_step} micro-batch {got_mb}")
        return data

    def take(self, src: int, block: int, step: int) -> Any:
        """Block ``block``'s read at its step ``step`` of the buffer ``src``
        fills: ``(producer step, origin, tensor)``, :data:`BLOCKED`, or None
        (``src`` has finished and nothing readable is left)."""
        got = self.buffers[src].get()
        if got is None:
            if block not in self._waiting:     # one miss per read, however often retried
                self._waiting.add(block)
                self.misses[block] = self.misses.get(block, 0) + 1
            return None if src in self.done else BLOCKED
        self._waiting.discard(block)
        produced, origin, data, reuse = got
        reuse[0] += 1
        self.reads.setdefault(block, []).append([step, produced, reuse[0]])
        return produced, origin, data

    def buffer_stats(self) -> dict[int, dict[str, Any]]:
        return {src: b.stats() for src, b in self.buffers.items()}
