"""`kdgeo distill` and `kdgeo eval` end to end on tiny in-process models.

Golden values are the step-3 losses of these exact specs with train.precision = "fp64" on the
portable tiny models (fixture ``tiny_golden``: the same initial weights on every CPU), recorded
once on torch 2.13 CPU and pinned here on purpose at rtol 1e-6. In float64 the CPU's kernels
(scalar, AVX2, AVX-512; one thread or many) move them by at most 3e-10 relative (measured under
ATEN_CPU_CAPABILITY=default with oneDNN/MKL capped at AVX2, =avx2 and OMP_NUM_THREADS=1), while
float32 training amplified such differences to 7e-4. The same specs in float32 are checked against
the goldens to float32 accuracy (rtol 5e-3; measured gap 7e-4, the kd loss). A change that moves
a golden must say why in the CHANGELOG; `.ci/run` reruns every test named *golden* or *pinned*
under other CPU kernels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli, tiny_spec, write_spec
from kdgeo.distillation import run_distill
from kdgeo.rundir import read_jsonl
from kdgeo.spec import validate_spec

GOLDEN_RTOL = {"fp64": 1e-6, "fp32": 5e-3}
"""Tolerance of a step loss against its golden, by train.precision."""


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
# pairs [1, 2] and [2, 4], 16 examples a step, train.precision = "fp64". Recorded on purpose from
# one run (torch 2.13 CPU, AVX2); they moved from float32 values when the goldens became float64.
GOLDEN_LOSS: dict[str, float] = {
    "ce": 2.0729494878255497,
    "kd": 0.0001391834634580525,
    "procrustes": 0.0008545428395823063,
    "procrustes_angular": 0.03914600962978884,
    "gram": 0.0001364395430473314,
    "cka": 0.0018223540789986115,
    "projection": 1.1999157881604225,
    "mse": 0.0025225820788132326,
    "cosine": 0.0012606368043072136,
    "ce+kd+procrustes": 2.074719014778188,
}


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_every_loss_runs_and_matches_its_golden_value(tiny_golden, tmp_path, case, precision):
    """fp64: the pinned value at rtol 1e-6; fp32 (the CPU default): the same run to float32 accuracy."""
    train = {"max_steps": 3, "precision": precision}
    result = _distill(tiny_golden, tmp_path, losses=LOSS_CASES[case], train=train, features={"pairs": [[1, 2], [2, 4]]})
    steps = _events(result.run_dir, "step")
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert steps[-1]["loss"] == pytest.approx(GOLDEN_LOSS[case], rel=GOLDEN_RTOL[precision])
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["precision"] == precision
    assert summary["steps"] == 3
    assert set(summary["scores"]) >= {"accuracy", "macro_f1", "mcc", "teacher_agreement"}
    assert [p["student"] for p in summary["geometry"]] == [1, 2]


# ---- every student init, then reload and `kdgeo eval` -----------------------------------------

INIT_CASES = {
    "teacher-layers": {"init": "teacher-layers", "layers": [0, 3]},
    "config": {"init": "config", "arch": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}},
    "pretrained": {"init": "pretrained", "model": None},
}
# Step-3 losses with ce + kd + procrustes + 0.5 gram, train.precision = "fp64"; recorded like GOLDEN_LOSS.
GOLDEN_INIT_LOSS: dict[str, float] = {
    "teacher-layers": 2.075027724301007,
    "config": 2.7236921120516313,
    "pretrained": 2.7167773917250537,
}


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("init", list(INIT_CASES))
def test_every_student_init_matches_its_golden_loss_and_evaluates(tiny_golden, tmp_path, capsys, init, precision):
    """The golden loss (fp64 at rtol 1e-6, fp32 to float32 accuracy); the student is saved in the
    dtype it trained in, and `kdgeo eval` on the run reproduces its scores."""
    from transformers import AutoModelForSequenceClassification

    student = dict(INIT_CASES[init])
    if init == "pretrained":
        student["model"] = str(tiny_golden["student"])
    losses = [{"kind": "ce"}, {"kind": "kd"}, {"kind": "procrustes"}, {"kind": "gram", "weight": 0.5}]
    train = {"max_steps": 3, "precision": precision}
    result = _distill(tiny_golden, tmp_path, student=student, losses=losses, train=train)
    steps = _events(result.run_dir, "step")
    assert steps[-1]["loss"] == pytest.approx(GOLDEN_INIT_LOSS[init], rel=GOLDEN_RTOL[precision])
    student_dir = result.run_dir / "student"
    model = AutoModelForSequenceClassification.from_pretrained(student_dir)
    saved_dtype = {"fp64": torch.float64, "fp32": torch.float32}[precision]
    assert next(model.parameters()).dtype == saved_dtype  # the student is saved as it was trained
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


# ---- train.save_best and train.early_stopping_patience (issue 16 C) ------------------------------------------

_BEST_TRAIN = {"eval_every": 1, "lr": 1e-3, "schedule": "constant", "save_best": "accuracy"}
"""Evaluations after every step at a constant learning rate: a run cut at step k trains exactly the first k steps
of a longer one, so the best student can be checked against a run that stops at the best step."""


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "student" / "model.safetensors")


def _expected_best(evals: list[dict], higher: bool = True) -> dict:
    """The first evaluation with the best finite accuracy: a plain reference for kdgeo.best."""
    best = None
    for e in evals:
        v = e["scores"]["accuracy"]
        if math.isfinite(v) and (best is None or (v > best["scores"]["accuracy"] if higher else v < best["scores"]["accuracy"])):
            best = e
    return best


def test_save_best_keeps_the_best_evaluations_student_and_reports_both(tiny, tmp_path):
    result = _distill(tiny, tmp_path, train={**_BEST_TRAIN, "max_steps": 6}, output={"name": "best"})
    s, evals = result.summary, _events(result.run_dir, "eval")
    assert [e["step"] for e in evals] == list(range(1, 7))  # the final evaluation counts too
    best = _expected_best(evals)
    assert best["step"] < 6, "this spec's accuracy peaks early; the test needs a best before the last step"
    assert (s["best_metric"], s["best_step"], s["best_score"], s["stopped_early"]) == ("accuracy", best["step"], best["scores"]["accuracy"], False)
    assert s["scores"] == best["scores"]  # the saved student evaluated again gives its first evaluation's scores
    assert s["final_scores"] == evals[-1]["scores"] and s["steps"] == 6
    assert len(read_jsonl(result.run_dir / "predictions.jsonl")) == 32
    # student/ is the student of the best step, bit for bit: a run that stops there.
    ref = _distill(tiny, tmp_path, train={k: v for k, v in {**_BEST_TRAIN, "max_steps": best["step"]}.items() if k != "save_best"}, output={"name": "ref"})
    wa, wb = _weights(result.run_dir), _weights(ref.run_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ref.summary["scores"] == s["scores"]
    assert not {"best_step", "best_score", "best_metric", "final_scores", "stopped_early"} & ref.summary.keys()


def test_early_stopping_ends_the_run_after_patience_evaluations_without_improvement(tiny, tmp_path):
    result = _distill(tiny, tmp_path, train={**_BEST_TRAIN, "max_steps": 12, "early_stopping_patience": 2}, output={"name": "es"})
    s, evals = result.summary, _events(result.run_dir, "eval")
    # The reference: count evaluations since the best, stop when the count reaches the patience.
    best, bad, stop = None, 0, None
    for e in evals:
        v = e["scores"]["accuracy"]
        if best is None or v > best:
            best, bad = v, 0
        else:
            bad += 1
        if bad == 2:
            stop = e["step"]
            break
    assert stop is not None and stop < 12, [e["scores"]["accuracy"] for e in evals]
    assert evals[-1]["step"] == stop and s["steps"] == stop and s["stopped_early"] is True
    assert max(e["step"] for e in _events(result.run_dir, "step")) == stop
    assert s["best_score"] == best and s["scores"]["accuracy"] == best and s["final_scores"] == evals[-1]["scores"]
    assert not list(result.run_dir.glob("checkpoint-*"))  # the end-of-training checkpoint went with summary.json


def test_save_best_and_early_stopping_errors_exit_2(tiny, tmp_path, capsys):
    path = write_spec(tmp_path / "r.toml", tiny_spec(tiny, tmp_path))
    # f1 needs two labels; the demo data has 8 (known only once the data is read).
    code, _, err = run_cli(capsys, "distill", str(path), "--set", "train.save_best=f1")
    flat = " ".join(err.split())
    assert code == 2 and "two-label" in flat and "8 labels" in flat and "macro_f1" in flat
    # 64 examples in batches of 16: 4 steps per epoch, so with eval_every = 0 a 4-step run evaluates only at its end.
    code, _, err = run_cli(
        capsys, "distill", str(path), "--set", "train.max_steps=4", "--set", "train.save_best=accuracy", "--set", "train.early_stopping_patience=1"
    )
    flat = " ".join(err.split())
    assert code == 2 and "only evaluation is the final one" in flat and "an epoch (4 steps)" in flat
    assert not (tmp_path / "runs" / "t").exists()


def test_a_default_max_length_is_clamped_recorded_and_kept_on_resume(tiny64, tmp_path, capsys):
    """Issue 16 D: models of 64 positions, data.max_length left at its default 128: the run uses 64, says so, records
    it in spec.json (what `kdgeo eval RUN` reads), and --resume of the spec file goes on with it."""
    spec = tiny_spec(tiny64, tmp_path, train={"max_steps": 1})
    del spec["data"]["max_length"]
    path = write_spec(tmp_path / "run.toml", spec)
    code, _, err = run_cli(capsys, "distill", str(path))
    assert code == 0, err
    assert "data.max_length: using 64, the teacher's max_position_embeddings (the default 128 is longer)" in err
    run = tmp_path / "runs" / "t"
    assert json.loads((run / "spec.json").read_text())["data"]["max_length"] == 64
    (run / "summary.json").unlink()
    code, _, err = run_cli(capsys, "distill", str(path), "--resume", "-q")
    assert code == 0, err
    assert json.loads((run / "spec.json").read_text())["data"]["max_length"] == 64
    code, _, err = run_cli(capsys, "eval", str(run), "-q")
    assert code == 0, err
