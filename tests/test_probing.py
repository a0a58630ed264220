"""`kdgeo probe` end to end on tiny saved models, and its pre-flight errors."""

from __future__ import annotations

import json

import pytest

from cli_helpers import run_cli
from conftest import token_rows, write_jsonl
from kdgeo import geometry


def test_probe_prints_tables_writes_json_and_heatmap(tiny, tmp_path, capsys):
    out_json, out_png = tmp_path / "probe.json", tmp_path / "probe.png"
    code, out, err = run_cli(
        capsys, "probe", str(tiny["teacher"]), str(tiny["student"]), "--metric", "procrustes", "--metric", "cka",
        "--max-samples", "48", "--batch-size", "16", "--rows", "tokens", "--json", str(out_json), "--plot", str(out_png),
    )
    assert code == 0, err
    assert "procrustes (lower = more similar)" in out and "cka (higher = more similar)" in out
    assert "suggested layer map" in out and "[features]\nrows = \"tokens\"\npairs = [[1, " in out  # issue 16 E: TOML
    data = json.loads(out_json.read_text())
    assert data["teacher_layers"] == 4 and data["student_layers"] == 2
    assert len(data["pairs"]) == 5 * 3  # every (teacher, student) hidden-state pair, embeddings included
    assert {"procrustes", "cka"} <= set(data["pairs"][0])
    teachers = [p["teacher"] for p in data["suggested_map"]]
    assert [p["student"] for p in data["suggested_map"]] == [1, 2]
    assert teachers == sorted(teachers) and len(set(teachers)) == len(teachers)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_streamed_values_equal_a_direct_batch_computation(tiny, tmp_path, capsys):
    """The streamed tables equal geometry's batch functions on all rows at once (float64, 1e-6)."""
    out_json = tmp_path / "p.json"
    code, _, err = run_cli(
        capsys, "probe", str(tiny["teacher"]), str(tiny["student"]), "--max-samples", "40", "--batch-size", "7",
        "--rows", "tokens", "--json", str(out_json), "--quiet",
    )
    assert code == 0, err
    data = json.loads(out_json.read_text())
    from kdgeo import demo

    texts = [r["text"] for r in demo.load_split("validation")[:40]]
    rows = {}
    for role in ("teacher", "student"):
        rows[role] = token_rows(tiny[role], texts)
    for t in range(5):
        for s in range(3):
            x, y = rows["teacher"][t], rows["student"][s]
            assert data["tables"]["procrustes"][t][s] == pytest.approx(float(geometry.procrustes_distance(x, y)), abs=1e-6)
            assert data["tables"]["cka"][t][s] == pytest.approx(float(geometry.cka(x, y)), abs=1e-6)
            assert data["tables"]["gram"][t][s] == pytest.approx(float(geometry.gram_distance(x, y)), abs=1e-6)


def test_probe_json_to_stdout(tiny, capsys):
    code, out, err = run_cli(capsys, "probe", str(tiny["teacher"]), str(tiny["student"]), "--max-samples", "16", "--json", "-", "-q")
    assert code == 0, err
    assert json.loads(out)["samples"] == 16


@pytest.mark.parametrize(
    "case",
    ["missing_dir", "no_config", "token_mismatch", "missing_column", "empty_data", "bad_metric", "json_dir_missing", "missing_file", "run_dir"],
)
def test_probe_preflight_errors_exit_2_with_a_message(tiny, tmp_path, capsys, case):
    teacher, student = str(tiny["teacher"]), str(tiny["student"])
    extra: list[str] = []
    expect = ""
    if case == "missing_dir":
        teacher, expect = str(tmp_path / "nope"), "no such directory"
    elif case == "no_config":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "weights.bin").write_text("x")
        student, expect = str(tmp_path / "empty"), "has no config.json (it holds: weights.bin)"
    elif case == "token_mismatch":
        student = str(tiny["student_other_tok"])
        extra, expect = ["--rows", "tokens"], "--rows mean"
    elif case == "missing_column":
        extra, expect = ["--text-column", "sentence"], "no column 'sentence'"
    elif case == "empty_data":
        path = tmp_path / "empty.jsonl"
        path.write_text("")
        extra, expect = ["--data", str(path)], "no rows"
    elif case == "bad_metric":
        extra, expect = ["--metric", "procrustez"], "unknown metric"
    elif case == "json_dir_missing":
        extra, expect = ["--json", str(tmp_path / "no" / "such" / "out.json")], "does not exist"
    elif case == "missing_file":
        extra, expect = ["--data", str(tmp_path / "nope.csv")], "file not found"
    elif case == "run_dir":
        (tmp_path / "run" / "student").mkdir(parents=True)
        (tmp_path / "run" / "student" / "config.json").write_text("{}")
        student, expect = str(tmp_path / "run"), "looks like a kdgeo run directory"
    code, out, err = run_cli(capsys, "probe", teacher, student, "--max-samples", "8", *extra)
    assert code == 2, (out, err)
    assert expect in err.replace("\n", " "), err
    assert "Traceback" not in err


def test_probe_pooled_rows_work_across_tokenizers(tiny, tmp_path, capsys):
    rows = [{"text": f"a small tree number {i}"} for i in range(12)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code, out, err = run_cli(capsys, "probe", str(tiny["teacher"]), str(tiny["student_other_tok"]), "--data", str(data), "--rows", "mean", "-q")
    assert code == 0, err
    assert "n = 12 feature rows (mean) from 12 samples" in out


def test_probe_works_on_decoder_models(tiny, tmp_path, capsys):
    """OPT and GPT-2 (decoders, no token_type_ids, OPT with a projection-free width) probe like encoders."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2Model, OPTConfig, OPTModel

    from kdgeo.models import quiet_transformers

    tok = AutoTokenizer.from_pretrained(tiny["teacher"])
    torch.manual_seed(0)
    models = {
        "opt": OPTModel(OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=2,
                                  max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)),
        "gpt2": GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)),
    }
    for name, model in models.items():
        with quiet_transformers():
            model.save_pretrained(tmp_path / name)
            tok.save_pretrained(tmp_path / name)
    out_json = tmp_path / "p.json"
    code, out, err = run_cli(capsys, "probe", str(tmp_path / "opt"), str(tmp_path / "gpt2"), "--rows", "tokens",
                             "--max-samples", "24", "--json", str(out_json), "-q")
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert data["teacher_layers"] == 3 and data["student_layers"] == 2
    assert all(0.0 <= p["procrustes"] <= 2.0 for p in data["pairs"])


def _toml_block(out: str) -> str:
    """The printed [features] table: from its comment line to the first blank line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# kdgeo probe:"))
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return "\n".join(lines[start:end])


def test_probe_defaults_to_distills_rows_and_prints_the_map_as_valid_toml(tiny, tmp_path, capsys):
    """No --rows: token rows, as features.rows defaults to; the suggested map is a [features] table that tomllib
    parses, that the run spec accepts, and that equals --json's map; --metric takes a comma-separated list."""
    import tomllib

    from kdgeo.probing import ProbeArgs
    from kdgeo.spec import FeaturesSpec

    assert ProbeArgs.rows == FeaturesSpec.model_fields["rows"].default == "tokens"
    out_json = tmp_path / "p.json"
    code, out, err = run_cli(capsys, "probe", str(tiny["teacher"]), str(tiny["student"]), "--metric", "procrustes,cka",
                             "--metric", "gram,cka", "--max-samples", "24", "--json", str(out_json))
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert data["rows"] == "tokens" and data["metrics"] == ["procrustes", "cka", "gram"]
    table = tomllib.loads(_toml_block(out))
    assert table == {"features": {"rows": "tokens", "pairs": [[p["student"], p["teacher"]] for p in data["suggested_map"]]}}
    FeaturesSpec.model_validate(table["features"])  # a run spec takes it as it is
    assert f"n = {data['feature_rows']} feature rows (tokens) from 24 samples" in out


def test_probe_rejects_an_empty_metric_name(tiny, capsys):
    code, _, err = run_cli(capsys, "probe", str(tiny["teacher"]), str(tiny["student"]), "--metric", "procrustes,,cka")
    assert code == 2 and "an empty metric name" in err and "Traceback" not in err


def test_rows_width_warning_rule():
    """n < 2 * max(d_t, d_s) warns (the values still move with n there); at the boundary it does not."""
    from kdgeo.probing import rows_width_warning

    assert rows_width_warning(128, 64, 32, "probe") is None
    message = rows_width_warning(127, 32, 64, "probe")
    assert message is not None and "only n = 127 feature rows" in message and "2 x 64 = 128" in message


def test_probe_warns_when_rows_are_few_for_the_widths(tiny, tmp_path, capsys):
    """16 pooled rows against 64-wide teacher states: a warning on stderr (with -q too) and in --json; 48 samples of
    token rows are plenty and draw none."""
    out_json = tmp_path / "p.json"
    code, _, err = run_cli(capsys, "probe", str(tiny["teacher"]), str(tiny["student"]), "--rows", "mean",
                           "--max-samples", "16", "--json", str(out_json), "-q")
    assert code == 0, err
    flat = " ".join(err.split())
    assert "warning: probe: only n = 16 feature rows for hidden states up to 64 wide" in flat, err
    data = json.loads(out_json.read_text())
    assert data["widths"] == {"teacher": 64, "student": 32} and len(data["warnings"]) == 1
    code, _, err = run_cli(capsys, "probe", str(tiny["teacher"]), str(tiny["student"]), "--max-samples", "48", "-q")
    assert code == 0 and "warning" not in err, err


# --------------------------------------------------------------------------------------------
# --max-length: a default longer than the models' positions is clamped, a set one is an error (issue 16 D)


def test_probe_on_models_of_64_positions_clamps_the_default(tiny64, capsys):
    """Before: exit 2 over a default of 128 the user never wrote."""
    code, out, err = run_cli(
        capsys, "probe", str(tiny64["teacher_clf"]), str(tiny64["student"]), "--metric", "cka", "--max-samples", "16",
        "--batch-size", "8",
    )
    assert code == 0, err
    assert "--max-length: using 64, the teacher's and the student's max_position_embeddings (the default 128 is " \
           "longer)" in err
    assert "cka (higher = more similar)" in out


def test_probe_max_length_the_user_set_too_long_is_exit_2(tiny64, capsys):
    code, _, err = run_cli(capsys, "probe", str(tiny64["teacher_clf"]), str(tiny64["student"]), "--max-length", "128",
                           "--max-samples", "8")
    assert code == 2
    assert "--max-length = 128 is longer than the teacher" in err and "(64 positions)" in err
