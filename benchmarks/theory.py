"""The papers' exact claims measured in float64: Lemma B.1, Theorem 5.1, Corollary 3.1.

* **Lemma B.1** (BlockProp App. B): the W-step gradient at the exact
  ``h*`` is the gradient of ``J(W) = min_h L(h, W)``. Measured as the
  relative gap between ``<dL/dW(h*), v>`` and a central finite difference
  of ``J`` along unit directions ``v`` (``J`` re-solved at each shifted W).
* **Theorem 5.1** (BlockProp Sec. 5): with ``lambda = 1/beta`` the W-step
  gradient tends to backprop's as ``beta -> 0``; measured as the relative
  error against backprop for several ``beta`` and the log-log slope.
* **Corollary 3.1** (DGL Sec. 3, eq. 2): block ``j``'s squared gradient
  norm is bounded by ``sum_t sqrt(c_t) eta_t / sum_t eta_t``. Measured on
  a DGL run on digits with a step decay: block 2's squared gradient norm of
  its own greedy objective (block 2 and its head, full training set) and
  the drift proxy of its input after every epoch.

Usage::

    python benchmarks/theory.py [--quick] [--render results/theory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _provenance import digest, float64, stamp, trainer_fp  # noqa: E402
from _render import provenance_line, render  # noqa: E402

from bpsim import data, nets, theory  # noqa: E402
from bpsim.algorithms import dgl  # noqa: E402
from bpsim.trace import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def lemma_b1(sizes: list[int], blocks: int, n: int = 32, lam: float = 1.0, eps: float = 1e-5,
             directions: int = 3, seed: int = 0) -> dict:
    """Relative gap between the lemma's directional derivative and a finite difference of J."""
    train, _ = data.load("digits")
    net = nets.mlp(sizes, blocks=blocks, seed=seed)
    net64, x64, y64 = theory.as_float64(net, train.tensors[0][:n], train.tensors[1][:n])
    params = theory.flat_params(net64)
    sizes_p = [p.numel() for p in params]
    g = theory.reduced_gradient(net64, x64, y64, lam)
    gen = torch.Generator().manual_seed(seed)
    gaps = []
    for _ in range(directions):
        v = torch.randn(sum(sizes_p), generator=gen, dtype=torch.float64)
        v /= v.norm()
        js = []
        for sign in (1, -1):
            other = theory.as_float64(net64, x64, y64)[0]
            with torch.no_grad():
                for p, chunk in zip(theory.flat_params(other), v.split(sizes_p)):
                    p.add_(sign * eps * chunk.view_as(p))
            js.append(theory.reduced_objective(other, x64, y64, lam))
        fd = (js[0] - js[1]) / (2 * eps)
        gaps.append(abs(torch.dot(g, v).item() - fd) / abs(fd))
    return {"sizes": sizes, "blocks": blocks, "batch": n, "lam": lam, "eps": eps,
            "rel_gap": gaps, "max_rel_gap": max(gaps)}


def theorem_51(betas: tuple[float, ...] = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3), seed: int = 0) -> dict:
    """BlockProp's exact-h* gradient against backprop's as lambda = 1/beta grows."""
    train, _ = data.load("digits")
    net = nets.mlp([64, 32, 32, 10], blocks=3, seed=seed)
    out = theory.large_lambda_limit(net, train.tensors[0][:32], train.tensors[1][:32], betas)
    out.update({"sizes": [64, 32, 32, 10], "blocks": 3, "batch": 32})
    return out


def corollary_31(epochs: int = 16, decay_at: int = 8, seed: int = 0) -> dict:
    """Block 2's squared gradient norm and its input's drift proxy per epoch of a DGL run."""
    train, test = data.load("digits")
    net = nets.mlp([64, 128, 128, 128, 10], blocks=3, aux="mlp", seed=seed)
    x_all, y_all = train.tensors
    probe = x_all[:256]
    snaps = [dgl.probe_outputs(net, probe)[0]]
    lrs: list[float] = []
    gnorm: list[float] = []
    loss_fn = torch.nn.CrossEntropyLoss()

    def block2_grad_sq() -> float:
        block, head = net.blocks[1], dgl.local_head(net, 1)
        ps = [p for m in (block, head) for p in m.parameters()]
        was = net.training
        net.eval()
        with torch.no_grad():
            h1 = net.blocks[0](x_all)
        loss = dgl.local_loss(block(h1), head, y_all, loss_fn)
        gs = torch.autograd.grad(loss, ps)
        net.train(was)
        return float(sum((gi ** 2).sum() for gi in gs))

    gnorm.append(block2_grad_sq())

    def record(trainer, rec) -> None:
        snaps.append(dgl.probe_outputs(net, probe)[0])
        lrs.append(trainer.optimizers[1].param_groups[0]["lr"])
        gnorm.append(block2_grad_sq())

    trainer = dgl.DGLTrainer(net, lr=0.05, seed=seed, milestones=[decay_at], gamma=0.1, progress=False)
    hist = trainer.fit(train, epochs, test=test, callbacks=[record])
    drift = dgl.input_drift(snaps, lrs=[lrs[0]] + lrs)
    before = drift["c"][decay_at - 1]
    after = drift["c"][-2]
    peak = max(range(len(gnorm)), key=gnorm.__getitem__)
    return {"sizes": [64, 128, 128, 128, 10], "blocks": 3, "aux": "mlp", "epochs": epochs, "decay_at": decay_at,
            "lr": lrs, "grad_sq": gnorm, "drift": drift["c"],
            "drift_cumsum": drift["cumsum"], "rate": drift["rate"], "drift_before_decay": before,
            "drift_last_before_end": after, "grad_sq_peak_epoch": peak,
            "grad_sq_end_over_peak": gnorm[-1] / gnorm[peak],
            "test_accuracy": hist.final_accuracy}


def fingerprint(saved: dict) -> dict[str, str]:
    """Float64 fingerprints of the three measurements' configurations: Lemma B.1's exact gradient (not the
    finite-difference gaps, which are rounding noise), Theorem 5.1's errors against backprop, and the first
    steps of Corollary 3.1's DGL trainer."""
    r = saved["results"]
    train, _ = data.load("digits")
    out = {}
    with float64():
        for c in r["lemma_b1"]:
            net = nets.mlp(c["sizes"], blocks=c["blocks"], seed=0)
            net64, x64, y64 = theory.as_float64(net, train.tensors[0][:c["batch"]], train.tensors[1][:c["batch"]])
            g = theory.reduced_gradient(net64, x64, y64, c["lam"])
            out[f"lemma_b1 lam={c['lam']:g}"] = digest([g.norm(), g[:8]], digits=6)
        t = r["theorem_51"]
        net = nets.mlp(t["sizes"], blocks=t["blocks"], seed=0)
        lim = theory.large_lambda_limit(net, train.tensors[0][:t["batch"]], train.tensors[1][:t["batch"]],
                                        tuple(t["beta"]))
        out["theorem_51"] = digest(lim["rel_error"], digits=6)
    c = r["corollary_31"]
    out["corollary_31"] = trainer_fp(
        lambda: (lambda net: (net, dgl.DGLTrainer(net, lr=0.05, seed=0, milestones=[c["decay_at"]], gamma=0.1,
                                                   progress=False)))(
            nets.mlp(c["sizes"], blocks=c["blocks"], aux=c["aux"], seed=0)), (c["sizes"][0],), 64)
    return out


def markdown(saved: dict) -> str:
    r, info = saved["results"], saved["info"]
    lines = ["# The exact claims: Lemma B.1, Theorem 5.1, Corollary 3.1", "",
             "float64, digits, one torch thread. Command: `" + info["command"] + "`.", "",
             "## Lemma B.1: dL/dW at the exact h* is the gradient of J(W) = min_h L(h, W)", "",
             "Relative gap |<dL/dW(h*), v> - (J(W + eps v) - J(W - eps v)) / (2 eps)| / |finite difference| "
             "along random unit directions v.", "",
             "| net | K | batch | lambda | eps | gap per direction | max gap |", "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for c in r["lemma_b1"]:
        gaps = ", ".join(f"{g:.1e}" for g in c["rel_gap"])
        lines.append(f"| MLP {'-'.join(map(str, c['sizes']))} | {c['blocks']} | {c['batch']} | {c['lam']:g} | "
                     f"{c['eps']:g} | {gaps} | {c['max_rel_gap']:.1e} |")
    t = r["theorem_51"]
    lines += ["", "## Theorem 5.1: BlockProp -> backprop as lambda = 1/beta grows", "",
              f"MLP {'-'.join(map(str, t['sizes']))}, K = {t['blocks']}, batch {t['batch']}: exact-h* W-step "
              "gradient against backprop's.", "", "| beta | lambda | cosine | relative error |",
              "| ---: | ---: | ---: | ---: |"]
    for b, lam, cos, err in zip(t["beta"], t["lam"], t["cosine"], t["rel_error"]):
        lines.append(f"| {b:g} | {lam:g} | {cos:.6f} | {err:.2e} |")
    lines += ["", f"Log-log slope of the error against beta: **{t['slope']:.2f}** (the theorem's O(beta): 1).", ""]
    c = r["corollary_31"]
    lines += ["## Corollary 3.1: block 2's gradient norm as its input settles", "",
              f"DGL, MLP {'-'.join(map(str, c['sizes']))}, K = {c['blocks']}, {c['aux']} heads, {c['epochs']} epochs, "
              f"lr 0.05 divided by 10 after epoch {c['decay_at']}; test accuracy {c['test_accuracy']:.3f}. "
              "grad^2: squared norm of the gradient of block 2's greedy objective (block 2 and its head, whole "
              "training set); c_t: drift proxy of block 2's input (`dgl.input_drift`, reference = last epoch); "
              "rate: eq. (2)'s ratio with the proxy.", "",
              "| epoch | grad^2 | c_t | rate |", "| ---: | ---: | ---: | ---: |"]
    for e, (g, d, q) in enumerate(zip(c["grad_sq"], c["drift"], c["rate"])):
        lines.append(f"| {e} | {g:.2e} | {d:.3f} | {q:.3f} |")
    lines += ["", f"grad^2 after the last epoch / its peak (epoch {c['grad_sq_peak_epoch']}): "
              f"{c['grad_sq_end_over_peak']:.3f} (at initialisation the gradient is small because the net's outputs "
              "are; the bound is on the infimum over t, so the informative part is the fall after the peak); drift proxy just "
              f"before the decay {c['drift_before_decay']:.3f}, one epoch before the end "
              f"{c['drift_last_before_end']:.3f}.", "", provenance_line(saved), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer directions and epochs; writes nothing without --out")
    ap.add_argument("--out", help=f"folder for the results (full mode default: {RESULTS})")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md beside JSON from its saved results")
    args = ap.parse_args(argv)
    if args.render:
        return render(args.render, markdown)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dirs = 1 if args.quick else 3
    results = {
        "lemma_b1": [lemma_b1([64, 32, 10], 2, lam=lam, directions=dirs) for lam in (0.1, 1.0, 10.0)],
        "theorem_51": theorem_51(),
        "corollary_31": corollary_31(epochs=4, decay_at=2) if args.quick else corollary_31(),
    }
    command = " ".join(["python benchmarks/theory.py"] + list(argv if argv is not None else sys.argv[1:]))
    saved = {"results": results,
             "info": {"command": command, "torch": torch.__version__, "python": platform.python_version(),
                      "threads": 1, "wall_s": time.perf_counter() - t0}}
    stamp(saved, "theory", argv, args.quick, fingerprint)
    md = markdown(saved)
    print(md)
    out = args.out or (None if args.quick else RESULTS)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / "theory.json", json.dumps(saved, indent=1) + "\n")
        atomic_write_text(Path(out) / "theory.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
