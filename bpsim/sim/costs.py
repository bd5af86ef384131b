"""Cost models: how long each op of each block takes in the simulator.

Costs are per block and per minibatch (per micro-batch for ``gpipe``), in
any time unit (seconds when calibrated from a measured run). A message
between devices costs ``comm`` (latency) plus ``bytes / bandwidth``
(transfer). Three ways to build them :

* uniform, from the CLI string ``"fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05"``
  with per-block overrides ``"fwd@2=3"``: :meth:`Costs.parse`;
* from a FLOP model: :meth:`Costs.from_flops` (plain lists of numbers, so the
  simulator never imports torch; the caller counts a BlockNet's FLOPs);
* from a measured trace: :meth:`Costs.from_trace` (median per op and block,
  lognormal spread, latency and bandwidth fitted from send/recv pairs).

Every cost is fixed (``spread=0``, no ``jitter``), drawn per op from a
lognormal whose median is the cost and whose log-standard-deviation is
``spread``, or multiplied per op by a factor drawn from ``jitter``, the
empirical distribution of measured durations over their op's median.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from bpsim.trace import Trace

__all__ = ["Costs", "COMPUTE_OPS", "CostTable", "JITTER_BINS", "MAX_SPREAD", "bin_factors"]

COMPUTE_OPS = ("fwd", "bwd", "aux", "update", "hstep")
# A cost that is not a trace op: ``bwd_in`` is the extra backward work of a
# block whose input gradient is needed too (backprop, gpipe), see Costs.
_COST_OPS = COMPUTE_OPS + ("bwd_in",)
_LINK_KEYS = ("comm", "recv", "bandwidth", "bytes")
_KEYS = _COST_OPS + _LINK_KEYS + ("spread",)
# A table op's draws (CostTable.jitter) come from the factors of this op:
_JITTER_OF = {"bwd+in": "bwd", "loss": "aux"}
JITTER_BINS = 256   # most relative durations Costs.from_trace keeps in ``jitter``
_ALIASES = {"latency": "comm", "bw": "bandwidth", "activation_bytes": "bytes"}
#: the largest lognormal log-standard-deviation ``spread`` (larger draws overflow)
MAX_SPREAD = 10.0


def _number(key: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"cost {key!r} must be a number, got {value!r}") from None
    if math.isnan(x) or x < 0:
        raise ValueError(f"cost {key!r} must be >= 0, got {value!r}")
    if key == "bandwidth" and x == 0:
        raise ValueError("bandwidth must be > 0 (bytes per time unit); leave it out for "
                         "an infinitely fast link")
    if math.isinf(x) and key != "bandwidth":
        raise ValueError(f"cost {key!r} must be finite, got {value!r}")
    if key == "spread" and x > MAX_SPREAD:
        raise ValueError(f"cost 'spread' must be at most {MAX_SPREAD:g} (a log-standard-"
                         f"deviation: {MAX_SPREAD:g} already spreads a cost over factors "
                         f"e^-{3 * MAX_SPREAD:g}..e^{3 * MAX_SPREAD:g}), got {value!r}")
    return x


@dataclass
class Costs:
    """Per-block op costs and link parameters.

    Parameters
    ----------
    fwd, bwd, aux, update : float
        Default cost of a block's forward, backward, auxiliary head
        (forward + backward) and parameter update. ``bwd`` is the backward
        of a block whose input is detached (DGL, BWBPF, a BlockProp W-step,
        and block 1 everywhere): weight gradients, and input gradients of
        every layer but the first.
    bwd_in : float
        What a block's backward costs in addition when the gradient with
        respect to its *input* must be sent back as well (blocks 2..K of
        ``bp`` and ``gpipe``): the input-gradient product of its first
        layer, about that layer's forward FLOPs. Default 0, so uniform CLI
        costs keep the closed forms; :meth:`with_input_grad` sets it from
        FLOP counts.
    hstep : float or None
        One BlockProp h-step iteration on one block; ``None`` means
        ``fwd + bwd`` (a gradient step on ``h_k`` runs block k forward and
        backward, BlockProp Alg. 1 lines 7-16 and Appendix A).
    comm : float
        Latency of one message between two devices.
    recv : float
        Hand-off of a receive (LogP's receive overhead *o*, Culler et al.
        1993): a message between devices is usable ``recv`` after it has
        arrived *and* its receiver asks for it, so a receiver that comes to
        a message late still pays it. Default 0: a message is usable when
        it arrives. A runtime that posts its receives early on a
        background thread (``dgl``, ``bp``) has ~0 here; one that receives
        in the compute thread when the op needs the input (torch's
        pipelining schedules behind ``gpipe`` and ``1f1b``) has more.
    bandwidth : float
        Bytes per time unit; ``inf`` makes transfers instantaneous.
    bytes : float
        Bytes of one activation (or gradient, or ``h*``) message.
    spread : float
        Log-standard-deviation of lognormal draws; 0 for fixed costs.
    jitter : dict of str to list of float
        Measured relative durations, ``{op: [duration / median, ...]}``
        (each duration over the median of its op on its block, pooled over
        blocks). When given, every op's cost is multiplied by one of its
        op's factors drawn uniformly (an op without an entry, e.g.
        ``bwd_in``, draws from all of them together) instead of a lognormal
        factor; ``spread`` is then not used. :meth:`Costs.from_trace` fills
        it. It keeps what a lognormal loses on a shared machine: the long
        right tail of ops another process slowed down, and an op whose
        times have two modes (a micro-batch backward that writes or adds
        to the gradients), and so the mean, which is what a makespan, a sum
        of op times, adds up to.
    per_block : dict
        ``{block: {key: value}}`` overrides, blocks 1-based.
    """

    fwd: float = 1.0
    bwd: float = 2.0
    aux: float = 0.0
    update: float = 0.0
    hstep: float | None = None
    bwd_in: float = 0.0
    comm: float = 0.0
    recv: float = 0.0
    bandwidth: float = math.inf
    bytes: float = 0.0
    spread: float = 0.0
    jitter: dict[str, tuple[float, ...]] = field(default_factory=dict)
    per_block: dict[int, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k in _KEYS:
            v = getattr(self, k)
            if v is not None:
                setattr(self, k, _number(k, v))
        if not isinstance(self.jitter, Mapping):
            raise ValueError(f"jitter must be a dict {{op: [duration / median, ...]}}, "
                             f"got {self.jitter!r}")
        jit: dict[str, tuple[float, ...]] = {}
        for op, vs in self.jitter.items():
            if op not in COMPUTE_OPS:
                raise ValueError(f"jitter of {op!r}: not an op; use one of {COMPUTE_OPS}")
            if isinstance(vs, (str, bytes)) or not hasattr(vs, "__iter__"):
                raise ValueError(f"jitter of {op!r} must be a list of numbers, got {vs!r}")
            jit[op] = tuple(_number(f"jitter of {op}", v) for v in vs)
            if not jit[op] or 0 in jit[op]:
                raise ValueError(f"jitter of {op!r} needs at least one factor, each > 0 "
                                 "(a duration over its median)")
        self.jitter = jit
        clean: dict[int, dict[str, float]] = {}
        for b, over in dict(self.per_block).items():
            if isinstance(b, bool) or int(b) != b or int(b) < 1:
                raise ValueError(f"per-block cost override needs a block number >= 1, got {b!r}")
            clean[int(b)] = {}
            for k, v in over.items():
                k = _ALIASES.get(k, k)
                if k not in _COST_OPS + ("bytes",):
                    raise ValueError(f"per-block override of {k!r} is not supported; "
                                     f"use one of {_COST_OPS + ('bytes',)}")
                clean[int(b)][k] = _number(k, v)
        self.per_block = clean

    # ------------------------------------------------------------- builders
    @classmethod
    def parse(cls, text: str, base: "Costs | None" = None) -> "Costs":
        """Build costs from ``"fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05"``.

        Keys: ``fwd bwd aux update hstep bwd_in comm recv bandwidth bytes
        spread`` (``latency`` and ``bw`` are aliases); ``KEY@J=V`` overrides
        block J. Keys not given keep the value of ``base`` (or the
        defaults). An empty string or a key given twice is refused.
        """
        out = base if base is not None else cls()
        top: dict[str, float] = {}
        per: dict[int, dict[str, float]] = {b: dict(v) for b, v in out.per_block.items()}
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        if not parts:
            raise ValueError("--cost is empty; give KEY=VALUE pairs, e.g. "
                             "fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05")
        seen: set[str] = set()
        for part in parts:
            if "=" not in part:
                raise ValueError(f"cost item {part!r} has no '='; write e.g. "
                                 "fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05")
            key, value = (s.strip() for s in part.split("=", 1))
            block = None
            if "@" in key:
                key, b = key.split("@", 1)
                try:
                    block = int(b)
                except ValueError:
                    raise ValueError(f"in {part!r}: block after '@' must be an integer, "
                                     f"e.g. fwd@2=3") from None
            key = _ALIASES.get(key, key)
            name = key if block is None else f"{key}@{block}"
            if name in seen:
                raise ValueError(f"cost {name!r} is given twice in {str(text)!r}; give each "
                                 "key once")
            seen.add(name)
            if key not in _KEYS:
                raise ValueError(f"unknown cost key {key!r} in {part!r}; use one of "
                                 f"{', '.join(_KEYS)} (optionally KEY@BLOCK=VALUE)")
            if block is not None:
                per.setdefault(block, {})[key] = float(_number(key, value))
            else:
                top[key] = _number(key, value)
        return replace(out, **top, per_block=per)

    @classmethod
    def coerce(cls, costs: "Costs | str | Mapping[str, Any] | None") -> "Costs":
        """Accept a Costs, a CLI string, a dict of keyword arguments, or None."""
        if costs is None:
            return cls()
        if isinstance(costs, Costs):
            return costs
        if isinstance(costs, str):
            return cls.parse(costs)
        if isinstance(costs, Mapping):
            kw = {_ALIASES.get(k, k): v for k, v in costs.items()}
            if "per_block" in kw:
                kw["per_block"] = {int(b): v for b, v in kw["per_block"].items()}
            return cls(**kw)
        raise ValueError(f"costs must be a Costs, a string like 'fwd=1,bwd=2' or a dict, "
                         f"got {type(costs).__name__}")

    @classmethod
    def from_flops(cls, block_flops: Sequence[float], aux_flops: Sequence[float] | float,
                   flop_rate: float, *, bwd_ratio: float = 2.0,
                   update_flops: Sequence[float] | None = None,
                   activation_bytes: Sequence[float] | None = None,
                   comm: float = 0.0, bandwidth: float = math.inf,
                   spread: float = 0.0) -> "Costs":
        """Costs from forward FLOPs per block and a measured FLOP rate.

        Parameters
        ----------
        block_flops : list of float
            Forward FLOPs of each block for one minibatch.
        aux_flops : list of float or float
            Forward FLOPs of each block's auxiliary head (one number for all).
        flop_rate : float
            Sustained FLOP/s of one device (measure it; peak is optimistic).
        bwd_ratio : float
            Backward FLOPs per forward FLOP. The usual estimate is 2 (one
            product for the input gradient, one for the weight gradient),
            the same count BlockProp Appendix A uses for its cost model.
        update_flops : list of float, optional
            FLOPs of each block's optimizer step (e.g. a few per parameter).
        activation_bytes : list of float, optional
            Bytes each block sends downstream per minibatch.
        """
        if flop_rate <= 0:
            raise ValueError(f"flop_rate must be > 0 FLOP/s, got {flop_rate!r}")
        k = len(block_flops)
        if k < 1:
            raise ValueError("block_flops needs one number per block, got an empty list")
        aux = [float(aux_flops)] * k if isinstance(aux_flops, (int, float)) else list(aux_flops)
        for name, seq in (("aux_flops", aux), ("update_flops", update_flops),
                          ("activation_bytes", activation_bytes)):
            if seq is not None and len(seq) != k:
                raise ValueError(f"{name} has {len(seq)} entries, block_flops has {k}; "
                                 "give one per block")
        per: dict[int, dict[str, float]] = {}
        for j in range(k):
            f = block_flops[j] / flop_rate
            d = {"fwd": f, "bwd": bwd_ratio * f, "aux": (1 + bwd_ratio) * aux[j] / flop_rate}
            if update_flops is not None:
                d["update"] = update_flops[j] / flop_rate
            if activation_bytes is not None:
                d["bytes"] = float(activation_bytes[j])
            per[j + 1] = d
        return cls(fwd=0.0, bwd=0.0, aux=0.0, update=0.0, comm=comm, bandwidth=bandwidth,
                   spread=spread, per_block=per)

    @classmethod
    def from_trace(cls, trace: "Trace", draws: str = "empirical") -> "Costs":
        """Calibrate costs on a measured trace.

        Each compute op's cost per block is the median of its spans; the
        spread is the pooled standard deviation of log durations around
        those medians. With ``draws="empirical"`` (the default) ``jitter``
        holds each op's ratios duration / median themselves, pooled over
        blocks (at most
        ``JITTER_BINS`` of them: the means of that many equal groups of the
        sorted ratios, which keeps their mean), so a simulation draws op
        times from the measured distribution; ``draws="lognormal"`` leaves
        ``jitter`` empty and the simulator draws lognormal factors with that
        spread. On a shared machine the measured ratios have a long right
        tail (ops another process slowed down, 3-18 % of the busy time in the
        2-core runs of ``benchmarks/fidelity.py``) that a lognormal with the same
        log-spread does not reproduce.

        For messages, a send/recv pair counts as delivered when the
        computation that needed it could go on: ``recv.t1``, or, when the
        receiving rank's compute thread was waiting for it (a ``wait`` span
        around ``recv.t1``), the end of that wait (a thread hand-off later).
        A receive that began after its send and no earlier than the wait
        it ended (the compute thread posted it when it came to need a
        message already under way, as torch's pipelining schedules do)
        times the receiver's hand-off, delivery minus ``recv.t0``; their
        *mean* is ``recv``: a slow hand-off (the sender's side of the
        transfer waiting for a core) is part of what such a receive costs
        on average. Every other pair times the one-way trip, delivery minus
        ``send.t0``, which less ``recv`` is the latency ``comm`` (their
        median: a message to a waiting receiver; the long ones went to a
        receiver whose compute thread was busy anyway). With sizes in ``trace.meta["bytes"]`` (a
        number, or ``{block: bytes}``) latency and bandwidth come from a
        least-squares line through (bytes, time), else the median time is
        taken as pure latency.
        """
        if draws not in ("empirical", "lognormal"):
            raise ValueError(f"draws must be 'empirical' or 'lognormal', got {draws!r}")
        by: dict[tuple[str, int], list[float]] = defaultdict(list)
        sends: dict[Any, tuple] = {}
        recvs: dict[Any, tuple] = {}
        waits: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for r in trace.rows:
            op = r[2]
            if r[1] == "compute" and op in COMPUTE_OPS:
                by[(op, r[3])].append(r[7] - r[6])
            elif op == "send" and r[8] is not None:
                sends[r[8]] = r
            elif op == "recv" and r[8] is not None:
                recvs[r[8]] = r
            elif op == "wait" and r[1] == "compute":
                waits[r[0]].append((r[6], r[7]))
        for w in waits.values():
            w.sort()
        if not by:
            raise ValueError("the trace has no compute spans (fwd/bwd/aux/update/hstep) to "
                             "calibrate on; record a run with `bpsim run ... --trace`")
        per: dict[int, dict[str, float]] = defaultdict(dict)
        ratios: dict[str, list[float]] = defaultdict(list)
        for (op, block), ds in sorted(by.items()):
            med = statistics.median(ds)
            per[block][op] = med
            if med > 0:
                ratios[op] += [d / med for d in ds if d > 0]
        logdev = [math.log(r) for rs in ratios.values() for r in rs]
        spread = statistics.pstdev(logdev) if len(logdev) > 1 else 0.0
        jitter = ({op: bin_factors(sorted(rs)) for op, rs in ratios.items()}
                  if draws == "empirical" else {})
        meta_bytes = trace.meta.get("bytes")
        pts: list[tuple[float | None, float]] = []
        late: list[float] = []
        for msg, s in sends.items():
            rv = recvs.get(msg)
            if rv is None:
                continue
            done, asked = _delivered(rv, waits.get(rv[0], ()))
            if asked is not None and rv[6] > s[6] and rv[6] >= asked:
                # the receiver posted it when its compute thread came to need
                # it, after the send had started: only the hand-off
                late.append(max(done - rv[6], 0.0))
                continue
            b = None
            if isinstance(meta_bytes, (int, float)):
                b = float(meta_bytes)
            elif isinstance(meta_bytes, Mapping):
                v = meta_bytes.get(str(s[3]), meta_bytes.get(s[3]))
                b = None if v is None else float(v)
            pts.append((b, done - s[6]))
        recv = statistics.fmean(late) if late else 0.0
        pts = [(b, max(t - recv, 0.0)) for b, t in pts]
        comm, bandwidth = 0.0, math.inf
        if pts:
            sizes = [b for b, _ in pts]
            times = [t for _, t in pts]
            if all(b is not None for b in sizes) and len(set(sizes)) > 1:
                mb, mt = statistics.fmean(sizes), statistics.fmean(times)
                sxx = sum((b - mb) ** 2 for b in sizes)
                slope = sum((b - mb) * (t - mt) for b, t in pts) / sxx
                if slope > 0:
                    bandwidth = 1.0 / slope
                    comm = max(mt - slope * mb, 0.0)
                else:
                    comm = statistics.median(times)
            else:
                comm = statistics.median(times)
        if isinstance(meta_bytes, Mapping):
            for k, v in meta_bytes.items():
                per[int(k)]["bytes"] = float(v)
        # An op a block never ran (e.g. aux in bp) costs nothing: defaults are 0.
        # Bandwidth stays infinite unless fitted, so latency then absorbs the
        # transfer time of the (fixed-size) messages.
        return cls(fwd=0.0, bwd=0.0, aux=0.0, update=0.0, comm=comm, recv=recv,
                   bandwidth=bandwidth, bytes=float(meta_bytes) if isinstance(meta_bytes, (int, float)) else 0.0,
                   spread=spread, jitter=jitter, per_block=dict(per))

    def with_input_grad(self, fractions: Sequence[float]) -> "Costs":
        """A copy whose block j pays ``bwd_in = fractions[j-1] * fwd_j`` for
        its input gradient.

        ``fractions[j-1]`` is the FLOPs of block j's input-gradient product
        over the FLOPs of its forward pass (``BlockNet.input_grad_flops()``
        divided by ``BlockNet.block_flops()``). Use it to carry costs
        measured on an algorithm whose blocks have detached inputs (DGL) to
        one that backpropagates through them (``bp``, ``gpipe``): that
        product is the only backward work the detached run never did.
        """
        fr = [float(f) for f in fractions]
        if any(not (f >= 0 and math.isfinite(f)) for f in fr):
            raise ValueError(f"input-gradient fractions must be finite and >= 0, got {fractions!r}")
        per = {b: dict(v) for b, v in self.per_block.items()}
        for j, f in enumerate(fr, start=1):
            per.setdefault(j, {})["bwd_in"] = f * self.get("fwd", j)
        return replace(self, per_block=per)

    # ---------------------------------------------------------------- query
    def get(self, key: str, block: int) -> float:
        """The (median) cost ``key`` of ``block`` (1-based), overrides applied."""
        over = self.per_block.get(block)
        if over is not None and key in over:
            return over[key]
        if key == "hstep":
            if self.hstep is not None:
                return self.hstep
            return self.get("fwd", block) + self.get("bwd", block)
        return getattr(self, key)

    def transfer(self, block: int) -> float:
        """Transfer time of one message sent by ``block`` (without latency)."""
        b = self.get("bytes", block)
        return 0.0 if b == 0 or math.isinf(self.bandwidth) else b / self.bandwidth

    def table(self, blocks: int, slowdown: Mapping[int, float] | None = None) -> "CostTable":
        """Resolve the costs of ``blocks`` blocks, block J's compute scaled by
        ``slowdown[J]``."""
        return CostTable(self, blocks, dict(slowdown or {}))

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in _KEYS}
        if math.isinf(d["bandwidth"]):
            d["bandwidth"] = "inf"
        if self.jitter:
            d["jitter"] = {op: list(v) for op, v in self.jitter.items()}
        d["per_block"] = {str(b): dict(v) for b, v in self.per_block.items()}
        return d

    def __str__(self) -> str:
        """The costs as a ``--cost`` string (``Costs.parse`` reads it back);
        ``jitter`` has no string form: keep it with :meth:`to_dict`."""
        parts = [f"{k}={getattr(self, k):g}" for k in _KEYS
                 if getattr(self, k) is not None
                 and not (k == "bandwidth" and math.isinf(self.bandwidth))]
        for b, over in sorted(self.per_block.items()):
            parts += [f"{k}@{b}={v:g}" for k, v in over.items()]
        return ",".join(parts)


def bin_factors(xs: Sequence[float], bins: int = JITTER_BINS) -> tuple[float, ...]:
    """Shrink sorted factors to at most ``bins`` numbers for ``Costs.jitter``:
    ``xs`` itself when short, else the means of ``bins`` contiguous groups
    of (almost) equal size, the same distribution in fewer numbers, with the
    same mean (exactly when ``bins`` divides ``len(xs)``). Pool the jitter of
    several calibrations with ``bin_factors(sorted(a + b + ...))``."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins!r}")
    n = len(xs)
    if n <= bins:
        return tuple(xs)
    cuts = [i * n // bins for i in range(bins + 1)]
    return tuple(statistics.fmean(xs[a:b]) for a, b in zip(cuts, cuts[1:]))


def _delivered(recv: tuple, waits: Sequence[tuple[float, float]],
               tol: float = 1e-6) -> tuple[float, float | None]:
    """When the receiving compute thread could use a message, and when it
    began waiting for it: the end and start of the wait span (sorted
    ``waits`` of its rank) in progress when the receive completed, else the
    receive's end and None."""
    t = recv[7]
    i = bisect.bisect_right(waits, (t + tol, math.inf)) - 1
    if i >= 0 and waits[i][0] <= t + tol and waits[i][1] >= t - tol:
        return waits[i][1], waits[i][0] - tol
    return t, None


class CostTable:
    """Costs resolved for K blocks: ``table[op][j]`` for block j (1-based,
    index 0 unused), plus per-block transfer times ``xfer[j]``."""

    def __init__(self, costs: Costs, blocks: int, slowdown: dict[int, float]) -> None:
        for j, s in slowdown.items():
            if not 1 <= j <= blocks:
                raise ValueError(f"slowdown names block {j}, but blocks are 1..{blocks}")
            if not s > 0 or math.isinf(s):
                raise ValueError(f"slowdown factor of block {j} must be > 0, got {s!r}")
        for b in costs.per_block:
            if b > blocks:
                raise ValueError(f"cost override for block {b}, but there are only "
                                 f"{blocks} blocks")
        self.costs = costs
        self.blocks = blocks
        self.spread = costs.spread
        self.latency = costs.comm
        self.handoff = costs.recv
        self.ops: dict[str, list[float]] = {}
        for op in _COST_OPS:
            self.ops[op] = [0.0] + [costs.get(op, j) * slowdown.get(j, 1.0)
                                    for j in range(1, blocks + 1)]
        # the backward of a block that also sends its input gradient back
        # (recorded as a ``bwd`` span, see Engine.run)
        self.ops["bwd+in"] = [b + i for b, i in zip(self.ops["bwd"], self.ops["bwd_in"])]
        # BWBPF's global output layer is a head like the others: cost of aux.
        self.ops["loss"] = list(self.ops["aux"])
        self.xfer = [0.0] + [costs.transfer(j) for j in range(1, blocks + 1)]
        # Factors each table op draws from (Costs.jitter): its own op's, or,
        # for an op the calibration never saw, all of them together.
        jit = costs.jitter
        pooled = tuple(sorted(v for vs in jit.values() for v in vs))
        self.jitter: dict[str, tuple[float, ...]] = {}
        if jit:
            for op in self.ops:
                self.jitter[op] = jit.get(_JITTER_OF.get(op, op), pooled)

    def __getitem__(self, op: str) -> list[float]:
        return self.ops[op]
