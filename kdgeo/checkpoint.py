"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory ``<run>/checkpoint-<step>/`` holding

    student.safetensors     the student's weights
    objective.safetensors   the learned projection maps (absent when there are none)
    optimizer.pt            AdamW's state (tensors and numbers only: read with weights_only=True)
    rng.safetensors         torch's CPU (and CUDA) generator states
    best.safetensors        with train.save_best: the best evaluation's student so far (absent
                            before the first finite score), so a resumed run keeps it
    state.json              step, data position, scheduler and gradient-scaler state, counters,
                            the last evaluation and monitor values (with train.save_best, under
                            ``best``: the metric, best score and step, evaluations without a
                            better score, whether training stopped early); written last

It is written into a temporary directory, each file fsync'ed, then renamed into place, so a
crash or ``kill -9`` at any moment leaves either the previous checkpoint or the new one, never
a torn one. Only the newest ``keep`` checkpoints are kept.

Loading reads and checks every file before applying any of them, so a checkpoint damaged after
it was written (a disk fault, a partial copy, an edit) raises :class:`DamagedCheckpoint`, naming
the file and the fault, with the models untouched; :func:`load_newest` then falls back to the
previous checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from kdgeo.errors import KdgeoError, OutputError
from kdgeo.models import SAVE_ERRORS
from kdgeo.rundir import apply_umask, fsync_dir, fsync_file

PREFIX = "checkpoint-"
STATE = "state.json"
STUDENT = "student.safetensors"
OBJECTIVE = "objective.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.safetensors"
BEST = "best.safetensors"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")

STATE_KEYS: Mapping[str, type] = {
    "step": int,
    "metrics_lines": int,
    "scheduler": dict,
    "loop": dict,
    "loop.step": int,
    "loop.epoch": int,
    "loop.next_micro": int,
}
"""What a student checkpoint's state.json must hold (dotted keys look inside tables): without them a resume
would silently start the schedule or the data over instead of continuing."""

T = TypeVar("T")


class DamagedCheckpoint(KdgeoError):
    """One file of a checkpoint cannot be read or lacks what resuming needs (a torn copy, a disk fault, a hand
    edit). Raised before anything is applied, so the caller can fall back to an older checkpoint."""

    def __init__(self, path: Path, file: str, problem: str) -> None:
        self.path, self.file, self.problem = path, file, problem
        super().__init__(
            f"the checkpoint {path} is damaged ({file}: {problem}). Delete it to resume from the previous one, or "
            "start the run again with output.overwrite = true."
        )


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
    best_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically and prune to the newest ``keep``.

    ``best_state``: the best evaluation's student weights (train.save_best), written as best.safetensors in
    the same atomic directory, so the checkpoint and the best student it refers to cannot disagree.

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
        if best_state is not None:
            save_file({k: v.contiguous() for k, v in best_state.items()}, str(tmp / BEST))
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        for child in tmp.iterdir():
            apply_umask(child)
            fsync_file(child)
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


def read_state(path: Path, keys: Mapping[str, type] = STATE_KEYS) -> dict[str, Any]:
    """A checkpoint's state.json alone, with ``keys`` checked (cheap: decide whether it can be resumed before
    loading it). Raises :class:`DamagedCheckpoint`."""
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except Exception as err:  # any failure to read or parse means the file is damaged
        raise DamagedCheckpoint(path, STATE, _describe(err)) from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(path, STATE, f"holds a JSON {type(state).__name__}, not an object")
    for dotted, kind in keys.items():
        value: Any = state
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            raise DamagedCheckpoint(path, STATE, f"the key '{dotted}' is missing")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DamagedCheckpoint(path, STATE, f"'{dotted}' is a {type(value).__name__}, not a {kind.__name__}")
    return state


def _describe(err: BaseException) -> str:
    """The first line of an error, with its type: libraries append advice that does not apply to a damaged file
    (torch.load's is to retry with weights_only=False, which would run code from the file: only its detail is kept)."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    first = next((line.strip()[:200] for line in text.splitlines() if line.strip()), "")
    return f"{first} ({type(err).__name__})" if first else type(err).__name__


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path / name))
    except Exception as err:  # a torn or garbage file fails in the header parser or the tensor reader
        raise DamagedCheckpoint(path, name, _describe(err)) from None


def _check_weights(path: Path, name: str, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every weight of ``module`` is in ``tensors`` with its shape, and nothing else is (tied weights, saved once
    under one of their names, count as present)."""
    expected = module.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for key, value in expected.items():
        groups.setdefault(id(value), []).append(key)
    missing = [names[0] for names in groups.values() if not any(n in tensors for n in names)]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [
        f"{k} {list(tensors[k].shape)} (the model's is {list(expected[k].shape)})"
        for k in tensors
        if k in expected and tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    for what, items in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            raise DamagedCheckpoint(path, name, f"weights {what}: {', '.join(items[:3])}{more}")


def _read_optimizer(path: Path, optimizer: torch.optim.Optimizer, device: torch.device, full: bool) -> Any:
    """optimizer.pt, checked against ``optimizer``'s groups and parameter shapes (``full``: an FSDP full state,
    keyed by name, where only its outline can be checked here)."""
    try:
        # A full (FSDP) optimizer state stays on the CPU: each rank keeps only its shard of it.
        saved = torch.load(path / OPTIMIZER, map_location="cpu" if full else device, weights_only=True)
    except Exception as err:  # garbage unpickles as anything from UnpicklingError to EOFError
        raise DamagedCheckpoint(path, OPTIMIZER, f"not a readable torch file: {_describe(err)}") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)):
        raise DamagedCheckpoint(path, OPTIMIZER, "no 'state' table: not an optimizer state")
    groups = saved.get("param_groups")
    if not (
        isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    ):
        raise DamagedCheckpoint(path, OPTIMIZER, "no 'param_groups' list: not an optimizer state")
    # The update's implementation is this version's choice, not the checkpoint's: torch would take the saved
    # `fused` / `foreach` flags, and a checkpoint from before fused AdamW would then step a fused-built optimizer
    # (one that takes the fp16 scaler's flags) on the per-tensor kernel, which refuses them.
    for group, live in zip(groups, optimizer.param_groups):
        for key in ("fused", "foreach"):
            if key in live:
                group[key] = live[key]
    if full:
        return saved
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise DamagedCheckpoint(
            path,
            OPTIMIZER,
            f"parameter groups of {[len(g['params']) for g in groups]} parameters; the optimizer has "
            f"{[len(g['params']) for g in optimizer.param_groups]}",
        )
    for group, live in zip(groups, optimizer.param_groups):
        for pid, param in zip(group["params"], live["params"]):
            for key, value in (saved["state"].get(pid) or {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise DamagedCheckpoint(
                        path, OPTIMIZER, f"'{key}' of parameter {pid} is {list(value.shape)}, not {list(param.shape)}"
                    )
    return saved


def read_best(path: Path, student: nn.Module) -> dict[str, torch.Tensor]:
    """best.safetensors of a checkpoint, checked against ``student``'s weights (read before anything of the
    checkpoint is applied, like the rest). Raises :class:`DamagedCheckpoint`, also when it is missing."""
    if not (path / BEST).exists():
        raise DamagedCheckpoint(path, BEST, "missing, and state.json records a best student to restore")
    weights = _read_tensors(path, BEST)
    _check_weights(path, BEST, student, weights)
    return weights


def load_checkpoint(
    path: Path,
    student: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    load_student: Any = None,
    load_optimizer: Any = None,
    state_keys: Mapping[str, type] = STATE_KEYS,
) -> dict[str, Any]:
    """Restore weights and optimizer state in place; return state.json with the RNG states under
    ``_rng`` (apply them with :func:`restore_rng` once nothing else will seed or draw).

    Every file is read and checked first (:class:`DamagedCheckpoint` names the file and the fault) and only then
    applied, so a damaged checkpoint leaves the models and optimizer untouched and an older one can be loaded
    instead. ``load_student(state_dict)`` / ``load_optimizer(state)`` replace the plain loads (FSDP shards the
    full state dicts a checkpoint holds)."""
    state = read_state(path, state_keys)
    weights = _read_tensors(path, STUDENT)
    _check_weights(path, STUDENT, student, weights)
    has_objective = any(True for _ in objective.parameters())  # as save_checkpoint decides
    if has_objective and not (path / OBJECTIVE).exists():
        raise DamagedCheckpoint(path, OBJECTIVE, "missing, and the run has projection maps to restore")
    maps = _read_tensors(path, OBJECTIVE) if (path / OBJECTIVE).exists() else None
    if maps is not None:
        _check_weights(path, OBJECTIVE, objective, maps)
    saved_opt = _read_optimizer(path, optimizer, device, full=load_optimizer is not None)
    rng = _read_tensors(path, RNG)
    cpu = rng.get("cpu")
    reference = torch.get_rng_state()
    if cpu is None or cpu.dtype != reference.dtype or cpu.shape != reference.shape:
        raise DamagedCheckpoint(path, RNG, "no CPU generator state of the right size ('cpu')")
    try:
        if load_student is not None:
            load_student(weights)
        else:
            student.load_state_dict(weights, strict=False)  # checked above; tied weights are saved once
        if maps is not None:
            objective.load_state_dict(maps, strict=False)
        if load_optimizer is not None:
            load_optimizer(saved_opt)
        else:
            optimizer.load_state_dict(saved_opt)
    except (ValueError, KeyError, RuntimeError) as err:  # not expected after the checks: do not fall back
        raise KdgeoError(
            f"the checkpoint {path} passed its checks but could not be applied ({_describe(err)}). Delete it to "
            "resume from the previous one, or start the run again with output.overwrite = true."
        ) from None
    state["_rng"] = rng
    return state


def load_newest(run_dir: Path, load: Callable[[Path], T], note: Callable[[str], None]) -> tuple[Path, T] | None:
    """``load`` the newest checkpoint of ``run_dir`` that is not damaged, newest first; None when there is none.

    A :class:`DamagedCheckpoint` moves on to the previous checkpoint and ``note`` says which one was skipped and
    why; when every checkpoint is damaged, a KdgeoError names each directory to delete. Other errors propagate.
    """
    found = list_checkpoints(run_dir)
    if not found:
        return None
    damaged: list[DamagedCheckpoint] = []
    for _, path in reversed(found):
        try:
            loaded = load(path)
        except DamagedCheckpoint as err:
            damaged.append(err)
            continue
        if damaged:
            skipped = "; ".join(f"{d.path.name} is damaged ({d.file}: {d.problem})" for d in damaged)
            note(f"{skipped}: resuming from {path.name}")
        return path, loaded
    listing = "; ".join(f"{d.path.name} ({d.file}: {d.problem})" for d in damaged)
    names = " ".join(shlex.quote(str(d.path)) for d in damaged)  # pasted into a shell as it stands
    raise KdgeoError(
        f"every checkpoint of {run_dir} is damaged, so there is nothing intact to resume from: {listing}. Delete "
        f"{'it' if len(damaged) == 1 else 'them'} (rm -r {names}) and run the same command again to train from "
        "step 0 in this run directory, or start over without --resume (output.overwrite = true)."
    )


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
