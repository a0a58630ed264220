"""`kdgeo distill` on a spec with a ``[sweep]`` table: every variant x seed, one run after another.

Each run is an ordinary :func:`kdgeo.distillation.run_distill` into its own run directory. Re-running
the command continues a sweep: finished runs are skipped (unless their spec changed, which is an
error for that run), an interrupted run resumes from its checkpoint, and a run that died before
its first checkpoint starts again.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdgeo import checkpoint, distributed, rundir, stopping
from kdgeo.distillation import run_distill
from kdgeo.errors import KdgeoError, RunInterrupted
from kdgeo.events import Progress, RunFailed, Stage, ignore
from kdgeo.spec import SweepRun, resume_differences


@dataclass
class SweepOutcome:
    variant: str
    seed: int
    run_dir: Path
    status: str
    """"done", "skipped" (finished earlier) or "failed"."""
    error: str | None = None
    summary: dict[str, Any] | None = None


def preflight(runs: list[SweepRun], emit: Progress = ignore) -> dict[tuple[str, int], str]:
    """Check every run before the first starts (:func:`kdgeo.dryrun.check_runs`: device, output directories,
    ``make_plan``; no weights are read, nothing is created).

    When no run can start and none finished earlier -- typically one cause shared by all, such as
    ``train.device = "cuda"`` without CUDA or a missing data file -- raise a PreflightError (exit 2)
    saying each distinct problem once, before anything runs. Otherwise return the problems of the
    runs that cannot start, by (variant, seed): the sweep reports them as failed and runs the others.
    """
    from kdgeo.dryrun import PreflightError, check_runs, problems_message

    emit(Stage(f"pre-flight: checking {len(runs)} runs"))
    checks, problems = check_runs(runs, sweep=True)
    if problems and not checks:
        raise PreflightError(problems_message(problems, len(runs)))
    return {(p.variant, p.seed): p.message for p in problems}


def run_sweep(runs: list[SweepRun], progress: Progress | None = None) -> list[SweepOutcome]:
    """Run every variant x seed in turn, after a pre-flight of them all (:func:`preflight`). A failed run is
    reported and the sweep goes on; a run that finished earlier (its summary.json exists) is skipped, so
    re-running continues a sweep.

    SIGINT/SIGTERM stop the whole sweep (:mod:`kdgeo.stopping`, one flag for every run): inside a run
    as that run stops, between runs before the next starts; :class:`RunInterrupted` (exit 130/143)."""
    with stopping.stop_on_signals():
        try:
            return _run_sweep(runs, progress)
        except stopping.StopNow:  # a second Ctrl-C outside a run (inside one, the run reports it)
            raise RunInterrupted(
                "second Ctrl-C: stopped at once between runs of the sweep; the finished runs and every run's "
                "checkpoints are kept.",
                exit_code=130,
                run_dir="",
                step=0,
            ) from None


def _run_sweep(runs: list[SweepRun], progress: Progress | None) -> list[SweepOutcome]:
    env = distributed.from_environment()
    emit: Progress = (progress or ignore) if env.is_main else ignore
    refused = preflight(runs, emit)
    # Under torchrun a failed run stops the sweep: the other processes may be inside one of its
    # collectives, so going on would leave them waiting. Running the command again continues.
    torchrun = env.enabled
    outcomes: list[SweepOutcome] = []
    for k, run in enumerate(runs, 1):
        if not torchrun:  # under torchrun the run's own (agreed) checks stop every process at one point
            stopping.check(
                f"between runs of the sweep, before run {k} of {len(runs)}: the finished runs are kept; running the "
                "command again continues with the others."
            )
        spec = run.spec
        run_dir = Path(spec.output.dir).expanduser() / (spec.output.name or spec.name)
        label = f"[{k}/{len(runs)}] {run.variant} seed {run.seed}"
        if (run_dir / rundir.SUMMARY).exists():
            saved = rundir.read_json(run_dir / rundir.SPEC_JSON) if (run_dir / rundir.SPEC_JSON).exists() else {}
            diffs = resume_differences(saved, spec.model_dump(mode="json", exclude_none=True))
            if diffs:
                changed = "; ".join(f"{k}: run has {a!r}, spec now has {b!r}" for k, a, b in diffs[:8])
                error = (
                    f"{run_dir} finished with a different spec ({changed}); its results would be mixed with the new "
                    "ones. Delete that run directory to redo it, or give the sweep another name."
                )
                emit(RunFailed(variant=run.variant, seed=run.seed, error=error))
                outcomes.append(SweepOutcome(run.variant, run.seed, run_dir, "failed", error=error))
                continue
            emit(Stage(f"{label}: already finished ({run_dir}), skipped"))
            outcomes.append(
                SweepOutcome(
                    run.variant, run.seed, run_dir, "skipped", summary=rundir.read_json(run_dir / rundir.SUMMARY)
                )
            )
            continue
        resume = False
        if run_dir.exists():
            if checkpoint.latest_checkpoint(run_dir) is not None:
                resume = True  # interrupted after a checkpoint: continue it
            else:
                # A run that died before its first checkpoint: start it again from scratch.
                spec = spec.model_copy(update={"output": spec.output.model_copy(update={"overwrite": True})})
        if (run.variant, run.seed) in refused:  # failed pre-flight: reported, not started
            error = refused[(run.variant, run.seed)]
            emit(RunFailed(variant=run.variant, seed=run.seed, error=error))
            outcomes.append(SweepOutcome(run.variant, run.seed, run_dir, "failed", error=error))
            continue
        emit(Stage(f"{label} -> {run_dir}"))
        try:
            result = run_distill(spec, progress=progress, resume=resume)
            outcomes.append(SweepOutcome(run.variant, run.seed, run_dir, "done", summary=result.summary))
        except (KeyboardInterrupt, RunInterrupted):
            raise
        except KdgeoError as err:
            if torchrun:
                raise
            emit(RunFailed(variant=run.variant, seed=run.seed, error=err.render()))
            outcomes.append(SweepOutcome(run.variant, run.seed, run_dir, "failed", error=err.render()))
        except Exception as err:  # a bug in one run must not lose the others; keep its traceback
            if torchrun:
                raise
            text = traceback.format_exc()
            emit(RunFailed(variant=run.variant, seed=run.seed, error=text))
            outcomes.append(
                SweepOutcome(run.variant, run.seed, run_dir, "failed", error=f"{type(err).__name__}: {err}")
            )
    return outcomes
