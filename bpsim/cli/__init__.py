"""The ``bpsim`` command: train, run, simulate, compare, course, trace.

One module per sub-command (:mod:`~bpsim.cli.train`, :mod:`~bpsim.cli.run`,
:mod:`~bpsim.cli.simulate`, :mod:`~bpsim.cli.compare`,
:mod:`~bpsim.cli.course`, :mod:`~bpsim.cli.trace`), the argument types in :mod:`~bpsim.cli.types` and
the groups they share in :mod:`~bpsim.cli.args`. The library never imports
this package.

Every sub-command prints a short human summary, or with ``--json`` exactly
one JSON object on stdout. Bad input (an unknown name, a value out of range,
a missing dataset, an unwritable output path, a trace file of another shape)
ends with one line on stderr and exit code 2, never a traceback; Ctrl-C
ends with one line and exit code 130. Heavy imports (torch) happen inside
the sub-commands, so ``bpsim simulate`` starts fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bpsim.cli import compare, course, run, simulate, trace, train

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``bpsim`` argument parser with every sub-command."""
    from bpsim import __version__

    parser = _Parser(prog="bpsim",
                     description="Training without end-to-end backprop: BlockProp, DGL, BWBPF.")
    parser.add_argument("--version", action="version", version=f"bpsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in (train, run, simulate, compare, course, trace):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bpsim`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    0 success, 1 a failed run (``bpsim run``: a rank failed; ``course check``:
    notebooks out of date), 2 bad input (one line on stderr), 130 interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:             # usage errors, --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:   # TraceError, DivergenceError are ValueErrors
        msg = " ".join(str(e).split())
        print(f"bpsim {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bpsim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
