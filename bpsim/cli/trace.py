"""``bpsim trace merge``: one trace from the span folders a failed job left.

A job started by torchrun, srun or by hand keeps each host's spans in
``<trace>.parts/`` when it fails (:func:`bpsim.runtime.launch.run_job`).
Copy the folders of all hosts to one place and merge them::

    bpsim trace merge hostA/dgl.json.parts hostB/dgl.json.parts -o dgl.json

The trace's meta is the run's settings (``run.json``, left by rank 0) with
``partial: true``.
"""

from __future__ import annotations

import argparse
import json

from bpsim.cli import types as T

__all__ = ["add_parser", "cmd"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``trace`` (with its action ``merge``) to an argparse subparsers object."""
    p = sub.add_parser(
        "trace", help="work with trace files (merge the spans a failed job left)",
        description="Merge the rank*.spans.jsonl files of one or more <trace>.parts folders "
                    "(one per host of a failed job) into one Chrome trace. Example: bpsim trace "
                    "merge a/run.json.parts b/run.json.parts -o run.json")
    acts = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    acts.required = True
    m = acts.add_parser("merge", help="merge .parts folders into one trace",
                        description="Merge the span files of .parts folders into one trace.")
    m.add_argument("parts", nargs="+", metavar="PARTS_DIR",
                   help="a <trace>.parts folder (one per host)")
    m.add_argument("-o", "--out", type=T.out_file, required=True, metavar="OUT.json",
                   help="the trace to write (open it in https://ui.perfetto.dev)")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=cmd)


def cmd(args: argparse.Namespace) -> int:
    """Run ``bpsim trace merge`` on parsed arguments."""
    from bpsim.runtime.launch import merge_parts

    trace = merge_parts(args.parts, args.out)
    ranks = sorted({r[0] for r in trace.rows})
    summary = {"trace": args.out, "spans": len(trace), "ranks": ranks,
               "parts": list(args.parts)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"merged {len(trace)} spans of rank(s) {', '.join(map(str, ranks))} into "
              f"{args.out} (open it in https://ui.perfetto.dev)")
    return 0
