"""Compare a simulated timeline with a measured one (issue 5, item 5).

Three numbers say how well the simulator predicts a run:

* the **makespan error** ``(simulated - measured) / measured``;
* the **busy-time error** per rank, ``(busy_sim - busy_meas) / busy_meas``
  of the compute lane, and its mean absolute value;
* the **start offset**: ops are matched by (rank, lane, op, block, step,
  microbatch, occurrence); the median of ``|start_sim - start_meas|``
  (each trace measured from its own first span) divided by the measured
  mean step time (makespan / number of steps).
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from typing import Any

from bpsim.trace import Trace

__all__ = ["compare", "compare_files", "error_table", "format_report"]


def _rel(sim: float, meas: float) -> float:
    if meas == 0:
        return 0.0 if sim == 0 else math.inf
    return (sim - meas) / meas


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
    }


def error_table(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (quantity, measured, simulated, error) for text and HTML reports."""
    rows = [("makespan", f"{result['makespan_measured']:.6g}",
             f"{result['makespan_simulated']:.6g}", f"{result['makespan_error']:+.2%}")]
    for b in result["busy"]:
        rows.append((f"busy rank {b['rank']}", f"{b['measured']:.6g}", f"{b['simulated']:.6g}",
                     f"{b['error']:+.2%}"))
    rows.append(("mean |busy error|", "", "", f"{result['busy_error_mean']:.2%}"))
    rows.append(("median |start offset| / step", "", "",
                 f"{result['start_offset_frac']:.3g} ({result['matched']} ops matched)"))
    return rows


def format_report(result: dict[str, Any]) -> str:
    rows = [("quantity", "measured", "simulated", "error")] + error_table(result)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


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
