"""Bad input to `kdgeo distill` and `kdgeo eval`: exit 2, one message that says what to change,
no traceback, nothing trained, and no existing run output touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import run_cli, tiny_spec, write_spec
from conftest import write_jsonl


def _local_data(tmp_path: Path, eval_labels: list[int] | None = None) -> dict:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"a small tree {i}", "label": i % 3} for i in range(12)])
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"text": f"a large animal {i}", "label": lab} for i, lab in enumerate(eval_labels or [0, 1, 2])])
    return {"dataset": str(train), "eval_dataset": str(ev), "max_train_samples": None, "max_eval_samples": None}


def _case(case: str, tiny: dict, tmp_path: Path) -> tuple[dict | str, list[str], str]:
    """(spec dict or raw TOML text, extra CLI args, expected message fragment)."""
    base = dict(train={"max_steps": 1})
    if case == "label_column_missing":
        return tiny_spec(tiny, tmp_path, data={"label_column": "category"}, **base), [], "no column 'category' (set by data.label_column)"
    if case == "label_out_of_range":
        return tiny_spec(tiny, tmp_path, data=_local_data(tmp_path, [0, 5]), **base), [], "has label 5, outside 0..2"
    if case == "tokenizer_mismatch":
        student = {"init": "pretrained", "model": str(tiny["student_other_tok"])}
        return tiny_spec(tiny, tmp_path, student=student, features={"rows": "tokens"}, **base), [], 'features.rows = "mean"'
    if case == "pair_out_of_range":
        return tiny_spec(tiny, tmp_path, features={"pairs": [[1, 2], [3, 4]]}, **base), [], "student index 3 is outside 0..2"
    if case == "output_not_writable":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        return tiny_spec(tiny, tmp_path, output={"dir": str(blocker / "runs")}, **base), [], "set output.dir (or --out) to a writable directory"
    if case == "teacher_without_head":
        return tiny_spec(tiny, tmp_path, teacher={"model": str(tiny["teacher"])}, **base), [], "Add a [teacher.finetune] table"
    if case == "mse_unequal_widths":
        student = {"init": "config", "arch": {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2}}
        return tiny_spec(tiny, tmp_path, student=student, losses=[{"kind": "mse"}], **base), [], "need equal widths"
    if case == "teacher_missing":
        return tiny_spec(tiny, tmp_path, teacher={"model": str(tmp_path / "nope")}, **base), [], "no such directory"
    if case == "student_layers_out_of_range":
        return tiny_spec(tiny, tmp_path, student={"init": "teacher-layers", "layers": [1, 7]}, **base), [], "student.layers = [1, 7]"
    if case == "fp16_on_cpu":
        return tiny_spec(tiny, tmp_path, train={"max_steps": 1, "precision": "fp16", "device": "cpu"}), [], "needs a CUDA device"
    if case == "single_file_without_eval":
        data = _local_data(tmp_path)
        data["eval_dataset"] = None
        return tiny_spec(tiny, tmp_path, data={k: v for k, v in data.items()}, **base), [], "set data.eval_dataset"
    if case == "malformed_toml":
        return "name = \n[teacher", [], "is not valid TOML"
    if case == "unknown_key":
        return tiny_spec(tiny, tmp_path, trian={"epochs": 1}), [], "did you mean 'train'?"
    if case == "bad_override":
        return tiny_spec(tiny, tmp_path, **base), ["--set", "train.epochs=-1"], "train.epochs: Input should be greater than 0"
    if case == "unknown_preset":
        return tiny_spec(tiny, tmp_path, **base), ["--preset", "nope"], "no such preset"
    if case == "cuda_missing":
        return tiny_spec(tiny, tmp_path, train={"max_steps": 1, "device": "cuda"}), [], "CUDA is not available"
    if case in ("teacher_cache_not_writable", "teacher_outputs_dir_not_writable"):
        # Found in pre-flight, before an expensive fine-tune or cache build (a path under a file
        # fails for root too, unlike a chmod).
        blocker = tmp_path / "file"
        blocker.write_text("x")
        if case == "teacher_cache_not_writable":
            teacher = {"model": str(tiny["teacher"]), "finetune": {"epochs": 1}}
            spec = tiny_spec(tiny, tmp_path, teacher=teacher, **base)
            spec["output"]["teacher_cache"] = str(blocker / "cache")
            return spec, [], "output.teacher_cache = '" + str(blocker / "cache") + "' is not writable"
        spec = tiny_spec(tiny, tmp_path, losses=[{"kind": "kd"}], **base)
        spec["output"].update(teacher_outputs=True, teacher_outputs_dir=str(blocker / "outputs"))
        return spec, [], "output.teacher_outputs_dir = '" + str(blocker / "outputs") + "' is not writable"
    raise AssertionError(case)


CASES = [
    "label_column_missing", "label_out_of_range", "tokenizer_mismatch", "pair_out_of_range", "output_not_writable",
    "teacher_without_head", "mse_unequal_widths", "teacher_missing", "student_layers_out_of_range", "fp16_on_cpu",
    "single_file_without_eval", "malformed_toml", "unknown_key", "bad_override", "unknown_preset", "cuda_missing",
    "teacher_cache_not_writable", "teacher_outputs_dir_not_writable",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_before_training_with_exit_2(tiny, tmp_path, capsys, case):
    import torch

    if case == "cuda_missing" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    spec, extra, expect = _case(case, tiny, tmp_path)
    path = tmp_path / "run.toml"
    if isinstance(spec, str):
        path.write_text(spec)
    else:
        if spec.get("data", {}).get("eval_dataset", "x") is None:
            del spec["data"]["eval_dataset"]
        spec["data"] = {k: v for k, v in spec["data"].items() if v is not None}
        write_spec(path, spec)
    code, out, err = run_cli(capsys, "distill", str(path), *extra)
    flat = " ".join(err.split())
    assert code == 2, (out, err)
    assert expect in flat, err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("runs/*/metrics.jsonl")), "nothing may be trained or written on bad input"


def test_an_existing_run_is_never_overwritten_without_asking(tiny, tmp_path, capsys):
    path = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path, train={"max_steps": 1}))
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0, err
    summary = (tmp_path / "runs" / "t" / "summary.json").read_bytes()
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 2
    assert "already exists" in " ".join(err.split()) and "output.overwrite = true" in " ".join(err.split())
    assert (tmp_path / "runs" / "t" / "summary.json").read_bytes() == summary
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "output.overwrite=true")
    assert code == 0, err


def test_a_failed_predictions_write_keeps_the_run_for_resume(tiny, tmp_path, capsys, monkeypatch):
    """predictions.jsonl is written before summary.json: a disk error on it is exit 2 with one message, no
    summary.json, the end-of-training checkpoint kept, and --resume writes both."""
    import errno
    import os

    from kdgeo import rundir

    real = rundir.write_predictions

    def full_disk(path, records):
        # what write_text_atomic makes of an OSError
        raise rundir.OutputError(f"cannot write {path}: {os.strerror(errno.ENOSPC)}. Check the directory has space.")

    monkeypatch.setattr(rundir, "write_predictions", full_disk)
    path = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path, train={"max_steps": 2}, monitor={"every": 0}))
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    flat = " ".join(err.split())
    assert code == 2 and "No space left on device" in flat and "--resume" in flat and "Traceback" not in err
    run = tmp_path / "runs" / "t"
    assert not (run / "summary.json").exists() and not (run / "predictions.jsonl").exists()
    assert (run / "checkpoint-2").is_dir()
    monkeypatch.setattr(rundir, "write_predictions", real)
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--resume")
    assert code == 0, err
    records = rundir.read_predictions(run)
    summary = json.loads((run / "summary.json").read_text())
    assert records is not None and len(records) == summary["data"]["eval_examples"] == 32
    assert summary["scores"]["accuracy"] == sum(r["correct"] for r in records) / 32
    assert not (run / "checkpoint-2").exists()


@pytest.mark.parametrize("case", ["no_head", "not_a_model", "wrong_task", "no_data"])
def test_eval_bad_input_exit_2(tiny, tmp_path, capsys, case):
    args: list[str]
    if case == "no_head":
        args, expect = [str(tiny["teacher"]), "--data", "kdgeo:wordnet-supersenses"], "with no trained classification head"
    elif case == "not_a_model":
        args, expect = [str(tmp_path / "nope"), "--data", "kdgeo:wordnet-supersenses"], "no such directory"
    elif case == "wrong_task":
        data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a tree", "label": 11}, {"text": "a dog", "label": 0}])
        args, expect = [str(tiny["teacher_clf"]), "--data", str(data)], "the data has 12 classes but the model"
    else:
        args, expect = [str(tiny["teacher_clf"])], "give --data"
    code, out, err = run_cli(capsys, "eval", *args)
    assert code == 2, (out, err)
    assert expect in " ".join(err.split()), err
    assert "Traceback" not in err


def test_eval_scores_a_model_with_a_teacher(tiny, capsys, tmp_path):
    out_json = tmp_path / "scores.json"
    code, out, err = run_cli(
        capsys, "eval", str(tiny["teacher_clf"]), "--data", "kdgeo:wordnet-supersenses", "--max-samples", "40",
        "--teacher", str(tiny["teacher_clf"]), "--json", str(out_json),
    )
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["samples"] == 40
    assert result["scores"]["teacher_agreement"] == 1.0  # a model agrees with itself
    assert result["scores"]["accuracy"] == result["teacher_scores"]["accuracy"]
    assert "accuracy" in out and "teacher" in out


# ---- non-finite hidden states and few rows per geometry term ----------------------------------


def _nan_teacher(tiny: dict, dest: Path) -> Path:
    """The tiny classifier with block 1's output weights set to NaN: hidden states 2.. are NaN."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_clf"])
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight.fill_(float("nan"))
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny["teacher_clf"]).save_pretrained(dest)
    return dest


def test_nan_hidden_states_are_named_as_nonfinite_not_read_as_zero_variance(tiny, tmp_path, capsys):
    """NaN features used to count as "zero variance": D^2 = 2, zero gradient, exit 0. Now the
    monitor reports them and the loss term with its layer pair stops the run (exit 2)."""
    from kdgeo.rundir import read_jsonl

    teacher = _nan_teacher(tiny, tmp_path / "nan-teacher")
    spec = tiny_spec(
        tiny, tmp_path, teacher={"model": str(teacher)}, student={"init": "pretrained", "model": str(tiny["student"])},
        losses=[{"kind": "ce"}, {"kind": "procrustes"}], features={"pairs": [[1, 2]]}, train={"max_steps": 2},
    )
    code, out, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "run.toml", spec)), "--quiet")
    flat = " ".join(err.split())
    assert code == 2, (out, err)
    assert "non-finite value at step 1" in flat and "procrustes/1-2" in flat, err
    assert "teacher hidden state of pair 1-2" in flat, err  # the monitor's warning, shown even with --quiet
    assert "Traceback" not in err
    events = read_jsonl(tmp_path / "runs" / "t" / "metrics.jsonl")
    flagged = [e for e in events if e["event"] == "nonfinite" and e["action"] == "monitor"]
    assert flagged and flagged[0]["step"] == 0 and flagged[0]["terms"] == ["teacher hidden state of pair 1-2"]
    monitor = next(e for e in events if e["event"] == "monitor")
    assert monitor["pairs"][0]["procrustes"] is None  # NaN is written as null, never as 2.0


def test_probe_pairs_refuse_nan_hidden_states(tiny, tmp_path, capsys):
    teacher = _nan_teacher(tiny, tmp_path / "nan-teacher")
    spec = tiny_spec(
        tiny, tmp_path, teacher={"model": str(teacher)}, student={"init": "pretrained", "model": str(tiny["student"])},
        losses=[{"kind": "ce"}, {"kind": "procrustes"}], features={"pairs": "probe"}, train={"max_steps": 1},
    )
    code, out, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "run.toml", spec)), "--quiet")
    flat = " ".join(err.split())
    assert code == 2, (out, err)
    assert 'features.pairs = "probe": the teacher produced NaN or inf hidden states (index 2, 3, 4;' in flat, err
    assert "Traceback" not in err


def test_probe_refuses_nan_hidden_states(tiny, tmp_path, capsys):
    teacher = _nan_teacher(tiny, tmp_path / "nan-teacher")
    code, out, err = run_cli(
        capsys, "probe", str(teacher), str(tiny["student"]), "--data", "kdgeo:wordnet-supersenses", "--max-samples", "16",
    )
    flat = " ".join(err.split())
    assert code == 2, (out, err)
    assert "produced NaN or inf hidden states (index 2, 3, 4; 0 = embeddings)" in flat, err
    assert "Traceback" not in err


def test_few_pooled_rows_per_geometry_term_warn_with_the_chance_level(tiny, tmp_path):
    """8 pooled rows against 64-wide features: the warning states the chance-level D^2 of
    independent features of those shapes, which is far below 2."""
    from kdgeo.distillation import run_distill
    from kdgeo.events import Event, RunWarning
    from kdgeo.plan import chance_procrustes
    from kdgeo.spec import validate_spec

    events: list[Event] = []
    spec = tiny_spec(
        tiny, tmp_path, losses=[{"kind": "ce"}, {"kind": "procrustes"}], features={"rows": "mean", "pairs": [[1, 2]]},
        train={"max_steps": 1, "batch_size": 8}, monitor={"every": 0, "samples": 8},
    )
    run_distill(validate_spec(spec), progress=events.append)
    warnings = [e.message for e in events if isinstance(e, RunWarning)]
    assert len(warnings) == 1, warnings
    chance = chance_procrustes(8, 64, 64)
    assert 0.0 < chance < 0.5  # the bias the warning is about
    assert "8 pooled rows (one per example)" in warnings[0] and f"D^2 = {chance:.3f}" in warnings[0]
    # enough rows: no warning
    events.clear()
    spec = tiny_spec(
        tiny, tmp_path / "tokens", losses=[{"kind": "ce"}, {"kind": "procrustes"}], features={"rows": "tokens", "pairs": [[1, 2]]},
        train={"max_steps": 1, "batch_size": 16},
    )
    run_distill(validate_spec(spec), progress=events.append)
    assert not [e for e in events if isinstance(e, RunWarning)]


def test_chance_procrustes_matches_the_documented_bias():
    """Independent 768- and 384-wide features at n = 32 look aligned (D^2 ~ 0.03, README)."""
    from kdgeo.plan import chance_procrustes

    assert chance_procrustes(32, 768, 384) == pytest.approx(0.03, abs=0.01)
    assert chance_procrustes(4096, 64, 64) > 1.7
