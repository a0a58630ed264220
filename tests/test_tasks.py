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
