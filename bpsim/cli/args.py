"""Argument groups that several sub-commands share: the method, its options,
the data and network, SGD.

The method's name, choices and help and the method options come from the
registry (:mod:`bpsim.methods`); every option flag defaults to ``None``, and
:func:`method_options` fills in the registry's defaults, one set for
``train``, ``run`` and ``simulate``.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from bpsim import methods
from bpsim.cli import types as T

__all__ = ["add_algo", "add_method_options", "add_net_and_sgd_args", "method_options"]

#: help, type and metavar of each registry option (keys of methods.OPTIONS)
_OPTION_ARGS: dict[str, dict[str, Any]] = {
    "lam": dict(type=T.positive_floats, metavar="LAM",
                help="BlockProp penalty weight lambda_k > 0, or one per gluing variable"),
    "nh": dict(type=T.h_steps, metavar="N",
               help="BlockProp h-steps per gluing variable N_h >= 1"),
    "lr_h": dict(type=T.positive_floats, metavar="LR",
                 help="BlockProp per-example h-step size, or one per gluing variable "
                      "(default: per example, 1 / (2 lam + the curvature each h faces))"),
    "cache_every": dict(type=T.positive_int, metavar="E",
                        help="blockprop-cached: the h-step runs every E epochs"),
    "microbatches": dict(type=T.positive_int, metavar="M",
                         help="gpipe / 1f1b: micro-batches per minibatch"),
    "aux": dict(type=T.nonempty, metavar="HEAD",
                help="auxiliary head of dgl, dgl-async, greedy, bwbpf: linear, mlp, mlp-sr, cnn"),
    "buffer": dict(type=T.positive_int, metavar="M", help="dgl-async: replay buffer size M"),
    "max_reuse": dict(type=T.positive_int, metavar="R",
                      help="dgl-async: reads allowed per buffer entry (default unlimited)"),
}


def _method(name: str) -> str:
    try:
        return methods.resolve(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_algo(p: argparse.ArgumentParser, *, runtime: bool = False,
             optional: bool = False) -> None:
    """The ``ALGO`` positional: a registry name or alias (``runtime=True``: those
    ``bpsim run`` can run), stored canonical; ``optional``: may be left out (None)."""
    names = methods.names(runtime=True) if runtime else methods.names()

    def algo(s: str) -> str:
        name = _method(s)
        if name not in names:
            raise argparse.ArgumentTypeError(
                f"{name} does not run on this executor; choose one of {', '.join(names)}")
        return name

    aliases = ", ".join(f"{a} = {m.name}" for m in methods.METHODS if m.name in names
                        for a in m.aliases)
    p.add_argument("algo", type=algo, metavar="ALGO", **({"nargs": "?"} if optional else {}),
                   help=f"one of {', '.join(names)} (aliases: {aliases}); see the list below")
    # the method list keeps one line per method, so the description is wrapped here
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = textwrap.fill(p.description or "", 79)
    width = max(len(n) for n in names)
    p.epilog = "methods:\n" + "\n".join(
        f"  {m.name:<{width}}  {m.summary}" for m in methods.METHODS if m.name in names)


def add_method_options(p: argparse.ArgumentParser, title: str = "method options") -> None:
    """One flag per registry option, default ``None`` (the method's default)."""
    g = p.add_argument_group(title, "each defaults to the method's default in bpsim.methods; "
                                    "a flag the method does not take is refused")
    for name in methods.OPTIONS:
        kw = dict(_OPTION_ARGS[name])
        default = methods.DEFAULTS[name]
        if default is not None:
            kw["help"] += f" (default {default})"
        g.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kw)


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method's options: the flags given, the registry's defaults for the rest.

    ``ValueError`` names a flag the method does not take.
    """
    given = {o: T.one(getattr(args, o, None)) for o in methods.OPTIONS}
    return methods.get(args.algo).resolved_options(given)


def add_net_and_sgd_args(p: argparse.ArgumentParser) -> None:
    """The options ``bpsim train`` and ``bpsim run`` share: data, network, SGD."""
    p.add_argument("--data", default="digits", type=T.nonempty,
                   help="digits (default), mnist, fashion-mnist, cifar10, teacher")
    p.add_argument("--model", default="mlp", type=T.nonempty,
                   help="mlp (default), cnn (DGL's VGG-like), resnet")
    p.add_argument("--width", type=T.positive_int,
                   help="hidden width (mlp: 256) or first conv width (cnn: 128)")
    p.add_argument("--depth", type=T.nonneg_int,
                   help="hidden layers (mlp: 2, or blocks - 1 when more blocks need them) or conv layers (cnn: 6)")
    p.add_argument("--batch-size", type=T.positive_int, default=64)
    p.add_argument("--lr", type=T.positive_floats,
                   help="learning rate, or one per block (comma-separated)")
    p.add_argument("--momentum", type=T.nonneg_float, default=0.9)
    p.add_argument("--weight-decay", type=T.nonneg_float, default=0.0)
    p.add_argument("--seed", type=T.seed, default=0)
    p.add_argument("--n-train", type=T.positive_int,
                   help="use a random subset of this many training examples")
    p.add_argument("--n-test", type=T.positive_int,
                   help="use a random subset of this many test examples")
