"""Statistics for comparing runs across seeds: plain functions on lists of floats.

No I/O and no printing: :mod:`kdgeo.compare` loads run directories and calls these. Every test
returns a :class:`TestResult` whose p-value is two-sided. Degenerate inputs get a defined,
documented answer instead of scipy's NaN wherever a textbook answer exists:

* identical paired samples (every difference 0): difference 0, p = 1.0 for every test;
* constant non-zero paired differences (zero variance): t = +-inf, p = 0.0 for the t-test
  (the limit of the t-test as the spread of the differences goes to 0);
* two samples that are each constant: Welch p = 1.0 when the constants agree, 0.0 otherwise.

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
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

EXACT_SIGN_FLIP_MAX_N = 12
"""Paired permutation tests enumerate all 2^n sign flips up to this n (4096 flips)."""

EXACT_SPLITS_MAX = 20_000
"""Two-sample permutation tests enumerate every split when there are at most this many."""

MONTE_CARLO_RESAMPLES = 9_999
"""Resamples for a Monte-Carlo permutation test (seeded: the same data give the same p)."""

_NAN = float("nan")


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
    """One two-sided test. ``method`` names it; ``note`` explains a degenerate case ('' if none)."""

    method: str
    statistic: float
    p_value: float
    n: int
    note: str = ""


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
    (scipy.stats.ttest_rel). All d_i = 0: t = 0, p = 1.0. Constant d_i != 0: t = +-inf,
    p = 0.0 (differences equal within float round-off count as constant). n < 2: p = NaN.
    """
    d = _pair(a, b)
    n = len(d)
    if n < 2:
        return TestResult("paired t", _NAN, _NAN, n, f"{n} pair: the t-test needs at least 2")
    if np.all(d == 0):
        return TestResult("paired t", 0.0, 1.0, n, "identical paired values: difference 0, p = 1")
    if _constant(d, _roundoff(_array(a), _array(b))):
        return TestResult(
            "paired t",
            math.copysign(math.inf, d.mean()),
            0.0,
            n,
            "constant non-zero differences: zero variance, t infinite",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = _st.ttest_1samp(d, 0.0)  # = ttest_rel(a, b)
    return TestResult("paired t", float(res.statistic), float(res.pvalue), n)


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Wilcoxon (1945) signed-rank test of symmetry of d = a - b about 0.

    Zero differences are dropped (Wilcoxon's convention); the remaining |d_i| are ranked and
    W = min(W+, W-), the smaller sum of ranks of one sign. scipy.stats.wilcoxon picks the exact
    null distribution for small n, the normal approximation otherwise. All d_i = 0: p = 1.0.
    With n' non-zero differences the smallest attainable p is 2 / 2^n' (0.0625 for n' = 5), so
    fewer than 6 pairs can never reach p < 0.05: ``note`` says so.
    """
    d = _pair(a, b)
    n = len(d)
    nonzero = int(np.count_nonzero(d))
    if n == 0:
        return TestResult("Wilcoxon signed-rank", _NAN, _NAN, 0, "no pairs")
    if nonzero == 0:
        return TestResult("Wilcoxon signed-rank", 0.0, 1.0, n, "all differences are zero: p = 1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = _st.wilcoxon(d, zero_method="wilcox")
    note = ""
    if nonzero < 6:
        note = (
            f"{nonzero} non-zero difference{'s' if nonzero != 1 else ''}: smallest possible p is {2 / 2**nonzero:.3g}"
        )
    return TestResult("Wilcoxon signed-rank", float(res.statistic), min(1.0, float(res.pvalue)), n, note)


def _ge(values: np.ndarray, observed: float) -> np.ndarray:
    """values >= observed, forgiving float round-off in sums of the same numbers."""
    return values >= observed - 1e-12 * max(1.0, abs(observed))


def permutation_paired(a: Sequence[float], b: Sequence[float], seed: int = 0) -> TestResult:
    """Paired permutation (sign-flip) test of mean(a - b) = 0 (Fisher 1935).

    Under H0 each d_i is as likely to be -d_i. Statistic T = |mean(d)|;
    p = #{ s in {-1,+1}^n : |mean(s * d)| >= T } / 2^n, enumerated exactly for
    n <= EXACT_SIGN_FLIP_MAX_N; above that B = MONTE_CARLO_RESAMPLES random flips (seeded) and
    p = (k + 1) / (B + 1) (Phipson & Smyth 2010). All d_i = 0: p = 1.0.
    """
    d = _pair(a, b)
    n = len(d)
    if n == 0:
        return TestResult("paired permutation", _NAN, _NAN, 0, "no pairs")
    observed = abs(float(d.mean()))
    if np.all(d == 0):
        return TestResult("paired permutation", 0.0, 1.0, n, "all differences are zero: p = 1")
    if n <= EXACT_SIGN_FLIP_MAX_N:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # (2^n, n)
        p = float(_ge(np.abs(signs @ d) / n, observed).mean())
        note = "exact (all 2^n sign flips)"
        if n < 6:
            note += f"; smallest possible p is {2 / 2**n:.3g}"
        return TestResult("paired permutation", float(d.mean()), p, n, note)
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(MONTE_CARLO_RESAMPLES, n))
    k = int(_ge(np.abs(signs @ d) / n, observed).sum())
    p = (k + 1) / (MONTE_CARLO_RESAMPLES + 1)
    return TestResult("paired permutation", float(d.mean()), p, n, f"Monte Carlo, {MONTE_CARLO_RESAMPLES} sign flips")


# ---- unpaired tests (different seeds) ---------------------------------------------------------


def welch_t(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Welch's (1947) unequal-variance t-test of mean(a) = mean(b).

    t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b), Welch-Satterthwaite df (see
    :func:`mean_difference_ci`); scipy.stats.ttest_ind(equal_var=False). Both samples constant:
    p = 1.0 if the constants agree, else t = +-inf, p = 0.0. A group with one value: p = NaN.
    """
    x, y = _array(a, "a"), _array(b, "b")
    n = len(x) + len(y)
    if len(x) < 2 or len(y) < 2:
        return TestResult("Welch t", _NAN, _NAN, n, "Welch's t-test needs at least 2 runs per variant")
    tol = _roundoff(x, y)
    if _constant(x, tol) and _constant(y, tol):
        if abs(x.mean() - y.mean()) <= tol:
            return TestResult("Welch t", 0.0, 1.0, n, "identical constant samples: p = 1")
        return TestResult(
            "Welch t",
            math.copysign(math.inf, x.mean() - y.mean()),
            0.0,
            n,
            "two constant samples: zero variance, t infinite",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = _st.ttest_ind(x, y, equal_var=False)
    return TestResult("Welch t", float(res.statistic), float(res.pvalue), n)


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Mann-Whitney (1947) U test (Wilcoxon rank-sum) of P(A > B) = P(B > A).

    U_a = R_a - n_a (n_a + 1) / 2 with R_a the rank sum of a in the pooled sample; the exact null
    distribution for small samples without ties, the normal approximation otherwise
    (scipy.stats.mannwhitneyu, two-sided). Every value equal: U = n_a n_b / 2, p = 1.0.
    """
    x, y = _array(a, "a"), _array(b, "b")
    n = len(x) + len(y)
    if len(x) == 0 or len(y) == 0:
        return TestResult("Mann-Whitney U", _NAN, _NAN, n, "an empty sample")
    if np.all(np.concatenate([x, y]) == x[0]):
        return TestResult("Mann-Whitney U", len(x) * len(y) / 2, 1.0, n, "all values are equal: p = 1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = _st.mannwhitneyu(x, y, alternative="two-sided")
    return TestResult("Mann-Whitney U", float(res.statistic), float(res.pvalue), n)


def permutation_unpaired(a: Sequence[float], b: Sequence[float], seed: int = 0) -> TestResult:
    """Two-sample permutation test of mean(a) = mean(b) (Fisher 1935).

    Statistic T = |mean(a) - mean(b)|; p = share of the C(n_a + n_b, n_a) relabellings of the
    pooled values with |difference of means| >= T, enumerated exactly when there are at most
    EXACT_SPLITS_MAX, else MONTE_CARLO_RESAMPLES random relabellings (seeded) and
    p = (k + 1) / (B + 1). Every value equal: p = 1.0.
    """
    x, y = _array(a, "a"), _array(b, "b")
    na, nb = len(x), len(y)
    if na == 0 or nb == 0:
        return TestResult("permutation", _NAN, _NAN, na + nb, "an empty sample")
    pooled = np.concatenate([x, y])
    diff = float(x.mean() - y.mean())
    if np.all(pooled == pooled[0]):
        return TestResult("permutation", 0.0, 1.0, na + nb, "all values are equal: p = 1")
    total = pooled.sum()
    n = na + nb
    observed = abs(diff)
    if math.comb(n, na) <= EXACT_SPLITS_MAX:
        sums = np.array([pooled[list(idx)].sum() for idx in itertools.combinations(range(n), na)])
        diffs = np.abs(sums / na - (total - sums) / nb)
        return TestResult("permutation", diff, float(_ge(diffs, observed).mean()), n, "exact (all relabellings)")
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
    )


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
