"""Writing result files: atomic writes, writability checks, JSON-safe values.

Every command that writes a file (a trace, an HTML report, a checkpoint
folder, student notebooks) calls :func:`check_writable` *before* its work
starts, so a bad output path costs one line of error and no lost run, and
writes through :func:`atomic_write_text`, so a reader never sees half a
file. Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_text", "check_writable", "json_safe", "jsonable"]


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: str | os.PathLike[str], flag: str = "output", *,
                   folder: bool = False) -> Path:
    """Check that ``path`` can be written, without writing anything.

    Parameters
    ----------
    path : str or path-like
        A file to be (over)written, or with ``folder=True`` a folder to be
        created or written into. Missing parent folders are fine (writers
        create them) as long as the closest existing ancestor is a folder
        this process may write in.
    flag : str
        How the user gave the path (``"--trace"``, ``"checkpoint_dir"``),
        named in the error.
    folder : bool
        True when ``path`` itself is a folder (``--checkpoint-dir``,
        ``course student --out``).

    Returns
    -------
    pathlib.Path
        ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    ValueError
        When ``path`` is empty, is a folder where a file is wanted (or a
        file where a folder is wanted), sits under a file, or lies in a
        place this process may not write.
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise ValueError(f"{flag} is empty; give a file name such as out.json")
    p = Path(text)
    if p.exists():
        if folder and not p.is_dir():
            raise ValueError(f"{flag} {text} is a file, not a folder; give a folder name")
        if not folder and p.is_dir():
            raise ValueError(f"{flag} {text} is a folder; give a file name inside it, "
                             f"such as {p / 'out.json'}")
        if not os.access(p, os.W_OK | (os.X_OK if folder else 0)):
            raise ValueError(f"{flag} {text} is read-only; choose a path you may write")
        # a file is replaced through a temporary file beside it
        _probe(p if folder else p.absolute().parent, flag, text)
        return p
    base = _nearest_existing(p.absolute().parent)
    if not base.is_dir():
        raise ValueError(f"{flag} {text} cannot be created: {base} is a file, not a folder")
    _probe(base, flag, text)
    return p


def _probe(folder: Path, flag: str, text: str) -> None:
    """Create and remove an empty file in ``folder``: the permission bits do not
    tell for a privileged user or a read-only file system."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {text} cannot be written: {folder} is read-only; choose a "
                         "path you may write")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bpsim-probe-", dir=folder)
    except OSError as e:
        raise ValueError(f"{flag} {text} cannot be written: {folder}: "
                         f"{e.strerror or e}; choose a path you may write") from None
    os.close(fd)
    os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``.

    A path that cannot be written raises ``ValueError`` (:func:`check_writable`)
    before anything is created.
    """
    path = os.fspath(check_writable(path, "output file"))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)          # mkstemp makes 0600 files; results are shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def json_safe(x: Any) -> Any:
    """``x`` with NaN/inf floats replaced by ``None`` and dict keys made strings,
    so ``json.dumps(..., allow_nan=False)`` writes standard JSON (results, summaries)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def jsonable(x: Any) -> Any:
    """Like :func:`json_safe`, but keeps infinities as ``"inf"``/``"-inf"`` and
    turns any other object into its ``str`` (run metadata of any kind)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)
