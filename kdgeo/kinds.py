"""Names shared by the spec, the losses, the metrics and the reports: one torch-free table each.

The spec (no torch, imported by the CLI) validates against these; :mod:`kdgeo.losses` dispatches on
them; :mod:`kdgeo.comparison` and :mod:`kdgeo.report` read the metric directions from here. A new loss
kind or metric is added here first.
"""

from __future__ import annotations

from typing import Literal, get_args

Rows = Literal["tokens", "cls", "mean"]
"""Which feature rows a layer contributes: every real token, the first token, or the mean over tokens."""

AutocastPrecision = Literal["auto", "bf16", "fp16", "fp32"]
"""The precisions `kdgeo probe` and `kdgeo eval` take on the command line: autocast only (their models keep
the weights' own dtype, so an ``fp64`` there would silently be fp32)."""

Precision = Literal[AutocastPrecision, "fp64"]
"""Training precision as written in a spec: the autocast ones, or ``fp64`` (float64 weights, no autocast)."""

ROWS: tuple[str, ...] = get_args(Rows)
AUTOCAST_PRECISIONS: tuple[str, ...] = get_args(AutocastPrecision)
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEFAULT_PROBE_METRICS: tuple[str, ...] = ("procrustes", "cka", "gram")
"""The metrics ``kdgeo probe`` and :func:`kdgeo.api.probe` measure when none are given."""

LOGIT_KINDS = frozenset({"ce", "kd"})
"""Loss kinds on the student's logits (against labels or the teacher's logits)."""

FEATURE_KINDS = frozenset({"procrustes", "gram", "cka", "projection", "mse", "cosine"})
"""Loss kinds on paired hidden states (need ``features.pairs``)."""

GEOMETRY_LOSSES = frozenset({"procrustes", "gram", "cka"})
"""Feature losses that are statistics of a whole batch of rows (need at least MIN_GEOMETRY_ROWS rows)."""

EQUAL_WIDTH_KINDS = frozenset({"mse", "cosine"})
"""Feature losses that compare element by element: paired layers must be equally wide."""

LOSS_KINDS = LOGIT_KINDS | FEATURE_KINDS

MIN_GEOMETRY_ROWS = 3
"""The fewest rows a geometry statistic may see: with 1 row every centred matrix is zero, with 2 any
two layers are perfectly aligned (rank 1)."""

METRIC_HIGHER_IS_BETTER: dict[str, bool] = {
    # geometry of a layer pair (higher = more similar for cka)
    "procrustes": False,
    "procrustes_angular": False,
    "gram": False,
    "cka": True,
    "cka_debiased": True,
    "projection": False,
    # task scores
    "accuracy": True,
    "macro_f1": True,
    "f1": True,
    "mcc": True,
    "teacher_agreement": True,
    "rougeL": True,
    "perplexity": False,
    "response_nll": False,
}
"""Whether a larger value is better (for geometry: more similar). A metric not listed is taken as
higher-is-better by :func:`higher_is_better`."""


TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "mcc", "f1", "teacher_agreement"),
    "causal-lm": ("perplexity", "response_nll", "rougeL"),
}
"""The scores every evaluation of a distill run of each task gives (``train.save_best`` picks one). ``f1`` is the
positive class's F1 of a two-label task only; ``rougeL`` needs generation at every evaluation."""


def higher_is_better(metric: str) -> bool:
    """``METRIC_HIGHER_IS_BETTER[metric]``; True for a metric not listed (scores, like accuracy, mostly are)."""
    return METRIC_HIGHER_IS_BETTER.get(metric, True)
