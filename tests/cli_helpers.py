"""Running the CLI in-process, and writing small run specs for tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w

REPO = Path(__file__).resolve().parents[1]
"""The repository root: PYTHONPATH for tests that run kdgeo in a fresh process."""


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `kdgeo ARGS` in this process; return (exit code, stdout, stderr)."""
    from kdgeo.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def tiny_spec(tiny: dict[str, Path], tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A fast spec on tiny models: 64 training and 32 evaluation examples of the demo data."""
    spec: dict[str, Any] = {
        "name": "t",
        "seed": 0,
        "teacher": {"model": str(tiny["teacher_clf"])},
        "student": {"init": "teacher-layers", "num_layers": 2},
        "data": {"dataset": "kdgeo:wordnet-supersenses", "max_train_samples": 64, "max_eval_samples": 32, "max_length": 24},
        "features": {"rows": "tokens", "pairs": "uniform"},
        "losses": [{"kind": "ce"}],
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "log_every": 1, "warmup_ratio": 0.0},
        "monitor": {"every": 2, "samples": 16},
        "output": {"dir": str(tmp_path / "runs"), "teacher_cache": str(tmp_path / "cache")},
    }
    return _merge_sections(spec, sections)


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(spec))
    return path


def tiny_lm_spec(tiny_lm: dict[str, Path], tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A fast causal-LM spec: OPT teacher (4 layers) -> 2 copied layers, 48 instructions."""
    spec: dict[str, Any] = {
        "name": "lm",
        "task": "causal-lm",
        "seed": 0,
        "teacher": {"model": str(tiny_lm["opt_teacher"])},
        "student": {"init": "teacher-layers", "num_layers": 2},
        "data": {
            "dataset": str(tiny_lm["train"]), "eval_dataset": str(tiny_lm["eval"]), "prompt_column": "instruction",
            "response_column": "response", "context_column": "context", "max_length": 96,
        },
        "features": {"rows": "tokens", "pairs": "uniform"},
        "losses": [{"kind": "ce"}, {"kind": "kd", "temperature": 1.0}],
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "log_every": 1, "warmup_ratio": 0.0},
        "monitor": {"every": 2, "samples": 8},
        "generate": {"max_new_tokens": 8, "batch_size": 6},
        "output": {"dir": str(tmp_path / "runs"), "teacher_cache": str(tmp_path / "cache")},
    }
    return _merge_sections(spec, sections)


def _merge_sections(spec: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    for key, value in sections.items():
        # student and teacher tables are replaced whole (their fields depend on each other).
        if isinstance(value, dict) and isinstance(spec.get(key), dict) and key not in ("student", "teacher"):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec
