"""`kdgeo distill` on a spec with a ``[sweep]`` table: every variant x seed, one run after another.

Each run is an ordinary :func:`kdgeo.distill.run_distill` into its own run directory. Re-running
the command continues a sweep: finished runs are skipped (unless their spec changed, which is an
error for that run), an interrupted run resumes from its checkpoint, and a run that died before
its first checkpoint starts again.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdgeo import checkpoint, distributed, rundir
from kdgeo.distill import run_distill
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


def run_sweep(runs: list[SweepRun], progress: Progress | None = None) -> list[SweepOutcome]:
    """Run every variant x seed in turn. A failed run is reported and the sweep goes on; a run
    that finished earlier (its summary.json exists) is skipped, so re-running continues a sweep."""
    env = distributed.from_environment()
    emit: Progress = (progress or ignore) if env.is_main else ignore
    # Under torchrun a failed run stops the sweep: the other processes may be inside one of its
    # collectives, so going on would leave them waiting. Running the command again continues.
    torchrun = env.enabled
    outcomes: list[SweepOutcome] = []
    for k, run in enumerate(runs, 1):
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
