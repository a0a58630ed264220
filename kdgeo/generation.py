"""Evaluation of causal-LM (decoder) instruction distillation: generation, response NLL, ROUGE-L.

Pure functions over token-id lists; no spec objects, no file I/O. The model must already be on
``device``.

- ``generate``: batched left-padded decoding with a KV cache, greedy or temperature + nucleus
  sampling (Holtzman et al. 2020), written out by hand instead of ``model.generate`` so that the
  decoding rule is the same for every architecture and every transformers version.
- ``response_nll``: NLL = -sum_i sum_{t in response_i} log p(y_t | x_i, y_<t), teacher forced,
  prompt tokens never scored; ``perplexity = exp(NLL / count)``.
- ``rouge_l``: mean ROUGE-L F-measure x 100 (Lin 2004), the generation metric of MiniLLM
  (Gu et al. 2024) and of the geometry-KD paper's instruction-following tables.

Padding conventions. Generation pads on the LEFT so that the last column is every row's newest
token; the positions are then given explicitly as ``cumsum(mask) - 1`` clipped at 0, so a
left-padded row sees the same positions 0..n-1 as when it runs alone (GPT-2 would otherwise
count the pads; OPT derives the same positions from the mask by itself, and passing them is
harmless). Scoring pads on the RIGHT, where positions are the plain 0..n-1 of every row.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdgeo.runtime import autocast

__all__ = [
    "GenerationArgs",
    "generate",
    "lm_scores",
    "perplexity",
    "response_nll",
    "response_nll_each",
    "rouge_l",
    "rouge_l_each",
    "rouge_l_mean",
]


@dataclass(frozen=True)
class GenerationArgs:
    """How to decode for ``lm_scores``; flat values, validated by ``generate``."""

    max_new_tokens: int = 128
    """At most this many new tokens per prompt (eos stops a row earlier)."""
    batch_size: int = 16
    """Prompts per forward pass, for both generation and response scoring."""
    do_sample: bool = False
    """False: greedy (arg-max). True: temperature + nucleus (top-p) sampling."""
    temperature: float = 1.0
    """Sampling temperature tau > 0: p ~ softmax(logits / tau). Ignored when greedy."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]: sample from the smallest top set with mass >= top_p. Ignored when greedy."""
    seed: int = 0
    """Sampling seed; with a fixed seed sampling is reproducible. Ignored when greedy."""


# --------------------------------------------------------------------------------------------
# Forward-call compatibility
# --------------------------------------------------------------------------------------------


def _forward_kwargs(model: nn.Module) -> tuple[str, bool, str | None]:
    """(name of the KV-cache keyword, whether ``position_ids`` is accepted, logits-to-keep keyword).

    transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name still works until
    5.40 with a deprecation warning); 4.x only knows ``past_key_values``. Reading the signature
    keeps one code path for both instead of pinning a version.
    """
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache_kw, "position_ids" in params, keep_kw


def _output_cache(output: Any) -> Any:
    """The KV cache of a forward output: ``.cache`` in transformers 5.x, ``.past_key_values`` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        raise ValueError(
            f"{len(empty)} empty prompt(s) (index {shown}): a causal LM needs at least one context token "
            "to predict the first new token; prepend a BOS token or drop these rows"
        )


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (stable), cut into batches: rows of similar length pad little."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _row_generators(indices: Sequence[int], seed: int) -> list[torch.Generator]:
    """One CPU generator per prompt, seeded by (seed, prompt index).

    A row's random draws then depend only on ``seed`` and its index in ``prompts``, not on the
    batch size, the length sort or the device, so a sampled answer can be reproduced alone.
    The pair is hashed to 32 bits because the CPU Mersenne Twister keeps only the low 32 bits of
    its seed: packing (seed << 32 | index) would silently ignore ``seed``.
    """

    def row_seed(i: int) -> int:
        return int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=4).digest(), "little")

    return [torch.Generator().manual_seed(row_seed(i)) for i in indices]


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Draw one token per row from softmax(logits / temperature) restricted to the top-p nucleus.

    Nucleus (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"): sort the
    probabilities p_(1) >= p_(2) >= ..., keep token k while the mass before it,
    sum_{j<k} p_(j), is < top_p (so the top token is always kept and top_p -> 0 is greedy),
    renormalise and draw by inverse CDF with u ~ U[0, 1) from the row's own generator.

    logits: (B, V) float32. Returns (B,) token ids.
    """
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    sorted_p, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)  # (B, V), (B, V)
    if top_p < 1.0:
        # top_p = 1 skips the cut: float rounding can make the cumulative mass reach 1 before the tail
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # (B, V)
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    cdf = torch.cumsum(sorted_p, dim=-1)  # (B, V)
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(cdf.device)  # (B,)
    target = (u * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    # first k with cdf_k > u * total; clamp guards u * total rounding up to the total itself
    pos = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    # rounding can also land on a zeroed (cut) entry past the nucleus: step back to the last kept one
    kept = (sorted_p > 0).sum(-1, keepdim=True) - 1  # (B, 1)
    pos = torch.minimum(pos, kept)
    return sorted_ids.gather(-1, pos).squeeze(-1)  # (B,)


def _check_generation_args(
    max_new_tokens: int, batch_size: int, do_sample: bool, temperature: float, top_p: float
) -> None:
    problems = []
    if max_new_tokens < 0:
        problems.append(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if do_sample and not temperature > 0:
        problems.append(f"temperature must be > 0 when sampling, got {temperature}")
    if do_sample and not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1] when sampling, got {top_p}")
    if problems:
        raise ValueError("; ".join(problems))


def generate(
    model: nn.Module,
    tokenizer_pad_id: int,
    eos_id: int | Sequence[int] | None,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """New tokens for every prompt, in input order (the prompt and the eos token are not included).

    Greedy: y_t = argmax_v logits_t[v]. Sampling: y_t ~ nucleus_top_p(softmax(logits_t / tau))
    (see ``_sample``), reproducible for a fixed ``seed`` whatever the batch size.

    Prompts are sorted by length into batches of ``batch_size`` and LEFT-padded with
    ``tokenizer_pad_id`` (attention mask 0 there, positions cumsum(mask) - 1 clipped at 0). The
    loop runs one prefill pass, then one cached pass per new token with the mask extended by a 1.
    A row stops at ``eos_id`` (or any of several: chat models end a turn with their own token)
    or after ``max_new_tokens`` tokens; a batch stops when every row has. Runs under
    ``torch.no_grad`` (not inference mode: FSDP reuses its buffers in training) and autocast to
    ``amp`` when given, and restores ``model.training``. Raises ValueError on an empty prompt or
    invalid decoding arguments.
    """
    _check_prompts(prompts)
    _check_generation_args(max_new_tokens, batch_size, do_sample, temperature, top_p)
    results: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0 or not prompts:
        return results
    cache_kw, takes_positions, keep_kw = _forward_kwargs(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, amp):
            for idx in _length_batches([len(p) for p in prompts], batch_size):
                new = _generate_batch(
                    model,
                    [prompts[i] for i in idx],
                    tokenizer_pad_id,
                    eos_id,
                    max_new_tokens,
                    device,
                    cache_kw,
                    takes_positions,
                    keep_kw,
                    _row_generators(idx, seed) if do_sample else None,
                    temperature,
                    top_p,
                )
                for i, ids in zip(idx, new):
                    results[i] = ids
    finally:
        model.train(was_training)
    return results


def _generate_batch(
    model: nn.Module,
    rows: list[list[int]],
    pad_id: int,
    eos_id: int | Sequence[int] | None,
    max_new_tokens: int,
    device: torch.device,
    cache_kw: str,
    takes_positions: bool,
    keep_kw: str | None,
    generators: list[torch.Generator] | None,
    temperature: float,
    top_p: float,
) -> list[list[int]]:
    """Decode one left-padded batch; see ``generate``."""
    b, width = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((b, width), dtype=torch.long)  # (B, L)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    # pads get position 0 (clipped -1): any valid index works, the mask hides them
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)

    out_ids: list[list[int]] = [[] for _ in rows]
    done = torch.zeros(b, dtype=torch.bool, device=device)  # (B,)
    stops = [eos_id] if isinstance(eos_id, int) else list(eos_id or [])
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device) if stops else None  # (S,)
    cache: Any = None
    step_ids, step_pos = input_ids, positions
    for step in range(max_new_tokens):
        kwargs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": mask, "use_cache": True, cache_kw: cache}
        if takes_positions:
            kwargs["position_ids"] = step_pos
        if keep_kw is not None:
            kwargs[keep_kw] = 1  # only the last column is needed: skips a (B, L, V) prefill logits tensor
        output = model(**kwargs)
        cache = _output_cache(output)
        logits = output.logits[:, -1, :].float()  # (B, V)
        if generators is None:
            next_ids = logits.argmax(-1)  # (B,)
        else:
            next_ids = _sample(logits, temperature, top_p, generators)  # (B,)
        is_eos = torch.isin(next_ids, stop_ids) if stop_ids is not None else torch.zeros_like(done)  # (B,)
        keep = ~done & ~is_eos  # (B,) rows that emit this token
        for i, (tok, k) in enumerate(zip(next_ids.tolist(), keep.tolist())):
            if k:
                out_ids[i].append(tok)
        done = done | is_eos
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        # finished rows keep decoding pads (their output is no longer read) so the batch stays rectangular
        step_ids = torch.where(done, torch.full_like(next_ids, pad_id), next_ids).unsqueeze(-1)  # (B, 1)
        step_pos = step_pos[:, -1:] + 1  # (B, 1)
        mask = torch.cat([mask, mask.new_ones((b, 1))], dim=-1)  # (B, L + step + 1)
    return out_ids


# --------------------------------------------------------------------------------------------
# Teacher-forced response likelihood
# --------------------------------------------------------------------------------------------


def response_nll(
    model: nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None = None,
) -> tuple[float, int]:
    """(summed NLL of the response tokens, number of response tokens scored).

    NLL = -sum_i sum_{t=1..|y_i|} log softmax(f(x_i ++ y_i)_{|x_i| + t - 1})[y_{i,t}]

    teacher forcing on the concatenation prompt ++ response, RIGHT-padded with ``pad_id``
    (attention mask 0 there); the logits at the scored positions are cast to float32 before the
    log-softmax and the sum is accumulated in float64. Prompt tokens are never targets; rows with
    an empty response contribute nothing (and are not run). This is a token-level sum: MiniLLM's
    ``lm_loss`` (Gu et al. 2024) averages per-row means instead, which weights short answers more.
    Runs under ``torch.no_grad`` (not inference mode: FSDP reuses its buffers in training) and
    autocast to ``amp`` when given; restores ``model.training``.
    """
    total, count, _ = response_nll_each(model, prompts, responses, pad_id, batch_size, device, amp)
    return total, count


def response_nll_each(
    model: nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None = None,
) -> tuple[float, int, list[float]]:
    """:func:`response_nll`'s (summed NLL, tokens scored), plus each example's own summed NLL (0.0 for an
    empty response), from the same forward passes: the per-example records of predictions.jsonl. The
    total is accumulated batch by batch exactly as before, so it is not the (differently rounded) sum of
    the per-example values."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses differ in length ({len(prompts)} vs {len(responses)})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_prompts(prompts)
    scored = [i for i, r in enumerate(responses) if len(r) > 0]
    each = [0.0] * len(prompts)
    if not scored:
        return 0.0, 0, each
    _, takes_positions, _ = _forward_kwargs(model)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            lengths = [len(prompts[i]) + len(responses[i]) for i in scored]
            for batch in _length_batches(lengths, batch_size):
                rows = [scored[k] for k in batch]
                nll, n, rows_nll = _response_nll_batch(
                    model,
                    [prompts[i] for i in rows],
                    [responses[i] for i in rows],
                    pad_id,
                    device,
                    amp,
                    takes_positions,
                )
                total += nll
                count += n
                for i, value in zip(rows, rows_nll):
                    each[i] = value
    finally:
        model.train(was_training)
    return total, count, each


def _response_nll_batch(
    model: nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    device: torch.device,
    amp: torch.dtype | None,
    takes_positions: bool,
) -> tuple[float, int, list[float]]:
    """Score one right-padded batch; see ``response_nll``. Returns (summed NLL, tokens, per-row summed NLL)."""
    b = len(prompts)
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((b, width), dtype=torch.long)  # (B, L)
    # target[i, t] marks that input_ids[i, t + 1] is a response token, predicted by the logits at t
    target = torch.zeros((b, width - 1), dtype=torch.bool)  # (B, L - 1)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
        mask[i, :n] = 1
        target[i, len(p) - 1 : n - 1] = True
    input_ids, mask, target = input_ids.to(device), mask.to(device), target.to(device)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
    if takes_positions:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L) = 0..n-1 on real tokens
    with autocast(device, amp):
        logits = model(**kwargs).logits  # (B, L, V)
    # only the N scored positions go to float32: a full (B, L, V) upcast is the memory peak otherwise
    picked = logits[:, :-1][target].float()  # (N, V)
    labels = input_ids[:, 1:][target]  # (N,)
    logp = torch.log_softmax(picked, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (N,)
    # boolean indexing is row-major, so the k-th scored position belongs to row row_of[k]
    row_of = target.nonzero(as_tuple=True)[0]  # (N,)
    rows_nll = torch.zeros(b, dtype=torch.float64, device=logp.device).index_add_(0, row_of, -logp.double())  # (B,)
    return -logp.double().sum().item(), int(labels.numel()), rows_nll.tolist()


def perplexity(nll: float, count: int) -> float:
    """exp(nll / count): the per-token perplexity of the scored responses; nan when nothing was scored."""
    if count == 0:
        return float("nan")
    try:
        return math.exp(nll / count)
    except OverflowError:
        return float("inf")


# --------------------------------------------------------------------------------------------
# ROUGE-L
# --------------------------------------------------------------------------------------------


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure x 100 over (prediction, reference) pairs; nan for no pairs.

    ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries"): with LCS the
    longest common subsequence of the two token sequences, P = LCS / |prediction|,
    R = LCS / |reference| and F = 2 P R / (P + R) (0 when LCS = 0). Computed by Google's
    ``rouge_score`` with ``RougeScorer(["rougeL"], use_stemmer=True)``: lower-cased, split on
    non-alphanumerics, Porter-stemmed. This is the scorer of the Super-NaturalInstructions
    evaluation that MiniLLM (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language
    Models", ICLR) uses for its instruction-following ROUGE-L, with one reference per example.
    The default tokenizer keeps only [a-z0-9], so text without Latin letters or digits scores 0.
    """
    if not predictions:
        if len(references) != 0:
            raise ValueError(f"predictions and references differ in length (0 vs {len(references)})")
        return float("nan")
    return rouge_l_mean(rouge_l_each(predictions, references))


def rouge_l_mean(fmeasures: list[float]) -> float:
    """100 x fsum(F) / n of per-pair F-measures (:func:`rouge_l_each`); nan for none."""
    return 100.0 * math.fsum(fmeasures) / len(fmeasures) if fmeasures else float("nan")


def rouge_l_each(predictions: list[str], references: list[str]) -> list[float]:
    """Each pair's ROUGE-L F-measure, in [0, 1] (not x 100): :func:`rouge_l` is 100 x their fsum / n."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references differ in length ({len(predictions)} vs {len(references)})")
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # an optional dependency: only instruction (causal-LM) evaluation needs it
        raise ImportError("ROUGE-L needs the `rouge-score` package: pip install rouge-score") from err
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(target=ref, prediction=pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


# --------------------------------------------------------------------------------------------
# All scores of one model
# --------------------------------------------------------------------------------------------


def lm_scores(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    responses: list[list[int]],
    references: list[str],
    args: GenerationArgs,
    device: torch.device,
    amp: torch.dtype | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Instruction-following scores of a causal LM, and its decoded predictions in input order.

    - ``rougeL``: ``rouge_l(predictions, references)`` on the generated answers (x 100).
    - ``response_nll``: NLL / count of the gold ``responses`` given the prompts (nats per token).
    - ``perplexity``: exp(response_nll); nan when no response token was scored.
    - ``response_tokens``: count, the number of gold response tokens scored.
    - ``generated_tokens_mean``: mean number of new tokens per prompt (eos not counted).

    Predictions are ``tokenizer.decode(ids, skip_special_tokens=True).strip()``. Padding uses
    ``tokenizer.pad_token_id``, else ``eos_token_id``, else 0 (pads are masked, so the choice
    only has to be a valid id); generation stops at ``tokenizer.eos_token_id``.
    """
    if not len(prompts) == len(responses) == len(references):
        raise ValueError(
            f"prompts, responses and references differ in length ({len(prompts)}, {len(responses)}, {len(references)})"
        )
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    generated = generate(
        model,
        pad_id,
        tokenizer.eos_token_id,
        prompts,
        args.max_new_tokens,
        args.batch_size,
        device,
        amp,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    predictions = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]
    nll, count = response_nll(model, prompts, responses, pad_id, args.batch_size, device, amp)
    scores = {
        "rougeL": rouge_l(predictions, references),
        "perplexity": perplexity(nll, count),
        "response_nll": nll / count if count else float("nan"),
        "response_tokens": count,
        "generated_tokens_mean": sum(len(g) for g in generated) / len(generated) if generated else float("nan"),
    }
    return scores, predictions
