"""Replay: a measured run played through the simulator's dependencies.

``replay(trace)`` runs the schedule a measured trace's meta describes
(method, blocks, placement, steps, options, slowdown) with every op taking
exactly the duration it was measured to take, matched by (rank, block, op,
step, micro-batch) and occurrence, every message taking its measured time
from the end of the op that sent it to the moment its receiver could use
it, and every untraced gap between two ops of one rank charged as
measured. Nothing is fitted, so what the replay gets wrong is a dependency
the model has wrong: a wait it does not have, a message protocol, a buffer
rule.

Each rank's compute lane is read as a chain ``op, gap, wait, gap, op``. A
``wait`` span counts as a dependency wait when a message arrived on that
rank during it for the step and micro-batch it waited for (any entry, for
a replay buffer), reproduced by the model's ``recv``/``take``, or when a
message the rank sent in that step was still on its way when it began
(the model's ``flush`` at the end of a ``gpipe`` or ``1f1b`` step); any other wait is untraced time to the
model and is reported as ``unexplained_wait`` (a wait the model does not
have).
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from bpsim import methods
from bpsim.sim.api import check_request, like_kwargs, run_schedule
from bpsim.sim.costs import Costs
from bpsim.sim.engine import parse_placement
from bpsim.sim.results import SimResult, buffer_stats
from bpsim.trace import Trace

__all__ = ["Measured", "ReplayResult", "replay"]

_TOL = 1e-9
_SEND_TOL = 1e-4   # a send posted this soon after a wait began was posted with it


class Measured:
    """The durations of a measured trace, served to the engine in replay mode.

    ``op(rank, block, op, step, mb)`` returns the next ``(head, duration,
    tail, t0, t1)`` of that op: untraced time after the wait before it,
    its duration, untraced time after it, and its measured start and end
    (from the trace's start). ``message(src, dst, step, mb)`` returns the
    send and recv spans and the delivery as offsets from the end of the op
    that sent the message, and the measured delivery time.
    """

    def __init__(self, trace: Trace, buffered: bool = False, flushes: bool = False) -> None:
        t0 = trace.start
        rows = trace.rows
        # arrival times on each rank: of any message (buffered links, where a
        # read may take any entry), else by the (step, micro-batch) waited for
        arrivals: dict[Any, list[float]] = defaultdict(list)
        sends: dict[Any, tuple] = {}
        recvs: dict[Any, tuple] = {}
        out: dict[int, list[tuple[float, float]]] = defaultdict(list)  # (sent, delivered)
        for r in rows:
            if r[2] == "recv" and r[1] == "comm":
                arrivals[r[0] if buffered else (r[0], r[4], r[5])].append(r[7])
                if r[8] is not None:
                    recvs[r[8]] = r
            elif r[2] == "send" and r[1] == "comm" and r[8] is not None:
                sends[r[8]] = r
        for v in arrivals.values():
            v.sort()
        for m, s in sends.items():
            if m in recvs:
                out[(s[0], s[4])].append((s[6], recvs[m][7]))
        lanes: dict[int, list[tuple]] = defaultdict(list)
        for r in rows:
            if r[1] == "compute":
                lanes[r[0]].append(r)
        self._ops: dict[tuple, deque] = defaultdict(deque)
        self._start: dict[int, float] = {}
        self.waits: dict[int, list[tuple[float, float]]] = {}
        self.unexplained: dict[int, float] = {}
        ends: dict[tuple, list[float]] = defaultdict(list)   # (rank, block, step, mb)
        for rank, lane in lanes.items():
            lane.sort(key=lambda r: (r[6], r[7]))
            prev = None            # [head, duration, tail] of the previous op
            prev_end = t0
            first_wait = last_wait = None
            explained: list[tuple[float, float]] = []
            lost = 0.0
            for r in lane:
                if r[2] == "wait":
                    arr = arrivals.get(rank if buffered else (rank, r[4], r[5]), ())
                    i = bisect.bisect_left(arr, r[6] - _TOL)
                    if (i < len(arr) and arr[i] <= r[7] + _TOL) or flushes and any(
                            a <= r[6] + _SEND_TOL and b > r[6] + _TOL
                            for a, b in out.get((rank, r[4]), ())):
                        explained.append((r[6], r[7]))
                        if first_wait is None:
                            first_wait = r[6]
                        last_wait = r[7]
                    else:
                        lost += r[7] - r[6]
                    continue
                if first_wait is None:
                    tail, head = r[6] - prev_end, 0.0
                else:
                    # gaps between successive dependency waits go with the tail
                    head = r[6] - last_wait
                    tail = (first_wait - prev_end) + self._between(explained, first_wait,
                                                                   last_wait)
                if prev is None:
                    self._start[rank] = max(tail, 0.0)
                else:
                    prev[2] = max(tail, 0.0)
                prev = [max(head, 0.0), r[7] - r[6], 0.0, r[6] - t0, r[7] - t0]
                self._ops[(rank, r[3], r[2], r[4], r[5])].append(prev)
                prev_end = r[7]
                ends[(rank, r[3], r[4], r[5])].append(r[7])
                first_wait = last_wait = None
            self.waits[rank] = explained
            self.unexplained[rank] = lost
        self._msgs: dict[tuple, deque] = defaultdict(deque)
        pairs = sorted(((s, recvs[m]) for m, s in sends.items() if m in recvs),
                       key=lambda p: p[0][6])
        from bpsim.sim.costs import _delivered
        for s, rv in pairs:
            # the message leaves at the end of the sender's last op of its
            # step and micro-batch (under rendezvous the transfer starts later)
            e = ends.get((s[0], s[3], s[4], s[5]), [])
            i = bisect.bisect_right(e, s[6] + _TOL) - 1
            pe = e[i] if i >= 0 else t0
            done, _ = _delivered(rv, self.waits.get(rv[0], ()), tol=_TOL)
            self._msgs[(s[3], rv[3], s[4], s[5])].append(
                (s[6] - pe, s[7] - pe, rv[6] - pe, rv[7] - pe, max(done - pe, 0.0), done - t0))
        self.missing: list[tuple] = []

    @staticmethod
    def _between(waits: list[tuple[float, float]], a: float, b: float) -> float:
        """Untraced time between the dependency waits that lie in [a, b]."""
        inside = [w for w in waits if w[0] >= a - _TOL and w[1] <= b + _TOL]
        return sum(max(n[0] - p[1], 0.0) for p, n in zip(inside, inside[1:]))

    def start_delay(self, rank: int) -> float:
        """Untraced time before the rank's first op (or first wait)."""
        return self._start.get(rank, 0.0)

    def op(self, rank: int, block: int, op: str,
           step: int, mb: int) -> tuple[float, float, float, float, float]:
        q = self._ops.get((rank, block, op, step, mb))
        if not q:
            self.missing.append((rank, block, op, step, mb))
            return 0.0, 0.0, 0.0, math.inf, math.inf
        h, d, t, t0, t1 = q.popleft()
        return h, d, t, t0, t1

    def message(self, src: int, dst: int, step: int, mb: int) -> tuple[float, ...]:
        q = self._msgs.get((src, dst, step, mb))
        if not q:
            self.missing.append(("message", src, dst, step, mb))
            return 0.0, 0.0, 0.0, 0.0, 0.0, -math.inf
        return q.popleft()

    def unused(self) -> int:
        """Measured ops the replay never asked for."""
        return sum(len(q) for q in self._ops.values())


@dataclass
class ReplayResult:
    """What :func:`replay` returns: the replayed run beside the measured one.

    Attributes
    ----------
    result : SimResult
        The replayed run (its ``trace`` opens beside the measured one).
    measured : Trace
    report : dict
        The keys of ``bpsim simulate --replay --json`` (see :func:`replay`).
    """

    result: SimResult
    measured: Trace
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def trace(self) -> Trace:
        return self.result.trace

    def to_dict(self) -> dict[str, Any]:
        return dict(self.report)

    def summary(self) -> str:
        r = self.report
        lines = [f"replay of {r['algo']} ({r['blocks']} blocks, {r['steps']} steps): makespan "
                 f"{r['makespan']:.6g} against {r['measured_makespan']:.6g} measured "
                 f"({r['makespan_error']:+.2%}); median start offset "
                 f"{r['start_offset_median']:.3g} of a step"]
        for b in r["busy_error"]:
            lines.append(f"rank {b['rank']}: busy {b['replayed']:.6g} against "
                         f"{b['measured']:.6g} ({b['error']:+.2%}), unexplained waits "
                         f"{b['unexplained_wait']:.4g}")
        for name in ("buffers", "measured_buffers"):
            for b in r.get(name) or []:
                lines.append(f"{name[:-1].replace('_', ' ')} {b['block']}: reuse_mean "
                             f"{b['reuse_mean']:.3g}, staleness_mean {b['staleness_mean']:.3g}, "
                             f"misses {b['misses']}")
        if r["missing"] or r["unused"]:
            lines.append(f"warning: {r['missing']} ops or messages the model has were not "
                         f"measured, {r['unused']} measured ops the model does not have")
        return "\n".join(lines)


def _starts(t: Trace) -> dict[tuple, float]:
    t0 = t.start
    seen: dict[tuple, int] = defaultdict(int)
    out = {}
    for r in sorted(t.rows, key=lambda r: (r[6], r[7])):
        if r[1] != "compute" or r[2] == "wait":
            continue
        k = (r[0], r[2], r[3], r[4], r[5])
        out[k + (seen[k],)] = r[6] - t0
        seen[k] += 1
    return out


def _rel(a: float, b: float) -> float:
    return (a - b) / b if b else (0.0 if a == b else math.inf)


def replay(trace: Trace) -> ReplayResult:
    """Replay a measured run with its own op durations (see the module docstring).

    Returns a :class:`ReplayResult` whose ``report`` holds ``makespan``,
    ``measured_makespan``, ``makespan_error`` (signed fraction),
    ``busy_error`` (per rank: measured, replayed, error, unexplained_wait),
    ``start_offset_median`` (median |start difference| of matched ops over
    the measured mean step time), ``matched``, ``missing`` (ops and
    messages the model has and the trace lacks), ``unused`` (measured ops
    the model does not have) and, for ``dgl-async``, ``buffers`` and
    ``measured_buffers`` (:func:`bpsim.sim.results.buffer_stats`).
    """
    if len(trace) == 0:
        raise ValueError("the trace has no spans to replay; record a run with "
                         "`bpsim run ... --trace measured.json`")
    kw = like_kwargs(trace)
    method = methods.get(kw["algo"])
    blocks, steps = kw["blocks"], kw["steps"]
    opts = method.resolved_options({k: kw[k] for k in method.options if k in kw})
    check_request(method, blocks, steps, opts, steps_per_epoch=kw.get("steps_per_epoch"))
    place = parse_placement(kw.get("placement"), blocks)
    measured = Measured(trace, buffered="buffer" in method.options,
                        flushes=method.protocol == "rendezvous")
    res = run_schedule(method, blocks, steps, Costs(fwd=0.0, bwd=0.0), opts,
                       steps_per_epoch=kw.get("steps_per_epoch"), placement=place,
                       replay=measured,
                       meta={"source": "bpsim.sim.replay", "algo": method.name,
                             "blocks": blocks, "steps": steps, "placement": place,
                             "options": opts, "slowdown": trace.meta.get("slowdown", {})})
    rt = res.trace
    ms, rs = _starts(trace), _starts(rt)
    common = ms.keys() & rs.keys()
    step_time = trace.makespan / max(steps, 1)
    offs = [abs(rs[k] - ms[k]) for k in common]
    med = statistics.median(offs) / step_time if offs and step_time > 0 else math.nan
    busy = []
    for rank in sorted(set(trace.ranks) | set(rt.ranks)):
        bm, br = trace.busy(rank), rt.busy(rank)
        busy.append({"rank": rank, "measured": bm, "replayed": br, "error": _rel(br, bm),
                     "unexplained_wait": measured.unexplained.get(rank, 0.0)})
    report: dict[str, Any] = {
        "algo": method.name, "blocks": blocks, "steps": steps,
        "makespan": rt.makespan, "measured_makespan": trace.makespan,
        "makespan_error": _rel(rt.makespan, trace.makespan),
        "busy_error": busy, "start_offset_median": med, "matched": len(common),
        "missing": len(measured.missing), "unused": measured.unused(),
    }
    if "buffer" in method.options:
        report["buffers"] = buffer_stats(rt)
        report["measured_buffers"] = buffer_stats(trace)
    return ReplayResult(result=res, measured=trace, report=report)
