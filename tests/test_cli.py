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


def test_light_modules_load_no_torch():
    """`kdgeo --help` and spec checks stay instant: the CLI, the spec, the shared tables and the progress
    events never import torch (each in a fresh interpreter: this one has torch loaded already)."""
    for module in ("kdgeo.cli", "kdgeo.spec", "kdgeo.kinds", "kdgeo.events"):
        code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:5])"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]", f"{module} imports torch: {done.stdout.strip()}"


def test_rows_and_precision_choices_come_from_kinds(capsys):
    from kdgeo.kinds import AUTOCAST_PRECISIONS, ROWS

    for command, option, values in (("probe", "--rows", ROWS), ("probe", "--precision", AUTOCAST_PRECISIONS),
                                    ("eval", "--precision", AUTOCAST_PRECISIONS)):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0 and f"{option} <{'|'.join(values)}>" in " ".join(out.split()), (command, option)
