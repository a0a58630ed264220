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

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdgeo import data as data_mod
from kdgeo import data_split, lm_data, rundir
from kdgeo.errors import DataError, KdgeoError
from kdgeo.evaluate import EvalTarget, eval_target, open_run
from kdgeo.events import Progress, Stage, ignore
from kdgeo.generation import GenerationArgs, generate, perplexity, response_nll_each, rouge_l_each, rouge_l_mean
from kdgeo.spec import GenerateSpec, RunSpec


@dataclass(frozen=True)
class LMScores:
    """One causal LM scored on one split: the summary's scores and what each example contributed."""

    scores: dict[str, float]
    generated: list[str] | None
    """The responses generated for the first prompts (None: perplexity only)."""
    nll: list[float]
    """Per example, the summed NLL of its response tokens (nats)."""
    tokens: list[int]
    """Per example, how many response tokens were scored."""
    rouge: list[float] | None
    """Per generated example, its ROUGE-L F x 100 (None: perplexity only)."""

    def records(self, split: data_mod.TextSplit) -> list[dict[str, Any]]:
        """predictions.jsonl's causal-LM records (:func:`kdgeo.rundir.read_predictions`): per example its
        index, text hash, ROUGE-L (null where nothing was generated for it), mean NLL per response token
        and token count. mean(rougeL) is ``scores["rougeL"]`` and sum(nll * tokens) / sum(tokens) is
        ``scores["response_nll"]``, up to float rounding."""
        rouge = self.rouge or []
        return [
            {
                "index": i,
                "text_sha256": text_hash,
                "rougeL": rouge[i] if i < len(rouge) else None,
                "nll": self.nll[i] / n if n else None,
                "tokens": n,
            }
            for i, ((text_hash, _), n) in enumerate(zip(split.eval_keys(), self.tokens))
        ]


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
) -> LMScores:
    """Perplexity of all the split's reference responses; with ``gen``, also ROUGE-L of responses
    generated for the first ``gen_samples`` prompts (all when None). The scores are corpus-level
    figures (see the module docstring); the per-example values come from the same passes.
    """
    enc = split.encodings[role]
    prompts, responses = lm_data.prompt_ids(enc), lm_data.response_ids(enc)
    nll, count, each_nll = response_nll_each(model, prompts, responses, enc.pad_id, batch_size, device, amp)
    tokens = [len(r) for r in responses]
    scores = {
        "perplexity": perplexity(nll, count),
        "response_nll": nll / max(count, 1),
        "response_tokens": float(count),
    }
    if gen is None:
        return LMScores(scores, None, each_nll, tokens, None)
    assert split.responses is not None
    k = len(prompts) if gen_samples is None else min(gen_samples, len(prompts))
    eos = stop_tokens(model, tokenizer)
    new_ids = generate(
        model,
        enc.pad_id,
        eos,
        prompts[:k],
        gen.max_new_tokens,
        gen.batch_size,
        device,
        amp,
        do_sample=gen.do_sample,
        temperature=gen.temperature,
        top_p=gen.top_p,
        seed=gen.seed,
    )
    predictions = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_ids]
    each_f = rouge_l_each(predictions, split.responses[:k])
    scores["rougeL"] = rouge_l_mean(each_f)  # rouge_l's own arithmetic: the score is what it always was
    scores["generated_tokens_mean"] = sum(len(ids) for ids in new_ids) / max(k, 1)
    scores["generated_samples"] = float(k)
    return LMScores(scores, predictions, each_nll, tokens, [100.0 * f for f in each_f])


def stop_tokens(model: nn.Module, tokenizer: Any) -> list[int]:
    """Tokens that end a response: the tokenizer's end of sequence and the model's generation
    config's (chat models end a turn with their own, e.g. <|eot_id|>)."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops += [configured] if isinstance(configured, int) else list(configured or [])
    return sorted(set(stops))


def is_causal_lm(config: Any) -> bool:
    """Whether a model's config names a causal-LM architecture (and no classification head)."""
    architectures = list(getattr(config, "architectures", None) or [])
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures) and not any(
        "SequenceClassification" in a for a in architectures
    )


def lm_data_prompt(tokenizer: Any, ids: list[int]) -> str:
    """The prompt as the model saw it (after any truncation), for --predictions."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def _run_teacher_tokenizer(target: EvalTarget, trust: bool) -> Any:
    """The tokenizer of a run's teacher when its student had another one (init = "pretrained"),
    or None. Unavailable (offline, deleted): None, and the student's examples are used alone."""
    from kdgeo.models import ModelRef, load_tokenizer

    spec = target.spec
    if spec is None or spec.student.init != "pretrained":
        return None
    summary = target.run.summary if target.run is not None else None
    # The fine-tuned teacher (in the teacher cache) when the run made one: its tokenizer is the one the run used.
    teacher = (summary.teacher_path if summary is not None else None) or spec.teacher.model
    try:
        return load_tokenizer(ModelRef(teacher, trust_remote_code=trust))
    except KdgeoError:
        return None


_DEFAULT_SEED: int = RunSpec.model_fields["seed"].default
"""The generation seed for a plain model: the spec's default seed."""


@dataclass(frozen=True)
class LMEvalArgs:
    """`kdgeo eval` of a causal LM, as given on the command line.

    ``None`` means "not given": a run directory's own setting, else the spec's default (the
    fallbacks live in :func:`plan_lm_eval` and come from the spec's models, never from literals here).
    """

    model: str
    """MODEL_OR_RUN: a run directory, a model directory, a hub id or package:MODULE/SUBDIR."""
    dataset: str | None = None
    config: str | None = None
    split: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    context_column: str | None = None
    max_samples: int | None = None
    max_length: int | None = None
    batch_size: int | None = None
    """Generation batch (default: generate.batch_size) and perplexity batch (default: the run's train.batch_size)."""
    device: str = "auto"
    precision: str = "fp32"
    trust_remote_code: bool = False
    teacher: str | None = None
    """Also score this model on the same prompts."""
    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class LMEvalPlan:
    """Every setting of one evaluation, resolved: the command line, else the run's, else the spec's default."""

    dataset: str
    config: str | None
    split: str
    own_data: bool
    """The run's own data (no --data): its evaluation cap, generation cap and teacher tokenizer apply."""
    columns: dict[str, str | None]
    """prompt_column, response_column, context_column."""
    max_samples: int | None
    max_length: int
    max_prompt_length: int
    prompt_format: lm_data.PromptFormat
    long_examples: str
    gen: GenerationArgs
    gen_samples: int | None
    """Prompts to generate for (None: all): a run's generate.max_samples, so its ROUGE-L comes out as in its summary."""
    nll_batch: int
    """Batch size of the perplexity pass: the run's train.batch_size, as its summary's perplexity was computed."""


def plan_lm_eval(args: LMEvalArgs, target: EvalTarget) -> LMEvalPlan:
    """Resolve every setting once, so that the rest of the evaluation reads plain values."""
    spec = target.spec
    data = target.data
    gen_spec = spec.generate if spec is not None else GenerateSpec()
    own_data = args.dataset is None
    dataset = args.dataset or ((data.eval_dataset or data.dataset) if spec is not None else None)
    if dataset is None:
        raise DataError(f"no dataset to evaluate {args.model} on: give --data (a run directory supplies its own).")
    max_length = args.max_length or data.max_length
    gen = GenerationArgs(
        max_new_tokens=args.max_new_tokens or gen_spec.max_new_tokens,
        batch_size=args.batch_size or gen_spec.batch_size,
        do_sample=args.do_sample if args.do_sample is not None else gen_spec.do_sample,
        temperature=args.temperature or gen_spec.temperature,
        top_p=args.top_p or gen_spec.top_p,
        seed=args.seed if args.seed is not None else (spec.seed if spec is not None else _DEFAULT_SEED),
    )
    return LMEvalPlan(
        dataset=dataset,
        # A run's own evaluation file has no hub configuration; its hub dataset does.
        config=args.config
        if args.config is not None
        else (data.config if own_data and not data.eval_dataset else None),
        split=args.split or data.eval_split,
        own_data=own_data,
        columns={
            "prompt_column": args.prompt_column or data.prompt_column,
            "response_column": args.response_column or data.response_column,
            "context_column": args.context_column if args.context_column is not None else data.context_column,
        },
        max_samples=args.max_samples if args.max_samples is not None else (data.max_eval_samples if own_data else None),
        max_length=max_length,
        # Capped: --max-length may be shorter than the run's, and a prompt must leave room for a response.
        max_prompt_length=min(data.max_prompt_length or max_length // 2, max_length - 1),
        prompt_format=lm_data.PromptFormat(
            template=data.template, context_template=data.context_template, chat_template=data.chat_template
        ),
        long_examples=data.long_examples,
        gen=gen,
        gen_samples=gen_spec.max_samples if own_data and args.max_samples is None else None,
        nll_batch=args.batch_size or (spec.train.batch_size if spec is not None else gen.batch_size),
    )


def _read_examples(plan: LMEvalPlan, target: EvalTarget, held_out: bool) -> lm_data.LMExamples:
    """The examples to score; ``held_out``: the run's data.eval_fraction rows of its train split (data_split.json)."""
    where = f"--data {plan.dataset}"
    if held_out and target.run is not None:
        ds = data_split.held_out_rows(target.run.path, target.data, where)
    else:
        ds = data_mod.load_split(plan.dataset, plan.config, plan.split, where="--data", split_key="--split")
    data_mod.check_columns(ds, plan.columns, where, setting="--{key}")
    if plan.max_samples is not None:
        ds = ds.select(range(min(plan.max_samples, len(ds))))
    cols = plan.columns
    prompt, response = str(cols["prompt_column"]), str(cols["response_column"])
    return lm_data.read_examples(ds, prompt, response, cols["context_column"], where)


def _check_positions(cfg: Any, split: data_mod.TextSplit, role: str, name: str, max_new_tokens: int) -> None:
    """The longest prompt plus the generated tokens must fit the model's positions."""
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    longest = max(len(p) for p in lm_data.prompt_ids(split.encodings[role]))
    if isinstance(limit, int) and longest + max_new_tokens > limit:
        raise KdgeoError(
            f"a prompt of {longest} tokens plus --max-new-tokens {max_new_tokens} exceeds the {limit} positions "
            f"{name} accepts; lower --max-new-tokens or --max-length."
        )


def run_lm_eval(args: LMEvalArgs, progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate the causal LM (or a causal-lm run's student) named by ``args.model``; with
    ``args.teacher``, that model too, on the very same prompts and references.

    Returns the JSON `kdgeo eval --json` writes (plus "texts": prompts, references, predictions).
    """
    from kdgeo.models import ModelRef, check_decoder, fit_length, load_causal_lm, load_config, load_tokenizer
    from kdgeo.runtime import autocast_dtype, resolve_device

    emit = progress or ignore
    target = eval_target(args.model)
    plan = plan_lm_eval(args, target)
    gen = plan.gen
    device = resolve_device(args.device)
    amp = autocast_dtype(args.precision, device)
    held_out = target.run is not None and plan.own_data and args.split is None and target.data.eval_fraction is not None
    examples = _read_examples(plan, target, held_out)

    models = [("model", target.location, args.model)]
    if args.teacher:
        models.append(("teacher", args.teacher, args.teacher))
    loaded: dict[str, tuple[Any, Any, Any]] = {}
    for role, path, name in models:
        ref = ModelRef(path, trust_remote_code=args.trust_remote_code)
        cfg = load_config(ref)
        check_decoder(cfg, name, "MODEL" if role == "model" else "--teacher")
        loaded[role] = (ref, cfg, load_tokenizer(ref))
    # Only a length given with --max-length is the user's: the run's (or the default) is clamped to the models.
    max_length, note = fit_length(
        plan.max_length,
        args.max_length is not None,
        [(cfg, f"the model {name}", role) for (role, _, name), (_, cfg, _) in zip(models, loaded.values())],
        "--max-length",
        "the run's" if target.spec is not None else "the default",
    )
    if note is not None:
        emit(Stage(note))
        plan = plan_lm_eval(dataclasses.replace(args, max_length=max_length), target)
    tokenizers = {role: tok for role, (_, _, tok) in loaded.items()}
    run_teacher = _run_teacher_tokenizer(target, args.trust_remote_code) if plan.own_data else None
    if run_teacher is not None:
        tokenizers["run teacher"] = run_teacher  # the run kept only examples both of its tokenizers kept
    # One split for every model: the same prompts, the same references, line for line.
    split, notes = lm_data.build_split(
        examples,
        plan.prompt_format,
        tokenizers,
        plan.max_length,
        plan.max_prompt_length,
        plan.long_examples,
        f"--data {plan.dataset}",
    )
    for note in notes:
        emit(Stage(note))
    results: dict[str, Any] = {}
    texts: dict[str, Any] = {}
    start = time.perf_counter()
    for role, _path, name in models:
        ref, cfg, tok = loaded[role]
        _check_positions(cfg, split, role, name, gen.max_new_tokens)
        emit(Stage(f"generating responses with {name} for {min(len(split), plan.gen_samples or len(split))} prompts"))
        model = load_causal_lm(ref).to(device)
        scored = split_scores(model, tok, split, role, gen, plan.nll_batch, device, amp, plan.gen_samples)
        results[role] = {"model": name, "scores": scored.scores, "samples": len(split)}
        texts[role] = {
            "prompts": [lm_data_prompt(tok, p) for p in lm_data.prompt_ids(split.encodings[role])],
            "references": split.responses or [],
            "predictions": scored.generated or [],
            "records": scored.records(split),
        }
        del model
    return {
        "task": "causal-lm",
        "model": args.model,
        "dataset": plan.dataset,
        "split": plan.split,
        # the evaluated examples' content hash: equal to a run's summary.json data.eval_sha256 on the same examples
        "eval_sha256": rundir.eval_sha256(split.eval_keys()),
        "eval_examples": len(split),
        "results": results,
        # prompts fitted into max_prompt_length without looking at the reference; counts per tokenizer
        "prompts": {
            "max_prompt_length": plan.max_prompt_length,
            "max_length": plan.max_length,
            "truncation": split.truncation,
        },
        "generation": {
            "max_new_tokens": gen.max_new_tokens,
            "do_sample": gen.do_sample,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "seed": gen.seed,
        },
        "device": str(device),
        "seconds": time.perf_counter() - start,
        "texts": texts,
    }


def wants_causal_lm(model: str, trust_remote_code: bool = False) -> bool:
    """Whether `kdgeo eval MODEL` is a causal-LM evaluation: a causal-lm run directory, or a model
    whose config names a *ForCausalLM / *LMHeadModel architecture. Unloadable references say
    no here; the classification path reports them."""
    from kdgeo.models import ModelRef, load_config

    path = Path(model).expanduser()
    try:
        run = open_run(path)
    except KdgeoError:
        return False
    if run is not None:
        return run.task == "causal-lm"
    try:
        config = load_config(ModelRef(model, trust_remote_code=trust_remote_code))
    except KdgeoError:
        return False
    return is_causal_lm(config)


def write_predictions(path: Path, result: dict[str, Any]) -> None:
    """One JSON line per prompt: the model's predictions.jsonl record (index, text_sha256, rougeL, nll,
    tokens: :func:`kdgeo.rundir.read_predictions`), then prompt, reference and each model's generated
    response (a teacher's as ``teacher_prediction``)."""
    from kdgeo.rundir import write_text_atomic

    texts = result["texts"]
    roles = list(texts)
    first = texts[roles[0]]
    records = first.get("records") or []
    lines = []
    for i, (prompt, reference) in enumerate(zip(first["prompts"], first["references"])):
        row = {**(records[i] if i < len(records) else {}), "prompt": prompt, "reference": reference}
        for role in roles:
            preds = texts[role]["predictions"]
            row["prediction" if role == "model" else f"{role}_prediction"] = preds[i] if i < len(preds) else None
        lines.append(json.dumps(rundir.json_safe(row), ensure_ascii=False))
    body = "\n".join(lines) + "\n"
    if str(path) == "-":
        from kdgeo import report

        report.write_stdout(body)
    else:
        write_text_atomic(Path(path), body)
