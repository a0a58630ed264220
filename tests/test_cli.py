"""The command line itself: help, version, usage errors, exit codes."""

from __future__ import annotations

import json
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


def _closed_stdout_env() -> dict[str, str]:
    import os

    from cli_helpers import REPO

    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_a_closed_stdout_does_not_stop_a_run(tiny, tmp_path):
    """`kdgeo distill SPEC --json | head -1`: the reader goes away after one line; the run still finishes (exit 0)
    with every event in metrics.jsonl, and stderr says once that the --json stream stopped."""
    from cli_helpers import tiny_spec, write_spec
    from kdgeo.rundir import read_jsonl

    path = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path, train={"epochs": 2}))
    cmd = [sys.executable, "-m", "kdgeo", "distill", str(path), "--json", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_closed_stdout_env())
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert first.startswith("{")
    run = tmp_path / "runs" / "t"
    assert (run / "summary.json").exists() and (run / "student").is_dir()
    kinds = [e["event"] for e in read_jsonl(run / "metrics.jsonl")]
    assert kinds[0] == "start" and kinds.count("step") == 8 and "eval" in kinds
    assert "Traceback" not in err
    assert err.count("stdout was closed") == 1 and "metrics.jsonl has every event" in " ".join(err.split())


def test_a_closed_stdout_does_not_fail_compare(tiny, tmp_path):
    """Results for stdout (`compare --json -`, tables) with nobody reading: no traceback, the usual exit code."""
    from cli_helpers import tiny_spec, write_spec

    path = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path, train={"max_steps": 1}))
    done = subprocess.run([sys.executable, "-m", "kdgeo", "distill", str(path), "-q"], capture_output=True,
                          text=True, env=_closed_stdout_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    for extra in (["--json", "-"], []):
        cmd = [sys.executable, "-m", "kdgeo", "compare", str(tmp_path / "runs" / "t"), *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_closed_stdout_env())
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # closed before kdgeo writes anything
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 0, (extra, err)
        assert "Traceback" not in err and "stdout was closed" in err, (extra, err)


def test_write_stdout_survives_a_broken_pipe(monkeypatch, capsys):
    from kdgeo import report

    class Closed:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(report, "_stdout_closed", False)
    monkeypatch.setattr(sys, "stdout", Closed())
    report.write_stdout("one\n")
    report.emit_json({"two": 2})
    report.out_console.print("three")
    assert report.is_stdout_closed()
    assert capsys.readouterr().err.count("stdout was closed") == 1


# ---- issue 16 E: --help that can be copied from, names no Python types, lists every exit code -------------------

_COMMANDS = ("", "probe", "distill", "eval", "compare", "init", "spec")


def _helps(capsys, monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("COLUMNS", "80")
    helps = {}
    for command in _COMMANDS:
        code, out, _ = run_cli(capsys, *([command] if command else []), "--help")
        assert code == 0, command
        helps[command] = out
    return helps


def _examples(text: str) -> list[str]:
    """The example lines of a help text: each `kdgeo ...` line (with its `\\` continuation lines)."""
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip().startswith("kdgeo ") or (i and lines[i - 1].rstrip().endswith("\\")):
            out.append(line.strip())
    return out


def test_help_examples_stay_on_one_line_at_80_columns(capsys, monkeypatch):
    """Every example of every command's help appears as one unbroken line of its --help at COLUMNS=80 (click's
    re-wrapping split `--text-column` into `--text-` / `column`; copy-paste must work)."""
    from kdgeo.cli import app

    helps = _helps(capsys, monkeypatch)
    sources = {"": app.info.help, **{(c.name or c.callback.__name__): c.help for c in app.registered_commands}}
    sources["eval"] = sources.pop("eval", None) or sources.pop("eval_")
    for command in _COMMANDS:
        examples = _examples(sources[command] or "")
        assert examples, command
        shown = {line.strip() for line in helps[command].splitlines()}
        for example in examples:
            assert example in shown, (command, example)


def test_help_names_no_python_types(capsys, monkeypatch):
    import re

    leak = re.compile(r"<(?:str|int|float|bool|path|file|list\[.*?\]|class '.*?')(?: range)?>|\bOptional\b|\bNoneType\b|"
                      r"\bPath\b|\bList\[")
    for command, text in _helps(capsys, monkeypatch).items():
        assert not leak.search(text), (command, leak.search(text))
    helps = _helps(capsys, monkeypatch)
    assert "TEACHER  " in helps["probe"] and "--max-samples N" in helps["probe"] and "--json PATH" in helps["probe"]


def test_top_level_help_lists_every_exit_code_and_eval_says_it_does_causal_lms(capsys, monkeypatch):
    helps = _helps(capsys, monkeypatch)
    codes = [line.split()[0] for line in helps[""].split("Exit codes:")[1].split("Options:")[0].splitlines()
             if line.strip()]
    assert codes == ["0", "1", "2", "130", "141", "143"]
    flat = " ".join(helps["eval"].split())
    assert "causal language model" in flat and "ROUGE-L" in flat and "perplexity" in flat


def test_summary_records_every_loss_parameter(tiny, tmp_path, capsys):
    """summary.json's losses carry each term's resolved options (defaults filled in), under the spec's names."""
    from cli_helpers import tiny_spec, write_spec

    from kdgeo.spec import LOSS_CLASSES

    spec = tiny_spec(tiny, tmp_path, losses=[{"kind": "ce"}, {"kind": "kd", "temperature": 4.0, "direction": "reverse"},
                                             {"kind": "procrustes", "weight": 0.5, "form": "angular"}, {"kind": "gram"}],
                     train={"max_steps": 1}, monitor={"every": 0})
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "s.toml", spec)), "-q")
    assert code == 0, err
    losses = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())["losses"]
    assert losses == [
        {"kind": "ce", "weight": 1.0},
        {"kind": "kd", "weight": 1.0, "temperature": 4.0, "direction": "reverse", "mix": 0.5},
        {"kind": "procrustes", "weight": 0.5, "form": "angular"},
        {"kind": "gram", "weight": 1.0},
    ]
    for record in losses:  # exactly the keys a [[losses]] table of that kind has (kd's beta: with jsd only)
        unused = {"beta"} if record.get("direction") not in (None, "jsd") else set()
        assert set(record) == set(LOSS_CLASSES[record["kind"]].model_fields) - unused


def test_distill_shows_the_monitor_batchs_n_and_warns_when_it_is_few(tiny, tmp_path, capsys):
    """16 pooled monitor rows against 64-wide teacher states: the run says n and warns (the live values would move
    with n); the warning also reaches --quiet."""
    from cli_helpers import tiny_spec, write_spec

    spec = tiny_spec(tiny, tmp_path, features={"rows": "mean", "pairs": "uniform"}, losses=[{"kind": "ce"}],
                     train={"max_steps": 1}, monitor={"every": 1, "samples": 16})
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "s.toml", spec)))
    flat = " ".join(err.split())
    assert code == 0, err
    assert "monitor batch: n = 16 mean rows" in flat
    assert "warning: the monitor batch: only n = 16 feature rows for hidden states up to 64 wide" in flat, err
