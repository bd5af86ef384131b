"""What made a committed result, and a fingerprint of the code's behaviour on it.

Every benchmark script stamps its JSON with :func:`provenance`: the commit
(and whether the tree had uncommitted changes), the torch and Python
versions, the processor, the date, the command line and the mode (``full``
or ``quick``). With it goes a *fingerprint*: for each configuration the
result measured, a short hash of what the code does on that configuration,
computed in float64 on one thread over a few steps of a fixed small batch,
so it is the same on every machine and takes seconds, not the hours of the
measurement. ``tests/test_results.py`` recomputes every committed
fingerprint with the same function the script used (each script's
``fingerprint(saved)``); a mismatch means the code's behaviour on that
configuration has moved since the result was made, and the result must be
regenerated (``make results``). A result without provenance is *stale*: the
claims ledger shows its verdicts as such.

The building blocks here: :func:`trainer_fp` (a trainer's first steps),
:func:`digest` (rounded numbers to a short hash) and :func:`float64`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

#: significant digits kept of every fingerprinted number: far above float64's
#: machine-to-machine differences, far below any change of behaviour
DIGITS = 8
def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def processor() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(script: str, argv: list[str] | None, quick: bool,
               fingerprint: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``provenance`` record of a result written now by ``benchmarks/SCRIPT.py argv``."""
    args = list(sys.argv[1:] if argv is None else argv)
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "bpsim", "benchmarks")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(dirty) if dirty is not None else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": processor(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "command": " ".join([f"python benchmarks/{script}.py", *args]),
        "mode": "quick" if quick else "full",
        "fingerprint": fingerprint,
    }


def stamp(saved: dict[str, Any], script: str, argv: list[str] | None, quick: bool,
          fingerprint: Callable[[dict[str, Any]], dict[str, str]]) -> dict[str, Any]:
    """``saved`` with its provenance, the fingerprint computed from ``saved`` itself."""
    saved["provenance"] = provenance(script, argv, quick, fingerprint(saved))
    return saved


def _round(v: Any, digits: int) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return float(f"{v:.{digits - 1}e}") if math.isfinite(v) else str(v)
    if isinstance(v, torch.Tensor):
        return _round(v.detach().double().tolist() if v.numel() > 1 else v.item(), digits)
    if isinstance(v, dict):
        return {str(k): _round(x, digits) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_round(x, digits) for x in v]
    raise TypeError(f"cannot fingerprint a {type(v).__name__}")


def digest(values: Any, digits: int = DIGITS) -> str:
    """A 16-hex-digit hash of ``values`` (numbers rounded to ``digits`` significant digits)."""
    blob = json.dumps(_round(values, digits), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Float64 by default, one torch thread, deterministic kernels; restored after."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)


def batch(shape: tuple[int, ...], n: int, classes: int = 10, seed: int = 0) -> TensorDataset:
    """``n`` fixed float64 examples of ``shape`` in [0, 1) with labels: the same on every machine."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g, dtype=torch.float64)
    y = torch.arange(n) % classes
    return TensorDataset(x, y[torch.randperm(n, generator=g)])


def params_summary(net: torch.nn.Module) -> list[list[float]]:
    """Per parameter tensor: its sum and its norm."""
    return [[float(p.detach().sum()), float(p.detach().norm())] for p in net.parameters()]


def trainer_fp(make: Callable[[], tuple[torch.nn.Module, Any]], shape: tuple[int, ...], batch_size: int,
               epochs: int = 1, classes: int = 10) -> str:
    """Fingerprint of a trainer: ``make()`` builds ``(net, trainer)`` (in float64), which is fitted for
    ``epochs`` epochs on two batches of fixed examples; the hash covers the
    training losses and every parameter's sum and norm afterwards."""
    with float64():
        torch.manual_seed(0)
        net, trainer = make()
        n = 2 * batch_size
        hist = trainer.fit(batch(shape, n, classes), epochs)
        return digest({"loss": hist.train_loss, "params": params_summary(net)})


def runtime_fp(algos: list[str], width: int, depth: int, blocks: int = 2, batch_size: int = 8) -> dict[str, str]:
    """Fingerprints of timing results of the multi-process runtime: per method, the first steps of its
    trainer on the measured net's shape (digits input, an MLP of ``depth`` layers in ``blocks`` blocks,
    at most 64 wide; linear heads for DGL, the registry's head otherwise; ``batch_size`` examples a step,
    float64), whose per-block steps the runtime runs, and the order of ops the simulator schedules for
    it over three steps."""
    from bpsim import methods, nets, sim
    from bpsim.algorithms import get_trainer
    from bpsim.algorithms.base import method_aux

    width = min(width, 64)
    out = {}
    for algo in algos:
        cls = get_trainer(algo)
        aux = "linear" if algo.startswith("dgl") else method_aux(methods.get(algo).name)

        def make(cls=cls, aux=aux):
            net = nets.build("mlp", (64,), 10, blocks, width=width, depth=depth, aux=aux,
                             output_layer=cls.output_layer, seed=0)
            return net, cls(net, lr=0.05, batch_size=batch_size, seed=0, progress=False)
        res = sim.simulate(methods.get(algo).name, blocks=blocks, steps=3, costs="fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05")
        order = [[s[0], s[2], s[3], s[4]] for s in sorted(res.trace.rows, key=lambda s: (s[6], s[0], s[2]))]
        epochs = blocks if algo == "greedy" else 1
        out[algo] = digest([trainer_fp(make, (64,), batch_size, epochs=epochs), order])
    return out
