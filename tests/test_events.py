"""kdgeo.events: one dataclass per progress event; their JSON form is metrics.jsonl's format 1.

(The views that draw them are tested in tests/test_report.py, with the samples below.)"""

from __future__ import annotations

import json

import pytest

from kdgeo import events
from kdgeo.events import (
    Checkpoint, Done, Eval, Event, FinetuneStep, Monitor, NonFinite, Resume, RunFailed, RunWarning, Stage, Start, Step,
)

_SUMMARY = {
    "wall_seconds": 12.345, "samples_per_s": 81.5, "scores": {"accuracy": 0.5, "macro_f1": 0.25},
    "teacher_scores": {"accuracy": 0.75}, "run_dir": "runs/t",
}
_START = Start(
    run_dir="runs/t", total_steps=4, steps_per_epoch=2, train_samples=64, eval_samples=32, pairs=[[1, 2], [2, 4]],
    device="cpu", precision="fp32", teacher_scores={"accuracy": 0.75, "macro_f1": 0.5}, losses=["ce", "procrustes"],
)
_STEP = Step(
    step=1, total_steps=4, epoch=0.5, lr=1e-3, samples_per_s=123.456,
    losses={"loss": 1.5, "ce": 1.25, "procrustes": 0.25, "procrustes/1-2": 0.125, "procrustes/2-4": 0.125},
)
RUN_EVENTS: list[Event] = [
    Stage("loading the teacher"),
    RunWarning("8 pooled rows"),
    FinetuneStep(step=3, total=10, loss=0.5),
    _START,
    Resume(step=2, checkpoint="runs/t/checkpoint-2"),
    _STEP,
    Monitor(step=2, pairs=[{"student": 1, "teacher": 2, "procrustes": 0.5, "cka": 0.75}]),
    NonFinite(step=3, terms=["procrustes/1-2", "procrustes"], action="skipped"),
    Eval(step=2, epoch=1.0, scores={"accuracy": 0.5, "macro_f1": 0.25}),
    Checkpoint(step=2, path="runs/t/checkpoint-2"),
    Done(summary=_SUMMARY),
    RunFailed(variant="kd", seed=1, error="boom"),
]


def test_every_run_event_kind_reads_back_from_its_json_line():
    assert {e.kind for e in RUN_EVENTS} == set(events.RUN_EVENTS)  # a new kind needs a case here
    for event in RUN_EVENTS:
        line = json.dumps(events.to_dict(event))
        assert events.from_dict(json.loads(line)) == event, line


def test_a_steps_losses_sit_beside_its_other_fields():
    """metrics.jsonl format 1: the loss terms are top-level keys, after samples_per_s."""
    assert json.dumps(events.to_dict(_STEP)) == (
        '{"event": "step", "step": 1, "total_steps": 4, "epoch": 0.5, "lr": 0.001, "samples_per_s": 123.456, '
        '"loss": 1.5, "ce": 1.25, "procrustes": 0.25, "procrustes/1-2": 0.125, "procrustes/2-4": 0.125}'
    )
    assert events.to_dict(Stage("x")) == {"event": "stage", "message": "x"}
    with pytest.raises(ValueError, match="unknown event kind"):
        events.from_dict({"event": "nope"})
