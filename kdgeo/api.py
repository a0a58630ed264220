"""The Python API: ``kdgeo.distillation``, ``kdgeo.probing``, ``kdgeo.comparison`` and ``kdgeo.load_spec``.

Each call is the same engine call as its CLI command, without the command line around it:

- :func:`distill` -> :func:`kdgeo.distillation.run_distill` (a spec with ``[sweep]``: :func:`kdgeo.sweep.run_sweep`),
  the plan -> build -> loop -> run directory flow; returns a :class:`RunResult` (or :class:`SweepResult`).
- :func:`probe` -> :func:`kdgeo.probing.run_probe`; returns a :class:`ProbeResult`.
- :func:`compare` -> :func:`kdgeo.comparison.compare`; returns a :class:`Comparison`.
- :func:`load_spec` -> :func:`kdgeo.spec.load_spec` / :func:`kdgeo.spec.spec_from_dict`; returns a RunSpec.

Every result has ``to_dict()``: the content the CLI's ``--json`` writes (a run: its summary.json, which is
the ``summary`` of the ``done`` event; probe and compare: their ``--json`` objects), so code that read
the JSON reads the same keys here.

Contract (why it differs from the CLI): nothing here calls ``sys.exit`` or prints unless asked; bad
input raises a :class:`kdgeo.errors.KdgeoError` subclass (the CLI's exit-2 family, one paragraph naming
the problem and the fix); progress goes to a callback of :class:`kdgeo.events.Event` or, with
``progress="rich"``, to the CLI's own live view on stderr. No torch at import: the engine modules load
on the first call.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from kdgeo.errors import KdgeoError, RunInterrupted, SpecError
from kdgeo.events import Event
from kdgeo.kinds import DEFAULT_PROBE_METRICS

if TYPE_CHECKING:  # the engine modules import torch; only their types are needed here
    from kdgeo.comparison import CompareResult, MetricComparison
    from kdgeo.probing import ProbeResult as EngineProbeResult
    from kdgeo.spec import RunSpec

ProgressArg = Union[Callable[[Event], None], Literal["rich"], None]
"""Where progress goes: a function called with each :class:`kdgeo.events.Event`, ``"rich"`` for the
CLI's live view (Rich on a terminal, plain lines otherwise; on stderr), or None for nothing."""

SpecArg = Union[str, "os.PathLike[str]", Mapping[str, Any], "RunSpec"]
"""A run spec: a TOML file, a run directory (its resolved spec.toml), a dict of the TOML's tables, or a RunSpec."""

OverridesArg = Union[Sequence[str], Mapping[str, Any], None]
"""``["train.lr=3e-5", ...]`` exactly as the CLI's ``--set`` (values are TOML), or ``{"train.lr": 3e-5, ...}``
(dotted keys, Python values; a dict value sets each key inside it; list items by index: ``losses.1.weight``)."""


# ---- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """One finished distillation run.

    ``summary`` is summary.json as written (the ``done`` event's ``summary`` in ``kdgeo distill --json``);
    the properties are typed views of it.
    """

    run_dir: Path
    summary: dict[str, Any]

    @property
    def scores(self) -> dict[str, float]:
        """The student's final evaluation (accuracy, macro_f1, ...; causal LMs: rougeL, perplexity, ...)."""
        return dict(self.summary.get("scores") or {})

    @property
    def teacher_scores(self) -> dict[str, float]:
        return dict(self.summary.get("teacher_scores") or {})

    @property
    def student_dir(self) -> Path | None:
        """The saved student (``from_pretrained`` loads it), or None with ``output.save_student = false``."""
        path = self.summary.get("student_dir")
        return Path(path) if path else None

    @property
    def geometry(self) -> list[dict[str, Any]]:
        """Final geometry per layer pair: ``{"student", "teacher", "procrustes", "cka", ...}``."""
        return list(self.summary.get("geometry") or [])

    @property
    def steps(self) -> int:
        return int(self.summary.get("steps") or 0)

    def to_dict(self) -> dict[str, Any]:
        """summary.json's content (a copy)."""
        return copy.deepcopy(self.summary)


@dataclass(frozen=True)
class SweepRunResult:
    """One variant x seed of a sweep: ``status`` is "done", "skipped" (finished earlier) or "failed"."""

    variant: str
    seed: int
    status: str
    run_dir: Path
    error: str | None = None
    summary: dict[str, Any] | None = None

    @property
    def result(self) -> RunResult | None:
        """The run as a :class:`RunResult`, or None when it failed."""
        return RunResult(self.run_dir, self.summary) if self.summary is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "seed": self.seed,
            "status": self.status,
            "run_dir": str(self.run_dir),
            "error": self.error,
            "summary": copy.deepcopy(self.summary),
        }


@dataclass(frozen=True)
class SweepResult:
    """Every run of a sweep, in order. A failed run does not raise (the sweep goes on, as the CLI's does, which
    then exits 1): check :attr:`failed`."""

    runs: list[SweepRunResult]

    @property
    def failed(self) -> list[SweepRunResult]:
        return [r for r in self.runs if r.status == "failed"]

    @property
    def run_dirs(self) -> list[Path]:
        return [r.run_dir for r in self.runs]

    def to_dict(self) -> dict[str, Any]:
        return {"runs": [r.to_dict() for r in self.runs]}


@dataclass(frozen=True)
class ProbeResult:
    """Layer-by-layer similarity of two models (:func:`probe`). ``raw`` is the engine's result."""

    raw: EngineProbeResult

    @property
    def tables(self) -> dict[str, list[list[float]]]:
        """metric -> values indexed ``[teacher][student]`` by hidden-state index (0 = embeddings)."""
        return self.raw.tables

    @property
    def suggested_map(self) -> list[tuple[int, int]]:
        """(student, teacher) pairs: the monotone map maximising similarity on :attr:`map_metric`; paste it into
        ``features.pairs`` or pass it as ``pairs`` to :class:`kdgeo.FeatureDistillationLoss`."""
        return [(int(s), int(t)) for s, t in self.raw.suggested_map]

    @property
    def map_metric(self) -> str:
        return self.raw.map_metric

    @property
    def rows(self) -> str:
        return self.raw.rows

    @property
    def samples(self) -> int:
        return self.raw.samples

    @property
    def feature_rows(self) -> int:
        return self.raw.feature_rows

    @property
    def teacher_layers(self) -> int:
        return self.raw.teacher_layers

    @property
    def student_layers(self) -> int:
        return self.raw.student_layers

    @property
    def warnings(self) -> list[str]:
        """What ``kdgeo probe`` prints as warnings, e.g. too few feature rows for the widths."""
        return list(self.raw.warnings)

    def to_dict(self) -> dict[str, Any]:
        """What ``kdgeo probe --json`` writes."""
        return self.raw.to_json()

    def plot(self, path: str | os.PathLike[str]) -> None:
        """One heatmap per metric to a PNG file (``kdgeo probe --plot``)."""
        from kdgeo.probing import plot_tables

        plot_tables(self.raw, str(path))


@dataclass(frozen=True)
class Comparison:
    """Runs side by side (:func:`compare`). ``raw`` is the engine's :class:`kdgeo.comparison.CompareResult`;
    :mod:`kdgeo.report_compare` writes it as CSV, Markdown or a plot."""

    raw: CompareResult

    @property
    def baseline(self) -> str:
        return self.raw.baseline

    @property
    def variants(self) -> list[str]:
        return list(self.raw.variants)

    @property
    def metrics(self) -> list[MetricComparison]:
        """Per metric: every variant's statistics and its test against the baseline."""
        return list(self.raw.metrics)

    @property
    def significantly_worse(self) -> list[tuple[str, str]]:
        """(metric, variant) of every variant significantly worse than the baseline (after Holm)."""
        return [(c.metric, v.variant) for c in self.raw.metrics for v in c.versus if v.verdict == "worse"]

    @property
    def notes(self) -> list[str]:
        return list(self.raw.notes)

    @property
    def warnings(self) -> list[str]:
        return list(self.raw.warnings)

    @property
    def exit_code(self) -> int:
        """What ``kdgeo compare`` would exit with (1: ``fail_if_worse`` and a variant is worse; else 0)."""
        return self.raw.exit_code

    def to_dict(self) -> dict[str, Any]:
        """What ``kdgeo compare --json`` writes."""
        from kdgeo import report_compare

        return report_compare.to_json(self.raw)

    def print(self) -> None:
        """The CLI's tables, on stdout (warnings on stderr)."""
        from kdgeo import report_compare

        report_compare.print_compare(self.raw)


# ---- load_spec ---------------------------------------------------------------------------------


def load_spec(spec: SpecArg, overrides: OverridesArg = None, *, preset: str | None = None) -> RunSpec:
    """The validated RunSpec from a TOML file, a run directory, a dict of the TOML's tables, or a RunSpec.

    ``overrides`` are the CLI's ``--set``: a list of ``"dotted.key=TOML value"`` strings, or a mapping of dotted
    keys to Python values (``{"train.lr": 3e-5, "losses.2.weight": 0.3}``). ``preset`` merges the spec's
    ``[presets.NAME]`` over its top level (``--preset``). As in ``kdgeo distill``, ``"examples.toml"`` where no
    such file is and a bare shipped name (``"demo"``, ``"glue-cola"``) mean the specs shipped with kdgeo. A run
    directory (one holding spec.toml) gives that run's resolved spec, pointed at the directory where it is now,
    as ``kdgeo distill RUN_DIR --resume`` reads it.

    Raises :class:`kdgeo.errors.SpecError` listing every problem at once (dotted paths, what was found, what to do).
    """
    from kdgeo import spec as spec_mod

    items = _override_items(overrides)
    if isinstance(spec, spec_mod.RunSpec):
        if not items and preset is None:
            return spec
        return spec_mod.spec_from_dict(
            spec.model_dump(mode="json", exclude_none=True), "<RunSpec>", overrides=items, preset=preset
        )
    if isinstance(spec, Mapping):
        return spec_mod.spec_from_dict(dict(spec), "<dict>", overrides=items, preset=preset)
    if isinstance(spec, (str, os.PathLike)):
        from kdgeo import shipped

        # As `kdgeo distill` reads SPEC: `examples.toml` outside a checkout, a shipped name ("demo", "glue-cola"),
        # or a run directory (its own resolved spec, and the run lives where the directory is now).
        choice = shipped.resolve_spec_argument(Path(os.fspath(spec)), preset)
        return spec_mod.load_spec(choice.path, overrides=[*choice.overrides, *items], preset=choice.preset)
    raise SpecError(
        "<spec>",
        [
            (
                "",
                f"a {type(spec).__name__} is not a run spec; pass a TOML file path, a run directory, a dict or a "
                "RunSpec",
            )
        ],
    )


def _override_items(overrides: OverridesArg) -> list[str]:
    """``--set`` strings from either form of ``overrides``."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]  # one "key=value" string: a list of its characters would be a confusing error
    if isinstance(overrides, Mapping):
        items: list[str] = []
        for key, value in overrides.items():
            items += _flatten_override(str(key), value)
        return items
    if isinstance(overrides, Iterable):
        bad = [o for o in overrides if not isinstance(o, str)]
        if bad:
            raise SpecError(
                "overrides",
                [("", f"{bad[0]!r} is not a 'dotted.key=value' string; pass strings or a dict {{'train.lr': 3e-5}}")],
            )
        return list(overrides)
    raise SpecError("overrides", [("", f"a {type(overrides).__name__}: pass a list of 'key=value' strings or a dict")])


def _flatten_override(key: str, value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [item for k, v in value.items() for item in _flatten_override(f"{key}.{k}", v)]
    return [f"{key}={_toml_value(value, key)}"]


def _toml_value(value: Any, key: str = "") -> str:
    """A Python value as TOML text, so that a dict override takes the same path as a ``--set`` string."""
    if value is None:
        raise SpecError("overrides", [(key, "is None; TOML has no null: leave the key out to keep its default")])
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, tuple):
        value = list(value)
    import tomli_w

    try:
        text = tomli_w.dumps({"v": value})
    except TypeError as err:
        raise SpecError("overrides", [(key, f"{value!r} cannot be written as TOML: {err}")]) from None
    return text.partition("=")[2].strip()


# ---- distill -----------------------------------------------------------------------------------


def distill(
    spec: SpecArg,
    *,
    overrides: OverridesArg = None,
    preset: str | None = None,
    resume: bool = False,
    progress: ProgressArg = None,
) -> RunResult | SweepResult:
    """Train a student as ``spec`` describes (``kdgeo distill SPEC``); return the finished run.

    ``spec``, ``overrides`` and ``preset`` as in :func:`load_spec`. ``resume=True`` continues the run
    directory's newest checkpoint (``--resume``; ``spec`` may be the run directory). A spec with a ``[sweep]``
    table runs every variant x seed (pre-flighted first; finished runs are skipped and an interrupted one
    resumes, so calling again continues a sweep) and returns a :class:`SweepResult`; otherwise a :class:`RunResult`.

    Errors: bad input raises a :class:`kdgeo.errors.KdgeoError` subclass before anything is trained where it can
    be found early (spec, models, data, layer pairs, device, output directory).

    Signals: while it runs, SIGINT (Ctrl-C) and SIGTERM are caught in the main thread and stop the run at its
    next safe point, keeping a checkpoint; :class:`kdgeo.errors.RunInterrupted` is raised (``exit_code`` 130 or
    143, ``run_dir``, ``step``) with a hint naming the call that continues. A second Ctrl-C stops at once
    (RunInterrupted too). The previous handlers are restored on return. Called from another thread, signals
    are not caught and the run cannot be stopped this way.
    """
    from kdgeo.spec import expand_sweep

    run_spec = load_spec(spec, overrides, preset=preset)
    source = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else f"<{type(spec).__name__}>"
    runs = expand_sweep(run_spec, source)  # validates every variant before anything runs
    # The engine modules are looked up at call time (tests and users may replace run_distill / run_sweep).
    import kdgeo.distillation as distill_mod  # `import a.b as c`: the module, whatever kdgeo.distillation is typed as
    import kdgeo.sweep as sweep_mod
    from kdgeo import distributed

    emit, close = _progress(progress, "distill")
    try:
        if run_spec.sweep is None:
            done = distill_mod.run_distill(run_spec, progress=emit, resume=resume)
            return RunResult(Path(done.run_dir), done.summary)
        outcomes = sweep_mod.run_sweep(runs, progress=emit)
        return SweepResult(
            [SweepRunResult(o.variant, o.seed, o.status, Path(o.run_dir), o.error, o.summary) for o in outcomes]
        )
    except RunInterrupted as err:
        _hint_continue(err, sweep=run_spec.sweep is not None)
        raise
    finally:
        close()
        distributed.teardown(distributed.from_environment())


def _hint_continue(err: RunInterrupted, sweep: bool) -> None:
    """The CLI names the command that continues; here, the call."""
    if sweep:
        err.hint = (
            "Continue with: the same kdgeo.distill(...) call (finished runs are skipped, an interrupted run resumes "
            "from its checkpoint)."
        )
    elif err.next_step == "resume" and err.run_dir:
        err.hint = f"Resume with: kdgeo.distill({err.run_dir!r}, resume=True)"
    elif err.next_step == "rerun":
        err.hint = "Continue with: the same kdgeo.distill(...) call (nothing of the run was written yet)."
    err.args = (err.render(),)  # str(err) is fixed at construction: keep it whole


def _progress(progress: ProgressArg, command: Literal["distill", "probe"]) -> tuple[Any, Callable[[], None]]:
    """The callback to hand the engine, and what closes it."""
    if progress is None:
        return None, lambda: None
    if isinstance(progress, str):
        if progress != "rich":
            raise KdgeoError(
                f'progress={progress!r} is not a view; pass "rich" (the CLI\'s live view), a function that takes a '
                "kdgeo.events.Event, or None."
            )
        from kdgeo import report

        view: Any = (
            report.DistillView(report.pick_mode()) if command == "distill" else report.ProbeView(report.pick_mode())
        )
        return view, view.close
    if not callable(progress):
        raise KdgeoError(
            f'progress={progress!r} is not callable; pass a function that takes a kdgeo.events.Event, "rich", or None.'
        )
    return progress, lambda: None


# ---- probe -------------------------------------------------------------------------------------


def probe(
    teacher: str | os.PathLike[str],
    student: str | os.PathLike[str],
    *,
    data: str = "kdgeo:wordnet-supersenses",
    data_config: str | None = None,
    split: str | None = None,
    text_column: str | None = None,
    metrics: str | Sequence[str] | None = None,
    rows: str | None = None,
    max_samples: int | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    trust_remote_code: bool = False,
    progress: ProgressArg = None,
    **options: Any,
) -> ProbeResult:
    """Layer-by-layer similarity of two models on data (``kdgeo probe TEACHER STUDENT``), streamed.

    ``teacher`` and ``student``: hub ids, local directories (a run's ``student/``) or ``package:MODULE/SUBDIR``.
    ``metrics``: names or one comma-separated string (procrustes, procrustes_angular, gram, cka,
    cka_debiased, projection); the first picks :attr:`ProbeResult.suggested_map`. Default
    :data:`DEFAULT_PROBE_METRICS`. An argument left at None takes ``kdgeo probe``'s default (split
    "validation", text column "text", rows, 512 samples, batch 32, 128 tokens or fewer when the models hold
    fewer positions, fp32); a ``max_length`` given and longer than a model takes is an error. ``options``:
    further fields of :class:`kdgeo.probing.ProbeArgs`, passed through.

    Raises :class:`kdgeo.errors.KdgeoError` on bad input (unknown metric or rows, a missing model, a dataset
    without the text column, tokenizers that split differently with ``rows="tokens"``). Signals are not
    caught: Ctrl-C raises KeyboardInterrupt (nothing is written, so nothing is lost).
    """
    from kdgeo.kinds import AUTOCAST_PRECISIONS, ROWS
    from kdgeo.models import ModelRef
    from kdgeo.probing import ProbeArgs, run_probe
    from kdgeo.spec import device_problem

    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics or [])
    names = list(dict.fromkeys(m for m in names if m)) or list(DEFAULT_PROBE_METRICS)
    if rows is not None and rows not in ROWS:
        raise KdgeoError(f'rows={rows!r} is not one of {", ".join(ROWS)}; pass rows="mean" (or tokens, cls).')
    if precision is not None and precision not in AUTOCAST_PRECISIONS:
        raise KdgeoError(f"precision={precision!r} is not one of {', '.join(AUTOCAST_PRECISIONS)}.")
    if problem := device_problem(device):
        raise KdgeoError(f"device={device!r}: {problem}.")
    for name, value, least in (
        ("max_samples", max_samples, 1),
        ("batch_size", batch_size, 1),
        ("max_length", max_length, 2),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise KdgeoError(f"{name}={value!r} must be a whole number of at least {least}.")
    given: dict[str, Any] = {
        "split": split,
        "text_column": text_column,
        "rows": rows,
        "max_samples": max_samples,
        "batch_size": batch_size,
        "max_length": max_length,
        "precision": precision,
    }
    values = {k: v for k, v in given.items() if v is not None}  # the rest keep ProbeArgs' defaults
    values.setdefault("split", "validation")  # ProbeArgs requires these two; the CLI's defaults
    values.setdefault("text_column", "text")
    extra = {f.name for f in dataclasses.fields(ProbeArgs)} - set(given) - {"teacher", "student", "dataset", "config"}
    extra -= {"metrics", "device"}
    unknown = sorted(set(options) - extra)
    if unknown:
        raise KdgeoError(
            f"kdgeo.probing got unknown option(s) {', '.join(unknown)}; its keyword arguments are listed in "
            "help(kdgeo.api.probe)."
        )
    args = ProbeArgs(
        teacher=ModelRef(os.fspath(teacher), trust_remote_code=trust_remote_code),
        student=ModelRef(os.fspath(student), trust_remote_code=trust_remote_code),
        dataset=data,
        config=data_config,
        metrics=names,
        device=device,
        **values,
        **options,
    )
    emit, close = _progress(progress, "probe")
    try:
        return ProbeResult(run_probe(args, progress=emit))
    finally:
        close()


# ---- compare -----------------------------------------------------------------------------------


RunsArg = Union[
    str, "os.PathLike[str]", RunResult, SweepResult, Sequence[Union[str, "os.PathLike[str]", RunResult, SweepResult]]
]


def compare(
    runs: RunsArg,
    *,
    baseline: str | None = None,
    metrics: str | Sequence[str] | None = None,
    alpha: float = 0.05,
    test: str = "t",
    fail_if_worse: bool = False,
    **options: Any,
) -> Comparison:
    """Runs side by side with statistics (``kdgeo compare RUN...``).

    ``runs``: run directories, directories of runs (a sweep's output), or results of :func:`distill`.
    ``metrics``: names or one comma-separated string (default: accuracy for classification runs, rougeL for
    causal-lm runs). ``baseline``, ``alpha``, ``test`` ("t", "wilcoxon", "permutation") and ``fail_if_worse``
    as the CLI's options; ``options``: further fields of :class:`kdgeo.comparison.CompareArgs`, passed through.
    ``fail_if_worse`` never raises: :attr:`Comparison.exit_code` is 1 when a variant is significantly worse.

    Raises :class:`kdgeo.errors.KdgeoError` on bad input (no runs, runs of different tasks, a missing metric,
    an unknown baseline). Signals are not caught.
    """
    from kdgeo import comparison as compare_mod

    paths = [str(p) for p in _run_paths(runs)]
    metric = ",".join(metrics) if metrics is not None and not isinstance(metrics, str) else metrics
    named = {"runs", "metric", "baseline", "alpha", "test", "fail_if_worse"}
    extra = {f.name for f in dataclasses.fields(compare_mod.CompareArgs)} - named
    unknown = sorted(set(options) - extra)
    if unknown:
        raise KdgeoError(
            f"kdgeo.comparison got unknown option(s) {', '.join(unknown)}; it takes runs, baseline, metrics, alpha, "
            f"test, fail_if_worse{''.join(', ' + name for name in sorted(extra))}."
        )
    args = compare_mod.CompareArgs(
        runs=paths,
        metric=metric,
        baseline=baseline,
        alpha=alpha,
        test=test,  # type: ignore[arg-type]  # compare() refuses a test it does not know, as a KdgeoError
        fail_if_worse=fail_if_worse,
        **options,
    )
    return Comparison(compare_mod.compare(args))


def _run_paths(runs: RunsArg) -> list[str | os.PathLike[str]]:
    if isinstance(runs, (str, os.PathLike, RunResult, SweepResult)):
        runs = [runs]
    out: list[str | os.PathLike[str]] = []
    for item in runs:
        if isinstance(item, RunResult):
            out.append(item.run_dir)
        elif isinstance(item, SweepResult):
            out += item.run_dirs
        elif isinstance(item, (str, os.PathLike)):
            out.append(item)
        else:
            raise KdgeoError(
                f"kdgeo.comparison: {item!r} is not a run; pass run directories, directories of runs, or results of "
                "kdgeo.distillation."
            )
    return out
