"""`kdgeo distill`: one run, in the order plan -> build -> loop -> run directory.

1. plan (:func:`kdgeo.plan.make_plan`): the spec becomes flat values; configs, tokenizers and data
   are read and every cheap check runs before any weights load.
2. build: the teacher (:func:`kdgeo.teacher.prepare`: load, fine-tune once, cache), the student
   (:func:`kdgeo.models.build_student`), the monitor batch (:mod:`kdgeo.monitor`), the objective,
   AdamW with its schedule, the torchrun wrappers and the teacher-output cache.
3. loop (:func:`kdgeo.loop.train`), with hooks that write metrics.jsonl, measure the layer pairs,
   evaluate and checkpoint (:class:`_Run`).
4. the run directory: the final measurements, the student, summary.json.

Under torchrun every process runs this; rank 0 alone writes files and reports. Progress goes out
as :mod:`kdgeo.events` to a callback; :mod:`kdgeo.report` draws them.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdgeo import (
    __version__,
    checkpoint,
    data_split,
    distributed,
    events,
    locks,
    on_policy,
    rundir,
    stopping,
    trackers,
)
from kdgeo import data as data_mod
from kdgeo import teacher as teacher_mod
from kdgeo.best import BestRecord
from kdgeo.errors import KdgeoError, OutputError, RunInterrupted
from kdgeo.events import Event, Progress, Stage
from kdgeo.kinds import EQUAL_WIDTH_KINDS, FEATURE_KINDS
from kdgeo.loop import Hooks, LoopConfig, TrainBatches, TrainState, train
from kdgeo.losses import Objective
from kdgeo.models import SAVE_ERRORS, ModelRef, build_student, fingerprint_model, save_model_dir
from kdgeo.monitor import MonitorBatch
from kdgeo.optim import build_optimizer, build_scheduler, param_groups
from kdgeo.plan import DistillPlan, check_equal_widths, effective_spec, few_rows_warning, make_plan
from kdgeo.probing import rows_width_warning
from kdgeo.rundir import RunSummary
from kdgeo.runtime import autocast_dtype, precision_name, weight_dtype
from kdgeo.spec import RunSpec, resume_differences
from kdgeo.step_loss import StepLoss
from kdgeo.tasks import EvalSettings
from kdgeo.teacher_outputs import OutputPlan, TeacherOutputs, encoding_digest
from kdgeo.teacher_outputs import ensure as ensure_teacher_outputs


@dataclass
class DistillResult:
    run_dir: Path
    summary: dict[str, Any]


def run_distill(spec: RunSpec, progress: Progress | None = None, resume: bool = False) -> DistillResult:
    """Train the student per ``spec``; with ``resume``, continue the run directory's newest checkpoint.

    The run directory is locked (:mod:`kdgeo.locks`) before anything is written there and until
    this returns or raises: a second run into it stops with :class:`kdgeo.locks.RunInUseError`.

    SIGINT and SIGTERM are handled for the whole run (:mod:`kdgeo.stopping`): every phase stops at
    its next safe point, keeping what it can (the teacher fine-tune's progress, a checkpoint, the
    end-of-training checkpoint), and :class:`RunInterrupted` says what was kept and what continues it.
    A signal is never swallowed: a run that finished meanwhile still raises."""
    where = _Where(resume)
    with stopping.stop_on_signals():
        try:
            with ExitStack() as held:
                result = _run_distill(spec, progress, resume, held, where)
        except stopping.StopNow:
            raise where.stopped_now() from None
        except RunInterrupted as err:
            if err.next_step != "nothing":
                err.next_step = "resume" if where.started else "rerun"
            raise
        stopping.check(
            f"after the run finished: {result.run_dir} is complete (summary.json); nothing needs resuming.",
            run_dir=str(result.run_dir),
            step=int(result.summary.get("steps", 0)),
            next_step="nothing",
        )
    return result


@dataclass
class _Where:
    """How far the run got, for the message of a second Ctrl-C and for the command that continues it."""

    started: bool
    """The run directory holds this run's spec: ``--resume`` continues it (a resumed run: from the start)."""
    run_dir: Path | None = None

    def stopped_now(self) -> RunInterrupted:
        """A second Ctrl-C: one line saying what was kept."""
        if self.started and self.run_dir is not None:
            newest = checkpoint.latest_checkpoint(self.run_dir)
            kept = (
                f"{newest} is kept and --resume continues from it"
                if newest is not None
                else f"{self.run_dir} has no checkpoint yet and --resume starts its training again"
            )
        else:
            kept = "nothing of the run was written yet (a teacher fine-tune or teacher-output cache entry that was "
            kept += "finished stays cached)"
        return RunInterrupted(
            f"second Ctrl-C: stopped at once, without a checkpoint; {kept}.",
            exit_code=128 + int(signal.SIGINT),
            run_dir=str(self.run_dir or ""),
            step=0,
            next_step="resume" if self.started else "rerun",
        )


def _stop_agreed(dist: distributed.Dist) -> int | None:
    """The stop signal of any process (None: none): under torchrun every process must stop at the
    same point, or the others wait in a collective until the timeout."""
    signals = [s for s in distributed.gather_objects(stopping.pending(), dist) if s is not None]
    return signals[0] if signals else None


def _run_distill(
    spec: RunSpec, progress: Progress | None, resume: bool, held: ExitStack, where: _Where
) -> DistillResult:
    wall_start = time.perf_counter()
    t = spec.train
    dist, device = distributed.setup(t.device, "train.device", timedelta(minutes=t.timeout_minutes))
    emit: Progress = (progress or events.ignore) if dist.is_main else events.ignore
    _check_launch(spec, device, dist)
    run_name = spec.output.name or spec.name
    held.enter_context(_run_dir_lock(spec, run_name, resume, dist))
    recorded_split = None
    if resume:
        run_dir = _check_resumable(Path(spec.output.dir).expanduser() / run_name, spec)
        spec = _recorded_lengths(spec, rundir.read_json(run_dir / rundir.SPEC_JSON))
        recorded_split = data_split.read_split(run_dir)
    else:
        run_dir = distributed.on_main(
            lambda: rundir.prepare_run_dir(spec.output.dir, run_name, spec.output.overwrite), dist
        )
    # Found now, not after a teacher fine-tune or a cache build that took an hour.
    if spec.teacher.finetune is not None:
        rundir.check_writable_dir(
            spec.output.teacher_cache, "output.teacher_cache", "the fine-tuned teacher is cached there"
        )
    if spec.output.teacher_outputs or spec.train.sequence_kd:
        rundir.check_writable_dir(
            spec.output.teacher_outputs_dir,
            "output.teacher_outputs_dir",
            "output.teacher_outputs = true writes the teacher's outputs there"
            if spec.output.teacher_outputs
            else "train.sequence_kd = true caches the teacher's responses there",
        )

    where.run_dir = run_dir
    kept = "the run directory is as it was" if resume else "nothing of the run was written yet"
    plan = make_plan(spec, dist.world_size, dist.enabled and t.gather_features, emit, data_split=recorded_split)
    spec = effective_spec(spec, plan)  # a default data.max_length clamped to the models: spec.json records it
    if signum := _stop_agreed(dist):
        raise stopping.interrupted(signum, f"during pre-flight: {kept}.", run_dir=str(run_dir))
    if resume and plan.data_split is not None and recorded_split is None:
        # A run started by a kdgeo that wrote spec.json before data_split.json, or a deleted file: keep it now.
        distributed.on_main(lambda: data_split.write_split(run_dir, plan.data_split), dist)
    run = _Run(plan, dist, device, run_dir, emit)
    if dist.is_main and spec.output.report_to:  # rank 0 alone reports, to trackers as to the screen
        settings = trackers.TrackerSettings(
            tuple(spec.output.report_to), spec.model_dump(mode="json", exclude_none=True), spec.name, run_name
        )
        run.trackers = trackers.Trackers(settings, run.tracker_warning)
    held.callback(run.trackers.close)  # an interrupted or failed run still flushes what it logged
    run.build()  # the teacher fine-tune and the teacher-output cache build stop by themselves
    if signum := _stop_agreed(dist):
        raise stopping.interrupted(
            signum,
            f"before training started: {kept} (the fine-tuned teacher and teacher outputs stay cached).",
            run_dir=str(run_dir),
        )

    def write_run_files() -> None:
        _write_run_files(run_dir, spec, plan.data_split)
        where.started = True

    state = run.start(resume, write_run_files)
    where.started = True
    state = train(
        run.student,
        run.objective,
        run.optimizer,
        run.scheduler,
        run.scaler,
        run.batches(),
        run.step_loss(state),
        run.loop_config(),
        state,
        run.hooks(),
        dist,
    )
    # A signal in the last step: the loop does not stop there (nothing is left to train), the run does.
    run.stop_point("at the end of training")
    summary = run.finish(state, wall_start)
    return DistillResult(run_dir=run_dir, summary=summary)


@contextmanager
def _run_dir_lock(spec: RunSpec, run_name: str, resume: bool, dist: distributed.Dist) -> Iterator[None]:
    """Rank 0 holds the run directory's lock (a new run's directory is made for it); its refusal
    reaches every rank. A run to resume that does not exist is not locked: _check_resumable says so."""
    lock: list[locks.Lock | None] = [None]

    def take() -> None:
        shown = str(Path(spec.output.dir) / run_name)
        if resume:
            lock[0] = locks.lock_run_dir(Path(spec.output.dir).expanduser() / run_name, shown, create=False)
        else:
            lock[0] = locks.lock_run_dir(rundir.check_run_path(spec.output.dir, run_name), shown, create=True)

    distributed.on_main(take, dist)
    try:
        yield
    finally:
        if lock[0] is not None:
            lock[0].release()


def _check_launch(spec: RunSpec, device: torch.device, dist: distributed.Dist) -> None:
    """Precision and strategy settings this device and launch cannot run; trackers that are not installed."""
    trackers.check_installed(spec.output.report_to)
    if spec.train.precision == "fp16" and device.type != "cuda":
        raise KdgeoError('train.precision = "fp16" needs a CUDA device; use "bf16" or "fp32" on CPU (or "auto").')
    fsdp = dist.enabled and spec.train.distributed == "fsdp"
    if (
        fsdp
        and autocast_dtype(spec.train.precision, device) == torch.float16
        and any(l.kind == "projection" for l in spec.losses)
    ):
        # The fp16 gradient scaler unscales all gradients in one foreach call, which cannot mix
        # the student's sharded (DTensor) gradients with the projection maps' plain ones.
        raise KdgeoError(
            'train.distributed = "fsdp" with fp16 autocast and a projection loss is not supported: use '
            'train.precision = "bf16" (no gradient scaler), train.distributed = "ddp", or a loss without learned '
            "maps (procrustes, gram, cka)."
        )


class _Run:
    """One distillation run being built, trained and finished: the objects the loop's hooks share."""

    def __init__(
        self, plan: DistillPlan, dist: distributed.Dist, device: torch.device, run_dir: Path, emit: Progress
    ) -> None:
        self.plan, self.dist, self.device, self.run_dir, self.emit = plan, dist, device, run_dir, emit
        precision = plan.training.precision
        self.amp = autocast_dtype(precision, device)
        # fp64: teacher (and its fine-tune), student and projection maps hold float64 weights, no autocast.
        self.param_dtype = weight_dtype(precision)
        self.precision = precision_name(precision, device)
        self.fsdp = dist.enabled and plan.training.strategy == "fsdp"
        # Evaluations and the monitor run on rank 0 only, unless FSDP needs every rank for a forward.
        self.measure_here = dist.is_main or self.fsdp
        self.metrics_path = run_dir / rundir.METRICS
        self.lines = 0  # metrics.jsonl lines written (on every rank: checkpoints carry the count)
        self.resumed_from: Path | None = None
        self.teacher_scores: dict[str, float] = {}
        self.teacher_preds: list[int] | None = None
        self.final_records: list[dict[str, Any]] | None = None  # the final evaluation's, for predictions.jsonl
        self.cached: TeacherOutputs | None = None
        self.sequence_kd: dict[str, Any] | None = None  # train.sequence_kd's record, summary.json's "sequence_kd"
        self.trackers = trackers.Trackers(trackers.TrackerSettings(), self.tracker_warning)  # output.report_to
        tr = plan.training
        self.best = BestRecord(tr.save_best, tr.early_stopping_patience) if tr.save_best else None
        self.end_step = plan.steps.total  # early stopping ends training sooner

    # ---- build --------------------------------------------------------------------------------
    def build(self) -> None:
        plan, dist, device = self.plan, self.dist, self.device
        self.teacher = teacher_mod.prepare(plan, dist, device, self.amp, self.param_dtype, self.emit)
        if plan.training.sequence_kd:  # before anything reads the training split (the teacher fine-tunes on references)
            self._use_teacher_responses()
            plan = self.plan
        self.model = build_student(plan, self.teacher.model, device, self.param_dtype)  # the user's module
        self.monitor = MonitorBatch(
            self.teacher.model,
            plan.evals,
            plan.monitor_samples,
            plan.task,
            plan.rows,
            plan.t_widths,
            f"the teacher {plan.teacher_ref.ref}",
            device,
            self.amp,
        )
        self.pairs = list(plan.pairs) if not plan.probe_pairs else self._probe_pairs()
        if few := few_rows_warning(plan, tuple(self.pairs), dist.world_size):
            self.emit(events.RunWarning(few))
        self.monitor.fix_pairs(self.pairs)
        if self.monitor.t_rows and plan.monitor_every:  # the live view's n: its values move with n when n is small
            n = int(self.monitor.t_rows[0].shape[0])
            self.emit(events.Stage(f"monitor batch: n = {n} {plan.rows} rows"))
            d_t, d_s = max(plan.t_widths[t] for _, t in self.pairs), max(plan.s_widths[s] for s, _ in self.pairs)
            if few := rows_width_warning(n, d_t, d_s, "the monitor batch"):
                self.emit(events.RunWarning(few + " (monitor.samples sets the examples)"))
        self._build_training()
        self.eval_settings = EvalSettings(
            plan.task.eval_batch_size(plan.training.batch_size),
            device,
            self.amp,
            plan.generation,
            plan.generation_max_samples,
            plan.generate_every_eval,
        )
        self._teacher_outputs()
        self._score_teacher()

    def _probe_pairs(self) -> list[tuple[int, int]]:
        plan = self.plan
        equal = bool(plan.loss_kinds & EQUAL_WIDTH_KINDS)
        # mse/cosine can only pair equally wide indices: the map must not pick the others.
        chosen = self.monitor.probe_pairs(self.model, plan.s_widths, plan.t_widths, equal)
        # Rank 0's map for everyone: a near tie must not give processes different pairs.
        pairs: list[tuple[int, int]] = distributed.broadcast_object(chosen, self.dist)
        self.emit(Stage("layer pairs from probing: " + ", ".join(f"{s}->{t}" for s, t in pairs)))
        if equal:
            check_equal_widths(plan.loss_kinds, pairs, plan.s_widths, plan.t_widths, probe=False)
        return pairs

    def _build_training(self) -> None:
        """The objective, the torchrun wrappers, AdamW and its schedule, the fp16 gradient scaler."""
        plan, dist, tr = self.plan, self.dist, self.plan.training
        feature = bool(plan.loss_kinds & FEATURE_KINDS)
        pairs = self.pairs if feature else []
        widths = [(plan.s_widths[s], plan.t_widths[t]) for s, t in pairs]  # (d_s, d_t) per pair
        self.objective = Objective(list(plan.terms), pairs, widths).to(device=self.device, dtype=self.param_dtype)
        self.student = self.model  # under torchrun its DDP/FSDP wrapper
        if dist.enabled:
            self.emit(Stage(f"torchrun: {dist.world_size} processes, {tr.strategy}, backend {dist.backend}"))
            if self.fsdp:
                self.teacher = teacher_mod.PreparedTeacher(
                    distributed.shard_frozen(self.teacher.model, dist), self.teacher.source, self.teacher.finetune
                )
            # Without a logit loss, the head (and layers above the deepest pair) get no gradient.
            self.student = distributed.wrap_student(
                self.model,
                dist,
                self.device,
                tr.strategy,
                find_unused_parameters=not (plan.loss_kinds & {"ce", "kd"}),
            )
        groups = param_groups(self.student.named_parameters(), tr.lr, tr.weight_decay)
        if len(self.objective.projections):
            groups += param_groups(self.objective.named_parameters(), tr.projection_lr or tr.lr, tr.weight_decay)
        self.optimizer = build_optimizer(groups, tr.lr)
        self.scheduler = build_scheduler(self.optimizer, plan.steps.total, tr.warmup_ratio, tr.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)

    def _use_teacher_responses(self) -> None:
        """train.sequence_kd: the training split's responses become the teacher's own (:mod:`kdgeo.sequence_kd`),
        generated once into a cache entry (by rank 0 under torchrun, with the whole teacher: FSDP shards it
        later; the other ranks then read the entry)."""
        from kdgeo import sequence_kd

        plan = self.plan
        assert plan.generation is not None  # a causal-LM plan; the spec refuses sequence_kd for classification
        decoding = sequence_kd.Decoding.of(plan.generation)
        payload = sequence_kd.entry_payload(plan, self.precision, (self.teacher.finetune or {}).get("key"))
        root = sequence_kd.cache_root(plan.output.teacher_outputs_dir)
        max_length = int(plan.data["max_length"])

        def ensure(emit: Progress, build: bool = True) -> sequence_kd.Generations:
            return sequence_kd.ensure(
                root, payload, self.teacher.model, plan.t_tok, plan.train, decoding, max_length, self.device,
                self.amp, emit, build=build,
            )  # fmt: skip

        built: list[sequence_kd.Generations] = []
        distributed.on_main(lambda: built.append(ensure(self.emit)), self.dist)
        gens = built[0] if built else ensure(events.ignore, build=False)
        tokenizers = {"student": plan.s_tok, "teacher": plan.t_tok}
        pair_tokens = plan.rows == "tokens" or "kd" in plan.loss_kinds
        train = sequence_kd.apply(plan.train, gens, tokenizers, max_length, pair_tokens)
        self.plan = dataclasses.replace(plan, train=train)
        self.sequence_kd = record = sequence_kd.record(gens, decoding)
        self.emit(
            Stage(
                f"sequence_kd: training on the teacher's responses (cache entry {gens.key}): "
                f"{record['generated_tokens_mean']:g} new tokens on average, {record['hit_token_limit']} of "
                f"{record['examples']} cut at the token limit, {record['empty_kept_reference']} empty (their "
                "reference kept)"
            )
        )

    def _trained(self) -> nn.Module:
        """Under FSDP the optimizer state is read and written by parameter name across both modules."""
        return nn.ModuleDict({"student": self.student, "objective": self.objective})

    def _teacher_outputs(self) -> None:
        """The teacher's training outputs from the cache (built on first use), when asked and needed."""
        plan, obj = self.plan, self.objective
        need_hidden = obj.needs_features
        if not plan.output.teacher_outputs or not (obj.needs_teacher_logits or need_hidden):
            return
        payload = {
            "format": 1,
            "task": plan.task.name,
            "teacher": plan.teacher_ref.ref,
            "revision": plan.teacher_ref.revision,
            "teacher_files": fingerprint_model(ModelRef(self.teacher.source)),
            "finetune": (self.teacher.finetune or {}).get("key"),
            # eval_fraction / split_seed change the training rows, which teacher_examples hashes; left out so the
            # keys of runs without them stay as they were
            "data": {k: v for k, v in plan.data.items() if k not in CACHE_FREE_DATA},
            "data_fingerprint": data_mod.fingerprint(plan.data["dataset"]),
            "teacher_examples": encoding_digest(plan.train),
            "precision": self.precision,
        }
        if self.sequence_kd is not None:  # the teacher's responses are the inputs (teacher_examples changes too)
            payload["sequence_kd"] = self.sequence_kd["entry"]
        t_idx = [t for _, t in self.pairs]
        layout = OutputPlan(
            task=plan.task,
            rows=plan.rows,
            layers=tuple(t_idx) if need_hidden else (),
            widths=tuple(plan.t_widths[t] for t in t_idx) if need_hidden else (),
            logit_width=plan.task.cached_logit_width(self.teacher.model) if obj.needs_teacher_logits else None,
        )
        root = Path(plan.output.teacher_outputs_dir).expanduser()
        dtype, batch = plan.output.teacher_outputs_dtype, max(64, plan.training.batch_size)

        def ensure(emit: Progress, build: bool = True) -> TeacherOutputs:
            return ensure_teacher_outputs(
                root,
                payload,
                layout,
                self.teacher.model,
                plan.train,
                dtype,
                batch,
                self.device,
                self.amp,
                emit,
                build=build,
            )

        if self.fsdp:
            # A sharded teacher's forward needs every rank; build the entry in one process (or under ddp) first.
            self.cached = ensure(self.emit, build=False)
        else:
            distributed.on_main(lambda: ensure(self.emit).reader.close(), self.dist)
            self.cached = ensure(events.ignore, build=False)

    def _score_teacher(self) -> None:
        """The teacher's evaluation scores (and a classifier's predictions, for teacher agreement), once."""
        if not self.measure_here:
            return
        plan = self.plan
        note = plan.task.scoring_note(plan.evals, self.eval_settings)
        if note:
            self.emit(Stage(note))
        scored = plan.task.evaluate(
            self.teacher.model,
            plan.t_tok,
            plan.evals,
            "teacher",
            self.eval_settings,
            final=True,
        )
        self.teacher_scores, self.teacher_preds = scored.scores, scored.predictions

    # ---- the loop's inputs and hooks --------------------------------------------------------
    def start(self, resume: bool, write_run_files: Any) -> TrainState:
        """The state to train from: a checkpoint's (``resume``) or a fresh one, with the run's first event."""
        state = self._resume() if resume else None
        if not resume:
            distributed.on_main(write_run_files, self.dist)
        self._start_trackers(resume, state)
        torch.manual_seed(self.plan.seed + self.dist.rank)  # rank 0 draws what a single process draws
        if state is not None:
            checkpoint.restore_rng(self._rng, self.dist.rank)  # after the seeding above, which it must override
            self.record(events.Resume(step=state.step, checkpoint=str(self.resumed_from)))
            return state
        plan = self.plan
        self.record(
            events.Start(
                run_dir=str(self.run_dir),
                total_steps=plan.steps.total,
                steps_per_epoch=plan.steps.steps_per_epoch,
                train_samples=len(plan.train),
                eval_samples=len(plan.evals),
                pairs=[list(p) for p in self.pairs],
                device=str(self.device),
                precision=self.precision,
                teacher_scores=self.teacher_scores,
                losses=[t.kind for t in plan.terms],
            )
        )
        state = TrainState()
        state.last_monitor = self.measure(0) if self.pairs else []
        return state

    def _start_trackers(self, resume: bool, state: TrainState | None) -> None:
        """Open the trackers (rank 0; none unless output.report_to names some): a resumed run continues
        the same tracker run from its checkpoint's step (0 when it had none, as metrics.jsonl starts again)."""
        if not self.trackers.settings.names:
            return
        at = (state.step if state is not None else 0) if resume else None
        replay = trackers.events_at(self.metrics_path, at) if at else []
        self.trackers.start(self.run_dir, at, replay)

    def tracker_warning(self, message: str) -> None:
        self.emit(events.RunWarning(message))

    def _resume(self) -> TrainState | None:
        """Load the newest checkpoint into the models, optimizer, schedule and scaler; None when
        the run has none yet (it starts again from step 0)."""
        plan, dist = self.plan, self.dist
        loaders: dict[str, Any] = {}
        if self.fsdp:
            loaders = {
                "load_student": lambda sd: distributed.load_full_state_dict(self.student, sd, dist),
                "load_optimizer": lambda st: distributed.load_full_optimizer_state(
                    self._trained(), self.optimizer, st, dist
                ),
            }

        def load(path: Path) -> dict[str, Any]:
            head = checkpoint.read_state(path)  # checked before loading: the layouts differ per launch
            saved = (head.get("world_size", 1), head.get("strategy", "ddp"))
            here = (dist.world_size, plan.training.strategy if dist.enabled else "ddp")
            if saved != here:
                raise KdgeoError(
                    f"{path} was written by {saved[0]} process(es) ({saved[1]}); this run has {here[0]} "
                    f"({here[1]}). The global batch is batch_size x processes and the optimizer state is laid out "
                    f"per strategy: resume with the same launch (torchrun --nproc-per-node {saved[0]} and "
                    f'train.distributed = "{saved[1]}"; no torchrun for 1 process).'
                )
            module = distributed.unwrap(self.student)
            # Read and checked before anything is applied: a damaged one falls back like any other file.
            kept = checkpoint.read_best(path, module) if (head.get("best") or {}).get("step") is not None else None
            loaded = checkpoint.load_checkpoint(path, module, self.objective, self.optimizer, self.device, **loaders)
            loaded["_best_weights"] = kept
            return loaded

        # A damaged checkpoint (checked whole before anything is applied) falls back to the one before it.
        found = checkpoint.load_newest(self.run_dir, load, lambda note: self.emit(Stage(note)))
        if found is None:
            self.emit(Stage(f"{self.run_dir} has no checkpoint yet: starting the run again from step 0"))
            if dist.is_main:
                self.metrics_path.unlink(missing_ok=True)
            return None
        self.resumed_from, saved_state = found
        self.scheduler.load_state_dict(saved_state["scheduler"])
        if saved_state.get("scaler"):
            self.scaler.load_state_dict(saved_state["scaler"])
        # Events after the checkpoint will be produced again; drop them so nothing is doubled.
        self.lines = saved_state["metrics_lines"]
        if dist.is_main:
            rundir.truncate_lines(self.metrics_path, self.lines)
        self.emit(Stage(f"resuming from {self.resumed_from} (step {saved_state['step']} of {plan.steps.total})"))
        self._rng = saved_state["_rng"]
        if self.best is not None:
            self.best.restore(saved_state.get("best") or {}, saved_state["_best_weights"])
            if self.best.stop:
                self.end_step = saved_state["step"]
        return TrainState.from_dict(saved_state["loop"])

    def batches(self) -> TrainBatches:
        plan, tr = self.plan, self.plan.training
        return TrainBatches(
            split=plan.train,
            global_batch=plan.steps.global_batch,
            seed=plan.seed,
            lengths=data_mod.lengths_of(plan.train) if plan.group_by_length else None,
            min_rows=plan.steps.min_rows,
            gathered=plan.steps.gathered,
            weights=plan.task.example_weights(plan.train),
            workers=data_mod.loader_workers(tr.loader_workers, self.device, self.dist.world_size),
            pin_memory=self.device.type == "cuda",
        )

    def step_loss(self, state: TrainState | None = None) -> StepLoss:
        """The loss of one micro-batch; with train.on_policy its batch source counts into ``state.on_policy``."""
        plan = self.plan
        return StepLoss(
            self.student,
            self.teacher.model,
            self.objective,
            plan.task,
            tuple(self.pairs),
            plan.rows,
            self.device,
            self.amp,
            self.param_dtype,
            self.cached,
            getattr(plan.task, "logit_width", None),
            plan.steps.gathered,
            self.dist,
            self._on_policy(state),
        )

    def _on_policy(self, state: TrainState | None) -> on_policy.OnPolicy | None:
        plan, gen = self.plan, self.plan.generation
        if plan.training.on_policy <= 0 or gen is None:
            return None
        from kdgeo.evaluate_lm import stop_tokens  # the stop tokens evaluation generates with

        return on_policy.OnPolicy(
            rate=plan.training.on_policy,
            seed=plan.seed,
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            max_length=int(plan.data["max_length"]),
            gen_batch_size=gen.batch_size,
            stop_ids=stop_tokens(self.model, plan.s_tok),
            eos_id=plan.s_tok.eos_token_id,
            pad_ids={role: enc.pad_id for role, enc in plan.train.encodings.items()},
            rank=self.dist.rank,
            counts=state.on_policy if state is not None else {},
        )

    def loop_config(self) -> LoopConfig:
        tr = self.plan.training
        return LoopConfig(
            total_steps=self.plan.steps.total,
            grad_accum=tr.grad_accum,
            max_grad_norm=tr.max_grad_norm,
            log_every=tr.log_every,
            monitor_every=self.plan.monitor_every if self.pairs else 0,
            eval_every=tr.eval_every,
            checkpoint_every=tr.checkpoint_every,
            on_nonfinite=tr.on_nonfinite,
            fsdp=self.fsdp,
            run_dir=str(self.run_dir),
        )

    def hooks(self) -> Hooks:
        return Hooks(
            record=self.record,
            monitor=self.measure,
            evaluate=self.evaluate_tracked,
            checkpoint=self.save_checkpoint,
            stop_signal=stopping.pending,
            stop_early=lambda: self.best is not None and self.best.stop,
        )

    def record(self, event: Event) -> None:
        self.lines += 1
        if self.dist.is_main:
            rundir.append_jsonl(self.metrics_path, events.to_dict(event))
            self.emit(event)
            self.trackers.log(event)

    def measure(self, step: int) -> list[dict[str, float]]:
        if not self.measure_here:
            return []
        values, nonfinite = self.monitor.measure(self.model, self.plan.monitor_metrics)
        self.record(events.Monitor(step=step, pairs=values))
        if nonfinite:
            # NaN/inf features are not "no variance": say so instead of logging a distance of 2.
            self.record(events.NonFinite(step=step, terms=nonfinite, action="monitor"))
        return values

    def evaluate(self, step: int, epoch: float, final: bool = False) -> dict[str, float]:
        if not self.measure_here:
            return {}
        plan = self.plan
        scored = plan.task.evaluate(
            self.model, plan.s_tok, plan.evals, "student", self.eval_settings, final, reference=self.teacher_preds
        )
        if final:
            self.final_records = scored.records
        self.record(events.Eval(step=step, epoch=epoch, scores=scored.scores))
        return scored.scores

    def evaluate_tracked(self, step: int, epoch: float, final: bool = False) -> dict[str, float]:
        """:meth:`evaluate`, then train.save_best's bookkeeping (:mod:`kdgeo.best`); every process takes part."""
        scores = self.evaluate(step, epoch, final)
        if self.best is not None:
            self._track_best(step, scores, final)
        return scores

    def _track_best(self, step: int, scores: dict[str, float], final: bool) -> None:
        """Judge the evaluation at ``step`` and keep the student when it is the best so far.

        Rank 0 scored it (under FSDP every rank did, alike); its score is broadcast so every process
        counts the same and all stop at the same step. The final student needs no copy: it is the model."""
        best, dist = self.best, self.dist
        assert best is not None
        value = distributed.broadcast_object(scores.get(best.metric) if dist.is_main else None, dist)
        if not best.judge(step, value) or final:
            if best.stop and best.stopped_at == step and not final:
                self.end_step = step
                self.emit(
                    Stage(
                        f"early stopping at step {step}: {best.bad} evaluation(s) without a better {best.metric} "
                        f"than {best.score} (step {best.step})"
                    )
                )
            return
        # (a collective under FSDP: every rank gathers, rank 0 receives the full tensors)
        full = distributed.full_state_dict(self.student, dist) if self.fsdp else self.model.state_dict()
        if dist.is_main:
            best.weights = {k: v.detach().to("cpu", copy=True) for k, v in full.items()}

    def save_checkpoint(self, state: TrainState, extra_keep: int = 0) -> Path:
        dist, tr = self.dist, self.plan.training
        saved = {
            "step": state.step,
            "total_steps": self.plan.steps.total,
            "loop": state.to_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "metrics_lines": self.lines,  # metrics.jsonl is cut back to this on resume
            "world_size": dist.world_size,
            "strategy": tr.strategy if dist.enabled else "ddp",
        }
        extra: dict[str, Any] = {}
        if dist.enabled:
            per_rank = distributed.gather_objects(checkpoint.rng_states(), dist)
            rng = {f"rank{r}.{k}": v for r, states in enumerate(per_rank) for k, v in states.items()}
            extra["rng"] = {
                **{k: v.clone() for k, v in per_rank[0].items()},
                **rng,
            }  # plain keys: rank 0, as one process writes
            if self.fsdp:  # collectives: every rank takes part, rank 0 receives the full tensors
                extra["student_state"] = distributed.full_state_dict(self.student, dist)
                extra["optimizer_state"] = distributed.full_optimizer_state(self._trained(), self.optimizer, dist)
        if self.best is not None:
            saved["best"] = self.best.to_state()
            if self.best.weights is not None:
                extra["best_state"] = self.best.weights
        keep = tr.keep_checkpoints + extra_keep
        path = distributed.on_main(
            lambda: checkpoint.save_checkpoint(
                self.run_dir, state.step, self.model, self.objective, self.optimizer, saved, keep, **extra
            ),
            dist,
        )
        self.record(events.Checkpoint(step=state.step, path=str(path)))
        return path

    # ---- the end ------------------------------------------------------------------------------
    def stop_point(self, where: str) -> None:
        """Stop between the final phases when a signal asked to: the end-of-training checkpoint is
        kept (it is removed only once summary.json is written), so --resume finishes the run."""
        signum = _stop_agreed(self.dist)
        if signum is None:
            return
        total, end = self.plan.steps.total, self.end_step
        kept = self.run_dir / f"{checkpoint.PREFIX}{end}"
        raise stopping.interrupted(
            signum,
            f"{where} (step {end} of {total}): the end-of-training checkpoint {kept} is kept; resuming from it "
            "runs the final evaluation, saves the student and writes summary.json.",
            run_dir=str(self.run_dir),
            step=end,
        )

    def finish(self, state: TrainState, wall_start: float) -> dict[str, Any]:
        """Final measurements, the student's files, summary.json; the end-of-training checkpoint goes."""
        plan, step = self.plan, state.step
        last_monitor = self.measure(step) if self.pairs else state.last_monitor
        scores = state.last_scores
        if state.evaluated_at != step:
            scores = self.evaluate_tracked(step, round(step / plan.steps.steps_per_epoch, 4), final=True)
        final_scores = scores
        if self.best is not None:
            scores, last_monitor = self._use_best(step, scores, last_monitor)
        self.stop_point("after the final evaluation")
        student_dir = self._save_student() if plan.output.save_student else None
        self.stop_point("after saving the student")
        summary = self._summary(state, last_monitor, scores, student_dir, wall_start, final_scores).to_dict()

        def write() -> None:
            # Before summary.json: a run is finished only with both, and a failed write keeps the
            # end-of-training checkpoint, from which --resume evaluates again and writes them.
            if self.final_records is not None:
                try:
                    rundir.write_predictions(self.run_dir / rundir.PREDICTIONS, self.final_records)
                except OutputError as err:
                    raise OutputError(
                        f"{err.message} The end-of-training checkpoint is kept: free some space and run the same "
                        "command with --resume to finish the run."
                    ) from None
            rundir.write_json(self.run_dir / rundir.SUMMARY, summary)
            # The end-of-training checkpoint was insurance for the final phase, which is now done.
            shutil.rmtree(self.run_dir / f"{checkpoint.PREFIX}{step}", ignore_errors=True)

        distributed.on_main(write, self.dist)
        self.trackers.summary(summary)
        self.trackers.close(finished=True)
        self.emit(events.Done(summary=summary))
        return summary

    def _use_best(
        self, step: int, scores: dict[str, float], monitor: list[dict[str, float]]
    ) -> tuple[dict[str, float], list[dict[str, float]]]:
        """train.save_best: put the best evaluation's weights into the model, so the student saved, its
        predictions.jsonl, ``scores`` and ``geometry`` all describe it. It is evaluated again with the final
        evaluation's settings (predictions, generation), which for a given set of weights gives the scores of
        its first evaluation; the final student's stay in ``final_scores``. Returns (scores, geometry)."""
        best, dist, plan = self.best, self.dist, self.plan
        assert best is not None
        if best.step is None or best.step == step:
            return scores, monitor  # the final student is the best (or no evaluation gave a finite score)
        self.emit(Stage(f"the best student is step {best.step}'s ({best.metric} {best.score}): evaluating it"))
        if self.fsdp:  # every rank loads the full weights and keeps its shard; only rank 0 holds the copy
            from torch.distributed.fsdp import FSDPModule

            for part in distributed.unwrap(self.student).modules():
                if isinstance(part, FSDPModule):
                    part.reshard()  # the final evaluation's forward leaves the root's parameters unsharded
            distributed.load_full_state_dict(self.student, distributed.broadcast_object(best.weights, dist), dist)
        elif dist.is_main:  # under DDP only rank 0 evaluates and saves
            assert best.weights is not None
            self.model.load_state_dict(best.weights)
        if not self.measure_here:
            return scores, monitor
        scored = plan.task.evaluate(
            self.model, plan.s_tok, plan.evals, "student", self.eval_settings, True, reference=self.teacher_preds
        )
        self.final_records = scored.records
        if self.pairs:
            monitor, _ = self.monitor.measure(self.model, plan.monitor_metrics)
        return scored.scores, monitor

    def _save_student(self) -> Path:
        student_dir = self.run_dir / rundir.STUDENT
        full = distributed.full_state_dict(self.student, self.dist) if self.fsdp else None  # a collective under FSDP

        def save() -> None:
            try:
                save_model_dir(self.model, self.plan.s_tok, student_dir, state_dict=full)
            except SAVE_ERRORS as err:
                raise OutputError(
                    f"cannot save the student to {student_dir}: {getattr(err, 'strerror', None) or err}. "
                    "metrics.jsonl and the checkpoints hold the run so far: free some space and run the same "
                    "command with --resume."
                ) from None

        distributed.on_main(save, self.dist)
        return student_dir

    def _summary(
        self,
        state: TrainState,
        last_monitor: list[dict[str, float]],
        scores: dict[str, float],
        student_dir: Path | None,
        wall_start: float,
        final_scores: dict[str, float] | None = None,
    ) -> RunSummary:
        plan, dist, step = self.plan, self.dist, state.step
        return RunSummary(
            format_version=rundir.FORMAT_VERSION,
            name=plan.name,
            variant=plan.variant,
            variant_base=plan.variant.partition("/")[0] if plan.swept else None,
            swept=dict(plan.swept) if plan.swept else None,
            data=plan.task.summary_data(plan.data, plan.train, plan.evals),
            run_dir=str(self.run_dir),
            task=plan.task.name,
            seed=plan.seed,
            teacher=plan.teacher_ref.ref,
            teacher_path=self.teacher.source,
            teacher_finetune=self.teacher.finetune,
            student_init=plan.student_init,
            student_layers=plan.s_layers,
            student_width=plan.s_widths[0],
            student_widths=list(plan.s_widths),
            student_parameters=sum(p.numel() for p in self.student.parameters()),
            teacher_parameters=sum(p.numel() for p in self.teacher.model.parameters()),
            copied_teacher_layers=list(plan.copied_layers) if plan.copied_layers is not None else None,
            student_dir=str(student_dir) if student_dir else None,
            losses=[rundir.loss_record(t) for t in plan.terms],
            pairs=[list(p) for p in self.pairs],
            rows=plan.rows,
            label_names=list(plan.task.label_names) or None,
            steps=step,
            epochs=round(step / plan.steps.steps_per_epoch, 4),
            train_samples=len(plan.train),
            eval_samples=len(plan.evals),
            scores=scores,
            teacher_scores=self.teacher_scores,
            geometry=last_monitor,
            skipped_steps_nonfinite=state.skipped_nonfinite,
            skipped_steps_fp16_overflow=state.skipped_scaler,
            resumed_from=str(self.resumed_from) if self.resumed_from else None,
            teacher_outputs=str(self.cached.path) if self.cached is not None else None,
            wall_seconds=time.perf_counter() - wall_start,
            train_seconds=state.train_seconds,
            samples_per_s=state.samples_seen / max(state.train_seconds, 1e-9),
            device=str(self.device),
            precision=self.precision,
            versions=_versions(),
            processes=dist.world_size if dist.enabled else None,
            distributed=plan.training.strategy if dist.enabled else None,
            gather_features=plan.training.gather_features if dist.enabled else None,
            sequence_kd=self.sequence_kd,
            on_policy=on_policy.summary(state.on_policy, plan.training.on_policy),
            **self._best_fields(final_scores),
        )

    def _best_fields(self, final_scores: dict[str, float] | None) -> dict[str, Any]:
        """summary.json's train.save_best keys (none without it, so other runs' summaries stay as they were)."""
        if self.best is None:
            return {}
        return {
            "best_metric": self.best.metric,
            "best_step": self.best.step,
            "best_score": self.best.score,
            "final_scores": final_scores,
            "stopped_early": self.best.stop,
        }


def _versions() -> dict[str, str]:
    import transformers

    return {
        "kdgeo": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _check_resumable(run_dir: Path, spec: RunSpec) -> Path:
    """A run can be resumed when it exists, has not finished, and its spec changes nothing that matters."""
    if not (run_dir / rundir.SPEC_JSON).exists():
        raise KdgeoError(
            f"nothing to resume: {run_dir} is not a kdgeo run directory (no {rundir.SPEC_JSON}). Run without "
            "--resume to start it."
        )
    if (run_dir / rundir.SUMMARY).exists():
        raise KdgeoError(
            f"{run_dir} has already finished (summary.json exists); there is nothing to resume. "
            + _train_further(run_dir)
        )
    marker = rundir.read_json(run_dir / rundir.RUN_MARKER) if (run_dir / rundir.RUN_MARKER).exists() else {}
    if marker.get("format_version") != rundir.FORMAT_VERSION:
        raise KdgeoError(
            f"{run_dir} was written by kdgeo {marker.get('kdgeo', 'of an unknown version')} (run format "
            f"{marker.get('format_version', 'unknown')}); this kdgeo ({__version__}) writes format "
            f"{rundir.FORMAT_VERSION} and cannot resume it. Start a new run."
        )
    saved = rundir.read_json(run_dir / rundir.SPEC_JSON)
    current = _recorded_lengths(spec, saved).model_dump(mode="json", exclude_none=True)
    diffs = resume_differences(saved, current)
    if diffs:
        lines = "; ".join(f"{k}: run has {a!r}, spec now has {b!r}" for k, a, b in diffs[:12])
        raise KdgeoError(
            f"cannot resume {run_dir}: the spec differs from the run's in fields that change the results ({lines}). "
            "Undo those changes (or pass the run directory itself as SPEC), or start a new run under another "
            "output.name."
            + (
                " " + _train_further(run_dir)
                if any(k in ("train.max_steps", "train.epochs") for k, _, _ in diffs)
                else ""
            )
        )
    return run_dir


def _train_further(run_dir: Path) -> str:
    """How to train a run for longer: a resume keeps the schedule it began with (its learning-rate decay ends at the
    run's last step), so more steps or epochs are a new run that starts from the saved student."""
    return (
        f'To train further, start a new run (another output.name) from its student: student.init = "pretrained" '
        f'and student.model = "{run_dir / rundir.STUDENT}" (a fresh optimizer and learning-rate schedule).'
    )


CACHE_FREE_DATA = ("eval_split", "eval_dataset", "max_eval_samples", "eval_fraction", "split_seed")
"""[data] keys the teacher-output cache key leaves out: the evaluation set's, and the eval_fraction split's (its
training rows are hashed, as teacher_examples, with every other run's)."""


def _recorded_lengths(spec: RunSpec, saved: dict[str, Any]) -> RunSpec:
    """A resumed run keeps the data.max_length its spec.json recorded when the spec leaves it unset: the default
    was clamped to the models' positions when the run began, and the run goes on with the value it trained with
    (marked as set, so a model that no longer holds it is an error, not a silent change)."""
    recorded = (saved.get("data") or {}).get("max_length") if isinstance(saved.get("data"), dict) else None
    if "max_length" in spec.data.model_fields_set or not isinstance(recorded, int) or isinstance(recorded, bool):
        return spec
    return spec.model_copy(update={"data": spec.data.model_copy(update={"max_length": recorded})})


def _write_run_files(run_dir: Path, spec: RunSpec, held_out: data_split.DataSplit | None = None) -> None:
    """A new run's directory: the format marker, the data.eval_fraction split (before spec.json: a run directory
    with a spec has its split) and the resolved spec (JSON and TOML)."""
    import tomli_w

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the run directory {run_dir}: {err.strerror or err}") from None
    if spec.output.overwrite:
        for name in (rundir.METRICS, rundir.SUMMARY, rundir.PREDICTIONS, trackers.TRACKER_IDS):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / rundir.STUDENT, ignore_errors=True)
        shutil.rmtree(run_dir / trackers.TENSORBOARD_DIR, ignore_errors=True)  # the old run's curves
        for _, old in checkpoint.list_checkpoints(run_dir):
            shutil.rmtree(old, ignore_errors=True)
    resolved = spec.model_dump(mode="json", exclude_none=True)
    rundir.write_json(run_dir / rundir.RUN_MARKER, {"format_version": rundir.FORMAT_VERSION, "kdgeo": __version__})
    if held_out is not None:
        data_split.write_split(run_dir, held_out)
    rundir.write_json(run_dir / rundir.SPEC_JSON, resolved)
    rundir.write_text_atomic(run_dir / rundir.SPEC_TOML, tomli_w.dumps(resolved))
