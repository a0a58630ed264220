"""data.eval_fraction: the seeded held-out split, its record in the run directory, resume and eval reusing it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from kdgeo import data_split as DS
from kdgeo.errors import DataError

from cli_helpers import run_cli, tiny_spec, write_spec
from conftest import write_jsonl


def dataset(n: int):
    import datasets

    return datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(n)], "label": [i % 2 for i in range(n)]})


def demo_rows(per_label: int = 6) -> list[dict]:
    """Demo examples, ``per_label`` of each of its 8 classes (so a local file has every label the teacher has)."""
    from kdgeo import demo

    rows, seen = [], {}
    for row in demo.load_split("train"):
        label = row["label"] if isinstance(row["label"], int) else demo.load_labels().index(row["label"])
        if seen.get(label, 0) < per_label:
            seen[label] = seen.get(label, 0) + 1
            rows.append({"text": row["text"], "label": label})
    return rows


# --------------------------------------------------------------------------------------------
# the split itself


@pytest.mark.parametrize(
    "rows, fraction, count", [(30, 0.1, 3), (31, 0.1, 4), (2, 0.49, 1), (3, 0.49, 2), (10, 0.01, 1)]
)
def test_eval_count_is_the_ceiling(rows, fraction, count):
    # 0.1 * 30 = 3.0000000000000004 in floating point: a bare ceil would hold out 4.
    assert DS.eval_count(rows, fraction) == count
    assert 1 <= count <= rows - 1


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_draw_is_numpy_pcg64_permutation_prefix(seed):
    """Parity with the documented reference: the first ceil(f n) of default_rng(seed).permutation(n), ascending."""
    n, f = 57, 0.2
    expected = sorted(np.random.default_rng(seed).permutation(n)[: math.ceil(f * n)].tolist())
    assert list(DS.draw(n, f, seed)) == expected
    assert DS.draw(n, f, seed) == DS.draw(n, f, seed)


def test_draw_depends_on_the_split_seed_only():
    assert DS.draw(100, 0.1, 0) != DS.draw(100, 0.1, 1)


def test_split_rows_partitions_the_rows():
    ds = dataset(20)
    train, evals, split = DS.split_rows(ds, "x", "train", 0.25, 0, None, "data.dataset (x)")
    assert len(evals) == 5 and len(train) == 15
    assert sorted(list(train["text"]) + list(evals["text"]), key=lambda t: int(t[1:])) == list(ds["text"])
    assert list(evals["text"]) == [f"t{i}" for i in split.eval_indices]  # the file's order
    assert split.rows == 20 and split.source_sha256 is None


def test_split_rows_refuses_too_few_rows():
    with pytest.raises(DataError, match="needs at least 2"):
        DS.split_rows(dataset(1), "x", "train", 0.1, 0, None, "data.dataset (x)")


def test_record_round_trip(tmp_path):
    split = DS.DataSplit("f.jsonl", "train", "ab" * 32, None, 10, 0.2, 3, (1, 7))
    DS.write_split(tmp_path, split)
    raw = json.loads((tmp_path / DS.SPLIT_FILE).read_text())
    assert raw["eval_indices"] == [1, 7] and raw["eval_examples"] == 2 and raw["split_seed"] == 3
    assert DS.read_split(tmp_path) == split
    assert DS.read_split(tmp_path / "nothing") is None


@pytest.mark.parametrize("text", ['{"rows": 3}', '{"dataset": "f", "train_split": "train", "rows": 3, '
                                  '"eval_fraction": 0.2, "split_seed": 0, "eval_indices": [5]}', "not json"])
def test_a_broken_record_is_a_data_error(tmp_path, text):
    (tmp_path / DS.SPLIT_FILE).write_text(text)
    with pytest.raises(DataError, match="data_split.json|data split"):
        DS.read_split(tmp_path)


def test_a_changed_file_is_refused(tmp_path):
    from kdgeo import data as D

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(10)])
    ds = D.load_split(str(path), None, "train")
    _, _, split = DS.split_rows(ds, str(path), "train", 0.2, 0, None, "data.dataset (d)")
    again = DS.split_rows(ds, str(path), "train", 0.2, 0, split, "data.dataset (d)")[2]
    assert again == split  # the recorded indices, reused
    write_jsonl(path, [{"text": f"u{i}", "label": i % 2} for i in range(10)])
    with pytest.raises(DataError, match=r"data.dataset \(d\) changed since the run split it: data_split.json"):
        DS.split_rows(D.load_split(str(path), None, "train"), str(path), "train", 0.2, 0, split, "data.dataset (d)")
    with pytest.raises(DataError, match="has 9 rows"):
        DS.check_same_source(split, str(path), None, None, 9, 0.2, 0, "data.dataset (d)")


# --------------------------------------------------------------------------------------------
# in a run: the plan, the run directory, resume and eval


def _fraction_spec(tiny, tmp_path: Path, **data) -> dict:
    path = write_jsonl(tmp_path / "all.jsonl", demo_rows())
    spec = tiny_spec(tiny, tmp_path, train={"max_steps": 2, "batch_size": 8})
    spec["data"] = {"dataset": str(path), "eval_fraction": 0.25, "max_length": 24, **data}
    return spec


def _plan(spec: dict):
    from kdgeo.plan import make_plan
    from kdgeo.spec import validate_spec

    notes: list[str] = []
    plan = make_plan(validate_spec(spec), 1, False, lambda e: notes.append(getattr(e, "message", "")))
    return plan, notes


def test_plan_holds_out_the_fraction_the_same_for_every_run_seed(tiny, tmp_path):
    spec = _fraction_spec(tiny, tmp_path)
    plan, notes = _plan(spec)
    assert (len(plan.train), len(plan.evals)) == (36, 12)  # ceil(0.25 * 48)
    assert plan.data_split is not None and len(plan.data_split.eval_indices) == 12
    assert not set(plan.train.texts) & set(plan.evals.texts)
    assert any("data.eval_fraction = 0.25: 12 of 48 rows held out" in n for n in notes)
    other, _ = _plan({**spec, "seed": 7})
    assert other.evals.eval_keys() == plan.evals.eval_keys()  # split_seed, not the run's seed
    moved, _ = _plan({**spec, "data": {**spec["data"], "split_seed": 1}})
    assert moved.evals.eval_keys() != plan.evals.eval_keys()


def test_caps_apply_after_the_split(tiny, tmp_path):
    plan, _ = _plan(_fraction_spec(tiny, tmp_path, max_train_samples=10, max_eval_samples=5))
    assert (len(plan.train), len(plan.evals)) == (10, 5)
    assert plan.data_split is not None and plan.data_split.rows == 48


def test_local_file_slices_train_and_eval(tiny, tmp_path):
    spec = _fraction_spec(tiny, tmp_path)
    del spec["data"]["eval_fraction"]
    spec["data"].update(train_split="train[:75%]", eval_split="train[75%:]")
    plan, _ = _plan(spec)
    rows = demo_rows()
    assert plan.train.texts == [r["text"] for r in rows[:36]] and plan.evals.texts == [r["text"] for r in rows[36:]]
    assert plan.data_split is None


def test_single_file_message_names_the_three_ways(tiny, tmp_path):
    spec = _fraction_spec(tiny, tmp_path)
    del spec["data"]["eval_fraction"]
    with pytest.raises(DataError, match=r"data.eval_fraction = 0.1, or slice it .*or set data.eval_dataset"):
        _plan(spec)


def test_distill_records_the_split_and_eval_and_resume_reuse_it(tiny, tmp_path, capsys):
    spec = _fraction_spec(tiny, tmp_path)
    path = write_spec(tmp_path / "run.toml", spec)
    code, out, err = run_cli(capsys, "distill", str(path), "--dry-run")
    assert code == 0, err
    assert "36 training and 12 evaluation examples (data.eval_fraction = 0.25: 12 of 48 rows held out" in out
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0, err
    run = tmp_path / "runs" / "t"
    record = json.loads((run / DS.SPLIT_FILE).read_text())
    assert record["rows"] == 48 and record["eval_examples"] == 12 and record["split_seed"] == 0
    assert record["source_sha256"] == DS.file_sha256([Path(spec["data"]["dataset"])])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["eval_examples"] == 12
    # kdgeo eval RUN re-scores the very examples the run held out
    code, out, err = run_cli(capsys, "eval", str(run), "--json", "-", "-q")
    assert code == 0, err
    scored = json.loads(out)
    assert scored["samples"] == 12 and scored["eval_sha256"] == summary["data"]["eval_sha256"]
    # --resume reuses the recorded split; a changed file is exit 2, naming it
    (run / "summary.json").unlink()
    data_file = Path(spec["data"]["dataset"])
    kept = data_file.read_text()
    data_file.write_text(kept + json.dumps({"text": "one more", "label": 0}) + "\n")
    code, _, err = run_cli(capsys, "distill", str(run), "--resume", "-q")
    assert code == 2 and f"data.dataset ({data_file}, split train) changed since the run split it" in err
    data_file.write_text(kept)
    code, _, err = run_cli(capsys, "distill", str(run), "--resume", "-q")
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["data"]["eval_sha256"] == summary["data"]["eval_sha256"]


def test_the_teacher_output_cache_key_ignores_the_split_fields():
    from kdgeo.distillation import CACHE_FREE_DATA

    assert {"eval_fraction", "split_seed", "eval_split", "eval_dataset", "max_eval_samples"} == set(CACHE_FREE_DATA)


def test_the_finetune_cache_key_changes_with_the_split_only_when_set():
    from kdgeo.spec import DataSpec
    from kdgeo.tasks import ClassificationTask

    task = ClassificationTask(label_names=("a", "b"))
    plain = DataSpec(dataset="f.jsonl").model_dump(mode="json")
    held = DataSpec(dataset="f.jsonl", eval_fraction=0.1).model_dump(mode="json")
    seeded = DataSpec(dataset="f.jsonl", eval_fraction=0.1, split_seed=4).model_dump(mode="json")
    keys = [task.data_key(d, None) for d in (plain, held, seeded)]  # type: ignore[arg-type]
    assert "eval_fraction" not in keys[0]  # runs without it keep their cache entries
    assert keys[1]["split_seed"] == 0 and keys[2]["split_seed"] == 4 and keys[1] != keys[2]
