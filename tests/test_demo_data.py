"""The embedded WordNet supersense demo data: shape, disjointness, licence, rebuild."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kdgeo import demo
from kdgeo.demo import build_wordnet

WORDNET_DIR = Path("/usr/share/wordnet")
PER_CLASS = {"train": 300, "validation": 100}


@pytest.fixture(scope="module")
def info() -> dict:
    return demo.load_label_info()


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {name: demo.load_split(name) for name in PER_CLASS}


def test_shipped_files_present_and_small():
    files = [demo.TRAIN_FILE, demo.VALIDATION_FILE, demo.LABELS_FILE, demo.LICENSE_FILE,
             demo.DEMO_DIR / "README.md"]
    for path in files:
        assert path.is_file(), path
    assert sum(p.stat().st_size for p in files) < 1_000_000


def test_labels_file(info):
    names = info["names"]
    assert names == build_wordnet.LABEL_NAMES
    assert len(names) == 8 and len(set(names)) == 8
    assert all(n in build_wordnet.NOUN_LEXNAMES.values() for n in names)
    assert info["source"] == "WordNet 3.0 data.noun"
    assert demo.load_labels() == names
    assert demo.LABELS == names
    for split, n in PER_CLASS.items():
        assert info["splits"][split]["per_class"] == n
        assert info["splits"][split]["total"] == n * len(names)


@pytest.mark.parametrize("split", sorted(PER_CLASS))
def test_rows_and_counts(split, splits, info):
    rows = splits[split]
    names = info["names"]
    assert len(rows) == PER_CLASS[split] * len(names)
    for row in rows:
        assert set(row) == {"text", "label", "label_name", "synset"}
        assert isinstance(row["text"], str) and row["text"].strip() == row["text"] != ""
        assert len(row["text"].split()) <= build_wordnet.MAX_WORDS
        assert isinstance(row["label"], int) and 0 <= row["label"] < len(names)
        assert names[row["label"]] == row["label_name"]
        assert len(row["synset"]) == 10 and row["synset"].endswith("-n")
        assert row["synset"][:8].isdigit()
    counts = Counter(row["label_name"] for row in rows)
    assert counts == {name: PER_CLASS[split] for name in names}
    assert len({r["synset"] for r in rows}) == len(rows)
    assert len({r["text"] for r in rows}) == len(rows)


def test_train_validation_disjoint(splits):
    train, val = splits["train"], splits["validation"]
    assert not {r["synset"] for r in train} & {r["synset"] for r in val}
    assert not {r["text"] for r in train} & {r["text"] for r in val}


def test_unknown_split_rejected():
    with pytest.raises(ValueError, match="unknown demo split"):
        demo.load_split("test")


def test_license_has_princeton_notice():
    text = demo.LICENSE_FILE.read_text(encoding="utf-8")
    assert "WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved." in text
    assert "Permission to use, copy, modify and distribute this software and" in text
    assert 'THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS"' in text


def test_definition_text():
    assert build_wordnet.definition_text(
        'a domesticated carnivorous mammal; "the dog barked all night"  '
    ) == "a domesticated carnivorous mammal"
    long = " ".join(f"w{i}" for i in range(60))
    assert build_wordnet.definition_text(long).split() == long.split()[:40]


@pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(),
                    reason="WordNet 3.0 not installed (apt-get install wordnet-base)")
def test_rebuild_is_byte_identical(tmp_path):
    assert build_wordnet.main(["--wordnet-dir", str(WORDNET_DIR), "--out", str(tmp_path)]) == 0
    names = [build_wordnet.TRAIN_NAME, build_wordnet.VALIDATION_NAME,
             build_wordnet.LABELS_NAME, build_wordnet.LICENSE_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    for name in names:
        assert (tmp_path / name).read_bytes() == (demo.DEMO_DIR / name).read_bytes(), name
    info = json.loads((tmp_path / build_wordnet.LABELS_NAME).read_text(encoding="utf-8"))
    assert info["names"] == build_wordnet.LABEL_NAMES


def test_build_missing_wordnet_reports_error(tmp_path, capsys):
    assert build_wordnet.main(["--wordnet-dir", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 1
    assert "data.noun" in capsys.readouterr().err
