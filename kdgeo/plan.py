"""The plan of a distillation run: the validated spec turned into flat values, every cheap check done.

:func:`make_plan` is the edge below which nothing takes the spec object. It reads model configs
and tokenizers (small files), loads and tokenizes the data with both tokenizers, resolves the
layer pairs and counts the steps, and fails with a message naming the setting and the fix for
anything that cannot work -- all before any weights are read or the teacher is fine-tuned for an
hour. What it returns, :class:`DistillPlan`, is what the build (``teacher.prepare``,
``models.build_student``) and the loop (``loop.train``) read.

The flow of a run: ``spec.py`` (the TOML schema) -> ``plan.make_plan`` -> ``teacher.prepare`` and
``models.build_student`` -> ``loop.train`` -> the run directory (``rundir``), with
:mod:`kdgeo.distillation` calling them in that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kdgeo import data as data_mod
from kdgeo import geometry
from kdgeo.distributed import Strategy
from kdgeo.errors import DataError, KdgeoError, LayerMapError
from kdgeo.events import Progress, Stage
from kdgeo.features import resolve_layer_pairs
from kdgeo.generation import GenerationArgs
from kdgeo.kinds import EQUAL_WIDTH_KINDS, FEATURE_KINDS, GEOMETRY_LOSSES, MIN_GEOMETRY_ROWS, Rows
from kdgeo.loop import epoch_batches
from kdgeo.losses import LossTerm
from kdgeo.models import (
    ModelRef,
    check_cls_rows,
    default_layer_choice,
    fit_length,
    hidden_width,
    hidden_widths,
    load_config,
    load_tokenizer,
    num_layers,
    student_config,
)
from kdgeo.spec import RunSpec
from kdgeo.tasks import TASKS, Preflight, Task
from kdgeo.teacher import FinetuneArgs

if TYPE_CHECKING:
    from kdgeo.data_split import DataSplit

LayerPairs = tuple[tuple[int, int], ...]
"""(student, teacher) hidden-state indices; 0 is the embeddings."""


@dataclass(frozen=True)
class TrainArgs:
    """``[train]`` as the optimizer, the schedule and the loop use it."""

    batch_size: int
    grad_accum: int
    lr: float
    projection_lr: float | None
    weight_decay: float
    warmup_ratio: float
    schedule: str
    max_grad_norm: float
    precision: str
    log_every: int
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    strategy: Strategy
    """"ddp" or "fsdp" (under torchrun)."""
    loader_workers: int | str
    gather_features: bool
    on_nonfinite: str
    save_best: str | None = None
    """The evaluation metric whose best student is kept (None: the final student is)."""
    early_stopping_patience: int | None = None
    """Evaluations in a row without a better ``save_best`` score that stop training (None: never)."""
    on_policy: float = 0.0
    """The share lambda of micro-batches trained on the student's own samples (:mod:`kdgeo.on_policy`)."""
    sequence_kd: bool = False
    """Train on the teacher's generated responses instead of the references (:mod:`kdgeo.sequence_kd`)."""


@dataclass(frozen=True)
class Steps:
    """How the training split becomes optimizer steps for this launch (``world`` processes)."""

    global_batch: int
    """batch_size x processes: examples per global micro-batch."""
    min_rows: int
    """The fewest rows a batch may give a geometry loss (3 for pooled rows with procrustes/gram/cka)."""
    gathered: bool
    """Feature rows are gathered from every process (train.gather_features under torchrun)."""
    steps_per_epoch: int
    total: int
    left_out: int
    """Training examples per epoch left out of the first epoch's batches (see ``loop.epoch_batches``)."""


@dataclass(frozen=True)
class OutputArgs:
    teacher_cache: str
    save_student: bool
    teacher_outputs: bool
    teacher_outputs_dir: str
    teacher_outputs_dtype: str


@dataclass(frozen=True)
class DistillPlan:
    """Everything a run needs to know before weights load, as flat values."""

    name: str
    variant: str
    task: Task
    seed: int
    teacher_ref: ModelRef
    student_ref: ModelRef | None
    """The student's own model (``student.init = "pretrained"``); None: it is built from the teacher."""
    student_init: str
    t_cfg: Any
    s_cfg: Any
    """The student's config: its own, or the teacher's (copied layers / fresh from the config)."""
    t_tok: Any
    s_tok: Any
    t_widths: tuple[int, ...]
    """Width of each teacher hidden-state index (embeddings first): they can differ by index (OPT)."""
    s_widths: tuple[int, ...]
    copied_layers: tuple[int, ...] | None
    """The 0-based teacher blocks a ``"teacher-layers"`` student keeps, else None."""
    arch_overrides: tuple[tuple[str, int], ...]
    train: data_mod.TextSplit
    evals: data_mod.TextSplit
    rows: Rows
    pairs: LayerPairs
    """Empty with ``features.pairs = "probe"``: the pairs are chosen on the monitor batch after the build."""
    probe_pairs: bool
    terms: tuple[LossTerm, ...]
    data: dict[str, Any]
    """``[data]`` as JSON values (cache keys and the summary record them)."""
    group_by_length: bool
    finetune: FinetuneArgs | None
    finetune_force: bool
    training: TrainArgs
    steps: Steps
    monitor_every: int
    monitor_samples: int
    monitor_metrics: tuple[str, ...]
    generation: GenerationArgs | None
    """Causal LM: how evaluations generate; None for classification."""
    generation_max_samples: int | None
    generate_every_eval: bool
    output: OutputArgs
    data_split: DataSplit | None = None
    """The data.eval_fraction split (written to the run directory as data_split.json); None without it."""
    swept: tuple[tuple[str, bool | int | float | str], ...] = ()
    """A grid sweep's run: its grid values as (key, value), in the grid's order (summary.json ``swept``)."""

    @property
    def t_layers(self) -> int:
        return len(self.t_widths) - 1

    @property
    def s_layers(self) -> int:
        return len(self.s_widths) - 1

    @property
    def loss_kinds(self) -> frozenset[str]:
        return frozenset(t.kind for t in self.terms)


def make_plan(
    spec: RunSpec, world: int, gathered: bool, emit: Progress, data_split: DataSplit | None = None
) -> DistillPlan:
    """Pre-flight: everything cheap that can fail does so here, in the order a user fixes it
    (models, data, layer pairs, batches). ``world``: processes under torchrun (1 without);
    ``gathered``: feature rows are gathered across them; ``data_split``: a resumed run's recorded
    data.eval_fraction split, reused instead of drawn.

    A data.max_length the user did not set is clamped to the models' positions (:func:`effective_spec`
    gives the spec with the value the run uses, which the run directory records)."""
    task_cls = TASKS[spec.task]
    teacher_ref = ModelRef(spec.teacher.model, spec.teacher.revision, spec.teacher.trust_remote_code)
    emit(Stage(f"pre-flight: teacher {spec.teacher.model}, data {spec.data.dataset}"))
    t_cfg = load_config(teacher_ref)
    task_cls.check_model(t_cfg, spec.teacher.model, "teacher.model")
    t_widths = hidden_widths(t_cfg)  # t_widths[i]: width of hidden_states[i]
    init = spec.student.init
    shared = None if init == "pretrained" else f'The student (student.init = "{init}") is built from the teacher and'
    t_tok = load_tokenizer(teacher_ref, shared_with=shared)
    s_widths, s_cfg, copied, s_ref = _student_plan(spec, t_cfg)
    s_tok = load_tokenizer(s_ref) if s_ref is not None else t_tok
    if s_ref is not None:
        task_cls.check_model(s_cfg, spec.student.model or "", "student.model")
    max_length = _check_model_limits(spec, t_cfg, s_cfg if s_ref is not None else None, emit)
    spec = with_max_length(spec, max_length)
    terms = tuple(LossTerm.from_spec(loss) for loss in spec.losses)
    kinds = frozenset(t.kind for t in terms)
    loaded = task_cls.load(
        Preflight(
            data=spec.data,
            t_tok=t_tok,
            s_tok=s_tok,
            t_cfg=t_cfg,
            s_cfg=s_cfg if s_ref is not None else None,
            teacher=spec.teacher.model,
            student=spec.student.model or "",
            loss_kinds=kinds,
            rows=spec.features.rows,
            max_new_tokens=spec.generate.max_new_tokens,
            emit=emit,
            data_split=data_split,
        )
    )
    train, evals = loaded.train, loaded.evals
    if spec.features.rows != "tokens" and len(evals) < MIN_GEOMETRY_ROWS:
        # The spec checks monitor.samples; a smaller evaluation split caps the monitor batch below it.
        raise DataError(
            f"the evaluation split has {len(evals)} example(s): with features.rows = "
            f'"{spec.features.rows}" the monitor batch gets one row per example and its geometry needs at least '
            f"{MIN_GEOMETRY_ROWS}; use a larger evaluation split (data.eval_split, data.eval_dataset, "
            "data.max_eval_samples)."
        )
    probe_pairs = spec.features.pairs == "probe"
    s_layers, t_layers = len(s_widths) - 1, len(t_widths) - 1
    pairs = () if probe_pairs else tuple(resolve_layer_pairs(spec.features.pairs, s_layers, t_layers))
    if kinds & EQUAL_WIDTH_KINDS:
        # With probe pairs every (student, teacher) index pair is a candidate until the probe picks.
        candidates = [(s, t) for s in range(1, s_layers + 1) for t in range(1, t_layers + 1)] if probe_pairs else pairs
        check_equal_widths(kinds, candidates, s_widths, t_widths, probe_pairs)
    steps = _count_steps(spec, len(train), kinds, world, gathered, emit)
    _check_best(spec, steps, loaded.task)
    return DistillPlan(
        name=spec.name,
        variant=spec.variant or spec.name,
        task=loaded.task,
        seed=spec.seed,
        teacher_ref=teacher_ref,
        student_ref=s_ref,
        student_init=init,
        t_cfg=t_cfg,
        s_cfg=s_cfg,
        t_tok=t_tok,
        s_tok=s_tok,
        t_widths=tuple(t_widths),
        s_widths=tuple(s_widths),
        copied_layers=copied,
        arch_overrides=tuple(_arch_overrides(spec).items()),
        train=train,
        evals=evals,
        rows=spec.features.rows,
        pairs=pairs,
        probe_pairs=probe_pairs,
        terms=terms,
        data=spec.data.model_dump(mode="json"),
        group_by_length=spec.data.group_by_length,
        finetune=_finetune_args(spec),
        finetune_force=bool(spec.teacher.finetune and spec.teacher.finetune.force),
        training=_train_args(spec),
        steps=steps,
        monitor_every=spec.monitor.every,
        monitor_samples=spec.monitor.samples,
        monitor_metrics=tuple(spec.monitor.metrics),
        generation=_generation_args(spec),
        generation_max_samples=spec.generate.max_samples,
        generate_every_eval=spec.generate.every_eval,
        output=OutputArgs(
            spec.output.teacher_cache,
            spec.output.save_student,
            spec.output.teacher_outputs,
            spec.output.teacher_outputs_dir,
            spec.output.teacher_outputs_dtype,
        ),
        swept=tuple((spec.swept or {}).items()),
        data_split=loaded.data_split,
    )


def _arch_overrides(spec: RunSpec) -> dict[str, int]:
    return {k: v for k, v in (spec.student.arch.model_dump() if spec.student.arch else {}).items() if v is not None}


def _finetune_args(spec: RunSpec) -> FinetuneArgs | None:
    ft = spec.teacher.finetune
    if ft is None:
        return None
    return FinetuneArgs(ft.epochs, ft.lr, ft.batch_size, ft.weight_decay, ft.warmup_ratio, ft.max_grad_norm, ft.seed)


def _generation_args(spec: RunSpec) -> GenerationArgs | None:
    if not TASKS[spec.task].per_token_logits:
        return None
    g = spec.generate
    return GenerationArgs(g.max_new_tokens, g.batch_size, g.do_sample, g.temperature, g.top_p, spec.seed)


def _train_args(spec: RunSpec) -> TrainArgs:
    t = spec.train
    return TrainArgs(
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        lr=t.lr,
        projection_lr=t.projection_lr,
        weight_decay=t.weight_decay,
        warmup_ratio=t.warmup_ratio,
        schedule=t.schedule,
        max_grad_norm=t.max_grad_norm,
        precision=t.precision,
        log_every=t.log_every,
        eval_every=t.eval_every,
        checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints,
        strategy=t.distributed,
        loader_workers=t.loader_workers,
        gather_features=t.gather_features,
        on_nonfinite=t.on_nonfinite,
        save_best=t.save_best,
        early_stopping_patience=t.early_stopping_patience,
        sequence_kd=t.sequence_kd,
        on_policy=t.on_policy,
    )


def _check_best(spec: RunSpec, steps: Steps, task: Task) -> None:
    """What the spec could not know: whether the labels give ``f1`` and whether any evaluation comes before the
    final one (``eval_every = 0`` evaluates at each epoch's end, and an epoch's length needs the data)."""
    t = spec.train
    if t.save_best == "f1" and len(task.label_names) != 2:
        raise KdgeoError(
            f'train.save_best = "f1" is the positive class\'s F1 of a two-label task, and this data has '
            f"{len(task.label_names)} labels; choose accuracy, macro_f1, mcc or teacher_agreement."
        )
    if t.early_stopping_patience is None:
        return
    every = t.eval_every or steps.steps_per_epoch
    if (steps.total - 1) // every == 0:
        cadence = f"train.eval_every = {t.eval_every}" if t.eval_every else f"an epoch ({steps.steps_per_epoch} steps)"
        raise KdgeoError(
            f"train.early_stopping_patience = {t.early_stopping_patience}: the run has {steps.total} steps and "
            f"{cadence} is not shorter, so the only evaluation is the final one and nothing can stop early. Set "
            "train.eval_every below the step count, or train for more steps or epochs."
        )


def _student_plan(spec: RunSpec, t_cfg: Any) -> tuple[list[int], Any, tuple[int, ...] | None, ModelRef | None]:
    """What the student will be, known before any weights load: (the width of each hidden-state
    index, its config, the teacher layers it copies or None, its own reference for
    init = "pretrained" or None, in which case it shares the teacher's tokenizer)."""
    t_layers = num_layers(t_cfg)
    s = spec.student
    if s.init == "pretrained":
        s_ref = ModelRef(s.model or "", s.revision, s.trust_remote_code)
        s_cfg = load_config(s_ref)
        return hidden_widths(s_cfg), s_cfg, None, s_ref
    if s.init == "teacher-layers":
        if s.layers is not None:
            bad = [i for i in s.layers if i >= t_layers]
            if bad:
                raise LayerMapError(
                    f"student.layers = {s.layers} names teacher layer(s) {bad}, but the teacher has {t_layers} layers "
                    f"(0-based indices 0..{t_layers - 1}); pick indices in that range."
                )
            chosen = list(s.layers)
        else:
            chosen = default_layer_choice(t_layers, s.num_layers or 2)
        return hidden_widths(t_cfg, layers=len(chosen)), t_cfg, tuple(chosen), None
    overrides = _arch_overrides(spec)
    width = overrides.get("hidden_size", hidden_width(t_cfg))
    heads = overrides.get("num_attention_heads", getattr(t_cfg, "num_attention_heads", 1))
    if width % heads:
        raise KdgeoError(
            f"student.arch: hidden_size {width} is not divisible by num_attention_heads {heads} (taken from "
            f"{'the teacher' if 'num_attention_heads' not in overrides else 'student.arch'}); set "
            "student.arch.num_attention_heads to a divisor."
        )
    # An OPT student keeps the teacher's projected last entry unless student.arch sets hidden_size.
    return hidden_widths(student_config(t_cfg, overrides)), t_cfg, None, None


def _check_model_limits(spec: RunSpec, t_cfg: Any, s_cfg: Any | None, emit: Progress) -> int:
    """Settings a model's config rules out: CLS rows of a decoder, sequences longer than its positions.

    Returns the data.max_length to use: the spec's, or, when the user left it at its default, the default
    clamped to the models' positions (a note says so). ``s_cfg`` is None for a student built from the
    teacher, which keeps the teacher's position embeddings."""
    if spec.features.rows == "cls":  # a causal-lm spec already refuses it; a decoder classifier reaches here
        hint = 'Use features.rows = "mean" (the mean over tokens) or "tokens".'
        check_cls_rows(t_cfg, spec.teacher.model, "teacher.model", 'features.rows = "cls"', hint)
        if s_cfg is not None:
            check_cls_rows(s_cfg, spec.student.model or "", "student.model", 'features.rows = "cls"', hint)
    models = [(t_cfg, f"the teacher {spec.teacher.model}", "teacher")]
    if s_cfg is not None:
        models.append((s_cfg, f"the student {spec.student.model}", "student"))
    # model_fields_set: the TOML, a preset and --set all put the key in the table that is validated (a sweep's
    # runs keep it out unless it was given); a resumed run's recorded value counts as set.
    user_set = "max_length" in spec.data.model_fields_set
    max_length, note = fit_length(spec.data.max_length, user_set, models, "data.max_length")
    if note is not None:
        emit(Stage(note))
    prompt = spec.data.max_prompt_length
    if spec.task == "causal-lm" and prompt is not None and prompt >= max_length:
        raise KdgeoError(
            f"data.max_prompt_length = {prompt} leaves no room for the response in data.max_length = {max_length} "
            "(the default clamped to the models' positions); make data.max_prompt_length smaller."
        )
    return max_length


def with_max_length(spec: RunSpec, max_length: int) -> RunSpec:
    """``spec`` with data.max_length = ``max_length`` (marked as set: a resumed run then checks, not clamps, it)."""
    if max_length == spec.data.max_length:
        return spec
    return spec.model_copy(update={"data": spec.data.model_copy(update={"max_length": max_length})})


def effective_spec(spec: RunSpec, plan: DistillPlan) -> RunSpec:
    """The spec as the run uses it, what spec.json records: data.max_length as the plan settled it (a default
    longer than the models' positions is clamped), so --resume and `kdgeo eval RUN` read the value trained with."""
    return with_max_length(spec, int(plan.data["max_length"]))


def check_equal_widths(
    kinds: frozenset[str] | set[str],
    pairs: Any,
    s_widths: Any,
    t_widths: Any,
    probe: bool,
) -> None:
    """mse and cosine compare features element by element: each paired student and teacher
    hidden-state index must be equally wide. Widths are per index (an OPT model with
    word_embed_proj_dim != hidden_size has a narrower last entry). With ``probe`` the pairs are the
    candidates: refuse only a student index that no teacher index matches in width."""
    names = ", ".join(sorted(kinds & EQUAL_WIDTH_KINDS))
    fix = "Use procrustes, gram, cka or projection, which work across widths"
    if probe:
        lonely = sorted({s for s, _ in pairs} - {s for s, t in pairs if s_widths[s] == t_widths[t]})
        if lonely:
            raise LayerMapError(
                f"losses: {names} compare features element by element and need equal widths, but student layer(s) "
                f"{', '.join(f'{s} ({s_widths[s]} wide)' for s in lonely)} match no teacher layer's width "
                f"(teacher widths by hidden-state index: {list(t_widths)}). {fix}."
            )
        return
    bad = [(s, t) for s, t in pairs if s_widths[s] != t_widths[t]]
    if bad:
        if len(set(s_widths)) == 1 and len(set(t_widths)) == 1:
            found = f"the student is {s_widths[0]} wide and the teacher {t_widths[0]}"
        else:
            listed = ", ".join(f"{s}->{t} ({s_widths[s]} vs {t_widths[t]} wide)" for s, t in bad)
            found = f"layer pair(s) {listed} differ"
        raise LayerMapError(
            f"losses: {names} compare features element by element and need equal widths, but {found}. {fix}, "
            "or pair layers of equal width in features.pairs."
        )


def _count_steps(
    spec: RunSpec, n_train: int, kinds: frozenset[str], world: int, gathered: bool, emit: Progress
) -> Steps:
    """Batches per epoch and optimizer steps; refuses data too small to give any batch."""
    t = spec.train
    global_batch = t.batch_size * world  # batch_size is per process
    # Pooled rows are one per example: a geometry loss on a short last batch (1 or 2 rows) would be
    # a constant (n = 1) or zero (n = 2), so such a batch is left out of the epoch.
    pooled_geometry = spec.features.rows != "tokens" and bool(kinds & GEOMETRY_LOSSES)
    min_rows = MIN_GEOMETRY_ROWS if pooled_geometry else 1
    first = epoch_batches(n_train, global_batch, world, spec.seed, 0, None, min_rows, gathered)
    if not first:
        if pooled_geometry:
            geometry_kinds = ", ".join(sorted(kinds & GEOMETRY_LOSSES))
            raise DataError(
                f"{n_train} training examples give fewer than {MIN_GEOMETRY_ROWS} pooled feature rows per batch "
                f'and process (features.rows = "{spec.features.rows}" with {geometry_kinds}); use more data '
                '(data.max_train_samples), fewer processes, or features.rows = "tokens".'
            )
        raise DataError(
            f"{n_train} training examples cannot be shared by {world} processes (each needs at least one per batch); "
            "use more data (data.max_train_samples) or fewer processes."
        )
    left_out = n_train - sum(len(b) for b in first)
    if pooled_geometry and left_out:
        emit(
            Stage(
                f"{left_out} training example(s) per epoch left out: the last batch would give a geometry loss fewer "
                f"than {MIN_GEOMETRY_ROWS} pooled rows (the reshuffled epochs still use them)"
            )
        )
    steps_per_epoch = math.ceil(len(first) / t.grad_accum)
    total = t.max_steps or max(1, int(round(t.epochs * steps_per_epoch)))
    return Steps(global_batch, min_rows, gathered, steps_per_epoch, total, left_out)


def chance_procrustes(n: int, d_t: int, d_s: int) -> float:
    """Procrustes D^2 of independent Gaussian features of shape (n, d_t) and (n, d_s), one draw.

    Unrelated features sit at D^2 ~ 2 only when n is far above both widths; with few rows they
    look aligned by chance (n = 32, widths 768 and 384: D^2 ~ 0.03). A private generator keeps
    the run's own random stream untouched.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_t, generator=gen, dtype=torch.float64)  # (n, d_t)
    y = torch.randn(n, d_s, generator=gen, dtype=torch.float64)  # (n, d_s)
    return float(geometry.procrustes_distance(x, y))


def few_rows_warning(plan: DistillPlan, pairs: LayerPairs, world: int) -> str | None:
    """A warning when a geometry loss sees fewer rows per micro-batch than its widest pair is wide.

    Rows per term: the per-process micro-batch for pooled rows (all processes' with
    train.gather_features), or its expected number of real (response) tokens for token rows.
    """
    if not (plan.loss_kinds & FEATURE_KINDS & GEOMETRY_LOSSES) or not pairs:
        return None
    tr = plan.training
    batch = tr.batch_size * (world if tr.gather_features else 1)
    if plan.rows == "tokens":
        rows = plan.task.token_rows(plan.train.encodings["student"])
        per_example = sum(rows) / max(len(rows), 1)
        n, how = (
            int(batch * per_example),
            f"about {int(batch * per_example)} token rows ({batch} examples x {per_example:.1f} tokens)",
        )
    else:
        n, how = batch, f"{batch} pooled rows (one per example)"
    t_widths, s_widths = plan.t_widths, plan.s_widths
    widest = max(pairs, key=lambda p: max(t_widths[p[1]], s_widths[p[0]]))
    d_t, d_s = t_widths[widest[1]], s_widths[widest[0]]
    if n >= max(d_t, d_s) or n < 3:
        return None
    chance = chance_procrustes(n, d_t, d_s)
    return (
        f"each geometry loss term sees {how} per micro-batch, fewer than the widths it compares ({d_t} and {d_s} for "
        f"pair {widest[0]}-{widest[1]}). With so few rows Procrustes, Gram and CKA values are biased toward "
        f"alignment: independent random features of these shapes already give D^2 = {chance:.3f} (unrelated = 2). "
        "Raise train.batch_size"
        + ('; use features.rows = "tokens"' if plan.rows != "tokens" else "")
        + ("; or set train.gather_features = true" if world > 1 and not tr.gather_features else "")
        + "."
    )
