"""The ``bpsim simulate`` and ``bpsim compare`` subcommands.

``bpsim/cli.py`` owns the top-level parser; it calls :func:`add_parsers`
and turns ``ValueError``/``FileNotFoundError`` into one stderr line and
exit code 2. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

from bpsim.trace import json_safe

__all__ = ["add_parsers", "parse_slowdown"]


def parse_slowdown(items: list[str] | None) -> dict[int, float]:
    """``["2:1.5", "3:2,4:1.2"]`` -> ``{2: 1.5, 3: 2.0, 4: 1.2}`` (blocks 1-based)."""
    out: dict[int, float] = {}
    for item in items or []:
        for part in [p.strip() for p in item.split(",") if p.strip()]:
            try:
                j, s = part.split(":")
                out[int(j)] = float(s)
            except ValueError:
                raise ValueError(f"--slowdown {part!r} must be BLOCK:FACTOR, e.g. 2:1.5 "
                                 "(block numbers start at 1)") from None
    return out


def _simulate(args: argparse.Namespace) -> int:
    from bpsim.sim import Costs, simulate
    from bpsim.trace import Trace

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
                   microbatches=args.microbatches, buffer=args.buffer,
                   slowdown=parse_slowdown(args.slowdown), nh=args.nh,
                   cache_every=args.cache_every, epochs_steps=args.epoch_steps,
                   placement=args.placement, seed=args.seed, max_reuse=args.max_reuse,
                   protocol=args.protocol)
    if args.trace:
        res.trace.save(args.trace)
    if args.json:
        print(json.dumps(json_safe(res.to_dict()), allow_nan=False))
    else:
        print(res.summary())
        if args.trace:
            print(f"trace written to {args.trace} (open it in https://ui.perfetto.dev)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from bpsim.sim.compare import compare_files, format_report

    result = compare_files(args.measured, args.simulated, html=args.html)
    if args.json:
        print(json.dumps(json_safe(result), allow_nan=False))
    else:
        print(format_report(result))
        if args.html:
            print(f"report written to {args.html}")
    return 0


def add_parsers(subparsers: Any) -> None:
    """Add ``simulate`` and ``compare`` to an argparse subparsers object."""
    from bpsim.sim.engine import ALGORITHMS, PROTOCOLS

    p = subparsers.add_parser(
        "simulate", help="predict a training timeline with the SimPy simulator",
        description="Simulate the device timeline of one training regime.")
    p.add_argument("algo", metavar="ALGO",
                   help=f"one of {', '.join(ALGORITHMS)} (dgl-sync = dgl)")
    p.add_argument("--blocks", type=int, default=4, metavar="K", help="number of blocks")
    p.add_argument("--steps", type=int, default=100, metavar="N", help="minibatch steps")
    p.add_argument("--cost", default=None, metavar="SPEC",
                   help="costs, e.g. fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05 "
                        "(also hstep, bwd_in, wake, wake_tau, recv, bandwidth, bytes, spread, "
                        "contention; KEY@BLOCK=V "
                        "per block)")
    p.add_argument("--microbatches", type=int, default=1, metavar="m",
                   help="gpipe/1f1b micro-batches")
    p.add_argument("--buffer", type=int, default=50, metavar="M", help="dgl-async buffer size")
    p.add_argument("--max-reuse", type=int, default=None, metavar="R",
                   help="dgl-async: reads allowed per buffer entry")
    p.add_argument("--slowdown", action="append", metavar="J:S",
                   help="multiply block J's compute costs by S (repeatable)")
    p.add_argument("--nh", type=int, default=1, metavar="N", help="BlockProp h-step iterations")
    p.add_argument("--cache-every", type=int, default=1, metavar="E",
                   help="blockprop-cached: h-step every E epochs")
    p.add_argument("--epoch-steps", type=int, default=None, metavar="S",
                   help="blockprop-cached: steps per epoch (default: all steps)")
    p.add_argument("--placement", default=None, metavar="DEVICES",
                   help="device per block, e.g. 0,0,1,1, or a device count D")
    p.add_argument("--calibrate", default=None, metavar="MEASURED.json",
                   help="take costs from a measured trace (--cost then overrides keys)")
    p.add_argument("--draws", choices=("empirical", "lognormal", "median"), default=None,
                   help="with --calibrate: draw each op's time from the measured distribution "
                        "(default), from a lognormal with the measured spread, or take every "
                        "op's median")
    p.add_argument("--trace", default=None, metavar="SIM.json",
                   help="write the simulated Chrome trace (Perfetto)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="auto",
                   help="how messages move: eager (sent when ready, the runtime's background "
                        "receivers), rendezvous (sent when the receiver asks, torch's pipelining), "
                        "auto (default: rendezvous for gpipe and 1f1b)")
    p.add_argument("--seed", type=int, default=0, help="seed of random cost draws")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_simulate)

    c = subparsers.add_parser(
        "compare", help="compare a measured and a simulated trace",
        description="Makespan, busy-time and start-time errors of a simulated trace.")
    c.add_argument("measured", metavar="MEASURED.json")
    c.add_argument("simulated", metavar="SIMULATED.json")
    c.add_argument("--html", default=None, metavar="REPORT.html",
                   help="write both timelines and the error table as HTML")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=_compare)
