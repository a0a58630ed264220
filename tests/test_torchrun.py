"""`torchrun --nproc-per-node 2 -m kdgeo distill` on CPU (gloo) reproduces one process with twice the batch.

Every case launches the real torchrun in a subprocess. Tolerances: the same examples and weights
go through different reduction orders (two half-batches averaged by DDP, rows gathered across
processes), so losses agree to rel 1e-5 (abs 1e-6 for distances near 0) and weights to atol 1e-5, not bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import run_cli, tiny_spec, write_spec


def _torchrun(spec: Path, *args: str, procs: int = 2, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--standalone",
           "-m", "kdgeo", "distill", str(spec), "-q", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "student" / "model.safetensors"))


def _assert_same(a: Path, b: Path, keys: tuple[str, ...]) -> None:
    sa, sb = _events(a, "step"), _events(b, "step")
    assert [e["step"] for e in sa] == [e["step"] for e in sb] and sa
    for x, y in zip(sa, sb):
        for k in keys:
            # abs 1e-6: a distance near 0 is 2 - 2 rho with rho near 1, which keeps ~1e-7 absolute accuracy in float32.
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (k, x["step"], x[k], y[k])
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() < 1e-5, name
    ea, eb = _events(a, "eval"), _events(b, "eval")
    assert [e["scores"]["accuracy"] for e in ea] == [e["scores"]["accuracy"] for e in eb]


def _crash_after(run: Path, resume_from: str, drop: str) -> None:
    """Make ``run`` look as if it crashed after ``resume_from`` was written, then resume it under torchrun."""
    (run / "summary.json").unlink()
    shutil.rmtree(run / "student")
    shutil.rmtree(run / drop)
    done = _torchrun(run, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["resumed_from"].endswith(resume_from)


def _pair(tiny, tmp_path, capsys, name: str, losses: list[dict], train: dict, data: dict | None = None) -> tuple[Path, Path]:
    """(2 processes with batch 8 each, 1 process with batch 16), same spec otherwise."""
    spec = tiny_spec(tiny, tmp_path, losses=losses, train={"epochs": 2, "batch_size": 8, **train}, **({"data": data} if data else {}))
    path = write_spec(tmp_path / f"{name}.toml", {**spec, "name": name})
    done = _torchrun(path)
    assert done.returncode == 0, done.stderr[-3000:]
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "train.batch_size=16", "--set", f"output.name={name}-single")
    assert code == 0, err
    runs = tmp_path / "runs"
    return runs / name, runs / f"{name}-single"


def test_ddp_two_processes_match_one_process_with_the_doubled_batch(tiny, tmp_path, capsys):
    two, one = _pair(tiny, tmp_path, capsys, "ddp", [{"kind": "ce"}, {"kind": "kd"}], {"grad_accum": 2, "epochs": 4})
    _assert_same(two, one, ("ce", "kd", "loss"))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed"] == "ddp"
    # predictions.jsonl: rank 0's final evaluation, every example once, the same set as one process's
    from kdgeo.rundir import read_predictions

    records, single = read_predictions(two), read_predictions(one)
    assert records is not None and single is not None and [r["index"] for r in records] == list(range(32))
    assert [r["text_sha256"] for r in records] == [r["text_sha256"] for r in single]
    assert summary["data"]["eval_sha256"] == json.loads((one / "summary.json").read_text())["data"]["eval_sha256"]
    assert summary["scores"]["accuracy"] == sum(r["correct"] for r in records) / 32


def test_gathered_geometry_losses_span_the_global_batch(tiny, tmp_path, capsys):
    """procrustes and projection on token rows gathered from both processes = one process (rel 1e-5),
    with length-grouped batches."""
    two, one = _pair(tiny, tmp_path, capsys, "gather", [{"kind": "ce"}, {"kind": "procrustes"}, {"kind": "projection"}],
                     {"gather_features": True}, data={"group_by_length": True})
    _assert_same(two, one, ("ce", "procrustes", "projection", "loss"))


@pytest.mark.slow  # 31 s: two torchrun launches; the default suite keeps DDP parity and rank-0 errors
def test_ddp_resume_from_a_checkpoint_matches_the_uninterrupted_single_process_run(tiny, tmp_path, capsys):
    two, one = _pair(tiny, tmp_path, capsys, "resume", [{"kind": "ce"}, {"kind": "kd"}], {"checkpoint_every": 2, "keep_checkpoints": 4})
    # Simulate a crash after step 4 was checkpointed: nothing after it happened.
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    _crash_after(two, "checkpoint-4", drop="checkpoint-6")
    _assert_same(two, one, ("ce", "kd", "loss"))
    # Resuming with another number of processes would change the global batch: refused.
    (two / "summary.json").unlink()
    code, _, err = run_cli(capsys, "distill", str(two), "-q", "--resume")
    assert code == 2 and "written by 2 process(es)" in err and "--nproc-per-node 2" in err


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_and_resume(tiny, tmp_path, capsys):
    """FSDP2 (student and teacher sharded): same run as one process; checkpoints hold full
    weights and optimizer state, and a resume from one finishes the same run."""
    two, one = _pair(tiny, tmp_path, capsys, "fsdp", [{"kind": "ce"}, {"kind": "kd"}],
                     {"distributed": "fsdp", "checkpoint_every": 3, "keep_checkpoints": 4})
    _assert_same(two, one, ("ce", "kd", "loss"))
    _crash_after(two, "checkpoint-3", drop="checkpoint-6")
    _assert_same(two, one, ("ce", "kd", "loss"))


@pytest.mark.slow
def test_fsdp_with_projection_maps_gathered_rows_and_clipping(tiny, tmp_path, capsys):
    """FSDP2 student + plain projection parameters: one global gradient norm clips both (tight
    max_grad_norm), gathered geometry rows, and still the one-process run."""
    two, one = _pair(tiny, tmp_path, capsys, "fsdp-proj", [{"kind": "ce"}, {"kind": "procrustes"}, {"kind": "projection"}],
                     {"distributed": "fsdp", "gather_features": True, "max_grad_norm": 0.05})
    _assert_same(two, one, ("ce", "procrustes", "projection", "loss"))


def test_a_rank_0_error_stops_every_process_with_exit_2(tiny, tmp_path):
    """The run directory exists: rank 0 refuses it, and rank 1 stops with the same message
    instead of waiting at a collective."""
    spec = tiny_spec(tiny, tmp_path, train={"max_steps": 1, "batch_size": 8})
    path = write_spec(tmp_path / "exists.toml", {**spec, "name": "exists"})
    (tmp_path / "runs" / "exists").mkdir(parents=True)
    (tmp_path / "runs" / "exists" / "keep.txt").write_text("mine")
    done = _torchrun(path, timeout=120)
    assert done.returncode != 0
    # torchrun's agent prints its own traceback on a failed child; none comes from kdgeo's code.
    assert "exitcode  : 2" in done.stderr and "/kdgeo/" not in done.stderr
    assert "[rank 1] error:" in done.stderr and "already exists" in done.stderr
    assert (tmp_path / "runs" / "exists" / "keep.txt").read_text() == "mine"


@pytest.mark.slow  # about 2 minutes a strategy on 2 cores: two torchrun launches and two one-process runs
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_save_best_and_early_stopping_under_torchrun_match_one_process(tiny, tmp_path, capsys, strategy):
    """Rank 0 judges each evaluation and every process stops at the same step; student/ is the best step's
    student, as in one process with the doubled batch."""
    train = {"eval_every": 1, "lr": 1e-3, "schedule": "constant", "max_steps": 12, "distributed": strategy,
             "save_best": "accuracy", "early_stopping_patience": 2}
    two, one = _pair(tiny, tmp_path, capsys, f"best-{strategy}", [{"kind": "ce"}], train)
    _assert_same(two, one, ("ce", "loss"))
    s2, s1 = (json.loads((run / "summary.json").read_text()) for run in (two, one))
    keys = ("best_step", "best_score", "stopped_early", "steps")
    assert {k: s2[k] for k in keys} == {k: s1[k] for k in keys} and s2["stopped_early"] and s2["steps"] < 12
    assert s2["scores"]["accuracy"] == s2["best_score"]
