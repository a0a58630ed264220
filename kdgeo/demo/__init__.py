"""Small offline demo dataset shipped with kdgeo.

WordNet 3.0 noun supersense classification from glosses: 8 classes,
300 train + 100 validation examples per class.  See ``README.md`` in this
folder for how it was derived and ``LICENSE-WordNet.txt`` for the licence.

Only the standard library is imported here; the data is read on demand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEMO_DIR: Path = Path(__file__).resolve().parent
TRAIN_FILE: Path = DEMO_DIR / "wordnet_train.jsonl"
VALIDATION_FILE: Path = DEMO_DIR / "wordnet_validation.jsonl"
LABELS_FILE: Path = DEMO_DIR / "wordnet_labels.json"
LICENSE_FILE: Path = DEMO_DIR / "LICENSE-WordNet.txt"

SPLIT_FILES: dict[str, Path] = {"train": TRAIN_FILE, "validation": VALIDATION_FILE}

__all__ = [
    "DEMO_DIR",
    "TRAIN_FILE",
    "VALIDATION_FILE",
    "LABELS_FILE",
    "LICENSE_FILE",
    "SPLIT_FILES",
    "LABELS",
    "load_label_info",
    "load_labels",
    "load_split",
]


def load_label_info() -> dict[str, Any]:
    """Return the parsed ``wordnet_labels.json`` (names, source, split sizes, ...)."""
    with LABELS_FILE.open(encoding="utf-8") as fh:
        return json.load(fh)


def load_labels() -> list[str]:
    """Return the label names; label ``i`` is ``load_labels()[i]``."""
    return list(load_label_info()["names"])


def load_split(split: str) -> list[dict[str, Any]]:
    """Return the rows of ``split`` ("train" or "validation") as a list of dicts.

    Each row has ``text`` (str), ``label`` (int), ``label_name`` (str) and
    ``synset`` (WordNet offset id such as ``"02084071-n"``).
    """
    try:
        path = SPLIT_FILES[split]
    except KeyError:
        raise ValueError(f"unknown demo split {split!r}; expected one of {sorted(SPLIT_FILES)}") from None
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def __getattr__(name: str) -> Any:  # PEP 562: LABELS is read lazily on first access
    if name == "LABELS":
        value = load_labels()
        globals()["LABELS"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
