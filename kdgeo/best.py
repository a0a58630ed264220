"""`train.save_best` and `train.early_stopping_patience`: which evaluation's student a run keeps, and when it stops.

Only evaluations count (every ``eval_every`` steps, or each epoch's end with ``eval_every = 0``, and the final
one). An evaluation improves on the best so far when its ``metric`` is finite and strictly better in the metric's
direction (:func:`kdgeo.kinds.higher_is_better`: perplexity and response_nll lower, the others higher); a tie
keeps the earlier, shorter-trained student. Each evaluation that does not improve adds one to ``bad``; an
improvement resets it. Training stops once ``bad`` reaches ``patience`` (Prechelt, "Early Stopping -- But
When?", 1998: the "patience" criterion; the Hugging Face Trainer's ``EarlyStoppingCallback`` counts the same way).

The record is plain values (:meth:`BestRecord.to_state`, saved in every checkpoint's state.json under ``best``) plus
the best student's weights, which the run keeps as a CPU copy and writes into each checkpoint
(``best.safetensors``), so a resumed run continues with the same best, the same count and the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kdgeo.kinds import higher_is_better


@dataclass
class BestRecord:
    """The best evaluation so far and the count of evaluations since it."""

    metric: str
    patience: int | None
    """None: never stop early (the best student is still kept)."""
    score: float | None = None
    """The best finite score so far; None before the first."""
    step: int | None = None
    """The step of that evaluation."""
    bad: int = 0
    """Evaluations in a row since the best that did not improve on it."""
    stop: bool = False
    """``bad`` reached ``patience``: training ends at ``stopped_at``."""
    stopped_at: int | None = None
    weights: dict[str, torch.Tensor] | None = None
    """The best student's weights (a CPU copy, on the process that saves: rank 0), once there is a best."""

    def improves(self, value: float | None) -> bool:
        """Whether ``value`` is strictly better than the best so far (a non-finite or missing value never is)."""
        if value is None or not math.isfinite(value):
            return False
        if self.score is None:
            return True
        return value > self.score if higher_is_better(self.metric) else value < self.score

    def judge(self, step: int, value: float | None) -> bool:
        """Count the evaluation at ``step``; True when it is the new best (the caller then keeps its weights)."""
        improved = self.improves(value)
        if improved:
            self.score, self.step, self.bad = float(value), step, 0  # type: ignore[arg-type]
        else:
            self.bad += 1
        if not self.stop and self.patience is not None and self.bad >= self.patience:
            self.stop, self.stopped_at = True, step
        return improved

    def to_state(self) -> dict[str, Any]:
        """What a checkpoint's state.json keeps under ``best`` (the weights go to best.safetensors)."""
        return {
            "metric": self.metric,
            "score": self.score,
            "step": self.step,
            "bad": self.bad,
            "stop": self.stop,
            "stopped_at": self.stopped_at,
        }

    def restore(self, saved: dict[str, Any], weights: dict[str, torch.Tensor] | None) -> None:
        """Continue from a checkpoint's ``best`` table and best.safetensors."""
        self.score, self.step = saved.get("score"), saved.get("step")
        self.bad, self.stop, self.stopped_at = (
            int(saved.get("bad", 0)),
            bool(saved.get("stop")),
            saved.get("stopped_at"),
        )
        self.weights = weights
