"""The command line itself: help, version, usage errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

from cli_helpers import run_cli


def test_help_lists_the_commands_with_examples(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in ("distill", "eval", "probe", "compare"):
        assert command in out
    for command in ("distill", "eval", "probe", "compare"):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0 and "Examples:" in out, command


def test_version(capsys):
    from kdgeo import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"kdgeo {__version__}"


def test_usage_errors_exit_2_without_traceback(capsys):
    for args in (["probe"], ["probe", "a", "b", "--rows", "foo"], ["nope"], ["distill"]):
        code, out, err = run_cli(capsys, *args)
        assert code == 2, args
        assert "Traceback" not in err and "Error" in err


def test_python_dash_m_and_console_script_agree():
    done = subprocess.run([sys.executable, "-m", "kdgeo", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("kdgeo ")
