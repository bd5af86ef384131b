"""Accuracy of DGL, async DGL and BWBPF against backprop.

DGL's VGG-like CNN (Sec. 4.1: six 3x3 conv+BN+ReLU layers, max-pooling
after layers 1 and 3, width doubling at each pooling), at a reduced width,
on a seeded subset of Fashion-MNIST, on CPU with one thread. Every run has
the same budget: the same examples, epochs, batch size and SGD schedule.

* ``dgl_vs_bp``       -- DGL (K = 4, MLP-aux) against backprop (target: within 0.5 points).
* ``aux``             -- MLP-aux vs MLP-SR-aux vs CNN-aux at K = 4, with the auxiliary
                         FLOPs relative to the largest block (DGL Table 1).
* ``async_slowdown``  -- async DGL (Alg. 2), K = 4, M = 50, block 2 slowed by
                         S in {1, 1.2, 1.5, 2} (the shape of DGL Fig. 5).
* ``async_buffer``    -- async DGL, K = 4, S = 1.2 on block 2, M in {1, 5, 20, 50} (Fig. 6).
* ``bwbpf``           -- BWBPF vs DGL vs backprop at K = 2 and K = 4.

    python benchmarks/accuracy_dgl.py            # full run, writes results/accuracy_dgl.{json,md}
    python benchmarks/accuracy_dgl.py --quick    # < 1 min smoke run (make bench); writes nothing
    # the DGL-vs-backprop target, more data, three seeds (results/accuracy_dgl_vs_bp.*):
    python benchmarks/accuracy_dgl.py --only dgl_vs_bp aux --seeds 0 1 2 --n-train 10000 \
        --n-test 10000 --epochs 12 --weight-decay 5e-4 --name accuracy_dgl_vs_bp

Runs shared between sections (e.g. backprop, or async S = 1.2 at M = 50)
are trained once. With several ``--seeds`` every configuration is trained
once per seed (network initialisation and example order; the training subset
stays the same) and the tables show the mean and standard deviation; the
DGL - backprop gap is also given per seed, paired by seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from statistics import mean, stdev

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bpsim import data, nets  # noqa: E402
from bpsim.algorithms import get_trainer  # noqa: E402
from bpsim.algorithms.base import head_accuracies  # noqa: E402
from bpsim.trace import atomic_write_text  # noqa: E402
from _provenance import stamp, trainer_fp  # noqa: E402
from _render import provenance_line  # noqa: E402

SECTIONS = ("dgl_vs_bp", "aux", "async_slowdown", "async_buffer", "bwbpf", "greedy")
SLOWED_BLOCK = 2  # 1-based block slowed down in the async sweeps


def plan(sections: list[str]) -> dict[str, list[dict]]:
    """The runs of every section, as keyword dicts for ``run``."""
    bp = dict(algo="bp", blocks=4)
    dgl4 = dict(algo="dgl", blocks=4, aux="mlp")
    out = {
        "dgl_vs_bp": [bp, dgl4],
        "aux": [dgl4, dict(dgl4, aux="mlp-sr"), dict(dgl4, aux="cnn")],
        "async_slowdown": [dict(algo="dgl-async", blocks=4, aux="mlp", buffer=50, slowdown=s)
                           for s in (1.0, 1.2, 1.5, 2.0)],
        "async_buffer": [dict(algo="dgl-async", blocks=4, aux="mlp", buffer=m, slowdown=1.2)
                         for m in (1, 5, 20, 50)],
        "bwbpf": [bp] + [dict(algo=a, blocks=k, aux=x) for k in (2, 4)
                         for a, x in (("dgl", "mlp"), ("bwbpf", "linear"))],
        # DGL Fig. 3: parallel against sequential greedy, the same number of epochs per block, constant step
        # (one step schedule over the whole run would give greedy's later blocks only the decayed rate)
        "greedy": [dict(algo=a, blocks=4, aux="mlp", schedule="constant") for a in ("dgl", "greedy")],
    }
    return {s: out[s] for s in sections}


def key(cfg: dict) -> str:
    return ",".join(f"{k}={cfg[k]}" for k in sorted(cfg))


def make(cfg: dict, settings: dict, seed: int):
    """The net and trainer of configuration ``cfg`` under the study's ``settings`` (data, width, epochs,
    batch_size, lr, weight_decay: the saved ``info`` or the command line's), and its epochs to ``fit``."""
    cls = get_trainer(cfg["algo"])
    desc = data.describe(settings["data"])
    net = nets.build("cnn", desc.input_shape, desc.n_classes, cfg["blocks"], width=settings["width"],
                     aux=cfg.get("aux"), output_layer=cls.output_layer, seed=seed)
    kw = {}
    if cfg["algo"] == "dgl-async":
        kw = dict(buffer=cfg["buffer"], slowdown=(SLOWED_BLOCK, cfg["slowdown"]))
    e = settings["epochs"]
    milestones = [max(1, (3 * e) // 4)] if e > 1 and cfg.get("schedule") != "constant" else []
    epochs = e * cfg["blocks"] if cfg["algo"] == "greedy" else e   # greedy: every block e epochs in turn
    trainer = cls(net, lr=settings["lr"], momentum=0.9, weight_decay=settings["weight_decay"],
                  batch_size=settings["batch_size"], milestones=milestones, gamma=0.2, seed=seed,
                  progress=False, **kw)
    return net, trainer, epochs


def fingerprint(saved: dict) -> dict[str, str]:
    """Per configuration of a saved study, the float64 fingerprint of its trainer's first steps
    (two batches; greedy gets two per block)."""
    info = saved["info"]
    settings = dict(info, data=info.get("data", "fashion-mnist"))
    shape = data.describe(settings["data"]).input_shape
    cfgs = {cfg_key(r): {k: r[k] for k in r if k in CFG_KEYS} for rows in saved["results"].values() for r in rows}
    out = {}
    for k, cfg in sorted(cfgs.items()):
        def build(cfg=cfg):
            net, trainer, _ = make(cfg, settings, 0)
            return net, trainer
        out[k] = trainer_fp(build, shape, settings["batch_size"],
                            epochs=cfg["blocks"] if cfg["algo"] == "greedy" else 1)
    return out


def run(cfg: dict, train, test, args, seed: int) -> dict:
    """Train one configuration from ``seed`` and return its record."""
    net, trainer, epochs = make(cfg, vars(args), seed)
    t0, c0 = time.perf_counter(), time.process_time()
    hist = trainer.fit(train, epochs)  # evaluated once, at the end (saves time)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    acc, loss = trainer.evaluate(test)
    bf, hf = net.block_flops(), net.head_flops()
    rec = {
        **cfg, "seed": seed, "test_accuracy": acc, "test_loss": loss, "train_loss": hist.train_loss,
        "wall_s": wall, "cpu_s": cpu, "block_mflops": [f / 1e6 for f in bf], "head_mflops": [f / 1e6 for f in hf],
        "aux_flops_vs_largest_block": max(hf) / max(bf),
        # test accuracy of every block's head (DGL Fig. 4: better with depth); for bp only the last
        "head_test_accuracy": head_accuracies(net, test) if net.heads is not None else None,
        "extra_last_epoch": hist.records[-1].extra,
    }
    print(f"  {key(cfg):60s} seed {seed}  acc {100 * acc:6.2f}%  {wall:6.1f} s", flush=True)
    return rec


CFG_KEYS = ("algo", "blocks", "aux", "buffer", "slowdown", "schedule")


def cfg_key(rec: dict, seed: bool = False) -> str:
    """The ``key`` of the configuration a record was trained with (and its
    seed, 0 for records saved before seeds were recorded)."""
    cfg = {k: rec[k] for k in rec if k in CFG_KEYS}
    return key(dict(cfg, seed=rec.get("seed", 0)) if seed else cfg)


def aggregate(rows: list[dict]) -> list[dict]:
    """One record per configuration: accuracies averaged over its seeds
    (``test_accuracy`` the mean, ``acc_std`` the sample standard deviation,
    ``accs`` the values by seed); per-head accuracies and wall time averaged;
    other fields from the first seed. Order of first appearance is kept."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(cfg_key(r), []).append(r)
    out = []
    for rs in groups.values():
        accs = [r["test_accuracy"] for r in rs]
        a = dict(rs[0], test_accuracy=mean(accs), accs=accs, seeds=[r.get("seed") for r in rs],
                 acc_std=stdev(accs) if len(accs) > 1 else None,
                 wall_s=mean(r["wall_s"] for r in rs),
                 cpu_s=mean(r.get("cpu_s", r["wall_s"]) for r in rs))
        if rs[0].get("head_test_accuracy"):
            a["head_test_accuracy"] = [mean(h) for h in zip(*(r["head_test_accuracy"] for r in rs))]
        out.append(a)
    return out


def _acc(r: dict) -> str:
    """Mean test accuracy in %, with '± std' over seeds when there are several."""
    s = _pct(r["test_accuracy"])
    return s + (f" ± {100 * r['acc_std']:.2f}" if r.get("acc_std") is not None else "")


def paired_gap(a: dict, b: dict) -> str:
    """Per-seed differences a - b in points (same seeds), for the tables."""
    pa = dict(zip(a.get("seeds", []), a.get("accs", [])))
    pb = dict(zip(b.get("seeds", []), b.get("accs", [])))
    common = [s for s in pa if s in pb]
    if len(common) < 2:
        return ""
    return " (by seed: " + ", ".join(f"{100 * (pa[s] - pb[s]):+.2f}" for s in common) + ")"


def merge(parts: list[dict]) -> dict:
    """One saved study from several (same settings, different sections,
    auxiliary nets or seeds): every section of :func:`plan` that any part ran
    gets every record of its configurations found in any part."""
    info = dict(parts[0]["info"])
    for p in parts[1:]:
        for k in ("width", "n_train", "n_test", "epochs", "batch_size", "lr", "weight_decay"):
            if p["info"].get(k) != info.get(k):
                raise ValueError(f"cannot merge results with different {k}: "
                                 f"{info.get(k)} and {p['info'].get(k)}")
    recs: dict[str, dict] = {}
    sections: list[str] = []
    for p in parts:
        for sec, rows in p["results"].items():
            sections += [sec] if sec not in sections else []
            for r in rows:
                recs[cfg_key(r, seed=True)] = r
    seeds = sorted({r.get("seed", 0) for r in recs.values()})
    results = {sec: [recs[k] for cfg in plan([sec])[sec] for s in seeds
                     if (k := key(dict(cfg, seed=s))) in recs] for sec in SECTIONS if sec in sections}
    info.update(seeds=seeds, command=" ; ".join(p["info"]["command"] for p in parts),
                total_wall_s=sum(p["info"]["total_wall_s"] for p in parts),
                total_cpu_s=sum(p["info"].get("total_cpu_s") or 0 for p in parts))
    out = {"results": results, "info": info}
    provs = [p.get("provenance") for p in parts]
    if all(provs):   # parts of one study: one commit, one mode; fingerprints of every part's configurations
        for k in ("commit", "dirty", "mode", "torch", "processor"):
            if len({str(q[k]) for q in provs}) > 1:
                raise ValueError(f"cannot merge results with different {k} in their provenance: "
                                 + ", ".join(str(q[k]) for q in provs))
        out["provenance"] = dict(provs[0], command=" ; ".join(q["command"] for q in provs),
                                 date=max(q["date"] for q in provs),
                                 fingerprint={k: v for q in provs for k, v in (q["fingerprint"] or {}).items()})
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _fmt_list(v) -> str:
    return "[" + ", ".join("n/a" if x is None else f"{x:.2f}" for x in v) + "]"


def markdown(results: dict[str, list[dict]], info: dict, provenance: dict | None = None) -> str:
    results = {sec: aggregate(rows) for sec, rows in results.items()}
    by = {cfg_key(r): r for rows in results.values() for r in rows}
    seeds = info.get("seeds", [info.get("seed", 0)])
    wd = info.get("weight_decay", 0.0)
    bp = next((r for r in by.values() if r["algo"] == "bp"), None)
    md = ["# Accuracy: DGL, async DGL and BWBPF against backprop", "",
          f"What ran: `{info['command']}`. DGL's VGG-like CNN (6 conv layers, first width "
          f"{info['width']}, doubling at each of the two poolings) on "
          f"{ {'digits': '8x8 digits'}.get(info.get('data'), 'Fashion-MNIST') }, "
          f"{info['n_train']} training examples (seeded subset), {info['n_test']} test examples, "
          f"{info['epochs']} epochs, batch {info['batch_size']}, SGD lr {info['lr']} momentum 0.9"
          f"{f', weight decay {wd:g}' if wd else ''}"
          f"{', lr x0.2 from epoch ' + str(info['milestone']) if info['milestone'] else ''}, "
          f"{'seed ' + str(seeds[0]) if len(seeds) == 1 else 'seeds ' + ', '.join(map(str, seeds))}"
          f", one CPU thread (torch {info['torch']}, {info['machine']}). Every method has the same "
          "budget: same examples, epochs and schedule. Test accuracy is measured once, after the "
          "last epoch. " + ("One seed per configuration: differences below about "
                            f"{info['noise_points']:.1f} points (one standard error of an accuracy on "
                            f"{info['n_test']} test examples, doubled) are noise." if len(seeds) == 1 else
                            f"Accuracies are the mean ± sample standard deviation over the {len(seeds)} "
                            "seeds (each seed sets the initialisation and the example order); gaps "
                            "to backprop are also listed seed by seed.") + " Column *s*: seconds of "
          "CPU time of one training run (wall time where no CPU time was recorded).", ""]
    if "dgl_vs_bp" in results:
        md += ["## DGL (K = 4) vs backprop", "", "| method | test acc % | per-head test acc % | s |",
               "| --- | ---: | --- | ---: |"]
        for r in results["dgl_vs_bp"]:
            heads = r["head_test_accuracy"]
            md.append(f"| {r['algo']} (K = {r['blocks']}{', ' + r['aux'] if r['algo'] != 'bp' else ''}) "
                      f"| {_acc(r)} | {_fmt_list([100 * a for a in heads]) if heads else '-'} "
                      f"| {r.get('cpu_s', r['wall_s']):.0f} |")
        d = [r for r in results["dgl_vs_bp"] if r["algo"] == "dgl"][0]
        if bp:
            gap = 100 * (d["test_accuracy"] - bp["test_accuracy"])
            md += ["", f"DGL (MLP-aux) - backprop: {gap:+.2f} points{paired_gap(d, bp)} "
                       f"(target: within 0.5 points, i.e. >= -0.5): {'met' if gap >= -0.5 else 'not met'}."]
            if "aux" in results:
                for r in results["aux"]:
                    if r["aux"] == d["aux"]:
                        continue
                    g = 100 * (r["test_accuracy"] - bp["test_accuracy"])
                    md += ["", f"DGL ({r['aux']}-aux) - backprop: {g:+.2f} points{paired_gap(r, bp)}: "
                               f"{'met' if g >= -0.5 else 'not met'}."]
        md.append("")
    if "aux" in results:
        md += ["## Auxiliary networks (DGL Table 1), K = 4", "",
               "Aux FLOPs relative to the largest block (forward, 2 per multiply-accumulate), "
               "as in Table 1; the paper's ratios are for width 128 on 32x32 CIFAR inputs.", "",
               "| aux | aux FLOPs / largest block | per-head MFLOPs | test acc % | vs backprop (points) | s |",
               "| --- | ---: | --- | ---: | ---: | ---: |"]
        for r in results["aux"]:
            gap = f"{100 * (r['test_accuracy'] - bp['test_accuracy']):+.2f}" if bp else "n/a"
            md.append(f"| {r['aux']} | {100 * r['aux_flops_vs_largest_block']:.1f}% | "
                      f"{_fmt_list(r['head_mflops'][:-1])} | {_acc(r)} | {gap} | "
                      f"{r.get('cpu_s', r['wall_s']):.0f} |")
        md += ["", f"Block MFLOPs: {_fmt_list(results['aux'][0]['block_mflops'])}.", "",
               "For comparison, DGL Table 1 (CIFAR-10, width 128, 50 epochs): CNN-aux 92.2%, "
               "MLP-SR-aux 91.2%, MLP-aux 90.6%, i.e. the cheap heads 1.0 and 1.6 points below "
               "CNN-aux.", ""]
    for sec, title, col in (("async_slowdown", f"Async DGL: slowdown S of block {SLOWED_BLOCK} (M = 50), "
                             "the shape of DGL Fig. 5", "slowdown"),
                            ("async_buffer", f"Async DGL: buffer size M (S = 1.2 on block {SLOWED_BLOCK}), "
                             "the shape of DGL Fig. 6", "buffer")):
        if sec not in results:
            continue
        md += [f"## {title}", "",
               f"| {'S' if col == 'slowdown' else 'M'} | test acc % | reuse per buffer (last epoch) "
               "| staleness per buffer (last epoch) | s |", "| ---: | ---: | --- | --- | ---: |"]
        for r in results[sec]:
            e = r["extra_last_epoch"]
            md.append(f"| {r[col]:g} | {_acc(r)} | {_fmt_list(e['reuse_mean'])} | "
                      f"{_fmt_list(e['staleness_mean'])} | {r.get('cpu_s', r['wall_s']):.0f} |")
        sync = by.get(key(dict(algo="dgl", blocks=4, aux="mlp")))
        if sync:
            md += ["", f"Synchronous DGL (K = 4, MLP-aux) for reference: {_acc(sync)}%."]
        md.append("")
    if "bwbpf" in results:
        md += ["## BWBPF vs DGL vs backprop", "", "| K | backprop | DGL (MLP-aux) | BWBPF (linear heads) |",
               "| ---: | ---: | ---: | ---: |"]
        for k in (2, 4):
            d = by.get(key(dict(algo="dgl", blocks=k, aux="mlp")))
            b = by.get(key(dict(algo="bwbpf", blocks=k, aux="linear")))
            md.append(f"| {k} | {_acc(bp) if bp else 'n/a'} | "
                      f"{_acc(d) if d else 'n/a'} | {_acc(b) if b else 'n/a'} |")
        md += ["", "Backprop does not depend on K (the same network, trained end to end). "
                   "BWBPF's prediction comes from its output layer (the VGG classifier: pool to 2x2, "
                   "two hidden layers) on the last block's features; its block heads are GAP + linear.", ""]
    if "greedy" in results:
        md += ["## Parallel DGL against sequential greedy (DGL Fig. 3), K = 4, constant step", "",
               f"Both give every block {info['epochs']} epochs of updates: DGL all blocks at once, greedy one "
               "block after the other (blocks below frozen).", "",
               "| method | test acc % | per-head test acc % | s |", "| --- | ---: | --- | ---: |"]
        for r in results["greedy"]:
            heads = r["head_test_accuracy"]
            md.append(f"| {r['algo']} | {_acc(r)} | {_fmt_list([100 * a for a in heads]) if heads else '-'} "
                      f"| {r.get('cpu_s', r['wall_s']):.0f} |")
        g = {r["algo"]: r for r in results["greedy"]}
        if len(g) == 2:
            md += ["", f"DGL - greedy: {100 * (g['dgl']['test_accuracy'] - g['greedy']['test_accuracy']):+.2f} "
                       f"points{paired_gap(g['dgl'], g['greedy'])}.", ""]
    tail = f"Total wall time: {info['total_wall_s']:.0f} s"
    if info.get("total_cpu_s") is not None:
        tail += f", CPU time of the training runs: {info['total_cpu_s']:.0f} s"
    if info.get("load_avg_at_end") is not None:
        tail += (f"; load average {info['load_avg_at_end']:.1f} at the end (the machine is shared, "
                 "so wall times are only indicative)")
    md += [tail + ".", "", provenance_line({"provenance": provenance}), ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min); writes no results")
    ap.add_argument("--width", type=int, default=16, help="first conv width (paper: 128)")
    ap.add_argument("--data", default="fashion-mnist", choices=("fashion-mnist", "digits"),
                    help="data set (digits: scikit-learn's 8x8 digits, all 1437 training and 360 test images)")
    ap.add_argument("--n-train", type=int, default=None, help="training subset (default 2500; digits: all)")
    ap.add_argument("--n-test", type=int, default=None, help="test subset (default 2000; digits: all)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="train every configuration once per seed (default: 0)")
    ap.add_argument("--weight-decay", type=float, default=0.0,
                    help="SGD weight decay (default 0; DGL App. B uses 5e-4)")
    ap.add_argument("--name", default="accuracy_dgl", help="results file stem (default accuracy_dgl)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--out", help="results folder (default: benchmarks/results; --quick: none)")
    ap.add_argument("--aux", nargs="+", choices=nets.HEADS,
                    help="in the aux section train only these auxiliary nets")
    ap.add_argument("--render", metavar="JSON", nargs="+",
                    help="only rewrite the .md beside the first JSON from saved results; "
                         "several JSONs (parts of one study run in parallel, e.g. different "
                         "sections or seeds) are merged into the first")
    args = ap.parse_args(argv)
    if args.render:
        saved = merge([json.load(open(f, encoding="utf-8")) for f in args.render])
        md = markdown(saved["results"], saved["info"], saved.get("provenance"))
        if len(args.render) > 1:
            atomic_write_text(args.render[0], json.dumps(saved, indent=2))
        atomic_write_text(os.path.splitext(args.render[0])[0] + ".md", md)
        print(md)
        return 0
    if args.data == "fashion-mnist":
        args.n_train, args.n_test = args.n_train or 2500, args.n_test or 2000
    if args.quick:
        args.width, args.n_train, args.n_test, args.epochs = 4, 256, 256, 1
    torch.set_num_threads(1)
    out = args.out or (None if args.quick else
                       os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    train, test = data.load(args.data, n_train=args.n_train, n_test=args.n_test, seed=0)
    sections = list(args.only or SECTIONS)
    t0, done, results = time.perf_counter(), {}, {}
    for sec, cfgs in plan(sections).items():
        print(f"== {sec}", flush=True)
        results[sec] = []
        for cfg in cfgs:
            if sec == "aux" and args.aux and cfg["aux"] not in args.aux:
                continue
            for seed in args.seeds:
                k = key(dict(cfg, seed=seed))
                if k not in done:
                    done[k] = run(cfg, train, test, args, seed)
                results[sec].append(done[k])
    n_test = len(test)
    info = {
        "command": " ".join(["python benchmarks/accuracy_dgl.py"] + list(sys.argv[1:] if argv is None else argv)),
        "data": args.data, "width": args.width, "n_train": len(train), "n_test": n_test, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds,
        "weight_decay": args.weight_decay,
        "milestone": max(1, (3 * args.epochs) // 4) + 1 if args.epochs > 1 else None,
        "slowed_block": SLOWED_BLOCK, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "threads": 1, "total_wall_s": time.perf_counter() - t0,
        "noise_points": 200 * (0.12 / n_test) ** 0.5,  # 2 x sqrt(p(1-p)/n) at p ~ 0.85
        "total_cpu_s": sum(r["cpu_s"] for r in done.values()),
        "load_avg_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    saved = stamp({"results": results, "info": info}, "accuracy_dgl", argv, args.quick, fingerprint)
    md = markdown(results, info, saved["provenance"])
    print(md)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, args.name + ".json"), json.dumps(saved, indent=2))
        atomic_write_text(os.path.join(out, args.name + ".md"), md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
