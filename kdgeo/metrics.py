"""Task metrics of classifiers, from a confusion matrix.

- accuracy: mean(pred == gold).
- macro_f1: unweighted mean over classes of 2 P_c R_c / (P_c + R_c) (a class with no
  predictions and no gold examples contributes 0, as scikit-learn's ``zero_division=0``).
- mcc: Matthews correlation, multiclass form (Gorodkin 2004), the GLUE CoLA metric:
  (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)), 0 when undefined.
- f1: binary F1 of class 1 (the GLUE MRPC/QQP metric); only for two classes.
- agreement: fraction of examples where two models predict the same class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def confusion(gold: Sequence[int], pred: Sequence[int], num_labels: int) -> list[list[int]]:
    """matrix[g][p] = count of examples with gold g predicted as p."""
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for g, p in zip(gold, pred):
        matrix[g][p] += 1
    return matrix


def classification_scores(gold: Sequence[int], pred: Sequence[int], num_labels: int) -> dict[str, float]:
    if len(gold) != len(pred):
        raise ValueError("gold and pred differ in length")
    n = len(gold)
    if n == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "mcc": float("nan")}
    m = confusion(gold, pred, num_labels)
    correct = sum(m[k][k] for k in range(num_labels))
    t = [sum(m[k]) for k in range(num_labels)]  # gold counts
    p = [sum(m[g][k] for g in range(num_labels)) for k in range(num_labels)]  # predicted counts
    f1s = []
    for k in range(num_labels):
        denom = t[k] + p[k]
        f1s.append(2 * m[k][k] / denom if denom else 0.0)
    cov_ytyp = correct * n - sum(pk * tk for pk, tk in zip(p, t))
    cov_ypyp = n * n - sum(pk * pk for pk in p)
    cov_ytyt = n * n - sum(tk * tk for tk in t)
    mcc = cov_ytyp / math.sqrt(cov_ypyp * cov_ytyt) if cov_ypyp and cov_ytyt else 0.0
    scores = {"accuracy": correct / n, "macro_f1": sum(f1s) / num_labels, "mcc": mcc}
    if num_labels == 2:
        scores["f1"] = f1s[1]
    return scores


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    if len(a) != len(b):
        raise ValueError(f"agreement of predictions of different lengths ({len(a)} vs {len(b)})")
    if not a:
        return float("nan")
    return sum(int(x == y) for x, y in zip(a, b)) / len(a)
