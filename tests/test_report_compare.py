"""kdgeo.report_compare: compare's tables, JSON, CSV, Markdown and plot, on fabricated runs (tests/test_comparison.py)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from kdgeo.comparison import CompareArgs, compare
from kdgeo.errors import KdgeoError
from kdgeo.report_compare import plot, print_compare, write_csv, write_json, write_markdown
from test_comparison import make_sweep


def test_every_output_format(tmp_path, capsys):
    root = make_sweep(tmp_path / "runs", {"baseline": 0.0, "worse": -0.05, "[teacher]": 0.0})
    result = compare(CompareArgs([str(root)], metric="accuracy,cka"))
    out = tmp_path / "out"
    out.mkdir()
    write_json(result, out / "c.json")
    data = json.loads((out / "c.json").read_text())
    assert data["baseline"] == "baseline" and data["exit_code"] == 0 and [m["metric"] for m in data["metrics"]] == ["accuracy", "cka"]
    worse = next(v for v in data["metrics"][0]["variants"] if v["variant"] == "worse")
    assert worse["vs_baseline"]["verdict"] == "worse" and worse["vs_baseline"]["paired"] is True

    write_csv(result, out / "c.csv")
    rows = list(csv.DictReader(io.StringIO((out / "c.csv").read_text())))
    assert len(rows) == 6 and rows[0]["variant"] == "baseline" and rows[0]["role"] == "baseline"
    assert {r["result"] for r in rows if r["variant"] == "worse" and r["metric"] == "accuracy"} == {"significant (worse)"}
    assert float(next(r for r in rows if r["variant"] == "worse")["p_holm"]) < 0.05

    write_markdown(result, out / "c.md")
    md = (out / "c.md").read_text()
    assert "| variant | n | mean | std | 95% CI |" in md and "|---|---:|" in md and "\\[teacher\\]" not in md and "[teacher]" in md

    plot(result, out / "c.png")
    assert (out / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for writer in (write_json, write_csv, write_markdown):
        writer(result, "-")
    stdout = capsys.readouterr().out
    assert stdout.startswith("{") and "metric,variant,role" in stdout and "# kdgeo compare" in stdout

    print_compare(result)
    printed = capsys.readouterr().out
    assert "[teacher]" in printed and "significant" in printed and "(worse)" in printed
    assert "final geometry per layer pair" in printed and "procrustes" in printed


def test_output_path_error(tmp_path):
    make_sweep(tmp_path / "runs", {"baseline": 0.0}, seeds=2)
    result = compare(CompareArgs([str(tmp_path / "runs")]))
    with pytest.raises(KdgeoError, match="cannot write"):
        write_csv(result, tmp_path / "missing" / "c.csv")
    with pytest.raises(KdgeoError, match="cannot write the plot"):
        plot(result, tmp_path / "missing" / "c.png")


def _schema_keys(readme: str) -> dict[str, set[str]]:
    """The keys the README's "`compare --json` schema" section documents, per level."""
    import re

    section = readme.split("### `compare --json` schema", 1)[1].split("\n## ", 1)[0]
    top, rest = section.split("Per metric (`metrics[i]`):", 1)
    per_metric, rest = rest.split("Per variant (`metrics[i].variants[j]`):", 1)
    prose, versus = rest.split("\n\n", 1)

    def first_column(table: str) -> set[str]:
        keys: set[str] = set()
        for line in table.splitlines():
            if line.startswith("| `"):
                keys |= set(re.findall(r"`([a-z_0-9]+)`", line.split(" | ")[0]))
        return keys

    return {
        "top": first_column(top),
        "metric": first_column(per_metric),
        "variant": set(re.findall(r"`([a-z_0-9]+)`", prose)),
        "vs_baseline": first_column(versus),
    }


def test_the_readme_json_schema_documents_exactly_the_keys_compare_writes(tmp_path):
    from cli_helpers import REPO
    from kdgeo.report_compare import to_json

    documented = _schema_keys((REPO / "README.md").read_text(encoding="utf-8"))
    root = make_sweep(tmp_path / "runs", {"baseline": 0.0, "worse": -0.05})
    data = to_json(compare(CompareArgs([str(root)], metric="accuracy,procrustes")))
    metric = data["metrics"][0]
    variant = next(v for v in metric["variants"] if v["vs_baseline"] is not None)
    assert documented["top"] == set(data)
    assert documented["metric"] == set(metric)
    assert documented["variant"] == set(variant)
    assert documented["vs_baseline"] == set(variant["vs_baseline"])
