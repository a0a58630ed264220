"""Property: random data rows, written as the files a user would give, through the loaders that
classification and causal-LM runs use. The only outcomes are data ready for a run or a
KdgeoError (exit 2): never another exception (issue 11, "Done when").

Rows mix wrong types, empty / None / whitespace / non-UTF-8 text, labels of every JSON kind
(floats, bools, nested lists, objects, huge and non-finite numbers) and missing columns.
Deterministic (derandomize) and bounded, so it runs in the default suite.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdgeo import data as data_mod
from kdgeo import lm_data
from kdgeo.errors import KdgeoError

SETTINGS = settings(max_examples=100, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=12),
    st.integers(),  # beyond int64 too
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, 2.5, -1.0, 1e308, 1e-320]),
    st.text(max_size=12),
    st.sampled_from(["", " ", "\n", "a small tree", "caf\u00e9", "\u0000", "label", "1"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.sampled_from(["a", "b"]), scalars, max_size=2))


BAD_MARK = "kdgeo-not-utf8-here"


def _rows(columns: list[str]) -> st.SearchStrategy[list[dict[str, Any]]]:
    """1-6 rows; each column is present (with a random value) or missing in each row."""
    row = st.fixed_dictionaries({}, optional={c: values for c in columns})
    return st.lists(row, min_size=1, max_size=6)


def _write(path: Path, rows: list[dict[str, Any]], fmt: str, bad_byte_row: int | None) -> Path:
    """``rows`` as JSON Lines (NaN written as the NaN token Python's json emits) or CSV (values as
    their str()); with ``bad_byte_row``, a value of that row becomes text with a byte that is not
    UTF-8 (Latin-1 "caf\xe9"), so the rest of the row still looks right to the loaders."""
    if bad_byte_row is not None:
        rows = [dict(r) for r in rows]
        target = rows[bad_byte_row % len(rows)]
        target[next(iter(target), "text")] = BAD_MARK
    if fmt == "jsonl":
        lines = [json.dumps(r).encode() for r in rows]
    else:
        columns = sorted({k for r in rows for k in r}) or ["text"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows([{k: ("" if r.get(k) is None else str(r[k])) for k in columns} for r in rows])
        lines = [line.encode() for line in buf.getvalue().splitlines()]
    path.write_bytes((b"\n".join(lines) + b"\n").replace(BAD_MARK.encode(), b"caf\xe9"))
    return path


def _classification(path: Path) -> None:
    """What distill / eval do with a classification data file, up to the texts and label ids."""
    where = f"data.dataset {path.name}"
    ds = data_mod.load_split(str(path), None, "train", where="data.dataset")
    data_mod.check_columns(ds, {"text_column": "text", "label_column": "label"}, where)
    info = data_mod.infer_labels(ds, "label", where)
    ids = data_mod.labels_as_ids(ds, "label", info, where)
    texts = data_mod.texts_of(ds, "text", where)
    assert len(ids) == len(texts) == len(ds)
    assert all(isinstance(i, int) and 0 <= i < info.num_labels for i in ids)
    assert all(isinstance(t, str) for t in texts)


def _causal_lm(path: Path, with_context: bool) -> None:
    """What a causal-LM run does with an instruction file, up to the examples' strings."""
    where = f"data.dataset {path.name}"
    ds = data_mod.load_split(str(path), None, "train", where="data.dataset")
    columns = {"prompt_column": "prompt", "response_column": "response", "context_column": "context" if with_context else None}
    data_mod.check_columns(ds, columns, where)
    examples = lm_data.read_examples(ds, "prompt", "response", "context" if with_context else None, where)
    assert len(examples.instructions) == len(examples.responses) == len(ds)
    assert all(isinstance(t, str) and t.strip() for t in examples.instructions)
    assert all(isinstance(t, str) for t in examples.responses + (examples.contexts or []))


def _only_kdgeo_errors(call: Any) -> None:
    try:
        call()
    except KdgeoError as err:
        assert str(err).strip(), "a KdgeoError must say what is wrong"
        assert "Traceback" not in str(err)


FORMATS = st.sampled_from(["jsonl", "csv"])


@SETTINGS
@given(rows=_rows(["text", "label"]), bad=st.one_of(st.none(), st.integers(0, 6)), fmt=FORMATS)
def test_classification_data_loads_or_raises_a_kdgeo_error(tmp_path_factory, rows, bad, fmt):
    path = _write(tmp_path_factory.mktemp("cls") / f"d.{fmt}", rows, fmt, bad)
    _only_kdgeo_errors(lambda: _classification(path))


@SETTINGS
@given(rows=_rows(["prompt", "response", "context"]), bad=st.one_of(st.none(), st.integers(0, 6)), with_context=st.booleans(), fmt=FORMATS)
def test_instruction_data_loads_or_raises_a_kdgeo_error(tmp_path_factory, rows, bad, with_context, fmt):
    path = _write(tmp_path_factory.mktemp("lm") / f"d.{fmt}", rows, fmt, bad)
    _only_kdgeo_errors(lambda: _causal_lm(path, with_context))


def test_the_strategies_reach_both_outcomes(tmp_path):
    """Guard against a property that only ever sees errors: a well-formed file passes both pipelines."""
    rows = [{"text": "a small tree", "label": 0, "prompt": "Say", "response": "hi", "context": None}, {"text": "b", "label": 1.0, "prompt": "Go", "response": "", "context": "c"}]
    _classification(_write(tmp_path / "ok.jsonl", rows, "jsonl", None))
    _causal_lm(_write(tmp_path / "ok2.jsonl", rows, "jsonl", None), with_context=True)
    _classification(_write(tmp_path / "ok.csv", rows, "csv", None))
