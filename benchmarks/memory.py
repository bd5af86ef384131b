"""Memory held for the backward pass: DGL against backprop (DGL Sec. 4.2).

Backprop keeps every activation the backward pass needs until the loss is
reached and the backward pass has gone back through the whole net. DGL cuts
the graph at every block (``dgl.block_forward`` detaches the input): block
``k``'s graph holds only block ``k``'s and its head's activations, and is freed
by its local update before block ``k + 1`` runs. So one worker running DGL
never holds more than the largest block's graph, and on ``K`` devices each
holds its own block's.

Measured exactly, on CPU, with ``torch.autograd.graph.saved_tensors_hooks``:
every tensor saved for backward is counted once (by storage), weights are
left out (they are held anyway), and the running total goes down when the
graph that saved it is freed. The peak of that total over one training step
is the number reported. With ``--device cuda`` the script also reports
``torch.cuda.max_memory_allocated`` minus the memory allocated before the
step (weights, optimizer state, batch).

Usage::

    python benchmarks/memory.py [--quick] [--device cuda] [--render results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _provenance import digest, stamp  # noqa: E402
from _render import provenance_line, render  # noqa: E402

from bpsim import nets  # noqa: E402
from bpsim.algorithms import dgl  # noqa: E402
from bpsim.trace import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2 ** 20


class SavedBytes:
    """Running and peak bytes of the activations saved for backward (each storage once)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, int] = {}
        self.count: dict[int, int] = {}
        self.now = self.peak = 0

    def _pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        key = s.data_ptr()
        if key in self.skip or s.nbytes() == 0:
            return t
        if key not in self.live:
            self.live[key] = s.nbytes()
            self.count[key] = 0
            self.now += s.nbytes()
            self.peak = max(self.peak, self.now)
        self.count[key] += 1
        holder = _Holder(t)
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key: int) -> None:
        self.count[key] -= 1
        if self.count[key] == 0:
            self.now -= self.live.pop(key)
            del self.count[key]

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Holder) else h

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context manager that counts while it is active."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


class _Holder:
    """What the graph keeps instead of a saved tensor: freed with the graph."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def _bp_step(net, x, y, opt) -> None:
    loss = nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _dgl_step(net, x, y, opts) -> None:
    h = x
    for k, block in enumerate(net.blocks):
        out = dgl.block_forward(block, h)
        dgl.local_update(out, dgl.local_head(net, k), opts[k], y, nn.functional.cross_entropy)
        h = out.detach()


def measure(case: str, net_fn: Callable[[], nets.BlockNet], x: torch.Tensor, y: torch.Tensor, device: str) -> dict:
    """Peak saved bytes of one step of backprop and of DGL (one worker, and per block)."""
    out: dict = {"case": case, "batch": len(x), "input": list(x.shape[1:])}
    for method in ("bp", "dgl"):
        net = net_fn().to(device)
        params = list(net.parameters())
        xs, ys = x.to(device), y.to(device)
        if method == "bp":
            opt = torch.optim.SGD(params, lr=0.01)
            step = lambda: _bp_step(net, xs, ys, opt)  # noqa: E731
        else:
            opts = [torch.optim.SGD(list(b.parameters()) + list(dgl.local_head(net, k).parameters()), lr=0.01)
                    for k, b in enumerate(net.blocks)]
            step = lambda: _dgl_step(net, xs, ys, opts)  # noqa: E731
        step()   # warm-up: optimizer state, lazy allocations
        counter = SavedBytes(params)
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        with counter.hooks():
            step()
        out[f"{method}_saved_peak"] = counter.peak
        if device == "cuda":
            torch.cuda.synchronize()
            out[f"{method}_cuda_peak"] = torch.cuda.max_memory_allocated() - base
        if method == "dgl":   # each block's own graph, as a worker holding only that block sees it
            per = []
            h = xs
            for k, block in enumerate(net.blocks):
                c = SavedBytes(params)
                with c.hooks():
                    o = dgl.block_forward(block, h)
                    dgl.local_update(o, dgl.local_head(net, k), opts[k], ys, nn.functional.cross_entropy)
                per.append(c.peak)
                h = o.detach()
            out["dgl_per_block"] = per
        out["blocks"] = len(net.blocks)
    out["dgl_over_bp"] = out["dgl_saved_peak"] / out["bp_saved_peak"]
    if device == "cuda":
        out["dgl_over_bp_cuda"] = out["dgl_cuda_peak"] / out["bp_cuda_peak"]
    return out


def cases(quick: bool, small: bool = False):
    """(name, net builder, inputs, labels) of every case; ``small``: the same nets and steps at a
    fraction of the width and 4 examples (for the fingerprint)."""
    ks = (2, 4) if quick else (2, 4, 8)
    batch = 32 if quick else 128
    cw, mw = (4, 32) if small else (16, 1024)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    if small:
        x, y = x[:4], y[:4]
    for k in ks:
        yield (f"VGG-like CNN, 8 conv layers, width 16, K = {k}",
               lambda k=k: nets.vgg(k, width=cw, layers=8, aux="mlp", seed=0), x, y)
    xf = x.flatten(1)
    for k in ks:
        yield (f"MLP 784-1024x8-10, linear heads, K = {k}",
               lambda k=k: nets.mlp(width=mw, depth=8, input_shape=(784,), blocks=k, aux="linear", seed=0), xf, y)


def fingerprint(saved: dict) -> dict[str, str]:
    """Per case, the exact saved-for-backward byte counts of one step of the case's nets and steps at a
    fraction of the width, on 4 examples: what is saved, and when it is freed, is what the measurement
    depends on; the counts scale with the width and the batch."""
    quick = saved.get("provenance", {}).get("mode") == "quick"
    out = {}
    for name, fn, x, y in cases(quick, small=True):
        r = measure(name, fn, x, y, "cpu")
        out[name] = digest([r["bp_saved_peak"], r["dgl_saved_peak"], r["dgl_per_block"]])
    return out


def markdown(saved: dict) -> str:
    info, rows = saved["info"], saved["results"]
    cuda = any("bp_cuda_peak" in r for r in rows)
    lines = ["# Memory held for the backward pass: DGL against backprop", "",
             f"One training step, batch {rows[0]['batch']}, DGL's MLP-aux heads on the CNN's blocks, linear heads on the MLP's; bytes of the activations "
             "saved for backward (`torch.autograd.graph.saved_tensors_hooks`, each storage once, weights left out), "
             "peak over the step. *DGL, one worker*: all blocks in turn in one process (each block's graph is freed by "
             "its local update). *DGL per block*: what each of K devices holds. Command: `"
             + info["command"] + f"` (torch {info['torch']}, {info['device']}).", "",
             "| network | K | backprop MiB | DGL one worker MiB | DGL per block MiB | DGL / backprop |"
             + (" CUDA peak DGL / backprop |" if cuda else ""),
             "| --- | ---: | ---: | ---: | --- | ---: |" + (" ---: |" if cuda else "")]
    for r in rows:
        per = ", ".join(f"{b / MIB:.2f}" for b in r["dgl_per_block"])
        line = (f"| {r['case'].split(', K =')[0]} | {r['blocks']} | {r['bp_saved_peak'] / MIB:.2f} | "
                f"{r['dgl_saved_peak'] / MIB:.2f} | {per} | {r['dgl_over_bp']:.2f} |")
        if cuda:
            line += f" {r.get('dgl_over_bp_cuda', float('nan')):.2f} |"
        lines.append(line)
    lines += ["", "DGL's peak is its largest block's graph plus that block's head; backprop's is the whole net's. The "
              "ratio falls as K grows, towards the largest block's share of the activations. The DGL paper (Sec. 4.2) reports "
              "that ResNet-152 with K = 2 fits 38 % more samples on one GPU than backprop, i.e. a ratio of about "
              "1 / 1.38 = 0.72 if activations dominate.", "", provenance_line(saved), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="K = 2, 4 and batch 32; writes nothing without --out")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", help=f"folder for the results (full mode default: {RESULTS})")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md beside JSON from its saved results")
    args = ap.parse_args(argv)
    if args.render:
        return render(args.render, markdown)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; run on a GPU machine or use --device cpu")
    torch.set_num_threads(1)
    rows = [measure(name, fn, x, y, args.device) for name, fn, x, y in cases(args.quick)]
    command = " ".join(["python benchmarks/memory.py"] + list(argv if argv is not None else sys.argv[1:]))
    saved = {"results": rows, "info": {"command": command, "torch": torch.__version__, "device": args.device,
                                       "python": platform.python_version()}}
    stamp(saved, "memory", argv, args.quick, fingerprint)
    md = markdown(saved)
    print(md)
    out = args.out or (None if args.quick else RESULTS)
    if out:
        name = "memory" if args.device == "cpu" else "memory_cuda"
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / f"{name}.json", json.dumps(saved, indent=1) + "\n")
        atomic_write_text(Path(out) / f"{name}.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
