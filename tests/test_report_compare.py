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


# ---- grid sweeps: compare along a swept value (issue 16 F) ---------------------------------------------------------


def make_grid(root, grid, seeds=3, base="kd-procrustes"):
    """Runs of a grid sweep as kdgeo writes them: ``root/<base>/<label>=<value>,...-seed<k>/`` with ``swept`` in
    spec.json and ``swept`` / ``variant_base`` in summary.json. ``grid``: (swept values, accuracy shift,
    procrustes) per variant."""
    from kdgeo import rundir
    from kdgeo.spec import grid_variant_name

    from test_comparison import BASE_ACC, write_run

    for values, shift, procrustes in grid:
        for seed in range(seeds):
            run = write_run(root, grid_variant_name(base, values), seed, BASE_ACC[seed] + shift, procrustes=procrustes)
            for name in (rundir.SPEC_JSON, rundir.SUMMARY):
                data = json.loads((run / name).read_text())
                data["swept"] = values
                if name == rundir.SUMMARY:
                    data["variant_base"] = base
                rundir.write_json(run / name, data)
    return root


WEIGHTS = [({"losses[2].weight": w}, shift, 0.4 - 0.02 * w) for w, shift in ((10.0, -0.04), (0.1, 0.0), (3.0, -0.01))]


def test_compare_finds_a_grid_in_its_nested_directories_and_orders_it_by_value(tmp_path, capsys):
    from kdgeo.report_compare import to_json

    root = make_sweep(tmp_path / "runs", {"kd": 0.0}, seeds=3)
    make_grid(root, WEIGHTS)
    assert (root / "kd-procrustes" / "weight=10.0-seed2" / "summary.json").is_file()  # the layout distill writes
    result = compare(CompareArgs([str(root)], baseline="kd", metric="accuracy,procrustes"))
    # by base variant, then value: a sort by name would put weight=10.0 before weight=3.0
    grid = [f"kd-procrustes/weight={w}" for w in ("0.1", "3.0", "10.0")]
    assert result.variants == ["kd", *grid]
    assert result.swept_keys == ["losses[2].weight"] and result.bases["kd-procrustes/weight=3.0"] == "kd-procrustes"
    data = to_json(result)
    assert data["swept_keys"] == ["losses[2].weight"]
    entries = {v["variant"]: v for v in data["metrics"][0]["variants"]}
    assert entries["kd"]["swept"] is None and entries["kd"]["base_variant"] is None
    assert entries["kd-procrustes/weight=3.0"]["swept"] == {"losses[2].weight": 3.0}
    assert entries["kd-procrustes/weight=3.0"]["base_variant"] == "kd-procrustes"

    print_compare(result)
    out = " ".join(capsys.readouterr().out.split())
    assert "accuracy along the swept values" in out and "procrustes along the swept values" in out
    # one row per grid variant: base, value, n, mean, CI, final mean procrustes (0.4 - 0.02 w, +0.05 over two pairs)
    assert "kd-procrustes 3.0 3 0.7033" in out and "0.3900" in out
    write_markdown(result, tmp_path / "c.md")
    md = (tmp_path / "c.md").read_text()
    assert "| base | losses[2].weight | n | mean | 95% CI | procrustes |" in md
    assert md.index("| kd-procrustes | 0.1 |") < md.index("| kd-procrustes | 3.0 |")
    assert md.index("| kd-procrustes | 3.0 |") < md.index("| kd-procrustes | 10.0 |")
    write_csv(result, tmp_path / "c.csv")
    rows = {r["variant"]: r for r in csv.DictReader(io.StringIO((tmp_path / "c.csv").read_text()))}
    assert rows["kd"]["swept"] == "" and rows["kd"]["base_variant"] == ""
    assert json.loads(rows["kd-procrustes/weight=3.0"]["swept"]) == {"losses[2].weight": 3.0}
    assert rows["kd-procrustes/weight=3.0"]["base_variant"] == "kd-procrustes"


def test_grid_variants_are_distinct_and_one_name_with_two_swept_values_is_refused(tmp_path):
    from kdgeo import rundir

    root = make_grid(tmp_path / "runs", WEIGHTS[:2], seeds=2)
    result = compare(CompareArgs([str(root)]))  # two variants that differ only in the swept field: not pooled
    assert len(result.variants) == 2 and all(vs.summary.n == 2 for vs in result.metrics[0].variants)
    # a run whose spec.json records another swept value under the same variant name is not that experiment
    spec_file = root / "kd-procrustes" / "weight=0.1-seed1" / rundir.SPEC_JSON
    spec = json.loads(spec_file.read_text())
    rundir.write_json(spec_file, {**spec, "swept": {"losses[2].weight": 0.3}})
    with pytest.raises(KdgeoError, match=r"different settings: they differ in swept.losses\[2\].weight"):
        compare(CompareArgs([str(root)]))
