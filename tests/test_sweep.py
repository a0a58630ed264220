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
    every seed (see test_distillation), so compare must find it, in both directions of --baseline."""
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


# ---- pre-flight and --dry-run ------------------------------------------------------------------


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reads model weights (configs and tokenizers are allowed)."""
    import transformers

    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("the dry run read model weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


def test_dry_run_prints_the_plan_reads_no_weights_and_creates_nothing(tiny, tmp_path, capsys, no_weights):
    spec = tiny_spec(tiny, tmp_path, losses=[{"kind": "ce"}, {"kind": "procrustes", "weight": 0.5}],
                     output={"teacher_outputs": True, "teacher_outputs_dir": str(tmp_path / "outputs")})
    path = write_spec(tmp_path / "run.toml", spec)
    code, out, err = run_cli(capsys, "distill", str(path), "--dry-run")
    assert code == 0, err
    flat = " ".join(out.split())
    assert "dry run" in flat and "pre-flight passed for 1 run" in flat and "1->2, 2->4" in flat and "ce + procrustes" in flat
    code, out, err = run_cli(capsys, "distill", str(path), "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    run = plan["runs"][0]
    assert plan["dry_run"] and not plan["sweep"] and run["status"] == "new" and run["task"] == "classification"
    assert (run["steps"], run["steps_per_epoch"], run["train_examples"], run["eval_examples"]) == (4, 4, 64, 32)
    assert run["pairs"] == [[1, 2], [2, 4]] and run["precision"] == "fp32" and run["device"] == "cpu"
    # 2 copied BERT layers of width 64 with an 8-label head: weights + 2 AdamW moments, fp32, 3 on disk at once.
    assert run["student_parameters"] > 50_000 and run["checkpoint_bytes"] == run["student_parameters"] * 4 * 3
    assert run["checkpoints_bytes"] == run["checkpoint_bytes"] * 3 and run["cache_bytes"] > 0
    assert plan["disk"] and plan["disk"][0]["needed"] >= run["checkpoints_bytes"] + run["cache_bytes"]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outputs").exists()


def test_dry_run_of_a_sweep_lists_every_run(tiny, tmp_path, capsys, no_weights):
    variants = {"ce": {"losses": [{"kind": "ce"}]}, "geo": {"losses": [{"kind": "ce"}, {"kind": "gram"}], "features": {"pairs": "probe"}}}
    path = write_spec(tmp_path / "sweep.toml", _sweep_spec(tiny, tmp_path, variants, seeds=(0, 1)))
    code, out, err = run_cli(capsys, "distill", str(path), "--dry-run", "--json")
    assert code == 0, err
    runs = json.loads(out)["runs"]
    assert [(r["variant"], r["seed"], r["steps"]) for r in runs] == [("ce", 0, 2), ("ce", 1, 2), ("geo", 0, 2), ("geo", 1, 2)]
    assert runs[2]["pairs"] == "probe"
    code, out, err = run_cli(capsys, "distill", str(path), "--dry-run")
    assert code == 0 and "geo seed 1" in out and "pre-flight passed for 4 runs" in " ".join(out.split())
    assert not (tmp_path / "runs").exists()


def test_dry_run_problems_exit_2(tiny, tmp_path, capsys, no_weights):
    import torch

    path = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path, data={"text_column": "sentence"}))
    code, out, err = run_cli(capsys, "distill", str(path), "--dry-run")
    assert code == 2 and "sentence" in err and "Traceback" not in err and out == ""
    if not torch.cuda.is_available():
        path = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path, train={"device": "cuda"}))
        code, out, err = run_cli(capsys, "distill", str(path), "--dry-run")
        assert code == 2 and "CUDA is not available" in err and "Traceback" not in err
    # A sweep: one message per failing run (the others pass), exit 2.
    variants = {"ce": {}, "far": {"features": {"pairs": [[1, 2], [5, 4]]}, "losses": [{"kind": "procrustes"}]}}
    path = write_spec(tmp_path / "sweep.toml", _sweep_spec(tiny, tmp_path, variants, seeds=(0, 1)))
    code, out, err = run_cli(capsys, "distill", str(path), "--dry-run")
    flat = " ".join(err.split())
    assert code == 2 and "pre-flight failed for 2 of 4 runs" in flat and "far seed 0, far seed 1: " in flat, err
    assert not (tmp_path / "runs").exists()


def test_dry_run_refuses_when_the_disk_is_too_small(tiny, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    path = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path))
    code, _, err = run_cli(capsys, "distill", str(path), "--dry-run")
    assert code == 2 and "1000 B is free" in " ".join(err.split()) and "keep_checkpoints" in err


@pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="needs a machine without CUDA")
def test_a_sweep_that_cannot_run_anywhere_exits_2_once_before_any_run(tiny, tmp_path, capsys):
    spec = _sweep_spec(tiny, tmp_path, {"ce": {}, "kd": {"losses": [{"kind": "ce"}, {"kind": "kd"}]}}, seeds=(0, 1))
    spec["train"]["device"] = "cuda"
    path = write_spec(tmp_path / "sweep.toml", spec)
    code, out, err = run_cli(capsys, "distill", str(path))
    flat = " ".join(err.split())
    assert code == 2, err
    assert flat.count("CUDA is not available") == 1 and "all 4 runs:" in flat and "nothing was started" in flat
    assert "Traceback" not in err and "sweep" not in out  # no table
    assert not (tmp_path / "runs").exists()


def test_print_sweep_counts_failures_and_successes(capsys, tmp_path):
    from kdgeo.report import print_sweep
    from kdgeo.sweep import SweepOutcome

    failed = [SweepOutcome("a", s, tmp_path, "failed", error="boom") for s in (0, 1)]
    print_sweep(failed)
    err = " ".join(capsys.readouterr().err.split())
    assert "none of the 2 runs completed" in err and "complete" not in err.replace("completed", "")
    print_sweep([*failed, SweepOutcome("b", 0, tmp_path, "done", summary={}), SweepOutcome("b", 1, tmp_path, "skipped")])
    err = " ".join(capsys.readouterr().err.split())
    assert "2 of 4 runs failed" in err and "the other 2 are complete (1 now, 1 earlier)" in err
    print_sweep([SweepOutcome("b", 0, tmp_path, "done", summary={})])
    assert "error" not in capsys.readouterr().err


# ---- grid sweeps ([sweep.grid], issue 16 F) ----------------------------------------------------------------------


def _grid_spec(tiny, tmp_path, grid, grid_variants=None, seeds=(0, 1)):
    variants = {
        "kd": {"losses": [{"kind": "ce"}, {"kind": "kd"}]},
        "kd-procrustes": {"losses": [{"kind": "ce"}, {"kind": "kd"}, {"kind": "procrustes"}]},
    }
    spec = _sweep_spec(tiny, tmp_path, variants, seeds=seeds)
    spec["sweep"]["grid"] = grid
    if grid_variants is not None:
        spec["sweep"]["grid_variants"] = grid_variants
    return spec


def test_grid_crosses_its_variants_in_the_order_written_with_names_from_the_values(tiny, tmp_path):
    grid = {"losses[2].weight": [3.0, 1e-05, 1], "features.rows": ["tokens", "mean"]}
    runs = expand_sweep(validate_spec(_grid_spec(tiny, tmp_path, grid, ["kd-procrustes"])))
    # kd is not crossed: once per seed, as before; kd-procrustes: the product of the values (first key slowest),
    # seeds innermost
    assert [(r.variant, r.seed) for r in runs[:2]] == [("kd", 0), ("kd", 1)]
    assert all(r.spec.swept is None and r.spec.output.name == f"kd-seed{r.seed}" for r in runs[:2])
    names = [r.variant for r in runs[2::2]]
    assert names == [
        f"kd-procrustes/weight={w},rows={rows}" for w in ("3.0", "1e-05", "1") for rows in ("tokens", "mean")
    ]
    assert [r.seed for r in runs[2:6]] == [0, 1, 0, 1]
    run = runs[4]  # weight=3.0, rows=mean, seed 0
    assert run.spec.losses[2].weight == 3.0 and run.spec.features.rows == "mean" and run.spec.variant == run.variant
    assert run.spec.swept == {"losses[2].weight": 3.0, "features.rows": "mean"}
    assert run.spec.output.dir == str(tmp_path / "runs" / "sw" / "kd-procrustes")
    assert run.spec.output.name == "weight=3.0,rows=mean-seed0"
    # two keys with one last component are named in full; without [sweep.variants] the base is the spec's name;
    # dotted indices (--set style) work too
    spec = _sweep_spec(tiny, tmp_path, {}, seeds=(0,))
    spec["losses"] = [{"kind": "ce"}, {"kind": "procrustes"}]
    spec["sweep"]["grid"] = {"losses.0.weight": [1.0], "losses[1].weight": [0.5, 2]}
    names = [r.variant for r in expand_sweep(validate_spec(spec))]
    assert names == ["sw/losses.0.weight=1.0,losses[1].weight=0.5", "sw/losses.0.weight=1.0,losses[1].weight=2"]
    spec["sweep"]["grid"] = {"train.gather_features": [True, False]}
    names = [r.variant for r in expand_sweep(validate_spec(spec))]
    assert names == ["sw/gather_features=true", "sw/gather_features=false"]


def test_grid_problems_are_all_reported_before_anything_runs(tiny, tmp_path):
    def problems(grid, grid_variants=None):
        with pytest.raises(SpecError) as err:
            expand_sweep(validate_spec(_grid_spec(tiny, tmp_path, grid, grid_variants)), "sweep.toml")
        return " ".join(str(err.value).split())

    # the key does not resolve in one crossed variant: named, with the fix
    text = problems({"losses[2].weight": [0.1, 1.0]})
    assert 'sweep.grid."losses[2].weight": does not resolve in variant \'kd\'' in text
    assert "`losses` has 2 items there, so `losses[2]` is past its end" in text
    assert "add sweep.grid_variants = [...] naming only the variants it applies to" in text
    # a key wrong everywhere is one problem; a field that is not set cannot be swept into
    text = problems({"train.lrr": [1.0], "teacher.finetune.epochs": [1]})
    assert "does not resolve in any of the variants it crosses (kd, kd-procrustes)" in text
    assert "did you mean `train.lr`?; fix the key" in text and "`teacher.finetune` is not set there" in text
    # the table itself: key syntax, reserved keys, non-lists, non-scalars, repeated values, grid_variants
    text = problems(
        {
            "losses..x": [1], "seed": [1, 2], "train.lr": 0.1, "features.pairs": [[[1, 2]]],
            "train.epochs": [1, 1.0, 2, 2],
        },  # fmt: skip
        ["kd", "nope"],
    )
    for part in (
        "grid key 'losses..x' is not a dotted key",
        "grid key 'seed' cannot be swept: the seeds are sweep.seeds",
        "grid key 'train.lr': 0.1 must be a list of values",
        "[[1, 2]] is not a single value; grid values are numbers, strings or booleans",
        "lists the same value more than once (1 and 1.0; 2)",
        "`grid_variants` names 'nope', not in [sweep.variants]",
    ):
        assert part in text, part
    # every combination is validated: a bad value names its variant; two values that make one directory name collide
    text = problems({"train.lr": [1e-3, -1.0]})
    assert "sweep.grid (variant kd/lr=-1.0) -> train.lr" in text and "(variant kd/lr=0.001)" not in text
    text = problems({"teacher.revision": ["a/b", "a_b"]})
    assert "would share the run directory kd/revision=a_b-seed<k>" in text


def test_grid_dry_run_lists_every_combination(tiny, tmp_path, capsys, no_weights):
    spec = _grid_spec(tiny, tmp_path, {"losses[2].weight": [0.5, 2.0]}, ["kd-procrustes"], seeds=(0,))
    path = write_spec(tmp_path / "sweep.toml", spec)
    code, out, err = run_cli(capsys, "distill", str(path), "--dry-run")
    assert code == 0, err
    flat = " ".join(out.split())
    assert "kd seed 0" in flat and "kd-procrustes/weight=0.5 seed 0" in flat
    assert "kd-procrustes/weight=2.0 seed 0" in flat
    assert not (tmp_path / "runs").exists()
    spec["sweep"]["grid"] = {"losses[2].weight": [0.5, -2.0]}
    code, _, err = run_cli(capsys, "distill", str(write_spec(path, spec)), "--dry-run")
    assert code == 2 and "kd-procrustes/weight=-2.0" in err and "Traceback" not in err


@pytest.mark.slow  # two tiny runs and three compares: ~35 s on 2 shared cores
def test_grid_sweep_end_to_end_distill_then_compare(tiny, tmp_path, capsys):
    """A 2x1-value grid x 1 seed on tiny models: nested run directories, swept values in summary.json, compare
    groups along them, and running the command again skips the finished runs."""
    spec = _sweep_spec(tiny, tmp_path, {}, seeds=(0,))
    spec["losses"] = [{"kind": "ce"}, {"kind": "procrustes"}]
    spec["sweep"]["grid"] = {"losses[1].weight": [2.0, 0.5], "features.rows": ["tokens"]}
    path = write_spec(tmp_path / "sweep.toml", spec)
    code, out, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0, err
    parent = tmp_path / "runs" / "sw" / "sw"
    assert sorted(p.name for p in parent.iterdir()) == ["weight=0.5,rows=tokens-seed0", "weight=2.0,rows=tokens-seed0"]
    summary = json.loads((parent / "weight=0.5,rows=tokens-seed0" / "summary.json").read_text())
    assert summary["variant"] == "sw/weight=0.5,rows=tokens" and summary["variant_base"] == "sw"
    assert summary["swept"] == {"losses[1].weight": 0.5, "features.rows": "tokens"}
    assert summary["losses"][1]["weight"] == 0.5

    sweep_dir = str(tmp_path / "runs" / "sw")
    code, out, err = run_cli(capsys, "compare", sweep_dir, "--metric", "accuracy,procrustes", "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert report["variants"] == ["sw/weight=0.5,rows=tokens", "sw/weight=2.0,rows=tokens"]  # by value, not by name
    assert report["swept_keys"] == ["losses[1].weight", "features.rows"]
    entry = report["metrics"][0]["variants"][1]
    assert entry["swept"] == {"losses[1].weight": 2.0, "features.rows": "tokens"} and entry["base_variant"] == "sw"
    code, out, err = run_cli(capsys, "compare", sweep_dir)
    assert code == 0 and "accuracy along the swept values" in " ".join(out.split())

    code, out, err = run_cli(capsys, "distill", str(path))
    assert code == 0 and err.count("already finished") == 2, err
