"""``simulate`` and ``simulate_like``: one method's schedule on the engine.

The method is looked up in the registry (:mod:`bpsim.methods`): its
simulator schedule, the options it takes and their defaults, so
``bpsim train``, ``bpsim run`` and ``bpsim simulate`` describe the same run
with the same command line.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import simpy

from bpsim import methods
from bpsim.sim.costs import Costs, CostTable
from bpsim.sim.engine import Engine, parse_placement
from bpsim.sim.results import SimResult
from bpsim.sim.schedules import compute_spans

if TYPE_CHECKING:  # pragma: no cover
    from bpsim.trace import Trace

__all__ = ["simulate", "simulate_like", "run_schedule", "PROTOCOLS", "MAX_SPANS",
           "MAX_BLOCKS", "MAX_TIME", "estimate_spans", "check_request", "check_time_range",
           "SpanLimitError"]

PROTOCOLS = ("auto", "eager", "rendezvous")
#: most spans one simulation may record (about 150 bytes of memory each)
MAX_SPANS = 20_000_000
#: most blocks one simulation may have (each costs a process and its state)
MAX_BLOCKS = 10_000
#: the longest op times the number of spans must stay below this, so every
#: time and every sum of times (makespan, busy and idle time) is a finite float
MAX_TIME = 1e300
#: the options the simulator's schedules read (the others only change the
#: numbers a block computes, not how long it takes)
_TIMED = ("microbatches", "buffer", "max_reuse", "nh", "cache_every")


#: the costs of the span estimate's probe: every op and message takes time,
#: so every kind of span (waits and message spans included) is recorded
_PROBE = Costs.parse("fwd=1,bwd=2,aux=0.5,update=0.5,hstep=1,comm=0.25")


#: the cost-table entries that are sums of costs, as check_time_range names them
_DERIVED = {"hstep": "hstep (fwd + bwd unless hstep is given)", "bwd+in": "bwd + bwd_in",
            "loss": "aux (of the output layer)"}


class SpanLimitError(ValueError):
    """A simulation would record more than :data:`MAX_SPANS` spans."""


def _positive_int(name: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def estimate_spans(algo: str, blocks: int, steps: int, *, limit: int | None = None,
                   **options: Any) -> int:
    """About how many spans a simulation records (compute, waits, messages).

    Simulates two steps with the default costs and scales their span count
    to ``steps``: every schedule records a fixed number of spans per step.
    With ``limit``, the probe stops as soon as its count, scaled, exceeds
    ``limit`` and returns that count (then only a lower bound, over ``limit``).
    """
    method = methods.get(algo)
    probe = min(steps, 2)
    opts = {k: v for k, v in options.items() if k in _TIMED}
    rendezvous = method.protocol == "rendezvous"
    eng = Engine(blocks, _PROBE.table(blocks, {}), parse_placement(None, blocks),
                 rendezvous=rendezvous)
    methods.load(method.schedule)(eng, probe, steps_per_epoch=probe, **opts)
    if limit is None:
        eng.env.run()
    else:
        rows, step = eng.rows, eng.env.step
        cap = limit * probe // steps
        try:
            while len(rows) <= cap:
                step()
        except simpy.core.EmptySchedule:
            pass
    return math.ceil(len(eng.rows) * steps / probe)


def check_request(method: methods.Method, blocks: int, steps: int,
                  options: Mapping[str, Any], *, steps_per_epoch: int | None = None,
                  max_spans: int = MAX_SPANS) -> int:
    """Check the sizes of a simulation before anything is allocated.

    Every size is an integer in range, the blocks are at most
    :data:`MAX_BLOCKS`, and the compute spans the schedule records (exact,
    in closed form: :func:`bpsim.sim.schedules.compute_spans`), then all its
    spans (:func:`estimate_spans`, whose probe stops at the limit), are at
    most ``max_spans``.

    Parameters
    ----------
    method : Method
        The method simulated.
    blocks, steps : int
        K and N.
    options : mapping
        The method's resolved options.
    steps_per_epoch : int or None
        ``blockprop-cached``'s epoch length.
    max_spans : int
        The span limit.

    Returns
    -------
    int
        The estimated number of spans.

    Raises
    ------
    ValueError
        A size is not an integer in range; :class:`SpanLimitError` when the
        run would record more than ``max_spans`` spans.
    """
    name = method.name
    _positive_int("blocks", blocks)
    _positive_int("steps", steps)
    for k in ("microbatches", "buffer", "cache_every"):
        if k in options:
            _positive_int(k, options[k])
    if "nh" in options:
        _positive_int("nh", options["nh"], lo=0)
    if options.get("max_reuse") is not None:
        _positive_int("max_reuse", options["max_reuse"])
    if steps_per_epoch is not None:
        _positive_int("steps_per_epoch", steps_per_epoch)
    _positive_int("max_spans", max_spans)
    if blocks < method.min_blocks:
        raise ValueError(f"{name} needs at least {method.min_blocks} blocks, got blocks={blocks}")
    if blocks > MAX_BLOCKS:
        raise SpanLimitError(f"blocks={blocks:,} is over the simulator's limit of "
                             f"{MAX_BLOCKS:,} blocks; simulate fewer blocks")
    sizes = {k: options[k] for k in ("microbatches", "nh", "cache_every") if k in options}
    low = compute_spans(method.schedule.rpartition(":")[2], blocks, steps,
                        steps_per_epoch=steps_per_epoch, **sizes)
    factors = ", ".join(f"{k}={v:,}" for k, v in
                        {"blocks": blocks, "steps": steps, **sizes}.items()
                        if k != "cache_every")
    if low > max_spans:
        raise SpanLimitError(f"{name} with {factors} would record at least {low:,} spans, "
                             f"over the limit of {max_spans:,}; lower one of them")
    n = estimate_spans(name, blocks, steps, limit=max_spans, **options)
    if n > max_spans:
        raise SpanLimitError(f"{name} with {factors} would record about "
                             f"{n:,} spans, over the limit of {max_spans:,}; simulate fewer "
                             "steps (the makespan grows linearly with them)")
    return n


def check_time_range(table: CostTable, spans: int, slowdown: Mapping[int, float]) -> None:
    """Refuse costs whose times could overflow a float.

    The makespan and every busy or idle time is at most the sum of all span
    durations, so it stays finite when the longest possible op (cost,
    slowdown and the largest random factor together) times ``spans + 1`` is
    below :data:`MAX_TIME`. ``ValueError`` names the cost that is too large.
    """
    if table.jitter:
        factor, why = max(max(f) for f in table.jitter.values()), "its largest jitter factor"
    elif table.spread:
        # random.gauss never draws beyond 8.6 standard deviations (53-bit uniforms)
        factor, why = math.exp(9.0 * table.spread), f"exp(9 spread), spread={table.spread:g}"
    else:
        factor, why = 1.0, ""
    longest, what = 0.0, ""
    for op, vals in table.ops.items():
        for j in range(1, len(vals)):
            if vals[j] > longest:
                s = slowdown.get(j, 1.0)
                longest, what = vals[j], f"cost {_DERIVED.get(op, op)} of block {j}" + (
                    f" (times --slowdown {j}:{s:g})" if s != 1.0 else "")
    for j in range(1, len(table.xfer)):
        if table.xfer[j] > longest:
            longest, what = table.xfer[j], f"the transfer bytes/bandwidth of block {j}"
    link = table.latency + table.handoff
    if link > longest:
        longest, what = link, "the message latency comm + recv"
    total = longest * factor * (spans + 1)
    if not total < MAX_TIME:
        by = f" times {why}" if why else ""
        raise ValueError(f"{what} is {longest:g}{by}, over about {spans:,} spans: the "
                         f"simulated times would pass {MAX_TIME:g} (a float overflows at "
                         "1.8e308); give smaller costs")


def run_schedule(method: methods.Method, blocks: int, steps: int, costs: Costs,
                 options: Mapping[str, Any], *, steps_per_epoch: int | None = None,
                 slowdown: Mapping[int, float] | None = None, placement: list[int],
                 seed: int = 0, rendezvous: bool = False, replay: Any = None,
                 meta: Mapping[str, Any] | None = None) -> SimResult:
    """Drive ``method``'s schedule on a fresh engine and summarise it."""
    table = costs.table(blocks, dict(slowdown or {}))
    eng = Engine(blocks, table, placement, seed=seed, rendezvous=rendezvous, replay=replay)
    schedule = methods.load(method.schedule)
    timed = {k: options[k] for k in _TIMED if k in options}
    schedule(eng, steps, steps_per_epoch=steps_per_epoch or steps, **timed)
    eng.env.run()
    buffers = []
    meta = dict(meta or {})
    if eng.bufs:
        meta["buffer_reads"] = {str(j + 1): [list(x) for x in b.log] for j, b in eng.bufs.items()}
        meta["buffer_misses"] = {str(j + 1): b.misses for j, b in eng.bufs.items()}
        for j in sorted(eng.bufs):
            rb = eng.bufs[j].rb
            stale = rb.staleness()
            buffers.append({
                "block": j, "capacity": rb.capacity, "max_reuse": rb.max_reuse,
                "reuse_mean": rb.reuse_mean,
                "staleness_mean": sum(stale) / len(stale) if stale else float("nan"),
                "misses": eng.bufs[j].misses, "reuse": rb.reuse_counts(), "staleness": stale,
                "puts": rb.n_puts, "gets": rb.n_gets,
            })
    return SimResult.from_rows(method.name, steps, eng.rows, meta, placement=placement,
                               updates=eng.updates[1:], idle=eng.idle[1:], buffers=buffers)


def simulate(algo: str, blocks: int = 4, steps: int = 100,
             costs: "Costs | str | Mapping[str, Any] | None" = None, *,
             microbatches: int | None = None, buffer: int | None = None,
             max_reuse: int | None = None, nh: int | None = None,
             cache_every: int | None = None, steps_per_epoch: int | None = None,
             slowdown: Mapping[int, float] | None = None, placement: Any = None,
             seed: int = 0, protocol: str = "auto", max_spans: int = MAX_SPANS) -> SimResult:
    """Simulate the device timeline of one training regime.

    Parameters
    ----------
    algo : str
        A method of :mod:`bpsim.methods` or one of its aliases (``bp gpipe
        1f1b dgl dgl-async greedy blockprop blockprop-cached bwbpf``).
    blocks : int
        K, the number of blocks (>= 1; >= 2 for the BlockProp variants).
    steps : int
        N, minibatch steps (for ``dgl-async``: updates per block; for
        ``greedy``: steps per block, the stages run one after the other).
    costs : Costs, str or dict
        Per-block costs (:class:`bpsim.sim.Costs`); a string is parsed
        like ``--cost``. Default: fwd=1, bwd=2, everything else 0.
    microbatches, buffer, max_reuse, nh, cache_every : int or None
        The method options that change a timeline (micro-batches per step
        of ``gpipe``/``1f1b``, whose costs are per micro-batch; replay
        buffer size M and reuse cap of ``dgl-async``; BlockProp's h-step
        iterations N_h, Alg. 1; ``blockprop-cached``'s E, Alg. 2). None
        takes the registry's default (``bpsim.methods.DEFAULTS``); options
        the method does not take are ignored.
    steps_per_epoch : int or None
        Steps per epoch of ``blockprop-cached`` (default: all steps).
    slowdown : dict
        ``{J: S}`` multiplies block J's compute costs by S (1-based J).
    placement : None, int, str or list of int
        Device of each block (see :func:`bpsim.sim.engine.parse_placement`).
    seed : int
        Seed of the cost draws (only used when ``costs.spread > 0`` or
        ``costs.jitter`` is set).
    protocol : str
        How messages between devices move. ``"eager"``: a message leaves
        when it is sent and waits at the receiver (bpsim's runtime receives
        on a background thread, posted early). ``"rendezvous"``: it leaves
        only once its receiver asks for it, as torch's pipelining schedules
        behind the runtime's ``gpipe`` and ``1f1b`` move data. ``"auto"``
        (default): rendezvous for ``gpipe`` and ``1f1b``, eager otherwise.
    max_spans : int
        Refuse (:class:`SpanLimitError`) a run estimated to record more spans.

    Returns
    -------
    SimResult
    """
    method = methods.get(algo)
    name = method.name
    given = {"microbatches": microbatches, "buffer": buffer, "max_reuse": max_reuse,
             "nh": nh, "cache_every": cache_every}
    opts = method.resolved_options({k: v for k, v in given.items()
                                    if v is not None and k in method.options})
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    n = check_request(method, blocks, steps, opts, steps_per_epoch=steps_per_epoch,
                      max_spans=max_spans)
    proto = protocol if protocol != "auto" else method.protocol
    cost = Costs.coerce(costs)
    slow = {int(k): float(v) for k, v in (slowdown or {}).items()}
    place = parse_placement(placement, blocks)
    check_time_range(cost.table(blocks, slow), n, slow)
    meta = {"source": "bpsim.sim", "algo": name, "blocks": blocks, "steps": steps,
            "steps_per_epoch": steps_per_epoch or steps,
            "microbatches": opts.get("microbatches", 1),
            "buffer": opts.get("buffer"), "max_reuse": opts.get("max_reuse"),
            "slowdown": {str(k): v for k, v in slow.items()}, "placement": place,
            "options": dict(opts), "costs": cost.to_dict(), "seed": seed, "protocol": proto}
    return run_schedule(method, blocks, steps, cost, opts, steps_per_epoch=steps_per_epoch,
                        slowdown=slow, placement=place, seed=seed,
                        rendezvous=proto == "rendezvous", meta=meta)


def like_kwargs(trace: "Trace") -> dict[str, Any]:
    """The ``simulate`` arguments that describe the run of ``trace`` (its meta)."""
    meta = trace.meta
    if "algo" not in meta or "blocks" not in meta:
        raise ValueError("the trace's meta has no 'algo' and 'blocks'; record the run with "
                         "`bpsim run ... --trace` (or `bpsim simulate ... --trace`)")
    method = methods.get(meta["algo"])
    opts = dict(meta.get("options") or {})
    for k in method.options:   # top-level keys of older traces
        if opts.get(k) is None and meta.get(k) is not None:
            opts[k] = meta[k]
    steps = meta.get("steps")
    if not steps:
        steps = len(trace.steps())
    out: dict[str, Any] = {"algo": method.name, "blocks": int(meta["blocks"]),
                           "steps": int(steps),
                           "slowdown": {int(k): float(v)
                                        for k, v in (meta.get("slowdown") or {}).items()},
                           "placement": meta.get("placement"),
                           "steps_per_epoch": meta.get("steps_per_epoch")}
    for k in _TIMED:
        if k in method.options and opts.get(k) is not None:
            out[k] = opts[k]
    return out


def simulate_like(trace: "Trace", costs: "Costs | str | Mapping[str, Any] | None" = None, *,
                  seed: int = 0, protocol: str = "auto") -> SimResult:
    """Re-simulate the run a trace recorded, from its meta alone.

    The method, blocks, steps, steps per epoch, placement, slowdown and the
    method's resolved options come from ``trace.meta`` (as ``bpsim run``
    writes it); ``costs`` default to :meth:`Costs.from_trace` of the trace
    itself.
    """
    kw = like_kwargs(trace)
    if costs is None:
        costs = Costs.from_trace(trace)
    algo = kw.pop("algo")
    return simulate(algo, costs=costs, seed=seed, protocol=protocol, **kw)
