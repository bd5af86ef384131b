"""``bpsim simulate``: predict a training timeline with the SimPy simulator.

Nothing here imports torch, so ``bpsim simulate`` starts fast.
"""

from __future__ import annotations

import argparse
import inspect
import json
from dataclasses import replace
from typing import Any

from bpsim import methods
from bpsim.cli import types as T
from bpsim.cli.args import add_algo, add_method_options, method_options
from bpsim.files import check_writable, json_safe

__all__ = ["add_parser", "cmd"]

#: the defaults of the options --replay reads from the trace instead
_DEFAULTS = {"blocks": 4, "steps": 100, "seed": 0, "protocol": "auto"}
#: the options --replay refuses: the trace's meta gives them (argparse dests)
_FROM_TRACE = ("algo", "blocks", "steps", "cost", "calibrate", "draws", "slowdown",
               "steps_per_epoch", "placement", "seed", "protocol")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``simulate`` to an argparse subparsers object."""
    p = sub.add_parser(
        "simulate", help="predict a training timeline with the SimPy simulator",
        description="Simulate the device timeline of one training regime. Method options "
                    "take the same defaults as in bpsim train and bpsim run; those that do not "
                    "change the timeline (--lam, --lr-h, --aux) are checked and then ignored.")
    add_algo(p, optional=True)
    p.add_argument("--blocks", type=T.positive_int, default=None, metavar="K",
                   help=f"number of blocks (default {_DEFAULTS['blocks']})")
    p.add_argument("--steps", type=T.positive_int, default=None, metavar="N",
                   help=f"minibatch steps (default {_DEFAULTS['steps']})")
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
    p.add_argument("--protocol", type=T.nonempty, default=None,
                   help="how messages move: eager (sent when ready, the runtime's background "
                        "receivers), rendezvous (sent when the receiver asks, torch's pipelining), "
                        "auto (default: rendezvous for gpipe and 1f1b)")
    p.add_argument("--seed", type=T.seed, default=None, help="seed of random cost draws (default 0)")
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
    for k, v in _DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps_per_epoch is not None and args.algo != "blockprop-cached":
        raise ValueError(f"--steps-per-epoch does not apply to {args.algo}; only "
                         "blockprop-cached has epochs in its timeline")
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
    if args.calibrate:
        missing = [j for j in range(1, args.blocks + 1) if j not in costs.per_block]
        if missing:
            j, have = missing[0], ", ".join(map(str, sorted(costs.per_block)))
            raise ValueError(f"--calibrate {args.calibrate} has no costs of block {j} (it "
                             f"measured blocks {have}); simulate fewer --blocks or give block "
                             f"{j}'s costs with --cost fwd@{j}=...,bwd@{j}=...")
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

    given = [k for k in _FROM_TRACE if getattr(args, k) is not None]
    given += [o for o in methods.OPTIONS if getattr(args, o, None) is not None]
    if given:
        flags = ", ".join("ALGO" if k == "algo" else "--" + k.replace("_", "-") for k in given)
        raise ValueError(f"--replay reads the method, its sizes, options and op durations "
                         f"from the trace; leave out {flags}")
    return _report(args, replay(Trace.load(args.replay)))
