"""Experiment trackers (output.report_to): TensorBoard event files read back with tensorboard's own
EventAccumulator, W&B offline and an MLflow file store when installed, missing packages, resume,
failures mid-run, and the default (no trackers) changing nothing."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from cli_helpers import run_cli, tiny_spec, write_spec
from kdgeo import events, trackers
from kdgeo.rundir import read_jsonl

pytest.importorskip("tensorboard")


def _spec(tiny, tmp_path, report_to=("tensorboard",), **train):
    """6 steps of 8 examples, ce + procrustes, monitor every 2, evaluation and checkpoint every 3."""
    return tiny_spec(
        tiny, tmp_path,
        losses=[{"kind": "ce"}, {"kind": "procrustes"}],
        train={"max_steps": 6, "batch_size": 8, "log_every": 1, "eval_every": 3, "checkpoint_every": 3, **train},
        monitor={"every": 2, "samples": 16},
        output={"dir": str(tmp_path / "runs"), "teacher_cache": str(tmp_path / "cache"), "report_to": list(report_to)},
    )


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's TensorBoard directory, as (step, value), read by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / trackers.TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _crash_after_step_5(path: Path, capsys, monkeypatch) -> Path:
    """Run the spec at ``path`` until an error right after step 5's event is recorded (its checkpoint-3 is the
    newest); returns the run directory, with recording restored so that ``--resume`` can continue it."""
    from kdgeo import distillation
    from kdgeo.errors import OutputError

    record = distillation._Run.record

    def crash_after_step_5(self, event):
        record(self, event)
        if isinstance(event, events.Step) and event.step == 5:
            raise OutputError("simulated crash after step 5")

    with monkeypatch.context() as patched:
        patched.setattr(distillation._Run, "record", crash_after_step_5)
        code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code != 0 and "simulated crash" in err
    return path.parent / "runs" / "t"


def _texts(run: Path) -> dict[str, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / trackers.TENSORBOARD_DIR), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}


def _expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """What metrics.jsonl says each tag must hold."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in read_jsonl(run / "metrics.jsonl"):
        if record.get("event") not in ("step", "monitor", "eval"):
            continue
        step, values = trackers.scalars(events.from_dict(record))  # type: ignore[misc]
        for tag, value in values.items():
            out.setdefault(tag, []).append((step, value))
    return out


def _same(found: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    # TensorBoard stores float32.
    return [s for s, _ in found] == [s for s, _ in expected] and all(
        v == pytest.approx(e, rel=1e-6, abs=1e-7) for (_, v), (_, e) in zip(found, expected)
    )


def _check_everything_logged(run: Path) -> None:
    """Losses, learning rate, every pair's geometry, evaluations, the summary and the spec, as metrics.jsonl has them."""
    summary = json.loads((run / "summary.json").read_text())
    found, expected = _scalars(run), _expected(run)
    for tag in ("train/loss", "train/ce", "train/procrustes", "train/lr", "eval/accuracy"):
        assert tag in found, sorted(found)
    assert [s for s, _ in found["train/loss"]] == list(range(1, 7))
    for s, t in summary["pairs"]:
        assert f"train/pairs/procrustes/{s}-{t}" in found
        for metric in ("procrustes", "cka", "gram"):
            assert f"geometry/{metric}/{s}-{t}" in found
    assert [s for s, _ in found["eval/accuracy"]] == [3, 6]
    for tag, values in expected.items():
        assert _same(found[tag], values), tag
    assert found["final/accuracy"] == [(6, pytest.approx(summary["scores"]["accuracy"]))]
    assert found["summary/steps"] == [(6, 6.0)]
    texts = _texts(run)
    assert json.loads(json.dumps(summary["scores"])) == json.loads(
        "\n".join(line[4:] for line in texts["summary/text_summary"].splitlines())
    )["scores"]
    spec_text = "\n".join(line[4:] for line in texts["spec/text_summary"].splitlines())
    assert json.loads(spec_text) == json.loads((run / "spec.json").read_text())
    assert json.loads((run / "spec.json").read_text())["output"]["report_to"] == ["tensorboard"]


def test_tensorboard_gets_the_run_and_no_trackers_by_default_change_no_file_and_no_number(tiny, tmp_path, capsys):
    plain = _spec(tiny, tmp_path, report_to=())
    del plain["output"]["report_to"]
    for name, spec in (("plain", plain), ("tb", _spec(tiny, tmp_path))):
        path = write_spec(tmp_path / f"{name}.toml", spec)
        code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", f"output.name={name}")
        assert code == 0, err
    a, b = tmp_path / "runs" / "plain", tmp_path / "runs" / "tb"
    assert "report_to" not in json.loads((a / "spec.json").read_text())["output"]
    assert "report_to" not in (a / "spec.toml").read_text()
    assert not (a / trackers.TENSORBOARD_DIR).exists() and not (a / trackers.TRACKER_IDS).exists()
    assert {p.name for p in a.iterdir()} | {trackers.TENSORBOARD_DIR} == {p.name for p in b.iterdir()}

    def numbers(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("samples_per_s", "run_dir", "path")} for r in read_jsonl(run / "metrics.jsonl")]

    assert numbers(a) == numbers(b)  # bit for bit: logging to TensorBoard draws no random number, moves nothing
    _check_everything_logged(b)


def test_resume_continues_the_same_tensorboard_run_without_doubled_or_missing_steps(tiny, tmp_path, capsys, monkeypatch):
    path = write_spec(tmp_path / "run.toml", _spec(tiny, tmp_path))
    run = _crash_after_step_5(path, capsys, monkeypatch)
    assert [s for s, _ in _scalars(run)["train/loss"]] == list(range(1, 6))  # flushed although the run failed
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--resume")
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["resumed_from"].endswith("checkpoint-3")
    found, expected = _scalars(run), _expected(run)
    assert [s for s, _ in found["train/loss"]] == list(range(1, 7))  # 4 and 5 once, 3 (replayed) once
    assert [s for s, _ in found["eval/accuracy"]] == [3, 6]
    for tag, values in expected.items():
        assert _same(found[tag], values), tag
    assert len(list((run / trackers.TENSORBOARD_DIR).iterdir())) == 2  # one event file per process that wrote


def test_a_tracker_failing_mid_run_is_warned_about_once_and_the_run_finishes(tiny, tmp_path, capsys, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    calls = []
    add_scalar = SummaryWriter.add_scalar

    def disk_full_after_10(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return add_scalar(self, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", disk_full_after_10)
    path = write_spec(tmp_path / "run.toml", _spec(tiny, tmp_path))
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0, err
    run = tmp_path / "runs" / "t"
    assert (run / "summary.json").exists() and (run / "student").is_dir()
    flat = " ".join(err.split())
    assert flat.count("No space left on device") == 1, err
    assert "tensorboard: logging failed (No space left on device); tensorboard logs nothing more" in flat
    assert len(calls) == 11  # dropped after the failure: never called again


def test_a_tracker_that_is_not_installed_is_exit_2_naming_the_extra(tiny, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "mlflow") else find_spec(name, *a)
    )
    path = write_spec(tmp_path / "run.toml", _spec(tiny, tmp_path, report_to=("tensorboard", "wandb", "mlflow")))
    for extra in ([], ["--dry-run"]):
        code, _, err = run_cli(capsys, "distill", str(path), "-q", *extra)
        flat = " ".join(err.split())
        assert code == 2, err
        assert 'pip install "kdgeo[wandb]"' in flat and 'pip install "kdgeo[mlflow]"' in flat, err
        assert "output.report_to asks for wandb, mlflow, which are not installed" in flat
        assert "Traceback" not in err
    assert not (tmp_path / "runs" / "t").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [('["tensorboard", "tensorboard"]', "lists tensorboard more than once"), ('["comet"]', "'tensorboard', 'wandb' or 'mlflow'")],
)
def test_report_to_is_validated(tiny, tmp_path, capsys, value, message):
    path = write_spec(tmp_path / "run.toml", _spec(tiny, tmp_path))
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--dry-run", "--set", f"output.report_to={value}")
    assert code == 2 and message in " ".join(err.split()), err
    assert "output.report_to" in err


def test_trackers_may_be_added_or_dropped_on_resume():
    from kdgeo.spec import resume_differences

    saved = {"output": {"dir": "runs"}, "train": {"lr": 1e-3}}
    assert resume_differences(saved, {"output": {"dir": "runs", "report_to": ["tensorboard"]}, "train": {"lr": 1e-3}}) == []


def test_event_tags():
    step = events.Step(step=3, total_steps=9, epoch=0.5, lr=1e-4, samples_per_s=7.0, losses={"loss": 2.0, "kd": 1.5, "procrustes/1-3": 0.25})
    assert trackers.scalars(step) == (
        3,
        {
            "train/loss": 2.0, "train/kd": 1.5, "train/pairs/procrustes/1-3": 0.25,
            "train/lr": 1e-4, "train/epoch": 0.5, "train/samples_per_s": 7.0,
        },
    )
    monitor = events.Monitor(step=2, pairs=[{"student": 1, "teacher": 3, "procrustes": 0.4, "cka": 0.9}])
    assert trackers.scalars(monitor) == (2, {"geometry/procrustes/1-3": 0.4, "geometry/cka/1-3": 0.9})
    assert trackers.scalars(events.Eval(step=4, epoch=1.0, scores={"accuracy": 0.5})) == (4, {"eval/accuracy": 0.5})
    assert trackers.scalars(events.Checkpoint(step=4, path="x")) is None
    summary = {"steps": 8, "scores": {"accuracy": 0.5}, "teacher_scores": {"accuracy": 0.9}, "name": "t", "resumed": True}
    assert trackers.summary_scalars(summary) == {"final/accuracy": 0.5, "teacher/accuracy": 0.9, "summary/steps": 8.0}


def test_a_tracker_that_cannot_start_is_warned_about_and_the_others_go_on(tmp_path, monkeypatch):
    warnings: list[str] = []

    def refuse(*args, **kwargs):
        raise RuntimeError("not logged in")

    monkeypatch.setattr(trackers, "_MLflow", refuse)
    settings = trackers.TrackerSettings(("mlflow", "tensorboard"), {"name": "t"}, "t", "t")
    t = trackers.Trackers(settings, warnings.append)
    t.start(tmp_path, None)
    assert t.names == ["tensorboard"] and len(warnings) == 1 and "mlflow: starting failed (not logged in)" in warnings[0]
    t.log(events.Eval(step=1, epoch=1.0, scores={"accuracy": 0.25}))
    t.close(True)
    t.close(True)  # twice is harmless
    assert _scalars(tmp_path)["eval/accuracy"] == [(1, 0.25)]


def test_wandb_offline_and_mlflow_file_store_get_the_run_and_resume_continues_their_runs(tiny, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path / 'mlruns'}"
    for key, value in {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true",
    }.items():
        monkeypatch.setenv(key, value)
    path = write_spec(tmp_path / "run.toml", _spec(tiny, tmp_path, report_to=("wandb", "mlflow")))
    run = _crash_after_step_5(path, capsys, monkeypatch)
    ids = json.loads((run / trackers.TRACKER_IDS).read_text())
    assert set(ids) == {"wandb", "mlflow"}
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--resume")
    assert code == 0, err
    assert json.loads((run / trackers.TRACKER_IDS).read_text()) == ids  # the same tracker runs, continued
    assert "failed" not in err, err

    client = MlflowClient(store)
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["train.max_steps"] == "6" and mlrun.data.params["output.report_to"] == '["wandb", "mlflow"]'
    losses = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "train/loss")}
    assert losses == {s: pytest.approx(v) for s, v in _expected(run)["train/loss"]}
    assert client.get_metric_history(ids["mlflow"], "final/accuracy")[0].value == pytest.approx(
        json.loads((run / "summary.json").read_text())["scores"]["accuracy"]
    )
    offline = sorted((run / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(offline) == 2  # the first attempt and the resumed one, both under the same run id
    assert all(list(d.glob("*.wandb")) for d in offline)


@pytest.mark.slow
def test_under_torchrun_rank_0_alone_logs(tiny, tmp_path):
    import os
    import subprocess
    import sys

    path = write_spec(tmp_path / "run.toml", _spec(tiny, tmp_path, batch_size=4))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "kdgeo", "distill", str(path), "-q"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    assert len(list((run / trackers.TENSORBOARD_DIR).iterdir())) == 1  # one event file: rank 0's
    found, expected = _scalars(run), _expected(run)
    assert [s for s, _ in found["train/loss"]] == list(range(1, 7))
    for tag, values in expected.items():
        assert _same(found[tag], values), tag


def test_overwriting_a_run_removes_its_old_tracker_files(tiny, tmp_path):
    from kdgeo.distillation import _write_run_files
    from kdgeo.spec import RunSpec

    run = tmp_path / "runs" / "t"
    (run / trackers.TENSORBOARD_DIR).mkdir(parents=True)
    (run / trackers.TENSORBOARD_DIR / "events.out.tfevents.1.old").write_bytes(b"old")
    (run / trackers.TRACKER_IDS).write_text('{"wandb": "old"}')
    spec = RunSpec.model_validate(_spec(tiny, tmp_path, report_to=()))
    _write_run_files(run, spec.model_copy(update={"output": spec.output.model_copy(update={"overwrite": True})}))
    assert not (run / trackers.TENSORBOARD_DIR).exists() and not (run / trackers.TRACKER_IDS).exists()
    assert (run / "spec.json").exists()


def test_the_spec_accepts_exactly_the_trackers_this_module_knows():
    import typing

    from kdgeo.spec import OutputSpec

    (literal,) = typing.get_args(OutputSpec.model_fields["report_to"].annotation)
    assert typing.get_args(literal) == trackers.TRACKERS
