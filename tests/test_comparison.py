"""kdgeo.comparison on synthetic run directories written the way kdgeo.distillation writes them.

Outcomes are known by construction: identical variants differ by exactly 0; a copy shifted by
-0.05 on every seed (with small noise) is significantly worse; unequal seed sets switch to the
unpaired tests. Every output format is written and parsed back; every exit-2 error is raised
with a message that names the problem.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from kdgeo import rundir
from kdgeo.compare_runs import load_runs
from kdgeo.comparison import CompareArgs, compare
from kdgeo.report_compare import print_compare, to_json
from kdgeo.errors import KdgeoError

from cli_helpers import run_cli

LABELS = ["noun.animal", "noun.artifact", "noun.plant"]
BASE_ACC = [0.71, 0.74, 0.69, 0.73, 0.72, 0.70, 0.75, 0.68]
NOISE = [0.002, -0.001, 0.0015, -0.002, 0.0005, 0.001, -0.0015, 0.0]


def write_run(
    parent: Path, variant: str, seed: int, accuracy: float, *, procrustes: float = 0.3, dataset: str = "kdgeo:wordnet-supersenses",
    eval_split: str = "validation", labels: list[str] | None = None, steps: int = 20, drop: tuple[str, ...] = (),
) -> Path:
    """A run directory as kdgeo.distillation writes it: spec.json, metrics.jsonl, summary.json."""
    run = parent / f"{variant}-seed{seed}"
    run.mkdir(parents=True)
    data = {"dataset": dataset, "config": None, "train_split": "train", "eval_split": eval_split, "eval_dataset": None,
            "text_column": "text", "label_column": "label", "max_train_samples": None, "max_eval_samples": None}
    rundir.write_json(run / rundir.SPEC_JSON, {
        "name": "sweep", "task": "classification", "seed": seed, "variant": variant, "teacher": {"model": "teacher"},
        "data": {k: v for k, v in data.items() if v is not None}, "losses": [{"kind": "ce", "weight": 1.0}],
    })
    scores = {"accuracy": accuracy, "macro_f1": accuracy - 0.05, "mcc": accuracy - 0.2, "teacher_agreement": accuracy + 0.1}
    pairs = [[2, 4], [4, 8]]
    geometry = [{"student": s, "teacher": t, "procrustes": procrustes + 0.1 * k, "cka": 1 - procrustes, "gram": procrustes / 2}
                for k, (s, t) in enumerate(pairs)]
    metrics = run / rundir.METRICS
    rundir.append_jsonl(metrics, {"event": "start", "run_dir": str(run), "total_steps": steps, "steps_per_epoch": steps // 2})
    for step in range(steps // 2, steps + 1, steps // 2):
        rundir.append_jsonl(metrics, {"event": "step", "step": step, "total_steps": steps, "epoch": step / (steps // 2), "lr": 1e-4, "loss": 1.0})
        frac = step / steps
        rundir.append_jsonl(metrics, {"event": "monitor", "step": step, "pairs": [{**g, "procrustes": g["procrustes"] / frac} for g in geometry]})
        rundir.append_jsonl(metrics, {"event": "eval", "step": step, "epoch": step / (steps // 2),
                                      "scores": {k: v - 0.1 * (1 - frac) for k, v in scores.items()}})
    summary: dict[str, Any] = {
        "format_version": 1, "name": "sweep", "variant": variant, "data": data, "run_dir": str(run), "task": "classification",
        "seed": seed, "teacher": "teacher", "label_names": labels or LABELS, "steps": steps, "scores": scores,
        "teacher_scores": {"accuracy": 0.9}, "geometry": geometry, "pairs": pairs,
    }
    for key in drop:
        summary.pop(key, None)
    rundir.write_json(run / rundir.SUMMARY, summary)
    return run


def make_sweep(root: Path, variants: dict[str, float], seeds: int = 5, noise: bool = True, **kw: Any) -> Path:
    """variant -> shift of accuracy against BASE_ACC (per seed, plus small noise for non-zero shifts)."""
    for variant, shift in variants.items():
        for seed in range(seeds):
            jitter = NOISE[seed] if (noise and shift) else 0.0
            write_run(root, variant, seed, BASE_ACC[seed] + shift + jitter, procrustes=0.3 - shift + 0.01 * seed, **kw)
    return root


BASE_ROUGE = [24.1, 25.3, 23.8, 24.9, 24.4]
BASE_PPL = [9.8, 10.4, 10.1, 9.6, 10.0]


def write_lm_run(
    parent: Path, variant: str, seed: int, rouge: float, perplexity: float, *, procrustes: float = 0.4, steps: int = 20,
    drop_scores: tuple[str, ...] = (),
) -> Path:
    """A causal-lm run directory as kdgeo.distillation writes it: no labels; scores rougeL, perplexity, response_nll."""
    run = parent / f"{variant}-seed{seed}"
    run.mkdir(parents=True)
    data = {"dataset": "databricks/databricks-dolly-15k", "config": None, "train_split": "train[500:]", "eval_split": "train[:500]",
            "eval_dataset": None, "max_train_samples": None, "max_eval_samples": 500, "prompt_column": "instruction",
            "response_column": "response", "context_column": "context"}
    rundir.write_json(run / rundir.SPEC_JSON, {
        "name": "sweep", "task": "causal-lm", "seed": seed, "variant": variant, "teacher": {"model": "facebook/opt-1.3b"},
        "data": {k: v for k, v in data.items() if v is not None}, "losses": [{"kind": "ce", "weight": 1.0}, {"kind": "kd", "weight": 1.0}],
    })
    scores = {"rougeL": rouge, "perplexity": perplexity, "response_nll": math.log(perplexity), "response_tokens": 41250.0}
    for key in drop_scores:
        scores.pop(key)
    geometry = [{"student": s, "teacher": 2 * s, "procrustes": procrustes, "cka": 1 - procrustes, "gram": procrustes / 2} for s in (6, 12)]
    metrics = run / rundir.METRICS
    rundir.append_jsonl(metrics, {"event": "start", "run_dir": str(run), "total_steps": steps, "steps_per_epoch": steps})
    # generation only at the final evaluation: the eval before it has perplexity alone
    rundir.append_jsonl(metrics, {"event": "eval", "step": steps // 2, "epoch": 0.5, "scores": {"perplexity": perplexity + 1}})
    rundir.append_jsonl(metrics, {"event": "eval", "step": steps, "epoch": 1.0, "scores": scores})
    rundir.write_json(run / rundir.SUMMARY, {
        "format_version": 1, "name": "sweep", "variant": variant, "data": data, "run_dir": str(run), "task": "causal-lm",
        "seed": seed, "teacher": "facebook/opt-1.3b", "label_names": None, "steps": steps, "scores": scores,
        "teacher_scores": {"rougeL": 27.0, "perplexity": 6.5}, "geometry": geometry, "pairs": [[6, 12], [12, 24]],
    })
    return run


def make_lm_sweep(root: Path, variants: dict[str, tuple[float, float]], seeds: int = 5, **kw: Any) -> Path:
    """variant -> (shift of ROUGE-L, shift of perplexity) against BASE_ROUGE / BASE_PPL, per seed."""
    for variant, (d_rouge, d_ppl) in variants.items():
        for seed in range(seeds):
            jitter = NOISE[seed] * 10 if (d_rouge or d_ppl) else 0.0
            write_lm_run(root, variant, seed, BASE_ROUGE[seed] + d_rouge + jitter, BASE_PPL[seed] + d_ppl + jitter, **kw)
    return root


def by_variant(result, metric: str = "accuracy"):
    c = next(c for c in result.metrics if c.metric == metric)
    return {v.variant: v for v in c.versus}, {v.variant: v for v in c.variants}


# ---- known outcomes ----------------------------------------------------------------------------


def test_identical_variants_not_significant(tmp_path):
    make_sweep(tmp_path, {"baseline": 0.0, "copy": 0.0})
    result = compare(CompareArgs([str(tmp_path)], fail_if_worse=True))
    assert result.baseline == "baseline" and result.variants == ["baseline", "copy"]
    versus, rows = by_variant(result)
    v = versus["copy"]
    assert v.paired and v.pairing == "paired over 5 seeds"
    assert v.diff == 0.0 and v.t.p_value == 1.0 and v.rank.p_value == 1.0 and v.permutation.p_value == 1.0
    assert v.verdict == "n.s." and result.exit_code == 0
    assert rows["copy"].summary.mean == pytest.approx(sum(BASE_ACC[:5]) / 5)


def test_shift_down_is_significantly_worse(tmp_path):
    make_sweep(tmp_path, {"ce": 0.0, "procrustes": -0.05})
    result = compare(CompareArgs([str(tmp_path)], fail_if_worse=True))
    assert result.baseline == "ce"
    v = by_variant(result)[0]["procrustes"]
    assert v.diff == pytest.approx(-0.05 + sum(NOISE[:5]) / 5)
    assert v.diff_ci_high < 0 and v.t.p_value < 1e-4 and v.p_holm < 0.05
    assert v.verdict == "worse" and v.label == "significant (worse)"
    assert result.exit_code == 1
    assert compare(CompareArgs([str(tmp_path)])).exit_code == 0  # without --fail-if-worse
    # n = 5 pairs: the smallest Wilcoxon / sign-flip p is 2/32, so those tests cannot reach 0.05
    assert v.rank.p_value == pytest.approx(0.0625) and v.permutation.p_value == pytest.approx(0.0625)
    assert compare(CompareArgs([str(tmp_path)], test="wilcoxon", fail_if_worse=True)).exit_code == 0
    # procrustes was built as 0.3 + 0.05 for every seed: a constant difference has zero variance, so the t-test
    # falls back to the exact sign-flip test (issue 13 item 1; it used to give p = 0 and exit 1): with 5 pairs
    # its smallest p is 2/32, the gate cannot fire and says so
    geo = compare(CompareArgs([str(tmp_path)], metric="procrustes", fail_if_worse=True))
    g = by_variant(geo, "procrustes")[0]["procrustes"]
    assert g.diff == pytest.approx(0.05) and g.t.p_value == pytest.approx(0.0625) and g.verdict == "n.s."
    assert geo.exit_code == 0 and not g.can_reach_alpha and "it needs 6 seeds" in g.gate_note


def test_shift_up_is_better_and_distance_direction(tmp_path):
    make_sweep(tmp_path, {"baseline": 0.0, "geo": 0.05}, seeds=8)
    result = compare(CompareArgs([str(tmp_path)], metric="accuracy,procrustes", test="permutation", fail_if_worse=True))
    assert by_variant(result, "accuracy")[0]["geo"].verdict == "better"
    # procrustes was built as 0.3 - shift: lower distance is better
    geo = by_variant(result, "procrustes")[0]["geo"]
    assert geo.diff < 0 and geo.verdict == "better"
    assert result.exit_code == 0
    assert not result.metrics[1].higher_is_better


def test_holm_across_variants(tmp_path):
    make_sweep(tmp_path, {"baseline": 0.0, "a": -0.05, "b": 0.0})
    result = compare(CompareArgs([str(tmp_path)]))
    versus = by_variant(result)[0]
    assert versus["a"].p_holm == pytest.approx(min(1.0, 2 * versus["a"].p))  # smallest of 2 p-values x 2
    assert versus["b"].p_holm == 1.0
    assert any("Holm-adjusted over 2" in n for n in result.metrics[0].notes)


def test_unequal_seeds_use_unpaired_tests(tmp_path, capsys):
    # no seed shared (issue 13 item 3: with 2 or more shared seeds compare pairs on them instead)
    make_sweep(tmp_path, {"baseline": 0.0}, seeds=5)
    for seed in range(5, 8):
        write_run(tmp_path, "kd", seed, BASE_ACC[seed] - 0.05)
    result = compare(CompareArgs([str(tmp_path)]))
    v = by_variant(result)[0]["kd"]
    assert not v.paired and v.pairing.startswith("unpaired: no seed shared") and v.n == 8
    assert v.t.method == "Welch t" and v.rank.method == "Mann-Whitney U" and v.permutation.method == "permutation"
    assert any("unpaired: no seed shared" in n for n in result.metrics[0].notes)
    print_compare(result)
    out = capsys.readouterr().out
    assert "unpaired: no seed shared" in out and "Welch" in out


def test_geometry_table_and_spearman(tmp_path):
    make_sweep(tmp_path, {"baseline": 0.0, "geo": 0.05})
    result = compare(CompareArgs([str(tmp_path)]))
    rows = [g for g in result.geometry if g.variant == "geo"]
    assert [(g.student, g.teacher) for g in rows] == [(2, 4), (4, 8)]
    assert rows[0].n == 5 and rows[0].values["procrustes"] == pytest.approx(0.25 + 0.02)
    assert rows[0].score == pytest.approx(sum(BASE_ACC[:5]) / 5 + 0.05 + sum(NOISE[:5]) / 5)
    corr = result.metrics[0].correlation
    assert corr is not None and corr.n == 10 and corr.rho < -0.5  # higher accuracy <-> lower distance by construction


def test_single_variant_is_not_an_error(tmp_path, capsys):
    make_sweep(tmp_path, {"kd": 0.0}, seeds=3)
    result = compare(CompareArgs([str(tmp_path)], fail_if_worse=True))
    assert result.baseline == "kd" and result.metrics[0].versus == [] and result.exit_code == 0
    assert any("only one variant" in n for n in result.notes)
    print_compare(result)
    assert "kd" in capsys.readouterr().out


def test_one_run_per_variant(tmp_path):
    write_run(tmp_path, "baseline", 0, 0.7)
    write_run(tmp_path, "kd", 0, 0.6)
    result = compare(CompareArgs([str(tmp_path)]))
    v = by_variant(result)[0]["kd"]
    assert v.verdict == "n.s." and v.diff == pytest.approx(-0.1)
    assert any("one run only" in n for n in result.notes)
    json.dumps(to_json(result), allow_nan=False)  # NaN std/CI become null


# ---- the metric by task ------------------------------------------------------------------------


def test_default_metric_is_accuracy_for_classification(tmp_path, capsys):
    make_sweep(tmp_path, {"ce": 0.0, "kd": 0.0}, seeds=2)
    result = compare(CompareArgs([str(tmp_path)]))
    assert result.default_metric == "accuracy" and result.args.metric == "accuracy"
    assert [c.metric for c in result.metrics] == ["accuracy"]
    assert "metric accuracy: the default for classification runs; choose others with --metric" in result.notes
    given = compare(CompareArgs([str(tmp_path)], metric="accuracy"))
    assert given.default_metric is None and not any("default" in n for n in given.notes)
    assert to_json(given)["default_metric"] is None


def test_default_metric_is_rouge_l_for_causal_lm(tmp_path, capsys):
    make_lm_sweep(tmp_path, {"kd": (0.0, 0.0), "kd-procrustes": (1.0, -0.5)})
    result = compare(CompareArgs([str(tmp_path)], baseline="kd"))
    assert result.task.task == "causal-lm" and result.task.label_names is None
    assert result.default_metric == "rougeL" and result.args.metric == "rougeL"
    (c,) = result.metrics
    assert c.metric == "rougeL" and c.higher_is_better
    v = by_variant(result, "rougeL")[0]["kd-procrustes"]
    assert v.paired and v.diff == pytest.approx(1.0 + 10 * sum(NOISE[:5]) / 5) and v.verdict == "better"
    assert "metric rougeL: the default for causal-lm runs; choose others with --metric" in result.notes
    assert [s for s, _ in result.runs[0].curve_of("rougeL")] == [20]  # the perplexity-only eval has no ROUGE-L point
    data = to_json(result)
    assert data["default_metric"] == "rougeL" and data["metrics"][0]["metric"] == "rougeL"
    print_compare(result)
    out = capsys.readouterr().out
    assert "rougeL (higher is better)" in out and "the default for causal-lm runs" in out
    # the CLI: no --metric, so rougeL, said in the JSON
    code, out, err = run_cli(capsys, "compare", str(tmp_path), "--baseline", "kd", "--json", "-")
    assert code == 0, err
    data = json.loads(out)
    assert data["default_metric"] == "rougeL" and [m["metric"] for m in data["metrics"]] == ["rougeL"]
    code, out, err = run_cli(capsys, "compare", str(tmp_path), "--baseline", "kd", "--metric", "perplexity", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["default_metric"] is None


def test_perplexity_lower_is_better(tmp_path):
    # kd-procrustes: perplexity 0.5 lower on every seed (ROUGE-L unchanged) -> better; kd is then worse than it
    make_lm_sweep(tmp_path, {"kd": (0.0, 0.0), "kd-procrustes": (0.0, -0.5)})
    result = compare(CompareArgs([str(tmp_path)], metric="perplexity,response_nll", baseline="kd", fail_if_worse=True))
    for metric in ("perplexity", "response_nll"):
        c = next(c for c in result.metrics if c.metric == metric)
        assert not c.higher_is_better
        v = by_variant(result, metric)[0]["kd-procrustes"]
        assert v.diff < 0 and v.p_holm < 0.05 and v.verdict == "better"
    assert result.exit_code == 0
    flipped = compare(CompareArgs([str(tmp_path)], metric="perplexity", baseline="kd-procrustes", fail_if_worse=True))
    v = by_variant(flipped, "perplexity")[0]["kd"]
    assert v.diff > 0 and v.verdict == "worse" and flipped.exit_code == 1
    assert to_json(flipped)["metrics"][0]["higher_is_better"] is False


def test_error_default_metric_missing(tmp_path):
    for seed in range(2):
        write_lm_run(tmp_path, "kd", seed, 24.0, 10.0, drop_scores=("rougeL",))
    with pytest.raises(KdgeoError) as err:
        compare(CompareArgs([str(tmp_path)]))
    msg = str(err.value)
    assert "'rougeL' (the default for causal-lm runs) is missing" in msg and "perplexity" in msg and "--metric" in msg
    assert compare(CompareArgs([str(tmp_path)], metric="perplexity")).metrics[0].metric == "perplexity"


def test_error_different_tasks_before_a_default(tmp_path):
    write_run(tmp_path, "ce", 0, 0.7)
    write_lm_run(tmp_path, "kd", 0, 24.0, 10.0)
    with pytest.raises(KdgeoError, match="runs of different tasks.*task"):
        compare(CompareArgs([str(tmp_path)]))


# ---- loading -----------------------------------------------------------------------------------


def test_explicit_dirs_parent_expansion_and_dedup(tmp_path):
    root = make_sweep(tmp_path / "sweep", {"baseline": 0.0, "kd": 0.0}, seeds=2)
    (root / "notes").mkdir()
    (root / "unfinished").mkdir()
    (root / "unfinished" / rundir.SPEC_JSON).write_text("{}")
    warnings: list[str] = []
    runs = load_runs([str(root), str(root / "kd-seed0"), str(root / "kd-seed1" / rundir.SUMMARY)], warnings)
    assert sorted((r.variant, r.seed) for r in runs) == [("baseline", 0), ("baseline", 1), ("kd", 0), ("kd", 1)]
    assert any("unfinished" in w for w in warnings)
    run = next(r for r in runs if r.variant == "kd" and r.seed == 1)
    assert run.task.dataset == "kdgeo:wordnet-supersenses" and run.task.label_names == tuple(LABELS)
    assert [s for s, _ in run.curve] == [10, 20] and run.curve_of("accuracy")[-1] == (20, pytest.approx(run.scores["accuracy"]))
    assert [s for s, _ in run.curve_of("procrustes")] == [10, 20]


def test_truncated_metrics_line_tolerated(tmp_path):
    run = write_run(tmp_path, "baseline", 0, 0.7)
    write_run(tmp_path, "kd", 0, 0.7)
    with open(run / rundir.METRICS, "a") as fh:
        fh.write('{"event": "eval", "step": 30, "sco')
    runs = load_runs([str(tmp_path)])
    assert [s for s, _ in runs[0].curve] == [10, 20]
    compare(CompareArgs([str(tmp_path)]))


def test_older_summaries_fall_back(tmp_path):
    # no "variant" and no "data": the variant comes from "name", the data from spec.json
    for seed in range(2):
        write_run(tmp_path, "old", seed, 0.7 + seed / 100, drop=("variant", "data"))
    runs = load_runs([str(tmp_path)])
    assert {r.variant for r in runs} == {"sweep"}
    assert runs[0].task.dataset == "kdgeo:wordnet-supersenses" and runs[0].task.eval_split == "validation"
    bare = tmp_path / "bare"
    bare.mkdir()
    rundir.write_json(bare / rundir.SUMMARY, {"scores": {"accuracy": 0.5}})
    (r,) = load_runs([str(bare)])
    assert r.variant == "bare" and r.seed is None and r.curve == []


# ---- outputs -----------------------------------------------------------------------------------


# ---- exit-2 errors -----------------------------------------------------------------------------


def test_error_missing_path(tmp_path):
    with pytest.raises(KdgeoError, match=r"does not exist: .*nope"):
        compare(CompareArgs([str(tmp_path / "nope")]))


def test_error_no_runs_found(tmp_path):
    (tmp_path / "empty").mkdir()
    half = tmp_path / "half"
    half.mkdir()
    (half / rundir.METRICS).write_text("")
    with pytest.raises(KdgeoError) as err:
        compare(CompareArgs([str(tmp_path / "empty"), str(half)]))
    msg = str(err.value)
    assert "no runs found" in msg and "empty directory" in msg and "half" in msg and "summary.json" in msg
    with pytest.raises(KdgeoError, match="no run directories given"):
        compare(CompareArgs([]))


def test_error_unparseable_summary(tmp_path):
    write_run(tmp_path, "baseline", 0, 0.7)
    bad = write_run(tmp_path, "kd", 0, 0.7)
    (bad / rundir.SUMMARY).write_text('{"scores": {"accuracy": 0.7')
    with pytest.raises(KdgeoError, match=r"kd-seed0.summary\.json is not valid JSON"):
        compare(CompareArgs([str(tmp_path)]))


def test_error_different_tasks(tmp_path):
    write_run(tmp_path, "baseline", 0, 0.7)
    write_run(tmp_path, "kd", 0, 0.7, dataset="nyu-mll/glue")
    write_run(tmp_path, "pk", 0, 0.7, labels=["a", "b"])
    with pytest.raises(KdgeoError) as err:
        compare(CompareArgs([str(tmp_path)]))
    msg = str(err.value)
    assert "runs of different tasks" in msg and "dataset" in msg and "label_names" in msg
    assert "nyu-mll/glue" in msg and "kd-seed0" in msg and "pk-seed0" in msg


def test_error_metric_missing(tmp_path):
    write_run(tmp_path, "baseline", 0, 0.7)
    write_run(tmp_path, "kd", 0, 0.7)
    with pytest.raises(KdgeoError) as err:
        compare(CompareArgs([str(tmp_path)], metric="acuracy"))
    msg = str(err.value)
    assert "'acuracy'" in msg and "did you mean 'accuracy'" in msg and "macro_f1" in msg and "procrustes" in msg
    with pytest.raises(KdgeoError, match="'f1'.*missing"):
        compare(CompareArgs([str(tmp_path)], metric="f1"))


def test_error_geometry_metric_missing_in_some_runs(tmp_path):
    write_run(tmp_path, "baseline", 0, 0.7)
    write_run(tmp_path, "kd", 0, 0.7, drop=("geometry",))
    with pytest.raises(KdgeoError, match=r"'cka' is missing .* 1 of 2 runs: .*kd-seed0"):
        compare(CompareArgs([str(tmp_path)], metric="cka"))


def test_error_baseline_not_found(tmp_path):
    make_sweep(tmp_path, {"ce": 0.0, "procrustes": 0.0}, seeds=2)
    with pytest.raises(KdgeoError) as err:
        compare(CompareArgs([str(tmp_path)], baseline="procrustez"))
    msg = str(err.value)
    assert "'procrustez'" in msg and "ce, procrustes" in msg and "Did you mean 'procrustes'" in msg
    assert compare(CompareArgs([str(tmp_path)], baseline="PROCRUSTES")).baseline == "procrustes"


def test_error_bad_arguments(tmp_path):
    make_sweep(tmp_path, {"ce": 0.0}, seeds=2)
    with pytest.raises(KdgeoError, match="alpha"):
        compare(CompareArgs([str(tmp_path)], alpha=1.5))
    with pytest.raises(KdgeoError, match="test 'z'"):
        compare(CompareArgs([str(tmp_path)], test="z"))  # type: ignore[arg-type]
    with pytest.raises(KdgeoError, match="no metric in --metric ','"):
        compare(CompareArgs([str(tmp_path)], metric=","))
