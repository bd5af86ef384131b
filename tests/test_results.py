"""Every committed benchmark table is its script's rendering of the committed data.

``benchmarks/results/**/NAME.md`` must equal what ``benchmarks/SCRIPT.py
--render NAME.json`` writes from the JSON beside it: a number in a table
cannot drift from the measurement it reports, and a script whose table
code breaks fails here, not in the next long benchmark run.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
RESULTS = BENCH / "results"
SCRIPTS = ("accuracy_blockprop", "accuracy_dgl", "costmodel", "fidelity", "memory", "simspeed", "theory", "throughput")


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
        return mod.markdown(merged["results"], merged["info"])
    return mod.markdown(saved)


SAVED = sorted(RESULTS.rglob("*.json"))


def test_every_script_has_committed_results():
    assert {_script(p) for p in SAVED} == set(SCRIPTS)


@pytest.mark.parametrize("path", SAVED, ids=[str(p.relative_to(RESULTS)) for p in SAVED])
def test_committed_table_is_the_rendering_of_its_json(path):
    md = path.with_suffix(".md")
    assert md.exists(), f"{path.name} has no table beside it; run the script with --render {path}"
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    assert _render(_script(path), saved) == md.read_text(encoding="utf-8"), (
        f"{md} differs from its JSON's rendering: python benchmarks/{_script(path)}.py --render {path}")
