"""kdgeo.stats against textbook values and hand computations, plus degenerate inputs.

Golden numbers are written out on purpose (never regenerated in the test). The paired and
Welch numbers are the classic "sleep" data of Student (1908) / Cushny & Peebles (R's
`t.test(extra ~ group, data = sleep)`): paired t = -4.0621, df 9, p = 0.002833; Welch
t = -1.8608, df 17.776, p = 0.07939, 95% CI of the difference [-3.3655, 0.2055].
"""

from __future__ import annotations

import math

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
    shifted = stats.paired_t([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert shifted.statistic == math.inf and shifted.p_value == 0.0 and "constant" in shifted.note
    # 0.8 - 0.75 and 0.7 - 0.65 differ only by float round-off: still constant differences
    roundoff = stats.paired_t([0.8, 0.7, 0.9], [0.75, 0.65, 0.85])
    assert roundoff.p_value == 0.0 and "constant" in roundoff.note
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
    r = stats.welch_t([1.0, 1.0], [2.0, 2.0])
    assert r.p_value == 0.0 and r.statistic == -math.inf
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
