"""The frozen teacher's training-time outputs, computed once and read back from disk.

A distillation step needs two things from the teacher: the logits kd compares with (per example
for a classifier, per response token for a causal LM) and the feature rows of the paired teacher
layers (per token, or pooled per example). Both depend only on the teacher, the tokenized
example and the feature settings, so :func:`ensure` computes them once for the whole training
split into a :mod:`kdgeo.output_cache` entry and :class:`TeacherOutputs` hands each micro-batch
exactly the tensors the teacher forward would have produced (rounded to fp16/bf16), in the same
row order as :func:`kdgeo.features.select_rows` and :func:`kdgeo.lm_data.response_predictions`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from kdgeo import data as data_mod
from kdgeo import locks, output_cache, stopping
from kdgeo.events import Progress, Stage
from kdgeo.features import select_rows
from kdgeo.kinds import Rows
from kdgeo.runtime import autocast

if TYPE_CHECKING:
    from kdgeo.tasks import Task

LOGITS = "logits"


def layer_field(t: int) -> str:
    return f"layer{t}"


@dataclass(frozen=True)
class OutputPlan:
    """What is cached: logits (``logit_width`` wide, or none) and the rows of ``layers`` (teacher
    hidden-state indices), ``widths[k]`` wide for ``layers[k]``: widths differ by index in some
    families (OPT's projected last entry, see :func:`kdgeo.models.hidden_widths`)."""

    task: Task
    """Which rows count and what the logits are (per example, or per response token)."""
    rows: Rows
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    logit_width: int | None

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.layers):
            raise ValueError(f"OutputPlan: {len(self.layers)} layers but {len(self.widths)} widths")

    @property
    def causal_lm(self) -> bool:
        """Part of the cache key under this name since format 1 (a per-token-logits task)."""
        return self.task.per_token_logits

    def fields(self) -> dict[str, int]:
        out = {layer_field(t): w for t, w in zip(self.layers, self.widths)}
        if self.logit_width is not None:
            out[LOGITS] = self.logit_width
        return out

    def row_counts(self, split: data_mod.TextSplit) -> dict[str, list[int]]:
        """Rows per example of every field (for the disk estimate and the layout check), from the
        teacher's encoding."""
        enc = split.encodings["teacher"]
        tokens = self.task.token_rows(enc)
        per_example = [1] * len(tokens)
        counts = {layer_field(t): (tokens if self.rows == "tokens" else per_example) for t in self.layers}
        if self.logit_width is not None:
            counts[LOGITS] = self.task.logit_rows(enc)
        return counts


def _split_rows(rows: Tensor, counts: Sequence[int]) -> list[Tensor]:
    return list(torch.split(rows, list(counts)))


BUILD_WINDOW = 16
"""The build sorts each window of up to this many batches by length (far less padding in the
teacher forward) and writes the window back in index order ..."""
BUILD_WINDOW_BYTES = 512 * 2**20
"""... and a window holds at most this much buffered output (float32): a causal LM's logits are
a vocabulary-wide row per response token, so a window may be a single batch."""


@torch.no_grad()
def _teacher_rows(
    teacher: nn.Module,
    split: data_mod.TextSplit,
    idx: list[int],
    plan: OutputPlan,
    device: torch.device,
    amp: torch.dtype | None,
) -> dict[str, list[Tensor]]:
    """Per example of ``idx``: its rows of every cached field, on the CPU."""
    batch = data_mod.collate(split, idx)
    t_in = data_mod.to_device(batch["teacher"], device)
    with autocast(device, amp):
        out = teacher(**t_in, output_hidden_states=bool(plan.layers))
    mask = plan.task.row_mask(batch, "teacher", t_in, device)  # (B, T)
    counts = mask.sum(1).tolist() if plan.rows == "tokens" else [1] * len(idx)
    arrays: dict[str, list[Tensor]] = {}
    for t in plan.layers:
        arrays[layer_field(t)] = _split_rows(select_rows(out.hidden_states[t], mask, plan.rows).float().cpu(), counts)
    if plan.logit_width is not None:
        logits = plan.task.predictions(out.logits, t_in, mask)  # (n, C): per example or token
        per = plan.task.logit_rows(split.encodings["teacher"], idx)
        arrays[LOGITS] = _split_rows(logits[..., : plan.logit_width].float().cpu(), per)
    return arrays


def _build(
    writer: output_cache.CacheWriter,
    teacher: nn.Module,
    split: data_mod.TextSplit,
    plan: OutputPlan,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
) -> None:
    n = len(split)
    lengths = data_mod.lengths_of(split)
    counts, widths = plan.row_counts(split), plan.fields()
    per_example = [4 * sum(counts[f][i] * w for f, w in widths.items()) for i in range(n)]  # buffered float32 bytes
    start = 0
    while start < n:
        end, held = start, 0
        while (
            end < n
            and end - start < batch_size * BUILD_WINDOW
            and (end - start < batch_size or held + per_example[end] <= BUILD_WINDOW_BYTES)
        ):
            held += per_example[end]
            end += 1
        order = sorted(range(start, end), key=lambda i: (lengths[i], i))
        rows: dict[int, dict[str, Tensor]] = {}
        for b in range(0, len(order), batch_size):
            # A stop signal between batches: the writer's with-block removes the unfinished entry.
            stopping.check(
                f"while caching teacher outputs ({writer.written} of {n} examples written): the unfinished cache "
                "entry was removed; the next run builds it again."
            )
            idx = order[b : b + batch_size]
            # Not `per_example`: that name holds the byte sizes the next window is cut by.
            for name, example_rows in _teacher_rows(teacher, split, idx, plan, device, amp).items():
                for i, r in zip(idx, example_rows):
                    rows.setdefault(i, {})[name] = r
        for i in range(start, end):
            writer.append(i, rows.pop(i))
        start = end


class TeacherOutputs:
    """Cached teacher outputs of the training split, served per micro-batch."""

    def __init__(self, reader: output_cache.CacheReader, plan: OutputPlan, path: Path) -> None:
        self.reader = reader
        self.plan = plan
        self.path = path

    def logits(self, indices: Sequence[int], device: torch.device, dtype: torch.dtype | None = None) -> Tensor | None:
        """(B, C) for a classifier, (n_response_tokens, V) for a causal LM; None when not cached.
        ``dtype``: the run's model dtype when it is not float32 (float64 under ``train.precision = "fp64"``)."""
        if self.plan.logit_width is None:
            return None
        return torch.cat(self.reader.batch(LOGITS, indices)).to(device=device, dtype=dtype)

    def features(self, indices: Sequence[int], device: torch.device, dtype: torch.dtype | None = None) -> list[Tensor]:
        """One (n, d_t) row matrix per cached teacher layer, in ``plan.layers`` order (``dtype``: as in logits)."""
        rows = [torch.cat(self.reader.batch(layer_field(t), indices)) for t in self.plan.layers]
        return [r.to(device=device, dtype=dtype) for r in rows]


def encoding_digest(split: data_mod.TextSplit) -> str:
    """Identity of the teacher's tokenized training examples (ids and response boundaries): the
    cache key must change whenever they do, e.g. when the student's tokenizer drops other examples."""
    import hashlib

    enc = split.encodings["teacher"]
    digest = hashlib.sha256()
    for k, ids in enumerate(enc.input_ids):
        start = enc.response_start[k] if enc.response_start is not None else -1
        digest.update(f"{start}:{','.join(map(str, ids))};".encode())
    return digest.hexdigest()


def _layout_problem(reader: output_cache.CacheReader, plan: OutputPlan, split: data_mod.TextSplit) -> str | None:
    """Why an entry cannot serve this split (it would hand a batch another example's rows), or None."""
    counts = plan.row_counts(split)
    if reader.n_examples != len(split) or any(reader.row_counts(f).tolist() != counts[f] for f in plan.fields()):
        return f"it holds {reader.n_examples} examples laid out differently from this run's {len(split)}"
    return None


def ensure(
    root: Path,
    payload: dict[str, Any],
    plan: OutputPlan,
    teacher: nn.Module,
    split: data_mod.TextSplit,
    dtype: str,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
    emit: Progress,
    build: bool = True,
) -> TeacherOutputs:
    """Open the entry for ``payload``; build it first when it is missing, corrupt or stale
    (the reason is reported, the disk cost is printed before any work).

    With ``build=False`` (ranks other than 0 under torchrun, after rank 0 built it) only open.
    """
    payload = {
        **payload,
        "plan": {
            "causal_lm": plan.causal_lm,
            "rows": plan.rows,
            "layers": list(plan.layers),
            "widths": list(plan.widths),
            "logit_width": plan.logit_width,
        },
        "dtype": dtype,
    }
    key = output_cache.cache_key(payload)
    opened = _open_checked(root, key, plan, split, emit)
    if isinstance(opened, TeacherOutputs):
        return opened
    if not build:
        raise output_cache.CacheEntryError(
            root / key,
            opened[0],
            opened[1] or "it must be built first: by rank 0 under ddp, or by a one-process run for an fsdp run",
        )
    # Two processes that need this entry never both build it: the second waits, then reads it.
    lock = Path(os.path.expanduser(str(root))) / f".{key}.lock"
    what = f"the teacher-output cache entry {root / key}"
    with locks.entry_lock(lock, what, lambda m: emit(Stage(m)), lambda: stopping.check(f"waiting for {what}")):
        opened = _open_checked(root, key, plan, split, emit)
        if isinstance(opened, TeacherOutputs):
            return opened
        return _build_entry(root, key, payload, plan, teacher, split, dtype, batch_size, device, amp, emit, *opened)


def _open_checked(
    root: Path, key: str, plan: OutputPlan, split: data_mod.TextSplit, emit: Progress
) -> TeacherOutputs | tuple[output_cache.Status, str]:
    """The entry, opened, when it is complete and laid out for ``plan``; else (status, reason)."""
    status, reason = output_cache.check_entry(root, key)
    if status == "ok":
        reader = output_cache.open_entry(root, key)
        assert reader is not None
        problem = _layout_problem(reader, plan, split)
        if problem is None:
            emit(Stage(f"teacher outputs read from the cache {root / key}"))
            return TeacherOutputs(reader, plan, root / key)
        reader.close()
        status, reason = "stale", problem
    return status, reason


def _build_entry(
    root: Path,
    key: str,
    payload: dict[str, Any],
    plan: OutputPlan,
    teacher: nn.Module,
    split: data_mod.TextSplit,
    dtype: str,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
    emit: Progress,
    status: output_cache.Status,
    reason: str,
) -> TeacherOutputs:
    """Build the entry (replacing a corrupt or stale one) and open it; the caller holds its lock."""
    setting = "output.teacher_outputs_dir"
    if status in ("corrupt", "stale"):
        emit(Stage(f"teacher-output cache entry {root / key} is {status} ({reason}): rebuilding it"))
        output_cache.remove_entry(root, key)
    cost = output_cache.estimate_bytes(plan.row_counts(split), plan.fields(), dtype)
    emit(
        Stage(
            f"caching teacher outputs of {len(split)} examples ({', '.join(plan.fields())}) in {root / key}: "
            f"{output_cache.format_bytes(cost)} on disk"
        )
    )
    with output_cache.CacheWriter(
        root, key, payload, plan.fields(), len(split), dtype=dtype, setting=setting
    ) as writer:
        _build(writer, teacher, split, plan, batch_size, device, amp)
        path = writer.commit()
    reader = output_cache.open_entry(root, key)
    assert reader is not None
    return TeacherOutputs(reader, plan, path)
