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
    # the keys checkpoints of format 1 have always held under "loop", then the ones added since (an older
    # checkpoint without them reads their defaults: on_policy {} is a run without train.on_policy)
    assert list(saved) == ["step", "epoch", "next_micro", "train_seconds", "samples_seen", "window", "window_n",
                           "window_samples", "window_time", "evaluated_at", "last_scores", "last_monitor",
                           "skipped_nonfinite", "skipped_scaler", "on_policy"]
    old = {k: v for k, v in saved.items() if k != "on_policy"}
    assert TrainState.from_dict(old) == state


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




# ---- the fast path: logged values stay on the device, one host sync per step ---------------------


def test_logged_values_summed_on_the_device_equal_the_python_float_sums_bit_for_bit():
    """float64 on the device = the Python float arithmetic the loop used to do (float(v) * share, summed per
    step, then per window), exactly, including sign-less zeros."""
    from kdgeo.loop import _StepValues, _Window

    gen = torch.Generator().manual_seed(3)
    names = ["ce", "kd", "procrustes/1-3", "loss"]
    window, expected = _Window({"ce": 0.1, "kd": 0.2, "procrustes/1-3": 0.3, "loss": 0.6}, torch.device("cpu")), {}
    expected = {"ce": 0.1, "kd": 0.2, "procrustes/1-3": 0.3, "loss": 0.6}  # a resumed window
    for _ in range(5):  # steps
        step, parts = _StepValues(names, torch.device("cpu")), {}
        for _ in range(3):  # micro-batches
            row = [torch.randn((), generator=gen) * 10 ** float(torch.randint(-6, 6, (), generator=gen)) for _ in names]
            row[1] = -0.0 * row[1].abs()  # a negative zero
            share = float(torch.rand((), generator=gen, dtype=torch.float64))
            step.add(row, share)
            for n, v in zip(names, row):
                parts[n] = parts.get(n, 0.0) + float(v) * share
        assert step.floats() == parts
        window.add(step)
        for n, v in parts.items():
            expected[n] = expected.get(n, 0.0) + v
    assert window.floats() == expected and all(math.copysign(1, v) == 1 for v in window.floats().values() if v == 0)


class _SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts reads of float or bool tensors into Python (on CUDA each waits for the device)."""

    READS = {"__float__", "__bool__", "item", "tolist", "__int__"}

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if getattr(func, "__name__", "") in self.READS and args and args[0].dtype not in (torch.int64, torch.int32):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_a_step_reads_the_device_once_and_each_log_event_once_more():
    """4 steps of 2 micro-batches, logged every 2 steps: 4 finiteness checks + 2 log events = 6 reads. (Per
    term per micro-batch, plus one finiteness check per micro-batch and one for the norm, it was 28.)"""
    counter = _SyncCounter()
    with counter:
        state, _ = _run([[0, 1], [2, 3], [4, 5], [6, 7]] * 2, _cfg(4, accum=2, log_every=2), Recorder())
    assert state.step == 4 and counter.n == 4 + 2


def test_a_checkpoint_between_log_events_saves_the_window_and_resume_logs_the_same_values():
    """The window lives on the device between log events; a checkpoint in between must hold it, so a run
    resumed from step 3 logs step 4's mean (over steps 1-4) exactly as the uninterrupted run does."""
    micro = [[0, 1], [2, 3], [4, 5], [6, 7]]
    cfg = _cfg(8, log_every=4, checkpoint_every=3)
    straight = Recorder()
    _run(micro, cfg, straight)
    saved = straight.checkpoints[0][2]
    assert straight.checkpoints[0][0] == 3 and set(saved["loop"]["window"]) == {"mse", "loss"}
    model, objective, optimizer, scheduler, scaler = _setup()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    resumed = Recorder()
    _run(micro, cfg, resumed, state=TrainState.from_dict(saved["loop"]),
         parts=(model, objective, optimizer, scheduler, scaler))
    logged = {e.step: e.losses for e in straight.events if isinstance(e, Step)}
    assert {e.step: e.losses for e in resumed.events if isinstance(e, Step)} == {4: logged[4], 8: logged[8]}


def test_a_nonfinite_micro_batch_of_an_accumulated_step_is_named_and_the_whole_step_skipped():
    rec = Recorder()
    state, model = _run([[0, 1], [2, 3], [4, 5], [6, 7]] * 2, _cfg(4, accum=2, on_nonfinite="skip"), rec,
                        nan_at_call=3)  # step 2's first micro-batch; its second still runs
    assert state.skipped_nonfinite == 1 and state.step == 4 and state.samples_seen == 16
    assert [(e.step, e.terms) for e in rec.events if isinstance(e, NonFinite)] == [(2, ["mse"])]
    assert torch.isfinite(model.weight).all()
    assert all(math.isfinite(v) for e in rec.events if isinstance(e, Step) for v in e.losses.values())
    with pytest.raises(KdgeoError, match=r"non-finite value at step 2 \(epoch 1\) in mse"):
        _run([[0, 1], [2, 3], [4, 5], [6, 7]], _cfg(4, accum=2), Recorder(), nan_at_call=4)


def test_a_nonfinite_gradient_norm_of_finite_losses_is_named_and_skipped():
    """The norm is read in the same host sync as the losses' flags."""
    model, objective, optimizer, scheduler, scaler = _setup()

    def loss_fn(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        idx = batch["index"]
        w = model.weight
        # finite value, infinite gradient at step 2: sqrt(|w| * 0) has an infinite derivative at 0
        mse = ((model(X[idx]) - Y[idx]) ** 2).mean() + (torch.sqrt(w.abs() * 0.0).sum() if idx[0] == 2 else 0.0)
        return mse, torch.zeros((), dtype=torch.float64), {"mse": mse.detach()}

    rec = Recorder()
    state = train(model, objective, optimizer, scheduler, scaler, Batches([[0, 1], [2, 3]]), loss_fn,
                  _cfg(2, on_nonfinite="skip"), TrainState(), rec.hooks(model, optimizer, scheduler),
                  distributed.SINGLE)
    assert [(e.step, e.terms) for e in rec.events if isinstance(e, NonFinite)] == [
        (2, ["the gradients (loss finite, gradient norm not)"])
    ]
    assert state.skipped_nonfinite == 1 and torch.isfinite(model.weight).all()
    logged = [e for e in rec.events if isinstance(e, Step)]
    assert math.isfinite(logged[1].losses["loss"])  # finite losses of a skipped step are still logged


def test_with_the_loss_scaler_a_skipped_step_is_not_unscaled_and_training_goes_on():
    """fp16's GradScaler may unscale once per update: the losses' flags are read before clipping, so a
    skipped step leaves the scaler ready for the next one."""
    model, objective, optimizer, scheduler, _ = _setup()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    rec = Recorder()
    state = train(model, objective, optimizer, scheduler, scaler, Batches([[0, 1], [2, 3], [4, 5], [6, 7]]),
                  _loss_fn(model, nan_at_call=2), _cfg(4, on_nonfinite="skip"), TrainState(),
                  rec.hooks(model, optimizer, scheduler), distributed.SINGLE)
    assert state.step == 4 and state.skipped_nonfinite == 1 and torch.isfinite(model.weight).all()
