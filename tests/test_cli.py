"""The command line: JSON output, one-line errors with exit code 2, one set of
method defaults read from the registry (more bad inputs: test_bad_inputs.py)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bpsim import methods
from bpsim.cli import build_parser, main
from bpsim.cli.args import method_options


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
    ["train", "bp", "--blocks", "9", "--depth", "2"],
    ["train", "bp", "--epochs", "0"],
    ["train", "bp", "--lr", "-0.1"],
    ["train", "bp", "--lr", "abc"],
    ["train", "bp", "--model", "transformer"],
    ["train", "bp", "--lam", "1"],
])
def test_bad_input_is_one_line_and_exit_2(args, capsys):
    assert main(args) == 2          # usage errors too: main returns the code
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_human_summary(capsys):
    assert main(["train", "bp", "--epochs", "1", "--n-train", "200"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_help_and_version_return_0(capsys):
    assert main(["--help"]) == 0 and main(["--version"]) == 0
    assert "bpsim" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "run", "simulate"])
@pytest.mark.parametrize("algo", ["blockprop-cached", "gpipe", "dgl-async", "bp"])
def test_one_set_of_defaults_from_the_registry(command, algo):
    parser = build_parser()
    if command == "run" and algo not in methods.names(runtime=True):
        pytest.skip(f"{algo} does not run on the runtime")
    args = parser.parse_args([command, algo])
    assert method_options(args) == methods.defaults_for(algo)
    given = parser.parse_args([command, algo, *(["--buffer", "7"] if algo == "dgl-async" else [])])
    assert method_options(given).get("buffer", 7) == 7


def test_choices_and_aliases_come_from_the_registry(capsys):
    parser = build_parser()
    assert parser.parse_args(["train", "backprop"]).algo == "bp"
    assert parser.parse_args(["simulate", "dgl-sync"]).algo == "dgl"
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(m.summary in " ".join(text.split()) for m in methods.METHODS
               if m.name in methods.names(runtime=True))


def test_run_config_takes_the_resolved_options():
    from bpsim.cli.run import config_from_args

    cfg = config_from_args(build_parser().parse_args(["run", "gpipe", "--workers", "2"]))
    assert cfg.microbatches == methods.DEFAULTS["microbatches"]
    cfg = config_from_args(build_parser().parse_args(["run", "blockprop", "--nh", "2"]))
    assert cfg.options["nh"] == 2 and cfg.options["lam"] == methods.DEFAULTS["lam"]


def test_the_cli_loads_its_subcommands_without_import_tricks():
    folder = Path(__file__).resolve().parent.parent / "bpsim" / "cli"
    for path in folder.glob("*.py"):
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
                 and getattr(n.func, "id", getattr(n.func, "attr", "")) in ("__import__", "import_module")]
        assert not calls, f"{path.name} imports by name"
