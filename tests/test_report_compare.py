"""kdgeo.report_compare: compare's tables, JSON, CSV, Markdown and plot, on fabricated runs (tests/test_compare.py)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from kdgeo.compare import CompareArgs, compare
from kdgeo.errors import KdgeoError
from kdgeo.report_compare import plot, print_compare, write_csv, write_json, write_markdown
from test_compare import make_sweep


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
