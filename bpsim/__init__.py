"""bpsim: training neural networks without end-to-end backpropagation.

A course and a library around three papers -- BlockProp, Decoupled Greedy
Learning (DGL) and block-wise BP-free training (BWBPF) -- with a
multi-process runtime that measures device timelines and a SimPy simulator
that predicts them.

Submodules are imported lazily, so ``import bpsim`` is cheap and never pulls
in torch or Jupyter: ``bpsim.sim`` works without torch installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "data", "nets", "objectives", "algorithms", "replay", "theory", "trace",
    "runtime", "sim", "viz", "course", "cli",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"bpsim.{name}")
    raise AttributeError(f"module 'bpsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_SUBMODULES))
