# %% [markdown]
# # 08 · Measured vs simulated: real multi-process runs, calibration, Perfetto
#
# **Time:** about 45 minutes · **Prerequisites:** lesson 06 (timelines, closed forms), lesson 07 (dgl-async, slowdowns)
#
# **By the end of this lesson you will be able to**
# 1. launch a real model-parallel run, one process per block over `torch.distributed`, from Python or from the
#    command line, and read its merged trace: ranks, lanes, ops and a shared clock;
# 2. calibrate the simulator on one measured run (`Costs.from_trace`) and use it to predict other runs: more steps,
#    another algorithm, a slowed rank with asynchronous DGL;
# 3. read the error table (makespan error, busy-time error per rank, start-time offsets) and name where the error
#    comes from: Python overhead between ops, bursty op durations, contention for cores, costs that do not carry
#    over from one algorithm to another;
# 4. open a measured and a simulated trace side by side in Perfetto, and say how the same code runs on GPUs and
#    across hosts with `torchrun`.
#
# Lessons 06 and 07 predicted timelines with a discrete-event simulator. A prediction is worth as much as its
# agreement with a measurement, so here we run the real thing: two processes, one block each, exchanging activations
# over gloo. Everything runs on a laptop CPU; the runs are short because starting processes is slow.

# %%
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import plotly.graph_objects as go
import torch

from bpsim import sim, trace, viz
from bpsim.course import checks, pick, widgets
from bpsim.runtime import RunConfig, run
from bpsim.sim.compare import compare, error_table, format_report

torch.set_num_threads(1)  # small models: one thread is fastest and repeatable
FAST = pick(True, False)
print("fast mode" if FAST else "full mode")
TRACE_DIR = Path(tempfile.gettempdir()) / "bpsim-lesson-08"  # trace files of this lesson (outside the repository)
TRACE_DIR.mkdir(exist_ok=True)

# %% [markdown]
# ## 1. What a discrete-event model assumes
#
# `bpsim.sim` (lessons 06 and 07) plays a schedule out event by event. Its answer is exact *for its model*, and the
# model makes five assumptions:
#
# 1. **Ops have costs.** Each op of each block (`fwd`, `aux`, `bwd`, `update`) takes a fixed time, or an independent
#    random draw around it (from the measured distribution, or a lognormal with log-standard-deviation `spread`),
#    whatever else is going on.
# 2. **One op at a time per device**, and a device runs its next op the instant the previous one ends and its inputs are
#    there. Nothing happens *between* ops.
# 3. **Devices are independent.** Block $k$ runs on device $k$ and never slows block $j$ down.
# 4. **Messages cost a latency** $c$ (plus bytes over bandwidth when a bandwidth is given), and the sender does not
#    wait for them.
# 5. **Waiting is only for messages**: a device is idle only when the schedule says it needs an input, a gradient or a
#    buffer entry that has not arrived.
#
# Under these assumptions the makespans of lesson 06 have closed forms. With $K$ blocks of equal cost
# ($F$ forward, $B$ backward, $A$ auxiliary head, $U$ update, $c$ latency) and $N$ steps:
#
# $$T_{\text{bp}} = N\,\big(K(F+B) + 2(K-1)\,c + U\big), \qquad
#   T_{\text{dgl}} = (K-1)(F+c) + N\,(F + A + B + U).$$
#
# Real blocks do not cost the same. With per-block costs $F_k, B_k, A_k, U_k$ backprop is still one long chain per
# step: all forwards, $K-1$ messages up, all backwards, $K-1$ messages down, and block 1's update (the other blocks
# update while the gradient travels on):
#
# $$T_{\text{bp}} = N\,\Big(\sum_{k=1}^{K} (F_k + B_k) + 2(K-1)\,c + U_1\Big).$$
#
# For synchronous DGL with $K = 2$, block $k$ repeats a period $P_k = F_k + A_k + B_k + U_k$ and block 2 can start step
# $t$ only when block 1's output of step $t$ has arrived. Block 1 never waits and ends at $N P_1$. Block 2 starts at
# $F_1 + c$ and then runs at the pace of the slower of the two, so it ends at $F_1 + c + P_2 + (N-1)\max(P_1, P_2)$:
#
# $$T_{\text{dgl}} = \max\Big(N P_1,\;\; F_1 + c + P_2 + (N-1)\max(P_1, P_2)\Big).$$
#
# With equal blocks this is lesson 06's formula. The question of this lesson is how far the real runtime strays from the
# five assumptions.
#
# 🔮 **Predict:** our machine has 2 CPU cores shared with other users, and we will start two worker processes (each
# with a thread that receives messages), plus this notebook's kernel. Which assumption do you expect to break worst?
#
# ## 2. A real run: two processes, one block each
#
# `bpsim.runtime.run(RunConfig(...))` starts one process per block (rank $k$ holds block $k+1$) on this machine. The
# ranks meet over `torch.distributed` (gloo on CPU), agree on a shared clock, train for `steps` minibatches with the
# per-block code of `bpsim.algorithms`, and record every op as a span, exactly in the vocabulary of the simulator's
# traces. The launcher merges the ranks' spans into one `Trace` and returns it with a summary
# (`RunResult.summary`, `RunResult.trace`).
#
# The network is an MLP $64 \to 1024 \to 1024 \to 1024 \to 10$ on the 8x8 digits, cut into $K = 2$ blocks of two
# layers, with linear auxiliary heads for DGL, minibatches of 128, one torch thread per process. Blocks this wide make
# each op cost milliseconds, so that the fixed costs of Python stay small next to the arithmetic.
#
# 🔮 **Predict:** the first run trains for 20 steps (50 in full mode) of a few tens of milliseconds each. How long will
# the call `run(...)` take on the wall clock?

# %%
N_CAL = pick(20, 50)  # steps of the calibration run
N_HELD = 2 * N_CAL  # steps of the held-out runs


def config(algo, steps, slowdown=None, trace_file=None):
    """The lesson's runs: K = 2 processes, one block each, an MLP 64-1024-1024-1024-10 on digits."""
    return RunConfig(algo, workers=2, steps=steps, data="digits", model="mlp", width=1024, depth=3,
                     aux="linear" if algo.startswith("dgl") else None, batch_size=128, n_train=1280,
                     threads=1, evaluate=False, seed=0, slowdown=slowdown or {},
                     trace=str(trace_file) if trace_file else None)


CAL_FILE = TRACE_DIR / "dgl-calibration.json"
t_call = time.perf_counter()
calib = run(config("dgl", N_CAL, trace_file=CAL_FILE))
t_call = time.perf_counter() - t_call
measured = calib.trace
s = calib.summary
print(f"run() took {t_call:.1f} s of wall clock; training itself took {1e3 * s['wall_time']:.0f} ms "
      f"({s['steps_per_s']:.1f} steps/s)")
print("busy fraction of each rank (compute time / wall time):", [f"{b:.0%}" for b in s["busy_fraction"]])
print("trace written to", CAL_FILE)

# %% [markdown]
# Most of the wall clock goes into starting and stopping processes (the first call also starts a fork server that
# imports torch), joining the process group and agreeing on a clock; the training proper takes a fraction of a second.
# This is why the lesson's runs are few and short, and why `training itself` is the number to compare with the
# simulator.
#
# The same run from a terminal (`--json` prints the summary as one JSON object):
#
# ```
# bpsim run dgl --workers 2 --steps 20 --width 1024 --depth 3 --aux linear --batch-size 128 \
#     --n-train 1280 --threads 1 --no-eval --trace dgl-calibration.json --json
# ```
#
# What did the run record?

# %%
# NBVAL_CHECK_OUTPUT
print("ranks:", measured.ranks)
for rank in measured.ranks:
    ops = sorted({r[2] for r in measured.rows if r[0] == rank and r[1] == "compute" and r[2] != "wait"})
    comm = sorted({r[2] for r in measured.rows if r[0] == rank and r[1] == "comm"})
    print(f"rank {rank}: compute ops {' '.join(ops)}; comm ops {' '.join(comm)}; "
          f"updates {calib.summary['per_rank'][rank]['updates']}")
measured.check()
print("trace check passed: no overlapping spans on a lane, no message received before it was sent")
print("the Chrome trace file reads back identically:", trace.Trace.load(CAL_FILE) == measured)


# %%
def in_ms(t):
    """A copy of trace t with its times in milliseconds (for plots)."""
    return trace.Trace.from_rows([r[:6] + (1e3 * r[6], 1e3 * r[7], r[8]) for r in t.rows], t.meta)


def compute_lanes(t):
    """Only the compute spans of trace t (the figures of long runs stay readable)."""
    return trace.Trace.from_rows([r for r in t.rows if r[1] == "compute"], t.meta)


fig = viz.timeline(in_ms(measured), title=f"measured: dgl, 2 processes, {N_CAL} steps")
fig.update_xaxes(title_text="time (ms)")
fig

# %% [markdown]
# Hover over the bars. Rank 0 (block 1) runs *forward, head, backward, update* back to back and posts each output on
# its comm lane (`send`) right after the forward. Rank 1 (block 2) has grey `wait` spans: its compute thread had
# nothing to do until the next activation arrived (the `recv` on its comm lane). The first step is usually slower
# than the others: memory is allocated, caches are cold.
#
# ## 3. Calibration: costs from a measured trace
#
# `sim.Costs.from_trace(trace)` turns a measurement into simulator costs (lesson 06's cost model):
#
# * the cost of each op of each block is the **median** of its spans, so a few slow outliers do not move it;
# * `jitter` keeps, for each op, every span's duration divided by its median: the simulator draws each op's time as
#   its median times one of these factors (section 5 shows why); `spread`, the log-standard-deviation of the same
#   ratios, is the older, lognormal way to draw;
# * the latency $c$ is the median time from posting a `send` to the moment the receiver can use the message (and
#   `recv`, a receive's hand-off, is 0 here: this runtime receives on a background thread).

# %%
costs = sim.Costs.from_trace(measured)
median_costs = replace(costs, spread=0.0, jitter={})  # every op takes exactly its median
OPS = ("fwd", "aux", "bwd", "update")
print("median cost per minibatch (ms)")
print("block " + " ".join(f"{op:>7}" for op in OPS) + "   period P_k")
for k in (1, 2):
    print(f"{k:>5} " + " ".join(f"{1e3 * costs.get(op, k):7.2f}" for op in OPS)
          + f"   {1e3 * sum(costs.get(op, k) for op in OPS):8.2f}")
print(f"message latency c = {1e3 * costs.comm:.2f} ms; spread (log-std of durations) = {costs.spread:.2f}")
print("mean of the measured duration / median factors per op:",
      {op: round(statistics.fmean(f), 3) for op, f in costs.jitter.items()})

# %%
# NBVAL_CHECK_OUTPUT
print("calibrated blocks:", sorted(costs.per_block))
print("ops of each block:", [sorted(v) for _, v in sorted(costs.per_block.items())])
print("every op cost > 0:", all(v > 0 for over in costs.per_block.values() for v in over.values()),
      "| latency > 0:", costs.comm > 0, "| spread > 0:", costs.spread > 0)

# %% [markdown]
# The closed form of section 1 with these costs, against the simulator, for a few step counts, and with block 2 slowed
# down 4x (which block sets the pace then?):


# %%
def t_dgl2(c, N, slow2=1.0):
    """Makespan of synchronous DGL with K = 2 blocks (section 1); block 2's costs times slow2."""
    P1 = sum(c.get(op, 1) for op in OPS)
    P2 = slow2 * sum(c.get(op, 2) for op in OPS)
    return max(N * P1, c.get("fwd", 1) + c.comm + P2 + (N - 1) * max(P1, P2))


# %%
# NBVAL_CHECK_OUTPUT
for N in (1, N_CAL, 10 * N_CAL):
    for S in (1.0, 4.0):
        simulated = sim.simulate("dgl", blocks=2, steps=N, costs=median_costs, slowdown={2: S}).makespan
        print(f"N = {N:>3}, block 2 slowed {S:g}x: closed form equals the simulator: "
              f"{math.isclose(t_dgl2(median_costs, N, S), simulated, rel_tol=1e-9)}")

# %% [markdown]
# 🔮 **Predict:** now simulate the very run we calibrated on. Will the simulator come out faster or slower than the
# measurement? By roughly how much?

# %%
replay = sim.simulate("dgl", blocks=2, steps=N_CAL, costs=median_costs)
fig = viz.timelines([in_ms(measured), in_ms(replay.trace)],
                    ["measured: dgl, 2 processes", "simulated: the same run, calibrated medians"])
fig.update_xaxes(title_text="time (ms)", row=2, col=1)
fig

# %%
print(format_report(compare(measured, replay.trace)))  # times in seconds

# %% [markdown]
# How to read the table (`bpsim.sim.compare`):
#
# * **makespan error** $= (T_{\text{sim}} - T_{\text{meas}}) / T_{\text{meas}}$, negative when the simulator is too
#   fast;
# * **busy error** per rank: the same for the total compute time of the rank (`wait` spans do not count as busy);
# * **start offset**: each simulated op is matched to its measured twin (same rank, lane, op, block and step), both
#   timed from their trace's first span; the median distance between their start times, in units of one measured
#   step. Errors accumulate along a run, so a small per-step error becomes a large offset by the end.
#
# Even on its own calibration run the prediction is off. The medians are right *per op*, yet the sum of the
# medians is not the sum of the durations: the slow first step and every burst of contention make the measured total
# larger, and the time between ops (section 5) is not in any op at all. How far the prediction is off depends on the
# run and on what else the machine is doing: with a handful of steps on a shared machine, tens of percent are common.
#
# ### Exercise 1: predict backprop before running it
#
# We are about to run **backprop** on the same two processes for `N_HELD` steps (40 in fast mode). It has no
# auxiliary heads, so the calibration's `aux` costs do not apply; everything else carries over. Use the per-block
# closed form of section 1 and the calibrated medians (`median_costs.get(op, k)` for op `"fwd"`, `"bwd"`, `"update"`
# and block `k`; the latency is `median_costs.comm`) to predict the makespan of that run, in seconds. The check runs
# the simulator with the same costs.

# %%
# BEGIN SOLUTION
F = [median_costs.get("fwd", k) for k in (1, 2)]
B = [median_costs.get("bwd", k) for k in (1, 2)]
predicted_bp = N_HELD * (sum(F) + sum(B) + 2 * (2 - 1) * median_costs.comm + median_costs.get("update", 1))
# END SOLUTION
checks.bp_makespan(median_costs, 2, N_HELD, predicted_bp)

# %% [markdown]
# ## 4. Predicting runs the simulator has not seen
#
# A calibration is only useful if it predicts *other* runs. We launch the held-out runs (twice the steps each) and
# predict every one with the costs of the single dgl run above:
#
# * **dgl, twice the steps** — the same program, longer: does the error grow with $N$?
# * **bp** — another algorithm on the same blocks: backprop's timeline has the long locked chain of lesson 06;
# * **dgl-async, rank 1 slowed 2x** — the runtime's `--slowdown 2:2` makes block 2, on rank 1, do real extra work
#   (64x64 matrix products) for as long again after each of its ops; the simulator's `--slowdown 2:2` multiplies block
#   2's costs by 2 (lesson 07's experiment, now with real processes).
#
# In full mode two more runs join: synchronous dgl with the slowed rank, and dgl-async without a slowdown.
#
# 🔮 **Predict:** which of the held-out runs will the simulator predict worst, and why?

# %%
HELD_OUT = [  # (label, algorithm, slowdown {block: S}; rank k holds block k + 1)
    ("dgl, twice the steps", "dgl", {}),
    ("bp", "bp", {}),
    ("dgl-async, rank 1 slowed 2x", "dgl-async", {2: 2.0}),
] + pick([], [("dgl, rank 1 slowed 2x", "dgl", {2: 2.0}), ("dgl-async", "dgl-async", {})])
SLOWED = "dgl-async, rank 1 slowed 2x"

t_call = time.perf_counter()
held = {label: run(config(algo, N_HELD, slowdown)) for label, algo, slowdown in HELD_OUT}
print(f"{len(held)} runs in {time.perf_counter() - t_call:.0f} s of wall clock")


def predict(measured_trace, costs, slowed=True, seed=0):
    """Simulate the run that recorded `measured_trace`: same algorithm, blocks, steps and buffer, and (if `slowed`)
    the same slowdown, which the trace's metadata records per block. `seed` drives random costs (spread > 0)."""
    meta = measured_trace.meta
    slowdown = {int(b): S for b, S in meta["slowdown"].items()} if slowed else {}
    return sim.simulate(meta["algo"], blocks=meta["blocks"], steps=meta["steps"], costs=costs,
                        slowdown=slowdown, buffer=meta["buffer"], seed=seed)


predictions = {label: predict(res.trace, median_costs) for label, res in held.items()}
errors = {label: compare(res.trace, predictions[label].trace) for label, res in held.items()}

print(f"{'held-out run':<30} {'measured':>9} {'predicted':>9} {'makespan':>9} {'busy error':>16} {'start offset':>12}")
print(f"{'':<30} {'(ms)':>9} {'(ms)':>9} {'error':>9} {'rank 0 / rank 1':>16} {'(steps)':>12}")
for label, e in errors.items():
    busy = " / ".join(f"{b['error']:+.0%}" for b in e["busy"])
    print(f"{label:<30} {1e3 * e['makespan_measured']:9.0f} {1e3 * e['makespan_simulated']:9.0f} "
          f"{e['makespan_error']:+9.0%} {busy:>16} {e['start_offset_frac']:12.2f}")

# %%
# NBVAL_CHECK_OUTPUT
for label, res in held.items():
    e = errors[label]
    updates = [p["updates"] for p in res.summary["per_rank"]]
    print(f"{label}: ranks {res.trace.ranks}, updates per rank {updates}, "
          f"every simulated op has a measured twin: {e['matched'] == e['n_simulated']}")

# %% [markdown]
# The measured and the predicted timelines, one above the other (backprop, then the slowed dgl-async run; compute
# lanes only):

# %%
pairs = ["bp", SLOWED]
fig = viz.timelines([compute_lanes(in_ms(t)) for label in pairs for t in (held[label].trace, predictions[label].trace)],
                    [f"{kind}: {label}" for label in pairs for kind in ("measured", "predicted")])
fig.update_xaxes(title_text="time (ms)", row=4, col=1)
fig

# %% [markdown]
# Things to look for:
#
# * **bp**: each rank works about half the time, as lesson 06 said. Rank 0 waits (grey) for the gradient, rank 1 for the
#   next activation; the simulator has the same staircase, and its makespan is your answer to Exercise 1. Its error
#   depends on how well the *dgl* costs describe backprop's ops (section 5).
# * **dgl-async, slowed**: rank 0 races ahead and finishes early, rank 1 (slowed) works all the time on what its replay
#   buffer holds. The simulator gets the shape right; the slowed rank's length depends on how exactly the extra work
#   doubles each op on a busy machine.
#
# ### Exercise 2: the makespan error, by hand
#
# Compute the relative makespan error of the prediction for the slowed dgl-async run, as `bpsim.sim.compare` defines
# it, from the two traces' `makespan` attributes.

# %%
m_trace, s_trace = held[SLOWED].trace, predictions[SLOWED].trace
# BEGIN SOLUTION
error = (s_trace.makespan - m_trace.makespan) / m_trace.makespan
# END SOLUTION
checks.makespan_error(m_trace, s_trace, error)

# %% [markdown]
# ## 5. Where the error comes from
#
# Each assumption of section 1 fails a little on a real machine. Four effects are large enough to see here.
#
# **Time between ops (assumptions 2 and 4).** The simulator starts an op the instant the previous one ends, and a send
# costs the sender nothing. A real rank runs Python between ops (fetch the next minibatch, record the span, check for
# faults) and *posts* its sends: `isend` of a 128 x 1024 activation (512 KB) hands the tensor to gloo, which takes the
# compute thread some time, drawn as the `send` span on the rank's comm lane. None of this is inside a compute span.
# Per rank, the *untraced* time is the part of the window between its first and last compute span that is neither an
# op nor an explicit `wait`; posting sends is one part of it:

# %%
ALL_RUNS = {"dgl (calibration)": measured, **{label: res.trace for label, res in held.items()}}


def untraced(t, rank):
    """(posting sends, everything else) as shares of the rank's compute-lane window: time covered by no compute span."""
    rows = [r for r in t.rows if r[0] == rank and r[1] == "compute"]
    window = max(r[7] for r in rows) - min(r[6] for r in rows)
    gaps = window - sum(r[7] - r[6] for r in rows)
    sends = sum(r[7] - r[6] for r in t.rows if r[0] == rank and r[1] == "comm" and r[2] == "send")
    return sends / window, (gaps - sends) / window


print(f"{'run':<30} {'rank 0: sends + other':>22} {'rank 1: sends + other':>22}")
for label, t in ALL_RUNS.items():
    print(f"{label:<30}" + "".join(f"{'%.1f%% + %.1f%%' % tuple(100 * x for x in untraced(t, r)):>23}"
                                   for r in t.ranks))

# %% [markdown]
# In DGL, rank 0 sends an activation every step, and on a busy machine posting it can take milliseconds: a real gap
# on the sender that the simulator does not have. Rank 1 sends nothing (its `recv` spans belong to the receiver
# thread). In bp both ranks send, one activation and one gradient per step. The rest of the glue is small next to
# 1024-wide matrix products; it would dominate with narrow layers: with 256-wide blocks a two-process DGL run is
# *slower* than the same blocks in one process, the messages and the glue costing more than the parallel arithmetic
# saves. To fold the glue into the model, add the median `send` span of a block to its forward cost (or each rank's
# mean gap to its ops).
#
# **Bursty durations (assumption 1).** A duration is not a median plus small independent noise. Below, every compute
# span of every run divided by its median (per run, op and block; the slowed rank's spans compared with their own
# median):

# %%
ratios = []
for t in ALL_RUNS.values():
    groups = {}
    for r in t.rows:
        if r[1] == "compute" and r[2] in OPS:
            groups.setdefault((r[2], r[3]), []).append(r[7] - r[6])
    for ds in groups.values():
        med = statistics.median(ds)
        ratios += [d / med for d in ds]
fig = go.Figure(go.Histogram(x=[math.log2(q) for q in ratios], nbinsx=40, marker_color="#4C78A8"))
fig.update_layout(title=f"{len(ratios)} op durations relative to their median",
                  xaxis_title="log2(duration / median): 0 is the median, 1 twice as long",
                  yaxis_title="spans", height=350)
fig

# %%
slow_share = sum(q > 1.5 for q in ratios) / len(ratios)
print(f"{slow_share:.0%} of the spans took more than 1.5x their median; the slowest took {max(ratios):.1f}x")
print(f"load average of this machine (1, 5, 15 min): {os.getloadavg()}, cores available: "
      f"{len(os.sched_getaffinity(0))}")

# %% [markdown]
# Most spans sit close to their median, with a long tail to the right: the first step (memory allocation, cold
# caches), and every moment when another process took the core. The median ignores the tail by design, but the
# measured makespan contains all of it, so a simulator running on medians tends to be too fast. Three other ways to
# turn the calibration run into costs:
#
# * **means** instead of medians: every op gets its average duration, tail included;
# * **measured draws** (what `Costs.from_trace` returns): keep the medians and let the simulator draw every op's
#   duration / median factor from the ones the calibration run measured for that op (`jitter`); five seeds give a
#   range;
# * **lognormal draws**: the same, but each factor from the lognormal with the measured log-spread (`spread`), which
#   fits the narrow bulk of the histogram and misses most of its tail.
#
# All four from the same dgl calibration run, for every run of the lesson:


# %%
def mean_costs(t):
    """Like Costs.from_trace(t) with spread 0, but every op costs the *mean* of its spans."""
    durations = {}
    for r in t.rows:
        if r[1] == "compute" and r[2] in OPS:
            durations.setdefault((r[3], r[2]), []).append(r[7] - r[6])
    fitted = sim.Costs.from_trace(t)
    per_block = {k: dict(over) for k, over in fitted.per_block.items()}
    for (k, op), ds in durations.items():
        per_block[k][op] = statistics.fmean(ds)
    return replace(fitted, spread=0.0, jitter={}, per_block=per_block)


average_costs = mean_costs(measured)
lognormal_costs = sim.Costs.from_trace(measured, draws="lognormal")
print(f"{'run':<30} {'measured':>9} {'medians':>9} {'means':>9} {'measured draws':>16} "
      f"{'lognormal draws':>16}   (ms)")
for label, t in ALL_RUNS.items():
    drawn = [1e3 * predict(t, costs, seed=seed).makespan for seed in range(5)]  # `costs` keeps the jitter
    logn = [1e3 * predict(t, lognormal_costs, seed=seed).makespan for seed in range(5)]
    print(f"{label:<30} {1e3 * t.makespan:9.0f} {1e3 * predict(t, median_costs).makespan:9.0f} "
          f"{1e3 * predict(t, average_costs).makespan:9.0f} {min(drawn):7.0f} - {max(drawn):<6.0f} "
          f"{min(logn):7.0f} - {max(logn):<6.0f}")

# %% [markdown]
# For the dgl runs, means and measured draws usually land closer than medians, since they put the tail back in; the
# price is that one long hiccup in the calibration run is then charged, on average, to every step of every prediction.
# Measured draws keep the medians *and* the mean of each op, which is why `Costs.from_trace` returns them; lognormal
# draws add only a little of the tail and stay close to the medians. (For bp the costs themselves are off, as we will
# see next, and no way of averaging fixes that.) Independent draws are still a model: every synchronisation waits for
# the *slower* of two draws, whereas real slowness comes in bursts (one busy neighbour slows several consecutive ops).
# No choice is right in general: a cost model is a summary of a distribution, and the makespan depends on more of it
# than one number. `benchmarks/fidelity.py` compares measured and lognormal draws over a dozen held-out runs.
#
# **Contention for cores (assumption 3).** The two ranks are not independent devices: they share 2 cores with their
# receiver threads, the notebook and whatever else runs on the machine (the load average above counts it). Start more
# ranks than cores, e.g. `bpsim run dgl --workers 4` on 2 cores (on a bigger machine, `--cpus 0,1` confines the ranks
# to two cores), and the operating system time-slices them: a measured span then includes the time its process waited
# for a core. The simulator can model shared devices
# (`placement=2` puts 4 blocks on 2 devices, one op at a time per device), but only if its costs come from an
# undisturbed run, e.g. `--workers 1`. `benchmarks/fidelity.py` measures exactly this case.
#
# **Run-to-run noise, and costs that do not carry over (assumptions 1 and 3).** The calibration measured *DGL's* ops,
# in one run. How much do op costs move between two runs of the *same* program? The held-out run "dgl, twice the
# steps" is exactly that. And how much between two algorithms? Backprop's block 2 backward also computes the gradient
# with respect to its input, to send it back to block 1, one more 1024 x 1024 product than DGL's detached block 2; and
# backprop's two ranks take turns, while DGL's compute at the same time and compete for the two cores (and the memory
# bandwidth) with each other, with their receiver threads and with everything else on the machine.

# %%
op_costs = {"dgl (calibration)": costs,
            "dgl, twice the steps": sim.Costs.from_trace(held["dgl, twice the steps"].trace),
            "bp": sim.Costs.from_trace(held["bp"].trace)}
print(f"{'median (ms)':<14}" + "".join(f"{name:>22}" for name in op_costs))
for op in ("fwd", "bwd", "update"):
    for k in (1, 2):
        base = costs.get(op, k)
        print(f"{op + ' block ' + str(k):<14}" + "".join(
            f"{1e3 * c.get(op, k):13.2f} ({c.get(op, k) / base:4.2f}x)" for c in op_costs.values()))

# %% [markdown]
# Read the middle column first: it is pure noise, the same ops measured again a few seconds later. On a shared 2-core
# machine a median can move by tens of percent between two such runs (sometimes by 2x, when another process holds a
# core for a while). Only a difference in the bp column *beyond* that spread says something about the algorithm: by
# FLOPs, block 2's backward should be dearer in bp; by contention, every op of bp may come out cheaper, since its ranks
# rarely compute at the same time. With a few dozen steps per run the noise is often as large as either effect. A fair
# prediction of another algorithm needs that algorithm's own op costs: calibrate on a short run of it, or count FLOPs
# (`Costs.from_flops`, lesson 06), or add just what the calibration run never did. For bp that is the input-gradient
# product, whose FLOPs `BlockNet.input_grad_flops()` counts; `costs.with_input_grad(fractions)` adds it as `bwd_in` to
# the backward of blocks 2..K (`benchmarks/fidelity.py` does this). GPipe needs one more correction: a micro-batch op
# costs more than $1/m$ of the minibatch op (small products use the hardware less well), and the backward of
# micro-batches 2..m *adds* to the weight gradients that the first one wrote, an extra read and write of every gradient
# that is bound by memory bandwidth, not arithmetic. On this course's CPU, $t(B/4)/t(B)$ came out at 0.3-0.9 instead of
# 0.25, and one op's ratio could land anywhere from 0.34 to 0.74 depending on the process that timed it
# (`profile_ratios` in `benchmarks/fidelity.py`, which therefore profiles in several fresh processes). Whichever you
# pick, repeat measurements before trusting a difference, and vary their order: on a machine whose speed drifts over
# minutes, whatever is always measured first is measured at another speed (`fidelity.py` starts each round of repeats
# at another place). And if you suspect that ranks computing at once slow each other down, `Trace.overlap()` says how
# much a run's ranks did, and `Costs(contention=...)` lets the simulator try it. Test such a fit on runs whose ranks
# overlap differently: fitted from the same ops timed alone (`fit_contention` in `benchmarks/fidelity.py`), the
# contention that made the one-process run come out right made bp, whose ranks take turns, 17 % too fast, so on this
# machine the slowdown is not simply ranks computing at the same time. The explorer below puts
# "calibrated on dgl" and "calibrated on the run itself" side by side.
#
# So, to the question of section 1: on this machine the assumptions that break worst are 1 and 3, stable op costs on
# independent devices. The Python between ops (assumption 2) costs a few percent with blocks this wide, and the
# latency model (assumption 4) hardly matters next to the compute.
#
# DGL's authors meet the same difficulty at scale: their wall-clock comparison (DGL §4.1, "Wall Time Comparison") is
# made against one other implementation with the same communication code on the same hardware, and their Appendix C
# lists what else a fair speed comparison has to hold fixed. Measured speedups are claims about a machine, not about
# an algorithm alone.
#
# ## 6. Explorer: measured against predicted
#
# Three sliders over the runs of this lesson (no process is started here: every frame compares traces recorded above
# with a fresh simulation):
#
# * **run** — which measured run (the calibration run or one of the held-out runs);
# * **steps** — show only its first $n$ steps (and simulate $n$ steps);
# * **costs** — predict with the medians of the dgl calibration run or with op times drawn from its measured
#   distribution (real predictions; what `Costs.from_trace` returns, seed 0), or with the medians of the run itself
#   (a fit: what the schedule does with that run's own fixed costs; a slowed run's costs then already contain its
#   slowdown).
#
# Only the compute lanes are drawn; the dashed lines mark the makespans.
#
# 🔮 **Predict before you move a slider:**
# 1. For **bp**, which costs give the better prediction? Does the difference match the backward ratio printed above?
# 2. Going from the first 5 steps to the first 10, does the relative makespan error grow or shrink? (Think of the
#    slow first step.)
# 3. For the slowed dgl-async run, does fitting the run's own costs fix the prediction of rank 1's finish time?

# %%
EXPLORER_OPS = ("fwd", "aux", "bwd", "update", "wait")
EXPLORER_RUNS = list(ALL_RUNS)[:4]  # the calibration run and the first three held-out runs: at most 24 frames
EXPLORER_STEPS = pick([5, 10], [10, N_CAL])
COST_CHOICES = ["dgl run, medians", "dgl run, measured draws", "this run, medians"]
self_costs = {label: replace(sim.Costs.from_trace(ALL_RUNS[label]), spread=0.0, jitter={}) for label in EXPLORER_RUNS}


costs_drawn = costs  # section 3: the medians and the measured duration / median factors (`jitter`)


def first_steps(t, n):
    """The spans of trace t that belong to its first n steps."""
    return trace.Trace.from_rows([r for r in t.rows if r[4] < n], dict(t.meta, steps=n))


def measured_vs_predicted(run, steps, costs):
    """Bars of the measured run's first `steps` steps (top) and of its prediction (bottom), plus makespan lines."""
    m = first_steps(ALL_RUNS[run], steps)
    if costs == "this run, medians":
        p = predict(m, self_costs[run], slowed=False)
    else:
        p = predict(m, median_costs if costs == "dgl run, medians" else costs_drawn)
    fig = viz.timelines([compute_lanes(in_ms(m)), compute_lanes(in_ms(p.trace))], ["measured", "predicted"])
    out = []
    for i, axis in enumerate(("y", "y2")):
        for op in EXPLORER_OPS:  # the same traces in every frame: an empty bar where an op is missing
            bar = next((b for b in fig.data if b.name == op and (b.yaxis or "y") == axis), None)
            if bar is None:
                bar = go.Bar(orientation="h", name=op, legendgroup=op, x=[], y=[], base=[],
                             marker_color=viz.OP_COLORS[op], xaxis="x" if i == 0 else "x2", yaxis=axis)
            bar.showlegend = i == 0
            out.append(bar)
    err = (p.makespan - m.makespan) / m.makespan
    for i, (T, text) in enumerate(((m.makespan, f"measured {1e3 * m.makespan:.0f} ms"),
                                   (p.makespan, f"predicted {1e3 * p.makespan:.0f} ms ({err:+.0%})"))):
        out.append(go.Scatter(x=[1e3 * T, 1e3 * T], y=["rank 0 compute", "rank 1 compute"], mode="lines+text",
                              text=[text, ""], textposition="top left", cliponaxis=False, showlegend=False,
                              line={"dash": "dash", "color": "black", "width": 1}, hoverinfo="skip",
                              xaxis="x" if i == 0 else "x2", yaxis="y" if i == 0 else "y2"))
    return out


explorer_layout = viz.timelines([compute_lanes(in_ms(measured))] * 2, ["measured", "predicted"]).layout
explorer_layout.update(height=480, title="Measured (top) and predicted (bottom) timelines, compute lanes")
explorer_layout.xaxis2.title.text = "time (ms)"
for axis in ("yaxis", "yaxis2"):
    explorer_layout[axis].update(categoryarray=["rank 1 compute", "rank 0 compute"])

widgets.explorer(
    measured_vs_predicted,
    {"run": EXPLORER_RUNS, "steps": EXPLORER_STEPS, "costs": COST_CHOICES},
    defaults={"run": "bp", "steps": EXPLORER_STEPS[-1], "costs": "dgl run, medians"},
    layout=explorer_layout,
)

# %% [markdown]
# What the sliders show (your numbers differ from run to run; look at the shapes):
#
# * The *shape* is right in every frame: who waits for whom, where the grey gaps are, which rank finishes first. The
#   schedules of `bpsim.sim` and of the runtime are the same schedules.
# * Even the run's own medians leave the prediction short when the run had a slow start or bursts; what is missing is
#   the tail of the durations and the time between ops. Measured draws put the tail back on average, not the bursts:
#   in a short window they can land on either side.
# * For bp, the gap between "dgl run, medians" and "this run, medians" is the price of carrying op costs from one
#   algorithm to another.
# * The first steps are the slowest, so the relative error over a few steps is usually larger than over many.
#
# ## 7. Opening traces in Perfetto
#
# Every trace in this course is also a file in the Chrome trace-event format, which [Perfetto](https://ui.perfetto.dev)
# (and `chrome://tracing`) opens: one *process* per run, one *thread* per rank and lane, one slice per span with its
# rank, block, step and exact times in the slice's arguments, and flow arrows from each `send` to its `recv`.
# `Trace.save` writes the file **atomically**: first to a temporary file in the same folder, then renamed over the
# target, so a reader never sees half a file; the runtime writes the trace recorded so far even when a rank fails.
#
# To see the measured and the simulated run together, put them in one file as two processes:

# %%
def with_message_ids_shifted(t, offset):
    """A copy of t whose message ids are shifted, so that the flow arrows of two runs in one file stay apart."""
    return trace.Trace.from_rows([r[:8] + (None if r[8] is None else r[8] + offset,) for r in t.rows], t.meta)


both = measured.to_chrome(pid=0, name="measured: dgl, 2 processes")
both["traceEvents"] += with_message_ids_shifted(replay.trace, 10**9).to_chrome(
    pid=1, name="simulated: calibrated medians")["traceEvents"]
BOTH_FILE = TRACE_DIR / "dgl-measured-and-simulated.json"
trace.atomic_write_text(BOTH_FILE, json.dumps(both))
REPORT_FILE = TRACE_DIR / "dgl-report.html"
viz.comparison_report_html(measured, replay.trace, error_table(compare(measured, replay.trace)), path=REPORT_FILE)
print("open in Perfetto:", BOTH_FILE)
print("HTML report (both timelines and the error table):", REPORT_FILE)

# %% [markdown]
# In Perfetto: **Open trace file**, pick the JSON file (it is read in your browser, nothing is uploaded). `W`/`S` zoom,
# `A`/`D` pan, a click on a slice shows its arguments, and selecting a `send` highlights the arrow to its `recv`. The
# two runs appear as two processes, measured above simulated.
#
# The same three steps from a terminal, with the file the first run wrote:
#
# ```
# bpsim simulate dgl --blocks 2 --steps 20 --calibrate dgl-calibration.json --draws median --trace sim.json
# bpsim compare dgl-calibration.json sim.json --html report.html
# ```
#
# ## 8. The same code on GPUs and across hosts
#
# Nothing above is specific to a laptop. With `--device cuda` (or `RunConfig(..., device="cuda")`) rank $k$ computes on
# `cuda:(k mod #GPUs)`. With at least as many GPUs as workers the ranks talk over **NCCL**; with fewer, two ranks share
# a GPU and the runtime falls back to gloo through host memory (NCCL cannot put two ranks on one GPU). Every compute
# span ends with `torch.cuda.synchronize`, so that it times the kernels and not just their launch; that costs a little
# per op, and it is one more reason to calibrate on the machine you predict. (The CUDA tests, `tests/test_cuda.py`, run
# only where torch sees a GPU: they passed on one H200, where NCCL between ranks could not run with a single GPU. The
# CPU path is what every machine tests.)
#
# ```
# bpsim run dgl --workers 2 --device cuda --steps 200 --width 1024 --depth 3 --aux linear \
#     --batch-size 128 --trace dgl-gpu.json --json
# ```
#
# Across hosts, the same worker code runs under `torchrun`, one process per rank. `bpsim run` recognises torchrun's
# environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`); `--workers` must equal the world size. Two hosts,
# one block each (from `docs/runtime.md`; not run here):
#
# ```
# # on host A (10.0.0.1) and on host B, the same command:
# torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d \
#     --rdzv-endpoint 10.0.0.1:29500 --rdzv-id bpsim-dgl \
#     -m bpsim run dgl --workers 2 --steps 500 --width 1024 --trace dgl.json --json
# ```
#
# Each host needs the same bpsim and torch versions and the dataset, and the rendezvous port (29500) open
# (`GLOO_SOCKET_IFNAME` or `NCCL_SOCKET_IFNAME` pick the network interface). Rank 0 gathers every rank's spans and
# writes the trace. Ranks on other hosts do not share rank 0's clock: each estimates its offset with 8 ping-pong rounds
# and keeps the one with the shortest round trip (error at most half of it); when merging, the runtime shifts such a
# rank within that error so that no message arrives before it was sent (`trace.meta["clock_repair"]`). On one host,
# `torchrun --standalone --nproc-per-node 2 -m bpsim run dgl --workers 2 --steps 50` does what `run()` did above.
#
# ## Summary
#
# * `bpsim.runtime.run(RunConfig(...))` (or `bpsim run`) trains with one process per block and returns a merged trace
#   in the simulator's vocabulary; `Trace.check()` validates it, `Trace.save`/`load` round-trip it exactly through
#   Chrome trace JSON, written atomically.
# * `Costs.from_trace` calibrates the simulator: median cost per op and block, a lognormal spread, the message
#   latency. With these costs the closed forms still hold, e.g.
#   $T_{\text{bp}} = N(\sum_k (F_k + B_k) + 2(K-1)c + U_1)$ and, for two DGL blocks,
#   $T_{\text{dgl}} = \max(N P_1, F_1 + c + P_2 + (N-1)\max(P_1, P_2))$.
# * `bpsim.sim.compare` reports the makespan error $(T_{\text{sim}} - T_{\text{meas}})/T_{\text{meas}}$, the busy-time
#   error per rank and the start offsets of matched ops.
# * The schedules are right; the numbers are only as good as the costs. Errors come from Python between ops, bursty
#   durations on a shared machine (medians miss them, independent random draws overstate them), ranks competing for
#   cores, and op costs carried from one algorithm to another. Measured on a noisy 2-core machine, treat a single
#   run's error as a sample, not a property of the simulator.
# * The same runs go to GPUs (`--device cuda`, NCCL, rank $k$ on `cuda:(k mod #GPUs)`) and across hosts
#   (`torchrun ... -m bpsim run`), and every trace opens in Perfetto.
#
# **Previous:** [07 · Asynchronous DGL with replay](07-async-replay.ipynb) · **Back to the start:**
# [00 · Start here](00-start-here.ipynb), the map of the course.
