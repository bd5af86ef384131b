"""The command line: JSON output and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from bpsim.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "bpsim", *args], capture_output=True, text=True, timeout=300)


def test_train_bp_json_meets_the_acceptance_bar():
    r = _run("train", "bp", "--data", "digits", "--model", "mlp", "--blocks", "2", "--epochs", "20", "--seed", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["test_accuracy"] >= 0.95
    assert out["epochs"] == 20 and len(out["history"]["train_loss"]) == 20
    assert {"train_loss", "wall_time", "history"} <= set(out)


@pytest.mark.parametrize("args", [
    ["train", "nope"],
    ["train", "bp", "--data", "imagenet"],
    ["train", "bp", "--blocks", "0"],
    ["train", "bp", "--blocks", "9"],
    ["train", "bp", "--epochs", "0"],
    ["train", "bp", "--lr", "-0.1"],
    ["train", "bp", "--lr", "abc"],
    ["train", "bp", "--model", "transformer"],
    ["train", "bp", "--lam", "1"],
])
def test_bad_input_is_one_line_and_exit_2(args, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # argparse usage errors exit directly
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_human_summary(capsys):
    assert main(["train", "bp", "--epochs", "1", "--n-train", "200"]) == 0
    assert "test accuracy" in capsys.readouterr().out
