"""What `kdgeo compare` reads and groups (issue 13, items 3-5 and 8, output hygiene), on fabricated run directories.

Each run directory is written the way kdgeo.distillation writes it (spec.json with the resolved spec, summary.json);
the evaluation set, the settings and the directory layout are varied one at a time, and the expected exit code
is checked through the CLI where it is CLI behaviour.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kdgeo import rundir
from kdgeo.compare_runs import RunRecord, TaskKey, load_runs, pair_on_shared_seeds
from kdgeo.comparison import CompareArgs, compare
from kdgeo.errors import KdgeoError

from cli_helpers import run_cli

LABELS = ["neg", "pos"]
BASE = [0.71, 0.74, 0.69, 0.73, 0.72, 0.70, 0.75, 0.68]
HASH_A, HASH_B = "a" * 64, "b" * 64


def write_run(
    parent: Path,
    variant: str,
    seed: int,
    accuracy: float,
    *,
    data: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    output: dict[str, Any] | None = None,
    dirname: str | None = None,
) -> Path:
    """A finished classification run: spec.json (resolved spec) and summary.json. ``data`` entries override the
    summary's data table (eval_sha256, max_eval_samples, ...); ``train`` / ``output`` the spec's tables."""
    run = parent / (dirname or f"{variant}-seed{seed}")
    run.mkdir(parents=True)
    table = {
        "dataset": "kdgeo:demo", "config": None, "train_split": "train", "eval_split": "validation",
        "eval_dataset": None, "text_column": "text", "label_column": "label", "max_train_samples": None,
        "max_eval_samples": None, **(data or {}),
    }  # fmt: skip
    spec = {
        "name": "sweep", "task": "classification", "seed": seed, "variant": variant, "teacher": {"model": "teacher"},
        "data": {k: v for k, v in table.items() if v is not None and k not in ("eval_sha256", "eval_examples")},
        "losses": [{"kind": "ce", "weight": 1.0}],
        "train": {"epochs": 1.0, "lr": 1e-4, "log_every": 10, **(train or {})},
        "output": {"dir": str(parent), "name": f"{variant}-seed{seed}", **(output or {})},
    }  # fmt: skip
    rundir.write_json(run / rundir.SPEC_JSON, spec)
    rundir.write_json(
        run / rundir.SUMMARY,
        {
            "format_version": 1, "name": "sweep", "variant": variant, "data": table, "run_dir": str(run),
            "task": "classification", "seed": seed, "teacher": "teacher", "label_names": LABELS, "steps": 10,
            "scores": {"accuracy": accuracy, "macro_f1": accuracy - 0.05}, "geometry": [], "pairs": [],
        },
    )  # fmt: skip
    return run


def sweep(root: Path, shifts: dict[str, float], seeds: range = range(4), **kw: Any) -> Path:
    for variant, shift in shifts.items():
        for seed in seeds:
            write_run(root, variant, seed, BASE[seed] + shift + 0.001 * (seed % 2) * (shift != 0), **kw)
    return root


def record(seed: int | None) -> RunRecord:
    return RunRecord(Path(f"r{seed}"), "v", seed, TaskKey(), {}, [])


# ---- 3. pairing on the shared seeds ------------------------------------------------------------


def test_pair_on_shared_seeds_pairs_the_shared_and_names_the_rest():
    pairing = pair_on_shared_seeds([record(s) for s in range(5)], [record(s) for s in range(4)], ("kd", "ce"))
    assert pairing.paired and pairing.shared == [0, 1, 2, 3] and pairing.left_out == ([4], [])
    assert pairing.reason == "paired over 4 shared seeds; left out: kd seed 4"
    shared, (left_a, left_b), reason = pairing  # a plain tuple too
    assert shared == [0, 1, 2, 3] and left_a == [4] and left_b == []
    every = pair_on_shared_seeds([record(s) for s in range(3)], [record(s) for s in (2, 1, 0)])
    assert every.shared == [0, 1, 2] and every.left_out == ([], []) and every.reason == "paired over 3 seeds"
    # unknown and repeated seeds are left out of the pairing, named
    odd = pair_on_shared_seeds([record(s) for s in (0, 1, 2, None)], [record(s) for s in (0, 1, 2, 2)], ("a", "b"))
    assert odd.shared == [0, 1] and odd.left_out == ([2, None], [2, 2])
    assert "a seed 2; 1 run with an unknown seed" in odd.reason and "b seed 2, 2" in odd.reason


def test_pair_on_shared_seeds_falls_back_to_unpaired_below_two():
    one = pair_on_shared_seeds([record(s) for s in (0, 1)], [record(s) for s in (0, 2)], ("kd", "ce"))
    assert not one.paired and one.shared == [] and one.left_out == ([], [])
    assert one.reason.startswith("unpaired: only 1 seed shared (0)") and "kd: 0, 1; ce: 0, 2" in one.reason
    none = pair_on_shared_seeds([record(None), record(None)], [record(None)])
    assert not none.paired and "no seed shared" in none.reason and "2 runs with an unknown seed" in none.reason


# ---- 4. evaluation sets ------------------------------------------------------------------------


def test_different_max_eval_samples_refused_unless_allowed(tmp_path, capsys):
    sweep(tmp_path, {"ce": 0.0})
    sweep(tmp_path, {"kd": 0.05}, data={"max_eval_samples": 100})
    code, out, err = run_cli(capsys, "compare", str(tmp_path))
    assert code == 2 and out == ""
    assert "different tasks or evaluation sets (they differ in max_eval_samples)" in err
    # each group with its set and its runs; None is spelled out as the whole split
    assert "max_eval_samples=None (the whole split): 4 run(s) of ce" in err
    assert "max_eval_samples=100: 4 run(s) of kd" in err and "--allow-different-data" in err

    code, out, err = run_cli(capsys, "compare", str(tmp_path), "--allow-different-data", "--json", "-")
    assert code == 0, err
    data = json.loads(out)
    assert data["task"]["differs"] == ["max_eval_samples"] and data["task"]["max_eval_samples"] is None
    sets = {r["variant"]: r["eval_set"]["max_eval_samples"] for r in data["runs"]}
    assert sets == {"ce": None, "kd": 100}
    assert any("evaluation sets differ (in max_eval_samples)" in n for n in data["notes"])
    assert any(n.startswith("evaluation set max_eval_samples=100: 4 run(s) of kd") for n in data["notes"])
    # the header does not show one run's set as if it held for all
    code, out, err = run_cli(capsys, "compare", str(tmp_path), "--allow-different-data")
    assert code == 0, err
    header = " ".join(out.split()).split("accuracy (higher is better)")[0]  # the line before the tables, unwrapped
    assert "max_eval_samples differs between runs" in header and "max_eval_samples=100" not in header


def test_config_none_is_a_value(tmp_path):
    sweep(tmp_path, {"ce": 0.0}, seeds=range(2))
    sweep(tmp_path, {"kd": 0.0}, seeds=range(2), data={"config": "small"})
    with pytest.raises(KdgeoError, match=r"differ in config\).*config=None: 2 run\(s\) of ce.*config=small"):
        compare(CompareArgs([str(tmp_path)]))


def test_eval_sha256_compared_where_recorded(tmp_path, capsys):
    same = sweep(tmp_path / "same", {"ce": 0.0, "kd": 0.0}, data={"eval_sha256": HASH_A, "eval_examples": 200})
    result = compare(CompareArgs([str(same)]))
    assert result.task.eval_sha256 == HASH_A and result.task.eval_examples == 200
    assert not any("could not be checked" in w for w in result.warnings)

    other = tmp_path / "other"
    sweep(other, {"ce": 0.0}, data={"eval_sha256": HASH_A, "eval_examples": 200})
    sweep(other, {"kd": 0.0}, data={"eval_sha256": HASH_B, "eval_examples": 200})
    code, out, err = run_cli(capsys, "compare", str(other))
    assert code == 2 and "differ in eval_sha256" in err and "eval_sha256=aaaaaaaaaaaa" in err and "bbbbbbbbbbbb" in err

    # an old run without the hash: the other fields are compared, and the content could not be checked (said)
    old = tmp_path / "old"
    sweep(old, {"ce": 0.0}, data={"eval_sha256": HASH_A})
    sweep(old, {"kd": 0.0})
    result = compare(CompareArgs([str(old)]))
    assert result.task.eval_sha256 is None  # not every run records it: the key does not claim one
    (warning,) = [w for w in result.warnings if "could not be checked" in w]
    assert "4 of 8 runs do not record data.eval_sha256" in warning and "kd-seed" in warning
    code, out, err = run_cli(capsys, "compare", str(old), "--json", "-")
    assert code == 0 and "could not be checked" in err  # on stderr, whatever goes to stdout


# ---- 5. pooling by name ------------------------------------------------------------------------


def test_one_variant_name_with_different_settings_is_refused(tmp_path, capsys):
    sweep(tmp_path / "a", {"ce": 0.0, "kd": 0.0}, seeds=range(2))
    sweep(tmp_path / "b", {"kd": 0.0}, seeds=range(2, 4), train={"epochs": 40.0})
    code, out, err = run_cli(capsys, "compare", str(tmp_path))
    assert code == 2
    assert "variant 'kd' holds runs with different settings: they differ in train.epochs" in err
    assert "train.epochs=1.0" in err and "train.epochs=40.0" in err
    assert str(tmp_path / "a" / "kd-seed0") in err and str(tmp_path / "b" / "kd-seed2") in err


def test_fields_that_do_not_change_the_result_are_ignored(tmp_path):
    # output location, logging cadence and the seed differ; the experiment is the same: pooled
    sweep(tmp_path / "a", {"ce": 0.0, "kd": 0.0}, seeds=range(2))
    sweep(tmp_path / "b", {"ce": 0.0, "kd": 0.0}, seeds=range(2, 4), train={"log_every": 1}, output={"dir": "/x"})
    result = compare(CompareArgs([str(tmp_path)]))
    assert [len(v.values) for v in result.metrics[0].variants] == [4, 4]


def test_same_variant_and_seed_from_two_sweeps_is_refused(tmp_path, capsys):
    sweep(tmp_path / "sweep1", {"ce": 0.0, "kd": 0.0}, seeds=range(2))
    sweep(tmp_path / "sweep2", {"ce": 0.0, "kd": 0.0}, seeds=range(2))
    code, out, err = run_cli(capsys, "compare", str(tmp_path / "sweep1"), str(tmp_path / "sweep2"))
    assert code == 2
    assert "variant 'ce' seed 0 comes from 2 run directories with the same settings" in err
    assert str(tmp_path / "sweep1" / "ce-seed0") in err and str(tmp_path / "sweep2" / "ce-seed0") in err


def test_each_run_directory_counted_once(tmp_path):
    root = sweep(tmp_path / "sweep", {"ce": 0.0, "kd": 0.0}, seeds=range(2))
    (tmp_path / "link").symlink_to(root / "kd-seed0")
    paths = [str(root), str(root), str(root / "kd-seed0"), str(tmp_path / "link"), str(root / "kd-seed1") + "/"]
    runs = load_runs(paths)
    assert sorted((r.variant, r.seed) for r in runs) == [("ce", 0), ("ce", 1), ("kd", 0), ("kd", 1)]
    assert [len(v.values) for v in compare(CompareArgs(paths)).metrics[0].variants] == [2, 2]


def test_nested_sweeps_found_and_deeper_ones_named(tmp_path):
    sweep(tmp_path / "lr" / "small", {"ce": 0.0}, seeds=range(2))
    sweep(tmp_path / "lr" / "large" / "again", {"kd": 0.0}, seeds=range(2))
    deep = tmp_path / "a" / "b" / "c" / "d"  # its run is 5 levels below tmp_path, 4 below a
    write_run(deep, "far", 0, 0.7)
    (tmp_path / "lr" / "loop").symlink_to(tmp_path)  # a link back up: searched once, the walk ends
    warnings: list[str] = []
    runs = load_runs([str(tmp_path)], warnings)
    assert sorted((r.variant, r.seed) for r in runs) == [("ce", 0), ("ce", 1), ("kd", 0), ("kd", 1)]
    (note,) = [w for w in warnings if "not searched" in w]
    assert "more than 4 levels below" in note and str(deep) in note
    assert [r.variant for r in load_runs([str(tmp_path / "a")])] == ["far"]  # nearer root: found
    with pytest.raises(KdgeoError, match=r"no runs found in .*x \(.*; not searched \(more than 4 levels below"):
        load_runs([str(_deeper(tmp_path))])


def _deeper(root: Path) -> Path:
    """x/1/2/3/4/run: nothing within 4 levels of x, one run below."""
    write_run(root / "x" / "1" / "2" / "3" / "4", "z", 0, 0.7)
    return root / "x"


def test_unreadable_spec_settings_not_checked_said(tmp_path):
    sweep(tmp_path, {"ce": 0.0, "kd": 0.0}, seeds=range(2))
    (tmp_path / "kd-seed1" / rundir.SPEC_JSON).unlink()
    result = compare(CompareArgs([str(tmp_path)]))
    assert any("settings of 1 run(s) of variant 'kd' could not be checked" in w for w in result.warnings)


# ---- 8. --metric, --quiet, outputs -------------------------------------------------------------


def test_metric_repeatable_and_comma_separated(tmp_path, capsys):
    sweep(tmp_path, {"ce": 0.0, "kd": 0.0}, seeds=range(2))
    for args in (("--metric", "accuracy", "--metric", "macro_f1"), ("--metric", "accuracy,macro_f1")):
        code, out, err = run_cli(capsys, "compare", str(tmp_path), *args, "--json", "-")
        assert code == 0, err
        assert [m["metric"] for m in json.loads(out)["metrics"]] == ["accuracy", "macro_f1"]
    code, out, err = run_cli(capsys, "compare", str(tmp_path), "--metric", "accuracy", "--metric", "accuracy,")
    assert code == 0 and out.count("accuracy (higher is better)") == 1


def test_quiet_prints_only_the_verdict(tmp_path, capsys):
    sweep(tmp_path, {"ce": 0.0, "kd": -0.05}, seeds=range(6))
    target = tmp_path / "out.json"
    code, out, err = run_cli(capsys, "compare", str(tmp_path), "-q", "--fail-if-worse", "--json", str(target))
    assert code == 1 and out == ""
    assert "kd" in err and "exit code 1" in err  # the reason for the exit code, on stderr
    assert json.loads(target.read_text())["exit_code"] == 1
    code, out, err = run_cli(capsys, "compare", str(tmp_path), "--quiet")
    assert code == 0 and out == "" and err.strip()


def test_exit_1_reason_and_warnings_on_stderr_with_json_on_stdout(tmp_path, capsys):
    sweep(tmp_path, {"ce": 0.0, "kd": -0.05}, seeds=range(6))
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / rundir.SPEC_JSON).write_text("{}")
    code, out, err = run_cli(capsys, "compare", str(tmp_path), "--fail-if-worse", "--json", "-")
    assert code == 1
    json.loads(out)  # stdout is the JSON alone
    assert "unfinished" in err and "exit code 1" in err


@pytest.mark.parametrize("other", ["--csv", "--markdown", "--plot"])
def test_two_outputs_to_stdout_refused(tmp_path, capsys, other):
    sweep(tmp_path, {"ce": 0.0}, seeds=range(2))
    code, out, err = run_cli(capsys, "compare", str(tmp_path), "--json", "-", other, "-")
    assert code == 2 and out == ""
    assert f"--json - and {other} - would all write to stdout" in err


def test_baseline_picked_is_named(tmp_path, capsys):
    sweep(tmp_path, {"ce": 0.0, "kd": 0.0, "a": 0.0}, seeds=range(2))
    result = compare(CompareArgs([str(tmp_path)]))
    assert "baseline: ce (a variant named 'ce'; pass --baseline to choose)" in result.notes
    assert not any(n.startswith("baseline:") for n in compare(CompareArgs([str(tmp_path)], baseline="kd")).notes)
    other = sweep(tmp_path / "x", {"b": 0.0, "a": 0.0}, seeds=range(2))
    notes = compare(CompareArgs([str(other)])).notes
    assert any(n.startswith("baseline: a (the first variant in sorted order") for n in notes)
    code, out, err = run_cli(capsys, "compare", str(other))
    assert code == 0 and "baseline: a (the first variant in sorted order" in out


def test_symlink_loop_given_directly(tmp_path):
    sweep(tmp_path / "s", {"ce": 0.0}, seeds=range(2))
    os.symlink(tmp_path / "s", tmp_path / "s" / "self")
    assert len(load_runs([str(tmp_path / "s")])) == 2
