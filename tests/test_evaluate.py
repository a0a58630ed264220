"""kdgeo.evaluate: a classifier's scores against a plain forward pass, and what a run directory supplies."""

from __future__ import annotations

import json

import pytest
import torch

from kdgeo.errors import ModelLoadError
from kdgeo.evaluate import EvalArgs, eval_target, run_eval


def _args(model: str, batch_size: int) -> EvalArgs:
    return EvalArgs(
        model=model, dataset="kdgeo:wordnet-supersenses", config=None, split=None, text_column=None,
        text_pair_column=None, label_column=None, max_samples=40, batch_size=batch_size, device="cpu",
    )


def test_accuracy_equals_a_plain_forward_pass_whatever_the_batch_size(tiny):
    """Batching pads each batch to its own longest example: the scores may not depend on it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdgeo.data import load_split

    result = run_eval(_args(str(tiny["teacher_clf"]), batch_size=7))
    assert (result.samples, result.num_labels, result.split) == (40, 8, "validation")
    rows = load_split("kdgeo:wordnet-supersenses", None, "validation")[:40]
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher_clf"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_clf"]).eval()
    inputs = tokenizer(rows["text"], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    correct = (logits.argmax(-1) == torch.tensor(rows["label"])).double().mean().item()
    assert result.scores["accuracy"] == pytest.approx(correct, abs=1e-12)
    assert run_eval(_args(str(tiny["teacher_clf"]), batch_size=1)).scores == result.scores


def test_a_run_directory_evaluates_its_student_with_the_runs_settings(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    spec = {"task": "classification", "data": {"dataset": "d.jsonl", "max_length": 64}}
    (run / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ModelLoadError, match="a kdgeo run directory without a saved student"):
        eval_target(str(run))
    (run / "student").mkdir()
    (run / "student" / "config.json").write_text("{}")
    target = eval_target(str(run))
    assert (target.location, target.run and target.run.spec) == (str(run / "student"), spec)
    target = eval_target(str(run / "student"))
    assert (target.location, target.run) == (str(run / "student"), None)  # a model directory is itself


def test_a_runs_spec_this_kdgeo_cannot_read_is_named_with_the_fix(tmp_path):
    from kdgeo.errors import KdgeoError

    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "student" / "config.json").write_text("{}")
    (run / "spec.json").write_text(json.dumps({"task": "classification", "data": {"dataset": "d.jsonl", "max_lenght": 64}}))
    with pytest.raises(KdgeoError) as err:
        run_eval(_args(str(run), batch_size=8))
    message = str(err.value)
    assert "spec.json: 3 problems in the run spec" in message and "did you mean 'max_length'?" in message
    assert f"kdgeo eval {run / 'student'} --data" in message


def test_eval_predictions_of_a_classifier_give_its_accuracy_and_the_eval_sets_hash(tiny, tmp_path, capsys):
    """`kdgeo eval --predictions` for a classifier: one record per example, accuracy = mean(correct) exactly,
    the teacher's class with --teacher, and eval_sha256 in the JSON; '-' writes the records alone to stdout."""
    from cli_helpers import run_cli

    from kdgeo.data import load_split
    from kdgeo.rundir import eval_sha256, text_sha256

    model, preds, out = str(tiny["teacher_clf"]), tmp_path / "p.jsonl", tmp_path / "e.json"
    common = ["--data", "kdgeo:wordnet-supersenses", "--max-samples", "20", "-q"]
    code, _, err = run_cli(capsys, "eval", model, *common, "--teacher", model, "--predictions", str(preds), "--json", str(out))
    assert code == 0, err
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    rows = load_split("kdgeo:wordnet-supersenses", None, "validation")[:20]
    assert [r["index"] for r in records] == list(range(20)) and [r["label"] for r in records] == rows["label"]
    assert [r["text_sha256"] for r in records] == [text_sha256([t]) for t in rows["text"]]
    assert all(r["correct"] == (r["prediction"] == r["label"]) and r["teacher_prediction"] == r["prediction"] for r in records)
    result = json.loads(out.read_text())
    assert result["scores"]["accuracy"] == sum(r["correct"] for r in records) / 20
    assert result["eval_sha256"] == eval_sha256((text_sha256([t]), str(y)) for t, y in zip(rows["text"], rows["label"]))
    code, stdout, err = run_cli(capsys, "eval", model, *common, "--predictions", "-")
    assert code == 0, err
    assert [json.loads(line) for line in stdout.splitlines()] == [
        {k: v for k, v in r.items() if k != "teacher_prediction"} for r in records
    ]  # no table on stdout: the JSON lines alone


# --------------------------------------------------------------------------------------------
# --max-length: a default longer than the model's positions is clamped, a set one is an error (issue 16 D)


def test_eval_of_a_model_with_64_positions_clamps_the_default(tiny64):
    notes: list[str] = []
    result = run_eval(_args(str(tiny64["teacher_clf"]), batch_size=16), progress=lambda e: notes.append(
        getattr(e, "message", "")))
    assert result.samples == 40
    assert "--max-length: using 64, the model's max_position_embeddings (the default 128 is longer)" in notes


def test_eval_max_length_the_user_set_too_long_is_an_error(tiny64):
    import dataclasses

    with pytest.raises(ModelLoadError, match=r"--max-length = 128 is longer than the model .*\(64 positions\)"):
        run_eval(dataclasses.replace(_args(str(tiny64["teacher_clf"]), batch_size=16), max_length=128))


def test_eval_with_a_shorter_teacher_clamps_the_runs_length_too(tiny, tiny64):
    import dataclasses

    notes: list[str] = []
    args = dataclasses.replace(_args(str(tiny["teacher_clf"]), batch_size=16), teacher=str(tiny64["teacher_clf"]))
    result = run_eval(args, progress=lambda e: notes.append(getattr(e, "message", "")))
    assert result.teacher_scores is not None
    assert "--max-length: using 64, the teacher's max_position_embeddings (the default 128 is longer)" in notes
