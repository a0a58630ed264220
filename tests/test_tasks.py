"""kdgeo.tasks: what each task owns -- row masks, targets, loss weights, summary fields."""

from __future__ import annotations

import pytest
import torch

from cli_helpers import tiny_lm_spec, tiny_spec
from kdgeo import data as data_mod
from kdgeo import events

SHORT = {"template": "Q: {prompt}\nA:", "context_template": "Q: {prompt}\nC: {context}\nA:"}


def _lm_spec(tiny_lm, tmp_path):
    """The tiny causal-LM spec with a template short enough for its 96-token examples."""
    spec = tiny_lm_spec(tiny_lm, tmp_path)
    return tiny_lm_spec(tiny_lm, tmp_path, data={**spec["data"], **SHORT})
from kdgeo.lm_data import response_predictions
from kdgeo.plan import make_plan
from kdgeo.rundir import CausalLMData, ClassificationData
from kdgeo.spec import RunSpec, validate_spec
from kdgeo.tasks import TASKS, CausalLMTask, ClassificationTask


def test_every_spec_task_has_a_class():
    assert set(TASKS) == set(RunSpec.model_fields["task"].annotation.__args__)


def test_classification_rows_are_real_tokens_and_targets_are_labels(tiny, tmp_path):
    plan = make_plan(validate_spec(tiny_spec(tiny, tmp_path)), 1, False, events.ignore)
    task = plan.task
    assert isinstance(task, ClassificationTask)
    batch = data_mod.collate(plan.train, [0, 1, 2])
    inputs = batch["student"]
    mask = task.row_mask(batch, "student", inputs, torch.device("cpu"))
    assert torch.equal(mask, inputs["attention_mask"])
    logits = torch.randn(3, task.num_labels)
    got, labels = task.logits_and_labels(logits, inputs, mask, batch, torch.device("cpu"))
    assert got is logits and torch.equal(labels, batch["labels"])
    assert task.example_weights(plan.train) == [1] * len(plan.train)
    data = task.summary_data(plan.data, plan.train, plan.evals)
    assert isinstance(data, ClassificationData) and data.label_column == "label"


def test_causal_lm_rows_are_response_tokens_and_weights_count_them(tiny_lm, tmp_path):
    plan = make_plan(validate_spec(_lm_spec(tiny_lm, tmp_path)), 1, False, events.ignore)
    task = plan.task
    assert isinstance(task, CausalLMTask)
    idx = [0, 1, 2, 3]
    batch = data_mod.collate(plan.train, idx)
    inputs = batch["student"]
    mask = task.row_mask(batch, "student", inputs, torch.device("cpu"))
    assert torch.equal(mask, batch["response_mask"]["student"])
    weights = task.example_weights(plan.train)
    assert [weights[i] for i in idx] == mask.sum(dim=1).tolist()  # a mean loss is over response tokens
    vocab = 50
    logits = torch.randn(*inputs["input_ids"].shape, vocab)
    got, labels = task.logits_and_labels(logits, inputs, mask, batch, torch.device("cpu"))
    want, want_labels = response_predictions(logits, inputs["input_ids"], mask)
    assert torch.equal(got, want) and torch.equal(labels, want_labels)
    assert got.shape[0] == sum(weights[i] for i in idx)  # one prediction per response token: the loss's mean is over them
    data = task.summary_data(plan.data, plan.train, plan.evals)
    assert isinstance(data, CausalLMData) and data.truncation is not None


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_data_keys_name_the_training_split_only(name, tiny, tiny_lm, tmp_path):
    spec = tiny_spec(tiny, tmp_path) if name == "classification" else _lm_spec(tiny_lm, tmp_path)
    plan = make_plan(validate_spec(spec), 1, False, events.ignore)
    key = plan.task.data_key(plan.data, plan.train)
    other = plan.task.data_key({**plan.data, "eval_split": "something-else", "max_eval_samples": 3}, plan.train)
    assert key == other  # a fine-tuned teacher does not depend on the evaluation split


def test_a_causal_lm_run_writes_per_example_rouge_and_nll_that_give_its_summary(tiny_lm, tmp_path, capsys):
    """predictions.jsonl of a causal-LM run: one record per evaluated example; the mean ROUGE-L of the generated
    ones is the summary's rougeL (rel 1e-12: the same F-measures, one fsum), sum(nll * tokens) / sum(tokens) its
    response_nll and exp of it its perplexity (rel 1e-9: per-example sums regrouped); eval_sha256 is the
    tokenizer-free hash of the raw instruction, context and response (test_causal_lm checks that
    `kdgeo eval --predictions` on a run writes the same records and eval_sha256)."""
    import hashlib
    import json
    import math

    from cli_helpers import run_cli, write_spec

    from kdgeo.rundir import eval_sha256, read_predictions, read_run, text_sha256

    spec = _lm_spec(tiny_lm, tmp_path)
    spec = tiny_lm_spec(tiny_lm, tmp_path, data={**spec["data"], "max_eval_samples": 6}, train={"max_steps": 1},
                        monitor={"every": 0}, generate={"max_new_tokens": 6, "batch_size": 6, "max_samples": 4})
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "lm.toml", spec)), "-q")
    assert code == 0, err
    run = read_run(tmp_path / "runs" / "lm")
    records = read_predictions(run.path)
    assert run.summary is not None and run.summary.data is not None and records is not None
    scores = run.summary.scores
    assert [r["index"] for r in records] == list(range(6)) and run.summary.data.eval_examples == 6
    rouge = [r["rougeL"] for r in records]
    assert all(v is not None for v in rouge[:4]) and rouge[4:] == [None, None]  # generate.max_samples = 4
    assert sum(rouge[:4]) / 4 == pytest.approx(scores["rougeL"], rel=1e-12, abs=1e-12)
    tokens = sum(r["tokens"] for r in records)
    nll = sum(r["nll"] * r["tokens"] for r in records) / tokens
    assert tokens == scores["response_tokens"] and nll == pytest.approx(scores["response_nll"], rel=1e-9)
    assert math.exp(nll) == pytest.approx(scores["perplexity"], rel=1e-9)

    rows = [json.loads(line) for line in tiny_lm["eval"].read_text().splitlines()][:6]
    hashes = [text_sha256([r["instruction"], r["context"] or "", r["response"]]) for r in rows]
    assert [r["text_sha256"] for r in records] == hashes
    want = eval_sha256((h, hashlib.sha256(r["response"].encode()).hexdigest()) for h, r in zip(hashes, rows))
    assert run.summary.data.eval_sha256 == want

