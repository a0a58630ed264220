"""kdgeo.optim: the learning-rate schedules against their closed forms, and which weights decay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdgeo.optim import build_optimizer, build_scheduler, lr_lambda, param_groups


def _expected(step: int, total: int, warmup: int, schedule: str) -> float:
    """The multiplier written out: warm-up (s + 1) / w, so the first update already moves; then
    linear (T - s) / (T - w), cosine 0.5 (1 + cos(pi (s - w) / (T - w))), or constant 1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)), "constant": 1.0}[schedule]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_schedules_match_their_closed_forms(schedule, warmup):
    factor = lr_lambda(10, warmup, schedule)
    got = [factor(s) for s in range(12)]  # two steps past the end: the rate stays at its last value
    assert got == pytest.approx([_expected(s, 10, warmup, schedule) for s in range(12)], abs=1e-12)
    assert got[warmup] == pytest.approx(1.0)  # the peak right after warm-up, whatever the schedule
    if warmup:
        assert got[0] == pytest.approx(1.0 / warmup) and got[warmup - 1] == pytest.approx(1.0)


def test_the_optimizer_steps_with_the_scheduled_rate():
    """What AdamW is given at each update is lr * lr_lambda(step), with round(ratio * T) warm-up steps."""
    weight = nn.Parameter(torch.zeros(2, 2))
    optimizer = build_optimizer(param_groups([("w", weight)], lr=0.1, weight_decay=0.0), lr=0.1)
    scheduler = build_scheduler(optimizer, total_steps=8, warmup_ratio=0.3, schedule="cosine")  # 2.4 -> 2 warm-up steps
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.1 * _expected(s, 8, 2, "cosine") for s in range(8)], abs=1e-12)


def test_biases_norms_and_frozen_weights_do_not_decay():
    """Matrices decay; biases, 1-d weights and anything named like a norm do not; frozen weights are left out."""
    model = nn.Module()
    model.dense = nn.Linear(4, 3)
    model.LayerNorm = nn.LayerNorm(3)
    model.scale = nn.Parameter(torch.ones(3))
    model.frozen = nn.Linear(3, 3)
    model.frozen.requires_grad_(False)
    groups = param_groups(model.named_parameters(), lr=0.5, weight_decay=0.01)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.5, 0.01), (0.5, 0.0)]
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert decay == {id(model.dense.weight)}
    assert no_decay == {id(model.dense.bias), id(model.LayerNorm.weight), id(model.LayerNorm.bias), id(model.scale)}
    assert param_groups([("b", model.dense.bias)], lr=0.5, weight_decay=0.01) == [
        {"params": [model.dense.bias], "lr": 0.5, "weight_decay": 0.0}
    ]  # no empty group is handed to AdamW
