"""SimPy simulator of block-parallel training timelines.

``simulate(algo, blocks=K, steps=N, costs=...)`` predicts the device
timeline of a training regime and returns a :class:`SimResult` whose
``trace`` has the same schema as a measured run (:mod:`bpsim.trace`), so
:mod:`bpsim.sim.compare` can put prediction and measurement side by side.
Never imports torch. See ``docs/simulator.md`` for the model, the costs and
their calibration, the tested closed forms and the measured fidelity.
"""

from __future__ import annotations

from bpsim.sim.costs import Costs
from bpsim.sim.engine import ALGORITHMS, simulate
from bpsim.sim.results import SimResult

__all__ = ["simulate", "Costs", "SimResult", "ALGORITHMS"]
