"""Property-based tests of the spec loader: random specs, the only outcomes are a valid spec or a
KdgeoError (exit 2), never a traceback.

Random input reaches the loader four ways, as it does in use: a parsed TOML table (random nesting,
wrong types, None, empty strings, huge and non-finite numbers, unknown keys) validated directly;
the same written as a TOML file and read back; ``--set`` overrides and ``--preset`` names; and
files that are not UTF-8. One property runs the real ``kdgeo distill`` command with the training
call replaced, to check the exit code and that no traceback is printed.

Deterministic (``derandomize=True``, no example database) and fast (about 200 examples each).
The data-loader properties live in tests/test_properties_data.py.
"""

from __future__ import annotations

import math
import typing
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from cli_helpers import run_cli
from kdgeo.errors import KdgeoError, SpecError
from kdgeo.spec import LOSS_CLASSES, RunSpec, expand_sweep, load_spec, parse_spec, validate_spec

SETTINGS = settings(
    max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)

BASE: dict[str, Any] = {
    "name": "p", "teacher": {"model": "t"}, "data": {"dataset": "d.jsonl"}, "losses": [{"kind": "ce"}],
}
"""A valid spec (no file is read: validation never touches the models or the data)."""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted field path of the spec's tables (loss fields under losses.0 and losses.1)."""
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        sub = _model_of(info.annotation)
        if sub is not None:
            paths += _field_paths(sub, path + ".")
    return paths


LOSS_FIELDS = {f"losses.{i}.{name}" for cls in LOSS_CLASSES.values() for name in cls.model_fields for i in (0, 1)}
SWEEP_FIELDS = {"sweep.variants.a", "sweep.variants.a.train", "sweep.variants.a.train.lr", "presets"}
PATHS = sorted(set(_field_paths(RunSpec)) | LOSS_FIELDS | SWEEP_FIELDS)

WORDS = [
    "", " ", "auto", "cpu", "cuda", "cuda:0", "mps", "meta", "xpu", "../x", "/", "a/b", "a\nb", "\x00", "\x7f",
    "é" * 200, "x" * 300, "tokens", "cls", "mean", "uniform", "last", "probe", "ce", "kd", "procrustes", "gram", "cka",
    "projection", "mse", "cosine", "causal-lm", "classification", "pretrained", "teacher-layers", "config", "fp16",
    "bf16", "fsdp", "{prompt}", "{", "}",
]
NUMBERS = [
    0, 1, 2, 3, -1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30,
    0.0, -0.0, 0.5, 1.5, 1e-300, 5e-324, 1e300, 1e308, math.inf, -math.inf, math.nan,
]


def _scalars(toml: bool) -> st.SearchStrategy[Any]:
    """Leaf values; ``toml``: only what a TOML file can hold (no None, no tuples; dates instead)."""
    leaves = [
        st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from(NUMBERS),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(WORDS),
    ]
    if toml:
        leaves.append(st.dates())
    else:
        leaves += [st.none(), st.tuples(st.integers(-3, 9), st.integers(-3, 9))]
    return st.one_of(*leaves)


KEYS = st.one_of(
    st.sampled_from(["kind", "weight", "rows", "pairs", "lr", "epochs", "name", "model", "dataset"]),
    st.text(max_size=6),
)


def _values(toml: bool) -> st.SearchStrategy[Any]:
    """Leaves, or small lists and tables of them (kept small: generation, not validation, is the cost)."""
    return st.recursive(
        _scalars(toml),
        lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(KEYS, kids, max_size=3)),
        max_leaves=6,
    )


def _set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    """Put ``value`` at a dotted path, making tables on the way (whatever was there before)."""
    parts = path.split(".")
    node: Any = raw
    for part in parts[:-1]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return
            if not isinstance(node[int(part)], (dict, list)):
                node[int(part)] = {}
            node = node[int(part)]
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if last.isdigit() and int(last) < len(node):
            node[int(last)] = value
    else:
        node[last] = value


def _mutated(toml: bool) -> st.SearchStrategy[dict[str, Any]]:
    """The valid BASE (with a second loss sometimes) with 1-5 random fields set to random values;
    the random paths include unknown keys and whole tables replaced by scalars."""
    path = st.one_of(st.sampled_from(PATHS), st.text(min_size=1, max_size=10))
    edits = st.lists(st.tuples(path, _values(toml)), min_size=1, max_size=5)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        import copy

        raw = copy.deepcopy(BASE)
        if draw(st.booleans()):
            raw["losses"].append({"kind": draw(st.sampled_from(list(LOSS_CLASSES)))})
        for p, v in draw(edits):
            _set_path(raw, p, v)
        return raw

    return build()


def _outcome_is_spec_or_exit_2(call: Any) -> RunSpec | None:
    """Run ``call`` and expand the sweep as `kdgeo distill` does before any training; a SpecError
    (a KdgeoError with exit code 2, one line per problem) is the only other fine outcome."""
    try:
        spec = call()
        assert isinstance(spec, RunSpec)
        expand_sweep(spec)
    except KdgeoError as err:
        assert err.exit_code == 2
        assert isinstance(err, SpecError) and err.problems, str(err)
        assert all(isinstance(path, str) and isinstance(msg, str) and msg for path, msg in err.problems)
        return None
    return spec


def test_random_tables_validate_or_give_a_spec_error():
    valid: list[bool] = []

    @SETTINGS
    @given(_mutated(toml=False))
    def prop(raw: dict[str, Any]) -> None:
        spec = _outcome_is_spec_or_exit_2(lambda: validate_spec(raw, "random.toml"))
        valid.append(spec is not None)
        if spec is not None:  # what validates is finite and writes only inside output.dir
            assert all(math.isfinite(v) for v in _floats(spec.model_dump(mode="python")))
            assert spec.output.name is None or ("/" not in spec.output.name and spec.output.name not in ("", ".", ".."))

    prop()
    assert any(valid) and not all(valid), "the strategy must reach valid and invalid specs alike"


@SETTINGS
@given(st.dictionaries(KEYS, _values(toml=False), max_size=5))
def test_random_top_level_tables_give_a_spec_error(raw):
    _outcome_is_spec_or_exit_2(lambda: validate_spec(raw, "random.toml"))


@SETTINGS
@given(_mutated(toml=True))
def test_random_toml_files_load_or_give_a_spec_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("prop") / "run.toml"
    path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    _outcome_is_spec_or_exit_2(lambda: load_spec(path))


OVERRIDE = st.one_of(
    st.text(max_size=30),
    st.builds(lambda p, v: f"{p}={v}", st.sampled_from(PATHS + ["losses.5.weight", "losses.x", "a..b", ""]), st.one_of(
        st.sampled_from([
            "inf", "nan", "-inf", "1e999", "99999999999999999999999", '""', "[]", "{}", "[[1, 2]]", "true", "'../x'",
            '"mps"', "{ a = 1 }", "[1, [2]]", "1979-05-27", "=", "\"\\u0000\"",
        ]),
        st.text(max_size=12),
    )),
)


PRESET = st.one_of(st.none(), st.text(max_size=6), st.sampled_from(["quick", "bad", "q"]))


@SETTINGS
@given(st.lists(OVERRIDE, max_size=4), PRESET)
def test_random_overrides_and_presets_apply_or_give_a_spec_error(overrides, preset):
    presets = '\n[presets.quick]\ntrain = { max_steps = 2 }\n[presets.bad]\ntrain = 3\n[presets]\nq = 1\n'
    text = tomli_w.dumps(BASE) + presets
    _outcome_is_spec_or_exit_2(lambda: parse_spec(text, "run.toml", overrides=overrides, preset=preset))


@SETTINGS
@given(st.binary(max_size=12), st.integers(min_value=0, max_value=10_000))
def test_spec_files_with_random_bytes_load_or_give_a_spec_error(tmp_path_factory, junk, at):
    """Random bytes (mostly not UTF-8) spliced into a valid spec file."""
    good = tomli_w.dumps(BASE).encode()
    at %= len(good) + 1
    path = tmp_path_factory.mktemp("bytes") / "run.toml"
    path.write_bytes(good[:at] + junk + good[at:])
    _outcome_is_spec_or_exit_2(lambda: load_spec(path))


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kdgeo distill` up to (not into) training: the loader, the sweep expansion and the CLI's error handling."""
    from kdgeo import distillation, sweep

    monkeypatch.setattr(distillation, "run_distill", lambda spec, progress=None, resume=False: None)
    monkeypatch.setattr(sweep, "run_sweep", lambda runs, progress=None: [])


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=_mutated(toml=True), junk=st.one_of(st.just(b""), st.binary(min_size=1, max_size=4)))
def test_distill_command_exits_0_or_2_without_a_traceback(no_training, capsys, tmp_path_factory, raw, junk):
    path = tmp_path_factory.mktemp("cli") / "run.toml"
    path.write_bytes(tomli_w.dumps(raw).encode() + junk)
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert "problem" in err and "in the run spec" in err


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _floats(v)]
    return []
