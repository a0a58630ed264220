"""Models whose hidden states differ in width by index (issue 11 C).

OPT models with ``word_embed_proj_dim != hidden_size`` (opt-350m: 512 vs 1024) project the last
hidden state down, so ``hidden_states[L]`` is narrower (or wider) than the others. Every consumer
(probe, projection losses, probe-chosen pairs, the teacher-output cache, mse/cosine width checks)
takes widths per hidden-state index from :func:`kdgeo.models.hidden_widths` (checked against real
forward passes in test_models.py); these tests run each consumer with such a model as teacher and
as student.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import run_cli, tiny_lm_spec, write_spec
from conftest import lm_rows, make_causal_lm, make_lm_tokenizer, token_rows, write_jsonl
from kdgeo import geometry

SHORT = {"template": "Q: {prompt}\nA:", "context_template": "Q: {prompt}\nC: {context}\nA:"}


@pytest.fixture(scope="module")
def opt_proj(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """teacher: 4-layer OPT, hidden 64, last hidden state projected to 32 (widths [64]*4 + [32]).
    student: 2-layer OPT, hidden 32, projected to 16 ([32, 32, 16]). Same tokenizer."""
    root = tmp_path_factory.mktemp("opt_proj")
    make_lm_tokenizer(root / "tok")
    return {
        "opt_teacher": make_causal_lm(root / "teacher", root / "tok", "opt", layers=4, width=64, seed=0, proj=32),
        "student": make_causal_lm(root / "student", root / "tok", "opt", layers=2, width=32, seed=1, proj=16),
        "train": write_jsonl(root / "train.jsonl", lm_rows("train", 32, context_every=3)),
        "eval": write_jsonl(root / "eval.jsonl", lm_rows("validation", 8, context_every=3)),
        "texts": write_jsonl(root / "texts.jsonl", [{"text": r["response"]} for r in lm_rows("train", 24)]),
    }


def _spec(opt_proj: dict[str, Path], tmp_path: Path, **sections: Any) -> dict[str, Any]:
    data = {**tiny_lm_spec(opt_proj, tmp_path)["data"], **SHORT}
    return tiny_lm_spec(
        opt_proj, tmp_path, data=data, generate={"max_new_tokens": 2}, monitor={"every": 2, "samples": 8}, **sections,
    )


def _with_cache(spec: dict[str, Any], cache: Path) -> dict[str, Any]:
    """``spec`` renamed "cached", with the teacher-output cache on (entries under ``cache``)."""
    output = {**spec["output"], "teacher_outputs": True, "teacher_outputs_dir": str(cache)}
    return {**spec, "name": "cached", "output": output}


def _steps(run: Path) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == "step"]


def test_probe_with_a_projected_last_layer_on_both_sides(opt_proj, tmp_path, capsys):
    """`kdgeo probe` takes each index's own width; its streamed tables equal geometry's batch
    functions on all rows at once (float64 accumulation: 1e-6), the narrow last rows included."""
    out_json = tmp_path / "p.json"
    code, _, err = run_cli(
        capsys, "probe", str(opt_proj["opt_teacher"]), str(opt_proj["student"]), "--data", str(opt_proj["texts"]),
        "--max-samples", "24", "--batch-size", "7", "--rows", "tokens", "--json", str(out_json), "--quiet",
    )
    assert code == 0, err
    tables = json.loads(out_json.read_text())["tables"]
    texts = [r["response"] for r in lm_rows("train", 24)]
    rows = {}
    for role in ("opt_teacher", "student"):
        rows[role] = token_rows(opt_proj[role], texts)
    assert [r.shape[1] for r in rows["opt_teacher"]] == [64, 64, 64, 64, 32]
    assert [r.shape[1] for r in rows["student"]] == [32, 32, 16]
    for t in range(5):
        for s in range(3):
            x, y = rows["opt_teacher"][t], rows["student"][s]
            assert tables["procrustes"][t][s] == pytest.approx(float(geometry.procrustes_distance(x, y)), abs=1e-6)


def _same_losses(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> None:
    """Cached vs uncached: equal to fp16 rounding. rel 2e-3: fp16 keeps 11 significant bits
    (2^-11 = 4.9e-4 relative per value), a few such roundings reach a loss; abs 1e-5 for
    distances near 0."""
    assert [e["step"] for e in a] == [e["step"] for e in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=2e-3, abs=1e-5), (k, x["step"])


def _cached_manifest(run: Path, teacher_widths: list[int]) -> dict[str, Any]:
    """The run's cache entry, checked: every cached teacher layer is stored at its own index's width."""
    summary = json.loads((run / "summary.json").read_text())
    manifest = json.loads((Path(summary["teacher_outputs"]) / "manifest.json").read_text())
    plan = manifest["payload"]["plan"]
    assert plan["widths"] == [teacher_widths[t] for t in plan["layers"]]
    stored = {name: f["width"] for name, f in manifest["fields"].items() if name.startswith("layer")}
    assert stored == {f"layer{t}": teacher_widths[t] for t in plan["layers"]}
    return plan


def test_projection_losses_and_the_cache_with_a_projected_teacher(opt_proj, tmp_path, capsys):
    """Teacher side: the uniform map pairs student 2 (32 wide) with the teacher's projected last
    layer (32 wide) and student 1 with teacher layer 2 (64 wide): one projection map per pair, each
    of its own shape; the teacher-output cache stores layer 2 at 64 and layer 4 at 32 and gives
    the uncached run's losses to fp16 rounding."""
    losses = [{"kind": "ce"}, {"kind": "kd"}, {"kind": "projection"}, {"kind": "procrustes"}]
    student = {"init": "config", "arch": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2}}
    base = _spec(opt_proj, tmp_path, losses=losses, student=student, train={"max_steps": 3})
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "a.toml", {**base, "name": "plain"})), "-q")
    assert code == 0, err
    cached = _with_cache(base, tmp_path / "c")
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "b.toml", cached)), "-q")
    assert code == 0, err
    runs = tmp_path / "runs"
    assert json.loads((runs / "plain" / "summary.json").read_text())["student_widths"] == [32, 32, 32]
    assert _cached_manifest(runs / "cached", [64, 64, 64, 64, 32])["layers"] == [2, 4]
    _same_losses(_steps(runs / "cached"), _steps(runs / "plain"), ("ce", "kd", "projection", "procrustes", "loss"))


def test_probe_pairs_and_the_teacher_output_cache_with_projected_layers_on_both_sides(opt_proj, tmp_path, capsys):
    """pairs = "probe" over a teacher [64]*4 + [32] and a student [32, 32, 16], with projection
    and procrustes losses; the teacher-output cache stores each paired layer at its own width,
    and the cached run's losses equal the uncached run's to fp16 rounding."""
    losses = [{"kind": "kd"}, {"kind": "projection"}, {"kind": "procrustes"}]
    student = {"init": "pretrained", "model": str(opt_proj["student"])}
    features = {"rows": "tokens", "pairs": "probe"}
    base = _spec(opt_proj, tmp_path, losses=losses, student=student, features=features, train={"max_steps": 3})
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "a.toml", {**base, "name": "plain"})))
    assert code == 0, err
    assert "layer pairs from probing" in err
    cached = _with_cache(base, tmp_path / "c")
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "b.toml", cached)), "-q")
    assert code == 0, err
    runs = tmp_path / "runs"
    assert json.loads((runs / "cached" / "summary.json").read_text())["student_widths"] == [32, 32, 16]
    _cached_manifest(runs / "cached", [64, 64, 64, 64, 32])
    _same_losses(_steps(runs / "cached"), _steps(runs / "plain"), ("kd", "projection", "procrustes", "loss"))


def test_mse_pairs_compare_the_widths_of_their_own_indices(opt_proj, tmp_path, capsys):
    """A student made of teacher blocks keeps the projected last layer ([64, 64, 32]): an explicit
    pair of a 32-wide and a 64-wide index is refused before any training with exit 2 naming the
    pair; probe pairs only pick equally wide indices (the student's last goes to the teacher's)."""
    losses = [{"kind": "ce"}, {"kind": "mse"}]
    spec = _spec(opt_proj, tmp_path, losses=losses, train={"max_steps": 2})
    bad = {**spec, "name": "bad", "features": {"rows": "tokens", "pairs": [[1, 2], [2, 3]]}}
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "b.toml", bad)), "-q")
    assert code == 2, err
    assert "need equal widths" in err and "2->3 (32 vs 64 wide)" in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "runs" / "bad" / "metrics.jsonl").exists()

    probe = {**spec, "name": "probe", "features": {"rows": "tokens", "pairs": "probe"}}
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "p.toml", probe)))
    assert code == 0, err
    line = next(x for x in err.splitlines() if "layer pairs from probing" in x)
    assert line.rstrip().endswith("2->4")


def test_hidden_states_wider_than_the_config_implies_are_refused(tiny, tmp_path, capsys, monkeypatch):
    """An architecture whose per-index widths kdgeo does not know (imitated by a hidden_widths that
    is wrong for BERT): exit 2 on the first batch, naming the found and expected widths."""
    from kdgeo import probing as probe_mod
    from kdgeo.models import num_layers

    monkeypatch.setattr(probe_mod, "hidden_widths", lambda config, layers=None: [16] * (num_layers(config) + 1))
    code, _, err = run_cli(capsys, "probe", str(tiny["teacher"]), str(tiny["student"]), "--max-samples", "8", "--quiet")
    flat = " ".join(err.split())
    assert code == 2, err
    assert "its hidden states are [64, 64, 64, 64, 64] wide (index 0 = embeddings)" in flat
    assert "but its config implies [16, 16, 16, 16, 16]" in flat
    assert "Traceback" not in err
