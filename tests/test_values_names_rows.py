"""Issue 11, sections E and F, beyond the spec: rows per geometry step at run time.
(The spec-level rules are in tests/test_spec.py, the CLI cases in tests/test_bad_inputs.py; decoders and
first-token rows in tests/test_models.py, devices in tests/test_runtime.py, the run directory's name in
tests/test_rundir.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

from cli_helpers import tiny_spec
from kdgeo.distillation import run_distill
from kdgeo.events import Event, RunWarning, Stage
from kdgeo.geometry import procrustes_distance
from kdgeo.rundir import read_jsonl
from kdgeo.spec import validate_spec


# ---- why 3 rows: the degenerate values the spec rule prevents -------------------------------


def test_procrustes_on_one_or_two_pooled_rows_is_degenerate():
    """n = 1: centring leaves zeros, D_P^2 = 2 whatever the features; n = 2: one direction per
    side, D_P^2 = 0 whatever the features. n = 3 already tells different features apart."""
    gen = torch.Generator().manual_seed(0)
    for n, expected in ((1, 2.0), (2, 0.0)):
        for _ in range(3):
            x = torch.randn(n, 16, generator=gen, dtype=torch.float64)  # (n, d_t)
            y = torch.randn(n, 8, generator=gen, dtype=torch.float64)  # (n, d_s)
            assert float(procrustes_distance(x, y)) == pytest.approx(expected, abs=1e-12)
    x = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    assert 1e-3 < float(procrustes_distance(x, y)) < 2 - 1e-3


# ---- the short last batch of an epoch (epoch_batches itself: tests/test_loop.py) ----------------


def test_pooled_geometry_run_never_steps_on_the_two_row_tail(tiny, tmp_path):
    """66 examples in batches of 16 leave a tail of 2: its Procrustes loss would be 0 for any
    features (before: a 5th step per epoch with procrustes = 0). Now 4 steps, all informative."""
    events: list[Event] = []
    spec = tiny_spec(
        tiny, tmp_path, data={"max_train_samples": 66}, features={"rows": "mean", "pairs": "last"},
        losses=[{"kind": "procrustes"}], train={"epochs": 1, "batch_size": 16},
    )
    result = run_distill(validate_spec(spec), progress=events.append)
    steps = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if r["event"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert json.loads((result.run_dir / "summary.json").read_text())["steps"] == 4
    assert any(isinstance(e, (Stage, RunWarning)) and "2 training example(s) per epoch left out" in e.message for e in events)


def test_token_rows_keep_the_short_tail(tiny, tmp_path):
    spec = tiny_spec(
        tiny, tmp_path, data={"max_train_samples": 66}, losses=[{"kind": "procrustes"}],
        train={"epochs": 1, "batch_size": 16},
    )
    result = run_distill(validate_spec(spec))
    assert json.loads((result.run_dir / "summary.json").read_text())["steps"] == 5
