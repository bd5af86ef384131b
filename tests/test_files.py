"""Outputs are written safely and inputs read with care (:mod:`bpsim.files`).

Four classes of cases, each through the Python API and the command line:

* **outputs** that are not regular files (a FIFO, a device node, a socket,
  a symbolic link to a file, a dangling link, a link loop), an over-long
  name, a missing folder, and an output that is one of the command's
  inputs: each refused with one line, the path left as it was;
* **full file systems** (a 64 KiB tmpfs, mounted in a fixture; the cases
  skip where mounting is not permitted): refused before any work when
  already full, and when the disk fills during the write one line naming
  the path, the old file intact and no temporary left;
* **inputs** that are not regular files (a FIFO, ``/dev/zero``, a folder,
  a link loop, a dangling link), too large, not UTF-8, JSON nested too
  deeply: one line, no hang, no ``RecursionError``;
* **input contents** validated field by field (a trace's ``msg`` and meta,
  a checkpoint holding code, notebooks of another shape).

Device nodes are made in the test's folder with ``mknod`` (root only), so
a broken check could never replace a real ``/dev/null``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import warnings
from pathlib import Path

import pytest

from bpsim import files
from bpsim.cli import main

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0
COST = "fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05"


# ------------------------------------------------------------------ helpers
def _one_line_exit_2(capsys, argv: list[str], match: str | None = None) -> str:
    """Run ``bpsim argv`` in this process; it must return 2 with one stderr line."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}; stderr: {err!r}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    if match is not None:
        assert match.lower() in err.lower(), f"{match!r} not in {err!r}"
    return err


def _one_line(e: pytest.ExceptionInfo, match: str) -> None:
    msg = str(e.value)
    assert msg and len(msg.splitlines()) == 1, msg
    assert match.lower() in msg.lower(), f"{match!r} not in {msg!r}"


def _trace(tmp: Path, name: str = "m.json") -> Path:
    from bpsim.sim import simulate

    p = tmp / name
    simulate("dgl", blocks=2, steps=2, costs=COST).trace.save(p)
    return p


def _fifo(tmp: Path) -> Path:
    p = tmp / "fifo"
    os.mkfifo(p)
    return p


def _unblock(fifo: Path) -> None:
    """Open ``fifo`` for writing in a daemon thread, so a reader that blocks on it
    (a broken check) gets end-of-file and fails instead of hanging the suite."""
    def writer():
        with open(fifo, "wb"):
            pass
    threading.Thread(target=writer, daemon=True).start()


def _device(tmp: Path) -> Path:
    """A character device (1, 3: null) in the test's folder, or skip."""
    p = tmp / "null"
    try:
        os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (OSError, AttributeError) as e:
        pytest.skip(f"cannot make a device node here: {e}")
    return p


def _socket(tmp: Path) -> Path:
    import socket

    p = tmp / "sock"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(p))
    except OSError as e:
        pytest.skip(f"cannot bind a unix socket here: {e}")
    finally:
        s.close()
    return p


def _special(kind: str, tmp: Path) -> Path:
    """A path of ``kind`` that is not a regular file."""
    if kind == "fifo":
        return _fifo(tmp)
    if kind == "device":
        return _device(tmp)
    if kind == "socket":
        return _socket(tmp)
    if kind == "link-to-file":
        (tmp / "real.json").write_text("{}")
        os.symlink(tmp / "real.json", tmp / "link")
    elif kind == "dangling-link":
        os.symlink(tmp / "nowhere.json", tmp / "link")
    elif kind == "link-loop":
        os.symlink(tmp / "link", tmp / "link")
    return tmp / "link"


def _state(p: Path) -> tuple:
    st = os.lstat(p)
    return (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns,
            os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)


@pytest.fixture
def tmpfs(tmp_path):
    """A fresh 64 KiB tmpfs (root only: skipped where mounting is not permitted)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to the last byte."""
    fd = os.open(folder / "fill", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (4096, 512, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- outputs
KINDS = ["fifo", "device", "socket", "link-to-file", "dangling-link", "link-loop"]


@pytest.mark.parametrize("kind", KINDS)
def test_an_output_that_is_not_a_regular_file_is_refused(kind, tmp_path):
    p = _special(kind, tmp_path)
    before = _state(p)
    with pytest.raises(ValueError) as e:
        files.write_text(p, "x", "--trace")
    _one_line(e, str(p))
    assert _state(p) == before
    assert sorted(os.listdir(tmp_path)) == sorted({p.name, "real.json"} & set(os.listdir(tmp_path)))


@pytest.mark.parametrize("kind", KINDS)
def test_simulate_trace_onto_a_special_file_is_refused(kind, tmp_path, capsys):
    p = _special(kind, tmp_path)
    before = _state(p)
    _one_line_exit_2(capsys, ["simulate", "dgl", "--steps", "2", "--trace", str(p)], str(p))
    assert _state(p) == before


@pytest.mark.skipif(not ROOT_USER, reason="the check that matters is the one for root")
def test_simulate_trace_dev_null_as_root(capsys):
    """Refused by the argument check, before anything is simulated or written."""
    _one_line_exit_2(capsys, ["simulate", "dgl", "--steps", "2", "--trace", "/dev/null"],
                     "character device")
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


@pytest.mark.parametrize("argv", [
    ["simulate", "dgl", "--trace", "{long}"],
    ["compare", "{m}", "{m}", "--html", "{long}"],
    ["run", "dgl", "--trace", "{long}"],
    ["train", "bp", "--checkpoint-dir", "{long}"],
    ["course", "student", "--out", "{long}"],
], ids=["simulate", "compare", "run", "train", "course"])
def test_an_over_long_output_name_is_one_line(argv, tmp_path, capsys):
    m = _trace(tmp_path)
    long = str(tmp_path / ("x" * 300 + ".json"))
    argv = [a.replace("{long}", long).replace("{m}", str(m)) for a in argv]
    _one_line_exit_2(capsys, argv, "shorter")
    assert sorted(os.listdir(tmp_path)) == ["m.json"]


def test_an_over_long_path_is_one_line(tmp_path):
    with pytest.raises(ValueError) as e:
        files.check_writable("/".join(["d" * 200] * 30), "--trace")
    _one_line(e, "shorter")


@pytest.mark.parametrize("argv", [
    ["compare", "{m}", "{s}", "--html", "{m}"],
    ["compare", "{m}", "{s}", "--html", "{s}"],
    ["simulate", "--replay", "{m}", "--trace", "{m}"],
    ["simulate", "dgl", "--calibrate", "{m}", "--trace", "{m}"],
    ["simulate", "dgl", "--calibrate", "{m}", "--trace", "{link}"],
], ids=["compare-html-measured", "compare-html-simulated", "replay-trace", "calibrate-trace",
        "calibrate-trace-by-another-name"])
def test_an_output_that_is_an_input_is_refused(argv, tmp_path, capsys):
    m, s = _trace(tmp_path, "m.json"), _trace(tmp_path, "s.json")
    os.link(m, tmp_path / "hard.json")
    argv = [a.replace("{m}", str(m)).replace("{s}", str(s))
            .replace("{link}", str(tmp_path / "hard.json")) for a in argv]
    before = {p: _state(p) for p in tmp_path.iterdir()}
    _one_line_exit_2(capsys, argv, "input")
    assert {p: _state(p) for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("argv", [
    ["simulate", "dgl", "--trace", "{d}/t.json"],
    ["compare", "{m}", "{m}", "--html", "{d}/r.html"],
    ["run", "dgl", "--trace", "{d}/t.json"],
], ids=["simulate", "compare", "run"])
def test_a_file_in_a_missing_folder_is_refused(argv, tmp_path, capsys):
    m = _trace(tmp_path)
    argv = [a.replace("{d}", str(tmp_path / "no" / "such")).replace("{m}", str(m)) for a in argv]
    _one_line_exit_2(capsys, argv, "does not exist")
    assert not (tmp_path / "no").exists()


def test_a_symlinked_folder_output_is_written_into(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert files.check_writable(tmp_path / "link", "--out", folder=True) == tmp_path / "link"


def test_writing_replaces_a_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "t.json"
    p.write_text("old")
    files.write_text(p, "new")
    assert p.read_text() == "new" and os.listdir(tmp_path) == ["t.json"]
    with pytest.raises(RuntimeError):
        with files.open_output(p) as fh:
            fh.write("half")
            raise RuntimeError("the writer failed")
    assert p.read_text() == "new" and os.listdir(tmp_path) == ["t.json"]



def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    # a process that has ended (reaped) stands for a writer killed with SIGKILL mid-write
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f".bpsim-{dead.pid}-abc.tmp"
    probe = tmp_path / f".bpsim-probe-{dead.pid}-abc.tmp"
    mine = tmp_path / f".bpsim-{os.getpid()}-live.tmp"    # a live writer's is kept
    for f in (left, probe, mine):
        f.write_text("half")
    files.write_text(tmp_path / "t.json", "new")
    assert sorted(os.listdir(tmp_path)) == sorted(["t.json", mine.name])

# ------------------------------------------------------- full file systems
def test_a_full_file_system_is_refused_before_any_work(tmpfs, capsys):
    _fill(tmpfs)
    with pytest.raises(ValueError) as e:
        files.check_writable(tmpfs / "t.json", "--trace")
    _one_line(e, "space")
    for argv in (["simulate", "dgl", "--steps", "2", "--trace", f"{tmpfs}/t.json"],
                 ["run", "dgl", "--workers", "2", "--steps", "20", "--trace", f"{tmpfs}/t.json"],
                 ["train", "bp", "--epochs", "1", "--checkpoint-dir", f"{tmpfs}/ck"],
                 ["course", "student", "--out", f"{tmpfs}/student"]):
        _one_line_exit_2(capsys, argv, str(tmpfs))
    assert os.listdir(tmpfs) == ["fill"]


def test_a_disk_that_fills_while_writing_keeps_the_old_file(tmpfs):
    p = tmpfs / "t.json"
    p.write_text("old")
    with pytest.raises(ValueError) as e:
        files.write_text(p, "x" * (1 << 20), "--trace")
    _one_line(e, str(p))
    assert "space" in str(e.value)
    assert p.read_text() == "old" and os.listdir(tmpfs) == ["t.json"]


def test_a_trace_that_does_not_fit_is_one_line(tmpfs, capsys):
    p = tmpfs / "t.json"
    p.write_text("old")
    _one_line_exit_2(capsys, ["simulate", "dgl", "--blocks", "4", "--steps", "200",
                              "--trace", str(p)], "space")
    assert p.read_text() == "old" and os.listdir(tmpfs) == ["t.json"]


def test_a_run_whose_trace_does_not_fit_keeps_its_summary(tmpfs, capsys):
    p = tmpfs / "t.json"
    p.write_text("old")
    code = main(["run", "dgl", "--workers", "2", "--steps", "30", "--threads", "1",
                 "--trace", str(p), "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    summary = json.loads(out)           # the run's numbers survive the lost trace
    assert summary["steps"] == 30 and summary["trace"] is None and "space" in summary["trace_error"]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("bpsim run: error: --trace ") and str(p) in lines[-1]
    assert p.read_text() == "old" and os.listdir(tmpfs) == ["t.json"]


def test_a_checkpoint_that_does_not_fit_is_one_line(tmpfs):
    import torch
    from torch.utils.data import TensorDataset

    from bpsim import nets
    from bpsim.algorithms.backprop import BackpropTrainer

    data = TensorDataset(torch.zeros(8, 64), torch.zeros(8, dtype=torch.long))
    trainer = BackpropTrainer(nets.mlp([64, 256, 10], blocks=2), checkpoint_dir=tmpfs / "ck",
                              progress=False)
    with pytest.raises(ValueError) as e:
        trainer.fit(data, 1)
    _one_line(e, "last.pt")
    assert "space" in str(e.value) and os.listdir(tmpfs / "ck") == []


# ------------------------------------------------------------------ inputs
@pytest.mark.parametrize("kind", ["fifo", "device", "socket", "dangling-link", "link-loop",
                                  "folder"])
def test_an_input_that_is_not_a_regular_file_is_refused(kind, tmp_path):
    if kind == "folder":
        p = tmp_path / "folder"
        p.mkdir()
    else:
        p = _special(kind, tmp_path)
    if kind == "fifo":
        _unblock(p)
    with pytest.raises(ValueError) as e:
        files.read_bytes(p, "trace file", limit=1024)
    _one_line(e, str(p))


@pytest.mark.parametrize("argv", [
    ["compare", "{x}", "{m}"],
    ["compare", "{m}", "{x}"],
    ["simulate", "dgl", "--calibrate", "{x}"],
    ["simulate", "--replay", "{x}"],
], ids=["compare-measured", "compare-simulated", "calibrate", "replay"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "link-loop"])
def test_commands_refuse_inputs_that_never_end(kind, argv, tmp_path, capsys):
    m = _trace(tmp_path)
    x = Path("/dev/zero") if kind == "dev-zero" else _special(kind, tmp_path)
    if kind == "fifo":
        _unblock(x)
    argv = [a.replace("{x}", str(x)).replace("{m}", str(m)) for a in argv]
    _one_line_exit_2(capsys, argv, str(x))


def test_a_symlink_to_an_input_file_is_read(tmp_path):
    m = _trace(tmp_path)
    os.symlink(m, tmp_path / "link.json")
    from bpsim.trace import Trace

    assert Trace.load(tmp_path / "link.json") == Trace.load(m)


def test_an_input_over_the_limit_is_refused(tmp_path):
    p = tmp_path / "big.json"
    p.write_bytes(b" " * 2048)
    with pytest.raises(ValueError) as e:
        files.read_bytes(p, "trace file", limit=1024)
    _one_line(e, "limit")
    assert files.read_bytes(p, limit=2048) == b" " * 2048


def test_a_missing_input_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        files.read_json(tmp_path / "missing.json", "trace file", hint="write one first")
    _one_line(e, "write one first")


@pytest.mark.parametrize("content,match", [
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
    (bytes(range(256)), "not a text file"),
    (b"{", "not JSON"),
], ids=["deep-list", "deep-object", "binary", "truncated"])
def test_json_that_cannot_be_read_is_one_line(content, match, tmp_path, capsys):
    p = tmp_path / "t.json"
    p.write_bytes(content)
    with pytest.raises(ValueError) as e:
        files.read_json(p, "trace file")
    _one_line(e, match)
    _one_line_exit_2(capsys, ["compare", str(p), str(p)], match)


# ---------------------------------------------------------- input contents
def _edit(src: Path, dst: Path, change) -> Path:
    obj = json.loads(src.read_text())
    change(obj)
    dst.write_text(json.dumps(obj))
    return dst


def _set_msg(value):
    def change(obj):
        ev = next(e for e in obj["traceEvents"] if e.get("ph") == "X" and "msg" in e["args"])
        ev["args"]["msg"] = value
    return change


def _set_meta(key, value):
    def change(obj):
        obj["otherData"]["bpsim_meta"][key] = value
    return change


@pytest.mark.parametrize("change,match", [
    (_set_msg({"a": 1}), "msg"),
    (_set_msg([1, 2]), "msg"),
    (_set_msg(True), "msg"),
    (_set_meta("steps", "abc"), "steps"),
    (_set_meta("steps", -5), "steps"),
    (_set_meta("steps", 1e9), "spans"),
    (_set_meta("blocks", 0), "blocks"),
    (_set_meta("blocks", [2]), "blocks"),
    (_set_meta("slowdown", {"1": "fast"}), "slowdown"),
    (_set_meta("slowdown", [1]), "slowdown"),
    (_set_meta("options", "x"), "options"),
    (_set_meta("placement", {"a": 1}), "placement"),
    (_set_meta("algo", 3), "algo"),
], ids=["msg-object", "msg-list", "msg-bool", "steps-word", "steps-negative", "steps-1e9",
        "blocks-0", "blocks-list", "slowdown-word", "slowdown-list", "options-string",
        "placement-object", "algo-number"])
def test_a_replayed_trace_is_validated_field_by_field(change, match, tmp_path, capsys):
    bad = _edit(_trace(tmp_path), tmp_path / "bad.json", change)
    _one_line_exit_2(capsys, ["simulate", "--replay", str(bad)], match)


def test_a_checkpoint_holding_code_is_refused_in_one_line_without_warnings(tmp_path, capfd):
    import torch
    from torch.utils.data import TensorDataset

    from bpsim import nets
    from bpsim.algorithms.backprop import BackpropTrainer

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "ck").mkdir()
    torch.save({"net": Evil()}, tmp_path / "ck" / "last.pt")
    data = TensorDataset(torch.zeros(8, 64), torch.zeros(8, dtype=torch.long))
    trainer = BackpropTrainer(nets.mlp([64, 16, 10], blocks=2), checkpoint_dir=tmp_path / "ck",
                              progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError) as e:
            trainer.fit(data, 1, resume=True)
    _one_line(e, "could run code")
    out, err = capfd.readouterr()
    assert "pwned" not in out and "Warning" not in err


@pytest.mark.parametrize("kind", ["fifo", "link-loop", "device"])
def test_a_checkpoint_that_is_not_a_regular_file_is_refused(kind, tmp_path):
    import torch
    from torch.utils.data import TensorDataset

    from bpsim import nets
    from bpsim.algorithms.backprop import BackpropTrainer

    ck = tmp_path / "ck"
    ck.mkdir()
    p = _special(kind, ck)
    p.rename(ck / "last.pt") if kind != "link-loop" else (p.unlink(),
                                                          os.symlink(ck / "last.pt",
                                                                     ck / "last.pt"))
    before = _state(ck / "last.pt")
    data = TensorDataset(torch.zeros(8, 64), torch.zeros(8, dtype=torch.long))
    trainer = BackpropTrainer(nets.mlp([64, 16, 10], blocks=2), checkpoint_dir=ck,
                              progress=False)
    for resume in (False, True):
        with pytest.raises(ValueError) as e:
            trainer.fit(data, 1, resume=resume)
        _one_line(e, "last.pt")
    assert _state(ck / "last.pt") == before


def test_course_check_out_that_is_a_file_says_what_to_do(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    _one_line_exit_2(capsys, ["course", "check", "--out", str(tmp_path / "f")], "folder")


def test_course_check_reports_a_notebook_of_another_shape(tmp_path):
    from bpsim.course import build

    src = build.lessons()[0]
    nb = tmp_path / (src.stem + ".ipynb")
    for content in ('{"a": 1}', "[1, 2]", "{"):
        nb.write_text(content)
        problems = build.check(out_dir=tmp_path)
        mine = [p for p in problems if nb.name in p]
        assert len(mine) == 1 and "not a valid notebook" in mine[0], problems
    nb.unlink()
    os.mkfifo(nb)
    _unblock(nb)
    assert any("FIFO" in p for p in build.check(out_dir=tmp_path))


def test_an_empty_xdg_cache_home_is_not_the_working_directory(tmp_path, monkeypatch):
    from bpsim import data

    monkeypatch.chdir(tmp_path)
    for value in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert data._cache_dir().is_absolute()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert data._cache_dir() == tmp_path / "c" / "bpsim"


def test_course_build_into_a_new_folder_runs_there(tmp_path):
    """The kernels start in ``--out``, so the folder is made before they do."""
    from bpsim.course import build

    (tmp_path / "lessons").mkdir()
    (tmp_path / "lessons" / "00-tiny.py").write_text("# %%\nimport os\nprint(os.getcwd())\n")
    out = tmp_path / "new" / "notebooks"
    build.build(lessons_dir=tmp_path / "lessons", out_dir=out, timeout=120, log=lambda s: None)
    nb = json.loads((out / "00-tiny.ipynb").read_text())
    assert os.path.samefile("".join(nb["cells"][0]["outputs"][0]["text"]).strip(), out)
    assert os.listdir(out) == ["00-tiny.ipynb"]
