"""kdgeo.step_loss: one micro-batch's objective, by parity with the forwards written out by hand."""

from __future__ import annotations

import pytest
import torch

from cli_helpers import tiny_spec
from kdgeo import data as data_mod
from kdgeo import distributed, events
from kdgeo.features import select_rows
from kdgeo.kinds import FEATURE_KINDS
from kdgeo.losses import Objective
from kdgeo.models import build_student
from kdgeo.plan import make_plan
from kdgeo.spec import validate_spec
from kdgeo.step_loss import StepLoss
from kdgeo.teacher import prepare

CPU = torch.device("cpu")
PAIRS = ((1, 2), (2, 4))


def _built(tiny, tmp_path, losses):
    plan = make_plan(validate_spec(tiny_spec(tiny, tmp_path, losses=losses)), 1, False, events.ignore)
    teacher = prepare(plan, distributed.SINGLE, CPU, None, None, events.ignore).model
    student = build_student(plan, teacher, CPU, None)
    widths = [(plan.s_widths[s], plan.t_widths[t]) for s, t in PAIRS]
    features = bool(plan.loss_kinds & FEATURE_KINDS)
    objective = Objective(list(plan.terms), list(PAIRS) if features else [], widths if features else [])
    return plan, teacher, student, objective


def test_step_loss_equals_the_forwards_written_out(tiny, tmp_path):
    plan, teacher, student, objective = _built(
        tiny, tmp_path, [{"kind": "ce"}, {"kind": "kd"}, {"kind": "procrustes"}, {"kind": "gram", "weight": 0.5}]
    )
    step = StepLoss(student, teacher, objective, plan.task, PAIRS, "tokens", CPU, None, None, None, None, False,
                    distributed.SINGLE)
    batch = data_mod.collate(plan.train, [0, 5, 9, 11])
    torch.manual_seed(0)
    logit, feature, parts = step(batch)

    torch.manual_seed(0)  # the same dropout draws
    s_in, t_in = batch["student"], batch["teacher"]
    s_out = student(**s_in, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(**t_in, output_hidden_states=True)
    s_rows = [select_rows(s_out.hidden_states[s], s_in["attention_mask"], "tokens") for s, _ in PAIRS]
    t_rows = [select_rows(t_out.hidden_states[t], t_in["attention_mask"], "tokens") for _, t in PAIRS]
    want_logit, want_feature, want_parts = objective.grouped(s_out.logits, batch["labels"], t_out.logits, t_rows, s_rows)
    torch.testing.assert_close(logit, want_logit, rtol=0, atol=0)
    torch.testing.assert_close(feature, want_feature, rtol=0, atol=0)
    assert parts.keys() == want_parts.keys()


def test_a_cross_entropy_objective_never_runs_the_teacher(tiny, tmp_path):
    plan, teacher, student, objective = _built(tiny, tmp_path, [{"kind": "ce"}])

    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("the teacher ran for a ce-only objective")

    teacher.forward = refuse  # type: ignore[method-assign]
    step = StepLoss(student, teacher, objective, plan.task, (), "tokens", CPU, None, None, None, None, False,
                    distributed.SINGLE)
    logit, feature, parts = step(data_mod.collate(plan.train, [0, 1]))
    assert torch.isfinite(logit) and float(feature) == 0.0 and set(parts) == {"ce"}
