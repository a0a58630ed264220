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

    monkeypatch.setattr(geometry, "procrustes_distance", fake)


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
