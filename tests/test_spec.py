"""The run spec: parsing, defaults, every error message, --set overrides and presets."""

from __future__ import annotations

import math
import re
from datetime import date

import pytest
from pydantic import BaseModel

from kdgeo import spec as spec_mod
from kdgeo.errors import KdgeoError, SpecError
from kdgeo.spec import (
    apply_override,
    deep_merge,
    load_spec,
    parse_override_value,
    parse_spec,
    preset_names,
    resolve_preset,
)

MINIMAL = """
losses = [{ kind = "ce" }]

[teacher]
model = "t"

[data]
dataset = "d.jsonl"
"""


def problems_of(text: str, **kw) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "x.toml", **kw)
    err = info.value
    # The rendered message has a header line plus one line per problem.
    lines = str(err).splitlines()
    assert lines[0] == f"x.toml: {len(err.problems)} problem{'s' if len(err.problems) != 1 else ''} in the run spec:"
    assert len(lines) == 1 + len(err.problems)
    return err.problems


def only_problem(text: str, **kw) -> tuple[str, str]:
    problems = problems_of(text, **kw)
    assert len(problems) == 1, problems
    return problems[0]


def with_student(body: str) -> str:
    return MINIMAL + "\n[student]\n" + body + "\n"


# --------------------------------------------------------------------------------------------
# errors.py


def test_kdgeo_error_render_and_exit_code():
    err = KdgeoError("  something broke \n", hint="  do this  ")
    assert str(err) == "something broke\ndo this"
    assert err.message == "something broke" and err.hint == "do this"
    assert err.exit_code == 2
    assert str(KdgeoError("plain")) == "plain"


def test_spec_error_header_and_lines():
    one = SpecError("f.toml", [("", "is not valid TOML: x")])
    assert str(one) == "f.toml: 1 problem in the run spec:\n  - is not valid TOML: x"
    two = SpecError("f.toml", [("a.b", "bad"), ("c[0].d", "worse")])
    assert str(two).splitlines() == ["f.toml: 2 problems in the run spec:", "  - a.b: bad", "  - c[0].d: worse"]
    assert isinstance(two, KdgeoError) and two.problems == [("a.b", "bad"), ("c[0].d", "worse")]


# --------------------------------------------------------------------------------------------
# a valid spec and its defaults


def test_minimal_spec_has_documented_defaults():
    s = parse_spec(MINIMAL)
    assert s.name == "run" and s.description == "" and s.task == "classification" and s.seed == 0
    assert s.teacher.model == "t" and s.teacher.revision is None
    assert s.teacher.trust_remote_code is False and s.teacher.finetune is None
    assert s.student.init == "teacher-layers" and s.student.model is None
    assert s.student.layers is None and s.student.num_layers is None and s.student.arch is None
    d = s.data
    assert (d.dataset, d.config, d.train_split, d.eval_split) == ("d.jsonl", None, "train", "validation")
    assert (d.text_column, d.text_pair_column, d.label_column, d.max_length) == ("text", None, "label", 128)
    assert d.max_train_samples is None and d.max_eval_samples is None and d.eval_dataset is None
    assert s.features.rows == "tokens" and s.features.pairs == "uniform"
    assert len(s.losses) == 1 and s.losses[0].kind == "ce" and s.losses[0].weight == 1.0
    t = s.train
    assert (t.epochs, t.max_steps, t.batch_size, t.grad_accum) == (3.0, None, 32, 1)
    assert (t.lr, t.projection_lr, t.weight_decay, t.warmup_ratio) == (1e-4, None, 0.01, 0.1)
    assert (t.schedule, t.max_grad_norm, t.precision, t.device) == ("linear", 1.0, "auto", "auto")
    assert (t.log_every, t.eval_every) == (10, 0)
    assert (s.monitor.every, s.monitor.samples, s.monitor.metrics) == (50, 64, ["procrustes", "cka", "gram"])
    o = s.output
    assert (o.dir, o.name, o.overwrite, o.save_student) == ("runs", None, False, True)
    assert o.teacher_cache == "~/.cache/kdgeo/teachers"
    assert s.feature_losses == []


def test_loss_defaults_and_feature_losses():
    s = parse_spec(MINIMAL.replace(
        'losses = [{ kind = "ce" }]',
        'losses = [{ kind = "ce" }, { kind = "kd" }, { kind = "procrustes", weight = 0.5 }, { kind = "gram" }]',
    ))
    kd, proc = s.losses[1], s.losses[2]
    assert kd.temperature == 2.0 and kd.weight == 1.0
    assert proc.form == "squared" and proc.weight == 0.5
    assert [loss.kind for loss in s.feature_losses] == ["procrustes", "gram"]


def test_finetune_defaults():
    s = parse_spec(MINIMAL + "\n[teacher.finetune]\n")
    f = s.teacher.finetune
    assert (f.epochs, f.lr, f.batch_size, f.weight_decay) == (3.0, 5e-5, 32, 0.01)
    assert (f.warmup_ratio, f.max_grad_norm, f.seed, f.force) == (0.1, 1.0, 0, False)


def test_spec_is_frozen():
    s = parse_spec(MINIMAL)
    with pytest.raises(Exception):
        s.seed = 3  # type: ignore[misc]


def test_every_field_is_documented():
    """Field docstrings are the help text (use_attribute_docstrings); only loss `kind` tags may skip it."""
    models = [
        obj for obj in vars(spec_mod).values()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == "kdgeo.spec"
    ]
    assert spec_mod.RunSpec in models
    undocumented = [
        f"{m.__name__}.{name}" for m in models for name, info in m.model_fields.items()
        if not info.description and name != "kind"
    ]
    assert undocumented == []


@pytest.mark.parametrize("pairs, expected", [
    ('"uniform"', "uniform"),
    ('"last"', "last"),
    ('"probe"', "probe"),
    ("[[1, 2], [2, 4]]", [(1, 2), (2, 4)]),
    ("[[0, 0]]", [(0, 0)]),
])
def test_features_pairs_forms(pairs, expected):
    s = parse_spec(MINIMAL + f"\n[features]\npairs = {pairs}\n")
    assert s.features.pairs == expected


def test_student_forms_that_validate():
    assert parse_spec(with_student('init = "pretrained"\nmodel = "m"')).student.model == "m"
    assert parse_spec(with_student("layers = [0, 3, 5]\nnum_layers = 3")).student.layers == [0, 3, 5]
    assert parse_spec(with_student("num_layers = 4")).student.num_layers == 4
    arch = parse_spec(with_student('init = "config"\n[student.arch]\nhidden_size = 48\nnum_attention_heads = 4')).student.arch
    assert arch.hidden_size == 48 and arch.num_attention_heads == 4 and arch.num_hidden_layers is None


# --------------------------------------------------------------------------------------------
# every problem at once, with dotted paths and hints


def test_five_mistakes_give_five_lines():
    text = """
losses = [{ kind = "kd", temprature = 2.0 }, { kind = "procrustus" }]

[teacher]
model = "t"
revison = "main"

[data]
dataset = "d.jsonl"
max_length = 1

[train]
precision = "fp8"
"""
    problems = dict(problems_of(text))
    assert set(problems) == {"teacher.revison", "losses[0].temprature", "losses[1]", "data.max_length", "train.precision"}
    assert "unknown key; did you mean 'revision'?" in problems["teacher.revison"]
    assert "Allowed here: finetune, model, revision, trust_remote_code." in problems["teacher.revison"]
    assert "did you mean 'temperature'?" in problems["losses[0].temprature"]
    assert "Allowed here: beta, direction, kind, mix, temperature, weight." in problems["losses[0].temprature"]
    assert "unknown loss kind 'procrustus'" in problems["losses[1]"]
    assert "did you mean 'procrustes'?" in problems["losses[1]"]
    assert "ce, kd, procrustes, gram, cka, projection, mse, cosine" in problems["losses[1]"]
    assert "greater than or equal to 2" in problems["data.max_length"] and "found 1" in problems["data.max_length"]
    assert "Tokens per example after truncation." in problems["data.max_length"]  # the field doc is quoted
    assert "'auto', 'bf16', 'fp16', 'fp32' or 'fp64'" in problems["train.precision"]
    assert "found 'fp8'" in problems["train.precision"]


def test_misspelt_required_key_reports_typo_and_missing():
    problems = dict(problems_of(MINIMAL.replace('model = "t"', 'modle = "t"')))
    assert set(problems) == {"teacher.modle", "teacher.model"}
    assert problems["teacher.modle"].startswith("unknown key; did you mean 'model'?")
    assert problems["teacher.model"].startswith("is required but missing (Hugging Face model id")


def test_rendered_message_lists_dotted_paths():
    text = MINIMAL.replace('dataset = "d.jsonl"', 'dataset = "d.jsonl"\ntext_colum = "x"') + '\n[trian]\nlr = 1\n'
    with pytest.raises(SpecError) as info:
        parse_spec(text, "my.toml")
    msg = str(info.value)
    assert msg.startswith("my.toml: 2 problems in the run spec:")
    assert "  - data.text_colum: unknown key; did you mean 'text_column'?" in msg
    assert "  - trian: unknown key; did you mean 'train'?" in msg


def test_unknown_key_without_suggestion_lists_allowed_keys():
    path, msg = only_problem("zzz = 1\n" + MINIMAL)
    assert path == "zzz"
    assert "did you mean" not in msg
    assert "Allowed here: data, description, features, generate, losses, monitor, name, output, seed, student, sweep, swept, task, teacher, train, variant." in msg


def test_unknown_key_message_is_punctuated():
    _, msg = only_problem("zzz = 1\n" + MINIMAL)
    assert re.match(r"unknown key[.;] ", msg), msg


@pytest.mark.parametrize("text, path, needle", [
    ("losses = [{ kind = 'ce' }]\n[data]\ndataset = 'd'\n", "teacher", "is required but missing (The model to distill from.)"),
    ("losses = [{ kind = 'ce' }]\n[teacher]\nmodel = 't'\n", "data", "is required but missing (The labelled text.)"),
    ("[teacher]\nmodel = 't'\n[data]\ndataset = 'd'\n", "losses", "is required but missing (Weighted terms of the objective"),
    ("losses = [{ kind = 'ce' }]\n[teacher]\nmodel = 't'\n[data]\nconfig = 'c'\n", "data.dataset", "is required but missing (`kdgeo:wordnet-supersenses`"),
])
def test_missing_required_fields(text, path, needle):
    p, msg = only_problem(text)
    assert p == path
    assert needle in msg


def test_empty_losses_list():
    path, msg = only_problem(MINIMAL.replace('[{ kind = "ce" }]', "[]"))
    assert path == "losses"
    assert "at least 1 item" in msg and "found []" in msg


@pytest.mark.parametrize("extra, path, needles", [
    ('[teacher.finetune]\nepochs = 0', "teacher.finetune.epochs", ["greater than 0", "found 0", "Fine-tuning epochs"]),
    ("[train]\nbatch_size = 2.0", "train.batch_size", ["valid integer", "found 2.0", "Examples per micro-batch."]),
    ('[train]\nlr = "fast"', "train.lr", ["valid number", "found 'fast'", "Peak learning rate of AdamW."]),
    ('[output]\noverwrite = "yes"', "output.overwrite", ["valid boolean", "found 'yes'"]),
    ("[train]\nwarmup_ratio = 1.5", "train.warmup_ratio", ["less than or equal to 1", "found 1.5"]),
    ('[monitor]\nmetrics = ["procrustes", "mse"]', "monitor.metrics[1]", ["'procrustes', 'cka' or 'gram'", "found 'mse'"]),
    ('[features]\nrows = "token"', "features.rows", ["'tokens', 'cls' or 'mean'", "found 'token'"]),
    ("[features]\npairs = [[1.0, 2]]", "features.pairs[0][0]", ["valid integer", "found 1.0"]),
])
def test_wrong_types_and_ranges(extra, path, needles):
    problems = dict(problems_of(MINIMAL + "\n" + extra + "\n"))
    assert path in problems, problems
    for needle in needles:
        assert needle in problems[path]


@pytest.mark.parametrize("top, path, needle", [
    ('name = "bad name"', "name", "String should match pattern"),
    ('task = "regression"', "task", "Input should be 'classification' or 'causal-lm', found 'regression'"),
    ("seed = 1.5", "seed", "valid integer"),
])
def test_wrong_top_level_values(top, path, needle):
    p, msg = only_problem(top + "\n" + MINIMAL)
    assert p == path and needle in msg


def test_loss_field_errors_quote_the_loss_field_doc():
    text = MINIMAL.replace('[{ kind = "ce" }]', '[{ kind = "kd", temperature = 0 }, { kind = "ce", weight = -1 }]')
    problems = dict(problems_of(text))
    assert set(problems) == {"losses[0].temperature", "losses[1].weight"}
    assert "greater than 0" in problems["losses[0].temperature"]
    assert "Softmax temperature T" in problems["losses[0].temperature"]
    assert "Weight of this term in the total loss." in problems["losses[1].weight"]


@pytest.mark.parametrize("losses, needle", [
    ("[{ weight = 1.0 }]", "loss `kind` must be one of ce, kd, procrustes, gram, cka, projection, mse, cosine"),
    ("[{ kind = 5 }]", "unknown loss kind 5; allowed: ce, kd"),
    ('[{ kind = "kl" }]', "unknown loss kind 'kl'"),
    ('["ce"]', "valid dictionary"),
])
def test_bad_loss_items(losses, needle):
    path, msg = only_problem(MINIMAL.replace('[{ kind = "ce" }]', losses))
    assert path == "losses[0]"
    assert needle in msg


def test_duplicate_loss_kinds():
    text = MINIMAL.replace('[{ kind = "ce" }]', '[{ kind = "ce" }, { kind = "kd" }, { kind = "ce" }, { kind = "kd" }]')
    path, msg = only_problem(text)
    assert path == ""
    assert msg == "losses: each kind may appear once, found ce, kd more than once; merge their weights"


@pytest.mark.parametrize("body, needles", [
    ('init = "pretrained"', ['init = "pretrained" needs `model`']),
    ('init = "config"\nmodel = "m"', ['`model` is only used with init = "pretrained" (init is "config")']),
    ('init = "pretrained"\nmodel = "m"\nlayers = [1]', ['`layers` / `num_layers` are only used with init = "teacher-layers" (init is "pretrained")']),
    ('init = "config"\nnum_layers = 2', ['`layers` / `num_layers` are only used with init = "teacher-layers"']),
    ("[student.arch]\nhidden_size = 8", ['[student.arch] is only used with init = "config" (init is "teacher-layers")']),
    ("layers = [3, 1]", ["`layers` must be strictly increasing, got [3, 1]"]),
    ("layers = [1, 1]", ["`layers` must be strictly increasing, got [1, 1]"]),
    ("layers = [-1, 2]", ["`layers` are 0-based indices and cannot be negative, got [-1, 2]"]),
    ("layers = []", ["`layers` is empty; list at least one teacher layer index"]),
    ("layers = [1, 2]\nnum_layers = 3", ["`num_layers` = 3 but `layers` lists 2; give one of them"]),
    # several cross-field problems are joined into one message
    ('init = "pretrained"\nlayers = [1]\n[student.arch]\nhidden_size = 8',
     ["needs `model`", "`layers` / `num_layers` are only used", "[student.arch] is only used"]),
])
def test_student_cross_field_rules(body, needles):
    path, msg = only_problem(with_student(body))
    assert path == "student"
    for needle in needles:
        assert needle in msg


def test_student_arch_heads_must_divide_width():
    path, msg = only_problem(with_student('init = "config"\n[student.arch]\nhidden_size = 10\nnum_attention_heads = 3'))
    assert path == "student.arch"
    assert msg == "hidden_size=10 is not divisible by num_attention_heads=3; pick heads that divide the width"


def test_student_arch_ranges():
    path, msg = only_problem(with_student('init = "config"\n[student.arch]\nnum_hidden_layers = 0'))
    assert path == "student.arch.num_hidden_layers" and "greater than or equal to 1" in msg


def test_invalid_toml_is_one_problem():
    path, msg = only_problem("[teacher\nmodel = 1\n")
    assert path == ""
    assert msg.startswith("is not valid TOML: ") and "line 1" in msg


def test_bad_pairs_shape_is_reported():
    problems = dict(problems_of(MINIMAL + "\n[features]\npairs = [[1, 2, 3]]\n"))
    assert "features.pairs[0]" in problems
    assert "found [1, 2, 3]" in problems["features.pairs[0]"]


def test_bad_pair_does_not_blame_good_pairs():
    problems = dict(problems_of(MINIMAL + "\n[features]\npairs = [[1, 2], [3]]\n"))
    assert "features.pairs[1]" in problems
    assert "features.pairs[0]" not in problems, problems


def test_misspelt_pairs_is_one_problem():
    path, msg = only_problem(MINIMAL + '\n[features]\npairs = "probes"\n')
    assert path == "features.pairs"
    assert "'uniform', 'last' or 'probe'" in msg


# --------------------------------------------------------------------------------------------
# load_spec: files


def test_load_spec_reads_a_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('name = "from-file"\n' + MINIMAL)
    assert load_spec(path).name == "from-file"
    assert load_spec(str(path), overrides=["seed=7"]).seed == 7


def test_load_spec_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(SpecError) as info:
        load_spec(missing)
    assert info.value.problems == [("", "file not found; pass the path of a TOML run spec (see examples.toml)")]
    assert str(info.value).startswith(f"{missing}: 1 problem in the run spec:")


def test_load_spec_directory(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert info.value.problems == [("", "is a directory; pass the path of a TOML run spec file")]


def test_load_spec_undecodable_file(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"name = '\xff\xfe'\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (problem,) = info.value.problems
    assert problem[1] == "cannot be read: line 1, column 9 is not UTF-8 text; save the spec as UTF-8"


def test_load_spec_error_uses_path_as_source(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(MINIMAL + "\n[train]\nlr = -1\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.source == str(path)
    assert info.value.problems[0][0] == "train.lr"


# --------------------------------------------------------------------------------------------
# --set overrides


@pytest.mark.parametrize("text, value", [
    ("5", 5),
    ("-3", -3),
    ("1_000", 1000),
    ("3e-5", 3e-5),
    ("0.25", 0.25),
    ("true", True),
    ("false", False),
    ("[1, 2]", [1, 2]),
    ("[[1, 2], [2, 4]]", [[1, 2], [2, 4]]),
    ('"quoted"', "quoted"),
    ("'single'", "single"),
    ("{ kind = 'ce' }", {"kind": "ce"}),
    ("bare-string", "bare-string"),
    ("cuda:0", "cuda:0"),
    ("hello world", "hello world"),
    ("", ""),
    ("google-bert/bert-base-uncased", "google-bert/bert-base-uncased"),
    ("2024-01-01", date(2024, 1, 1)),  # TOML semantics: a bare date is a date
])
def test_parse_override_value(text, value):
    got = parse_override_value(text)
    assert got == value and type(got) is type(value)


def test_parse_override_value_inf():
    assert math.isinf(parse_override_value("inf"))


def test_apply_override_nested_and_created_tables():
    raw = {"train": {"lr": 1.0}, "losses": [{"kind": "ce"}, {"kind": "kd"}]}
    apply_override(raw, "train.lr=3e-5")
    apply_override(raw, "losses.1.weight=2")
    apply_override(raw, "teacher.finetune.epochs=1")  # tables are created on the way
    apply_override(raw, " output.name = try ")  # whitespace around key and value is ignored
    apply_override(raw, "losses.0=5")  # replacing a whole list item
    assert raw == {
        "train": {"lr": 3e-5},
        "losses": [5, {"kind": "kd", "weight": 2}],
        "teacher": {"finetune": {"epochs": 1}},
        "output": {"name": "try"},
    }


def test_apply_override_value_may_contain_equals():
    raw: dict = {}
    apply_override(raw, "description=a=b")
    assert raw == {"description": "a=b"}


def test_apply_override_nested_list_index():
    raw = {"features": {"pairs": [[1, 2], [2, 4]]}}
    apply_override(raw, "features.pairs.1.1=3")
    assert raw["features"]["pairs"] == [[1, 2], [2, 3]]


def test_overrides_reach_the_validated_spec():
    text = MINIMAL.replace('[{ kind = "ce" }]', '[{ kind = "ce" }, { kind = "kd" }]')
    s = parse_spec(text, overrides=[
        "losses.1.weight=2", "losses.1.temperature=4", "train.lr=3e-5", "train.device=cuda:1",
        "features.pairs=[[1,2],[2,4]]", "output.overwrite=true", "description=hello world",
        "monitor.metrics=['cka']", "seed=11", "data.max_length=64",
    ])
    assert s.losses[1].weight == 2.0 and s.losses[1].temperature == 4.0
    assert s.train.lr == 3e-5 and s.train.device == "cuda:1"
    assert s.features.pairs == [(1, 2), (2, 4)]
    assert s.output.overwrite is True and s.description == "hello world"
    assert s.monitor.metrics == ["cka"] and s.seed == 11 and s.data.max_length == 64


def test_override_type_errors_are_validated_like_the_file():
    path, msg = only_problem(MINIMAL, overrides=["train.batch_size=many"])
    assert path == "train.batch_size" and "found 'many'" in msg


def test_bad_overrides_are_all_reported():
    text = 'name = "r"\n' + MINIMAL
    problems = problems_of(text, overrides=[
        "nokey", "losses.5.weight=2", "losses.x.weight=1", "a..b=1", "name.x=1", "train.lr=1e-4",
    ])
    assert problems == [
        ("--set nokey", "expected KEY=VALUE, e.g. --set train.epochs=5"),
        ("--set losses.5.weight=2", "'losses.5': index 5 is out of range (the list has 1 items)"),
        ("--set losses.x.weight=1", "'losses.x': this is a list; index it by position, e.g. losses.0.weight"),
        ("--set a..b=1", "'a..b' is not a dotted key such as train.lr"),
        ("--set name.x=1", "'name' is a value, not a table"),
    ]


@pytest.mark.parametrize("item", ["=5", ".=5", "train.=5"])
def test_override_empty_key_parts(item):
    with pytest.raises(ValueError, match="is not a dotted key such as train.lr"):
        apply_override({}, item)


def test_override_through_a_scalar_list_item_deeper():
    raw = {"monitor": {"metrics": ["cka"]}}
    with pytest.raises(ValueError, match="'monitor.metrics.0' is a value, not a table"):
        apply_override(raw, "monitor.metrics.0.x.y=1")


def test_override_through_a_scalar_list_item_is_a_spec_error():
    text = MINIMAL + '\n[monitor]\nmetrics = ["cka"]\n'
    path, msg = only_problem(text, overrides=["monitor.metrics.0.x=1"])
    assert path == "--set monitor.metrics.0.x=1"
    assert "is a value, not a table" in msg


# --------------------------------------------------------------------------------------------
# presets

PRESETS = MINIMAL + """
[train]
lr = 1e-4
epochs = 3

[presets.quick]
name = "quick"
train = { epochs = 1 }
data = { max_length = 32 }

[presets.kd]
losses = [{ kind = "kd", temperature = 4.0 }]

[presets.teacherft.teacher.finetune]
epochs = 1
"""


def test_preset_names():
    import tomllib

    assert preset_names(tomllib.loads(PRESETS)) == ["kd", "quick", "teacherft"]
    assert preset_names({"presets": 3}) == []
    assert preset_names({}) == []


def test_no_preset_drops_the_presets_table():
    s = parse_spec(PRESETS)
    assert s.name == "run" and s.train.epochs == 3.0


def test_preset_tables_merge_key_by_key():
    s = parse_spec(PRESETS, preset="quick")
    assert s.name == "quick"
    assert s.train.epochs == 1.0 and s.train.lr == 1e-4  # merged, not replaced
    assert s.data.max_length == 32 and s.data.dataset == "d.jsonl"
    assert [loss.kind for loss in s.losses] == ["ce"]


def test_preset_lists_replace():
    s = parse_spec(PRESETS, preset="kd")
    assert [loss.kind for loss in s.losses] == ["kd"]
    assert s.losses[0].temperature == 4.0


def test_preset_nested_tables():
    s = parse_spec(PRESETS, preset="teacherft")
    assert s.teacher.model == "t" and s.teacher.finetune.epochs == 1.0


def test_overrides_apply_after_the_preset():
    s = parse_spec(PRESETS, preset="quick", overrides=["train.epochs=2"])
    assert s.train.epochs == 2.0 and s.name == "quick"


def test_resolve_preset_does_not_mutate_its_input():
    import tomllib

    raw = tomllib.loads(PRESETS)
    before = repr(raw)
    resolve_preset(raw, "x", "quick")
    assert repr(raw) == before


def test_deep_merge():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    over = {"a": {"y": [3], "z": {"k": 1}}, "b": {"t": 1}}
    assert deep_merge(base, over) == {"a": {"x": 1, "y": [3], "z": {"k": 1}}, "b": {"t": 1}}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}


def test_unknown_preset_with_suggestion():
    path, msg = only_problem(PRESETS, preset="quik")
    assert path == "presets.quik"
    assert msg == "no such preset (this file has: kd, quick, teacherft); did you mean 'quick'?"


def test_unknown_preset_without_presets():
    path, msg = only_problem(MINIMAL, preset="cola")
    assert path == "presets.cola" and msg == "no such preset (this file has: none)"


def test_presets_must_be_tables():
    path, msg = only_problem("presets = 3\n" + MINIMAL)
    assert (path, msg) == ("presets", "must be a table of named presets, e.g. [presets.cola]")
    path, msg = only_problem("[presets]\nq = 1\n" + MINIMAL, preset="q")
    assert (path, msg) == ("presets.q", "must be a table")


def test_preset_errors_are_validated_with_paths():
    text = MINIMAL + '\n[presets.bad]\ntrain = { lrr = 1 }\n'
    path, msg = only_problem(text, preset="bad")
    assert path == "train.lrr" and "did you mean 'lr'?" in msg
    parse_spec(text)  # the broken preset does not matter when not asked for


# --------------------------------------------------------------------------------------------
# issue 11 (E, F): non-finite and huge numbers, devices, run names, rows per geometry step


def _strict_models() -> list[type[BaseModel]]:
    """Every table model of the spec (all subclasses of the strict base, recursively)."""
    found, todo = [], [spec_mod._Strict]
    while todo:
        model = todo.pop()
        found.append(model)
        todo.extend(model.__subclasses__())
    return found


def test_every_spec_model_refuses_non_finite_floats():
    """One rule at the base: no float field anywhere in the spec can hold inf or nan."""
    assert [m.__name__ for m in _strict_models() if m.model_config.get("allow_inf_nan", True)] == []


FLOAT_PATHS = [
    ("[train]\nlr = {v}", "train.lr"),
    ("[train]\nepochs = {v}", "train.epochs"),
    ("[train]\nprojection_lr = {v}", "train.projection_lr"),
    ("[train]\nweight_decay = {v}", "train.weight_decay"),
    ("[train]\nmax_grad_norm = {v}", "train.max_grad_norm"),
    ("[teacher.finetune]\nepochs = {v}", "teacher.finetune.epochs"),
    ("[teacher.finetune]\nlr = {v}", "teacher.finetune.lr"),
    ("[teacher.finetune]\nweight_decay = {v}", "teacher.finetune.weight_decay"),
    ("[teacher.finetune]\nmax_grad_norm = {v}", "teacher.finetune.max_grad_norm"),
]


@pytest.mark.parametrize("value", ["inf", "+inf", "-inf", "nan", "-nan"])
@pytest.mark.parametrize("snippet, path", FLOAT_PATHS, ids=[p for _, p in FLOAT_PATHS])
def test_non_finite_floats_are_refused_with_their_path(snippet, path, value):
    problems = dict(problems_of(MINIMAL + "\n" + snippet.format(v=value) + "\n"))
    assert path in problems, problems
    assert "finite number" in problems[path]


@pytest.mark.parametrize("losses, path", [
    ('[{ kind = "ce", weight = inf }]', "losses[0].weight"),
    ('[{ kind = "kd", temperature = nan }]', "losses[0].temperature"),
    ('[{ kind = "kd", direction = "mixed", mix = nan }]', "losses[0].mix"),
    ('[{ kind = "ce" }, { kind = "procrustes", weight = nan }]', "losses[1].weight"),
])
def test_non_finite_loss_fields_are_refused(losses, path):
    problems = dict(problems_of(MINIMAL.replace('[{ kind = "ce" }]', losses)))
    assert path in problems and "finite number" in problems[path], problems


def test_non_finite_generate_fields_are_refused():
    text = 'task = "causal-lm"\n' + MINIMAL + "\n[generate]\ntemperature = inf\ntop_p = nan\n"
    problems = dict(problems_of(text))
    assert "finite number" in problems["generate.temperature"] and "finite number" in problems["generate.top_p"]


@pytest.mark.parametrize("item, path", [
    ("train.lr=inf", "train.lr"), ("train.epochs=nan", "train.epochs"), ("losses.0.weight=-inf", "losses[0].weight"),
    ("teacher.finetune.lr=inf", "teacher.finetune.lr"),
])
def test_non_finite_overrides_are_refused(item, path):
    problems = dict(problems_of(MINIMAL, overrides=[item]))
    assert path in problems and "finite number" in problems[path], problems


@pytest.mark.parametrize("snippet, path, needle", [
    ("[train]\ntimeout_minutes = 100000000000000", "train.timeout_minutes", "less than or equal to 43200"),
    ("[train]\nepochs = 1e300", "train.epochs", "less than or equal to 1000000"),
    ("[teacher.finetune]\nepochs = 1e300", "teacher.finetune.epochs", "less than or equal to 1000000"),
    ("[train]\nmax_steps = 99999999999999999999999", "train.max_steps", "64-bit"),
    ("[data]\nmax_length = 99999999999999999999999", "data.max_length", "64-bit"),
    ("[student]\nlayers = [1, 99999999999999999999999]", "student.layers", "64-bit"),
])
def test_values_that_overflow_later_are_refused(snippet, path, needle):
    text = MINIMAL.replace("[data]\n", "[data]\n" + snippet.split("\n", 1)[1] + "\n") if snippet.startswith("[data]") else MINIMAL + "\n" + snippet + "\n"
    problems = dict(problems_of(text))
    hits = [p for p in problems if p == path or p.startswith(path + "[")]
    assert hits, problems
    assert needle in problems[hits[0]], problems


def test_timeout_and_epochs_at_their_bounds_are_valid():
    spec = parse_spec(MINIMAL + "\n[train]\ntimeout_minutes = 43200\nepochs = 1e6\n")
    from datetime import timedelta

    assert timedelta(minutes=spec.train.timeout_minutes).days == 30 and spec.train.epochs == 1e6


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_supported_devices_validate(device):
    assert parse_spec(MINIMAL + f'\n[train]\ndevice = "{device}"\n').train.device == device


@pytest.mark.parametrize("device", ["meta", "mps", "xpu", "xla", "cuda:", "cuda:-1", "cuda:x", "CPU", " cpu", "cpu:0", "", "cuda:0,1"])
def test_unsupported_devices_are_refused_naming_what_is_allowed(device):
    path, msg = only_problem(MINIMAL + f'\n[train]\ndevice = "{device}"\n')
    assert path == "train.device"
    assert "auto, cpu, cuda or cuda:N" in msg and repr(device) in msg


def test_device_name_check_is_shared():
    assert spec_mod.device_problem("cuda:3") is None
    assert "auto, cpu, cuda or cuda:N" in spec_mod.device_problem("mps")


@pytest.mark.parametrize("name", ["x" * 101, "../x", "a/b", ".", "-x"])
def test_bad_run_names_are_refused(name):
    path, msg = only_problem(f'name = "{name}"\n' + MINIMAL)
    assert path == "name"


def test_run_name_of_100_characters_is_valid():
    assert parse_spec(f'name = "{"n" * 100}"\n' + MINIMAL).name == "n" * 100


@pytest.mark.parametrize("value, needle", [
    ("../x", "a single directory name"),
    ("..", "'.' or '..'"),
    (".", "'.' or '..'"),
    ("/", "a single directory name"),
    ("/abs/path", "a single directory name"),
    ("a\\\\b", "a single directory name"),
    ("", "empty"),
    ("a\\nb", "control character"),
    ("a\\u0000b", "control character"),
    ("a\\u007fb", "control character"),
    ("x" * 256, "255 bytes"),
    ("é" * 128, "255 bytes"),
])
def test_bad_output_names_are_refused(value, needle):
    path, msg = only_problem(MINIMAL + f'\n[output]\nname = "{value}"\n')
    assert path == "output.name"
    assert needle in msg, msg


@pytest.mark.parametrize("value", ["my run (copy)", "résultat", "x" * 255, ".hidden", "a..b", "run-1.2"])
def test_ordinary_output_names_are_valid(value):
    assert parse_spec(MINIMAL + f'\n[output]\nname = "{value}"\n').output.name == value


def test_output_name_override_is_checked():
    path, msg = only_problem(MINIMAL, overrides=['output.name="../../etc"'])
    assert path == "output.name" and "a single directory name" in msg


def test_long_sweep_variant_name_is_refused():
    text = MINIMAL + f'\n[sweep]\nseeds = [0]\n[sweep.variants.{"v" * 101}]\n'
    path, msg = only_problem(text)
    assert path == "sweep" and "has 101 characters; use at most 100" in msg


def test_sweep_run_names_are_checked_as_output_names():
    """`<variant>-seed<k>` becomes output.name (checked like any output.name): the longest variant fits."""
    spec = parse_spec('name = "n"\n' + MINIMAL + f'\n[sweep]\nseeds = [0, 1]\n[sweep.variants.{"v" * 100}]\n')
    runs = spec_mod.expand_sweep(spec)
    assert [r.spec.output.name for r in runs] == ["v" * 100 + "-seed0", "v" * 100 + "-seed1"]


GEOMETRY_KINDS = ["procrustes", "gram", "cka"]


@pytest.mark.parametrize("kind", GEOMETRY_KINDS)
@pytest.mark.parametrize("rows", ["cls", "mean"])
@pytest.mark.parametrize("batch", [1, 2])
def test_pooled_geometry_needs_three_rows_per_step(kind, rows, batch):
    text = MINIMAL.replace('[{ kind = "ce" }]', f'[{{ kind = "ce" }}, {{ kind = "{kind}" }}]')
    text += f'\n[features]\nrows = "{rows}"\n[train]\nbatch_size = {batch}\n[monitor]\nsamples = 8\n'
    path, msg = only_problem(text)
    assert path == ""
    assert f"train.batch_size = {batch}" in msg and f'features.rows = "{rows}"' in msg and kind in msg
    assert "at least 3" in msg


@pytest.mark.parametrize("rows, kind, batch", [
    ("mean", "procrustes", 3), ("tokens", "procrustes", 1), ("mean", "projection", 1), ("mean", "mse", 1), ("cls", "ce", 1),
])
def test_few_rows_are_fine_where_no_batch_statistic_is_taken(rows, kind, batch):
    text = MINIMAL.replace('[{ kind = "ce" }]', f'[{{ kind = "{kind}" }}]')
    text += f'\n[features]\nrows = "{rows}"\n[train]\nbatch_size = {batch}\n[monitor]\nsamples = 8\n'
    assert parse_spec(text).train.batch_size == batch


@pytest.mark.parametrize("rows", ["cls", "mean"])
def test_pooled_monitor_batch_needs_three_rows(rows):
    path, msg = only_problem(MINIMAL + f'\n[features]\nrows = "{rows}"\n[monitor]\nsamples = 2\n')
    assert path == "" and "monitor.samples = 2" in msg and "at least 3" in msg


def test_token_rows_monitor_batch_of_two_is_fine():
    assert parse_spec(MINIMAL + '\n[features]\nrows = "tokens"\n[monitor]\nsamples = 2\n').monitor.samples == 2


@pytest.mark.parametrize("value, needle", [
    ("100000", "less than or equal to 64, found 100000"),
    ("-1", "greater than or equal to 0, found -1"),
    ('"many"', "Input should be 'auto', found 'many'"),
])
def test_loader_workers_is_one_problem_with_a_bound(value, needle):
    """An int-or-"auto" field reports one problem at its own path (no `.constrained-int` tag, no second arm)."""
    path, msg = only_problem(MINIMAL + f"\n[train]\nloader_workers = {value}\n")
    assert path == "train.loader_workers" and needle in msg



# --------------------------------------------------------------------------------------------
# train.save_best and train.early_stopping_patience (issue 16 C)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.save_best=accurcy"], ["is not an evaluation metric", "accuracy, macro_f1, mcc, f1, teacher_agreement"]),
        (["train.save_best=perplexity"], ['is a metric of task = "causal-lm"', "choose one of those"]),
        (["task=causal-lm", "train.save_best=accuracy"], ['metric of task = "classification"', "perplexity, response_nll, rougeL"]),
        (["task=causal-lm", "train.save_best=rougeL"], ["generate.every_eval = true", '"perplexity"']),
        (["train.early_stopping_patience=2", "train.eval_every=5"], ["needs train.save_best", "accuracy"]),
        (["train.save_best=accuracy", "train.early_stopping_patience=2", "train.epochs=1"], ["train.epochs = 1.0", "only evaluation is the final one"]),
        (["train.save_best=accuracy", "train.early_stopping_patience=2", "train.max_steps=10", "train.eval_every=10"], ["train.eval_every = 10 is not below train.max_steps = 10"]),
        (["train.save_best=accuracy", "train.early_stopping_patience=0", "train.eval_every=5"], ["early_stopping_patience"]),
    ],
)
def test_save_best_and_early_stopping_are_checked_at_validation(overrides, expected):
    where, message = only_problem(MINIMAL, overrides=overrides)
    flat = f"{where} {message}"
    assert all(e in flat for e in expected), flat


def test_save_best_and_early_stopping_are_valid_together_and_default_off():
    spec = parse_spec(MINIMAL, "x.toml")
    assert spec.train.save_best is None and spec.train.early_stopping_patience is None
    assert "save_best" not in spec.model_dump(mode="json", exclude_none=True)["train"]  # old runs' spec.json unchanged
    lm = parse_spec(
        MINIMAL, "x.toml", overrides=["task=causal-lm", "train.save_best=rougeL", "generate.every_eval=true", "train.early_stopping_patience=1", "train.eval_every=5"]
    )
    assert (lm.train.save_best, lm.train.early_stopping_patience) == ("rougeL", 1)
    # Three epochs evaluate at the first two epochs' ends: valid here (the exact count needs the data: the plan checks it).
    epochs = parse_spec(MINIMAL, "x.toml", overrides=["train.save_best=accuracy", "train.early_stopping_patience=2"])
    assert epochs.train.early_stopping_patience == 2


def test_resume_with_save_best_refuses_a_changed_eval_every():
    saved = parse_spec(MINIMAL, "x.toml", overrides=["train.save_best=accuracy", "train.eval_every=5"]).model_dump(mode="json", exclude_none=True)
    changed = parse_spec(MINIMAL, "x.toml", overrides=["train.save_best=accuracy", "train.eval_every=7"]).model_dump(mode="json", exclude_none=True)
    assert spec_mod.resume_differences(saved, changed) == [("train.eval_every", 5, 7)]
    plain = [parse_spec(MINIMAL, "x.toml", overrides=[f"train.eval_every={n}"]).model_dump(mode="json", exclude_none=True) for n in (5, 7)]
    assert spec_mod.resume_differences(*plain) == []  # without save_best it only changes what is logged
    patience = parse_spec(MINIMAL, "x.toml", overrides=["train.save_best=accuracy", "train.eval_every=5", "train.early_stopping_patience=2"])
    assert [d[0] for d in spec_mod.resume_differences(saved, patience.model_dump(mode="json", exclude_none=True))] == ["train.early_stopping_patience"]


# --------------------------------------------------------------------------------------------
# data.eval_fraction and data.split_seed (issue 16 D)


@pytest.mark.parametrize("extra, named", [
    ('eval_dataset = "e.jsonl"', "data.eval_fraction = 0.1 and data.eval_dataset = 'e.jsonl' both name"),
    ('eval_split = "test"', "data.eval_fraction = 0.1 and data.eval_split = 'test' both name"),
])
def test_eval_fraction_with_another_eval_set_names_both_keys(extra, named):
    problems = problems_of(MINIMAL + f"eval_fraction = 0.1\n{extra}\n")
    assert problems[0][0] == "data" and named in problems[0][1]


def test_split_seed_without_eval_fraction():
    problems = problems_of(MINIMAL + "split_seed = 3\n")
    assert "data.split_seed = 3 seeds the data.eval_fraction split, which is not set" in problems[0][1]


@pytest.mark.parametrize("value", ["0.0", "0.5", "0.7"])
def test_eval_fraction_bounds(value):
    assert problems_of(MINIMAL + f"eval_fraction = {value}\n")[0][0] == "data.eval_fraction"


def test_eval_fraction_defaults_and_the_default_eval_split_is_fine():
    spec = parse_spec(MINIMAL + "eval_fraction = 0.1\n")
    assert spec.data.eval_fraction == 0.1 and spec.data.split_seed is None
    # a resolved spec.json writes eval_split out at its default: still one evaluation set
    resolved = spec.model_dump(mode="json", exclude_none=True)
    assert resolved["data"]["eval_split"] == "validation" and "split_seed" not in resolved["data"]
    assert spec_mod.validate_spec(resolved).data.eval_fraction == 0.1


def test_sweep_runs_keep_an_unset_max_length_unset():
    """Each run clamps a default data.max_length to its models (kdgeo.plan): the sweep must not mark it as set."""
    text = MINIMAL.replace('losses = [{ kind = "ce" }]', 'losses = [{ kind = "ce" }]\n[sweep]\nseeds = [0, 1]')
    runs = spec_mod.expand_sweep(parse_spec(text))
    assert runs and all("max_length" not in r.spec.data.model_fields_set for r in runs)
    given = spec_mod.expand_sweep(parse_spec(text + "max_length = 64\n"))
    assert all("max_length" in r.spec.data.model_fields_set and r.spec.data.max_length == 64 for r in given)
