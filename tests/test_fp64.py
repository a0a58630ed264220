"""train.precision = "fp64": float64 weights and losses end to end, for CPU numerics checks and
golden values that do not depend on the machine.

float32 training amplifies last-bit differences between CPU kernels (AVX-512 vs AVX2 vs scalar)
to ~1e-4 relative in a loss after a few steps; in float64 they stay near 1e-12. These tests check
that fp64 really is float64 everywhere a value is made (models, losses, monitor, the teacher's
fine-tune and the teacher-output cache) and that the rest of kdgeo (eval, caches) works on such
runs. The goldens themselves are in test_distillation.py, the losses' own float64 check in test_losses.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli, tiny_lm_spec, tiny_spec, write_spec


def _steps(run: Path) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == "step"]


def _dtypes(model_dir: Path) -> set[torch.dtype]:
    from safetensors.torch import load_file

    return {t.dtype for t in load_file(model_dir / "model.safetensors").values() if t.is_floating_point()}


def test_fp64_run_is_float64_and_eval_reproduces_it(tiny, tmp_path, capsys):
    """Every loss family in one fp64 run: summary.json and the start line say fp64, the student is
    saved in float64, and `kdgeo eval` on the run gives the run's own scores."""
    losses = [{"kind": "ce"}, {"kind": "kd"}, {"kind": "procrustes"}, {"kind": "projection", "weight": 0.1}]
    spec = tiny_spec(tiny, tmp_path, losses=losses, train={"max_steps": 3, "precision": "fp64"}, features={"pairs": [[1, 2], [2, 4]]})
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "run.toml", spec)))
    assert code == 0, err
    assert "precision fp64" in err
    run = tmp_path / "runs" / "t"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "fp64"
    assert _dtypes(run / "student") == {torch.float64}
    assert all(p["procrustes"] >= 0.0 for p in summary["geometry"])
    code, out, err = run_cli(capsys, "eval", str(run), "--json", "-", "--quiet")
    assert code == 0, err
    scores = json.loads(out)["scores"]
    for key in ("accuracy", "macro_f1", "mcc"):
        assert scores[key] == pytest.approx(summary["scores"][key], abs=1e-12)


def test_fp64_teacher_finetune_is_float64_and_cached_apart_from_fp32(tiny, tmp_path, capsys):
    """The teacher's fine-tune follows train.precision: fp64 saves a float64 teacher under its own
    cache key, so an fp32 run fine-tunes (and caches) its own float32 teacher instead of reusing it."""
    spec = tiny_spec(tiny, tmp_path, teacher={"model": str(tiny["teacher"]), "finetune": {"epochs": 0.5, "batch_size": 16}},
                     train={"max_steps": 1})
    path = write_spec(tmp_path / "run.toml", spec)
    code, _, err = run_cli(capsys, "distill", str(path), "--set", "output.name=f64", "--set", "train.precision=fp64", "-q")
    assert code == 0, err
    f64 = json.loads((tmp_path / "runs" / "f64" / "summary.json").read_text())
    assert f64["teacher_finetune"]["cached"] is False and f64["precision"] == "fp64"
    assert _dtypes(Path(f64["teacher_path"])) == {torch.float64}
    code, _, err = run_cli(capsys, "distill", str(path), "--set", "output.name=f32", "--set", "train.precision=fp32", "-q")
    assert code == 0, err
    f32 = json.loads((tmp_path / "runs" / "f32" / "summary.json").read_text())
    assert f32["teacher_finetune"]["cached"] is False and f32["teacher_path"] != f64["teacher_path"]
    assert _dtypes(Path(f32["teacher_path"])) == {torch.float32}


def test_fp64_run_reads_the_teacher_output_cache_as_float64(tiny, tmp_path, capsys):
    """Cached teacher outputs are stored in fp16 and served in the run's float64: losses equal the
    uncached fp64 run's to fp16 rounding (rel 2e-3, abs 1e-5 near 0), as for float32 runs."""
    losses = [{"kind": "ce"}, {"kind": "kd", "temperature": 2.0}, {"kind": "procrustes"}, {"kind": "projection", "weight": 0.1}]
    base = tiny_spec(tiny, tmp_path, losses=losses, train={"max_steps": 3, "precision": "fp64"})
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "plain.toml", {**base, "name": "plain"})), "-q")
    assert code == 0, err
    cached = {**base, "name": "cached", "output": {**base["output"], "teacher_outputs": True, "teacher_outputs_dir": str(tmp_path / "touts")}}
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "cached.toml", cached)))
    assert code == 0, err
    assert "caching teacher outputs" in err
    plain, read = _steps(tmp_path / "runs" / "plain"), _steps(tmp_path / "runs" / "cached")
    assert [e["step"] for e in read] == [1, 2, 3]
    for x, y in zip(read, plain):
        for key in ("ce", "kd", "procrustes", "projection", "loss"):
            assert x[key] == pytest.approx(y[key], rel=2e-3, abs=1e-5), (key, x["step"])


def test_fp64_causal_lm_run_and_eval(tiny_lm, tmp_path, capsys):
    """A causal LM in fp64: response-token losses, generation and `kdgeo eval` (which reproduces
    the run's perplexity and ROUGE-L from the float64 student)."""
    short = {"template": "Q: {prompt}\nA:", "context_template": "Q: {prompt}\nC: {context}\nA:"}  # fits max_prompt_length
    spec = tiny_lm_spec(tiny_lm, tmp_path, losses=[{"kind": "ce"}, {"kind": "kd"}, {"kind": "procrustes"}],
                        data={**tiny_lm_spec(tiny_lm, tmp_path)["data"], **short}, train={"max_steps": 2, "precision": "fp64"})
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "lm.toml", spec)), "-q")
    assert code == 0, err
    run = tmp_path / "runs" / "lm"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "fp64" and _dtypes(run / "student") == {torch.float64}
    code, _, err = run_cli(capsys, "eval", str(run), "--json", str(tmp_path / "eval.json"), "-q")
    assert code == 0, err
    mine = json.loads((tmp_path / "eval.json").read_text())["results"]["model"]["scores"]
    assert mine["perplexity"] == pytest.approx(summary["scores"]["perplexity"], rel=1e-9)
    assert mine["rougeL"] == pytest.approx(summary["scores"]["rougeL"], abs=1e-9)
