"""Training methods, one module each, on the ``Trainer`` protocol of ``base``.

``get_trainer(name)`` maps the algorithm names used everywhere (CLI, API,
traces) to their trainer classes, importing the module only when asked.
"""

from __future__ import annotations

import importlib

__all__ = ["ALGORITHMS", "get_trainer"]

#: algorithm name -> (module, trainer class)
ALGORITHMS: dict[str, tuple[str, str]] = {
    "bp": ("bpsim.algorithms.backprop", "BackpropTrainer"),
    "blockprop": ("bpsim.algorithms.blockprop", "BlockPropTrainer"),
    "blockprop-cached": ("bpsim.algorithms.blockprop", "CachedBlockPropTrainer"),
    "dgl": ("bpsim.algorithms.dgl", "DGLTrainer"),
    "greedy": ("bpsim.algorithms.dgl", "GreedyTrainer"),
    "dgl-async": ("bpsim.algorithms.async_dgl", "AsyncDGLTrainer"),
    "bwbpf": ("bpsim.algorithms.bwbpf", "BWBPFTrainer"),
}


def get_trainer(name: str):
    """The trainer class of algorithm ``name`` (``ValueError`` if unknown)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    module, cls = ALGORITHMS[name]
    return getattr(importlib.import_module(module), cls)
