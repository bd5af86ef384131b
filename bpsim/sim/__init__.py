"""SimPy simulator of block-parallel training timelines.

``simulate(algo, blocks=K, steps=N, costs=...)`` predicts the device
timeline of a training regime and returns a :class:`SimResult` whose
``trace`` has the same schema as a measured run (:mod:`bpsim.trace`), so
:mod:`bpsim.sim.compare` can put prediction and measurement side by side.
``simulate_like(trace, costs)`` re-simulates a measured run from its meta;
``replay(trace)`` plays a measured run's own op durations through the
model's dependencies. Never imports torch. See ``docs/simulator.md``.
"""

from __future__ import annotations

from bpsim.sim.api import simulate, simulate_like
from bpsim.sim.costs import Costs
from bpsim.sim.playback import replay
from bpsim.sim.results import SimResult

__all__ = ["simulate", "simulate_like", "replay", "Costs", "SimResult"]
