"""`kdgeo compare`: runs side by side, with spread, confidence intervals and significance.

Reads run directories (see :mod:`kdgeo.rundir`), groups runs by variant, and for each metric
asked for reports every variant's mean, sample std, 95% t interval and n, then tests every
other variant against a baseline variant:

* **paired** over seeds when both variants ran the same seeds (each seed once): paired t,
  Wilcoxon signed-rank and a sign-flip permutation test on the per-seed differences;
* **unpaired** when the seed sets differ (or a seed is unknown or repeated): Welch t,
  Mann-Whitney U and a two-sample permutation test on all runs. The table says so.

The metric defaults by task: ``accuracy`` for classification runs, ``rougeL`` for causal-lm runs
(summary.json's ``task``); the result says which it used and why (``CompareResult.default_metric``).

One test (``CompareArgs.test``) drives significance: its p-values across the non-baseline
variants are Holm-adjusted (family-wise error at ``alpha`` per metric), and a variant is
"significant (better|worse)" when the adjusted p < alpha, in the direction of its difference
(higher is better for task scores and CKA; lower for the Procrustes and Gram distances).
With ``fail_if_worse`` :attr:`CompareResult.exit_code` is 1 when any variant is significantly
worse, so CI can gate on it. The statistics live in :mod:`kdgeo.stats`.

Also reported: the final geometry of every layer pair per variant (mean over seeds) next to the
task score, and Spearman's rank correlation between each run's mean Procrustes distance and the
metric, so one sees whether geometry and accuracy move together.

Usage (what the CLI does)::

    result = compare(CompareArgs(runs=["runs/sweep"], fail_if_worse=True))  # metric: by the runs' task
    print_compare(result); write_json(result, "-"); plot(result, "compare.png")
    raise SystemExit(result.exit_code)
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

from kdgeo import files, rundir, stats
from kdgeo.errors import KdgeoError, OutputError
from kdgeo.rundir import json_safe

Test = Literal["t", "wilcoxon", "permutation"]
TESTS: tuple[str, ...] = ("t", "wilcoxon", "permutation")
SCORE_METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "mcc", "f1", "teacher_agreement", "rougeL", "perplexity")
GEOMETRY_METRICS: tuple[str, ...] = ("procrustes", "cka", "gram")
LOWER_IS_BETTER: frozenset[str] = frozenset({"procrustes", "procrustes_angular", "gram", "perplexity", "response_nll"})
"""Distances and perplexity: lower is better. Every other metric (task scores, CKA) is higher-is-better."""
DEFAULT_METRICS: dict[str, str] = {"classification": "accuracy", "causal-lm": "rougeL"}
"""The metric compared when none is given, by the runs' task (a run that records none: classification)."""
BASELINE_NAMES: tuple[str, ...] = ("baseline", "ce")
"""Variant names taken as the baseline when none is given (in this order)."""
_PAIR_KEYS = ("student", "teacher")


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def default_metric(task: str | None) -> str:
    """``DEFAULT_METRICS[task]``; ``accuracy`` for a task this version does not know, or none."""
    return DEFAULT_METRICS.get(task or "classification", DEFAULT_METRICS["classification"])


# ---- arguments and records ---------------------------------------------------------------------


@dataclass(frozen=True)
class CompareArgs:
    runs: list[str]
    """Run directories, or parents of run directories (one level: every child with summary.json)."""
    metric: str | None = None
    """A key of summary["scores"] (accuracy, macro_f1, mcc, f1, teacher_agreement; causal LMs:
    rougeL, perplexity, response_nll) or a geometry metric (procrustes, cka, gram: mean over the
    run's final layer pairs). Several: comma-separated. None: by the runs' task (DEFAULT_METRICS)."""
    baseline: str | None = None
    """Variant to compare against; default a variant named "baseline" or "ce", else the first in sorted order."""
    alpha: float = 0.05
    """Significance level for the Holm-adjusted p-values."""
    test: Test = "t"
    """Which p-value drives significance and Holm: t (paired t / Welch), wilcoxon (signed-rank /
    Mann-Whitney) or permutation. All three are reported."""
    fail_if_worse: bool = False
    """exit_code 1 when some variant is significantly worse than the baseline."""

    @property
    def metrics(self) -> list[str]:
        return [m.strip() for m in (self.metric or "").split(",") if m.strip()]


@dataclass(frozen=True)
class TaskKey:
    """What a run was evaluated on. Runs are comparable only when their keys agree."""

    task: str | None = None
    dataset: str | None = None
    config: str | None = None
    eval_split: str | None = None
    eval_dataset: str | None = None
    max_eval_samples: int | None = None
    label_names: tuple[str, ...] | None = None

    def fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def __str__(self) -> str:
        parts = [f"{k}={v if not isinstance(v, tuple) else list(v)}" for k, v in self.fields().items() if v is not None]
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

    def geometry_value(self, metric: str, pairs: list[dict[str, Any]] | None = None) -> float | None:
        """Mean of ``metric`` over layer pairs (the final ones by default); None if absent."""
        values = [_number(p.get(metric)) for p in (self.geometry if pairs is None else pairs)]
        if not values or any(v is None for v in values):
            return None
        return sum(values) / len(values)  # type: ignore[arg-type]

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
                v = _number(scores.get(metric))
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


# ---- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantStats:
    """A variant's values of one metric, one per run."""

    variant: str
    values: list[float]
    seeds: list[int | None]
    runs: list[str]
    summary: stats.Summary


@dataclass(frozen=True)
class VersusBaseline:
    """One variant against the baseline on one metric."""

    variant: str
    baseline: str
    paired: bool
    pairing: str
    """Human text: "paired over 5 seeds" or "unpaired: seeds differ"."""
    n: int
    """Pairs when paired, else runs in both variants together."""
    diff: float
    """mean(variant) - mean(baseline) (over the paired seeds when paired)."""
    diff_ci_low: float
    diff_ci_high: float
    t: stats.TestResult
    rank: stats.TestResult
    permutation: stats.TestResult
    p: float
    """Raw p-value of the chosen test."""
    p_holm: float
    verdict: Literal["better", "worse", "n.s."]

    @property
    def significant(self) -> bool:
        return self.verdict != "n.s."

    @property
    def label(self) -> str:
        return "n.s." if self.verdict == "n.s." else f"significant ({self.verdict})"


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    higher_is_better: bool
    variants: list[VariantStats]
    versus: list[VersusBaseline]
    correlation: stats.Correlation | None
    """Spearman rho between each run's mean Procrustes distance and this metric (None: not computed)."""
    notes: list[str]


@dataclass(frozen=True)
class GeometryRow:
    """Final geometry of one layer pair for one variant, mean over its runs."""

    variant: str
    student: Any
    teacher: Any
    n: int
    values: dict[str, float | None]
    """procrustes, cka, gram (None where the runs did not measure it)."""
    score: float | None
    """The variant's mean of the first requested metric, repeated on each of its rows."""


@dataclass(frozen=True)
class CompareResult:
    args: CompareArgs
    runs: list[RunRecord]
    task: TaskKey
    variants: list[str]
    baseline: str
    metrics: list[MetricComparison]
    geometry: list[GeometryRow]
    notes: list[str]
    """Things a reader of the tables must know (printed with the results)."""
    warnings: list[str]
    """Diagnostics (skipped directories, missing task fields): printed on stderr."""
    exit_code: int
    default_metric: str | None = None
    """The metric when the caller gave none (then ``args.metric`` holds it too); None when given."""


# ---- loading -----------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
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
        return f"a run directory without {rundir.SUMMARY} (holds {', '.join(sorted(names))}): the run has not finished or failed"
    subdirs = [e for e in entries if e.is_dir()]
    unfinished = [d.name for d in subdirs if (d / rundir.SPEC_JSON).exists() or (d / rundir.METRICS).exists()]
    if unfinished:
        return f"{len(subdirs)} subdirector{'y' if len(subdirs) == 1 else 'ies'}, none with {rundir.SUMMARY}; unfinished runs: {', '.join(unfinished)}"
    shown = ", ".join(e.name + ("/" if e.is_dir() else "") for e in entries[:8]) + (", ..." if len(entries) > 8 else "")
    return f"no {rundir.SUMMARY} in it or its subdirectories (holds {shown})"


def _find_run_dirs(paths: Sequence[str], warnings: list[str]) -> list[Path]:
    if not paths:
        raise KdgeoError("no run directories given; pass run directories (each holding summary.json) or a directory of runs, e.g. `kdgeo compare runs/my-sweep`.")
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
        if (path / rundir.SUMMARY).is_file():
            found.append(path)
            continue
        children = []
        try:
            subdirs = sorted(p for p in path.iterdir() if p.is_dir())
        except OSError:
            subdirs = []
        for child in subdirs:
            if (child / rundir.SUMMARY).is_file():
                children.append(child)
            elif (child / rundir.SPEC_JSON).exists() or (child / rundir.METRICS).exists():
                warnings.append(f"skipped {child}: no {rundir.SUMMARY} (the run has not finished or failed)")
        if children:
            found.extend(children)
        else:
            empty.append(f"{raw} ({_describe_dir(path)})")
    if missing:
        raise KdgeoError(
            f"{'these paths do' if len(missing) > 1 else 'this path does'} not exist: {', '.join(missing)}. "
            "Pass existing run directories (each holding summary.json) or a directory of runs."
        )
    if empty:
        raise KdgeoError(
            f"no runs found in {'; '.join(empty)}. A run directory holds {rundir.SUMMARY}, written by `kdgeo distill` "
            "when the run finishes; pass run directories or the directory that holds them (one level down), "
            "and leave out runs that have not finished."
        )
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def _read_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ValueError with the reason otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot be read ({files.describe_os_error(err, path)})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line, column = files.utf8_position(raw, err)
        raise ValueError(f"is not UTF-8 text at line {line}, column {column}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"holds a JSON {type(data).__name__}, not an object")
    return data


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _task_key(summary: dict[str, Any], spec: dict[str, Any]) -> TaskKey:
    data = summary.get("data") if isinstance(summary.get("data"), dict) else spec.get("data")
    data = data if isinstance(data, dict) else {}
    labels = summary.get("label_names")
    label_names = tuple(str(x) for x in labels) if isinstance(labels, list) else None

    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    return TaskKey(
        task=text(summary.get("task", spec.get("task"))),
        dataset=text(data.get("dataset")),
        config=text(data.get("config")),
        eval_split=text(data.get("eval_split")),
        eval_dataset=text(data.get("eval_dataset")),
        max_eval_samples=_as_int(data.get("max_eval_samples")),
        label_names=label_names,
    )


def _record(run: Path, summary: dict[str, Any], spec: dict[str, Any]) -> RunRecord:
    variant = summary.get("variant") or summary.get("name") or spec.get("variant") or spec.get("name") or run.name
    seed = _as_int(summary.get("seed", spec.get("seed")))
    raw_scores = summary.get("scores") if isinstance(summary.get("scores"), dict) else {}
    scores = {str(k): _number(v) for k, v in raw_scores.items()}
    geometry = [p for p in summary.get("geometry") or [] if isinstance(p, dict)]
    curve: list[tuple[int, dict[str, float | None]]] = []
    geometry_curve: list[tuple[int, list[dict[str, Any]]]] = []
    for event in rundir.read_jsonl(run / rundir.METRICS):
        if not isinstance(event, dict) or _as_int(event.get("step")) is None:
            continue
        step = int(event["step"])
        if event.get("event") == "eval" and isinstance(event.get("scores"), dict):
            curve.append((step, {str(k): _number(v) for k, v in event["scores"].items()}))
        elif event.get("event") == "monitor" and isinstance(event.get("pairs"), list):
            geometry_curve.append((step, [p for p in event["pairs"] if isinstance(p, dict)]))
    return RunRecord(run, str(variant), seed, _task_key(summary, spec), scores, geometry, curve, geometry_curve)


def load_runs(paths: Sequence[str], warnings: list[str] | None = None) -> list[RunRecord]:
    """Read every run under ``paths`` (run directories, or their parents one level up).

    Reads summary.json (required), spec.json (fallback for variant, seed, task and data) and
    metrics.jsonl (learning curves; a cut-short last line is ignored). Raises KdgeoError when a
    path does not exist, nothing is found, or a summary.json does not parse (naming every one).
    Diagnostics (skipped unfinished runs) are appended to ``warnings``.
    """
    warnings = [] if warnings is None else warnings
    run_dirs = _find_run_dirs(paths, warnings)
    records: list[RunRecord] = []
    bad: list[str] = []
    for run in run_dirs:
        try:
            summary = _read_object(run / rundir.SUMMARY)
        except ValueError as err:
            bad.append(f"{run / rundir.SUMMARY} {err}")
            continue
        spec: dict[str, Any] = {}
        if (run / rundir.SPEC_JSON).exists():
            try:
                spec = _read_object(run / rundir.SPEC_JSON)
            except ValueError as err:
                warnings.append(f"ignored {run / rundir.SPEC_JSON}: it {err}")
        records.append(_record(run, summary, spec))
    if bad:
        raise KdgeoError(
            f"cannot read {len(bad)} summary file{'s' if len(bad) > 1 else ''}: " + "; ".join(bad)
            + ". The run may have been cut short or the file edited by hand: re-run it, restore the file, or leave that run out."
        )
    records.sort(key=lambda r: (r.variant, r.seed is None, r.seed if r.seed is not None else 0, str(r.path)))
    return records


# ---- checks ------------------------------------------------------------------------------------


def _check_tasks(runs: list[RunRecord], warnings: list[str]) -> TaskKey:
    """Every field of the task key must agree among the runs that record it."""
    merged: dict[str, Any] = {}
    differing: list[str] = []
    for name in TaskKey.__dataclass_fields__:
        known = {getattr(r.task, name) for r in runs} - {None}
        if len(known) > 1:
            differing.append(name)
        merged[name] = next(iter(known)) if len(known) == 1 else None
        lacking = [r for r in runs if getattr(r.task, name) is None]
        if known and lacking and name not in ("config", "eval_dataset", "max_eval_samples"):
            warnings.append(f"{len(lacking)} run(s) do not record {name} (e.g. {lacking[0].path}); assumed to match the others")
    if differing:
        groups: dict[str, list[str]] = {}
        for r in runs:
            key = "; ".join(f"{n}={_show(getattr(r.task, n))}" for n in differing)
            groups.setdefault(key, []).append(str(r.path))
        listing = " | ".join(f"{key}: {', '.join(paths)}" for key, paths in groups.items())
        raise KdgeoError(
            f"these are runs of different tasks (they differ in {', '.join(differing)}), so their scores cannot be compared: "
            f"{listing}. Compare runs of one task at a time: pass only the run directories of that task."
        )
    return TaskKey(**merged)


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _check_metrics(runs: list[RunRecord], metrics: list[str], defaulted_for: str | None = None) -> None:
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
        shown = ", ".join(str(r.path) for r in lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        chosen = f" (the default for {defaulted_for} runs)" if defaulted_for else ""
        problems.append(
            f"metric '{metric}'{hint}{chosen} is missing (or null) in {len(lacking)} of {len(runs)} runs: {shown}. "
            f"Metrics every run has: {', '.join(available) or 'none'}"
        )
    if problems:
        raise KdgeoError("; ".join(problems) + ". Pass one of those with --metric.")


def _pick_baseline(variants: list[str], wanted: str | None) -> str:
    if wanted is None:
        for name in BASELINE_NAMES:
            if name in variants:
                return name
        return variants[0]
    if wanted in variants:
        return wanted
    folded = [v for v in variants if v.lower() == wanted.lower()]
    if len(folded) == 1:
        return folded[0]
    near = difflib.get_close_matches(wanted, variants, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise KdgeoError(f"baseline variant '{wanted}' is not among the runs; their variants are: {', '.join(variants)}.{hint} Pass one of them with --baseline.")


# ---- comparing ---------------------------------------------------------------------------------


def _versus(variant: str, baseline: str, rows: dict[str, list[RunRecord]], metric: str, test: str) -> tuple[VersusBaseline, stats.TestResult]:
    a_runs, b_runs = rows[variant], rows[baseline]
    a_seeds, b_seeds = [r.seed for r in a_runs], [r.seed for r in b_runs]
    reason = ""
    if None in a_seeds or None in b_seeds:
        reason = "unpaired: some seeds unknown"
    elif len(set(a_seeds)) != len(a_seeds) or len(set(b_seeds)) != len(b_seeds):
        reason = "unpaired: a seed repeats within a variant"
    elif set(a_seeds) != set(b_seeds):
        reason = "unpaired: seeds differ"
    if not reason:
        by_a = {r.seed: r.value(metric) for r in a_runs}
        by_b = {r.seed: r.value(metric) for r in b_runs}
        seeds = sorted(by_a)  # type: ignore[type-var]
        a = [float(by_a[s]) for s in seeds]  # type: ignore[arg-type]
        b = [float(by_b[s]) for s in seeds]  # type: ignore[arg-type]
        tests = (stats.paired_t(a, b), stats.wilcoxon(a, b), stats.permutation_paired(a, b))
        diff, lo, hi = stats.mean_difference_ci(a, b, paired=True)
        pairing, n = f"paired over {len(seeds)} seed{'s' if len(seeds) != 1 else ''}", len(seeds)
    else:
        a = [float(r.value(metric)) for r in a_runs]  # type: ignore[arg-type]
        b = [float(r.value(metric)) for r in b_runs]  # type: ignore[arg-type]
        tests = (stats.welch_t(a, b), stats.mann_whitney(a, b), stats.permutation_unpaired(a, b))
        diff, lo, hi = stats.mean_difference_ci(a, b, paired=False)
        pairing, n = reason, len(a) + len(b)
    chosen = tests[TESTS.index(test)]
    partial = VersusBaseline(variant, baseline, not reason, pairing, n, diff, lo, hi, *tests, chosen.p_value, math.nan, "n.s.")
    return partial, chosen


def _compare_metric(metric: str, by_variant: dict[str, list[RunRecord]], baseline: str, args: CompareArgs, runs: list[RunRecord]) -> MetricComparison:
    hib = higher_is_better(metric)
    variant_stats = []
    for name, recs in by_variant.items():
        values = [float(r.value(metric)) for r in recs]  # type: ignore[arg-type]
        variant_stats.append(VariantStats(name, values, [r.seed for r in recs], [str(r.path) for r in recs], stats.describe(values)))
    others = [v for v in by_variant if v != baseline]
    partial = [_versus(v, baseline, by_variant, metric, args.test) for v in others]
    adjusted = stats.holm([chosen.p_value for _, chosen in partial])
    versus = []
    notes: list[str] = []
    for (row, chosen), p_holm in zip(partial, adjusted):
        verdict: Literal["better", "worse", "n.s."] = "n.s."
        if p_holm < args.alpha and row.diff != 0:
            verdict = "better" if (row.diff > 0) == hib else "worse"
        versus.append(replace(row, p_holm=p_holm, verdict=verdict))
        if chosen.note:
            notes.append(f"{row.variant}: {chosen.method}: {chosen.note}")
        if not row.paired:
            notes.append(f"{row.variant} vs {baseline}: {row.pairing}; used Welch t, Mann-Whitney U and a two-sample permutation test on all runs")
    if others and len(others) > 1:
        notes.append(f"Holm-adjusted over {len(others)} comparisons with {baseline}")
    correlation = None
    if metric != "procrustes":
        points = [(r.geometry_value("procrustes"), r.value(metric)) for r in runs]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        if len(points) >= 3:
            correlation = stats.spearman([x for x, _ in points], [y for _, y in points])  # type: ignore[misc]
    return MetricComparison(metric, hib, variant_stats, versus, correlation, notes)


def _geometry_rows(by_variant: dict[str, list[RunRecord]], metric: str) -> list[GeometryRow]:
    rows = []
    for name, recs in by_variant.items():
        score_values = [r.value(metric) for r in recs]
        score = sum(score_values) / len(score_values) if score_values and None not in score_values else None  # type: ignore[arg-type]
        pairs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        order: list[tuple[Any, Any]] = []
        for r in recs:
            for p in r.geometry:
                key = (str(p.get("student")), str(p.get("teacher")))
                if key not in pairs:
                    pairs[key] = []
                    order.append((p.get("student"), p.get("teacher")))
                pairs[key].append(p)
        for s, t in order:
            measured = pairs[(str(s), str(t))]
            values: dict[str, float | None] = {}
            for m in GEOMETRY_METRICS:
                xs = [_number(p.get(m)) for p in measured]
                xs = [x for x in xs if x is not None]
                values[m] = sum(xs) / len(xs) if xs else None
            rows.append(GeometryRow(name, s, t, len(measured), values, score))
    return rows


def compare(args: CompareArgs) -> CompareResult:
    """Load the runs under ``args.runs`` and compare their variants (see the module docstring).

    Raises KdgeoError (exit 2) on bad input: no runs, a missing path, an unreadable summary,
    runs of different tasks, a metric some runs lack, an unknown baseline, a bad alpha or test.
    """
    if args.test not in TESTS:
        raise KdgeoError(f"test '{args.test}' is not one of {', '.join(TESTS)}; pass --test t, wilcoxon or permutation.")
    if not (isinstance(args.alpha, (int, float)) and 0 < args.alpha < 1):
        raise KdgeoError(f"alpha = {args.alpha} must be between 0 and 1 (exclusive), e.g. --alpha 0.05.")
    if args.metric is not None and not args.metrics:
        raise KdgeoError(
            f"no metric in --metric {args.metric!r}; pass one, e.g. --metric accuracy (or rougeL, perplexity, macro_f1, "
            "mcc, procrustes, cka, gram, ...), or leave --metric out for the task's default."
        )
    warnings: list[str] = []
    runs = load_runs(args.runs, warnings)
    task = _check_tasks(runs, warnings)
    chosen: str | None = None
    if args.metric is None:
        # By the task the runs record (they agree, or _check_tasks refused them).
        chosen = default_metric(task.task)
        args = replace(args, metric=chosen)
    metrics = args.metrics
    _check_metrics(runs, metrics, (task.task or "classification") if chosen else None)
    variants = sorted({r.variant for r in runs})
    baseline = _pick_baseline(variants, args.baseline)
    ordered = [baseline] + [v for v in variants if v != baseline]
    by_variant = {v: [r for r in runs if r.variant == v] for v in ordered}
    comparisons = [_compare_metric(m, by_variant, baseline, args, runs) for m in metrics]
    notes: list[str] = []
    if chosen is not None:
        notes.append(f"metric {chosen}: the default for {task.task or 'classification'} runs; choose others with --metric")
    if len(variants) == 1:
        notes.append(f"only one variant ({baseline}): nothing to test against a baseline")
    if any(len(recs) == 1 for recs in by_variant.values()):
        single = [v for v, recs in by_variant.items() if len(recs) == 1]
        notes.append(f"one run only for {', '.join(single)}: no spread or confidence interval; run more seeds")
    worse = [(c.metric, v.variant) for c in comparisons for v in c.versus if v.verdict == "worse"]
    exit_code = 1 if args.fail_if_worse and worse else 0
    if args.fail_if_worse and worse:
        notes.append("significantly worse than the baseline: " + ", ".join(f"{v} on {m}" for m, v in worse) + " (exit code 1)")
    geometry = _geometry_rows(by_variant, metrics[0])
    return CompareResult(args, runs, task, ordered, baseline, comparisons, geometry, notes, warnings, exit_code, chosen)


# ---- output ------------------------------------------------------------------------------------


def fmt_p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "-"
    return f"{p:.1e}" if 0 < p < 1e-4 else f"{p:.4f}"


def _f(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def _ci(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "-"
    return f"[{low:.4f}, {high:.4f}]"


def _signed(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:+.4f}"


TEST_NAMES = {
    "t": "t-test (paired t / Welch)",
    "wilcoxon": "rank test (Wilcoxon signed-rank / Mann-Whitney U)",
    "permutation": "permutation test (sign-flip / two-sample)",
}


def _rows(comparison: MetricComparison) -> list[dict[str, Any]]:
    """One flat row per variant (the CSV/markdown view)."""
    versus = {v.variant: v for v in comparison.versus}
    out = []
    for vs in comparison.variants:
        s = vs.summary
        row: dict[str, Any] = {
            "metric": comparison.metric, "variant": vs.variant, "n": s.n, "mean": s.mean, "std": s.std,
            "ci_low": s.ci_low, "ci_high": s.ci_high, "seeds": " ".join("?" if x is None else str(x) for x in vs.seeds),
        }
        v = versus.get(vs.variant)
        row.update({
            "role": "compared" if v else "baseline",
            "diff": v.diff if v else None, "diff_ci_low": v.diff_ci_low if v else None, "diff_ci_high": v.diff_ci_high if v else None,
            "pairing": v.pairing if v else "", "p_t": v.t.p_value if v else None, "p_rank": v.rank.p_value if v else None,
            "p_permutation": v.permutation.p_value if v else None, "p_holm": v.p_holm if v else None,
            "result": v.label if v else "",
        })
        out.append(row)
    return out


def print_compare(result: CompareResult) -> None:
    """The tables on stdout (report.out_console); warnings on stderr. Markup off for run text.

    Per metric: one table of per-variant statistics (with the difference to the baseline), one
    of the tests against the baseline; then the geometry table and the notes. Laid out to stay
    readable in 80 columns (text cells wrap, numbers never shrink to an ellipsis).
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from kdgeo import report

    for w in result.warnings:
        report.warn(w)
    con = report.out_console
    a = result.args

    def table(title: str, columns: list[tuple[str, int]]) -> Table:
        t = Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for k, (name, width) in enumerate(columns):
            numeric = width > 0
            t.add_column(Text(name), justify="right" if numeric and k else "left", no_wrap=numeric and k > 0,
                         min_width=abs(width) or None, overflow="fold")
        return t

    con.print(Text(f"{len(result.runs)} runs, {len(result.variants)} variant{'s' if len(result.variants) != 1 else ''}, "
                   f"baseline {result.baseline}; task: {result.task}"))
    for c in result.metrics:
        arrow = "higher is better" if c.higher_is_better else "lower is better"
        versus = {v.variant: v for v in c.versus}
        t1 = table(f"{c.metric} ({arrow}): mean over runs, 95% t interval; diff = variant - baseline",
                   [("variant", 0), ("n", 1), ("mean", 6), ("std", 6), ("95% CI", 16), ("diff", 7), ("diff 95% CI", 18)])
        for vs in c.variants:
            s = vs.summary
            v = versus.get(vs.variant)
            extra = ["baseline", ""] if v is None else [_signed(v.diff), _ci(v.diff_ci_low, v.diff_ci_high)]
            t1.add_row(Text(vs.variant, style="bold" if v is None else ""), str(s.n), _f(s.mean), _f(s.std), _ci(s.ci_low, s.ci_high), *extra)
        con.print(t1)
        if c.versus:
            t2 = table(
                f"{c.metric} vs {result.baseline}: p-values (paired: t, Wilcoxon signed-rank, sign-flip permutation; "
                f"unpaired: Welch t, Mann-Whitney U, two-sample permutation); significant = Holm-adjusted "
                f"{a.test} p < {a.alpha:g}",
                [("variant", 0), ("pairing", -8), ("t p", 7), ("rank p", 7), ("perm p", 7), ("Holm p", 7), ("result", -4)])
            for v in c.versus:
                style = {"better": "green", "worse": "red"}.get(v.verdict, "")
                t2.add_row(Text(v.variant), Text(v.pairing), fmt_p(v.t.p_value), fmt_p(v.rank.p_value), fmt_p(v.permutation.p_value),
                           fmt_p(v.p_holm), Text(v.label, style=style))
            con.print(t2)
        if c.correlation is not None:
            r = c.correlation
            line = f"Spearman rho(per-run mean procrustes, {c.metric}) = {_f(r.rho, 3)}, p = {fmt_p(r.p_value)}, n = {r.n} runs"
            con.print(Text(line + (f" ({r.note})" if r.note else "")))
        for note in c.notes:
            con.print(Text(f"note: {note}"))
    if result.geometry:
        metric = result.metrics[0].metric
        t3 = table(f"final geometry per layer pair (mean over runs) next to {metric}",
                   [("variant", 0), ("pair s->t", 9), ("runs", 4), ("procrustes", 10), ("cka", 6), ("gram", 6), (metric, max(6, len(metric)))])
        for g in result.geometry:
            t3.add_row(Text(g.variant), Text(f"{g.student}->{g.teacher}"), str(g.n), *[_f(g.values[m]) for m in GEOMETRY_METRICS], _f(g.score))
        con.print(t3)
        con.print(Text("procrustes and gram: distances (lower = closer to the teacher); cka: similarity (higher = closer)"))
    else:
        con.print(Text("no final geometry in these runs (no layer pairs were monitored)"))
    for note in result.notes:
        con.print(Text(f"note: {note}"))


def _test_json(t: stats.TestResult) -> dict[str, Any]:
    return {"method": t.method, "statistic": t.statistic, "p": t.p_value, "n": t.n, "note": t.note}


def to_json(result: CompareResult) -> dict[str, Any]:
    """Everything in the tables as plain JSON types (NaN and inf become null).

    ``default_metric``: the metric picked by the runs' task when none was given; null when given."""
    a = result.args
    metrics = []
    for c in result.metrics:
        versus = {v.variant: v for v in c.versus}
        variants = []
        for vs in c.variants:
            s = vs.summary
            entry: dict[str, Any] = {
                "variant": vs.variant, "baseline": vs.variant == result.baseline, "n": s.n, "mean": s.mean, "std": s.std,
                "ci95": [s.ci_low, s.ci_high], "values": vs.values, "seeds": vs.seeds, "runs": vs.runs, "vs_baseline": None,
            }
            v = versus.get(vs.variant)
            if v is not None:
                entry["vs_baseline"] = {
                    "paired": v.paired, "pairing": v.pairing, "n": v.n, "diff": v.diff, "diff_ci95": [v.diff_ci_low, v.diff_ci_high],
                    "t": _test_json(v.t), "rank": _test_json(v.rank), "permutation": _test_json(v.permutation),
                    "test": a.test, "p": v.p, "p_holm": v.p_holm, "significant": v.significant, "verdict": v.verdict,
                }
            variants.append(entry)
        corr = c.correlation
        metrics.append({
            "metric": c.metric, "higher_is_better": c.higher_is_better, "variants": variants,
            "spearman_procrustes": None if corr is None else {"rho": corr.rho, "p": corr.p_value, "n": corr.n, "note": corr.note},
            "notes": c.notes,
        })
    data = {
        "task": {k: (list(v) if isinstance(v, tuple) else v) for k, v in result.task.fields().items()},
        "runs": [{"path": str(r.path), "variant": r.variant, "seed": r.seed} for r in result.runs],
        "variants": result.variants, "baseline": result.baseline, "alpha": a.alpha, "test": a.test,
        "default_metric": result.default_metric,
        "fail_if_worse": a.fail_if_worse, "metrics": metrics,
        "geometry": [{"variant": g.variant, "student": g.student, "teacher": g.teacher, "runs": g.n, **g.values, "score": g.score}
                     for g in result.geometry],
        "notes": result.notes, "warnings": result.warnings, "exit_code": result.exit_code,
    }
    return json_safe(data)


def _write(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` ("-" = stdout), atomically."""
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    rundir.write_text_atomic(os.path.expanduser(str(path)), text)


def write_json(result: CompareResult, path: str | Path) -> None:
    """:func:`to_json` to ``path`` ("-" = stdout)."""
    _write(path, json.dumps(to_json(result), indent=2) + "\n")


CSV_COLUMNS = ("metric", "variant", "role", "n", "mean", "std", "ci_low", "ci_high", "diff", "diff_ci_low", "diff_ci_high",
               "pairing", "p_t", "p_rank", "p_permutation", "p_holm", "result", "seeds")


def write_csv(result: CompareResult, path: str | Path) -> None:
    """One row per (metric, variant) with the statistics columns (CSV_COLUMNS); "-" = stdout.

    Empty cells: not applicable (the baseline's diff) or undefined (std of one run)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for c in result.metrics:
        for row in _rows(c):
            writer.writerow({k: "" if json_safe(row[k]) is None else row[k] for k in CSV_COLUMNS})
    _write(path, buf.getvalue())


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_markdown(result: CompareResult, path: str | Path) -> None:
    """Markdown tables (one per metric, then geometry) and notes; "-" = stdout."""
    a = result.args
    lines = [f"# kdgeo compare: {len(result.runs)} runs, baseline `{_md(result.baseline)}`", "", f"Task: {_md(result.task)}", ""]
    for c in result.metrics:
        arrow = "higher is better" if c.higher_is_better else "lower is better"
        lines += [f"## {c.metric} ({arrow})", "",
                  f"Significance: {TEST_NAMES[a.test]}, Holm-adjusted, alpha {a.alpha:g}.", ""]
        header = ["variant", "n", "mean", "std", "95% CI", "diff", "diff 95% CI", "t p", "rank p", "perm p", "Holm p", "result", "pairing"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if h in ("variant", "result", "pairing") else "---:" for h in header) + "|")
        for row in _rows(c):
            is_base = row["role"] == "baseline"
            cells = [_md(row["variant"]), str(row["n"]), _f(row["mean"]), _f(row["std"]), _ci(row["ci_low"], row["ci_high"])]
            if is_base:
                cells += ["baseline", "", "", "", "", "", "", ""]
            else:
                cells += [_signed(row["diff"]), _ci(row["diff_ci_low"], row["diff_ci_high"]), fmt_p(row["p_t"]), fmt_p(row["p_rank"]),
                          fmt_p(row["p_permutation"]), fmt_p(row["p_holm"]), _md(row["result"]), _md(row["pairing"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if c.correlation is not None:
            r = c.correlation
            lines += [f"Spearman rho(per-run mean procrustes, {c.metric}) = {_f(r.rho, 3)}, p = {fmt_p(r.p_value)}, n = {r.n}" + (f" ({r.note})" if r.note else ""), ""]
        lines += [f"- {_md(n)}" for n in c.notes] + ([""] if c.notes else [])
    if result.geometry:
        metric = result.metrics[0].metric
        lines += ["## Final geometry per layer pair (mean over runs)", "",
                  f"| variant | student -> teacher | runs | procrustes (lower) | cka (higher) | gram (lower) | {metric} (mean) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for g in result.geometry:
            lines.append(f"| {_md(g.variant)} | {g.student} -> {g.teacher} | {g.n} | " + " | ".join(_f(g.values[m]) for m in GEOMETRY_METRICS) + f" | {_f(g.score)} |")
        lines.append("")
    if result.notes:
        lines += ["## Notes", ""] + [f"- {_md(n)}" for n in result.notes] + [""]
    _write(path, "\n".join(lines))


def plot(result: CompareResult, path: str | Path) -> None:
    """PNG: per metric, learning curves (mean over runs, min-max band) and final values per variant
    (one point per run, mean, 95% CI bar). Uses the Agg canvas directly (no global backend)."""
    from kdgeo.files import prepare_matplotlib

    prepare_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = len(result.metrics)
    fig = Figure(figsize=(12, 4.2 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(result.variants))]
    for (ax_curve, ax_final), c in zip(axes, result.metrics):
        any_curve = False
        for color, variant in zip(colors, result.variants):
            recs = [r for r in result.runs if r.variant == variant]
            by_step: dict[int, list[float]] = {}
            for r in recs:
                for step, v in r.curve_of(c.metric):
                    by_step.setdefault(step, []).append(v)
            if not by_step:
                continue
            any_curve = True
            steps = sorted(by_step)
            mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            ax_curve.plot(steps, mean, color=color, marker="o", ms=3, label=f"{variant} ({len(recs)} runs)")
            ax_curve.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], color=color, alpha=0.2)
        ax_curve.set_xlabel("step")
        ax_curve.set_ylabel(c.metric)
        ax_curve.set_title(f"{c.metric} during training (mean, min-max band)")
        if any_curve:
            ax_curve.legend(fontsize=8)
        else:
            ax_curve.text(0.5, 0.5, "no evaluations in metrics.jsonl", ha="center", va="center", transform=ax_curve.transAxes)
        versus = {v.variant: v for v in c.versus}
        for i, (color, vs) in enumerate(zip(colors, c.variants)):
            n = len(vs.values)
            xs = [i + (k - (n - 1) / 2) * (0.25 / max(n - 1, 1)) for k in range(n)]
            ax_final.scatter(xs, vs.values, color=color, s=18, alpha=0.7, zorder=2)
            s = vs.summary
            if math.isfinite(s.ci_low) and math.isfinite(s.ci_high):
                ax_final.errorbar([i], [s.mean], yerr=[[s.mean - s.ci_low], [s.ci_high - s.mean]], color="black", capsize=6, zorder=3)
            ax_final.scatter([i], [s.mean], color="black", marker="D", s=30, zorder=4)
            v = versus.get(vs.variant)
            if v is not None and v.significant:
                ax_final.annotate(v.verdict, (i + 0.2, s.mean), textcoords="offset points", xytext=(4, 0), fontsize=8, va="center",
                                  color="green" if v.verdict == "better" else "red")
        ax_final.set_xticks(range(len(c.variants)))
        ax_final.set_xticklabels([vs.variant + (" (baseline)" if vs.variant == result.baseline else "") for vs in c.variants],
                                 rotation=20, ha="right", fontsize=8)
        ax_final.set_ylabel(c.metric)
        ax_final.set_title(f"final {c.metric}: runs, mean, 95% CI")
    fig.tight_layout()
    try:
        if str(path) == "-":
            fig.savefig(sys.stdout.buffer, format="png", dpi=110)
        else:
            fig.savefig(os.path.expanduser(str(path)), format="png", dpi=110)
    except OSError as err:
        raise OutputError(f"cannot write the plot to {path}: {err.strerror or err}. Check the directory exists and is writable.") from None
