"""kdgeo.stats against textbook values and hand computations, plus degenerate inputs.

Golden numbers are written out on purpose (never regenerated in the test). The paired and
Welch numbers are the classic "sleep" data of Student (1908) / Cushny & Peebles (R's
`t.test(extra ~ group, data = sleep)`): paired t = -4.0621, df 9, p = 0.002833; Welch
t = -1.8608, df 17.776, p = 0.07939, 95% CI of the difference [-3.3655, 0.2055].
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as st

from kdgeo import stats

SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


# ---- describe / confidence intervals ----------------------------------------------------------


def test_describe_matches_hand_computation():
    # mean 3, s = sqrt(2.5), t_{0.975,4} = 2.776445105, half width = 2.776445105 * sqrt(2.5) / sqrt(5)
    s = stats.describe([1, 2, 3, 4, 5])
    half = 2.776445105197793 * math.sqrt(2.5) / math.sqrt(5)
    assert s.n == 5 and s.mean == 3.0
    assert s.std == pytest.approx(1.5811388300841898, rel=1e-12)
    assert s.ci_low == pytest.approx(3 - half, rel=1e-9) and s.ci_high == pytest.approx(3 + half, rel=1e-9)
    assert s.ci_low == pytest.approx(1.036756838522443, abs=1e-9)


def test_describe_confidence_level():
    # 90%: t_{0.95,4} = 2.131846786
    s = stats.describe([1, 2, 3, 4, 5], confidence=0.90)
    assert s.ci_high - s.mean == pytest.approx(2.131846786326649 * math.sqrt(2.5 / 5), rel=1e-9)


def test_describe_degenerate():
    one = stats.describe([0.8])
    assert one.n == 1 and one.mean == 0.8
    assert math.isnan(one.std) and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    const = stats.describe([0.5, 0.5, 0.5])
    assert const.std == 0.0 and const.ci_low == 0.5 and const.ci_high == 0.5
    with pytest.raises(ValueError):
        stats.describe([])
    with pytest.raises(ValueError, match="NaN"):
        stats.describe([1.0, float("nan")])


def test_difference_ci_paired_and_welch():
    d, lo, hi = stats.mean_difference_ci(SLEEP_1, SLEEP_2, paired=True)
    assert d == pytest.approx(-1.58) and lo == pytest.approx(-2.4598858, abs=1e-6) and hi == pytest.approx(-0.7001142, abs=1e-6)
    d, lo, hi = stats.mean_difference_ci(SLEEP_1, SLEEP_2, paired=False)
    assert d == pytest.approx(-1.58) and lo == pytest.approx(-3.3654832, abs=1e-6) and hi == pytest.approx(0.2054832, abs=1e-6)
    d, lo, hi = stats.mean_difference_ci([1.0], [2.0, 3.0], paired=False)
    assert d == -1.5 and math.isnan(lo) and math.isnan(hi)


# ---- paired tests ------------------------------------------------------------------------------


def test_paired_t_sleep_data():
    r = stats.paired_t(SLEEP_1, SLEEP_2)
    assert r.statistic == pytest.approx(-4.062127683382037, rel=1e-9)
    assert r.p_value == pytest.approx(0.002832890197384273, rel=1e-9)
    assert r.n == 10 and r.note == ""


def test_paired_t_degenerate():
    same = stats.paired_t([0.8, 0.7, 0.9], [0.8, 0.7, 0.9])
    assert same.statistic == 0.0 and same.p_value == 1.0 and "identical" in same.note
    # constant non-zero differences: t is undefined, the exact sign-flip test decides, p = 2 / 2^3 (was t = inf, p = 0)
    shifted = stats.paired_t([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert shifted.statistic == 1.0 and shifted.p_value == pytest.approx(0.25) and "sign-flip" in shifted.method
    assert "zero variance" in shifted.note and shifted.estimate == 1.0 and shifted.min_p == pytest.approx(0.25)
    # 0.8 - 0.75 and 0.7 - 0.65 differ only by float round-off: still constant differences
    roundoff = stats.paired_t([0.8, 0.7, 0.9], [0.75, 0.65, 0.85])
    assert roundoff.p_value == pytest.approx(0.25) and "sign-flip" in roundoff.method
    assert stats.wilcoxon([0.3], [0.1 + 0.2]).p_value == 1.0  # 0.1 + 0.2 != 0.3 in floats, a zero difference all the same
    one = stats.paired_t([1.0], [2.0])
    assert math.isnan(one.p_value) and "at least 2" in one.note
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_t([1.0, 2.0], [1.0])


def test_wilcoxon_exact_textbook():
    # all 5 differences positive: W- = 0, exact two-sided p = 2 / 2^5
    r = stats.wilcoxon([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert r.statistic == 0.0 and r.p_value == pytest.approx(0.0625)
    assert "smallest possible p is 0.0625" in r.note
    # d = 1, 2, -3, 4, 5, 6: W- = 3; subsets of {1..6} summing to <= 3: {}, {1}, {2}, {3}, {1,2} -> p = 2 * 5/64
    r = stats.wilcoxon([1, 2, -3, 4, 5, 6], [0] * 6)
    assert r.statistic == 3.0 and r.p_value == pytest.approx(10 / 64)


def test_wilcoxon_zeros_and_all_zero():
    # one zero difference is dropped (Wilcoxon's convention): 9 negative differences, p = 2 / 2^9
    r = stats.wilcoxon(SLEEP_1, SLEEP_2)
    assert r.p_value == pytest.approx(2 / 2**9)
    same = stats.wilcoxon([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert same.p_value == 1.0 and "zero" in same.note
    one = stats.wilcoxon([1.0], [0.0])
    assert one.p_value == 1.0


def test_permutation_paired_exact():
    r = stats.permutation_paired([1, 2, 3, 4, 5], [0] * 5)
    assert r.p_value == pytest.approx(2 / 32) and "exact" in r.note
    # parity with scipy.stats.permutation_test (exact enumeration of sign flips)
    r = stats.permutation_paired(SLEEP_1, SLEEP_2)
    assert r.p_value == pytest.approx(0.00390625)
    d = [0.3, -0.1, 0.2, 0.25, -0.05, 0.15]
    ref = st.permutation_test((d,), lambda x, axis: abs(x.mean(axis=axis)), permutation_type="samples",
                              n_resamples=math.inf, alternative="greater", vectorized=True).pvalue
    assert stats.permutation_paired(d, [0.0] * 6).p_value == pytest.approx(ref)
    assert stats.permutation_paired(d, [0.0] * 6).p_value == pytest.approx(10 / 64)  # hand count: 5 flip sets sum <= 0, 5 >= 0.75


def test_permutation_paired_degenerate_and_monte_carlo():
    same = stats.permutation_paired([0.1, 0.2], [0.1, 0.2])
    assert same.p_value == 1.0
    one = stats.permutation_paired([1.0], [0.0])
    assert one.p_value == 1.0  # both sign flips reach |mean|
    big = stats.permutation_paired(list(range(1, 16)), [0] * 15)
    assert big.p_value == pytest.approx(1 / 10000) and "Monte Carlo" in big.note
    assert stats.permutation_paired(list(range(1, 16)), [0] * 15).p_value == big.p_value  # seeded


# ---- unpaired tests ----------------------------------------------------------------------------


def test_welch_sleep_data():
    r = stats.welch_t(SLEEP_1, SLEEP_2)
    assert r.statistic == pytest.approx(-1.8608134674868526, rel=1e-9)
    assert r.p_value == pytest.approx(0.0793941401873583, rel=1e-9)


def test_welch_degenerate():
    assert stats.welch_t([1.0, 1.0], [1.0, 1.0]).p_value == 1.0
    # two different constants: t undefined, the exact permutation test decides: 2 of C(4, 2) = 6 splits (was p = 0)
    r = stats.welch_t([1.0, 1.0], [2.0, 2.0])
    assert r.p_value == pytest.approx(1 / 3) and r.statistic == -1.0 and "permutation" in r.method
    assert r.estimate == -1.0 and r.min_p == pytest.approx(1 / 3)
    assert stats.welch_t([1.0, 1.0, 1.0], [2.0, 2.0]).p_value == pytest.approx(1 / 10)  # unequal sizes: no mirror split
    one = stats.welch_t([1.0], [2.0, 3.0])
    assert math.isnan(one.p_value) and "at least 2" in one.note


def test_mann_whitney_exact_textbook():
    # complete separation of 3 vs 3: U = 0, exact two-sided p = 2 / C(6, 3) = 0.1
    r = stats.mann_whitney([1, 2, 3], [4, 5, 6])
    assert r.statistic == 0.0 and r.p_value == pytest.approx(0.1)
    assert stats.mann_whitney([1, 1], [1, 1]).p_value == 1.0


def test_permutation_unpaired():
    # 3 vs 3 separated: only the 2 extreme relabellings of C(6,3) = 20 reach |diff| = 3
    r = stats.permutation_unpaired([1, 2, 3], [4, 5, 6])
    assert r.p_value == pytest.approx(0.1) and "exact" in r.note
    a, b = [0.81, 0.79, 0.84, 0.80], [0.76, 0.78, 0.74, 0.79, 0.77]
    # statistic |mean(a) - mean(b)|, one-sided on it (scipy's default two-sided doubles a one-sided p instead)
    ref = st.permutation_test((a, b), lambda x, y, axis: abs(x.mean(axis=axis) - y.mean(axis=axis)), n_resamples=math.inf,
                              alternative="greater", vectorized=True).pvalue
    assert stats.permutation_unpaired(a, b).p_value == pytest.approx(ref)
    assert stats.permutation_unpaired([2.0, 2.0], [2.0]).p_value == 1.0


# ---- Holm and Spearman -------------------------------------------------------------------------


def test_holm_textbook():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_monotone_capped_and_nan():
    # Holm (1979) style example: sorted 0.01, 0.02, 0.03, 0.04, 0.05 x (5, 4, 3, 2, 1)
    assert stats.holm([0.05, 0.01, 0.04, 0.02, 0.03]) == pytest.approx([0.09, 0.05, 0.09, 0.08, 0.09])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([float("nan"), 0.01]) == pytest.approx([1.0, 0.02])
    assert stats.holm([0.03]) == [0.03]
    assert stats.holm([]) == []


def test_spearman():
    r = stats.spearman([1, 2, 3, 4], [2, 1, 4, 3])
    assert r.rho == pytest.approx(0.6) and r.p_value == pytest.approx(0.4)
    assert stats.spearman([1, 2, 3], [3, 2, 1]).rho == pytest.approx(-1.0)
    short = stats.spearman([1, 2], [1, 2])
    assert math.isnan(short.rho) and "at least 3" in short.note
    flat = stats.spearman([1, 2, 3], [1, 1, 1])
    assert math.isnan(flat.rho) and "constant" in flat.note


# ---- issue 13: no p = 0, direction, exact rank tests, gate reachability, per-example evidence ----------------


def _brute_sign_flip_rank_p(d: list[float]) -> float:
    """Wilcoxon exact p by listing every sign assignment of the midranks (zeros dropped), independent of kdgeo."""
    nz = [x for x in d if abs(x) > 1e-12]
    ranks = st.rankdata([round(abs(x), 12) for x in nz])  # rounding: float round-off is a tie, as in kdgeo
    total = ranks.sum()
    observed = abs(sum(r for r, x in zip(ranks, nz) if x > 0) - total / 2)
    hits = sum(
        abs(sum(r for r, s in zip(ranks, signs) if s) - total / 2) >= observed - 1e-9
        for signs in itertools.product((0, 1), repeat=len(nz))
    )
    return hits / 2 ** len(nz)


def _brute_split_rank_p(a: list[float], b: list[float]) -> float:
    """Mann-Whitney exact p by listing every split of the pooled midranks, independent of kdgeo."""
    pooled = [round(v, 12) for v in [*a, *b]]
    ranks = st.rankdata(pooled)
    na, n = len(a), len(pooled)
    center = na * (n + 1) / 2
    observed = abs(ranks[:na].sum() - center)
    splits = list(itertools.combinations(range(n), na))
    return sum(abs(ranks[list(s)].sum() - center) >= observed - 1e-9 for s in splits) / len(splits)


def test_zero_variance_issue_numbers_never_p_zero():
    # issue 13 item 1: (-0.002, -0.002) over two seeds gave p = 0, "significant"; the larger regression gave 0.20
    equal = stats.paired_t([0.800, 0.700], [0.802, 0.702])
    assert equal.p_value == pytest.approx(0.5) and equal.min_p == pytest.approx(0.5)
    assert equal.estimate == pytest.approx(-0.002) and "sign-flip" in equal.method
    larger = stats.paired_t([0.800, 0.700], [0.802, 0.704])
    assert larger.p_value == pytest.approx(0.20483276469913345, rel=1e-9) and "sign-flip" not in larger.method
    # the fallback is the exact sign-flip test: the same p as the permutation test, for every n
    for n in range(2, 9):
        a, b = [0.9] * n, [0.9 - 0.003] * n
        assert stats.paired_t(a, b).p_value == pytest.approx(2 / 2**n)
        assert stats.paired_t(a, b).p_value == pytest.approx(stats.permutation_paired(a, b).p_value)
    assert stats.paired_t([1.0] * 1100, [0.0] * 1100).p_value > 0  # 2 / 2^1100 underflows; never reported as 0


def test_no_test_returns_p_zero_on_extreme_inputs():
    cases = [([1.0, 2.0], [0.0, 1.0]), ([1e6, 1e6 + 1e-3, 1e6 + 2e-3] * 10, [0.0] * 30), ([1.0] * 40, [0.0] * 40)]
    for a, b in cases:
        for test in (stats.paired_t, stats.wilcoxon, stats.permutation_paired):
            assert test(a, b).p_value > 0, test.__name__
        for test in (stats.welch_t, stats.mann_whitney, stats.permutation_unpaired):
            assert test(a, b).p_value > 0, test.__name__
    assert stats.mcnemar_exact([True] * 3000, [False] * 3000).p_value > 0


def test_wilcoxon_exact_issue_number_and_scipy_parity():
    # issue 13 item 6: before scipy 1.15 wilcoxon used the normal approximation at n = 5: p = 0.043, exact 0.0625
    d = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert st.wilcoxon(d, method="approx").pvalue == pytest.approx(0.0431, abs=1e-4)
    assert stats.wilcoxon(d, [0.0] * 5).p_value == pytest.approx(0.0625)
    rng = np.random.default_rng(13)
    for n in [*range(1, 21), 50]:  # tie-free data: kdgeo's exact count equals scipy's exact distribution
        x, y = rng.normal(size=n), rng.normal(size=n)
        assert stats.wilcoxon(x, y).p_value == pytest.approx(st.wilcoxon(x, y, method="exact").pvalue, rel=1e-10)
        assert "exact" in stats.wilcoxon(x, y).note


def test_wilcoxon_ties_and_zeros_match_brute_force():
    rng = np.random.default_rng(7)
    cases = [
        [0.01, 0.01, -0.01, 0.02, 0.0, 0.02, 0.03],
        [0.005, 0.005, 0.005, -0.005, 0.0, 0.0],
    ]
    cases += [list(rng.integers(-3, 4, size=int(rng.integers(2, 13))) / 100) for _ in range(30)]
    for d in cases:
        r = stats.wilcoxon(d, [0.0] * len(d))
        assert r.p_value == pytest.approx(_brute_sign_flip_rank_p(d), abs=1e-12), d
        nonzero = sum(abs(x) > 1e-12 for x in d)
        assert r.min_p == pytest.approx(min(1.0, 2 / 2**nonzero))
    # accuracies: 0.81 - 0.80 and 0.82 - 0.81 differ in the 17th digit but are the same step, a tie
    a, b = [0.81, 0.82, 0.83, 0.79, 0.84, 0.77, 0.90], [0.80, 0.81, 0.81, 0.80, 0.82, 0.78, 0.88]
    d = [x - y for x, y in zip(a, b)]
    assert len(set(d)) == 5  # five distinct floats, three distinct steps (+0.01, -0.01, +0.02)
    assert stats.wilcoxon(a, b).p_value == pytest.approx(_brute_sign_flip_rank_p(d), abs=1e-12)
    assert stats.wilcoxon(a, b).p_value == pytest.approx(22 / 128)  # 22 of the 2^7 sign flips
    # beyond EXACT_RANK_MAX_N: the tie-corrected normal approximation, as scipy's (no continuity correction)
    d = list(rng.integers(-4, 6, size=70) / 100)
    ref = st.wilcoxon(d, zero_method="wilcox", method="approx", correction=False).pvalue
    r = stats.wilcoxon(d, [0.0] * 70)
    assert r.p_value == pytest.approx(ref, rel=1e-9) and "normal approximation" in r.note


def test_mann_whitney_exact_with_ties_issue_numbers():
    # issue 13 item 6: 4 vs 4 with ties, scipy's normal approximation gives 0.047, the exact permutation p is 6/70
    a, b = [0.80, 0.80, 0.80, 0.81], [0.81, 0.81, 0.82, 0.82]
    assert st.mannwhitneyu(a, b).pvalue == pytest.approx(0.047057, abs=1e-6)
    r = stats.mann_whitney(a, b)
    assert r.p_value == pytest.approx(6 / 70) and r.p_value == pytest.approx(0.0857, abs=1e-4)
    assert r.p_value == pytest.approx(_brute_split_rank_p(a, b))
    assert r.statistic == 1.0 and r.estimate == pytest.approx(-0.01) and r.min_p == pytest.approx(2 / 70)


def test_mann_whitney_scipy_parity_tie_free_and_brute_force_with_ties():
    rng = np.random.default_rng(11)
    for na, nb in [(1, 1), (1, 4), (2, 3), (3, 3), (4, 7), (8, 8), (5, 12), (25, 25)]:
        x, y = rng.normal(size=na), rng.normal(size=nb)
        ref = st.mannwhitneyu(x, y, method="exact").pvalue
        assert stats.mann_whitney(x, y).p_value == pytest.approx(min(1.0, ref), rel=1e-10), (na, nb)
    for _ in range(25):
        na, nb = (int(v) for v in rng.integers(1, 7, size=2))
        x, y = list(rng.integers(0, 4, size=na) / 10), list(rng.integers(0, 4, size=nb) / 10)
        if len(set(x + y)) == 1:
            continue
        assert stats.mann_whitney(x, y).p_value == pytest.approx(_brute_split_rank_p(x, y), abs=1e-12), (x, y)
    # scipy.stats.permutation_test on the same statistic (|rank sum - its mean|, midranks recomputed per split)
    x, y = [1.0, 2.0, 2.0, 3.0], [2.0, 3.0, 3.0, 4.0, 4.0]

    def dev(u: np.ndarray, v: np.ndarray) -> float:
        return float(abs(st.rankdata(np.concatenate([u, v]))[: len(u)].sum() - len(u) * (len(u) + len(v) + 1) / 2))

    ref = st.permutation_test((x, y), dev, n_resamples=math.inf, alternative="greater").pvalue
    assert stats.mann_whitney(x, y).p_value == pytest.approx(ref)
    # beyond EXACT_RANK_MAX_N: tie-corrected normal approximation without continuity correction, as scipy's
    x, y = list(rng.integers(0, 8, size=30)), list(rng.integers(1, 9, size=31))
    ref = st.mannwhitneyu(x, y, method="asymptotic", use_continuity=False).pvalue
    r = stats.mann_whitney(x, y)
    assert r.p_value == pytest.approx(ref, rel=1e-9) and "normal approximation" in r.note


def test_hodges_lehmann_hand_values():
    # Walsh averages of d = (1, 2, 3): 1, 1.5, 2, 2, 2.5, 3 -> median 2
    assert stats.hodges_lehmann_paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]) == 2.0
    # all a_i - b_j for (1, 2) vs (0, 4): 1, 2, -3, -2 -> median -0.5
    assert stats.hodges_lehmann([1.0, 2.0], [0.0, 4.0]) == -0.5
    assert math.isnan(stats.hodges_lehmann_paired([], [])) and math.isnan(stats.hodges_lehmann([], [1.0]))


def test_direction_of_rank_test_follows_hodges_lehmann():
    # issue 13 item 2: wins on 11 of 12 seeds, collapses on one: the mean says worse, the rank test says better
    a, b = [0.81] * 11 + [0.30], [0.80] * 12
    r = stats.wilcoxon(a, b)
    assert r.estimate == pytest.approx(0.01) and stats.paired_t(a, b).estimate < 0
    # the issue's one-sided p = 0.017: half the symmetric two-sided one, 68 of the 2^12 sign flips
    assert r.p_value / 2 == pytest.approx(0.0166015625) and r.p_value / 2 == pytest.approx(68 / 4096)
    assert r.p_value == pytest.approx(_brute_sign_flip_rank_p([x - y for x, y in zip(a, b)]))
    mw = stats.mann_whitney([0.81] * 5 + [0.30], [0.80] * 6)
    assert mw.estimate == pytest.approx(0.01)
    for test in (stats.permutation_paired, stats.permutation_unpaired, stats.welch_t):
        assert test(a, b).estimate == pytest.approx(np.mean(a) - np.mean(b))


def test_swapping_a_and_b_flips_the_estimate_and_keeps_p():
    rng = np.random.default_rng(3)
    a, b = list(rng.normal(0.8, 0.01, 7)), list(rng.normal(0.79, 0.01, 7))
    tests = (stats.paired_t, stats.wilcoxon, stats.permutation_paired)
    for test in (*tests, stats.welch_t, stats.mann_whitney, stats.permutation_unpaired):
        ab, ba = test(a, b), test(b, a)
        assert ab.estimate == pytest.approx(-ba.estimate), test.__name__
        assert ab.p_value == pytest.approx(ba.p_value) and ab.min_p == ba.min_p, test.__name__
    ca, cb = list(rng.random(40) < 0.8), list(rng.random(40) < 0.7)
    m1, m2 = stats.mcnemar_exact(ca, cb), stats.mcnemar_exact(cb, ca)
    assert m1.estimate == pytest.approx(-m2.estimate) and m1.p_value == pytest.approx(m2.p_value)
    for paired in (True, False):
        pi_ab, pi_ba = stats.prob_improvement(a, b, paired, True), stats.prob_improvement(b, a, paired, True)
        assert pi_ab == pytest.approx(1 - pi_ba)
        lo = stats.difference_bound(a, b, paired, 0.95, "lower")
        assert lo == pytest.approx(-stats.difference_bound(b, a, paired, 0.95, "upper"))


def test_min_p_and_runs_needed():
    assert stats.min_p("t", True, 2, 2) == 0.0 and stats.min_p("t", True, 1, 1) == 1.0
    assert stats.min_p("wilcoxon", True, 5, 5) == pytest.approx(0.0625)
    assert stats.min_p("permutation", True, 6, 6) == pytest.approx(2 / 64)
    assert stats.min_p("wilcoxon", False, 3, 3) == pytest.approx(0.1)
    assert stats.min_p("wilcoxon", False, 4, 4) == pytest.approx(2 / 70)
    assert stats.min_p("permutation", False, 1, 2) == pytest.approx(1 / 3)  # unequal sizes: no mirror split
    assert stats.min_p("permutation", True, 20, 20) == pytest.approx(1 / 10_000)  # Monte-Carlo floor
    assert stats.min_p("wilcoxon", True, 1, 1) == 1.0 and stats.min_p("permutation", False, 0, 3) == 1.0
    # attained: the most extreme data give exactly min_p
    outlier = stats.permutation_unpaired([10.0], [0.0, 0.0])
    assert outlier.p_value == pytest.approx(stats.min_p("permutation", False, 1, 2))
    assert stats.mann_whitney([1, 2, 3, 4], [5, 6, 7, 8]).p_value == pytest.approx(stats.min_p("wilcoxon", False, 4, 4))
    # and no data do better (every arrangement of distinct values, 3 vs 3 and 5 pairs)
    for perm in itertools.permutations(range(6)):
        assert stats.mann_whitney(perm[:3], perm[3:]).p_value >= stats.min_p("wilcoxon", False, 3, 3) - 1e-12
    for signs in itertools.product((1, -1), repeat=5):
        d = [s * (i + 1) for i, s in enumerate(signs)]
        assert stats.wilcoxon(d, [0] * 5).p_value >= stats.min_p("wilcoxon", True, 5, 5) - 1e-12
    assert stats.runs_needed("t", True, 0.05) == 2 and stats.runs_needed("t", False, 0.05) == 2
    assert stats.runs_needed("wilcoxon", True, 0.05) == 6 and stats.runs_needed("permutation", True, 0.05) == 6
    assert stats.runs_needed("wilcoxon", False, 0.05) == 4 and stats.runs_needed("permutation", False, 0.05) == 4
    assert stats.runs_needed("wilcoxon", True, 0.01) == 8 and stats.runs_needed("wilcoxon", False, 0.01) == 5
    assert stats.runs_needed("permutation", True, 1e-5) is None  # Monte-Carlo floor 1e-4 beyond 12 pairs
    assert stats.runs_needed("wilcoxon", True, 0.0) is None
    with pytest.raises(ValueError, match="unknown test"):
        stats.min_p("mcnemar", True, 3, 3)


def test_prob_improvement():
    # pairs: a wins 2, loses 1, ties 1 -> (2 + 0.5) / 4
    a, b = [0.8, 0.7, 0.6, 0.5], [0.7, 0.6, 0.7, 0.5]
    assert stats.prob_improvement(a, b, True, True) == pytest.approx(2.5 / 4)
    assert stats.prob_improvement(a, b, True, False) == pytest.approx(1.5 / 4)  # loss: lower is better
    # unpaired, higher is better: U_a / (n_a n_b), ties 1/2, as scipy's U
    x, y = [0.8, 0.7, 0.7], [0.7, 0.6]
    assert stats.prob_improvement(x, y, False, True) == pytest.approx(st.mannwhitneyu(x, y).statistic / 6)
    assert stats.prob_improvement([0.81 - 0.01], [0.80], True, True) == 0.5  # round-off: a tie
    assert math.isnan(stats.prob_improvement([], [], True, True))


def test_difference_bound_matches_scipy_one_sided_intervals():
    d = np.array(SLEEP_1) - np.array(SLEEP_2)
    upper = st.ttest_1samp(d, 0.0, alternative="less").confidence_interval(0.95).high
    assert stats.difference_bound(SLEEP_1, SLEEP_2, True, 0.95, "upper") == pytest.approx(upper, rel=1e-9)
    lower = st.ttest_1samp(d, 0.0, alternative="greater").confidence_interval(0.90).low
    assert stats.difference_bound(SLEEP_1, SLEEP_2, True, 0.90, "lower") == pytest.approx(lower, rel=1e-9)
    welch = st.ttest_ind(SLEEP_1, SLEEP_2, equal_var=False, alternative="less").confidence_interval(0.95).high
    assert stats.difference_bound(SLEEP_1, SLEEP_2, False, 0.95, "upper") == pytest.approx(welch, rel=1e-9)
    assert stats.difference_bound([0.8, 0.7], [0.802, 0.702], True, 0.95, "upper") == pytest.approx(-0.002)
    assert math.isnan(stats.difference_bound([0.8], [0.7], True, 0.95, "upper"))
    assert math.isnan(stats.difference_bound([0.8], [0.7, 0.6], False, 0.95, "lower"))
    with pytest.raises(ValueError, match="side"):
        stats.difference_bound(SLEEP_1, SLEEP_2, True, 0.95, "both")  # type: ignore[arg-type]


def test_mcnemar_exact_matches_binomtest():
    rng = np.random.default_rng(5)
    for n in (1, 5, 30, 200, 2000):
        a, b = list(rng.random(n) < 0.8), list(rng.random(n) < 0.75)
        r = stats.mcnemar_exact(a, b)
        n10 = sum(x and not y for x, y in zip(a, b))
        m = sum(x != y for x, y in zip(a, b))
        ref = st.binomtest(n10, m).pvalue if m else 1.0
        assert r.p_value == pytest.approx(ref, rel=1e-9) and r.statistic == n10
        assert r.estimate == pytest.approx((sum(a) - sum(b)) / n)
    same = stats.mcnemar_exact([True, False, True], [True, False, True])
    assert same.p_value == 1.0 and same.estimate == 0.0 and "no discordant" in same.note
    # 5 discordant examples all for a: 2 / 2^5, the smallest p with 5
    r = stats.mcnemar_exact([True] * 5 + [False] * 3, [False] * 5 + [False] * 3)
    assert r.p_value == pytest.approx(0.0625) and r.min_p == pytest.approx(0.0625)
    assert stats.mcnemar_exact([1, 0], [0, 0]).p_value == 1.0  # 0/1 accepted
    with pytest.raises(ValueError, match="booleans"):
        stats.mcnemar_exact([0.5], [True])
    with pytest.raises(ValueError, match="same examples"):
        stats.mcnemar_exact([True], [True, False])


def test_paired_bootstrap_seeded_and_defined():
    rng = np.random.default_rng(2)
    a = [list(rng.random(300) < 0.8) for _ in range(3)]
    b = [list(rng.random(300) < 0.78) for _ in range(3)]
    fa, fb = [[float(v) for v in s] for s in a], [[float(v) for v in s] for s in b]
    r1 = stats.paired_bootstrap(fa, fb, resamples=999, seed=4)
    assert r1 == stats.paired_bootstrap(fa, fb, resamples=999, seed=4)  # seeded: identical
    assert r1 != stats.paired_bootstrap(fa, fb, resamples=999, seed=5)
    assert r1.diff == pytest.approx(np.mean(np.array(fa) - np.array(fb)))
    assert r1.n_seeds == 3 and r1.n_examples == 300 and r1.resamples == 999 and "hierarchical" in r1.method
    assert r1.ci_low <= r1.diff <= r1.ci_high
    # p is the smallest 1 - c at which the percentile interval excludes 0: p < 0.05 exactly when the 95% one does
    for shift in (0.0, 0.02, 0.05, 0.1):
        shifted = [[v + shift for v in s] for s in fa]
        r = stats.paired_bootstrap(shifted, fb, resamples=999, seed=1)
        assert (r.p_value < 0.05) == (r.ci_low > 0 or r.ci_high < 0), shift
    zero = stats.paired_bootstrap([[0.5, 0.7]], [[0.5, 0.7]], resamples=99)
    assert zero.p_value == 1.0 and zero.ci_low == zero.ci_high == 0.0 and "one seed" in zero.note
    const = stats.paired_bootstrap([[1.0, 1.0]], [[0.0, 0.0]], resamples=99)
    assert const.p_value == pytest.approx(2 / 100)  # never 0
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_bootstrap([[1.0]], [])
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_bootstrap([[1.0, 2.0]], [[1.0]])


def test_paired_bootstrap_single_seed_matches_normal_theory():
    rng = np.random.default_rng(8)
    d = rng.normal(0.01, 0.2, size=2000)
    r = stats.paired_bootstrap([list(d)], [[0.0] * 2000], resamples=4999, seed=0)
    half = 1.96 * d.std(ddof=1) / math.sqrt(2000)
    assert r.ci_low == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert r.ci_high == pytest.approx(d.mean() + half, abs=0.1 * half)


def test_paired_bootstrap_coverage_on_fabricated_seeds():
    # true difference 0; each seed shifts all its examples by a seed effect (sd 0.05), examples add noise (sd 0.2)
    rng = np.random.default_rng(21)
    reps, seeds, examples = 150, 8, 40
    hier = flat = 0
    for rep in range(reps):
        per_seed = [rng.normal(0, 0.05) + rng.normal(0, 0.2, examples) for _ in range(seeds)]
        zeros = [[0.0] * examples for _ in range(seeds)]
        r = stats.paired_bootstrap([list(s) for s in per_seed], zeros, resamples=499, seed=rep)
        hier += r.ci_low <= 0 <= r.ci_high
        pooled = stats.paired_bootstrap([list(np.concatenate(per_seed))], [[0.0] * seeds * examples], resamples=499)
        flat += pooled.ci_low <= 0 <= pooled.ci_high
    assert 0.85 <= hier / reps <= 1.0  # hierarchical: near the nominal 95%
    assert flat / reps < 0.8  # examples alone ignore the seed effect: far too narrow


def test_between_and_within_variant_correlation():
    # means fall with x (between rho = -1) while within each variant y rises with x (within rho > 0)
    groups = {
        "a": [(0.10, 0.92), (0.12, 0.93), (0.14, 0.94)],
        "b": [(0.20, 0.82), (0.22, 0.83), (0.25, 0.85)],
        "c": [(0.30, 0.71), (0.33, 0.74), (0.31, 0.72)],
        "d": [(0.40, 0.61), (0.45, 0.66), (0.42, 0.62)],
        "single": [(0.5, 0.5)],  # one run: a mean for "between", no deviation for "within"
    }
    between, within = stats.between_within(groups)
    means = {k: np.mean(v, axis=0) for k, v in groups.items()}
    ref = st.spearmanr([m[0] for m in means.values()], [m[1] for m in means.values()])
    assert between.n == 5 and between.rho == pytest.approx(ref.statistic)
    assert between.p_value == pytest.approx(ref.pvalue)
    dx = [x - means[k][0] for k, v in groups.items() if len(v) > 1 for x, _ in v]
    dy = [y - means[k][1] for k, v in groups.items() if len(v) > 1 for _, y in v]
    rho = st.spearmanr(dx, dy).statistic
    df = 12 - 4 - 1
    assert within.n == 12 and within.rho == pytest.approx(rho) and rho > 0.8 and between.rho < -0.8
    assert within.p_value == pytest.approx(2 * st.t.sf(abs(rho) * math.sqrt(df / (1 - rho**2)), df))
    assert "df = 7" in within.note
    few_between, few_within = stats.between_within({"a": [(0.1, 0.9), (0.2, 0.8)], "b": [(0.3, 0.7)]})
    assert math.isnan(few_between.rho) and math.isnan(few_within.rho) and "too few" in few_within.note
