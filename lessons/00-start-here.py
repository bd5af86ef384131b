# %% [markdown]
# # 00 · Start here: why train without end-to-end backprop?
#
# **Time:** about 30 minutes; in full mode the code computes for under a minute (one CPU core) ·
# **Prerequisites:** Python, a first course in neural networks
#
# **By the end of this lesson you will be able to**
# 1. name the three *locking* problems of backpropagation and see them on a device timeline;
# 2. split a network into blocks with `bpsim` and train it end to end on real data (the baseline for the whole course);
# 3. use an *explorer* (sliders driving a live figure) to see how the cost of locking grows with the number of blocks,
#    and an *exercise check*.
#
# ## How this course works
#
# Each lesson is a notebook built from a source file in `lessons/` and executed top to bottom.
# Run the cells in order (**Run → Run All Cells** works too). Three kinds of cells ask something of you:
#
# * 🔮 **Predict before you run** — write down what you expect, *then* run the cell. Being surprised is where the learning is.
# * 🎛️ **Explorers** — sliders that redraw a figure. In a running notebook they are live widgets; in a static copy of the
#   notebook (GitHub, HTML) they fall back to a figure with a slider over precomputed values.
# * ✍️ **Exercises** — replace the `...` and run the check: it answers *correct*, *close* (with a hint about the likely
#   mistake) or *not attempted*.
#
# Everything runs on a laptop CPU. Set the environment variable `BPSIM_FAST=1` before starting Jupyter to shrink every
# lesson's computing to about a minute or less (that is how the tests run the course). Each lesson's header gives the
# time to work through it and how long its code computes in full mode, without `BPSIM_FAST` (on one core of a shared
# machine: a core of your own is at least as fast). A live run's accuracies differ by a point or more from one processor to
# another, because floating-point kernels round differently; the prose reads what every machine shows, or says when
# it describes the fast run.
#
# ## The map of the course
#
# | lesson | topic | paper |
# | --- | --- | --- |
# | **00** | start here: locking, blocks, the backprop baseline | — |
# | 01 | backprop as constrained optimization: gluing variables, the augmented loss (a quadratic penalty), h-step and W-step | BlockProp §2, eq. 2-5 |
# | 02 | Lemma B.1 (envelope theorem) checked numerically; the large-λ limit | BlockProp App. B |
# | 03 | BlockProp on MNIST, caching (Alg. 2), Equilibrium Propagation, the cost model | BlockProp §3-5, App. A, C |
# | 04 | decoupled greedy learning, auxiliary nets, sequential vs parallel, convergence | DGL §2-4 |
# | 05 | block-wise BP-free training: local heads, gradient isolation | BWBPF |
# | 06 | locking made visible: simulated timelines of every method | DGL §1, simulator |
# | 07 | asynchronous DGL with replay buffers | DGL Alg. 2, Fig. 5-6 |
# | 08 | measured vs simulated: real multi-process runs, calibration, Perfetto | runtime + simulator |

# %%
import torch

from IPython.display import Markdown

from bpsim import data, nets, sim, viz
from bpsim.algorithms.backprop import BackpropTrainer
from bpsim.course import checks, claims, pick, widgets

torch.set_num_threads(1)  # small models: one thread is fastest and repeatable
FAST = pick(True, False)
print("fast mode" if FAST else "full mode")

# %% [markdown]
# ## What the papers claim, and what bpsim measured
#
# The course tests the papers' claims. The ledger below is read from the committed full-size benchmark results
# (`benchmarks/results/*.json`, measured by the scripts in `benchmarks/`, not by this notebook); each verdict follows
# from the numbers by the rule listed under the table. Two methods are compared on the same seeds and the same test
# images, so the rules judge the *paired* difference seed by seed: "± x" is the 95 % half-width of its mean, the
# noise an effect must clear. *Reproduced* needs the paper's effect, in its direction and roughly its size, beyond
# that noise, from at least three seeds, against the paper's own baseline and conditions. Each result records the
# commit, machine and command that made it; one that does not may not come from the current code, and its claims
# are marked *stale* until `make results` regenerates it. The lessons run small, fast versions of these
# experiments beside the committed numbers.

# %%
Markdown(claims.markdown())

# %% [markdown]
# ## 1. The three locks of backpropagation
#
# Split a network $f = b_K \circ \dots \circ b_1$ into $K$ blocks and put block $k$ on device $k$
# (model parallelism). Training it with backprop couples the devices in three ways
# (the terms come from the DNI and DGL papers, DGL §1):
#
# * **forward locking** — block $k$ cannot start on an example before blocks $1..k-1$ have processed it;
# * **update locking** — no block can update its weights before the forward pass has reached the loss;
# * **backward locking** — block $k$ cannot update before the gradient has travelled back through blocks $K..k+1$.
#
# With equal costs, one device works while the others wait. The timeline below is produced by `bpsim`'s simulator
# (lesson 06 explains it): three blocks, forward cost 1, backward cost 2, a small message latency.
#
# 🔮 **Predict:** for two training steps, what fraction of the time is device 2 busy?

# %%
costs = "fwd=1,bwd=2,aux=0.3,update=0.2,comm=0.1"
locked = sim.simulate("bp", blocks=3, steps=2, costs=costs)
viz.timeline(locked.trace, title=f"backprop, 3 blocks: makespan {locked.makespan:.1f}")

# %%
# NBVAL_CHECK_OUTPUT
for j, b in enumerate(locked.per_block, start=1):
    print(f"block {j}: busy {b['utilization']:.0%} of the time")

# %% [markdown]
# Each device idles most of the time. Decoupled Greedy Learning (lessons 04 and 07) removes the *update* and *backward*
# locks: each block learns from a small local head, so it sends its output forward and updates at once. Same costs,
# with the auxiliary head (cost 0.3) added:

# %%
decoupled = sim.simulate("dgl", blocks=3, steps=2, costs=costs)
viz.timelines([locked.trace, decoupled.trace],
              [f"backprop: makespan {locked.makespan:.1f}", f"DGL: makespan {decoupled.makespan:.1f}"])

# %% [markdown]
# The rest of the course asks *what this costs in accuracy* (do local losses learn as well as the global one?) and *what it
# buys in time* on real devices, measured and simulated.
#
# ## 2. A network in blocks, trained with backprop
#
# `nets.mlp(sizes, blocks=K)` builds a ReLU network and splits its linear layers into $K$ consecutive blocks as evenly as
# possible; the last block ends with the output layer. Blocks are numbered $1..K$ in the text and `net.blocks[0..K-1]` in code.

# %%
train, test = data.load("digits", n_train=pick(600, None))
net = nets.mlp([64, 256, 256, 10], blocks=2, seed=0)
print(f"{len(train)} training and {len(test)} test images of shape {tuple(train.tensors[0].shape[1:])}")
for k, b in enumerate(net.blocks, start=1):
    print(f"block {k}: {b}".replace("\n", " "))
print("output shape of each block:", net.shapes())

# %% [markdown]
# The `BackpropTrainer` is ordinary SGD on the global loss through both blocks: the baseline every other method is compared with.
# `fit` returns a `History` with the training loss, test accuracy and wall time of each epoch.

# %%
epochs = pick(4, 15)
history = BackpropTrainer(net, lr=0.05, momentum=0.9, seed=0).fit(train, epochs, test=test)
viz.learning_curves({"backprop, K=2": history}, title="Backprop on digits")

# %%
print(f"test accuracy after {epochs} epochs: {history.final_accuracy:.2f}")
# a live run: its last digits depend on this machine's floating-point kernels, so only a wide range is asserted
assert 0.6 < history.final_accuracy <= 1.0, "backprop should learn the digits far above chance (0.10)"

# %% [markdown]
# ## 3. Explorer: how much does locking cost?
#
# 🔮 **Predict:** with $K$ equal blocks, how does backprop's time for a few steps grow with $K$ when each block still does
# the same work? And DGL's? Does a dearer backward pass (relative to the forward) change the answer?
#
# Move the sliders: the number of blocks $K$ and the backward cost $B$ (the forward costs 1). Both timelines are
# simulated for 3 training steps with the costs of section 1; the title gives each makespan.

# %%
def locking(K, bwd):
    """Timelines of backprop and DGL for K blocks of equal cost (forward 1, backward bwd)."""
    c = f"fwd=1,bwd={bwd},aux=0.3,update=0.2,comm=0.1"
    bp_run = sim.simulate("bp", blocks=K, steps=3, costs=c)
    dgl_run = sim.simulate("dgl", blocks=K, steps=3, costs=c)
    fig = viz.timelines([bp_run.trace, dgl_run.trace],
                        [f"backprop: makespan {bp_run.makespan:.1f}", f"DGL: makespan {dgl_run.makespan:.1f}"])
    return list(fig.data)


base = viz.timelines([sim.simulate(a, blocks=4, steps=3, costs=costs).trace for a in ("bp", "dgl")],
                     ["backprop", "DGL"]).layout
base.update(title="Locking: backprop against DGL, 3 steps (costs per block)", height=520)
widgets.explorer(locking, {"K": [2, 3, 4, 6], "bwd": [1, 2, 3]}, defaults={"K": 3, "bwd": 2}, layout=base)

# %%
# NBVAL_CHECK_OUTPUT
ratios = []
for K in (2, 4, 6):
    t = {a: sim.simulate(a, blocks=K, steps=3, costs=costs).makespan for a in ("bp", "dgl")}
    ratios.append(t["bp"] / t["dgl"])
    print(f"K = {K}: backprop {t['bp']:.1f}, DGL {t['dgl']:.1f}, ratio {ratios[-1]:.1f}")
assert ratios == sorted(ratios) and all(r < K for r, K in zip(ratios, (2, 4, 6))), "the ratio grows with K, below K"

# %% [markdown]
# Backprop's time grows in proportion to $K$: every step passes through all $K$ blocks forward and back, one device at a
# time. DGL's grows only by the time the first step takes to reach the last block (one forward and one message per
# extra block); after that the blocks overlap and a step costs about one block's forward, head, backward and update.
# So the ratio grows with $K$, though it stays below $K$ over only three steps, because of that fill. (Lesson 06
# derives both makespans in closed form.)

# %% [markdown]
# ## 4. Exercise: how idle is a device under backprop?
#
# Take $K$ blocks of equal cost on $K$ devices, ignore communication and the weight update. During one training step,
# what fraction of the time does each device sit idle? Give the number for $K = 4$.

# %%
# BEGIN SOLUTION
idle = 1 - 1 / 4
# END SOLUTION: idle = ...
checks.idle_fraction(4, idle)

# %% [markdown]
# Compare with the simulated timeline in section 1 (there the update and messages add a little).
#
# ## Summary
#
# * Backprop locks the blocks of a model-parallel network three ways: forward, update and backward.
# * With $K$ equal blocks each device is busy about $1/K$ of the time; decoupled methods aim to remove this waiting.
# * `bpsim` builds networks as blocks (`nets.mlp`), trains them (`Trainer.fit` → `History`), simulates device
#   timelines (`sim.simulate`) and draws them (`viz`).
#
# **Next:** [01 · Backprop as constrained optimization](01-lagrangian.ipynb), where we cut the network at a block boundary
# and glue it back together with a spring.
