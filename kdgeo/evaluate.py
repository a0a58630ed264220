"""`kdgeo eval`: task metrics of a classifier (a model or a run's student) on a dataset.

Scores: accuracy, macro-F1, Matthews correlation (CoLA), binary F1 (MRPC), and, when a teacher
is given, the teacher's own scores and the fraction of examples where student and teacher agree.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdgeo import data as data_mod
from kdgeo import data_split, files, locks, rundir
from kdgeo.errors import DataError, KdgeoError, ModelLoadError, SpecError
from kdgeo.events import Progress, Stage, ignore
from kdgeo.metrics import agreement, classification_scores
from kdgeo.models import ModelRef, align_pad_token, fit_length, load_classifier, load_tokenizer
from kdgeo.runtime import autocast, autocast_dtype, resolve_device
from kdgeo.spec import DataSpec, RunSpec, validate_spec


@torch.no_grad()  # not inference_mode: FSDP reuses buffers made here in training forwards
def predict(
    model: nn.Module,
    split: data_mod.TextSplit,
    role: str,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
) -> list[int]:
    """Arg-max class of every example, in order."""
    was_training = model.training
    model.eval()
    preds: list[int] = []
    for batch in data_mod.iterate_batches(split, batch_size):
        inputs = data_mod.to_device(batch[role], device)
        with autocast(device, amp):
            logits = model(**inputs).logits  # (B, C)
        preds.extend(logits.argmax(-1).tolist())
    model.train(was_training)
    return preds


def score(
    model: nn.Module,
    split: data_mod.TextSplit,
    num_labels: int,
    role: str,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
    reference: list[int] | None = None,
) -> tuple[dict[str, float], list[int]]:
    preds = predict(model, split, role, batch_size, device, amp)
    assert split.labels is not None
    scores = classification_scores(split.labels, preds, num_labels)
    if reference is not None:
        scores["teacher_agreement"] = agreement(preds, reference)
    return scores, preds


def prediction_records(split: data_mod.TextSplit, preds: list[int]) -> list[dict[str, Any]]:
    """predictions.jsonl's classification records (:func:`kdgeo.rundir.read_predictions`): per example
    its index, text hash, label, predicted class and whether they agree, so accuracy = mean(correct)."""
    assert split.labels is not None
    return [
        {"index": i, "text_sha256": text_hash, "label": label, "prediction": pred, "correct": pred == label}
        for i, ((text_hash, _), label, pred) in enumerate(zip(split.eval_keys(), split.labels, preds))
    ]


def write_predictions(path: Path, result: EvalResult) -> None:
    """`kdgeo eval --predictions`: the result's per-example records, one JSON line each ('-': stdout)."""
    if str(path) == "-":
        import json

        from kdgeo import report

        report.write_stdout("".join(json.dumps(rundir.json_safe(r)) + "\n" for r in result.records))
    else:
        rundir.write_predictions(path, result.records)


@dataclass(frozen=True)
class EvalArgs:
    model: str
    dataset: str | None
    config: str | None
    split: str | None
    text_column: str | None
    text_pair_column: str | None
    label_column: str | None
    teacher: str | None = None
    max_samples: int | None = None
    max_length: int | None = None
    batch_size: int = 64
    device: str = "auto"
    precision: str = "fp32"
    trust_remote_code: bool = False


@dataclass
class EvalResult:
    model: str
    dataset: str
    split: str
    samples: int
    num_labels: int
    scores: dict[str, float]
    teacher: str | None = None
    teacher_scores: dict[str, float] | None = None
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    eval_sha256: str | None = None
    """The evaluated examples' content hash (:func:`kdgeo.rundir.eval_sha256`): a run's summary.json has the
    same ``data.eval_sha256`` when eval scored the examples the run did."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """Per example, the predictions.jsonl record (``--predictions``); with a teacher, its class as
    ``teacher_prediction``."""

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "split": self.split,
            "samples": self.samples,
            "eval_sha256": self.eval_sha256,
            "num_labels": self.num_labels,
            "scores": self.scores,
            "teacher": self.teacher,
            "teacher_scores": self.teacher_scores,
            "seconds": self.seconds,
            **self.meta,
        }


# model_construct leaves `dataset` unset on purpose; pydantic's mypy plugin types it like __init__
DEFAULT_DATA = DataSpec.model_construct()  # type: ignore[call-arg]
"""Every default of a spec's [data] table (``dataset`` has none: a plain model needs --data). What
`kdgeo eval` falls back to for a model that is not a run, so that eval and the spec cannot drift apart."""


@dataclass(frozen=True)
class EvalTarget:
    """What `kdgeo eval MODEL_OR_RUN` evaluates: a model, or a run directory's student with the run's settings."""

    location: str
    """The model to load: MODEL_OR_RUN itself, or the run's student/ directory."""
    run: rundir.RunDirectory | None = None

    @cached_property
    def spec(self) -> RunSpec | None:
        """The run's resolved spec, validated on first use (None for a plain model)."""
        return resolved_spec(self.run) if self.run is not None else None

    @property
    def data(self) -> DataSpec:
        """The run's [data] settings, or the spec's defaults for a plain model."""
        return self.spec.data if self.spec is not None else DEFAULT_DATA


class RunStillRunning(KdgeoError):
    """`kdgeo eval` on a run directory that a `kdgeo distill` still holds (exit 2)."""


def open_run(path: Path) -> rundir.RunDirectory | None:
    """``path`` read back as a kdgeo run directory (it holds spec.json), or None when it is something else (a model)."""
    label = f"Model or run '{path}'"
    if not files.is_dir(path, label, ModelLoadError):
        return None
    holder = locks.run_holder(path)
    if holder is not None:
        raise RunStillRunning(
            f"{locks.still_running(path, holder)}: its student/ does not exist yet or is being written. Wait for the "
            "run to finish, then run kdgeo eval again."
        )
    if not files.exists(path / rundir.SPEC_JSON, label, ModelLoadError):
        return None
    run = rundir.read_run(path)
    if run.spec_problem is not None:
        raise run.spec_problem
    return run


def resolved_spec(run: rundir.RunDirectory) -> RunSpec:
    """The run's spec.json as a validated RunSpec: eval reads the run's settings typed, defaults included."""
    try:
        return validate_spec(run.spec, str(run.path / rundir.SPEC_JSON))
    except SpecError as err:
        raise KdgeoError(
            f"{err.message}\nThis kdgeo cannot read that run's spec (it was written by another kdgeo version, or "
            f"edited by hand). Evaluate its student directly, giving the data: kdgeo eval {run.student_dir} --data ..."
        ) from None


def eval_target(model: str) -> EvalTarget:
    """A run directory evaluates its student/ and defaults to the run's settings; anything else is a model."""
    path = Path(model).expanduser()
    run = open_run(path)
    if run is None:
        return EvalTarget(str(path))
    if not os.path.exists(run.student_dir / "config.json"):
        raise ModelLoadError(
            f"{path} is a kdgeo run directory without a saved student (student/ is missing); the run may not have "
            "finished."
        )
    return EvalTarget(str(run.student_dir), run)


def run_eval(args: EvalArgs, progress: Progress | None = None) -> EvalResult:
    emit = progress or ignore
    target = eval_target(args.model)
    location, run_data = target.location, target.data
    own_data = args.dataset is None
    dataset = args.dataset or ((run_data.eval_dataset or run_data.dataset) if target.spec is not None else None)
    if dataset is None:
        raise DataError(f"no dataset to evaluate {args.model} on: give --data (a run directory supplies its own).")
    # A run's own evaluation file has no hub configuration; its hub dataset does.
    config = (
        args.config
        if args.config is not None
        else (run_data.config if own_data and not run_data.eval_dataset else None)
    )
    split = args.split or run_data.eval_split
    text_col = args.text_column or run_data.text_column
    pair_col = args.text_pair_column if args.text_pair_column is not None else run_data.text_pair_column
    label_col = args.label_column or run_data.label_column
    max_length = args.max_length or run_data.max_length
    teacher_ref = args.teacher
    device = resolve_device(args.device)
    amp = autocast_dtype(args.precision, device)

    where = f"--data {dataset}"
    if target.run is not None and own_data and args.split is None and run_data.eval_fraction is not None:
        # The run held its evaluation set out of its training split: re-score those very rows.
        split = f"{run_data.train_split} (held out: data.eval_fraction = {run_data.eval_fraction})"
        ds = data_split.held_out_rows(target.run.path, run_data, where)
    else:
        ds = data_mod.load_split(dataset, config, split, where="--data", split_key="--split")
    data_mod.check_columns(
        ds, {"text_column": text_col, "text_pair_column": pair_col, "label_column": label_col}, where, setting="--{key}"
    )
    # A run evaluated on its own data uses its own evaluation cap, so the scores match summary.json.
    max_samples = (
        args.max_samples if args.max_samples is not None else (run_data.max_eval_samples if own_data else None)
    )
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    info = data_mod.infer_labels(ds, label_col, where)
    # A fine-tuned model knows its own label count; trust it over the evaluation data's maximum.
    student_ref = ModelRef(location, trust_remote_code=args.trust_remote_code)
    from kdgeo.models import load_config

    cfg = load_config(student_ref)
    architectures = list(getattr(cfg, "architectures", None) or [])
    if architectures and not any("SequenceClassification" in a for a in architectures):
        raise ModelLoadError(
            f"{args.model} is a {architectures[0]}, with no trained classification head; evaluate a fine-tuned "
            "classifier or a kdgeo run directory."
        )
    num_labels = int(getattr(cfg, "num_labels", info.num_labels) or info.num_labels)
    limits = [(cfg, f"the model {args.model}", "model")]
    if teacher_ref is not None:
        limits.append(
            (
                load_config(ModelRef(teacher_ref, trust_remote_code=args.trust_remote_code)),
                f"the teacher {teacher_ref}",
                "teacher",
            )
        )
    # Only a length given with --max-length is the user's: the run's (or the default) is clamped to the models.
    origin = "the run's" if target.spec is not None else "the default"
    max_length, note = fit_length(max_length, args.max_length is not None, limits, "--max-length", origin)
    if note is not None:
        emit(Stage(note))
    id2label = {int(k): str(v) for k, v in (getattr(cfg, "id2label", None) or {}).items()}
    named = len(id2label) == num_labels and any(v != f"LABEL_{k}" for k, v in id2label.items())
    if info.string_to_id is not None and named:
        # String labels are read through the model's own names, whichever classes this data happens to hold.
        names = [id2label[i] for i in range(num_labels)]
        info = data_mod.LabelInfo(names=names, string_to_id={n: i for i, n in enumerate(names)})
    if info.string_to_id is None and num_labels > info.num_labels:
        info = data_mod.LabelInfo(names=[str(i) for i in range(num_labels)])
    labels = data_mod.labels_as_ids(ds, label_col, info, where)
    if info.num_labels != num_labels:
        raise DataError(
            f"{where}: the data has {info.num_labels} classes but the model {args.model} predicts {num_labels}; "
            "evaluate it on data of its own task."
        )
    texts = data_mod.texts_of(ds, text_col, where)
    pairs = data_mod.texts_of(ds, pair_col, where) if pair_col else None
    split_data = data_mod.TextSplit(texts=texts, labels=labels, pair_texts=pairs)
    s_tok = load_tokenizer(student_ref)
    split_data.encodings["student"] = data_mod.encode(s_tok, texts, pairs, max_length)
    emit(Stage(f"evaluating {args.model} on {len(texts)} examples"))
    start = time.perf_counter()
    loaded = load_classifier(student_ref, num_labels)
    if not loaded.has_trained_head:
        raise ModelLoadError(
            f"{args.model} has no trained classification head for {num_labels} labels (freshly initialised: "
            f"{', '.join(loaded.new_keys[:3])}); evaluate a fine-tuned model or a kdgeo run."
        )
    align_pad_token(loaded.model, s_tok)
    model = loaded.model.to(device)
    teacher_scores = None
    teacher_preds = None
    if teacher_ref is not None:
        t_ref = ModelRef(teacher_ref, trust_remote_code=args.trust_remote_code)
        t_tok = load_tokenizer(t_ref)
        split_data.encodings["teacher"] = data_mod.encode(t_tok, texts, pairs, max_length)
        t_loaded = load_classifier(t_ref, num_labels)
        if not t_loaded.has_trained_head:
            raise ModelLoadError(
                f"teacher {teacher_ref} has no trained classification head for {num_labels} labels; give the "
                "fine-tuned teacher (a run's summary.json names it)."
            )
        align_pad_token(t_loaded.model, t_tok)
        teacher = t_loaded.model.to(device)
        teacher_scores, teacher_preds = score(teacher, split_data, num_labels, "teacher", args.batch_size, device, amp)
        del teacher
    scores, preds = score(
        model, split_data, num_labels, "student", args.batch_size, device, amp, reference=teacher_preds
    )
    records = prediction_records(split_data, preds)
    if teacher_preds is not None:
        records = [{**r, "teacher_prediction": t} for r, t in zip(records, teacher_preds)]
    return EvalResult(
        model=args.model,
        dataset=dataset,
        split=split,
        samples=len(texts),
        num_labels=num_labels,
        scores=scores,
        teacher=teacher_ref,
        teacher_scores=teacher_scores,
        seconds=time.perf_counter() - start,
        meta={"device": str(device), "label_names": info.names},
        eval_sha256=rundir.eval_sha256(split_data.eval_keys()),
        records=records,
    )
