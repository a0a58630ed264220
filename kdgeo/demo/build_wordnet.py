"""Regenerate the shipped WordNet demo files from a local WordNet 3.0 install.

Usage::

    python -m kdgeo.demo.build_wordnet [--wordnet-dir /usr/share/wordnet] [--out DIR]

Reads ``data.noun`` and writes, into ``--out`` (default: this package folder):

* ``wordnet_train.jsonl`` / ``wordnet_validation.jsonl`` - one JSON object per line:
  ``{"text": str, "label": int, "label_name": str, "synset": "NNNNNNNN-n"}``
* ``wordnet_labels.json`` - label names (label ``i`` is ``names[i]``) and provenance
* ``LICENSE-WordNet.txt`` - the WordNet 3.0 licence, copied verbatim from the
  header of ``data.noun`` (line numbers and trailing blanks removed)

The output is a pure function of ``data.noun``: candidates are ordered by a
SHA-256 of a fixed seed string and the synset offset, so the result does not
depend on the Python version, ``PYTHONHASHSEED`` or the platform.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
DEFAULT_OUT_DIR = Path(__file__).resolve().parent

# Standard WordNet lexicographer file names (lexnames), noun files 03..28.
NOUN_LEXNAMES: dict[int, str] = {
    3: "noun.Tops",
    4: "noun.act",
    5: "noun.animal",
    6: "noun.artifact",
    7: "noun.attribute",
    8: "noun.body",
    9: "noun.cognition",
    10: "noun.communication",
    11: "noun.event",
    12: "noun.feeling",
    13: "noun.food",
    14: "noun.group",
    15: "noun.location",
    16: "noun.motive",
    17: "noun.object",
    18: "noun.person",
    19: "noun.phenomenon",
    20: "noun.plant",
    21: "noun.possession",
    22: "noun.process",
    23: "noun.quantity",
    24: "noun.relation",
    25: "noun.shape",
    26: "noun.state",
    27: "noun.substance",
    28: "noun.time",
}

# The 8 demo classes, in label order (label i == LABEL_NAMES[i]).
LABEL_NAMES: list[str] = [
    "noun.animal",
    "noun.artifact",
    "noun.body",
    "noun.food",
    "noun.location",
    "noun.person",
    "noun.plant",
    "noun.substance",
]

SEED = "kdgeo-wordnet-demo-v1"
N_TRAIN_PER_CLASS = 300
N_VALIDATION_PER_CLASS = 100
MAX_WORDS = 40
MIN_WORDS = 3

TRAIN_NAME = "wordnet_train.jsonl"
VALIDATION_NAME = "wordnet_validation.jsonl"
LABELS_NAME = "wordnet_labels.json"
LICENSE_NAME = "LICENSE-WordNet.txt"

TEXT_FORMAT = (
    "gloss definition only: the part of the WordNet gloss before the first "
    "'; \"' example quote, whitespace-normalised, truncated to 40 words; "
    "the lemma is not included"
)

_HEADER_RE = re.compile(r"^  \d+ ?(.*)$")


def _sha_key(*parts: str) -> str:
    return hashlib.sha256(":".join((SEED, *parts)).encode("utf-8")).hexdigest()


def definition_text(gloss: str) -> str:
    """Definition part of a gloss: text before the first ``; "`` example, cleaned."""
    text = gloss.split('; "', 1)[0]
    text = " ".join(text.split())
    text = text.rstrip(" ;")
    words = text.split(" ")
    if len(words) > MAX_WORDS:
        text = " ".join(words[:MAX_WORDS])
    return text


def read_license(lines: Iterable[str]) -> str:
    """The licence header of a WordNet data file, verbatim, without line numbers."""
    out: list[str] = []
    for line in lines:
        if not line.startswith("  "):
            break
        m = _HEADER_RE.match(line.rstrip("\n"))
        if m is None:
            raise ValueError(f"unexpected licence header line: {line!r}")
        out.append(m.group(1).rstrip())
    if not out:
        raise ValueError("no licence header found in data file")
    return "\n".join(out) + "\n"


def parse_data_noun(path: Path) -> tuple[str, list[tuple[str, int, str]]]:
    """Return ``(licence_text, [(synset_id, lex_filenum, definition), ...])``."""
    raw = path.read_text(encoding="utf-8")
    lines = raw.splitlines()
    license_text = read_license(lines)
    synsets: list[tuple[str, int, str]] = []
    for line in lines:
        if line.startswith("  ") or not line.strip():
            continue
        head, sep, gloss = line.partition(" | ")
        fields = head.split()
        if len(fields) < 4 or fields[2] != "n":
            raise ValueError(f"unexpected data.noun line: {line[:80]!r}")
        offset, lexfile = fields[0], int(fields[1])
        text = definition_text(gloss) if sep else ""
        synsets.append((f"{offset}-n", lexfile, text))
    return license_text, synsets


def build(wordnet_dir: Path = DEFAULT_WORDNET_DIR, out_dir: Path = DEFAULT_OUT_DIR) -> dict[str, Path]:
    """Write the demo files into ``out_dir``; return ``{file name: path}``."""
    data_noun = Path(wordnet_dir) / "data.noun"
    if not data_noun.is_file():
        raise FileNotFoundError(
            f"{data_noun} not found; install WordNet 3.0 (e.g. `apt-get install wordnet-base`) or pass --wordnet-dir"
        )
    source_sha256 = hashlib.sha256(data_noun.read_bytes()).hexdigest()
    license_text, synsets = parse_data_noun(data_noun)

    name_to_num = {name: num for num, name in NOUN_LEXNAMES.items()}
    wanted = {name_to_num[name]: label for label, name in enumerate(LABEL_NAMES)}

    # Candidate pool: the chosen classes, usable definitions, and texts that are
    # unique in the pool (a duplicated gloss could land in both splits or carry
    # two labels, so every copy is dropped).
    pool = [(sid, wanted[lex], text) for sid, lex, text in synsets if lex in wanted and len(text.split()) >= MIN_WORDS]
    text_counts = Counter(text for _, _, text in pool)
    pool = [row for row in pool if text_counts[row[2]] == 1]

    n_per_class = N_TRAIN_PER_CLASS + N_VALIDATION_PER_CLASS
    train: list[dict] = []
    validation: list[dict] = []
    available: dict[str, int] = {}
    for label, name in enumerate(LABEL_NAMES):
        cands = sorted((row for row in pool if row[1] == label), key=lambda r: r[0])
        available[name] = len(cands)
        if len(cands) < n_per_class:
            raise ValueError(f"{name}: only {len(cands)} usable synsets, need {n_per_class}")
        cands.sort(key=lambda r: _sha_key("pick", r[0]))
        chosen = cands[:n_per_class]
        for i, (sid, lab, text) in enumerate(chosen):
            row = {"text": text, "label": lab, "label_name": name, "synset": sid}
            (train if i < N_TRAIN_PER_CLASS else validation).append(row)

    # Mix the classes within each split with a fixed, hash-based order.
    train.sort(key=lambda r: _sha_key("train", r["synset"]))
    validation.sort(key=lambda r: _sha_key("validation", r["synset"]))

    labels_info = {
        "names": LABEL_NAMES,
        "lexfile_numbers": [name_to_num[name] for name in LABEL_NAMES],
        "task": "WordNet noun supersense (lexicographer file) classification from glosses",
        "text_format": TEXT_FORMAT,
        "source": "WordNet 3.0 data.noun",
        "source_sha256": source_sha256,
        "license": LICENSE_NAME,
        "seed": SEED,
        "splits": {
            "train": {
                "file": TRAIN_NAME,
                "per_class": N_TRAIN_PER_CLASS,
                "total": N_TRAIN_PER_CLASS * len(LABEL_NAMES),
            },
            "validation": {
                "file": VALIDATION_NAME,
                "per_class": N_VALIDATION_PER_CLASS,
                "total": N_VALIDATION_PER_CLASS * len(LABEL_NAMES),
            },
        },
        "available_per_class": available,
        "generator": "python -m kdgeo.demo.build_wordnet",
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        TRAIN_NAME: out_dir / TRAIN_NAME,
        VALIDATION_NAME: out_dir / VALIDATION_NAME,
        LABELS_NAME: out_dir / LABELS_NAME,
        LICENSE_NAME: out_dir / LICENSE_NAME,
    }
    for fname, rows in ((TRAIN_NAME, train), (VALIDATION_NAME, validation)):
        body = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)
        paths[fname].write_bytes(body.encode("utf-8"))
    paths[LABELS_NAME].write_bytes((json.dumps(labels_info, indent=2, ensure_ascii=True) + "\n").encode("utf-8"))
    paths[LICENSE_NAME].write_bytes(license_text.encode("utf-8"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kdgeo.demo.build_wordnet",
        description="Regenerate kdgeo's WordNet supersense demo data from data.noun.",
    )
    parser.add_argument(
        "--wordnet-dir",
        type=Path,
        default=DEFAULT_WORDNET_DIR,
        help="folder holding WordNet 3.0 data.noun (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default: the kdgeo/demo package folder)"
    )
    args = parser.parse_args(argv)
    try:
        paths = build(args.wordnet_dir, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths.values():
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
