"""The run spec, documented from its own models: `kdgeo spec` (Markdown), `kdgeo spec --schema` and `kdgeo init`.

Every field of :mod:`kdgeo.spec` carries its documentation as an attribute docstring, which pydantic reads into
``FieldInfo.description`` (``use_attribute_docstrings=True``, as litgpt documents ``args.py``). This module walks
the models and renders that one source three ways, so no page of documentation can drift from the code:

- :func:`markdown_reference`: every table and key with its type, default, allowed values and docstring;
- :func:`json_schema`: ``RunSpec.model_json_schema()``, the docstrings as ``description`` (for editors and
  validators; JSON Schema draft 2020-12);
- :func:`commented_toml`: a spec written as TOML with a short comment from the docstring above each key.

A key is named by its dotted path (``train.lr``; ``losses[].weight`` for a key of each ``[[losses]]`` table),
the form ``--set`` and the error messages use. No torch here: `kdgeo spec` is instant.
"""

from __future__ import annotations

import json
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import tomli_w
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from kdgeo.spec import RunSpec

_SCALAR_NAMES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# A sentence ends at ". " before a capital, a backtick or a parenthesis, but not inside "e.g." or "i.e.".
_SENTENCE_END = re.compile(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])\s+(?=[A-Z`(])")
_COMMENT_WIDTH = 100
_DEFAULT_WIDTH = 60
"""Longest default shown in a Markdown cell (the causal-LM templates are paragraphs)."""


# --------------------------------------------------------------------------------------------
# walking the models


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """``Annotated[X, m1, m2]`` -> (X, [m1, m2]); anything else -> (annotation, [])."""
    if typing.get_origin(annotation) is Annotated:
        base, *metadata = typing.get_args(annotation)
        return base, metadata
    return annotation, []


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def models_in(annotation: Any) -> tuple[list[type[BaseModel]], bool]:
    """The pydantic models a field's value may be, and whether they come as a list (an array of tables).

    Looks through ``Optional``, unions, ``Annotated`` and ``list``; stops at ``dict`` (its tables are free-form,
    e.g. ``sweep.variants``), so only tables whose keys are fields of a model are returned.
    """
    annotation, _ = _unwrap(annotation)
    if _is_model(annotation):
        return [annotation], False
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        found: list[type[BaseModel]] = []
        in_list = False
        for arg in typing.get_args(annotation):
            models, listed = models_in(arg)
            found += [m for m in models if m not in found]
            in_list = in_list or listed
        return found, in_list
    if origin is list:
        models, _ = models_in(typing.get_args(annotation)[0])
        return models, bool(models)
    return [], False


def _tag(model: type[BaseModel]) -> tuple[str, Any] | None:
    """The discriminator of a model in a tagged union: its one field typed as a single-value Literal."""
    for name, field in model.model_fields.items():
        base, _ = _unwrap(field.annotation)
        if typing.get_origin(base) is Literal and len(typing.get_args(base)) == 1:
            return name, typing.get_args(base)[0]
    return None


def pick_model(models: list[type[BaseModel]], value: Any) -> type[BaseModel] | None:
    """The model of ``models`` that a table ``value`` is: by its tag (``kind = "kd"`` -> KDLoss), else the first."""
    if len(models) > 1 and isinstance(value, dict):
        for model in models:
            tag = _tag(model)
            if tag is not None and value.get(tag[0]) == tag[1]:
                return model
    return models[0] if models else None


def field_doc(model: type[BaseModel], name: str) -> str:
    """A field's docstring on one line; a union's tag field (``kind``), which has none, is documented by its class."""
    field = model.model_fields[name]
    if field.description:
        return " ".join(field.description.split())
    tag = _tag(model)
    if tag is not None and tag[0] == name and model.__doc__:
        return f"Selects this table's kind ({json.dumps(tag[1])}): " + " ".join(model.__doc__.split())
    return ""


def _class_doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split("\n\n")[0].split())


@dataclass(frozen=True)
class Section:
    """One table of the spec: its dotted path (``""`` for the top level, ``losses[]`` for each ``[[losses]]``)."""

    path: str
    model: type[BaseModel]
    array: bool

    @property
    def title(self) -> str:
        if not self.path:
            return "Top level"
        if self.array:
            tag = _tag(self.model)
            name = self.path.removesuffix("[]")
            return f"`[[{name}]]`" + (f" with `{tag[0]} = {json.dumps(tag[1])}`" if tag else "")
        return f"`[{self.path}]`"

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name


def sections(model: type[BaseModel] = RunSpec, path: str = "", array: bool = False) -> list[Section]:
    """Every table of the spec, depth first in declaration order (the order of the Markdown reference)."""
    out = [Section(path, model, array)]
    for name, field in model.model_fields.items():
        models, in_list = models_in(field.annotation)
        sub = (f"{path}.{name}" if path else name) + ("[]" if in_list else "")
        for child in models:
            out += sections(child, sub, in_list)
    return out


def dotted_keys() -> list[str]:
    """Every documented key: ``name``, ``train.lr``, ``losses[].temperature``, ..."""
    return [section.key(name) for section in sections() for name in section.model.model_fields]


# --------------------------------------------------------------------------------------------
# types, constraints and values as text


def _constraints(metadata: list[Any]) -> list[str]:
    """``Field(ge=1, max_length=100, pattern=...)`` -> [">= 1", "length <= 100", "matching ..."]."""
    out: list[str] = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            out += _constraints(list(item.metadata))
            continue
        for attr, form in (
            ("gt", "> {}"),
            ("ge", ">= {}"),
            ("lt", "< {}"),
            ("le", "<= {}"),
            ("min_length", "length >= {}"),
            ("max_length", "length <= {}"),
            ("pattern", "matching `{}`"),
        ):
            value = getattr(item, attr, None)
            if value is not None:
                out.append(form.format(_number(value) if attr not in ("pattern",) else value))
    return out


def _number(value: Any) -> str:
    """1000000.0 -> 1000000, 4294967296 stays: bounds read as the user would write them."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


def type_text(annotation: Any) -> str:
    """A field's type in words: ``integer (>= 1)``, ``"linear" or "cosine"``, ``array of [integer, integer]``."""
    base, metadata = _unwrap(annotation)
    limits = _constraints(metadata)
    text = _base_type_text(base)
    return f"{text} ({', '.join(limits)})" if limits else text


def _base_type_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "none"
    if annotation is Any:
        return "any value"
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(type_text(a) for a in args if a is not type(None)))  # 8 loss tables: once
    if origin is list:
        return f"array of {type_text(args[0])}" if args else "array"
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return "table" if not args or args[1] is Any else f"table of {type_text(args[1])}"
    if _is_model(annotation):
        return "table"
    return _SCALAR_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def field_type_text(field: FieldInfo) -> str:
    """The type of a field with its own constraints (``Field(ge=1)`` lives on the field, not the annotation)."""
    text = type_text(field.annotation)
    limits = _constraints(list(field.metadata))
    return f"{text} ({', '.join(limits)})" if limits else text


def choices(annotation: Any) -> list[Any]:
    """The values of the Literal in a field's type (``[]`` when it has none)."""
    base, _ = _unwrap(annotation)
    origin = typing.get_origin(base)
    if origin is Literal:
        return list(typing.get_args(base))
    if origin in (Union, types.UnionType):
        return [c for arg in typing.get_args(base) for c in choices(arg)]
    return []


def _only_choices(annotation: Any) -> bool:
    """Whether a type is nothing but Literal values (and None): then "One of: ..." lists every value it takes."""
    base, _ = _unwrap(annotation)
    origin = typing.get_origin(base)
    if origin is Literal:
        return True
    if origin in (Union, types.UnionType):
        return all(a is type(None) or _only_choices(a) for a in typing.get_args(base))
    return False


def toml_key(key: str) -> str:
    """A bare key when TOML allows one, else a quoted one (``"losses[2].weight"``)."""
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def toml_value(value: Any) -> str:
    """One value as inline TOML (tables inline as ``{ k = v }``); tomli_w writes the strings, escapes and all."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, dict):
        inner = ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "not set"
    if isinstance(value, BaseModel):
        return "its table's defaults"
    text = toml_value(value)
    if len(text) > _DEFAULT_WIDTH:
        text = text[: _DEFAULT_WIDTH - 3] + "..."
    return f"`{text}`"


# --------------------------------------------------------------------------------------------
# kdgeo spec: Markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_reference() -> str:
    """The whole spec as Markdown: a section per table, a row per key (type, default, docstring)."""
    from kdgeo import __version__

    lines = [
        "# The kdgeo run spec",
        "",
        f"Generated by `kdgeo spec` (kdgeo {__version__}) from the models in `kdgeo/spec.py`, where every key is "
        "documented. A run spec is a TOML file: the keys of the top level, then one table per section below. A key "
        "is written as its dotted path, the form `--set` and the error messages use: `train.lr` is `lr` in the "
        "`[train]` table, and `losses[].weight` is `weight` in each `[[losses]]` table. Unknown keys are errors; "
        "numbers must be finite. `kdgeo spec --schema` prints the same as JSON Schema; `kdgeo init` writes a "
        "commented starter spec.",
    ]
    for section in sections():
        lines += ["", f"## {section.title}", ""]
        doc = _class_doc(section.model)
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, field in section.model.model_fields.items():
            kind = field_type_text(field)
            models, _ = models_in(field.annotation)
            if models and len(models) == 1:
                kind += f" (see `[{section.key(name)}]`)"
            elif models:
                kind += f" (see `[[{section.key(name)}]]`)"
            row = [f"`{section.key(name)}`", kind, default_text(field), field_doc(section.model, name)]
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# kdgeo spec --schema


def json_schema() -> dict[str, Any]:
    """``RunSpec.model_json_schema()`` with a description on every property (a union's tag field gets its class's).

    pydantic already turns the attribute docstrings into descriptions; only fields without one are filled in,
    so the schema and the Markdown say the same thing."""
    schema = RunSpec.model_json_schema()
    defs = schema.get("$defs", {})
    for section in sections():
        node = schema if section.model is RunSpec else defs.get(section.model.__name__)
        if node is None:
            continue
        for name, prop in node.get("properties", {}).items():
            if name in section.model.model_fields and not prop.get("description"):
                prop["description"] = field_doc(section.model, name)
    return schema


# --------------------------------------------------------------------------------------------
# kdgeo init: a spec written as commented TOML


def summary(doc: str, annotation: Any = None) -> str:
    """A short comment from a docstring: its first sentence (two when the first is under six words), and the
    choices of a Literal type when the sentence does not name them all."""
    sentences = _SENTENCE_END.split(doc.strip())
    text = sentences[0]
    for extra in sentences[1:]:
        if len(text.split()) >= 6:
            break
        text += " " + extra
    values = [v for v in choices(annotation) if isinstance(v, str)] if _only_choices(annotation) else []
    if len(values) > 1 and not all(f"`{v}`" in text for v in values):
        text += " One of: " + ", ".join(values) + "."
    return text


def _comment(text: str, indent: str = "") -> list[str]:
    return [indent + "# " + line for line in textwrap.wrap(text, _COMMENT_WIDTH - 2 - len(indent))] if text else []


def commented_toml(raw: dict[str, Any], header: list[str]) -> str:
    """``raw`` (the tables of a valid spec, as ``tomllib`` reads them) as TOML, a comment above every key.

    Keys come in the models' declaration order; tables of a model are ``[table]`` headers, a model list is an
    array of tables (``[[losses]]``), free-form tables (``sweep.variants``) are written as they are. The text
    parses back to ``raw`` exactly (tests/test_spec_doc.py checks every shipped preset)."""
    lines = [line for h in header for line in (_comment(h) or ["#"])] + ([""] if header else [])
    _render(lines, [], raw, RunSpec, array=False, doc="")
    return "\n".join(lines).rstrip("\n") + "\n"


def _ordered(data: dict[str, Any], model: type[BaseModel] | None) -> list[str]:
    declared = list(model.model_fields) if model is not None else []
    tag = _tag(model) if model is not None else None
    if tag is not None:  # `kind = "kd"` first: it says what the rest of the table is
        declared.remove(tag[0])
        declared.insert(0, tag[0])
    return [k for k in declared if k in data] + [k for k in data if k not in declared]


def _render(
    lines: list[str], path: list[str], data: dict[str, Any], model: type[BaseModel] | None, array: bool, doc: str
) -> None:
    if path:
        name = ".".join(toml_key(p) for p in path)
        lines.append("")
        lines += _comment(doc)
        lines.append(f"[[{name}]]" if array else f"[{name}]")
    children: list[tuple[str, Any, type[BaseModel] | None, bool, str]] = []
    for key in _ordered(data, model):
        value = data[key]
        field = model.model_fields.get(key) if model is not None else None
        models, in_list = models_in(field.annotation) if field is not None else ([], False)
        key_doc = field_doc(model, key) if model is not None and field is not None else ""
        if isinstance(value, dict):  # a table: a model's, or free-form (sweep.variants, ...)
            children.append((key, value, pick_model(models, value), False, summary(key_doc) if key_doc else ""))
            continue
        if in_list and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            children.append((key, value, None, True, ""))
            continue
        tag = _tag(model) if model is not None else None
        if field is not None and key_doc and not (array and tag is not None and tag[0] == key):  # header says it
            lines += _comment(summary(key_doc, field.annotation))
        lines.append(f"{toml_key(key)} = {toml_value(value)}")
    for key, value, child, is_array, child_doc in children:
        if not is_array:
            _render(lines, [*path, key], value, child, array=False, doc=child_doc)
            continue
        field = model.model_fields[key] if model is not None else None
        models, _ = models_in(field.annotation) if field is not None else ([], False)
        for item in value:
            item_model = pick_model(models, item)
            _render(lines, [*path, key], item, item_model, array=True, doc=_class_doc(item_model) if item_model else "")
