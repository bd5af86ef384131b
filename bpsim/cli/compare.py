"""``bpsim compare``: errors of a simulated trace against a measured one."""

from __future__ import annotations

import argparse
import json

from bpsim.cli import types as T
from bpsim.files import check_writable, json_safe

__all__ = ["add_parser", "cmd"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``compare`` to an argparse subparsers object."""
    c = sub.add_parser(
        "compare", help="compare a measured and a simulated trace",
        description="Makespan, busy-time and start-time errors of a simulated trace.")
    c.add_argument("measured", metavar="MEASURED.json")
    c.add_argument("simulated", metavar="SIMULATED.json")
    c.add_argument("--html", type=T.out_file, default=None, metavar="REPORT.html",
                   help="write both timelines and the error table as HTML")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=cmd)


def cmd(args: argparse.Namespace) -> int:
    """Run ``bpsim compare`` on parsed arguments."""
    from bpsim.sim.compare import compare_files, format_report

    if args.html:
        check_writable(args.html, "--html", inputs=(args.measured, args.simulated))
    result = compare_files(args.measured, args.simulated, html=args.html)
    if args.json:
        print(json.dumps(json_safe(result), allow_nan=False))
    else:
        print(format_report(result))
        if args.html:
            print(f"report written to {args.html}")
    return 0
