"""The course as a whole: every lesson has the fixed shape, every check is used,
the build pipeline's hygiene gate and student versions work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bpsim.course import build, checks

ROOT = Path(__file__).resolve().parent.parent
LESSONS = build.lessons()
EXPECTED = ["00-start-here", "01-lagrangian", "02-lemma-b1", "03-blockprop", "04-dgl", "05-bwbpf",
            "06-locking-timelines", "07-async-replay", "08-measured-vs-simulated"]


def test_nine_lessons_in_order():
    assert [p.stem for p in LESSONS] == EXPECTED


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_has_the_fixed_shape(path: Path):
    text = path.read_text()
    assert re.search(r"\*\*Time:\*\*", text), "time estimate"
    assert "By the end of this lesson" in text, "learning objectives"
    assert "Predict" in text, "a predict-before-you-run prompt"
    assert "widgets.explorer(" in text, "an explorer"
    assert re.search(r"checks\.\w+\(", text), "an exercise check"
    assert "# BEGIN SOLUTION" in text and "# END SOLUTION" in text, "an exercise with a marked solution"
    assert "# NBVAL_CHECK_OUTPUT" in text, "a seeded numeric output for nbval"
    assert "## Summary" in text, "a summary"
    i = EXPECTED.index(path.stem)
    if i + 1 < len(EXPECTED):
        assert f"{EXPECTED[i + 1]}.ipynb" in text, "a link to the next lesson"
    if i > 0:
        assert f"{EXPECTED[i - 1]}.ipynb" in text, "a link to the previous lesson"
    assert (ROOT / "notebooks" / f"{path.stem}.ipynb").exists(), "run `make notebooks`"


# What a live training run produces (a History's accuracies, a fresh fit, head accuracies): its digits depend on the
# processor's floating-point kernels, so nbval must not compare it as text.
LIVE_TRAINING = re.compile(r"\.final_accuracy\b|\.test_accuracy\b|\.fit\(|head_accuracies\(")


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_checked_outputs_do_not_come_from_live_training(path: Path):
    checked = [c.source for c in build.read_lesson(path).cells
               if c.cell_type == "code" and "# NBVAL_CHECK_OUTPUT" in c.source]
    live = [src.splitlines()[1] for src in checked if LIVE_TRAINING.search(src)]
    assert not live, f"{path.name}: cells that compare live training output as text (print it, assert a range): {live}"


def test_make_test_runs_the_notebooks_with_other_kernels():
    mk = (ROOT / "Makefile").read_text()
    recipe = mk.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "test-notebooks-kernels" in recipe
    target = mk.split("\ntest-notebooks-kernels:", 1)[1].split("\n\n", 1)[0]
    assert "$(OTHER_KERNELS)" in target and "notebooks" in target
    for var in ("ATEN_CPU_CAPABILITY=default", "MKL_ENABLE_INSTRUCTIONS=SSE4_2", "ONEDNN_MAX_CPU_ISA=SSE41"):
        assert var in mk


def test_every_check_is_used_by_a_lesson():
    used = "\n".join(p.read_text() for p in LESSONS)
    unused = [name for name in checks.registry() if f"checks.{name}(" not in used]
    assert not unused, f"checks no lesson calls: {unused}"


def test_notebooks_match_their_lessons():
    assert build.check() == []


def test_student_versions_hide_solutions(tmp_path):
    import nbformat

    written = build.student(out_dir=tmp_path)
    assert len(written) == len(LESSONS)
    for src, p in zip(LESSONS, written):
        nb = nbformat.read(p, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "SOLUTION" not in code and "NBVAL_CHECK_OUTPUT" not in code
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
        # every solution body is gone
        for body in re.findall(r"# BEGIN SOLUTION\n(.*?)\n[ \t]*# END SOLUTION", src.read_text(), re.S):
            assert body.strip() not in code, f"{p.name} keeps a solution"
        # each exercise gets a stub that leaves its answer "not attempted", never an exception
        assert code.count("# YOUR CODE HERE") == src.read_text().count("# BEGIN SOLUTION") > 0
        assert "NotImplementedError" not in code, f"{src.name}: give the END SOLUTION line a stub"


def test_student_stub_replaces_the_solution():
    src = "x = 1\n    # BEGIN SOLUTION\n    y = 2\n    # END SOLUTION: y = ...\n# NBVAL_CHECK_OUTPUT\ncheck(y)\n"
    assert build.student_source(src) == "x = 1\n    # YOUR CODE HERE\n    y = ...\ncheck(y)\n"
    bare = "# BEGIN SOLUTION\ny = 2\n# END SOLUTION\n"
    assert build.student_source(bare) == "# YOUR CODE HERE\nraise NotImplementedError\n"


def test_check_fails_on_a_stale_notebook(tmp_path):
    import shutil

    lessons_dir, out_dir = tmp_path / "lessons", tmp_path / "notebooks"
    lessons_dir.mkdir()
    shutil.copytree(ROOT / "notebooks", out_dir, ignore=shutil.ignore_patterns("*.cfg"))
    for p in LESSONS:
        shutil.copy(p, lessons_dir / p.name)
    assert build.check(lessons_dir, out_dir) == []
    first = lessons_dir / LESSONS[0].name
    first.write_text(first.read_text() + "\n# %%\nprint('a new cell')\n")
    problems = build.check(lessons_dir, out_dir)
    assert problems and LESSONS[0].stem in problems[0]
