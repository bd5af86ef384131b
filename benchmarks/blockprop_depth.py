"""BlockProp beyond two blocks: h-step size, gradient cosines and accuracy for K = 2, 3, 4.

The paper runs BlockProp with K = 2 blocks only and names more blocks as
future work (BlockProp paper, Sec. 6). Here one net -- an MLP with four
hidden layers of 256 units (``bpsim train --depth 4``), split into K = 2, 3
or 4 blocks -- is trained by backprop and by BlockProp (Alg. 1, ``N_h = 4``,
``lambda = 1``) with four ways to get the gluing variables:

* ``default``: the library's h-step, sized per example and boundary to the
  curvature ``h_k`` faces, ``1 / (2 lambda_{k-1} + mu_k)``
  (``blockprop.curvature_step``);
* ``fixed``: the fixed step ``1 / (4 lambda)`` (``blockprop.fixed_lr_h``),
  blind to the blocks' Jacobians;
* ``decreasing lam``: the fixed step with ``lambda_k`` falling ten-fold per
  boundary towards the output (``10^(K-2), ..., 10, 1``);
* ``exact h*``: the joint minimiser of eq. 4 over all ``h_k`` by L-BFGS
  (a fixed number of iterations per batch), where the W-step is the
  gradient of ``J(W) = min_h L`` (Lemma B.1).

Every run records, per epoch on a fixed probe of 256 training examples, the
cosine between each block's W-step gradient and backprop's gradient at the
same weights, and the median curvature ``mu_k`` of each outgoing term (the
fixed step is stable only while ``(2 lambda + mu_k) / (4 lambda) < 2``).

    python benchmarks/blockprop_depth.py [--seeds 0 1 2] [--mnist-train 10000] [--quick]
    python benchmarks/blockprop_depth.py --variants exact --out DIR     # one part of the study
    python benchmarks/blockprop_depth.py --merge DIR1 DIR2              # parts -> one result

The full mode writes ``benchmarks/results/blockprop_depth.json`` and ``.md``.
``--quick`` trains for one epoch on 300 digits and writes nothing unless
``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _provenance import stamp, trainer_fp  # noqa: E402
from _render import provenance_line, render  # noqa: E402
from bpsim import data, nets, objectives  # noqa: E402
from bpsim.algorithms import get_trainer  # noqa: E402
from bpsim.algorithms.base import DivergenceError  # noqa: E402
from bpsim.algorithms.blockprop import BlockPropTrainer, fixed_lr_h, h_step  # noqa: E402
from bpsim.trace import atomic_write_text  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = ("default", "fixed", "decreasing lam", "exact h*")
BLOCKS = (2, 3, 4)
DEPTH, WIDTH, LR, MOMENTUM, BATCH, NH = 4, 256, 0.05, 0.9, 64, 4
#: L-BFGS iterations per batch of the exact-h* variant
EXACT_ITERS = 20


class ExactHTrainer(BlockPropTrainer):
    """BlockProp whose h-step is the joint minimiser of eq. 4 (L-BFGS on all ``h_k`` together)."""

    def _h_step(self, x, y, h0=None, present=None):
        hs = [h.clone().requires_grad_(True) for h in h_step(self.net, x, y, self.lams, 0, None)]
        opt = torch.optim.LBFGS(hs, lr=1.0, max_iter=EXACT_ITERS, tolerance_grad=1e-7, tolerance_change=0.0,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure():
            with torch.enable_grad():
                L = len(x) * objectives.augmented_loss(self.net, x, y, hs, self.lams)
                for h, g in zip(hs, torch.autograd.grad(L, hs)):
                    h.grad = g
            return L.detach()
        opt.step(closure)
        return [h.detach() for h in hs]


def lams_of(variant: str, K: int) -> list[float]:
    if variant == "decreasing lam":
        return [10.0 ** (K - 1 - k) for k in range(1, K)]
    return [1.0] * (K - 1)


def make(variant: str, K: int, input_shape: tuple[int, ...], seed: int):
    """The net and trainer of one run (``variant`` ``"bp"`` for backprop)."""
    net = nets.build("mlp", input_shape, 10, K, width=WIDTH, depth=DEPTH, seed=seed)
    common = dict(lr=LR, momentum=MOMENTUM, batch_size=BATCH, seed=seed, progress=False)
    if variant == "bp":
        return net, get_trainer("bp")(net, **common)
    lams = lams_of(variant, K)
    if variant == "exact h*":
        return net, ExactHTrainer(net, lam=lams, nh=NH, **common)
    lr_h = None if variant == "default" else fixed_lr_h(lams, K)
    return net, BlockPropTrainer(net, lam=lams, nh=NH, lr_h=lr_h, **common)


def configs(variants=VARIANTS) -> list[tuple[str, int]]:
    """(variant, K) of every run of one seed, backprop first; K = 2 has no decreasing lam (one lam)."""
    return [("bp", 4)] + [(v, K) for v in variants for K in BLOCKS if not (v == "decreasing lam" and K == 2)]


def fingerprint(saved: dict) -> dict[str, str]:
    """Per configuration, the float64 fingerprint of its trainer's first two steps (digits' input shape)."""
    keys = {(r["variant"], r["blocks"]) for r in saved["results"]}
    return {f"{v} K={K}": trainer_fp(lambda v=v, K=K: make(v, K, (64,), 0), (64,), BATCH)
            for v, K in sorted(keys)}


def run_one(variant: str, K: int, name: str, train, test, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    net, trainer = make(variant, K, tuple(train.tensors[0].shape[1:]), seed)
    t = time.perf_counter()
    try:
        hist = trainer.fit(train, epochs, test=test)
        err = None
    except DivergenceError as e:          # a diverged run is a result too
        hist, err = trainer.history, f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - t
    acc = hist.test_accuracy
    return {"data": name, "variant": variant, "blocks": K, "seed": seed, "lam": lams_of(variant, K),
            "final_accuracy": acc[-1] if acc and err is None else None, "test_accuracy": acc,
            "grad_cosine": [r.extra.get("grad_cosine") for r in hist.records],
            "outer_curvature": [r.extra.get("outer_curvature") for r in hist.records],
            "error": err, "wall_s": wall}


# ------------------------------------------------------------- summary
def _mean_se(v: list[float]) -> tuple[float, float]:
    m = statistics.mean(v)
    return m, (statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else float("nan"))


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Per data set, K and variant: accuracy, paired gap to backprop, last cosines and curvatures."""
    out: dict[str, Any] = {}
    bp = {(r["data"], r["seed"]): r["final_accuracy"] for r in rows if r["variant"] == "bp"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["variant"] != "bp":
            groups.setdefault((r["data"], r["blocks"], r["variant"]), []).append(r)
    for (name, K, v), rs in groups.items():
        ok = [r for r in rs if r["final_accuracy"] is not None]
        diffs = [100 * (r["final_accuracy"] - bp[name, r["seed"]]) for r in ok if (name, r["seed"]) in bp]
        entry = {"seeds": [r["seed"] for r in rs], "failed": len(rs) - len(ok),
                 "accuracy": [r["final_accuracy"] for r in rs]}
        if diffs:
            entry["gap_points"], entry["gap_se"] = _mean_se(diffs)
            entry["within_2_points"] = entry["gap_points"] >= -2.0
        cos = [r["grad_cosine"][-1] for r in ok if r["grad_cosine"] and r["grad_cosine"][-1]]
        if cos:
            entry["final_cosine"] = [statistics.mean(c[k] for c in cos) for k in range(K)]
            entry["min_cosine_over_epochs"] = [min(min(e[k] for e in r["grad_cosine"] if e) for r in ok)
                                               for k in range(K)]
        mus = [r["outer_curvature"][-1] for r in ok if r["outer_curvature"] and r["outer_curvature"][-1]]
        if mus:
            entry["final_mu"] = [statistics.mean(m[k] for m in mus) for k in range(K - 1)]
        out.setdefault(name, {}).setdefault(f"K={K}", {})[v] = entry
    for name in {r["data"] for r in rows}:
        accs = [a for (d, _), a in bp.items() if d == name]
        out.setdefault(name, {})["bp_accuracy"] = statistics.mean(accs) if accs else None
    return out


def markdown(saved: dict) -> str:
    """The Markdown tables of a saved ``blockprop_depth.json``."""
    info, summary, rows = saved["info"], saved["summary"], saved["results"]
    md = ["# BlockProp beyond two blocks (K = 2, 3, 4)", "",
          f"MLP with {DEPTH} hidden layers of {WIDTH} (ReLU), split into K blocks; SGD lr={LR}, momentum {MOMENTUM}, "
          f"batch {BATCH} for every block and for backprop; BlockProp with N_h = {NH}, lambda = 1 unless said. "
          "Gap: BlockProp minus backprop in points, the mean of the per-seed differences ± its standard error. "
          "Cosine: per block (1..K), the cosine between the W-step gradient and backprop's gradient at the same "
          "weights on a fixed probe of 256 training examples after the last epoch (mean over seeds); "
          "mu: per gluing variable (h_2..h_K), the median curvature of its outgoing term, against which the fixed "
          "step 1/(4 lambda) is stable only while mu < 6 lambda.", ""]
    for name, d in info["data"].items():
        s = summary.get(name, {})
        bp_acc = s.get("bp_accuracy")
        md += [f"## {name}: {d['epochs']} epochs, {d['n_train']} training / {d['n_test']} test examples", "",
               f"Backprop: {100 * bp_acc:.2f}%." if bp_acc is not None else "Backprop: not run.", "",
               "| K | h-step | lambda | accuracy per seed (%) | gap to backprop | cosine per block | mu per h_k | wall s |",
               "| ---: | --- | --- | --- | ---: | --- | --- | ---: |"]
        for K in BLOCKS:
            for v in VARIANTS:
                e = s.get(f"K={K}", {}).get(v)
                if e is None:
                    continue
                rs = [r for r in rows if r["data"] == name and r["blocks"] == K and r["variant"] == v]
                acc = ", ".join("diverged" if a is None else f"{100 * a:.1f}" for a in e["accuracy"])
                gap = (f"{e['gap_points']:+.2f} ± {e['gap_se']:.2f}" if "gap_points" in e else "n/a")
                cos = ", ".join(f"{c:+.2f}" for c in e.get("final_cosine", []))
                mu = ", ".join(f"{m:.3g}" for m in e.get("final_mu", []))
                lam = ",".join(f"{x:g}" for x in lams_of(v, K))
                md.append(f"| {K} | {v} | {lam} | {acc} | {gap} | {cos} | {mu} | "
                          f"{statistics.mean(r['wall_s'] for r in rs):.0f} |")
        md.append("")
    acc = summary.get("acceptance", {})
    if acc:
        md += ["Default h-step within 2 points of backprop (mean paired gap >= -2): "
               + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in acc.items()) + ".", ""]
    md += ["Per-epoch accuracies, cosines and curvatures of every run are in `blockprop_depth.json`. "
           f"The exact h* uses {info.get('exact_iters', EXACT_ITERS)} L-BFGS iterations (strong Wolfe) per batch"
           + (f" and runs on {info['exact_note']} only" if info.get("exact_note") else "") + ".", "",
           f"Command(s): {'; '.join('`' + c + '`' for c in info['commands'])} (torch {info['torch']}, 1 thread, "
           f"total {info['wall_s_total']:.0f} s of runs)"
           + (f"; the runs were made at commit {info['measured_commit'][:10]}, the parts merged and fingerprinted at "
              "the commit below" if info.get("measured_commit") else ""), "", provenance_line(saved), ""]
    return "\n".join(md)


def acceptance(summary: dict) -> dict[str, bool]:
    return {f"{name} K={K}": e["default"]["within_2_points"]
            for name, s in summary.items() for K in BLOCKS
            if isinstance(s.get(f"K={K}"), dict) and "within_2_points" in s[f"K={K}"].get("default", {})
            for e in [s[f"K={K}"]]}


def finish(rows: list[dict], info: dict, argv, quick: bool) -> dict:
    summary = summarise(rows)
    summary["acceptance"] = acceptance(summary)
    info["wall_s_total"] = sum(r["wall_s"] for r in rows)
    return stamp({"results": rows, "summary": summary, "info": info}, "blockprop_depth", argv, quick, fingerprint)


def write(saved: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "blockprop_depth.json"), json.dumps(saved, indent=1))
    atomic_write_text(os.path.join(out, "blockprop_depth.md"), markdown(saved))


def _variant(name: str) -> str:
    """A variant's name as given, or with a dash for its space and no star."""
    return {v.replace(" ", "-").rstrip("*"): v for v in VARIANTS}.get(name, name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", nargs="+", default=["digits", "mnist"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, type=_variant,
                    help="which h-steps to run (backprop always runs); in a shell or Makefile, "
                         "decreasing-lam and exact-h stand for 'decreasing lam' and 'exact h*'")
    ap.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS))
    ap.add_argument("--digits-epochs", type=int, default=12)
    ap.add_argument("--mnist-epochs", type=int, default=3)
    ap.add_argument("--mnist-train", type=int, default=10000, help="MNIST training subset (fixed, seed 0)")
    ap.add_argument("--mnist-test", type=int, default=2000, help="MNIST test subset (fixed, seed 0)")
    ap.add_argument("--no-bp", action="store_true", help="skip backprop (a part merged with one that ran it)")
    ap.add_argument("--quick", action="store_true", help="1 epoch on 300 digits; writes nothing without --out")
    ap.add_argument("--out", help=f"folder for the JSON and Markdown (full mode default: {RESULTS})")
    ap.add_argument("--merge", nargs="+", metavar="DIR", help="merge parts written with --out into the result")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md beside JSON from its saved results")
    args = ap.parse_args(argv)
    if args.render:
        return render(args.render, markdown)
    torch.set_num_threads(1)
    if args.merge:
        parts = [json.load(open(os.path.join(d, "blockprop_depth.json"), encoding="utf-8")) for d in args.merge]
        rows = [r for p in parts for r in p["results"]]
        info = dict(parts[0]["info"])
        info["commands"] = [c for p in parts for c in p["info"]["commands"]]
        for p in parts[1:]:
            info["data"].update(p["info"]["data"])
        info["exact_note"] = "; ".join(p["info"]["exact_note"] for p in parts if p["info"].get("exact_note")) or None
        saved = finish(rows, info, argv, False)
        write(saved, args.out or RESULTS)
        print(markdown(saved))
        return 0
    if args.quick:
        args.data, args.seeds, args.digits_epochs = ["digits"], args.seeds[:1], 1
    command = shlex.join(["python", "benchmarks/blockprop_depth.py", *(argv if argv is not None else sys.argv[1:])])
    info = {"data": {}, "commands": [command], "torch": torch.__version__, "exact_iters": EXACT_ITERS,
            "exact_note": None}
    if "exact h*" in args.variants and (len(args.blocks) < len(BLOCKS) or len(args.data) < 2):
        info["exact_note"] = f"{', '.join(args.data)}, K = {', '.join(map(str, args.blocks))}"
    sets = {}
    for name in args.data:
        if name == "mnist":
            tr, te = data.load("mnist", n_train=args.mnist_train, n_test=args.mnist_test, seed=0)
            epochs = args.mnist_epochs
        else:
            tr, te = data.load(name, n_train=300 if args.quick else None, seed=0)
            epochs = args.digits_epochs
        sets[name] = (tr, te, epochs)
        info["data"][name] = {"n_train": len(tr), "n_test": len(te), "epochs": epochs}
    rows: list[dict] = []
    out = args.out or (None if args.quick else RESULTS)
    for name, (tr, te, epochs) in sets.items():
        for seed in args.seeds:
            for v, K in configs(args.variants):
                if (v == "bp" and args.no_bp) or (v != "bp" and K not in args.blocks):
                    continue
                r = run_one(v, K, name, tr, te, epochs, seed)
                rows.append(r)
                fa = "diverged" if r["final_accuracy"] is None else f"{100 * r['final_accuracy']:.2f}%"
                cos = r["grad_cosine"][-1] if r["grad_cosine"] else None
                print(f"{name} K={K} {v:15s} seed {seed}: {fa}  cos {cos and [round(c, 2) for c in cos]}  "
                      f"({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
                if args.out:                             # a partial result survives an interruption
                    part = {"results": rows, "info": info}
                    os.makedirs(out, exist_ok=True)
                    atomic_write_text(os.path.join(out, "blockprop_depth.partial.json"), json.dumps(part))
    saved = finish(rows, info, argv, args.quick)
    print(markdown(saved))
    if out:
        write(saved, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
