"""`kdgeo distill` and `kdgeo eval` end to end on tiny in-process models.

Golden values were recorded once from these exact specs on torch 2.13 CPU and pinned here on
purpose (rtol 1e-4); a change that moves them must say why in the CHANGELOG.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli, tiny_spec, write_spec
from kdgeo.distill import run_distill
from kdgeo.rundir import read_jsonl
from kdgeo.spec import validate_spec

GOLDEN_RTOL = 1e-4


def _events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["event"] == kind]


def _distill(tiny, tmp_path, **sections):
    spec = validate_spec(tiny_spec(tiny, tmp_path, **sections))
    return run_distill(spec)


# ---- every loss: 3 steps, pinned values -------------------------------------------------------

LOSS_CASES = {
    "ce": [{"kind": "ce"}],
    "kd": [{"kind": "kd", "temperature": 2.0}],
    "procrustes": [{"kind": "procrustes"}],
    "procrustes_angular": [{"kind": "procrustes", "form": "angular"}],
    "gram": [{"kind": "gram"}],
    "cka": [{"kind": "cka"}],
    "projection": [{"kind": "projection"}],
    "mse": [{"kind": "mse"}],
    "cosine": [{"kind": "cosine"}],
    "ce+kd+procrustes": [{"kind": "ce"}, {"kind": "kd"}, {"kind": "procrustes", "weight": 0.5}],
}

# Step-3 total loss of each case: student = blocks 1 and 3 of the tiny 4-layer teacher_clf,
# pairs [1, 2] and [2, 4], 16 examples a step. Recorded on purpose from one run.
GOLDEN_LOSS: dict[str, float] = {
    "ce": 2.0769972801208496,
    "kd": 0.0001293141394853592,
    "procrustes": 0.0008083581924438477,
    "procrustes_angular": 0.03793482109904289,
    "gram": 0.00011945143342018127,
    "cka": 0.0015999078750610352,
    "projection": 1.1296942234039307,
    "mse": 0.0024335349444299936,
    "cosine": 0.0012162625789642334,
    "ce+kd+procrustes": 2.077695846557617,
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_every_loss_runs_and_matches_its_pinned_value(tiny, tmp_path, case):
    result = _distill(tiny, tmp_path, losses=LOSS_CASES[case], train={"max_steps": 3}, features={"pairs": [[1, 2], [2, 4]]})
    steps = _events(result.run_dir, "step")
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert steps[-1]["loss"] == pytest.approx(GOLDEN_LOSS[case], rel=GOLDEN_RTOL)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    assert set(summary["scores"]) >= {"accuracy", "macro_f1", "mcc", "teacher_agreement"}
    assert [p["student"] for p in summary["geometry"]] == [1, 2]


# ---- every student init, then reload and `kdgeo eval` -----------------------------------------

INIT_CASES = {
    "teacher-layers": {"init": "teacher-layers", "layers": [0, 3]},
    "config": {"init": "config", "arch": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}},
    "pretrained": {"init": "pretrained", "model": None},
}
GOLDEN_INIT_LOSS: dict[str, float] = {
    "teacher-layers": 2.078977346420288,
    "config": 2.7407782077789307,
    "pretrained": 2.750636100769043,
}


@pytest.mark.parametrize("init", list(INIT_CASES))
def test_every_student_init_trains_saves_reloads_and_evaluates(tiny, tmp_path, capsys, init):
    from transformers import AutoModelForSequenceClassification

    student = dict(INIT_CASES[init])
    if init == "pretrained":
        student["model"] = str(tiny["student"])
    losses = [{"kind": "ce"}, {"kind": "kd"}, {"kind": "procrustes"}, {"kind": "gram", "weight": 0.5}]
    result = _distill(tiny, tmp_path, student=student, losses=losses, train={"max_steps": 3})
    steps = _events(result.run_dir, "step")
    assert steps[-1]["loss"] == pytest.approx(GOLDEN_INIT_LOSS[init], rel=GOLDEN_RTOL)
    student_dir = result.run_dir / "student"
    model = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert model.config.num_labels == 8
    assert model.config.num_hidden_layers == 2
    assert (student_dir / "model.safetensors").exists()

    code, out, err = run_cli(capsys, "eval", str(result.run_dir), "--json", "-", "--quiet")
    assert code == 0, err
    scores = json.loads(out)["scores"]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    for key in ("accuracy", "macro_f1", "mcc"):
        assert scores[key] == pytest.approx(summary["scores"][key], abs=1e-12)


# ---- the geometry loss does what it says -----------------------------------------------------


def test_procrustes_loss_lowers_the_procrustes_distance_compared_with_ce_alone(tiny, tmp_path):
    student = {"init": "config", "arch": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}}
    common = dict(student=student, train={"max_steps": 30, "lr": 2e-3}, monitor={"every": 0, "samples": 32})
    ce = _distill(tiny, tmp_path / "ce", losses=[{"kind": "ce"}], **common)
    geo = _distill(tiny, tmp_path / "geo", losses=[{"kind": "ce"}, {"kind": "kd"}, {"kind": "procrustes", "weight": 5.0}], **common)
    d_ce = [p["procrustes"] for p in ce.summary["geometry"]]
    d_geo = [p["procrustes"] for p in geo.summary["geometry"]]
    start = [p["procrustes"] for p in _events(geo.run_dir, "monitor")[0]["pairs"]]
    assert start == pytest.approx([p["procrustes"] for p in _events(ce.run_dir, "monitor")[0]["pairs"]], abs=1e-9)  # same seed, same start
    for a, b, s in zip(d_geo, d_ce, start):
        assert a < b, (d_geo, d_ce)
        assert a < s, (d_geo, start)


# ---- accumulation and determinism ------------------------------------------------------------


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "student" / "model.safetensors")


def test_gradient_accumulation_gives_the_same_losses_and_update(tiny, tmp_path):
    losses = [{"kind": "ce"}, {"kind": "kd"}]
    one = _distill(tiny, tmp_path / "a", losses=losses, train={"max_steps": 2, "batch_size": 32, "grad_accum": 1, "lr": 1e-3})
    two = _distill(tiny, tmp_path / "b", losses=losses, train={"max_steps": 2, "batch_size": 8, "grad_accum": 4, "lr": 1e-3})
    for a, b in zip(_events(one.run_dir, "step"), _events(two.run_dir, "step")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-5)
    wa, wb = _weights(one.run_dir), _weights(two.run_dir)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)


def test_same_seed_same_numbers(tiny, tmp_path):
    losses = [{"kind": "ce"}, {"kind": "kd"}, {"kind": "procrustes"}]
    a = _distill(tiny, tmp_path / "a", losses=losses, train={"max_steps": 4})
    b = _distill(tiny, tmp_path / "b", losses=losses, train={"max_steps": 4})
    assert [s["loss"] for s in _events(a.run_dir, "step")] == [s["loss"] for s in _events(b.run_dir, "step")]
    wa, wb = _weights(a.run_dir), _weights(b.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = _distill(tiny, tmp_path / "c", losses=losses, train={"max_steps": 4}, seed=1)
    assert [s["loss"] for s in _events(a.run_dir, "step")] != [s["loss"] for s in _events(c.run_dir, "step")]


# ---- teacher fine-tuning and its cache ---------------------------------------------------------


def test_teacher_without_head_is_finetuned_once_then_reused(tiny, tmp_path, capsys):
    spec = tiny_spec(tiny, tmp_path, teacher={"model": str(tiny["teacher"]), "finetune": {"epochs": 0.5, "batch_size": 16}}, train={"max_steps": 1})
    path = write_spec(tmp_path / "run.toml", spec)
    code, _, err = run_cli(capsys, "distill", str(path), "--set", "output.name=first")
    assert code == 0, err
    assert "fine-tuning the teacher" in err
    first = json.loads((tmp_path / "runs" / "first" / "summary.json").read_text())
    assert first["teacher_finetune"]["cached"] is False
    code, _, err = run_cli(capsys, "distill", str(path), "--set", "output.name=second")
    assert code == 0, err
    assert "using the cached fine-tuned teacher" in err
    second = json.loads((tmp_path / "runs" / "second" / "summary.json").read_text())
    assert second["teacher_finetune"]["cached"] is True
    assert second["teacher_path"] == first["teacher_path"]
    assert second["teacher_scores"] == first["teacher_scores"]
    # Fine-tuning is deterministic: a fresh cache gives bit-identical teacher weights (the new
    # head is initialised from the seeded RNG).
    other_cache = tmp_path / "cache2"
    code, _, err = run_cli(capsys, "distill", str(path), "--set", "output.name=again", "--set", f"output.teacher_cache='{other_cache}'")
    assert code == 0, err
    again = json.loads((tmp_path / "runs" / "again" / "summary.json").read_text())
    assert again["teacher_finetune"]["cached"] is False
    from safetensors.torch import load_file

    w1 = load_file(Path(first["teacher_path"]) / "model.safetensors")
    w2 = load_file(Path(again["teacher_path"]) / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # A different fine-tuning hyper-parameter is a different cache entry.
    code, _, err = run_cli(capsys, "distill", str(path), "--set", "output.name=third", "--set", "teacher.finetune.lr=1e-4")
    assert code == 0, err
    third = json.loads((tmp_path / "runs" / "third" / "summary.json").read_text())
    assert third["teacher_path"] != first["teacher_path"]


# ---- CLI output modes ------------------------------------------------------------------------


def test_json_lines_on_stdout_and_plain_lines_on_stderr(tiny, tmp_path, capsys):
    path = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path, losses=[{"kind": "ce"}, {"kind": "procrustes"}], train={"max_steps": 2}))
    code, out, err = run_cli(capsys, "distill", str(path), "--json")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "done" and "start" in kinds and "monitor" in kinds and "eval" in kinds
    assert "step 2/2" in err and "monitor step" in err
    code, out, err = run_cli(capsys, "distill", str(path), "--quiet", "--set", "output.name=q")
    assert code == 0 and out == "" and err == ""


def test_loader_workers_give_the_same_run(tiny, tmp_path, capsys):
    """Batches collated ahead in 2 worker processes: the same losses, bit for bit, as inline collation."""
    spec = tiny_spec(tiny, tmp_path, losses=[{"kind": "ce"}, {"kind": "kd"}, {"kind": "procrustes"}], train={"grad_accum": 2, "epochs": 2})
    path = write_spec(tmp_path / "w.toml", spec)
    runs = {}
    for workers in (0, 2):
        code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", f"train.loader_workers={workers}", "--set", f"output.name=w{workers}")
        assert code == 0, err
        lines = (tmp_path / "runs" / f"w{workers}" / "metrics.jsonl").read_text().splitlines()
        events = [json.loads(line) for line in lines]
        runs[workers] = [{k: v for k, v in e.items() if k != "samples_per_s"} for e in events if e["event"] in ("step", "monitor", "eval")]
    assert runs[0] == runs[2] and runs[0]
