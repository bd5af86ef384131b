"""``bpsim course build|check|student``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("course", help="build and check the course notebooks", description=(
        "build: execute lessons/NN-*.py into notebooks/NN-*.ipynb; check: notebooks match their "
        "lessons and ran top to bottom; student: write student versions without solutions"))
    p.add_argument("action", choices=["build", "check", "student"])
    p.add_argument("lessons", nargs="*", metavar="NN", help="lesson numbers (build only; default all)")
    p.add_argument("--out", help="output folder (default notebooks/, or student/ for student)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bpsim.course import build as b

    out = Path(args.out) if args.out else None
    if args.action == "build":
        b.build(args.lessons or None, out_dir=out)
        return 0
    if args.action == "student":
        for p in b.student(out_dir=out):
            print(f"wrote {p}")
        return 0
    problems = b.check(out_dir=out)
    for p in problems:
        print(f"course check: {p}", file=sys.stderr)
    if not problems:
        print(f"course check: {len(b.lessons())} lessons and notebooks in sync, executed in order")
    return 1 if problems else 0
