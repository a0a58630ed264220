"""Instruction data for causal language models: prompt -> response examples, tokenized.

Each example is written as ``prompt_text + response``: the prompt text is the instruction
formatted by a template (default: the Alpaca format MiniLLM uses on Dolly) or by the
tokenizer's chat template, and the response is the reference answer followed by the
end-of-sequence token. Prompt and response are tokenized separately (as MiniLLM does), so the
boundary between them is exact: ``response_start`` is the index of the first response token,
and every loss counts positions from there on only.

Lengths are settled in two steps, and the first never looks at the response:

1. The prompt. A prompt of more than ``max_prompt_length`` tokens follows ``long_examples``:
   ``truncate`` (default) cuts the context (the template's ``{context}``) at its end until the
   prompt fits, then, only if it still does not fit, the instruction at its end; the template
   itself (its lead-in, its "### Response:" cue, a BOS token) is always kept whole. ``drop``
   leaves the example out, as MiniLLM (Gu et al. 2024, ``tools/process_data_dolly.py``) drops
   prompts over its ``max_prompt_length``. ``error`` stops with the row. The prompt therefore
   depends only on the instruction and its context, so the prompt a model generates from at
   evaluation is the same whatever reference it is scored against, and a long context cannot
   push the instruction out.
2. The response. When prompt + response is longer than ``max_length``: ``truncate`` cuts the
   response at its end (training and the perplexity of references see at most ``max_length``
   tokens; ROUGE-L still compares with the whole reference text), ``drop`` leaves the example
   out, ``error`` stops.

Every cut and drop is counted (``TruncationReport``), reported as a stage message and kept on
the split (``TextSplit.truncation``) for summary.json and `kdgeo eval`. A response that ends up
with no tokens at all (an empty answer and a tokenizer without an end-of-sequence token) is
always dropped and counted: it would contribute nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kdgeo import data as data_mod
from kdgeo.errors import DataError


@dataclass(frozen=True)
class PromptFormat:
    """How instructions become prompt text (flat values from the spec's [data] table)."""

    template: str
    context_template: str
    chat_template: bool = False


@dataclass
class LMExamples:
    """Formatted prompts and reference responses of one split (before tokenization)."""

    prompts: list[str]
    responses: list[str]
    instructions: list[str]
    contexts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class TruncationReport:
    """What happened to examples that did not fit (see the module docstring for the rules)."""

    max_prompt_length: int = 0
    max_length: int = 0
    contexts_cut: int = 0
    """Prompts that fit once their context was cut at the end (the instruction is whole)."""
    instructions_cut: int = 0
    """Prompts whose instruction was cut at the end too: it alone did not fit."""
    dropped_long_prompt: int = 0
    """Examples left out because their prompt was longer than max_prompt_length (``drop``)."""
    responses_cut: int = 0
    dropped_long: int = 0
    """Examples left out because prompt + response was longer than max_length (``drop``)."""
    dropped_empty: int = 0
    kept: list[int] = field(default_factory=list)
    """Indices (into the split before encoding) of the examples kept, in order."""

    COUNTS: ClassVar[tuple[str, ...]] = (
        "contexts_cut",
        "instructions_cut",
        "dropped_long_prompt",
        "responses_cut",
        "dropped_long",
        "dropped_empty",
    )

    def counts(self) -> dict[str, int]:
        """The counts by name, zeros included (for summary.json and `kdgeo eval --json`)."""
        return {name: getattr(self, name) for name in self.COUNTS}

    def describe(self, where: str) -> str | None:
        over_prompt = f"longer than data.max_prompt_length = {self.max_prompt_length}"
        parts = []
        if self.contexts_cut:
            parts.append(f"{self.contexts_cut} prompts {over_prompt} had their context cut at the end")
        if self.instructions_cut:
            parts.append(
                f"{self.instructions_cut} prompts {over_prompt} even without context had their instruction cut "
                "at the end"
            )
        if self.dropped_long_prompt:
            parts.append(f"{self.dropped_long_prompt} examples with a prompt {over_prompt} dropped")
        if self.responses_cut:
            parts.append(f"{self.responses_cut} responses cut at the end to fit data.max_length = {self.max_length}")
        if self.dropped_long:
            parts.append(f"{self.dropped_long} examples longer than data.max_length = {self.max_length} dropped")
        if self.dropped_empty:
            parts.append(f"{self.dropped_empty} examples with an empty response dropped")
        return f"{where}: " + ", ".join(parts) if parts else None


def format_prompt(tokenizer: Any, fmt: PromptFormat, instruction: str, context: str | None) -> str:
    """The text the model sees before the response."""
    if fmt.chat_template:
        content = instruction if not context else f"{instruction}\n\n{context}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if context:
        return fmt.context_template.format(prompt=instruction, context=context)
    return fmt.template.format(prompt=instruction)


def read_examples(
    ds: Any, prompt_column: str, response_column: str, context_column: str | None, where: str
) -> LMExamples:
    """Instructions, optional contexts and responses as strings (a DataError names a bad row)."""
    instructions = data_mod.texts_of(ds, prompt_column, where)
    responses = data_mod.texts_of(ds, response_column, where)
    contexts = None
    if context_column is not None:
        contexts = ["" if v is None else v for v in ds[context_column]]
        for row, value in enumerate(contexts):
            if not isinstance(value, str):
                raise DataError(
                    f"{where}: row {row} of column '{context_column}' is {type(value).__name__} ({value!r}), not text."
                )
    for row, text in enumerate(instructions):
        if not text.strip():
            raise DataError(
                f"{where}: row {row} has an empty prompt in column '{prompt_column}'; fill it or remove the row "
                "(a response without an instruction teaches nothing)."
            )
    return LMExamples(prompts=[], responses=responses, instructions=instructions, contexts=contexts)


def _check_chat_template(tokenizer: Any, fmt: PromptFormat, where: str) -> None:
    if fmt.chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: data.chat_template = true, but the tokenizer has no chat template. Set data.chat_template = "
            "false to use data.template, or use a chat model's tokenizer."
        )


Fitted = tuple[str, list[int]]
"""A prompt's text and token ids."""


def _longest_fitting(n: int, attempt: Callable[[int], Fitted | None], low: int = 0) -> Fitted | None:
    """The result of ``attempt(k)`` for the largest k in [low, n] that fits (binary search; None if none does).

    Token counts grow with the kept prefix, up to the odd merge at the cut, so the search can settle
    one token short of the longest fitting prefix; whatever it returns was checked to fit.
    """
    best = None
    while low <= n:
        mid = (low + n) // 2
        got = attempt(mid)
        if got is not None:
            best, low = got, mid + 1
        else:
            n = mid - 1
    return best


def fit_prompt(
    tokenizer: Any,
    fmt: PromptFormat,
    instruction: str,
    context: str | None,
    max_prompt_length: int,
    where: str,
    row: int,
) -> tuple[str, list[int], str]:
    """The prompt of one example in at most ``max_prompt_length`` tokens: (text, ids, what was cut).

    What was cut is "" (nothing), "context" or "instruction" (the context is then gone too). Fields
    are cut at token boundaries of their own encoding, from the end, and the prompt is formatted and
    tokenized again, so the template (lead-in, response cue, special tokens) is always whole. The
    response plays no part: the same instruction and context give the same prompt.
    """
    special = not fmt.chat_template  # a chat template writes its own special tokens into the text

    def attempt(ins: str, ctx: str | None) -> Fitted | None:
        text = format_prompt(tokenizer, fmt, ins, ctx)
        ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
        return (text, ids) if len(ids) <= max_prompt_length else None

    whole = attempt(instruction, context)
    if whole is not None:
        return whole[0], whole[1], ""
    if context:
        ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        # k = 0 gives an empty context, which formats with the plain template: the instruction alone
        got = _longest_fitting(len(ctx_ids), lambda k: attempt(instruction, tokenizer.decode(ctx_ids[:k])))
        if got is not None:
            return got[0], got[1], "context"
    ins_ids = tokenizer(instruction, add_special_tokens=False)["input_ids"]
    got = _longest_fitting(len(ins_ids), lambda k: attempt(tokenizer.decode(ins_ids[:k]), None), low=1)
    if got is None:
        bare = format_prompt(tokenizer, fmt, tokenizer.decode(ins_ids[:1]), None)
        bare_length = len(tokenizer(bare, add_special_tokens=special)["input_ids"])
        raise DataError(
            f"{where}: data.max_prompt_length = {max_prompt_length} is shorter than the prompt template itself: "
            f"row {row} with one instruction token is {bare_length} tokens. Raise data.max_prompt_length (default: "
            "half of data.max_length), or shorten data.template / data.context_template."
        )
    return got[0], got[1], "instruction"


def encode_lm(
    tokenizer: Any,
    fmt: PromptFormat,
    examples: LMExamples,
    max_length: int,
    max_prompt_length: int,
    long_examples: str,
    where: str,
) -> tuple[data_mod.Encoded, list[str], TruncationReport]:
    """Token ids ``prompt + response + [eos]`` per example, with the response boundary.

    The prompt is formatted from ``examples.instructions`` / ``examples.contexts`` and fitted into
    ``max_prompt_length`` without looking at the response (``fit_prompt``); then the response is
    fitted into what is left of ``max_length`` (module docstring). Returns the encoding of the kept
    examples, their prompt texts, and a report (``report.kept`` lists them).
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length {max_prompt_length} must be between 1 and max_length - 1 ({max_length - 1})"
        )
    _check_chat_template(tokenizer, fmt, where)
    r_ids = tokenizer(list(examples.responses), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    contexts: Sequence[str | None] = examples.contexts or [None] * len(examples.instructions)
    report = TruncationReport(max_prompt_length=max_prompt_length, max_length=max_length)
    input_ids: list[list[int]] = []
    starts: list[int] = []
    texts: list[str] = []
    for row, (instruction, context, r) in enumerate(zip(examples.instructions, contexts, r_ids)):
        r = list(r) + ([eos] if eos is not None else [])
        if not r:
            report.dropped_empty += 1
            continue
        if long_examples == "truncate":
            text, p, cut = fit_prompt(tokenizer, fmt, instruction, context, max_prompt_length, where, row)
            report.contexts_cut += cut == "context"
            report.instructions_cut += cut == "instruction"
        else:
            text = format_prompt(tokenizer, fmt, instruction, context)
            p = list(tokenizer(text, add_special_tokens=not fmt.chat_template)["input_ids"])
            if len(p) > max_prompt_length:
                if long_examples == "drop":
                    report.dropped_long_prompt += 1
                    continue
                raise DataError(
                    f"{where}: row {row}'s prompt is {len(p)} tokens, longer than data.max_prompt_length = "
                    f"{max_prompt_length}. Raise data.max_prompt_length, or set data.long_examples = "
                    '"truncate" (cut the context, then the instruction, at its end; the template is kept whole) or '
                    '"drop" (leave such rows out).'
                )
        if len(p) + len(r) > max_length:
            if long_examples == "error":
                raise DataError(
                    f"{where}: row {row} is {len(p)} prompt + {len(r)} response tokens, longer than data.max_length = "
                    f'{max_length}. Raise data.max_length, or set data.long_examples = "truncate" (cut the '
                    'response\'s end) or "drop".'
                )
            if long_examples == "drop":
                report.dropped_long += 1
                continue
            r = r[: max_length - len(p)]  # >= 1 token: len(p) <= max_prompt_length < max_length
            report.responses_cut += 1
        input_ids.append(p + r)
        starts.append(len(p))
        texts.append(text)
        report.kept.append(row)
    encoded = data_mod.Encoded(input_ids=input_ids, token_type_ids=None, pad_id=pad_id, response_start=starts)
    return encoded, texts, report


def prompt_ids(encoded: data_mod.Encoded) -> list[list[int]]:
    """The (possibly truncated) prompt of every encoded example: what generation starts from."""
    assert encoded.response_start is not None
    return [ids[:start] for ids, start in zip(encoded.input_ids, encoded.response_start)]


def response_ids(encoded: data_mod.Encoded) -> list[list[int]]:
    assert encoded.response_start is not None
    return [ids[start:] for ids, start in zip(encoded.input_ids, encoded.response_start)]


NewResponse = Callable[[Any, int], "list[int] | None"]
"""(tokenizer, example index) -> that example's new response ids, end-of-sequence included where the
response ended; None keeps the example's reference response."""


def replace_responses(
    split: data_mod.TextSplit, tokenizers: dict[str, Any], new: NewResponse, texts: list[str], max_length: int
) -> data_mod.TextSplit:
    """A copy of ``split`` with every example's response replaced (sequence-level KD: the teacher's own
    responses, :mod:`kdgeo.sequence_kd`); the prompts, their cuts and the examples kept are unchanged.

    Each distinct tokenizer's encoding is rebuilt once (roles sharing a tokenizer share it, as in
    :func:`build_split`): prompt + ``new(tokenizer, k)``, cut at its end to fit ``max_length`` (the
    prompt is at most max_prompt_length < max_length, so at least one response token stays); where
    ``new`` gives None the reference response stays. ``texts`` are the responses as text (the split's
    ``responses``). Where one encoding's response was cut shorter than the other's (its prompt took more
    of max_length), the other is cut to match, so response tokens still pair one by one.
    """
    rebuilt: dict[int, data_mod.Encoded] = {}
    encodings: dict[str, data_mod.Encoded] = {}
    for role, tok in tokenizers.items():
        enc = split.encodings[role]
        if id(enc) not in rebuilt:
            assert enc.response_start is not None  # build_split marks every causal-LM example's response
            ids = []
            for k, (row, start) in enumerate(zip(enc.input_ids, enc.response_start)):
                response = new(tok, k)
                ids.append(list(row) if response is None else (list(row[:start]) + list(response))[:max_length])
            rebuilt[id(enc)] = data_mod.Encoded(
                input_ids=ids, token_type_ids=None, pad_id=enc.pad_id, response_start=list(enc.response_start)
            )
        encodings[role] = rebuilt[id(enc)]
    _align_cut_responses(list(rebuilt.values()))
    return dataclasses.replace(split, encodings=encodings, responses=list(texts))


def build_split(
    examples: LMExamples,
    fmt: PromptFormat,
    tokenizers: dict[str, Any],
    max_length: int,
    max_prompt_length: int,
    long_examples: str,
    where: str,
) -> tuple[data_mod.TextSplit, list[str]]:
    """Format and encode ``examples`` once per distinct tokenizer (each model sees prompts in its
    own format: a chat template belongs to its tokenizer) and keep the examples every tokenizer
    kept, so teacher and student see the same examples. The split's ``texts`` are the first
    role's prompts as that model sees them (after any cut). Returns the split and report lines;
    the counts are on ``split.truncation``, keyed by the roles that share each tokenizer."""
    encoded: dict[int, tuple[list[str], data_mod.Encoded, TruncationReport]] = {}
    for tok in tokenizers.values():
        if id(tok) not in encoded:
            enc, texts, rep = encode_lm(tok, fmt, examples, max_length, max_prompt_length, long_examples, where)
            encoded[id(tok)] = (texts, enc, rep)
    kept = sorted(set.intersection(*(set(rep.kept) for _, _, rep in encoded.values())))
    if not kept:
        raise DataError(
            f"{where}: no example is left after tokenization (all had a prompt longer than data.max_prompt_length = "
            f"{max_prompt_length}, were longer than data.max_length = {max_length}, or had an empty response); raise "
            'those limits or set data.long_examples = "truncate".'
        )
    first_texts, _, first_rep = encoded[id(next(iter(tokenizers.values())))]
    first_position = {row: k for k, row in enumerate(first_rep.kept)}
    split = data_mod.TextSplit(
        texts=[first_texts[first_position[i]] for i in kept],
        labels=None,
        responses=[examples.responses[i] for i in kept],
        truncation={},
        sources=[
            (
                examples.instructions[i],
                examples.contexts[i] if examples.contexts is not None else "",
                examples.responses[i],
            )
            for i in kept
        ],
    )
    notes = []
    roles_of: dict[int, list[str]] = {}
    for role, tok in tokenizers.items():
        roles_of.setdefault(id(tok), []).append(role)
    subs: dict[int, data_mod.Encoded] = {}
    for key, (_, enc, rep) in encoded.items():
        position = {row: k for k, row in enumerate(rep.kept)}
        picked = [position[i] for i in kept]
        assert enc.response_start is not None
        subs[key] = data_mod.Encoded(
            input_ids=[list(enc.input_ids[k]) for k in picked],
            token_type_ids=None,
            pad_id=enc.pad_id,
            response_start=[enc.response_start[k] for k in picked],
        )
        for role in roles_of[key]:
            split.encodings[role] = subs[key]
        assert split.truncation is not None
        split.truncation[" and ".join(roles_of[key])] = rep.counts()
        line = rep.describe(f"{where} ({' and '.join(roles_of[key])} tokenizer)")
        if line:
            notes.append(line)
    _align_cut_responses(list(subs.values()))
    return split, notes


def _align_cut_responses(encodings: list[data_mod.Encoded]) -> None:
    """Where tokenizers give the same response tokens but one encoding cut it shorter (its prompt
    took more of max_length, e.g. one more BOS token), cut the others to match, so the response
    tokens still pair one by one."""
    if len(encodings) < 2:
        return
    starts_of: list[list[int]] = []
    for e in encodings:
        assert e.response_start is not None  # build_split's encodings always mark where the response starts
        starts_of.append(e.response_start)
    for k in range(len(encodings[0].input_ids)):
        starts = [s[k] for s in starts_of]
        responses = [e.input_ids[k][s:] for e, s in zip(encodings, starts)]
        shortest = min(len(r) for r in responses)
        if any(len(r) != shortest for r in responses) and all(
            r[:shortest] == responses[0][:shortest] for r in responses
        ):
            for e, s in zip(encodings, starts):
                e.input_ids[k] = e.input_ids[k][: s + shortest]


def response_predictions(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal LM's predictions of response tokens, and those tokens.

    Position j predicts token j + 1, so the predictions that count are at positions j with
    ``response_mask[:, j + 1] == 1``: nothing at a prompt or padding position is selected.

    logits: (B, T, V); input_ids, response_mask: (B, T). Returns ((n, V), (n,)), n = response tokens.
    """
    targets_mask = response_mask[:, 1:].bool()  # (B, T-1): token j+1 is a response token
    predictions = logits[:, :-1][targets_mask]  # (n, V)
    targets = input_ids[:, 1:][targets_mask]  # (n,)
    return predictions, targets
