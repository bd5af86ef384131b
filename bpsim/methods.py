"""The method registry: every training method, defined once.

Each :class:`Method` names the pieces that make one method on each of
bpsim's three executors -- the in-process trainer (``bpsim train``), the
multi-process runtime (``bpsim run``) and the simulator (``bpsim
simulate``) -- together with its aliases, the method options it takes and
their defaults. The command line's choices and help, :mod:`bpsim.algorithms`,
the runtime's dispatch and the simulator's dispatch all read this table, so
a method is added or renamed here and nowhere else.

Nothing here imports torch: the trainer, runtime step and simulator schedule
are ``"module:attribute"`` strings, loaded on first use by :func:`load`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["Method", "METHODS", "NAMES", "OPTIONS", "DEFAULTS", "AUX_HEADS", "MAX_NH", "get", "resolve", "load",
           "names", "defaults_for"]

#: every method option, with the default used when a method takes it and the
#: user gives none: one set of defaults for train, run and simulate
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "lam": 1.0,            # BlockProp penalty weight lambda_k (eq. 4)
    "nh": 4,               # BlockProp h-steps per gluing variable N_h (Alg. 1)
    "lr_h": None,          # BlockProp h-step size; None: per example, 1 / (2 lam + mu) (blockprop.curvature_step)
    "cache_every": 2,      # blockprop-cached: the h-step runs in epochs 0, E, 2E, ... (Alg. 2)
    "microbatches": 4,     # gpipe / 1f1b: micro-batches per minibatch
    "aux": None,           # auxiliary head of the local-loss methods (per method below)
    "buffer": 50,          # dgl-async: replay buffer size M
    "max_reuse": None,     # dgl-async: reads allowed per buffer entry (None: unlimited)
})

#: the method options in the order the command line lists them
OPTIONS: tuple[str, ...] = tuple(DEFAULTS)

#: the largest BlockProp N_h: every h-step iteration runs a block forward and
#: backward on every minibatch, so beyond this a run would only seem to hang
MAX_NH = 1000

#: the auxiliary heads the ``aux`` option names (built by :func:`bpsim.nets.make_head`)
AUX_HEADS: tuple[str, ...] = ("linear", "mlp", "mlp-sr", "cnn")


@dataclass(frozen=True)
class Method:
    """One training method and where each executor finds its code.

    Attributes
    ----------
    name : str
        The name used everywhere: CLI, API, traces.
    summary : str
        One line for ``--help``.
    paper : str
        Where the method comes from (paper and section).
    trainer : str
        ``"module:Class"`` of the in-process :class:`~bpsim.algorithms.base.Trainer`.
    runtime : str
        ``"module:function"`` of the runtime's per-block step (``None``: not
        on the runtime).
    schedule : str
        ``"module:function"`` of the simulator's schedule.
    options : tuple of str
        The method options (keys of :data:`DEFAULTS`) this method takes.
    aliases : tuple of str
        Other names accepted for it.
    defaults : mapping
        Per-method overrides of :data:`DEFAULTS` (e.g. its auxiliary head).
    synchronous : bool
        True when every block takes one step per minibatch in lock-step, so
        a one-process and a multi-process run reach the same weights.
    protocol : str
        How its messages move between devices: ``"eager"`` (sent at once,
        received early by a background thread, as bpsim's runtime does) or
        ``"rendezvous"`` (a message leaves once its receiver asks for it, as
        in torch's pipelining schedules behind ``gpipe`` and ``1f1b``).
    min_blocks : int
        The fewest blocks it can train (2 for BlockProp: it needs a gluing
        variable).
    """

    name: str
    summary: str
    paper: str
    trainer: str
    runtime: str | None
    schedule: str
    options: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    synchronous: bool = True
    protocol: str = "eager"
    min_blocks: int = 1

    def default(self, option: str) -> Any:
        """The default of ``option`` for this method (``KeyError`` if unknown)."""
        if option not in DEFAULTS:
            raise KeyError(option)
        return self.defaults.get(option, DEFAULTS[option])

    def resolved_options(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """This method's options with the defaults filled in under ``given``.

        ``ValueError`` names any given option the method does not take.
        """
        given = {k: v for k, v in (given or {}).items() if v is not None}
        unused = sorted(set(given) - set(self.options))
        if unused:
            flags = ", ".join("--" + u.replace("_", "-") for u in unused)
            takes = ", ".join("--" + o.replace("_", "-") for o in self.options) or "no method options"
            raise ValueError(f"{flags} does not apply to {self.name}; it takes {takes}")
        out = {o: given.get(o, self.default(o)) for o in self.options}
        nh = out.get("nh")
        if isinstance(nh, int) and not isinstance(nh, bool) and nh > MAX_NH:
            raise ValueError(f"--nh {nh} is over the limit of {MAX_NH} h-steps per gluing "
                             "variable; give a smaller N_h")
        if "aux" in out and out["aux"] not in AUX_HEADS:
            raise ValueError(f"--aux {out['aux']}: unknown auxiliary head; choose one of "
                             f"{', '.join(AUX_HEADS)}")
        return out


_R = "bpsim.runtime.schedules"
_S = "bpsim.sim.schedules"
_A = "bpsim.algorithms"
_BLOCKPROP = ("lam", "nh", "lr_h")

METHODS: tuple[Method, ...] = (
    Method("bp", "end-to-end backprop, one minibatch at a time (the baseline)",
           "Rumelhart et al.; the baseline of all three papers",
           f"{_A}.backprop:BackpropTrainer", f"{_R}:bp_step", f"{_S}:bp", aliases=("backprop",)),
    Method("gpipe", "backprop pipelined over micro-batches, all forwards then all backwards",
           "GPipe (Huang et al.); the pipelined baseline",
           f"{_A}.backprop:BackpropTrainer", "bpsim.runtime.pipeline:run_pipeline", f"{_S}:gpipe",
           options=("microbatches",), protocol="rendezvous"),
    Method("1f1b", "backprop pipelined over micro-batches, one forward one backward",
           "PipeDream-flush (Narayanan et al.); the pipelined baseline",
           f"{_A}.backprop:BackpropTrainer", "bpsim.runtime.pipeline:run_pipeline",
           f"{_S}:one_f_one_b", options=("microbatches",), protocol="rendezvous"),
    Method("blockprop", "BlockProp: h-step on the gluing variables, then a parallel W-step",
           "BlockProp Sec. 4, Alg. 1",
           f"{_A}.blockprop:BlockPropTrainer", f"{_R}:blockprop_step", f"{_S}:blockprop",
           options=_BLOCKPROP, min_blocks=2),
    Method("blockprop-cached", "BlockProp with h* cached per example, h-step every E epochs",
           "BlockProp App. C, Alg. 2",
           f"{_A}.blockprop:CachedBlockPropTrainer", f"{_R}:blockprop_step",
           f"{_S}:blockprop_cached", options=(*_BLOCKPROP, "cache_every"), min_blocks=2),
    Method("dgl", "decoupled greedy learning: each block on its own auxiliary loss",
           "DGL Sec. 3.1, Alg. 1",
           f"{_A}.dgl:DGLTrainer", f"{_R}:dgl_step", f"{_S}:dgl", options=("aux",),
           aliases=("dgl-sync",), defaults={"aux": "mlp"}),
    Method("dgl-async", "asynchronous DGL: blocks exchange activations through replay buffers",
           "DGL Sec. 3.2, Alg. 2",
           f"{_A}.async_dgl:AsyncDGLTrainer", f"{_R}:dgl_async_step", f"{_S}:dgl_async",
           options=("aux", "buffer", "max_reuse"), defaults={"aux": "mlp"}, synchronous=False),
    Method("greedy", "sequential greedy: train block 1, then block 2 on its frozen output, ...",
           "DGL Sec. 2.2 (layer-wise greedy training)",
           f"{_A}.dgl:GreedyTrainer", f"{_R}:greedy_step", f"{_S}:greedy", options=("aux",),
           defaults={"aux": "mlp"}),
    Method("bwbpf", "block-wise BP-free: local dense heads; the global loss trains only the output layer",
           "BWBPF Sec. 3",
           f"{_A}.bwbpf:BWBPFTrainer", f"{_R}:bwbpf_step", f"{_S}:bwbpf", options=("aux",),
           defaults={"aux": "linear"}),
)

_BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}
_ALIAS: dict[str, str] = {a: m.name for m in METHODS for a in m.aliases}

#: the canonical names, in the order of the table
NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)


def names(*, runtime: bool | None = None) -> tuple[str, ...]:
    """Canonical method names; ``runtime=True`` keeps those ``bpsim run`` can run."""
    if runtime is None:
        return NAMES
    return tuple(m.name for m in METHODS if (m.runtime is not None) == runtime)


def resolve(name: str) -> str:
    """The canonical name of ``name`` or one of its aliases (``ValueError`` if unknown)."""
    key = str(name).strip().lower()
    key = _ALIAS.get(key, key)
    if key not in _BY_NAME:
        known = ", ".join(NAMES)
        aliases = ", ".join(f"{a} = {n}" for a, n in _ALIAS.items())
        raise ValueError(f"unknown method {name!r}; choose one of {known} (aliases: {aliases})")
    return key


def get(name: str) -> Method:
    """The :class:`Method` called ``name`` (or an alias of it)."""
    return _BY_NAME[resolve(name)]


def load(ref: str) -> Any:
    """Import ``"module:attribute"`` and return the attribute."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def defaults_for(name: str) -> dict[str, Any]:
    """The resolved default method options of ``name``."""
    return get(name).resolved_options()
