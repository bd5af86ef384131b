"""Every committed benchmark table is its script's rendering of the committed data,
and every committed result still describes what the code does.

``benchmarks/results/**/NAME.md`` must equal what ``benchmarks/SCRIPT.py
--render NAME.json`` writes from the JSON beside it: a number in a table
cannot drift from the measurement it reports, and a script whose table
code breaks fails here, not in the next long benchmark run.

Each result records its ``provenance`` (commit, torch, processor, date,
command, mode) and a float64 fingerprint of the code's first steps on every
configuration it measured. The staleness test recomputes each fingerprint
with the script's ``fingerprint(saved)``: when a trainer, a net or the
simulator changes what it does on a committed configuration, the test fails
and names the result to regenerate (``make results``). A result without
provenance cannot be checked; it is reported as skipped here and its claims
are shown *stale* in the ledger.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
RESULTS = BENCH / "results"
SCRIPTS = ("accuracy_blockprop", "accuracy_dgl", "blockprop_depth", "costmodel", "fidelity", "memory", "simspeed", "theory",
           "throughput")


def _script(path: Path) -> str:
    """The script that wrote ``path``: the longest script name its file name starts with."""
    names = [s for s in SCRIPTS if path.stem.startswith(s)]
    assert names, f"{path} has no script in benchmarks/ that renders it ({', '.join(SCRIPTS)})"
    return max(names, key=len)


def _render(script: str, saved: dict) -> str:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    mod = importlib.import_module(script)
    if script == "accuracy_dgl":   # parts of one study merge before rendering
        merged = mod.merge([saved])
        return mod.markdown(merged["results"], merged["info"], merged.get("provenance"))
    return mod.markdown(saved)


SAVED = sorted(RESULTS.rglob("*.json"))


#: scripts that may have no committed result
OPTIONAL = {"blockprop_depth"}


def test_every_script_has_committed_results():
    have = {_script(p) for p in SAVED}
    assert set(SCRIPTS) - OPTIONAL <= have <= set(SCRIPTS)


@pytest.mark.parametrize("path", SAVED, ids=[str(p.relative_to(RESULTS)) for p in SAVED])
def test_committed_table_is_the_rendering_of_its_json(path):
    md = path.with_suffix(".md")
    assert md.exists(), f"{path.name} has no table beside it; run the script with --render {path}"
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    assert _render(_script(path), saved) == md.read_text(encoding="utf-8"), (
        f"{md} differs from its JSON's rendering: python benchmarks/{_script(path)}.py --render {path}")


def _module(script: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(script)


@pytest.mark.parametrize("path", SAVED, ids=[str(p.relative_to(RESULTS)) for p in SAVED])
def test_committed_result_matches_the_code(path):
    """A result's recorded fingerprints equal the code's now: otherwise the result is stale."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    prov = saved.get("provenance")
    name = path.relative_to(RESULTS)
    if not prov or not prov.get("fingerprint"):
        pytest.skip(f"STALE {name}: no provenance, so it may not come from this code; the ledger marks its "
                    "claims stale (regenerate with make results)")
    assert prov["mode"] == "full", f"{name} is a {prov['mode']} run; commit full-mode results only"
    assert prov["dirty"] is False, f"{name} was made with uncommitted changes; regenerate it from a commit"
    now = _module(_script(path)).fingerprint(saved)
    moved = sorted(k for k in set(now) | set(prov["fingerprint"]) if now.get(k) != prov["fingerprint"].get(k))
    assert not moved, (f"{name} is stale: the code's behaviour on {len(moved)} of its configurations changed since "
                       f"commit {prov['commit'][:10]} made it ({', '.join(moved)}); regenerate it: "
                       f"{prov['command']} (or make results)")


def test_fingerprint_sees_a_change_of_behaviour(monkeypatch):
    """Changing what a trainer does on a configuration (here DGL's local update) changes its fingerprint."""
    prov = _module("_provenance")
    from bpsim import nets
    from bpsim.algorithms import dgl

    def make():
        net = nets.mlp([64, 32, 32, 10], blocks=2, aux="linear", seed=0)
        return net, dgl.DGLTrainer(net, lr=0.05, batch_size=16, seed=0, progress=False)

    before = prov.trainer_fp(make, (64,), 16)
    assert prov.trainer_fp(make, (64,), 16) == before        # repeatable
    real = dgl.DGLTrainer.train_step

    def half_step(self, x, y, idx):                         # the same step on half the batch
        return real(self, x[: len(x) // 2], y[: len(y) // 2], idx[: len(idx) // 2])

    monkeypatch.setattr(dgl.DGLTrainer, "train_step", half_step)
    assert prov.trainer_fp(make, (64,), 16) != before


def test_provenance_records_what_made_a_result():
    p = _module("_provenance").provenance("theory", ["--out", "x"], quick=False, fingerprint={"a": "b"})
    assert set(p) == {"commit", "dirty", "torch", "python", "processor", "cores", "date", "command", "mode",
                      "fingerprint"}
    assert p["command"] == "python benchmarks/theory.py --out x" and p["mode"] == "full"
