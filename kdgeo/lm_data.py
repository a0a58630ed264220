"""Instruction data for causal language models: prompt -> response examples, tokenized.

Each example is written as ``prompt_text + response``: the prompt text is the instruction
formatted by a template (default: the Alpaca format MiniLLM uses on Dolly) or by the
tokenizer's chat template, and the response is the reference answer followed by the
end-of-sequence token. Prompt and response are tokenized separately (as MiniLLM does), so the
boundary between them is exact: ``response_start`` is the index of the first response token,
and every loss counts positions from there on only.

Examples longer than ``max_length`` follow ``long_examples``:

- ``truncate`` (default): the prompt is cut from the left (its end, next to the response, is
  what conditions the answer; a leading BOS token is kept) down to ``max(max_prompt_length,
  max_length - response length)``; then the response is cut at the end to fit. Counts are
  reported, never silent.
- ``drop``: the example is left out (counted).
- ``error``: a DataError naming the first such row and the settings to change.

A response that ends up with no tokens at all (an empty answer and a tokenizer without an
end-of-sequence token) is always dropped and counted: it would contribute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

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
    """What happened to examples that did not fit."""

    prompts_cut: int = 0
    responses_cut: int = 0
    dropped_long: int = 0
    dropped_empty: int = 0
    kept: list[int] = field(default_factory=list)
    """Indices (into the split before encoding) of the examples kept, in order."""

    def describe(self, where: str) -> str | None:
        parts = []
        if self.prompts_cut:
            parts.append(f"{self.prompts_cut} prompts cut from the left")
        if self.responses_cut:
            parts.append(f"{self.responses_cut} responses cut at the end")
        if self.dropped_long:
            parts.append(f"{self.dropped_long} long examples dropped")
        if self.dropped_empty:
            parts.append(f"{self.dropped_empty} examples with an empty response dropped")
        return f"{where}: " + ", ".join(parts) if parts else None


def format_prompt(tokenizer: Any, fmt: PromptFormat, instruction: str, context: str | None) -> str:
    """The text the model sees before the response."""
    if fmt.chat_template:
        content = instruction if not context else f"{instruction}\n\n{context}"
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    if context:
        return fmt.context_template.format(prompt=instruction, context=context)
    return fmt.template.format(prompt=instruction)


def read_examples(ds: Any, prompt_column: str, response_column: str, context_column: str | None, where: str) -> LMExamples:
    """Instructions, optional contexts and responses as strings (a DataError names a bad row)."""
    instructions = data_mod.texts_of(ds, prompt_column, where)
    responses = data_mod.texts_of(ds, response_column, where)
    contexts = None
    if context_column is not None:
        contexts = ["" if v is None else v for v in ds[context_column]]
        for row, value in enumerate(contexts):
            if not isinstance(value, str):
                raise DataError(f"{where}: row {row} of column '{context_column}' is {type(value).__name__} ({value!r}), not text.")
    for row, text in enumerate(instructions):
        if not text.strip():
            raise DataError(
                f"{where}: row {row} has an empty prompt in column '{prompt_column}'; fill it or remove the row "
                "(a response without an instruction teaches nothing)."
            )
    return LMExamples(prompts=[], responses=responses, instructions=instructions, contexts=contexts)


def apply_format(examples: LMExamples, tokenizer: Any, fmt: PromptFormat, where: str) -> LMExamples:
    if fmt.chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: data.chat_template = true, but the tokenizer has no chat template. Set data.chat_template = false "
            "to use data.template, or use a chat model's tokenizer."
        )
    contexts = examples.contexts or [None] * len(examples.instructions)
    prompts = [format_prompt(tokenizer, fmt, ins, ctx) for ins, ctx in zip(examples.instructions, contexts)]
    return LMExamples(prompts=prompts, responses=examples.responses, instructions=examples.instructions, contexts=examples.contexts)


def _bos_kept(ids: list[int], bos_id: int | None) -> int:
    return 1 if bos_id is not None and ids and ids[0] == bos_id else 0


def encode_lm(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
    max_prompt_length: int,
    long_examples: str,
    where: str,
    chat_template: bool = False,
) -> tuple[data_mod.Encoded, TruncationReport]:
    """Token ids ``prompt + response + [eos]`` per example, with the response boundary.

    Returns the encoding of the kept examples and a report (``report.kept`` lists them).
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length {max_prompt_length} must be between 1 and max_length - 1 ({max_length - 1})")
    # A chat template writes its own special tokens into the text; a plain template relies on
    # the tokenizer adding BOS (OPT, Llama) where the model expects one.
    p_ids = tokenizer(list(prompts), add_special_tokens=not chat_template)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    bos = getattr(tokenizer, "bos_token_id", None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    report = TruncationReport()
    input_ids: list[list[int]] = []
    starts: list[int] = []
    for row, (p, r) in enumerate(zip(p_ids, r_ids)):
        r = list(r) + ([eos] if eos is not None else [])
        if not r:
            report.dropped_empty += 1
            continue
        if len(p) + len(r) > max_length:
            if long_examples == "error":
                raise DataError(
                    f"{where}: row {row} is {len(p)} prompt + {len(r)} response tokens, longer than data.max_length = "
                    f"{max_length}. Raise data.max_length, or set data.long_examples = \"truncate\" (cut the prompt's start "
                    "and the response's end) or \"drop\"."
                )
            if long_examples == "drop":
                report.dropped_long += 1
                continue
            keep_prompt = min(len(p), max(max_prompt_length, max_length - len(r)))
            if keep_prompt < len(p):
                head = _bos_kept(p, bos)
                p = p[:head] + p[len(p) - (keep_prompt - head):] if keep_prompt > head else p[:keep_prompt]
                report.prompts_cut += 1
            if len(p) + len(r) > max_length:
                r = r[: max_length - len(p)]
                report.responses_cut += 1
        input_ids.append(list(p) + r)
        starts.append(len(p))
        report.kept.append(row)
    return data_mod.Encoded(input_ids=input_ids, token_type_ids=None, pad_id=pad_id, response_start=starts), report


def prompt_ids(encoded: data_mod.Encoded) -> list[list[int]]:
    """The (possibly truncated) prompt of every encoded example: what generation starts from."""
    assert encoded.response_start is not None
    return [ids[:start] for ids, start in zip(encoded.input_ids, encoded.response_start)]


def response_ids(encoded: data_mod.Encoded) -> list[list[int]]:
    assert encoded.response_start is not None
    return [ids[start:] for ids, start in zip(encoded.input_ids, encoded.response_start)]


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
    role's prompts. Returns the split and report lines."""
    encoded: dict[int, tuple[LMExamples, data_mod.Encoded, TruncationReport]] = {}
    for tok in tokenizers.values():
        if id(tok) not in encoded:
            formatted = apply_format(examples, tok, fmt, where)
            enc, rep = encode_lm(tok, formatted.prompts, formatted.responses, max_length, max_prompt_length, long_examples, where, fmt.chat_template)
            encoded[id(tok)] = (formatted, enc, rep)
    kept = sorted(set.intersection(*(set(rep.kept) for _, _, rep in encoded.values())))
    if not kept:
        raise DataError(
            f"{where}: no example is left after tokenization (all were too long or had empty responses); raise "
            'data.max_length or set data.long_examples = "truncate".'
        )
    first = encoded[id(next(iter(tokenizers.values())))][0]
    split = data_mod.TextSplit(texts=[first.prompts[i] for i in kept], labels=None, responses=[examples.responses[i] for i in kept])
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
            input_ids=[list(enc.input_ids[k]) for k in picked], token_type_ids=None, pad_id=enc.pad_id,
            response_start=[enc.response_start[k] for k in picked],
        )
        for role in roles_of[key]:
            split.encodings[role] = subs[key]
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
    for k in range(len(encodings[0].input_ids)):
        starts = [e.response_start[k] for e in encodings]  # type: ignore[index]
        responses = [e.input_ids[k][s:] for e, s in zip(encodings, starts)]
        shortest = min(len(r) for r in responses)
        if any(len(r) != shortest for r in responses) and all(r[:shortest] == responses[0][:shortest] for r in responses):
            for e, s in zip(encodings, starts):
                e.input_ids[k] = e.input_ids[k][: s + shortest]
