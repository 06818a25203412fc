"""`python -m avsd_megatron COMMAND`: every documented command reaches its module's parser under its own name.

Run: python -m pytest -q tests/test_main.py
"""

import subprocess
import sys

import pytest

from avsd_megatron.__main__ import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_main_command_help_names_the_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: python -m avsd_megatron {command}" in capsys.readouterr().out


def test_main_without_a_command_lists_them(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS), out


def test_main_unknown_command_exits_2_naming_it(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err


def test_main_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "avsd_megatron", "nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown command 'nope'" in proc.stderr


# Issue 16.6: user errors are one `error: ...` line and exit 2; real bugs keep their traceback; rank 0 only prints.


def _raises(exc):
    def command(argv):
        raise exc

    return command


@pytest.mark.parametrize("exc", [ValueError("bad value\n  on two lines"), FileNotFoundError("no such file x"),
                                 PermissionError("cannot write y")])
def test_user_errors_are_one_line_and_exit_2(exc, capsys, monkeypatch):
    from avsd_megatron.__main__ import run_command

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("AVSD_TRACEBACK", raising=False)
    assert run_command(_raises(exc), []) == 2
    err = capsys.readouterr().err
    assert err == f"error: {' '.join(str(exc).split())}\n"


def test_user_error_under_torchrun_prints_on_rank_0_only(capsys, monkeypatch):
    from avsd_megatron.__main__ import run_command

    monkeypatch.setenv("RANK", "1")
    assert run_command(_raises(ValueError("x")), []) == 2
    assert capsys.readouterr().err == ""


def test_bugs_keep_their_traceback_and_avsd_traceback_shows_user_errors(monkeypatch):
    from avsd_megatron.__main__ import run_command

    with pytest.raises(KeyError):
        run_command(_raises(KeyError("a bug")), [])
    monkeypatch.setenv("AVSD_TRACEBACK", "1")
    with pytest.raises(ValueError):
        run_command(_raises(ValueError("shown in full")), [])


@pytest.mark.parametrize("argv, needle", [
    (["evaluate", "--hf", "/nonexistent/hf", "--data", "x.jsonl"], "error: --hf /nonexistent/hf: no such directory"),
    (["train", "--config", "/nonexistent/run.yaml"], "error: "),
    (["main-job", "--out", "/proc/cannot/write/here", "--steps", "0"], "error: "),
])
def test_clis_print_user_errors_without_traceback(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "avsd_megatron", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr[-3000:]
