"""Tests for avsd_megatron.verify.sandbox: isolation (network, filesystem, environment), resource limits, the judge.

Run: .venv/bin/python -m pytest -q tests/verify/test_sandbox.py

The tests marked `bwrap` need bubblewrap (`apt-get install -y bubblewrap`; `make bwrap` and .ci/run install it):
without it they skip, or error under CI=true / AVSD_REQUIRE_SANDBOX=1 (tests/conftest.py). Every check runs a real
tiny program; the few `kind="subprocess"` runs are the controls showing that the same program does reach what the
sandbox blocks.
"""

import socket
import sys
import textwrap
from pathlib import Path

import pytest

from avsd_megatron.verify.sandbox import (
    Sandbox,
    SandboxConfig,
    SandboxUnavailableError,
    TestCase,
    error_type,
    normalize_output,
    run_tests,
)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxConfig(wall_time_s=2.0, memory_mb=256))


@pytest.fixture(scope="module")
def unsafe() -> Sandbox:
    with pytest.warns(RuntimeWarning, match="WITHOUT a sandbox"):
        cfg = SandboxConfig(kind="subprocess", wall_time_s=2.0, memory_mb=256)
    return Sandbox(cfg)


@pytest.fixture
def listening_port():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    yield server.getsockname()[1]
    server.close()


CONNECT = """
import socket
for host, port in [("127.0.0.1", int(input())), ("1.1.1.1", 53)]:
    s = socket.socket()
    s.settimeout(1.0)
    try:
        s.connect((host, port))
        print(host, "connected")
    except OSError as err:
        print(host, "blocked", type(err).__name__)
"""


@pytest.mark.bwrap
def test_sandbox_denies_network(sandbox, unsafe, listening_port):
    inside = sandbox.run(CONNECT, f"{listening_port}\n")
    assert inside.returncode == 0, inside.stderr
    lines = inside.stdout.splitlines()
    assert lines[0].startswith("127.0.0.1 blocked"), lines
    assert lines[1].startswith("1.1.1.1 blocked"), lines
    control = unsafe.run(CONNECT, f"{listening_port}\n")  # the same program outside the sandbox gets through
    assert control.stdout.splitlines()[0] == "127.0.0.1 connected"


@pytest.mark.bwrap
def test_sandbox_filesystem_read_only_outside_workdir(sandbox, tmp_path):
    host_file = tmp_path / "host_secret.txt"  # under the host's /tmp, which the sandbox replaces
    # The interpreter's prefix (a venv, maybe under /tmp in a CI clone) is bound read-only whatever its location;
    # a checkout under /tmp would instead land in the sandbox's private /tmp and prove nothing.
    host_probe = Path(sys.prefix) / "avsd_probe"
    host_file.write_text("secret")
    program = textwrap.dedent(
        f"""
        import os
        for target in ["/etc/avsd_probe", {str(host_probe)!r}, "/usr/avsd_probe"]:
            try:
                open(target, "w").write("x")
                print("wrote", target)
            except OSError as err:
                print("denied", err.errno)
        open("scratch.txt", "w").write("ok")
        os.makedirs({str(tmp_path)!r}, exist_ok=True)  # in the sandbox's own /tmp
        open({str(tmp_path / "written_inside.txt")!r}, "w").write("ok")
        print(os.getcwd(), open("scratch.txt").read(), os.path.exists({str(host_file)!r}))
        """
    )
    result = sandbox.run(program, "")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["denied 30"] * 3  # EROFS
    assert lines[3] == "/tmp/work ok False"
    assert not host_probe.exists()
    assert not (tmp_path / "written_inside.txt").exists()


@pytest.mark.bwrap
def test_sandbox_does_not_leak_environment(sandbox, monkeypatch):
    monkeypatch.setenv("AVSD_TEST_SECRET", "hunter2")
    result = sandbox.run("import os\nprint(os.environ.get('AVSD_TEST_SECRET'), os.environ['HOME'])", "")
    assert result.stdout == "None /tmp/work\n"


@pytest.mark.bwrap
def test_sandbox_wall_time_limit_kills_busy_and_sleeping_programs():
    box = Sandbox(SandboxConfig(wall_time_s=0.5))
    for program in ["while True:\n    pass", "import time\ntime.sleep(60)"]:
        result = box.run(program, "")
        assert result.timed_out and result.returncode is None
    tests = (TestCase("", ""),)
    assert run_tests("import time\ntime.sleep(60)", tests, box).status == "timeout"


@pytest.mark.bwrap
def test_sandbox_memory_limit(sandbox):
    small = sandbox.run("x = bytearray(32 * 2**20)\nprint(len(x))", "")
    assert small.returncode == 0 and small.stdout == f"{32 * 2**20}\n"
    big = sandbox.run("x = bytearray(1024 * 2**20)\nprint(len(x))", "")  # 1 GiB > memory_mb = 256
    assert big.returncode == 1 and big.stdout == ""
    assert error_type(big.stderr, big.returncode) == "MemoryError"


@pytest.mark.bwrap
def test_sandbox_cpu_time_limit():
    box = Sandbox(SandboxConfig(wall_time_s=30.0, cpu_time_s=1))
    result = box.run("while True:\n    pass", "")
    assert not result.timed_out
    assert error_type(result.stderr, result.returncode) == "killed by SIGXCPU"
    verdict = run_tests("while True:\n    pass", (TestCase("", ""),), box)
    assert (verdict.status, verdict.error_type) == ("runtime_error", "killed by SIGXCPU")


@pytest.mark.bwrap
def test_sandbox_output_truncated_and_flood_stopped():
    box = Sandbox(SandboxConfig(max_output_bytes=2**20))
    result = box.run("print('y' * 10_000)\nimport sys\nprint('e' * 9000, file=sys.stderr)", "")
    assert result.returncode == 0
    assert result.stdout == "y" * 4000 and result.stderr == "e" * 4000
    assert result.full_stdout == "y" * 10_000 + "\n"
    flood = box.run("import sys\nwhile True:\n    sys.stdout.write('z' * 65536)", "")
    assert flood.returncode != 0 and not flood.timed_out
    assert "File too large" in flood.stderr


@pytest.mark.bwrap
def test_sandbox_passes_large_stdin(sandbox):
    data = "7 " * 500_000
    result = sandbox.run("import sys\nprint(len(sys.stdin.read().split()))", data)
    assert result.stdout == "500000\n"


def test_sandbox_missing_bwrap_raises_with_install_hint():
    with pytest.raises(SandboxUnavailableError, match=r"apt-get install -y bubblewrap"):
        Sandbox(SandboxConfig(bwrap_path="/nonexistent/bwrap"))


def test_sandbox_rejects_missing_interpreter():
    with pytest.raises(ValueError, match="sandbox.python='/nonexistent/python3' is not an executable"):
        Sandbox(SandboxConfig(python="/nonexistent/python3"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(kind="docker"), "sandbox.kind='docker' is not one of"),
        (dict(wall_time_s=0), "sandbox.wall_time_s=0 must be > 0"),
        (dict(memory_mb=-1), "sandbox.memory_mb=-1 must be > 0"),
    ],
)
def test_sandbox_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        SandboxConfig(**overrides)


# ----------------------------------------------------------------------------------------------------------------
# Judge


@pytest.mark.bwrap
def test_run_tests_stops_at_first_failure(sandbox):
    tests = (TestCase("1\n", "1\n"), TestCase("2\n", "3\n"), TestCase("3\n", "9\n"))
    result = run_tests("print(input())", tests, sandbox)
    assert (result.status, result.tests_run, result.failing_input) == ("wrong_answer", 2, "2\n")
    assert (result.expected_output, result.actual_output) == ("3\n", "2\n")
    assert run_tests("print(input())", tests[:1], sandbox).passed


@pytest.mark.bwrap
def test_run_tests_syntax_error_is_not_executed(sandbox):
    result = run_tests("import os\nos.system('touch /tmp/x'\n", (TestCase("", ""),), sandbox)
    assert (result.status, result.error_type, result.tests_run) == ("syntax_error", "SyntaxError", 0)
    assert "SyntaxError" in result.traceback


@pytest.mark.bwrap
def test_run_tests_long_output_compared_in_full_unless_reference_mode(sandbox):
    expected = "x" * 5000 + "\n"
    tests = (TestCase("", expected),)
    assert run_tests("print('x' * 5000)", tests, sandbox).status == "passed"
    assert run_tests("print('x' * 5000)", tests, sandbox, compare_truncated_output=True).status == "wrong_answer"


def test_normalize_output():
    assert normalize_output("a \r\nb\t\r\n\n\n") == "a\nb"
    assert normalize_output("a\rb") == "a\nb"
    assert normalize_output(" a\n\nb") == " a\n\nb"
    assert normalize_output("") == ""


def test_error_type_from_traceback_signal_or_exit_code():
    tb = 'Traceback (most recent call last):\n  File "main.py", line 1\nValueError: bad\n'
    assert error_type(tb, 1) == "ValueError"
    assert error_type('Traceback (most recent call last):\nnumpy.linalg.LinAlgError\n', 1) == "numpy.linalg.LinAlgError"
    assert error_type("", -9) == "killed by SIGKILL"
    assert error_type("bye\n", 3) == "exit code 3"


def test_unsafe_subprocess_kind_runs_with_limits(unsafe):
    result = unsafe.run("import os\nprint(os.environ.get('HOME') == os.getcwd())", "")
    assert result.stdout == "True\n"
    big = unsafe.run("x = bytearray(1024 * 2**20)", "")
    assert error_type(big.stderr, big.returncode) == "MemoryError"
