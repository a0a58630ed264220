"""`kdgeo eval` on a causal LM: ROUGE-L of generated responses, and perplexity of the references.

The paper's decoder setting (after MiniLLM, Gu et al. 2024): generate a response to each
held-out instruction (greedy by default, batched with left padding) and score it against the
reference with ROUGE-L (x 100); also report the perplexity of the reference responses under the
model (teacher forcing, response tokens only).

The prompt is fitted into ``max_prompt_length`` from the instruction and its context alone
(``lm_data.fit_prompt``), so what a model generates from never depends on the reference. The
perplexity scores the reference after that same prompt, cut at its end to fit ``max_length``
(counted); ROUGE-L compares with the whole reference text. Perplexity is one corpus-level
figure: exp(total NLL / total response tokens) over every scored token of the split, not a
mean of per-example perplexities. Generation is greedy with one sample by default; MiniLLM
reports ROUGE-L of sampled responses (temperature 1, top-p 1) averaged over 5 seeds, which
`--sample --seed S` run five times reproduces.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdgeo import data as data_mod
from kdgeo import lm_data
from kdgeo.errors import DataError, KdgeoError
from kdgeo.evaluate import read_run_spec, run_defaults
from kdgeo.generation import GenerationArgs, generate, perplexity, response_nll, rouge_l
from kdgeo.spec import DEFAULT_CONTEXT_TEMPLATE, DEFAULT_TEMPLATE

Progress = Callable[[dict[str, Any]], None]


def split_scores(
    model: nn.Module,
    tokenizer: Any,
    split: data_mod.TextSplit,
    role: str,
    gen: GenerationArgs | None,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
    gen_samples: int | None = None,
) -> tuple[dict[str, float], list[str] | None]:
    """Perplexity of all the split's reference responses; with ``gen``, also ROUGE-L of responses
    generated for the first ``gen_samples`` prompts (all when None).

    Returns (scores, generated texts or None).
    """
    enc = split.encodings[role]
    prompts, responses = lm_data.prompt_ids(enc), lm_data.response_ids(enc)
    nll, count = response_nll(model, prompts, responses, enc.pad_id, batch_size, device, amp)
    scores = {"perplexity": perplexity(nll, count), "response_nll": nll / max(count, 1), "response_tokens": float(count)}
    if gen is None:
        return scores, None
    assert split.responses is not None
    k = len(prompts) if gen_samples is None else min(gen_samples, len(prompts))
    eos = stop_tokens(model, tokenizer)
    new_ids = generate(
        model, enc.pad_id, eos, prompts[:k], gen.max_new_tokens, gen.batch_size, device, amp,
        do_sample=gen.do_sample, temperature=gen.temperature, top_p=gen.top_p, seed=gen.seed,
    )
    predictions = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_ids]
    scores["rougeL"] = rouge_l(predictions, split.responses[:k])
    scores["generated_tokens_mean"] = sum(len(ids) for ids in new_ids) / max(k, 1)
    scores["generated_samples"] = float(k)
    return scores, predictions


def stop_tokens(model: nn.Module, tokenizer: Any) -> list[int]:
    """Tokens that end a response: the tokenizer's end of sequence and the model's generation
    config's (chat models end a turn with their own, e.g. <|eot_id|>)."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops += [configured] if isinstance(configured, int) else list(configured or [])
    return sorted(set(stops))


def is_causal_lm(config: Any, run_spec: dict[str, Any] | None) -> bool:
    if run_spec is not None:
        return run_spec.get("task") == "causal-lm"
    architectures = list(getattr(config, "architectures", None) or [])
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures) and not any(
        "SequenceClassification" in a for a in architectures
    )


def lm_data_prompt(tokenizer: Any, ids: list[int]) -> str:
    """The prompt as the model saw it (after any truncation), for --predictions."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def _run_teacher_tokenizer(run_spec: dict[str, Any] | None, run_dir: Path | None, trust: bool) -> Any:
    """The tokenizer of a run's teacher when its student had another one (init = "pretrained"),
    or None. Unavailable (offline, deleted): None, and the student's examples are used alone."""
    from kdgeo.models import ModelRef, load_tokenizer

    if not run_spec or (run_spec.get("student") or {}).get("init") != "pretrained":
        return None
    teacher = (run_spec.get("teacher") or {}).get("model")
    if run_dir is not None and (run_dir / "summary.json").exists():
        try:
            teacher = json.loads((run_dir / "summary.json").read_text()).get("teacher_path") or teacher
        except (OSError, json.JSONDecodeError):
            pass
    try:
        return load_tokenizer(ModelRef(str(teacher), trust_remote_code=trust)) if teacher else None
    except KdgeoError:
        return None


def run_lm_eval(
    location: str,
    label: str,
    run_spec: dict[str, Any] | None,
    options: dict[str, Any],
    progress: Progress | None = None,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate the causal LM at ``location``; ``options`` are the CLI's (None = the run's, else defaults).

    Keys of ``options``: dataset, config, split, prompt_column, response_column, context_column,
    max_samples, max_length, batch_size, device, precision, trust_remote_code, teacher,
    max_new_tokens, do_sample, temperature, top_p, seed.
    """
    from kdgeo.models import ModelRef, check_decoder, check_max_length, load_causal_lm, load_config, load_tokenizer
    from kdgeo.probe import autocast_dtype, resolve_device

    emit = progress or (lambda event: None)
    run_data = (run_spec or {}).get("data", {})
    run_gen = (run_spec or {}).get("generate", {})
    dataset = options.get("dataset") or run_data.get("eval_dataset") or run_data.get("dataset")
    if dataset is None:
        raise DataError(f"no dataset to evaluate {label} on: give --data (a run directory supplies its own).")
    own_data = options.get("dataset") is None
    config = options.get("config") if options.get("config") is not None else (run_data.get("config") if own_data and not run_data.get("eval_dataset") else None)
    split_name = options.get("split") or run_data.get("eval_split") or "validation"
    prompt_col = options.get("prompt_column") or run_data.get("prompt_column") or "prompt"
    response_col = options.get("response_column") or run_data.get("response_column") or "response"
    context_col = options.get("context_column") if options.get("context_column") is not None else run_data.get("context_column")
    max_length = options.get("max_length") or run_data.get("max_length") or 512
    # Capped: --max-length may be shorter than the run's, and a prompt must leave room for a response.
    max_prompt = min(run_data.get("max_prompt_length") or max_length // 2, max_length - 1)
    fmt = lm_data.PromptFormat(
        template=run_data.get("template", DEFAULT_TEMPLATE),
        context_template=run_data.get("context_template", DEFAULT_CONTEXT_TEMPLATE),
        chat_template=bool(run_data.get("chat_template", False)),
    )
    gen = GenerationArgs(
        max_new_tokens=options.get("max_new_tokens") or run_gen.get("max_new_tokens", 128),
        batch_size=options.get("batch_size") or run_gen.get("batch_size", 16),
        do_sample=options.get("do_sample") if options.get("do_sample") is not None else run_gen.get("do_sample", False),
        temperature=options.get("temperature") or run_gen.get("temperature", 1.0),
        top_p=options.get("top_p") or run_gen.get("top_p", 1.0),
        seed=options.get("seed") if options.get("seed") is not None else (run_spec or {}).get("seed", 0),
    )
    device = resolve_device(options.get("device") or "auto")
    run_train = (run_spec or {}).get("train", {})
    amp = autocast_dtype(options.get("precision") or run_train.get("precision") or "fp32", device)
    # A run's own settings, so its scores come out as in its summary.json: the generation cap and
    # the batch size its perplexity was computed with.
    gen_samples = run_gen.get("max_samples") if own_data and options.get("max_samples") is None else None
    nll_batch = options.get("batch_size") or run_train.get("batch_size") or gen.batch_size
    trust = bool(options.get("trust_remote_code"))

    where = f"--data {dataset}"
    ds = data_mod.load_split(dataset, config, split_name, where="--data")
    data_mod.check_columns(
        ds, {"prompt_column": prompt_col, "response_column": response_col, "context_column": context_col}, where, setting="--{key}"
    )
    max_samples = options.get("max_samples") if options.get("max_samples") is not None else (run_data.get("max_eval_samples") if own_data else None)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    examples = lm_data.read_examples(ds, prompt_col, response_col, context_col, where)

    models = [("model", location, label)]
    if options.get("teacher"):
        models.append(("teacher", options["teacher"], options["teacher"]))
    loaded: dict[str, tuple[Any, Any, Any]] = {}
    for role, path, name in models:
        ref = ModelRef(path, trust_remote_code=trust)
        cfg = load_config(ref)
        check_decoder(cfg, name, "MODEL" if role == "model" else "--teacher")
        check_max_length(cfg, max_length, "--max-length", f"the model {name}")
        loaded[role] = (ref, cfg, load_tokenizer(ref))
    tokenizers = {role: tok for role, (_, _, tok) in loaded.items()}
    run_teacher = _run_teacher_tokenizer(run_spec, run_dir, trust) if own_data else None
    if run_teacher is not None:
        tokenizers["run teacher"] = run_teacher  # the run kept only examples both of its tokenizers kept
    # One split for every model: the same prompts, the same references, line for line.
    split, notes = lm_data.build_split(examples, fmt, tokenizers, max_length, max_prompt, run_data.get("long_examples", "truncate"), where)
    for note in notes:
        emit({"event": "stage", "message": note})
    results: dict[str, Any] = {}
    texts: dict[str, Any] = {}
    start = time.perf_counter()
    for role, path, name in models:
        ref, cfg, tok = loaded[role]
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        longest = max(len(p) for p in lm_data.prompt_ids(split.encodings[role]))
        if isinstance(limit, int) and longest + gen.max_new_tokens > limit:
            raise KdgeoError(
                f"a prompt of {longest} tokens plus --max-new-tokens {gen.max_new_tokens} exceeds the {limit} positions "
                f"{name} accepts; lower --max-new-tokens or --max-length."
            )
        emit({"event": "stage", "message": f"generating responses with {name} for {min(len(split), gen_samples or len(split))} prompts"})
        model = load_causal_lm(ref).to(device)
        scores, predictions = split_scores(model, tok, split, role, gen, nll_batch, device, amp, gen_samples)
        results[role] = {"model": name, "scores": scores, "samples": len(split)}
        texts[role] = {"prompts": [lm_data_prompt(tok, p) for p in lm_data.prompt_ids(split.encodings[role])],
                       "references": split.responses or [], "predictions": predictions or []}
        del model
    return {
        "task": "causal-lm", "model": label, "dataset": dataset, "split": split_name, "results": results,
        # prompts fitted into max_prompt_length without looking at the reference; counts per tokenizer
        "prompts": {"max_prompt_length": max_prompt, "max_length": max_length, "truncation": split.truncation},
        "generation": {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample, "temperature": gen.temperature, "top_p": gen.top_p, "seed": gen.seed},
        "device": str(device), "seconds": time.perf_counter() - start, "texts": texts,
    }


def wants_causal_lm(model: str, trust_remote_code: bool = False) -> bool:
    """Whether `kdgeo eval MODEL` is a causal-LM evaluation: a causal-lm run directory, or a model
    whose config names a *ForCausalLM / *LMHeadModel architecture. Unloadable references say
    no here; the classification path reports them."""
    from kdgeo.models import ModelRef, load_config

    path = Path(model).expanduser()
    try:
        spec = read_run_spec(path)
    except KdgeoError:
        return False
    if spec is not None:
        return spec.get("task") == "causal-lm"
    try:
        config = load_config(ModelRef(model, trust_remote_code=trust_remote_code))
    except KdgeoError:
        return False
    return is_causal_lm(config, None)


def run_lm_eval_cli(model: str, options: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
    path = Path(model).expanduser()
    location, spec = run_defaults(path)
    return run_lm_eval(location, model, spec, options, progress, run_dir=path if spec is not None else None)


def write_predictions(path: Path, result: dict[str, Any]) -> None:
    """One JSON line per prompt: prompt, reference, and each model's generated response."""
    from kdgeo.rundir import write_text_atomic

    texts = result["texts"]
    roles = list(texts)
    first = texts[roles[0]]
    lines = []
    for i, (prompt, reference) in enumerate(zip(first["prompts"], first["references"])):
        row = {"prompt": prompt, "reference": reference}
        for role in roles:
            preds = texts[role]["predictions"]
            row["prediction" if role == "model" else f"{role}_prediction"] = preds[i] if i < len(preds) else None
        lines.append(json.dumps(row, ensure_ascii=False))
    body = "\n".join(lines) + "\n"
    if str(path) == "-":
        import sys

        sys.stdout.write(body)
    else:
        write_text_atomic(Path(path), body)
