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


def _student(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4)).to(dtype)


def test_the_optimizer_is_fused_where_every_parameter_allows_it():
    from kdgeo.optim import fused_adamw_applies

    model = _student(torch.float32)
    opt = build_optimizer(param_groups(model.named_parameters(), 1e-3, 0.01), 1e-3)
    assert all(g["fused"] is True for g in opt.param_groups)
    assert opt._step_supports_amp_scaling  # the fp16 scaler hands the fused kernel its flags
    assert not fused_adamw_applies([torch.zeros(2, device="meta")])  # a device without the kernel: the default
    meta = build_optimizer([{"params": [nn.Parameter(torch.zeros(2, device="meta"))]}], 1e-3)
    assert meta.param_groups[0]["fused"] is None


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_fused_adamw_is_the_default_update_to_rounding(dtype, rtol):
    """The fused kernel orders the arithmetic differently: the same weights after 30 steps to rounding
    (measured 1.6e-16 relative in float64, 1e-7 in float32), with weight decay on and off."""
    models = [_student(dtype), _student(dtype)]
    opts = [
        build_optimizer(param_groups(models[0].named_parameters(), 1e-2, 0.1), 1e-2),
        torch.optim.AdamW(param_groups(models[1].named_parameters(), 1e-2, 0.1), lr=1e-2, eps=1e-8),
    ]
    assert opts[0].param_groups[0]["fused"] and not opts[1].param_groups[0]["fused"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        grads = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in models[0].parameters()]
        for model, opt in zip(models, opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for fused, default in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(fused, default, rtol=rtol, atol=rtol * 1e-2)


def test_a_checkpoint_of_the_default_kernel_resumes_on_the_fused_one(tmp_path):
    """A checkpoint from before fused AdamW (its groups say fused = None) loads into the fused optimizer and
    stays fused: torch alone would take the saved flag, and a fused-built optimizer then steps the per-tensor
    kernel with the fp16 scaler's flags, which it refuses."""
    from kdgeo import checkpoint

    model = _student(torch.float32)
    old = torch.optim.AdamW(param_groups(model.named_parameters(), 1e-3, 0.01), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    old.step()
    state = {"step": 1, "metrics_lines": 0, "scheduler": {}, "loop": {"step": 1, "epoch": 0, "next_micro": 1}}
    ckpt = checkpoint.save_checkpoint(tmp_path, 1, model, nn.Module(), old, state, keep=2)
    assert torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"][0]["fused"] is None
    fresh = _student(torch.float32)
    opt = build_optimizer(param_groups(fresh.named_parameters(), 1e-3, 0.01), 1e-3)
    checkpoint.load_checkpoint(ckpt, fresh, nn.Module(), opt, torch.device("cpu"))
    assert all(g["fused"] is True for g in opt.param_groups)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], old.state_dict()["state"][0]["exp_avg"])
    fresh(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()  # the fused kernel, from the restored moments
