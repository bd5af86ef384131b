"""The claims ledger: every verdict follows from the committed numbers by its
rule, the README shows the current ledger, and editing a committed number so
that it contradicts a verdict changes that verdict (and makes the README
stale)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bpsim.course import claims

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROWS = {r.claim.id: r for r in claims.ledger()}


def test_at_least_sixteen_claims_with_sources():
    assert len(claims.CLAIMS) >= 16
    assert len({c.id for c in claims.CLAIMS}) == len(claims.CLAIMS)
    for c in claims.CLAIMS:
        assert c.paper and c.paper_number and c.rule and c.benchmark
        assert list((ROOT / "lessons").glob(f"{c.lesson}-*.py")), f"{c.id}: no lesson {c.lesson}"


@pytest.mark.parametrize("cid", sorted(ROWS, key=lambda s: int(s[1:])))
def test_verdict_follows_from_its_numbers(cid):
    row = ROWS[cid]
    assert row.verdict in claims.VERDICTS
    if row.numbers is None:
        assert row.verdict == claims.NOT_TESTED
        return
    assert row.verdict == row.claim.judge(row.numbers)
    assert (RESULTS / f"{row.claim.benchmark.split()[0]}.json").exists(), f"{cid}: its results are not committed"


def test_readme_ledger_is_current():
    assert claims.readme_problem() is None


def test_judges_by_hand():
    """Each rule on numbers written out by hand, at both sides of its threshold."""
    c = {x.id: x for x in claims.CLAIMS}
    assert c["C3"].judge({"gap": 0.4}) == claims.REPRODUCED
    assert c["C3"].judge({"gap": 1.0}) == claims.PARTLY
    assert c["C3"].judge({"gap": 3.0}) == claims.NOT_REPRODUCED
    assert c["C4"].judge({"max_gap": 1e-9}) == claims.REPRODUCED
    assert c["C4"].judge({"max_gap": 0.5}) == claims.NOT_REPRODUCED
    bp = {"bp": 80.0, "noise": 1.0}
    assert c["C15"].judge({**bp, "bwbpf": {2: 82.0, 4: 81.5}}) == claims.REPRODUCED
    assert c["C15"].judge({**bp, "bwbpf": {2: 80.5, 4: 79.5}}) == claims.PARTLY
    assert c["C15"].judge({**bp, "bwbpf": {2: 80.5, 4: 77.0}}) == claims.NOT_REPRODUCED
    async_ = {"S1": 80.0, "S2": 75.0, "std": 0.3, "noise": 1.5}
    assert c["C11"].judge({**async_, "S1.2": 79.8, "seeds": 3}) == claims.REPRODUCED
    assert c["C11"].judge({**async_, "S1.2": 79.8, "seeds": 1}) == claims.PARTLY
    assert c["C11"].judge({**async_, "S1.2": 76.0, "seeds": 3}) == claims.NOT_REPRODUCED


def _copy(tmp_path: Path) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    for p in RESULTS.glob("*.json"):
        shutil.copy(p, d / p.name)
    return d


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_editing_a_committed_number_flips_the_verdict(tmp_path):
    d = _copy(tmp_path)
    assert {r.claim.id: r.verdict for r in claims.ledger(d)} == {k: r.verdict for k, r in ROWS.items()}

    def bwbpf_wins(data):       # BWBPF far above backprop at every K
        for row in data["results"]["bwbpf"]:
            if row["algo"] == "bwbpf":
                row["test_accuracy"] = 0.95

    def sgd_far_ahead(data):    # SGD 5 points above the best BlockProp run
        data["summary"]["sgd_accuracy"] = data["summary"]["best_blockprop_accuracy"] + 0.05

    _edit(d / "accuracy_dgl.json", bwbpf_wins)
    _edit(d / "accuracy_blockprop.json", sgd_far_ahead)
    after = {r.claim.id: r.verdict for r in claims.ledger(d)}
    assert ROWS["C15"].verdict == claims.NOT_REPRODUCED and after["C15"] == claims.REPRODUCED
    assert ROWS["C3"].verdict == claims.REPRODUCED and after["C3"] == claims.NOT_REPRODUCED
    # the committed README no longer renders these results
    assert claims.readme_problem(results_dir=d) is not None


def test_missing_results_are_not_tested(tmp_path):
    d = _copy(tmp_path)
    (d / "theory.json").unlink()
    after = {r.claim.id: r.verdict for r in claims.ledger(d)}
    assert after["C4"] == after["C5"] == after["C13"] == claims.NOT_TESTED


def test_readme_without_markers_says_what_to_do(tmp_path):
    p = tmp_path / "README.md"
    p.write_text("# no ledger here\n")
    with pytest.raises(ValueError, match="claims section"):
        claims.readme_problem(p)
