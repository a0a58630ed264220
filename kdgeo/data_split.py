"""`data.eval_fraction`: hold out part of the training split as the evaluation set, and keep that split.

A single local file (or a hub dataset without an evaluation split) has nothing to evaluate on;
``data.eval_fraction = f`` holds out ``ceil(f * rows)`` examples of ``data.train_split``, chosen by a
permutation seeded with ``data.split_seed`` (default 0), and trains on the rest. The seed is not the
run's seed, on purpose: every seed and variant of a sweep then holds out the same examples, so their
evaluations can be paired example by example (``kdgeo compare`` refuses runs whose evaluation sets
differ, by ``data.eval_sha256``). This is the same rule as scikit-learn's ``train_test_split``
(``random_state`` fixed apart from the model's seed) and Hugging Face ``Dataset.train_test_split``
(``ceil`` for the held-out count).

The split is written to the run directory (:data:`SPLIT_FILE`: the source's identity, its row count,
the fraction, the seed and the held-out indices) before spec.json. ``--resume`` and ``kdgeo eval RUN``
reuse the recorded indices rather than drawing again, so a NumPy whose permutation changed cannot move
examples between the sets of one run; a source whose content changed is refused (exit 2), naming it.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdgeo.errors import DataError

SPLIT_FILE = "data_split.json"
"""The run directory's record of an eval_fraction split."""
DEFAULT_SPLIT_SEED = 0
"""``data.split_seed`` when unset."""


@dataclass(frozen=True)
class DataSplit:
    """One eval_fraction split of ``dataset``'s ``train_split`` (after slicing, before max_*_samples)."""

    dataset: str
    train_split: str
    source_sha256: str | None
    """sha256 of the source's bytes: the local file, or the built-in dataset's files; None for a hub dataset."""
    fingerprint: str | None
    """A hub dataset's fingerprint as the datasets library computes it (its cached version); None for files."""
    rows: int
    """Rows of train_split that were split."""
    eval_fraction: float
    split_seed: int
    eval_indices: tuple[int, ...]
    """Ascending row indices (into train_split) of the evaluation examples; every other row trains."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "dataset": self.dataset,
            "train_split": self.train_split,
            "source_sha256": self.source_sha256,
            "fingerprint": self.fingerprint,
            "rows": self.rows,
            "eval_fraction": self.eval_fraction,
            "split_seed": self.split_seed,
            "eval_examples": len(self.eval_indices),
            "eval_indices": list(self.eval_indices),
        }

    @staticmethod
    def from_dict(raw: Any, where: str) -> DataSplit:
        """A recorded split, or a DataError naming ``where`` (the file) when it is not one."""
        try:
            indices = tuple(int(i) for i in raw["eval_indices"])
            rows = int(raw["rows"])
            split = DataSplit(
                dataset=str(raw["dataset"]),
                train_split=str(raw["train_split"]),
                source_sha256=None if raw.get("source_sha256") is None else str(raw["source_sha256"]),
                fingerprint=None if raw.get("fingerprint") is None else str(raw["fingerprint"]),
                rows=rows,
                eval_fraction=float(raw["eval_fraction"]),
                split_seed=int(raw["split_seed"]),
                eval_indices=indices,
            )
        except (KeyError, TypeError, ValueError):
            split = None
        if split is None or not indices or list(indices) != sorted(set(indices)) or indices[-1] >= rows:
            raise DataError(
                f"{where} is not a kdgeo data split record (it must hold rows, eval_fraction, split_seed and "
                "ascending eval_indices below rows); restore it from a backup, or delete it to draw the split again "
                "from data.split_seed."
            )
        return split

    def train_indices(self) -> list[int]:
        held = set(self.eval_indices)
        return [i for i in range(self.rows) if i not in held]


def eval_count(rows: int, fraction: float) -> int:
    """ceil(fraction * rows), at least 1. The product is rounded first: 0.1 * 30 is 3.0000000000000004 in
    binary floating point, and its ceiling would hold out 4 examples instead of 3."""
    return max(1, math.ceil(round(fraction * rows, 9)))


def draw(rows: int, fraction: float, seed: int) -> tuple[int, ...]:
    """The held-out rows: the first ceil(fraction * rows) of a permutation of 0..rows-1 drawn by NumPy's
    PCG64 generator seeded with ``seed`` (``numpy.random.default_rng(seed).permutation``), ascending.

    A uniformly random subset of that size, the same for every run seed; ascending so the evaluation set keeps
    the file's order (predictions.jsonl reads like the data)."""
    import numpy as np

    chosen = np.random.default_rng(seed).permutation(rows)[: eval_count(rows, fraction)]
    return tuple(sorted(int(i) for i in chosen))


def file_sha256(paths: list[Path]) -> str:
    """sha256 over the bytes of ``paths`` in order (read in 1 MiB blocks: data files can be large)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def source_identity(ref: str, ds: Any) -> tuple[str | None, str | None]:
    """(sha256 of the source's bytes, the hub fingerprint): what tells whether the source changed under its name."""
    from kdgeo import data as data_mod

    if ref.startswith(data_mod.BUILTIN_PREFIX):
        from kdgeo import demo

        return file_sha256([Path(p) for p in demo.SPLIT_FILES.values()]), None
    if data_mod.is_local_file(ref):
        return file_sha256([Path(os.path.expanduser(ref))]), None
    fingerprint = getattr(ds, "_fingerprint", None)
    return None, str(fingerprint) if fingerprint is not None else None


def split_rows(
    ds: Any, ref: str, train_split: str, fraction: float, seed: int, recorded: DataSplit | None, where: str
) -> tuple[Any, Any, DataSplit]:
    """(training rows, evaluation rows, the split) of ``ds``, the loaded ``train_split`` of ``ref``.

    With ``recorded`` (a resumed run's, or the run that ``kdgeo eval`` re-scores), its indices are reused after
    checking that the source and its size are the ones it split; else a new split is drawn. ``where`` names the
    source in messages.
    """
    sha, fingerprint = source_identity(ref, ds)
    rows = len(ds)
    if recorded is not None:
        check_same_source(recorded, ref, sha, fingerprint, rows, fraction, seed, where)
        split = recorded
    else:
        if rows < 2:
            raise DataError(
                f"{where} has {rows} row(s): data.eval_fraction needs at least 2 (one to train on, one to evaluate); "
                "give more data, or a separate data.eval_dataset."
            )
        split = DataSplit(ref, train_split, sha, fingerprint, rows, fraction, seed, draw(rows, fraction, seed))
    return ds.select(split.train_indices()), ds.select(list(split.eval_indices)), split


def check_same_source(
    recorded: DataSplit,
    ref: str,
    sha: str | None,
    fingerprint: str | None,
    rows: int,
    fraction: float,
    seed: int,
    where: str,
) -> None:
    """Refuse to reuse a recorded split on other data: its indices would pick other examples."""
    fix = f"restore the data the run was started on, or start a new run (a new run draws a new split into {SPLIT_FILE})"
    if recorded.source_sha256 is not None and sha is not None and recorded.source_sha256 != sha:
        raise DataError(
            f"{where} changed since the run split it: {SPLIT_FILE} records sha256 {recorded.source_sha256[:16]}... "
            f"and the data now has {sha[:16]}...; {fix}."
        )
    if recorded.fingerprint is not None and fingerprint is not None and recorded.fingerprint != fingerprint:
        raise DataError(
            f"{where} changed since the run split it: {SPLIT_FILE} records the dataset fingerprint "
            f"{recorded.fingerprint} and it now has {fingerprint}; {fix}."
        )
    if recorded.rows != rows:
        raise DataError(
            f"{where} has {rows} rows in data.train_split = '{recorded.train_split}' and the run split {recorded.rows} "
            f"({SPLIT_FILE}); {fix}."
        )
    if (recorded.eval_fraction, recorded.split_seed) != (fraction, seed):
        raise DataError(
            f"{SPLIT_FILE} records data.eval_fraction = {recorded.eval_fraction} and data.split_seed = "
            f"{recorded.split_seed}, the spec now has {fraction} and {seed}; {fix}."
        )


def read_split(run_dir: Path) -> DataSplit | None:
    """The run directory's recorded split, None when it has none (a run without data.eval_fraction)."""
    from kdgeo import rundir

    path = Path(run_dir) / SPLIT_FILE
    if not path.exists():
        return None
    try:
        raw = rundir.read_json(path)
    except Exception as err:  # KdgeoError from read_json: unreadable, not UTF-8, not JSON
        raise DataError(f"{err} It is the run's data split: restore it, or delete it to draw it again.") from None
    return DataSplit.from_dict(raw, str(path))


def write_split(run_dir: Path, split: DataSplit) -> None:
    """Written atomically (temporary file, fsync, rename) like the run's other files."""
    from kdgeo import rundir

    rundir.write_json(Path(run_dir) / SPLIT_FILE, split.to_dict())


def held_out_rows(run_dir: Path, data: Any, where: str) -> Any:
    """The evaluation rows a data.eval_fraction run held out of its training split, for `kdgeo eval RUN` on the
    run's own data: the recorded indices (data_split.json) of the split as the run loaded it, checked against the
    source as on --resume, before max_eval_samples. ``data`` is the run's [data] (a DataSpec)."""
    from kdgeo import data as data_mod

    ds = data_mod.load_split(data.dataset, data.config, data.train_split, where="--data", split_key="data.train_split")
    seed = data.split_seed if data.split_seed is not None else DEFAULT_SPLIT_SEED
    _, evals, _ = split_rows(
        ds, data.dataset, data.train_split, data.eval_fraction, seed, read_split(Path(run_dir)), where
    )
    return evals
