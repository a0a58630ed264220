"""Task metrics against scikit-learn, pinned golden numbers and degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from kdgeo.metrics import agreement, classification_scores, confusion

RTOL, ATOL = 1e-12, 1e-15

# scikit-learn warns about degenerate inputs (one label, undefined MCC); those are the cases under test.
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)


def sklearn_scores(gold, pred, k):
    labels = list(range(k))  # classes absent from gold and pred count as 0 (see metrics' docstring)
    out = {
        "accuracy": accuracy_score(gold, pred),
        "macro_f1": f1_score(gold, pred, labels=labels, average="macro", zero_division=0),
        "mcc": matthews_corrcoef(gold, pred),
    }
    if k == 2:
        out["f1"] = f1_score(gold, pred, pos_label=1, average="binary", zero_division=0)
    return out


@pytest.mark.parametrize("k", [2, 3, 8])
@pytest.mark.parametrize("n", [1, 5, 40, 500])
def test_matches_sklearn_on_random_data(k, n):
    rng = np.random.default_rng(100 * k + n)
    for trial in range(5):
        gold = rng.integers(0, k, n).tolist()
        # a mix of agreeing and random predictions, so scores are neither 0 nor 1
        pred = [g if rng.random() < 0.6 else int(rng.integers(0, k)) for g in gold]
        got = classification_scores(gold, pred, k)
        ref = sklearn_scores(gold, pred, k)
        assert set(got) == set(ref)
        for key in ref:
            assert close(got[key], float(ref[key])), (key, got[key], ref[key])


@pytest.mark.parametrize("k", [2, 3, 8])
def test_macro_f1_over_present_classes_matches_sklearn(k):
    """When every class occurs, the plain sklearn call (no `labels=`) agrees too."""
    rng = np.random.default_rng(k)
    gold = list(range(k)) * 20
    pred = [g if rng.random() < 0.7 else int(rng.integers(0, k)) for g in gold]
    assert close(classification_scores(gold, pred, k)["macro_f1"], f1_score(gold, pred, average="macro", zero_division=0))


def test_golden_binary():
    s = classification_scores([0, 0, 1, 1], [0, 1, 1, 1], 2)
    assert close(s["accuracy"], 0.75)
    assert close(s["f1"], 0.8)  # tp 2, fp 1, fn 0
    assert close(s["macro_f1"], (2 / 3 + 0.8) / 2)
    assert close(s["mcc"], 4 / math.sqrt(48))  # (c s - sum p t) / sqrt((s^2 - sum p^2)(s^2 - sum t^2))


def test_golden_three_classes():
    s = classification_scores([0, 1, 2, 2], [0, 2, 2, 1], 3)
    assert close(s["accuracy"], 0.5)
    assert close(s["macro_f1"], (1.0 + 0.0 + 0.5) / 3)
    assert close(s["mcc"], (2 * 4 - 6) / math.sqrt((16 - 6) * (16 - 6)))
    assert "f1" not in s


def test_perfect_predictions():
    gold = [0, 1, 2, 1, 0]
    s = classification_scores(gold, gold, 3)
    assert s == {"accuracy": 1.0, "macro_f1": 1.0, "mcc": 1.0}


def test_inverted_binary_predictions():
    s = classification_scores([0, 1, 0, 1], [1, 0, 1, 0], 2)
    assert s["accuracy"] == 0.0 and s["f1"] == 0.0 and close(s["mcc"], -1.0)


@pytest.mark.parametrize("gold, pred", [
    ([1, 1, 1], [1, 1, 1]),  # one gold class, all right: mcc undefined -> 0
    ([0, 1, 0, 1], [1, 1, 1, 1]),  # constant prediction
    ([2, 2, 2], [0, 1, 2]),  # constant gold
])
def test_degenerate_mcc_is_zero_like_sklearn(gold, pred):
    s = classification_scores(gold, pred, 3)
    assert s["mcc"] == 0.0 == matthews_corrcoef(gold, pred)
    assert close(s["accuracy"], accuracy_score(gold, pred))


def test_absent_classes_count_as_zero_f1():
    s = classification_scores([0, 0], [0, 0], 4)
    assert s["accuracy"] == 1.0 and s["macro_f1"] == 0.25 and s["mcc"] == 0.0


def test_binary_f1_when_class_1_never_occurs():
    s = classification_scores([0, 0], [0, 0], 2)
    assert s["f1"] == 0.0 == f1_score([0, 0], [0, 0], zero_division=0)


def test_empty_is_nan():
    s = classification_scores([], [], 3)
    assert set(s) == {"accuracy", "macro_f1", "mcc"} and all(math.isnan(v) for v in s.values())


def test_length_mismatch():
    with pytest.raises(ValueError, match="gold and pred differ in length"):
        classification_scores([0, 1], [0], 2)


def test_confusion():
    assert confusion([0, 1, 1, 2], [0, 2, 1, 2], 3) == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_agreement():
    assert agreement([0, 1, 2, 1], [0, 2, 2, 1]) == 0.75
    assert agreement([3, 3], [3, 3]) == 1.0
    assert agreement([0], [1]) == 0.0
    assert math.isnan(agreement([], []))


def test_agreement_is_symmetric_and_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    assert close(agreement(a.tolist(), b.tolist()), float(np.mean(a == b)))
    assert agreement(a.tolist(), b.tolist()) == agreement(b.tolist(), a.tolist())


def test_agreement_length_mismatch():
    with pytest.raises(ValueError):
        agreement([0, 1], [0])
