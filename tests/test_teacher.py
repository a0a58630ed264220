"""kdgeo.teacher: the fine-tuned teacher's cache key, and its cache entries (found only when whole)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kdgeo.errors import OutputError
from kdgeo.teacher import CACHE_META, FinetuneArgs, cache_key, cached_teacher, save_to_cache

ARGS = FinetuneArgs(epochs=3.0, lr=2e-5, batch_size=32, weight_decay=0.01, warmup_ratio=0.1, max_grad_norm=1.0, seed=0)
DATA = {"dataset": "glue", "config": "sst2", "max_length": 128}
LABELS = ["negative", "positive"]
PINNED_KEYS = {"float32": "9d16a8693cdd1efb", "float64": "3ba4a601e7dbc6d2"}
"""Keys of the entry above as kdgeo has always named them: a new key would orphan every cached teacher."""


def test_cache_key_is_pinned_so_existing_caches_stay_valid():
    assert cache_key("bert-base-uncased", None, DATA, LABELS, ARGS) == PINNED_KEYS["float32"]
    assert cache_key("bert-base-uncased", None, DATA, LABELS, ARGS, float64=True) == PINNED_KEYS["float64"]


def test_cache_key_changes_with_everything_that_changes_the_weights():
    base = cache_key("bert-base-uncased", None, DATA, LABELS, ARGS)
    assert cache_key("bert-base-uncased", None, dict(reversed(DATA.items())), list(LABELS), ARGS) == base  # order-free
    variants = [
        cache_key("bert-large-uncased", None, DATA, LABELS, ARGS),
        cache_key("bert-base-uncased", "v2", DATA, LABELS, ARGS),
        cache_key("bert-base-uncased", None, {**DATA, "max_length": 64}, LABELS, ARGS),
        cache_key("bert-base-uncased", None, DATA, LABELS[::-1], ARGS),  # label order is the head's row order
        cache_key("bert-base-uncased", None, DATA, LABELS, ARGS, float64=True),
    ] + [
        cache_key("bert-base-uncased", None, DATA, LABELS, dataclasses.replace(ARGS, **{f.name: 7}))
        for f in dataclasses.fields(FinetuneArgs)
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_a_saved_teacher_is_found_under_its_key_and_only_when_whole(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_clf"])
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher_clf"])
    cache = tmp_path / "cache"
    assert cached_teacher(cache, "k1") is None
    entry = save_to_cache(model, tokenizer, cache, "k1", {"teacher": "tiny", "steps": 3})
    assert entry == cache / "k1" and cached_teacher(cache, "k1") == entry
    assert json.loads((entry / CACHE_META).read_text()) == {"teacher": "tiny", "steps": 3}
    reloaded = AutoModelForSequenceClassification.from_pretrained(entry)
    assert all(a.equal(b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    assert cached_teacher(cache, "k2") is None
    (entry / CACHE_META).unlink()  # a directory without kdgeo's record is no cache entry
    assert cached_teacher(cache, "k1") is None


def test_an_unwritable_cache_is_an_output_error_naming_the_setting(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    blocker: Path = tmp_path / "a-file"
    blocker.write_text("not a directory")
    model = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_clf"])
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher_clf"])
    expected = r"output.teacher_cache = '.*a-file/cache': cannot write the fine-tuned teacher"
    with pytest.raises(OutputError, match=expected):
        save_to_cache(model, tokenizer, blocker / "cache", "k1", {})
