"""Training schedules as SimPy processes, one process per block.

Each schedule is a function ``schedule(engine, steps, **params)`` that starts
one process per block on ``engine.env``. The ASCII diagram in each docstring
is the specification: rows are blocks (one device each), columns are time,
letters are ops -- ``F`` fwd, ``B`` bwd, ``A`` aux, ``U`` update, ``H``
h-step, ``L`` loss, ``.`` idle -- drawn for K = 3, one step, fwd = 1,
bwd = 2 time units, aux = update = 1, no latency.
"""

from __future__ import annotations

from typing import Any, Callable, Generator

from bpsim.sim.engine import Engine

__all__ = ["bp", "gpipe", "one_f_one_b", "dgl", "dgl_async", "greedy",
           "blockprop", "blockprop_cached", "bwbpf", "compute_spans"]

_AUX_BWD_UPD = ("aux", "bwd", "update")
_WSTEP = ("fwd", "bwd", "update")


def _start(eng: Engine, proc: Callable[..., Generator], *args: Any) -> None:
    for j in range(1, eng.K + 1):
        eng.env.process(proc(eng, j, *args))


# --------------------------------------------------------------------- bp
def bp(eng: Engine, steps: int, **_: Any) -> None:
    """Backprop, fully locked: forward 1 -> K, backward K -> 1, then update.

    Every block waits for its input going forward and for its gradient going
    back; a block updates right after its own backward, so one update lies
    on the critical path. Blocks 2..K also compute the gradient with respect
    to their input (cost ``bwd_in``, 0 unless set; drawn as B). Per step:
    ``K (F + B) + (K - 1) B_in + 2 (K - 1) c + U``::

        block 1 |F......BBU
        block 2 |.F...BBU..
        block 3 |..FBBU....
                 0123456789
    """
    _start(eng, _bp_block, steps)


def _forward(e: Engine, j: int, t: int) -> Generator:
    """Block j's forward of step t: wait for its input (j > 1), run, send the output on."""
    if j > 1:
        yield from e.recv(j, "act", "input", t)
    yield from e.run(j, ("fwd",), t)
    if j < e.K:
        e.send(j, j + 1, "act", t)


def _bp_block(e: Engine, j: int, steps: int) -> Generator:
    K = e.K
    for t in range(steps):
        yield from _forward(e, j, t)
        if j < K:
            yield from e.recv(j, "grad", "gradient", t)
        if j > 1:
            yield from e.run(j, ("bwd+in",), t)
            e.send(j, j - 1, "grad", t)
            yield from e.run(j, ("update",), t)
        else:
            yield from e.run(j, ("bwd", "update"), t)
        e.updates[j] += 1


# ------------------------------------------------------------------ gpipe
def gpipe(eng: Engine, steps: int, microbatches: int = 1, **_: Any) -> None:
    """GPipe: m micro-batches pipelined forward, then backward, then flush.

    Block k runs the forward of micro-batch i at clock ``i + k``, all
    forwards before any backward, the backwards in micro-batch order 0..m-1
    (the order of ``torch.distributed.pipelining.ScheduleGPipe``, which the
    runtime drives, so measured and simulated ops match one to one), one
    update per step after the last backward. Blocks 2..K add ``bwd_in`` to
    each backward, as in :func:`bp`. With c = 0, ``bwd_in`` = 0 and
    per-micro-batch costs a step takes ``(m + K - 1)(F + B) + U`` (in either
    backward order). Messages move by rendezvous unless ``simulate`` is
    told otherwise (``protocol``): a block asks for micro-batch i's input
    when it is done with i - 1, as torch's schedule posts its receives, and
    the transfer starts then; for K = 2 and latency c a step takes
    ``(m + 1)(F + B) + 2 m c + U``. For m = 2 (digits are micro-batches)::

        block 1 |01......0011U
        block 2 |.01...0011U..
        block 3 |..010011U....
                 forward  backward (2 units per micro-batch), U
    """
    _start(eng, _gpipe_block, steps, microbatches)


def _micro_op(e: Engine, j: int, kind: str, t: int, i: int) -> Generator:
    """One pipeline op of block j on micro-batch i of step t: ``"f"`` (receive
    the activation, forward, send it on) or ``"b"`` (receive the gradient,
    backward, with the input gradient on blocks 2..K, send it back)."""
    K = e.K
    if kind == "f":
        if j > 1:
            yield from e.recv(j, "act", "input", t, i)
        yield from e.run(j, ("fwd",), t, i)
        if j < K:
            e.send(j, j + 1, "act", t, i)
    else:
        if j < K:
            yield from e.recv(j, "grad", "gradient", t, i)
        yield from e.run(j, ("bwd+in",) if j > 1 else ("bwd",), t, i)
        if j > 1:
            e.send(j, j - 1, "grad", t, i)


def _pipeline_block(e: Engine, j: int, steps: int, order: list[tuple[str, int]]) -> Generator:
    for t in range(steps):
        for kind, i in order:
            yield from _micro_op(e, j, kind, t, i)
        yield from e.flush(j, t)     # the schedule's last sends are taken first
        yield from e.run(j, ("update",), t)
        e.updates[j] += 1


def _gpipe_block(e: Engine, j: int, steps: int, m: int) -> Generator:
    order = [("f", i) for i in range(m)] + [("b", i) for i in range(m)]
    yield from _pipeline_block(e, j, steps, order)


def one_f_one_b(eng: Engine, steps: int, microbatches: int = 1, **_: Any) -> None:
    """1F1B (PipeDream-flush): GPipe's bubble, a forward and a backward alternating.

    The op order of ``torch.distributed.pipelining.Schedule1F1B``, which the
    runtime's ``1f1b`` drives: block j first runs ``W = min(m, K - j + 1)``
    warm-up forwards, then alternates one backward and one forward (backward
    first) until its forwards are done, then the remaining backwards, and
    one update per step. A block holds at most W micro-batches' activations
    instead of GPipe's m, and with c = 0, ``bwd_in`` = 0 and per-micro-batch
    costs a step still takes ``(m + K - 1)(F + B) + U``: the bubble is the
    same. For m = 3 (digits are micro-batches; the last block alternates
    from the start)::

        block 1 |012....00.11.22U
        block 2 |.01..00211.22U..
        block 3 |..000111222U....
                 forward 1 unit, backward 2 units per micro-batch, U
    """
    _start(eng, _1f1b_block, steps, microbatches)


def _1f1b_order(j: int, K: int, m: int) -> list[tuple[str, int]]:
    """Block j's ops of one step: ("f", i) and ("b", i) in Schedule1F1B's order."""
    warm = min(m, K - j + 1)
    order = [("f", i) for i in range(warm)]
    f = warm
    for b in range(m):
        order.append(("b", b))
        if f < m:
            order.append(("f", f))
            f += 1
    return order


def _1f1b_block(e: Engine, j: int, steps: int, m: int) -> Generator:
    yield from _pipeline_block(e, j, steps, _1f1b_order(j, e.K, m))


# -------------------------------------------------------------------- dgl
def dgl(eng: Engine, steps: int, **_: Any) -> None:
    """Synchronous DGL (DGL Alg. 1; parallel form Alg. 3): update unlocking.

    A block sends its output on as soon as its forward is done, then trains
    on its own auxiliary loss (aux, local backward, update) while the next
    block already computes. Blocks pipeline with period ``F + A + B + U``;
    the last block starts after ``(K - 1)(F + c)``, so the makespan is
    ``(K - 1)(F + c) + N (F + A + B + U)``. Two steps::

        block 1 |FABBUFABBU..
        block 2 |.FABBUFABBU.
        block 3 |..FABBUFABBU
    """
    _start(eng, _dgl_block, steps, False)


def _dgl_block(e: Engine, j: int, steps: int, bwbpf_head: bool) -> Generator:
    K = e.K
    tail = ("aux", "loss", "bwd", "update") if (bwbpf_head and j == K) else _AUX_BWD_UPD
    for t in range(steps):
        yield from _forward(e, j, t)
        yield from e.run(j, tail, t)
        e.updates[j] += 1


def bwbpf(eng: Engine, steps: int, **_: Any) -> None:
    """BWBPF: block-wise training with a dense head and local loss per block.

    As DGL: detached inputs, each block sends right after its forward and
    then trains on its local head (``A``). In addition the last block feeds
    its detached output to the network's output layer, which alone learns
    from the global loss (``L``, costed like a head). Two steps::

        block 1 |FABBUFABBU....
        block 2 |.FABBUFABBU...
        block 3 |..FALBBUFALBBU
    """
    _start(eng, _dgl_block, steps, True)


# -------------------------------------------------------------- dgl-async
def dgl_async(eng: Engine, steps: int, buffer: int = 50, max_reuse: int | None = None,
              **_: Any) -> None:
    """Asynchronous DGL with replay (DGL Alg. 2; parallel form Alg. 4).

    Blocks run free: block 1 reads the data stream, block j > 1 reads buffer
    j - 1 (least-reused entry, newest first; :class:`bpsim.replay.ReplayBuffer`)
    and writes its output to buffer j after the forward. A block waits only
    while its input buffer is empty (or used up under ``max_reuse``). Every
    block performs ``steps`` updates. With block 2 twice as slow (``S = 2``),
    block 3 reads each entry of buffer 2 about twice (``r`` = reuse)::

        block 1 |FABBUFABBU
        block 2 |.FFAABBBBUUFFAABBBBUU
        block 3 |...FABBUFABBU
                    r=1  r=2   (reads of block 2's first output)
    """
    eng.make_buffers(buffer, max_reuse)
    _start(eng, _async_block, steps)


def _async_block(e: Engine, j: int, steps: int) -> Generator:
    K = e.K
    for t in range(steps):
        if j > 1:
            yield from e.take(j, t)
        yield from e.run(j, ("fwd",), t)
        if j < K:
            e.put(j, t)
        yield from e.run(j, _AUX_BWD_UPD, t)
        e.updates[j] += 1


# ----------------------------------------------------------------- greedy
def greedy(eng: Engine, steps: int, **_: Any) -> None:
    """Sequential greedy training: block j is trained to the end (N steps)
    before block j + 1 starts (DGL Sec. 2.2, the sequential baseline).

    In stage s only block s trains; blocks 1..s-1 are frozen and just
    forward. Steps are numbered globally, ``(s - 1) N + t``. K = 2, N = 2::

        block 1 |FABBUFABBUFF.........
        block 2 |...........FABBUFABBU
                 stage 1   |stage 2
    """
    _start(eng, _greedy_block, steps)


def _greedy_block(e: Engine, j: int, steps: int) -> Generator:
    K = e.K
    for stage in range(j, K + 1):
        for t in range(steps):
            g = (stage - 1) * steps + t
            if j > 1:
                yield from e.recv(j, "act", "input", g)
            if stage == j:
                yield from e.run(j, ("fwd",) + _AUX_BWD_UPD, g)
                e.updates[j] += 1
            else:
                yield from e.run(j, ("fwd",), g)
                e.send(j, j + 1, "act", g)


# -------------------------------------------------------------- blockprop
def blockprop(eng: Engine, steps: int, nh: int = 1, **_: Any) -> None:
    """BlockProp (Alg. 1): forward init, h-step K -> 2, parallel W-step.

    Lines 5-6: the forward pass initialises ``h_2..h_K`` (block K's forward
    is part of its h-step). Lines 7-16: for k = K down to 2, block k takes
    ``nh`` gradient steps on ``h_k`` (each one forward and backward through
    block k, cost ``hstep`` = F + B by default) and sends ``h*_k`` back to
    block k - 1. Line 20: block k's W-step (fwd, bwd, update on ``J_k``,
    eq. 7) starts as soon as it holds ``h*_k`` and ``h*_{k+1}``. Each extra
    h-step adds ``(K - 1)(F + B)`` per step. nh = 1::

        block 1 |F.......FBBU
        block 2 |.F...HHHFBBU
        block 3 |..HHHFBBU...
    """
    _start(eng, _blockprop_block, steps, nh, None, 1)


def blockprop_cached(eng: Engine, steps: int, nh: int = 1, cache_every: int = 1,
                     steps_per_epoch: int | None = None, **_: Any) -> None:
    """BlockProp with an ``h*`` cache (BlockProp Appendix C, Alg. 2).

    ``h*`` is cached per example; the h-step runs only in epochs 0, E, 2E...
    In epoch 0 the cache is empty and a step is as in :func:`blockprop`. In
    later h-step epochs ``h`` starts from the cache, so every block computes
    its forward on its cached input at once (no forward chain) before the
    h-step chain. In the other epochs every block runs its W-step on cached
    ``h*`` independently: no messages, period ``F + B + U``. An epoch
    without h-step::

        block 1 |FBBUFBBU
        block 2 |FBBUFBBU
        block 3 |FBBUFBBU
    """
    _start(eng, _blockprop_block, steps, nh, steps_per_epoch or steps, cache_every)


def _blockprop_block(e: Engine, j: int, steps: int, nh: int, epoch_steps: int | None,
                     every: int) -> Generator:
    K = e.K
    hops = ("hstep",) * nh
    for t in range(steps):
        epoch = t // epoch_steps if epoch_steps else 0
        if epoch % every:
            yield from e.run(j, _WSTEP, t)          # W-step on cached h*
            e.updates[j] += 1
            continue
        cached = epoch > 0
        # forward: initialise h_{j+1} = b_j(h_j) (chained, or from the cache)
        if j > 1 and not cached:
            yield from e.recv(j, "act", "input", t)
        if j < K:
            yield from e.run(j, ("fwd",), t)
            e.send(j, j + 1, "act", t)
        if j > 1 and cached:
            yield from e.recv(j, "act", "input", t)
        # h-step on h_j needs h*_{j+1} from block j + 1 (k runs K -> 2)
        if j < K:
            yield from e.recv(j, "target", "gradient", t)
        if j > 1:
            if hops:
                yield from e.run(j, hops, t)
            e.send(j, j - 1, "target", t)
        yield from e.run(j, _WSTEP, t)
        e.updates[j] += 1


# ------------------------------------------------------------- span counts
def compute_spans(schedule: str, blocks: int, steps: int, *, microbatches: int = 1,
                  nh: int = 1, cache_every: int = 1, steps_per_epoch: int | None = None,
                  **_: Any) -> int:
    """How many compute spans (ops, not waits) ``schedule`` records, exactly.

    Every op a schedule runs is recorded, whatever its cost, so the count
    follows from the sizes alone, in closed form: the simulator checks it
    against its span limit before it allocates anything. Waits and message
    spans come on top.

    Parameters
    ----------
    schedule : str
        The name of a schedule of this module (e.g. ``"gpipe"``).
    blocks, steps : int
        K and N as :func:`bpsim.sim.simulate` takes them.
    microbatches, nh, cache_every, steps_per_epoch : int
        The sizes the schedule reads (others are ignored).

    Returns
    -------
    int
        The number of compute spans (a Python int: no overflow).
    """
    K, N = blocks, steps
    if schedule == "bp":
        return 3 * K * N                                  # fwd, bwd, update
    if schedule in ("gpipe", "one_f_one_b"):
        return K * N * (2 * microbatches + 1)             # m fwd, m bwd, update
    if schedule in ("dgl", "dgl_async"):
        return 4 * K * N                                  # fwd, aux, bwd, update
    if schedule == "bwbpf":
        return 4 * K * N + N                              # and the output layer's loss
    if schedule == "greedy":
        return N * (4 * K + K * (K - 1) // 2)             # stage j: 4 ops, frozen: fwd
    chain = (K - 1) * (1 + nh)        # per h-step step: forwards and h-steps of blocks 2..K
    if schedule == "blockprop":
        return N * (3 * K + chain)
    if schedule == "blockprop_cached":
        s = steps_per_epoch or N
        cycle = s * cache_every
        hsteps = (N // cycle) * s + min(N % cycle, s)    # steps of epochs 0, E, 2E, ...
        return 3 * K * N + hsteps * chain
    raise ValueError(f"no span count for schedule {schedule!r}")
