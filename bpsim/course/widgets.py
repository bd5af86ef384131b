"""Interactive explorers that degrade gracefully.

``explorer(fn, params)`` shows sliders and a plotly figure. In a live
Jupyter kernel the figure redraws when a slider moves; in
a static context (``BPSIM_STATIC=1`` as set by ``bpsim course build``, or no
kernel at all) it is a plain plotly figure whose slider steps through frames
precomputed over the grid of parameter values -- so a notebook read on
GitHub or as HTML still lets the reader move the slider.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

__all__ = ["explorer", "live_mode"]


def live_mode() -> bool:
    """True in a Jupyter kernel unless ``BPSIM_STATIC=1``."""
    if os.environ.get("BPSIM_STATIC", "") not in ("", "0"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def _label(name: str, value: Any) -> str:
    return f"{name}={value:g}" if isinstance(value, (int, float)) else f"{name}={value}"


def explorer(
    fn: Callable[..., Sequence[Any]],
    params: Mapping[str, Sequence[Any]],
    *,
    defaults: Mapping[str, Any] | None = None,
    layout: Mapping[str, Any] | None = None,
    live: bool | None = None,
    max_frames: int = 80,
):
    """Sliders over ``params`` driving the traces returned by ``fn(**values)``.

    Parameters
    ----------
    fn : returns a list of plotly traces (``go.Scatter(...)`` etc.), the same
        number and kinds of traces for every combination of values.
    params : slider name -> the values it can take (a grid).
    defaults : starting values (default: the first value of each slider).
    layout : plotly layout (title, axis titles, ranges...).
    live : force the live widget (True) or the static figure (False).
    max_frames : refuse static grids larger than this (precomputation cost).

    Returns
    -------
    An ``ipywidgets.VBox`` (live) or a ``plotly.graph_objects.Figure`` (static).
    """
    import plotly.graph_objects as go

    if not params:
        raise ValueError("explorer needs at least one slider in params")
    names = list(params)
    grids = {k: list(v) for k, v in params.items()}
    for k, v in grids.items():
        if not v:
            raise ValueError(f"slider {k!r} has no values")
    start = {k: grids[k][0] for k in names}
    if defaults:
        for k, v in defaults.items():
            if k not in grids or v not in grids[k]:
                raise ValueError(f"default {k}={v!r} is not one of the slider's values {grids.get(k)}")
            start[k] = v
    cached = lru_cache(maxsize=None)(lambda *vals: list(fn(**dict(zip(names, vals)))))
    live = live_mode() if live is None else live

    if live:
        # An Output widget re-displaying a plain plotly figure: plotly 6's
        # FigureWidget (anywidget) can render empty inside an ipywidgets box
        # (plotly.py issue #4998), while a displayed figure always renders.
        import ipywidgets as w
        from IPython.display import display

        out = w.Output()
        sliders = {
            k: w.SelectionSlider(options=grids[k], value=start[k], description=k, continuous_update=False,
                                 layout=w.Layout(width="420px"), style={"description_width": "80px"})
            for k in names
        }

        def redraw(_change=None) -> None:
            fig = go.Figure(data=cached(*(sliders[k].value for k in names)), layout=layout)
            with out:
                out.clear_output(wait=True)
                display(fig)

        for s in sliders.values():
            s.observe(redraw, names="value")
        redraw()
        return w.VBox([*sliders.values(), out])

    combos = list(itertools.product(*(grids[k] for k in names)))
    if len(combos) > max_frames:
        raise ValueError(f"the static explorer would precompute {len(combos)} frames; "
                         f"give fewer slider values (at most {max_frames} combinations)")
    frames = [go.Frame(data=cached(*c), name=", ".join(_label(k, v) for k, v in zip(names, c))) for c in combos]
    first = combos.index(tuple(start[k] for k in names))
    fig = go.Figure(data=frames[first].data, frames=frames, layout=layout)
    fig.update_layout(sliders=[{
        "active": first,
        "currentvalue": {"prefix": "", "font": {"size": 13}},
        "pad": {"t": 40},
        "steps": [{"label": f.name, "method": "animate",
                   "args": [[f.name], {"mode": "immediate", "frame": {"duration": 0, "redraw": True},
                                       "transition": {"duration": 0}}]} for f in frames],
    }])
    return fig
