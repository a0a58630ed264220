"""The training loop, top to bottom: micro-batches, gradient accumulation, one optimizer step.

:func:`train` knows nothing of tasks, teachers or the run directory. It gets the student, the
objective, the optimizer and its schedule, the epoch's batches (:class:`TrainBatches`), a function
that computes the loss of one micro-batch (:class:`kdgeo.step_loss.StepLoss`), the loop settings
(:class:`LoopConfig`), the state to continue from (:class:`TrainState`: what a checkpoint saves
besides weights, optimizer and RNG) and the hooks that log, measure, evaluate and checkpoint
(:class:`Hooks`). Under torchrun every process runs it; the arithmetic that makes N processes
train like one lives behind :func:`kdgeo.distributed.micro_shares` and
:func:`kdgeo.distributed.reduce_step`.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from kdgeo import data as data_mod
from kdgeo import distributed
from kdgeo.errors import KdgeoError, RunInterrupted
from kdgeo.events import Event, NonFinite, Step
from kdgeo.losses import Objective


@dataclass
class TrainState:
    """Where the loop is, and what it measured last: saved in every checkpoint (``state.json``'s
    ``loop``, under these names) so a resumed run continues bit for bit."""

    step: int = 0
    epoch: int = 0
    next_micro: int = 0
    """The next global micro-batch of the epoch (a step spans ``grad_accum`` of them)."""
    train_seconds: float = 0.0
    samples_seen: int = 0
    window: dict[str, float] = field(default_factory=dict)
    """Loss values summed since the last logged step (divided by ``window_n`` when logged)."""
    window_n: int = 0
    window_samples: int = 0
    window_time: float = 0.0
    evaluated_at: int = -1
    last_scores: dict[str, float] = field(default_factory=dict)
    last_monitor: list[dict[str, float]] = field(default_factory=list)
    skipped_nonfinite: int = 0
    skipped_scaler: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


@dataclass(frozen=True)
class LoopConfig:
    total_steps: int
    grad_accum: int
    max_grad_norm: float
    """0: no clipping."""
    log_every: int
    monitor_every: int
    """0: the monitor runs at the start and the end only (also 0 when there are no layer pairs)."""
    eval_every: int
    """0: evaluate after every epoch."""
    checkpoint_every: int
    on_nonfinite: str
    """"abort" (checkpoint the state before the step and stop) or "skip" (drop the update)."""
    fsdp: bool
    run_dir: str
    """Named in the message of an interrupted run."""


def epoch_batches(
    n: int,
    global_batch: int,
    world: int,
    seed: int,
    epoch: int,
    lengths: list[int] | None,
    min_rows: int = 1,
    gathered: bool = False,
) -> list[list[int]]:
    """One epoch's global micro-batches (the same on every rank). Under torchrun a last batch
    with fewer examples than processes is left out, since every process needs at least one.

    ``min_rows``: the fewest rows a geometry statistic may see (3 with pooled rows and a
    procrustes/gram/cka loss, see ``RunSpec._rows_per_step``). A batch that would give one
    fewer -- each process's share (``distributed.shard``: at least ``len // world``), or the
    whole batch when features are ``gathered`` -- is left out too. Only the one short batch of
    an epoch (n % global_batch examples) can be; the reshuffled epochs still train on them.
    """
    micro = data_mod.batch_indices(n, global_batch, shuffle=True, seed=seed, epoch=epoch, lengths=lengths)
    return [b for b in micro if len(b) >= world and (len(b) if gathered else len(b) // world) >= min_rows]


@dataclass(frozen=True)
class TrainBatches:
    """The training split cut into each epoch's global micro-batches, this process's shards of
    them collated ahead by loader workers, and what each example counts in a mean loss."""

    split: data_mod.TextSplit
    global_batch: int
    seed: int
    lengths: list[int] | None
    """Example lengths when batches group by length, else None."""
    min_rows: int
    gathered: bool
    weights: list[int]
    """Per example: 1, or a causal LM's response tokens (:meth:`kdgeo.tasks.Task.example_weights`)."""
    workers: int
    pin_memory: bool

    def epoch(self, epoch: int, dist: distributed.Dist) -> list[list[int]]:
        return epoch_batches(
            len(self.split),
            self.global_batch,
            dist.world_size,
            self.seed,
            epoch,
            self.lengths,
            self.min_rows,
            self.gathered,
        )

    def stream(self, micro: list[list[int]], dist: distributed.Dist) -> Iterator[dict[str, Any]]:
        return data_mod.prefetch_batches(
            self.split, [distributed.shard(b, dist) for b in micro], self.workers, self.pin_memory
        )

    def weight(self, indices: list[int]) -> int:
        return sum(self.weights[i] for i in indices)


class LossFn(Protocol):
    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(logit loss, feature loss, every named term) of one micro-batch."""
        ...


@dataclass(frozen=True)
class Hooks:
    """What the loop calls out to. ``record`` logs an event (metrics.jsonl and the view);
    ``monitor(step)`` measures the layer pairs and returns their values; ``evaluate(step, epoch,
    final)`` returns the scores; ``checkpoint(state, extra_keep)`` saves and returns the path;
    ``stop_signal()`` is the signal that asked the run to stop, or None; ``stop_early()`` is True once
    training should end before ``total_steps`` (early stopping: it is decided by an evaluation, the
    same on every process, and the run ends as at the last step, not as an interruption)."""

    record: Callable[[Event], None]
    monitor: Callable[[int], list[dict[str, float]]]
    evaluate: Callable[[int, float, bool], dict[str, float]]
    checkpoint: Callable[[TrainState, int], Path]
    stop_signal: Callable[[], int | None]
    stop_early: Callable[[], bool] = lambda: False


def train(
    student: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    batches: TrainBatches,
    loss_fn: LossFn,
    cfg: LoopConfig,
    state: TrainState,
    hooks: Hooks,
    dist: distributed.Dist,
) -> TrainState:
    """Train from ``state`` to ``cfg.total_steps`` (or until ``hooks.stop_early()``) and save the
    end-of-training checkpoint.

    ``student`` is the module that runs forward and backward (under torchrun its DDP/FSDP wrapper).
    Raises :class:`RunInterrupted` after checkpointing when a stop signal arrives, and
    :class:`KdgeoError` on a non-finite loss with ``on_nonfinite = "abort"``.
    """
    started_at = state.step
    params = [p for g in optimizer.param_groups for p in g["params"]]
    device = next(student.parameters()).device
    while state.step < cfg.total_steps and not hooks.stop_early():
        micro = batches.epoch(state.epoch, dist)
        stream = batches.stream(micro[state.next_micro :], dist)
        while state.next_micro < len(micro) and state.step < cfg.total_steps:
            first = state.next_micro
            group = micro[first : first + cfg.grad_accum]  # the step's global micro-batches
            t0 = time.perf_counter()
            stop_here = hooks.stop_signal() is not None

            optimizer.zero_grad(set_to_none=True)
            parts, nonfinite = _accumulate(student, group, stream, batches, loss_fn, scaler, dist)
            agreed = distributed.reduce_step(parts, bool(nonfinite), stop_here, objective.parameters(), dist)
            parts = agreed.parts
            if agreed.nonfinite_elsewhere and not nonfinite:
                nonfinite = ["a loss term on another process"]
            if dist.enabled:  # only the agreed flag counts: a later signal waits for the next step
                stop_here = agreed.stop
            if not nonfinite:
                nonfinite = _clip(student, objective, params, scaler, optimizer, cfg)
            if nonfinite:
                _skip_update(optimizer, state, nonfinite, cfg, hooks)
            else:
                _update(optimizer, scaler, state)
            scheduler.step()

            state.step += 1
            state.next_micro = first + len(group)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            _count(
                state,
                time.perf_counter() - t0,
                sum(len(b) for b in group),
                None if (dist.enabled and nonfinite) else parts,
            )
            epoch_pos = round(state.epoch + min(1.0, state.next_micro / len(micro)), 4)
            _after_step(state, epoch_pos, scheduler, cfg, hooks)
            if not dist.enabled:
                stop_here = hooks.stop_signal() is not None
            if stop_here and state.step < cfg.total_steps:
                _interrupt(state, cfg, hooks)
            if hooks.stop_early():
                break  # the end-of-training checkpoint below is this step's
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step != cfg.total_steps:
                hooks.checkpoint(state, 0)
        if state.next_micro >= len(micro) and not hooks.stop_early():
            state.epoch += 1
            state.next_micro = 0
            if not cfg.eval_every and state.step < cfg.total_steps:
                state.last_scores = hooks.evaluate(state.step, float(state.epoch), False)
                state.evaluated_at = state.step
    if state.step > started_at:
        # Insurance for the final phase (evaluation, saving): resume from here finishes the run.
        # It is removed once summary.json is written, so it does not count against keep_checkpoints.
        hooks.checkpoint(state, 1)
    return state


def _accumulate(
    student: nn.Module,
    group: list[list[int]],
    stream: Iterator[dict[str, Any]],
    batches: TrainBatches,
    loss_fn: LossFn,
    scaler: torch.amp.GradScaler,
    dist: distributed.Dist,
) -> tuple[dict[str, float], list[str]]:
    """Forward and backward of the step's micro-batches; returns the logged loss values (this
    process's share of the step mean) and the names of non-finite terms (empty when all finite)."""
    step_weight = float(sum(batches.weight(b) for b in group))
    parts: dict[str, float] = {}
    nonfinite: list[str] = []
    k = 0
    for k, global_idx in enumerate(group):
        batch = next(stream)
        local = batch["index"].tolist()  # == distributed.shard(global_idx, dist)
        shares = distributed.micro_shares(
            batches.weight(local), batches.weight(global_idx), step_weight, dist, batches.gathered
        )
        with distributed.maybe_no_sync(student, sync=k == len(group) - 1):
            logit_loss, feature_loss, terms = loss_fn(batch)
            loss = logit_loss + feature_loss
            if not torch.isfinite(loss):
                nonfinite = [name for name, v in terms.items() if not torch.isfinite(v)] or ["the total loss"]
                if not dist.enabled:
                    break
            # Under torchrun every rank runs every backward (they synchronise), even past a NaN.
            scaler.scale(logit_loss * shares.logit + feature_loss * shares.feature).backward()
        for name, v in terms.items():
            parts[name] = parts.get(name, 0.0) + float(v) * shares.log
        parts["loss"] = parts.get("loss", 0.0) + float(loss.detach()) * shares.log
    for _ in range(len(group) - 1 - k):
        next(stream)  # micro-batches skipped after a non-finite loss: keep the stream in step
    return parts, nonfinite


def _clip(
    student: nn.Module,
    objective: Objective,
    params: list[torch.Tensor],
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    cfg: LoopConfig,
) -> list[str]:
    """Unscale and clip the gradients to ``max_grad_norm``; a non-finite norm of finite losses is
    reported like a non-finite loss (the fp16 scaler handles its own overflows)."""
    scaler.unscale_(optimizer)
    max_norm = cfg.max_grad_norm or float("inf")
    if cfg.fsdp:
        model = distributed.unwrap(student)
        norm = distributed.clip_sharded([list(model.parameters()), list(objective.parameters())], max_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not torch.isfinite(norm) and not scaler.is_enabled():
        return ["the gradients (loss finite, gradient norm not)"]
    return []


def _update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, state: TrainState) -> None:
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    if scale_before is not None and scaler.get_scale() < scale_before:
        state.skipped_scaler += 1  # fp16 overflow: the scaler skipped this update


def _skip_update(
    optimizer: torch.optim.Optimizer, state: TrainState, nonfinite: list[str], cfg: LoopConfig, hooks: Hooks
) -> None:
    """A step with NaN/inf: abort with the state before it saved, or skip its update."""
    optimizer.zero_grad(set_to_none=True)
    if cfg.on_nonfinite == "abort":
        path = hooks.checkpoint(state, 0)
        raise KdgeoError(
            f"non-finite value at step {state.step + 1} (epoch {state.epoch + 1}) in {', '.join(nonfinite)} (a name "
            "like procrustes/2-6 is the loss term and its student-teacher layer pair). The state before this step "
            f"is saved in {path}. Resume past it with --resume --set train.on_nonfinite=skip, or start a new run "
            'with a lower train.lr or precision "fp32" (and check the data).'
        )
    state.skipped_nonfinite += 1
    hooks.record(NonFinite(step=state.step + 1, terms=nonfinite, action="skipped"))


def _count(state: TrainState, seconds: float, samples: int, parts: dict[str, float] | None) -> None:
    """Add a finished step to the totals and the logging window (``parts`` None: a skipped step
    under torchrun, whose reduced values carry every process's NaN)."""
    state.train_seconds += seconds
    state.samples_seen += samples
    state.window_samples += samples
    state.window_n += 1
    state.window_time += seconds
    for k, v in (parts or {}).items():
        state.window[k] = state.window.get(k, 0.0) + v


def _after_step(
    state: TrainState,
    epoch_pos: float,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: LoopConfig,
    hooks: Hooks,
) -> None:
    """Log the window's means, run the monitor and evaluate when their intervals say so (the
    final step's measurements belong to the run's end, not here)."""
    step, last = state.step, state.step == cfg.total_steps
    if step % cfg.log_every == 0 or last:
        hooks.record(
            Step(
                step=step,
                total_steps=cfg.total_steps,
                epoch=epoch_pos,
                lr=float(scheduler.get_last_lr()[0]),
                samples_per_s=state.window_samples / max(state.window_time, 1e-9),
                losses={k: v / max(state.window_n, 1) for k, v in state.window.items()},
            )
        )
        state.window, state.window_n, state.window_samples, state.window_time = {}, 0, 0, 0.0
    if cfg.monitor_every and step % cfg.monitor_every == 0 and not last:
        state.last_monitor = hooks.monitor(step)
    if cfg.eval_every and step % cfg.eval_every == 0 and not last:
        state.last_scores = hooks.evaluate(step, epoch_pos, False)
        state.evaluated_at = step


def _interrupt(state: TrainState, cfg: LoopConfig, hooks: Hooks) -> None:
    """Checkpoint and stop: the signal's exit code (128 + signum), the run directory to resume."""
    path = hooks.checkpoint(state, 0)
    signum = hooks.stop_signal()
    signum = signum if signum is not None else int(signal.SIGTERM)  # another process's signal
    raise RunInterrupted(
        f"{signal.Signals(signum).name} at step {state.step} of {cfg.total_steps}: checkpoint written to {path}.",
        exit_code=128 + signum,
        run_dir=cfg.run_dir,
        step=state.step,
    )
