"""Reliability: interruption, checkpoints, resume (bitwise on CPU), non-finite losses. (Atomic checkpoint
writes under kill -9 are in test_checkpoint.py.)"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import REPO, run_cli, tiny_spec, write_spec
from kdgeo.rundir import read_jsonl


def _spec(tiny, tmp_path, **train):
    """40 steps of 8 examples over 64 (5 epochs), dropout on, so RNG and data position matter."""
    return tiny_spec(
        tiny, tmp_path,
        student={"init": "config", "arch": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}},
        losses=[{"kind": "ce"}, {"kind": "kd"}, {"kind": "procrustes"}],
        train={"max_steps": 40, "batch_size": 8, "log_every": 1, "warmup_ratio": 0.1, **train},
        monitor={"every": 5, "samples": 16},
    )


def _final(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    steps = [(e["step"], e["loss"]) for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "step"]
    evals = [(e["step"], e["scores"]) for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "eval"]
    return {"scores": summary["scores"], "geometry": summary["geometry"], "steps": steps, "evals": evals}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "student" / "model.safetensors")


def _assert_same_run(a: Path, b: Path) -> None:
    fa, fb = _final(a), _final(b)
    assert fa == fb  # every logged loss, every evaluation, the final geometry: bit for bit
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture()
def with_dropout(tiny, tmp_path_factory):
    """A teacher_clf copy with dropout 0.1, so the resumed RNG state is really tested."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("drop")
    target = root / "teacher"
    import shutil

    shutil.copytree(tiny["teacher_clf"], target)
    cfg = AutoConfig.from_pretrained(target)
    cfg.hidden_dropout_prob = 0.1
    cfg.save_pretrained(target)
    return {**tiny, "teacher_clf": target}


def test_resume_after_a_crash_gives_the_same_run_bit_for_bit(with_dropout, tmp_path, capsys):
    tiny = with_dropout
    path = write_spec(tmp_path / "run.toml", _spec(tiny, tmp_path, checkpoint_every=7, keep_checkpoints=2))
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "output.name=full")
    assert code == 0, err
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "output.name=crash")
    assert code == 0, err
    crash = tmp_path / "runs" / "crash"
    assert sorted(p.name for p in crash.glob("checkpoint-*")) == ["checkpoint-28", "checkpoint-35"]  # keep the last 2
    # Simulate a crash after step 35 had been checkpointed: the end of the run never happened.
    (crash / "summary.json").unlink()
    import shutil

    shutil.rmtree(crash / "student")
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "output.name=crash", "--resume")
    assert code == 0, err
    _assert_same_run(tmp_path / "runs" / "full", crash)
    assert json.loads((crash / "summary.json").read_text())["resumed_from"].endswith("checkpoint-35")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_exits_and_resume_matches_an_uninterrupted_run(with_dropout, tmp_path, capsys, sig):
    tiny = with_dropout
    path = write_spec(tmp_path / "run.toml", _spec(tiny, tmp_path))
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "output.name=full")
    assert code == 0, err
    # The step to interrupt after is drawn from a seed fixed by the signal, so a failure names its
    # cut and reruns it (the signal still lands wherever the run is when the step is logged).
    seed = int(sig)
    target = random.Random(seed).randint(2, 25)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "kdgeo", "distill", str(path), "--set", "output.name=cut"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    metrics = tmp_path / "runs" / "cut" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(e.get("event") == "step" and e["step"] >= target for e in read_jsonl(metrics)):
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + int(sig), (f"seed {seed}, interrupted after step {target}", err)
    flat = " ".join(err.split())
    assert "checkpoint written to" in flat and "Resume with: kdgeo distill" in flat and "--resume" in flat
    assert "Traceback" not in err
    cut = tmp_path / "runs" / "cut"
    assert not (cut / "summary.json").exists()
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "output.name=cut", "--resume")
    assert code == 0, err
    _assert_same_run(tmp_path / "runs" / "full", cut)


def test_resume_refuses_a_changed_spec_but_allows_display_changes(tiny, tmp_path, capsys):
    path = write_spec(tmp_path / "run.toml", _spec(tiny, tmp_path, max_steps=6, checkpoint_every=2))
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0, err
    run = tmp_path / "runs" / "t"
    (run / "summary.json").unlink()
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--resume", "--set", "train.lr=0.5")
    assert code == 2
    flat = " ".join(err.split())
    assert "train.lr: run has 0.001, spec now has 0.5" in flat
    code, _, err = run_cli(capsys, "distill", str(run), "-q", "--resume", "--set", "train.log_every=3", "--set", "monitor.every=0")
    assert code == 0, err  # SPEC may be the run directory itself


def test_resume_errors(tiny, tmp_path, capsys):
    path = write_spec(tmp_path / "run.toml", _spec(tiny, tmp_path, max_steps=2))
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--resume")
    assert code == 2 and "nothing to resume" in " ".join(err.split())
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--resume")
    assert code == 2 and "has already finished" in " ".join(err.split())
    (tmp_path / "runs" / "t" / "summary.json").unlink()
    (tmp_path / "runs" / "t" / "run.json").write_text('{"format_version": 99, "kdgeo": "9.9"}')
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--resume")
    assert code == 2 and "written by kdgeo 9.9" in " ".join(err.split())


def _nan_on_call(monkeypatch, which: int):
    from kdgeo import geometry

    real = geometry.procrustes_distance
    calls = {"n": 0}

    def fake(x, y, angular=False, **kw):
        calls["n"] += 1
        value = real(x, y, angular=angular, **kw)
        return value * float("nan") if calls["n"] == which else value

    def fake_batched(xs, ys, angular=False, **kw):  # the objective's batched call, one fake call per pair
        return [fake(x, y, angular=angular, **kw) for x, y in zip(xs, ys)]

    monkeypatch.setattr(geometry, "procrustes_distance", fake)
    monkeypatch.setattr(geometry, "procrustes_distances", fake_batched)


def test_a_non_finite_loss_names_the_term_and_pair_and_checkpoints(tiny, tmp_path, capsys, monkeypatch):
    _nan_on_call(monkeypatch, which=4)  # 2 pairs per step: the 2nd pair of step 2
    path = write_spec(tmp_path / "run.toml", _spec(tiny, tmp_path, max_steps=6))
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    flat = " ".join(err.split())
    assert code == 2, err
    assert "non-finite value at step 2" in flat and "procrustes/2-4" in flat and "--resume --set train.on_nonfinite=skip" in flat
    assert (tmp_path / "runs" / "t" / "checkpoint-1" / "state.json").exists()


def test_skip_policy_counts_and_goes_on(tiny, tmp_path, capsys, monkeypatch):
    _nan_on_call(monkeypatch, which=4)
    path = write_spec(tmp_path / "run.toml", _spec(tiny, tmp_path, max_steps=6, on_nonfinite="skip"))
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert summary["skipped_steps_nonfinite"] == 1 and summary["steps"] == 6
    events = [e for e in read_jsonl(tmp_path / "runs" / "t" / "metrics.jsonl") if e["event"] == "nonfinite"]
    assert events == [{"event": "nonfinite", "step": 2, "terms": ["procrustes/2-4", "procrustes"], "action": "skipped"}]


def _damaged_run(tiny, tmp_path, capsys) -> tuple[Path, Path, Path]:
    """A 12-step run checkpointed every 4 steps (checkpoint-4 and -8 kept), copied aside as the uninterrupted
    reference, then made to look crashed after step 8: (spec, reference, run)."""
    import shutil

    path = write_spec(tmp_path / "run.toml", _spec(tiny, tmp_path, max_steps=12, checkpoint_every=4, keep_checkpoints=2))
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "output.name=crash")
    assert code == 0, err
    run = tmp_path / "runs" / "crash"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    reference = shutil.copytree(run, tmp_path / "reference")
    (run / "summary.json").unlink()
    shutil.rmtree(run / "student")
    return path, reference, run


def _resume_in_a_process(path: Path, name: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "kdgeo", "distill", str(path), "--set", f"output.name={name}", "--resume"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _corrupt(ckpt: Path, how: str) -> str:
    if how == "optimizer":
        (ckpt / "optimizer.pt").write_bytes(os.urandom(4096))
        return "optimizer.pt"
    if how == "state":
        state = json.loads((ckpt / "state.json").read_text())
        del state["scheduler"]
        (ckpt / "state.json").write_text(json.dumps(state))
        return "state.json: the key 'scheduler' is missing"
    data = (ckpt / "rng.safetensors").read_bytes()
    (ckpt / "rng.safetensors").write_bytes(data[: len(data) - 100])
    return "rng.safetensors"


@pytest.mark.parametrize(
    "how", ["optimizer", pytest.param("state", marks=pytest.mark.slow), pytest.param("rng", marks=pytest.mark.slow)]
)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_bit_for_bit(with_dropout, tmp_path, capsys, how):
    import shutil

    path, reference, run = _damaged_run(with_dropout, tmp_path, capsys)
    what = _corrupt(run / "checkpoint-8", how)
    proc = _resume_in_a_process(path, "crash", tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = " ".join((proc.stdout + proc.stderr).split())
    assert f"checkpoint-8 is damaged ({what}" in said and ": resuming from checkpoint-4" in said, said
    assert "Traceback" not in proc.stderr
    _assert_same_run(reference, run)
    assert json.loads((run / "summary.json").read_text())["resumed_from"].endswith("checkpoint-4")
    if how != "optimizer":
        return
    # Every checkpoint damaged: exit 2 naming each directory to delete; deleting them trains again from step 0.
    (run / "summary.json").unlink()
    shutil.rmtree(run / "student")
    for ckpt in run.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    for step in (4, 8):
        shutil.copytree(reference / f"checkpoint-{step}", run / f"checkpoint-{step}")
        _corrupt(run / f"checkpoint-{step}", "optimizer")
    proc = _resume_in_a_process(path, "crash", tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    flat = " ".join(proc.stderr.split())
    assert f"rm -r {run / 'checkpoint-8'} {run / 'checkpoint-4'}" in flat and "without --resume" in flat, flat
    assert not (run / "summary.json").exists()


# ---- one signal policy for every phase (issue 12 B): real processes, real signals ----------------------


class _Distill:
    """`python -m kdgeo distill SPEC ...` in a fresh process; stderr is collected as it comes, so a
    test can wait for a phase's marker before it sends the signal."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        import threading

        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kdgeo", "distill", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        )
        self.err: list[str] = []
        self._reader = threading.Thread(target=lambda: self.err.extend(iter(self.proc.stderr.readline, "")), daemon=True)
        self._reader.start()

    def wait_for(self, ready, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while not ready("".join(self.err)):
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before the marker:\n{''.join(self.err)}"
            assert time.time() < deadline, "".join(self.err)
            time.sleep(0.005)

    def finish(self, timeout: float = 240) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code, "".join(self.err)


def _continue_command(err: str) -> list[str]:
    """The arguments of the command the message says continues the run (after 'Resume with: kdgeo' or
    'Continue with: kdgeo')."""
    import shlex

    line = next(l for l in err.splitlines() if l.startswith(("Resume with: kdgeo ", "Continue with: kdgeo ")))
    return shlex.split(line.split(": ", 1)[1])[1:]


def _finetune_spec(tiny, tmp_path, cache: str, **train):
    """A base teacher fine-tuned for 48 steps (long enough to be interrupted in the middle)."""
    return tiny_spec(
        tiny, tmp_path, teacher={"model": str(tiny["teacher"]), "finetune": {"epochs": 6, "batch_size": 8}},
        train={"max_steps": 2, **train}, output={"dir": str(tmp_path / "runs"), "teacher_cache": str(tmp_path / cache)},
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_in_the_teacher_finetune_saves_it_and_the_rerun_continues_it_bit_for_bit(tiny, tmp_path, capsys, sig):
    full = write_spec(tmp_path / "full.toml", _finetune_spec(tiny, tmp_path, "cache_full"))
    code, _, err = run_cli(capsys, "distill", str(full), "-q", "--set", "output.name=full")
    assert code == 0, err
    path = write_spec(tmp_path / "run.toml", _finetune_spec(tiny, tmp_path, "cache"))
    run = _Distill(tmp_path, str(path))
    run.wait_for(lambda err: "fine-tuning the teacher" in err)
    run.proc.send_signal(sig)
    code, err = run.finish()
    assert code == 128 + int(sig), err
    assert "Traceback" not in err
    flat = " ".join(err.split())
    assert f"{sig.name} during the teacher fine-tune at step" in flat and "its progress is saved in" in flat, flat
    assert f"Continue with: kdgeo distill {path}" in flat and "--resume" not in flat, flat
    partial = [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and list(partial[0].glob("checkpoint-*/state.json"))
    assert not (tmp_path / "runs" / "t" / "spec.json").exists()  # nothing of the run itself was written
    # The command it prints continues the fine-tune where it stopped ...
    code, _, err = run_cli(capsys, *_continue_command(err))
    assert code == 0, err
    assert "continuing the teacher fine-tune from" in err
    assert not partial[0].exists()  # removed once the fine-tuned teacher is cached
    # ... and gives the teacher a fine-tune never interrupted gives, bit for bit.
    from safetensors.torch import load_file

    summaries = [json.loads((tmp_path / "runs" / n / "summary.json").read_text()) for n in ("full", "t")]
    assert summaries[1]["teacher_finetune"]["steps"] == summaries[0]["teacher_finetune"]["steps"] == 48
    a, b = (load_file(Path(s["teacher_path"]) / "model.safetensors") for s in summaries)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summaries[1]["scores"] == summaries[0]["scores"]


def test_a_finetune_stopped_in_process_continues_from_its_saved_step(tiny, tmp_path):
    """teacher.finetune itself: a real SIGINT at step 2 saves the state, the next call continues from step 2 and
    ends where an uninterrupted fine-tune ends (fp64, bit for bit)."""
    from kdgeo import stopping
    from kdgeo.errors import RunInterrupted
    from kdgeo.events import FinetuneStep
    from kdgeo.plan import make_plan
    from kdgeo.spec import load_spec
    from kdgeo.teacher import FinetuneArgs, finetune

    path = write_spec(tmp_path / "run.toml", _finetune_spec(tiny, tmp_path, "cache", precision="fp64"))
    plan = make_plan(load_spec(path), 1, False, lambda e: None)
    args = FinetuneArgs(epochs=0.75, lr=1e-3, batch_size=16, weight_decay=0.01, warmup_ratio=0.1, max_grad_norm=1.0, seed=0)

    def teacher():
        torch.manual_seed(0)
        model, _ = plan.task.load_teacher(plan.teacher_ref, plan.t_cfg, True, False)
        return model.to(dtype=torch.float64)

    cpu = torch.device("cpu")
    reference = teacher()
    finetune(reference, plan.train, args, cpu, None, lambda e: None, plan.task)
    partial = tmp_path / "key.partial"

    def stop_at_2(event):
        if isinstance(event, FinetuneStep) and event.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    first = teacher()
    with stopping.stop_on_signals(), pytest.raises(RunInterrupted) as info:
        finetune(first, plan.train, args, cpu, None, stop_at_2, plan.task, partial=partial)
    assert info.value.exit_code == 130 and "at step 2 of 3" in str(info.value)
    assert (partial / "checkpoint-2" / "state.json").exists()
    stages: list[str] = []
    second = teacher()
    stats = finetune(second, plan.train, args, cpu, None, lambda e: stages.append(getattr(e, "message", "")), plan.task, partial=partial)
    assert stats["steps"] == 3 and any("continuing the teacher fine-tune" in s and "step 2 of 3" in s for s in stages)
    want, got = reference.state_dict(), second.state_dict()
    assert all(got[k].dtype == torch.float64 and torch.equal(want[k], got[k]) for k in want)
    # A torn partial state is reported and the fine-tune starts over (never a traceback).
    (partial / "checkpoint-2" / "optimizer.pt").write_bytes(b"garbage")
    notes: list[str] = []
    third = teacher()
    finetune(third, plan.train, args, cpu, None, lambda e: notes.append(getattr(e, "message", "")), plan.task, partial=partial)
    assert any("cannot be used" in n and "from the start" in n for n in notes)
    assert all(torch.equal(want[k], third.state_dict()[k]) for k in want)


@pytest.mark.slow
def test_a_signal_while_caching_teacher_outputs_removes_the_unfinished_entry(tiny, tmp_path, capsys):
    spec = tiny_spec(
        tiny, tmp_path, losses=[{"kind": "ce"}, {"kind": "kd"}], train={"max_steps": 2},
        data={"max_train_samples": 2400}, output={"dir": str(tmp_path / "runs"), "teacher_cache": str(tmp_path / "cache"),
                                                  "teacher_outputs": True, "teacher_outputs_dir": str(tmp_path / "outputs")},
    )
    path = write_spec(tmp_path / "run.toml", spec)
    run = _Distill(tmp_path, str(path))
    run.wait_for(lambda err: "caching teacher outputs" in err)
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 143, err
    assert "Traceback" not in err
    flat = " ".join(err.split())
    # Mostly between two batches of the build; on a very fast machine it may finish the entry first.
    assert ("while caching teacher outputs" in flat and "the unfinished cache entry was removed" in flat) or (
        "before training started" in flat), flat
    assert f"Continue with: kdgeo distill {path}" in flat, flat
    leftovers = [p.name for p in (tmp_path / "outputs").rglob("*") if "tmp" in p.name or "build" in p.name]
    assert leftovers == []
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0, err


def test_caching_teacher_outputs_stops_between_batches(tiny, tmp_path):
    """In process: a SIGINT before the build's first batch raises, and the entry is not left half-written."""
    from kdgeo import stopping
    from kdgeo.errors import RunInterrupted
    from kdgeo.plan import make_plan
    from kdgeo.spec import load_spec
    from kdgeo.teacher_outputs import OutputPlan, ensure

    path = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path))
    plan = make_plan(load_spec(path), 1, False, lambda e: None)
    teacher, _ = plan.task.load_teacher(plan.teacher_ref, plan.t_cfg, False, False)
    layout = OutputPlan(task=plan.task, rows=plan.rows, layers=(), widths=(), logit_width=8)
    root = tmp_path / "outputs"
    with stopping.stop_on_signals(), pytest.raises(RunInterrupted) as info:
        os.kill(os.getpid(), signal.SIGINT)
        ensure(root, {"k": 1}, layout, teacher.eval(), plan.train, "fp16", 16, torch.device("cpu"), None, lambda e: None)
    assert info.value.exit_code == 130 and "while caching teacher outputs (0 of 64 examples written)" in str(info.value)
    assert [p for p in root.rglob("*") if p.is_file()] == [] or all(p.suffix == ".lock" or p.name.startswith(".") for p in root.rglob("*") if p.is_file())


def _final_phase_spec(tiny, tmp_path):
    """800 evaluation examples: the final evaluation takes long enough to be interrupted."""
    return tiny_spec(tiny, tmp_path, data={"max_eval_samples": 800}, train={"max_steps": 6, "log_every": 1},
                     monitor={"every": 0, "samples": 16})


def _at_the_last_checkpoint(run_dir: Path, total: int):
    def ready(_err: str) -> bool:
        metrics = run_dir / "metrics.jsonl"
        return metrics.exists() and any(e.get("event") == "checkpoint" and e["step"] == total for e in read_jsonl(metrics))

    return ready


@pytest.mark.slow
def test_ctrl_c_at_the_end_of_training_keeps_the_insurance_checkpoint_and_resume_finishes(tiny, tmp_path, capsys):
    path = write_spec(tmp_path / "run.toml", _final_phase_spec(tiny, tmp_path))
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "output.name=full")
    assert code == 0, err
    run_dir = tmp_path / "runs" / "cut"
    run = _Distill(tmp_path, str(path), "--set", "output.name=cut")
    run.wait_for(_at_the_last_checkpoint(run_dir, 6))  # the last step is done: the final phase runs now
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 130, err  # never 0 after a signal
    assert "Traceback" not in err
    flat = " ".join(err.split())
    assert "(step 6 of 6): the end-of-training checkpoint" in flat and "checkpoint-6 is kept" in flat, flat
    assert f"Resume with: kdgeo distill {path} --set output.name=cut --resume" in flat, flat
    assert not (run_dir / "summary.json").exists() and (run_dir / "checkpoint-6" / "state.json").exists()
    code, _, err = run_cli(capsys, *_continue_command(err), "-q")
    assert code == 0, err
    assert not (run_dir / "checkpoint-6").exists()
    _assert_same_run(tmp_path / "runs" / "full", run_dir)


def test_a_signal_in_the_last_training_step_is_not_ignored(tiny, tmp_path, capsys, monkeypatch):
    """In process (the step is too short to hit from outside): SIGINT inside step 6 of 6."""
    from kdgeo import step_loss

    real = step_loss.StepLoss.__call__
    calls = {"n": 0}

    def signal_in_the_last_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch)

    monkeypatch.setattr(step_loss.StepLoss, "__call__", signal_in_the_last_step)
    path = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path, train={"max_steps": 6}))
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 130, err
    flat = " ".join(err.split())
    assert "SIGINT at the end of training (step 6 of 6)" in flat and "checkpoint-6 is kept" in flat, flat
    assert "Resume with: kdgeo distill" in flat and "--resume" in flat
    assert not (tmp_path / "runs" / "t" / "summary.json").exists()
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--resume")
    assert code == 0, err


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_with_one_line_and_no_traceback(tiny, tmp_path):
    path = write_spec(tmp_path / "run.toml", _final_phase_spec(tiny, tmp_path))
    run_dir = tmp_path / "runs" / "t"
    run = _Distill(tmp_path, str(path))
    run.wait_for(_at_the_last_checkpoint(run_dir, 6))
    run.proc.send_signal(signal.SIGINT)  # the final evaluation goes on to its end ...
    time.sleep(0.05)
    run.proc.send_signal(signal.SIGINT)  # ... unless Ctrl-C comes again
    code, err = run.finish()
    assert code == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err
    lines = [l for l in err.splitlines() if "Ctrl-C" in l or "kept" in l]
    assert len(lines) == 1 and "second Ctrl-C: stopped at once" in lines[0], err
    assert f"{run_dir / 'checkpoint-6'} is kept and --resume continues from it" in lines[0]
    assert f"Resume with: kdgeo distill {path} --resume" in err


def test_a_signal_during_pre_flight_stops_before_anything_is_written(tiny, tmp_path, capsys, monkeypatch):
    from kdgeo import distillation

    real = distillation.make_plan

    def plan_then_signal(*a, **kw):
        plan = real(*a, **kw)
        os.kill(os.getpid(), signal.SIGTERM)
        return plan

    monkeypatch.setattr(distillation, "make_plan", plan_then_signal)
    path = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path))
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 143, err
    flat = " ".join(err.split())
    assert "SIGTERM during pre-flight: nothing of the run was written yet" in flat
    assert "Continue with: kdgeo distill" in flat and "--resume" not in flat
    assert not (tmp_path / "runs" / "t" / "spec.json").exists()


def test_a_signal_between_runs_of_a_sweep_stops_the_sweep(tiny, tmp_path, capsys, monkeypatch):
    from kdgeo import sweep

    real = sweep.run_distill

    def run_then_signal(*a, **kw):
        result = real(*a, **kw)
        os.kill(os.getpid(), signal.SIGINT)  # after the run: it finished, the sweep stops before the next
        return result

    monkeypatch.setattr(sweep, "run_distill", run_then_signal)
    spec = tiny_spec(tiny, tmp_path, train={"max_steps": 1},
                     sweep={"seeds": [0], "variants": {"a": {}, "b": {"train": {"lr": 5e-4}}}})
    path = write_spec(tmp_path / "sweep.toml", spec)
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 130, err
    flat = " ".join(err.split())
    assert "SIGINT after the run finished" in flat or "between runs of the sweep" in flat, flat
    assert "Resume with: kdgeo distill" in flat
    done = sorted(p.parent.name for p in (tmp_path / "runs").rglob("summary.json"))
    assert len(done) == 1
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0, err
    assert len(list((tmp_path / "runs").rglob("summary.json"))) == 2


def test_more_steps_are_refused_on_resume_and_a_new_run_from_the_student_trains_further(tiny, tmp_path, capsys):
    spec = tiny_spec(tiny, tmp_path, train={"max_steps": 2}, monitor={"every": 0})
    path = write_spec(tmp_path / "run.toml", spec)
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0, err
    run = tmp_path / "runs" / "t"
    hint = f'student.init = "pretrained" and student.model = "{run / "student"}"'
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--resume", "--set", "train.max_steps=4")
    flat = " ".join(err.split())
    assert code == 2 and "has already finished" in flat and hint in flat, flat
    (run / "summary.json").unlink()  # an unfinished run: the longer schedule is a result-changing difference
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--resume", "--set", "train.max_steps=4")
    flat = " ".join(err.split())
    assert code == 2 and "train.max_steps: run has 2, spec now has 4" in flat and hint in flat, flat
    further = {**spec, "student": {"init": "pretrained", "model": str(run / "student")}}
    further["output"] = {**spec["output"], "name": "further"}
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "further.toml", further)), "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "runs" / "further" / "summary.json").read_text())["steps"] == 2


def test_save_best_and_early_stopping_resume_bit_for_bit(with_dropout, tmp_path, capsys):
    """A checkpoint between the best evaluation and the early stop carries the best score, its step, the count of
    evaluations since it and the best student's weights: resuming from it ends the run exactly as the
    uninterrupted one did (the same stop, the same student/ from the checkpoint's best.safetensors)."""
    from cli_helpers import tiny_spec

    train = {"max_steps": 16, "eval_every": 1, "lr": 1e-3, "schedule": "constant", "checkpoint_every": 1, "keep_checkpoints": 20}
    spec = tiny_spec(with_dropout, tmp_path, train={**train, "save_best": "accuracy", "early_stopping_patience": 3})
    path = write_spec(tmp_path / "run.toml", spec)
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "output.name=full")
    assert code == 0, err
    full = tmp_path / "runs" / "full"
    summary = json.loads((full / "summary.json").read_text())
    best, stop = summary["best_step"], summary["steps"]
    assert summary["stopped_early"] and best < stop - 1 < 16, summary
    # Copy the run to the moment after checkpoint `cut` (past the best, before the stop) and resume it.
    import shutil

    cut = stop - 1
    crash = tmp_path / "runs" / "crash"
    shutil.copytree(full, crash)
    for name in ("summary.json", "predictions.jsonl"):
        (crash / name).unlink()
    shutil.rmtree(crash / "student")
    for ckpt in crash.glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > cut:
            shutil.rmtree(ckpt)
    saved = json.loads((crash / f"checkpoint-{cut}" / "state.json").read_text())["best"]
    assert saved["step"] == best and saved["bad"] == cut - best and not saved["stop"] and saved["metric"] == "accuracy"
    assert (crash / f"checkpoint-{cut}" / "best.safetensors").exists()
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "output.name=crash", "--resume")
    assert code == 0, err
    _assert_same_run(full, crash)
    again = json.loads((crash / "summary.json").read_text())
    keys = ("best_metric", "best_step", "best_score", "final_scores", "stopped_early", "steps")
    assert {k: again[k] for k in keys} == {k: summary[k] for k in keys}
    assert again["resumed_from"].endswith(f"checkpoint-{cut}")
