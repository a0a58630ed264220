"""Progress events: what a run reports as it goes, one dataclass per kind.

The training loop, the teacher fine-tune, the caches and the probe emit these; the views in
:mod:`kdgeo.report` draw them (a ``match`` on the type), ``metrics.jsonl`` and ``--json`` hold their
:func:`to_dict` form. That JSON form is the run directory's format 1 and does not change: every
record is an object with an ``"event"`` key naming the kind, plus the fields below under the same
names (a :class:`Step`'s loss values sit beside its other fields). No torch here: the CLI imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union


@dataclass(frozen=True)
class Stage:
    """A phase begins or a note about it (pre-flight, loading, fine-tuning, caches, resume)."""

    message: str
    kind: ClassVar[str] = "stage"


@dataclass(frozen=True)
class RunWarning:
    """Something that changes what the numbers mean; shown even with --quiet."""

    message: str
    kind: ClassVar[str] = "warning"


@dataclass(frozen=True)
class FinetuneStep:
    """One optimizer step of the teacher's fine-tune (not written to metrics.jsonl)."""

    step: int
    total: int
    loss: float
    kind: ClassVar[str] = "finetune_step"


@dataclass(frozen=True)
class Start:
    """Training begins (a new run; a resumed one emits :class:`Resume` instead)."""

    run_dir: str
    total_steps: int
    steps_per_epoch: int
    train_samples: int
    eval_samples: int
    pairs: list[list[int]]
    device: str
    precision: str
    teacher_scores: dict[str, float]
    losses: list[str]
    kind: ClassVar[str] = "start"


@dataclass(frozen=True)
class Resume:
    step: int
    checkpoint: str
    kind: ClassVar[str] = "resume"


@dataclass(frozen=True)
class Step:
    """Means over the ``log_every`` steps since the last one: ``losses`` holds ``loss`` (the
    weighted total) and each term by name (``ce``, ``kd``, ``procrustes`` or ``procrustes/2-6``
    per pair...)."""

    step: int
    total_steps: int
    epoch: float
    lr: float
    samples_per_s: float
    losses: dict[str, float] = field(default_factory=dict)
    on_policy: dict[str, float] | None = None
    """train.on_policy runs only: the run's cumulative counts so far (:data:`kdgeo.on_policy.COUNTS`)."""
    kind: ClassVar[str] = "step"


@dataclass(frozen=True)
class Monitor:
    """Geometry of every layer pair on the fixed monitor batch: one dict per pair with
    ``student``, ``teacher`` and each metric of ``monitor.metrics``."""

    step: int
    pairs: list[dict[str, float]]
    kind: ClassVar[str] = "monitor"


@dataclass(frozen=True)
class NonFinite:
    """NaN or inf in ``terms`` at ``step``; ``action``: "skipped" (the update) or "monitor"."""

    step: int
    terms: list[str]
    action: str
    kind: ClassVar[str] = "nonfinite"


@dataclass(frozen=True)
class Eval:
    step: int
    epoch: float
    scores: dict[str, float]
    kind: ClassVar[str] = "eval"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str
    kind: ClassVar[str] = "checkpoint"


@dataclass(frozen=True)
class Done:
    """The run finished; ``summary`` is what summary.json holds."""

    summary: dict[str, Any]
    kind: ClassVar[str] = "done"


@dataclass(frozen=True)
class RunFailed:
    """One run of a sweep failed; the sweep goes on."""

    variant: str
    seed: int
    error: str
    kind: ClassVar[str] = "run_failed"


@dataclass(frozen=True)
class ProbeLoading:
    teacher: str
    student: str
    kind: ClassVar[str] = "loading"


@dataclass(frozen=True)
class ProbeStart:
    total: int
    kind: ClassVar[str] = "start"


@dataclass(frozen=True)
class ProbeProgress:
    done: int
    total: int
    kind: ClassVar[str] = "progress"


Event = Union[
    Stage,
    RunWarning,
    FinetuneStep,
    Start,
    Resume,
    Step,
    Monitor,
    NonFinite,
    Eval,
    Checkpoint,
    Done,
    RunFailed,
    ProbeLoading,
    ProbeStart,
    ProbeProgress,
]
Progress = Callable[[Event], None]
"""A progress callback: the views in :mod:`kdgeo.report`, or any function a caller passes."""

RUN_EVENTS: dict[str, type] = {
    cls.kind: cls
    for cls in (
        Stage,
        RunWarning,
        FinetuneStep,
        Start,
        Resume,
        Step,
        Monitor,
        NonFinite,
        Eval,
        Checkpoint,
        Done,
        RunFailed,
    )
}
"""The kinds of a distill run (metrics.jsonl) by name; the probe's own kinds reuse "start"."""


def ignore(event: Event) -> None:
    """The callback for "report nothing" (processes other than rank 0, quiet internals)."""


def to_dict(event: Event) -> dict[str, Any]:
    """The JSON form: ``{"event": kind, **fields}`` with a Step's losses flattened in."""
    out: dict[str, Any] = {"event": event.kind}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if isinstance(event, Step) and f.name == "losses":
            out.update(value)
        elif isinstance(event, Step) and f.name == "on_policy" and value is None:
            continue  # other runs' step records keep their keys
        else:
            out[f.name] = value
    return out


def from_dict(record: dict[str, Any]) -> Event:
    """A distill run's event read back from metrics.jsonl (the inverse of :func:`to_dict`)."""
    cls = RUN_EVENTS.get(str(record.get("event")))
    if cls is None:
        raise ValueError(f"unknown event kind {record.get('event')!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in record.items() if k in names}
    if cls is Step:
        values["losses"] = {k: v for k, v in record.items() if k not in names and k != "event"}
    return cls(**values)
