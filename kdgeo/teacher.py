"""Fine-tuning a teacher on the task, and caching the result.

A teacher that has no classification head for the run's labels (a base model such as
all-MiniLM-L6-v2) is fine-tuned with cross-entropy first. A causal-LM teacher is fine-tuned on
the instruction data when asked (``[teacher.finetune] force = true``, as MiniLLM fine-tunes its
OPT teachers on Dolly): next-token cross-entropy on the response tokens only. The result is saved under
``<teacher_cache>/<key>/`` where the key hashes everything that changes it: the model reference
and revision, the training data settings, the label names, and the fine-tuning
hyper-parameters. Every later run with the same key reuses it. The directory is written to a
temporary name and renamed into place, so an interrupted fine-tune never leaves a half-written
cache entry.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdgeo import data as data_mod
from kdgeo.errors import OutputError
from kdgeo.models import SAVE_ERRORS, save_model_dir
from kdgeo.optim import build_optimizer, build_scheduler, param_groups

CACHE_META = "kdgeo-teacher.json"
Progress = Callable[[dict[str, Any]], None]


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
    model_ref: str, revision: str | None, data_key: dict[str, Any], label_names: list[str], args: FinetuneArgs,
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
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    group_by_length: bool = False,
    causal_lm: bool = False,
) -> dict[str, Any]:
    """Cross-entropy fine-tuning of ``model`` on ``split`` (role 'teacher'), in place: on the
    labels, or (``causal_lm``) on the next response token. It trains in the model's dtype
    (float64 under ``train.precision = "fp64"``, the caller casts it) with ``amp`` autocast if any."""
    from kdgeo.losses import at_least_float32, response_predictions

    torch.manual_seed(args.seed)
    model.to(device).train()
    steps_per_epoch = -(-len(split) // args.batch_size)
    total = max(1, int(round(args.epochs * steps_per_epoch)))
    optimizer = build_optimizer(param_groups(model.named_parameters(), args.lr, args.weight_decay), args.lr)
    scheduler = build_scheduler(optimizer, total, args.warmup_ratio, "linear")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step, epoch, start = 0, 0, time.perf_counter()
    last_loss = float("nan")
    while step < total:
        for batch in data_mod.iterate_batches(split, args.batch_size, shuffle=True, seed=args.seed, epoch=epoch, group_by_length=group_by_length):
            inputs = data_mod.to_device(batch["teacher"], device)
            with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(**inputs).logits  # (B, C) or (B, T, V)
            if causal_lm:
                mask = batch["response_mask"]["teacher"].to(device)
                logits, labels = response_predictions(logits, inputs["input_ids"], mask)  # (n, V), (n,)
            else:
                labels = batch["labels"].to(device)
            loss = torch.nn.functional.cross_entropy(at_least_float32(logits), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            last_loss = loss.item()
            progress({"event": "finetune_step", "step": step, "total": total, "loss": last_loss})
            if step >= total:
                break
        epoch += 1
    model.eval()
    return {"steps": step, "final_loss": last_loss, "seconds": time.perf_counter() - start}


def save_to_cache(model: nn.Module, tokenizer: Any, cache_dir: Path, key: str, meta: dict[str, Any]) -> Path:
    entry = cache_dir / key
    try:
        save_model_dir(model, tokenizer, entry, extra={CACHE_META: json.dumps(meta, indent=2) + "\n"})
    except SAVE_ERRORS as err:
        raise OutputError(
            f"output.teacher_cache = '{cache_dir}': cannot write the fine-tuned teacher ({getattr(err, 'strerror', None) or err}); "
            "set output.teacher_cache to a writable directory."
        ) from None
    return entry
