"""Sweeps: every variant x seed from one spec, failures isolated, re-runs continue."""

from __future__ import annotations

import json

import pytest

from cli_helpers import run_cli, tiny_spec, write_spec
from kdgeo.errors import SpecError
from kdgeo.spec import expand_sweep, validate_spec


def _sweep_spec(tiny, tmp_path, variants, seeds=(0, 1, 2)):
    spec = tiny_spec(tiny, tmp_path, train={"max_steps": 2}, monitor={"every": 0, "samples": 16})
    spec["name"] = "sw"
    spec["sweep"] = {"seeds": list(seeds), "variants": variants}
    return spec


def test_expand_sweep_names_every_run_and_validates_every_variant(tiny, tmp_path):
    spec = validate_spec(_sweep_spec(tiny, tmp_path, {"ce": {}, "geo": {"losses": [{"kind": "ce"}, {"kind": "procrustes"}]}}))
    runs = expand_sweep(spec)
    assert [(r.variant, r.seed) for r in runs] == [("ce", 0), ("ce", 1), ("ce", 2), ("geo", 0), ("geo", 1), ("geo", 2)]
    assert {r.spec.output.name for r in runs} == {f"{v}-seed{s}" for v in ("ce", "geo") for s in (0, 1, 2)}
    assert all(r.spec.output.dir.endswith("/sw") and r.spec.seed == r.seed and r.spec.variant == r.variant for r in runs)
    assert [loss.kind for loss in runs[3].spec.losses] == ["ce", "procrustes"]
    bad = validate_spec(_sweep_spec(tiny, tmp_path, {"a": {"losses": [{"kind": "procrustez"}]}, "b": {"train": {"lr": -1}}}))
    with pytest.raises(SpecError) as err:
        expand_sweep(bad, "run.toml")
    text = str(err.value)
    assert "sweep.variants.a -> losses[0]" in text and "did you mean 'procrustes'" in text
    assert "sweep.variants.b -> train.lr" in text


def test_sweep_runs_all_isolates_a_failure_and_skips_finished_runs(tiny, tmp_path, capsys):
    # "far" fails in pre-flight (its layer pair is out of range); "ce" must still complete.
    variants = {"ce": {"losses": [{"kind": "ce"}]}, "far": {"losses": [{"kind": "procrustes"}], "features": {"pairs": [[1, 2], [5, 4]]}}}
    path = write_spec(tmp_path / "sweep.toml", _sweep_spec(tiny, tmp_path, variants, seeds=(0, 1)))
    code, out, err = run_cli(capsys, "distill", str(path))
    assert code == 1, err
    flat = " ".join(err.split())
    assert "run far seed 0 failed" in flat and "student index 5 is outside 0..2" in flat
    assert "2 of 4 runs failed" in flat
    for seed in (0, 1):
        summary = json.loads((tmp_path / "runs" / "sw" / f"ce-seed{seed}" / "summary.json").read_text())
        assert summary["variant"] == "ce" and summary["seed"] == seed
    assert "ce" in out and "failed" in out
    # Running again skips the finished runs and retries only the failed ones.
    code, out, err = run_cli(capsys, "distill", str(path))
    assert code == 1
    assert err.count("already finished") == 2
    # A finished run is never silently reused under a changed spec.
    code, out, err = run_cli(capsys, "distill", str(path), "--set", "train.lr=0.01")
    flat = " ".join(err.split())
    assert code == 1 and "finished with a different spec (train.lr: run has 0.001, spec now has 0.01)" in flat


def test_sweep_then_compare_every_format_and_exit_code(tiny, tmp_path, capsys):
    """2 variants x 3 seeds on tiny models. The geometry loss lowers the Procrustes distance on
    every seed (see test_distill), so compare must find it, in both directions of --baseline."""
    student = {"init": "config", "arch": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}}
    spec = tiny_spec(tiny, tmp_path, student=student, train={"max_steps": 30, "lr": 2e-3}, monitor={"every": 10, "samples": 32})
    spec["name"] = "sw"
    spec["sweep"] = {"seeds": [0, 1, 2], "variants": {"ce": {"losses": [{"kind": "ce"}]}, "geo": {"losses": [{"kind": "ce"}, {"kind": "procrustes", "weight": 5.0}]}}}
    path = write_spec(tmp_path / "sweep.toml", spec)
    code, out, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0, err
    runs = tmp_path / "runs" / "sw"
    assert sorted(p.name for p in runs.iterdir()) == [f"{v}-seed{s}" for v in ("ce", "geo") for s in (0, 1, 2)]

    files = {k: tmp_path / f"report.{k}" for k in ("json", "csv", "md", "png")}
    code, out, err = run_cli(
        capsys, "compare", str(runs), "--metric", "accuracy,procrustes", "--baseline", "ce",
        "--json", str(files["json"]), "--csv", str(files["csv"]), "--markdown", str(files["md"]), "--plot", str(files["png"]),
    )
    assert code == 0, err
    assert "ce" in out and "geo" in out
    report = json.loads(files["json"].read_text())
    assert report["baseline"] == "ce"
    import csv

    rows = list(csv.DictReader(files["csv"].open()))
    assert {r["variant"] for r in rows} >= {"ce", "geo"}
    assert files["md"].read_text().lstrip().startswith("#") or "|" in files["md"].read_text()
    assert files["png"].read_bytes()[:4] == b"\x89PNG"

    # geo lowers the distance: against baseline geo, ce is significantly worse -> exit 1.
    code, out, err = run_cli(capsys, "compare", str(runs), "--metric", "procrustes", "--baseline", "geo", "--fail-if-worse", "--json", "-")
    assert code == 1, (out, err)
    code, out, err = run_cli(capsys, "compare", str(runs), "--metric", "procrustes", "--baseline", "ce", "--fail-if-worse", "--json", "-")
    assert code == 0, (out, err)
    # Bad input: a metric no run has, an unknown baseline, no runs at all.
    for args, expect in (
        (["--metric", "bleu"], "bleu"),
        (["--baseline", "kdd"], "kdd"),
    ):
        code, out, err = run_cli(capsys, "compare", str(runs), *args)
        assert code == 2 and expect in err and "Traceback" not in err, (args, err)
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "compare", str(tmp_path / "empty"))
    assert code == 2 and "Traceback" not in err
