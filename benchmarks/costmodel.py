"""BlockProp's cost model (paper, Appendix A): predicted FLOP ratio vs measured step-time ratio.

Appendix A prices one BlockProp step without caching at
``C(total) = C(backprop) + C(forward) + N_h * C(h-backprop)``;
:func:`bpsim.theory.cost_model` turns that into FLOPs from a ``BlockNet``'s
FLOP counters (backward = 2 x forward, ``C(h-backprop) = 2 sum_{k>=2} F_k``).
This script compares the predicted ratio ``C(total) / C(backprop)`` with
the measured ratio of the time of one ``BlockPropTrainer.train_step`` to
one ``BackpropTrainer.train_step`` on the same mini-batch, for several
``N_h``, on one CPU thread. Time is the process's CPU time
(``time.process_time``), which on a shared machine does not count the
moments other jobs hold the core; both ratios come from the same run
(absolute times are not the claim).

    python benchmarks/costmodel.py [--steps 10] [--repeat 5] [--quick]

BlockProp runs with the paper's fixed h-step size (``results``: the step
Appendix A prices) and with the library's default step, sized to each
example's curvature (``default_step``: work the model does not count).

Writes ``benchmarks/results/costmodel.json`` and ``costmodel.md``
atomically (``--quick``, used by ``make bench``, writes nothing unless
``--out`` is given).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _provenance import digest, float64, params_summary, stamp  # noqa: E402
from _render import provenance_line, render  # noqa: E402
from bpsim import nets, theory  # noqa: E402
from bpsim.algorithms.backprop import BackpropTrainer  # noqa: E402
from bpsim.algorithms.blockprop import BlockPropTrainer, fixed_lr_h  # noqa: E402
from bpsim.nets import BlockNet  # noqa: E402
from bpsim.trace import atomic_write_text  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NHS = (0, 1, 2, 4, 8)
#: h-step sizes timed: the paper's fixed step, which Appendix A prices, and the library's default
STEPS = ("fixed", "default")


def cases() -> list[tuple[str, BlockNet, int]]:
    """(name, net, batch size): small to FLOP-dominated."""
    img = (1, 28, 28)
    return [
        ("paper MLP 784-256-10, K=2", nets.mlp([784, 256, 10], blocks=2, input_shape=img), 64),
        ("wide MLP 784-1024x3-10, K=2", nets.mlp([784, 1024, 1024, 1024, 10], blocks=2, input_shape=img), 128),
        ("wide MLP 784-1024x3-10, K=4", nets.mlp([784, 1024, 1024, 1024, 10], blocks=4, input_shape=img), 128),
        ("VGG-like CNN w=16, 4 conv, K=2", nets.vgg(2, width=16, layers=4, input_shape=img), 32),
    ]


def _time(fn, steps: int) -> float:
    """CPU seconds of this process per call: unlike wall time, it does not count the
    time other jobs hold the core (one torch thread, so CPU time is compute time)."""
    t = time.process_time()
    for _ in range(steps):
        fn()
    return (time.process_time() - t) / steps


def measure(name: str, net: BlockNet, batch: int, steps: int, repeat: int,
            nhs: tuple[int, ...] = NHS) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *net.input_shape, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    idx = torch.arange(batch)
    trainers = {"bp": BackpropTrainer(copy.deepcopy(net), lr=0.01, momentum=0.9)}
    for nh in nhs:
        for step in STEPS:
            trainers[(step, nh)] = _blockprop(copy.deepcopy(net), nh, step)
    fwd_net = copy.deepcopy(net)

    def forward():
        with torch.no_grad():
            fwd_net(x)

    jobs = {key: (lambda t=t: t.train_step(x, y, idx)) for key, t in trainers.items()}
    jobs["fwd"] = forward
    for fn in jobs.values():  # warm-up
        fn()
    best = {key: float("inf") for key in jobs}
    for _ in range(repeat):  # interleaved, best of `repeat` (load on a shared machine only adds time)
        for key, fn in jobs.items():
            best[key] = min(best[key], _time(fn, steps))
    rows = []
    for step in STEPS:
        for nh in nhs:
            c = theory.cost_model(net, nh)
            measured = best[(step, nh)] / best["bp"]
            rows.append({"case": name, "batch": batch, "blocks": len(net), "n_h": nh, "h_step": step,
                     "block_forward_flops": c["block_forward"], "predicted_ratio": c["ratio"],
                     "measured_ratio": measured, "rel_diff": measured / c["ratio"] - 1,
                     "step_ms": 1e3 * best[(step, nh)], "bp_step_ms": 1e3 * best["bp"],
                     "forward_over_bp_measured": best["fwd"] / best["bp"], "forward_over_bp_model": 1 / 3})
    return rows


def _blockprop(net: BlockNet, nh: int, step: str) -> BlockPropTrainer:
    """BlockProp at lam = 1 with the paper's fixed h-step size (``fixed``) or the library's default
    step, sized to each example's curvature (``default``)."""
    lr_h = fixed_lr_h(1.0, len(net)) if step == "fixed" else None
    return BlockPropTrainer(net, lam=1.0, nh=nh, lr_h=lr_h, lr=0.01, momentum=0.9)


def fingerprint(saved: dict) -> dict[str, str]:
    """Per case, N_h and h-step size, in float64 on 8 of the case's examples: the FLOP model's prediction
    and the losses and weights after two ``train_step`` calls of backprop and of BlockProp (lam = 1), the
    steps whose times are compared."""
    rows = saved["results"] + saved.get("default_step", [])
    nhs = sorted({r["n_h"] for r in rows})
    steps = list(dict.fromkeys(r.get("h_step", "fixed") for r in rows))
    out = {}
    with float64():
        for name, net, _ in cases():
            g = torch.Generator().manual_seed(0)
            x = torch.rand(8, *net.input_shape, generator=g, dtype=torch.float64)
            y = torch.randint(0, 10, (8,), generator=g)
            idx = torch.arange(8)
            for key in ["bp", *((s, nh) for s in steps for nh in nhs)]:
                n = copy.deepcopy(net).double()
                t = BackpropTrainer(n, lr=0.01, momentum=0.9) if key == "bp" else _blockprop(n, key[1], key[0])
                losses = [t.train_step(x, y, idx).loss for _ in range(2)]
                model = None if key == "bp" else theory.cost_model(net, key[1])["ratio"]
                out[f"{name}, {'backprop' if key == 'bp' else f'N_h={key[1]}, {key[0]} h-step'}"] = digest(
                    [model, losses, params_summary(n)])
    return out


def slopes(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per case and h-step size, the least-squares slope of the predicted and measured ratios against N_h."""
    out = {}
    for case, step in dict.fromkeys((r["case"], r.get("h_step", "fixed")) for r in rows):
        rs = [r for r in rows if r["case"] == case and r.get("h_step", "fixed") == step]
        nh = [r["n_h"] for r in rs]
        out[case if step == "fixed" else f"{case}, {step} h-step"] = {"predicted": float(np.polyfit(nh, [r["predicted_ratio"] for r in rs], 1)[0]),
                     "measured": float(np.polyfit(nh, [r["measured_ratio"] for r in rs], 1)[0])}
    return out


def markdown(saved: dict) -> str:
    """The Markdown tables of a saved ``costmodel.json``."""
    rows, info = saved["results"] + saved.get("default_step", []), saved["info"]
    md = ["# BlockProp cost model (Appendix A): predicted vs measured", "",
          "Predicted: `C(total) / C(backprop)` in FLOPs from `bpsim.theory.cost_model` "
          "(C(bp) = 3F, C(h-backprop) = 2 x forward FLOPs of blocks 2..K). Measured: CPU time "
          "(`time.process_time`, one torch thread) of one `BlockPropTrainer.train_step` over one "
          "`BackpropTrainer.train_step` (same batch, same run, best of "
          f"{info['repeat']} interleaved timings of {info['steps']} steps).", "",
          "*h-step*: the paper's fixed step size (`blockprop.fixed_lr_h`), which Appendix A prices, or the "
          "library's default, sized to each example's curvature by power iteration (work the model does not "
          "count).", "",
          "| case | batch | h-step | N_h | predicted ratio | measured ratio | measured / predicted "
          "| BlockProp ms/step | bp ms/step |",
          "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        md.append(f"| {r['case']} | {r['batch']} | {r.get('h_step', 'fixed')} | {r['n_h']} | "
                  f"{r['predicted_ratio']:.2f} | "
                  f"{r['measured_ratio']:.2f} | {1 + r['rel_diff']:.2f} | {r['step_ms']:.1f} | {r['bp_step_ms']:.1f} |")
    md += ["", "Cost of one more h-step, in units of one backprop step (least-squares slope of the ratio "
               "against N_h), and a forward pass alone over one backprop step (the model says 1/3):", "",
           "| case | slope predicted | slope measured | forward / bp measured |",
           "| --- | ---: | ---: | ---: |"]
    for name, sl in slopes(rows).items():
        first = next(r for r in rows if name.startswith(r["case"]))
        md.append(f"| {name} | {sl['predicted']:.3f} | {sl['measured']:.3f} | "
                  f"{first['forward_over_bp_measured']:.2f} |")
    load = info["load_average_1min"]
    md += ["", "Known simplifications of the model: backward = 2 x forward for every layer; FLOPs of "
               "biases, activations, normalisation and the optimizer step are ignored, and so is the fixed "
               "cost of each call (Python, autograd bookkeeping), which dominates when a block is tiny; "
               "the initialisation is priced as a full forward pass, while the implementation runs blocks "
               "1..K-1 only (block K's forward is part of its first h-step).", "",
           f"Command: `{info['command']}` (torch {info['torch']}, Python {info['python']}; "
           f"{info['cpus']} CPUs, 1-minute load average {load[0]:.1f} at the start and "
           f"{load[1]:.1f} at the end: other jobs shared the machine; CPU time keeps their "
           "share of the core out of the ratios, not their use of the shared caches)", "",
           provenance_line(saved), ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="steps per timing")
    ap.add_argument("--repeat", type=int, default=15,
                    help="interleaved timings per configuration; the best is kept (short windows, many tries: "
                         "robust to other jobs on a shared machine)")
    ap.add_argument("--quick", action="store_true",
                    help="N_h in {0, 2}, 1 step, 1 repeat; writes nothing without --out")
    ap.add_argument("--out", help=f"folder for the results (full mode default: {RESULTS})")
    ap.add_argument("--render", metavar="JSON",
                    help="only rewrite the .md beside JSON from its saved results")
    args = ap.parse_args(argv)
    if args.render:
        return render(args.render, markdown)
    torch.set_num_threads(1)
    nhs = NHS
    if args.quick:
        args.steps, args.repeat, nhs = 1, 1, (0, 2)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    for name, net, batch in cases():
        t = time.perf_counter()
        rows += measure(name, net, batch, args.steps, args.repeat, nhs)
        print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    command = " ".join(["python benchmarks/costmodel.py"] + list(argv if argv is not None else sys.argv[1:]))
    info = {"torch": torch.__version__, "threads": 1, "python": platform.python_version(),
            "machine": platform.machine(), "command": command, "steps": args.steps, "repeat": args.repeat,
            "timing": "CPU time (time.process_time), best of `repeat` interleaved timings of `steps` train_step "
                      "calls; lam=1, default lr_h",
            "model": "C(total) = C(bp) + C(fwd) + N_h C(h-bp); C(bp) = 3F, C(h-bp) = 2 sum_{k>=2} F_k",
            "cpus": os.cpu_count(),
            "load_average_1min": [load0, os.getloadavg()[0] if hasattr(os, "getloadavg") else None]}
    fixed = [r for r in rows if r["h_step"] == "fixed"]
    default = [r for r in rows if r["h_step"] == "default"]
    info["slopes"], info["slopes_default_step"] = slopes(fixed), slopes(default)
    saved = stamp({"results": fixed, "default_step": default, "info": info}, "costmodel", argv, args.quick,
                  fingerprint)
    md = markdown(saved)
    print(md)
    out = args.out or (None if args.quick else RESULTS)
    if out:
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, "costmodel.json"), json.dumps(saved, indent=2))
        atomic_write_text(os.path.join(out, "costmodel.md"), md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
