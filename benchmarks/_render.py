"""Shared by the benchmark scripts: rewrite a saved result's Markdown table.

Every script keeps its measurements in ``results/NAME.json`` and renders
``results/NAME.md`` from that JSON alone (``--render NAME.json``), so a
table can be reworded without measuring again, and
``tests/test_results.py`` checks that each committed table is exactly its
script's rendering of the committed JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bpsim.trace import atomic_write_text  # noqa: E402


def render(json_path: str, markdown: Callable[[dict[str, Any]], str]) -> int:
    """Rewrite the ``.md`` beside ``json_path`` with ``markdown(saved)``; print it."""
    with open(json_path, encoding="utf-8") as f:
        saved = json.load(f)
    md = markdown(saved)
    atomic_write_text(Path(json_path).with_suffix(".md"), md)
    print(md)
    return 0


def gpu_suffix(o: dict[str, Any]) -> str:
    """`` (GPU name)`` for a saved run whose setup says it ran on CUDA, else nothing."""
    gpu = o["machine"].get("gpu")
    return f" ({gpu})" if gpu and o["setup"].get("device") == "cuda" else ""


def provenance_line(saved: dict[str, Any]) -> str:
    """One line saying what made a saved result (its ``provenance``), or that nothing recorded it."""
    p = saved.get("provenance")
    if not p:
        return ("Provenance: not recorded. This result predates the recording of the commit that made it, so it "
                "may not come from the current code (*stale*); `make results` regenerates it.")
    commit = (p.get("commit") or "unknown")[:10] + (" with uncommitted changes" if p.get("dirty") else "")
    fp = p.get("fingerprint") or {}
    return (f"Provenance: commit {commit}, {p['mode']} mode, {p['date']}; torch {p['torch']}, Python {p['python']}, "
            f"{p['processor']} ({p['cores']} cores). Command: `{p['command']}`. Fingerprints of {len(fp)} "
            "configuration(s) recorded (`tests/test_results.py` recomputes them).")
