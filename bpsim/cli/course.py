"""``bpsim course build|check|student``: the course notebooks (:mod:`bpsim.course.build`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bpsim.files import check_writable

__all__ = ["add_parser", "cmd"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``course`` to an argparse subparsers object."""
    p = sub.add_parser("course", help="build and check the course notebooks", description=(
        "build: execute lessons/NN-*.py into notebooks/NN-*.ipynb; check: notebooks match their "
        "lessons and ran top to bottom; student: write student versions without solutions"))
    p.add_argument("action", choices=["build", "check", "student"])
    p.add_argument("lessons", nargs="*", metavar="NN",
                   help="lesson numbers (build only; default all)")
    p.add_argument("--out", help="output folder (default notebooks/, or student/ for student)")
    p.set_defaults(func=cmd)


def cmd(args: argparse.Namespace) -> int:
    """Run ``bpsim course`` on parsed arguments."""
    from bpsim.course import build as b

    if args.lessons:
        b.lessons(only=args.lessons)          # ValueError names an unknown lesson
        if args.action != "build":
            raise ValueError(f"course {args.action} covers every lesson; lesson numbers "
                             "apply to course build only")
    out = Path(args.out) if args.out else None
    if out is not None and args.action != "check":
        check_writable(out, "--out", folder=True)
    if out is not None and args.action == "check" and not out.is_dir():
        raise ValueError(f"--out {out} is not a folder; give the folder that holds the built "
                         "notebooks (default notebooks/), or build them there first with "
                         f"`bpsim course build --out {out}`")
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
