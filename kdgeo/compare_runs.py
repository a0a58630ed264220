"""What `kdgeo compare` reads and groups: run directories found, read back and checked.

:func:`load_runs` finds run directories under the paths given (nested sweeps down to
:data:`MAX_SEARCH_DEPTH` levels, each directory once) and reads each through
:func:`kdgeo.rundir.read_run` into a :class:`RunRecord`. The checks then refuse what cannot be compared
(exit 2, naming the runs and the fix):

* :func:`check_tasks`: one evaluation set (:data:`EVAL_FIELDS`; an unset field is a value, not
  "unknown"), unless ``allow_different_data``;
* :func:`check_variants`: a variant is one experiment (its runs' resolved specs agree except for
  :data:`SETTINGS_IGNORED`), and a (variant, seed) comes from one run directory;
* :func:`check_metrics`: every run has every metric asked for.

:func:`pick_baseline` names the baseline and why, and :func:`pair_on_shared_seeds` decides how two
variants are paired. The statistics and the verdict are :mod:`kdgeo.comparison`'s.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kdgeo import files, locks, rundir
from kdgeo.errors import KdgeoError
from kdgeo.spec import RESUME_SAFE_FIELDS

BASELINE_NAMES: tuple[str, ...] = ("baseline", "ce")
"""Variant names taken as the baseline when none is given (in this order)."""
_PAIR_KEYS = ("student", "teacher")
EVAL_FIELDS: tuple[str, ...] = (
    "task", "dataset", "config", "eval_split", "eval_dataset", "max_eval_samples", "label_names", "eval_examples",
    "eval_sha256",
)  # fmt: skip
"""What defines a run's evaluation set; runs are compared only when these agree (see :func:`check_tasks`)."""
SETTINGS_IGNORED: tuple[str, ...] = ("name", "variant", "seed", "sweep", *RESUME_SAFE_FIELDS)
"""spec.json fields (dotted; a field covers its sub-fields) left out of a variant's identity: its labels (name,
variant), the seed (what varies within a variant), the sweep table (the list of variants and seeds), and the fields a
resumed run may change because they affect what is logged, kept or where, not the numbers
(:data:`kdgeo.spec.RESUME_SAFE_FIELDS`: description, monitor.every, monitor.metrics, train.log_every,
train.eval_every, train.checkpoint_every, train.keep_checkpoints, train.on_nonfinite, train.loader_workers,
train.timeout_minutes, output.*). Everything else (epochs, lr, losses, teacher, data, precision, device, ...) must
agree among the runs of one variant. A grid sweep's ``swept`` values are not ignored: its combinations are distinct
variants (each has its own name), and a run recording other values under one name is a different experiment."""
MAX_SEARCH_DEPTH = 4
"""How many directory levels below a RUN argument are searched for run directories (a sweep of sweeps is 2)."""


@dataclass(frozen=True)
class TaskKey:
    """What a run was evaluated on. Runs are comparable only when their keys agree."""

    task: str | None = None
    dataset: str | None = None
    config: str | None = None
    eval_split: str | None = None
    eval_dataset: str | None = None
    max_eval_samples: int | None = None
    """None: the whole eval split (a value, not "unknown")."""
    label_names: tuple[str, ...] | None = None
    eval_examples: int | None = None
    """How many examples the final evaluation scored (summary.json data.eval_examples; None: not recorded)."""
    eval_sha256: str | None = None
    """sha256 over the evaluated examples in order (summary.json data.eval_sha256; None: not recorded, older runs)."""
    differs: tuple[str, ...] = ()
    """In the key of several runs (:attr:`CompareResult.task`): the fields whose values differ between the runs
    (compared with --allow-different-data); those fields are None here."""

    def fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def __str__(self) -> str:
        parts = []
        for k, v in self.fields().items():
            if k == "differs":
                continue
            if k in self.differs:
                parts.append(f"{k} differs between runs")
            elif v is not None:
                parts.append(f"{k}={_show(v)[:12] if k == 'eval_sha256' else _show(v)}")
        return ", ".join(parts) or "(unknown task)"


@dataclass(frozen=True, eq=False)
class RunRecord:
    """One finished run, as read back from its directory."""

    path: Path
    variant: str
    seed: int | None
    task: TaskKey
    scores: dict[str, float | None]
    geometry: list[dict[str, Any]]
    """Final per-layer-pair geometry: {student, teacher, procrustes, cka, gram}."""
    curve: list[tuple[int, dict[str, float | None]]] = field(default_factory=list)
    """Evaluations during training: (step, scores), from metrics.jsonl "eval" events."""
    geometry_curve: list[tuple[int, list[dict[str, Any]]]] = field(default_factory=list)
    """Monitor measurements during training: (step, pairs), from metrics.jsonl "monitor" events."""
    unrecorded: frozenset[str] = frozenset()
    """Fields of ``task`` the run does not record (their None there means "unknown", not a value)."""
    settings: dict[str, Any] | None = None
    """The resolved spec (spec.json) flattened to dotted keys, without :data:`SETTINGS_IGNORED`: what identifies
    the variant apart from its name. None when the run has no readable spec.json."""
    swept: dict[str, Any] | None = None
    """A grid sweep's run: its grid values by key ({"losses[2].weight": 0.3}); None for other runs."""
    variant_base: str | None = None
    """A grid sweep's run: the variant the grid crossed (``kd-procrustes`` of ``kd-procrustes/weight=0.3``)."""

    def geometry_value(self, metric: str, pairs: list[dict[str, Any]] | None = None) -> float | None:
        """Mean of ``metric`` over layer pairs (the final ones by default); None if absent."""
        values = [finite_number(p.get(metric)) for p in (self.geometry if pairs is None else pairs)]
        present = [v for v in values if v is not None]
        if not values or len(present) != len(values):
            return None
        return sum(present) / len(present)

    def value(self, metric: str) -> float | None:
        """The run's final value of ``metric`` (a score, else a geometry mean); None if absent."""
        if metric in self.scores:
            return self.scores[metric]
        return self.geometry_value(metric)

    def curve_of(self, metric: str) -> list[tuple[int, float]]:
        """``metric`` over training steps (scores from evaluations, geometry from the monitor)."""
        points: list[tuple[int, float]] = []
        if metric in self.scores:
            for step, scores in self.curve:
                v = finite_number(scores.get(metric))
                if v is not None:
                    points.append((step, v))
        else:
            for step, pairs in self.geometry_curve:
                v = self.geometry_value(metric, pairs)
                if v is not None:
                    points.append((step, v))
        return sorted(points)

    def metrics_available(self) -> set[str]:
        names = {k for k, v in self.scores.items() if v is not None}
        if self.geometry:
            keys = set.intersection(*[set(p) for p in self.geometry]) - set(_PAIR_KEYS)
            names |= {k for k in keys if self.geometry_value(k) is not None}
        return names


# ---- loading -----------------------------------------------------------------------------------


def finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _describe_dir(path: Path) -> str:
    """What a directory holds, for 'no runs found' messages."""
    try:
        entries = sorted(path.iterdir())
    except OSError as err:
        return f"cannot be listed ({err.strerror or err})"
    if not entries:
        return "an empty directory"
    names = {e.name for e in entries}
    if rundir.SPEC_JSON in names or rundir.METRICS in names:
        return (
            f"a run directory without {rundir.SUMMARY} (holds {', '.join(sorted(names))}): the run has not finished "
            "or failed"
        )
    subdirs = [e for e in entries if e.is_dir()]
    unfinished = [d.name for d in subdirs if (d / rundir.SPEC_JSON).exists() or (d / rundir.METRICS).exists()]
    if unfinished:
        return (
            f"{len(subdirs)} subdirector{'y' if len(subdirs) == 1 else 'ies'}, none with {rundir.SUMMARY}; "
            f"unfinished runs: {', '.join(unfinished)}"
        )
    shown = ", ".join(e.name + ("/" if e.is_dir() else "") for e in entries[:8]) + (", ..." if len(entries) > 8 else "")
    return f"no {rundir.SUMMARY} in it or its subdirectories (holds {shown})"


def _search_runs(root: Path, warnings: list[str]) -> list[Path]:
    """Run directories below ``root`` (not ``root`` itself), down to :data:`MAX_SEARCH_DEPTH` levels.

    A directory with summary.json is a run and is not searched further (its checkpoints are not runs); one with
    spec.json or metrics.jsonl but no summary is an unfinished run, skipped with a warning, as is one a running
    `kdgeo distill` holds. Symlinked directories are followed, but each real directory is searched once, so a link
    loop ends. Directories below the depth limit that hold subdirectories are named in a warning, not searched.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    too_deep: list[str] = []

    def subdirectories(directory: Path) -> list[Path]:
        try:
            return sorted(p for p in directory.iterdir() if p.is_dir())
        except OSError as err:
            warnings.append(f"skipped {directory}: it cannot be listed ({err.strerror or err})")
            return []

    def visit(directory: Path, depth: int) -> None:
        try:
            real = directory.resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop on older Pythons
            return
        if real in seen:
            return
        seen.add(real)
        for child in subdirectories(directory):
            holder = locks.run_holder(child)
            if holder is not None:
                warnings.append(f"skipped {locks.still_running(child, holder)}")
            elif (child / rundir.SUMMARY).is_file():
                found.append(child)
            elif (child / rundir.SPEC_JSON).exists() or (child / rundir.METRICS).exists():
                warnings.append(f"skipped {child}: no {rundir.SUMMARY} (the run has not finished or failed)")
            elif depth < MAX_SEARCH_DEPTH:
                visit(child, depth + 1)
            elif subdirectories(child):
                too_deep.append(str(child))

    visit(root, 1)
    if too_deep:
        shown = ", ".join(too_deep[:5]) + (f" and {len(too_deep) - 5} more" if len(too_deep) > 5 else "")
        warnings.append(
            f"not searched (more than {MAX_SEARCH_DEPTH} levels below {root}): {shown}; pass those directories "
            "themselves to include the runs in them"
        )
    return found


def _find_run_dirs(paths: Sequence[str], warnings: list[str]) -> list[Path]:
    if not paths:
        raise KdgeoError(
            "no run directories given; pass run directories (each holding summary.json) or a directory of runs, "
            "e.g. `kdgeo compare runs/my-sweep`."
        )
    missing: list[str] = []
    empty: list[str] = []
    found: list[Path] = []
    for raw in paths:
        path = Path(os.path.expanduser(str(raw)))
        if not files.exists(path, f"RUN '{raw}'"):  # a name over 255 bytes or a link loop fails here, named
            missing.append(str(raw))
            continue
        if files.is_file(path, f"RUN '{raw}'"):
            if path.name == rundir.SUMMARY:
                found.append(path.parent)
            else:
                empty.append(f"{raw} (a file, not a directory: pass the run directory that holds {rundir.SUMMARY})")
            continue
        holder = locks.run_holder(path)
        if holder is not None:  # an old summary.json may still be there while an overwriting run writes
            empty.append(f"{raw} ({locks.still_running(path, holder)}; compare it once it has finished)")
            continue
        if (path / rundir.SUMMARY).is_file():
            found.append(path)
            continue
        said = len(warnings)
        children = _search_runs(path, warnings)
        if children:
            found.extend(children)
        else:  # directories too deep to search may be why: the error names them
            deeper = [w for w in warnings[said:] if w.startswith("not searched")]
            empty.append(f"{raw} ({'; '.join([_describe_dir(path), *deeper])})")
    if missing:
        raise KdgeoError(
            f"{'these paths do' if len(missing) > 1 else 'this path does'} not exist: {', '.join(missing)}. "
            "Pass existing run directories (each holding summary.json) or a directory of runs."
        )
    if empty:
        raise KdgeoError(
            f"no runs found in {'; '.join(empty)}. A run directory holds {rundir.SUMMARY}, written by `kdgeo distill` "
            "when the run finishes; pass run directories or a directory that holds them (searched down to "
            f"{MAX_SEARCH_DEPTH} levels), and leave out runs that have not finished."
        )
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def _task_key(run: rundir.RunDirectory) -> tuple[TaskKey, frozenset[str]]:
    """The run's evaluation set, and the fields of it the run does not record.

    Within a recorded data table None is a value (max_eval_samples None: the whole split; config None: the
    dataset's default configuration); a run without any data table records none of the data fields, and a
    classification run without label_names (or a run from before eval_sha256 / eval_examples) does not record
    those: such fields are "unknown" and left out of the comparison, with a warning.
    """
    data = run.data
    labels = run.summary.label_names if run.summary is not None else None
    key = TaskKey(
        task=run.task,
        dataset=data.dataset if data else None,
        config=data.config if data else None,
        eval_split=data.eval_split if data else None,
        eval_dataset=data.eval_dataset if data else None,
        max_eval_samples=data.max_eval_samples if data else None,
        label_names=tuple(labels) if labels is not None else None,
        eval_examples=data.eval_examples if data else None,  # None: a run from before kdgeo recorded them
        eval_sha256=data.eval_sha256 if data else None,
    )
    unrecorded = {k for k in ("eval_examples", "eval_sha256") if getattr(key, k) is None}
    if key.task is None:
        unrecorded.add("task")
    if data is None:
        unrecorded |= {"dataset", "config", "eval_split", "eval_dataset", "max_eval_samples"}
    if labels is None and key.task != "causal-lm":  # causal LMs have no labels: None is their value
        unrecorded.add("label_names")
    return key, frozenset(unrecorded)


def _flatten_settings(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values; list items by index (``losses.1.weight``), as ``--set`` names them."""
    if isinstance(value, dict):
        items: list[tuple[str, Any]] = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list) and value and all(isinstance(v, (dict, list)) for v in value):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(_flatten_settings(item, f"{prefix}.{key}" if prefix else key))
    return out


def _settings(run: rundir.RunDirectory) -> dict[str, Any] | None:
    """spec.json without :data:`SETTINGS_IGNORED`, flattened; None without a readable spec.json."""
    if not run.spec or run.spec_problem is not None:
        return None
    flat = _flatten_settings(run.spec)
    return {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in SETTINGS_IGNORED)}


def _record(run: rundir.RunDirectory) -> RunRecord:
    assert run.summary is not None  # load_runs reads finished runs only
    scores = {k: finite_number(v) for k, v in run.summary.scores.items()}
    curve: list[tuple[int, dict[str, float | None]]] = []
    geometry_curve: list[tuple[int, list[dict[str, Any]]]] = []
    for event in run.metrics():
        step = rundir.as_int(event.get("step"))
        if step is None:
            continue
        if event.get("event") == "eval" and isinstance(event.get("scores"), dict):
            curve.append((step, {str(k): finite_number(v) for k, v in event["scores"].items()}))
        elif event.get("event") == "monitor" and isinstance(event.get("pairs"), list):
            geometry_curve.append((step, [p for p in event["pairs"] if isinstance(p, dict)]))
    task, unrecorded = _task_key(run)
    return RunRecord(
        run.path,
        run.variant,
        run.seed,
        task,
        scores,
        run.summary.geometry,
        curve,
        geometry_curve,
        unrecorded,
        _settings(run),
        run.swept,
        run.variant_base,
    )


def load_runs(paths: Sequence[str], warnings: list[str] | None = None) -> list[RunRecord]:
    """Read every run under ``paths`` (run directories, or their parents one level up).

    Reads summary.json (required), spec.json (fallback for variant, seed, task and data) and
    metrics.jsonl (learning curves; a cut-short last line is ignored), through
    :func:`kdgeo.rundir.read_run`. Raises KdgeoError when a path does not exist, nothing is found,
    or a summary.json does not parse (naming every one). Diagnostics (skipped unfinished runs, an
    unreadable spec.json) are appended to ``warnings``.
    """
    warnings = [] if warnings is None else warnings
    run_dirs = _find_run_dirs(paths, warnings)
    records: list[RunRecord] = []
    bad: list[str] = []
    for path in run_dirs:
        try:
            run = rundir.read_run(path)
        except rundir.RunFileError as err:
            bad.append(f"{err.path} {err.reason}")
            continue
        if run.spec_problem is not None:
            warnings.append(f"ignored {run.spec_problem.path}: it {run.spec_problem.reason}")
        records.append(_record(run))
    if bad:
        raise KdgeoError(
            f"cannot read {len(bad)} summary file{'s' if len(bad) > 1 else ''}: "
            + "; ".join(bad)
            + ". The run may have been cut short or the file edited by hand: re-run it, restore the file, or leave "
            "that run out."
        )
    records.sort(key=lambda r: (r.variant, r.seed is None, r.seed if r.seed is not None else 0, str(r.path)))
    return records


def _value_order(value: Any) -> tuple[int, Any]:
    """Numbers by value, then booleans, then text: how swept values are ordered (0.1 < 0.3 < 3 < 10)."""
    if isinstance(value, bool):
        return (1, int(value))
    if isinstance(value, (int, float)):
        return (0, float(value))
    return (2, str(value))


def variant_order(runs: Sequence[RunRecord]) -> list[str]:
    """The variants of ``runs``: sorted by name, except that the variants of a grid sweep sort by their base variant,
    then by their swept values in the grid's key order, numbers by value (``weight=3.0`` before ``weight=10.0``,
    which a sort by name would swap). Without grid runs this is ``sorted`` of the names."""
    keys: dict[str, tuple[Any, ...]] = {}
    for r in runs:
        if r.variant not in keys:
            values = tuple((k, _value_order(v)) for k, v in (r.swept or {}).items())
            keys[r.variant] = (r.variant_base or r.variant, values, r.variant) if r.swept else (r.variant, (), "")
    return sorted(keys, key=lambda v: keys[v])


def swept_values(runs: Sequence[RunRecord]) -> tuple[dict[str, dict[str, Any]], dict[str, str], list[str]]:
    """(variant -> its grid values, variant -> its base variant, every swept key in the order first seen) for the
    variants of a grid sweep; empty for other runs. The runs of one variant agree on them: :func:`check_variants`
    compares their spec.json, which records ``swept``."""
    swept: dict[str, dict[str, Any]] = {}
    bases: dict[str, str] = {}
    keys: dict[str, None] = {}
    for r in runs:
        if r.swept and r.variant not in swept:
            swept[r.variant] = dict(r.swept)
            bases[r.variant] = r.variant_base or r.variant.partition("/")[0]
            keys.update(dict.fromkeys(r.swept))
    return swept, bases, list(keys)


# ---- checks ------------------------------------------------------------------------------------


_ABSENT = "(absent)"


def _shown_paths(paths: Sequence[Path | str], limit: int = 4) -> str:
    listed = [str(p) for p in paths]
    return ", ".join(listed[:limit]) + (f" and {len(listed) - limit} more" if len(listed) > limit else "")


def _setting_text(value: Any) -> str:
    text = _ABSENT if value is _ABSENT else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_variants(runs: list[RunRecord], warnings: list[str]) -> None:
    """Runs pooled under one variant name must be the same experiment, each seed once.

    A variant is identified by its resolved spec (spec.json) without :data:`SETTINGS_IGNORED`; runs of one name
    whose settings differ (1 vs 40 epochs) are refused, naming the dotted fields and the run directories of each
    group. The same (variant, seed) from two run directories (two sweeps with the same variant names, a copied
    run) is refused naming both: pooling would count one experiment twice. Runs without a readable spec.json
    cannot be checked (a warning says so).
    """
    by_name: dict[str, list[RunRecord]] = {}
    for r in runs:
        by_name.setdefault(r.variant, []).append(r)
    problems: list[str] = []
    for name, recs in by_name.items():
        known = [r for r in recs if r.settings is not None]
        if len(known) < len(recs):
            unchecked = [r.path for r in recs if r.settings is None]
            warnings.append(
                f"the settings of {len(unchecked)} run(s) of variant '{name}' could not be checked (no readable "
                f"{rundir.SPEC_JSON}): {_shown_paths(unchecked)}; they are assumed to be the same experiment"
            )
        keys = sorted({k for r in known for k in r.settings or {}})
        differing = [k for k in keys if len({_setting_text((r.settings or {}).get(k, _ABSENT)) for r in known}) > 1]
        if differing:
            groups: dict[str, list[Path]] = {}
            for r in known:
                shown = ", ".join(f"{k}={_setting_text((r.settings or {}).get(k, _ABSENT))}" for k in differing[:6])
                groups.setdefault(shown, []).append(r.path)
            listing = " vs ".join(f"{key} ({_shown_paths(paths)})" for key, paths in groups.items())
            more = f" (and {len(differing) - 6} more fields)" if len(differing) > 6 else ""
            problems.append(
                f"variant '{name}' holds runs with different settings: they differ in {', '.join(differing[:6])}"
                f"{more}: {listing}"
            )
            continue
        by_seed: dict[int, list[Path]] = {}
        for r in recs:
            if r.seed is not None:
                by_seed.setdefault(r.seed, []).append(r.path)
        for seed, paths in sorted(by_seed.items()):
            if len(paths) > 1:
                problems.append(
                    f"variant '{name}' seed {seed} comes from {len(paths)} run directories with the same settings: "
                    f"{_shown_paths(paths, 8)} (two sweeps with the same variant names, or a copied run)"
                )
    if problems:
        raise KdgeoError(
            "; ".join(problems) + ". Runs pooled under one variant name must be one experiment, each seed once: "
            "pass only one group's run directories (compare the groups separately), or give the runs different "
            "variant names (sweep.variants, or `variant` in the spec)."
        )


def _eval_text(field_name: str, value: Any, unrecorded: bool = False) -> str:
    """One field of an evaluation set, as the messages show it (None spelled out where it has a meaning)."""
    if unrecorded:
        return f"{field_name} not recorded"
    if field_name == "max_eval_samples" and value is None:
        return "max_eval_samples=None (the whole split)"
    if field_name == "eval_dataset" and value is None:
        return "eval_dataset=None (the dataset's eval_split)"
    if field_name == "eval_sha256" and isinstance(value, str):
        return f"eval_sha256={value[:12]}"
    return f"{field_name}={_show(value)}"


def check_tasks(
    runs: list[RunRecord], warnings: list[str], allow_different: bool = False, notes: list[str] | None = None
) -> TaskKey:
    """The runs' evaluation sets (:data:`EVAL_FIELDS`) must be the same; returns what they share.

    Exact comparison: an unset field is a value (max_eval_samples None = the whole split, which differs from
    100). Only fields a run does not record at all (``RunRecord.unrecorded``: no data table, no label_names, no
    eval_sha256 from before it was written) are left out, with a warning; eval_sha256 (the content of the
    evaluated examples) is compared where both runs record it. When they differ: KdgeoError listing each group
    of runs with its set, unless ``allow_different`` (--allow-different-data), which appends each group's set
    and runs to ``notes``. The key returned holds a field only where every run records the same value; the
    others are None, those that differ listed in ``differs`` (so a header never shows one run's set as all's).
    """
    notes = [] if notes is None else notes
    merged: dict[str, Any] = {}
    differing: list[str] = []
    for name in EVAL_FIELDS:
        recording = [r for r in runs if name not in r.unrecorded]
        known = {_show(getattr(r.task, name)) for r in recording}
        if len(known) > 1:
            differing.append(name)
        complete = len(recording) == len(runs) and len(known) == 1
        merged[name] = getattr(recording[0].task, name) if complete else None
        lacking = [r.path for r in runs if name in r.unrecorded]
        if lacking and name not in ("eval_sha256", "eval_examples"):
            warnings.append(
                f"{len(lacking)} of {len(runs)} runs do not record {name} ({_shown_paths(lacking, 2)}): it could not "
                "be compared for them"
            )
    lacking_hash = [r.path for r in runs if "eval_sha256" in r.unrecorded]
    if lacking_hash and len(runs) > 1:
        which = "the runs do" if len(lacking_hash) == len(runs) else f"{len(lacking_hash)} of {len(runs)} runs do"
        warnings.append(
            f"the content of the evaluated examples could not be checked: {which} not record data.eval_sha256 "
            f"(runs written before kdgeo recorded it, e.g. {_shown_paths(lacking_hash, 2)}); only the dataset, "
            "config, split, eval_dataset, max_eval_samples and label names were compared"
        )
    if differing:
        groups: dict[str, list[RunRecord]] = {}
        for r in runs:
            key = ", ".join(_eval_text(n, getattr(r.task, n), n in r.unrecorded) for n in differing)
            groups.setdefault(key, []).append(r)

        def members(recs: list[RunRecord], limit: int) -> str:
            names = sorted({r.variant for r in recs})
            return f"{len(recs)} run(s) of {', '.join(names)}: {_shown_paths([r.path for r in recs], limit)}"

        if not allow_different:
            listing = " | ".join(f"{key}: {members(recs, 4)}" for key, recs in groups.items())
            raise KdgeoError(
                f"these are runs of different tasks or evaluation sets (they differ in {', '.join(differing)}), so "
                f"their scores cannot be compared: {listing}. Compare runs of one evaluation set at a time (pass only "
                "their run directories), re-evaluate them on one set, or pass --allow-different-data to compare them "
                "anyway (each run's set is then listed)."
            )
        notes.append(
            f"evaluation sets differ (in {', '.join(differing)}), compared anyway (--allow-different-data): "
            "differences between variants may come from the data, not the method"
        )
        for key, recs in groups.items():
            notes.append(f"evaluation set {key}: {members(recs, len(recs))}")
    return TaskKey(**merged, differs=tuple(differing))


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def check_metrics(runs: list[RunRecord], metrics: list[str], defaulted_for: str | None = None) -> None:
    """Every run has every metric. ``defaulted_for``: the task whose default metric this is (none was given)."""
    problems = []
    for metric in metrics:
        lacking = [r for r in runs if r.value(metric) is None]
        if not lacking:
            continue
        available = sorted(set.intersection(*[r.metrics_available() for r in runs]))
        every = sorted(set.union(*[r.metrics_available() for r in runs]))
        near = difflib.get_close_matches(metric, every, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near and near[0] != metric else ""
        shown = ", ".join(str(r.path) for r in lacking[:5]) + (
            f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
        )
        chosen = f" (the default for {defaulted_for} runs)" if defaulted_for else ""
        problems.append(
            f"metric '{metric}'{hint}{chosen} is missing (or null) in {len(lacking)} of {len(runs)} runs: {shown}. "
            f"Metrics every run has: {', '.join(available) or 'none'}"
        )
    if problems:
        raise KdgeoError("; ".join(problems) + ". Pass one of those with --metric.")


def pick_baseline(variants: list[str], wanted: str | None) -> tuple[str, str | None]:
    """(the baseline variant, why it was picked when ``wanted`` is None: a note for the reader, else None)."""
    if wanted is None:
        for name in BASELINE_NAMES:
            if name in variants:
                return name, f"baseline: {name} (a variant named '{name}'; pass --baseline to choose)"
        if len(variants) == 1:
            return variants[0], None
        return variants[0], (
            f"baseline: {variants[0]} (the first variant in sorted order: none is named "
            f"{' or '.join(repr(n) for n in BASELINE_NAMES)}; pass --baseline to choose)"
        )
    if wanted in variants:
        return wanted, None
    folded = [v for v in variants if v.lower() == wanted.lower()]
    if len(folded) == 1:
        return folded[0], None
    near = difflib.get_close_matches(wanted, variants, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise KdgeoError(
        f"baseline variant '{wanted}' is not among the runs; their variants are: {', '.join(variants)}.{hint} Pass "
        "one of them with --baseline."
    )


# ---- pairing -----------------------------------------------------------------------------------


MIN_SHARED_SEEDS = 2
"""Fewest shared seeds for a paired test: one difference has no spread, so below this compare goes unpaired."""


class SeedPairing(NamedTuple):
    """How two variants' runs pair up on seeds (see :func:`pair_on_shared_seeds`)."""

    shared: list[int]
    """The seeds to pair on, sorted; empty when the comparison is unpaired."""
    left_out: tuple[list[int | None], list[int | None]]
    """Seeds of (a, b) left out of the pairing (None: a run with an unknown seed); both empty when unpaired
    (then every run is used)."""
    reason: str
    """Human text for the table and notes: "paired over 4 shared seeds; left out: seed 4 (a only)" or
    "unpaired: only 1 seed shared (0); ..."."""

    @property
    def paired(self) -> bool:
        return bool(self.shared)


def _seed_list(seeds: Sequence[int | None]) -> str:
    known = sorted(s for s in seeds if s is not None)
    unknown = sum(1 for s in seeds if s is None)
    parts = [", ".join(str(s) for s in known)] if known else []
    if unknown:
        parts.append(f"{unknown} run{'s' if unknown > 1 else ''} with an unknown seed")
    return "; ".join(parts)


def pair_on_shared_seeds(
    a_runs: Sequence[RunRecord], b_runs: Sequence[RunRecord], names: tuple[str, str] = ("a", "b")
) -> SeedPairing:
    """Pair two variants' runs on the seeds both ran, each exactly once.

    A seed is *shared* when it is known (not None) and occurs exactly once in each side. With at
    least :data:`MIN_SHARED_SEEDS` shared seeds the comparison is paired on them and every other
    run (a seed only one side ran, an unknown seed, a seed repeated within a side) is left out
    and named: a paired test on the shared seeds keeps the seed-to-seed variance out of the
    comparison (with 4 of 5 seeds shared, the paired t gives p = 0.0034 where Welch on all runs
    gives 0.61), which beats using the extra runs unpaired. With fewer shared seeds a paired test
    cannot be formed (one difference has no spread), so the result is unpaired on all runs and the
    reason says so. ``names`` label the two sides in the text.
    """
    a_seeds, b_seeds = [r.seed for r in a_runs], [r.seed for r in b_runs]
    once_a = {s for s in a_seeds if s is not None and a_seeds.count(s) == 1}
    once_b = {s for s in b_seeds if s is not None and b_seeds.count(s) == 1}
    shared = sorted(once_a & once_b)
    if len(shared) >= MIN_SHARED_SEEDS:
        left_a = [s for s in a_seeds if s not in shared]
        left_b = [s for s in b_seeds if s not in shared]
        sides = [f"{name} seed {_seed_list(left)}" for left, name in ((left_a, names[0]), (left_b, names[1])) if left]
        reason = f"paired over {len(shared)} seeds"  # every run paired: the wording tables and tests have always used
        if sides:
            reason = f"paired over {len(shared)} shared seeds; left out: " + ", ".join(sides)
        return SeedPairing(shared, (left_a, left_b), reason)
    if not shared:
        why = "no seed shared"
    else:
        why = f"only 1 seed shared ({shared[0]})"
    detail = f"{names[0]}: {_seed_list(a_seeds) or 'none'}; {names[1]}: {_seed_list(b_seeds) or 'none'}"
    return SeedPairing(
        [], ([], []), f"unpaired: {why} (a paired test needs {MIN_SHARED_SEEDS}; seeds {detail}); tests on all runs"
    )
