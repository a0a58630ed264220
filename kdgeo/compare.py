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

Runs are read through :func:`kdgeo.rundir.read_run`; the tables, JSON, CSV, Markdown and plot of
a result are drawn by :mod:`kdgeo.report_compare`. Usage (what the CLI does)::

    result = compare(CompareArgs(runs=["runs/sweep"], fail_if_worse=True))  # metric: by the runs' task
    report_compare.print_compare(result); report_compare.write_json(result, "-")
    raise SystemExit(result.exit_code)
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from kdgeo import files, locks, rundir, stats
from kdgeo.errors import KdgeoError
from kdgeo.kinds import higher_is_better  # the one table of metric directions (distances, perplexity: lower)

Test = Literal["t", "wilcoxon", "permutation"]
TESTS: tuple[str, ...] = ("t", "wilcoxon", "permutation")
SCORE_METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "mcc", "f1", "teacher_agreement", "rougeL", "perplexity")
GEOMETRY_METRICS: tuple[str, ...] = ("procrustes", "cka", "gram")
DEFAULT_METRICS: dict[str, str] = {"classification": "accuracy", "causal-lm": "rougeL"}
"""The metric compared when none is given, by the runs' task (a run that records none: classification)."""
BASELINE_NAMES: tuple[str, ...] = ("baseline", "ce")
"""Variant names taken as the baseline when none is given (in this order)."""
_PAIR_KEYS = ("student", "teacher")


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
        children = []
        try:
            subdirs = sorted(p for p in path.iterdir() if p.is_dir())
        except OSError:
            subdirs = []
        for child in subdirs:
            holder = locks.run_holder(child)
            if holder is not None:
                warnings.append(f"skipped {locks.still_running(child, holder)}")
            elif (child / rundir.SUMMARY).is_file():
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


def _task_key(run: rundir.RunDirectory) -> TaskKey:
    data = run.data
    labels = run.summary.label_names if run.summary is not None else None
    return TaskKey(
        task=run.task,
        dataset=data.dataset if data else None,
        config=data.config if data else None,
        eval_split=data.eval_split if data else None,
        eval_dataset=data.eval_dataset if data else None,
        max_eval_samples=data.max_eval_samples if data else None,
        label_names=tuple(labels) if labels is not None else None,
    )


def _record(run: rundir.RunDirectory) -> RunRecord:
    assert run.summary is not None  # load_runs reads finished runs only
    scores = {k: _number(v) for k, v in run.summary.scores.items()}
    curve: list[tuple[int, dict[str, float | None]]] = []
    geometry_curve: list[tuple[int, list[dict[str, Any]]]] = []
    for event in run.metrics():
        step = rundir.as_int(event.get("step"))
        if step is None:
            continue
        if event.get("event") == "eval" and isinstance(event.get("scores"), dict):
            curve.append((step, {str(k): _number(v) for k, v in event["scores"].items()}))
        elif event.get("event") == "monitor" and isinstance(event.get("pairs"), list):
            geometry_curve.append((step, [p for p in event["pairs"] if isinstance(p, dict)]))
    return RunRecord(
        run.path, run.variant, run.seed, _task_key(run), scores, run.summary.geometry, curve, geometry_curve
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
            warnings.append(
                f"{len(lacking)} run(s) do not record {name} (e.g. {lacking[0].path}); assumed to match the others"
            )
    if differing:
        groups: dict[str, list[str]] = {}
        for r in runs:
            key = "; ".join(f"{n}={_show(getattr(r.task, n))}" for n in differing)
            groups.setdefault(key, []).append(str(r.path))
        listing = " | ".join(f"{key}: {', '.join(paths)}" for key, paths in groups.items())
        raise KdgeoError(
            f"these are runs of different tasks (they differ in {', '.join(differing)}), so their scores cannot be "
            f"compared: {listing}. Compare runs of one task at a time: pass only the run directories of that task."
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
    raise KdgeoError(
        f"baseline variant '{wanted}' is not among the runs; their variants are: {', '.join(variants)}.{hint} Pass "
        "one of them with --baseline."
    )


# ---- comparing ---------------------------------------------------------------------------------


def _present(value: float | None, metric: str) -> float:
    """A run's value of ``metric`` where one is known to exist: the metric check refuses runs without it."""
    assert value is not None, f"a run has no {metric}; the metric check should have refused it"
    return value


def _versus(
    variant: str, baseline: str, rows: dict[str, list[RunRecord]], metric: str, test: str
) -> tuple[VersusBaseline, stats.TestResult]:
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
        seeds = sorted(s for s in by_a if s is not None)  # all of them: an unknown seed set `reason` above
        a = [float(_present(by_a[s], metric)) for s in seeds]
        b = [float(_present(by_b[s], metric)) for s in seeds]
        tests = (stats.paired_t(a, b), stats.wilcoxon(a, b), stats.permutation_paired(a, b))
        diff, lo, hi = stats.mean_difference_ci(a, b, paired=True)
        pairing, n = f"paired over {len(seeds)} seed{'s' if len(seeds) != 1 else ''}", len(seeds)
    else:
        a = [float(_present(r.value(metric), metric)) for r in a_runs]
        b = [float(_present(r.value(metric), metric)) for r in b_runs]
        tests = (stats.welch_t(a, b), stats.mann_whitney(a, b), stats.permutation_unpaired(a, b))
        diff, lo, hi = stats.mean_difference_ci(a, b, paired=False)
        pairing, n = reason, len(a) + len(b)
    chosen = tests[TESTS.index(test)]
    partial = VersusBaseline(
        variant, baseline, not reason, pairing, n, diff, lo, hi, *tests, chosen.p_value, math.nan, "n.s."
    )
    return partial, chosen


def _compare_metric(
    metric: str, by_variant: dict[str, list[RunRecord]], baseline: str, args: CompareArgs, runs: list[RunRecord]
) -> MetricComparison:
    hib = higher_is_better(metric)
    variant_stats = []
    for name, recs in by_variant.items():
        values = [float(_present(r.value(metric), metric)) for r in recs]
        variant_stats.append(
            VariantStats(name, values, [r.seed for r in recs], [str(r.path) for r in recs], stats.describe(values))
        )
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
            notes.append(
                f"{row.variant} vs {baseline}: {row.pairing}; used Welch t, Mann-Whitney U and a two-sample "
                "permutation test on all runs"
            )
    if others and len(others) > 1:
        notes.append(f"Holm-adjusted over {len(others)} comparisons with {baseline}")
    correlation = None
    if metric != "procrustes":
        measured = [(r.geometry_value("procrustes"), r.value(metric)) for r in runs]
        points = [(x, y) for x, y in measured if x is not None and y is not None]
        if len(points) >= 3:
            correlation = stats.spearman([x for x, _ in points], [y for _, y in points])
    return MetricComparison(metric, hib, variant_stats, versus, correlation, notes)


def _geometry_rows(by_variant: dict[str, list[RunRecord]], metric: str) -> list[GeometryRow]:
    rows = []
    for name, recs in by_variant.items():
        score_values = [r.value(metric) for r in recs]
        present = [v for v in score_values if v is not None]
        score = sum(present) / len(present) if present and len(present) == len(score_values) else None
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
                found = [_number(p.get(m)) for p in measured]
                xs = [x for x in found if x is not None]
                values[m] = sum(xs) / len(xs) if xs else None
            rows.append(GeometryRow(name, s, t, len(measured), values, score))
    return rows


def compare(args: CompareArgs) -> CompareResult:
    """Load the runs under ``args.runs`` and compare their variants (see the module docstring).

    Raises KdgeoError (exit 2) on bad input: no runs, a missing path, an unreadable summary,
    runs of different tasks, a metric some runs lack, an unknown baseline, a bad alpha or test.
    """
    if args.test not in TESTS:
        raise KdgeoError(
            f"test '{args.test}' is not one of {', '.join(TESTS)}; pass --test t, wilcoxon or permutation."
        )
    if not (isinstance(args.alpha, (int, float)) and 0 < args.alpha < 1):
        raise KdgeoError(f"alpha = {args.alpha} must be between 0 and 1 (exclusive), e.g. --alpha 0.05.")
    if args.metric is not None and not args.metrics:
        raise KdgeoError(
            f"no metric in --metric {args.metric!r}; pass one, e.g. --metric accuracy (or rougeL, perplexity, "
            "macro_f1, mcc, procrustes, cka, gram, ...), or leave --metric out for the task's default."
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
        notes.append(
            f"metric {chosen}: the default for {task.task or 'classification'} runs; choose others with --metric"
        )
    if len(variants) == 1:
        notes.append(f"only one variant ({baseline}): nothing to test against a baseline")
    if any(len(recs) == 1 for recs in by_variant.values()):
        single = [v for v, recs in by_variant.items() if len(recs) == 1]
        notes.append(f"one run only for {', '.join(single)}: no spread or confidence interval; run more seeds")
    worse = [(c.metric, v.variant) for c in comparisons for v in c.versus if v.verdict == "worse"]
    exit_code = 1 if args.fail_if_worse and worse else 0
    if args.fail_if_worse and worse:
        notes.append(
            "significantly worse than the baseline: " + ", ".join(f"{v} on {m}" for m, v in worse) + " (exit code 1)"
        )
    geometry = _geometry_rows(by_variant, metrics[0])
    return CompareResult(args, runs, task, ordered, baseline, comparisons, geometry, notes, warnings, exit_code, chosen)
