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
from kdgeo import checkpoint, rundir
run = Path(sys.argv[1])
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


@pytest.mark.parametrize("kills", [pytest.param(10, id="10-kills"), pytest.param(100, id="100-kills", marks=pytest.mark.slow)])
def test_kill_9_never_leaves_a_file_that_fails_to_load(tmp_path, kills):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(0)
    for attempt in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", KILLER, str(run)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.25))
        proc.kill()
        proc.wait()
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
