# %% [markdown]
# # 06 · Locking made visible: simulated timelines of every method
#
# **Time:** about 45 minutes; in full mode the code computes for under a minute (one CPU core) ·
# **Prerequisites:** lesson 00 (the three locks), lesson 04 (DGL); lesson 03 helps for BlockProp
#
# **By the end of this lesson you will be able to**
# 1. read a device timeline (a Gantt chart) and point at *forward*, *update* and *backward* locking in
#    backprop, GPipe, synchronous and asynchronous DGL and BlockProp;
# 2. write the makespan of backprop, GPipe and DGL in closed form and check each formula against the discrete-event simulator;
# 3. explain why removing the backward lock alone leaves a step that grows like $O(L\,T_F)$ while removing the update
#    lock lets it shrink to $O(T_F)$ (DGL §5), and compute the *bubble* of a GPipe pipeline;
# 4. move the number of blocks, a slow block, the message latency and the number of micro-batches in an explorer and
#    predict what each does to every schedule.
#
# Lessons 01–05 asked whether local objectives *learn*. This one asks what they *buy in time*. Everything here is
# predicted by `bpsim.sim`, a SimPy discrete-event simulator; lesson 08 puts its predictions next to real multi-process runs.

# %%
import json
import math
from pathlib import Path

import plotly.graph_objects as go
import torch

import bpsim
from bpsim import data, nets, sim, trace, viz
from bpsim.course import checks, pick, widgets

torch.set_num_threads(1)  # small models: one thread is fastest and repeatable
FAST = pick(True, False)
print("fast mode" if FAST else "full mode")

# %% [markdown]
# ## 1. The cost model of the simulator
#
# The network $f = b_K \circ \dots \circ b_1$ is cut into $K$ blocks and block $k$ lives on device $k$
# (in code: `net.blocks[k-1]` on rank $k-1$). For one minibatch, block $k$ spends
#
# | symbol | op in the trace | what |
# | --- | --- | --- |
# | $F$ | `fwd` | forward through the block |
# | $B$ | `bwd` | backward through the block (about $2F$: one product for the input gradient, one for the weights) |
# | $A$ | `aux` | forward + backward of the block's auxiliary head (DGL, BWBPF only) |
# | $U$ | `update` | the optimizer step on the block's weights |
# | $c$ | `send`/`recv` | latency of one message (activation, gradient or target) between two devices |
#
# A *schedule* says which op must wait for which message. `sim.simulate(algo, blocks=K, steps=N, costs=...)` plays the
# schedule out event by event and returns a `SimResult` with the `trace` (every span), the `makespan` (end of the last
# span), the `throughput` ($N$ / makespan) and, in `per_block`, each block's busy time, utilization and idle time split by
# **cause**: waiting for an *input* (forward locking) or for a *gradient/target* from above (update and backward locking).
# The ASCII diagram in the docstring of each schedule in `bpsim/sim/schedules.py` is its specification.
#
# The five schedules of this lesson, in the vocabulary of DGL §1 (which borrows it from the DNI paper):
#
# | name | method | forward locked | update locked | backward locked |
# | --- | --- | :-: | :-: | :-: |
# | `bp` | end-to-end backprop | yes | yes | yes |
# | `gpipe` | backprop on $m$ pipelined micro-batches (GPipe) | yes | yes | yes, amortized over $m$ |
# | `blockprop` | BlockProp, Alg. 1: forward, h-step chain $K \to 2$, parallel W-step | yes | yes | yes, through the h-step chain $K \to 2$ |
# | `dgl` | synchronous DGL, Alg. 1 (parallel form Alg. 3) | yes | **no** | **no** |
# | `dgl-async` | asynchronous DGL with replay, Alg. 2 (parallel form Alg. 4) | **no** | **no** | **no** |
#
# 🔮 **Predict before you run:** three blocks, two minibatch steps, $F=1$, $B=2$, $A=0.3$, $U=0.2$, $c=0.1$.
# Rank the five methods by makespan, fastest first. Which two will be exactly equal?

# %%
K_DEMO, STEPS_DEMO, M_DEMO = 3, 2, 2
demo_costs = {"fwd": 1.0, "bwd": 2.0, "aux": 0.3, "update": 0.2, "comm": 0.1}
# GPipe splits each minibatch into m micro-batches: forward and backward cost 1/m of the minibatch's.
gpipe_costs = dict(demo_costs, fwd=demo_costs["fwd"] / M_DEMO, bwd=demo_costs["bwd"] / M_DEMO)

ALGOS = ["bp", "gpipe", "blockprop", "dgl", "dgl-async"]
results = {}
for algo in ALGOS:
    results[algo] = sim.simulate(algo, blocks=K_DEMO, steps=STEPS_DEMO,
                                 costs=gpipe_costs if algo == "gpipe" else demo_costs,
                                 microbatches=M_DEMO if algo == "gpipe" else 1)


def compute_lanes(t):
    """The compute spans only: with an infinitely fast link a message is a zero-width span on the comm lane,
    so the latency shows up as the gap between one block's `fwd` and the next block's."""
    return trace.Trace([row for row in t.rows if row[1] == "compute"], t.meta)


viz.timelines([compute_lanes(r.trace) for r in results.values()],
              [f"{a}: makespan {r.makespan:.2f}" for a, r in results.items()])

# %% [markdown]
# Hover over a bar to see its op, block, step and micro-batch. Rank $k-1$ holds block $k$. Things to spot:
#
# * **`bp`** — the staircase down (forwards) and up (backwards): block 1 waits for the whole network before its backward.
#   Each device is busy during one slice of the step.
# * **`gpipe`** — micro-batch $i$ enters block $k$ at clock tick $i + k$ (the torchgpipe `clock_cycles` picture);
#   the triangles of idle time at the start and the end of each step are the *bubble*.
# * **`blockprop`** — after the forward, the h-step travels from block $K$ down to 2 (purple), each block handing its
#   optimized $h_k^*$ to block $k-1$; the W-steps then run on all blocks at once.
# * **`dgl`** and **`dgl-async`** — each block sends its output on as soon as its forward ends and trains on its own head
#   (orange) meanwhile. After a short fill, every device is busy all the time. With equal speeds the asynchronous version makes
#   *exactly* the same timeline (it reads the newest buffer entry, which is the one just sent); lesson 07 slows a block down.
#
# Where does the idle time come from? The simulator records why each block waited.

# %%
# NBVAL_CHECK_OUTPUT
print(f"{'method':<10} {'makespan':>9} {'mean util':>9} {'idle: input':>12} {'idle: grad/target':>18}")
for algo, r in results.items():
    util = sum(b["utilization"] for b in r.per_block) / K_DEMO
    wait_in = sum(b["idle_by_cause"]["input"] + b["idle_by_cause"]["buffer"] for b in r.per_block)
    wait_grad = sum(b["idle_by_cause"]["gradient"] for b in r.per_block)
    print(f"{algo:<10} {r.makespan:>9.2f} {util:>9.0%} {wait_in:>12.2f} {wait_grad:>18.2f}")

# %% [markdown]
# Waiting for an *input* is forward locking. Every method waits for its very first input (even `dgl-async`: its
# buffer starts empty), but the two DGL variants wait only then, while the pipeline fills; backprop, GPipe and
# BlockProp wait again every step. Waiting for a *gradient or target* is update/backward locking: DGL has none at all.
# (Idle time at the very end, after a block's last update, is not attributed to a cause.)
#
# ### Caching unlocks BlockProp's W-step (Algorithm 2)
#
# BlockProp's W-step is parallel, but the h-step chain in front of it locks every step. Algorithm 2 (Appendix C) caches
# each example's $h^*$ and runs the h-step only every $E$ epochs; in the other epochs every block takes its W-step on
# the cached $h^*_k$ and $h^*_{k+1}$ alone. Below: 3 blocks, 2 steps per epoch, 2 epochs, $N_h = 2$, with and without the
# cache ($E = 2$: the h-step runs in epoch 0 only).
#
# 🔮 **Predict:** in the cached epoch (steps 2 and 3), what does each device wait for?

# %%
bp_runs = {algo: sim.simulate(algo, blocks=3, steps=4, costs=demo_costs, nh=2, steps_per_epoch=2,
                              **({"cache_every": 2} if algo == "blockprop-cached" else {}))
           for algo in ("blockprop", "blockprop-cached")}
viz.timelines([compute_lanes(r.trace) for r in bp_runs.values()],
              [f"{a}: makespan {r.makespan:.2f}" for a, r in bp_runs.items()])

# %%
# NBVAL_CHECK_OUTPUT
cached = bp_runs["blockprop-cached"].trace
waits = []
for j in (1, 2, 3):
    later = [row for row in cached.rows if row[3] == j and row[4] >= 2]       # steps 2 and 3: the cached epoch
    waits.append(sum(row[7] - row[6] for row in later if row[2] == "wait"))
    print(f"block {j}, cached epoch: ops {sorted({row[2] for row in later if row[2] != 'wait'})}, waited {waits[-1]:.2f}")
print(f"makespan: blockprop {bp_runs['blockprop'].makespan:.2f}, blockprop-cached {bp_runs['blockprop-cached'].makespan:.2f}")
assert bp_runs["blockprop-cached"].makespan < bp_runs["blockprop"].makespan and max(waits) == 0

# %% [markdown]
# In the cached epoch no block sends or waits: each runs forward, backward and update on its own cached pair, all three
# at once, like DGL without the head. The measured runs agree in direction but gain less: in
# `benchmarks/results/throughput.json` cached BlockProp is 1.34x faster on 2 workers than on 1, against 1.15x without
# the cache and 1.90x for DGL (ledger claim C7: *partly*), because the epochs that still run the h-step keep the lock.
#
# ## 2. Closed forms for the makespan
#
# With fixed costs the three main schedules can be solved by hand; the simulator's test suite checks exactly these formulas.
#
# **Backprop.** A step is a chain: $K$ forwards, $K-1$ messages up, $K$ backwards, $K-1$ messages down, and the update
# of block 1 (every other block's update overlaps with the backward below it):
#
# $$T_{\text{bp}} = N\,\big(K(F+B) + 2(K-1)\,c + U\big).$$
#
# **GPipe** with $m$ micro-batches ($F$, $B$ now per micro-batch, $c = 0$). Block $k$ runs the forward of micro-batch $i$
# at tick $i + k - 1$, so the last forward ends at tick $m + K - 1$; the backwards mirror it, then all blocks update:
#
# $$T_{\text{gpipe}} = N\,\big((m+K-1)(F+B) + U\big), \qquad
#   \text{bubble} = \frac{K-1}{m+K-1}\ \text{of each step (for } U = 0).$$
#
# With a latency $c > 0$ it matters when a message may leave. In the pipelines (`gpipe`, `1f1b`) a block asks for a
# micro-batch only when it is about to use it, as torch's pipelining schedules do, so every micro-batch waits $c$:
# for $K = 2$ a step takes $(m+1)(F+B) + 2mc + U$. The other schedules send each result as soon as it exists, so it is
# usually there before the receiver needs it, and only the first message of a chain is waited for.
#
# **Synchronous DGL** (Alg. 1, lines 3–6; Alg. 3 in App. D). Block $k$ only waits for $x_{k-1}^t$. Every block
# repeats *forward, send, head, backward, update*, period $F + A + B + U$; block $K$ starts $(K-1)(F+c)$ after block 1:
#
# $$T_{\text{dgl}} = (K-1)(F+c) + N\,(F + A + B + U).$$
#
# The formulas become three one-line functions; the cell then compares them with the simulator.

# %%
def t_bp(K, N, F, B, U, c):
    """Makespan of fully locked backprop."""
    return N * (K * (F + B) + 2 * (K - 1) * c + U)


def t_gpipe(K, N, m, F, B, U):
    """Makespan of GPipe, costs per micro-batch, no latency."""
    return N * ((m + K - 1) * (F + B) + U)


def t_dgl(K, N, F, A, B, U, c):
    """Makespan of synchronous DGL: fill the pipeline once, then one period per step."""
    return (K - 1) * (F + c) + N * (F + A + B + U)


F, B, A, U, c = 1.0, 2.0, 0.2, 0.1, 0.05
cost = {"fwd": F, "bwd": B, "aux": A, "update": U, "comm": c}
K, N, m = 4, 10, 4

rows = [
    ("bp", t_bp(K, N, F, B, U, c), sim.simulate("bp", blocks=K, steps=N, costs=cost).makespan),
    ("gpipe", t_gpipe(K, N, m, F, B, U),
     sim.simulate("gpipe", blocks=K, steps=N, microbatches=m, costs=dict(cost, comm=0)).makespan),
    ("dgl", t_dgl(K, N, F, A, B, U, c), sim.simulate("dgl", blocks=K, steps=N, costs=cost).makespan),
]

# %%
# NBVAL_CHECK_OUTPUT
print(f"K={K}, N={N}, m={m}:  {'method':<6} {'closed form':>12} {'simulated':>10}")
for name, formula, simulated in rows:
    print(f"{'':15}{name:<6} {formula:>12.3f} {simulated:>10.3f}")

# %% [markdown]
# The GPipe row counts micro-batch costs: each of its $m = 4$ micro-batches costs $F$ and $B$, so one GPipe step does
# four times the work of one bp step. For a fair comparison the work per minibatch has to be the same, which is what the
# next section does.
#
# 🔮 **Predict:** keep the per-block costs and double $K$ from 4 to 8. By what factor does each of the three makespans
# grow? (Read it off the formulas, then change `K` above and rerun the two cells.)
#
# **1F1B** (the "PipeDream-flush" order; `Schedule1F1B` in `torch.distributed.pipelining`, which `bpsim run 1f1b`
# drives) keeps GPipe's micro-batches and its flush but reorders the ops: block $k$ runs $\min(m, K-k+1)$ warm-up
# forwards, then alternates one backward and one forward, then finishes its backwards.
#
# 🔮 **Predict:** with $K = 4$ blocks and $m = 8$ micro-batches, is 1F1B's makespan shorter than GPipe's? At most how
# many micro-batches' activations must block 1 keep for its backward in each schedule? And block 4?

# %%
# NBVAL_CHECK_OUTPUT
def peak_in_flight(t, k):
    """Most micro-batches that block k has run forward but not yet backward: the activations it must keep."""
    live = peak = 0
    ops = sorted((r for r in t.rows if r[1] == "compute" and r[3] == k and r[2] in ("fwd", "bwd")),
                 key=lambda r: r[6])
    for row in ops:
        live += 1 if row[2] == "fwd" else -1
        peak = max(peak, live)
    return peak


M_PIPE = 8
pipes = {a: sim.simulate(a, blocks=K, steps=2, microbatches=M_PIPE, costs=dict(cost, comm=0))
         for a in ("gpipe", "1f1b")}
for a, r in pipes.items():
    held = [peak_in_flight(r.trace, k) for k in range(1, K + 1)]
    print(f"{a:<6} makespan {r.makespan:6.2f} (closed form {t_gpipe(K, 2, M_PIPE, F, B, U):6.2f}), "
          f"activations kept per block: {held}")

# %%
viz.timelines([compute_lanes(r.trace) for r in pipes.values()],
              [f"{a}, K = {K}, m = {M_PIPE}: makespan {r.makespan:.2f}" for a, r in pipes.items()])

# %% [markdown]
# The makespans are equal: both schedules leave the same bubble, $(K-1)(F+B)$ per step, only in other places. What
# 1F1B saves is memory: block $k$ never holds more than $K-k+1$ micro-batches' activations, against all $m$ in GPipe.
# That is why pipelines in practice use it: for the same memory they can afford a larger $m$, and the bubble's share
# $(K-1)/(m+K-1)$ shrinks with $m$. The simulator's `1f1b` follows torch's op order exactly, so its timelines can be
# set beside measured `bpsim run 1f1b` runs (lesson 08 shows how to compare the two).
#
# ## 3. Speedup against the number of blocks: $O(L\,T_F)$ versus $O(T_F)$
#
# DGL §5 (related work) makes the scaling argument: take a network of $L$ layers whose forward costs $T_F$ each, the
# backward a constant multiple $r$ of it. On $L$ devices, a method that is only *backward* unlocked still has to wait
# for the forward signal to cross all layers before any update, so a step takes time of order $L\,T_F$; an *update*
# unlocked method like DGL lets each layer move on after its own forward, so the step shrinks to order $T_F$.
#
# We split $L = 16$ layers into $K$ blocks of $L/K$ layers, so a block costs $F = (L/K)\,T_F$ and $B = rF$ with $r = 2$.
# The auxiliary head costs 10 % of its block's forward (DGL §2.4 aims for at most 5 % of the FLOPs; we are generous),
# the update of all weights costs $0.5\,T_F$ in total and a message $c = 0.2\,T_F$. The speedup is the single-device
# backprop makespan divided by each method's makespan. GPipe gets $m = 8$ micro-batches (and $c = 0$, where its closed
# form holds).
#
# 🔮 **Predict:** at $K = 16$, roughly what speedup do backprop, GPipe and DGL reach? Sketch the three curves first.

# %%
L, T_F, r, m_pipe = 16, 1.0, 2.0, 8
N_SPEED = pick(20, 100)
Ks = [1, 2, 4, 8, 16]


def split_costs(K, m=1):
    """Per-block (and per-micro-batch) costs of an L-layer network cut into K blocks."""
    F = L / K * T_F
    return {"fwd": F / m, "bwd": r * F / m, "aux": 0.1 * F, "update": 0.5 * T_F / K, "comm": 0.2 * T_F}


t_one = sim.simulate("bp", blocks=1, steps=N_SPEED, costs=split_costs(1)).makespan
speedup = {"bp": [], "gpipe": [], "dgl": []}
closed = {"bp": [], "gpipe": [], "dgl": []}
for K_ in Ks:
    c1, cm = split_costs(K_), split_costs(K_, m_pipe)
    speedup["bp"].append(t_one / sim.simulate("bp", blocks=K_, steps=N_SPEED, costs=c1).makespan)
    speedup["gpipe"].append(t_one / sim.simulate("gpipe", blocks=K_, steps=N_SPEED, microbatches=m_pipe,
                                                 costs=dict(cm, comm=0)).makespan)
    speedup["dgl"].append(t_one / sim.simulate("dgl", blocks=K_, steps=N_SPEED, costs=c1).makespan)
    closed["bp"].append(t_one / t_bp(K_, N_SPEED, c1["fwd"], c1["bwd"], c1["update"], c1["comm"]))
    closed["gpipe"].append(t_one / t_gpipe(K_, N_SPEED, m_pipe, cm["fwd"], cm["bwd"], cm["update"]))
    closed["dgl"].append(t_one / t_dgl(K_, N_SPEED, c1["fwd"], c1["aux"], c1["bwd"], c1["update"], c1["comm"]))

colors = {"bp": "#E45756", "gpipe": "#B279A2", "dgl": "#4C78A8"}
fig = go.Figure()
fig.add_scatter(x=Ks, y=Ks, mode="lines", line={"dash": "dot", "color": "gray"}, name="ideal: K (step ~ T_F)")
fig.add_scatter(x=Ks, y=[1] * len(Ks), mode="lines", line={"dash": "dash", "color": "gray"},
                name="no gain: 1 (step ~ L T_F)")
for name in speedup:
    fig.add_scatter(x=Ks, y=closed[name], mode="lines", line={"color": colors[name]}, name=f"{name}: closed form")
    fig.add_scatter(x=Ks, y=speedup[name], mode="markers", marker={"color": colors[name], "size": 10, "symbol": "x"},
                    name=f"{name}: simulated")
fig.update_layout(title=f"Speedup over single-device backprop, L={L} layers cut into K blocks, N={N_SPEED} steps",
                  xaxis={"title": "K (blocks = devices)", "type": "log", "tickvals": Ks},
                  yaxis={"title": "speedup", "type": "log"}, height=450)
fig

# %%
# NBVAL_CHECK_OUTPUT
for name in speedup:
    print(f"{name:<6} speedup at K = {', '.join(map(str, Ks))}: " + " ".join(f"{s:.2f}" for s in speedup[name]))

# %% [markdown]
# Backprop gains nothing and loses a little to messages: with one device per block the step is still the whole forward
# and backward chain, $\Theta(L\,T_F)$. GPipe recovers most of the parallelism, $K m / (m + K - 1)$ in the limit of free
# updates, but the bubble grows with $K$ at fixed $m$. DGL follows the ideal line until the fixed costs (the head, the
# pipeline fill $(K-1)(F+c)$, the latency) start to matter, because its step is one block's work, $\Theta(T_F)$ once
# $K = L$.
#
# The simulator and the formulas agree to the last digit here because every cost is fixed. With random costs
# (`costs={"spread": 0.2, ...}`) or blocks sharing a device (`placement=`) only the simulator still gives an answer.
#
# ### Costs of a real network
#
# Equal blocks are a convenient fiction. Take the digits network of the course, an MLP with 512-unit hidden layers cut
# into $K = 4$ blocks (one linear layer each, linear heads), and let `bpsim` count its FLOPs per block. `Costs.from_flops`
# turns them into times for a device of a given speed (we assume $2\cdot10^9$ FLOP/s, about one CPU core; lesson 08
# measures it), with backward $= 2\times$ forward and messages over a link with the latency and bandwidth that
# `torch.distributed` reaches between two processes on one machine (0.4 ms, 1.8 GB/s).
#
# 🔮 **Predict:** with four devices, what speedup over one device will DGL reach on this split?

# %%
train, _ = data.load("digits")
image_shape = tuple(train.tensors[0].shape[1:])  # (1, 8, 8)
digits_net = nets.mlp([math.prod(image_shape), 512, 512, 512, 10], blocks=4, aux="linear", input_shape=image_shape,
                      seed=0)
BATCH = 64
flops = [BATCH * f for f in digits_net.block_flops()]
head_flops = [BATCH * f for f in digits_net.head_flops()]
out_bytes = [BATCH * 4 * math.prod(s) for s in digits_net.shapes()]  # float32 activations sent downstream
real_costs = sim.Costs.from_flops(flops, head_flops, flop_rate=2e9, activation_bytes=out_bytes,
                                  comm=4e-4, bandwidth=1.8e9)
N_REAL = 50
one_device = sim.simulate("bp", blocks=4, steps=N_REAL, costs=real_costs, placement=1)  # all blocks on device 0
real = {a: sim.simulate(a, blocks=4, steps=N_REAL, costs=real_costs) for a in ("bp", "dgl")}

# %%
# NBVAL_CHECK_OUTPUT
print("forward MFLOP per minibatch of each block:", [round(f / 1e6, 1) for f in flops])
print(f"one device, backprop: {1e3 * one_device.makespan / N_REAL:.1f} ms per step")
for a, r in real.items():
    print(f"4 devices, {a:<4}: {1e3 * r.makespan / N_REAL:.1f} ms per step, speedup "
          f"{one_device.makespan / r.makespan:.2f}, utilization "
          + " ".join(f"{b['utilization']:.0%}" for b in r.per_block))

# %% [markdown]
# The first and last layers (64 → 512 and 512 → 10) are tiny next to the two 512 → 512 layers, so DGL's pipeline
# runs at the pace of the two heavy blocks: the speedup is about $\sum_k F_k / \max_k F_k \approx 2$, not 4, and the
# light devices idle most of the time. Balancing the split, not just unlocking it, is what buys the rest.
#
# ## 4. Explorer: your own pipeline
#
# Four sliders drive all five schedules at once (two steps each, compute lanes only, the dashed line marks the makespan):
#
# * **K** — the number of blocks, one device each;
# * **slow** — block 2 computes this many times slower than the others (an unbalanced split, or a slower device);
# * **comm** — the latency $c$ of one message;
# * **m** — GPipe's micro-batches per minibatch (the other methods ignore it).
#
# Costs are $F = 1$, $B = 2$, $A = 0.3$, $U = 0.2$ per block and minibatch (GPipe: $F/m$ and $B/m$ per micro-batch).
#
# 🔮 **Predict before you move a slider:**
# 1. Raise **comm** from 0 to 0.5. Which schedule slows down most? Which barely moves, and why?
# 2. Set **slow** to 2. DGL is update unlocked; does that save it from a slow block? Compare `dgl` and `dgl-async`
#    (lesson 07 is about the price `dgl-async` pays for this).
# 3. With $K = 4$, how many micro-batches does GPipe need to come within 20 % of DGL?

# %%
EXPLORER_COSTS = {"fwd": 1.0, "bwd": 2.0, "aux": 0.3, "update": 0.2}


def schedules_at(K, slow, comm, m):
    """Traces of the five schedules for these slider values (compute lanes, 2 steps, makespan markers)."""
    runs = []
    for algo in ALGOS:
        costs = dict(EXPLORER_COSTS, comm=comm)
        if algo == "gpipe":
            costs.update(fwd=costs["fwd"] / m, bwd=costs["bwd"] / m)
        runs.append(sim.simulate(algo, blocks=K, steps=2, costs=costs, slowdown={2: slow},
                                 microbatches=m if algo == "gpipe" else 1))
    fig = viz.timelines([compute_lanes(r.trace) for r in runs], ALGOS)
    for i, r in enumerate(runs, start=1):
        fig.add_scatter(x=[r.makespan, r.makespan], y=["rank 0 compute", f"rank {K - 1} compute"],
                        mode="lines+text", text=[f"{r.makespan:.1f}", ""], textposition="top left", cliponaxis=False,
                        line={"dash": "dash", "color": "black", "width": 1}, showlegend=False, hoverinfo="skip",
                        row=i, col=1)
    return list(fig.data)


explorer_layout = viz.timelines([compute_lanes(r.trace) for r in results.values()], ALGOS).layout
explorer_layout.update(height=700, title="Five schedules, two steps each (dashed: makespan)")
for axis in [a for a in explorer_layout if a.startswith("yaxis")]:
    # rank 0 on top whatever K is (K <= 9, so the names sort like the numbers)
    explorer_layout[axis].update(categoryorder="category descending", categoryarray=None)

widgets.explorer(
    schedules_at,
    {"K": pick([2, 4], [2, 3, 4, 6]), "slow": [1, 2], "comm": [0, 0.5], "m": pick([1, 4], [1, 2, 4])},
    defaults={"K": pick(2, 3), "slow": 1, "comm": 0.5, "m": 4},
    layout=explorer_layout,
)

# %% [markdown]
# What the sliders show:
#
# * **comm** lengthens backprop by $2(K-1)c$ per *step* but DGL by $(K-1)c$ *once*: DGL never waits for a message
#   after the pipeline has filled, because no message travels backwards.
# * **slow** turns every synchronous pipeline into a march at the pace of the slowest block: `dgl` too, since block 3
#   must wait for block 2's output every step. `dgl-async` lets block 1 run ahead and blocks 3.. reuse what is in their
#   buffer (forward unlocking). Its makespan is no shorter, since the slow block still has to make all its updates,
#   but the other blocks finish early: their devices are free for more work.
# * **m** shrinks GPipe's bubble $(K-1)/(m+K-1)$, but never removes the update lock: every step ends with a flush.
#
# ## 5. Exercises
#
# ### 5.1 The GPipe bubble
#
# $K = 4$ blocks, $m = 8$ micro-batches, no latency, the update is free ($U = 0$). What fraction of one step does a
# device spend idle? Work it out from the clock-tick picture (section 2), not from the simulator.

# %%
# BEGIN SOLUTION
bubble = (4 - 1) / (8 + 4 - 1)
# END SOLUTION: bubble = ...
checks.gpipe_bubble(4, 8, bubble)

# %% [markdown]
# ### 5.2 How much faster is DGL?
#
# With the costs of section 2 ($F=1$, $B=2$, $A=0.2$, $U=0.1$, $c=0.05$), $K = 4$ blocks and $N = 100$ steps, what
# is the speedup of synchronous DGL over backprop on the same four devices, $T_{\text{bp}} / T_{\text{dgl}}$?
# Use the closed forms; the check compares with the simulator.

# %%
# BEGIN SOLUTION
dgl_over_bp = t_bp(4, 100, F, B, U, c) / t_dgl(4, 100, F, A, B, U, c)
# END SOLUTION: dgl_over_bp = ...
checks.dgl_speedup(4, 100, "fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05", dgl_over_bp)

# %% [markdown]
# Why is the answer a little below $K = 4$? Name the three terms responsible, then run the cell.

# %%
# NBVAL_CHECK_OUTPUT
Kx, Nx = 4, 100
ideal = t_bp(Kx, Nx, F, B, U, c) / Kx                       # a DGL run exactly K times faster
excess = {"the head A, in every block's period": Nx * A,
          "the update U, paid by every block each step (backprop: once per step, a 1/K share per block)":
          Nx * U * (1 - 1 / Kx),
          "the pipeline fill (K-1)(F+c)": (Kx - 1) * (F + c),
          "backprop's messages 2(K-1)c, which DGL does not wait for (in DGL's favour)": -Nx * 2 * (Kx - 1) * c / Kx}
for term, t in excess.items():
    print(f"{t:+7.2f}  {term}")
print(f"ideal {ideal:.2f} + excess {sum(excess.values()):.2f} = T_dgl {t_dgl(Kx, Nx, F, A, B, U, c):.2f}")
assert math.isclose(ideal + sum(excess.values()), t_dgl(Kx, Nx, F, A, B, U, c))

# %% [markdown]
# DGL's step is one block's forward, head, backward and update; a quarter of backprop's step would be one block's
# forward and backward plus a quarter of the update and messages. The head costs most (it is work backprop never
# does), the update next (every DGL block pays it in its own period), the fill least, and it shrinks as $N$ grows.
#
# ### What the runtime measured
#
# The same comparison on real processes (`benchmarks/throughput.py`: an MLP of width 1024 in 2 blocks, one CPU core per
# worker, best of 3 runs):

# %%
tp = json.loads((Path(bpsim.__file__).resolve().parents[1] / "benchmarks" / "results" / "throughput.json").read_text())
rate = {(r["algo"], r["workers"]): r["samples_per_s"] for r in tp["results"] if r.get("slowdown") in (None, {}, 1.0)}
for algo in ("bp", "dgl", "blockprop", "blockprop-cached"):
    print(f"{algo:17s} samples/s: 1 worker {rate[algo, 1]:7.1f}, 2 workers {rate[algo, 2]:7.1f}  "
          f"({rate[algo, 2] / rate[algo, 1]:.2f}x)")
print(f"DGL / backprop at 2 workers: {rate['dgl', 2] / rate['bp', 2]:.2f}x")
assert rate["dgl", 2] / rate["bp", 2] > 1.7 and rate["bp", 2] < rate["bp", 1]

# %% [markdown]
# On two real workers DGL runs 1.9 times as many samples per second as on one worker, just below the limit of 2 for
# $K = 2$ blocks on two devices. Backprop gets *slower* on two workers than on one (0.9x: the messages, and nothing
# overlapping them), as section 3 predicts. That is why DGL's 2.2x over backprop on the same two workers exceeds 2:
# it is measured against a backprop that the split has slowed down. The DGL paper reports its wall-clock gain on
# 4 GPUs against DDG rather than backprop (§4.1: 18 % faster than DDG, itself about 2.3x backprop); ours is a CPU
# measurement at $K = 2$ (ledger claim C16).
#
# ## Summary
#
# * A device timeline makes the locks concrete: forward locking is idle time waiting for an **input**, update and
#   backward locking is idle time waiting for a **gradient** (or BlockProp's target $h_k^*$).
# * Fully locked backprop: $T_{\text{bp}} = N(K(F+B) + 2(K-1)c + U)$, no faster on $K$ devices than on one
#   ($O(L\,T_F)$ per step).
# * GPipe amortizes the lock over $m$ micro-batches: $T = N((m+K-1)(F+B)+U)$, idle share $(K-1)/(m+K-1)$.
# * Synchronous DGL is update and backward unlocked: $T_{\text{dgl}} = (K-1)(F+c) + N(F+A+B+U)$, a step of one block's
#   work ($O(T_F)$), at the price of an auxiliary head per block. A slow block still sets the pace.
# * `bpsim.sim.simulate` reproduces the closed forms exactly and goes on where they stop: random costs, shared devices,
#   asynchronous buffers.
#
# **Previous:** [05 · Block-wise BP-free training](05-bwbpf.ipynb) ·
# **Next:** [07 · Asynchronous DGL with replay buffers](07-async-replay.ipynb), where a block runs slower and its
# neighbours keep going on replayed data · Later: [08 · Measured vs simulated](08-measured-vs-simulated.ipynb)
