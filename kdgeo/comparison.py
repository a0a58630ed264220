"""`kdgeo compare`: runs side by side, with spread, confidence intervals and significance.

Reads run directories (see :mod:`kdgeo.rundir`), groups runs by variant, and for each metric
asked for reports every variant's mean, sample std, 95% t interval and n, then tests every
other variant against a baseline variant:

* **paired** over the seeds both variants ran (each once; :func:`pair_on_shared_seeds`), when at
  least 2 are shared: paired t, Wilcoxon signed-rank and a sign-flip permutation test on the
  per-seed differences; the seeds left out are named;
* **unpaired** when fewer than 2 seeds are shared: Welch t, Mann-Whitney U and a two-sample
  permutation test on all runs. The table and a note say so.

The metric defaults by task: ``accuracy`` for classification runs, ``rougeL`` for causal-lm runs
(summary.json's ``task``); the result says which it used and why (``CompareResult.default_metric``).

What the gate means
-------------------
* **The deciding test** is ``CompareArgs.test`` (``t`` by default: paired t, or Welch when
  unpaired), two-sided at ``alpha``. When it cannot reach ``alpha`` with these seeds (a rank or
  permutation test with 5 or fewer pairs, one run per variant, zero-variance differences: see
  :func:`kdgeo.stats.min_p`) and every run compared has per-example predictions, the per-example
  evidence decides instead (below); otherwise the comparison cannot fire and, with
  ``fail_if_worse``, a warning says so and how many seeds would do.
* **Direction** comes from the deciding test's own ``estimate`` (mean difference for t and
  permutation tests, Hodges-Lehmann shift for the rank tests, the accuracy difference for McNemar,
  the mean difference for the bootstrap), never from a statistic the test did not look at; the
  metric's direction from :data:`kdgeo.kinds.METRIC_HIGHER_IS_BETTER`, or for a metric it does not
  list from ``higher_is_better`` / ``lower_is_better`` (required with ``fail_if_worse``).
* **Family**: Holm (1979) over the variants compared with the baseline, per metric; with
  ``fail_if_worse`` and several metrics over every (variant, metric) pair, since each can fail the
  build. "significant (worse)" = Holm-adjusted p < alpha with a worse estimate.
* **Margin** (``margin``, non-inferiority): the gate fails a variant only when it is worse by more
  than X: the deciding test is run on the variant's values moved X towards better, and fails the
  gate when that is still significantly worse after Holm (with the t-test: the upper end of the
  two-sided (1 - alpha_adj) t interval of the difference, in the better direction, is below -X;
  ``margin 0`` is the plain gate). The verdict column keeps the plain test.
* **Exit code**: 1 when ``fail_if_worse`` and some comparison fails the gate; the reason is
  :attr:`CompareResult.verdict`.

Evidence beyond seeds
---------------------
When every run compared has ``predictions.jsonl`` on the same examples (same text_sha256 sequence)
and its per-example values reproduce the run's score (accuracy = mean(correct); ROUGE-L = mean of
the per-example ROUGE-L), compare reports a paired bootstrap over examples (hierarchical over the
paired seeds when there are several) and, for two single-seed classifiers, McNemar's exact test.
They decide only when the seed-level test cannot: McNemar for two single-seed classifiers (the
bootstrap when a margin is set: McNemar has no margin form), else the bootstrap. With one run per
variant that answers for evaluation-set noise only, not for seed-to-seed variation, and the notes
say so. Other metrics (macro F1, MCC, perplexity: not means over examples) get no such evidence.

Effect sizes: the difference's interval is at 1 - alpha/m (Bonferroni over the m comparisons of
the Holm family), from the evidence that decides, so it excludes 0 only when the verdict is
significant; also the plain 95% t interval, the Hodges-Lehmann shift and the probability of
improvement (share of seed pairs won). Geometry vs score: Spearman's rho between the variant means
of the mean Procrustes distance and the metric (between variants) and between the runs'
deviations from their variant's means (within variants), instead of pooling runs as independent.
Also reported: the final geometry of every layer pair per variant (mean over seeds) next to the
score.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from kdgeo import files, locks, rundir, stats
from kdgeo.errors import KdgeoError
from kdgeo.kinds import METRIC_HIGHER_IS_BETTER, higher_is_better  # the one table of metric directions
from kdgeo.spec import RESUME_SAFE_FIELDS

Test = Literal["t", "wilcoxon", "permutation"]
TESTS: tuple[str, ...] = ("t", "wilcoxon", "permutation")
SCORE_METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "mcc", "f1", "teacher_agreement", "rougeL", "perplexity")
GEOMETRY_METRICS: tuple[str, ...] = ("procrustes", "cka", "gram")
DEFAULT_METRICS: dict[str, str] = {"classification": "accuracy", "causal-lm": "rougeL"}
"""The metric compared when none is given, by the runs' task (a run that records none: classification)."""
BASELINE_NAMES: tuple[str, ...] = ("baseline", "ce")
"""Variant names taken as the baseline when none is given (in this order)."""
_PAIR_KEYS = ("student", "teacher")
EVAL_FIELDS: tuple[str, ...] = (
    "task", "dataset", "config", "eval_split", "eval_dataset", "max_eval_samples", "label_names", "eval_examples",
    "eval_sha256",
)  # fmt: skip
"""What defines a run's evaluation set; runs are compared only when these agree (see :func:`_check_tasks`)."""
SETTINGS_IGNORED: tuple[str, ...] = ("name", "variant", "seed", "sweep", *RESUME_SAFE_FIELDS)
"""spec.json fields (dotted; a field covers its sub-fields) left out of a variant's identity: its labels (name,
variant), the seed (what varies within a variant), the sweep table (the list of variants and seeds), and the fields a
resumed run may change because they affect what is logged, kept or where, not the numbers
(:data:`kdgeo.spec.RESUME_SAFE_FIELDS`: description, monitor.every, monitor.metrics, train.log_every,
train.eval_every, train.checkpoint_every, train.keep_checkpoints, train.on_nonfinite, train.loader_workers,
train.timeout_minutes, output.*). Everything else (epochs, lr, losses, teacher, data, precision, device, ...) must
agree among the runs of one variant."""
MAX_SEARCH_DEPTH = 4
"""How many directory levels below a RUN argument are searched for run directories (a sweep of sweeps is 2)."""


def default_metric(task: str | None) -> str:
    """``DEFAULT_METRICS[task]``; ``accuracy`` for a task this version does not know, or none."""
    return DEFAULT_METRICS.get(task or "classification", DEFAULT_METRICS["classification"])


# ---- arguments and records ---------------------------------------------------------------------


@dataclass(frozen=True)
class CompareArgs:
    runs: list[str]
    """Run directories, or directories holding them: searched down to ``MAX_SEARCH_DEPTH`` levels for directories
    with summary.json (nested sweeps included; a run directory is not searched further; symlinks followed once)."""
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
    """exit_code 1 when some variant is significantly worse than the baseline (see "What the gate means" in the
    module docstring); with several metrics the Holm family is then every (variant, metric) pair."""
    margin: tuple[str, ...] = ()
    """Non-inferiority margins in metric units: "X" (every metric) or "metric=X" (one metric; wins over a bare X).
    With a margin a variant fails the gate only when it is worse by more than X with confidence."""
    higher_is_better: tuple[str, ...] = ()
    """Metrics kdgeo.kinds does not know, declared higher-is-better (needed for them with fail_if_worse)."""
    lower_is_better: tuple[str, ...] = ()
    """Metrics kdgeo.kinds does not know, declared lower-is-better (needed for them with fail_if_worse)."""
    allow_different_data: bool = False
    """Compare runs evaluated on different evaluation sets (see :data:`EVAL_FIELDS`) instead of refusing; each
    run's set is then listed in the notes."""

    @property
    def metrics(self) -> list[str]:
        """``metric`` split at commas, each once, in the order given (--metric a --metric b arrives as "a,b")."""
        return list(dict.fromkeys(m.strip() for m in (self.metric or "").split(",") if m.strip()))


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
class ExampleEvidence:
    """Per-example evidence from predictions.jsonl (module docstring, "Evidence beyond seeds")."""

    examples: int
    """Evaluation examples per run (the same text_sha256 sequence in every run used)."""
    seeds: int
    """Runs per variant paired example by example (1: a single-seed comparison, evaluation noise only)."""
    bootstrap: stats.BootstrapResult
    """Paired bootstrap over examples (hierarchical over the paired seeds when ``seeds`` > 1), its interval at the
    comparison's adjusted confidence (:attr:`VersusBaseline.diff_ci_confidence`)."""
    mcnemar: stats.TestResult | None
    """McNemar's exact test for two single-seed classifiers on accuracy; None otherwise."""


@dataclass(frozen=True)
class VersusBaseline:
    """One variant against the baseline on one metric."""

    variant: str
    baseline: str
    paired: bool
    pairing: str
    """Human text: "paired over 5 shared seeds" or "unpaired: no seed shared (...)" (:func:`pair_on_shared_seeds`)."""
    n: int
    """Pairs when paired, else runs in both variants together."""
    diff: float
    """mean(variant) - mean(baseline) (over the paired seeds when paired)."""
    diff_ci_low: float
    """The interval for ``diff`` consistent with the verdict: at ``diff_ci_confidence`` = 1 - alpha/m (Bonferroni
    over the m comparisons of the Holm family), from the evidence that decides (t interval over seeds, or the
    bootstrap's percentile interval over examples). It excludes 0 only when the verdict is significant."""
    diff_ci_high: float
    t: stats.TestResult
    rank: stats.TestResult
    permutation: stats.TestResult
    p: float
    """Raw p-value of the deciding test (``test``)."""
    p_holm: float
    verdict: Literal["better", "worse", "n.s."]
    test: str = "t"
    """The deciding test: t, wilcoxon, permutation (over seeds), mcnemar or bootstrap (over examples)."""
    evidence: Literal["seeds", "examples"] = "seeds"
    estimate: float = math.nan
    """The deciding test's signed effect (variant - baseline) whose sign gives the direction: mean difference (t,
    permutation, bootstrap, McNemar's accuracy difference), Hodges-Lehmann shift (wilcoxon)."""
    seeds: tuple[int, ...] = ()
    """The shared seeds paired on (empty when unpaired)."""
    left_out: tuple[tuple[int | None, ...], tuple[int | None, ...]] = ((), ())
    """Seeds of (variant, baseline) left out of the pairing."""
    diff_ci_confidence: float = 0.95
    diff_ci_method: str = ""
    diff_ci95: tuple[float, float] = (math.nan, math.nan)
    """The plain 95% t interval of ``diff`` over seeds (paired or Welch), not adjusted for multiplicity."""
    hodges_lehmann: float = math.nan
    """Hodges-Lehmann shift over seeds: median of Walsh averages of the paired differences (unpaired: median of
    all variant - baseline differences)."""
    prob_improvement: float = math.nan
    """Share of paired seeds (unpaired: of all run pairs) where the variant beats the baseline; ties count 1/2."""
    min_p: float = 0.0
    """Smallest p the deciding test can give with these sample sizes."""
    can_reach_alpha: bool = True
    runs_needed: int | None = None
    """Seeds (pairs; unpaired: runs per variant) at which the seed-level test could reach alpha; None: never."""
    gate_note: str = ""
    """Why this comparison cannot fire, or which evidence decides instead ('' when the seeds decide normally)."""
    examples: ExampleEvidence | None = None
    examples_note: str = ""
    """Why there is no per-example evidence, or what it covers."""
    margin: float | None = None
    """The non-inferiority margin for this metric (metric units), None without one."""
    margin_p: float = math.nan
    """Raw p of the deciding test on the margin-shifted values (variant moved by the margin in its better
    direction): small with a worse estimate = worse by more than the margin."""
    margin_estimate: float = math.nan
    gate_p_holm: float = math.nan
    """Holm-adjusted p the gate uses (of ``margin_p`` with a margin, else of ``p``) over the gate's family."""
    fails_gate: bool = False
    """Worse than the baseline (by more than the margin) at the Holm-adjusted level: --fail-if-worse exits 1."""

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
    """Spearman rho between each run's mean Procrustes distance and this metric, runs pooled as if independent
    (kept for the JSON's ``spearman_procrustes``; its p-value overstates the evidence: see the next two)."""
    notes: list[str]
    correlation_between: stats.Correlation | None = None
    """Spearman rho of the variant means (mean procrustes, mean metric) across variants: do variants that end
    closer to the teacher score better? n = variants."""
    correlation_within: stats.Correlation | None = None
    """Spearman rho of the runs' deviations from their variant's means, pooled: within a variant, do seeds that end
    closer to the teacher score better?"""
    direction: str = "kdgeo.kinds"
    """Where ``higher_is_better`` comes from: kdgeo.kinds, --higher-is-better or --lower-is-better."""
    margin: float | None = None


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
    family: str = "variants"
    """The Holm family: "variants" (per metric) or "variants x metrics" (fail_if_worse with several metrics)."""
    verdict: str = ""
    """One line: whether the gate passes and why (printed on stderr; the reason for exit code 1)."""


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


_ABSENT = "(absent)"


def _shown_paths(paths: Sequence[Path | str], limit: int = 4) -> str:
    listed = [str(p) for p in paths]
    return ", ".join(listed[:limit]) + (f" and {len(listed) - limit} more" if len(listed) > limit else "")


def _setting_text(value: Any) -> str:
    text = _ABSENT if value is _ABSENT else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_variants(runs: list[RunRecord], warnings: list[str]) -> None:
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


def _check_tasks(
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


def _pick_baseline(variants: list[str], wanted: str | None) -> tuple[str, str | None]:
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


# ---- comparing ---------------------------------------------------------------------------------


def _present(value: float | None, metric: str) -> float:
    """A run's value of ``metric`` where one is known to exist: the metric check refuses runs without it."""
    assert value is not None, f"a run has no {metric}; the metric check should have refused it"
    return value


PER_EXAMPLE_FIELDS: dict[tuple[str, str], str] = {
    ("classification", "accuracy"): "correct",
    ("causal-lm", "rougeL"): "rougeL",
}
"""(task, metric) -> the predictions.jsonl field whose mean over a run's examples is that run's score. Other metrics
(macro F1, MCC, perplexity: not means of per-example values) get no per-example evidence."""

BOOTSTRAP_RESAMPLES = 9_999
"""Resamples of the paired bootstrap over examples (seeded: the same runs give the same numbers)."""

_SeedTest = Callable[[Sequence[float], Sequence[float]], stats.TestResult]
_Predictions = dict[Path, list[dict[str, Any]] | None]


def _seed_tests(paired: bool) -> tuple[_SeedTest, _SeedTest, _SeedTest]:
    """(t, rank, permutation): paired over the shared seeds, or two-sample on all runs."""
    if paired:
        return stats.paired_t, stats.wilcoxon, stats.permutation_paired
    return stats.welch_t, stats.mann_whitney, stats.permutation_unpaired


def _seed_min_p(test: str, paired: bool, n_a: int, n_b: int) -> float:
    """Smallest p the seed-level ``test`` can give with these sizes; 1.0 where it gives none at all (a t-test
    with fewer than 2 runs on a side: no spread to estimate)."""
    if test == "t" and min(n_a, n_b) < 2:
        return 1.0
    return stats.min_p(test, paired, n_a, n_b)


def _estimate(result: stats.TestResult, fallback: float) -> float:
    """The test's own signed effect (its ``estimate``); ``fallback`` where the test has none."""
    return result.estimate if math.isfinite(result.estimate) else fallback


def _example_values(run: RunRecord, metric: str, cache: _Predictions) -> tuple[tuple[str, ...], list[float]] | str:
    """The run's per-example values of ``metric`` (in summary.json's units) and their text hashes, in evaluation
    order; or why there are none. The mean of the values must equal the run's score: ROUGE-L is stored per
    example as an F-measure in [0, 1] or x100, and summary.json holds it x100, so the scale that reproduces the
    score is used; a mean that matches neither means the file belongs to another evaluation and is not used."""
    name = PER_EXAMPLE_FIELDS.get((run.task.task or "classification", metric))
    if name is None:
        return f"no per-example values of {metric} (predictions.jsonl gives accuracy and ROUGE-L only)"
    if run.path not in cache:
        cache[run.path] = rundir.read_predictions(run.path)
    records = cache[run.path]
    if records is None:
        return f"{run.path} has no {rundir.PREDICTIONS} (a run from before it was written, or one copied without it)"
    hashes: list[str] = []
    values: list[float] = []
    for rec in records:
        raw = rec.get(name)
        value = float(raw) if isinstance(raw, bool) else _number(raw)
        sha = rec.get("text_sha256")
        if value is None:
            continue  # e.g. an example that was not generated for ROUGE-L
        if not isinstance(sha, str):
            return f"{run.path / rundir.PREDICTIONS} has a record without text_sha256"
        hashes.append(sha)
        values.append(value)
    score = run.value(metric)
    if not values or score is None:
        return f"{run.path / rundir.PREDICTIONS} has no {name} values"
    mean = math.fsum(values) / len(values)
    for scale in (1.0, 100.0):
        if math.isclose(mean * scale, score, rel_tol=1e-6, abs_tol=1e-9 * scale):
            return tuple(hashes), [v * scale for v in values]
    return (
        f"the mean of {name} in {run.path / rundir.PREDICTIONS} ({mean:.6g}) does not give summary.json's {metric} "
        f"({score:.6g}): the file is from another evaluation"
    )


def _example_evidence(
    a_used: list[RunRecord], b_used: list[RunRecord], metric: str, paired: bool, cache: _Predictions
) -> tuple[list[list[float]], list[list[float]]] | str:
    """Per-example values of the runs compared, a[i] and b[i] of the i-th paired seed on the same examples; or why
    there are none. Needs predictions.jsonl in every run used, on the same text_sha256 sequence, and runs that
    pair: paired seeds, or one run per variant."""
    if not paired and (len(a_used) != 1 or len(b_used) != 1):
        return "per-example evidence needs runs paired on seeds, or one run per variant"
    got: list[tuple[tuple[str, ...], list[float]]] = []
    for run in [*a_used, *b_used]:
        found = _example_values(run, metric, cache)
        if isinstance(found, str):
            return found
        got.append(found)
    if len({hashes for hashes, _ in got}) > 1:
        return (
            f"the runs' {rundir.PREDICTIONS} cover different examples (their text_sha256 sequences differ), so they "
            "cannot be paired example by example"
        )
    k = len(a_used)
    return [values for _, values in got[:k]], [values for _, values in got[k:]]


def _cannot_reach(
    test: str, paired: bool, n_a: int, n_b: int, min_p: float, alpha: float, needed: int | None, why: str = ""
) -> str:
    """Why a test cannot fire: "with 3 seeds the wilcoxon test cannot reach alpha=0.05 (smallest p 0.25); it needs
    6 seeds". ``needed``: :func:`kdgeo.stats.runs_needed`; ``why``: what limits the data further, if anything."""
    if paired:
        size, unit = f"{n_a} seed{'s' if n_a != 1 else ''}", "seeds"
    elif n_a == n_b == 1:
        size, unit = "1 seed per variant", "seeds per variant"
    else:
        size, unit = f"{n_a} and {n_b} runs (unpaired)", "runs per variant"
    need = f"it needs {needed} {unit}" if needed is not None else "no number of runs is enough at this alpha"
    if test == "t" and min_p >= 1.0:
        return f"with {size} the t test gives no p-value (no spread to estimate); {need}"
    return f"with {size} the {test} test cannot reach alpha={alpha:g} (smallest p {min_p:.3g}{why}); {need}"


def _versus(
    variant: str,
    baseline: str,
    rows: dict[str, list[RunRecord]],
    metric: str,
    args: CompareArgs,
    hib: bool,
    family: int,
    margin: float | None,
    cache: _Predictions,
) -> VersusBaseline:
    """One variant against the baseline: the three seed-level tests, effect sizes, per-example evidence, and which
    evidence decides (module docstring, "What the gate means"). ``family``: comparisons in the Holm family (the
    intervals are at 1 - alpha/family). ``p_holm``, ``verdict`` and the gate are set by :func:`_decide`."""
    a_runs, b_runs = rows[variant], rows[baseline]
    pairing = pair_on_shared_seeds(a_runs, b_runs, (variant, baseline))
    paired = pairing.paired
    if paired:
        a_by = {r.seed: r for r in a_runs if r.seed in pairing.shared}  # shared seeds occur once on each side
        b_by = {r.seed: r for r in b_runs if r.seed in pairing.shared}
        a_used, b_used = [a_by[s] for s in pairing.shared], [b_by[s] for s in pairing.shared]
    else:
        a_used, b_used = list(a_runs), list(b_runs)
    a = [float(_present(r.value(metric), metric)) for r in a_used]
    b = [float(_present(r.value(metric), metric)) for r in b_used]
    confidence = 1 - args.alpha / max(family, 1)
    test_fns = _seed_tests(paired)
    t_res, rank_res, perm_res = (fn(a, b) for fn in test_fns)
    seed_test = (t_res, rank_res, perm_res)[TESTS.index(args.test)]
    diff, low95, high95 = stats.mean_difference_ci(a, b, paired=paired)
    _, low, high = stats.mean_difference_ci(a, b, paired=paired, confidence=confidence)
    shift_hl = stats.hodges_lehmann_paired(a, b) if paired else stats.hodges_lehmann(a, b)
    improvement = stats.prob_improvement(a, b, paired, hib)
    seed_min_p = _seed_min_p(args.test, paired, len(a), len(b))
    if math.isfinite(seed_test.min_p) and seed_test.min_p > seed_min_p:
        # the data limit the test further: zero differences dropped by Wilcoxon, or zero-variance differences that
        # turn the t-test into the exact sign-flip test (whose n then decides what can be reached)
        seed_min_p = seed_test.min_p
    sign_flip = args.test == "t" and paired and 0 < seed_test.min_p < 1
    why = ": zero-variance differences, so the exact sign-flip test decides" if sign_flip else ""
    needed = stats.runs_needed("permutation" if sign_flip else args.test, paired or len(a) == len(b) == 1, args.alpha)

    found = _example_evidence(a_used, b_used, metric, paired, cache)
    examples: ExampleEvidence | None = None
    examples_note = ""
    if isinstance(found, str):
        examples_note = found
    else:
        a_ex, b_ex = found
        boot = stats.paired_bootstrap(a_ex, b_ex, resamples=BOOTSTRAP_RESAMPLES, seed=0, confidence=confidence)
        mcnemar = None
        if len(a_ex) == 1 and metric == "accuracy":  # per-example "correct": two single-seed classifiers
            mcnemar = stats.mcnemar_exact([v > 0.5 for v in a_ex[0]], [v > 0.5 for v in b_ex[0]])
        examples = ExampleEvidence(len(a_ex[0]), len(a_ex), boot, mcnemar)
        scope = (
            "evaluation noise only (one run per variant), not seed-to-seed variation"
            if len(a_ex) == 1
            else f"hierarchical over {len(a_ex)} paired seeds and the examples (seed-to-seed variation estimated "
            f"from {len(a_ex)} seeds only)"
        )
        examples_note = f"per-example evidence over {len(a_ex[0])} examples covers {scope}"

    gate_note = ""
    test: str
    evidence: Literal["seeds", "examples"]
    if seed_min_p < args.alpha or examples is None:
        test, evidence, p, estimate = args.test, "seeds", seed_test.p_value, _estimate(seed_test, diff)
        min_p, can_reach = seed_min_p, seed_min_p < args.alpha
        ci_method = f"{'paired' if paired else 'Welch'} t interval over seeds"
        if not can_reach:
            gate_note = _cannot_reach(args.test, paired, len(a), len(b), seed_min_p, args.alpha, needed, why)
            gate_note += f"; no per-example evidence: {examples_note}"
    else:
        boot = examples.bootstrap
        if examples.mcnemar is not None and margin is None:
            # McNemar's exact test is the textbook test for two classifiers on one test set (Dietterich 1998);
            # it has no margin form, so with a margin the bootstrap decides.
            test, p = "mcnemar", examples.mcnemar.p_value
            estimate, min_p = _estimate(examples.mcnemar, boot.diff), examples.mcnemar.min_p
        else:
            test, p, estimate, min_p = "bootstrap", boot.p_value, boot.diff, 2 / (BOOTSTRAP_RESAMPLES + 1)
        evidence, can_reach = "examples", min_p < args.alpha
        low, high = boot.ci_low, boot.ci_high
        ci_method = "percentile interval of the paired bootstrap over examples" + (
            " and seeds" if examples.seeds > 1 else ""
        )
        gate_note = (
            _cannot_reach(args.test, paired, len(a), len(b), seed_min_p, args.alpha, needed, why)
            + f"; {test} over the {examples.examples} examples' predictions decides instead ({examples_note})"
        )

    margin_p = margin_estimate = math.nan
    if margin is not None:
        # Worse by more than the margin <=> the variant moved by the margin towards better is still worse: the
        # deciding test on the shifted values, its direction from its own estimate (non-inferiority by test
        # inversion; with the t-test exactly "the t bound on the difference is beyond -margin").
        shift = margin if hib else -margin
        if evidence == "seeds":
            shifted = test_fns[TESTS.index(args.test)]([x + shift for x in a], b)
            margin_p, margin_estimate = shifted.p_value, _estimate(shifted, diff + shift)
        else:
            assert not isinstance(found, str)
            moved = stats.paired_bootstrap(
                [[x + shift for x in row] for row in found[0]],
                found[1],
                resamples=BOOTSTRAP_RESAMPLES,
                seed=0,
                confidence=confidence,
            )
            margin_p, margin_estimate = moved.p_value, moved.diff

    n = len(a) if paired else len(a) + len(b)
    return VersusBaseline(
        variant,
        baseline,
        paired,
        pairing.reason,
        n,
        diff,
        low,
        high,
        t_res,
        rank_res,
        perm_res,
        p,
        math.nan,
        "n.s.",
        test=test,
        evidence=evidence,
        estimate=estimate,
        seeds=tuple(pairing.shared),
        left_out=(tuple(pairing.left_out[0]), tuple(pairing.left_out[1])),
        diff_ci_confidence=confidence,
        diff_ci_method=ci_method,
        diff_ci95=(low95, high95),
        hodges_lehmann=shift_hl,
        prob_improvement=improvement,
        min_p=min_p,
        can_reach_alpha=can_reach,
        runs_needed=needed,
        gate_note=gate_note,
        examples=examples,
        examples_note=examples_note,
        margin=margin,
        margin_p=margin_p,
        margin_estimate=margin_estimate,
    )


def _compare_metric(
    metric: str,
    by_variant: dict[str, list[RunRecord]],
    baseline: str,
    args: CompareArgs,
    runs: list[RunRecord],
    direction: tuple[bool, str] | None = None,
    family: int | None = None,
    margin: float | None = None,
    cache: _Predictions | None = None,
) -> MetricComparison:
    """One metric: per-variant statistics, each variant against the baseline (:func:`_versus`), and geometry vs
    the metric. ``direction``: (higher is better, where that comes from), default kdgeo.kinds; ``family``: Holm
    family size, default the variants compared. Verdicts are set afterwards by :func:`_decide`."""
    hib, source = direction if direction is not None else (higher_is_better(metric), "kdgeo.kinds")
    variant_stats = []
    for name, recs in by_variant.items():
        values = [float(_present(r.value(metric), metric)) for r in recs]
        variant_stats.append(
            VariantStats(name, values, [r.seed for r in recs], [str(r.path) for r in recs], stats.describe(values))
        )
    others = [v for v in by_variant if v != baseline]
    size = family if family is not None else len(others)
    cache = {} if cache is None else cache
    versus = [_versus(v, baseline, by_variant, metric, args, hib, size, margin, cache) for v in others]
    notes: list[str] = []
    for row in versus:
        chosen = {"t": row.t, "wilcoxon": row.rank, "permutation": row.permutation}.get(row.test)
        if row.evidence == "examples" and row.examples is not None:
            chosen = row.examples.mcnemar if row.test == "mcnemar" else None
            if row.test == "bootstrap" and row.examples.bootstrap.note:
                notes.append(f"{row.variant}: {row.examples.bootstrap.method}: {row.examples.bootstrap.note}")
        if chosen is not None and chosen.note:
            notes.append(f"{row.variant}: {chosen.method}: {chosen.note}")
        if not row.paired:
            notes.append(
                f"{row.variant} vs {baseline}: {row.pairing}; used Welch t, Mann-Whitney U and a two-sample "
                "permutation test on all runs"
            )
        elif any(row.left_out):
            notes.append(f"{row.variant} vs {baseline}: {row.pairing}")
        if row.gate_note:
            notes.append(f"{row.variant} vs {baseline}: {row.gate_note}")
        elif row.examples is not None:
            notes.append(f"{row.variant} vs {baseline}: {row.examples_note} (reported; the seeds decide)")
    if size > 1:
        across = f" ({len(others)} variants x {size // max(len(others), 1)} metrics)" if size > len(others) else ""
        notes.append(
            f"Holm-adjusted over {size} comparisons with {baseline}{across}; difference intervals at "
            f"{1 - args.alpha / size:.4g} confidence (Bonferroni, alpha/{size})"
        )
    if margin is not None:
        notes.append(
            f"margin {margin:g}: the gate fails a variant only when it is worse than {baseline} by more than "
            f"{margin:g} {metric} with confidence (deciding test on the values moved by the margin, Holm-adjusted)"
        )
    if source != "kdgeo.kinds":
        notes.append(f"{metric}: {'higher' if hib else 'lower'} is better ({source})")
    correlation = None
    between = within = None
    if metric != "procrustes":
        measured = [(r.geometry_value("procrustes"), r.value(metric)) for r in runs]
        points = [(x, y) for x, y in measured if x is not None and y is not None]
        if len(points) >= 3:
            correlation = stats.spearman([x for x, _ in points], [y for _, y in points])
        groups: dict[str, list[tuple[float, float]]] = {}
        for name, recs in by_variant.items():
            pairs = [(r.geometry_value("procrustes"), r.value(metric)) for r in recs]
            kept = [(x, y) for x, y in pairs if x is not None and y is not None]
            if kept:
                groups[name] = kept
        if groups:
            between, within = stats.between_within(groups)
    return MetricComparison(metric, hib, variant_stats, versus, correlation, notes, between, within, source, margin)


def _verdict(p_holm: float, estimate: float, hib: bool, alpha: float) -> Literal["better", "worse", "n.s."]:
    """Significant at ``alpha`` after Holm, in the direction of the deciding test's estimate."""
    if not (p_holm < alpha and math.isfinite(estimate) and estimate != 0):
        return "n.s."
    return "better" if (estimate > 0) == hib else "worse"


def _family(args: CompareArgs, n_metrics: int) -> str:
    """The Holm family: every (variant, metric) pair when several metrics can fail the build, else per metric."""
    return "variants x metrics" if args.fail_if_worse and n_metrics > 1 else "variants"


def _decide(comparisons: list[MetricComparison], args: CompareArgs) -> list[MetricComparison]:
    """Holm-adjust over the family, then each comparison's verdict and whether it fails the gate.

    Two Holm adjustments over the same family: of the deciding p-values (the verdict shown) and of the gate's
    p-values (the margin-shifted ones for a metric with a margin, else the same): the exit code follows the
    second, so a margin changes what fails the build, never what the tables call significant."""
    keys = [(i, j) for i, c in enumerate(comparisons) for j in range(len(c.versus))]
    if _family(args, len(comparisons)) == "variants x metrics":
        families = [keys]
    else:
        families = [[k for k in keys if k[0] == i] for i in range(len(comparisons))]
    updated: dict[tuple[int, int], VersusBaseline] = {}
    for members in families:
        rows = [comparisons[i].versus[j] for i, j in members]
        p_holm = stats.holm([v.p for v in rows])
        gate_holm = stats.holm([v.margin_p if v.margin is not None else v.p for v in rows])
        for (i, j), v, ph, gh in zip(members, rows, p_holm, gate_holm):
            hib = comparisons[i].higher_is_better
            gate_estimate = v.margin_estimate if v.margin is not None else v.estimate
            updated[(i, j)] = replace(
                v,
                p_holm=ph,
                verdict=_verdict(ph, v.estimate, hib, args.alpha),
                gate_p_holm=gh,
                fails_gate=_verdict(gh, gate_estimate, hib, args.alpha) == "worse",
            )
    return [replace(c, versus=[updated[(i, j)] for j in range(len(c.versus))]) for i, c in enumerate(comparisons)]


def _names(values: Sequence[str] | str) -> list[str]:
    """Metric names from repeatable, comma-separated flags (one string from the Python API is one flag)."""
    items = [values] if isinstance(values, str) else values
    return [n.strip() for v in items for n in str(v).split(",") if n.strip()]


def _directions(metrics: list[str], args: CompareArgs) -> dict[str, tuple[bool, str]]:
    """metric -> (higher is better, where that comes from). kdgeo.kinds knows the metrics kdgeo writes; an unknown
    one takes --higher-is-better / --lower-is-better, and with --fail-if-worse must (a gate that guesses the
    direction fails the build on improvements). Raises KdgeoError listing every problem."""
    higher, lower = set(_names(args.higher_is_better)), set(_names(args.lower_is_better))
    problems: list[str] = []
    if higher & lower:
        problems.append(f"{', '.join(sorted(higher & lower))} named by both --higher-is-better and --lower-is-better")
    stray = sorted((higher | lower) - set(metrics))
    if stray:
        problems.append(
            f"--higher-is-better/--lower-is-better name {', '.join(stray)}, which {'is' if len(stray) == 1 else 'are'} "
            f"not compared (compared: {', '.join(metrics)})"
        )
    out: dict[str, tuple[bool, str]] = {}
    for m in metrics:
        known = METRIC_HIGHER_IS_BETTER.get(m)
        declared = True if m in higher else False if m in lower else None
        if known is not None and declared is not None and known != declared:
            problems.append(
                f"{m} is {'higher' if known else 'lower'}-is-better in kdgeo; drop it from "
                f"--{'lower' if known else 'higher'}-is-better"
            )
        if known is None and declared is None and args.fail_if_worse:
            problems.append(
                f"kdgeo does not know whether a higher {m} is better, so --fail-if-worse cannot tell worse from "
                f"better: pass --higher-is-better {m} or --lower-is-better {m}"
            )
        if known is not None:
            out[m] = (known, "kdgeo.kinds")
        elif declared is not None:
            out[m] = (declared, "--higher-is-better" if declared else "--lower-is-better")
        else:
            out[m] = (
                True,
                "assumed: kdgeo does not know this metric; declare it with --higher-is-better/--lower-is-better",
            )
    if problems:
        raise KdgeoError("; ".join(problems) + ".")
    return out


def _margins(specs: Sequence[str], metrics: list[str]) -> dict[str, float]:
    """metric -> margin from --margin X (every metric) and --margin metric=X (that metric; wins over X).
    Raises KdgeoError on a bad number, a negative margin, a metric not compared, or one given twice."""
    every: float | None = None
    per: dict[str, float] = {}
    problems: list[str] = []
    for part in _names(specs):
        name, sep, raw = part.rpartition("=")
        name = name.strip()
        try:
            value = float(raw)
        except ValueError:
            problems.append(f"--margin {part}: '{raw.strip()}' is not a number")
            continue
        if not (math.isfinite(value) and value >= 0):
            problems.append(f"--margin {part}: a margin is a non-negative number in the metric's units")
        elif not sep:
            if every is not None:
                problems.append(f"--margin given twice for every metric ({every:g} and {value:g})")
            every = value
        elif name not in metrics:
            problems.append(f"--margin {part}: {name or '(empty)'} is not compared (compared: {', '.join(metrics)})")
        elif name in per:
            problems.append(f"--margin given twice for {name}")
        else:
            per[name] = value
    if problems:
        raise KdgeoError(
            "; ".join(problems) + ". Pass --margin X (metric units, every metric) or --margin metric=X, e.g. "
            "--margin accuracy=0.01."
        )
    out: dict[str, float] = {}
    for m in metrics:
        if m in per:
            out[m] = per[m]
        elif every is not None:
            out[m] = every
    return out


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
    loading_notes: list[str] = []  # from the checks of what is compared: evaluation sets, the baseline picked
    task = _check_tasks(runs, warnings, args.allow_different_data, loading_notes)
    _check_variants(runs, warnings)
    chosen: str | None = None
    if args.metric is None:
        # By the task the runs record (they agree, or _check_tasks refused them).
        chosen = default_metric(task.task)
        args = replace(args, metric=chosen)
    metrics = args.metrics
    _check_metrics(runs, metrics, (task.task or "classification") if chosen else None)
    variants = sorted({r.variant for r in runs})
    baseline, picked = _pick_baseline(variants, args.baseline)
    if picked is not None:
        loading_notes.append(picked)
    ordered = [baseline] + [v for v in variants if v != baseline]
    by_variant = {v: [r for r in runs if r.variant == v] for v in ordered}
    directions = _directions(metrics, args)
    margins = _margins(args.margin, metrics)
    family = _family(args, len(metrics))
    size = (len(ordered) - 1) * (len(metrics) if family == "variants x metrics" else 1)
    cache: _Predictions = {}
    comparisons = _decide(
        [
            _compare_metric(m, by_variant, baseline, args, runs, directions[m], size, margins.get(m), cache)
            for m in metrics
        ],
        args,
    )
    notes: list[str] = list(loading_notes)
    if chosen is not None:
        notes.append(
            f"metric {chosen}: the default for {task.task or 'classification'} runs; choose others with --metric"
        )
    if len(variants) == 1:
        notes.append(f"only one variant ({baseline}): nothing to test against a baseline")
    if any(len(recs) == 1 for recs in by_variant.values()):
        single = [v for v, recs in by_variant.items() if len(recs) == 1]
        notes.append(f"one run only for {', '.join(single)}: no spread or confidence interval; run more seeds")
    exit_code, verdict = _gate(comparisons, args, baseline, warnings)
    if exit_code:
        notes.append(verdict)
    geometry = _geometry_rows(by_variant, metrics[0])
    return CompareResult(
        args, runs, task, ordered, baseline, comparisons, geometry, notes, warnings, exit_code, chosen, family, verdict
    )


def _gate(
    comparisons: list[MetricComparison], args: CompareArgs, baseline: str, warnings: list[str]
) -> tuple[int, str]:
    """(exit code, the verdict line). Exit 1 only with fail_if_worse and a comparison that fails the gate. A
    comparison that cannot fire (its deciding test cannot reach alpha with this n, no per-example evidence) is
    named in ``warnings`` when fail_if_worse, so a green gate never hides that it could not have been red."""
    failing = [(c, v) for c in comparisons for v in c.versus if v.fails_gate]
    if args.fail_if_worse:
        for c in comparisons:
            for v in c.versus:
                if not v.can_reach_alpha:
                    warnings.append(
                        f"--fail-if-worse cannot fail on {v.variant} vs {baseline} ({c.metric}): {v.gate_note}"
                    )
    if not any(c.versus for c in comparisons):
        return 0, "nothing to compare (one variant)"
    if failing:
        shown = ", ".join(
            f"{v.variant} on {c.metric} ({v.test} Holm p {v.gate_p_holm:.3g} < {args.alpha:g}"
            + (f", worse by more than the margin {v.margin:g}" if v.margin is not None else "")
            + ")"
            for c, v in failing
        )
        line = f"significantly worse than {baseline}: {shown}"
        return (1, line + " (exit code 1)") if args.fail_if_worse else (0, line)
    blind = sum(1 for c in comparisons for v in c.versus if not v.can_reach_alpha)
    total = sum(len(c.versus) for c in comparisons)
    line = f"no variant significantly worse than {baseline} (Holm-adjusted {args.test} p, alpha {args.alpha:g})"
    if blind:
        line += f"; {blind} of {total} comparison{'s' if total != 1 else ''} could not have failed (see warnings)"
    return 0, line
