"""The live geometry view: every layer pair measured on one fixed batch of evaluation examples.

The monitor batch is the first ``monitor.samples`` evaluation examples. The teacher is frozen, so
its feature rows are computed once (:class:`MonitorBatch`); each measurement runs the student on
the same inputs and compares its rows pair by pair with :func:`kdgeo.geometry.pair_metrics`.
With ``features.pairs = "probe"`` the same batch chooses the layer map before training
(:meth:`MonitorBatch.probe_pairs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdgeo import data as data_mod
from kdgeo import geometry
from kdgeo.errors import KdgeoError
from kdgeo.features import select_rows, suggest_layer_map
from kdgeo.kinds import METRIC_HIGHER_IS_BETTER, Rows
from kdgeo.losses import at_least_float32
from kdgeo.models import check_hidden_widths
from kdgeo.runtime import forward
from kdgeo.tasks import Task


class MonitorBatch:
    """The fixed batch, the teacher's hidden states on it, and (after :meth:`fix_pairs`) the
    teacher's feature rows of the chosen pairs."""

    def __init__(
        self,
        teacher: nn.Module,
        evals: data_mod.TextSplit,
        samples: int,
        task: Task,
        rows: Rows,
        t_widths: Sequence[int],
        who: str,
        device: torch.device,
        amp: torch.dtype | None,
    ) -> None:
        self.rows, self.device, self.amp = rows, device, amp
        batch = data_mod.collate(evals, list(range(min(samples, len(evals)))))
        t_in = data_mod.to_device(batch["teacher"], device)
        self.s_in = data_mod.to_device(batch["student"], device)
        # Rows come from real tokens; for a causal LM from response tokens only.
        self.t_mask = task.row_mask(batch, "teacher", t_in, device)
        self.s_mask = task.row_mask(batch, "student", self.s_in, device)
        with torch.no_grad():
            self._t_hidden = forward(teacher, t_in, True, amp, device).hidden_states  # L_t+1 x (B, T, d_t[i])
        check_hidden_widths(self._t_hidden, t_widths, who)
        self.pairs: list[tuple[int, int]] = []
        self.t_rows: list[torch.Tensor] = []

    def student_hidden(self, model: nn.Module) -> tuple[torch.Tensor, ...]:
        """The student's hidden states on the batch, in eval mode (dropout off), without gradients."""
        was = model.training
        model.eval()
        with torch.no_grad():
            hidden = forward(model, self.s_in, True, self.amp, self.device).hidden_states
        model.train(was)
        return hidden

    def probe_pairs(
        self, student: nn.Module, s_widths: Sequence[int], t_widths: Sequence[int], equal_width: bool
    ) -> list[tuple[int, int]]:
        """The monotone layer map of best Procrustes similarity between the models' hidden states
        on this batch (``equal_width``: only equally wide indices may pair, for mse / cosine)."""
        s_hidden = self.student_hidden(student)  # L_s+1 x (B, T, d_s[j])
        check_hidden_widths(s_hidden, s_widths, "the student")
        acc = geometry.CrossLayerAccumulator(list(t_widths), list(s_widths), device=self.device)
        try:
            acc.update(
                [select_rows(h, self.t_mask, self.rows) for h in self._t_hidden],
                [select_rows(h, self.s_mask, self.rows) for h in s_hidden],
            )
        except geometry.NonFiniteFeatures as err:
            raise KdgeoError(
                f'features.pairs = "probe": the {err.side} produced NaN or inf hidden states (index '
                f"{', '.join(map(str, err.layers))}; 0 = embeddings) on the monitor batch, so no layer map can be "
                'chosen. Check its weights; with train.precision "bf16"/"fp16" try "fp32", or give features.pairs '
                "explicitly."
            ) from None
        table = acc.compute("procrustes").cpu()  # (L_t+1, L_s+1)
        if equal_width:
            unequal = torch.tensor([[tw != sw for sw in s_widths] for tw in t_widths])  # (L_t+1, L_s+1)
            table = table.masked_fill(unequal, float("nan"))
        return suggest_layer_map(table, METRIC_HIGHER_IS_BETTER["procrustes"])

    def fix_pairs(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Keep the teacher's rows of ``pairs`` only (float32 or better) and drop its hidden states."""
        self.pairs = list(pairs)
        self.t_rows = [at_least_float32(select_rows(self._t_hidden[t], self.t_mask, self.rows)) for _, t in pairs]
        del self._t_hidden

    def measure(self, model: nn.Module, metrics: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
        """Each pair's ``metrics`` for ``model`` (the user's module, not a DDP wrapper, whose forward
        would wait for the other processes), and the pairs whose values are not finite."""
        hidden = self.student_hidden(model)
        values, nonfinite = [], []
        for (s, t), x in zip(self.pairs, self.t_rows):
            y = at_least_float32(select_rows(hidden[s], self.s_mask, self.rows))
            m = geometry.pair_metrics(x, y)
            values.append({"student": s, "teacher": t, **{k: m[k] for k in metrics}})
            if not all(math.isfinite(v) for v in m.values()):
                side = "student" if geometry.nonfinite_layers([y]) else "teacher"
                nonfinite.append(f"{side} hidden state of pair {s}-{t}")
        return values, nonfinite
