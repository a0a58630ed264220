"""output.teacher_outputs: the frozen teacher's outputs cached once, read back by later runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import run_cli, tiny_lm_spec, tiny_spec, write_spec

SHORT = {"template": "Q: {prompt}\nA:", "context_template": "Q: {prompt}\nC: {context}\nA:"}


def _steps(run: Path) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == "step"]


def _close(a: list[dict], b: list[dict], keys: tuple[str, ...], rel: float) -> None:
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for x, y in zip(a, b):
        for k in keys:
            # fp16 keeps ~3 decimal digits of each feature: distances near 0 move by ~1e-6 absolutely.
            assert x[k] == pytest.approx(y[k], rel=rel, abs=1e-5), (k, x["step"])


def test_cached_teacher_outputs_match_the_teacher_and_are_reused(tiny, tmp_path, capsys):
    """Losses with the cache equal the uncached run's to fp16 rounding (rel 2e-3); a second run
    reads the entry (bitwise the same as the first cached run); a damaged entry is rebuilt."""
    cache = tmp_path / "touts"
    losses = [{"kind": "ce"}, {"kind": "kd", "temperature": 2.0}, {"kind": "procrustes"}, {"kind": "gram"}]
    base = tiny_spec(tiny, tmp_path, losses=losses, train={"epochs": 2})
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "plain.toml", {**base, "name": "plain"})), "-q")
    assert code == 0, err
    cached = {**base, "name": "cached", "output": {**base["output"], "teacher_outputs": True, "teacher_outputs_dir": str(cache)}}
    path = write_spec(tmp_path / "cached.toml", cached)
    code, out, err = run_cli(capsys, "distill", str(path))
    assert code == 0, err
    assert "caching teacher outputs of 64 examples" in err and "on disk" in err
    runs = tmp_path / "runs"
    _close(_steps(runs / "cached"), _steps(runs / "plain"), ("ce", "kd", "procrustes", "gram", "loss"), rel=2e-3)
    summary = json.loads((runs / "cached" / "summary.json").read_text())
    entry = Path(summary["teacher_outputs"])
    assert entry.parent == cache and (entry / "manifest.json").exists()
    first = _steps(runs / "cached")

    code, _, err = run_cli(capsys, "distill", str(path), "--set", "output.overwrite=true")
    assert code == 0, err
    assert "teacher outputs read from the cache" in err and "caching teacher outputs" not in err
    assert _steps(runs / "cached") == [{**e, "samples_per_s": s["samples_per_s"]} for e, s in zip(first, _steps(runs / "cached"))]

    shard = next(entry.glob("layer*.00000.bin"))
    shard.write_bytes(shard.read_bytes()[:-8])  # a torn shard
    code, _, err = run_cli(capsys, "distill", str(path), "--set", "output.overwrite=true")
    assert code == 0, err
    assert "is corrupt" in err and "rebuilding it" in " ".join(err.split())
    _close(_steps(runs / "cached"), first, ("loss",), rel=1e-7)


def test_a_different_layer_map_gets_its_own_entry(tiny, tmp_path, capsys):
    cache = tmp_path / "touts"
    spec = tiny_spec(tiny, tmp_path, losses=[{"kind": "procrustes"}], train={"max_steps": 1},
                     output={"teacher_outputs": True, "teacher_outputs_dir": str(cache)})
    for pairs in ("uniform", "last"):
        spec["features"] = {"rows": "mean", "pairs": pairs}
        spec["output"]["overwrite"] = True
        code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "s.toml", spec)), "-q")
        assert code == 0, err
    assert len([p for p in cache.iterdir() if (p / "manifest.json").exists()]) == 2


def test_causal_lm_teacher_outputs_per_response_token(tiny_lm, tmp_path, capsys):
    data = {**tiny_lm_spec(tiny_lm, tmp_path)["data"], **SHORT, "max_train_samples": 24, "max_eval_samples": 4}
    losses = [{"kind": "ce"}, {"kind": "kd", "direction": "mixed"}, {"kind": "procrustes"}]
    base = tiny_lm_spec(tiny_lm, tmp_path, data=data, losses=losses, generate={"max_new_tokens": 2})
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "a.toml", {**base, "name": "plain"})), "-q")
    assert code == 0, err
    cached = {**base, "name": "cached", "output": {**base["output"], "teacher_outputs": True, "teacher_outputs_dir": str(tmp_path / "c")}}
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "b.toml", cached)), "-q")
    assert code == 0, err
    runs = tmp_path / "runs"
    _close(_steps(runs / "cached"), _steps(runs / "plain"), ("ce", "kd", "procrustes"), rel=2e-3)


def test_the_cache_key_follows_the_teachers_examples():
    """Which examples survive truncation can depend on the student's tokenizer: the digest in the
    key changes with the teacher's ids and response boundaries, not with anything else."""
    from kdgeo import data as data_mod
    from kdgeo.teacher_outputs import encoding_digest

    def split(ids, starts):
        enc = data_mod.Encoded(input_ids=ids, token_type_ids=None, pad_id=0, response_start=starts)
        return data_mod.TextSplit(texts=["x"] * len(ids), labels=None, encodings={"teacher": enc, "student": enc})

    base = encoding_digest(split([[1, 2, 3], [1, 4, 5, 6]], [2, 2]))
    assert encoding_digest(split([[1, 2, 3], [1, 4, 5, 6]], [2, 2])) == base
    assert encoding_digest(split([[1, 4, 5, 6]], [2])) != base  # an example dropped
    assert encoding_digest(split([[1, 2, 3], [1, 4, 5, 6]], [2, 3])) != base  # another boundary
    assert encoding_digest(split([[1, 2, 3], [1, 4, 5, 7]], [2, 2])) != base  # another token
