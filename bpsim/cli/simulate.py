"""``bpsim simulate``: predict a training timeline with the SimPy simulator.

Nothing here imports torch, so ``bpsim simulate`` starts fast.
"""

from __future__ import annotations

import argparse
import inspect
import json
from dataclasses import replace
from typing import Any

from bpsim.cli import types as T
from bpsim.cli.args import add_algo, add_method_options, method_options
from bpsim.files import check_writable, json_safe

__all__ = ["add_parser", "cmd"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``simulate`` to an argparse subparsers object."""
    p = sub.add_parser(
        "simulate", help="predict a training timeline with the SimPy simulator",
        description="Simulate the device timeline of one training regime. Method options "
                    "take the same defaults as in bpsim train and bpsim run; those that do not "
                    "change the timeline (--lam, --lr-h, --aux) are checked and then ignored.")
    add_algo(p, optional=True)
    p.add_argument("--blocks", type=T.positive_int, default=4, metavar="K", help="number of blocks")
    p.add_argument("--steps", type=T.positive_int, default=100, metavar="N", help="minibatch steps")
    p.add_argument("--cost", type=T.nonempty, default=None, metavar="SPEC",
                   help="costs, e.g. fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05 "
                        "(also hstep, bwd_in, recv, bandwidth, bytes, spread; KEY@BLOCK=V per block)")
    add_method_options(p)
    p.add_argument("--slowdown", type=T.slowdown, action="append", metavar="J:S",
                   help="multiply block J's compute costs by S (repeatable, or J:S,J:S)")
    p.add_argument("--steps-per-epoch", "--epoch-steps", dest="steps_per_epoch",
                   type=T.positive_int, default=None, metavar="S",
                   help="blockprop-cached: steps per epoch (default: all steps)")
    p.add_argument("--placement", type=T.nonempty, default=None, metavar="DEVICES",
                   help="device per block, e.g. 0,0,1,1, or a device count D")
    p.add_argument("--calibrate", default=None, metavar="MEASURED.json",
                   help="take costs from a measured trace (--cost then overrides keys)")
    p.add_argument("--draws", choices=("empirical", "lognormal", "median"), default=None,
                   help="with --calibrate: draw each op's time from the measured distribution "
                        "(default), from a lognormal with the measured spread, or take every "
                        "op's median")
    p.add_argument("--replay", default=None, metavar="MEASURED.json",
                   help="replay a measured run (bpsim run --trace) with its own op durations "
                        "through the model's dependencies; everything else comes from its meta")
    # (room for more simulate options here)
    p.add_argument("--trace", type=T.out_file, default=None, metavar="SIM.json",
                   help="write the simulated Chrome trace (Perfetto)")
    p.add_argument("--protocol", type=T.nonempty, default="auto",
                   help="how messages move: eager (sent when ready, the runtime's background "
                        "receivers), rendezvous (sent when the receiver asks, torch's pipelining), "
                        "auto (default: rendezvous for gpipe and 1f1b)")
    p.add_argument("--seed", type=T.seed, default=0, help="seed of random cost draws")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd)


def cmd(args: argparse.Namespace) -> int:
    """Run ``bpsim simulate`` on parsed arguments."""
    from bpsim.sim import Costs, simulate
    from bpsim.trace import Trace

    if args.trace:      # never one of the inputs, whatever the other options
        check_writable(args.trace, "--trace", inputs=(args.calibrate, args.replay))
    if args.replay is not None:
        return _replay(args)
    if args.algo is None:
        raise ValueError("give a method (bpsim simulate ALGO ...) or --replay MEASURED.json")
    options = method_options(args)
    takes = inspect.signature(simulate).parameters
    options = {k: v for k, v in options.items() if k in takes}
    costs = Costs()
    if args.draws and not args.calibrate:
        raise ValueError("--draws chooses how costs from --calibrate MEASURED.json are drawn; give "
                         "--calibrate too, or --cost spread=S for lognormal draws of --cost costs")
    if args.calibrate:
        measured = Trace.load(args.calibrate)
        if args.draws == "median":   # every op exactly its median
            costs = replace(Costs.from_trace(measured, draws="lognormal"), spread=0.0)
        else:
            costs = Costs.from_trace(measured, draws=args.draws or "empirical")
    if args.cost:
        costs = Costs.parse(args.cost, base=costs)
    res = simulate(args.algo, blocks=args.blocks, steps=args.steps, costs=costs,
                   slowdown=T.slowdowns(args.slowdown), steps_per_epoch=args.steps_per_epoch,
                   placement=args.placement, seed=args.seed, protocol=args.protocol, **options)
    return _report(args, res)


def _report(args: argparse.Namespace, res: Any) -> int:
    """Write ``res.trace`` to ``--trace``; print ``res`` as JSON or its summary."""
    if args.trace:
        res.trace.save(args.trace)
    if args.json:
        print(json.dumps(json_safe(res.to_dict()), allow_nan=False))
    else:
        print(res.summary())
        if args.trace:
            print(f"trace written to {args.trace} (open it in https://ui.perfetto.dev)")
    return 0


def _replay(args: argparse.Namespace) -> int:
    """``bpsim simulate --replay MEASURED.json``: the run is read from the trace."""
    from bpsim.sim import replay
    from bpsim.trace import Trace

    if args.algo is not None or args.cost or args.calibrate:
        raise ValueError("--replay reads the method, options and op durations from the trace; "
                         "leave out ALGO, --cost and --calibrate")
    return _report(args, replay(Trace.load(args.replay)))
