"""Tests for the set-up commands (Makefile, tools/find_python312.sh, .ci/run) without building anything: the
Python finder against fake interpreters on a bare PATH and against this machine, and `make -n` dry runs.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FINDER = ROOT / "tools" / "find_python312.sh"


def _fake(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _find(path: Path) -> subprocess.CompletedProcess:
    """The finder with PATH = `path` only: it may call nothing but shell built-ins and the fakes there."""
    return subprocess.run(["/bin/sh", str(FINDER)], env={"PATH": str(path)}, capture_output=True, text=True,
                          timeout=60)


def test_finder_prefers_plain_python312(tmp_path):
    _fake(tmp_path, "python3.12", "exit 0")  # answers the version check with "is 3.12"
    _fake(tmp_path, "python3", "exit 0")
    result = _find(tmp_path)
    assert (result.returncode, result.stdout) == (0, "python3.12\n"), result.stderr


def test_finder_takes_python3_when_it_is_312(tmp_path):
    _fake(tmp_path, "python3.12", "exit 1")  # a broken or non-3.12 python3.12
    _fake(tmp_path, "python3", "exit 0")
    assert _find(tmp_path).stdout == "python3\n"


def test_finder_uses_pyenvs_newest_plain_312_release(tmp_path):
    _fake(tmp_path, "python3", "exit 1")  # 3.11, say
    _fake(tmp_path, "pyenv", 'printf "3.11.7\\n3.12.0rc1\\n3.12.1\\n3.12.10\\n3.12.10/envs/x\\n3.13.0\\n"')
    _fake(tmp_path, "env", 'for a; do case "$a" in *=*) export "$a"; shift;; *) break;; esac; done; exec "$@"')
    _fake(tmp_path, "python3.12", '[ "$PYENV_VERSION" = 3.12.10 ]')  # pyenv's shim: only with a 3.12 selected
    result = _find(tmp_path)
    assert (result.returncode, result.stdout) == (0, "env PYENV_VERSION=3.12.10 python3.12\n"), result.stderr


def test_finder_without_312_says_how_to_get_it(tmp_path):
    _fake(tmp_path, "python3", "exit 1")
    _fake(tmp_path, "pyenv", 'printf "3.11.7\\n"')
    result = _find(tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert "Python 3.12 not found" in result.stderr
    assert "apt-get install -y python3.12 python3.12-venv" in result.stderr and "pyenv install 3.12" in result.stderr


def test_finder_on_this_machine_gives_a_python312_command():
    result = subprocess.run(["/bin/sh", str(FINDER)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.skip(f"no Python 3.12 here: {result.stderr.strip()}")
    version = subprocess.run([*result.stdout.split(), "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60)
    assert version.stdout == "(3, 12)\n", version.stderr


def _make_dry_run(target: str, venv: Path, **variables: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    args = ["make", "-n", "--no-print-directory", "-C", str(ROOT), target, f"VENV={venv}",
            *(f"{k}={v}" for k, v in variables.items())]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_test_builds_a_missing_venv_then_runs_pytest(tmp_path):
    venv = tmp_path / "venv"
    lines = _make_dry_run("test", venv).splitlines()
    steps = [next(i for i, line in enumerate(lines) if needle in line) for needle in (
        "tools/find_python312.sh", f"-m venv {venv}", f'{venv}/bin/python -m pip install --quiet -e ".[train,eval,test,'
        f'launch,plot]"', "command -v bwrap", f"{venv}/bin/python -m pytest -q tests")]
    assert steps == sorted(steps), lines  # in this order


def test_make_with_a_built_venv_only_runs_the_command(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".installed-train-eval-test-launch-plot").touch()  # newer than setup.py: installed
    out = _make_dry_run("main-job", venv, OUT="runs/x")
    assert "pip install" not in out and "-m venv" not in out
    assert out.splitlines()[-1] == f"{venv}/bin/python -m avsd_megatron main-job --out runs/x"
    os.utime(venv / ".installed-train-eval-test-launch-plot", (0, 0))  # older than setup.py: reinstall
    assert "pip install --quiet -e" in _make_dry_run("main-job", venv)


def test_make_python312_variable_overrides_the_finder(tmp_path):
    out = _make_dry_run("venv", tmp_path / "venv", PYTHON312=sys.executable)
    assert f'py="{sys.executable}"' in out


def test_ci_builds_from_nothing_and_runs_make_test():
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands.index("make clean  # from nothing: a separate make run, so that the next one sees no .venv") \
        < commands.index("make test")
    assert "export AVSD_REQUIRE_SANDBOX=1" in commands
