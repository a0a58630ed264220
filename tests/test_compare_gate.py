"""kdgeo compare as a CI gate (issue 13): which test decides, in which direction, over which family, with which
evidence, and what the exit code is -- each case on fabricated run directories with the issue's own numbers.

Runs are written the way kdgeo.distillation writes them (tests/test_comparison.py's helpers); predictions.jsonl the way
kdgeo.rundir documents it. Expected outcomes are known by construction or recomputed with kdgeo.stats / scipy.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path

import pytest
from kdgeo import rundir, stats
from kdgeo.comparison import CompareArgs, CompareResult, VersusBaseline, compare
from kdgeo.errors import KdgeoError
from kdgeo.report_compare import print_compare, to_json, write_csv, write_markdown
from scipy import stats as st

from cli_helpers import run_cli
from test_comparison import make_lm_sweep, make_sweep, write_lm_run, write_run


def versus(result: CompareResult, variant: str, metric: str | None = None) -> VersusBaseline:
    c = result.metrics[0] if metric is None else next(c for c in result.metrics if c.metric == metric)
    return next(v for v in c.versus if v.variant == variant)


def runs_with(root: Path, variant: str, values: dict[int, float]) -> None:
    """One run per seed with that accuracy."""
    for seed, acc in values.items():
        write_run(root, variant, seed, acc)


def set_score(run: Path, name: str, value: float) -> None:
    summary = json.loads((run / rundir.SUMMARY).read_text())
    summary["scores"][name] = value
    rundir.write_json(run / rundir.SUMMARY, summary)


def sha(i: int) -> str:
    return hashlib.sha256(f"example {i}".encode()).hexdigest()


def classifier_run(root: Path, variant: str, seed: int, correct: list[bool], hashes: list[str] | None = None) -> Path:
    """A run whose accuracy is mean(correct), with its predictions.jsonl."""
    run = write_run(root, variant, seed, sum(correct) / len(correct))
    records = [
        {
            "index": i,
            "text_sha256": (hashes or [sha(j) for j in range(len(correct))])[i],
            "label": 0,
            "prediction": 0 if c else 1,
            "correct": c,
        }
        for i, c in enumerate(correct)
    ]
    (run / rundir.PREDICTIONS).write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def lm_run(root: Path, variant: str, seed: int, rouge: list[float]) -> Path:
    """A causal-lm run whose rougeL is the mean of the per-example ROUGE-L (x100, as kdgeo writes them)."""
    run = write_lm_run(root, variant, seed, sum(rouge) / len(rouge), 10.0)
    records = [{"index": i, "text_sha256": sha(i), "rougeL": r, "nll": 2.0, "tokens": 5} for i, r in enumerate(rouge)]
    (run / rundir.PREDICTIONS).write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


# ---- 1. zero-variance differences ---------------------------------------------------------------


def test_1_constant_differences_no_longer_fire(tmp_path):
    # (-0.002, -0.002) over two seeds used to give p = 0 and exit 1; the larger (-0.002, -0.004) gave p = 0.20
    runs_with(tmp_path / "a", "ce", {0: 0.71, 1: 0.74})
    runs_with(tmp_path / "a", "kd", {0: 0.708, 1: 0.738})
    result = compare(CompareArgs([str(tmp_path / "a")], fail_if_worse=True))
    v = versus(result, "kd")
    assert v.t.p_value == pytest.approx(0.5) and v.p > 0  # exact sign-flip: 2 / 2^2
    assert v.verdict == "n.s." and result.exit_code == 0
    assert not v.can_reach_alpha and v.min_p == pytest.approx(0.5)
    assert "zero-variance differences" in v.gate_note and "it needs 6 seeds" in v.gate_note
    assert any("cannot fail on kd vs ce" in w for w in result.warnings)

    runs_with(tmp_path / "b", "ce", {0: 0.71, 1: 0.74})
    runs_with(tmp_path / "b", "kd", {0: 0.708, 1: 0.736})
    larger = compare(CompareArgs([str(tmp_path / "b")], fail_if_worse=True))
    assert versus(larger, "kd").t.p_value == pytest.approx(st.ttest_rel([0.708, 0.736], [0.71, 0.74]).pvalue)
    assert versus(larger, "kd").t.p_value == pytest.approx(0.2048, abs=1e-3) and larger.exit_code == 0


# ---- 2. direction from the deciding test ---------------------------------------------------------


ITEM2_BASE = [0.70 + 0.001 * i for i in range(12)]
ITEM2_DIFF = [0.005 + 0.001 * i for i in range(11)] + [-0.5]  # wins on 11 of 12 seeds, collapses on one


def test_2_rank_test_direction_is_its_own(tmp_path):
    runs_with(tmp_path, "ce", dict(enumerate(ITEM2_BASE)))
    runs_with(tmp_path, "kd", {i: b + d for i, (b, d) in enumerate(zip(ITEM2_BASE, ITEM2_DIFF))})
    result = compare(CompareArgs([str(tmp_path)], test="wilcoxon", fail_if_worse=True))
    v = versus(result, "kd")
    assert v.diff < 0 < v.estimate  # the mean says worse, the Hodges-Lehmann shift says better
    assert v.rank.p_value == pytest.approx(st.wilcoxon(ITEM2_DIFF, method="exact").pvalue)
    assert v.rank.p_value / 2 == pytest.approx(0.017, abs=1e-3)  # the one-sided p
    assert v.verdict == "better" and v.test == "wilcoxon" and result.exit_code == 0  # used to be "worse", exit 1
    assert v.prob_improvement == pytest.approx(11 / 12)
    a = [b + d for b, d in zip(ITEM2_BASE, ITEM2_DIFF)]
    assert v.hodges_lehmann == pytest.approx(stats.hodges_lehmann_paired(a, ITEM2_BASE)) and v.hodges_lehmann > 0


# ---- 3. a missing seed ---------------------------------------------------------------------------


ITEM3_BASE = {0: 0.60, 1: 0.70, 2: 0.65, 3: 0.75, 4: 0.80}
ITEM3_KD = {0: 0.581, 1: 0.679, 2: 0.6305, 3: 0.7295}  # about -0.02 on each shared seed; seed 4 missing


def test_3_pairs_on_the_shared_seeds(tmp_path):
    runs_with(tmp_path, "ce", ITEM3_BASE)
    runs_with(tmp_path, "kd", ITEM3_KD)
    result = compare(CompareArgs([str(tmp_path)], fail_if_worse=True))
    v = versus(result, "kd")
    assert v.paired and v.seeds == (0, 1, 2, 3) and v.left_out == ((), (4,)) and v.n == 4
    assert "seed 4" in v.pairing
    shared = [ITEM3_BASE[s] for s in range(4)]
    assert v.t.p_value == pytest.approx(st.ttest_rel(list(ITEM3_KD.values()), shared).pvalue)
    welch = st.ttest_ind(list(ITEM3_KD.values()), list(ITEM3_BASE.values()), equal_var=False).pvalue
    assert welch > 0.2 and v.t.p_value < 0.01  # all runs unpaired would miss it
    assert v.verdict == "worse" and result.exit_code == 1
    assert to_json(result)["metrics"][0]["variants"][1]["vs_baseline"]["seeds_left_out"] == {"kd": [], "ce": [4]}


def test_3_one_shared_seed_goes_unpaired_and_says_so(tmp_path):
    runs_with(tmp_path, "ce", {0: 0.70, 1: 0.72, 2: 0.71})
    runs_with(tmp_path, "kd", {2: 0.69, 3: 0.70, 4: 0.68})
    result = compare(CompareArgs([str(tmp_path)]))
    v = versus(result, "kd")
    assert not v.paired and v.t.method == "Welch t" and "only 1 seed shared" in v.pairing
    assert any("only 1 seed shared" in n and "Welch" in n for n in result.metrics[0].notes)


# ---- 6. ties: exact distributions decide ---------------------------------------------------------


def test_6_mann_whitney_with_ties_is_exact(tmp_path):
    # 4 vs 4 with ties: the normal approximation said p = 0.047 (exit 1), the exact value is 0.086
    runs_with(tmp_path, "ce", {0: 0.71, 1: 0.71, 2: 0.72, 3: 0.72})
    runs_with(tmp_path, "kd", {4: 0.70, 5: 0.70, 6: 0.70, 7: 0.71})
    result = compare(CompareArgs([str(tmp_path)], test="wilcoxon", fail_if_worse=True))
    v = versus(result, "kd")
    assert not v.paired and v.rank.method.startswith("Mann-Whitney")
    old = st.mannwhitneyu([0.70, 0.70, 0.70, 0.71], [0.71, 0.71, 0.72, 0.72], method="asymptotic").pvalue
    assert old == pytest.approx(0.047, abs=1e-3)
    assert v.p == pytest.approx(0.0857, abs=1e-3) and v.verdict == "n.s." and result.exit_code == 0
    assert v.can_reach_alpha and v.min_p == pytest.approx(2 / 70)  # 4 vs 4 can fire; these data just do not


# ---- 7. a gate that cannot fire says so ----------------------------------------------------------


def test_7_three_seeds_wilcoxon_cannot_fire(tmp_path, capsys):
    make_sweep(tmp_path, {"ce": 0.0, "kd": -0.05}, seeds=3)
    result = compare(CompareArgs([str(tmp_path)], test="wilcoxon", fail_if_worse=True))
    v = versus(result, "kd")
    message = "with 3 seeds the wilcoxon test cannot reach alpha=0.05 (smallest p 0.25); it needs 6 seeds"
    assert v.gate_note.startswith(message) and not v.can_reach_alpha and v.runs_needed == 6
    assert result.exit_code == 0 and any(message in w for w in result.warnings)
    data = to_json(result)
    vs = data["metrics"][0]["variants"][1]["vs_baseline"]
    assert vs["can_reach_alpha"] is False and vs["runs_needed"] == 6 and vs["min_p"] == pytest.approx(0.25)
    assert message in vs["gate_note"] and any(message in w for w in data["warnings"])
    assert "could not have failed" in data["verdict"]
    code, out, err = run_cli(capsys, "compare", str(tmp_path), "--test", "wilcoxon", "--fail-if-worse")
    assert code == 0 and message in err
    code, out, err = run_cli(capsys, "compare", str(tmp_path), "--test", "wilcoxon", "--fail-if-worse", "--json", "-")
    assert code == 0 and message in err and message in json.loads(out)["warnings"][-1]
    # the t-test can fire with 3 seeds: -0.05 on every seed (with noise) fails the gate
    assert compare(CompareArgs([str(tmp_path)], fail_if_worse=True)).exit_code == 1


def test_7_one_seed_per_variant_without_predictions(tmp_path):
    write_run(tmp_path, "ce", 0, 0.75)
    write_run(tmp_path, "kd", 0, 0.60)
    result = compare(CompareArgs([str(tmp_path)], fail_if_worse=True))
    v = versus(result, "kd")
    assert v.gate_note.startswith("with 1 seed per variant the t test gives no p-value") and v.evidence == "seeds"
    assert "it needs 2 seeds per variant" in v.gate_note and "predictions.jsonl" in v.gate_note
    assert result.exit_code == 0 and any("cannot fail on kd vs ce" in w for w in result.warnings)


# ---- what the gate means: family, directions, margins -------------------------------------------


def test_holm_family_is_variants_times_metrics_with_fail_if_worse(tmp_path):
    make_sweep(tmp_path, {"baseline": 0.0, "a": -0.05, "b": 0.0})
    plain = compare(CompareArgs([str(tmp_path)], metric="accuracy,cka"))
    gated = compare(CompareArgs([str(tmp_path)], metric="accuracy,cka", fail_if_worse=True))
    assert plain.family == "variants" and gated.family == "variants x metrics"
    p = versus(plain, "a").p
    assert versus(plain, "a").p_holm == pytest.approx(min(1.0, 2 * p))
    assert versus(gated, "a").p_holm == pytest.approx(min(1.0, 4 * p))  # smallest of 2 variants x 2 metrics
    assert versus(gated, "a").diff_ci_confidence == pytest.approx(1 - 0.05 / 4)
    a = [0.71, 0.74, 0.69, 0.73, 0.72]
    kd = [x - 0.05 + n for x, n in zip(a, [0.002, -0.001, 0.0015, -0.002, 0.0005])]
    _, low, high = stats.mean_difference_ci(kd, a, paired=True, confidence=1 - 0.05 / 4)
    assert (versus(gated, "a").diff_ci_low, versus(gated, "a").diff_ci_high) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    assert versus(gated, "a").diff_ci95 == pytest.approx(stats.mean_difference_ci(kd, a, paired=True)[1:])
    assert gated.exit_code == 1 and to_json(gated)["holm_family"] == "variants x metrics"
    entry = to_json(gated)["metrics"][0]["variants"][1]["vs_baseline"]
    assert entry["diff_ci95"] == pytest.approx(list(stats.mean_difference_ci(kd, a, paired=True)[1:]))
    assert entry["diff_ci"]["confidence"] == pytest.approx(0.9875) and entry["diff_ci"]["high"] == pytest.approx(high)


def test_unknown_metric_needs_a_direction(tmp_path, capsys):
    make_sweep(tmp_path, {"ce": 0.0, "kd": -0.05}, seeds=3)
    for run in tmp_path.iterdir():
        seed = int(run.name[-1])
        set_score(run, "bleu", 30.0 + seed - ((5.0 + 0.1 * seed * seed) if run.name.startswith("kd") else 0.0))
    with pytest.raises(KdgeoError, match="--higher-is-better bleu or --lower-is-better bleu"):
        compare(CompareArgs([str(tmp_path)], metric="bleu", fail_if_worse=True))
    assert compare(CompareArgs([str(tmp_path)], metric="bleu")).exit_code == 0  # no gate: reported, assumed higher
    declared = compare(CompareArgs([str(tmp_path)], metric="bleu", fail_if_worse=True, higher_is_better=("bleu",)))
    assert declared.metrics[0].direction == "--higher-is-better" and declared.exit_code == 1
    lower = compare(CompareArgs([str(tmp_path)], metric="bleu", fail_if_worse=True, lower_is_better=("bleu",)))
    assert not lower.metrics[0].higher_is_better and versus(lower, "kd").verdict == "better" and lower.exit_code == 0
    with pytest.raises(KdgeoError, match="accuracy is higher-is-better in kdgeo"):
        compare(CompareArgs([str(tmp_path)], lower_is_better=("accuracy",)))
    with pytest.raises(KdgeoError, match="name nope, which is not compared"):
        compare(CompareArgs([str(tmp_path)], higher_is_better=("nope",)))
    code, _, err = run_cli(capsys, "compare", str(tmp_path), "--metric", "bleu", "--fail-if-worse")
    assert code == 2 and "--higher-is-better bleu" in err
    code, _, err = run_cli(
        capsys, "compare", str(tmp_path), "--metric", "bleu", "--fail-if-worse", "--higher-is-better", "bleu"
    )
    assert code == 1, err


def test_margin_non_inferiority(tmp_path, capsys):
    # -0.005 on every seed (small noise): significantly worse, but not by more than 0.01
    make_sweep(tmp_path, {"ce": 0.0, "kd": -0.005})
    assert compare(CompareArgs([str(tmp_path)], fail_if_worse=True)).exit_code == 1
    within = compare(CompareArgs([str(tmp_path)], fail_if_worse=True, margin=("0.01",)))
    v = versus(within, "kd")
    assert v.margin == 0.01 and v.verdict == "worse" and not v.fails_gate and within.exit_code == 0
    assert v.margin_estimate == pytest.approx(v.diff + 0.01) and v.margin_estimate > 0
    beyond = compare(CompareArgs([str(tmp_path)], fail_if_worse=True, margin=("accuracy=0.001",)))
    vb = versus(beyond, "kd")
    kd = [r for r in beyond.runs if r.variant == "kd"]
    ce = [r for r in beyond.runs if r.variant == "ce"]
    shifted = stats.paired_t([r.scores["accuracy"] + 0.001 for r in kd], [r.scores["accuracy"] for r in ce])
    assert vb.margin_p == pytest.approx(shifted.p_value) and vb.fails_gate and beyond.exit_code == 1
    # with the t-test the margin gate is "the interval's upper end lies below -margin"
    assert (vb.diff_ci_high < -0.001) == vb.fails_gate
    # --margin 0 is the plain gate
    zero = compare(CompareArgs([str(tmp_path)], fail_if_worse=True, margin=("0",)))
    assert versus(zero, "kd").gate_p_holm == pytest.approx(versus(zero, "kd").p_holm) and zero.exit_code == 1
    code, out, err = run_cli(
        capsys, "compare", str(tmp_path), "--fail-if-worse", "--margin", "accuracy=0.01", "--json", "-"
    )
    assert code == 0, err
    vs = json.loads(out)["metrics"][0]["variants"][1]["vs_baseline"]
    assert vs["margin"]["value"] == 0.01 and vs["fails_gate"] is False
    for bad, match in (("x", "'x' is not a number"), ("-1", "non-negative"), ("bleu=0.1", "bleu is not compared")):
        with pytest.raises(KdgeoError, match=match):
            compare(CompareArgs([str(tmp_path)], margin=(bad,)))
    code, _, err = run_cli(capsys, "compare", str(tmp_path), "--margin", "accuracy=x")
    assert code == 2 and "--margin" in err


def test_margin_lower_is_better(tmp_path):
    # perplexity 0.5 higher (worse) on every seed, with noise
    make_lm_sweep(tmp_path, {"kd": (0.0, 0.0), "worse": (0.0, 0.5)})
    args = {"metric": "perplexity", "baseline": "kd", "fail_if_worse": True}
    assert compare(CompareArgs([str(tmp_path)], **args)).exit_code == 1
    assert compare(CompareArgs([str(tmp_path)], margin=("perplexity=1",), **args)).exit_code == 0
    tight = compare(CompareArgs([str(tmp_path)], margin=("perplexity=0.1",), **args))
    assert tight.exit_code == 1 and versus(tight, "worse").margin_estimate == pytest.approx(
        versus(tight, "worse").diff - 0.1
    )


# ---- evidence beyond seeds: predictions.jsonl ----------------------------------------------------


A_CORRECT = [True] * 110 + [False] * 40 + [True] * 10 + [False] * 40  # 120 / 200
B_CORRECT = [True] * 150 + [False] * 50  # 150 / 200: 40 examples only ce gets right, 10 only kd


def test_two_single_seed_classifiers_mcnemar_decides(tmp_path, capsys):
    classifier_run(tmp_path, "ce", 0, B_CORRECT)
    classifier_run(tmp_path, "kd", 0, A_CORRECT)
    result = compare(CompareArgs([str(tmp_path)], fail_if_worse=True))
    v = versus(result, "kd")
    assert v.evidence == "examples" and v.test == "mcnemar" and v.examples is not None
    assert v.examples.examples == 200 and v.examples.seeds == 1
    assert v.p == pytest.approx(st.binomtest(10, 50, 0.5).pvalue)  # exact, on the 50 discordant pairs
    assert v.estimate == pytest.approx(-0.15) and v.verdict == "worse" and result.exit_code == 1
    boot = v.examples.bootstrap
    assert boot.diff == pytest.approx(-0.15) and boot.ci_high < 0
    assert (v.diff_ci_low, v.diff_ci_high) == (boot.ci_low, boot.ci_high)
    assert "evaluation noise only" in v.gate_note and "not seed-to-seed variation" in v.gate_note
    assert not any("cannot fail" in w for w in result.warnings)
    data = to_json(result)["metrics"][0]["variants"][1]["vs_baseline"]
    assert data["decided_by"] == "mcnemar" and data["evidence"] == "examples"
    assert data["examples"]["mcnemar"]["p"] == pytest.approx(v.p) and data["examples"]["bootstrap"]["resamples"] == 9999
    print_compare(result)
    out = capsys.readouterr().out
    assert "mcnemar" in out and "FAIL" in out


def test_predictions_on_different_examples_are_not_paired(tmp_path):
    classifier_run(tmp_path, "ce", 0, B_CORRECT)
    classifier_run(tmp_path, "kd", 0, A_CORRECT, hashes=[sha(i + 1000) for i in range(200)])
    v = versus(compare(CompareArgs([str(tmp_path)], fail_if_worse=True)), "kd")
    assert v.examples is None and "cover different examples" in v.examples_note and v.evidence == "seeds"


def test_predictions_that_do_not_give_the_score_are_not_used(tmp_path):
    classifier_run(tmp_path, "ce", 0, B_CORRECT)
    run = classifier_run(tmp_path, "kd", 0, A_CORRECT)
    set_score(run, "accuracy", 0.7)
    v = versus(compare(CompareArgs([str(tmp_path)])), "kd")
    assert v.examples is None and "does not give summary.json's accuracy" in v.examples_note


def test_hierarchical_bootstrap_when_the_seed_test_cannot_fire(tmp_path):
    for seed in range(2):
        classifier_run(tmp_path, "ce", seed, B_CORRECT)
        # seed 1 gets one more example right: the seed-level differences vary (-0.15, -0.145)
        classifier_run(tmp_path, "kd", seed, [c or (seed == 1 and i == 110) for i, c in enumerate(A_CORRECT)])
    wilcoxon = compare(CompareArgs([str(tmp_path)], test="wilcoxon", fail_if_worse=True))
    v = versus(wilcoxon, "kd")
    assert v.evidence == "examples" and v.test == "bootstrap" and v.examples is not None and v.examples.seeds == 2
    assert "hierarchical" in v.examples.bootstrap.method and v.verdict == "worse" and wilcoxon.exit_code == 1
    assert v.gate_note.startswith("with 2 seeds the wilcoxon test cannot reach alpha=0.05")
    # the t-test can fire with 2 seeds: it decides; the bootstrap is reported next to it
    t = versus(compare(CompareArgs([str(tmp_path)])), "kd")
    assert t.evidence == "seeds" and t.test == "t" and t.examples is not None and t.examples.bootstrap.p_value < 0.05


def test_causal_lm_rouge_bootstrap(tmp_path):
    base = [30.0 + (i % 7) for i in range(60)]
    lm_run(tmp_path, "kd", 0, base)
    lm_run(tmp_path, "worse", 0, [r - 5.0 if i % 4 else r for i, r in enumerate(base)])
    result = compare(CompareArgs([str(tmp_path)], baseline="kd", fail_if_worse=True))
    v = versus(result, "worse")
    assert result.metrics[0].metric == "rougeL" and v.test == "bootstrap" and v.examples is not None
    assert v.examples.mcnemar is None and v.examples.bootstrap.diff == pytest.approx(v.diff)
    assert v.verdict == "worse" and result.exit_code == 1
    # no per-example perplexity evidence (a token-weighted mean, not a mean over examples)
    ppl = versus(compare(CompareArgs([str(tmp_path)], baseline="kd", metric="perplexity")), "worse")
    assert ppl.examples is None and "accuracy and ROUGE-L only" in ppl.examples_note


# ---- effect sizes and geometry vs score ----------------------------------------------------------


def test_between_and_within_variant_correlation(tmp_path):
    # variant means: lower distance, higher accuracy (between: -1); within a variant the other way (+1)
    for k, variant in enumerate(["a", "b", "c", "d"]):
        for seed in range(3):
            write_run(tmp_path, variant, seed, 0.6 + 0.05 * k + 0.01 * seed, procrustes=0.5 - 0.05 * k + 0.01 * seed)
    result = compare(CompareArgs([str(tmp_path)], baseline="a"))
    c = result.metrics[0]
    assert c.correlation_between is not None and c.correlation_within is not None
    assert c.correlation_between.n == 4 and c.correlation_between.rho == pytest.approx(-1.0)
    assert c.correlation_within.n == 12 and c.correlation_within.rho > 0.9
    m = to_json(result)["metrics"][0]
    assert m["spearman_procrustes_between"]["n"] == 4 and m["spearman_procrustes_within"]["rho"] > 0.9
    assert m["spearman_procrustes"]["n"] == 12  # the pooled one, kept for old readers


def test_every_output_has_the_new_fields(tmp_path, capsys):
    make_sweep(tmp_path, {"ce": 0.0, "kd": -0.05}, seeds=3)
    result = compare(CompareArgs([str(tmp_path)], test="wilcoxon", fail_if_worse=True, margin=("0.01",)))
    vs = to_json(result)["metrics"][0]["variants"][1]["vs_baseline"]
    for key in (
        "diff",
        "diff_ci95",
        "t",
        "rank",
        "permutation",
        "test",
        "p",
        "p_holm",
        "significant",
        "verdict",
        "decided_by",
        "evidence",
        "estimate",
        "seeds_paired",
        "seeds_left_out",
        "diff_ci",
        "hodges_lehmann",
        "prob_improvement",
        "min_p",
        "can_reach_alpha",
        "runs_needed",
        "gate_note",
        "examples",
        "examples_note",
        "margin",
        "gate_p_holm",
        "fails_gate",
    ):
        assert key in vs, key
    assert vs["t"]["estimate"] == pytest.approx(vs["diff"]) and "min_p" in vs["rank"]
    json.dumps(to_json(result), allow_nan=False)
    out = tmp_path / "out"
    out.mkdir()
    write_csv(result, out / "c.csv")
    rows = list(csv.DictReader(io.StringIO((out / "c.csv").read_text())))
    kd = next(r for r in rows if r["variant"] == "kd")
    assert kd["test"] == "wilcoxon" and kd["can_reach_alpha"] == "False" and kd["runs_needed"] == "6"
    assert float(kd["prob_improvement"]) == 0.0 and kd["margin"] == "0.01" and kd["fails_gate"] == "False"
    assert list(rows[0])[:18] == [
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
    ]  # the old columns keep their places
    write_markdown(result, out / "c.md")
    md = (out / "c.md").read_text()
    assert "| variant | decided by | estimate | HL shift | P(better) |" in md and "cannot fire" in md
    assert "Gate: no variant significantly worse than ce" in md
    print_compare(result)
    printed = capsys.readouterr().out
    assert "P(win)" in printed and "cannot" in printed and "between variants" in printed
    assert not math.isnan(versus(result, "kd").hodges_lehmann)


def test_a_real_tiny_sweep_shows_bootstrap_and_mcnemar(tiny, tmp_path, capsys):
    """The issue's "done when": distill writes predictions.jsonl, compare uses them (one seed per variant)."""
    import kdgeo

    from cli_helpers import tiny_spec

    spec = tiny_spec(
        tiny,
        tmp_path,
        data={
            "dataset": "kdgeo:wordnet-supersenses",
            "max_train_samples": 32,
            "max_eval_samples": 16,
            "max_length": 16,
        },
        train={"epochs": 1, "batch_size": 16, "lr": 1e-3, "log_every": 1, "warmup_ratio": 0.0},
        monitor={"every": 0, "samples": 8},
        sweep={"seeds": [0], "variants": {"ce": {}, "ce-gram": {"losses": [{"kind": "ce"}, {"kind": "gram"}]}}},
    )
    sweep = kdgeo.distill(spec, progress=None)
    assert all((Path(d) / rundir.PREDICTIONS).exists() for d in sweep.run_dirs)
    code, out, err = run_cli(capsys, "compare", *[str(d) for d in sweep.run_dirs], "--fail-if-worse", "--json", "-")
    assert code in (0, 1), err
    vs = json.loads(out)["metrics"][0]["variants"][1]["vs_baseline"]
    assert vs["evidence"] == "examples" and vs["decided_by"] == "mcnemar"
    assert vs["examples"]["examples"] == 16 and vs["examples"]["mcnemar"]["p"] is not None
    assert vs["examples"]["bootstrap"]["resamples"] == 9999 and "evaluation noise only" in vs["gate_note"]
