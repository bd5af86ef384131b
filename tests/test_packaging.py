"""Packaging: environment.yml (conda / Binder) lists what pyproject.toml lists."""

import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(.*)$", req)
    return m.group(1).lower(), m.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_reqs = dict(_split(r) for r in project["dependencies"] + project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = dict(_split(d) for d in env["dependencies"] if isinstance(d, str) and not d.startswith(("python", "pip")))
    expected = {CONDA_NAMES.get(k, k): v for k, v in pip_reqs.items()}
    assert conda == expected, (
        "environment.yml and pyproject.toml disagree; add or change the dependency in both places"
    )
    assert project["requires-python"] == ">=3.10"
    assert project["scripts"]["bpsim"] == "bpsim.cli:main"


def test_makefile_picks_cpu_torch_without_nvidia_smi():
    mk = (ROOT / "Makefile").read_text()
    assert "nvidia-smi" in mk and "torch==2.13.0" in mk
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
