"""The spec reference (`kdgeo spec`, `--schema`) and the commented TOML of `kdgeo init`, from the models' docstrings."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest
import tomllib
from kdgeo import spec as spec_mod
from kdgeo import spec_doc
from kdgeo.spec import RunSpec, preset_names, resolve_preset, validate_spec
from pydantic import BaseModel

from cli_helpers import run_cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples.toml"
RAW = tomllib.loads(EXAMPLES.read_text(encoding="utf-8"))
SHIPPED = [None, *preset_names(RAW)]
FREE_FORM = {"sweep.variants", "sweep.grid", "swept"}
"""Tables whose keys are names or values the user picks (variant names, grid keys), not spec fields."""


def _resolved(preset: str | None) -> dict[str, Any]:
    return resolve_preset(RAW, str(EXAMPLES), preset)


def _dotted(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key a spec sets, as the reference names it: `train.lr`, `losses[].temperature`, `sweep.variants`."""
    keys: list[str] = []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        keys.append(path)
        if path in FREE_FORM:
            continue
        if isinstance(value, dict):
            keys += _dotted(value, path)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                keys += _dotted(item, path + "[]")
    return keys


def test_the_walk_reaches_every_model_of_the_spec():
    """Every pydantic model declared in kdgeo/spec.py is a table of the reference (each loss kind included)."""
    declared = {
        cls
        for _, cls in inspect.getmembers(spec_mod, inspect.isclass)
        if issubclass(cls, BaseModel) and cls.__module__ == spec_mod.__name__ and not cls.__name__.startswith("_")
    }
    walked = {section.model for section in spec_doc.sections()}
    assert declared <= walked, declared - walked
    assert set(spec_mod.LOSS_CLASSES.values()) <= walked


def test_every_field_has_a_doc_in_the_reference():
    reference = spec_doc.markdown_reference()
    rows: dict[str, str] = {}  # key -> its rows (each loss kind has its own `losses[].weight`)
    for line in reference.splitlines():
        if m := re.match(r"\| `([^`]+)` \|", line):
            rows[m.group(1)] = rows.get(m.group(1), "") + line + "\n"
    for section in spec_doc.sections():
        for name in section.model.model_fields:
            key = section.key(name)
            doc = spec_doc.field_doc(section.model, name)
            assert doc.strip(), f"{section.model.__name__}.{name} has no docstring"
            assert key in rows, key
            assert doc.replace("|", "\\|") in rows[key], key
    # the loss kinds each get their own table, with their own fields
    assert '## `[[losses]]` with `kind = "kd"`' in reference
    assert "losses[].temperature" in rows and "losses[].form" in rows


def test_the_reference_shows_type_default_and_choices():
    reference = spec_doc.markdown_reference()
    assert "| `teacher.finetune.lr` | number (> 0) | `5e-05` | Peak learning rate of AdamW. |" in reference
    assert '| `train.schedule` | "linear" or "cosine" or "constant" | `"linear"` |' in reference
    assert "| `teacher.model` | string | required |" in reference
    assert "| `student.layers` | array of integer | not set |" in reference


@pytest.mark.parametrize("preset", SHIPPED)
def test_the_reference_lists_every_key_the_shipped_specs_use(preset):
    reference = spec_doc.markdown_reference()
    keys = _dotted(_resolved(preset))
    assert "train.lr" in keys or preset is not None
    missing = [key for key in keys if f"| `{key}` |" not in reference]
    assert not missing, missing


def test_the_schema_has_a_description_for_every_property():
    schema = spec_doc.json_schema()
    nodes = [schema, *schema["$defs"].values()]
    for node in nodes:
        for name, prop in node.get("properties", {}).items():
            assert prop.get("description"), f"{node.get('title')}.{name}"
    assert schema["$defs"]["KDLoss"]["properties"]["kind"]["description"].startswith(
        'Selects this table\'s kind ("kd")'
    )


@pytest.mark.parametrize("preset", SHIPPED)
def test_the_schema_validates_the_shipped_specs(preset):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(spec_doc.json_schema())
    resolved = _resolved(preset)
    validator.validate(resolved)
    bad = {**resolved, "train": {**resolved.get("train", {}), "lrr": 1.0}}  # unknown keys are errors there too
    assert not validator.is_valid(bad)


def test_spec_command_prints_markdown_and_schema(capsys):
    code, out, err = run_cli(capsys, "spec")
    assert code == 0, err
    assert out == spec_doc.markdown_reference() and "`train.lr`" in out
    code, out, err = run_cli(capsys, "spec", "--schema")
    assert code == 0, err
    assert json.loads(out) == spec_doc.json_schema()


def test_summary_keeps_e_g_and_grows_a_short_first_sentence():
    assert spec_doc.summary("Peak learning rate of AdamW.") == "Peak learning rate of AdamW."
    doc = "A Hugging Face model id (e.g. `bert`). More detail here."
    assert spec_doc.summary(doc) == "A Hugging Face model id (e.g. `bert`)."
    assert spec_doc.summary("What it is. The long second sentence says more.") == (
        "What it is. The long second sentence says more."
    )
    rows = RunSpec.model_fields["features"].annotation.model_fields["rows"]
    text = spec_doc.summary(spec_doc.field_doc(spec_mod.FeaturesSpec, "rows"), rows.annotation)
    assert text.endswith("One of: tokens, cls, mean.")


@pytest.mark.parametrize("preset", SHIPPED)
def test_commented_toml_parses_back_to_the_spec_and_validates(preset):
    resolved = _resolved(preset)
    text = spec_doc.commented_toml(resolved, ["header line"])
    assert tomllib.loads(text) == resolved
    validate_spec(tomllib.loads(text))
    assert "presets" not in text


def test_commented_toml_puts_the_docstring_above_each_key():
    text = spec_doc.commented_toml(_resolved(None), [])
    lines = text.splitlines()
    finetune = lines.index("[teacher.finetune]")
    lr = lines.index("lr = 0.0001", finetune)
    assert lines[lr - 1] == "# Peak learning rate of AdamW."
    assert all(len(line) <= 100 for line in lines if line.startswith("#"))
    for i, line in enumerate(lines):  # every key of a model table has its comment right above it
        if re.match(r"[a-z_]+ = ", line) and not line.startswith("kind = "):
            assert lines[i - 1].startswith("# "), line


def test_commented_toml_quotes_free_form_keys():
    raw = {
        **_resolved(None),
        "sweep": {"seeds": [0, 1], "grid": {"losses[2].weight": [0.1, 1.0], "features.rows": ["tokens"]}},
    }
    text = spec_doc.commented_toml(raw, [])
    assert '"losses[2].weight" = [0.1, 1.0]' in text
    assert tomllib.loads(text) == raw


def test_spec_and_init_list_load_no_torch():
    """`kdgeo spec` and `kdgeo init --list` are instant: neither imports torch (a fresh interpreter)."""
    import subprocess
    import sys

    from cli_helpers import REPO

    code = (
        "import sys\nfrom kdgeo.cli import main\n"
        "for args in (['spec', '--schema'], ['spec'], ['init', '--list']):\n"
        "    try:\n        main(args)\n    except SystemExit as exc:\n        assert not exc.code, exc.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:5], file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr
