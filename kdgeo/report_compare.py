"""`kdgeo compare` on screen and in files: Rich tables, JSON, CSV, Markdown and a PNG plot.

:mod:`kdgeo.comparison` loads the runs and does the statistics into a :class:`~kdgeo.comparison.CompareResult`;
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
from kdgeo.comparison import GEOMETRY_METRICS, CompareResult, MetricComparison, VersusBaseline
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
                "test": v.test if v else "",
                "evidence": v.evidence if v else "",
                "p": v.p if v else None,
                "estimate": v.estimate if v else None,
                "diff_ci_confidence": v.diff_ci_confidence if v else None,
                "diff_ci95_low": v.diff_ci95[0] if v else None,
                "diff_ci95_high": v.diff_ci95[1] if v else None,
                "hodges_lehmann": v.hodges_lehmann if v else None,
                "prob_improvement": v.prob_improvement if v else None,
                "min_p": v.min_p if v else None,
                "can_reach_alpha": v.can_reach_alpha if v else "",
                "runs_needed": v.runs_needed if v else None,
                "examples": v.examples.examples if v and v.examples else None,
                "bootstrap_diff": v.examples.bootstrap.diff if v and v.examples else None,
                "bootstrap_ci_low": v.examples.bootstrap.ci_low if v and v.examples else None,
                "bootstrap_ci_high": v.examples.bootstrap.ci_high if v and v.examples else None,
                "bootstrap_p": v.examples.bootstrap.p_value if v and v.examples else None,
                "mcnemar_p": v.examples.mcnemar.p_value if v and v.examples and v.examples.mcnemar else None,
                "margin": v.margin if v else None,
                "margin_p": v.margin_p if v and v.margin is not None else None,
                "gate_p_holm": v.gate_p_holm if v else None,
                "fails_gate": v.fails_gate if v else "",
                "left_out": _left_out(v.left_out) if v else "",
            }
        )
        out.append(row)
    return out


def _left_out(left: tuple[tuple[int | None, ...], tuple[int | None, ...]]) -> str:
    """Seeds left out of the pairing: "variant: 4; baseline: -" ('' when none)."""
    if not any(left):
        return ""
    return "; ".join(
        f"{side}: {' '.join('?' if s is None else str(s) for s in seeds) or '-'}"
        for side, seeds in zip(("variant", "baseline"), left)
    )


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
            f"baseline {result.baseline}; {task_text(result.task)}"
        )
    )
    for c in result.metrics:
        _print_metric(con, result, c)
    _print_geometry(con, result)
    for note in result.notes:
        con.print(Text(f"note: {note}"))


def task_text(key: Any) -> str:
    """What the runs were evaluated on, for people: ``classification; dataset kdgeo:wordnet-supersenses;
    eval_split validation; label_names noun.animal, noun.plant`` (no ``task=`` or ``[...]`` reprs: --json has
    the typed values). Fields the runs do not record are left out; a differing field says so."""
    parts = [str(key.task) if key.task is not None else "task not recorded"]
    for name, value in key.fields().items():
        if name in ("task", "differs"):
            continue
        if name in key.differs:
            parts.append(f"{name} differs between runs")
        elif value is not None:
            if isinstance(value, (list, tuple)):
                value = ", ".join(map(str, value))
            parts.append(f"{name} {str(value)[:12] if name == 'eval_sha256' else value}")
    return "; ".join(parts)


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
    level = _level(c)
    t1 = _table(
        f"{c.metric} ({arrow}): mean over runs, 95% t interval; diff = variant - baseline, its interval at {level} "
        "(the level and evidence of the verdict)",
        [("variant", 0), ("n", 1), ("mean", 6), ("std", 6), ("95% CI", 16), ("diff", 7), (f"diff {level} CI", 18)],
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
    if result.swept:
        _print_sweep(con, result, c)
    if c.versus:
        t2 = _table(
            f"{c.metric} vs {result.baseline}: p-values (paired: t, Wilcoxon signed-rank, sign-flip permutation; "
            f"unpaired: Welch t, Mann-Whitney U, two-sample permutation); significant = Holm-adjusted p of the "
            f"deciding test (--test {a.test}, or per-example evidence where the seeds cannot decide) < {a.alpha:g}, "
            f"direction from that test's estimate; Holm family: {result.family}",
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
        t3 = _table(
            f"{c.metric} vs {result.baseline}: effect sizes and evidence (by: the deciding test, mcnemar and "
            "bootstrap over per-example predictions; estimate: its signed effect; HL: Hodges-Lehmann shift over "
            "seeds; P(win): share of seed pairs the variant wins; gate: what --fail-if-worse does with it)",
            [
                ("variant", 0),
                ("by", -7),
                ("estimate", 8),
                ("HL", 7),
                ("P(win)", 6),
                ("boot p", 7),
                ("McN. p", 7),
                ("gate", -4),
            ],
        )
        for v in c.versus:
            t3.add_row(
                Text(v.variant),
                Text(v.test),
                _signed(v.estimate),
                _signed(v.hodges_lehmann),
                _f(v.prob_improvement, 2),
                fmt_p(v.examples.bootstrap.p_value) if v.examples else "-",
                fmt_p(v.examples.mcnemar.p_value) if v.examples and v.examples.mcnemar else "-",
                Text(_gate_cell(v), style="red" if v.fails_gate else ""),
            )
        con.print(t3)
    for line in _correlation_lines(c):
        con.print(Text(line))
    for note in c.notes:
        con.print(Text(f"note: {note}"))


def _sweep_rows(result: CompareResult, c: MetricComparison) -> list[dict[str, Any]]:
    """The variants of a grid sweep along their swept values, in compare's order (base variant, then value): base,
    each swept key's value (None where a variant's grid lacks that key), n, mean, 95% CI and the mean over runs of
    the final mean Procrustes distance (None when a run did not measure it)."""
    rows = []
    for vs in c.variants:
        if vs.variant not in result.swept:
            continue
        geometry = [r.geometry_value("procrustes") for r in result.runs if r.variant == vs.variant]
        present = [g for g in geometry if g is not None]
        rows.append(
            {
                "variant": vs.variant,
                "base": result.bases[vs.variant],
                "values": [result.swept[vs.variant].get(k) for k in result.swept_keys],
                "summary": vs.summary,
                "procrustes": sum(present) / len(present) if present and len(present) == len(geometry) else None,
            }
        )
    return rows


def _value_cell(value: Any) -> str:
    """A swept value as the variant names show it ("-": this variant's grid has no such key)."""
    from kdgeo.spec import grid_value_text

    return "-" if value is None else grid_value_text(value)


def _print_sweep(con: Console, result: CompareResult, c: MetricComparison) -> None:
    """The grid's variants as rows with their swept values as columns, the metric and the final geometry."""
    from rich.text import Text

    table = _table(
        f"{c.metric} along the swept values (mean over runs, 95% t interval; procrustes: the final mean distance to "
        "the teacher over layer pairs, mean over runs)",
        [("base", 0), *[(k, -len(k)) for k in result.swept_keys], ("n", 1), ("mean", 6), ("95% CI", 16)]
        + [("procrustes", 10)],
    )
    for row in _sweep_rows(result, c):
        s = row["summary"]
        table.add_row(
            Text(row["base"]),
            *[Text(_value_cell(v)) for v in row["values"]],
            str(s.n),
            _f(s.mean),
            _ci(s.ci_low, s.ci_high),
            _f(row["procrustes"]),
        )
    con.print(table)


def _level(c: MetricComparison) -> str:
    """The confidence of the metric's difference intervals, as a percentage ("95%", "97.5%")."""
    confidence = c.versus[0].diff_ci_confidence if c.versus else 0.95
    return f"{100 * confidence:.4g}%"


def _gate_cell(v: VersusBaseline) -> str:
    """FAIL / pass / cannot fire, with the margin when there is one."""
    state = "FAIL" if v.fails_gate else ("pass" if v.can_reach_alpha else "cannot fire")
    return state + (f" (margin {v.margin:g}, Holm p {fmt_p(v.gate_p_holm)})" if v.margin is not None else "")


def _correlation_lines(c: MetricComparison) -> list[str]:
    """Geometry vs the metric: between variants (variant means) and within variants (deviations from them), and the
    runs pooled as if independent only as a caveat (its p-value overstates the evidence)."""
    lines = []
    for label, r, unit in (
        ("between variants (variant means)", c.correlation_between, "variants"),
        ("within variants (deviations from the variant means)", c.correlation_within, "runs"),
    ):
        if r is not None:
            lines.append(
                f"Spearman rho(mean procrustes, {c.metric}) {label} = {_f(r.rho, 3)}, p = {fmt_p(r.p_value)}, "
                f"n = {r.n} {unit}" + (f" ({r.note})" if r.note else "")
            )
    if c.correlation is not None and lines:
        r = c.correlation
        lines.append(
            f"(all {r.n} runs pooled: rho = {_f(r.rho, 3)}; not a valid test: runs of one variant are not independent)"
        )
    elif c.correlation is not None:
        r = c.correlation
        lines.append(
            f"Spearman rho(per-run mean procrustes, {c.metric}) = {_f(r.rho, 3)}, p = {fmt_p(r.p_value)}, n = {r.n} "
            "runs" + (f" ({r.note})" if r.note else "")
        )
    return lines


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
    return {
        "method": t.method,
        "statistic": t.statistic,
        "p": t.p_value,
        "n": t.n,
        "note": t.note,
        "estimate": t.estimate,
        "min_p": t.min_p,
    }


def _corr_json(c: stats.Correlation | None) -> dict[str, Any] | None:
    return None if c is None else {"rho": c.rho, "p": c.p_value, "n": c.n, "note": c.note}


def _examples_json(v: VersusBaseline) -> dict[str, Any] | None:
    """The per-example evidence of one comparison (None without predictions.jsonl in every run used)."""
    e = v.examples
    if e is None:
        return None
    b = e.bootstrap
    return {
        "examples": e.examples,
        "seeds": e.seeds,
        "bootstrap": {
            "method": b.method,
            "diff": b.diff,
            "ci": [b.ci_low, b.ci_high],
            "confidence": v.diff_ci_confidence,
            "p": b.p_value,
            "n_seeds": b.n_seeds,
            "n_examples": b.n_examples,
            "resamples": b.resamples,
            "note": b.note,
        },
        "mcnemar": None if e.mcnemar is None else _test_json(e.mcnemar),
    }


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
                "base_variant": result.bases.get(vs.variant),
                "swept": result.swept.get(vs.variant),
                "vs_baseline": None,
            }
            v = versus.get(vs.variant)
            if v is not None:
                entry["vs_baseline"] = {
                    "paired": v.paired,
                    "pairing": v.pairing,
                    "n": v.n,
                    "diff": v.diff,
                    "diff_ci95": list(v.diff_ci95),
                    "t": _test_json(v.t),
                    "rank": _test_json(v.rank),
                    "permutation": _test_json(v.permutation),
                    "test": a.test,
                    "p": v.p,
                    "p_holm": v.p_holm,
                    "significant": v.significant,
                    "verdict": v.verdict,
                    "decided_by": v.test,
                    "evidence": v.evidence,
                    "estimate": v.estimate,
                    "seeds_paired": list(v.seeds),
                    "seeds_left_out": {vs.variant: list(v.left_out[0]), result.baseline: list(v.left_out[1])},
                    "diff_ci": {
                        "low": v.diff_ci_low,
                        "high": v.diff_ci_high,
                        "confidence": v.diff_ci_confidence,
                        "method": v.diff_ci_method,
                    },
                    "hodges_lehmann": v.hodges_lehmann,
                    "prob_improvement": v.prob_improvement,
                    "min_p": v.min_p,
                    "can_reach_alpha": v.can_reach_alpha,
                    "runs_needed": v.runs_needed,
                    "gate_note": v.gate_note,
                    "examples": _examples_json(v),
                    "examples_note": v.examples_note,
                    "margin": None
                    if v.margin is None
                    else {"value": v.margin, "p": v.margin_p, "estimate": v.margin_estimate},
                    "gate_p_holm": v.gate_p_holm,
                    "fails_gate": v.fails_gate,
                }
            variants.append(entry)
        corr = c.correlation
        metrics.append(
            {
                "metric": c.metric,
                "higher_is_better": c.higher_is_better,
                "variants": variants,
                "spearman_procrustes": _corr_json(corr),
                "spearman_procrustes_between": _corr_json(c.correlation_between),
                "spearman_procrustes_within": _corr_json(c.correlation_within),
                "direction": c.direction,
                "margin": c.margin,
                "notes": c.notes,
            }
        )
    data = {
        "task": {k: (list(v) if isinstance(v, tuple) else v) for k, v in result.task.fields().items()},
        "runs": [
            {
                "path": str(r.path),
                "variant": r.variant,
                "seed": r.seed,
                # the run's own evaluation set (fields it does not record: null); "task" above holds what all share
                "eval_set": {
                    k: (list(v) if isinstance(v, tuple) else v) for k, v in r.task.fields().items() if k != "differs"
                },
            }
            for r in result.runs
        ],
        "variants": result.variants,
        "swept_keys": result.swept_keys,
        "baseline": result.baseline,
        "alpha": a.alpha,
        "test": a.test,
        "default_metric": result.default_metric,
        "fail_if_worse": a.fail_if_worse,
        "holm_family": result.family,
        "margin": list(a.margin),
        "higher_is_better_declared": list(a.higher_is_better),
        "lower_is_better_declared": list(a.lower_is_better),
        "verdict": result.verdict,
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
    # issue 13: the deciding test, effect sizes, the gate and per-example evidence (appended: old columns keep
    # their positions)
    "test",
    "evidence",
    "p",
    "estimate",
    "diff_ci_confidence",
    "diff_ci95_low",
    "diff_ci95_high",
    "hodges_lehmann",
    "prob_improvement",
    "min_p",
    "can_reach_alpha",
    "runs_needed",
    "examples",
    "bootstrap_diff",
    "bootstrap_ci_low",
    "bootstrap_ci_high",
    "bootstrap_p",
    "mcnemar_p",
    "margin",
    "margin_p",
    "gate_p_holm",
    "fails_gate",
    "left_out",
    # issue 16 F: a grid sweep's variants (empty for other variants)
    "base_variant",
    "swept",
)


def write_csv(result: CompareResult, path: str | Path) -> None:
    """One row per (metric, variant) with the statistics columns (CSV_COLUMNS); "-" = stdout.

    Empty cells: not applicable (the baseline's diff) or undefined (std of one run)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for c in result.metrics:
        for row in _rows(c):
            values = result.swept.get(row["variant"])
            row["base_variant"] = result.bases.get(row["variant"])
            row["swept"] = json.dumps(values) if values is not None else None  # one cell: the keys differ by grid
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
        f"Task: {_md(task_text(result.task))}",
        "",
        f"Gate: {_md(result.verdict)}",
        "",
    ]
    for c in result.metrics:
        arrow = "higher is better" if c.higher_is_better else "lower is better"
        lines += [
            f"## {c.metric} ({arrow})",
            "",
            f"Significance: {TEST_NAMES[a.test]} (per-example evidence where the seeds cannot decide), Holm-adjusted "
            f"over {_md(result.family)}, alpha {a.alpha:g}; direction from the deciding test's estimate. diff "
            f"intervals at {_level(c)}.",
            "",
        ]
        header = [
            "variant",
            "n",
            "mean",
            "std",
            "95% CI",
            "diff",
            f"diff {_level(c)} CI",
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
        if c.versus:
            effect = ["variant", "decided by", "estimate", "HL shift", "P(better)", "boot diff", "boot CI", "boot p"]
            effect += ["McNemar p", "min p", "gate"]
            lines.append("| " + " | ".join(effect) + " |")
            lines.append(
                "|" + "|".join("---" if h in ("variant", "decided by", "gate") else "---:" for h in effect) + "|"
            )
            for v in c.versus:
                e = v.examples
                cells = [
                    _md(v.variant),
                    _md(v.test + ("" if v.evidence == "seeds" else " (examples)")),
                    _signed(v.estimate),
                    _signed(v.hodges_lehmann),
                    _f(v.prob_improvement, 2),
                    _signed(e.bootstrap.diff) if e else "",
                    _ci(e.bootstrap.ci_low, e.bootstrap.ci_high) if e else "",
                    fmt_p(e.bootstrap.p_value) if e else "",
                    fmt_p(e.mcnemar.p_value) if e and e.mcnemar else "",
                    fmt_p(v.min_p),
                    _md(_gate_cell(v)),
                ]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        if result.swept:
            head = ["base", *result.swept_keys, "n", "mean", "95% CI", "procrustes"]
            lines += ["Along the swept values (procrustes: final mean distance to the teacher, mean over runs):", ""]
            lines.append("| " + " | ".join(_md(h) for h in head) + " |")
            lines.append(
                "|" + "|".join("---" if k <= len(result.swept_keys) else "---:" for k in range(len(head))) + "|"
            )
            for row in _sweep_rows(result, c):
                s = row["summary"]
                cells = [_md(row["base"]), *[_md(_value_cell(v)) for v in row["values"]], str(s.n), _f(s.mean)]
                lines.append("| " + " | ".join([*cells, _ci(s.ci_low, s.ci_high), _f(row["procrustes"])]) + " |")
            lines.append("")
        corr = _correlation_lines(c)
        lines += corr + ([""] if corr else [])
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
    """PNG of the comparison (see :func:`_plot_figure` for what it shows); ``path`` "-" writes to stdout.

    Uses the Agg canvas directly (no global backend, safe in a process that also draws elsewhere).
    """
    fig = _plot_figure(result)
    from kdgeo import report

    try:
        if str(path) == "-":
            if not report.is_stdout_closed():
                fig.savefig(sys.stdout.buffer, format="png", dpi=_plot_dpi(fig))
                sys.stdout.buffer.flush()
        else:
            fig.savefig(os.path.expanduser(str(path)), format="png", dpi=_plot_dpi(fig))
    except BrokenPipeError:
        report.stdout_closed()
    except OSError as err:
        raise OutputError(
            f"cannot write the plot to {path}: {err.strerror or err}. Check the directory exists and is writable."
        ) from None


_METRIC_RANGES: dict[str, tuple[float, float]] = {
    # task scores (kdgeo.metrics, kdgeo.generation.rouge_l: ROUGE-L F x 100)
    "accuracy": (0.0, 1.0),
    "macro_f1": (0.0, 1.0),
    "f1": (0.0, 1.0),
    "teacher_agreement": (0.0, 1.0),
    "mcc": (-1.0, 1.0),
    "rougeL": (0.0, 100.0),
    "perplexity": (1.0, math.inf),
    "response_nll": (0.0, math.inf),
    # geometry of a layer pair on centred, unit-Frobenius features (kdgeo.geometry's table)
    "procrustes": (0.0, 2.0),  # D^2 = 2 - 2 rho, rho in [0, 1]
    "procrustes_angular": (0.0, math.pi / 2),  # arccos(rho)
    "gram": (0.0, 2.0),  # FG, see geometry.gram_distance
    "cka": (0.0, 1.0),
    "cka_debiased": (-1.0, 1.0),  # Cauchy-Schwarz in the U-centred inner product
    "projection": (0.0, 1.0),
}
"""The values a metric can take, (low, high); a metric not listed is taken as unbounded. Used only to cut the
plot's intervals to what is possible: a t interval from 2 seeds is +-12.7 standard errors wide and would
otherwise run far past any accuracy."""

_PLOT_DPI = 110
_MAX_PLOT_PIXELS = 30_000
"""Largest side of the PNG in pixels: Agg refuses images over 2^16 pixels a side, and a sweep of hundreds of
variants x several metrics gets there at 110 dpi; such a figure is saved at a lower dpi instead."""
_WRAP = 64
"""Variant names longer than this are wrapped onto several lines (never cut)."""
_LABEL_PT = 8.0
_LEGEND_PT = 7.0
_LINE_IN = 1.3 * _LABEL_PT / 72  # one line of label text, in inches (the font's line height is ~1.2 em)
_PLOT_WIDTH_IN = 6.5  # the data area of each panel; the labels get what they measure on top of it


def _difference_range(metric: str) -> tuple[float, float]:
    """The values ``mean(variant) - mean(baseline)`` of ``metric`` can take: ``[low - high, high - low]``.

    A difference of two values in [low, high] lies in [low - high, high - low] (accuracy: [-1, 1]); this
    bound holds for the true difference whatever the baseline's true value is, so cutting an interval to
    it drops only impossible values. A metric bounded on one side only (perplexity >= 1) or not listed in
    :data:`_METRIC_RANGES` gives (-inf, inf): nothing is cut.
    """
    low, high = _METRIC_RANGES.get(metric, (-math.inf, math.inf))
    span = high - low
    return -span, span


def _wrap_name(name: str, width: int = _WRAP) -> str:
    """``name`` on lines of at most ``width`` characters, nothing dropped (long words are split)."""
    if len(name) <= width:
        return name
    import textwrap

    return "\n".join(textwrap.wrap(name, width, break_long_words=True, break_on_hyphens=True)) or name


def _plot_dpi(fig: Any) -> float:
    """:data:`_PLOT_DPI`, lowered so that neither side of the PNG exceeds :data:`_MAX_PLOT_PIXELS`."""
    width, height = fig.get_size_inches()
    return float(min(_PLOT_DPI, _MAX_PLOT_PIXELS / max(width, height, 1e-9)))


def _plot_figure(result: CompareResult) -> Any:
    """The comparison as a matplotlib Figure (Agg canvas): per metric, two panels one above the other.

    1. Differences from the baseline, one row per variant (horizontal, so 40 variants with long names stay
       readable): the point is ``VersusBaseline.diff`` -- the paired mean difference when the runs pair on
       seeds, else the difference of the means --, the bar its interval ``[diff_ci_low, diff_ci_high]``,
       exactly as the tables report them. A variant's own spread across seeds is not shown: with paired
       seeds it mostly cancels in the difference, and overlapping per-variant intervals are not a test.
       Red: significantly worse, green: significantly better (the verdict of the tables, Holm-adjusted),
       grey: not significant; the right-hand labels give the verdict and Holm-adjusted p, and "unpaired"
       where the comparison could not pair seeds (hollow point). An interval end beyond
       :func:`_difference_range` is cut there and marked with a triangle, and the axis label says how many
       were cut and to what range.
    2. The metric during training: the mean over each variant's runs at every evaluated step, with the
       min-max band over runs. A variant evaluated at a single step is drawn as a point with a min-max
       bar (a one-point line would be invisible).
    3. Only for the variants of a grid sweep ([sweep.grid]): the metric (mean over runs with its 95% t interval)
       against the first swept value, one line per base variant (and per value of any other swept key), with the
       baseline's mean as a dashed line when it is not in the grid; beside it the final mean Procrustes distance
       (mean over runs) against the same value (:func:`_draw_sweep`).

    The figure is as tall as its rows need (each variant gets the same height, more when its name wraps)
    and as wide as its measured labels need, so names are neither cut nor drawn over one another.
    Returns the matplotlib ``Figure`` (typed Any: matplotlib is imported lazily, after
    :func:`kdgeo.files.prepare_matplotlib`).
    """
    from kdgeo.files import prepare_matplotlib

    prepare_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    others = [v for v in result.variants if v != result.baseline]
    lines = max((_wrap_name(v).count("\n") + 1 for v in others), default=1)
    pitch = lines * _LINE_IN + 0.12  # inches per variant row: the label plus a gap
    diff_h = max(2.6, pitch * len(others) + 1.9)  # title, axis label with the clipping note, ticks
    legend_lines = sum(_wrap_name(v).count("\n") + 1 for v in result.variants)
    curve_h = max(3.2, legend_lines * _LEGEND_PT * 1.25 / 72 + len(result.variants) * 0.06 + 1.2)
    per_metric = (diff_h, curve_h, _SWEEP_H) if result.swept else (diff_h, curve_h)
    heights = [h for _ in result.metrics for h in per_metric]
    fig = Figure(figsize=(12.0, sum(heights)), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    rows = len(per_metric)
    for k, c in enumerate(result.metrics):
        _draw_differences(fig.add_subplot(grid[rows * k, 0]), result, c, others)
        _draw_curves(fig.add_subplot(grid[rows * k + 1, 0]), result, c)
        if result.swept:
            pair = grid[rows * k + 2, 0].subgridspec(1, 2, wspace=0.08)
            _draw_sweep(fig.add_subplot(pair[0, 0]), fig.add_subplot(pair[0, 1]), result, c)
    # Width from the labels as the renderer measures them: the widest name on the left, the widest
    # verdict label or legend on the right, plus a fixed data area.
    renderer = canvas.get_renderer()
    left = right = 0.0
    for ax in fig.axes:
        texts = list(ax.get_yticklabels()) + [ax.yaxis.label]
        left = max([left] + [t.get_window_extent(renderer).width for t in texts if t.get_text()])
        for side in ax.child_axes:  # the secondary (right) axis of the differences
            right = max([right] + [t.get_window_extent(renderer).width for t in side.get_yticklabels()])
        legend = ax.get_legend()
        if legend is not None:
            right = max(right, legend.get_window_extent(renderer).width)
    width = (left + right) / fig.dpi + _PLOT_WIDTH_IN + 1.0
    fig.set_size_inches(max(10.0, width), sum(heights))
    return fig


def _draw_differences(ax: Any, result: CompareResult, c: MetricComparison, others: list[str]) -> None:
    """Panel 1 of :func:`_plot_figure`: each variant's difference from the baseline with its interval."""
    versus = {v.variant: v for v in c.versus}
    rows = [v for v in others if v in versus]
    direction = "higher is better" if c.higher_is_better else "lower is better"
    ax.set_title(
        _wrap_name(f"{c.metric}: difference from the baseline {result.baseline}, with its interval", 100),
        fontsize=10,
    )
    if not rows:
        ax.text(0.5, 0.5, "no variant to compare with the baseline", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
        ax.set_xlabel(f"{c.metric}: variant - baseline ({direction})")
        return
    low, high = _difference_range(c.metric)
    cut = outside = 0  # interval ends cut; differences themselves out of range (only from corrupt values)
    right_labels: list[str] = []
    colours: list[str] = []
    for y, name in enumerate(rows):
        vb = versus[name]
        colour = {"better": "tab:green", "worse": "tab:red"}.get(vb.verdict, "0.45")
        colours.append(colour)
        verdict = "n.s." if vb.verdict == "n.s." else f"significant ({vb.verdict})"
        right_labels.append(f"{verdict}, p_holm {fmt_p(vb.p_holm)}" + ("" if vb.paired else ", unpaired"))
        lo, hi = vb.diff_ci_low, vb.diff_ci_high
        if math.isfinite(lo) and math.isfinite(hi):
            lo_c, hi_c = max(lo, low), min(hi, high)
            ax.plot([lo_c, hi_c], [y, y], color=colour, lw=2.2, solid_capstyle="butt", zorder=2, gid=f"interval:{name}")
            for end, clipped, marker in ((lo_c, lo < low, "<"), (hi_c, hi > high, ">")):
                # a cut end gets a triangle pointing where the interval went on; an intact end a cap
                ax.plot(
                    [end],
                    [y],
                    marker=marker if clipped else "|",
                    ms=8 if clipped else 9,
                    color=colour,
                    zorder=3,
                    gid=f"{'cut' if clipped else 'cap'}:{name}",
                )
            cut += (lo < low) + (hi > high)
        if math.isfinite(vb.diff):
            diff = min(max(vb.diff, low), high)
            outside += diff != vb.diff
            ax.plot(
                [diff],
                [y],
                marker="D" if vb.paired else "o",
                ms=6,
                color=colour,
                markerfacecolor=colour if vb.paired else "white",
                zorder=4,
                gid=f"diff:{name}",
            )
    ax.axvline(0.0, color="0.3", lw=0.8, ls="--", zorder=1)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first variant on top, one unit per row
    ax.set_yticks(range(len(rows)), [_wrap_name(v) for v in rows], fontsize=_LABEL_PT)
    side = ax.secondary_yaxis("right")
    side.set_yticks(range(len(rows)), right_labels, fontsize=_LABEL_PT)
    for label, colour in zip(side.get_yticklabels(), colours):
        label.set_color(colour)
    xlabel = f"{c.metric}: variant - baseline ({direction}; the point is the mean difference, the bar its interval)"
    if cut:
        xlabel += (
            f"\n{cut} interval end{'s' if cut != 1 else ''} cut at [{low:g}, {high:g}], the range of a difference "
            f"of two {c.metric} values (marked with triangles)"
        )
    if outside:
        xlabel += f"\n{outside} difference{'s' if outside != 1 else ''} outside [{low:g}, {high:g}] drawn at its edge"
    ax.set_xlabel(xlabel, fontsize=9)
    ax.grid(axis="x", color="0.9", zorder=0)


def _draw_curves(ax: Any, result: CompareResult, c: MetricComparison) -> None:
    """Panel 2 of :func:`_plot_figure`: ``c.metric`` over training steps, mean and min-max band per variant."""
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "v"]
    drawn = 0
    for i, variant in enumerate(result.variants):
        recs = [r for r in result.runs if r.variant == variant]
        by_step: dict[int, list[float]] = {}
        for r in recs:
            for step, v in r.curve_of(c.metric):
                by_step.setdefault(step, []).append(v)
        if not by_step:
            continue
        drawn += 1
        base = variant == result.baseline
        # 10 colours, then the next line style and marker: 40 variants stay told apart
        colour = "black" if base else f"C{i % 10}"
        steps = sorted(by_step)
        mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
        lows, highs = [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps]
        single = len(steps) == 1
        label = f"{_wrap_name(variant)} ({len(recs)} run{'s' if len(recs) != 1 else ''})" + (
            " (baseline)" if base else ""
        )
        ax.plot(
            steps,
            mean,
            color=colour,
            ls="none" if single else styles[(i // 10) % 4],
            lw=2 if base else 1.2,
            marker=markers[(i // 10) % 4],
            ms=7 if single else 3,
            label=label,
            gid=f"curve:{variant}",
        )
        if single:
            ax.errorbar(
                steps,
                mean,
                yerr=[[mean[0] - lows[0]], [highs[0] - mean[0]]],
                fmt="none",
                ecolor=colour,
                capsize=4,
                lw=1,
            )
        else:
            ax.fill_between(steps, lows, highs, color=colour, alpha=0.15, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel(c.metric)
    ax.set_title(f"{c.metric} during training (mean over runs, min-max band)", fontsize=10)
    if drawn:
        ax.legend(fontsize=_LEGEND_PT, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.text(0.5, 0.5, "no evaluations in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)


_SWEEP_H = 3.6
"""Height in inches of the sweep row (:func:`_draw_sweep`)."""
LOG_X_SPAN = 10.0
"""The swept axis is logarithmic when the values are all positive and the largest is at least this many times the
smallest (weights 0.1, 0.3, 1, 3: equal steps in log space, crowded on a linear axis)."""


def sweep_axis(values: list[Any]) -> tuple[str, list[Any]]:
    """How the swept values lie on the x axis: ("log" | "linear", the values sorted) when they are all numbers
    (``log`` when all positive and spanning at least :data:`LOG_X_SPAN` x), else ("category", in the order given)."""
    unique = list(dict.fromkeys(values))
    numbers = [v for v in unique if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(unique):
        return "category", unique
    ordered = sorted(numbers)
    if ordered and ordered[0] > 0 and ordered[-1] >= LOG_X_SPAN * ordered[0]:
        return "log", ordered
    return "linear", ordered


def _draw_sweep(ax: Any, ax_geo: Any, result: CompareResult, c: MetricComparison) -> None:
    """Panel 3 of :func:`_plot_figure`: ``c.metric`` and the final mean Procrustes distance against the first swept
    value, one line per base variant (and per value of any other swept key)."""
    key = result.swept_keys[0]
    rows = [r for r in _sweep_rows(result, c) if r["values"][0] is not None]
    scale, xs = sweep_axis([r["values"][0] for r in rows])
    position = {_value_cell(v): float(i) for i, v in enumerate(xs)} if scale == "category" else {}

    def x_of(value: Any) -> float:
        return position[_value_cell(value)] if scale == "category" else float(value)

    lines: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        rest = [f"{k}={_value_cell(v)}" for k, v in zip(result.swept_keys[1:], r["values"][1:]) if v is not None]
        lines.setdefault(", ".join([r["base"], *rest]), []).append(r)
    geometry_drawn = 0
    for i, (label, members) in enumerate(lines.items()):
        members = sorted(members, key=lambda r: x_of(r["values"][0]))
        x = [x_of(r["values"][0]) for r in members]
        colour = f"C{i % 10}"
        means = [r["summary"].mean for r in members]
        ax.plot(x, means, color=colour, marker="o", ms=4, lw=1.4, label=_wrap_name(label), gid=f"sweep:{label}")
        for xi, r in zip(x, members):
            s = r["summary"]
            if math.isfinite(s.ci_low) and math.isfinite(s.ci_high):
                ax.plot([xi, xi], [s.ci_low, s.ci_high], color=colour, lw=1.0, alpha=0.7)
        geo = [(xi, r["procrustes"]) for xi, r in zip(x, members) if r["procrustes"] is not None]
        if geo:
            geometry_drawn += 1
            ax_geo.plot(*zip(*geo), color=colour, marker="s", ms=4, lw=1.4, gid=f"sweep-geometry:{label}")
    if result.baseline not in result.swept:  # the reference the grid is read against
        base = next((vs.summary.mean for vs in c.variants if vs.variant == result.baseline), math.nan)
        if math.isfinite(base):
            ax.axhline(base, color="0.3", lw=0.9, ls="--", label=f"baseline {_wrap_name(result.baseline)}")
        geometry = [r.geometry_value("procrustes") for r in result.runs if r.variant == result.baseline]
        if geometry and None not in geometry:
            mean_geometry = sum(g for g in geometry if g is not None) / len(geometry)
            ax_geo.axhline(mean_geometry, color="0.3", lw=0.9, ls="--", label=f"baseline {_wrap_name(result.baseline)}")
            ax_geo.legend(fontsize=_LEGEND_PT, loc="best")
    for a in (ax, ax_geo):
        if scale == "log":
            a.set_xscale("log")
        if scale == "category":
            a.set_xticks([position[_value_cell(v)] for v in xs], [_value_cell(v) for v in xs], fontsize=_LABEL_PT)
        elif scale == "log":
            a.set_xticks([float(v) for v in xs], [_value_cell(v) for v in xs], fontsize=_LABEL_PT)
        a.set_xlabel(key + (" (log scale)" if scale == "log" else ""))
        a.grid(color="0.9")
    ax.set_ylabel(c.metric)
    ax.set_title(_wrap_name(f"{c.metric} against {key} (mean over runs, 95% t interval)", 60), fontsize=10)
    ax.legend(fontsize=_LEGEND_PT, loc="best")
    ax_geo.set_ylabel("mean procrustes distance")
    ax_geo.set_title(_wrap_name(f"final mean procrustes distance to the teacher against {key}", 60), fontsize=10)
    if not geometry_drawn:
        ax_geo.text(0.5, 0.5, "no final geometry in these runs", ha="center", va="center", transform=ax_geo.transAxes)
