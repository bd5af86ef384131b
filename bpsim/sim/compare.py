"""Compare a simulated timeline with a measured one.

Three numbers say how well the simulator predicts a run:

* the **makespan error** ``(simulated - measured) / measured``;
* the **busy-time error** per rank, ``(busy_sim - busy_meas) / busy_meas``
  of the compute lane, and its mean absolute value;
* the **start offset**: ops are matched by (rank, lane, op, block, step,
  microbatch, occurrence); the median of ``|start_sim - start_meas|``
  (each trace measured from its own first span) divided by the measured
  mean step time (makespan / number of steps).

Traces with unknown ops, negative steps, negative durations or non-finite
times, or with different block counts, are refused; traces of different methods are compared with
a warning (``result["warnings"]``), printed first in the report.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from typing import Any

from bpsim.trace import OPS, Trace

__all__ = ["compare", "compare_files", "error_table", "format_report"]


def _rel(sim: float, meas: float) -> float:
    if meas == 0:
        return 0.0 if sim == 0 else math.inf
    return (sim - meas) / meas


def _check_times(t: Trace, which: str) -> None:
    """Refuse a span with an unknown op, a negative step, micro-batch or rank,
    a block below 1, or times that are not finite or run backwards."""
    for r in t.rows:
        if r[2] not in OPS:
            raise ValueError(f"the {which} trace has a span of unknown op {r[2]!r} (block "
                             f"{r[3]}, step {r[4]}); ops are {', '.join(OPS)}; it cannot be "
                             "compared")
        for name, v, lo in (("rank", r[0], 0), ("block", r[3], 1), ("step", r[4], 0),
                            ("microbatch", r[5], 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"the {which} trace has a {r[2]} span with {name} {v!r}, not "
                                 f"an integer >= {lo}; it cannot be compared")
        if not (math.isfinite(r[6]) and math.isfinite(r[7])):
            raise ValueError(f"the {which} trace has a span with a non-finite time: {r[2]} of "
                             f"block {r[3]}, step {r[4]} ({r[6]!r} to {r[7]!r}); it cannot be "
                             "compared")
        if r[7] < r[6] - 1e-9:
            raise ValueError(f"the {which} trace has a span with a negative duration: {r[2]} of "
                             f"block {r[3]}, step {r[4]} ({r[6]!r} to {r[7]!r}); it cannot be "
                             "compared")


def _blocks(t: Trace) -> int | None:
    b = t.meta.get("blocks")
    if isinstance(b, int) and not isinstance(b, bool):
        return b
    return max((r[3] for r in t.rows), default=None)


def compare(measured: Trace, simulated: Trace) -> dict[str, Any]:
    """Errors of ``simulated`` against ``measured``; a JSON-ready dict.

    Keys: ``makespan_measured``, ``makespan_simulated``, ``makespan_error``,
    ``busy`` (list of {rank, measured, simulated, error}), ``busy_error_mean``
    (mean |error| over ranks), ``start_offset_median`` (in time units),
    ``start_offset_frac`` (over the measured mean step time), ``matched``,
    ``n_measured``, ``n_simulated``.
    """
    if len(measured) == 0:
        raise ValueError("the measured trace has no spans; record one with "
                         "`bpsim run ... --trace measured.json`")
    if len(simulated) == 0:
        raise ValueError("the simulated trace has no spans")
    _check_times(measured, "measured")
    _check_times(simulated, "simulated")
    bm_, bs_ = _blocks(measured), _blocks(simulated)
    if bm_ != bs_:
        raise ValueError(f"the measured trace has {bm_} blocks and the simulated one {bs_}; "
                         "simulate the measured run's blocks (bpsim simulate --blocks)")
    warnings = []
    am, as_ = measured.meta.get("algo"), simulated.meta.get("algo")
    if am and as_ and am != as_:
        warnings.append(f"the measured trace is a {am} run and the simulated one {as_}: "
                        "ops match only where the two schedules share them")
    m_span, s_span = measured.makespan, simulated.makespan
    busy = []
    for rank in sorted(set(measured.ranks) | set(simulated.ranks)):
        bm, bs = measured.busy(rank), simulated.busy(rank)
        busy.append({"rank": rank, "measured": bm, "simulated": bs, "error": _rel(bs, bm)})
    errs = [abs(b["error"]) for b in busy if math.isfinite(b["error"])]

    def keyed(t: Trace) -> dict[tuple, float]:
        t_start = t.start
        seen: dict[tuple, int] = defaultdict(int)
        out = {}
        for r in sorted(t.rows, key=lambda r: (r[6], r[7])):
            k = (r[0], r[1], r[2], r[3], r[4], r[5])
            out[k + (seen[k],)] = r[6] - t_start
            seen[k] += 1
        return out

    km, ks = keyed(measured), keyed(simulated)
    common = km.keys() & ks.keys()
    offs = [abs(ks[k] - km[k]) for k in common]
    n_steps = max(len(measured.steps()), 1)
    step_time = m_span / n_steps
    med = statistics.median(offs) if offs else math.nan
    return {
        "makespan_measured": m_span, "makespan_simulated": s_span,
        "makespan_error": _rel(s_span, m_span),
        "busy": busy, "busy_error_mean": sum(errs) / len(errs) if errs else math.nan,
        "start_offset_median": med,
        "start_offset_frac": med / step_time if step_time > 0 and offs else math.nan,
        "matched": len(common), "n_measured": len(measured), "n_simulated": len(simulated),
        "warnings": warnings,
    }


def _pct(x: float, sign: bool = True) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:+.2%}" if sign else f"{x:.2%}"


def error_table(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (quantity, measured, simulated, error) for text and HTML reports."""
    rows = [("makespan", f"{result['makespan_measured']:.6g}",
             f"{result['makespan_simulated']:.6g}", _pct(result["makespan_error"]))]
    for b in result["busy"]:
        rows.append((f"busy rank {b['rank']}", f"{b['measured']:.6g}", f"{b['simulated']:.6g}",
                     _pct(b["error"])))
    rows.append(("mean |busy error|", "", "", _pct(result["busy_error_mean"], sign=False)))
    frac = result["start_offset_frac"]
    rows.append(("median |start offset| / step", "", "",
                 f"{frac:.3g} ({result['matched']} ops matched)" if math.isfinite(frac)
                 else f"n/a ({result['matched']} ops matched)"))
    return rows


def format_report(result: dict[str, Any]) -> str:
    rows = [("quantity", "measured", "simulated", "error")] + error_table(result)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    warn = "".join(f"warning: {w}\n" for w in result.get("warnings", []))
    return warn + "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def compare_files(measured: str | os.PathLike[str], simulated: str | os.PathLike[str],
                  html: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Load two Chrome-trace files, compare them, optionally write the HTML
    report (both timelines and the error table)."""
    m, s = Trace.load(measured), Trace.load(simulated)
    result = compare(m, s)
    if html is not None:
        from bpsim import viz
        viz.comparison_report_html(m, s, error_table(result), path=html)
    return result
