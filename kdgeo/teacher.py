"""Fine-tuning a teacher on the task, and caching the result.

A teacher that has no classification head for the run's labels (a base model such as
all-MiniLM-L6-v2) is fine-tuned with cross-entropy first. A causal-LM teacher is fine-tuned on
the instruction data when asked (``[teacher.finetune] force = true``, as MiniLLM fine-tunes its
OPT teachers on Dolly): next-token cross-entropy on the response tokens only. The result is saved under
``<teacher_cache>/<key>/`` where the key hashes everything that changes it: the model reference
and revision, the training data settings, the label names, and the fine-tuning
hyper-parameters. Every later run with the same key reuses it. The directory is written to a
temporary name and renamed into place, so an interrupted fine-tune never leaves a half-written
cache entry. A stop signal (:mod:`kdgeo.stopping`) saves the fine-tune's progress in
``<teacher_cache>/<key>.partial/`` (a checkpoint directory); the next run with the same key
continues it, to the same weights as a fine-tune never interrupted.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdgeo import data as data_mod
from kdgeo import locks, output_cache, stopping
from kdgeo.errors import OutputError
from kdgeo.events import FinetuneStep, Progress, Stage
from kdgeo.models import SAVE_ERRORS, save_model_dir
from kdgeo.optim import build_optimizer, build_scheduler, param_groups
from kdgeo.runtime import autocast

if TYPE_CHECKING:
    from kdgeo.distributed import Dist
    from kdgeo.plan import DistillPlan
    from kdgeo.tasks import Task

CACHE_META = "kdgeo-teacher.json"


@dataclass(frozen=True)
class FinetuneArgs:
    epochs: float
    lr: float
    batch_size: int
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    seed: int


def cache_key(
    model_ref: str,
    revision: str | None,
    data_key: dict[str, Any],
    label_names: list[str],
    args: FinetuneArgs,
    float64: bool = False,
) -> str:
    """The cache entry's name. A float64 fine-tune (``train.precision = "fp64"``) gives other
    weights, saved as float64, so it gets its own entries; other keys are as before, so existing
    caches stay valid."""
    payload: dict[str, Any] = {
        "format": 1,
        "model": model_ref,
        "revision": revision,
        "data": data_key,
        "labels": label_names,
        "finetune": asdict(args),
    }
    if float64:
        payload["dtype"] = "float64"
    return output_cache.cache_key(payload, chars=16, compact=False)


def finetune_key(plan: DistillPlan, ft: FinetuneArgs, float64: bool) -> str:
    """The fine-tuned teacher's cache key for ``plan`` (:func:`cache_key` of its model, data and
    hyper-parameters): also part of the key of what the fine-tuned teacher generates
    (:mod:`kdgeo.sequence_kd`), which the dry run computes without loading it."""
    from kdgeo.models import fingerprint_model

    data_key = {
        **plan.task.data_key(plan.data, plan.train),
        "fingerprint": data_mod.fingerprint(plan.data["dataset"]),
    }
    model_key = f"{plan.teacher_ref.ref}|{fingerprint_model(plan.teacher_ref)}"
    return cache_key(model_key, plan.teacher_ref.revision, data_key, list(plan.task.label_names), ft, float64=float64)


def cached_teacher(cache_dir: Path, key: str) -> Path | None:
    entry = cache_dir / key
    if (entry / CACHE_META).exists() and (entry / "config.json").exists():
        return entry
    return None


def finetune(
    model: nn.Module,
    split: data_mod.TextSplit,
    args: FinetuneArgs,
    device: torch.device,
    amp: torch.dtype | None,
    progress: Progress,
    task: Task,
    group_by_length: bool = False,
    partial: Path | None = None,
) -> dict[str, Any]:
    """Cross-entropy fine-tuning of ``model`` on ``split`` (role 'teacher'), in place, on the
    task's targets (:meth:`kdgeo.tasks.Task.logits_and_labels`: the labels, or the next response
    token). It trains in the model's dtype (float64 under ``train.precision = "fp64"``, the caller
    casts it) with ``amp`` autocast if any.

    ``partial``: where an interrupted fine-tune keeps its progress. A stop signal
    (:mod:`kdgeo.stopping`) between two steps saves weights, optimizer, schedule, scaler, data
    position and RNG states there and raises :class:`~kdgeo.errors.RunInterrupted`; a later call
    with the same ``partial`` continues from it, giving the same weights as a fine-tune never
    interrupted (bit for bit on CPU). The caller removes it once the result is cached."""
    from kdgeo import stopping
    from kdgeo.losses import at_least_float32

    torch.manual_seed(args.seed)
    model.to(device).train()
    steps_per_epoch = -(-len(split) // args.batch_size)
    total = max(1, int(round(args.epochs * steps_per_epoch)))
    optimizer = build_optimizer(param_groups(model.named_parameters(), args.lr, args.weight_decay), args.lr)
    scheduler = build_scheduler(optimizer, total, args.warmup_ratio, "linear")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    lengths = data_mod.lengths_of(split) if group_by_length else None
    step, epoch, pos, seconds, start = 0, 0, 0, 0.0, time.perf_counter()
    last_loss = float("nan")
    saved = _load_partial(partial, model, optimizer, scheduler, scaler, device, total, progress) if partial else None
    if saved is not None:
        step, epoch, pos, seconds, last_loss = (saved[k] for k in ("step", "epoch", "pos", "seconds", "last_loss"))
    while step < total:
        order = data_mod.batch_indices(len(split), args.batch_size, True, args.seed, epoch, lengths)
        for idx in order[pos:]:
            batch = data_mod.collate(split, idx)
            inputs = data_mod.to_device(batch["teacher"], device)
            with autocast(device, amp):
                logits = model(**inputs).logits  # (B, C) or (B, T, V)
            mask = task.row_mask(batch, "teacher", inputs, device)
            logits, labels = task.logits_and_labels(logits, inputs, mask, batch, device)  # (n, C), (n,)
            loss = torch.nn.functional.cross_entropy(at_least_float32(logits), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            pos += 1
            last_loss = loss.item()
            progress(FinetuneStep(step=step, total=total, loss=last_loss))
            if step >= total:
                break
            signum = stopping.pending()
            if signum is not None:
                done = seconds + time.perf_counter() - start
                kept = "its progress is lost (no place to keep it)"
                if partial is not None:
                    state = {"step": step, "total": total, "epoch": epoch, "pos": pos, "seconds": done}
                    path = _save_partial(
                        partial, model, optimizer, scheduler, scaler, {**state, "last_loss": last_loss}
                    )
                    kept = f"its progress is saved in {path}; the next run with this teacher and data continues it"
                raise stopping.interrupted(signum, f"during the teacher fine-tune at step {step} of {total}: {kept}.")
        else:
            epoch, pos = epoch + 1, 0
    model.eval()
    return {"steps": step, "final_loss": last_loss, "seconds": seconds + time.perf_counter() - start}


PARTIAL = ".partial"
"""``<teacher_cache>/<key>.partial/``: an interrupted fine-tune's progress (a checkpoint directory)."""


def _save_partial(
    partial: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: dict[str, Any],
) -> Path:
    """The fine-tune's state as a training checkpoint (:func:`kdgeo.checkpoint.save_checkpoint`:
    written aside, fsync'ed, renamed into place; only the newest is kept)."""
    from kdgeo import checkpoint

    state = {
        **state,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
    }
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot keep the teacher fine-tune's progress in {partial}: {err.strerror or err}") from None
    return checkpoint.save_checkpoint(partial, state["step"], model, nn.Module(), optimizer, state, keep=1)


def _load_partial(
    partial: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    total: int,
    progress: Progress,
) -> dict[str, Any] | None:
    """Continue an interrupted fine-tune: its saved state (None when there is none, or it cannot be
    read: then the fine-tune starts over, saying why). Everything is read before anything is applied."""
    from safetensors.torch import load_file

    from kdgeo import checkpoint
    from kdgeo.errors import KdgeoError

    found = checkpoint.latest_checkpoint(partial)
    if found is None:
        return None
    try:
        state = json.loads((found / checkpoint.STATE).read_text(encoding="utf-8"))
        for name in ("step", "epoch", "pos"):
            if not isinstance(state.get(name), int):
                raise ValueError(f"state.json has no integer '{name}'")
        if state.get("total") != total:
            raise ValueError(f"it was saved for {state.get('total')} steps, this fine-tune has {total}")
        weights = load_file(str(found / "student.safetensors"), device=str(device))
        saved_opt = torch.load(found / "optimizer.pt", map_location=device, weights_only=True)
        rng = load_file(str(found / "rng.safetensors"))
    except Exception as err:  # a torn or stale copy: starting over loses time, never correctness
        progress(Stage(f"the saved teacher fine-tune {found} cannot be used ({err}): fine-tuning from the start"))
        shutil.rmtree(partial, ignore_errors=True)
        return None
    try:
        groups: dict[int, list[str]] = {}  # tied weights are saved once, under one of their names
        for name, value in model.state_dict(keep_vars=True).items():
            groups.setdefault(id(value), []).append(name)
        absent = [names[0] for names in groups.values() if not any(n in weights for n in names)]
        unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
        if absent or unexpected:
            raise ValueError(f"weights missing {absent[:3]}, unexpected {unexpected[:3]}")
        optimizer.load_state_dict(saved_opt)
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except Exception as err:
        raise KdgeoError(
            f"the saved teacher fine-tune {found} does not fit this teacher ({err}). Delete {partial} to fine-tune "
            "from the start."
        ) from None
    checkpoint.restore_rng(rng)  # last: after the seeding above, which it must override
    progress(Stage(f"continuing the teacher fine-tune from {found} (step {state['step']} of {total})"))
    return {"seconds": 0.0, "last_loss": float("nan"), **state}


def save_to_cache(model: nn.Module, tokenizer: Any, cache_dir: Path, key: str, meta: dict[str, Any]) -> Path:
    entry = cache_dir / key
    try:
        save_model_dir(model, tokenizer, entry, extra={CACHE_META: json.dumps(meta, indent=2) + "\n"})
    except SAVE_ERRORS as err:
        raise OutputError(
            f"output.teacher_cache = '{cache_dir}': cannot write the fine-tuned teacher "
            f"({getattr(err, 'strerror', None) or err}); set output.teacher_cache to a writable directory."
        ) from None
    return entry


@dataclass(frozen=True)
class PreparedTeacher:
    """The frozen teacher on the run's device, where its weights came from (the model reference or
    the fine-tuned cache entry), and the fine-tune's record for summary.json (None without one)."""

    model: nn.Module
    source: str
    finetune: dict[str, Any] | None


def prepare(
    plan: DistillPlan,
    dist: Dist,
    device: torch.device,
    amp: torch.dtype | None,
    param_dtype: torch.dtype | None,
    emit: Progress,
) -> PreparedTeacher:
    """Load the teacher with the task's head; fine-tune it once (rank 0 under torchrun) and cache
    it when it has no trained head or [teacher.finetune] asks; freeze it on ``device``."""
    from kdgeo import distributed
    from kdgeo.models import ModelRef, align_pad_token

    emit(Stage("loading the teacher"))
    ft = plan.finetune
    # A head the checkpoint lacks is initialised from the global RNG: seed it, or runs differ.
    torch.manual_seed(ft.seed if ft is not None else plan.seed)
    teacher, needs_finetune = plan.task.load_teacher(plan.teacher_ref, plan.t_cfg, ft is not None, plan.finetune_force)
    # fp64: cast before any fine-tune, which then trains in float64. Weights are drawn (a fresh
    # head, a student from a config) in float32 as in an fp32 run, so both runs start alike.
    teacher.to(dtype=param_dtype)
    source, info = plan.teacher_ref.ref, None
    if needs_finetune:
        assert ft is not None  # load_teacher refuses a teacher that needs one without [teacher.finetune]
        key = finetune_key(plan, ft, float64=param_dtype is not None)
        cache_dir = Path(plan.output.teacher_cache).expanduser()

        def wait(message: str) -> None:
            emit(Stage(message))

        def finetune_once() -> dict[str, Any] | None:
            """Fine-tune and cache unless the cache has it; under torchrun rank 0 does this alone
            and the others load the cached result."""
            if cached_teacher(cache_dir, key) is not None:
                return None
            # Two runs that need this entry never both fine-tune: the second waits, then reuses it.
            what = f"the fine-tuned teacher {cache_dir / key}"
            stop = lambda: stopping.check(f"waiting for {what}")  # noqa: E731
            with locks.entry_lock(cache_dir / f".{key}.lock", what, wait, stop):
                if cached_teacher(cache_dir, key) is not None:
                    return None
                where = " on rank 0" if dist.enabled else ""
                emit(Stage(f"fine-tuning the teacher{where} ({ft.epochs:g} epochs on {len(plan.train)} examples)"))
                partial = cache_dir / f"{key}{PARTIAL}"  # an interrupted fine-tune's progress, continued here
                stats = finetune(
                    teacher,
                    plan.train,
                    ft,
                    device,
                    amp,
                    emit,
                    plan.task,
                    group_by_length=plan.group_by_length,
                    partial=partial,
                )
                entry = save_to_cache(
                    teacher, plan.t_tok, cache_dir, key, {"teacher": plan.teacher_ref.ref, "key": key, **stats}
                )
                shutil.rmtree(partial, ignore_errors=True)
                return {"path": str(entry), **stats}

        fresh = distributed.on_main(finetune_once, dist)
        hit = cached_teacher(cache_dir, key)
        if fresh is None or not dist.is_main:
            assert hit is not None  # rank 0 built it, or it was there
            if fresh is None:
                emit(Stage(f"using the cached fine-tuned teacher {hit}"))
            teacher = plan.task.load_model(ModelRef(str(hit)))
        info = {"cached": fresh is None, "path": str(hit), "key": key, **(fresh or {})}
        source = info["path"]
    align_pad_token(teacher, plan.t_tok)
    teacher.to(device=device, dtype=param_dtype).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return PreparedTeacher(teacher, source, info)
