"""``bpsim train``: train a network in this process and report test accuracy."""

from __future__ import annotations

import argparse
import json
import time

from bpsim.cli import types as T
from bpsim.cli.args import add_algo, add_method_options, add_net_and_sgd_args, method_options

__all__ = ["add_parser", "cmd", "check_net_size", "MAX_PARAMS", "MAX_WIDTH", "MAX_DEPTH"]

#: the most parameters a net ``bpsim train`` builds may have (4 bytes each, and
#: as much again for their gradients and for the momentum)
MAX_PARAMS = 500_000_000
#: the widest layer and the most layers ``bpsim train`` builds
MAX_WIDTH, MAX_DEPTH = 65_536, 1_000
#: up to this many blocks the default sizes of every model are known to be small
_SMALL_BLOCKS = 16


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` to an argparse subparsers object."""
    p = sub.add_parser("train", help="train a network in this process", description=(
        "Train a BlockNet with one method and report test accuracy. "
        "Example: bpsim train bp --data digits --model mlp --blocks 2 --epochs 20 --seed 0 --json"))
    add_algo(p)
    p.add_argument("--blocks", type=T.positive_int, default=2, help="number of blocks K (default 2)")
    p.add_argument("--epochs", type=T.positive_int, default=10)
    add_net_and_sgd_args(p)
    p.add_argument("--milestones", type=T.int_list, default=[],
                   help="epochs at which the learning rate is multiplied by --gamma")
    p.add_argument("--gamma", type=T.positive_float, default=0.1)
    p.add_argument("--checkpoint-dir", type=T.out_folder,
                   help="write a checkpoint there after every epoch")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --checkpoint-dir")
    add_method_options(p)
    g = p.add_argument_group("dgl-async trainer options (bpsim train only)")
    g.add_argument("--slowdown", type=T.slowdown, action="append", metavar="BLOCK:S",
                   help="dgl-async: BLOCK:S picks block BLOCK S times less often")
    g.add_argument("--pmf", type=T.nonneg_floats,
                   help="dgl-async: probability of picking each block")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd)


def check_net_size(model: str, data: str, blocks: int, width: int | None, depth: int | None,
                   aux: str | None, output_layer: bool) -> None:
    """Refuse a net of more than :data:`MAX_PARAMS` parameters before allocating it.

    ``width`` and ``depth`` are checked against :data:`MAX_WIDTH` and
    :data:`MAX_DEPTH`, ``blocks`` against :data:`MAX_DEPTH` (a block holds a
    layer at least); when either size is given, or more than 16 blocks, the
    net is then built on torch's ``meta`` device (shapes only, no memory; its
    first use costs about a second) and its parameters counted. The default
    sizes of every model with up to 16 blocks stay far below the limit.
    ``bpsim train`` and ``bpsim run`` both call it.
    """
    import torch

    from bpsim import data as datasets
    from bpsim import nets

    for flag, v, limit in (("width", width, MAX_WIDTH), ("depth", depth, MAX_DEPTH),
                           ("blocks", blocks, MAX_DEPTH)):
        if v is not None and v > limit:
            raise ValueError(f"--{flag} {v} is over the limit of {limit:,}; give a smaller "
                             f"--{flag}")
    if width is None and depth is None and blocks <= _SMALL_BLOCKS:
        return
    desc = datasets.describe(data)
    with torch.device("meta"):
        net = nets.build(model, desc.input_shape, desc.n_classes, blocks, width=width,
                         depth=depth, aux=aux, output_layer=output_layer, seed=0)
    n = sum(p.numel() for p in net.parameters())
    if n > MAX_PARAMS:
        sizes = "".join(f", --{k} {v}" for k, v in (("width", width), ("depth", depth))
                        if v is not None)
        raise ValueError(f"--model {model} with --blocks {blocks}{sizes} has {n:,} "
                         f"parameters, over the limit of {MAX_PARAMS:,}; give a smaller "
                         "--width, --depth or --blocks")


def cmd(args: argparse.Namespace) -> int:
    """Run ``bpsim train`` on parsed arguments."""
    from bpsim import data, nets
    from bpsim.algorithms import get_trainer

    cls = get_trainer(args.algo)
    options = method_options(args)
    extra = {}
    slow = T.slowdowns(args.slowdown)
    if len(slow) > 1:
        raise ValueError("bpsim train dgl-async takes one --slowdown BLOCK:S; use --pmf for "
                         "several blocks")
    if slow:
        extra["slowdown"] = next(iter(slow.items()))
    if args.pmf is not None:
        extra["pmf"] = T.one(args.pmf)
    unused = sorted(set(extra) - set(cls.options))
    if unused:
        flags = ", ".join("--" + u for u in unused)
        raise ValueError(f"{flags} does not apply to {args.algo}; only dgl-async takes it")
    if args.resume and not args.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir DIR (the folder of the checkpoint)")
    m = options.get("microbatches")
    if m is not None and args.batch_size % m:
        raise ValueError(f"--batch-size {args.batch_size} does not split into {m} equal "
                         "micro-batches; make it a multiple (as bpsim run asks)")
    kwargs = {k: v for k, v in options.items() if k in cls.options} | extra
    desc = data.describe(args.data)
    build = dict(width=args.width, depth=args.depth, aux=options.get("aux") or cls.aux_default,
                 output_layer=cls.output_layer)
    check_net_size(args.model, args.data, args.blocks, **build)
    train, test = data.load(args.data, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    net = nets.build(args.model, desc.input_shape, desc.n_classes, args.blocks, **build,
                     seed=args.seed)
    lr = T.one(args.lr) if args.lr is not None else cls.default_lr
    trainer = cls(net, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                  batch_size=args.batch_size, milestones=args.milestones, gamma=args.gamma,
                  seed=args.seed, task=desc.task, checkpoint_dir=args.checkpoint_dir, **kwargs)
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
