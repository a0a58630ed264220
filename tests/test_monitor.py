"""kdgeo.monitor: the fixed monitor batch, by parity with a hand-written measurement."""

from __future__ import annotations

import copy

import pytest
import torch

from cli_helpers import tiny_spec
from kdgeo import data as data_mod
from kdgeo import distributed, events, geometry
from kdgeo.features import select_rows
from kdgeo.losses import at_least_float32
from kdgeo.models import build_student
from kdgeo.monitor import MonitorBatch
from kdgeo.plan import make_plan
from kdgeo.spec import validate_spec
from kdgeo.teacher import prepare

CPU = torch.device("cpu")


@pytest.fixture
def built(tiny, tmp_path):
    plan = make_plan(validate_spec(tiny_spec(tiny, tmp_path)), 1, False, events.ignore)
    teacher = prepare(plan, distributed.SINGLE, CPU, None, None, events.ignore).model
    return plan, teacher, build_student(plan, teacher, CPU, None)


def test_measure_equals_pair_metrics_on_the_batch_rows(built):
    plan, teacher, student = built
    monitor = MonitorBatch(teacher, plan.evals, 16, plan.task, "tokens", plan.t_widths, "the teacher", CPU, None)
    pairs = [(1, 2), (2, 4)]
    monitor.fix_pairs(pairs)
    assert student.training
    values, nonfinite = monitor.measure(student, ["procrustes", "cka", "gram"])
    assert student.training and not nonfinite  # measured in eval mode, training mode restored

    batch = data_mod.collate(plan.evals, list(range(16)))
    with torch.no_grad():
        student.eval()
        t_hidden = teacher(**batch["teacher"], output_hidden_states=True).hidden_states
        s_hidden = student(**batch["student"], output_hidden_states=True).hidden_states
        student.train()
    for (s, t), got in zip(pairs, values):
        x = at_least_float32(select_rows(t_hidden[t], batch["teacher"]["attention_mask"], "tokens"))
        y = at_least_float32(select_rows(s_hidden[s], batch["student"]["attention_mask"], "tokens"))
        want = geometry.pair_metrics(x, y)
        assert got == {"student": s, "teacher": t, "procrustes": want["procrustes"], "cka": want["cka"], "gram": want["gram"]}


def test_probe_pairs_of_a_model_with_itself_are_the_diagonal(built):
    plan, teacher, _ = built
    monitor = MonitorBatch(teacher, plan.evals, 16, plan.task, "tokens", plan.t_widths, "the teacher", CPU, None)
    twin = copy.deepcopy(teacher)
    assert monitor.probe_pairs(twin, plan.t_widths, plan.t_widths, equal_width=False) == [(1, 1), (2, 2), (3, 3), (4, 4)]
