"""Pre-flight without training: ``kdgeo distill SPEC --dry-run``, and the check a sweep runs before its first run.

Everything that can fail before the first training step is checked here, for one run or every
variant x seed of a sweep: the device and precision, the output directories (written to with a
probe file, but no run directory is created), and :func:`kdgeo.plan.make_plan` (model configs and
tokenizers, data files, columns, labels and sizes, layer pairs, vocabulary agreement for KD) --
which reads no weights. The dry run also estimates what a run writes (checkpoints, the student,
the teacher-output cache) and compares it with the free space on each filesystem.

Why here and not in ``distillation.run_distill``: a sweep of 12 runs whose every run needs CUDA on a
machine without it should say so once, before anything runs, not twelve times after a table.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from kdgeo import checkpoint, distributed, events, rundir
from kdgeo.errors import KdgeoError, OutputError
from kdgeo.kinds import FEATURE_KINDS
from kdgeo.spec import RunSpec, SweepRun

Status = Literal["new", "overwrite", "resume", "restart", "finished"]
"""What the run directory means for this run: a new run, one replaced (output.overwrite), one
continued from its checkpoint (--resume, or an interrupted sweep run), a sweep run started again
(it died before its first checkpoint), or a finished sweep run that is skipped."""


@dataclass(frozen=True)
class RunCheck:
    """One run that passed pre-flight, with what the dry run prints about it."""

    name: str
    variant: str
    seed: int
    run_dir: str
    status: Status
    task: str = ""
    device: str = ""
    precision: str = ""
    steps: int = 0
    steps_per_epoch: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    data_split: dict[str, Any] | None = None
    """data.eval_fraction: {"rows", "eval_fraction", "split_seed", "eval_examples"} of the split the two counts
    above come from (after it, max_train_samples and max_eval_samples cap each part); None without it."""
    pairs: list[list[int]] | str = field(default_factory=list)
    """(student, teacher) hidden-state indices, or "probe" (chosen on the monitor batch after the build)."""
    losses: list[dict[str, Any]] = field(default_factory=list)
    rows: str = ""
    student_parameters: int | None = None
    checkpoint_bytes: int | None = None
    """One checkpoint: the student's weights and AdamW's two moments (x keep_checkpoints + 1 on disk at once)."""
    checkpoints_bytes: int | None = None
    student_bytes: int | None = None
    cache_bytes: int | None = None
    """The teacher-output cache entry (output.teacher_outputs), else None."""
    cache_dir: str | None = None
    sequence_kd_entry: str | None = None
    """train.sequence_kd: the path of the cache entry of the teacher's responses, else None."""
    sequence_kd_cached: bool | None = None
    """Whether that entry is there, complete (the run reads it instead of generating)."""
    sequence_kd_bytes: int | None = None
    """Its size on disk when cached, else the most it takes (every response at its token limit)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunProblem:
    variant: str
    seed: int
    message: str


@dataclass(frozen=True)
class DiskNeed:
    directory: str
    """The nearest existing directory of the filesystem the bytes go to."""
    needed: int
    free: int


@dataclass(frozen=True)
class DryRun:
    sweep: bool
    runs: list[RunCheck]
    disk: list[DiskNeed]

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": True,
            "sweep": self.sweep,
            "runs": [r.to_json() for r in self.runs],
            "disk": [asdict(d) for d in self.disk],
        }


class PreflightError(KdgeoError):
    """Pre-flight failed for one or more runs; nothing was started (exit 2)."""


def _existing_ancestor(path: Path) -> Path:
    """The nearest directory of ``path`` that exists (``path`` itself when it does)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | Path, setting: str, why: str) -> Path:
    """Like :func:`kdgeo.rundir.check_writable_dir`, but creates nothing that is missing: the nearest
    existing directory is probed (a directory kdgeo would create is writable when its parent is)."""
    where = Path(os.path.expanduser(str(path)))
    if where.exists() and not where.is_dir():
        raise OutputError(f"{setting} = '{where}' is a file, and {why}; set {setting} to a directory.")
    base = _existing_ancestor(where)
    if not base.is_dir():
        raise OutputError(f"{setting} = '{where}': {base} is a file, and {why}; set {setting} to a directory.")
    rundir.check_writable_dir(base, setting, why)
    return base


def device_of(spec: RunSpec, dist: distributed.Dist) -> torch.device:
    """The device the run would train on (under torchrun: this process's), without initialising anything."""
    if dist.enabled:
        return distributed._choose_device(dist, spec.train.device, "train.device")
    from kdgeo.runtime import resolve_device

    return resolve_device(spec.train.device, "train.device")


def run_status(spec: RunSpec, resume: bool, sweep: bool) -> tuple[Path, Status]:
    """Where the run goes and what its directory says it will do; the errors ``run_distill`` would raise first."""
    from kdgeo.distillation import _check_resumable

    name = spec.output.name or spec.name
    problem = rundir.path_component_problem(name)
    if problem:
        raise OutputError(f"output.name: {problem}.")
    run_dir = Path(spec.output.dir).expanduser() / name
    if sweep:  # as sweep.run_sweep decides
        if (run_dir / rundir.SUMMARY).exists():
            return run_dir, "finished"
        if run_dir.exists():
            return run_dir, "resume" if checkpoint.latest_checkpoint(run_dir) is not None else "restart"
        return run_dir, "new"
    if resume:
        _check_resumable(run_dir, spec)
        return run_dir, "resume"
    if run_dir.exists():
        if not spec.output.overwrite:
            raise OutputError(
                f"the run directory {run_dir} already exists; choose another output.name (--set output.name=...), "
                "or set output.overwrite = true to replace it."
            )
        if not (run_dir / rundir.SPEC_JSON).exists() and run_dir.is_dir() and any(run_dir.iterdir()):
            raise OutputError(
                f"{run_dir} exists and is not a kdgeo run directory (no {rundir.SPEC_JSON}); refusing to overwrite "
                "it. Choose another output.name."
            )
        return run_dir, "overwrite"
    return run_dir, "new"


def check_run(spec: RunSpec, resume: bool = False, sweep: bool = False, estimate: bool = True) -> RunCheck:
    """Every check of one run that needs no training (and no weights); raises the KdgeoError the run would.

    ``estimate``: also count the student's parameters (built on the meta device: no memory, no
    weights) and the bytes of checkpoints and caches, for the dry run's plan and disk check.
    """
    from kdgeo.distillation import _check_launch
    from kdgeo.plan import make_plan
    from kdgeo.runtime import precision_name

    run_dir, status = run_status(spec, resume, sweep)
    base = RunCheck(spec.name, spec.variant or spec.name, spec.seed, str(run_dir), status)
    if status == "finished":
        return base
    dist = distributed.from_environment()
    device = device_of(spec, dist)
    _check_launch(spec, device, dist)
    check_writable(spec.output.dir, "output.dir", "the run directory is created there")
    if spec.teacher.finetune is not None:
        check_writable(spec.output.teacher_cache, "output.teacher_cache", "the fine-tuned teacher is cached there")
    if spec.output.teacher_outputs or spec.train.sequence_kd:
        check_writable(
            spec.output.teacher_outputs_dir,
            "output.teacher_outputs_dir",
            "output.teacher_outputs = true writes the teacher's outputs there"
            if spec.output.teacher_outputs
            else "train.sequence_kd = true caches the teacher's responses there",
        )
    recorded = None
    if status == "resume":  # as run_distill does: the run's own data.max_length and data split
        from kdgeo import data_split
        from kdgeo.distillation import _recorded_lengths

        spec = _recorded_lengths(spec, rundir.read_json(run_dir / rundir.SPEC_JSON))
        recorded = data_split.read_split(run_dir)
    plan = make_plan(
        spec, dist.world_size, dist.enabled and spec.train.gather_features, events.ignore, data_split=recorded
    )
    held_out = plan.data_split
    check = RunCheck(
        name=plan.name,
        variant=plan.variant,
        seed=plan.seed,
        run_dir=str(run_dir),
        status=status,
        task=plan.task.name,
        device=str(device),
        precision=precision_name(plan.training.precision, device),
        steps=plan.steps.total,
        steps_per_epoch=plan.steps.steps_per_epoch,
        train_examples=len(plan.train),
        eval_examples=len(plan.evals),
        data_split=None
        if held_out is None
        else {
            "rows": held_out.rows,
            "eval_fraction": held_out.eval_fraction,
            "split_seed": held_out.split_seed,
            "eval_examples": len(held_out.eval_indices),
        },
        pairs="probe" if plan.probe_pairs else [list(p) for p in plan.pairs],
        losses=[{"kind": t.kind, "weight": t.weight} for t in plan.terms],
        rows=plan.rows,
    )
    if not estimate:
        return check
    params = student_parameters(plan)
    per_param = 8 if plan.training.precision == "fp64" else 4
    one = params * per_param * 3 if params is not None else None  # weights + AdamW's exp_avg and exp_avg_sq
    cache = cache_estimate(plan)
    return RunCheck(
        **{
            **asdict(check),
            "student_parameters": params,
            "checkpoint_bytes": one,
            # The newest checkpoint is written before the oldest is pruned: keep_checkpoints + 1 at once.
            "checkpoints_bytes": one * (plan.training.keep_checkpoints + 1) if one is not None else None,
            "student_bytes": params * per_param if params is not None and plan.output.save_student else None,
            "cache_bytes": cache,
            "cache_dir": plan.output.teacher_outputs_dir if cache is not None else None,
            **sequence_kd_estimate(plan, check.precision),
        }
    )


def sequence_kd_estimate(plan: Any, precision: str) -> dict[str, Any]:
    """train.sequence_kd: RunCheck's ``sequence_kd_*`` fields (the entry's path, whether it is cached, its
    size or the most it takes), from the key the run will compute (:func:`kdgeo.sequence_kd.entry_payload`);
    empty without train.sequence_kd. ``precision``: the run's, as :func:`kdgeo.runtime.precision_name` says it."""
    if not plan.training.sequence_kd:
        return {}
    from kdgeo import lm_data, output_cache, sequence_kd
    from kdgeo.teacher import finetune_key

    ft = finetune_key(plan, plan.finetune, plan.training.precision == "fp64") if plan.finetune is not None else None
    key = output_cache.cache_key(sequence_kd.entry_payload(plan, precision, ft))
    root = sequence_kd.cache_root(plan.output.teacher_outputs_dir)
    cached = sequence_kd.check_entry(root, key, len(plan.train))[0] == "ok"
    if cached:
        size = sum(f.stat().st_size for f in (root / key).iterdir() if f.is_file())
    else:
        prompts = lm_data.prompt_ids(plan.train.encodings["teacher"])
        size = sequence_kd.estimate_bytes(prompts, int(plan.data["max_length"]), plan.generation.max_new_tokens)
    return {"sequence_kd_entry": str(root / key), "sequence_kd_cached": cached, "sequence_kd_bytes": size}


def student_parameters(plan: Any) -> int | None:
    """The student's parameter count from its config alone: the model is built on the meta device (no
    memory, no weights read). None when the architecture cannot be built that way."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from kdgeo.models import quiet_transformers, student_config

    causal = plan.task.per_token_logits
    labels = len(plan.task.label_names) or None
    overrides = dict(plan.arch_overrides)
    if plan.copied_layers is not None:
        overrides = {"num_hidden_layers": len(plan.copied_layers)}
    base = plan.s_cfg if plan.student_ref is not None else plan.t_cfg
    try:
        config = student_config(copy.deepcopy(base), overrides, labels, causal)
        with quiet_transformers(), torch.device("meta"):
            model = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_config(config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # an estimate only: an architecture that needs real tensors to build leaves it unknown
        return None


class _ConfigOnly:
    """What ``Task.cached_logit_width`` reads of a teacher: its config."""

    def __init__(self, config: Any) -> None:
        self.config = config


def cache_estimate(plan: Any) -> int | None:
    """Bytes of the teacher-output cache entry this run builds (output.teacher_outputs), else None.

    With ``features.pairs = "probe"`` the teacher layers are not known yet: one per student layer, at
    the teacher's widest, is the estimate.
    """
    from kdgeo import output_cache
    from kdgeo.teacher_outputs import OutputPlan

    kinds = plan.loss_kinds
    need_logits, need_hidden = "kd" in kinds, bool(kinds & FEATURE_KINDS)
    if not plan.output.teacher_outputs or not (need_logits or need_hidden):
        return None
    if plan.probe_pairs:
        widest = max(range(1, plan.t_layers + 1), key=lambda t: plan.t_widths[t])
        layers = tuple([widest] * plan.s_layers)
    else:
        layers = tuple(t for _, t in plan.pairs)
    layout = OutputPlan(
        task=plan.task,
        rows=plan.rows,
        layers=layers if need_hidden else (),
        widths=tuple(plan.t_widths[t] for t in layers) if need_hidden else (),
        logit_width=plan.task.cached_logit_width(_ConfigOnly(plan.t_cfg)) if need_logits else None,
    )
    counts = layout.row_counts(plan.train)
    # Repeated probe layers share one field name: count each of them.
    total = output_cache.estimate_bytes(counts, layout.fields(), plan.output.teacher_outputs_dtype)
    if plan.probe_pairs and need_hidden and len(layers) > 1:
        one = output_cache.estimate_bytes(
            counts,
            {f: w for f, w in layout.fields().items() if f != "logits"},
            plan.output.teacher_outputs_dtype,
        )
        total += one * (len(layers) - 1)
    return total


def disk_needs(checks: list[RunCheck]) -> list[DiskNeed]:
    """Bytes each filesystem must take (checkpoints and students of every run to train, each distinct
    teacher-output cache once) next to its free space."""
    per_fs: dict[int, list[Any]] = {}
    seen_caches: set[tuple[str, int]] = set()
    seen_entries: set[str] = set()

    def add(where: str, n: int | None) -> None:
        if not n:
            return
        base = _existing_ancestor(Path(where))
        dev = base.stat().st_dev
        entry = per_fs.setdefault(dev, [str(base), 0])
        entry[1] += n

    for c in checks:
        if c.status == "finished":
            continue
        add(c.run_dir, (c.checkpoints_bytes or 0) + (c.student_bytes or 0))
        if c.cache_bytes and c.cache_dir is not None and (c.cache_dir, c.cache_bytes) not in seen_caches:
            seen_caches.add((c.cache_dir, c.cache_bytes))  # the runs of a sweep share one entry per teacher/data
            add(c.cache_dir, c.cache_bytes)
        if c.sequence_kd_entry and not c.sequence_kd_cached and c.sequence_kd_entry not in seen_entries:
            seen_entries.add(c.sequence_kd_entry)  # one entry serves every run with the same teacher and prompts
            add(c.sequence_kd_entry, c.sequence_kd_bytes)
    return [DiskNeed(where, needed, shutil.disk_usage(where).free) for where, needed in per_fs.values()]


def check_runs(
    runs: list[SweepRun], sweep: bool, resume: bool = False, estimate: bool = False, emit: events.Progress | None = None
) -> tuple[list[RunCheck], list[RunProblem]]:
    """:func:`check_run` for every run; the problems are collected, not raised, so all are reported at once."""
    checks: list[RunCheck] = []
    problems: list[RunProblem] = []
    for k, run in enumerate(runs, 1):
        if emit is not None and len(runs) > 1:
            emit(events.Stage(f"pre-flight [{k}/{len(runs)}] {run.variant} seed {run.seed}"))
        try:
            checks.append(check_run(run.spec, resume, sweep, estimate))
        except KdgeoError as err:
            problems.append(RunProblem(run.variant, run.seed, err.render()))
    return checks, problems


def problems_message(problems: list[RunProblem], total: int) -> str:
    """One paragraph per distinct problem, naming the runs it stops (a shared cause, e.g. no CUDA, is said once)."""
    by_message: dict[str, list[str]] = {}
    for p in problems:
        by_message.setdefault(p.message, []).append(f"{p.variant} seed {p.seed}")
    lines = [f"pre-flight failed for {len(problems)} of {total} run{'s' if total != 1 else ''}; nothing was started:"]
    for message, names in by_message.items():
        who = f"all {total} runs" if len(names) == total and total > 1 else ", ".join(names)
        lines.append(f"- {who}: {message}")
    return "\n".join(lines)


def dry_run(
    runs: list[SweepRun], sweep: bool, resume: bool = False, emit: Callable[[events.Event], None] | None = None
) -> DryRun:
    """``--dry-run``: every check of every run, the plan and the disk estimate; PreflightError (exit 2) on any
    problem. Creates nothing (a probe file in each output directory is made and removed)."""
    checks, problems = check_runs(runs, sweep, resume, estimate=True, emit=emit)
    if problems:
        if not sweep:
            raise PreflightError(problems[0].message)
        raise PreflightError(problems_message(problems, len(runs)))
    disk = disk_needs(checks)
    short = [d for d in disk if d.needed > d.free]
    if short:
        from kdgeo.output_cache import format_bytes

        raise PreflightError(
            "; ".join(
                f"{d.directory}: the runs need about {format_bytes(d.needed)} (checkpoints x (train.keep_checkpoints "
                f"+ 1), the student, the teacher-output cache) but {format_bytes(d.free)} is free"
                for d in short
            )
            + ". Free some space, lower train.keep_checkpoints, or set output.dir (or output.teacher_outputs_dir) "
            "to a larger disk."
        )
    return DryRun(sweep, checks, disk)
