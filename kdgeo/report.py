"""What goes on screen.

Diagnostics and progress go to one Rich console on stderr; results (tables) go to stdout so
they can be piped. Rich markup is off for anything that carries user text (a model called
``[teacher]`` must print as itself). Three modes: ``rich`` (a terminal: live progress bars),
``plain`` (no terminal, e.g. CI: one line per event), ``quiet`` (errors and results only).
``--json`` modes write machine-readable lines to stdout and keep the human output on stderr.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Sequence
from typing import IO, Any, Literal, cast

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from kdgeo import events, kinds
from kdgeo.events import (
    Checkpoint,
    Done,
    Eval,
    Event,
    FinetuneStep,
    Monitor,
    NonFinite,
    ProbeLoading,
    ProbeProgress,
    ProbeStart,
    Resume,
    RunFailed,
    RunWarning,
    Stage,
    Start,
    Step,
)

Mode = Literal["rich", "plain", "quiet"]

STDOUT_CLOSED_NOTE = "the rest of the output is dropped; the command goes on"
DISTILL_STDOUT_CLOSED_NOTE = "--json events stop here; the run goes on; metrics.jsonl has every event"
_stdout_closed = False


def stdout_closed(note: str = STDOUT_CLOSED_NOTE) -> None:
    """stdout's reader went away (``kdgeo distill --json | head -1``): the work must not be lost with it.

    Every later write to stdout is dropped, stdout's file descriptor is pointed at /dev/null so
    that Python's flush at exit cannot raise BrokenPipeError either, and stderr says so once.
    """
    global _stdout_closed
    if _stdout_closed:
        return
    _stdout_closed = True
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): nothing to redirect
        fd = None
    if fd is not None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
    err_console.print(Text("note: ", style="yellow") + Text(f"stdout was closed: {note}"))


def is_stdout_closed() -> bool:
    return _stdout_closed


class _PipeSafeStdout(io.TextIOBase):
    """sys.stdout (looked up on every write, so a swapped stream is followed) that survives a closed pipe:
    a BrokenPipeError calls :func:`stdout_closed` instead of ending the command mid-way."""

    note = STDOUT_CLOSED_NOTE

    def write(self, text: str) -> int:
        if not _stdout_closed:
            try:
                sys.stdout.write(text)
            except BrokenPipeError:
                stdout_closed(self.note)
        return len(text)

    def flush(self) -> None:
        if not _stdout_closed:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                stdout_closed(self.note)

    def isatty(self) -> bool:
        return not _stdout_closed and sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(sys.stdout, "encoding", None) or "utf-8"


stdout = _PipeSafeStdout()
"""Where results go: every write to stdout goes through here (tables, --json, CSV, Markdown)."""

err_console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
out_console = Console(file=cast(IO[str], stdout), highlight=False, markup=False, soft_wrap=False)  # a text stream


def pick_mode(quiet: bool = False) -> Mode:
    if quiet:
        return "quiet"
    return "rich" if err_console.is_terminal else "plain"


def _rank_prefix() -> str:
    """Under torchrun every process reports its own errors; name the ones that are not rank 0."""
    rank = os.environ.get("RANK")
    return f"[rank {rank}] " if rank not in (None, "", "0") and os.environ.get("WORLD_SIZE", "1") != "1" else ""


def error(message: str) -> None:
    """A user error: one paragraph, no traceback, on stderr."""
    err_console.print(Text(_rank_prefix() + "error: ", style="bold red") + Text(message))


def warn(message: str) -> None:
    err_console.print(Text("warning: ", style="yellow") + Text(message))


def info(message: str, mode: Mode = "plain") -> None:
    if mode != "quiet":
        err_console.print(Text(message))


def stage_lines(mode: Mode) -> events.Progress:
    """The progress callback of the commands without a live view (eval): each stage message as a line."""

    def show(event: Event) -> None:
        if isinstance(event, Stage):
            info(event.message, mode)

    return show


def emit_json(record: dict[str, Any], closed_note: str = STDOUT_CLOSED_NOTE) -> None:
    """One JSON line on stdout (the --json stream); nothing once stdout was closed (see :func:`stdout_closed`)."""
    write_stdout(json.dumps(record, default=_json_default) + "\n", closed_note)


def write_stdout(text: str, closed_note: str = STDOUT_CLOSED_NOTE) -> None:
    """``text`` on stdout, flushed; a closed stdout drops it with one note on stderr instead of raising."""
    if _stdout_closed:
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_closed(closed_note)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class EtaColumn(TimeRemainingColumn):
    """Rich's time-remaining column, labelled: "ETA 0:03:12" (a bare 0:03:12 next to the elapsed time is
    easily read as a second elapsed time)."""

    def render(self, task: Any) -> Text:
        return Text("ETA ", style="progress.remaining") + super().render(task)


def eta_text(seconds: float) -> str:
    """A plain line's ETA: ``ETA 3m12s`` (``ETA 1h05m``, ``ETA 42s``)."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"ETA {hours}h{minutes:02d}m"
    return f"ETA {minutes}m{secs:02d}s" if minutes else f"ETA {secs}s"


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "nan"
    return f"{value:.{digits}f}"


class ProbeView:
    """Progress of a probe run (a bar in a terminal, a few lines otherwise)."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self._progress: Progress | None = None
        self._task: Any = None
        self._last_plain = 0.0

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunWarning):  # shown even with --quiet: it changes what the numbers mean
            self.close()
            warn(event.message)
            return
        if self.mode == "quiet":
            return
        match event:
            case Stage(message=message):  # a note, e.g. --max-length clamped to the models' positions
                info(message, self.mode)
            case ProbeLoading(teacher=teacher, student=student):
                info(f"loading teacher {teacher} and student {student}", self.mode)
            case ProbeStart(total=total):
                self._start(total)
            case ProbeProgress(done=done, total=total):
                self._advance(done, total)

    def _start(self, total: int) -> None:
        if self.mode == "rich":
            self._progress = Progress(
                TextColumn("probing"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                EtaColumn(),
                console=err_console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("probe", total=total)
        else:
            info(f"probing {total} samples", self.mode)

    def _advance(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done)
        elif done == total or done - self._last_plain >= max(1, total // 4):  # plain: about 4 lines, not one a batch
            self._last_plain = done
            info(f"  {done}/{total} samples", self.mode)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def layer_table(
    title: str, values: Sequence[Sequence[float]], highlight: set[tuple[int, int]], higher_is_better: bool
) -> Table:
    """Teacher layers as rows, student layers as columns; highlighted cells are the suggested map."""
    arrow = "higher = more similar" if higher_is_better else "lower = more similar"
    table = Table(title=Text(f"{title} ({arrow})"), title_justify="left")
    table.add_column("teacher \\ student", justify="right", style="dim")
    n_students = len(values[0]) if values else 0
    for s in range(n_students):
        table.add_column(Text(hidden_state_label(s)), justify="right")
    for t, row in enumerate(values):
        cells = [Text(fmt(v, 3), style="bold reverse" if (s, t) in highlight else "") for s, v in enumerate(row)]
        table.add_row(Text(hidden_state_label(t)), *cells)
    return table


def hidden_state_label(index: int) -> str:
    """One label for a hidden-state index in every table and plot: the number (as in ``features.pairs``,
    ``--json`` and metrics.jsonl), with 0 marked as the embeddings."""
    return "0=emb" if index == 0 else str(index)


def suggested_features_toml(result: Any) -> str:
    """The suggested layer map as a ``[features]`` table of a run spec (valid TOML, ``rows`` included: a map
    holds for the rows it was probed on). Indices are hidden states, 0 = embeddings, as ``features.pairs``."""
    pairs = "[" + ", ".join(f"[{s}, {t}]" for s, t in result.suggested_map) + "]"
    return (
        f"# kdgeo probe: best {result.map_metric} map on n = {result.feature_rows} {result.rows} rows "
        f"({result.samples} samples)\n"
        "# pairs: [student, teacher] hidden-state indices, 0 = embeddings\n"
        "[features]\n"
        f"rows = {json.dumps(result.rows)}\n"
        f"pairs = {pairs}\n"
    )


def print_probe(result: Any) -> None:
    highlight = set(result.suggested_map)
    for metric, values in result.tables.items():
        marked = highlight if metric == result.map_metric else set()
        out_console.print(layer_table(metric, values, marked, kinds.higher_is_better(metric)))
    mapping = ", ".join(f"{s}->{t}" for s, t in result.suggested_map)
    out_console.print(Text(f"suggested layer map (student->teacher hidden states, by {result.map_metric}): {mapping}"))
    out_console.print(Text("for a run spec:\n"))
    out_console.print(Text(suggested_features_toml(result)), soft_wrap=True)  # TOML: never wrapped mid-line
    out_console.print(
        Text(
            f"n = {result.feature_rows} feature rows ({result.rows}) from {result.samples} samples, "
            f"{result.seconds:.1f}s"
        )
    )


LOSS_ORDER = ("loss", "ce", "kd", "procrustes", "gram", "cka", "projection", "mse", "cosine")


def on_policy_text(counts: dict[str, float]) -> str:
    """train.on_policy's running counts (kdgeo.on_policy.COUNTS) in a few words: on-policy micro-batches, the
    mean sampled length, the share of samples that hit the length limit, and the seconds spent sampling."""
    gens = counts.get("generations", 0.0)
    if not gens:
        return "on-policy 0 batches"
    return (
        f"on-policy {int(counts.get('micro_batches', 0))} batches, {counts.get('generated_tokens', 0.0) / gens:.1f} "
        f"tok/sample, {100 * counts.get('hit_max_new_tokens', 0.0) / gens:.0f}% at limit, "
        f"{counts.get('generation_seconds', 0.0):.1f}s sampling"
    )


def _loss_text(losses: dict[str, float]) -> str:
    """The total and the summed terms by kind; per-pair terms (``procrustes/2-6``) stay in the JSON."""
    keys = [k for k in LOSS_ORDER if k in losses]
    return "  ".join(f"{k} {fmt(losses[k])}" for k in keys)


def monitor_table(step: int, pairs: list[dict[str, Any]]) -> Table:
    table = Table(title=Text(f"layer-pair geometry on the monitor batch (step {step})"), title_justify="left")
    table.add_column("student -> teacher", justify="right")
    metrics = [k for k in ("procrustes", "cka", "gram") if pairs and k in pairs[0]]
    arrows = {"procrustes": "procrustes (lower)", "cka": "cka (higher)", "gram": "gram (lower)"}
    for m in metrics:
        table.add_column(arrows[m], justify="right")
    for p in pairs:
        table.add_row(f"{p['student']} -> {p['teacher']}", *[fmt(p[m]) for m in metrics])
    return table


SCORE_ORDER = ("accuracy", "macro_f1", "mcc", "f1", "teacher_agreement", "rougeL", "perplexity")
"""Task scores shown on screen, in this order (classification, then causal LM)."""


def scores_text(scores: dict[str, float]) -> str:
    return "  ".join(f"{k} {fmt(scores[k])}" for k in SCORE_ORDER if k in scores)


class DistillView:
    """Live view of a distillation run.

    rich: a progress bar (epoch, step, samples/s, ETA), the latest loss terms, the per-pair
    geometry table and the latest evaluation, redrawn in place. plain: one line per event.
    quiet: nothing. With ``json_lines`` every event is also written to stdout as JSON.
    """

    def __init__(self, mode: Mode, json_lines: bool = False) -> None:
        self.mode = mode
        self.json_lines = json_lines
        self._live: Any = None
        self._progress: Progress | None = None
        self._task: Any = None
        self._ft_task: Any = None
        self._loss = ""
        self._scores = ""
        self._monitor: Table | None = None
        self._first_step: tuple[int, float] | None = None
        """(step, time.monotonic()) of the first Step seen: the plain lines' ETA is the mean pace since then."""

    def _render(self) -> Any:
        from rich.console import Group

        parts: list[Any] = [self._progress] if self._progress is not None else []
        if self._loss:
            parts.append(Text(self._loss))
        if self._monitor is not None:
            parts.append(self._monitor)
        if self._scores:
            parts.append(Text(self._scores))
        return Group(*parts)

    def _ensure_live(self) -> None:
        if self.mode != "rich" or self._live is not None:
            return
        from rich.live import Live

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            EtaColumn(),
            console=err_console,
        )
        self._live = Live(self._render(), console=err_console, refresh_per_second=4, transient=False)
        self._live.start()

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def __call__(self, event: Event) -> None:
        if self.json_lines and not isinstance(event, FinetuneStep):  # fine-tune steps are not part of a run's record
            emit_json(events.to_dict(event), DISTILL_STDOUT_CLOSED_NOTE)
        match event:  # shown even with --quiet: they change what the numbers mean
            case RunWarning(message=message):
                self._warn(message)
                return
            case NonFinite(step=step, terms=terms, action=action):
                what = {"skipped": "update skipped", "monitor": "monitor values are NaN"}.get(action, action)
                self._warn(f"non-finite values at step {step} in {', '.join(terms)} ({what})")
                return
        if self.mode == "quiet":
            return
        match event:
            case Stage(message=message):
                self._print(message)
            case FinetuneStep():
                self._finetune_step(event)
            case Start():
                self._start(event)
            case Resume(step=step, checkpoint=path):
                self._resume(step, path)
            case Step():
                self._step(event)
            case Monitor(step=step, pairs=pairs):
                self._show_monitor(step, pairs)
            case Eval(step=step, epoch=epoch, scores=scores):
                text = f"eval (step {step}, epoch {epoch:g}): {scores_text(scores)}"
                if self.mode == "rich":
                    self._scores = text
                    self._refresh()
                else:
                    info(text, self.mode)
            case RunFailed(variant=variant, seed=seed, error=message):
                self.close()
                error(f"run {variant} seed {seed} failed: {message}")
            case Done(summary=summary):
                self._done(summary)
            case Checkpoint():
                pass  # in metrics.jsonl and --json only: the run directory says where checkpoints are

    def _print(self, message: str) -> None:
        """A line above the live display while it runs (it would overwrite a plain print), else a plain line."""
        if self._live is not None:
            self._live.console.print(Text(message))
        else:
            info(message, self.mode)

    def _finetune_step(self, event: FinetuneStep) -> None:
        if self.mode == "rich":
            self._ensure_live()
            assert self._progress is not None
            if self._ft_task is None:
                self._ft_task = self._progress.add_task("fine-tuning teacher", total=event.total, rate="")
            self._progress.update(self._ft_task, completed=event.step, rate=f"loss {event.loss:.3f}")
            self._refresh()
        elif event.step == event.total or event.step % max(1, event.total // 5) == 0:  # plain: about 5 lines
            info(f"teacher fine-tuning step {event.step}/{event.total}  loss {fmt(event.loss)}", self.mode)

    def _start(self, event: Start) -> None:
        line = (
            f"training: {event.total_steps} steps ({event.steps_per_epoch}/epoch) on {event.train_samples} examples, "
            f"device {event.device}, precision {event.precision}, losses {' + '.join(event.losses)}"
        )
        if event.pairs:
            line += ", pairs " + ", ".join(f"{s}->{t}" for s, t in event.pairs)
        line += f"; teacher {scores_text(event.teacher_scores)}"
        if self.mode == "rich":
            self._ensure_live()
            assert self._progress is not None
            self._print(line)
            self._task = self._progress.add_task("distilling", total=event.total_steps, rate="")
            self._refresh()
        else:
            info(line, self.mode)

    def _resume(self, step: int, path: str) -> None:
        line = f"resumed at step {step} from {path}"
        if self.mode == "rich":
            self._ensure_live()
            assert self._progress is not None
            self._print(line)
            if self._task is None:
                self._task = self._progress.add_task("distilling", total=None, rate="")
            self._progress.update(self._task, completed=step)
            self._refresh()
        else:
            info(line, self.mode)

    def _step(self, event: Step) -> None:
        text = f"epoch {event.epoch:.2f}  lr {event.lr:.2e}  {_loss_text(event.losses)}"
        if event.on_policy is not None:
            text += f"  {on_policy_text(event.on_policy)}"
        if self.mode == "rich" and self._progress is not None and self._task is not None:
            rate = f"{event.samples_per_s:.1f} samples/s"
            self._progress.update(self._task, completed=event.step, total=event.total_steps, rate=rate)
            self._loss = text
            self._refresh()
        else:
            line = f"step {event.step}/{event.total_steps}  {text}  {event.samples_per_s:.1f} samples/s"
            eta = self._eta(event.step, event.total_steps)
            info(line + (f"  {eta}" if eta else ""), self.mode)

    def _eta(self, step: int, total: int) -> str:
        """The plain line's ETA from the pace since the first step this view saw (a resumed run's earlier
        steps are not counted); empty until two steps are apart."""
        import time

        now = time.monotonic()
        if self._first_step is None or step <= self._first_step[0]:
            self._first_step = (step, now)
            return ""
        first, since = self._first_step
        return eta_text((now - since) / (step - first) * max(0, total - step))

    def _show_monitor(self, step: int, pairs: list[dict[str, float]]) -> None:
        if self.mode == "rich":
            self._monitor = monitor_table(step, pairs)
            self._refresh()
        else:
            cells = "; ".join(
                f"{p['student']}->{p['teacher']} "
                + " ".join(f"{k} {fmt(v)}" for k, v in p.items() if k not in ("student", "teacher"))
                for p in pairs
            )
            info(f"monitor step {step}: {cells}", self.mode)

    def _done(self, summary: dict[str, Any]) -> None:
        self.close()
        info(
            f"done in {summary['wall_seconds']:.1f}s ({summary['samples_per_s']:.1f} samples/s): student "
            f"{scores_text(summary['scores'])} | teacher {scores_text(summary['teacher_scores'])}",
            self.mode,
        )
        info(f"run directory: {summary['run_dir']}", self.mode)

    def _warn(self, message: str) -> None:
        if self._live is not None:
            self._live.console.print(Text("warning: ", style="yellow") + Text(message))
        else:
            warn(message)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def print_eval(result: Any) -> None:
    table = Table(
        title=Text(f"{result.model} on {result.dataset} [{result.split}], {result.samples} examples"),
        title_justify="left",
    )
    table.add_column("model")
    keys = [k for k in SCORE_ORDER if k in result.scores]
    for k in keys:
        table.add_column(k, justify="right")
    table.add_row(Text(str(result.model)), *[fmt(result.scores.get(k)) for k in keys])
    if result.teacher_scores is not None:
        table.add_row(Text(f"teacher {result.teacher}"), *[fmt(result.teacher_scores.get(k)) for k in keys])
    out_console.print(table)


def print_lm_eval(result: dict[str, Any]) -> None:
    """Causal-LM evaluation: ROUGE-L and perplexity per model."""
    first = next(iter(result["results"].values()))
    table = Table(
        title=Text(f"{result['model']} on {result['dataset']} [{result['split']}], {first['samples']} prompts"),
        title_justify="left",
    )
    keys = ("rougeL", "perplexity", "generated_tokens_mean")
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    for role, r in result["results"].items():
        name = r["model"] if role == "model" else f"teacher {r['model']}"
        table.add_row(Text(str(name)), *[fmt(r["scores"].get(k), 2 if k != "perplexity" else 3) for k in keys])
    out_console.print(table)


def print_sweep(outcomes: Sequence[Any], json_lines: bool = False) -> None:
    """One row per run of a sweep: status and final scores (to stderr with --json, else stdout)."""
    table = Table(title=Text("sweep"), title_justify="left")
    lm = any((o.summary or {}).get("task") == "causal-lm" for o in outcomes)
    shown = ("rougeL", "perplexity") if lm else ("accuracy", "macro_f1")
    for col in ("variant", "seed", "status", *shown, "run directory / error"):
        table.add_column(col, justify="right" if col in ("seed", *shown) else "left")
    for o in outcomes:
        scores = (o.summary or {}).get("scores", {})
        detail = o.error.splitlines()[0] if o.error else str(o.run_dir)
        table.add_row(Text(o.variant), str(o.seed), Text(o.status), *[fmt(scores.get(k)) for k in shown], Text(detail))
    (err_console if json_lines else out_console).print(table)
    failed = sum(o.status == "failed" for o in outcomes)
    complete = len(outcomes) - failed
    if failed and not complete:
        error(
            f"none of the {len(outcomes)} run{'s' if len(outcomes) != 1 else ''} completed (see above). Fix the cause "
            "and run the same command again."
        )
    elif failed:
        done, skipped = sum(o.status == "done" for o in outcomes), sum(o.status == "skipped" for o in outcomes)
        how = ", ".join(
            part for part in (f"{done} now" if done else "", f"{skipped} earlier" if skipped else "") if part
        )
        error(
            f"{failed} of {len(outcomes)} runs failed (see above); the other {complete} "
            f"{'is' if complete == 1 else 'are'} complete ({how}). Fix the cause and run the same command again: "
            "finished runs are skipped."
        )


def held_out_note(split: dict[str, Any] | None) -> str:
    """The dry run's note on a data.eval_fraction split: where its evaluation examples come from."""
    if not split:
        return ""
    return (
        f" (data.eval_fraction = {split['eval_fraction']:g}: {split['eval_examples']} of {split['rows']} rows held "
        f"out, split_seed {split['split_seed']})"
    )


def print_dry_run(plan: Any, json_lines: bool = False) -> None:
    """``kdgeo distill --dry-run``: a few lines per run (what it would do), the disk estimate, and that nothing ran.

    Lines, not a table: a run has a dozen facts, too many columns for a terminal. With ``json_lines``
    the plan is one JSON object on stdout (:meth:`kdgeo.dryrun.DryRun.to_json`).
    """
    from kdgeo.output_cache import format_bytes

    if json_lines:
        emit_json(plan.to_json())
        return

    def size(n: int | None) -> str:
        return format_bytes(n) if n is not None else "unknown"

    out_console.print(Text("dry run: the plan (nothing was trained or written)"))
    for r in plan.runs:
        run = r.name if not plan.sweep else f"{r.variant} seed {r.seed}"
        if r.status == "finished":
            out_console.print(Text(f"  {run}: finished earlier, skipped ({r.run_dir})"), soft_wrap=True)
            continue
        pairs = r.pairs if isinstance(r.pairs, str) else ", ".join(f"{s}->{t}" for s, t in r.pairs) or "none"
        losses = " + ".join(f"{l['kind']}" + (f" x{l['weight']:g}" if l["weight"] != 1 else "") for l in r.losses)
        written = f"checkpoints {size(r.checkpoints_bytes)} (keep_checkpoints + 1 of {size(r.checkpoint_bytes)})"
        if r.student_bytes is not None:
            written += f", student {size(r.student_bytes)}"
        if r.cache_bytes is not None:
            written += f", teacher-output cache {size(r.cache_bytes)} in {r.cache_dir}"
        if r.sequence_kd_entry is not None:
            state = "cached, read" if r.sequence_kd_cached else "not cached yet: generated first, at most"
            written += f", sequence-KD responses ({state} {size(r.sequence_kd_bytes)}) in {r.sequence_kd_entry}"
        params = f"{r.student_parameters:,}" if r.student_parameters is not None else "unknown"
        for line in (
            f"  {run} [{r.status}] -> {r.run_dir}",
            f"    {r.task}: {r.steps} steps ({r.steps_per_epoch}/epoch), {r.train_examples} training and "
            f"{r.eval_examples} evaluation examples{held_out_note(r.data_split)}, {r.precision} on {r.device}",
            f"    layer pairs {pairs}; losses {losses}; rows {r.rows}; student {params} parameters",
            f"    writes about: {written}",
        ):
            out_console.print(Text(line), soft_wrap=True)  # one fact per line, unbroken, for grep
    for d in plan.disk:
        line = f"disk: {d.directory} needs about {size(d.needed)}, {size(d.free)} free"
        out_console.print(Text(line), soft_wrap=True)
    todo = sum(r.status != "finished" for r in plan.runs)
    out_console.print(Text(f"pre-flight passed for {todo} run{'s' if todo != 1 else ''}; no run directory was created"))
