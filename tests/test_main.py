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
