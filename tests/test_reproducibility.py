"""What keeps results reproducible: the torch pin of the README's install commands, the constraints file that
pins the committed leaderboard's dependencies, and CI running the README's test command verbatim."""

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "benchmarks" / "constraints.txt"
PINNED = {"torch", "transformers", "tokenizers", "safetensors", "datasets", "gin-config", "typer", "rich", "scipy", "numpy",
          "math-verify", "matplotlib", "tensorboard", "deepspeed"}


def _readme_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)]


def _constraints() -> dict[str, Requirement]:
    lines = [ln.split("#", 1)[0].strip() for ln in CONSTRAINTS.read_text().splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln]
    assert len({r.name for r in reqs}) == len(reqs), "a package constrained twice"
    return {r.name: r for r in reqs}


def _torch_pin(command: str) -> str:
    pins = re.findall(r"(?<![\w-])torch==(\S+)", command)
    assert len(pins) == 1, command
    return pins[0]


def test_constraints_file_pins_every_listed_dependency_to_one_version():
    reqs = _constraints()
    assert set(reqs) == PINNED
    for name, req in reqs.items():
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==" and not req.extras and req.marker is None, str(req)
        Version(spec[0].version)  # an exact release, not a wildcard


def test_constraints_pin_torch_to_the_readme_install_commands_version():
    first, second = _readme_blocks()[:2]
    assert second == "pip install torch==2.13.0 -e '.[test]' && pytest"
    pin = _torch_pin(second)
    assert _torch_pin(first) == pin
    assert str(_constraints()["torch"].specifier) == f"=={pin}"
    reproduce = [b for b in _readme_blocks() if "benchmarks/constraints.txt" in b]
    assert reproduce == ["pip install -c benchmarks/constraints.txt torch==2.13.0 -e ."]
    assert _torch_pin(reproduce[0]) == pin


def test_constraints_satisfy_the_lower_bounds_in_pyproject():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    bounds = {r.name: r.specifier for r in declared}
    for name, req in _constraints().items():
        assert bounds[name].contains(next(iter(req.specifier)).version), (name, str(bounds[name]), str(req))


def test_ci_runs_the_readme_test_command_verbatim_in_a_fresh_environment():
    script = (ROOT / ".ci" / "run").read_text()
    commands = [ln.strip() for ln in script.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert commands[-1] == _readme_blocks()[1]  # the last command, so its exit code is the script's
    assert re.search(r"python3 -m venv (?!.*--system-site-packages)", script)
    assert "pip install --upgrade pip" in script
