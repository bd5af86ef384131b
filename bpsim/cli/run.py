"""The ``bpsim run`` subcommand: train with one process per block.

``bpsim/cli.py`` owns the top-level parser and calls :func:`add_parsers`;
it turns ``ValueError``/``FileNotFoundError`` into one stderr line and exit
code 2 and ``KeyboardInterrupt`` into exit code 130. A failed rank ends the
command with one stderr line naming the rank and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bpsim.cli import _floats, _positive_int, _slowdown, add_net_and_sgd_args

__all__ = ["add_parsers", "config_from_args"]


def _cpus(s: str) -> list[int]:
    try:
        out: list[int] = []
        for part in s.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CPU ids such as 0,1 or 0-3, got {s!r}") from None


def _one(v: list[float] | None) -> float | list[float] | None:
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~bpsim.runtime.launch.RunConfig` of parsed ``bpsim run`` arguments."""
    from bpsim.runtime.launch import RunConfig

    options = {}
    for name in ("lam", "nh", "lr_h", "cache_every"):
        v = getattr(args, name)
        if v is not None:
            options[name] = _one(v)
    return RunConfig(
        algo=args.algo, workers=args.workers, blocks=args.blocks, steps=args.steps,
        device=args.device, data=args.data, model=args.model, width=args.width, depth=args.depth,
        aux=args.aux, batch_size=args.batch_size, seed=args.seed, lr=_one(args.lr),
        momentum=args.momentum, weight_decay=args.weight_decay, options=options,
        microbatches=args.microbatches, buffer=args.buffer, max_reuse=args.max_reuse,
        slowdown=dict(args.slowdown or []), threads=args.threads, cpus=args.cpus,
        timeout=args.timeout, host=args.host, trace=args.trace, record=not args.no_spans,
        evaluate=not args.no_eval, n_train=args.n_train, n_test=args.n_test)


def _human(s: dict[str, Any]) -> str:
    acc = s.get("test_accuracy")
    acc_s = "n/a" if acc is None else f"{100 * acc:.2f}%"
    busy = ", ".join("n/a" if b is None else f"{100 * b:.0f}%" for b in s["busy_fraction"])
    lines = [f"{s['algorithm']}: {s['workers']} worker(s), {s['blocks']} block(s) on "
             f"{s['device']} ({s['backend']}, {s['threads']} thread(s) each): {s['steps']} steps "
             f"in {s['wall_time']:.2f} s, {s['throughput']:.1f} samples/s",
             f"busy fraction per rank: {busy}; train loss {s['train_loss']:.4f}; "
             f"test accuracy {acc_s}"]
    if s.get("trace"):
        lines.append(f"trace written to {s['trace']} (open it in https://ui.perfetto.dev)")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from bpsim.runtime.launch import RunFailed, run, run_torchrun, under_torchrun

    cfg = config_from_args(args)
    try:
        if under_torchrun():
            res = run_torchrun(cfg)
            if res is None:            # ranks other than 0 print nothing
                return 0
        else:
            res = run(cfg)
    except RunFailed as e:
        print(f"bpsim run: error: {' '.join(str(e).split())}", file=sys.stderr)
        if args.json and e.result is not None:
            print(json.dumps(e.result.summary, allow_nan=False))
        return 1
    if args.json:
        print(json.dumps(res.summary, allow_nan=False))
    else:
        print(_human(res.summary))
    return 0


def add_parsers(subparsers: Any) -> None:
    """Add ``run`` to an argparse subparsers object."""
    from bpsim.runtime.launch import ALGORITHMS

    p = subparsers.add_parser(
        "run", help="train with one process per block (torch.distributed)",
        description=(
            "Train a BlockNet with one process per block on this host (or under torchrun "
            "across hosts), record a timeline of every rank and report throughput. "
            "Example: bpsim run dgl --workers 2 --steps 200 --width 1024 --batch-size 128 "
            "--trace dgl.json --json"))
    p.add_argument("algo", choices=list(ALGORITHMS), metavar="ALGO",
                   help=f"one of {', '.join(ALGORITHMS)}")
    p.add_argument("--workers", type=_positive_int, default=2, metavar="K",
                   help="processes; rank k holds block k+1 (1: every block in one process, "
                        "the speedup reference)")
    p.add_argument("--blocks", type=_positive_int, default=None,
                   help="blocks of the net (default: --workers; give it with --workers 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (gloo) or cuda (NCCL; rank k on cuda:(k mod #GPUs))")
    p.add_argument("--steps", type=_positive_int, default=100, metavar="N", help="training steps")
    add_net_and_sgd_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=_positive_int, help="use a subset of the training set")
    p.add_argument("--n-test", type=_positive_int, help="use a subset of the test set")
    g = p.add_argument_group("method options")
    g.add_argument("--aux", help="dgl/dgl-async auxiliary head: linear, mlp (default), mlp-sr, cnn")
    g.add_argument("--microbatches", type=_positive_int, default=4, metavar="M",
                   help="gpipe/1f1b micro-batches per step (default 4)")
    g.add_argument("--buffer", type=_positive_int, default=50, metavar="M",
                   help="dgl-async replay buffer size (default 50)")
    g.add_argument("--max-reuse", type=_positive_int, default=None, metavar="R",
                   help="dgl-async: reads allowed per buffer entry (default: unlimited); a "
                        "block waits for a fresh entry when every entry is used up")
    g.add_argument("--slowdown", type=_slowdown, action="append", metavar="BLOCK:S",
                   help="make block BLOCK (1-based, as in bpsim simulate; its process is rank "
                        "BLOCK-1) S times slower by doing S-1 times each op's duration of extra "
                        "real work (repeatable)")
    g.add_argument("--lam", type=_floats, help="blockprop penalty weight(s) lambda > 0")
    g.add_argument("--nh", type=int, help="blockprop h-steps per gluing variable")
    g.add_argument("--lr-h", type=_floats, help="blockprop per-example h-step size")
    g.add_argument("--cache-every", type=_positive_int, help="blockprop-cached: h-step every E epochs")
    r = p.add_argument_group("execution")
    r.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads per worker (default: cores // workers, at least 1)")
    r.add_argument("--cpus", type=_cpus, default=None, metavar="IDS",
                   help="run every worker on these CPUs only, e.g. 0,1 or 0-3 (K ranks on fewer "
                        "cores; compare with bpsim simulate --placement)")
    r.add_argument("--timeout", type=float, default=20.0, metavar="SECONDS",
                   help="a rank gives up when a peer sends nothing for this long (default 20)")
    r.add_argument("--host", default="127.0.0.1",
                   help="address the rendezvous binds (default 127.0.0.1)")
    r.add_argument("--trace", default=None, metavar="OUT.json",
                   help="write the merged Chrome trace (open it in https://ui.perfetto.dev)")
    r.add_argument("--no-spans", action="store_true",
                   help="do not record spans (to measure tracing overhead; no busy fractions)")
    r.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run)
