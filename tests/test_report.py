"""kdgeo.report: what the consoles print for each event and result."""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

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


# ---- issue 16 E: labelled ETA, unwrapped plain lines, one layer-index label, compare without reprs, the --json schema


def test_plain_step_lines_carry_a_labelled_eta(capsys, monkeypatch):
    """The first step seen has no pace yet; later ones say "ETA 3m12s" from the mean pace since then."""
    import time

    clock = iter([100.0, 110.0])  # step 1 at t = 100 s, step 2 at t = 110 s: 10 s a step, 18 steps left
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    view = report.DistillView("plain")
    capsys.readouterr()
    view(events.Step(step=1, total_steps=20, epoch=0.1, lr=1e-3, samples_per_s=8.0, losses={"loss": 1.0}))
    view(events.Step(step=2, total_steps=20, epoch=0.2, lr=1e-3, samples_per_s=8.0, losses={"loss": 1.0}))
    lines = capsys.readouterr().err.splitlines()
    assert "ETA" not in lines[0] and lines[1].endswith("8.0 samples/s  ETA 3m00s"), lines
    assert [report.eta_text(s) for s in (0.4, 42, 192, 3900)] == ["ETA 0s", "ETA 42s", "ETA 3m12s", "ETA 1h05m"]


def test_the_rich_eta_column_is_labelled():
    from rich.progress import Progress

    with Progress(report.EtaColumn(), disable=True) as progress:
        task = progress.add_task("x", total=10)
        progress.update(task, completed=5)
        assert report.EtaColumn().render(progress.tasks[0]).plain.startswith("ETA ")


def test_plain_lines_never_wrap_mid_number(capsys):
    """Off a terminal the console is 80 columns wide; a long step line (many loss terms) stays one line, so no
    number is split across two."""
    losses = {k: 1234.567891 for k in report.LOSS_ORDER}
    pairs = [{"student": s, "teacher": 2 * s, "procrustes": 0.123456, "cka": 0.654321} for s in range(1, 7)]
    capsys.readouterr()
    view = report.DistillView("plain")
    view(events.Step(step=7, total_steps=1000, epoch=0.25, lr=3e-5, samples_per_s=1234.5, losses=losses))
    view(Monitor(step=7, pairs=pairs))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(len(line) > 80 for line in lines), lines
    assert lines[0].endswith("cosine 1234.5679  1234.5 samples/s") and lines[1].endswith("6->12 procrustes 0.1235 cka 0.6543")


def test_tables_label_hidden_state_zero_as_the_embeddings(capsys):
    from rich.console import Console

    table = report.layer_table("procrustes", [[0.1, 0.2], [0.3, 0.4]], {(1, 1)}, False)
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(table)
    text = console.export_text()
    assert "0=emb" in text and "emb " not in text.replace("0=emb", "")
    assert report.hidden_state_label(0) == "0=emb" and report.hidden_state_label(3) == "3"


def test_compare_prints_no_python_reprs(tmp_path, capsys):
    """The header names the task and evaluation set in words: no `task: task=...`, no `['a', 'b']` lists, no
    TaskKey(...); the Markdown says the same."""
    from test_comparison import write_run

    from cli_helpers import run_cli

    for variant, acc in (("ce", 0.70), ("kd", 0.72)):
        for seed in range(3):
            write_run(tmp_path / "s", variant, seed, acc + 0.01 * seed)
    code, out, err = run_cli(capsys, "compare", str(tmp_path / "s"))
    assert code == 0, err
    header = " ".join(out.split("accuracy (higher")[0].split())
    assert header == ("6 runs, 2 variants, baseline ce; classification; dataset kdgeo:wordnet-supersenses; eval_split "
                      "validation; label_names noun.animal, noun.artifact, noun.plant")
    for text in (out, err):
        assert "task=" not in text and "TaskKey(" not in text and "['" not in text and "('" not in text
    code, md, _ = run_cli(capsys, "compare", str(tmp_path / "s"), "--markdown", "-")
    assert code == 0 and "Task: classification; dataset kdgeo:wordnet-supersenses;" in md and "['" not in md


def _readme_event_table() -> dict[str, dict[str, str]] | None:
    """README's `kdgeo distill --json` events table: event -> {key: JSON type}. KDGEO_README (a draft) or the
    repository's README.md; None when it has no such section yet."""
    import os
    import re

    from cli_helpers import REPO

    path = Path(os.environ.get("KDGEO_README") or REPO / "README.md")
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        start = lines.index("### `kdgeo distill --json` events")
    except ValueError:
        return None
    table: dict[str, dict[str, str]] = {}
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 2:
            keys = re.findall(r"`([\w/-]+)` \((string|integer|number|array|object)", cells[1])
            table[cells[0].strip("`")] = dict(keys)
    return table


def test_the_documented_json_event_schema_is_what_the_events_write():
    """Every kind --json writes is documented with exactly its keys (a Step's loss terms: `loss` only, the rest
    are named per run) and each documented type matches the value events.to_dict gives."""
    from test_events import RUN_EVENTS

    documented = _readme_event_table()
    if documented is None:
        pytest.skip("README.md has no '### `kdgeo distill --json` events' section yet; set KDGEO_README to a draft")
    json_kinds = {e.kind for e in RUN_EVENTS} - {"finetune_step"}  # the teacher's fine-tune is not in --json
    assert set(documented) == json_kinds
    types = {"string": str, "integer": int, "number": (int, float), "array": list, "object": dict}
    optional = {"step": {"on_policy"}}  # written only by the runs that have it (train.on_policy > 0)
    on_policy_step = dataclasses.replace(
        next(e for e in RUN_EVENTS if isinstance(e, events.Step)), on_policy={"micro_batches": 2, "generations": 16}
    )
    for event in [*RUN_EVENTS, on_policy_step]:
        if event.kind not in json_kinds:
            continue
        record = events.to_dict(event)
        del record["event"]
        if isinstance(event, events.Step):
            record = {k: v for k, v in record.items() if k == "loss" or k not in event.losses}
        expected = {k for k in documented[event.kind] if k in record or k not in optional.get(event.kind, set())}
        assert expected == set(record), event.kind
        for key in expected:
            kind = documented[event.kind][key]
            assert isinstance(record[key], types[kind]) and not isinstance(record[key], bool), (event.kind, key)
    assert "on_policy" in events.to_dict(on_policy_step) and "on_policy" not in events.to_dict(RUN_EVENTS[5])


def test_the_rich_view_redraws_on_its_timer_not_per_event(monkeypatch):
    """A burst of step events only swaps what the live display shows; Rich's own thread redraws it at
    most refresh_per_second times, so a fast log_every costs the training loop no rendering."""
    import dataclasses

    from rich.live import Live

    refreshes, made = [], []
    real_init, real_refresh = Live.__init__, Live.refresh

    def init(self, *args, **kwargs):
        made.append(kwargs)
        real_init(self, *args, **kwargs)

    def refresh(self):
        refreshes.append(1)
        real_refresh(self)

    monkeypatch.setattr(Live, "__init__", init)
    monkeypatch.setattr(Live, "refresh", refresh)
    view = report.DistillView("rich")
    view(_START)
    for i in range(1, 201):
        view(dataclasses.replace(_STEP, step=i, total_steps=200))
    view.close()
    shown = made[-1]  # the view's own Live (a Progress builds one too, never started here)
    assert shown.get("auto_refresh", True) and shown["refresh_per_second"] <= 4
    assert len(refreshes) <= 4  # start, stop, and at most a timer tick or two: not one per event
