"""Issue 11, sections E and F, beyond the spec: rows per geometry step at run time, decoders and
first-token rows, devices, and the run directory as the last guard against escaping output.dir.
(The spec-level rules are in tests/test_spec.py, the CLI cases in tests/test_bad_inputs.py.)"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from cli_helpers import tiny_spec
from kdgeo.distill import _epoch_batches, run_distill
from kdgeo.errors import KdgeoError, LayerMapError, OutputError
from kdgeo.geometry import procrustes_distance
from kdgeo.models import check_cls_rows, is_causal_decoder
from kdgeo.probe import resolve_device
from kdgeo.rundir import path_component_problem, prepare_run_dir, read_jsonl
from kdgeo.spec import validate_spec


# ---- why 3 rows: the degenerate values the spec rule prevents -------------------------------


def test_procrustes_on_one_or_two_pooled_rows_is_degenerate():
    """n = 1: centring leaves zeros, D_P^2 = 2 whatever the features; n = 2: one direction per
    side, D_P^2 = 0 whatever the features. n = 3 already tells different features apart."""
    gen = torch.Generator().manual_seed(0)
    for n, expected in ((1, 2.0), (2, 0.0)):
        for _ in range(3):
            x = torch.randn(n, 16, generator=gen, dtype=torch.float64)  # (n, d_t)
            y = torch.randn(n, 8, generator=gen, dtype=torch.float64)  # (n, d_s)
            assert float(procrustes_distance(x, y)) == pytest.approx(expected, abs=1e-12)
    x = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    assert 1e-3 < float(procrustes_distance(x, y)) < 2 - 1e-3


# ---- the short last batch of an epoch -------------------------------------------------------


@pytest.mark.parametrize("n, batch, world, gathered, min_rows, sizes", [
    (66, 16, 1, False, 1, [16, 16, 16, 16, 2]),  # token rows or no geometry: every example is used
    (66, 16, 1, False, 3, [16, 16, 16, 16]),  # pooled geometry: the 2-example tail is left out
    (67, 16, 1, False, 3, [16, 16, 16, 16, 3]),  # a 3-example tail is enough
    (70, 16, 2, False, 3, [32, 32, 6]),  # 2 processes: shares of 3 and 3
    (68, 16, 2, False, 3, [32, 32]),  # shares of 2 and 2: left out
    (68, 16, 2, True, 3, [32, 32, 4]),  # gathered: the 4 rows form one statistic
    (65, 16, 2, True, 1, [32, 32]),  # as before: a batch with fewer examples than processes
])
def test_epoch_batches_leave_out_a_tail_too_small_for_geometry(n, batch, world, gathered, min_rows, sizes):
    got = _epoch_batches(n, batch * world, world, seed=0, epoch=0, lengths=None, min_rows=min_rows, gathered=gathered)
    assert sorted((len(b) for b in got), reverse=True) == sizes
    assert len({i for b in got for i in b}) == sum(sizes)
    lengths = [i % 7 for i in range(n)]
    grouped = _epoch_batches(
        n, batch * world, world, seed=0, epoch=0, lengths=lengths, min_rows=min_rows, gathered=gathered
    )
    assert sorted((len(b) for b in grouped), reverse=True) == sizes  # length grouping leaves out the same


def test_pooled_geometry_run_never_steps_on_the_two_row_tail(tiny, tmp_path):
    """66 examples in batches of 16 leave a tail of 2: its Procrustes loss would be 0 for any
    features (before: a 5th step per epoch with procrustes = 0). Now 4 steps, all informative."""
    events: list[dict] = []
    spec = tiny_spec(
        tiny, tmp_path, data={"max_train_samples": 66}, features={"rows": "mean", "pairs": "last"},
        losses=[{"kind": "procrustes"}], train={"epochs": 1, "batch_size": 16},
    )
    result = run_distill(validate_spec(spec), progress=events.append)
    steps = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if r["event"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert json.loads((result.run_dir / "summary.json").read_text())["steps"] == 4
    assert any("2 training example(s) per epoch left out" in e.get("message", "") for e in events)


def test_token_rows_keep_the_short_tail(tiny, tmp_path):
    spec = tiny_spec(
        tiny, tmp_path, data={"max_train_samples": 66}, losses=[{"kind": "procrustes"}],
        train={"epochs": 1, "batch_size": 16},
    )
    result = run_distill(validate_spec(spec))
    assert json.loads((result.run_dir / "summary.json").read_text())["steps"] == 5


# ---- decoders and first-token rows ----------------------------------------------------------


def _configs():
    from transformers import BertConfig, GPT2Config, LlamaConfig, OPTConfig, PretrainedConfig, RobertaConfig, T5Config

    custom_lm = PretrainedConfig(architectures=["MyForCausalLM"])
    custom_enc = PretrainedConfig(architectures=["MyModel"])
    return [
        (BertConfig(), False), (RobertaConfig(), False), (T5Config(), False), (custom_enc, False),
        (BertConfig(is_decoder=True), True), (OPTConfig(), True), (GPT2Config(), True), (LlamaConfig(), True),
        (custom_lm, True),
    ]


def test_is_causal_decoder_from_the_config():
    for config, expected in _configs():
        assert is_causal_decoder(config) is expected, type(config).__name__


def test_cls_rows_refused_for_decoders_only():
    for config, decoder in _configs():
        if decoder:
            with pytest.raises(LayerMapError, match="the same BOS token for every example"):
                check_cls_rows(config, "m", "teacher.model", 'features.rows = "cls"', "Use mean.")
        else:
            check_cls_rows(config, "m", "teacher.model", 'features.rows = "cls"', "Use mean.")


def test_decoder_first_position_is_the_same_for_every_example(tiny_lm):
    """What the refusal is about: a causal LM's position-0 state depends on the first token only."""
    from kdgeo.models import ModelRef, load_encoder, load_tokenizer

    ref = ModelRef(str(tiny_lm["opt_teacher"]))
    tok, model = load_tokenizer(ref), load_encoder(ref).eval()
    enc = tok(["a small tree", "the large dog barked at night"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states  # L+1 x (2, T, d)
    assert all(torch.allclose(h[0, 0], h[1, 0], atol=1e-6) for h in hidden)


# ---- devices --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["meta", "mps", "xpu", "cuda:-1", "CPU"])
def test_resolve_device_accepts_only_cpu_and_cuda(name):
    with pytest.raises(KdgeoError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(name, "train.device")


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


# ---- the run directory: never outside output.dir --------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/", "/abs", "a/b", "a\\b", "", ".", "..", "a\nb", "x" * 256])
def test_prepare_run_dir_refuses_anything_but_one_directory_name(tmp_path, name):
    with pytest.raises(OutputError, match="output.name"):
        prepare_run_dir(tmp_path / "runs", name, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even output.dir was made


def test_prepare_run_dir_refuses_a_symlink_leading_outside(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    runs = tmp_path / "runs"
    runs.mkdir()
    os.symlink(outside, runs / "r")
    with pytest.raises(OutputError, match="leads outside output.dir"):
        prepare_run_dir(runs, "r", overwrite=True)
    assert (outside / "precious.txt").read_text() == "keep"


def test_prepare_run_dir_accepts_ordinary_names(tmp_path):
    for name in ("run", "my run (copy)", "résultat", ".hidden", "x" * 255):
        assert prepare_run_dir(tmp_path, name, overwrite=False) == tmp_path / name
    assert path_component_problem("é" * 127) is None and "255 bytes" in path_component_problem("é" * 128)
