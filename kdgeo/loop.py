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
    on_policy: dict[str, float] = field(default_factory=dict)
    """train.on_policy: the cumulative counts of :data:`kdgeo.on_policy.COUNTS` (empty without it)."""

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


class _StepValues:
    """One step's logged values, kept on the device until something needs them on the host.

    ``names``: the loss terms, then ``"loss"`` (the total). ``values``: float64, one per name, the
    sum over micro-batches of value * share (this process's share of the step mean). ``bad``: bool,
    one per name, whether it was non-finite in any micro-batch. float64 on the device is the same
    IEEE arithmetic as the Python floats summed before (float32 -> float64 is exact; one multiply
    and one add per value, in the same order), so the logged numbers are bit for bit the same, but
    a step no longer waits for the device once per term per micro-batch (``float(v)`` is a host
    sync on CUDA): the loop syncs once per step for the finiteness check and once per log event.
    """

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.values = torch.zeros(len(names), dtype=torch.float64, device=device)
        self.bad = torch.zeros(len(names), dtype=torch.bool, device=device)
        self.losses_finite = True
        """Set by :meth:`nonfinite`: whether the total loss was finite in every micro-batch."""

    def add(self, row: list[torch.Tensor], share: float) -> None:
        """Add one micro-batch's values (0-dim tensors, one per name) weighted by ``share``."""
        if len(row) != len(self.names):
            raise RuntimeError(f"a micro-batch logged {len(row) - 1} loss terms, the step's first {self.names[:-1]}")
        x = torch.stack([v.detach().to(self.values.device, torch.float64) for v in row])
        self.values = self.values + x * share  # 0.0 + v first, as the float sums did (-0.0 stays 0.0)
        self.bad = self.bad | ~torch.isfinite(x)

    def nonfinite(self, norm: torch.Tensor | None = None) -> list[str]:
        """The step's non-finite terms, read in one host sync (with the gradient ``norm`` when given).

        A non-finite total loss names its non-finite terms (or "the total loss" when none is); a
        finite loss with a non-finite gradient norm names the gradients; all finite: []."""
        if norm is None:
            flags = self.bad
        else:  # FSDP's sharded clipping returns its norm on the CPU
            flags = torch.cat([self.bad, ~torch.isfinite(norm.detach().reshape(1)).to(self.bad.device)])
        bad = flags.tolist()
        self.losses_finite = not bad[len(self.names) - 1]
        if not self.losses_finite:
            return [n for n, b in zip(self.names[:-1], bad) if b] or ["the total loss"]
        if norm is not None and bad[-1]:
            return ["the gradients (loss finite, gradient norm not)"]
        return []

    def floats(self) -> dict[str, float]:
        return dict(zip(self.names, self.values.tolist(), strict=True))

    def replaced(self, floats: dict[str, float]) -> _StepValues:
        """The same names with ``floats`` as values (the all-reduced ones under torchrun)."""
        out = _StepValues(self.names, self.values.device)
        out.values = torch.tensor([floats[n] for n in self.names], dtype=torch.float64, device=self.values.device)
        out.bad, out.losses_finite = self.bad, self.losses_finite
        return out


class _Window:
    """The logged values summed since the last logged step, on the device (see :class:`_StepValues`);
    :class:`TrainState`'s ``window`` holds them as floats, written by :meth:`floats` before a
    checkpoint or a log event reads them."""

    def __init__(self, saved: dict[str, float], device: torch.device) -> None:
        self.device = device
        self.names: list[str] = list(saved)
        self.sums = torch.tensor(list(saved.values()), dtype=torch.float64, device=device)

    def add(self, step: _StepValues) -> None:
        if not self.names:
            self.names, self.sums = list(step.names), torch.zeros_like(step.values) + step.values
            return
        if self.names == step.names:
            self.sums = self.sums + step.values
            return
        # A resumed window, or a term first seen now: add by name on the host (a sync; rare).
        merged = self.floats()
        for name, v in step.floats().items():
            merged[name] = merged.get(name, 0.0) + v
        self.names = list(merged)
        self.sums = torch.tensor(list(merged.values()), dtype=torch.float64, device=self.device)

    def floats(self) -> dict[str, float]:
        return dict(zip(self.names, self.sums.tolist(), strict=True)) if self.names else {}

    def clear(self) -> None:
        self.names, self.sums = [], self.sums.new_zeros(0)


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
    window = _Window(state.window, device)
    while state.step < cfg.total_steps and not hooks.stop_early():
        micro = batches.epoch(state.epoch, dist)
        stream = batches.stream(micro[state.next_micro :], dist)
        while state.next_micro < len(micro) and state.step < cfg.total_steps:
            first = state.next_micro
            group = micro[first : first + cfg.grad_accum]  # the step's global micro-batches
            t0 = time.perf_counter()
            stop_here = hooks.stop_signal() is not None

            optimizer.zero_grad(set_to_none=True)
            position = (state.epoch, first)
            values = _accumulate(student, group, stream, batches, loss_fn, scaler, dist, position)
            # The losses' finiteness is needed before clipping under torchrun (the flag is all-reduced) and with
            # the fp16 scaler (a skipped step must not be unscaled); otherwise it joins the gradient norm's check.
            early = dist.enabled or scaler.is_enabled()
            nonfinite = values.nonfinite() if early else []
            if dist.enabled:
                agreed = distributed.reduce_step(
                    values.floats(), bool(nonfinite), stop_here, objective.parameters(), dist
                )
                values = values.replaced(agreed.parts)
                if agreed.nonfinite_elsewhere and not nonfinite:
                    nonfinite = ["a loss term on another process"]
                stop_here = agreed.stop  # only the agreed flag counts: a later signal waits for the next step
            if not nonfinite:
                norm = _clip(student, objective, params, scaler, optimizer, cfg)
                # The fp16 scaler handles its own overflows (a non-finite norm of finite losses is its skip).
                nonfinite = values.nonfinite(None if scaler.is_enabled() else norm)
            if nonfinite:
                if cfg.on_nonfinite == "abort":
                    state.window = window.floats()
                _skip_update(optimizer, state, nonfinite, cfg, hooks)
            else:
                _update(optimizer, scaler, state)
            scheduler.step()

            state.step += 1
            state.next_micro = first + len(group)
            if device.type == "cuda" and (stop_here or _hooks_due(state, cfg, len(micro))):
                # Timing only: a step's queued kernels would otherwise be timed into the hook that waits for
                # them. Other steps' tails are counted in the next step's time, so the window's sum is right.
                torch.cuda.synchronize(device)
            _count(
                state,
                window,
                time.perf_counter() - t0,
                sum(len(b) for b in group),
                # Skipped: under torchrun the reduced values carry every process's NaN; on one process a
                # non-finite loss's values are left out (a non-finite gradient norm of finite losses counts).
                None if nonfinite and (dist.enabled or not values.losses_finite) else values,
            )
            epoch_pos = round(state.epoch + min(1.0, state.next_micro / len(micro)), 4)
            _after_step(state, window, epoch_pos, scheduler, cfg, hooks)
            if not dist.enabled:
                stop_here = hooks.stop_signal() is not None
            if stop_here and state.step < cfg.total_steps:
                state.window = window.floats()
                _interrupt(state, cfg, hooks)
            if hooks.stop_early():
                break  # the end-of-training checkpoint below is this step's
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step != cfg.total_steps:
                state.window = window.floats()
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
        state.window = window.floats()
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
    start: tuple[int, int] = (0, 0),
) -> _StepValues:
    """Forward and backward of the step's micro-batches; returns the logged loss values (this
    process's share of the step mean) and which were non-finite, both still on the device.

    Every micro-batch runs, even past a non-finite loss: stopping early would need its value on the
    host, a sync per micro-batch on CUDA (under torchrun every rank has to run every backward anyway).
    The step is skipped or aborted afterwards as a whole.

    ``start``: (epoch, global index of the step's first micro-batch). Each batch is tagged with its own
    ``position`` (epoch, global micro-batch index): a counter a batch source can derive randomness from
    (:mod:`kdgeo.on_policy`), the same on every process and after a resume."""
    step_weight = float(sum(batches.weight(b) for b in group))
    values: _StepValues | None = None
    for k, global_idx in enumerate(group):
        batch = next(stream)
        batch["position"] = (start[0], start[1] + k)
        local = batch["index"].tolist()  # == distributed.shard(global_idx, dist)
        shares = distributed.micro_shares(
            batches.weight(local), batches.weight(global_idx), step_weight, dist, batches.gathered
        )
        with distributed.maybe_no_sync(student, sync=k == len(group) - 1):
            logit_loss, feature_loss, terms = loss_fn(batch)
            loss = logit_loss + feature_loss
            scaler.scale(logit_loss * shares.logit + feature_loss * shares.feature).backward()
        if values is None:
            values = _StepValues(list(terms) + ["loss"], loss.device)
        values.add([*terms.values(), loss], shares.log)
    assert values is not None, "a training step has at least one micro-batch"
    return values


def _clip(
    student: nn.Module,
    objective: Objective,
    params: list[torch.Tensor],
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    cfg: LoopConfig,
) -> torch.Tensor:
    """Unscale and clip the gradients to ``max_grad_norm``; returns their total norm (on the device,
    not synced: :meth:`_StepValues.nonfinite` checks it with the losses)."""
    scaler.unscale_(optimizer)
    max_norm = cfg.max_grad_norm or float("inf")
    if cfg.fsdp:
        model = distributed.unwrap(student)
        norm = distributed.clip_sharded([list(model.parameters()), list(objective.parameters())], max_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm


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


def _count(state: TrainState, window: _Window, seconds: float, samples: int, values: _StepValues | None) -> None:
    """Add a finished step to the totals and the logging window (``values`` None: a skipped step
    whose values are left out, see :func:`train`)."""
    state.train_seconds += seconds
    state.samples_seen += samples
    state.window_samples += samples
    state.window_n += 1
    state.window_time += seconds
    if values is not None:
        window.add(values)


def _hooks_due(state: TrainState, cfg: LoopConfig, micro_in_epoch: int) -> bool:
    """Whether anything but the next step runs after this one: logging, the monitor, an evaluation
    (also the end of an epoch's), a checkpoint, or the end of training."""
    step = state.step
    return (
        step == cfg.total_steps
        or step % cfg.log_every == 0
        or state.next_micro >= micro_in_epoch
        or any(every and step % every == 0 for every in (cfg.monitor_every, cfg.eval_every, cfg.checkpoint_every))
    )


def _after_step(
    state: TrainState,
    window: _Window,
    epoch_pos: float,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: LoopConfig,
    hooks: Hooks,
) -> None:
    """Log the window's means, run the monitor and evaluate when their intervals say so (the
    final step's measurements belong to the run's end, not here)."""
    step, last = state.step, state.step == cfg.total_steps
    if step % cfg.log_every == 0 or last:
        state.window = window.floats()  # the window's one host sync
        hooks.record(
            Step(
                step=step,
                total_steps=cfg.total_steps,
                epoch=epoch_pos,
                lr=float(scheduler.get_last_lr()[0]),
                samples_per_s=state.window_samples / max(state.window_time, 1e-9),
                losses={k: v / max(state.window_n, 1) for k, v in state.window.items()},
                on_policy=dict(state.on_policy) or None,
            )
        )
        state.window, state.window_n, state.window_samples, state.window_time = {}, 0, 0, 0.0
        window.clear()
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
