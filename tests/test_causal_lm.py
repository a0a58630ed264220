"""task = "causal-lm": instruction data, the response mask, token-level KD, distill + eval end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cli_helpers import run_cli, tiny_lm_spec, write_spec
from conftest import write_jsonl
from kdgeo import data as data_mod
from kdgeo import lm_data
from kdgeo.features import select_rows
from kdgeo.lm_data import response_predictions
from kdgeo.losses import LossTerm, Objective
from kdgeo.models import ModelRef, load_tokenizer

SHORT = {"template": "Q: {prompt}\nA:", "context_template": "Q: {prompt}\nC: {context}\nA:"}
FMT = lm_data.PromptFormat(SHORT["template"], SHORT["context_template"])


# ---- data: formatting, truncation, the response mask -------------------------------------------


def test_encode_lm_marks_exactly_the_response_and_eos(tiny_lm):
    tok = load_tokenizer(ModelRef(str(tiny_lm["opt_teacher"])))
    instructions, responses = ["say hi", "a longer question about dogs"], [" hello there", " a dog is an animal"]
    prompts = [SHORT["template"].format(prompt=i) for i in instructions]
    examples = lm_data.LMExamples(prompts=[], responses=responses, instructions=instructions)
    enc, texts, report = lm_data.encode_lm(tok, FMT, examples, max_length=64, max_prompt_length=32, long_examples="error", where="t")
    assert texts == prompts
    assert report.kept == [0, 1]
    batch = data_mod.collate(data_mod.TextSplit(texts=prompts, labels=None, encodings={"student": enc}, responses=responses), [0, 1])
    ids, mask = batch["student"]["input_ids"], batch["response_mask"]["student"]
    for row, (p, r) in enumerate(zip(prompts, responses)):
        want = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids[row][mask[row].bool()].tolist() == want
        prompt_ids = tok(p)["input_ids"]
        assert prompt_ids[0] == tok.bos_token_id  # OPT-style BOS added to the prompt
        assert ids[row][: len(prompt_ids)].tolist() == prompt_ids and not mask[row][: len(prompt_ids)].any()
    assert not (mask.bool() & ~batch["student"]["attention_mask"].bool()).any()  # never on padding


def test_long_examples_truncate_drop_or_error(tiny_lm):
    """A prompt over max_prompt_length keeps BOS, the template and the instruction's start; a response over
    what is left of max_length is cut at its end (tests/test_lm_data.py has the reference-independence checks)."""
    tok = load_tokenizer(ModelRef(str(tiny_lm["opt_teacher"])))
    long_instruction = " ".join(["the animal that lives in the sea"] * 20)
    examples = lm_data.LMExamples(prompts=[], responses=[" a fish of the sea", " yes"], instructions=[long_instruction, "short"])
    enc, texts, report = lm_data.encode_lm(tok, FMT, examples, max_length=24, max_prompt_length=12, long_examples="truncate", where="t")
    assert report.instructions_cut == 1 and report.kept == [0, 1]
    ids, start = enc.input_ids[0], enc.response_start[0]
    assert len(ids) <= 24 and start <= 12 and ids[0] == tok.bos_token_id
    assert texts[0].startswith("Q: the animal") and texts[0].endswith("\nA:")
    assert ids[:start] == tok(texts[0])["input_ids"]
    assert ids[start:] == tok(" a fish of the sea", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    enc, _, report = lm_data.encode_lm(tok, FMT, examples, max_length=24, max_prompt_length=12, long_examples="drop", where="t")
    assert report.dropped_long_prompt == 1 and report.kept == [1] and len(enc.input_ids) == 1
    with pytest.raises(Exception, match=r"row 0's prompt is \d+ tokens.*data.long_examples"):
        lm_data.encode_lm(tok, FMT, examples, max_length=24, max_prompt_length=12, long_examples="error", where="t")
    # A response longer than what is left is cut at its end, and the cut is counted.
    one = lm_data.LMExamples(prompts=[], responses=[" word" * 40], instructions=["x"])
    enc, _, report = lm_data.encode_lm(tok, FMT, one, max_length=16, max_prompt_length=8, long_examples="truncate", where="t")
    assert report.responses_cut == 1 and len(enc.input_ids[0]) == 16
    with pytest.raises(Exception, match=r"row 0 is \d+ prompt \+ \d+ response tokens.*data.long_examples"):
        lm_data.encode_lm(tok, FMT, one, max_length=16, max_prompt_length=8, long_examples="error", where="t")


def test_prompt_tokens_never_contribute_to_any_loss(tiny_lm):
    """NaN in every logit and hidden state outside the response leaves every loss finite and unchanged."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(ModelRef(str(tiny_lm["opt_teacher"])))
    rows = [json.loads(line) for line in tiny_lm["train"].read_text().splitlines()[:6]]
    prompts = [SHORT["template"].format(prompt=r["instruction"]) for r in rows]
    responses = [" " + r["response"] for r in rows]
    examples = lm_data.LMExamples(prompts=[], responses=responses, instructions=[r["instruction"] for r in rows])
    enc, _, _ = lm_data.encode_lm(tok, FMT, examples, 64, 32, "truncate", "t")
    split = data_mod.TextSplit(texts=prompts, labels=None, encodings={"student": enc, "teacher": enc}, responses=responses)
    batch = data_mod.collate(split, list(range(6)))
    inputs, mask = batch["student"], batch["response_mask"]["student"]
    outs = {}
    for role, width in (("teacher", 64), ("student", 32)):
        model = AutoModelForCausalLM.from_pretrained(tiny_lm[f"opt_{role}"]).eval()
        with torch.no_grad():
            outs[role] = model(**inputs, output_hidden_states=True)
    terms = [LossTerm("ce"), LossTerm("kd", direction="mixed", temperature=2.0)] + [
        LossTerm(k) for k in ("procrustes", "gram", "cka", "projection")
    ]
    torch.manual_seed(0)
    objective = Objective(terms, [(1, 2), (2, 4)], [(32, 64)] * 2)

    def total(poison: bool) -> dict[str, float]:
        logits = {r: o.logits.clone() for r, o in outs.items()}  # (B, T, V)
        hidden = {r: [h.clone() for h in o.hidden_states] for r, o in outs.items()}
        if poison:
            predicts_prompt = torch.ones_like(mask, dtype=torch.bool)
            predicts_prompt[:, :-1] = ~mask[:, 1:].bool()  # position j predicts token j+1
            for r in logits:
                logits[r][predicts_prompt] = float("nan")
                for h in hidden[r]:
                    h[~mask.bool()] = float("nan")
        s_logits, labels = response_predictions(logits["student"], inputs["input_ids"], mask)
        t_logits, _ = response_predictions(logits["teacher"], inputs["input_ids"], mask)
        values = {}
        for rows in ("tokens", "mean"):
            t_rows = [select_rows(hidden["teacher"][i], mask, rows) for i in (2, 4)]
            s_rows = [select_rows(hidden["student"][i], mask, rows) for i in (1, 2)]
            logit_total, feature_total, parts = objective.grouped(s_logits, labels, t_logits, t_rows, s_rows)
            loss = logit_total + feature_total
            values.update({f"{rows}:{k}": float(v) for k, v in parts.items()})
            values[f"{rows}:total"] = float(loss.detach())
        return values

    clean, poisoned = total(False), total(True)
    assert all(math.isfinite(v) for v in poisoned.values()), poisoned
    for key, value in clean.items():
        assert poisoned[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


# ---- distill + eval end to end -----------------------------------------------------------------


def test_distill_and_eval_causal_lm_end_to_end(tiny_lm, tmp_path, capsys):
    # max_prompt_length 40 < the 47-48 tokens of the rows with a context: their contexts are cut (counted)
    spec = tiny_lm_spec(tiny_lm, tmp_path, data={**tiny_lm_spec(tiny_lm, tmp_path)["data"], **SHORT, "max_prompt_length": 40},
                        losses=[{"kind": "ce"}, {"kind": "kd", "direction": "reverse"}, {"kind": "procrustes"}])
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "lm.toml", spec)), "-q")
    assert code == 0, err
    run = tmp_path / "runs" / "lm"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "causal-lm" and summary["label_names"] is None
    scores = summary["scores"]
    assert 0.0 <= scores["rougeL"] <= 100.0 and scores["perplexity"] > 1.0 and scores["generated_samples"] == 12
    assert set(summary["teacher_scores"]) >= {"rougeL", "perplexity"}
    assert [p["student"] for p in summary["geometry"]] == [1, 2]
    cuts = summary["data"]["truncation"]
    assert cuts["eval"]["student and teacher"]["contexts_cut"] == 4 and cuts["train"]["student and teacher"]["contexts_cut"] == 16
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    assert steps and all(math.isfinite(e["kd"]) and math.isfinite(e["procrustes"]) for e in steps)
    assert steps[-1]["procrustes"] < steps[0]["procrustes"]
    # The saved student is a causal LM, and `kdgeo eval` on the run reproduces the run's own scores.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "student")
    out_json, preds = tmp_path / "eval.json", tmp_path / "preds.jsonl"
    code, out, err = run_cli(capsys, "eval", str(run), "--json", str(out_json), "--predictions", str(preds))
    assert code == 0, err
    assert "rougeL" in out and "perplexity" in out
    assert "4 prompts longer than data.max_prompt_length = 40 had their context cut at the end" in err
    result = json.loads(out_json.read_text())
    assert result["prompts"]["truncation"]["model"] == cuts["eval"]["student and teacher"]
    mine = result["results"]["model"]["scores"]
    assert mine["rougeL"] == pytest.approx(scores["rougeL"], abs=1e-6)
    assert mine["perplexity"] == pytest.approx(scores["perplexity"], rel=1e-5)
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(lines) == 12 and {"prompt", "reference", "prediction"} <= set(lines[0])
    assert lines[0]["prompt"].startswith("Q: ")
    # The same examples as the run's own predictions.jsonl, with the same per-example scores (greedy decoding).
    assert result["eval_sha256"] == summary["data"]["eval_sha256"] and result["eval_examples"] == 12
    own = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["text_sha256"] for r in own] == [r["text_sha256"] for r in lines] and len(own) == 12
    for line, record in zip(lines, own):
        assert {"index", "text_sha256", "rougeL", "nll", "tokens"} <= set(line) and line["tokens"] == record["tokens"]
        assert line["nll"] == pytest.approx(record["nll"], rel=1e-5) and line["rougeL"] == pytest.approx(record["rougeL"], abs=1e-6)


def test_gpt2_student_from_opt_teacher_and_every_kd_direction(tiny_lm, tmp_path, capsys):
    """A pretrained GPT-2 student (same tokenizer, other architecture) with mixed KD and gram on mean rows."""
    spec = tiny_lm_spec(
        tiny_lm, tmp_path, student={"init": "pretrained", "model": str(tiny_lm["gpt2_student"])},
        data={**tiny_lm_spec(tiny_lm, tmp_path)["data"], **SHORT, "max_train_samples": 16, "max_eval_samples": 4},
        features={"rows": "mean", "pairs": "last"},
        losses=[{"kind": "kd", "direction": "mixed", "mix": 0.25}, {"kind": "gram"}],
        generate={"max_new_tokens": 4, "do_sample": True, "top_p": 0.9, "temperature": 0.8},
    )
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "g.toml", spec)), "-q")
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "lm" / "summary.json").read_text())
    assert summary["pairs"] == [[2, 4]] and math.isfinite(summary["scores"]["rougeL"])


def test_chat_template_formats_each_prompt_with_the_tokenizers_own_template(tiny_lm, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    chat = tmp_path / "chat_teacher"
    shutil.copytree(tiny_lm["opt_teacher"], chat)
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|> {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
    tok.save_pretrained(chat)
    examples = lm_data.LMExamples(prompts=[], responses=[" a dog"], instructions=["Name an animal."], contexts=["pets"])
    fmt = lm_data.PromptFormat("{prompt}", "{prompt} {context}", chat_template=True)
    loaded = load_tokenizer(ModelRef(str(chat)))
    split, _ = lm_data.build_split(examples, fmt, {"student": loaded}, 64, 32, "error", "t")
    assert split.texts == ["<|user|> Name an animal.\n\npets\n<|assistant|> "]
    enc = split.encodings["student"]
    assert enc.input_ids[0][: enc.response_start[0]] == loaded(split.texts[0], add_special_tokens=False)["input_ids"]


def test_student_built_from_the_teacher_config(tiny_lm, tmp_path, capsys):
    """init = "config" on OPT: the spec's intermediate_size lands in OPT's ffn_dim, a narrower width
    gets no extra in/out projections, and projection maps the widths in the loss."""
    spec = tiny_lm_spec(
        tiny_lm, tmp_path, student={"init": "config", "arch": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 48}},
        data={**tiny_lm_spec(tiny_lm, tmp_path)["data"], **SHORT, "max_train_samples": 16, "max_eval_samples": 4},
        losses=[{"kind": "ce"}, {"kind": "kd"}, {"kind": "projection"}], generate={"max_new_tokens": 2},
    )
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "c.toml", spec)), "-q")
    assert code == 0, err
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tmp_path / "runs" / "lm" / "student")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.ffn_dim, cfg.word_embed_proj_dim) == (2, 32, 48, 32)


def test_teacher_finetune_on_responses_is_cached(tiny_lm, tmp_path, capsys):
    spec = tiny_lm_spec(
        tiny_lm, tmp_path, teacher={"model": str(tiny_lm["opt_teacher"]), "finetune": {"epochs": 1, "batch_size": 16, "lr": 1e-3}},
        data={**tiny_lm_spec(tiny_lm, tmp_path)["data"], **SHORT, "max_train_samples": 16, "max_eval_samples": 4},
        losses=[{"kind": "kd"}], monitor={"every": 0, "samples": 4}, generate={"max_new_tokens": 2},
    )
    path = write_spec(tmp_path / "f.toml", spec)
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0, err
    first = json.loads((tmp_path / "runs" / "lm" / "summary.json").read_text())["teacher_finetune"]
    assert first["cached"] is False and first["steps"] == 1 and math.isfinite(first["final_loss"])
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "output.overwrite=true")
    assert code == 0, err
    second = json.loads((tmp_path / "runs" / "lm" / "summary.json").read_text())["teacher_finetune"]
    assert second["cached"] is True and second["key"] == first["key"]


# ---- bad input: clear errors before heavy work ---------------------------------------------------


def test_vocabulary_mismatch_is_caught_and_pooled_geometry_still_works(tiny_lm, tmp_path, capsys):
    base = tiny_lm_spec(tiny_lm, tmp_path)
    data = {**base["data"], **SHORT, "max_train_samples": 16, "max_eval_samples": 4}
    spec = tiny_lm_spec(tiny_lm, tmp_path, student={"init": "pretrained", "model": str(tiny_lm["opt_other_vocab"])}, data=data)
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "v.toml", spec)), "-q")
    assert code == 2 and "Traceback" not in err
    assert "shared vocabulary" in err and 'features.rows = "mean"' in err and "losses: kd" in err
    assert not (tmp_path / "runs" / "lm" / "metrics.jsonl").exists()
    # Token rows need identical tokenization even without kd ...
    spec["losses"] = [{"kind": "ce"}, {"kind": "procrustes"}]
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "v.toml", spec)), "-q")
    assert code == 2 and "response tokens one by one" in err and 'features.rows = "mean"' in err
    # ... while pooled response features compare across vocabularies.
    spec["features"] = {"rows": "mean", "pairs": "last"}
    spec["output"]["overwrite"] = True
    spec["generate"] = {"max_new_tokens": 2}
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "v.toml", spec)), "-q")
    assert code == 0, err


def test_tokenizers_that_differ_only_in_the_prompt_pair_response_tokens(tiny_lm, tmp_path, capsys):
    """Same vocabulary, but only the teacher's tokenizer adds BOS: prompts differ by a token, the
    responses are the same tokens, so token rows and token-level KD still pair up."""
    from conftest import make_causal_lm, make_lm_tokenizer

    make_lm_tokenizer(tmp_path / "tok_nobos", bos=False)
    student = make_causal_lm(tmp_path / "gpt2_nobos", tmp_path / "tok_nobos", "gpt2", layers=2, width=32, seed=4)
    spec = tiny_lm_spec(
        tiny_lm, tmp_path, student={"init": "pretrained", "model": str(student)},
        data={**tiny_lm_spec(tiny_lm, tmp_path)["data"], **SHORT, "max_train_samples": 16, "max_eval_samples": 4},
        losses=[{"kind": "kd"}, {"kind": "procrustes"}], generate={"max_new_tokens": 2},
    )
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "b.toml", spec)), "-q")
    assert code == 0, err


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"data": {"response_column": "answer"}}, "no column 'answer' (set by data.response_column)"),
        ({"data": {"long_examples": "error", "max_length": 24, "template": "{prompt} " + "please answer this " * 10}}, "data.long_examples"),
        ({"data": {"chat_template": True, "template": None, "context_template": None}}, "has no chat template"),
        ({"data": {"label_column": "topic"}}, 'are for task = "classification"'),
        ({"data": {"template": "Q: {prompt} {context}"}}, "data.template: must use exactly {prompt}"),
        ({"features": {"rows": "cls"}}, "a decoder has no classification token"),
        ({"generate": {"max_new_tokens": 250}}, "generate.max_new_tokens = 250"),
        ({"teacher": {"model": "BERT"}}, "bidirectional encoder"),
    ],
)
def test_causal_lm_bad_inputs_exit_2_with_a_message(tiny_lm, tiny, tmp_path, capsys, change, expected):
    spec = tiny_lm_spec(tiny_lm, tmp_path)
    spec["data"].update(SHORT)
    for key, value in change.items():
        if key == "teacher":
            spec["teacher"] = {"model": str(tiny["teacher"])}
            continue
        spec[key] = {k: v for k, v in {**spec.get(key, {}), **value}.items() if v is not None}
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "bad.toml", spec)), "-q")
    assert code == 2, err
    assert expected in err.replace("\n", " ") and "Traceback" not in err
