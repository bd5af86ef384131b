"""Every output written safely, every input read with care.

Outputs (a trace, an HTML report, a checkpoint, notebooks, results):

* :func:`check_writable` runs *before* a command's work starts, so a bad
  output path costs one line of error and no lost run. It refuses an empty
  path, a name longer than the file system allows, a path that exists and
  is not a regular file (a folder, a FIFO, a device node, a socket, a
  symbolic link -- dangling, looping or not), a path that is one of the
  command's inputs, a file in a missing folder (unless the writer may create
  it), a place this process may not write, and a file system with no space
  left.
* :func:`open_output` (and :func:`write_text`, :func:`write_bytes` on top
  of it) writes into a temporary file beside the target, flushes it to disk
  and renames it over the target, so a reader never sees half a file. Any
  ``OSError`` (a full or failing disk) becomes one ``ValueError`` line
  naming the path; the old file stays as it was and no temporary is left.

Inputs (traces, checkpoints, notebooks):

* :func:`open_input` opens only a regular file (never a FIFO, which would
  block, or a device such as ``/dev/zero``, which never ends), no larger
  than a stated limit; :func:`read_bytes`, :func:`read_text` and
  :func:`read_json` read it whole, and :func:`read_json` turns JSON nested
  too deeply for the parser into one line instead of a ``RecursionError``.
  Callers then validate the parsed value field by field before any work.

Every error is a ``ValueError`` (``FileNotFoundError`` for a missing
input) whose message is one line that names the path and says what to do.
Nothing here imports torch.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

__all__ = ["MAX_INPUT_BYTES", "check_writable", "check_name", "same_file", "open_output",
           "write_text", "write_bytes", "atomic_write_text", "open_input", "read_bytes",
           "read_text", "read_json", "json_safe", "jsonable", "process_gone",
           "remove_stale_temporaries"]

#: the largest input file read by default (1 GiB: some 4 million trace spans)
MAX_INPUT_BYTES = 1 << 30

PathLike = str | os.PathLike[str]

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def _kind(mode: int) -> str:
    """What a file of mode ``mode`` is, in words (``"a regular file"`` otherwise)."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file"


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def check_name(path: PathLike, flag: str = "input") -> str:
    """``path`` as a string, refused (``ValueError``) when empty or too long.

    A name (one part of the path) longer than the file system allows, or a
    whole path longer than 4096 bytes, is refused with one line.
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise ValueError(f"{flag} is empty; give a file name such as out.json")
    if "\0" in text:
        raise ValueError(f"{flag} {text!r} contains a NUL character; give a plain file name")
    limit = _name_max(_nearest_existing(Path(text).absolute().parent))
    for part in Path(text).parts:
        if len(os.fsencode(part)) > limit:
            raise ValueError(f"{flag} {text}: a name in it is {len(os.fsencode(part))} bytes "
                             f"long, over the file system's limit of {limit}; give a shorter "
                             "name")
    if len(os.fsencode(text)) > 4096:
        raise ValueError(f"{flag} {text} is {len(os.fsencode(text))} bytes long, over the limit "
                         "of 4096; give a shorter path")
    return text


def _symlink_refusal(flag: str, text: str) -> str:
    try:
        os.stat(text)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{flag} {text} is a symbolic link loop; remove it or give another path"
        return (f"{flag} {text} is a dangling symbolic link (to {os.readlink(text)}); remove it "
                "or give another path")
    return (f"{flag} {text} is a symbolic link (to {os.readlink(text)}); give the path of the "
            "file itself, or another name")


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file (or, for a file not yet
    written, the same resolved path)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        try:
            return os.path.realpath(a) == os.path.realpath(b)
        except (OSError, ValueError):
            return False


def check_writable(path: PathLike, flag: str = "output", *, folder: bool = False,
                   inputs: Iterable[PathLike | None] = (), parents: bool = False) -> Path:
    """Check that ``path`` can be written, without leaving anything behind.

    Parameters
    ----------
    path : str or path-like
        A file to be (over)written, or with ``folder=True`` a folder to be
        created or written into.
    flag : str
        How the user gave the path (``"--trace"``, ``"--checkpoint-dir"``),
        named in the error.
    folder : bool
        True when ``path`` itself is a folder (``--checkpoint-dir``,
        ``course student --out``); missing parent folders are then created
        by the writer.
    inputs : iterable of path-like
        The files the command reads (``None`` entries are skipped); an
        output that is one of them is refused, so it cannot be overwritten.
    parents : bool
        True when the writer creates a file's missing parent folders (the
        Python API); False (the command line) refuses a file in a folder
        that does not exist.

    Returns
    -------
    pathlib.Path
        ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    ValueError
        With one line naming ``path`` and saying what to do, for each of the
        refusals in the module docstring.
    """
    text = check_name(path, flag)
    p = Path(text)
    for src in inputs:
        if src is not None and same_file(p, src):
            raise ValueError(f"{flag} {text} is also an input of this command ({os.fspath(src)}); "
                             "give the output another name so the input is not overwritten")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ValueError(f"{flag} {text} cannot be checked: {e.strerror or e}; choose a path "
                         "you may write") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        # a link is replaced by the rename, not written through: refused, except a
        # link to a folder for a folder output (written into, not replaced)
        if not (folder and os.path.isdir(p)):
            raise ValueError(_symlink_refusal(flag, text))
        st = os.stat(p)
    if st is not None:
        if folder and not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{flag} {text} is {_kind(st.st_mode).replace('a regular file', 'a file')}, "
                             "not a folder; give a folder name")
        if not folder and stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{flag} {text} is a folder; give a file name inside it, "
                             f"such as {p / 'out.json'}")
        if not folder and not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{flag} {text} is {_kind(st.st_mode)}, not a regular file; bpsim "
                             "writes regular files only: give a file name")
        if not os.access(p, os.W_OK | (os.X_OK if folder else 0)):
            raise ValueError(f"{flag} {text} is read-only; choose a path you may write")
        # a file is replaced through a temporary file beside it
        _probe(p if folder else p.absolute().parent, flag, text)
        return p
    parent = p.absolute().parent
    base = _nearest_existing(parent)
    if not base.is_dir():
        raise ValueError(f"{flag} {text} cannot be created: {base} is a file, not a folder")
    if base != parent and not folder and not parents:
        raise ValueError(f"{flag} {text} is in a folder that does not exist ({parent}); create "
                         "it first or give a path in an existing folder")
    _probe(base, flag, text)
    return p


def _probe(folder: Path, flag: str, text: str) -> None:
    """Create, write one byte to and remove a file in ``folder``: the permission
    bits do not tell for a privileged user or a read-only file system, and a
    full file system refuses the byte."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {text} cannot be written: {folder} is read-only; choose a "
                         "path you may write")
    try:
        fs = os.statvfs(folder)
    except (OSError, AttributeError):
        fs = None
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if fs is not None and fs.f_blocks and (fs.f_bfree if root else fs.f_bavail) == 0:
        raise ValueError(f"{flag} {text} cannot be written: no space left on the file system of "
                         f"{folder}; free some space or choose another place")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix("probe"), suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise ValueError(f"{flag} {text} cannot be written: {folder}: "
                         f"{e.strerror or e}; {_fix(e)}") from None
    finally:
        _remove(tmp)


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie not yet reaped counts as
    ended): asked about the maker of a temporary file or folder that a killed
    run left behind, and by a rank about its launcher."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def _temp_prefix(kind: str = "") -> str:
    """Prefix of this process's temporaries: ``.bpsim-[KIND-]PID-``, so the
    next writer into the folder can tell a killed run's leftovers."""
    return f".bpsim-{kind + '-' if kind else ''}{os.getpid()}-"


def remove_stale_temporaries(folder: PathLike) -> None:
    """Remove the temporaries in ``folder`` whose maker has ended (a run
    killed with SIGKILL while writing cannot remove its own)."""
    with suppress(OSError):
        for entry in os.scandir(folder):
            m = _TEMP_NAME.match(entry.name)
            if m and entry.is_file(follow_symlinks=False) and process_gone(int(m.group(1))):
                with suppress(OSError):
                    os.unlink(entry.path)


_TEMP_NAME = re.compile(r"^\.bpsim-(?:probe-)?(\d+)-.*\.tmp$")


def _remove(path: str | None) -> None:
    """Remove the temporary file ``path`` if there is one, whatever happens."""
    if path is not None:
        with suppress(OSError):
            os.unlink(path)


def _fix(e: OSError) -> str:
    """What to do about a failed write."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space or choose another place"
    return "choose a path you may write"


@contextmanager
def open_output(path: PathLike, flag: str = "output", *, binary: bool = False,
                inputs: Iterable[PathLike | None] = (), parents: bool = True) -> Iterator[IO[Any]]:
    """A file object whose contents replace ``path`` when the block ends without error.

    The contents go to a temporary file beside ``path``, are flushed to
    disk, and the temporary is renamed over ``path``. When the block raises,
    the temporary is removed and ``path`` is left as it was.

    Parameters
    ----------
    path : str or path-like
        The file to write; checked first with :func:`check_writable`.
    flag : str
        How the user gave the path, named in errors.
    binary : bool
        Binary (``bytes``) rather than UTF-8 text.
    inputs : iterable of path-like
        The command's inputs, which ``path`` must not be.
    parents : bool
        Create missing parent folders (True) or refuse them.

    Raises
    ------
    ValueError
        One line naming ``path`` for a refused path or for any ``OSError``
        while writing (a full or failing disk).
    """
    p = check_writable(path, flag, inputs=inputs, parents=parents)
    text = os.fspath(path)
    folder = p.absolute().parent
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(), suffix=".tmp", dir=folder)
        with (os.fdopen(fd, "wb") if binary else
              os.fdopen(fd, "w", encoding="utf-8", newline="")) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)          # mkstemp makes 0600 files; results are shared
        os.replace(tmp, p)
        tmp = None
    except OSError as e:
        raise ValueError(f"{flag} {text} could not be written ({e.strerror or e}); the old file, "
                         f"if any, is unchanged; {_fix(e)}") from None
    finally:
        _remove(tmp)


def write_text(path: PathLike, text: str, flag: str = "output", *,
               inputs: Iterable[PathLike | None] = (), parents: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`open_output`."""
    with open_output(path, flag, inputs=inputs, parents=parents) as fh:
        fh.write(text)


def write_bytes(path: PathLike, data: bytes | bytearray | memoryview, flag: str = "output", *,
                inputs: Iterable[PathLike | None] = (), parents: bool = True) -> None:
    """Write ``data`` to ``path`` through :func:`open_output`."""
    with open_output(path, flag, binary=True, inputs=inputs, parents=parents) as fh:
        fh.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`write_text`, flag ``"output file"``)."""
    write_text(path, text, "output file")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.4g} {unit}"
        n /= 1024
    return f"{n} bytes"


def open_input(path: PathLike, flag: str = "input", *, limit: int = MAX_INPUT_BYTES,
               hint: str = "") -> IO[bytes]:
    """A binary file object for ``path``, which must be a regular file of at
    most ``limit`` bytes (symbolic links to one are followed).

    Parameters
    ----------
    path : str or path-like
        The file to read.
    flag : str
        How the user gave the path, named in errors.
    limit : int
        The largest size accepted, in bytes.
    hint : str
        Appended to the message of a missing file (how to make one).

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        One line naming ``path`` when it is a folder, a FIFO, a device, a
        socket, a symbolic link loop or a dangling link, larger than
        ``limit``, or unreadable.
    """
    text = check_name(path, flag)
    try:
        st = os.stat(text)
    except FileNotFoundError:
        if os.path.islink(text):
            raise ValueError(_symlink_refusal(flag, text)) from None
        raise FileNotFoundError(f"{flag} {text} does not exist" + (f"; {hint}" if hint else "")) \
            from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{flag} {text} is a symbolic link loop; give the file itself") \
                from None
        raise ValueError(f"{flag} {text} cannot be read: {e.strerror or e}") from None
    _check_input_stat(st, flag, text, limit)
    try:
        # O_NONBLOCK: a FIFO put in its place since the stat must not block the open
        fd = os.open(text, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ValueError(f"{flag} {text} cannot be read: {e.strerror or e}") from None
    try:
        _check_input_stat(os.fstat(fd), flag, text, limit)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_input_stat(st: os.stat_result, flag: str, text: str, limit: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{flag} {text} is a folder, not a file; give a file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{flag} {text} is {_kind(st.st_mode)}, not a regular file; bpsim reads "
                         "regular files only: copy the data into a file and give that")
    if st.st_size > limit:
        raise ValueError(f"{flag} {text} is {_size(st.st_size)}, over the limit of "
                         f"{_size(limit)} for this input; give a smaller file")


def read_bytes(path: PathLike, flag: str = "input", *, limit: int = MAX_INPUT_BYTES,
               hint: str = "") -> bytes:
    """The contents of the regular file ``path`` (at most ``limit`` bytes; see
    :func:`open_input` for what is refused)."""
    with open_input(path, flag, limit=limit, hint=hint) as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as e:
            raise ValueError(f"{flag} {os.fspath(path)} cannot be read: {e.strerror or e}") \
                from None
    if len(data) > limit:            # it grew since it was checked
        raise ValueError(f"{flag} {os.fspath(path)} is over the limit of {_size(limit)} for this "
                         "input; give a smaller file")
    return data


def read_text(path: PathLike, flag: str = "input", *, limit: int = MAX_INPUT_BYTES,
              hint: str = "") -> str:
    """The UTF-8 text of ``path``; ``ValueError`` for binary data."""
    data = read_bytes(path, flag, limit=limit, hint=hint)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {os.fspath(path)} is not a text file (binary data?); expected "
                         "UTF-8 text") from None


def read_json(path: PathLike, flag: str = "input", *, limit: int = MAX_INPUT_BYTES,
              hint: str = "") -> Any:
    """The JSON value in ``path``; ``ValueError`` (one line) for binary data,
    text that is not JSON, or JSON nested too deeply to parse."""
    text = read_text(path, flag, limit=limit, hint=hint)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {os.fspath(path)} is not JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{flag} {os.fspath(path)} holds JSON nested too deeply to read; "
                         "give a file that bpsim wrote") from None


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
