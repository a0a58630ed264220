"""kdgeo.report: what the consoles print for each event and result."""

from __future__ import annotations

import json

import pytest

from kdgeo import events, report
from kdgeo.events import Checkpoint, Done, Eval, FinetuneStep, Monitor, NonFinite, ProbeLoading, ProbeProgress, ProbeStart, Resume, RunFailed, RunWarning, Stage
from test_events import _START, _STEP, _SUMMARY

# ---- progress events: the views and the --json lines (the samples: tests/test_events.py) -----------

_RUN = [
    Stage("loading the teacher"),
    *[FinetuneStep(step=i, total=10, loss=2.0 / i) for i in range(1, 11)],
    _START,
    _STEP,
    Monitor(step=2, pairs=[
        {"student": 1, "teacher": 2, "procrustes": 0.5, "cka": 0.75},
        {"student": 2, "teacher": 4, "procrustes": float("nan"), "cka": 0.5},
    ]),
    NonFinite(step=3, terms=["procrustes/1-2", "procrustes"], action="skipped"),
    NonFinite(step=0, terms=["teacher hidden state of pair 1-2"], action="monitor"),
    RunWarning("8 pooled rows"),
    Eval(step=2, epoch=1.0, scores={"accuracy": 0.5, "macro_f1": 0.25, "loss": 3.0}),
    Checkpoint(step=2, path="runs/t/checkpoint-2"),
    Resume(step=2, checkpoint="runs/t/checkpoint-2"),
    RunFailed(variant="kd", seed=1, error="boom"),
    Done(summary=_SUMMARY),
]
_WARNINGS = [
    "warning: non-finite values at step 3 in procrustes/1-2, procrustes (update skipped)",
    "warning: non-finite values at step 0 in teacher hidden state of pair 1-2 (monitor values are NaN)",
    "warning: 8 pooled rows",
]
_PLAIN = [  # the lines of the elif chain over event dicts this view replaced, character for character
    "loading the teacher",
    "teacher fine-tuning step 2/10  loss 1.0000",
    "teacher fine-tuning step 4/10  loss 0.5000",
    "teacher fine-tuning step 6/10  loss 0.3333",
    "teacher fine-tuning step 8/10  loss 0.2500",
    "teacher fine-tuning step 10/10  loss 0.2000",
    (
        "training: 4 steps (2/epoch) on 64 examples, device cpu, precision fp32, losses ce + procrustes, pairs 1->2, 2->4; "
        "teacher accuracy 0.7500  macro_f1 0.5000"
    ),
    "step 1/4  epoch 0.50  lr 1.00e-03  loss 1.5000  ce 1.2500  procrustes 0.2500  123.5 samples/s",
    "monitor step 2: 1->2 procrustes 0.5000 cka 0.7500; 2->4 procrustes nan cka 0.5000",
    *_WARNINGS,
    "eval (step 2, epoch 1): accuracy 0.5000  macro_f1 0.2500",
    "resumed at step 2 from runs/t/checkpoint-2",
    "error: run kd seed 1 failed: boom",
    "done in 12.3s (81.5 samples/s): student accuracy 0.5000  macro_f1 0.2500 | teacher accuracy 0.7500",
    "run directory: runs/t",
]


def _show(view: report.DistillView, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    capsys.readouterr()
    for event in _RUN:
        view(event)
    view.close()
    return capsys.readouterr()


def test_distill_view_plain_prints_one_line_per_event(capsys):
    out, err = _show(report.DistillView("plain"), capsys)
    assert out == "" and err.splitlines() == _PLAIN


def test_distill_view_quiet_prints_only_what_changes_the_numbers(capsys):
    """A failed sweep run shows up in the sweep's closing table and error line, not here."""
    out, err = _show(report.DistillView("quiet"), capsys)
    assert out == "" and err.splitlines() == _WARNINGS


def test_distill_view_json_writes_each_run_event_as_its_json_line(capsys):
    out, err = _show(report.DistillView("quiet", json_lines=True), capsys)
    shown = [e for e in _RUN if not isinstance(e, FinetuneStep)]  # the teacher's fine-tune is not part of the run
    assert out.splitlines() == [json.dumps(events.to_dict(e)) for e in shown]
    assert err.splitlines() == _WARNINGS  # the human output stays on stderr


def test_probe_view_plain_prints_about_four_progress_lines(capsys):
    capsys.readouterr()
    view = report.ProbeView("plain")
    for event in [ProbeLoading(teacher="t", student="s"), ProbeStart(total=10), *[ProbeProgress(done=d, total=10) for d in range(1, 11)]]:
        view(event)
    view.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "loading teacher t and student s", "probing 10 samples",
        "  2/10 samples", "  4/10 samples", "  6/10 samples", "  8/10 samples", "  10/10 samples",
    ]


def test_stage_lines_shows_stage_messages_only(capsys):
    capsys.readouterr()
    for mode, want in (("plain", "evaluating m on 8 examples\n"), ("quiet", "")):
        show = report.stage_lines(mode)
        show(Stage("evaluating m on 8 examples"))
        show(FinetuneStep(step=1, total=2, loss=0.5))
        assert capsys.readouterr().err == want
