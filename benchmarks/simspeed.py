"""Simulator speed: spans per second, and the ratio to a bare
SimPy loop.

For K = 8 blocks and 10,000 steps of ``dgl`` and ``dgl-async`` (tracing on:
every span is recorded), measure the wall time of :func:`bpsim.sim.simulate`
and the number of spans it records. The baseline is a bare SimPy loop with
K processes that do nothing but ``yield env.timeout(d)``, one timeout per
recorded span (the cheapest SimPy program that advances time once per span).
Targets: >= 100,000 spans/s and a ratio <= 2.

    python benchmarks/simspeed.py [--steps 10000] [--blocks 8] [--repeat 3]

Writes ``benchmarks/results/simspeed.json`` and ``simspeed.md`` atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import simpy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _provenance import digest, stamp  # noqa: E402
from _render import provenance_line, render  # noqa: E402
from bpsim.sim import simulate  # noqa: E402
from bpsim.trace import atomic_write_text  # noqa: E402

COST = "fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05"


def bare_loop(processes: int, timeouts: int) -> float:
    """Seconds for ``processes`` SimPy processes doing ``timeouts`` timeouts in all."""
    env = simpy.Environment()
    per = timeouts // processes
    extra = timeouts - per * processes

    def proc(n: int):
        for _ in range(n):
            yield env.timeout(1.0)

    t = time.perf_counter()
    for i in range(processes):
        env.process(proc(per + (1 if i < extra else 0)))
    env.run()
    return time.perf_counter() - t


def measure(algo: str, blocks: int, steps: int, repeat: int) -> dict:
    best, best_bare, n = float("inf"), float("inf"), 0
    for _ in range(repeat):
        t = time.perf_counter()
        res = simulate(algo, blocks=blocks, steps=steps, costs=COST, buffer=50)
        wall = time.perf_counter() - t
        n = res.n_spans
        best = min(best, wall)
        best_bare = min(best_bare, bare_loop(blocks, n))
    return {"algo": algo, "blocks": blocks, "steps": steps, "spans": n,
            "seconds": best, "spans_per_s": n / best, "bare_seconds": best_bare,
            "bare_timeouts": n, "ratio_to_bare": best / best_bare,
            "meets_target": n / best >= 100_000 and best / best_bare <= 2.0}


def fingerprint(saved: dict) -> dict[str, str]:
    """Per algorithm, the simulator's spans over the first 200 steps of the measured configuration
    (their number, the makespan, the order of the ops): the events whose handling was timed."""
    out = {}
    for r in saved["results"]:
        res = simulate(r["algo"], blocks=r["blocks"], steps=200, costs=COST, buffer=50)
        rows = sorted(res.trace.rows, key=lambda s: (s[6], s[0], s[2]))
        out[r["algo"]] = digest([res.n_spans, res.makespan, [[s[0], s[2], s[3], s[4]] for s in rows[:400]]])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="1,000 steps, one repeat, print only (for `make bench`; results files untouched)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"))
    ap.add_argument("--render", metavar="JSON",
                    help="only rewrite the .md beside JSON from its saved results")
    args = ap.parse_args(argv)
    if args.render:
        return render(args.render, markdown)
    if args.quick:
        args.steps, args.repeat = min(args.steps, 1000), 1
    rows = [measure(a, args.blocks, args.steps, args.repeat) for a in ("dgl", "dgl-async")]
    if args.quick:
        for r in rows:
            print(f"{r['algo']}: {r['spans_per_s']:,.0f} spans/s, {r['ratio_to_bare']:.2f}x the bare SimPy loop")
        return 0
    info = {"python": platform.python_version(), "simpy": simpy.__version__,
            "machine": platform.machine(), "processor": platform.processor(),
            "command": " ".join(["python benchmarks/simspeed.py"] + list(argv or sys.argv[1:])),
            "timing": "best of --repeat runs; ratio measured in the same run"}
    saved = stamp({"results": rows, "info": info}, "simspeed", argv, args.quick, fingerprint)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "simspeed.json"), json.dumps(saved, indent=2))
    md = markdown(saved)
    atomic_write_text(os.path.join(args.out, "simspeed.md"), md)
    print(md)
    return 0


def markdown(saved: dict) -> str:
    """The Markdown table of a saved ``simspeed.json``."""
    rows, info = saved["results"], saved["info"]
    md = ["# Simulator speed", "",
          f"K = {rows[0]['blocks']}, {rows[0]['steps']} steps, costs `{COST}`, tracing on; bare loop = "
          "K SimPy processes doing one `env.timeout` per recorded span. The simulator itself "
          "schedules fewer events than spans (back-to-back ops share one timeout, "
          "latency-only messages need none), which is how it stays near the bare loop.", "",
          "| algo | spans | seconds | spans/s | bare loop s | ratio | target met |",
          "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        md.append(f"| {r['algo']} | {r['spans']} | {r['seconds']:.3f} | {r['spans_per_s']:,.0f} "
                  f"| {r['bare_seconds']:.3f} | {r['ratio_to_bare']:.2f} | "
                  f"{'yes' if r['meets_target'] else 'no'} |")
    md += ["", f"Command: `{info['command']}` (Python {info['python']}, SimPy {info['simpy']})", "",
           provenance_line(saved), ""]
    return "\n".join(md)


if __name__ == "__main__":
    raise SystemExit(main())
