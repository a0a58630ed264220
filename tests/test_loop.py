"""kdgeo.loop: the training loop on its own, with a toy model and hooks that record what they are asked.

The end-to-end runs (goldens, resume of real runs, torchrun) are in test_distillation.py, test_resume.py
and test_torchrun.py; here the loop's own contract: accumulation is a mean over the step, hooks fire
at their intervals, a signal checkpoints and stops with 128 + signum, a non-finite step is skipped
or aborts with the state before it, and TrainState is everything needed to continue bit for bit.
"""

from __future__ import annotations

import copy
import math
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kdgeo import distributed
from kdgeo.errors import KdgeoError, RunInterrupted
from kdgeo.events import Event, NonFinite, Step
from kdgeo.loop import Hooks, LoopConfig, TrainState, epoch_batches, train
from kdgeo.losses import LossTerm, Objective

# ---- a toy problem: least squares in float64 ------------------------------------------------------

N = 8
_gen = torch.Generator().manual_seed(0)
X = torch.randn(N, 3, generator=_gen, dtype=torch.float64)  # (N, 3)
Y = torch.randn(N, 1, generator=_gen, dtype=torch.float64)  # (N, 1)


class Batches:
    """TrainBatches' interface over index lists: the same ``per_epoch`` micro-batches every epoch."""

    gathered = False

    def __init__(self, micro: list[list[int]]) -> None:
        self.micro = micro

    def epoch(self, epoch: int, dist: distributed.Dist) -> list[list[int]]:
        return [list(b) for b in self.micro]

    def stream(self, micro: list[list[int]], dist: distributed.Dist):
        return iter([{"index": torch.tensor(b)} for b in micro])

    def weight(self, indices: list[int]) -> int:
        return len(indices)


class Recorder:
    """Hooks that remember every call; ``stop_after`` raises a SIGINT flag after that step."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[Event] = []
        self.monitored: list[int] = []
        self.evaluated: list[tuple[int, float, bool]] = []
        self.checkpoints: list[tuple[int, int, dict[str, Any]]] = []
        self.stop_after = stop_after
        self.state: TrainState | None = None

    def hooks(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> Hooks:
        def checkpoint(state: TrainState, extra_keep: int) -> Path:
            saved = {"loop": copy.deepcopy(state.to_dict()), "model": copy.deepcopy(model.state_dict()),
                     "optimizer": copy.deepcopy(optimizer.state_dict()), "scheduler": scheduler.state_dict()}
            self.checkpoints.append((state.step, extra_keep, saved))
            return Path(f"checkpoint-{state.step}")

        def stop_signal() -> int | None:  # the stop tests log every step
            latest = max((e.step for e in self.events if isinstance(e, Step)), default=0)
            return int(signal.SIGINT) if self.stop_after is not None and latest >= self.stop_after else None

        return Hooks(
            record=self.events.append,
            monitor=lambda step: self.monitored.append(step) or [{"student": 1, "teacher": 1, "procrustes": 0.0}],
            evaluate=lambda step, epoch, final: self.evaluated.append((step, epoch, final)) or {"accuracy": 0.5},
            checkpoint=checkpoint,
            stop_signal=stop_signal,
        )


def _setup(lr: float = 0.1) -> tuple[nn.Module, Objective, torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    objective = Objective([LossTerm(kind="ce", weight=1.0)], [], [])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    return model, objective, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


def _loss_fn(model: nn.Module, nan_at_call: int | None = None):
    calls = {"n": 0}

    def loss_fn(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        calls["n"] += 1
        idx = batch["index"]
        mse = ((model(X[idx]) - Y[idx]) ** 2).mean()
        if calls["n"] == nan_at_call:
            mse = mse * float("nan")
        return mse, torch.zeros((), dtype=torch.float64), {"mse": mse.detach()}

    return loss_fn


def _cfg(total: int, accum: int = 1, **kw: Any) -> LoopConfig:
    base = dict(total_steps=total, grad_accum=accum, max_grad_norm=0.0, log_every=1, monitor_every=0, eval_every=0,
                checkpoint_every=0, on_nonfinite="abort", fsdp=False, run_dir="runs/toy")
    return LoopConfig(**{**base, **kw})


def _run(micro: list[list[int]], cfg: LoopConfig, rec: Recorder, state: TrainState | None = None,
         parts: tuple | None = None, nan_at_call: int | None = None) -> tuple[TrainState, nn.Module]:
    model, objective, optimizer, scheduler, scaler = parts or _setup()
    state = train(model, objective, optimizer, scheduler, scaler, Batches(micro), _loss_fn(model, nan_at_call), cfg,
                  state or TrainState(), rec.hooks(model, optimizer, scheduler), distributed.SINGLE)
    return state, model


# ---- the step is a mean over its examples, however it is cut ------------------------------------


def test_grad_accum_of_two_halves_equals_one_whole_batch():
    """Two micro-batches of 2 accumulated = one micro-batch of 4 (float64: to 1e-14)."""
    halves, split = _run([[0, 1], [2, 3], [4, 5], [6, 7]], _cfg(2, accum=2), Recorder())
    whole_state, whole = _run([[0, 1, 2, 3], [4, 5, 6, 7]], _cfg(2, accum=1), Recorder())
    torch.testing.assert_close(split.weight, whole.weight, rtol=1e-14, atol=1e-14)
    assert halves.step == whole_state.step == 2 and halves.samples_seen == whole_state.samples_seen == 8


def test_uneven_micro_batches_are_weighted_by_their_examples():
    """A step of micro-batches with 3 and 1 examples is the mean over the 4, not the mean of two means."""
    _, uneven = _run([[0, 1, 2], [3]], _cfg(1, accum=2), Recorder())
    _, whole = _run([[0, 1, 2, 3]], _cfg(1, accum=1), Recorder())
    torch.testing.assert_close(uneven.weight, whole.weight, rtol=1e-14, atol=1e-14)


# ---- hooks fire at their intervals ---------------------------------------------------------------


def test_hooks_fire_at_their_intervals_and_the_end_belongs_to_the_caller():
    rec = Recorder()
    cfg = _cfg(8, log_every=2, monitor_every=3, checkpoint_every=4)
    state, _ = _run([[0, 1], [2, 3], [4, 5], [6, 7]], cfg, rec)  # 4 steps per epoch, 2 epochs
    assert [e.step for e in rec.events if isinstance(e, Step)] == [2, 4, 6, 8]
    assert rec.monitored == [3, 6]  # not at the last step: the run's end measures it
    assert rec.evaluated == [(4, 1.0, False)]  # after epoch 1; epoch 2 ends at the last step
    # checkpoint_every at 4; the last step's checkpoint is the end-of-training insurance (extra_keep 1)
    assert [(s, k) for s, k, _ in rec.checkpoints] == [(4, 0), (8, 1)]
    assert state.step == 8 and state.epoch == 2 and state.next_micro == 0 and state.evaluated_at == 4
    logged = [e for e in rec.events if isinstance(e, Step)]
    assert all(set(e.losses) == {"mse", "loss"} and math.isfinite(e.losses["loss"]) for e in logged)
    assert logged[0].epoch == 0.5 and logged[-1].epoch == 2.0


def test_eval_every_replaces_the_per_epoch_evaluation():
    rec = Recorder()
    _run([[0, 1], [2, 3], [4, 5], [6, 7]], _cfg(8, eval_every=3), rec)
    assert [(s, f) for s, _, f in rec.evaluated] == [(3, False), (6, False)]


# ---- signals: checkpoint, then stop with 128 + signum --------------------------------------------


def test_a_signal_checkpoints_and_raises_run_interrupted_with_its_exit_code():
    rec = Recorder(stop_after=3)
    with pytest.raises(RunInterrupted) as info:
        _run([[0, 1], [2, 3], [4, 5], [6, 7]], _cfg(8), rec)
    assert info.value.exit_code == 128 + int(signal.SIGINT)
    assert "SIGINT at step 3 of 8" in str(info.value) and "checkpoint-3" in str(info.value)
    assert [s for s, _, _ in rec.checkpoints] == [3]


def test_resuming_from_the_checkpointed_state_continues_bit_for_bit():
    """Stop after step 3, rebuild everything from what the checkpoint hook saved, continue to 8:
    the weights equal an uninterrupted run's exactly (TrainState is all the loop needs)."""
    micro = [[0, 1], [2, 3], [4, 5], [6, 7]]
    _, straight = _run(micro, _cfg(8), Recorder())
    rec = Recorder(stop_after=3)
    with pytest.raises(RunInterrupted):
        _run(micro, _cfg(8), rec)
    saved = rec.checkpoints[-1][2]
    model, objective, optimizer, scheduler, scaler = _setup()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state = TrainState.from_dict(saved["loop"])
    assert (state.step, state.next_micro) == (3, 3)
    _, resumed = _run(micro, _cfg(8), Recorder(), state=state, parts=(model, objective, optimizer, scheduler, scaler))
    assert torch.equal(resumed.weight, straight.weight)


# ---- non-finite steps ----------------------------------------------------------------------------


def test_a_nonfinite_step_is_skipped_and_counted_with_skip():
    rec = Recorder()
    state, model = _run([[0, 1], [2, 3], [4, 5], [6, 7]], _cfg(4, on_nonfinite="skip"), rec, nan_at_call=2)
    assert state.skipped_nonfinite == 1 and state.step == 4
    bad = [e for e in rec.events if isinstance(e, NonFinite)]
    assert [(e.step, e.terms, e.action) for e in bad] == [(2, ["mse"], "skipped")]
    assert torch.isfinite(model.weight).all()
    assert all(math.isfinite(v) for e in rec.events if isinstance(e, Step) for v in e.losses.values())


def test_a_nonfinite_step_aborts_with_the_state_before_it_saved():
    rec = Recorder()
    with pytest.raises(KdgeoError) as info:
        _run([[0, 1], [2, 3], [4, 5], [6, 7]], _cfg(4), rec, nan_at_call=3)
    message = str(info.value)
    assert "non-finite value at step 3 (epoch 1) in mse" in message and "checkpoint-2" in message
    assert "--resume --set train.on_nonfinite=skip" in message
    assert [s for s, _, _ in rec.checkpoints] == [2]


# ---- TrainState ----------------------------------------------------------------------------------


def test_train_state_round_trips_and_ignores_unknown_keys():
    state = TrainState(step=5, epoch=1, next_micro=2, window={"loss": 1.5}, last_scores={"accuracy": 0.75},
                       skipped_nonfinite=1)
    saved = state.to_dict()
    assert TrainState.from_dict(saved) == state
    assert TrainState.from_dict({**saved, "from_a_newer_kdgeo": 1}) == state
    # the keys checkpoints of format 1 have always held under "loop"
    assert list(saved) == ["step", "epoch", "next_micro", "train_seconds", "samples_seen", "window", "window_n",
                           "window_samples", "window_time", "evaluated_at", "last_scores", "last_monitor",
                           "skipped_nonfinite", "skipped_scaler"]


# ---- epoch_batches -------------------------------------------------------------------------------


@pytest.mark.parametrize("n, batch, world, gathered, min_rows, sizes", [
    (66, 16, 1, False, 1, [16, 16, 16, 16, 2]),  # token rows or no geometry: every example is used
    (66, 16, 1, False, 3, [16, 16, 16, 16]),  # pooled geometry: the 2-example tail is left out
    (67, 16, 1, False, 3, [16, 16, 16, 16, 3]),  # a 3-example tail is enough
    (70, 16, 2, False, 3, [32, 32, 6]),  # 2 processes: shares of 3 and 3
    (68, 16, 2, False, 3, [32, 32]),  # shares of 2 and 2: left out
    (68, 16, 2, True, 3, [32, 32, 4]),  # gathered: the 4 rows form one statistic
    (65, 16, 2, True, 1, [32, 32]),  # as before: a batch with fewer examples than processes
])
def test_epoch_batches_leave_out_a_tail_too_small_for_geometry(n, batch, world, gathered, min_rows, sizes):
    got = epoch_batches(n, batch * world, world, seed=0, epoch=0, lengths=None, min_rows=min_rows, gathered=gathered)
    assert sorted((len(b) for b in got), reverse=True) == sizes
    assert len({i for b in got for i in b}) == sum(sizes)
    lengths = [i % 7 for i in range(n)]
    grouped = epoch_batches(
        n, batch * world, world, seed=0, epoch=0, lengths=lengths, min_rows=min_rows, gathered=gathered
    )
    assert sorted((len(b) for b in grouped), reverse=True) == sizes  # length grouping leaves out the same


