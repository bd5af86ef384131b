"""The claims ledger: every verdict follows from the committed numbers by its
rule, a claim read from a result without provenance is shown stale, the
README shows the current ledger, and editing a committed number so that it
contradicts a verdict changes that verdict (and makes the README stale)."""

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
    assert row.judged == row.claim.judge(row.numbers)
    assert row.claim.benchmark.split()[0] in row.sources, f"{cid}: reads {row.sources}, not its benchmark"
    for name in row.sources:
        saved = json.loads((RESULTS / f"{name}.json").read_text())
        assert (name in row.stale) == (not (saved.get("provenance") or {}).get("fingerprint")), (cid, name)
    assert row.verdict == (claims.STALE if row.stale else row.judged)


def test_readme_ledger_is_current():
    assert claims.readme_problem() is None


def _p(mean: float, noise: float, seeds: int = 3) -> dict:
    return {"mean": mean, "noise": noise, "se": noise / 4.3, "seeds": seeds}


def test_paired_differences():
    p = claims.paired({0: 90.0, 1: 91.0, 2: 92.0}, {0: 89.0, 1: 89.0, 2: 89.0})
    assert p["mean"] == 2.0 and p["seeds"] == 3
    assert p["se"] == round(1 / 3 ** 0.5, 2) and p["noise"] == round(4.303 / 3 ** 0.5, 2)
    one = claims.paired({0: 90.0}, {0: 89.0}, fallback=0.5)
    assert one["noise"] == 0.5 and one["seeds"] == 1
    with pytest.raises(KeyError):
        claims.paired({0: 1.0}, {1: 1.0})


def test_judges_by_hand():
    """Each rule on numbers written out by hand, at both sides of its threshold."""
    c = {x.id: x for x in claims.CLAIMS}
    # C1: the rise from N_h = 1, not from the untrained-block-1 N_h = 0, must clear the noise
    c1 = {"rise_0_4": _p(6.0, 0.3), "falls": False, "seeds": 3}
    assert c["C1"].judge({**c1, "rise_1_4": _p(0.5, 0.3)}) == claims.REPRODUCED
    assert c["C1"].judge({**c1, "rise_1_4": _p(0.5, 0.3), "seeds": 1}) == claims.PARTLY
    assert c["C1"].judge({**c1, "rise_1_4": _p(0.26, 0.28)}) == claims.PARTLY
    assert c["C1"].judge({**c1, "rise_1_4": _p(0.1, 0.3), "rise_0_4": _p(0.1, 0.3)}) == claims.NOT_REPRODUCED
    # C2: on MNIST, or with the step moving with λ, at most partly
    rise = {"rise": {2: _p(1.0, 0.3), 4: _p(1.0, 0.3)}, "seeds": 3}
    assert c["C2"].judge({**rise, "fixed_step": True, "data": "cifar10"}) == claims.REPRODUCED
    assert c["C2"].judge({**rise, "fixed_step": False, "data": "cifar10"}) == claims.PARTLY
    assert c["C2"].judge({**rise, "fixed_step": True, "data": "mnist"}) == claims.PARTLY
    flat = {"rise": {2: _p(0.1, 0.3), 4: _p(-0.1, 0.3)}, "seeds": 3, "fixed_step": True, "data": "cifar10"}
    assert c["C2"].judge(flat) == claims.NOT_REPRODUCED
    assert c["C3"].judge({"gap": _p(0.4, 0.5), "seeds": 3}) == claims.REPRODUCED
    assert c["C3"].judge({"gap": _p(0.4, 0.5), "seeds": 1}) == claims.PARTLY
    assert c["C3"].judge({"gap": _p(0.8, 0.5), "seeds": 3}) == claims.PARTLY
    assert c["C3"].judge({"gap": _p(3.0, 0.5), "seeds": 3}) == claims.NOT_REPRODUCED
    assert c["C4"].judge({"max_gap": 1e-9}) == claims.REPRODUCED
    assert c["C4"].judge({"max_gap": 0.5}) == claims.NOT_REPRODUCED
    # C5: a fitted slope near 1 is not enough; every local slope must be
    assert c["C5"].judge({"local": [0.9, 1.0, 1.1], "err_min_beta": 1e-3}) == claims.REPRODUCED
    assert c["C5"].judge({"local": [0.27, 0.38, 1.53, 2.25], "err_min_beta": 4e-4}) == claims.PARTLY
    assert c["C5"].judge({"local": [1.0], "err_min_beta": 0.5}) == claims.NOT_REPRODUCED
    c15 = {"seeds": 3}
    assert c["C15"].judge({**c15, "vs_bp": {2: _p(2.0, 1.0), 4: _p(1.5, 1.0)}}) == claims.REPRODUCED
    assert c["C15"].judge({**c15, "vs_bp": {2: _p(0.5, 1.0), 4: _p(-0.5, 1.0)}}) == claims.PARTLY
    assert c["C15"].judge({**c15, "vs_bp": {2: _p(0.5, 1.0), 4: _p(-3.0, 1.0)}}) == claims.NOT_REPRODUCED
    assert c["C15"].judge({"seeds": 1, "vs_bp": {2: _p(2.0, 1.0), 4: _p(1.5, 1.0)}}) == claims.PARTLY
    assert c["C11"].judge({"loss": _p(-0.3, 0.9), "seeds": 3}) == claims.REPRODUCED
    assert c["C11"].judge({"loss": _p(-0.3, 0.9), "seeds": 1}) == claims.PARTLY
    assert c["C11"].judge({"loss": _p(-1.5, 2.0), "seeds": 5}) == claims.PARTLY
    assert c["C11"].judge({"loss": _p(-4.0, 1.0), "seeds": 3}) == claims.NOT_REPRODUCED
    # C12: the tiniest buffer is judged, not whichever M <= 5 passes
    tiny = {"seeds": 5}
    assert c["C12"].judge({**tiny, "vs_largest": {1: _p(-1.0, 1.0), 5: _p(-0.5, 1.0)}}) == claims.REPRODUCED
    assert c["C12"].judge({**tiny, "vs_largest": {1: _p(-7.9, 6.5), 5: _p(-0.8, 1.3)}}) == claims.PARTLY
    assert c["C12"].judge({**tiny, "vs_largest": {1: _p(-7.9, 6.5), 5: _p(-3.0, 1.3)}}) == claims.NOT_REPRODUCED
    c10 = {"seeds": 5, "gap_short": _p(-2.84, 1.5)}
    assert c["C10"].judge({**c10, "gap": _p(-0.5, 0.8)}) == claims.REPRODUCED
    assert c["C10"].judge({**c10, "gap": _p(-0.5, 2.0)}) == claims.PARTLY      # too noisy to call level
    assert c["C10"].judge({**c10, "gap": _p(-2.0, 0.8)}) == claims.NOT_REPRODUCED
    # C16: the paper's conditions (K >= 4 GPUs) and backprop at its best
    bp = {"dgl_over_bp": 2.17, "bp_k_over_1": 0.9}
    assert c["C16"].judge({**bp, "dgl_over_best_bp": 1.95, "workers": 2, "device": "cpu"}) == claims.PARTLY
    assert c["C16"].judge({**bp, "dgl_over_best_bp": 1.95, "workers": 4, "device": "cuda"}) == claims.REPRODUCED
    assert c["C16"].judge({**bp, "dgl_over_best_bp": 1.0, "workers": 4, "device": "cuda"}) == claims.NOT_REPRODUCED
    assert c["C17"].judge({"gap": _p(-0.3, 0.5), "seeds": 3}) == claims.REPRODUCED
    assert c["C17"].judge({"gap": _p(-0.69, 1.05), "seeds": 3}) == claims.PARTLY
    assert c["C17"].judge({"gap": _p(-3.0, 1.0), "seeds": 3}) == claims.NOT_REPRODUCED


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
    assert {r.claim.id: r.judged for r in claims.ledger(d)} == {k: r.judged for k, r in ROWS.items()}

    def bwbpf_wins(data):       # BWBPF far above backprop at every K, by a different margin per seed
        for row in data["results"]["bwbpf"]:
            if row["algo"] == "bwbpf":
                row["test_accuracy"] = 0.95 + 0.001 * row.get("seed", 0)

    def sgd_far_ahead(data):    # SGD 5 points above every BlockProp run
        for row in data["results"]:
            if row["algorithm"] == "bp":
                row["final_accuracy"] = 0.05 + max(r["final_accuracy"] for r in data["results"]
                                                   if r["algorithm"] == "blockprop")

    _edit(d / "accuracy_dgl.json", bwbpf_wins)
    _edit(d / "accuracy_blockprop.json", sgd_far_ahead)
    after = {r.claim.id: r.judged for r in claims.ledger(d)}
    assert ROWS["C15"].judged == claims.NOT_REPRODUCED and after["C15"] in (claims.REPRODUCED, claims.PARTLY)
    assert ROWS["C3"].judged != claims.NOT_REPRODUCED and after["C3"] == claims.NOT_REPRODUCED
    # the committed README no longer renders these results
    assert claims.readme_problem(results_dir=d) is not None


def test_results_without_provenance_are_stale(tmp_path):
    """Removing a result's provenance turns its claims stale, and the rule's verdict is kept beside it."""
    d = _copy(tmp_path)
    _edit(d / "theory.json", lambda data: data.pop("provenance", None))
    after = {r.claim.id: r for r in claims.ledger(d)}
    for cid in ("C4", "C5", "C13"):
        assert after[cid].verdict == claims.STALE and after[cid].stale == ("theory",)
        assert after[cid].judged == ROWS[cid].judged
    assert "stale" in claims.markdown(list(after.values()))


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
