"""Experiment trackers: ``output.report_to = ["tensorboard", "wandb", "mlflow"]``.

The run's own record is metrics.jsonl and summary.json; trackers are a copy for the tools people
already watch (the Hugging Face Trainer's ``report_to`` convention). What goes out, per event of
:mod:`kdgeo.events`, at the optimizer step it belongs to:

- ``train/<term>`` (``train/loss``, ``train/ce``, ``train/kd``, ``train/procrustes``, ...: the window
  means metrics.jsonl has), a feature term's share of each pair ``train/pairs/<term>/<s>-<t>``,
  ``train/lr``, ``train/epoch``, ``train/samples_per_s``;
- ``geometry/<metric>/<s>-<t>`` for every layer pair (student hidden state s, teacher hidden state t;
  0 = embeddings), e.g. ``geometry/procrustes/1-3``;
- ``eval/<score>`` (``eval/accuracy``, ``eval/perplexity``, ...);
- at the end ``final/<score>``, ``teacher/<score>`` and ``summary/<number>`` from summary.json
  (and summary.json itself as text / W&B summary / an MLflow artifact);
- once, at a new run's start, the resolved spec as the run's config (TensorBoard: a ``spec`` text
  summary and hparams; W&B: ``config``; MLflow: params, and ``spec.json`` as an artifact).

Why failures are swallowed here and nowhere else: a tracker observes the run, it is not the run.
A full disk under the event files, an expired W&B login or an MLflow server going away must not
lose hours of training whose every number is in metrics.jsonl anyway; so every call into a tracker
is guarded, the first failure is warned about once (:class:`kdgeo.events.RunWarning`) and that
tracker is dropped for the rest of the run. A tracker that is asked for but not installed is the
opposite case, found before anything runs: :func:`check_installed` (exit 2, naming the extra).

Resume continues the same tracker run: TensorBoard writes into the same ``tensorboard/`` directory
with ``purge_step`` = the checkpoint's step, so what was logged after the checkpoint (and is done
again) is hidden, and the checkpoint step's own records are replayed from metrics.jsonl; W&B and
MLflow reopen the run whose id ``trackers.json`` keeps. Under torchrun only rank 0 logs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from kdgeo import events, rundir
from kdgeo.errors import KdgeoError
from kdgeo.spec import flatten_dotted

TRACKERS = ("tensorboard", "wandb", "mlflow")
"""The names ``output.report_to`` accepts."""
TENSORBOARD_DIR = "tensorboard"
"""TensorBoard's log directory inside the run directory: ``tensorboard --logdir runs`` shows every run."""
TRACKER_IDS = "trackers.json"
"""The W&B / MLflow run ids of a run directory, so that ``--resume`` continues the same tracker run."""

_INSTALL = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", 'pip install "kdgeo[wandb]"'),
    "mlflow": ("mlflow", 'pip install "kdgeo[mlflow]"'),
}
"""tracker -> (the module it imports, the command that installs it)."""

_MLFLOW_PARAM_CHARS = 6000
"""MLflow refuses longer parameter values (6000 characters since MLflow 2.x)."""
_MLFLOW_BATCH = 100
"""MLflow's ``log_batch`` takes at most 100 parameters or 1000 metrics per call."""


class TrackerMissing(KdgeoError):
    """``output.report_to`` names a tracker whose package is not installed."""


def check_installed(names: Sequence[str]) -> None:
    """Refuse a run whose ``output.report_to`` names trackers that are not installed: found at
    pre-flight (exit 2), not after the teacher fine-tune, and for every missing one at once."""
    missing = [name for name in names if importlib.util.find_spec(_INSTALL[name][0]) is None]
    if not missing:
        return
    which = ", ".join(f'"{name}" needs the {_INSTALL[name][0]} package ({_INSTALL[name][1]})' for name in missing)
    raise TrackerMissing(
        f"output.report_to asks for {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
        f"installed: {which}. Install {'it' if len(missing) == 1 else 'them'}, or remove "
        f"{', '.join(repr(m) for m in missing)} from output.report_to."
    )


@dataclass(frozen=True)
class TrackerSettings:
    """What the trackers need from the spec, as flat values (nothing below the plan takes the spec)."""

    names: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved spec (``spec.json``'s content): the tracker run's config."""
    project: str = "kdgeo"
    """W&B project / MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise."""
    run_name: str = ""
    """The run directory's name: the tracker run's display name."""


# ---- what an event becomes -----------------------------------------------------------------------
def scalars(event: events.Event) -> tuple[int, dict[str, float]] | None:
    """The (step, {tag: value}) a run event is logged as; None for events that carry no numbers."""
    if isinstance(event, events.Step):
        # A term's per-pair parts ("procrustes/1-3") go under train/pairs/: "train/procrustes" stays the
        # term's total and is never also a folder (MLflow's file store keeps one file per key).
        values = {f"train/pairs/{k}" if "/" in k else f"train/{k}": v for k, v in event.losses.items()}
        values.update({"train/lr": event.lr, "train/epoch": event.epoch, "train/samples_per_s": event.samples_per_s})
        return event.step, _numbers(values)
    if isinstance(event, events.Monitor):
        values = {
            f"geometry/{metric}/{pair['student']}-{pair['teacher']}": value
            for pair in event.pairs
            for metric, value in pair.items()
            if metric not in ("student", "teacher")
        }
        return event.step, _numbers(values)
    if isinstance(event, events.Eval):
        return event.step, _numbers({f"eval/{k}": v for k, v in event.scores.items()})
    return None


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """summary.json's numbers: ``final/<score>``, ``teacher/<score>`` and ``summary/<key>`` for the
    top-level numbers (steps, wall_seconds, samples_per_s, best_score, ...)."""
    values: dict[str, Any] = {f"final/{k}": v for k, v in (summary.get("scores") or {}).items()}
    values.update({f"teacher/{k}": v for k, v in (summary.get("teacher_scores") or {}).items()})
    values.update({f"summary/{k}": v for k, v in summary.items()})
    return _numbers(values)


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    # bool is an int to Python, not a measurement; strings and lists have no scalar plot.
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _plain(value: Any) -> int | float | str | bool:
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value)


def _as_code(data: dict[str, Any]) -> str:
    # TensorBoard renders text as Markdown: an indented block keeps the JSON as it is.
    return "\n".join("    " + line for line in json.dumps(data, indent=2, sort_keys=True).splitlines())


# ---- the trackers --------------------------------------------------------------------------------
class _Tracker(Protocol):
    name: str

    def config(self, resolved: dict[str, Any]) -> None: ...
    def log(self, values: dict[str, float], step: int) -> None: ...
    def summary(self, summary: dict[str, Any], step: int) -> None: ...
    def close(self, finished: bool) -> None: ...


class _TensorBoard:
    """``torch.utils.tensorboard.SummaryWriter`` on ``<run_dir>/tensorboard``."""

    name = "tensorboard"
    replays = True
    """Resume hides the steps from the checkpoint on (purge_step): that step's records are logged again."""

    def __init__(self, run_dir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step = the checkpoint's step: TensorBoard hides every event at or after it written
        # before this point, so the steps trained again after a resume are not shown twice.
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def config(self, resolved: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("spec", _as_code(resolved), 0)
        # hparams in this writer's own directory (SummaryWriter.add_hparams would make a new one per call).
        for summary in hparams({k: _plain(v) for k, v in flatten_dotted(resolved).items()}, {}):
            self.writer._get_file_writer().add_summary(summary)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def summary(self, summary: dict[str, Any], step: int) -> None:
        self.log(summary_scalars(summary), step)
        self.writer.add_text("summary", _as_code(summary), step)
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


class _WandB:
    """A W&B run in the project WANDB_PROJECT (default: the spec's name); its files under the run
    directory unless WANDB_DIR says otherwise; WANDB_MODE=offline logs without a network."""

    name = "wandb"
    replays = False  # W&B accepts only increasing steps: a replayed step would be dropped with a warning

    def __init__(self, settings: TrackerSettings, run_dir: Path, run_id: str | None, resumed: bool) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or settings.project,
            name=settings.run_name or None,
            id=run_id,
            resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            config=None if resumed else settings.config,
        )
        self.id = str(self.run.id)

    def config(self, resolved: dict[str, Any]) -> None:
        pass  # given to wandb.init

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, summary: dict[str, Any], step: int) -> None:
        self.run.log(summary_scalars(summary), step=step)
        self.run.summary.update({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class _MLflow:
    """An MLflow run in the experiment MLFLOW_EXPERIMENT_NAME (default: the spec's name) at
    MLFLOW_TRACKING_URI (MLflow's default otherwise). The client API, not ``mlflow.start_run``:
    no process-wide active run is left behind for the user's own code."""

    name = "mlflow"
    replays = False  # a replayed step would be a second point at the same step

    def __init__(self, settings: TrackerSettings, run_id: str | None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        if run_id is not None:
            self.id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or settings.project
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.id = self.client.create_run(experiment_id, run_name=settings.run_name or None).info.run_id

    def config(self, resolved: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(_plain(v))[:_MLFLOW_PARAM_CHARS]) for k, v in flatten_dotted(resolved).items()]
        for i in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(self.id, params=params[i : i + _MLFLOW_BATCH])
        self.client.log_dict(self.id, resolved, rundir.SPEC_JSON)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), _MLFLOW_BATCH):
            self.client.log_batch(self.id, metrics=metrics[i : i + _MLFLOW_BATCH])

    def summary(self, summary: dict[str, Any], step: int) -> None:
        self.log(summary_scalars(summary), step)
        self.client.log_dict(self.id, summary, rundir.SUMMARY)

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.id, status="FINISHED" if finished else "KILLED")


class Trackers:
    """The run's trackers (none unless ``output.report_to`` names some, and none off rank 0).

    Every call is guarded: a tracker that raises is warned about once through ``warn`` and dropped;
    the run goes on (see the module docstring for why)."""

    def __init__(self, settings: TrackerSettings, warn: Callable[[str], None]) -> None:
        self.settings = settings
        self._warn = warn
        self._open: list[Any] = []
        self._closed = False

    @property
    def names(self) -> list[str]:
        """The trackers still logging."""
        return [t.name for t in self._open]

    def start(self, run_dir: Path, resumed_at: int | None, replay: Iterable[events.Event] = ()) -> None:
        """Open every tracker for a new run (``resumed_at`` None: the config is logged) or for a run
        resumed from the checkpoint at step ``resumed_at`` (0: a resumed run that had none), then log
        ``replay`` (the checkpoint step's records, kept in metrics.jsonl) to the trackers that purged them."""
        if not self.settings.names:
            return
        ids_path = run_dir / TRACKER_IDS
        ids: dict[str, Any] = {}
        if resumed_at is not None and ids_path.exists():
            self._guard("trackers", f"reading {ids_path}", lambda: ids.update(rundir.read_json(ids_path)))
        for name in self.settings.names:
            opened = self._guard(name, "starting", partial(self._make, name, run_dir, ids, resumed_at))
            if opened is not None:
                self._open.append(opened)
        kept = {t.name: t.id for t in self._open if getattr(t, "id", None)}
        if kept and kept != {k: v for k, v in ids.items() if k in kept}:
            self._guard("trackers", f"writing {ids_path}", lambda: rundir.write_json(ids_path, {**ids, **kept}))
        if resumed_at is None:
            self._each("logging the run's config", lambda t: t.config(self.settings.config))
            return
        replayed = [found for found in map(scalars, replay) if found is not None]
        for tracker in [t for t in self._open if t.replays]:
            for step, values in replayed:
                self._guard(tracker.name, "logging", partial(tracker.log, values, step), tracker)

    def _make(self, name: str, run_dir: Path, ids: dict[str, Any], resumed_at: int | None) -> Any:
        if name == "tensorboard":
            return _TensorBoard(run_dir, resumed_at)
        if name == "wandb":
            # Chosen here, not by W&B: it is kept in trackers.json before the first resume needs it.
            return _WandB(self.settings, run_dir, ids.get("wandb") or uuid.uuid4().hex[:12], resumed_at is not None)
        if name == "mlflow":
            return _MLflow(self.settings, ids.get("mlflow"))
        raise ValueError(f"unknown tracker {name!r}")  # spec validation allows only TRACKERS

    def log(self, event: events.Event) -> None:
        """Log one run event (steps, monitor geometry, evaluations; others carry no numbers)."""
        found = scalars(event) if self._open else None
        if found is not None:
            step, values = found
            self._each("logging", lambda t: t.log(values, step))

    def summary(self, summary: dict[str, Any]) -> None:
        """The final summary (summary.json's content), at the run's last step."""
        step = int(summary.get("steps") or 0)
        self._each("logging the summary", lambda t: t.summary(summary, step))

    def close(self, finished: bool = False) -> None:
        """Flush and close every tracker (``finished``: the run wrote summary.json). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._each("closing", lambda t: t.close(finished))
        self._open = []

    def _each(self, what: str, call: Callable[[Any], None]) -> None:
        for tracker in list(self._open):
            self._guard(tracker.name, what, partial(call, tracker), tracker)

    def _guard(self, name: str, what: str, call: Callable[[], Any], tracker: Any = None) -> Any:
        """``call()``'s result; None when it raised (warned about, and ``tracker`` dropped)."""
        try:
            return call()
        except Exception as err:  # any failure of a third-party tracker: see the module docstring
            reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
            self._warn(
                f"{name}: {what} failed ({reason}); {name} logs nothing more for this run, which goes on "
                "(metrics.jsonl and summary.json have every number)."
            )
            if tracker is not None and tracker in self._open:
                self._open.remove(tracker)
                try:
                    tracker.close(False)
                except Exception:  # it already failed once and the warning said so
                    pass
            return None


def events_at(metrics_path: Path, step: int) -> list[events.Event]:
    """The records of ``step`` in metrics.jsonl (as cut back to the checkpoint by a resume): what a
    tracker that purged from that step on must be given again."""
    if not metrics_path.exists():
        return []
    found: list[events.Event] = []
    for record in rundir.read_jsonl(metrics_path):
        if record.get("step") == step and record.get("event") in ("step", "monitor", "eval"):
            found.append(events.from_dict(record))
    return found
