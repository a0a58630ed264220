"""kdgeo.plan: the spec becomes flat values, and every cheap check runs before any weights load."""

from __future__ import annotations

import dataclasses

import pytest
import transformers

from cli_helpers import tiny_lm_spec, tiny_spec
from kdgeo import events

SHORT = {"template": "Q: {prompt}\nA:", "context_template": "Q: {prompt}\nC: {context}\nA:"}


def _lm_spec(tiny_lm, tmp_path):
    """The tiny causal-LM spec with a template short enough for its 96-token examples."""
    spec = tiny_lm_spec(tiny_lm, tmp_path)
    return tiny_lm_spec(tiny_lm, tmp_path, data={**spec["data"], **SHORT})
from kdgeo.errors import DataError, LayerMapError
from kdgeo.plan import DistillPlan, make_plan
from kdgeo.spec import validate_spec
from kdgeo.tasks import CausalLMTask, ClassificationTask


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reads model weights (configs and tokenizers are allowed)."""

    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("make_plan read model weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


def _plan(spec: dict, world: int = 1) -> DistillPlan:
    return make_plan(validate_spec(spec), world, False, events.ignore)


def test_a_classification_plan_holds_flat_values(tiny, tmp_path, no_weights):
    plan = _plan(tiny_spec(tiny, tmp_path, features={"rows": "tokens", "pairs": [[1, 2], [2, 4]]},
                           losses=[{"kind": "ce"}, {"kind": "procrustes", "weight": 0.5}]))
    assert isinstance(plan.task, ClassificationTask) and len(plan.task.label_names) == 8
    assert plan.t_layers == 4 and plan.s_layers == 2 and plan.t_widths == (64,) * 5 and plan.s_widths == (64,) * 3
    assert plan.copied_layers == (1, 3) and plan.student_ref is None and plan.s_tok is plan.t_tok
    assert plan.pairs == ((1, 2), (2, 4)) and not plan.probe_pairs
    assert [(t.kind, t.weight) for t in plan.terms] == [("ce", 1.0), ("procrustes", 0.5)]
    assert len(plan.train) == 64 and len(plan.evals) == 32
    assert set(plan.train.encodings) == {"teacher", "student"}
    # 64 examples, batch 16, one epoch
    assert (plan.steps.global_batch, plan.steps.steps_per_epoch, plan.steps.total) == (16, 4, 4)
    assert plan.generation is None and plan.training.lr == 1e-3
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.seed = 1  # type: ignore[misc]


def test_steps_count_the_processes_and_accumulation(tiny, tmp_path, no_weights):
    spec = tiny_spec(tiny, tmp_path, train={"grad_accum": 3, "epochs": 2})
    one, two = _plan(spec), _plan(spec, world=2)
    assert (one.steps.steps_per_epoch, one.steps.total) == (2, 4)  # 4 micro-batches, 3 per step: 2 steps
    assert (two.steps.global_batch, two.steps.steps_per_epoch) == (32, 1)  # 2 micro-batches of 32


def test_probe_pairs_are_left_to_the_build(tiny, tmp_path, no_weights):
    plan = _plan(tiny_spec(tiny, tmp_path, features={"rows": "tokens", "pairs": "probe"},
                           losses=[{"kind": "gram"}]))
    assert plan.pairs == () and plan.probe_pairs


def test_a_causal_lm_plan(tiny_lm, tmp_path, no_weights):
    plan = _plan(_lm_spec(tiny_lm, tmp_path))
    assert isinstance(plan.task, CausalLMTask) and plan.task.label_names == ()
    assert plan.generation is not None and plan.generation.max_new_tokens == 8
    assert plan.train.encodings["student"].response_start is not None


def test_impossible_batches_fail_before_any_weights(tiny, tmp_path, no_weights):
    """2 training examples with a pooled geometry loss give no batch of 3 rows: refused in the plan."""
    spec = tiny_spec(tiny, tmp_path, data={"max_train_samples": 2}, features={"rows": "mean", "pairs": "uniform"},
                     losses=[{"kind": "procrustes"}])
    with pytest.raises(DataError, match="fewer than 3 pooled feature rows"):
        _plan(spec)


def test_an_impossible_layer_map_fails_before_any_weights(tiny, tmp_path, no_weights):
    spec = tiny_spec(tiny, tmp_path, student={"init": "teacher-layers", "layers": [0, 9]})
    with pytest.raises(LayerMapError, match="student.layers"):
        _plan(spec)


# --------------------------------------------------------------------------------------------
# data.max_length: a default longer than the models' positions is clamped, a set value is an error (issue 16 D)


def _unset_length(spec: dict) -> dict:
    spec["data"] = {k: v for k, v in spec["data"].items() if k != "max_length"}
    return spec


def test_a_default_max_length_is_clamped_to_the_teacher(tiny64, tmp_path, no_weights):
    from kdgeo.plan import effective_spec

    spec = validate_spec(_unset_length(tiny_spec(tiny64, tmp_path)))
    notes: list[str] = []
    plan = make_plan(spec, 1, False, lambda e: notes.append(getattr(e, "message", "")))
    assert plan.data["max_length"] == 64
    assert max(len(ids) for ids in plan.train.encodings["teacher"].input_ids) <= 64
    assert "data.max_length: using 64, the teacher's max_position_embeddings (the default 128 is longer)" in notes
    recorded = effective_spec(spec, plan)
    assert recorded.data.max_length == 64 and "max_length" in recorded.data.model_fields_set
    assert spec.data.max_length == 128  # the caller's spec is not changed


def test_a_pretrained_student_with_fewer_positions_clamps_it(tiny, tiny64, tmp_path, no_weights):
    spec = _unset_length(tiny_spec(tiny, tmp_path, student={"init": "pretrained", "model": str(tiny64["student"])}))
    spec["student"].pop("num_layers", None)
    notes: list[str] = []
    plan = make_plan(validate_spec(spec), 1, False, lambda e: notes.append(getattr(e, "message", "")))
    assert plan.data["max_length"] == 64
    assert any("using 64, the student's max_position_embeddings" in n for n in notes)


@pytest.mark.parametrize("how", ["toml", "set"])
def test_a_max_length_the_user_set_stays_an_error(tiny64, tmp_path, no_weights, how):
    from kdgeo.errors import ModelLoadError
    from kdgeo.spec import spec_from_dict

    raw = _unset_length(tiny_spec(tiny64, tmp_path))
    if how == "toml":
        raw["data"]["max_length"] = 128
    spec = spec_from_dict(raw, overrides=["data.max_length=128"] if how == "set" else None)
    with pytest.raises(ModelLoadError, match="data.max_length = 128 is longer than the teacher"):
        make_plan(spec, 1, False, events.ignore)
