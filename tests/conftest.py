"""Shared fixtures: tiny models and tokenizers built in-process, saved, and loaded back.

Nothing here touches a hub. Each model is built from a config (2-4 layers, width 32-64) with a
fixed seed, saved with ``save_pretrained`` to a temporary directory, and loaded back by the
code under test through the real loading path.
"""

from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _process_wide_state() -> dict[str, object]:
    """What transformers and torch keep for the whole process and swap while they build a model."""
    import torch
    from transformers import PreTrainedModel
    from transformers.utils import logging as hf_logging

    state: dict[str, object] = {
        "PreTrainedModel.tie_weights": PreTrainedModel.__dict__.get("tie_weights"),
        "PreTrainedModel.init_weights": PreTrainedModel.__dict__.get("init_weights"),
        "transformers verbosity": hf_logging.get_verbosity(),
        "torch default dtype": torch.get_default_dtype(),
        "torch.linspace": torch.linspace,
    }
    for name in ("normal_", "uniform_", "zeros_", "ones_", "trunc_normal_"):
        state[f"torch.nn.init.{name}"] = getattr(torch.nn.init, name)
    return state


@pytest.fixture(autouse=True)
def _no_leaked_process_state():
    """Fail the test that leaves transformers' or torch's process-wide stand-ins behind.

    Two model loads overlapping in one process once restored each other's stand-ins, and every later
    test in the session then loaded causal LMs with an untied, uninitialised ``lm_head``; the failure
    showed up tests later and only sometimes. This check names the test that leaked.
    """
    before = _process_wide_state()
    yield
    after = _process_wide_state()
    changed = sorted(k for k in before if before[k] is not after[k] and before[k] != after[k])
    assert not changed, f"this test left process-wide state changed: {changed}"


def _demo_words(limit: int) -> list[str]:
    from kdgeo import demo

    counts: collections.Counter[str] = collections.Counter()
    for split in ("train", "validation"):
        for row in demo.load_split(split):
            counts.update(re.findall(r"[a-z]+|[^\sa-z]", row["text"].lower()))
    return [w for w, _ in counts.most_common(limit)]


def make_tokenizer(directory: Path, words: int = 400, chars_only: bool = False):
    """A WordPiece BERT tokenizer over the demo's most frequent words (or single letters)."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:'()-")
    pieces = ["##" + c for c in letters]
    vocab = special + letters + pieces + ([] if chars_only else [w for w in _demo_words(words) if w not in letters])
    vocab = list(dict.fromkeys(vocab))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 renamed the constructor's vocab argument; from_pretrained reads vocab.txt on 4.x and 5.x.
    tok = BertTokenizerFast.from_pretrained(directory, do_lower_case=True)
    tok.save_pretrained(directory)
    return tok


def make_bert(
    directory: Path, tokenizer_dir: Path, layers: int = 4, width: int = 64, heads: int = 4, seed: int = 0,
    num_labels: int | None = None, portable: bool = False, positions: int = 128,
) -> Path:
    """A tiny BERT saved with save_pretrained (a base model, or a classifier when num_labels is set).

    ``portable``: the same float32 weights on every x86-64 CPU. torch's float32 ``normal_`` takes a
    vectorised AVX2 path whose draws differ in the last bit from the scalar path other CPUs (or
    ATEN_CPU_CAPABILITY=default) take; float64 draws have one path, so they are made in float64 and
    rounded to float32. Golden values are recorded on such models.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from kdgeo.models import quiet_transformers

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=width * 2,
        max_position_embeddings=positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    if portable:
        torch.set_default_dtype(torch.float64)
    try:
        if num_labels is None:
            model = BertModel(config)
        else:
            config.num_labels = num_labels
            model = BertForSequenceClassification(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.float()
    with quiet_transformers():
        model.save_pretrained(directory)
        tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of tiny saved models.

    teacher: 4-layer base BERT, width 64. student: 2-layer base BERT, width 32, same tokenizer.
    student_other_tok: like student with a character-level tokenizer. teacher_clf: a 4-layer
    BERT classifier with 8 labels (the demo data's classes), so runs need no fine-tuning.
    """
    root = tmp_path_factory.mktemp("tiny")
    tok_dir = root / "tok"
    make_tokenizer(tok_dir)
    other_tok = root / "tok_chars"
    make_tokenizer(other_tok, chars_only=True)
    return {
        "teacher": make_bert(root / "teacher", tok_dir, layers=4, width=64, seed=0),
        "student": make_bert(root / "student", tok_dir, layers=2, width=32, heads=2, seed=1),
        "student_other_tok": make_bert(root / "student_chars", other_tok, layers=2, width=32, heads=2, seed=2),
        "teacher_clf": make_bert(root / "teacher_clf", tok_dir, layers=4, width=64, seed=3, num_labels=8),
        "root": root,
    }


@pytest.fixture(scope="session")
def tiny64(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``teacher_clf`` and ``student`` as in :func:`tiny` (its tokenizer), with 64 positions instead of 128: a
    default max_length of 128 is longer than they accept."""
    root, tok = tmp_path_factory.mktemp("tiny64"), tiny["root"] / "tok"
    return {
        "teacher_clf": make_bert(root / "teacher_clf", tok, layers=4, seed=3, num_labels=8, positions=64),
        "student": make_bert(root / "student", tok, layers=2, width=32, heads=2, seed=1, positions=64),
        "root": root,
    }


@pytest.fixture(scope="session")
def tiny_golden(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``teacher_clf`` and ``student`` as in :func:`tiny`, but with portable initial weights
    (``make_bert(portable=True)``): bit-identical on every machine, as golden values need."""
    root = tmp_path_factory.mktemp("tiny_golden")
    tok_dir = root / "tok"
    make_tokenizer(tok_dir)
    return {
        "student": make_bert(root / "student", tok_dir, layers=2, width=32, heads=2, seed=1, portable=True),
        "teacher_clf": make_bert(root / "teacher_clf", tok_dir, layers=4, seed=3, num_labels=8, portable=True),
        "root": root,
    }


def token_rows(model_dir: Path, texts: list[str]) -> list:
    """A plain reference for probe: every hidden state's token rows (padding dropped), float64,
    from the model and tokenizer loaded by kdgeo's own loaders."""
    import torch

    from kdgeo.features import select_rows
    from kdgeo.models import ModelRef, load_encoder, load_tokenizer

    ref = ModelRef(str(model_dir))
    tok, model = load_tokenizer(ref), load_encoder(ref)
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    return [select_rows(h, enc["attention_mask"], "tokens").double() for h in hidden]  # (n, d_i) each


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_lm_tokenizer(directory: Path, vocab_size: int = 600, bos: bool = True):
    """A byte-level BPE tokenizer trained in-process on the demo glosses, OPT-style: ``</s>`` is
    BOS and EOS (prepended to every encoded text when ``bos``), ``<pad>`` pads."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from kdgeo import demo

    directory.mkdir(parents=True, exist_ok=True)
    texts = [r["text"] for r in demo.load_split("train")] + [r["label_name"] for r in demo.load_split("validation")]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<pad>", "</s>", "<unk>"])
    if bos:
        bpe.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", bpe.token_to_id("</s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(directory)
    return tok


def make_causal_lm(
    directory: Path, tokenizer_dir: Path, arch: str = "opt", layers: int = 2, width: int = 32, seed: int = 0, proj: int | None = None,
) -> Path:
    """A tiny OPT or GPT-2 causal LM saved with save_pretrained beside its tokenizer. ``proj`` (OPT
    only) sets word_embed_proj_dim, as opt-350m (512 vs 1024): the last hidden state is ``proj`` wide."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    from kdgeo.models import quiet_transformers

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    if arch == "opt":
        model = OPTForCausalLM(OPTConfig(
            vocab_size=len(tok), hidden_size=width, num_hidden_layers=layers, ffn_dim=width * 2, num_attention_heads=2,
            max_position_embeddings=256, word_embed_proj_dim=proj or width, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dropout=0.0, attention_dropout=0.0,
        ))
    else:
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tok), n_embd=width, n_layer=layers, n_head=2, n_positions=256, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        ))
    with quiet_transformers():
        model.save_pretrained(directory)
        tok.save_pretrained(directory)
    return directory


def lm_rows(split: str, n: int, context_every: int = 0) -> list[dict]:
    """Instruction rows from the demo data: "define something in category C" -> its gloss."""
    from kdgeo import demo

    rows = []
    for k, r in enumerate(demo.load_split(split)[:n]):
        row = {"instruction": f"Describe something of the kind {r['label_name'].split('.')[1]}.", "response": r["text"], "context": ""}
        if context_every and k % context_every == 0:
            row["context"] = f"WordNet synset {r['synset']}"
        rows.append(row)
    return rows


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny causal LMs and instruction data.

    opt_teacher: 4-layer OPT, width 64. opt_student: 2-layer OPT, width 32. gpt2_student: 2-layer
    GPT-2, width 32 (same tokenizer). opt_other_vocab: a 2-layer OPT with another tokenizer.
    train/eval: instruction jsonl files (instruction, context, response).
    """
    root = tmp_path_factory.mktemp("tiny_lm")
    make_lm_tokenizer(root / "tok")
    make_lm_tokenizer(root / "tok_other", vocab_size=400)
    return {
        "opt_teacher": make_causal_lm(root / "opt_teacher", root / "tok", "opt", layers=4, width=64, seed=0),
        "opt_student": make_causal_lm(root / "opt_student", root / "tok", "opt", layers=2, width=32, seed=1),
        "gpt2_student": make_causal_lm(root / "gpt2_student", root / "tok", "gpt2", layers=2, width=32, seed=2),
        "opt_other_vocab": make_causal_lm(root / "opt_other", root / "tok_other", "opt", layers=2, width=32, seed=3),
        "train": write_jsonl(root / "train.jsonl", lm_rows("train", 48, context_every=3)),
        "eval": write_jsonl(root / "eval.jsonl", lm_rows("validation", 12, context_every=3)),
        "root": root,
    }
