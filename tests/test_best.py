"""kdgeo.best: which evaluation is the best, and when patience runs out (a plain reference, by hand)."""

from __future__ import annotations

import math

import torch

from kdgeo.best import BestRecord


def _judge(record: BestRecord, values: list[float]) -> list[bool]:
    return [record.judge(step, v) for step, v in enumerate(values, start=1)]


def test_higher_is_better_ties_keep_the_earlier_and_patience_counts_evaluations_since_the_best():
    r = BestRecord("accuracy", patience=2)
    assert _judge(r, [0.5, 0.7, 0.7, 0.8, 0.6]) == [True, True, False, True, False]
    assert (r.score, r.step, r.bad, r.stop) == (0.8, 4, 1, False)
    assert r.judge(6, 0.79) is False and (r.stop, r.stopped_at) == (True, 6)
    assert r.judge(7, 0.9) is True and r.stopped_at == 6  # the decision stands (training already ended)


def test_lower_is_better_for_perplexity_and_non_finite_never_improves():
    r = BestRecord("perplexity", patience=None)
    assert _judge(r, [math.nan, 30.0, 31.0, 29.5, math.inf]) == [False, True, False, True, False]
    assert (r.score, r.step, r.bad, r.stop) == (29.5, 4, 1, False)  # no patience: never stops
    assert BestRecord("response_nll", None).improves(1.0) and not BestRecord("mcc", None).improves(None)


def test_state_round_trip():
    r = BestRecord("macro_f1", patience=3)
    _judge(r, [0.2, 0.4, 0.3])
    again = BestRecord("macro_f1", patience=3)
    weights = {"w": torch.ones(2)}
    again.restore(r.to_state(), weights)
    assert again.to_state() == r.to_state() and again.weights is weights
    assert again.judge(4, 0.35) is False and again.judge(5, 0.1) is False and again.stop and again.stopped_at == 5
