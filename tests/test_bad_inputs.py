"""Every bad input is one line on stderr and exit code 2, and writes nothing.

A table of bad command lines across every sub-command (``train``, ``run``,
``simulate``, ``compare``, ``course``) runs in this process through
``bpsim.cli.main``; each must return 2, print exactly one line on stderr
(no traceback) and leave the test's folder (also the working directory)
as it was. A second table calls the Python API, which raises the documented
typed exception (a ``ValueError`` subclass or ``FileNotFoundError``) with
a one-line message. Paths in the tables start with ``@/``, the test's
folder, where :func:`_files` puts the bad files each case needs.

Only one case starts processes (``run dgl --lr 1e6``: divergence is found
while training).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from bpsim.cli import main

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------ bad files
def _event(**args):
    return {"ph": "X", "name": "fwd", "pid": 0, "tid": 0, "ts": 0, "dur": 1, "args": args}


def _files(tmp: Path) -> None:
    """The files and folders the cases read or point at."""
    from bpsim.sim import simulate

    (tmp / "folder").mkdir()
    (tmp / "file.txt").write_text("not a folder\n")
    (tmp / "list.json").write_text("[1, 2, 3]")
    (tmp / "str.json").write_text('{"traceEvents": "x"}')
    (tmp / "binary.json").write_bytes(bytes(range(256)) * 4)
    (tmp / "notjson.json").write_text("{traceEvents: ")
    (tmp / "empty.json").write_text("")
    (tmp / "noargs.json").write_text(json.dumps(
        {"traceEvents": [{"ph": "X", "name": "fwd", "pid": 0, "tid": 0, "ts": 0, "dur": 5}]}))
    (tmp / "negative.json").write_text(json.dumps(
        {"traceEvents": [_event(rank=0, lane="compute", block=1, step=0, t0=2.0, t1=1.0)]}))
    (tmp / "nan.json").write_text(
        '{"traceEvents": [{"ph": "X", "name": "fwd", "pid": 0, "tid": 0, "ts": 0, "dur": 1, '
        '"args": {"rank": 0, "block": 1, "step": 0, "t0": NaN, "t1": 1.0}}]}')
    (tmp / "nospans.json").write_text('{"traceEvents": []}')
    (tmp / "lane.json").write_text(json.dumps(
        {"traceEvents": [_event(rank=0, lane="disk", block=1, step=0, t0=0.0, t1=1.0)]}))
    cost = "fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05"
    simulate("dgl", blocks=2, steps=3, costs=cost).trace.save(tmp / "dgl2.json")
    simulate("dgl", blocks=3, steps=3, costs=cost).trace.save(tmp / "dgl3.json")
    (tmp / "ck-empty").mkdir()
    (tmp / "ck-empty" / "last.pt").write_bytes(b"")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of ``train bp`` (mlp width 32, seed 0, lr 0.05) after 2 epochs."""
    folder = tmp_path_factory.mktemp("ck") / "ck"
    argv = ["train", "bp", "--epochs", "2", "--n-train", "64", "--n-test", "32", "--width", "32",
            "--lr", "0.05", "--checkpoint-dir", str(folder), "--json"]
    assert main(argv) == 0
    return folder


def _readonly(tmp: Path) -> str:
    """A folder this process may not write in."""
    if ROOT_USER:          # root writes through permission bits; /sys refuses new files
        return "/sys"
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return str(ro)


# --------------------------------------------------------------- the command line
RESUME = ["train", "bp", "--epochs", "2", "--n-train", "64", "--n-test", "32", "--width", "32",
          "--lr", "0.05", "--checkpoint-dir", "@/ck", "--resume"]

CLI = [
    # train: names, numbers, method options
    ("train-unknown-method", ["train", "nope"]),
    ("train-unknown-data", ["train", "bp", "--data", "imagenet"]),
    ("train-empty-data", ["train", "bp", "--data", ""]),
    ("train-unknown-model", ["train", "bp", "--model", "transformer"]),
    ("train-blocks-0", ["train", "bp", "--blocks", "0"]),
    ("train-blocks-over-depth", ["train", "bp", "--blocks", "9", "--depth", "2"], "depth"),
    ("train-epochs-0", ["train", "bp", "--epochs", "0"]),
    ("train-epochs-word", ["train", "bp", "--epochs", "ten"]),
    ("train-lr-negative", ["train", "bp", "--lr", "-0.1"]),
    ("train-lr-word", ["train", "bp", "--lr", "abc"]),
    ("train-lr-nan", ["train", "bp", "--lr", "nan"]),
    ("train-lr-empty", ["train", "bp", "--lr", ""]),
    ("train-lr-too-many", ["train", "bp", "--lr", "0.1,0.1,0.1"]),
    ("train-lr-over-float32", ["train", "dgl", "--lr", "1e300"]),
    ("train-weight-decay-inf", ["train", "bp", "--weight-decay", "inf"]),
    ("train-gamma-nan", ["train", "bp", "--gamma", "nan"]),
    ("train-gamma-negative", ["train", "bp", "--gamma", "-1"]),
    ("train-momentum-inf", ["train", "bp", "--momentum", "inf"]),
    ("train-weight-decay-negative", ["train", "bp", "--weight-decay", "-1"]),
    ("train-seed-negative", ["train", "bp", "--seed", "-1"]),
    ("train-batch-size-0", ["train", "bp", "--batch-size", "0"]),
    ("train-width-0", ["train", "bp", "--width", "0"]),
    ("train-n-train-0", ["train", "bp", "--n-train", "0"]),
    ("train-milestones-word", ["train", "bp", "--milestones", "a,b"]),
    ("train-option-not-taken", ["train", "bp", "--lam", "1"]),
    ("train-nh-0", ["train", "blockprop", "--nh", "0"]),
    ("train-nh-negative", ["train", "blockprop", "--nh", "-2"]),
    ("train-lam-count", ["train", "blockprop", "--lam", "1,2"]),
    ("train-lam-zero", ["train", "blockprop", "--lam", "0"]),
    ("train-cache-every-0", ["train", "blockprop-cached", "--cache-every", "0"]),
    ("train-unknown-head", ["train", "dgl", "--aux", "nope"]),
    ("train-pmf-sum", ["train", "dgl-async", "--pmf", "0.5,0.6"]),
    ("train-slowdown-block", ["train", "dgl-async", "--slowdown", "3:2"]),
    ("train-slowdown-word", ["train", "dgl-async", "--slowdown", "2:x"]),
    ("train-slowdown-not-taken", ["train", "dgl", "--slowdown", "2:2"]),
    # train: output paths, checked before training
    ("train-checkpoint-dir-is-file", ["train", "bp", "--checkpoint-dir", "@/file.txt"]),
    ("train-checkpoint-dir-under-file", ["train", "bp", "--checkpoint-dir", "@/file.txt/ck"]),
    ("train-checkpoint-dir-read-only", ["train", "bp", "--checkpoint-dir", "{ro}/ck"]),
    ("train-resume-without-folder", ["train", "bp", "--resume"]),
    # train --resume from a checkpoint that does not fit
    ("train-resume-empty-checkpoint", ["train", "bp", "--checkpoint-dir", "@/ck-empty", "--resume"],
     "empty"),
    ("train-resume-other-method", ["train", "dgl", *RESUME[2:]], "checkpoint"),
    ("train-resume-other-architecture", [*RESUME, "--width", "16"], "checkpoint"),
    ("train-resume-other-seed", [*RESUME, "--seed", "1"], "seed"),
    ("train-resume-other-lr", [*RESUME, "--lr", "0.1"], "lr"),
    ("train-resume-fewer-epochs", [*RESUME[:2], "--epochs", "1", *RESUME[4:]], "epoch"),
    # run: everything is refused before a process starts
    ("run-unknown-method", ["run", "nope"]),
    ("run-workers-0", ["run", "dgl", "--workers", "0"]),
    ("run-lr-over-float32", ["run", "dgl", "--lr", "1e300"]),
    ("run-workers-blocks", ["run", "bp", "--workers", "3", "--blocks", "2"]),
    ("run-steps-0", ["run", "dgl", "--steps", "0"]),
    ("run-threads-0", ["run", "dgl", "--threads", "0"]),
    ("run-device", ["run", "dgl", "--device", "gpu"]),
    ("run-timeout-nan", ["run", "dgl", "--timeout", "nan"], "--timeout"),
    ("run-timeout-inf", ["run", "dgl", "--timeout", "inf"], "--timeout"),
    ("run-timeout-0", ["run", "dgl", "--timeout", "0"], "--timeout"),
    ("run-host-empty", ["run", "dgl", "--host", ""], "--host"),
    ("run-host-space", ["run", "dgl", "--host", "local host"], "--host"),
    ("run-cpus-empty", ["run", "dgl", "--cpus", ""]),
    ("run-cpus-backwards", ["run", "dgl", "--cpus", "3-1"]),
    ("run-cpus-absent", ["run", "dgl", "--cpus", "9999"]),
    ("run-slowdown-block-high", ["run", "dgl", "--slowdown", "5:2"]),
    ("run-slowdown-block-0", ["run", "dgl", "--slowdown", "0:2"]),
    ("run-slowdown-below-1", ["run", "dgl", "--slowdown", "2:0.5"]),
    ("run-slowdown-twice", ["run", "dgl", "--slowdown", "2:2", "--slowdown", "2:3"]),
    ("run-microbatches-split", ["run", "gpipe", "--batch-size", "10", "--microbatches", "4"]),
    ("run-option-not-taken", ["run", "dgl", "--lam", "1.0"]),
    ("run-microbatches-not-taken", ["run", "dgl", "--microbatches", "2"]),
    ("run-unknown-data", ["run", "dgl", "--data", "nope"]),
    ("run-unknown-model", ["run", "dgl", "--model", "transformer"]),
    ("run-unknown-head", ["run", "dgl", "--aux", "nope"]),
    ("run-batch-larger-than-data", ["run", "dgl", "--batch-size", "100000", "--n-train", "50"]),
    ("run-trace-is-folder", ["run", "dgl", "--trace", "@/folder"], "--trace"),
    ("run-trace-under-file", ["run", "dgl", "--trace", "@/file.txt/t.json"], "--trace"),
    ("run-trace-read-only", ["run", "dgl", "--trace", "{ro}/t.json"], "--trace"),
    ("run-trace-missing-folder", ["run", "dgl", "--trace", "@/no/such/t.json"], "does not exist"),
    ("run-trace-long-name", ["run", "dgl", "--trace", "@/" + "x" * 300], "shorter"),
    ("run-diverges", ["run", "dgl", "--lr", "1e6", "--steps", "50", "--no-eval",
                      "--timeout", "30"], "block"),
    # simulate
    ("simulate-unknown-method", ["simulate", "nope"]),
    ("simulate-blocks-0", ["simulate", "dgl", "--blocks", "0"]),
    ("simulate-steps-0", ["simulate", "dgl", "--steps", "0"]),
    ("simulate-steps-huge", ["simulate", "dgl", "--steps", "100000000"]),
    ("simulate-cost-empty", ["simulate", "dgl", "--cost", ""]),
    ("simulate-cost-repeated", ["simulate", "dgl", "--cost", "fwd=1,fwd=2"]),
    ("simulate-cost-no-value", ["simulate", "dgl", "--cost", "fwd"]),
    ("simulate-cost-negative", ["simulate", "dgl", "--cost", "fwd=-1"]),
    ("simulate-cost-unknown-key", ["simulate", "dgl", "--cost", "nope=1"]),
    ("simulate-cost-nan", ["simulate", "dgl", "--cost", "fwd=nan"]),
    ("simulate-slowdown-word", ["simulate", "dgl", "--slowdown", "2:x"]),
    ("simulate-slowdown-twice", ["simulate", "dgl", "--slowdown", "2:1,2:3"]),
    ("simulate-slowdown-block-high", ["simulate", "dgl", "--blocks", "2", "--slowdown", "3:2"]),
    ("simulate-draws-alone", ["simulate", "dgl", "--draws", "median"]),
    ("simulate-placement", ["simulate", "dgl", "--placement", "0,1"]),
    ("simulate-protocol", ["simulate", "dgl", "--protocol", "nope"]),
    ("simulate-option-not-taken", ["simulate", "dgl", "--nh", "2"]),
    ("simulate-microbatches-0", ["simulate", "gpipe", "--microbatches", "0"]),
    ("simulate-buffer-0", ["simulate", "dgl-async", "--buffer", "0"]),
    ("simulate-seed-negative", ["simulate", "dgl", "--seed", "-5"]),
    ("simulate-calibrate-missing", ["simulate", "dgl", "--calibrate", "@/missing.json"]),
    ("simulate-calibrate-list", ["simulate", "dgl", "--calibrate", "@/list.json"], "list.json"),
    ("simulate-calibrate-binary", ["simulate", "dgl", "--calibrate", "@/binary.json"],
     "binary.json"),
    ("simulate-calibrate-no-args", ["simulate", "dgl", "--calibrate", "@/noargs.json"], "args"),
    ("simulate-trace-is-folder", ["simulate", "dgl", "--trace", "@/folder"], "--trace"),
    ("simulate-trace-read-only", ["simulate", "dgl", "--trace", "{ro}/s.json"], "--trace"),
    ("simulate-trace-long-name", ["simulate", "dgl", "--trace", "@/" + "x" * 300], "shorter"),
    ("simulate-trace-is-replay", ["simulate", "--replay", "@/dgl2.json", "--trace", "@/dgl2.json"],
     "input"),
    ("simulate-trace-is-calibrate", ["simulate", "dgl", "--calibrate", "@/dgl2.json", "--trace",
                                     "@/dgl2.json"], "input"),
    # compare
    ("compare-missing", ["compare", "@/missing.json", "@/dgl2.json"]),
    ("compare-list", ["compare", "@/list.json", "@/dgl2.json"], "list.json"),
    ("compare-events-not-a-list", ["compare", "@/str.json", "@/dgl2.json"], "str.json"),
    ("compare-binary", ["compare", "@/binary.json", "@/dgl2.json"], "binary.json"),
    ("compare-not-json", ["compare", "@/notjson.json", "@/dgl2.json"], "notjson.json"),
    ("compare-empty-file", ["compare", "@/dgl2.json", "@/empty.json"], "empty.json"),
    ("compare-folder", ["compare", "@/folder", "@/dgl2.json"], "folder"),
    ("compare-no-args", ["compare", "@/noargs.json", "@/dgl2.json"], "args"),
    ("compare-negative-duration", ["compare", "@/negative.json", "@/dgl2.json"], "negative.json"),
    ("compare-nan-time", ["compare", "@/dgl2.json", "@/nan.json"], "nan.json"),
    ("compare-unknown-lane", ["compare", "@/lane.json", "@/dgl2.json"], "lane"),
    ("compare-no-spans", ["compare", "@/nospans.json", "@/dgl2.json"], "no spans"),
    ("compare-block-counts", ["compare", "@/dgl2.json", "@/dgl3.json"], "blocks"),
    ("compare-html-is-folder", ["compare", "@/dgl2.json", "@/dgl2.json", "--html", "@/folder"],
     "--html"),
    ("compare-html-under-file", ["compare", "@/dgl2.json", "@/dgl2.json", "--html",
                                 "@/file.txt/r.html"], "--html"),
    ("compare-html-read-only", ["compare", "@/dgl2.json", "@/dgl2.json", "--html", "{ro}/r.html"],
     "--html"),
    ("compare-html-is-measured", ["compare", "@/dgl2.json", "@/dgl3.json", "--html", "@/dgl2.json"],
     "input"),
    ("compare-html-long-name", ["compare", "@/dgl2.json", "@/dgl2.json", "--html",
                                "@/" + "x" * 300], "shorter"),
    # course
    ("course-unknown-action", ["course", "nope"]),
    ("course-check-unknown-lesson", ["course", "check", "99"], "99"),
    ("course-build-unknown-lesson", ["course", "build", "99"], "99"),
    ("course-check-lesson-numbers", ["course", "check", "01"]),
    ("course-student-out-is-file", ["course", "student", "--out", "@/file.txt"], "--out"),
    ("course-student-out-under-file", ["course", "student", "--out", "@/file.txt/s"], "--out"),
    ("course-student-out-read-only", ["course", "student", "--out", "{ro}/s"], "--out"),
    ("course-check-out-is-file", ["course", "check", "--out", "@/file.txt"], "folder"),
    # the top level
    ("no-command", []),
    ("unknown-command", ["fly"]),
]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file (size, mtime) and folder under ``folder`` (a folder's own mtime
    is left out: checking that a folder is writable creates and removes a file)."""
    return {str(p.relative_to(folder)): (0, 0) if p.is_dir() else (p.stat().st_size,
                                                                    p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if not p.is_symlink()}


def _param(case):
    """A table row (a tuple, or a pytest.param with marks) as pytest.param(name, argv, match)."""
    values, marks = (case.values, case.marks) if hasattr(case, "values") else (case, ())
    name, argv, *rest = values
    return pytest.param(name, argv, rest[0] if rest else None, marks=marks, id=name)


@pytest.mark.parametrize("name,argv,match", [_param(c) for c in CLI])
def test_bad_command_line(name, argv, match, tmp_path, monkeypatch, capsys, request):
    _files(tmp_path)
    ro = _readonly(tmp_path) if any("{ro}" in a for a in argv) else ""
    if argv[:1] == ["train"] and "@/ck" in argv:
        shutil.copytree(request.getfixturevalue("checkpoint"), tmp_path / "ck")
    argv = [a.replace("@/", f"{tmp_path}/").replace("{ro}", ro) for a in argv]
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    finally:
        if ro and not ROOT_USER:
            Path(ro).chmod(0o755)
    out = capsys.readouterr()
    err = out.err.strip()
    assert code == 2, f"exit {code}; stderr: {err!r}"
    assert len(err.splitlines()) == 1, f"not one line: {err!r}"
    assert "Traceback" not in err and err.startswith("bpsim")
    if match is not None:
        assert match.lower() in err.lower(), f"{match!r} not in {err!r}"
    assert _snapshot(tmp_path) == before, "the command wrote files"


def test_the_table_is_long_enough():
    names = [_param(c).values[0] for c in CLI + API]
    assert len(names) >= 60 and len(set(names)) == len(names)


# -------------------------------------------------------------- the Python API
def _trace_load(name):
    def call(tmp):
        from bpsim.trace import Trace

        return Trace.load(tmp / name)
    return call


def _api_save_to_folder(tmp):
    from bpsim.trace import Span, Trace

    Trace([Span(0, "compute", "fwd", 1, 0, t0=0.0, t1=1.0)]).save(tmp / "folder")


def _api_check_writable(tmp):
    from bpsim.files import check_writable

    check_writable(tmp / "file.txt" / "x.json", "out")


def _api_simulate(**kw):
    def call(tmp):
        from bpsim.sim import simulate

        args = {"algo": "dgl", "blocks": 2, "steps": 3} | kw
        return simulate(args.pop("algo"), **args)
    return call


def _api_methods_unknown(tmp):
    from bpsim import methods

    methods.get("nope")


def _api_option_not_taken(tmp):
    from bpsim import methods

    methods.get("dgl").resolved_options({"nh": 2})


def _api_get_trainer(tmp):
    from bpsim.algorithms import get_trainer

    get_trainer("adam")


def _api_build(tmp):
    from bpsim import nets

    nets.build("transformer", (64,), 10, 2)


def _api_data(tmp):
    from bpsim import data

    data.load("imagenet")


def _api_blockprop_nh(tmp):
    from bpsim import nets
    from bpsim.algorithms.blockprop import BlockPropTrainer

    BlockPropTrainer(nets.mlp([64, 16, 10], blocks=2), nh=-1)


def _api_trainer_checkpoint_dir(tmp):
    from bpsim import nets
    from bpsim.algorithms.backprop import BackpropTrainer

    import torch
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.zeros(8, 64), torch.zeros(8, dtype=torch.long))
    trainer = BackpropTrainer(nets.mlp([64, 16, 10], blocks=2), checkpoint_dir=tmp / "file.txt")
    trainer.fit(data, 1)            # refused before the first epoch


def _api_save_under_file(tmp):
    from bpsim.trace import Span, Trace

    Trace([Span(0, "compute", "fwd", 1, 0, t0=0.0, t1=1.0)]).save(tmp / "file.txt" / "t.json")


def _api_from_chrome(tmp):
    from bpsim.trace import Trace

    Trace.from_chrome({"traceEvents": "x"})


def _api_run_config(**kw):
    def call(tmp):
        from bpsim.runtime import RunConfig

        RunConfig(algo="dgl", **kw).resolved()
    return call


def _api_run_trace_folder(tmp):
    from bpsim.runtime import RunConfig, run

    run(RunConfig(algo="dgl", steps=1, trace=str(tmp / "folder")))   # refused before launch


API = [
    ("api-trace-load-list", _trace_load("list.json"), "list.json"),
    ("api-trace-load-events-not-a-list", _trace_load("str.json"), "str.json"),
    ("api-trace-load-binary", _trace_load("binary.json"), "binary.json"),
    ("api-trace-load-folder", _trace_load("folder"), "folder"),
    ("api-trace-load-no-args", _trace_load("noargs.json"), "args"),
    ("api-trace-load-negative-duration", _trace_load("negative.json"), "ends before it starts"),
    ("api-trace-load-nan", _trace_load("nan.json"), "finite"),
    ("api-trace-load-missing", _trace_load("missing.json"), "does not exist"),
    ("api-trace-from-chrome", _api_from_chrome, "traceEvents"),
    ("api-trace-save-to-folder", _api_save_to_folder, "folder"),
    ("api-check-writable-under-file", _api_check_writable, "file.txt"),
    ("api-trace-save-under-file", _api_save_under_file, "file.txt"),
    ("api-trainer-checkpoint-dir-file", _api_trainer_checkpoint_dir, "file.txt"),
    ("api-simulate-blocks-0", _api_simulate(blocks=0), "blocks"),
    ("api-simulate-unknown", _api_simulate(algo="nope"), "nope"),
    ("api-simulate-steps-nan", _api_simulate(steps=math.nan), "steps"),
    ("api-methods-unknown", _api_methods_unknown, "nope"),
    ("api-methods-option-not-taken", _api_option_not_taken, "--nh"),
    ("api-get-trainer-unknown", _api_get_trainer, "adam"),
    ("api-nets-build-unknown", _api_build, "transformer"),
    ("api-data-unknown", _api_data, "imagenet"),
    ("api-blockprop-nh-negative", _api_blockprop_nh, "n_h"),
    ("api-run-config-timeout-nan", _api_run_config(timeout=math.nan), "timeout"),
    ("api-run-config-host-empty", _api_run_config(host=""), "host"),
    ("api-run-trace-folder", _api_run_trace_folder, "--trace"),
]


@pytest.mark.parametrize("name,call,match", API, ids=[_param(c).values[0] for c in API])
def test_bad_python_input(name, call, match, tmp_path, monkeypatch):
    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        call(tmp_path)
    msg = str(e.value)
    assert msg and len(msg.splitlines()) == 1, f"not one line: {msg!r}"
    assert match.lower() in msg.lower(), f"{match!r} not in {msg!r}"
    assert _snapshot(tmp_path) == before


def test_trace_errors_are_value_errors():
    from bpsim.trace import TraceError

    assert issubclass(TraceError, ValueError)


def test_compare_of_different_methods_warns(tmp_path, capsys):
    from bpsim.sim import simulate

    cost = "fwd=1,bwd=2,aux=0.2,update=0.1,comm=0.05"
    simulate("dgl", blocks=2, steps=3, costs=cost).trace.save(tmp_path / "a.json")
    simulate("bp", blocks=2, steps=3, costs=cost).trace.save(tmp_path / "b.json")
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"]


def test_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    import bpsim.cli.simulate as sim_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sim_cli, "cmd", interrupted)
    assert main(["simulate", "dgl"]) == 130
    assert capsys.readouterr().err.strip() == "bpsim simulate: interrupted"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
