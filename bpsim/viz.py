"""Plotly figures for the course: timelines, comparisons and learning curves.

plotly is imported inside the functions, so importing this module is cheap;
nothing here imports torch. Each family of figures has its own section.
"""

from __future__ import annotations

import html as _html
import os
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from bpsim.trace import Trace

__all__ = ["OP_COLORS", "timeline", "timelines", "comparison_report_html", "learning_curves"]


# =====================================================================
# Timelines (Gantt charts of bpsim.trace.Trace)
# =====================================================================

#: One colour per op of the trace vocabulary (DESIGN.md).
OP_COLORS = {
    "fwd": "#4C78A8", "bwd": "#E45756", "aux": "#F58518", "update": "#54A24B",
    "hstep": "#B279A2", "send": "#9D755D", "recv": "#BAB0AC", "wait": "#EEEEEE",
    "loss": "#EECA3B",
}
_LANE_ORDER = {"compute": 0, "comm": 1}


def _limit(trace: "Trace", max_spans: int | None) -> tuple[list[tuple], bool]:
    rows = trace.rows
    if max_spans is None or len(rows) <= max_spans:
        return rows, False
    return sorted(rows, key=lambda r: r[6])[:max_spans], True


def _add_timeline(fig: "go.Figure", trace: "Trace", row: int | None,
                  max_spans: int | None, legend: bool) -> bool:
    import plotly.graph_objects as go

    rows, cut = _limit(trace, max_spans)
    t_start = trace.start
    by_op: dict[str, list[tuple]] = {}
    for r in rows:
        by_op.setdefault(r[2], []).append(r)
    # One y category per (rank, lane), compute above comm, rank 0 on top.
    cats = sorted({(r[0], r[1]) for r in rows}, key=lambda k: (k[0], _LANE_ORDER.get(k[1], 9)))
    labels = [f"rank {k} {lane}" for k, lane in cats]
    for op in [o for o in OP_COLORS if o in by_op] + sorted(set(by_op) - set(OP_COLORS)):
        rs = by_op[op]
        bar = go.Bar(
            orientation="h", name=op, legendgroup=op, showlegend=legend,
            y=[f"rank {r[0]} {r[1]}" for r in rs],
            base=[r[6] - t_start for r in rs], x=[r[7] - r[6] for r in rs],
            marker_color=OP_COLORS.get(op, "#888888"),
            customdata=[(r[3], r[4], r[5], r[6] - t_start, r[7] - t_start) for r in rs],
            hovertemplate=(f"<b>{op}</b> block %{{customdata[0]}} step %{{customdata[1]}}"
                           " mb %{customdata[2]}<br>%{customdata[3]:.6g} -> "
                           "%{customdata[4]:.6g}<extra></extra>"),
        )
        if row is None:
            fig.add_trace(bar)
        else:
            fig.add_trace(bar, row=row, col=1)
    yaxis = dict(categoryorder="array", categoryarray=labels[::-1], type="category")
    if row is None:
        fig.update_yaxes(**yaxis)
    else:
        fig.update_yaxes(row=row, col=1, **yaxis)
    return cut


def timeline(trace: "Trace", title: str | None = None,
             max_spans: int | None = 20000) -> "go.Figure":
    """Gantt chart of a trace: one row per (rank, lane), one colour per op.

    Hovering a bar shows op, block, step, micro-batch and its times (from
    the trace's first span). Only the first ``max_spans`` spans are drawn.
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    cut = _add_timeline(fig, trace, None, max_spans, True)
    name = title or str(trace.meta.get("algo") or "timeline")
    if cut:
        name += f" (first {max_spans} of {len(trace)} spans)"
    fig.update_layout(title=name, barmode="overlay", xaxis_title="time",
                      height=120 + 40 * max(1, len({(r[0], r[1]) for r in trace.rows})),
                      legend_title="op", bargap=0.2)
    return fig


def timelines(traces: Sequence["Trace"], titles: Sequence[str] | None = None,
              max_spans: int | None = 20000) -> "go.Figure":
    """Several timelines stacked one above the other on a shared time axis."""
    from plotly.subplots import make_subplots

    n = len(traces)
    if n == 0:
        raise ValueError("timelines needs at least one trace")
    titles = list(titles) if titles is not None else [
        str(t.meta.get("algo") or f"trace {i + 1}") for i, t in enumerate(traces)]
    if len(titles) != n:
        raise ValueError(f"got {n} traces but {len(titles)} titles; give one title per trace")
    lanes = [max(1, len({(r[0], r[1]) for r in t.rows})) for t in traces]
    fig = make_subplots(rows=n, cols=1, shared_xaxes=True, subplot_titles=titles,
                        vertical_spacing=0.08, row_heights=[float(x) for x in lanes])
    for i, t in enumerate(traces):
        _add_timeline(fig, t, i + 1, max_spans, legend=(i == 0))
    fig.update_layout(barmode="overlay", height=150 + 40 * sum(lanes), legend_title="op")
    fig.update_xaxes(title_text="time", row=n, col=1)
    return fig


# =====================================================================
# Comparison report (bpsim compare --html)
# =====================================================================

def comparison_report_html(measured: "Trace", simulated: "Trace",
                           table: Sequence[Sequence[str]],
                           path: str | os.PathLike[str] | None = None,
                           title: str = "bpsim: measured vs simulated") -> str:
    """A self-contained HTML page: both timelines, measured above simulated,
    and the error table (rows of quantity, measured, simulated, error).

    Returns the HTML; with ``path`` also writes it atomically.
    """
    from bpsim.trace import atomic_write_text

    fig = timelines([measured, simulated], ["measured", "simulated"])
    head = ("<tr><th>quantity</th><th>measured</th><th>simulated</th><th>error</th></tr>")
    body = "".join("<tr>" + "".join(f"<td>{_html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in table)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{_html.escape(title)}</title><style>body{{font-family:sans-serif;"
        "margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 10px;text-align:right}td:first-child{text-align:left}</style></head><body>"
        f"<h1>{_html.escape(title)}</h1><table>{head}{body}</table>"
        + fig.to_html(full_html=False, include_plotlyjs=True)
        + "</body></html>")
    if path is not None:
        atomic_write_text(path, page)
    return page


# =====================================================================
# Learning curves (bpsim.algorithms.base.History)
# =====================================================================

def learning_curves(histories: "dict[str, Any]", title: str | None = None,
                    metrics: Sequence[str] = ("train_loss", "test_accuracy")) -> "go.Figure":
    """Per-epoch curves of several runs, one panel per metric.

    Parameters
    ----------
    histories : run label -> ``History`` (anything with the list attributes
        named in ``metrics``, e.g. ``train_loss`` and ``test_accuracy``).
    title : figure title.
    metrics : which ``History`` columns to draw, one subplot each.
    """
    from plotly.subplots import make_subplots

    if not histories:
        raise ValueError("learning_curves needs at least one History")
    names = {"train_loss": "training loss", "test_accuracy": "test accuracy", "test_loss": "test loss",
             "wall_time": "wall time per epoch (s)"}
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[names.get(m, m) for m in metrics])
    palette = ["#4C78A8", "#E45756", "#54A24B", "#F58518", "#B279A2", "#72B7B2", "#9D755D", "#EECA3B"]
    for i, (label, hist) in enumerate(histories.items()):
        color = palette[i % len(palette)]
        for c, metric in enumerate(metrics, start=1):
            values = list(getattr(hist, metric))
            fig.add_scatter(x=list(range(1, len(values) + 1)), y=values, mode="lines+markers", name=label,
                            legendgroup=label, showlegend=c == 1, line={"color": color}, row=1, col=c)
            fig.update_xaxes(title_text="epoch", row=1, col=c)
    fig.update_layout(title=title, height=360, margin={"t": 60, "b": 40})
    return fig
