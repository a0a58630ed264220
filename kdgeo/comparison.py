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

What is compared -- finding and reading the runs, one evaluation set, one experiment per variant, the
baseline and the seed pairing -- is :mod:`kdgeo.compare_runs`; the statistics are :mod:`kdgeo.stats`; the
tables, JSON, CSV, Markdown and plot of a result are drawn by :mod:`kdgeo.report_compare`. Usage (what the CLI does)::

    result = compare(CompareArgs(runs=["runs/sweep"], fail_if_worse=True))  # metric: by the runs' task
    report_compare.print_compare(result); report_compare.write_json(result, "-")
    raise SystemExit(result.exit_code)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from kdgeo import rundir, stats
from kdgeo.compare_runs import (
    RunRecord,
    TaskKey,
    check_metrics,
    check_tasks,
    check_variants,
    finite_number,
    load_runs,
    pair_on_shared_seeds,
    pick_baseline,
    swept_values,
    variant_order,
)
from kdgeo.errors import KdgeoError
from kdgeo.kinds import METRIC_HIGHER_IS_BETTER, higher_is_better  # the one table of metric directions

Test = Literal["t", "wilcoxon", "permutation"]
TESTS: tuple[str, ...] = ("t", "wilcoxon", "permutation")
SCORE_METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "mcc", "f1", "teacher_agreement", "rougeL", "perplexity")
GEOMETRY_METRICS: tuple[str, ...] = ("procrustes", "cka", "gram")
DEFAULT_METRICS: dict[str, str] = {"classification": "accuracy", "causal-lm": "rougeL"}
"""The metric compared when none is given, by the runs' task (a run that records none: classification)."""


def default_metric(task: str | None) -> str:
    """``DEFAULT_METRICS[task]``; ``accuracy`` for a task this version does not know, or none."""
    return DEFAULT_METRICS.get(task or "classification", DEFAULT_METRICS["classification"])


# ---- arguments and records ---------------------------------------------------------------------


@dataclass(frozen=True)
class CompareArgs:
    runs: list[str]
    """Run directories, or directories holding them: searched down to ``compare_runs.MAX_SEARCH_DEPTH`` levels for
    directories with summary.json (nested sweeps included; a run directory is not searched further; symlinks
    followed once)."""
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
    """Compare runs evaluated on different evaluation sets (see :data:`kdgeo.compare_runs.EVAL_FIELDS`) instead of
    refusing; each run's set is then listed in the notes."""

    @property
    def metrics(self) -> list[str]:
        """``metric`` split at commas, each once, in the order given (--metric a --metric b arrives as "a,b")."""
        return list(dict.fromkeys(m.strip() for m in (self.metric or "").split(",") if m.strip()))


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
    swept: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Variants of a grid sweep ([sweep.grid]) -> their swept values by key; other variants are not in it."""
    bases: dict[str, str] = field(default_factory=dict)
    """Variants of a grid sweep -> the variant the grid crossed (``kd-procrustes`` of ``kd-procrustes/weight=0.3``)."""
    swept_keys: list[str] = field(default_factory=list)
    """Every swept key, in the grid's order (empty without grid runs)."""


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
        value = float(raw) if isinstance(raw, bool) else finite_number(raw)
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
            else f"the examples and the {len(a_ex)} paired seeds (a hierarchical bootstrap; seed-to-seed variation "
            f"estimated from {len(a_ex)} seeds only)"
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
        if not can_reach:  # e.g. McNemar with few discordant examples: 2 of them give p >= 0.5 whatever they say
            gate_note += f", but its smallest p here is {min_p:.3g}, so it cannot reach alpha={args.alpha:g} either"

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
            note = chosen.note
            if row.test == "mcnemar":  # stats speaks of samples a and b: name them
                note = note.replace("only a got", f"only {row.variant} got").replace("only b", f"only {baseline}")
            notes.append(f"{row.variant}: {chosen.method}: {note}")
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
                found = [finite_number(p.get(m)) for p in measured]
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
    task = check_tasks(runs, warnings, args.allow_different_data, loading_notes)
    check_variants(runs, warnings)
    chosen: str | None = None
    if args.metric is None:
        # By the task the runs record (they agree, or check_tasks refused them).
        chosen = default_metric(task.task)
        args = replace(args, metric=chosen)
    metrics = args.metrics
    check_metrics(runs, metrics, (task.task or "classification") if chosen else None)
    variants = variant_order(runs)  # a grid's variants by base, then swept value
    baseline, picked = pick_baseline(variants, args.baseline)
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
    swept, bases, swept_keys = swept_values(runs)
    return CompareResult(
        args,
        runs,
        task,
        ordered,
        baseline,
        comparisons,
        geometry,
        notes,
        warnings,
        exit_code,
        chosen,
        family,
        verdict,
        swept,
        bases,
        swept_keys,
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
    deciders = sorted({v.test for c in comparisons for v in c.versus})  # --test, or mcnemar / bootstrap
    tests = " / ".join(deciders)
    line = f"no variant significantly worse than {baseline} (Holm-adjusted {tests} p, alpha {args.alpha:g})"
    if blind:
        line += f"; {blind} of {total} comparison{'s' if total != 1 else ''} could not have failed (see warnings)"
    return 0, line
