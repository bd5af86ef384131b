"""``bpsim run``: train with one process per block (:mod:`bpsim.runtime`).

Bad input ends with one stderr line and exit code 2 before any process
starts; a failed rank ends the command with one stderr line naming the rank
and exit code 1 (with ``--json``, the partial summary on stdout). SIGTERM
ends it with exit code 143, Ctrl-C with 130, each after the partial trace
is written; a second signal while it stops is absorbed.

Under torchrun, srun or a hand launch (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` set) the command runs one rank of the job
(:func:`bpsim.runtime.launch.run_job`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from bpsim.cli import types as T
from bpsim.cli.args import add_algo, add_method_options, add_net_and_sgd_args, method_options

__all__ = ["add_parser", "cmd", "config_from_args"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``run`` to an argparse subparsers object."""
    p = sub.add_parser(
        "run", help="train with one process per block (torch.distributed)",
        description=(
            "Train a BlockNet with one process per block on this host (or under torchrun "
            "across hosts), record a timeline of every rank and report throughput. "
            "Example: bpsim run dgl --workers 2 --steps 200 --width 1024 --batch-size 128 "
            "--trace dgl.json --json"))
    add_algo(p, runtime=True)
    p.add_argument("--workers", type=T.positive_int, default=2, metavar="K",
                   help="processes; rank k holds block k+1 (1: every block in one process, "
                        "the speedup reference)")
    p.add_argument("--blocks", type=T.positive_int, default=None,
                   help="blocks of the net (default: --workers; give it with --workers 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu or cuda (rank k on cuda:(local rank mod #GPUs))")
    p.add_argument("--steps", type=T.positive_int, default=100, metavar="N", help="training steps")
    add_net_and_sgd_args(p)
    add_method_options(p)
    g = p.add_argument_group("slow blocks")
    g.add_argument("--slowdown", type=T.slowdown, action="append", metavar="BLOCK:S",
                   help="make block BLOCK (1-based, as in bpsim simulate; its process is rank "
                        "BLOCK-1) S times slower by doing S-1 times each op's duration of extra "
                        "real work (repeatable)")
    r = p.add_argument_group("execution")
    r.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="torch.distributed backend: auto (default) is NCCL with --device cuda "
                        "when this host has a GPU for each of its ranks, else gloo")
    r.add_argument("--threads", type=T.positive_int, default=None,
                   help="torch threads per worker (default: the idle cores of this host, by its "
                        "load average, divided among the ranks on it; at least 1)")
    r.add_argument("--cpus", type=T.cpus, default=None, metavar="IDS",
                   help="run every worker on these CPUs only, e.g. 0,1 or 0-3 (K ranks on fewer "
                        "cores; compare with bpsim simulate --placement)")
    r.add_argument("--timeout", type=T.timeout, default=20.0, metavar="SECONDS",
                   help="a rank gives up when a peer sends nothing for this long (default 20)")
    r.add_argument("--host", type=T.host, default="127.0.0.1",
                   help="address the rendezvous binds (default 127.0.0.1)")
    r.add_argument("--trace", type=T.out_file, default=None, metavar="OUT.json",
                   help="write the merged Chrome trace (open it in https://ui.perfetto.dev)")
    r.add_argument("--no-spans", action="store_true",
                   help="do not record spans (to measure tracing overhead; no busy fractions)")
    r.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation")
    # (room for more run options here)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~bpsim.runtime.launch.RunConfig` of parsed ``bpsim run`` arguments.

    Method options that are fields of ``RunConfig`` (``aux``, ``microbatches``,
    ``buffer``, ``max_reuse``) go there, the others into ``options``.
    """
    from bpsim.runtime.launch import RunConfig

    if args.no_spans and args.trace:
        raise ValueError("--no-spans records no spans, so --trace would have nothing to write; "
                         "leave out one of them")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    resolved = method_options(args)
    direct = {k: v for k, v in resolved.items() if k in fields}
    options = {k: v for k, v in resolved.items() if k not in fields and v is not None}
    return RunConfig(
        algo=args.algo, workers=args.workers, blocks=args.blocks, steps=args.steps,
        device=args.device, data=args.data, model=args.model, width=args.width, depth=args.depth,
        batch_size=args.batch_size, seed=args.seed, lr=T.one(args.lr),
        momentum=args.momentum, weight_decay=args.weight_decay, options=options,
        slowdown=T.slowdowns(args.slowdown), threads=args.threads, cpus=args.cpus,
        timeout=args.timeout, host=args.host, trace=args.trace, record=not args.no_spans,
        evaluate=not args.no_eval, n_train=args.n_train, n_test=args.n_test,
        backend=getattr(args, "backend", None), **direct)


def _human(s: dict[str, Any]) -> str:
    def pct(v: float | None, digits: int = 0) -> str:
        return "n/a" if v is None else f"{100 * v:.{digits}f}%"

    loss = s.get("train_loss")
    lines = [f"{s['algorithm']}: {s['workers']} worker(s), {s['blocks']} block(s) on "
             f"{s['device']} ({s['backend']}, {s['threads']} thread(s) each): {s['steps']} steps "
             f"in {s['wall_time']:.2f} s, {s['throughput']:.1f} samples/s",
             f"busy fraction per rank: {', '.join(pct(b) for b in s['busy_fraction'])}; "
             f"train loss {'n/a' if loss is None else f'{loss:.4f}'}; "
             f"test accuracy {pct(s.get('test_accuracy'), 2)}"]
    if s.get("trace"):
        lines.append(f"trace written to {s['trace']} (open it in https://ui.perfetto.dev)")
    return "\n".join(lines)


def cmd(args: argparse.Namespace) -> int:
    """Run ``bpsim run`` on parsed arguments."""
    from bpsim.algorithms import get_trainer
    from bpsim.cli.train import check_net_size
    from bpsim.runtime.launch import (RunFailed, RunStopped, _Terminate, hold_signals, job_env,
                                      run, run_job)

    hold_signals()                     # this process ends after the run: no signal cuts cleanup
    cfg = config_from_args(args)
    check_net_size(cfg.model, cfg.data, cfg.blocks or cfg.workers, cfg.width, cfg.depth,
                   cfg.aux, get_trainer(cfg.algo).output_layer)
    try:
        job = job_env()                # ValueError on a partial set of RANK, WORLD_SIZE, ...
        if job is not None:
            res = run_job(cfg, job)
            if res is None:            # ranks other than 0 print nothing
                return 0
        else:
            res = run(cfg)
    except RunFailed as e:
        print(f"bpsim run: error: {' '.join(str(e).split())}", file=sys.stderr)
        if args.json and e.result is not None:
            print(json.dumps(e.result.summary, allow_nan=False))
        return 1
    except RunStopped as e:            # SIGTERM: ranks stopped, partial trace written
        print(f"bpsim run: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except _Terminate:                 # SIGTERM before or after the run itself
        print("bpsim run: stopped by SIGTERM", file=sys.stderr)
        return 143
    if args.json:
        print(json.dumps(res.summary, allow_nan=False))
    else:
        print(_human(res.summary))
    if res.summary.get("trace_error"):  # the run's numbers are above; its trace is lost
        print(f"bpsim run: error: {res.summary['trace_error']}", file=sys.stderr)
        return 2
    return 0
