"""The objective on one training micro-batch: both forward passes, then the weighted loss terms.

:class:`StepLoss` is the function the loop calls per micro-batch. It runs the student (with
hidden states when a feature loss needs them), takes the teacher's logits and feature rows from
the teacher-output cache or from a frozen forward pass, selects the rows and targets the task
defines, gathers rows from every process with ``train.gather_features``, and returns
:meth:`kdgeo.losses.Objective.grouped`: (logit loss, feature loss, each term by name).

With ``train.on_policy`` a micro-batch the batch source :class:`kdgeo.on_policy.OnPolicy` picks is first
replaced by the student's own samples to the same prompts; then everything above runs on those tokens,
with the teacher run live (its cached outputs are of the references) and without ``ce``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdgeo import data as data_mod
from kdgeo import distributed
from kdgeo.features import select_rows
from kdgeo.kinds import Rows
from kdgeo.losses import Objective, at_least_float32
from kdgeo.on_policy import OnPolicy
from kdgeo.runtime import forward
from kdgeo.tasks import Task
from kdgeo.teacher_outputs import TeacherOutputs


@dataclass(frozen=True)
class StepLoss:
    student: nn.Module
    """The module that runs forward and backward (under torchrun its DDP/FSDP wrapper)."""
    teacher: nn.Module
    objective: Objective
    task: Task
    pairs: tuple[tuple[int, int], ...]
    rows: Rows
    device: torch.device
    amp: torch.dtype | None
    param_dtype: torch.dtype | None
    cached: TeacherOutputs | None
    """The teacher's training outputs from the cache, or None: run the teacher."""
    logit_width: int | None
    """Compare only the first ``logit_width`` logits (output layers padded to different sizes)."""
    gathered: bool
    dist: distributed.Dist
    on_policy: OnPolicy | None = None
    """train.on_policy > 0: the batch source that replaces chosen micro-batches by the student's samples."""

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        references = True
        if self.on_policy is not None and self.on_policy.applies(batch):
            # The student's own samples: the cached teacher outputs are of the references, and ce needs them.
            batch = self.on_policy.sample(distributed.unwrap(self.student), batch, self.device, self.amp)
            references = False
        need_hidden = self.objective.needs_features
        s_in = data_mod.to_device(batch["student"], self.device)
        s_out = forward(self.student, s_in, need_hidden, self.amp, self.device)
        s_mask = self.task.row_mask(batch, "student", s_in, self.device)  # (B, T)
        s_logits, labels = self.task.logits_and_labels(s_out.logits, s_in, s_mask, batch, self.device)  # (n, C), (n,)
        t_logits, t_rows = self._teacher(batch, cached=references)
        s_rows = self._rows(s_out.hidden_states, s_mask, [s for s, _ in self.pairs]) if need_hidden else []
        if self.logit_width is not None:
            # Output layers padded to different sizes: compare the tokenizer's ids only.
            s_logits = s_logits[..., : self.logit_width]
            t_logits = t_logits[..., : self.logit_width] if t_logits is not None else None
        if self.gathered and s_rows:
            t_rows = [distributed.gather_rows(at_least_float32(r), self.dist) for r in t_rows]
            s_rows = [distributed.gather_rows(at_least_float32(r), self.dist) for r in s_rows]
        return self.objective.grouped(s_logits, labels, t_logits, t_rows, s_rows, references)

    def _teacher(self, batch: dict[str, Any], cached: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The teacher's logits (n, C) and feature rows of the pairs, or (None, []) when no term needs them;
        from the teacher-output cache when there is one and ``cached`` (the batch holds the references)."""
        need_hidden = self.objective.needs_features
        t_idx = [t for _, t in self.pairs]
        if self.cached is not None and cached:
            idx = batch["index"].tolist()
            t_logits = self.cached.logits(idx, self.device, self.param_dtype)
            return t_logits, self.cached.features(idx, self.device, self.param_dtype) if need_hidden else []
        if not (self.objective.needs_teacher_logits or need_hidden):
            return None, []
        t_in = data_mod.to_device(batch["teacher"], self.device)
        with torch.no_grad():
            t_out = forward(self.teacher, t_in, need_hidden, self.amp, self.device)
        t_mask = self.task.row_mask(batch, "teacher", t_in, self.device)
        t_logits = self.task.predictions(t_out.logits, t_in, t_mask)
        return t_logits, self._rows(t_out.hidden_states, t_mask, t_idx) if need_hidden else []

    def _rows(self, hidden: tuple[torch.Tensor, ...], mask: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        return [select_rows(hidden[i], mask, self.rows) for i in indices]  # each (n, d)
