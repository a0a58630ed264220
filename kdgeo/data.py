"""Datasets -> tokenized, padded batches.

A dataset reference is ``kdgeo:wordnet-supersenses`` (the embedded offline demo), a local
``.csv`` / ``.json`` / ``.jsonl`` / ``.parquet`` file, or a Hugging Face hub dataset id with an
optional configuration. Problems the user can fix (a missing file, a split or column that does
not exist, an empty dataset, labels out of range) raise :class:`~kdgeo.errors.DataError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdgeo.errors import DataError

BUILTIN_PREFIX = "kdgeo:"
BUILTIN_DATASETS = ("wordnet-supersenses",)
LOCAL_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# --------------------------------------------------------------------------------------------
# loading


def is_local_file(ref: str) -> bool:
    """A path with a data-file extension, or anything that exists on disk (not a hub id)."""
    return Path(os.path.expanduser(ref)).suffix.lower() in LOCAL_FORMATS or os.path.exists(os.path.expanduser(ref))


SLICE_SYNTAX = "train[:90%], train[90%:], train[:1000], train[10%:20%], train[:5%]+train[-5%:]"
"""Examples of the datasets library's split-slicing syntax (``datasets.ReadInstruction``), for messages."""


def is_sliced(split: str) -> bool:
    """A split spec with a slice or a sum (``train[:90%]``, ``train+test``), not a plain split name."""
    return "[" in split or "+" in split


def split_instruction(split: str, split_key: str) -> Any:
    """``split`` parsed as a ``datasets.ReadInstruction``, or a DataError naming ``split_key`` and the syntax.

    Parsed here for every source, hub datasets included: the datasets library's own message for a bad
    slice ("Unrecognized instruction format") names neither the setting nor the syntax.
    """
    import datasets

    try:
        return datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as err:
        raise DataError(
            f"{split_key} = '{split}' is not a split name or a split slice ({_first_line(err).rstrip('.')}); write a "
            f"split name (train) or a slice in the datasets syntax: {SLICE_SYNTAX}."
        ) from None


def _sliced(split: str, split_key: str, label: str, splits: dict[str, Any]) -> Any:
    """The rows of the sliced split spec ``split`` taken from the named, already loaded ``splits``
    (a local file's one ``train`` split, or the built-in dataset's): what ``datasets.load_dataset(...,
    split=split)`` gives a hub dataset, the same percent rounding (``ReadInstruction.to_absolute``)."""
    import datasets

    instruction = split_instruction(split, split_key)
    try:
        ranges = instruction.to_absolute({name: len(ds) for name, ds in splits.items()})
    except ValueError as err:
        import re

        unknown = re.search(r'Unknown split "([^"]*)"', str(err))
        what = f"has no split '{unknown.group(1)}'" if unknown else f"cannot be sliced so ({_first_line(err)})"
        raise DataError(
            f"{split_key} = '{split}': {label} {what}; its splits: {', '.join(splits)}. Slice one of them, e.g. "
            f"{next(iter(splits))}[:90%]."
        ) from None
    # A slice past the end is empty (datasets clamps its bounds): select() would refuse its start.
    parts = [splits[r.splitname].select(range(r.from_, r.to)) for r in ranges if r.to > r.from_]
    rows = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0] if parts else []
    if len(rows) == 0:
        sizes = ", ".join(f"{name} has {len(ds)} rows" for name, ds in splits.items())
        raise DataError(f"{split_key} = '{split}' selects no rows of {label} ({sizes}); widen the slice.")
    return rows


def load_split(
    ref: str, config: str | None, split: str, where: str = "data.dataset", split_key: str = "the split"
) -> Any:
    """Load one split as a ``datasets.Dataset``.

    Local files have a single split, named ``train``: a plain split name is ignored for them (use
    ``data.eval_dataset`` for a separate evaluation file), a slice of it (``train[:90%]``) selects
    those rows, as for a hub dataset. ``split_key`` names the setting that gave ``split`` in messages
    (``data.train_split``, ``--split``).
    """
    import datasets

    datasets.disable_progress_bars()
    if is_sliced(split):
        split_instruction(split, split_key)  # a bad slice is named before any file or hub is read
    if ref.startswith(BUILTIN_PREFIX) and is_sliced(split):
        from kdgeo import demo

        label = f"{where} = '{ref}'"
        return _sliced(split, split_key, label, {name: load_split(ref, None, name, where) for name in demo.SPLIT_FILES})
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX) :]
        if name != "wordnet-supersenses":
            raise DataError(
                f"{where} = '{ref}': no such built-in dataset; built-ins are: "
                + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_DATASETS)
                + "."
            )
        from kdgeo import demo

        if split not in demo.SPLIT_FILES:
            raise DataError(f"{where} = '{ref}' has no split '{split}'; its splits are: {', '.join(demo.SPLIT_FILES)}.")
        names = demo.load_labels()
        rows = demo.load_split(split)
        features = datasets.Features(
            {
                "text": datasets.Value("string"),
                "label": datasets.ClassLabel(names=names),
                "label_name": datasets.Value("string"),
                "synset": datasets.Value("string"),
            }
        )
        return datasets.Dataset.from_list(rows, features=features)
    if is_local_file(ref):
        rows = _load_local(ref, where)
        return (
            _sliced(split, split_key, f"{where} = '{ref}' (a local file: one split, named train)", {"train": rows})
            if is_sliced(split)
            else rows
        )
    try:
        return datasets.load_dataset(ref, config, split=split)
    except ValueError as err:
        msg = _first_line(err)
        raise DataError(
            f"{where} = '{ref}' (config {config!r}, split '{split}'): {msg}. Check the config and split names."
        ) from None
    except Exception as err:  # network, missing dataset, auth: all user-fixable
        cache = _unwritable_cache()
        if cache is not None:
            raise DataError(
                f"{where} = '{ref}': the datasets cache {cache} cannot be written ({_first_line(err)}); set HF_HOME "
                "(or HF_DATASETS_CACHE) to a writable directory, or give a local .csv/.json/.jsonl/.parquet file."
            ) from None
        raise DataError(
            f"{where} = '{ref}': cannot load it from the Hugging Face hub ({_first_line(err)}). Check the dataset id "
            "and that you are online, or give a local .csv/.json/.jsonl/.parquet file."
        ) from None


_LOCAL_CACHE: str | None = None


def _local_cache_dir() -> str:
    """A temporary directory for the Arrow files ``datasets`` makes of local files, removed at exit.

    Not ~/.cache/huggingface: a local file needs no download cache, a read-only or full HOME
    must not stop a run (it used to fail as "check the data file's format"), and copies of
    every local file tried would pile up there. The Arrow files are memory-mapped; removing them
    at exit (or earlier, by a tmp cleaner) is safe on POSIX while they are mapped.
    """
    global _LOCAL_CACHE
    if _LOCAL_CACHE is None or not os.path.isdir(_LOCAL_CACHE):
        import atexit
        import shutil
        import tempfile

        _LOCAL_CACHE = tempfile.mkdtemp(prefix="kdgeo-datasets-")
        atexit.register(shutil.rmtree, _LOCAL_CACHE, True)
    return _LOCAL_CACHE


def _unwritable_cache() -> str | None:
    """The datasets cache directory when it (or the nearest existing directory above it) cannot be written."""
    try:
        import datasets.config

        cache = Path(str(datasets.config.HF_DATASETS_CACHE))
    except Exception:  # pragma: no cover - datasets without the attribute
        return None
    probe = cache
    while not os.path.exists(probe) and probe.parent != probe:
        probe = probe.parent
    return None if os.path.isdir(probe) and os.access(probe, os.W_OK) else str(cache)


def _load_local(ref: str, where: str) -> Any:
    """A local .csv / .json / .jsonl / .parquet file as a Dataset; every problem a DataError naming the
    file (and, for text that is not UTF-8 or a line that is not JSON, the line)."""
    import datasets

    from kdgeo import files

    label = f"{where} = '{ref}'"
    path = Path(os.path.expanduser(ref))
    found = files.stat_path(path, label, DataError)
    if found is None:
        raise DataError(
            f"{label}: file not found. Give an existing .csv, .json, .jsonl or .parquet file, or a hub dataset id."
        )
    if files.is_dir(path, label, DataError):
        raise DataError(f"{label} is a directory; give one .csv, .json, .jsonl or .parquet file.")
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{label}: unsupported file type '{path.suffix}'; use .csv, .json, .jsonl or .parquet.")
    if fmt != "parquet":
        # pyarrow's JSON reader accepts bytes that are not UTF-8 and fails only when a row is read
        # (UnicodeDecodeError deep in training); the CSV reader fails without saying where.
        files.check_utf8(path, label, DataError)
    if _local_file_is_empty(path, fmt):
        raise DataError(f"{label}: the file has no rows; give a file with data.")
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # its "Failed to read file" line: the DataError says it all
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=_local_cache_dir())
    except Exception as err:  # datasets raises many types for unreadable files
        detail = (_json_problem(path) if fmt == "json" else None) or _root_cause(err)
        raise DataError(f"{label}: cannot read it as {fmt}: {detail}. Check the file's format.") from None
    finally:
        ds_logging.set_verbosity(level)


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost cause: datasets wraps the parser's message (which names the
    line of a CSV file) in "An error occurred while generating the dataset"."""
    seen = []
    cur: BaseException | None = err
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    for candidate in seen[1:]:
        text = _first_line(candidate)
        # pyarrow's fallback parser adds a useless "Trailing data at position N" at the very end.
        if text and not text.startswith("Trailing data"):
            return text
    return _first_line(err)


def _json_problem(path: Path) -> str | None:
    """Where a .json / .jsonl file stops being JSON: "line N: <reason>", or None when it parses.

    Only called after datasets failed (so only the failure path pays for parsing in Python). A
    .json file is either one JSON document (an array of objects, or columns) or JSON Lines.
    """
    import json

    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as whole:
        first = next((line for line in text.splitlines() if line.strip()), "")
        if not (first.lstrip().startswith("{") and whole.msg == "Extra data") and path.suffix.lower() != ".jsonl":
            return f"line {whole.lineno}, column {whole.colno}: {whole.msg}"
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return (
                f"line {number}, column {err.colno}: {err.msg} (each line of a JSON Lines file must be one JSON object)"
            )
        if not isinstance(value, dict):
            return (
                f"line {number} holds a JSON {type(value).__name__}, not an object (each line must be one JSON object)"
            )
    return None


def _local_file_is_empty(path: Path, fmt: str) -> bool:
    """0 bytes, a CSV with only a header, blank JSON lines, or a parquet file of 0 rows."""
    try:
        if path.stat().st_size == 0:
            return True
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows == 0
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = [line for _, line in zip(range(3), (ln for ln in fh if ln.strip()))]
        if fmt == "csv":
            return len(lines) <= 1
        return not lines or (len(lines) == 1 and lines[0].strip() in ("[]", "{}"))
    except Exception:  # unreadable: let the loader report it
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def check_columns(ds: Any, columns: dict[str, str | None], where: str, setting: str = "data.{key}") -> None:
    """Every named column exists, and the dataset is not empty.

    ``setting`` names the knob as the command knows it: ``data.{key}`` in a spec, ``--text-column``
    style options on the command line (``{key}`` is the key of ``columns``).
    """
    if len(ds) == 0:
        raise DataError(f"{where}: the dataset is empty (0 rows); check the file or the split name.")
    have = list(ds.column_names)
    for key, column in columns.items():
        name = setting.format(key=key)
        if name.startswith("--"):
            name = name.replace("_", "-")  # command-line options are spelled with dashes
        if column is not None and column not in have:
            raise DataError(
                f"{where}: no column '{column}' (set by {name}); the dataset has columns: "
                f"{', '.join(have)}. Set {name} to one of them."
            )


@dataclass(frozen=True)
class LabelInfo:
    names: list[str]
    """Class names; label i is names[i]."""
    string_to_id: dict[str, int] | None = None
    """For string label columns: the mapping used (sorted names)."""

    @property
    def num_labels(self) -> int:
        return len(self.names)


def infer_labels(ds: Any, label_column: str, where: str) -> LabelInfo:
    """Class names from a ClassLabel feature, from string labels (sorted), or 0..max for ints."""
    import datasets

    feature = ds.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return LabelInfo(names=list(feature.names))
    values = ds[label_column]
    if any(v is None for v in values):
        raise DataError(f"{where}: column '{label_column}' has empty labels; every training row needs a label.")
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        return LabelInfo(names=names, string_to_id={n: i for i, n in enumerate(names)})
    if all(isinstance(v, (int, bool)) or (isinstance(v, float) and float(v).is_integer()) for v in values):
        ints = [int(v) for v in values]
        distinct = len(set(ints))
        if ints and (max(ints) + 1 > 100_000 or max(ints) + 1 > 2 * distinct + 100):
            raise DataError(
                f"{where}: column '{label_column}' has {distinct} distinct integer labels but the largest is "
                f"{max(ints)}; labels must be 0..num_labels-1. Renumber them, or store class names as strings "
                "(mapped in sorted order)."
            )
        if min(ints) < 0:
            raise DataError(
                f"{where}: column '{label_column}' has negative labels (e.g. {min(ints)}); labels must be "
                "0..num_labels-1 (an unlabelled test split uses -1: train and evaluate on labelled splits)."
            )
        return LabelInfo(names=[str(i) for i in range(max(ints) + 1)])
    kinds = sorted({type(v).__name__ for v in values})
    raise DataError(
        f"{where}: column '{label_column}' holds {', '.join(kinds)} values; labels must be integers or class-name "
        "strings."
    )


def labels_as_ids(ds: Any, label_column: str, info: LabelInfo, where: str) -> list[int]:
    """The label column as ids in 0..num_labels-1, or a DataError naming the first bad value."""
    out = []
    for row, value in enumerate(ds[label_column]):
        if info.string_to_id is not None:
            if value not in info.string_to_id:
                raise DataError(
                    f"{where}: row {row} has label {value!r}, which the training data never uses "
                    f"(known: {', '.join(info.names[:10])}{'...' if info.num_labels > 10 else ''})."
                )
            out.append(info.string_to_id[value])
            continue
        if value is None or isinstance(value, str) or not float(value).is_integer():
            raise DataError(
                f"{where}: row {row} has label {value!r}; labels must be integers 0..{info.num_labels - 1}."
            )
        label = int(value)
        if not 0 <= label < info.num_labels:
            raise DataError(
                f"{where}: row {row} has label {label}, outside 0..{info.num_labels - 1} (the training data has "
                f"{info.num_labels} classes). Fix the labels, or train on data that has every class."
            )
        out.append(label)
    return out


def texts_of(ds: Any, column: str, where: str) -> list[str]:
    values = ds[column]
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(
                f"{where}: row {row} of column '{column}' is {type(value).__name__} ({value!r}), not text. Point the "
                "text column setting at a column of strings, or fill the empty rows."
            )
    return list(values)


# --------------------------------------------------------------------------------------------
# encoding and batching


@dataclass
class Encoded:
    """Token ids of every example for one tokenizer (no padding)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    pad_id: int
    response_start: list[int] | None = None
    """Causal LMs: index of each example's first response token (everything before it is prompt)."""


def encode(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int) -> Encoded:
    enc = tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True, max_length=max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids"), pad_id=pad_id)


@dataclass
class TextSplit:
    """One split ready for batching: encodings per model role ('student', 'teacher') and labels."""

    texts: list[str]
    labels: list[int] | None
    encodings: dict[str, Encoded] = field(default_factory=dict)
    pair_texts: list[str] | None = None
    responses: list[str] | None = None
    """Causal LMs: the reference response of each example (``texts`` holds the formatted prompts)."""
    truncation: dict[str, dict[str, int]] | None = None
    """Causal LMs: what building the split cut or dropped, per tokenizer ("student and teacher" when
    they share one): counts of ``lm_data.TruncationReport``. Not carried by ``subset``."""
    sources: list[tuple[str, str, str]] | None = None
    """Causal LMs: each example's instruction, context ("" when none) and reference response as read
    from the data, before any template or cut: what its content hash covers (``texts`` depend on the
    tokenizer, through a chat template or a cut prompt)."""

    def __len__(self) -> int:
        return len(self.texts)

    def eval_keys(self) -> list[tuple[str, str]]:
        """Per example, (text_sha256, target): what predictions.jsonl and summary.json's ``eval_sha256``
        identify it by (:func:`kdgeo.rundir.text_sha256`, :func:`kdgeo.rundir.eval_sha256`). A causal LM's
        text fields are its ``sources`` and its target the sha256 of the reference; a classifier's are its
        text (and pair text) and its target the label id. Tokenizer-free: the same examples hash the same
        for every student."""
        from kdgeo.rundir import text_sha256

        if self.sources is not None:
            return [(text_sha256(src), text_sha256([src[2]])) for src in self.sources]
        labels = self.labels if self.labels is not None else [None] * len(self.texts)
        pairs = self.pair_texts
        return [
            (text_sha256([text] if pairs is None else [text, pairs[i]]), "" if label is None else str(label))
            for i, (text, label) in enumerate(zip(self.texts, labels))
        ]

    def subset(self, indices: Sequence[int]) -> TextSplit:
        encs = {
            role: Encoded(
                input_ids=[e.input_ids[i] for i in indices],
                token_type_ids=[e.token_type_ids[i] for i in indices] if e.token_type_ids is not None else None,
                pad_id=e.pad_id,
                response_start=[e.response_start[i] for i in indices] if e.response_start is not None else None,
            )
            for role, e in self.encodings.items()
        }
        labels = [self.labels[i] for i in indices] if self.labels is not None else None
        pair_texts = [self.pair_texts[i] for i in indices] if self.pair_texts is not None else None
        responses = [self.responses[i] for i in indices] if self.responses is not None else None
        return TextSplit(
            texts=[self.texts[i] for i in indices],
            labels=labels,
            encodings=encs,
            pair_texts=pair_texts,
            responses=responses,
            sources=[self.sources[i] for i in indices] if self.sources is not None else None,
        )


def _pad(seqs: list[list[int]], value: int) -> Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(split: TextSplit, indices: Sequence[int]) -> dict[str, Any]:
    """A right-padded batch: ``batch[role]`` holds the model inputs input_ids, attention_mask (and
    token_type_ids), (B, T). Causal-LM splits add ``batch["response_mask"][role]``, (B, T), 1 on
    response tokens only (not on the prompt, not on padding)."""
    batch: dict[str, Any] = {}
    for role, enc in split.encodings.items():
        seqs = [enc.input_ids[i] for i in indices]
        inputs = {"input_ids": _pad(seqs, enc.pad_id), "attention_mask": _pad([[1] * len(s) for s in seqs], 0)}
        if enc.token_type_ids is not None:
            inputs["token_type_ids"] = _pad([enc.token_type_ids[i] for i in indices], 0)
        batch[role] = inputs
        if enc.response_start is not None:
            marks = [
                [0] * enc.response_start[i] + [1] * (len(enc.input_ids[i]) - enc.response_start[i]) for i in indices
            ]
            batch.setdefault("response_mask", {})[role] = _pad(marks, 0)  # (B, T)
    if split.labels is not None:
        batch["labels"] = torch.tensor([split.labels[i] for i in indices], dtype=torch.long)  # (B,)
    batch["index"] = torch.tensor(list(indices), dtype=torch.long)
    return batch


GROUP_WINDOW = 50
"""Length grouping sorts windows of this many batches, so batches stay random across the epoch."""


def batch_indices(
    n: int, batch_size: int, shuffle: bool, seed: int, epoch: int, lengths: Sequence[int] | None = None
) -> list[list[int]]:
    """Index lists of one epoch; the order depends only on (seed, epoch), so runs replay exactly.

    With ``lengths`` (length grouping), the shuffled order is cut into windows of
    ``GROUP_WINDOW * batch_size`` examples, each window is sorted by length and cut into
    batches, and the batches are shuffled: far less padding, same examples per epoch.
    """
    if shuffle:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
        order = torch.randperm(n, generator=gen).tolist()
    else:
        order = list(range(n))
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    window = GROUP_WINDOW * batch_size
    batches: list[list[int]] = []
    for start in range(0, n, window):
        chunk = sorted(order[start : start + window], key=lambda i: (lengths[i], i))
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    if shuffle:
        perm = torch.randperm(len(batches), generator=gen).tolist()
        batches = [batches[i] for i in perm]
    return batches


def lengths_of(split: TextSplit) -> list[int]:
    """Longest tokenization of each example across the split's encodings."""
    encs = list(split.encodings.values())
    return [max(len(e.input_ids[i]) for e in encs) for i in range(len(split))]


def iterate_batches(
    split: TextSplit,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    group_by_length: bool = False,
) -> Iterator[dict[str, Any]]:
    lengths = lengths_of(split) if group_by_length else None
    for idx in batch_indices(len(split), batch_size, shuffle, seed, epoch, lengths):
        yield collate(split, idx)


class _Collate:
    """Picklable ``collate`` bound to a split, for DataLoader worker processes."""

    def __init__(self, split: TextSplit) -> None:
        self.split = split

    def __call__(self, indices: Sequence[int]) -> dict[str, Any]:
        return collate(self.split, indices)


def loader_workers(setting: int | str, device: torch.device, processes: int = 1) -> int:
    """Worker processes that collate batches ahead of the training step.

    ``"auto"``: none on CPU (the model's own threads use every core there, and collating a
    batch costs well under 1% of a CPU step), else one less than this process's share of the
    CPU cores, at most 4 (collation is cheap padding of pre-tokenized ids).
    """
    if setting != "auto":
        return int(setting)
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(processes, 1) - 1))


def prefetch_batches(
    split: TextSplit, batches: Sequence[Sequence[int]], workers: int, pin_memory: bool = False
) -> Iterator[dict[str, Any]]:
    """Collated batches in the given order; with ``workers`` > 0, collated ahead in worker
    processes by a torch DataLoader (same batches, same order: the indices are fixed here)."""
    if workers <= 0 or not batches:
        for idx in batches:
            yield collate(split, idx)
        return
    from torch.utils.data import DataLoader

    loader: DataLoader[list[int]] = DataLoader(
        [list(b) for b in batches],  # type: ignore[arg-type]  # torch's stub wants a Dataset; any indexable works
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_Collate(split),
        pin_memory=pin_memory,
        prefetch_factor=2,
        worker_init_fn=_ignore_stop_signals,
        # its own generator: creating the iterator must not draw from the global RNG (bitwise resume)
        generator=torch.Generator(),
    )
    yield from loader


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the training process: torchrun, SLURM and `timeout` signal
    the whole process group, and a worker dying of it would abort the step instead of letting the
    main process finish it, checkpoint and shut the workers down."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def to_device(inputs: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def fingerprint(ref: str) -> str:
    """Identity of a dataset reference: a local file's absolute path, size and mtime; else the id."""
    path = Path(os.path.expanduser(ref))
    if not ref.startswith(BUILTIN_PREFIX) and path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return ref
