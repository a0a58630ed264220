"""kdgeo.checkpoint: a checkpoint is written whole or not at all, whenever the process dies."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import REPO

KILLER = r"""
import json, sys, torch
from pathlib import Path
from kdgeo import checkpoint, locks, rundir
run = Path(sys.argv[1])
held = locks.lock_run_dir(run, str(run), create=False)  # as run_distill holds it; kill -9 must release it
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
objective = torch.nn.Module()
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(4, 64)).sum().backward(); opt.step()
i = 0
print("ready", flush=True)
while True:
    i += 1
    rundir.write_json(run / "summary.json", {"i": i, "blob": list(range(2000))})
    rundir.append_jsonl(run / "metrics.jsonl", {"event": "step", "step": i, "pad": "x" * (i % 5000)})
    checkpoint.save_checkpoint(run, i, model, objective, opt, {"step": i}, keep=2)
"""


@pytest.mark.parametrize("kills", [pytest.param(5, id="5-kills"), pytest.param(100, id="100-kills", marks=pytest.mark.slow)])
def test_kill_9_never_leaves_a_file_that_fails_to_load(tmp_path, kills):
    from safetensors.torch import load_file

    from kdgeo.locks import lock_run_dir, run_holder

    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(0)
    for attempt in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", KILLER, str(run)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.25))
        assert run_holder(run).pid == proc.pid
        proc.kill()
        proc.wait()
        assert run_holder(run) is None  # the OS let go of the dead writer's lock: the next run may start
        lock_run_dir(run, str(run), create=False).release()
        json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        for line in lines:
            json.loads(line)  # every line whole
        for _, ckpt in checkpoint_list(run):
            json.loads((ckpt / "state.json").read_text())
            load_file(str(ckpt / "student.safetensors"))
            torch.load(ckpt / "optimizer.pt", weights_only=True)


def checkpoint_list(run: Path):
    from kdgeo.checkpoint import list_checkpoints

    return list_checkpoints(run)


def _state(step: int) -> dict:
    return {"step": step, "metrics_lines": 3, "scheduler": {}, "loop": {"step": step, "epoch": 0, "next_micro": 8}}


class _Tied(torch.nn.Module):
    """Embeddings tied to the output layer: saved once under one name, as a language model's are."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.out = torch.nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight


def _trained(seed: int):
    torch.manual_seed(seed)
    model = _Tied()
    opt = torch.optim.AdamW(model.parameters())
    model.out(model.emb(torch.tensor([1, 2, 3]))).sum().backward()
    opt.step()
    return model, opt


def _damage(ckpt: Path, how: str) -> str:
    """Damage one file of a checkpoint; return the file's name."""
    from safetensors.torch import load_file, save_file

    if how == "optimizer-garbage":
        (ckpt / "optimizer.pt").write_bytes(b"\x80\x02garbage" * 10)
        return "optimizer.pt"
    if how == "state-missing-key":
        state = json.loads((ckpt / "state.json").read_text())
        del state["loop"]["next_micro"]
        (ckpt / "state.json").write_text(json.dumps(state))
        return "state.json"
    if how == "state-garbage":
        (ckpt / "state.json").write_text('{"step": 3, "loo')
        return "state.json"
    if how == "rng-truncated":
        data = (ckpt / "rng.safetensors").read_bytes()
        (ckpt / "rng.safetensors").write_bytes(data[: len(data) // 2])
        return "rng.safetensors"
    if how == "rng-missing-key":
        save_file({"other": torch.zeros(3)}, str(ckpt / "rng.safetensors"))
        return "rng.safetensors"
    if how == "student-missing-key":
        save_file({}, str(ckpt / "student.safetensors"))
        return "student.safetensors"
    if how == "student-wrong-shape":
        weights = load_file(str(ckpt / "student.safetensors"))
        save_file({k: torch.zeros(3, 3) for k in weights}, str(ckpt / "student.safetensors"))
        return "student.safetensors"
    raise AssertionError(how)


DAMAGE = [
    "optimizer-garbage", "state-missing-key", "state-garbage", "rng-truncated", "rng-missing-key",
    "student-missing-key", "student-wrong-shape",
]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_file_is_named_and_nothing_is_applied(tmp_path, how):
    from kdgeo import checkpoint

    model, opt = _trained(0)
    ckpt = checkpoint.save_checkpoint(tmp_path, 3, model, torch.nn.Module(), opt, _state(3), keep=2)
    name = _damage(ckpt, how)
    fresh, fresh_opt = _trained(1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    opt_before = fresh_opt.state_dict()["state"][0]["exp_avg"].clone()
    with pytest.raises(checkpoint.DamagedCheckpoint) as info:
        checkpoint.load_checkpoint(ckpt, fresh, torch.nn.Module(), fresh_opt, torch.device("cpu"))
    assert info.value.file == name and info.value.path == ckpt
    assert f"{ckpt} is damaged ({name}: " in str(info.value)
    # Checked whole before anything was applied: the model and the optimizer are as they were.
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt_before)


def test_an_intact_checkpoint_with_tied_weights_loads_exactly(tmp_path):
    from kdgeo import checkpoint

    model, opt = _trained(0)
    ckpt = checkpoint.save_checkpoint(tmp_path, 3, model, torch.nn.Module(), opt, _state(3), keep=2)
    fresh, fresh_opt = _trained(1)
    state = checkpoint.load_checkpoint(ckpt, fresh, torch.nn.Module(), fresh_opt, torch.device("cpu"))
    assert state["step"] == 3 and "cpu" in state["_rng"]
    assert torch.equal(fresh.emb.weight, model.emb.weight) and fresh.out.weight is fresh.emb.weight
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_load_newest_falls_back_past_damage_and_names_every_directory_when_none_is_intact(tmp_path):
    from kdgeo import checkpoint
    from kdgeo.errors import KdgeoError

    model, opt = _trained(0)
    for step in (3, 6, 9):
        checkpoint.save_checkpoint(tmp_path, step, model, torch.nn.Module(), opt, _state(step), keep=3)
    _damage(tmp_path / "checkpoint-9", "optimizer-garbage")
    _damage(tmp_path / "checkpoint-6", "state-missing-key")
    notes: list[str] = []

    def load(path: Path) -> dict:
        fresh, fresh_opt = _trained(1)
        return checkpoint.load_checkpoint(path, fresh, torch.nn.Module(), fresh_opt, torch.device("cpu"))

    path, state = checkpoint.load_newest(tmp_path, load, notes.append)
    assert path.name == "checkpoint-3" and state["step"] == 3
    assert len(notes) == 1 and notes[0].startswith("checkpoint-9 is damaged (optimizer.pt: ")
    assert "checkpoint-6 is damaged (state.json: the key 'loop.next_micro' is missing)" in notes[0]
    assert notes[0].endswith(": resuming from checkpoint-3")
    _damage(tmp_path / "checkpoint-3", "rng-truncated")
    with pytest.raises(KdgeoError) as info:
        checkpoint.load_newest(tmp_path, load, notes.append)
    message = str(info.value)
    assert not isinstance(info.value, checkpoint.DamagedCheckpoint)
    for step in (9, 6, 3):
        assert str(tmp_path / f"checkpoint-{step}") in message
    assert "without --resume" in message
