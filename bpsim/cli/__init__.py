"""The ``bpsim`` command: train, run, simulate, compare, course.

Every subcommand prints a short human summary, or with ``--json`` exactly one
JSON object on stdout. Bad input (an unknown name, a value out of range, a
missing dataset) ends with one line on stderr and exit code 2, never a
traceback. Heavy imports (torch) happen inside the subcommands, so
``bpsim simulate`` starts fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _slowdown(s: str) -> tuple[int, float]:
    try:
        j, f = s.split(":")
        return int(j), float(f)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BLOCK:FACTOR such as 2:1.5, got {s!r}") from None


def add_net_and_sgd_args(p: argparse.ArgumentParser) -> None:
    """The options `bpsim train` and `bpsim run` share: data, network, SGD."""
    p.add_argument("--data", default="digits", help="digits (default), mnist, fashion-mnist, cifar10, teacher")
    p.add_argument("--model", default="mlp", help="mlp (default), cnn (DGL's VGG-like), resnet")
    p.add_argument("--width", type=_positive_int, help="hidden width (mlp: 256) or first conv width (cnn: 128)")
    p.add_argument("--depth", type=int, help="hidden layers (mlp: 2) or conv layers (cnn: 6)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=_floats, help="learning rate, or one per block (comma-separated)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)


# ---------------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    from bpsim.algorithms import ALGORITHMS  # no torch import

    p = sub.add_parser("train", help="train a network in this process", description=(
        "Train a BlockNet with one method and report test accuracy. "
        "Example: bpsim train bp --data digits --model mlp --blocks 2 --epochs 20 --seed 0 --json"))
    p.add_argument("algo", choices=list(ALGORITHMS), metavar="ALGO", help=f"one of {', '.join(ALGORITHMS)}")
    p.add_argument("--blocks", type=int, default=2, help="number of blocks K (default 2)")
    p.add_argument("--epochs", type=int, default=10)
    add_net_and_sgd_args(p)
    p.add_argument("--milestones", type=lambda s: [int(v) for v in s.split(",")], default=[],
                   help="epochs at which the learning rate is multiplied by --gamma")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=_positive_int, help="use a random subset of this many training examples")
    p.add_argument("--n-test", type=_positive_int, help="use a random subset of this many test examples")
    p.add_argument("--checkpoint-dir", help="write a checkpoint there after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    g = p.add_argument_group("method options (used by the methods that have them)")
    g.add_argument("--lam", type=_floats, help="BlockProp penalty weight(s) lambda_k > 0")
    g.add_argument("--nh", type=int, help="BlockProp h-steps per example N_h")
    g.add_argument("--lr-h", type=_floats, help="BlockProp h-step size (per example), or one per block")
    g.add_argument("--cache-every", type=_positive_int, help="blockprop-cached: refresh h* every E epochs")
    g.add_argument("--aux", help="DGL auxiliary head: linear, mlp, mlp-sr, cnn")
    g.add_argument("--buffer", type=_positive_int, help="dgl-async replay buffer size M")
    g.add_argument("--max-reuse", type=_positive_int, help="dgl-async: reads allowed per buffer entry")
    g.add_argument("--slowdown", type=_slowdown, help="dgl-async: BLOCK:S picks block BLOCK S times less often")
    g.add_argument("--pmf", type=_floats, help="dgl-async: probability of picking each block")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_train)


_OPTION_DESTS = ("lam", "nh", "lr_h", "cache_every", "aux", "buffer", "max_reuse", "slowdown", "pmf")


def _cmd_train(args: argparse.Namespace) -> int:
    import time

    from bpsim import data, nets
    from bpsim.algorithms import get_trainer

    cls = get_trainer(args.algo)
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    desc = data.describe(args.data)
    given = {d: getattr(args, d) for d in _OPTION_DESTS if getattr(args, d) is not None}
    unused = sorted(set(given) - set(cls.options) - {"aux"})
    if unused:
        flags = ", ".join("--" + u.replace("_", "-") for u in unused)
        raise ValueError(f"{flags} does not apply to {args.algo}; it takes {', '.join('--' + o.replace('_', '-') for o in cls.options) or 'no method options'}")
    kwargs = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in given.items() if k in cls.options}
    train, test = data.load(args.data, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    net = nets.build(args.model, desc.input_shape, desc.n_classes, args.blocks, width=args.width,
                     depth=args.depth, aux=args.aux or cls.aux_default, output_layer=cls.output_layer,
                     seed=args.seed)
    lr = args.lr if args.lr is not None else cls.default_lr
    lr = lr[0] if isinstance(lr, list) and len(lr) == 1 else lr
    trainer = cls(net, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                  batch_size=args.batch_size, milestones=args.milestones, gamma=args.gamma, seed=args.seed,
                  task=desc.task, checkpoint_dir=args.checkpoint_dir, **kwargs)
    t0 = time.perf_counter()
    hist = trainer.fit(train, args.epochs, test=test, resume=args.resume)
    wall = time.perf_counter() - t0
    last = hist.records[-1]
    out = {
        "algorithm": args.algo, "data": args.data, "model": args.model, "blocks": len(net),
        "epochs": len(hist), "test_accuracy": last.test_accuracy, "test_loss": last.test_loss,
        "train_loss": last.train_loss, "wall_time": wall, "history": hist.to_dict(),
    }
    if args.json:
        print(json.dumps(out))
    else:
        acc = "n/a" if last.test_accuracy is None else f"{100 * last.test_accuracy:.2f}%"
        print(f"{args.algo} on {args.data}: {len(net)} blocks, {len(hist)} epochs in {wall:.1f} s; "
              f"train loss {last.train_loss:.4f}, test accuracy {acc}")
    return 0


# ---------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bpsim", description="Training without end-to-end backprop: BlockProp, DGL, BWBPF.")
    from bpsim import __version__

    parser.add_argument("--version", action="version", version=f"bpsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_train(sub)
    for module in _PLUGINS:
        try:
            mod = __import__(module, fromlist=["add_parsers"])
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("bpsim"):
                continue
            raise
        mod.add_parsers(sub)
    return parser


#: modules contributing subcommands through ``add_parsers(subparsers)``
_PLUGINS = ("bpsim.runtime.cli", "bpsim.sim.cli", "bpsim.course.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        msg = " ".join(str(e).split())
        print(f"bpsim {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bpsim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
