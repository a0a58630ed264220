"""`kdgeo probe`: layer-by-layer similarity of two models on data, streamed.

Both models run over the data once. Every layer's feature rows go into one
:class:`~kdgeo.geometry.CrossLayerAccumulator`, so memory does not grow with the number of
samples and all teacher x student layer pairs share their matrix products. The result holds a
(teacher layers + 1) x (student layers + 1) table per metric and the monotone layer map that
maximises total similarity.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kdgeo import data as data_mod
from kdgeo import geometry
from kdgeo.errors import DataError, KdgeoError
from kdgeo.events import ProbeLoading, ProbeProgress, ProbeStart, Progress, Stage, ignore
from kdgeo.features import LayerPair, check_tokenizers_agree, select_rows, suggest_layer_map
from kdgeo.kinds import AutocastPrecision, Rows, higher_is_better
from kdgeo.models import (
    DEFAULT_MAX_LENGTH,
    ModelRef,
    check_cls_rows,
    check_hidden_widths,
    fit_length,
    hidden_widths,
    load_config,
    load_encoder,
    load_tokenizer,
    num_layers,
)
from kdgeo.runtime import autocast, autocast_dtype, resolve_device


@dataclass(frozen=True)
class ProbeArgs:
    teacher: ModelRef
    student: ModelRef
    dataset: str
    config: str | None
    split: str
    text_column: str
    metrics: Sequence[str]
    rows: Rows = "tokens"
    """The rows distill trains on by default (spec.FeaturesSpec.rows): a map probed on other rows is chosen
    for a different statistic (on MiniLM, mean rows pick 1->3, 2->4 where token rows pick 1->1, 2->6)."""
    max_samples: int | None = 512
    batch_size: int = 32
    max_length: int | None = None
    """Tokens per example after truncation. None: 128, clamped to the models' positions with a note (a length
    the user did not set is never an error; one they set that a model cannot hold is, exit 2)."""
    device: str = "auto"
    precision: AutocastPrecision = "fp32"


@dataclass
class ProbeResult:
    teacher: str
    student: str
    teacher_layers: int
    student_layers: int
    rows: str
    samples: int
    feature_rows: int
    tables: dict[str, list[list[float]]]
    """metric -> [teacher index][student index] values."""
    suggested_map: list[LayerPair]
    map_metric: str
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)
    widths: tuple[int, int] = (0, 0)
    """The widest teacher and student hidden state (d_t, d_s): what :func:`rows_width_warning` weighs n against."""
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        pairs = []
        for t in range(self.teacher_layers + 1):
            for s in range(self.student_layers + 1):
                pairs.append({"teacher": t, "student": s, **{m: self.tables[m][t][s] for m in self.tables}})
        return {
            "teacher": self.teacher,
            "student": self.student,
            "teacher_layers": self.teacher_layers,
            "student_layers": self.student_layers,
            "rows": self.rows,
            "samples": self.samples,
            "feature_rows": self.feature_rows,
            "metrics": list(self.tables),
            "higher_is_better": {m: higher_is_better(m) for m in self.tables},
            "tables": self.tables,
            "pairs": pairs,
            "suggested_map": [{"student": s, "teacher": t} for s, t in self.suggested_map],
            "map_metric": self.map_metric,
            "seconds": self.seconds,
            "widths": {"teacher": self.widths[0], "student": self.widths[1]},
            "warnings": list(self.warnings),
            **self.meta,
        }


ROWS_PER_WIDTH = 2
"""Fewer than ROWS_PER_WIDTH * max(d_t, d_s) feature rows draws a warning (:func:`rows_width_warning`)."""


def rows_width_warning(n: int, d_teacher: int, d_student: int, where: str) -> str | None:
    """A warning when n feature rows are few for features this wide, else None.

    Procrustes, CKA and the Gram distance are statistics of the n x d feature matrices, and they are
    biased when n is not large against d: after centring, n rows span at most n - 1 dimensions, so with
    n <= d any two feature sets can be rotated onto each other far better than their populations can, and
    the plug-in HSIC behind CKA is biased at small n (Song et al. 2012, the unbiased estimator behind
    ``cka_debiased``; Kornblith et al. 2019). The values then depend on n, not only on the
    models: issue 16 reports a MiniLM pair's value moving from 0.099 at n = 32 to 0.273 at n = 512. The rule
    n >= 2 * max(d_t, d_s) keeps the rows well above the rank limit; it is a rule of thumb, not a bound.
    """
    width = max(d_teacher, d_student)
    if n >= ROWS_PER_WIDTH * width:
        return None
    return (
        f"{where}: only n = {n} feature rows for hidden states up to {width} wide (fewer than "
        f"{ROWS_PER_WIDTH} x {width} = {ROWS_PER_WIDTH * width}): the similarity values depend on n and move as it "
        'grows, so compare them only at equal n. Use more samples, or token rows (rows = "tokens").'
    )


def run_probe(args: ProbeArgs, progress: Progress | None = None) -> ProbeResult:
    """Stream both models' hidden states over the data and tabulate every layer pair."""
    emit = progress or ignore
    unknown = [m for m in args.metrics if m not in geometry.METRICS]
    if unknown:
        raise KdgeoError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(geometry.METRICS)}.")
    device = resolve_device(args.device)
    amp = autocast_dtype(args.precision, device)

    # Pre-flight: everything cheap that can fail, before any model weights are read.
    t_cfg, s_cfg = load_config(args.teacher), load_config(args.student)
    if args.rows == "cls":
        for cfg, ref, who in ((t_cfg, args.teacher.ref, "TEACHER"), (s_cfg, args.student.ref, "STUDENT")):
            check_cls_rows(cfg, ref, who, "--rows cls", "Use --rows mean (the mean over tokens) or --rows tokens.")
    t_layers, s_layers = num_layers(t_cfg), num_layers(s_cfg)
    t_tok, s_tok = load_tokenizer(args.teacher), load_tokenizer(args.student)
    ds = data_mod.load_split(args.dataset, args.config, args.split, where="--data", split_key="--split")
    data_mod.check_columns(
        ds, {"text_column": args.text_column}, where=f"--data {args.dataset}", setting="--text-column"
    )
    max_length, note = fit_length(
        args.max_length or DEFAULT_MAX_LENGTH,
        args.max_length is not None,
        [(t_cfg, f"the teacher {args.teacher.ref}", "teacher"), (s_cfg, f"the student {args.student.ref}", "student")],
        "--max-length",
    )
    if note is not None:
        emit(Stage(note))
    if args.max_samples is not None:
        ds = ds.select(range(min(args.max_samples, len(ds))))
    texts = data_mod.texts_of(ds, args.text_column, where=f"--data {args.dataset}")
    if not any(t.strip() for t in texts):
        raise DataError(f"--data {args.dataset}: every text in column '{args.text_column}' is empty.")
    if args.rows == "tokens":
        check_tokenizers_agree(
            t_tok, s_tok, texts[:64], hint="Compare pooled features instead: --rows mean (or --rows cls)."
        )
    split = data_mod.TextSplit(texts=texts, labels=None)
    split.encodings["teacher"] = data_mod.encode(t_tok, texts, None, max_length)
    split.encodings["student"] = data_mod.encode(s_tok, texts, None, max_length)

    emit(ProbeLoading(teacher=args.teacher.ref, student=args.student.ref))
    teacher = load_encoder(args.teacher).to(device)
    student = load_encoder(args.student).to(device)
    t_widths, s_widths = hidden_widths(t_cfg), hidden_widths(s_cfg)  # per hidden-state index: OPT's last may differ
    acc = geometry.CrossLayerAccumulator(t_widths, s_widths, device=device, debiased="cka_debiased" in args.metrics)
    start = time.perf_counter()
    done = 0
    total = len(split)
    emit(ProbeStart(total=total))
    with torch.inference_mode():
        for batch in data_mod.iterate_batches(split, args.batch_size):
            t_in = data_mod.to_device(batch["teacher"], device)
            s_in = data_mod.to_device(batch["student"], device)
            with autocast(device, amp):
                t_hidden = teacher(**t_in, output_hidden_states=True).hidden_states  # L_t+1 x (B, T_t, d_t)
                s_hidden = student(**s_in, output_hidden_states=True).hidden_states  # L_s+1 x (B, T_s, d_s)
            if done == 0:
                check_hidden_widths(t_hidden, t_widths, f"the teacher {args.teacher.ref}")
                check_hidden_widths(s_hidden, s_widths, f"the student {args.student.ref}")
            t_rows = [select_rows(h, t_in["attention_mask"], args.rows) for h in t_hidden]  # (n, d_t) each
            s_rows = [select_rows(h, s_in["attention_mask"], args.rows) for h in s_hidden]  # (n, d_s) each
            try:
                acc.update(t_rows, s_rows)
            except geometry.NonFiniteFeatures as err:
                ref = args.teacher.ref if err.side == "teacher" else args.student.ref
                raise KdgeoError(
                    f"the {err.side} {ref} produced NaN or inf hidden states (index "
                    f"{', '.join(map(str, err.layers))}; 0 = embeddings) on the probe data (examples "
                    f"{done}..{done + len(batch['index']) - 1}), so no similarity can be measured. Check the model's "
                    "weights; with --precision bf16/fp16 try --precision fp32."
                ) from None
            done += len(batch["index"])
            emit(ProbeProgress(done=done, total=total))
    if acc.n < 3:
        raise DataError(
            f"--data {args.dataset}: only {acc.n} feature rows; similarity needs at least 3 (use more samples)."
        )
    tables = {m: acc.compute(m).cpu() for m in args.metrics}  # each (L_t+1, L_s+1)
    map_metric = args.metrics[0]
    suggested = suggest_layer_map(tables[map_metric], higher_is_better(map_metric))
    widths = (max(t_widths), max(s_widths))
    # Returned, not emitted: the progress stream ends with the last ProbeProgress; the CLI prints it after the tables.
    warning = rows_width_warning(acc.n, *widths, where="probe")
    return ProbeResult(
        teacher=args.teacher.ref,
        student=args.student.ref,
        teacher_layers=t_layers,
        student_layers=s_layers,
        rows=args.rows,
        samples=total,
        feature_rows=acc.n,
        tables={m: tab.tolist() for m, tab in tables.items()},
        suggested_map=suggested,
        map_metric=map_metric,
        seconds=time.perf_counter() - start,
        meta={"device": str(device), "precision": args.precision, "dataset": args.dataset, "split": args.split},
        widths=widths,
        warnings=[warning] if warning else [],
    )


def plot_tables(result: ProbeResult, path: str) -> None:
    """One heatmap per metric (teacher layers down, student layers across), suggested map marked."""
    from kdgeo.files import prepare_matplotlib
    from kdgeo.report import hidden_state_label

    prepare_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(result.tables)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 + 2.6 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = torch.tensor(result.tables[metric])  # (L_t+1, L_s+1)
        cmap = "viridis" if higher_is_better(metric) else "viridis_r"
        im = ax.imshow(values.numpy(), cmap=cmap, aspect="auto", origin="lower")
        ax.set_title(metric)
        # hidden-state indices, as in the tables, features.pairs and --json: 0 = embeddings, i = after block i
        ax.set_xlabel("student hidden state (0 = embeddings)")
        ax.set_ylabel("teacher hidden state (0 = embeddings)")
        ax.set_xticks(range(values.shape[1]), [hidden_state_label(i) for i in range(values.shape[1])])
        ax.set_yticks(range(values.shape[0]), [hidden_state_label(i) for i in range(values.shape[0])])
        if metric == result.map_metric:
            xs = [s for s, _ in result.suggested_map]
            ys = [t for _, t in result.suggested_map]
            ax.plot(xs, ys, "o-", color="white", markeredgecolor="black", label="suggested map")
            ax.legend(loc="upper left", fontsize="small")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(
        f"{result.teacher} vs {result.student} ({result.rows} rows, n={result.feature_rows})", fontsize="small"
    )
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        from kdgeo.errors import OutputError
        from kdgeo.files import describe_os_error

        raise OutputError(f"--plot {path}: cannot write the plot: {describe_os_error(err, path)}.") from None
    finally:
        plt.close(fig)
