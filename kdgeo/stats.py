"""Statistics for comparing runs across seeds: plain functions on lists of floats.

No I/O and no printing: :mod:`kdgeo.comparison` loads run directories and calls these. Every test
returns a :class:`TestResult` whose p-value is two-sided. Degenerate inputs get a defined,
documented answer instead of scipy's NaN wherever a textbook answer exists:

* identical paired samples (every difference 0): difference 0, p = 1.0 for every test;
* constant non-zero paired differences (zero variance): the t statistic is undefined (0/0 spread),
  so :func:`paired_t` gives the exact sign-flip test instead: p = 2 / 2^n, the smallest p n pairs
  can give (0.5 for two seeds), never 0 -- two seeds that both moved by -0.002 are no evidence;
* two samples that are each constant: Welch p = 1.0 when the constants agree, otherwise the exact
  two-sample permutation test (p = 2 / C(n_a + n_b, n_a) for equal sizes), never 0.

No test returns p = 0: permutation p-values count the observed arrangement, and a t-test p that
underflows the float range is reported as the smallest positive normal double.

Every :class:`TestResult` carries ``estimate``, the signed effect in units of a - b whose sign
gives the direction *for that test* (the mean difference for t and permutation tests, the
Hodges-Lehmann shift for the rank tests: a variant that wins on 11 of 12 seeds and collapses on
one has a negative mean but a positive median shift, and the rank test's verdict must follow the
latter), and ``min_p``, the smallest p the test can give with these sample sizes (see
:func:`min_p`, :func:`runs_needed`): a rank test on 5 pairs cannot go below 0.0625.

The rank tests (:func:`wilcoxon`, :func:`mann_whitney`) use their exact permutation distributions,
ties and zeros included (midranks; zero differences dropped), counted by dynamic programming up to
EXACT_RANK_MAX_N values and a tie-corrected normal approximation beyond. Their results do not
depend on the scipy version (scipy < 1.15 used the normal approximation for ``wilcoxon`` at n = 5,
p = 0.043 where the exact value is 0.0625; ``mannwhitneyu`` with ties uses it even at 4 vs 4,
p = 0.047 where the exact value is 0.086). scipy supplies the t-tests, the t and normal
distributions and Spearman's rho only.

Where no test exists (one pair; one run in a group for Welch; fewer than 3 points for a
correlation) the p-value is NaN and ``note`` says why. :func:`holm` treats a NaN p-value as 1.0,
so such a comparison is never called significant.

References
----------
- Student (1908), "The probable error of a mean", Biometrika 6(1). (t distribution, paired t)
- Welch (1947), "The generalization of 'Student's' problem when several different population
  variances are involved", Biometrika 34. (Welch t, Welch-Satterthwaite df)
- Wilcoxon (1945), "Individual comparisons by ranking methods", Biometrics Bulletin 1(6).
- Mann & Whitney (1947), "On a test of whether one of two random variables is stochastically
  larger than the other", Ann. Math. Stat. 18.
- Fisher (1935), The Design of Experiments, ch. 21 (randomisation / sign-flip test);
  Phipson & Smyth (2010), "Permutation p-values should never be zero", SAGMB 9 ((k+1)/(B+1)).
- Holm (1979), "A simple sequentially rejective multiple test procedure", Scand. J. Stat. 6.
- Spearman (1904), "The proof and measurement of association between two things", AJP 15.
- Hodges & Lehmann (1963), "Estimates of location based on rank tests", Ann. Math. Stat. 34.
  (median of Walsh averages; median of pairwise differences)
- McNemar (1947), "Note on the sampling error of the difference between correlated proportions
  or percentages", Psychometrika 12. (exact form: binomial test on the discordant pairs)
- Efron & Tibshirani (1993), An Introduction to the Bootstrap, Chapman & Hall, ch. 13 (percentile
  interval), ch. 16 (bootstrap tests); Davison & Hinkley (1997), Bootstrap Methods and their
  Application, sec. 3.8 (two-stage resampling of hierarchical data).
- Lehmann (1975), Nonparametrics: Statistical Methods Based on Ranks, ch. 1-3 (exact null
  distributions with midranks; tie-corrected variances).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import stats as _st

EXACT_SIGN_FLIP_MAX_N = 12
"""Paired permutation tests enumerate all 2^n sign flips up to this n (4096 flips)."""

EXACT_SPLITS_MAX = 20_000
"""Two-sample permutation tests enumerate every split when there are at most this many."""

MONTE_CARLO_RESAMPLES = 9_999
"""Resamples for a Monte-Carlo permutation test (seeded: the same data give the same p)."""

EXACT_RANK_MAX_N = 50
"""The rank tests use their exact permutation distribution up to this many values (Wilcoxon: non-zero
differences; Mann-Whitney: n_a + n_b), a tie-corrected normal approximation beyond. The distribution is
counted by dynamic programming over doubled midranks, not by listing arrangements, so 50 costs milliseconds;
counts stay below 2^53 (exact in float64) up to this size."""

_NAN = float("nan")
_P_FLOOR = float(np.finfo(np.float64).tiny)
"""A t-test p that underflows to 0.0 is reported as this (about 2.2e-308): never p = 0."""


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and a t confidence interval of the mean of ``n`` values.

    ``std`` and the interval are NaN for ``n = 1`` (a spread needs two values).
    """

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95


@dataclass(frozen=True)
class TestResult:
    """One two-sided test. ``method`` names it; ``note`` explains a degenerate case ('' if none).

    ``estimate`` is the signed effect in units of a - b whose sign is the direction for this test: the
    mean difference for the t and permutation tests, the Hodges-Lehmann shift for the rank tests, the
    difference of accuracies for McNemar (NaN where there is no data). ``min_p`` is the smallest
    two-sided p this test can give with these sample sizes (0.0 where unbounded, as for a t-test with
    spread); a gate at alpha <= min_p can never fire.
    """

    method: str
    statistic: float
    p_value: float
    n: int
    note: str = ""
    estimate: float = _NAN
    min_p: float = 0.0


@dataclass(frozen=True)
class Correlation:
    """A rank correlation and its two-sided p-value over ``n`` points."""

    rho: float
    p_value: float
    n: int
    note: str = ""


def _array(values: Sequence[float] | np.ndarray, what: str = "values") -> np.ndarray:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a flat list of numbers")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contain NaN or inf: {list(values)}")
    return arr


def _roundoff(*arrays: np.ndarray) -> float:
    """Float round-off at the scale of the data: differences this small are exact zeros
    (0.8 - 0.75 and 0.7 - 0.65 differ in the 17th digit; that is not variance)."""
    scale = max((float(np.max(np.abs(x))) for x in arrays if len(x)), default=0.0)
    return 8 * np.finfo(np.float64).eps * scale


def _constant(x: np.ndarray, tol: float) -> bool:
    return bool(len(x)) and float(np.ptp(x)) <= tol


def _pair(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """d = a - b, with differences within float round-off of 0 set to exactly 0."""
    x, y = _array(a, "a"), _array(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal lengths (got {len(x)} and {len(y)})")
    d = x - y
    d[np.abs(d) <= _roundoff(x, y)] = 0.0
    return d


def _midranks(x: np.ndarray, tol: float) -> np.ndarray:
    """Ranks 1..n of ``x`` with ties given the average of their positions (midranks).

    Values within ``tol`` of their sorted neighbour are ties: 0.81 - 0.80 and 0.82 - 0.81 differ in
    the 17th digit, and ranking them apart would invent an order that is not in the data.
    """
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new_group = np.concatenate([[True], np.diff(xs) > tol])
    group = np.cumsum(new_group) - 1
    positions = np.arange(1, len(x) + 1, dtype=np.float64)
    mean_position = np.bincount(group, weights=positions) / np.bincount(group)
    ranks = np.empty(len(x))
    ranks[order] = mean_position[group]
    return ranks


def _tie_sizes(x: np.ndarray, tol: float) -> np.ndarray:
    """Sizes of the groups of tied values (same grouping as :func:`_midranks`)."""
    xs = np.sort(x)
    group = np.cumsum(np.concatenate([[True], np.diff(xs) > tol])) - 1
    return np.bincount(group)


def _two_sided_normal(z: float) -> float:
    return max(_P_FLOOR, float(2 * _st.norm.sf(abs(z))))


def _median_walsh(d: np.ndarray) -> float:
    i, j = np.triu_indices(len(d))  # i <= j: the n (n + 1) / 2 Walsh averages, each d_i with itself included
    return float(np.median((d[i] + d[j]) / 2))


def hodges_lehmann_paired(a: Sequence[float], b: Sequence[float]) -> float:
    """Hodges-Lehmann (1963) shift of paired samples: the median of the Walsh averages of d = a - b,

    HL = median{ (d_i + d_j) / 2 : i <= j },

    the estimator that goes with the Wilcoxon signed-rank test (the shift at which the test is most
    balanced). Robust to one collapsed seed: d = (0.01 x 11, -0.5) gives HL = +0.01, mean -0.033.
    Zero differences are kept. NaN for no pairs.
    """
    d = _pair(a, b)
    return _median_walsh(d) if len(d) else _NAN


def hodges_lehmann(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Hodges-Lehmann (1963) shift of two independent samples: HL = median{ a_i - b_j : all i, j },
    the estimator that goes with the Mann-Whitney test. NaN when a sample is empty."""
    x, y = _array(a, "a"), _array(b, "b")
    if len(x) == 0 or len(y) == 0:
        return _NAN
    diffs = (x[:, None] - y[None, :]).ravel()  # (n_a * n_b,)
    diffs[np.abs(diffs) <= _roundoff(x, y)] = 0.0
    return float(np.median(diffs))


def _sign_flip_rank_counts(ranks2: np.ndarray) -> np.ndarray:
    """counts[s] = number of the 2^n sign assignments whose positive doubled ranks sum to s.

    ``ranks2`` are doubled midranks (integers). The generating function prod_i (1 + x^{r_i}) is
    multiplied out term by term: O(n * sum r) instead of listing 2^n assignments.
    """
    total = int(ranks2.sum())
    counts = np.zeros(total + 1)
    counts[0] = 1.0
    for r in ranks2.tolist():
        shifted = np.zeros_like(counts)
        shifted[r:] = counts[: total + 1 - r]
        counts = counts + shifted
    return counts


def _subset_rank_counts(ranks2: np.ndarray, k: int) -> np.ndarray:
    """counts[s] = number of the C(n, k) subsets of size k whose doubled ranks sum to s
    (prod_i (1 + y x^{r_i}), coefficient of y^k)."""
    total = int(ranks2.sum())
    counts = np.zeros((k + 1, total + 1))  # (subset size, doubled rank sum)
    counts[0, 0] = 1.0
    for r in ranks2.tolist():
        shifted = np.zeros_like(counts)
        shifted[1:, r:] = counts[:-1, : total + 1 - r]
        counts = counts + shifted
    return counts[k]


def describe(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Summary:
    """Mean, sample std and the t confidence interval of the mean.

    mean = (1/n) sum x_i;  s = sqrt( sum (x_i - mean)^2 / (n - 1) )  (ddof = 1);
    CI = mean -+ t_{(1+c)/2, n-1} * s / sqrt(n)   (Student 1908).

    Zero variance gives the interval [mean, mean]; ``n = 1`` gives std and interval NaN.
    """
    x = _array(values)
    n = len(x)
    if n == 0:
        raise ValueError("describe() needs at least one value")
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, _NAN, _NAN, _NAN, confidence)
    std = float(x.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, confidence)


def mean_difference_ci(
    a: Sequence[float], b: Sequence[float], paired: bool, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Difference of means ``mean(a) - mean(b)`` and its t confidence interval.

    Paired: the :func:`describe` interval of d_i = a_i - b_i.
    Unpaired (Welch 1947): se = sqrt(s_a^2/n_a + s_b^2/n_b),
    df = se^4 / ( (s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1) ), CI = diff -+ t_{(1+c)/2, df} se.
    Returns ``(diff, low, high)``; the bounds are NaN where a group has one value.
    """
    if paired:
        s = describe(_pair(a, b), confidence)
        return s.mean, s.ci_low, s.ci_high
    x, y = _array(a, "a"), _array(b, "b")
    diff = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return diff, _NAN, _NAN
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se2 = va + vb
    if se2 == 0:
        return diff, diff, diff
    df = se2**2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    half = float(_st.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(se2)
    return diff, diff - half, diff + half


# ---- paired tests (the same seeds in both variants) -------------------------------------------


def paired_t(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Paired t-test (Student 1908) of mean(a - b) = 0.

    d_i = a_i - b_i;  t = mean(d) / (s_d / sqrt(n)),  df = n - 1;  p = 2 P(T_{n-1} >= |t|)
    (scipy.stats.ttest_rel). ``estimate`` = mean(d). All d_i = 0: t = 0, p = 1.0. n < 2: p = NaN.

    Constant non-zero d_i (zero variance; equal within float round-off counts as constant): t is
    0/0 -- undefined, not infinite -- so the result is the exact sign-flip test (Fisher 1935) of
    the same hypothesis: only the all-plus and all-minus flips reach |mean(d)|, p = 2 / 2^n (0.5 for
    two seeds). Taking the limit t -> inf instead gave p = 0 for (-0.002, -0.002), "significant",
    while the larger regression (-0.002, -0.004) gave p = 0.20; with accuracies moving in steps of
    1/N_eval equal differences are common, and that gate fired 6.1% of the time under a true null
    with 2 seeds where 2.5% was promised.
    """
    d = _pair(a, b)
    n = len(d)
    if n < 2:
        mean = float(d.mean()) if n else _NAN
        return TestResult("paired t", _NAN, _NAN, n, f"{n} pair: the t-test needs at least 2", mean, 1.0)
    mean = float(d.mean())
    if np.all(d == 0):
        return TestResult("paired t", 0.0, 1.0, n, "identical paired values: difference 0, p = 1", 0.0)
    if _constant(d, _roundoff(_array(a), _array(b))):
        p = max(_P_FLOOR, 2 / 2**n)  # int / int: no overflow for long runs of pairs
        return TestResult(
            "paired t -> exact sign-flip (zero variance)",
            mean,
            p,
            n,
            f"every pair differs by the same {mean:+.4g}: zero variance leaves the t statistic undefined, so the "
            f"exact sign-flip test decides; with {n} pairs its smallest p is 2 / 2^{n} = {p:.3g}",
            mean,
            p,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = _st.ttest_1samp(d, 0.0)  # = ttest_rel(a, b)
    p_value, note = float(res.pvalue), ""
    if p_value == 0.0:  # |t| beyond the float range of the t tail, not a zero-variance case
        p_value, note = _P_FLOOR, "p below the float range, reported as 2.2e-308"
    return TestResult("paired t", float(res.statistic), p_value, n, note, mean)


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Wilcoxon (1945) signed-rank test of symmetry of d = a - b about 0.

    Zero differences are dropped (Wilcoxon's convention; Pratt's alternative is not used); the
    n' remaining |d_i| get midranks r_i (ties within float round-off share the average rank).
    W+ = sum of r_i over d_i > 0, W- over d_i < 0, T = W+ + W-; ``statistic`` = min(W+, W-).
    Under H0 every sign assignment of the midranks is equally likely, so the exact two-sided p is

        p = #{ s in {0,1}^n' : |sum_i s_i r_i - T/2| >= |W+ - T/2| } / 2^n'

    (the distribution is symmetric about T/2, so this is 2 P(W <= min(W+, W-)) capped at 1, scipy's
    exact definition on tie-free data). Counted exactly up to n' = EXACT_RANK_MAX_N; beyond, the normal
    approximation with the tie-corrected variance Var(W+) = sum_i r_i^2 / 4 (= n'(n'+1)(2n'+1)/24 -
    sum_t (t^3 - t)/48), no continuity correction. ``estimate`` is :func:`hodges_lehmann_paired`.

    All d_i = 0: p = 1.0. ``min_p`` = 2 / 2^n' (0.0625 for n' = 5): fewer than 6 non-zero differences
    can never reach p < 0.05, and ``note`` says so.
    """
    d = _pair(a, b)
    n = len(d)
    method = "Wilcoxon signed-rank"
    if n == 0:
        return TestResult(method, _NAN, _NAN, 0, "no pairs", _NAN, 1.0)
    estimate = _median_walsh(d)
    nz = d[d != 0]
    m = len(nz)
    if m == 0:
        return TestResult(method, 0.0, 1.0, n, "all differences are zero: p = 1", estimate, 1.0)
    ranks = _midranks(np.abs(nz), _roundoff(_array(a), _array(b)))
    w_plus = float(ranks[nz > 0].sum())
    w_minus = float(ranks[nz < 0].sum())
    smallest = min(1.0, 2 / 2**m)
    notes = []
    if m <= EXACT_RANK_MAX_N:
        ranks2 = np.rint(2 * ranks).astype(np.int64)  # midranks are multiples of 1/2
        counts = _sign_flip_rank_counts(ranks2)
        total2 = int(ranks2.sum())
        observed = abs(2 * int(ranks2[nz > 0].sum()) - total2)
        sums = np.arange(total2 + 1)
        p = min(1.0, float(counts[np.abs(2 * sums - total2) >= observed].sum() / 2**m))
        notes.append(f"exact (all 2^{m} sign flips of the midranks)")
    else:
        z = (w_plus - float(ranks.sum()) / 2) / math.sqrt(float(np.sum(ranks**2)) / 4)
        p = _two_sided_normal(z)
        notes.append("normal approximation (tie-corrected variance)")
    if m < n:
        notes.append(f"{n - m} zero difference{'s' if n - m != 1 else ''} dropped")
    if m < 6:
        notes.append(f"{m} non-zero difference{'s' if m != 1 else ''}: smallest possible p is {smallest:.3g}")
    return TestResult(method, min(w_plus, w_minus), p, n, "; ".join(notes), estimate, smallest)


def _ge(values: np.ndarray, observed: float) -> np.ndarray:
    """values >= observed, forgiving float round-off in sums of the same numbers."""
    return values >= observed - 1e-12 * max(1.0, abs(observed))


def permutation_paired(a: Sequence[float], b: Sequence[float], seed: int = 0) -> TestResult:
    """Paired permutation (sign-flip) test of mean(a - b) = 0 (Fisher 1935).

    Under H0 each d_i is as likely to be -d_i. Statistic T = |mean(d)|;
    p = #{ s in {-1,+1}^n : |mean(s * d)| >= T } / 2^n, enumerated exactly for
    n <= EXACT_SIGN_FLIP_MAX_N; above that B = MONTE_CARLO_RESAMPLES random flips (seeded) and
    p = (k + 1) / (B + 1) (Phipson & Smyth 2010). All d_i = 0: p = 1.0. ``estimate`` = mean(d);
    ``min_p`` = :func:`min_p` ("permutation", paired).
    """
    d = _pair(a, b)
    n = len(d)
    if n == 0:
        return TestResult("paired permutation", _NAN, _NAN, 0, "no pairs", _NAN, 1.0)
    mean = float(d.mean())
    observed = abs(mean)
    smallest = min_p("permutation", True, n, n)
    if np.all(d == 0):
        return TestResult("paired permutation", 0.0, 1.0, n, "all differences are zero: p = 1", 0.0, smallest)
    if n <= EXACT_SIGN_FLIP_MAX_N:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # (2^n, n)
        p = float(_ge(np.abs(signs @ d) / n, observed).mean())
        note = "exact (all 2^n sign flips)"
        if n < 6:
            note += f"; smallest possible p is {2 / 2**n:.3g}"
        return TestResult("paired permutation", mean, p, n, note, mean, smallest)
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(MONTE_CARLO_RESAMPLES, n))
    k = int(_ge(np.abs(signs @ d) / n, observed).sum())
    p = (k + 1) / (MONTE_CARLO_RESAMPLES + 1)
    note = f"Monte Carlo, {MONTE_CARLO_RESAMPLES} sign flips"
    return TestResult("paired permutation", mean, p, n, note, mean, smallest)


# ---- unpaired tests (different seeds) ---------------------------------------------------------


def welch_t(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Welch's (1947) unequal-variance t-test of mean(a) = mean(b).

    t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b), Welch-Satterthwaite df (see
    :func:`mean_difference_ci`); scipy.stats.ttest_ind(equal_var=False). ``estimate`` =
    mean(a) - mean(b). A group with one value: p = NaN.

    Both samples constant: p = 1.0 if the constants agree; otherwise t is undefined (zero variance)
    and the exact two-sample permutation test decides (Fisher 1935): with constants c_a != c_b only
    the observed split (and, when n_a = n_b, its mirror) reaches |mean(a) - mean(b)|, so
    p = (2 if n_a = n_b else 1) / C(n_a + n_b, n_a) -- 1/3 for two runs each, never 0.
    """
    x, y = _array(a, "a"), _array(b, "b")
    n = len(x) + len(y)
    diff = float(x.mean() - y.mean()) if len(x) and len(y) else _NAN
    if len(x) < 2 or len(y) < 2:
        return TestResult("Welch t", _NAN, _NAN, n, "Welch's t-test needs at least 2 runs per variant", diff, 1.0)
    tol = _roundoff(x, y)
    if _constant(x, tol) and _constant(y, tol):
        if abs(x.mean() - y.mean()) <= tol:
            return TestResult("Welch t", 0.0, 1.0, n, "identical constant samples: p = 1", 0.0)
        p = max(_P_FLOOR, (2 if len(x) == len(y) else 1) / math.comb(n, len(x)))
        return TestResult(
            "Welch t -> exact permutation (zero variance)",
            diff,
            p,
            n,
            "both samples are constant: zero variance leaves the t statistic undefined, so the exact permutation "
            f"test decides; with {len(x)} and {len(y)} runs its smallest p is {p:.3g}",
            diff,
            p,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = _st.ttest_ind(x, y, equal_var=False)
    p_value, note = float(res.pvalue), ""
    if p_value == 0.0:
        p_value, note = _P_FLOOR, "p below the float range, reported as 2.2e-308"
    return TestResult("Welch t", float(res.statistic), p_value, n, note, diff)


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Mann-Whitney (1947) U test (Wilcoxon rank-sum) of P(A > B) = P(B > A).

    Pooled midranks r_i (ties within float round-off share the average rank); R_a = rank sum of a,
    ``statistic`` U_a = R_a - n_a (n_a + 1) / 2 (scipy's U of the first sample). Under H0 every one of
    the C(N, n_a) splits of the midranks is equally likely (N = n_a + n_b), and the exact two-sided p is

        p = #{ splits S : |R(S) - n_a (N + 1) / 2| >= |R_a - n_a (N + 1) / 2| } / C(N, n_a),

    which equals scipy's exact p on tie-free data (2 P(U >= max(U_a, U_b)), capped at 1) and stays
    exact with ties, where the distribution is not symmetric and scipy falls back to the normal
    approximation (4 vs 4 with ties: p = 0.047 there, 0.086 exact). Counted exactly up to
    N = EXACT_RANK_MAX_N; beyond, the normal approximation with the tie-corrected variance
    Var(U) = n_a n_b / 12 ((N + 1) - sum_t (t^3 - t) / (N (N - 1))), no continuity correction.
    ``estimate`` is :func:`hodges_lehmann`. Every value equal: U = n_a n_b / 2, p = 1.0.
    ``min_p`` = 2 / C(N, n_a) (0.1 for 3 vs 3, 0.029 for 4 vs 4).
    """
    x, y = _array(a, "a"), _array(b, "b")
    na, nb = len(x), len(y)
    n = na + nb
    method = "Mann-Whitney U"
    if na == 0 or nb == 0:
        return TestResult(method, _NAN, _NAN, n, "an empty sample", _NAN, 1.0)
    smallest = min_p("wilcoxon", False, na, nb)
    estimate = hodges_lehmann(x, y)
    pooled = np.concatenate([x, y])
    tol = _roundoff(x, y)
    if _constant(pooled, tol):
        return TestResult(method, na * nb / 2, 1.0, n, "all values are equal: p = 1", estimate, smallest)
    ranks = _midranks(pooled, tol)
    r_a = float(ranks[:na].sum())
    u_a = r_a - na * (na + 1) / 2
    if n <= EXACT_RANK_MAX_N:
        ranks2 = np.rint(2 * ranks).astype(np.int64)
        counts = _subset_rank_counts(ranks2, na)
        center2 = na * (n + 1)  # twice the mean rank sum, an integer
        observed = abs(int(ranks2[:na].sum()) - center2)
        sums = np.arange(len(counts))
        p = min(1.0, float(counts[np.abs(sums - center2) >= observed].sum() / math.comb(n, na)))
        note = f"exact (all {math.comb(n, na)} splits of the midranks)"
    else:
        ties = _tie_sizes(pooled, tol).astype(np.float64)
        var = na * nb / 12 * ((n + 1) - float(np.sum(ties**3 - ties)) / (n * (n - 1)))
        p = _two_sided_normal((u_a - na * nb / 2) / math.sqrt(var))
        note = "normal approximation (tie-corrected variance)"
    return TestResult(method, u_a, p, n, note, estimate, smallest)


def permutation_unpaired(a: Sequence[float], b: Sequence[float], seed: int = 0) -> TestResult:
    """Two-sample permutation test of mean(a) = mean(b) (Fisher 1935).

    Statistic T = |mean(a) - mean(b)|; p = share of the C(n_a + n_b, n_a) relabellings of the
    pooled values with |difference of means| >= T, enumerated exactly when there are at most
    EXACT_SPLITS_MAX, else MONTE_CARLO_RESAMPLES random relabellings (seeded) and
    p = (k + 1) / (B + 1). Every value equal: p = 1.0. ``estimate`` = mean(a) - mean(b);
    ``min_p`` = :func:`min_p` ("permutation", unpaired).
    """
    x, y = _array(a, "a"), _array(b, "b")
    na, nb = len(x), len(y)
    if na == 0 or nb == 0:
        return TestResult("permutation", _NAN, _NAN, na + nb, "an empty sample", _NAN, 1.0)
    pooled = np.concatenate([x, y])
    diff = float(x.mean() - y.mean())
    smallest = min_p("permutation", False, na, nb)
    if np.all(pooled == pooled[0]):
        return TestResult("permutation", 0.0, 1.0, na + nb, "all values are equal: p = 1", 0.0, smallest)
    total = pooled.sum()
    n = na + nb
    observed = abs(diff)
    if math.comb(n, na) <= EXACT_SPLITS_MAX:
        sums = np.array([pooled[list(idx)].sum() for idx in itertools.combinations(range(n), na)])
        diffs = np.abs(sums / na - (total - sums) / nb)
        p = float(_ge(diffs, observed).mean())
        return TestResult("permutation", diff, p, n, "exact (all relabellings)", diff, smallest)
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((MONTE_CARLO_RESAMPLES, n)), axis=1)[:, :na]  # (B, n_a)
    sums = pooled[perms].sum(axis=1)
    diffs = np.abs(sums / na - (total - sums) / nb)
    k = int(_ge(diffs, observed).sum())
    return TestResult(
        "permutation",
        diff,
        (k + 1) / (MONTE_CARLO_RESAMPLES + 1),
        n,
        f"Monte Carlo, {MONTE_CARLO_RESAMPLES} relabellings",
        diff,
        smallest,
    )


# ---- what a test can reach; effect sizes ------------------------------------------------------

TestName = Literal["t", "wilcoxon", "permutation"]


def min_p(test: str, paired: bool, n_a: int, n_b: int) -> float:
    """Smallest two-sided p ``test`` can give with these sample sizes, whatever the data.

    ``test`` names the family as ``kdgeo compare --test`` does: "t" (paired t / Welch), "wilcoxon"
    (Wilcoxon signed-rank when paired, Mann-Whitney when not), "permutation". Paired uses
    n = min(n_a, n_b) pairs.

    * t: 0.0 (unbounded) with at least 2 pairs / 2 runs per variant; 1.0 where no test exists.
    * wilcoxon, paired: 2 / 2^n -- only the all-positive and all-negative sign patterns are that
      extreme (0.0625 for n = 5, 0.031 for n = 6). Unpaired (Mann-Whitney): 2 / C(n_a + n_b, n_a),
      the two complete separations (0.1 for 3 vs 3, 0.029 for 4 vs 4).
    * permutation, paired: 2 / 2^n as above. Unpaired: (2 if n_a = n_b else 1) / C(n_a + n_b, n_a)
      (with unequal sizes the mirror split has a different |difference of means|). Beyond the exact
      sizes (EXACT_SIGN_FLIP_MAX_N, EXACT_SPLITS_MAX) the Monte-Carlo p is at least
      1 / (MONTE_CARLO_RESAMPLES + 1).

    A sample size where the test gives no p at all (n = 0; n < 2 for t) gives 1.0. Zero differences
    dropped by the Wilcoxon test lower n further: :attr:`TestResult.min_p` uses the n actually tested.
    """
    if test not in ("t", "wilcoxon", "permutation"):
        raise ValueError(f"unknown test {test!r}: expected 't', 'wilcoxon' or 'permutation'")
    if n_a < 0 or n_b < 0:
        raise ValueError(f"sample sizes must be >= 0 (got {n_a} and {n_b})")
    monte_carlo_floor = 1.0 / (MONTE_CARLO_RESAMPLES + 1)
    if paired:
        n = min(n_a, n_b)
        if test == "t":
            return 0.0 if n >= 2 else 1.0
        if n < 1:
            return 1.0
        exact = min(1.0, 2 / 2**n)  # int / int: underflows to 0.0 instead of raising OverflowError
        if test == "permutation" and n > EXACT_SIGN_FLIP_MAX_N:
            return max(exact, monte_carlo_floor)
        return exact
    if test == "t":
        return 0.0 if n_a >= 2 and n_b >= 2 else 1.0
    if n_a < 1 or n_b < 1:
        return 1.0
    splits = math.comb(n_a + n_b, n_a)
    if test == "wilcoxon":
        return min(1.0, 2 / splits)
    exact = min(1.0, (2 if n_a == n_b else 1) / splits)
    return max(exact, monte_carlo_floor) if splits > EXACT_SPLITS_MAX else exact


def runs_needed(test: str, paired: bool, alpha: float) -> int | None:
    """Smallest n per variant (pairs when paired, n_a = n_b = n when not) with :func:`min_p` < ``alpha``:
    the fewest seeds at which ``--fail-if-worse`` can fire at all.

    t -> 2. At alpha = 0.05: wilcoxon / permutation paired -> 6 (2/2^5 = 0.0625 is not below 0.05),
    unpaired -> 4 (2/C(6,3) = 0.1, 2/C(8,4) = 0.029). None when no n reaches alpha (alpha <= 0, or
    a permutation test at alpha <= 1 / (MONTE_CARLO_RESAMPLES + 1)).
    """
    if test not in ("t", "wilcoxon", "permutation"):
        raise ValueError(f"unknown test {test!r}: expected 't', 'wilcoxon' or 'permutation'")
    if not alpha > 0:
        return None
    for n in range(1, 200):  # 2 / 2^199 ~ 2.5e-60: beyond any alpha anyone gates at
        if min_p(test, paired, n, n) < alpha:
            return n
    return None


def prob_improvement(a: Sequence[float], b: Sequence[float], paired: bool, higher_is_better: bool) -> float:
    """Probability of improvement: the share of comparisons where a beats b, ties counting 1/2.

    Paired: (1/n) sum_i [a_i beats b_i] + [a_i = b_i] / 2 over the pairs (seed by seed).
    Unpaired: the same over all n_a n_b combinations (a_i, b_j) -- the Mann-Whitney U_a / (n_a n_b)
    when higher is better (the "common language effect size", McGraw & Wong 1992).
    "Beats" is a > b when ``higher_is_better``, a < b otherwise; values within float round-off are ties.
    NaN when there is nothing to compare.
    """
    if paired:
        d = _pair(a, b)
    else:
        x, y = _array(a, "a"), _array(b, "b")
        d = (x[:, None] - y[None, :]).ravel()  # (n_a * n_b,)
        d[np.abs(d) <= _roundoff(x, y)] = 0.0
    if len(d) == 0:
        return _NAN
    if not higher_is_better:
        d = -d
    return float((np.sum(d > 0) + 0.5 * np.sum(d == 0)) / len(d))


def difference_bound(
    a: Sequence[float],
    b: Sequence[float],
    paired: bool,
    confidence: float,
    side: Literal["lower", "upper"],
) -> float:
    """One-sided t confidence bound for mean(a) - mean(b), for the non-inferiority margin.

    upper = diff + t_{c, df} se,  lower = diff - t_{c, df} se  (one-sided level c = ``confidence``).
    Paired (Student 1908): diff = mean(d), se = s_d / sqrt(n), df = n - 1.
    Unpaired (Welch 1947): se = sqrt(s_a^2/n_a + s_b^2/n_b), Welch-Satterthwaite df.
    NaN when undefined (fewer than 2 pairs / 2 runs per variant). Zero spread (se = 0: constant
    paired differences, or two constant samples) gives the difference itself: the t interval has no
    width there, so a caller should read the zero-variance note of :func:`paired_t` alongside it.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (got {confidence})")
    if side not in ("lower", "upper"):
        raise ValueError(f"side must be 'lower' or 'upper' (got {side!r})")
    if paired:
        d = _pair(a, b)
        n = len(d)
        if n < 2:
            return _NAN
        diff = float(d.mean())
        se2 = float(d.var(ddof=1)) / n
        if _constant(d, _roundoff(_array(a), _array(b))):
            se2 = 0.0
        df = float(n - 1)
    else:
        x, y = _array(a, "a"), _array(b, "b")
        if len(x) < 2 or len(y) < 2:
            return _NAN
        diff = float(x.mean() - y.mean())
        va, vb = float(x.var(ddof=1)) / len(x), float(y.var(ddof=1)) / len(y)
        se2 = va + vb
        df = se2**2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1)) if se2 > 0 else 1.0
    if se2 == 0:
        return diff
    half = float(_st.t.ppf(confidence, df)) * math.sqrt(se2)
    return diff + half if side == "upper" else diff - half


# ---- per-example evidence: McNemar and the paired bootstrap ------------------------------------


def _booleans(values: Sequence[bool], what: str) -> np.ndarray:
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1)):
            out.append(bool(v))
        else:
            raise ValueError(f"{what} must hold booleans (correct / not correct), got {v!r}")
    return np.asarray(out, dtype=bool)


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> TestResult:
    """McNemar's (1947) test in its exact form: two classifiers scored on the same examples.

    Only the discordant examples carry information: n_10 = a right and b wrong, n_01 = a wrong and
    b right, m = n_10 + n_01. Under H0 (equal accuracy) n_10 ~ Binomial(m, 1/2), and the exact
    two-sided p is

        p = min(1, 2 sum_{k=0}^{min(n_10, n_01)} C(m, k) / 2^m)

    (= scipy.stats.binomtest(n_10, m).pvalue; the binomial is symmetric). ``statistic`` = n_10,
    ``estimate`` = accuracy(a) - accuracy(b) = (n_10 - n_01) / n, ``min_p`` = 2 / 2^m. No discordant
    example: p = 1.0. Computed with exact integers, so large m does not lose the tail; a p below the
    float range is reported as 2.2e-308, never 0.
    """
    x, y = _booleans(a_correct, "a_correct"), _booleans(b_correct, "b_correct")
    if x.shape != y.shape:
        raise ValueError(f"McNemar needs the same examples on both sides (got {len(x)} and {len(y)})")
    n = len(x)
    method = "McNemar exact"
    if n == 0:
        return TestResult(method, _NAN, _NAN, 0, "no examples", _NAN, 1.0)
    n10, n01 = int(np.sum(x & ~y)), int(np.sum(~x & y))
    m = n10 + n01
    estimate = (n10 - n01) / n
    detail = f"{n10} examples only a got right, {n01} only b"
    if m == 0:
        return TestResult(method, 0.0, 1.0, n, f"no discordant examples ({detail}): p = 1", estimate, 1.0)
    tail = sum(math.comb(m, k) for k in range(min(n10, n01) + 1))
    p = min(1.0, max(_P_FLOOR, 2 * tail / 2**m))  # int / int: exact to the last bit, no overflow
    return TestResult(method, float(n10), p, n, detail, estimate, min(1.0, 2 / 2**m))


@dataclass(frozen=True)
class BootstrapResult:
    """A paired bootstrap of the mean per-example difference (see :func:`paired_bootstrap`)."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n_seeds: int
    n_examples: int
    """Examples per seed (the smallest count when seeds differ; ``note`` then says so)."""
    resamples: int
    method: str
    note: str = ""


_BOOTSTRAP_CHUNK = 4_000_000
"""Random draws per block of resamples: bounds memory (32 MB of indices) whatever the eval set size."""


def _example_means(d: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k bootstrap means of ``d``, each over len(d) examples drawn with replacement.

    A resample mean depends only on how often each distinct value is drawn, so with few distinct
    values (correct/incorrect differences lie in {-1, 0, 1}) the counts are one multinomial draw;
    otherwise example indices are drawn. Both are the same distribution.
    """
    n = len(d)
    values, counts = np.unique(d, return_counts=True)
    if len(values) <= 32:
        weights = rng.multinomial(n, counts / n, size=k)  # (k, distinct values)
        return np.asarray(weights @ values / n, dtype=np.float64)
    out = np.empty(k)
    block = max(1, _BOOTSTRAP_CHUNK // n)
    for start in range(0, k, block):
        stop = min(k, start + block)
        idx = rng.integers(0, n, size=(stop - start, n))  # (block, n)
        out[start:stop] = d[idx].mean(axis=1)
    return out


def paired_bootstrap(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    *,
    resamples: int = 9_999,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Paired bootstrap (Efron & Tibshirani 1993) of the mean per-example difference a - b.

    ``a[i]`` and ``b[i]`` are the per-example values (correctness as 0/1, ROUGE-L, NLL, ...) of seed i
    on the same examples in the same order; d_ij = a_ij - b_ij. The statistic is the mean over seeds of
    the per-seed mean difference, D = (1/S) sum_i mean_j d_ij (with equal example counts: the mean over
    all seeds and examples).

    Resampling: one seed (S = 1): the examples, with replacement, B times. Several seeds: hierarchical
    (two-stage, Davison & Hinkley 1997 sec. 3.8): draw S seeds with replacement, then for each drawn
    seed its examples with replacement, and average -- so the interval carries seed-to-seed variation
    as well as evaluation-set noise; resampling examples alone would treat seeds as fixed and give an
    interval too narrow for a new seed.

    Interval: percentile, [q_{(1-c)/2}, q_{(1+c)/2}] of the B resampled D*. p (two-sided): the
    smallest 1 - c at which that percentile interval excludes 0, with the observed sample counted
    among the resamples (Phipson & Smyth 2010),

        p = min(1, 2 min(#{D* <= 0} + 1, #{D* >= 0} + 1) / (B + 1)),

    so p < alpha exactly when the (1 - alpha) percentile interval lies on one side of 0, p >= 2/(B+1)
    and never 0, and all-zero differences give p = 1. Seeded: the same input and ``seed`` give the
    same result.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap needs the same seeds on both sides (got {len(a)} and {len(b)})")
    if len(a) == 0:
        raise ValueError("paired_bootstrap needs at least one seed")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer (got {resamples!r})")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (got {confidence})")
    diffs = []
    for i, (ai, bi) in enumerate(zip(a, b)):
        d = _pair(ai, bi)
        if len(d) == 0:
            raise ValueError(f"seed {i} has no examples")
        diffs.append(d)
    s = len(diffs)
    diff = float(np.mean([d.mean() for d in diffs]))
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)  # D*_1 .. D*_B
    block = max(1, _BOOTSTRAP_CHUNK // (s * max(len(d) for d in diffs)))
    for start in range(0, resamples, block):
        r = min(resamples, start + block) - start
        picks = rng.integers(0, s, size=(r, s)) if s > 1 else np.zeros((r, 1), dtype=np.int64)  # (r, S) seeds
        means = np.empty(picks.shape)
        for i, d in enumerate(diffs):
            drawn = picks == i
            k = int(drawn.sum())
            if k:
                means[drawn] = _example_means(d, k, rng)
        boot[start : start + r] = means.mean(axis=1)
    low, high = (float(q) for q in np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2]))
    at_most, at_least = int(np.sum(boot <= 0)), int(np.sum(boot >= 0))
    p = min(1.0, 2 * min(at_most + 1, at_least + 1) / (resamples + 1))
    sizes = [len(d) for d in diffs]
    notes = []
    if s == 1:
        method = "paired bootstrap over examples"
        notes.append("one seed: the interval covers evaluation-set noise only, not seed-to-seed variation")
    else:
        method = "hierarchical paired bootstrap (seeds, then examples)"
        if s < 5:
            notes.append(f"only {s} seeds: resampling them captures seed-to-seed variation coarsely")
    if len(set(sizes)) > 1:
        notes.append(f"seeds have {min(sizes)} to {max(sizes)} examples")
    return BootstrapResult(diff, low, high, p, s, min(sizes), resamples, method, "; ".join(notes))


# ---- multiple comparisons and correlation -----------------------------------------------------


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni (Holm 1979) adjusted p-values, in the input order.

    Sort p_(1) <= ... <= p_(m); adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    Rejecting where adjusted p < alpha controls the family-wise error rate at alpha.
    A NaN p-value (no test possible) counts as 1.0. Example: [0.01, 0.04, 0.03, 0.005] ->
    [0.03, 0.06, 0.06, 0.02].
    """
    p = [1.0 if (v is None or not math.isfinite(v)) else min(1.0, max(0.0, float(v))) for v in p_values]
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def spearman(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Spearman's (1904) rank correlation: the Pearson correlation of the ranks of x and y
    (ties get average ranks), with scipy.stats.spearmanr's two-sided p-value (t approximation,
    t = rho sqrt((n-2)/(1-rho^2)), df = n - 2).

    Fewer than 3 points, or a constant x or y: rho and p are NaN (undefined) and ``note`` says why.
    """
    a, b = _array(x, "x"), _array(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"spearman needs equal lengths (got {len(a)} and {len(b)})")
    n = len(a)
    if n < 3:
        return Correlation(_NAN, _NAN, n, f"{n} points: a correlation needs at least 3")
    if np.all(a == a[0]) or np.all(b == b[0]):
        return Correlation(_NAN, _NAN, n, "one side is constant: the correlation is undefined")
    res = _st.spearmanr(a, b)
    return Correlation(float(res.statistic), float(res.pvalue), n)


def between_within(groups: Mapping[str, Sequence[tuple[float, float]]]) -> tuple[Correlation, Correlation]:
    """Between-variant and within-variant Spearman correlation of (x, y) points grouped by variant.

    Runs of one variant share their settings, so pooling every run as an independent point mixes two
    questions and overstates n (30 runs of 5 variants: pooled rho = -0.55, p = 0.0016, while across
    the 5 variant means rho = -0.70, p = 0.19 and within variants rho = +0.52). Returned separately:

    * between: :func:`spearman` of the variant means (mean x_v, mean y_v), n = number of variants;
    * within: Spearman rho of the deviations (x - mean x_v, y - mean y_v) pooled over the variants
      with at least 2 runs (a single run has no deviation to offer). Each variant mean uses up one
      degree of freedom, so the p-value uses the t approximation with df = N - K - 1 (N runs in K
      variants), t = rho sqrt(df / (1 - rho^2)), not the N - 2 of independent points.

    Either is NaN with a ``note`` when undefined (fewer than 3 variants; df < 1; a constant side).
    """
    means_x: list[float] = []
    means_y: list[float] = []
    dev_x: list[float] = []
    dev_y: list[float] = []
    k = 0
    for name, points in groups.items():
        arr = np.asarray([tuple(pt) for pt in points], dtype=np.float64)
        if arr.size == 0:
            continue
        if arr.ndim != 2 or arr.shape[1] != 2 or not np.all(np.isfinite(arr)):
            raise ValueError(f"variant {name!r}: points must be finite (x, y) pairs")
        mx, my = float(arr[:, 0].mean()), float(arr[:, 1].mean())
        means_x.append(mx)
        means_y.append(my)
        if len(arr) >= 2:
            k += 1
            for col, mean, out in ((0, mx, dev_x), (1, my, dev_y)):
                dev = arr[:, col] - mean
                dev[np.abs(dev) <= _roundoff(arr[:, col])] = 0.0  # equal values: deviation 0, not +-1e-17
                out.extend(dev.tolist())
    between = spearman(means_x, means_y)
    between = replace(between, note=between.note or f"across {between.n} variant means")
    n = len(dev_x)
    df = n - k - 1
    if n < 3 or df < 1:
        return between, Correlation(
            _NAN, _NAN, n, f"{n} runs in {k} variants with 2 or more runs: too few for a within-variant correlation"
        )
    x, y = np.asarray(dev_x), np.asarray(dev_y)
    if np.all(x == x[0]) or np.all(y == y[0]):
        return between, Correlation(
            _NAN, _NAN, n, "no spread within variants on one side: the correlation is undefined"
        )
    rho = float(_st.spearmanr(x, y).statistic)
    if abs(rho) >= 1.0:
        p = 0.0
    else:
        p = float(2 * _st.t.sf(abs(rho) * math.sqrt(df / (1 - rho**2)), df))
    note = f"deviations from each variant's mean, {n} runs in {k} variants; p with df = {df} (one lost per variant)"
    return between, Correlation(rho, p, n, note)
