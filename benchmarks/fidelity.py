"""How faithfully the simulator reproduces and predicts measured runs.

Two sections, each measured on the real runtime (``bpsim.runtime.run``,
2 workers, one torch thread each, MLP blocks of width ``--width``):

1. **Replay** (``bpsim.sim.replay``): every runtime method, with and
   without a slowed block, and 4 ranks on 2 cores (``cpus``), replayed
   with the run's own op durations. Nothing is fitted, so the makespan
   error, the median start offset of matched ops (over the mean step time)
   and, for ``dgl-async``, the buffer reuse and staleness against the
   measured reads say whether the model's dependencies (waits, message
   protocol, buffer rule) are the runtime's. Targets: mean |makespan error|
   <= 2 %, none above 5 %, start offset <= 5 % of a step, buffer
   statistics within 5 %.
2. **Prediction**: costs calibrated on one ``dgl`` run
   (``Costs.from_trace``, the per-key median over its repeats,
   ``with_input_grad`` for the methods that send input gradients, profiled
   micro-batch ratios for the pipelines), then each held-out run predicted
   from its meta (``bpsim.sim.simulate_like``). Every case is measured
   ``--repeats`` times (interleaved, rotated) and its median makespan is
   reported beside the prediction and half its repeat spread. Targets: each
   within the prediction +/- (half spread + 2 %), mean signed error within
   +/- 3 %, a slowed ``dgl-async``'s reuse and staleness within 10 %.

Results: ``benchmarks/results/fidelity.{json,md}``.

    python benchmarks/fidelity.py            # full: 200-step replays, 5 repeats
    python benchmarks/fidelity.py --quick    # about 2 minutes; writes nothing
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _provenance import runtime_fp, stamp  # noqa: E402
from _render import gpu_suffix, provenance_line, render  # noqa: E402

WIDTH, BATCH, N_TRAIN = 1024, 128, 1280
WARMUP = 3          # untimed first steps of each predicted run
PIPES = ("gpipe", "1f1b")
DEVICE = "cpu"


def cfg(algo: str, steps: int, workers: int = 2, blocks: int = 2, **kw: Any) -> Any:
    """The ``RunConfig`` of one measured case."""
    from bpsim.runtime import RunConfig

    base = dict(blocks=blocks, steps=steps, data="digits", model="mlp", width=WIDTH,
                depth=2 * blocks - 1, batch_size=BATCH, threads=1, evaluate=False, seed=0,
                n_train=N_TRAIN, device=DEVICE)
    if algo.startswith("dgl"):
        base["aux"] = "linear"
    base.update(kw)
    return RunConfig(algo, workers=workers, **base)


def measure(c: Any, warmup: int = 0) -> Any:
    """Run ``c`` (``warmup`` extra steps first) and return its trace without them."""
    from bpsim.runtime import run

    return run(replace(c, steps=c.steps + warmup)).trace.without_warmup(warmup)


# ------------------------------------------------------------------ replay
def replay_cases(steps: int, quick: bool) -> list[tuple[str, Any]]:
    from bpsim import methods

    algos = ("dgl", "bp", "dgl-async") if quick else methods.names(runtime=True)
    out = []
    for a in algos:
        extra = {"microbatches": 4} if a in PIPES else {}
        out.append((a, cfg(a, steps, **extra)))
        out.append((f"{a}, block 2 slowed S=2", cfg(a, steps, slowdown={2: 2.0}, **extra)))
    for a in ("dgl",) if quick else ("dgl", "bp", "dgl-async"):
        out.append((f"{a}, 4 ranks on 2 cores", cfg(a, steps, workers=4, blocks=4,
                                                    cpus=[0, 1])))
    return out


def replay_row(label: str, trace: Any) -> dict[str, Any]:
    from bpsim.sim import replay

    r = replay(trace).report
    row = {"case": label, "algo": r["algo"], "steps": r["steps"],
           "makespan_measured": r["measured_makespan"], "makespan_error": r["makespan_error"],
           "start_offset_median": r["start_offset_median"], "missing": r["missing"],
           "unused": r["unused"],
           "unexplained_wait": sum(b["unexplained_wait"] for b in r["busy_error"])}
    if "buffers" in r:
        row["buffers"], row["measured_buffers"] = r["buffers"], r["measured_buffers"]
    return row


# -------------------------------------------------------------- prediction
def held_out(steps: int, quick: bool) -> list[tuple[str, Any]]:
    cases = [("dgl, 2x the steps", cfg("dgl", 2 * steps)),
             ("dgl, block 2 slowed S=2", cfg("dgl", steps, slowdown={2: 2.0})),
             ("bp", cfg("bp", steps))]
    if not quick:
        cases += [("dgl-async, block 2 slowed S=2", cfg("dgl-async", steps, slowdown={2: 2.0})),
                  ("bp, block 1 slowed S=2", cfg("bp", steps, slowdown={1: 2.0})),
                  ("gpipe, 4 micro-batches", cfg("gpipe", steps, microbatches=4)),
                  ("1f1b, 4 micro-batches", cfg("1f1b", steps, microbatches=4)),
                  ("blockprop, N_h=1", cfg("blockprop", steps, options={"nh": 1}))]
    return cases


def cost_moves(measured: Any, predicted: Any, top: int = 3) -> list[list[Any]]:
    """The ``top`` op costs (block:op, and the message latency) of a held-out
    run furthest from what the prediction charged them, as
    ``[key, measured / predicted]``: where calibrated costs did not carry."""
    import math

    ratios = []
    for b, ops in measured.per_block.items():
        for op, v in ops.items():
            q = predicted.per_block.get(b, {}).get(op)
            if q and v and op in ("fwd", "bwd", "aux", "update", "hstep", "loss"):
                ratios.append([f"{b}:{op}", v / q])
    if measured.comm and predicted.comm:
        ratios.append(["comm", measured.comm / predicted.comm])
    ratios.sort(key=lambda kv: -abs(math.log(kv[1])))
    return ratios[:top]


def predict_row(label: str, traces: list[Any], costs: Any, mb_costs: Any) -> dict[str, Any]:
    """The prediction of one held-out case against its repeats."""
    from bpsim.sim import Costs, simulate, simulate_like
    from bpsim.sim.api import like_kwargs
    from bpsim.sim.calibrate import median_run
    from bpsim.sim.results import buffer_stats

    t = median_run(traces)
    algo = t.meta["algo"]
    pred = simulate_like(t, mb_costs if algo in PIPES else costs)
    spans = sorted(x.makespan for x in traces)
    med = statistics.median(spans)
    # its own costs already hold its slowdown, so simulate them without it
    own = simulate(**{**like_kwargs(t), "slowdown": {}}, costs=Costs.from_trace(t))
    row = {"case": label, "algo": algo, "steps": t.meta["steps"], "repeats": len(spans),
           "makespan_measured": med, "makespans_measured": spans,
           "makespan_simulated": pred.makespan, "makespan_error": pred.makespan / med - 1,
           "half_spread": (spans[-1] - spans[0]) / 2 / med,
           "self_error": own.makespan / med - 1,
           "cost_moves": cost_moves(Costs.from_trace(t), Costs.from_trace(pred.trace))}
    if algo == "dgl-async":
        # the buffers carry the producer's lead out of the warm-up: simulate
        # the warm-up too and read both runs' buffers over the same steps
        full = simulate(**{**like_kwargs(t), "steps": t.meta["steps"] + WARMUP}, costs=costs)
        row["buffers"] = buffer_stats(full.trace.without_warmup(WARMUP))
        row["measured_buffers"] = buffer_stats(t)
    return row


def prediction(steps: int, repeats: int, quick: bool) -> dict[str, Any]:
    from bpsim.runtime.profile import input_grad_fractions, profile_in_child
    from bpsim.sim import Costs
    from bpsim.sim.calibrate import interleaved, median_costs, pooled_ratios, profiled

    calib = cfg("dgl", steps)
    cases = [("calibration", calib)] + held_out(steps, quick)
    runs = interleaved(cases, repeats, lambda c: measure(c, WARMUP))
    costs = median_costs([Costs.from_trace(t) for t in runs.pop("calibration")])
    costs = costs.with_input_grad(input_grad_fractions(calib))
    ratios = pooled_ratios([profile_in_child(calib, 4) for _ in range(1 if quick else 3)])
    mb_costs = profiled(costs, ratios)
    rows = [predict_row(label, runs[label], costs, mb_costs) for label, _ in cases[1:]]
    errs = [r["makespan_error"] for r in rows]
    return {"costs": costs.to_dict(), "ratios": {str(k): v for k, v in ratios.items()},
            "cases": rows, "mean_error": statistics.fmean(errs),
            "within": sum(abs(r["makespan_error"]) <= r["half_spread"] + 0.02 for r in rows)}


# ---------------------------------------------------------------- report
def _pct(x: Any, sign: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.1%}" if sign else f"{x:.1%}"


def _buf(bs: list[dict[str, Any]] | None) -> str:
    if not bs:
        return ""
    return "; ".join(f"reuse {b['reuse_mean']:.2f}, staleness {b['staleness_mean']:.2f}"
                     for b in bs)


def markdown(o: dict[str, Any]) -> str:
    s = o["setup"]
    lines = [f"# Simulator fidelity{' (quick)' if s['quick'] else ''}{gpu_suffix(o)}", "",
             f"MLP blocks of width {s['width']}, batch {s['batch']}, one torch thread per "
             f"worker, on {o['machine']['cores']} cores ({o['machine']['cpu']}); "
             f"{o['seconds']:.0f} s in all. Written by `benchmarks/fidelity.py`.", "",
             "## Replay", "",
             f"Each run ({s['replay_steps']} steps) replayed with its own op durations "
             "(`bpsim simulate --replay`); start offset is the median |start difference| of "
             "matched ops over the mean step time; unexplained waits are measured waits no "
             "model dependency accounts for (charged as untraced time).", "",
             "| case | makespan (s) | error | start offset | unexplained waits (s) | "
             "buffers replayed | buffers measured |", "|---|---|---|---|---|---|---|"]
    for r in o["replay"]["cases"]:
        lines.append(f"| {r['case']} | {r['makespan_measured']:.4g} | "
                     f"{_pct(r['makespan_error'])} | {_pct(r['start_offset_median'], False)} | "
                     f"{r['unexplained_wait']:.3g} | {_buf(r.get('buffers'))} | "
                     f"{_buf(r.get('measured_buffers'))} |")
    rs = o["replay"]["cases"]
    errs = [abs(r["makespan_error"]) for r in rs]
    lines += ["", f"Mean |makespan error| {statistics.fmean(errs):.2%}, largest "
                  f"{max(errs):.2%}; largest start offset "
                  f"{max(r['start_offset_median'] for r in rs):.2%} of a step.", ""]
    p = o["prediction"]
    lines += ["## Prediction", "",
              f"Calibrated on `dgl` ({s['steps']} steps), each case measured "
              f"{s['repeats']} times after {WARMUP} warm-up steps; error of the prediction "
              "against the median measured makespan, beside half the repeats' spread. "
              "*Self* is the error when the case is simulated with its own calibrated costs "
              "instead (what the model does with costs that fit); *costs that moved* are the "
              "case's measured op costs (block:op, message latency) furthest from those the "
              "prediction charged, as measured / charged.", "",
              "| case | measured (s) | predicted (s) | error | half spread | self | "
              "costs that moved | buffers predicted | buffers measured |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in p["cases"]:
        moved = ", ".join(f"{k} x{v:.2f}" for k, v in r.get("cost_moves", []))
        lines.append(f"| {r['case']} | {r['makespan_measured']:.4g} | "
                     f"{r['makespan_simulated']:.4g} | {_pct(r['makespan_error'])} | "
                     f"{_pct(r['half_spread'], False)} | {_pct(r.get('self_error'))} | "
                     f"{moved} | {_buf(r.get('buffers'))} | "
                     f"{_buf(r.get('measured_buffers'))} |")
    lines += ["", f"Mean signed error {p['mean_error']:+.2%}; {p['within']} of "
                  f"{len(p['cases'])} cases within half their spread + 2 %.", "", provenance_line(o), ""]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import os

    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def fingerprint(saved: dict[str, Any]) -> dict[str, str]:
    """Per replayed method, its trainer's first steps on the measured net and the simulator's op order
    (:func:`_provenance.runtime_fp`)."""
    algos = list(dict.fromkeys(c["algo"] for c in saved["replay"]["cases"]))
    return runtime_fp(algos, width=saved["setup"]["width"], depth=3)


def main(argv: list[str] | None = None) -> int:
    global WIDTH, DEVICE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="three methods, short runs, one repeat (about 2 minutes; writes nothing)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of the replayed runs (default 200; --quick 40); predicted runs "
                        "take a fifth of them (at least 16)")
    p.add_argument("--repeats", type=int, default=None,
                   help="repeats of every predicted case (default 5; --quick 1)")
    p.add_argument("--width", type=int, default=WIDTH, help="hidden width")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--render", metavar="JSON", help="only rewrite the .md beside JSON")
    args = p.parse_args(argv)
    if args.render:
        return render(args.render, markdown)
    WIDTH, DEVICE = args.width, args.device
    from bpsim.trace import atomic_write_text, json_safe

    t0 = time.time()
    steps = args.steps or (40 if args.quick else 200)
    repeats = args.repeats or (1 if args.quick else 5)
    if steps < 1 or repeats < 1:
        p.error("--steps and --repeats must be >= 1")
    rows = []
    for label, c in replay_cases(steps, args.quick):
        rows.append(replay_row(label, measure(c)))
        print(f"replay {label}: {rows[-1]['makespan_error']:+.2%}", flush=True)
    pred = prediction(max(16, steps // 5), repeats, args.quick)
    out = {"setup": {"quick": args.quick, "width": WIDTH, "batch": BATCH, "device": DEVICE,
                     "replay_steps": steps, "steps": max(16, steps // 5), "repeats": repeats},
           "machine": machine(), "seconds": time.time() - t0,
           "replay": {"cases": rows}, "prediction": pred}
    out = stamp(json_safe(out), "fidelity", argv, args.quick, fingerprint)
    md = markdown(out)
    print(md)
    if not args.quick:
        folder = Path(args.out) if args.out else HERE / "results"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "fidelity.json", json.dumps(out, indent=1))
        atomic_write_text(folder / "fidelity.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
