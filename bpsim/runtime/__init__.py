"""Real execution: one process per block over ``torch.distributed``.

``run(RunConfig("dgl", workers=2, steps=200))`` trains with rank k holding
block k + 1, records every rank's timeline in the trace vocabulary of
:mod:`bpsim.trace` on a shared clock, and returns the summary, the merged
trace and the trained weights. ``bpsim run`` (:mod:`bpsim.cli.run`) is its
command line. The methods it runs and the step each uses come from the
registry :mod:`bpsim.methods` (``Method.runtime``).

Modules, one concept each:

* :mod:`~bpsim.runtime.launch` -- start the ranks, watch them, gather results;
* :mod:`~bpsim.runtime.worker` -- what one rank does, and the two executors;
* :mod:`~bpsim.runtime.schedules` -- one block's step for each method;
* :mod:`~bpsim.runtime.pipeline` -- GPipe / 1F1B on ``torch.distributed.pipelining``;
* :mod:`~bpsim.runtime.comm` -- messages: requests, links, receiver threads;
* :mod:`~bpsim.runtime.clock` -- the shared clock (zero and offsets);
* :mod:`~bpsim.runtime.record` -- crash-proof span spools, merging.

``bpsim run`` (:mod:`bpsim.cli.run`) is the command line over :func:`run`.

See ``docs/runtime.md`` for usage, ``torchrun`` across hosts, GPUs, faults
and viewing traces.
"""

from __future__ import annotations

from bpsim.runtime.launch import ALGORITHMS, RunConfig, RunFailed, RunResult, RunStopped, run

__all__ = ["run", "RunConfig", "RunResult", "RunFailed", "RunStopped", "ALGORITHMS"]
