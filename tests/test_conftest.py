"""Tests for tests/conftest.py: a `bwrap`-marked test skips when bubblewrap is missing, with the install command,
and errors instead under CI=true or AVSD_REQUIRE_SANDBOX=1; unmarked tests run either way.

A missing bwrap is simulated by a child pytest whose PATH is an empty folder (the sandbox finds Python through
sys.executable, an absolute path, so nothing else needs PATH).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDS_BWRAP = "tests/verify/test_sandbox.py::test_sandbox_passes_large_stdin"  # marked bwrap, about 1 s
NO_BWRAP_NEEDED = "tests/verify/test_sandbox.py::test_normalize_output"  # unmarked


def _pytest(test_id: str, path: str, **env: str) -> subprocess.CompletedProcess:
    child_env = {k: v for k, v in os.environ.items() if k not in ("CI", "AVSD_REQUIRE_SANDBOX")}
    child_env.update(PATH=path, PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsfE", "-p", "no:cacheprovider", test_id],
                          cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=300)


def test_missing_bwrap_skips_with_the_install_command(tmp_path):
    result = _pytest(NEEDS_BWRAP, str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "passed" not in result.stdout
    assert "`bwrap` is not on PATH" in result.stdout and "apt-get install -y bubblewrap" in result.stdout


@pytest.mark.parametrize("variable, value", [("CI", "true"), ("AVSD_REQUIRE_SANDBOX", "1")])
def test_missing_bwrap_fails_when_the_sandbox_is_required(tmp_path, variable, value):
    result = _pytest(NEEDS_BWRAP, str(tmp_path), **{variable: value})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout  # failed in set-up, before the Sandbox fixture
    assert f"{variable}={value} requires the sandbox tests" in result.stdout
    assert "apt-get install -y bubblewrap" in result.stdout


def test_missing_bwrap_leaves_unmarked_tests_running(tmp_path):
    result = _pytest(NO_BWRAP_NEEDED, str(tmp_path), CI="true")
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr


def test_marked_test_runs_when_bwrap_is_on_path(tmp_path):
    found = shutil.which("bwrap")
    if found is None:
        pytest.skip("bwrap is not installed here; the control needs it")
    (tmp_path / "bwrap").symlink_to(found)  # PATH holds bwrap and nothing else
    result = _pytest(NEEDS_BWRAP, str(tmp_path), CI="true")
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr
