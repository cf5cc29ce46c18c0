"""A newcomer's two commands: examples/quickstart.sh installs only what its demo needs (the test tooling is the test
command's), and benchmarks/ default to the model directory the quickstart writes, not a path on one machine."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as pip vendors it
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# what the test command adds and the demo must not install (the issue: the quickstart pulled in the whole `test`
# extra, ~0.6 GB of trl, datasets, pyarrow and matplotlib, and two verl releases with ray)
TEST_TOOLING = {"pytest", "pytest-xdist", "ruff", "trl", "datasets", "pyarrow", "matplotlib", "math-verify", "verl"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower()


def _extras() -> tuple[list[str], dict[str, list[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]


def _installs(requirements: list[str], extras: dict[str, list[str]]) -> set[str]:
    """The package names REQUIREMENTS name, `loraforge[a,b]` expanded to those extras."""
    names = set()
    for req in requirements:
        m = re.fullmatch(r"loraforge\[(.+)\]", req.strip())
        if m:
            for extra in m.group(1).split(","):
                names |= _installs(extras[extra.strip()], extras)
        else:
            names.add(_name(req))
    return names


def _setup_mode_lines(mode: str) -> list[list[str]]:
    """The pip lines scripts/setup.sh runs in MODE, read from its `if [ "$MODE" = demo ]` branches."""
    text = (ROOT / "scripts" / "setup.sh").read_text()
    branch = re.search(r'if \[ "\$MODE" = demo \]; then\n(.*?)\nelse\n(.*?)\nfi', text, re.S)
    assert branch, "scripts/setup.sh no longer chooses its install by mode"
    common = [line for line in text.splitlines() if line.startswith("$INSTALL")]
    chosen = branch.group(1 if mode == "demo" else 2).splitlines()
    return [shlex.split(line) for line in common + chosen if "$INSTALL" in line]


def test_quickstart_installs_only_what_the_demo_needs():
    deps, extras = _extras()
    quickstart = (ROOT / "examples" / "quickstart.sh").read_text()
    assert "bash scripts/setup.sh demo" in quickstart
    demo_lines = _setup_mode_lines("demo")
    assert ".[demo]" in {w for line in demo_lines for w in line}, demo_lines
    assert not any(".[test]" in w for line in demo_lines for w in line), demo_lines
    demo = _installs(deps, extras) | _installs(extras["demo"], extras)
    assert "gguf" in demo  # transformers reads the SmolLM2 GGUF file with it
    assert not demo & TEST_TOOLING, f"the quickstart would install {sorted(demo & TEST_TOOLING)}"
    # the test command still installs all of it (the suite runs every extra's code)
    test = _installs(extras["test"], extras)
    assert TEST_TOOLING - {"datasets", "verl"} <= test, sorted(TEST_TOOLING - test)
    assert any(".[test]" in w for line in _setup_mode_lines("test") for w in line)


def test_benchmarks_default_to_the_quickstarts_model():
    model = re.search(r"^MODEL=(\S+)$", (ROOT / "examples" / "quickstart.sh").read_text(), re.M).group(1)
    assert model == "models/SmolLM2-135M-Instruct"
    for path in sorted((ROOT / "benchmarks").glob("*.py")):  # no default is a path on one machine
        defaults = [line for line in path.read_text().splitlines() if "default" in line.lower() and "/work/" in line]
        assert not defaults, f"{path.name}: {defaults}"
    # train_speed imports only the standard library at the top: its default as argparse sees it
    spec = importlib.util.spec_from_file_location("bench_train_speed", ROOT / "benchmarks" / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert Path(module.DEFAULT_MODEL) == ROOT / model
    # init_speed imports its helpers (and through them torch): its default read from the source
    source = (ROOT / "benchmarks" / "init_speed.py").read_text()
    line = re.search(r"^DEFAULT_MODEL = (.+)$", source, re.M).group(1)
    assert line == 'str(Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct")', line


@pytest.mark.parametrize("arg, code", [("--help", 0), ("-h", 0), ("--model", 2)])
def test_quickstart_help_says_what_it_does_and_installs_nothing(tmp_path, arg, code):
    # run from a copy: whatever the script did would land in tmp_path, not in this checkout
    (tmp_path / "examples").mkdir()
    script = tmp_path / "examples" / "quickstart.sh"
    script.write_text((ROOT / "examples" / "quickstart.sh").read_text())
    out = subprocess.run(["bash", str(script), arg], capture_output=True, text=True, timeout=30)
    assert out.returncode == code, out.stderr
    if code == 0:
        assert "install what the demo needs" in out.stdout and "loraforge init" in out.stdout
    else:
        assert out.stderr.startswith("usage: bash examples/quickstart.sh")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["examples", "quickstart.sh"]
