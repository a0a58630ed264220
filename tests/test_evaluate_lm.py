"""kdgeo.evaluate_lm: which references `kdgeo eval` scores as causal LMs, where a response stops, and
the --predictions file. (Scores of real runs are checked end to end in test_causal_lm.py.)"""

from __future__ import annotations

import json
from types import SimpleNamespace

from kdgeo.evaluate_lm import stop_tokens, wants_causal_lm, write_predictions


def test_causal_lm_evaluation_is_chosen_by_the_run_or_the_models_architecture(tiny, tiny_lm, tmp_path):
    assert wants_causal_lm(str(tiny_lm["opt_teacher"])) is True
    assert wants_causal_lm(str(tiny["teacher_clf"])) is False
    assert wants_causal_lm(str(tmp_path / "missing")) is False  # the classification path reports it
    for task, expected in (("causal-lm", True), ("classification", False)):
        run = tmp_path / task
        run.mkdir()
        (run / "spec.json").write_text(json.dumps({"task": task}))
        assert wants_causal_lm(str(run)) is expected, task  # the run's task, before any model is read


def test_a_response_stops_at_the_tokenizers_or_the_generation_configs_end_token():
    def model(eos: object) -> SimpleNamespace:
        return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))

    tok = SimpleNamespace(eos_token_id=2)
    assert stop_tokens(model(None), tok) == [2]
    assert stop_tokens(model(7), tok) == [2, 7]
    assert stop_tokens(model([9, 2, 7]), tok) == [2, 7, 9]  # chat models end a turn with their own token
    assert stop_tokens(SimpleNamespace(), SimpleNamespace(eos_token_id=None)) == []


def test_predictions_file_has_one_line_per_prompt_with_every_models_response(tmp_path):
    texts = {
        "model": {"prompts": ["Q: a\nA:", "Q: b\nA:"], "references": ["x", "y"], "predictions": ["x!", "é"]},
        "teacher": {"prompts": ["Q: a\nA:", "Q: b\nA:"], "references": ["x", "y"], "predictions": ["t"]},
    }
    path = tmp_path / "preds.jsonl"
    write_predictions(path, {"texts": texts})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"prompt": "Q: a\nA:", "reference": "x", "prediction": "x!", "teacher_prediction": "t"},
        {"prompt": "Q: b\nA:", "reference": "y", "prediction": "é", "teacher_prediction": None},  # fewer generated
    ]
    assert "é" in lines[1]  # written as UTF-8 text, not \u escapes


def test_a_plain_models_settings_default_to_the_specs_own_defaults(tiny_lm):
    """Without a run, every fallback is the spec's default: `kdgeo eval` used to cut causal-LM examples at 512
    tokens where a run spec's data.max_length defaults to 128 (and the --max-length help says 128)."""
    from kdgeo.evaluate import eval_target
    from kdgeo.evaluate_lm import LMEvalArgs, plan_lm_eval
    from kdgeo.lm_data import PromptFormat
    from kdgeo.spec import DataSpec, GenerateSpec

    model = str(tiny_lm["opt_student"])
    plan = plan_lm_eval(LMEvalArgs(model=model, dataset=str(tiny_lm["eval"])), eval_target(model))
    data, gen = DataSpec.model_construct(), GenerateSpec()
    assert plan.max_length == data.max_length == 128 and plan.max_prompt_length == data.max_length // 2
    assert (plan.split, plan.columns, plan.long_examples) == (
        data.eval_split, {"prompt_column": data.prompt_column, "response_column": data.response_column, "context_column": None},
        data.long_examples,
    )
    assert plan.prompt_format == PromptFormat(data.template, data.context_template, data.chat_template)
    assert (plan.gen.max_new_tokens, plan.gen.batch_size, plan.gen.do_sample, plan.gen.temperature, plan.gen.top_p, plan.gen.seed) == (
        gen.max_new_tokens, gen.batch_size, gen.do_sample, gen.temperature, gen.top_p, 0
    )
    assert (plan.nll_batch, plan.gen_samples, plan.max_samples) == (gen.batch_size, None, None)
    explicit = plan_lm_eval(LMEvalArgs(model=model, dataset="d.jsonl", max_length=96, batch_size=5), eval_target(model))
    assert (explicit.max_length, explicit.max_prompt_length, explicit.nll_batch, explicit.gen.batch_size) == (96, 48, 5, 5)

