"""`kdgeo compare` on screen and in files: Rich tables, JSON, CSV, Markdown and a PNG plot.

:mod:`kdgeo.compare` loads the runs and does the statistics into a :class:`~kdgeo.compare.CompareResult`;
this module only renders it, so every view shows the same numbers. The CLI calls::

    result = compare(CompareArgs(runs=["runs/sweep"]))
    print_compare(result); write_json(result, "-"); write_csv(result, "c.csv"); write_markdown(result, "c.md")
    plot(result, "compare.png")

"-" writes to stdout; files are written atomically. NaN and inf become null in JSON and empty cells in CSV.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdgeo import rundir, stats
from kdgeo.compare import GEOMETRY_METRICS, CompareResult, MetricComparison
from kdgeo.errors import OutputError
from kdgeo.rundir import json_safe

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def fmt_p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "-"
    return f"{p:.1e}" if 0 < p < 1e-4 else f"{p:.4f}"


def _f(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def _ci(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "-"
    return f"[{low:.4f}, {high:.4f}]"


def _signed(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:+.4f}"


TEST_NAMES = {
    "t": "t-test (paired t / Welch)",
    "wilcoxon": "rank test (Wilcoxon signed-rank / Mann-Whitney U)",
    "permutation": "permutation test (sign-flip / two-sample)",
}


def _rows(comparison: MetricComparison) -> list[dict[str, Any]]:
    """One flat row per variant (the CSV/markdown view)."""
    versus = {v.variant: v for v in comparison.versus}
    out = []
    for vs in comparison.variants:
        s = vs.summary
        row: dict[str, Any] = {
            "metric": comparison.metric,
            "variant": vs.variant,
            "n": s.n,
            "mean": s.mean,
            "std": s.std,
            "ci_low": s.ci_low,
            "ci_high": s.ci_high,
            "seeds": " ".join("?" if x is None else str(x) for x in vs.seeds),
        }
        v = versus.get(vs.variant)
        row.update(
            {
                "role": "compared" if v else "baseline",
                "diff": v.diff if v else None,
                "diff_ci_low": v.diff_ci_low if v else None,
                "diff_ci_high": v.diff_ci_high if v else None,
                "pairing": v.pairing if v else "",
                "p_t": v.t.p_value if v else None,
                "p_rank": v.rank.p_value if v else None,
                "p_permutation": v.permutation.p_value if v else None,
                "p_holm": v.p_holm if v else None,
                "result": v.label if v else "",
            }
        )
        out.append(row)
    return out


def print_compare(result: CompareResult) -> None:
    """The tables on stdout (report.out_console); warnings on stderr. Markup off for run text.

    Per metric: one table of per-variant statistics (with the difference to the baseline), one
    of the tests against the baseline; then the geometry table and the notes. Laid out to stay
    readable in 80 columns (text cells wrap, numbers never shrink to an ellipsis).
    """
    from rich.text import Text

    from kdgeo import report

    for w in result.warnings:
        report.warn(w)
    con = report.out_console
    con.print(
        Text(
            f"{len(result.runs)} runs, {len(result.variants)} variant{'s' if len(result.variants) != 1 else ''}, "
            f"baseline {result.baseline}; task: {result.task}"
        )
    )
    for c in result.metrics:
        _print_metric(con, result, c)
    _print_geometry(con, result)
    for note in result.notes:
        con.print(Text(f"note: {note}"))


def _table(title: str, columns: list[tuple[str, int]]) -> Table:
    """A compact table: ``width`` > 0 marks a numeric column of that minimum width (right-aligned,
    never wrapped), <= 0 a text column (its absolute value the minimum width, 0 none)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for k, (name, width) in enumerate(columns):
        numeric = width > 0
        t.add_column(
            Text(name),
            justify="right" if numeric and k else "left",
            no_wrap=numeric and k > 0,
            min_width=abs(width) or None,
            overflow="fold",
        )
    return t


def _print_metric(con: Console, result: CompareResult, c: MetricComparison) -> None:
    """One metric: per-variant statistics, the tests against the baseline, the correlation and notes."""
    from rich.text import Text

    a = result.args
    arrow = "higher is better" if c.higher_is_better else "lower is better"
    versus = {v.variant: v for v in c.versus}
    t1 = _table(
        f"{c.metric} ({arrow}): mean over runs, 95% t interval; diff = variant - baseline",
        [("variant", 0), ("n", 1), ("mean", 6), ("std", 6), ("95% CI", 16), ("diff", 7), ("diff 95% CI", 18)],
    )
    for vs in c.variants:
        s = vs.summary
        v = versus.get(vs.variant)
        extra = ["baseline", ""] if v is None else [_signed(v.diff), _ci(v.diff_ci_low, v.diff_ci_high)]
        t1.add_row(
            Text(vs.variant, style="bold" if v is None else ""),
            str(s.n),
            _f(s.mean),
            _f(s.std),
            _ci(s.ci_low, s.ci_high),
            *extra,
        )
    con.print(t1)
    if c.versus:
        t2 = _table(
            f"{c.metric} vs {result.baseline}: p-values (paired: t, Wilcoxon signed-rank, sign-flip permutation; "
            f"unpaired: Welch t, Mann-Whitney U, two-sample permutation); significant = Holm-adjusted "
            f"{a.test} p < {a.alpha:g}",
            [
                ("variant", 0),
                ("pairing", -8),
                ("t p", 7),
                ("rank p", 7),
                ("perm p", 7),
                ("Holm p", 7),
                ("result", -4),
            ],
        )
        for v in c.versus:
            style = {"better": "green", "worse": "red"}.get(v.verdict, "")
            t2.add_row(
                Text(v.variant),
                Text(v.pairing),
                fmt_p(v.t.p_value),
                fmt_p(v.rank.p_value),
                fmt_p(v.permutation.p_value),
                fmt_p(v.p_holm),
                Text(v.label, style=style),
            )
        con.print(t2)
    if c.correlation is not None:
        r = c.correlation
        line = (
            f"Spearman rho(per-run mean procrustes, {c.metric}) = {_f(r.rho, 3)}, p = {fmt_p(r.p_value)}, n = "
            f"{r.n} runs"
        )
        con.print(Text(line + (f" ({r.note})" if r.note else "")))
    for note in c.notes:
        con.print(Text(f"note: {note}"))


def _print_geometry(con: Console, result: CompareResult) -> None:
    """The final geometry per layer pair next to the first metric, or why there is none."""
    from rich.text import Text

    if not result.geometry:
        con.print(Text("no final geometry in these runs (no layer pairs were monitored)"))
        return
    metric = result.metrics[0].metric
    t3 = _table(
        f"final geometry per layer pair (mean over runs) next to {metric}",
        [
            ("variant", 0),
            ("pair s->t", 9),
            ("runs", 4),
            ("procrustes", 10),
            ("cka", 6),
            ("gram", 6),
            (metric, max(6, len(metric))),
        ],
    )
    for g in result.geometry:
        t3.add_row(
            Text(g.variant),
            Text(f"{g.student}->{g.teacher}"),
            str(g.n),
            *[_f(g.values[m]) for m in GEOMETRY_METRICS],
            _f(g.score),
        )
    con.print(t3)
    con.print(Text("procrustes and gram: distances (lower = closer to the teacher); cka: similarity (higher = closer)"))


def _test_json(t: stats.TestResult) -> dict[str, Any]:
    return {"method": t.method, "statistic": t.statistic, "p": t.p_value, "n": t.n, "note": t.note}


def to_json(result: CompareResult) -> dict[str, Any]:
    """Everything in the tables as plain JSON types (NaN and inf become null).

    ``default_metric``: the metric picked by the runs' task when none was given; null when given."""
    a = result.args
    metrics = []
    for c in result.metrics:
        versus = {v.variant: v for v in c.versus}
        variants = []
        for vs in c.variants:
            s = vs.summary
            entry: dict[str, Any] = {
                "variant": vs.variant,
                "baseline": vs.variant == result.baseline,
                "n": s.n,
                "mean": s.mean,
                "std": s.std,
                "ci95": [s.ci_low, s.ci_high],
                "values": vs.values,
                "seeds": vs.seeds,
                "runs": vs.runs,
                "vs_baseline": None,
            }
            v = versus.get(vs.variant)
            if v is not None:
                entry["vs_baseline"] = {
                    "paired": v.paired,
                    "pairing": v.pairing,
                    "n": v.n,
                    "diff": v.diff,
                    "diff_ci95": [v.diff_ci_low, v.diff_ci_high],
                    "t": _test_json(v.t),
                    "rank": _test_json(v.rank),
                    "permutation": _test_json(v.permutation),
                    "test": a.test,
                    "p": v.p,
                    "p_holm": v.p_holm,
                    "significant": v.significant,
                    "verdict": v.verdict,
                }
            variants.append(entry)
        corr = c.correlation
        metrics.append(
            {
                "metric": c.metric,
                "higher_is_better": c.higher_is_better,
                "variants": variants,
                "spearman_procrustes": None
                if corr is None
                else {"rho": corr.rho, "p": corr.p_value, "n": corr.n, "note": corr.note},
                "notes": c.notes,
            }
        )
    data = {
        "task": {k: (list(v) if isinstance(v, tuple) else v) for k, v in result.task.fields().items()},
        "runs": [{"path": str(r.path), "variant": r.variant, "seed": r.seed} for r in result.runs],
        "variants": result.variants,
        "baseline": result.baseline,
        "alpha": a.alpha,
        "test": a.test,
        "default_metric": result.default_metric,
        "fail_if_worse": a.fail_if_worse,
        "metrics": metrics,
        "geometry": [
            {
                "variant": g.variant,
                "student": g.student,
                "teacher": g.teacher,
                "runs": g.n,
                **g.values,
                "score": g.score,
            }
            for g in result.geometry
        ],
        "notes": result.notes,
        "warnings": result.warnings,
        "exit_code": result.exit_code,
    }
    return json_safe(data)


def _write(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` ("-" = stdout), atomically."""
    if str(path) == "-":
        from kdgeo import report

        report.write_stdout(text)  # a closed stdout drops the text with a note, it does not fail the command
        return
    rundir.write_text_atomic(os.path.expanduser(str(path)), text)


def write_json(result: CompareResult, path: str | Path) -> None:
    """:func:`to_json` to ``path`` ("-" = stdout)."""
    _write(path, json.dumps(to_json(result), indent=2) + "\n")


CSV_COLUMNS = (
    "metric",
    "variant",
    "role",
    "n",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "diff",
    "diff_ci_low",
    "diff_ci_high",
    "pairing",
    "p_t",
    "p_rank",
    "p_permutation",
    "p_holm",
    "result",
    "seeds",
)


def write_csv(result: CompareResult, path: str | Path) -> None:
    """One row per (metric, variant) with the statistics columns (CSV_COLUMNS); "-" = stdout.

    Empty cells: not applicable (the baseline's diff) or undefined (std of one run)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for c in result.metrics:
        for row in _rows(c):
            writer.writerow({k: "" if json_safe(row[k]) is None else row[k] for k in CSV_COLUMNS})
    _write(path, buf.getvalue())


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_markdown(result: CompareResult, path: str | Path) -> None:
    """Markdown tables (one per metric, then geometry) and notes; "-" = stdout."""
    a = result.args
    lines = [
        f"# kdgeo compare: {len(result.runs)} runs, baseline `{_md(result.baseline)}`",
        "",
        f"Task: {_md(result.task)}",
        "",
    ]
    for c in result.metrics:
        arrow = "higher is better" if c.higher_is_better else "lower is better"
        lines += [
            f"## {c.metric} ({arrow})",
            "",
            f"Significance: {TEST_NAMES[a.test]}, Holm-adjusted, alpha {a.alpha:g}.",
            "",
        ]
        header = [
            "variant",
            "n",
            "mean",
            "std",
            "95% CI",
            "diff",
            "diff 95% CI",
            "t p",
            "rank p",
            "perm p",
            "Holm p",
            "result",
            "pairing",
        ]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if h in ("variant", "result", "pairing") else "---:" for h in header) + "|")
        for row in _rows(c):
            is_base = row["role"] == "baseline"
            cells = [
                _md(row["variant"]),
                str(row["n"]),
                _f(row["mean"]),
                _f(row["std"]),
                _ci(row["ci_low"], row["ci_high"]),
            ]
            if is_base:
                cells += ["baseline", "", "", "", "", "", "", ""]
            else:
                cells += [
                    _signed(row["diff"]),
                    _ci(row["diff_ci_low"], row["diff_ci_high"]),
                    fmt_p(row["p_t"]),
                    fmt_p(row["p_rank"]),
                    fmt_p(row["p_permutation"]),
                    fmt_p(row["p_holm"]),
                    _md(row["result"]),
                    _md(row["pairing"]),
                ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if c.correlation is not None:
            r = c.correlation
            lines += [
                f"Spearman rho(per-run mean procrustes, {c.metric}) = {_f(r.rho, 3)}, p = {fmt_p(r.p_value)}, n = {r.n}"
                + (f" ({r.note})" if r.note else ""),
                "",
            ]
        lines += [f"- {_md(n)}" for n in c.notes] + ([""] if c.notes else [])
    if result.geometry:
        metric = result.metrics[0].metric
        lines += [
            "## Final geometry per layer pair (mean over runs)",
            "",
            f"| variant | student -> teacher | runs | procrustes (lower) | cka (higher) | gram (lower) | {metric} "
            "(mean) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for g in result.geometry:
            lines.append(
                f"| {_md(g.variant)} | {g.student} -> {g.teacher} | {g.n} | "
                + " | ".join(_f(g.values[m]) for m in GEOMETRY_METRICS)
                + f" | {_f(g.score)} |"
            )
        lines.append("")
    if result.notes:
        lines += ["## Notes", ""] + [f"- {_md(n)}" for n in result.notes] + [""]
    _write(path, "\n".join(lines))


def plot(result: CompareResult, path: str | Path) -> None:
    """PNG: per metric, learning curves (mean over runs, min-max band) and final values per variant
    (one point per run, mean, 95% CI bar). Uses the Agg canvas directly (no global backend)."""
    from kdgeo.files import prepare_matplotlib

    prepare_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = len(result.metrics)
    fig = Figure(figsize=(12, 4.2 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(result.variants))]
    for (ax_curve, ax_final), c in zip(axes, result.metrics):
        any_curve = False
        for color, variant in zip(colors, result.variants):
            recs = [r for r in result.runs if r.variant == variant]
            by_step: dict[int, list[float]] = {}
            for r in recs:
                for step, v in r.curve_of(c.metric):
                    by_step.setdefault(step, []).append(v)
            if not by_step:
                continue
            any_curve = True
            steps = sorted(by_step)
            mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            ax_curve.plot(steps, mean, color=color, marker="o", ms=3, label=f"{variant} ({len(recs)} runs)")
            ax_curve.fill_between(
                steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], color=color, alpha=0.2
            )
        ax_curve.set_xlabel("step")
        ax_curve.set_ylabel(c.metric)
        ax_curve.set_title(f"{c.metric} during training (mean, min-max band)")
        if any_curve:
            ax_curve.legend(fontsize=8)
        else:
            ax_curve.text(
                0.5, 0.5, "no evaluations in metrics.jsonl", ha="center", va="center", transform=ax_curve.transAxes
            )
        versus = {v.variant: v for v in c.versus}
        for i, (color, vs) in enumerate(zip(colors, c.variants)):
            n = len(vs.values)
            xs = [i + (k - (n - 1) / 2) * (0.25 / max(n - 1, 1)) for k in range(n)]
            ax_final.scatter(xs, vs.values, color=color, s=18, alpha=0.7, zorder=2)
            s = vs.summary
            if math.isfinite(s.ci_low) and math.isfinite(s.ci_high):
                ax_final.errorbar(
                    [i], [s.mean], yerr=[[s.mean - s.ci_low], [s.ci_high - s.mean]], color="black", capsize=6, zorder=3
                )
            ax_final.scatter([i], [s.mean], color="black", marker="D", s=30, zorder=4)
            vb = versus.get(vs.variant)
            if vb is not None and vb.significant:
                ax_final.annotate(
                    vb.verdict,
                    (i + 0.2, s.mean),
                    textcoords="offset points",
                    xytext=(4, 0),
                    fontsize=8,
                    va="center",
                    color="green" if vb.verdict == "better" else "red",
                )
        ax_final.set_xticks(range(len(c.variants)))
        ax_final.set_xticklabels(
            [vs.variant + (" (baseline)" if vs.variant == result.baseline else "") for vs in c.variants],
            rotation=20,
            ha="right",
            fontsize=8,
        )
        ax_final.set_ylabel(c.metric)
        ax_final.set_title(f"final {c.metric}: runs, mean, 95% CI")
    fig.tight_layout()
    from kdgeo import report

    try:
        if str(path) == "-":
            if not report.is_stdout_closed():
                fig.savefig(sys.stdout.buffer, format="png", dpi=110)
                sys.stdout.buffer.flush()
        else:
            fig.savefig(os.path.expanduser(str(path)), format="png", dpi=110)
    except BrokenPipeError:
        report.stdout_closed()
    except OSError as err:
        raise OutputError(
            f"cannot write the plot to {path}: {err.strerror or err}. Check the directory exists and is writable."
        ) from None
