"""Build lessons into executed notebooks, check them, and write student versions.

``lessons/NN-title.py`` (jupytext py:percent) is the single source of lesson
NN; ``notebooks/NN-title.ipynb`` is generated from it by executing every cell
top to bottom in a fresh kernel (nbdev / d2l style: one source, generated
artifacts). ``check`` is the hygiene gate: a notebook whose cell sources
differ from its lesson, or whose execution counts are not 1..n, was not
rebuilt from the current source.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from bpsim.files import open_output, read_text

__all__ = ["lessons", "build", "check", "student", "student_source", "read_lesson"]

#: the largest notebook ``check`` reads
MAX_NOTEBOOK_BYTES = 256 << 20
ROOT = Path(__file__).resolve().parent.parent.parent
_LESSON = re.compile(r"^(\d\d)-[a-z0-9-]+\.py$")
# A solution runs from "# BEGIN SOLUTION" to "# END SOLUTION"; the END line may give the student's stub after a
# colon ("# END SOLUTION: idle = ..."), which the student version runs in its place so that the exercise's check
# answers "not attempted" instead of raising.
_SOLUTION = re.compile(r"^([ \t]*)# BEGIN SOLUTION\n.*?^[ \t]*# END SOLUTION(?::[ \t]*([^\n]*))?[^\n]*\n?", re.S | re.M)
_CHECK_OUTPUT = re.compile(r"^# NBVAL_CHECK_OUTPUT[^\n]*\n?", re.M)


def lessons(lessons_dir: Path | None = None, only: list[str] | None = None) -> list[Path]:
    """Lesson sources in order; ``only`` keeps the ones whose number is listed."""
    d = Path(lessons_dir or ROOT / "lessons")
    found = sorted(p for p in d.glob("*.py") if _LESSON.match(p.name))
    if only:
        wanted = {o.zfill(2) for o in only}
        found = [p for p in found if p.name[:2] in wanted]
        missing = wanted - {p.name[:2] for p in found}
        if missing:
            raise ValueError(f"no lesson numbered {', '.join(sorted(missing))} in {d}")
    return found


def read_lesson(path: Path):
    """The lesson as an (unexecuted) nbformat notebook."""
    import jupytext

    nb = jupytext.read(path)
    nb.metadata.pop("jupytext", None)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def _write_atomic(nb, path: Path) -> None:
    """Write ``nb`` to ``path`` through a temporary file and a rename
    (:func:`bpsim.files.open_output`: one-line ``ValueError`` on a failed write)."""
    import nbformat

    with open_output(path, "notebook") as f:
        nbformat.write(nb, f)


def _read_notebook(path: Path):
    """The notebook at ``path`` (version 4), or a one-line ``ValueError`` when
    it is not a regular file of at most :data:`MAX_NOTEBOOK_BYTES` holding a
    notebook."""
    import nbformat

    text = read_text(path, "notebook", limit=MAX_NOTEBOOK_BYTES)
    try:
        nb = nbformat.reads(text, as_version=4)
        nbformat.validate(nb)
    except Exception as e:  # not JSON, JSON of another shape, an old or broken notebook
        why = " ".join(str(e).split())[:160] or type(e).__name__
        raise ValueError(f"{path.name} is not a valid notebook ({why})") from None
    return nb


def _strip_volatile(nb) -> None:
    """Drop per-run metadata so rebuilding an unchanged lesson changes nothing but outputs."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.pop("id", None)
    nb.metadata.pop("widgets", None)
    nb.nbformat_minor = max(nb.nbformat_minor, 5)
    import nbformat

    # give cells stable ids (derived from their position) so diffs stay small
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:03d}"
    nbformat.validate(nb)


def build(only: list[str] | None = None, lessons_dir: Path | None = None, out_dir: Path | None = None,
          timeout: int = 900, log=print) -> dict[str, float]:
    """Execute lessons into notebooks; return seconds per notebook."""
    from nbclient import NotebookClient

    out = Path(out_dir or ROOT / "notebooks")
    times: dict[str, float] = {}
    todo = lessons(lessons_dir, only)
    if todo:
        out.mkdir(parents=True, exist_ok=True)   # the kernels run in it
    env_static = os.environ.setdefault("BPSIM_STATIC", "1")  # explorers render their static fallback
    try:
        for src in todo:
            nb = read_lesson(src)
            t0 = time.perf_counter()
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": str(out)}})
            client.execute()
            _strip_volatile(nb)
            dest = out / (src.stem + ".ipynb")
            _write_atomic(nb, dest)
            times[dest.name] = time.perf_counter() - t0
            log(f"built {dest.relative_to(out.parent) if out.parent in dest.parents else dest} "
                f"in {times[dest.name]:.1f} s")
    finally:
        if env_static == "1" and os.environ.get("BPSIM_STATIC") == "1":
            os.environ.pop("BPSIM_STATIC", None)
    return times


def check(lessons_dir: Path | None = None, out_dir: Path | None = None) -> list[str]:
    """Problems found (empty when every notebook matches its lesson and ran in order).

    A notebook that cannot be read (not a regular file, too large, not a
    notebook) is a problem; ``ValueError`` when ``out_dir`` is not a folder.
    """
    out = Path(out_dir or ROOT / "notebooks")
    if out_dir is not None and not out.is_dir():
        raise ValueError(f"{out} is not a folder; give the folder that holds the built notebooks "
                         "(default notebooks/), or build them there first with `bpsim course "
                         f"build --out {out}`")
    problems: list[str] = []
    srcs = lessons(lessons_dir)
    if not srcs:
        problems.append("no lessons found in lessons/")
    names = {s.stem for s in srcs}
    for extra in sorted(p for p in out.glob("*.ipynb") if p.stem not in names):
        problems.append(f"{extra.name} has no lesson source in lessons/")
    for src in srcs:
        path = out / (src.stem + ".ipynb")
        if not path.exists():
            problems.append(f"{path.name} is missing: run `bpsim course build {src.name[:2]}`")
            continue
        try:
            nb = _read_notebook(path)
        except ValueError as e:
            problems.append(f"{' '.join(str(e).split())}: rebuild it with "
                            f"`bpsim course build {src.name[:2]}`")
            continue
        want = [(c.cell_type, c.source) for c in read_lesson(src).cells]
        got = [(c.cell_type, c.source) for c in nb.cells]
        if want != got:
            problems.append(f"{path.name} differs from {src.name}: rebuild it with `bpsim course build {src.name[:2]}`")
            continue
        counts = [c.get("execution_count") for c in nb.cells if c.cell_type == "code"]
        if counts != list(range(1, len(counts) + 1)):
            problems.append(f"{path.name}: execution counts {counts} are not 1..{len(counts)}; it was not run top to bottom")
    return problems


def _stub(m: re.Match) -> str:
    indent, stub = m.group(1), (m.group(2) or "").strip()
    return f"{indent}# YOUR CODE HERE\n{indent}{stub or 'raise NotImplementedError'}\n"


def student_source(source: str) -> str:
    """A code cell as students get it: each solution replaced by ``# YOUR CODE HERE`` and its stub
    (``raise NotImplementedError`` when the END line gives none), nbval output markers dropped
    (a student notebook has no stored outputs to compare with)."""
    return _CHECK_OUTPUT.sub("", _SOLUTION.sub(_stub, source))


def student(out_dir: Path | None = None, lessons_dir: Path | None = None) -> list[Path]:
    """Write student notebooks (unexecuted, no solutions) into ``out_dir`` (default ``student/``).

    Code between ``# BEGIN SOLUTION`` and ``# END SOLUTION: stub`` is replaced by the stub, which leaves
    the exercise's answer as ``...`` so that its check answers "not attempted"; the notebooks run top
    to bottom as they are.
    """
    out = Path(out_dir or ROOT / "student")
    written = []
    for src in lessons(lessons_dir):
        nb = read_lesson(src)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.source = student_source(cell.source)
        _strip_volatile(nb)
        dest = out / (src.stem + ".ipynb")
        _write_atomic(nb, dest)
        written.append(dest)
    return written
