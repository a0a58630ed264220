"""Causal-LM prompts: cut independently of the reference, instruction kept, every cut counted.

The generation prompt of an evaluation example must not depend on the answer it is scored
against, and a long context must not push the instruction out of the prompt (issue 11 G).
"""

from __future__ import annotations

from typing import Any

import pytest

from kdgeo import lm_data
from kdgeo.errors import DataError
from kdgeo.models import ModelRef, load_tokenizer

FMT = lm_data.PromptFormat(template="Q: {prompt}\nA:", context_template="Q: {prompt}\nC: {context}\nA:")
LONG_CONTEXT = " ".join(["the animal that lives in the sea and eats small fish"] * 12)


def _split(tok: Any, instructions: list[str], responses: list[str], contexts: list[str] | None = None,
           max_length: int = 64, max_prompt_length: int = 32, long_examples: str = "truncate") -> tuple[Any, list[str]]:
    examples = lm_data.LMExamples(prompts=[], responses=responses, instructions=instructions, contexts=contexts)
    return lm_data.build_split(examples, FMT, {"student": tok}, max_length, max_prompt_length, long_examples, "t")


@pytest.fixture(scope="module")
def tok(tiny_lm: dict[str, Any]) -> Any:
    return load_tokenizer(ModelRef(str(tiny_lm["opt_teacher"])))


def test_generation_prompt_is_the_same_whatever_the_reference(tok):
    """Same instruction and context, references of 1 to ~60 tokens: identical prompt ids (exact)."""
    instruction = "Describe the animal in a few words."
    references = [" fish", " a fish of the sea" * 3, " a small fish that lives in the sea and eats" * 6]
    split, _ = _split(tok, [instruction] * 3, references, [LONG_CONTEXT] * 3, max_length=64, max_prompt_length=40)
    prompts = lm_data.prompt_ids(split.encodings["student"])
    assert len(prompts) == 3 and prompts[0] == prompts[1] == prompts[2]
    assert len(prompts[0]) <= 40
    # Perplexity scores the reference after that same prompt; only the response is cut to fit max_length.
    responses = lm_data.response_ids(split.encodings["student"])
    for ids, ref in zip(responses, references):
        full = tok(ref, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == full[: 64 - len(prompts[0])]
    assert split.truncation == {"student": {**_zero(), "contexts_cut": 3, "responses_cut": 1}}


def test_long_context_row_keeps_its_instruction_and_the_template(tok):
    instruction = "Name the kind of animal described here."
    split, notes = _split(tok, [instruction, "Say yes."], [" a fish", " yes"], [LONG_CONTEXT, ""], max_prompt_length=32)
    prompts = lm_data.prompt_ids(split.encodings["student"])
    text = tok.decode(prompts[0], skip_special_tokens=True)
    assert len(prompts[0]) <= 32 and prompts[0][0] == tok.bos_token_id
    assert text.startswith(f"Q: {instruction}\nC: the animal") and text.endswith("\nA:")
    assert split.texts[0] == text  # the split's texts are the prompts as the model sees them
    assert tok.decode(prompts[1], skip_special_tokens=True) == "Q: Say yes.\nA:"  # a short prompt is untouched
    assert split.truncation["student"]["contexts_cut"] == 1
    assert notes == ["t (student tokenizer): 1 prompts longer than data.max_prompt_length = 32 had their context cut "
                     "at the end"]


def test_prompt_never_exceeds_max_prompt_length_and_an_instruction_is_cut_last(tok):
    """Every prompt fits max_prompt_length; a long instruction without context keeps its start and the template."""
    long_instruction = "Describe " + " ".join(["the animal that lives in the sea"] * 10) + "."
    instructions = [long_instruction, "Describe a dog.", long_instruction]
    contexts = [LONG_CONTEXT, LONG_CONTEXT, ""]
    split, notes = _split(tok, instructions, [" a fish", " a dog", " a fish"], contexts, max_prompt_length=24)
    prompts = lm_data.prompt_ids(split.encodings["student"])
    assert all(len(p) <= 24 for p in prompts)
    assert [tok.decode(p, skip_special_tokens=True) for p in prompts][0].startswith("Q: Describe the animal")
    assert all(tok.decode(p, skip_special_tokens=True).endswith("\nA:") for p in prompts)
    counts = split.truncation["student"]
    assert (counts["contexts_cut"], counts["instructions_cut"]) == (1, 2)
    assert any("instruction cut at the end" in n for n in notes)


def test_drop_and_error_judge_the_prompt_alone(tok):
    """drop leaves out prompts over max_prompt_length (as MiniLLM does) and examples over max_length."""
    instructions, contexts = ["Name the animal.", "Say yes.", "Say no."], [LONG_CONTEXT, "", ""]
    split, _ = _split(tok, instructions, [" a fish", " yes", " no" * 80], contexts, long_examples="drop")
    assert split.responses == [" yes"]
    assert split.truncation["student"] == {**_zero(), "dropped_long_prompt": 1, "dropped_long": 1}
    with pytest.raises(DataError, match=r"row 0's prompt is \d+ tokens, longer than data.max_prompt_length = 32"):
        _split(tok, instructions, [" a fish", " yes", " no"], contexts, long_examples="error")


def test_a_template_longer_than_max_prompt_length_is_named(tok):
    with pytest.raises(DataError, match=r"data.max_prompt_length = 3 .*template"):
        _split(tok, ["Describe a dog."], [" a dog"], None, max_prompt_length=3)


def _zero() -> dict[str, int]:
    return {k: 0 for k in lm_data.TruncationReport.COUNTS}
