"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory ``<run>/checkpoint-<step>/`` holding

    student.safetensors     the student's weights
    objective.safetensors   the learned projection maps (absent when there are none)
    optimizer.pt            AdamW's state (tensors and numbers only: read with weights_only=True)
    rng.safetensors         torch's CPU (and CUDA) generator states
    state.json              step, data position, scheduler and gradient-scaler state, counters,
                            the last evaluation and monitor values; written last

It is written into a temporary directory, each file fsync'ed, then renamed into place, so a
crash or ``kill -9`` at any moment leaves either the previous checkpoint or the new one, never
a torn one. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from kdgeo.errors import KdgeoError, OutputError
from kdgeo.models import SAVE_ERRORS
from kdgeo.rundir import fsync_dir

PREFIX = "checkpoint-"
STATE = "state.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those whose state.json exists), oldest first."""
    found: list[tuple[int, Path]] = []
    if not run_dir.exists():
        return found
    for child in run_dir.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE).exists():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    student: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    *,
    student_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically and prune to the newest ``keep``.

    Under torchrun the caller passes what the modules alone cannot give: the student's full
    weights gathered from its FSDP shards (``student_state``), the optimizer's full state, and
    every rank's generator states (``rng``, keys ``rank<r>.cpu`` ...).
    """
    from safetensors.torch import save_file, save_model

    final = run_dir / f"{PREFIX}{step}"
    tmp = run_dir / f".{PREFIX}{step}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if student_state is not None:
            # Tied weights (embeddings and LM head) are one tensor twice: safetensors wants separate copies.
            save_file(
                {k: v.detach().cpu().contiguous().clone() for k, v in student_state.items()},
                str(tmp / "student.safetensors"),
            )
        else:
            save_model(student, str(tmp / "student.safetensors"))
        if any(True for _ in objective.parameters()):
            save_model(objective, str(tmp / "objective.safetensors"))
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        save_file(rng if rng is not None else rng_states(), str(tmp / "rng.safetensors"))
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        for child in tmp.iterdir():
            _fsync_file(child)
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(run_dir)
    except SAVE_ERRORS as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(
            f"cannot write the checkpoint {final}: {getattr(err, 'strerror', None) or err}. Free some space or make "
            f"{run_dir} writable; metrics.jsonl and earlier checkpoints are intact."
        ) from None
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.glob(f".{PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def rng_states() -> dict[str, torch.Tensor]:
    """This process's torch generator states (CPU, and every CUDA device)."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    return rng


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json alone (cheap: decide whether it can be resumed before loading it)."""
    try:
        return json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise KdgeoError(
            f"the checkpoint {path} cannot be read ({err}). Delete it to resume from the previous one, or start the "
            "run again with output.overwrite = true."
        ) from None


def load_checkpoint(
    path: Path,
    student: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    load_student: Any = None,
    load_optimizer: Any = None,
) -> dict[str, Any]:
    """Restore weights and optimizer state in place; return state.json with the RNG states under
    ``_rng`` (apply them with :func:`restore_rng` once nothing else will seed or draw).

    ``load_student(state_dict)`` / ``load_optimizer(state)`` replace the plain loads (FSDP shards
    the full state dicts a checkpoint holds)."""
    from safetensors.torch import load_file, load_model

    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        if load_student is not None:
            load_student(load_file(str(path / "student.safetensors")))
        else:
            load_model(student, str(path / "student.safetensors"), device=str(device))
        if (path / "objective.safetensors").exists():
            load_model(objective, str(path / "objective.safetensors"), device=str(device))
        # A full (FSDP) optimizer state stays on the CPU: each rank keeps only its shard of it.
        saved_opt = torch.load(
            path / "optimizer.pt", map_location="cpu" if load_optimizer is not None else device, weights_only=True
        )
        if load_optimizer is not None:
            load_optimizer(saved_opt)
        else:
            optimizer.load_state_dict(saved_opt)
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError, SafetensorError) as err:
        raise KdgeoError(
            f"the checkpoint {path} cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__}). "
            "Delete it to resume from the previous one, or start the run again with output.overwrite = true."
        ) from None
    state["_rng"] = rng
    return state


def restore_rng(rng: dict[str, torch.Tensor], rank: int = 0) -> None:
    """Put torch's generators back where the checkpoint found them (call it last, after any seeding).
    Under torchrun each rank takes its own (``rank<r>.``-prefixed) states."""
    prefix = f"rank{rank}."
    if any(k.startswith(prefix) for k in rng):
        rng = {k[len(prefix) :]: v for k, v in rng.items() if k.startswith(prefix)}
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
