"""The `cifarlab` command package: every command registered from its own module, `python -m cifarlab.cli`,
the shared error handling."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from cifarlab import cli
from cifarlab.errors import UserError


def test_every_command_module_registers_itself():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == list(cli.COMMANDS)
    for name in cli.COMMANDS:
        assert callable(importlib.import_module(f"cifarlab.cli.{name}").add_parser)
    assert not hasattr(cli, "CliError")


def test_python_dash_m_and_version():
    proc = subprocess.run([sys.executable, "-m", "cifarlab.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("cifarlab ")


def test_model_summary(capsys):
    assert cli.main(["model", "summary", "reference"]) == 0
    assert "Total params" in capsys.readouterr().out


def test_user_errors_are_one_line_with_control_characters_escaped(capsys):
    from cifarlab.cli.common import run_command

    def fails(args):
        raise UserError("bad name \x1b[31mred\nsecond line")

    assert run_command(fails, None) == 2
    err = capsys.readouterr().err
    assert err == "error: bad name \\x1b[31mred\\nsecond line\n"

    def bug(args):
        raise RuntimeError("a bug keeps its traceback")

    with pytest.raises(RuntimeError):
        run_command(bug, None)
