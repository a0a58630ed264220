"""kdgeo.rundir: the run directory's files (JSON, JSON lines) and its name, never outside output.dir."""

from __future__ import annotations

import os

import pytest

from kdgeo.errors import KdgeoError, OutputError
from kdgeo.rundir import path_component_problem, prepare_run_dir, read_json, read_jsonl


# ---- the run directory's own files --------------------------------------------------------------


def test_read_jsonl_tolerates_a_cut_last_line_but_names_a_damaged_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]  # a crash mid-write: the rest is good
    path.write_bytes(b'{"step": 1}\n{"step": 2, "x": "\xff"}\n{"step": 3}\n')
    with pytest.raises(KdgeoError, match=r"metrics.jsonl, line 2 is not UTF-8 text"):
        read_jsonl(path)
    path.write_bytes(b'{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(KdgeoError, match=r"metrics.jsonl, line 2 is not JSON"):
        read_jsonl(path)  # used to stop there silently, dropping every later line


def test_read_json_names_the_line_of_a_non_utf8_byte(tmp_path):
    path = tmp_path / "summary.json"
    path.write_bytes(b'{\n  "name": "r\xffo"\n}\n')
    with pytest.raises(KdgeoError, match=r"summary.json cannot be read as JSON: line 2, column 13 is not UTF-8"):
        read_json(path)


# ---- the run directory: never outside output.dir ------------------------------------------------


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


# ---- reading a run back: RunSummary and read_run ------------------------------------------------


def test_run_summary_round_trips_a_real_runs_summary_json_key_for_key(tiny, tmp_path, capsys):
    import json

    from cli_helpers import run_cli, tiny_spec, write_spec

    from kdgeo.rundir import CausalLMData, ClassificationData, RunSummary, read_run

    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path, train={"max_steps": 1}))), "-q")
    assert code == 0, err
    run_dir = tmp_path / "runs" / "t"
    written = json.loads((run_dir / "summary.json").read_text())
    summary = RunSummary.from_dict(written)
    assert json.dumps(summary.to_dict()) == json.dumps(written)  # same keys, same order, same values
    assert isinstance(summary.data, ClassificationData) and summary.task == "classification" and summary.steps == 1

    run = read_run(run_dir)
    assert run.finished and run.summary == summary and run.spec == json.loads((run_dir / "spec.json").read_text())
    assert (run.variant, run.seed, run.task, run.student_dir) == ("t", 0, "classification", run_dir / "student")
    assert [e["event"] for e in run.metrics()][:1] == ["start"]

    # The causal-LM data keys and the keys only a torchrun run writes round-trip as well.
    common = {k: written["data"][k] for k in ("dataset", "config", "train_split", "eval_split", "eval_dataset",
                                               "max_train_samples", "max_eval_samples")}
    lm_data = {**common, "prompt_column": "instruction", "response_column": "response", "context_column": None,
               "max_prompt_length": 48, "long_examples": "truncate",
               "truncation": {"train": {"student and teacher": {"contexts_cut": 3}}, "eval": {"student and teacher": {"contexts_cut": 0}}}}
    lm = {**written, "data": lm_data, "task": "causal-lm", "label_names": None, "processes": 2, "distributed": "fsdp",
          "gather_features": True}
    lm_summary = RunSummary.from_dict(lm)
    assert isinstance(lm_summary.data, CausalLMData) and lm_summary.processes == 2
    assert json.dumps(lm_summary.to_dict()) == json.dumps(lm)


def test_an_older_summary_reads_with_defaults_and_a_newer_format_is_refused(tmp_path):
    from kdgeo.rundir import RunSummary

    old = RunSummary.from_dict({"scores": {"accuracy": 0.5}, "seed": "3", "geometry": [{"student": 1}, "junk"]})
    assert (old.format_version, old.seed, old.name, old.data, old.label_names) == (1, 3, None, None, None)
    assert (old.scores, old.geometry, old.pairs, old.skipped_steps_nonfinite) == ({"accuracy": 0.5}, [{"student": 1}], [], 0)
    assert "processes" not in old.to_dict()  # written only by torchrun runs
    with pytest.raises(KdgeoError, match=r"runs/x/summary.json is in run format 2.*newer kdgeo.*pip install -U kdgeo"):
        RunSummary.from_dict({"format_version": 2, "scores": {}}, "runs/x/summary.json")


def test_read_run_names_the_damaged_file_and_the_fix(tmp_path):
    from kdgeo.rundir import RunFileError, read_run, write_json

    with pytest.raises(RunFileError, match=r"is not a kdgeo run directory \(it has no spec.json and no summary.json\)"):
        read_run(tmp_path)
    write_json(tmp_path / "spec.json", {"name": "r", "seed": 4, "task": "causal-lm"})
    unfinished = read_run(tmp_path)
    assert not unfinished.finished and (unfinished.variant, unfinished.seed, unfinished.task) == ("r", 4, "causal-lm")
    (tmp_path / "summary.json").write_text('{"scores": {"accuracy": 0.7')
    with pytest.raises(RunFileError, match=r"summary.json is not valid JSON \(.*line 1.*\): the run directory is damaged\. Restore"):
        read_run(tmp_path)
    (tmp_path / "summary.json").write_text('{"variant": "kd", "seed": 1}')
    (tmp_path / "spec.json").write_bytes(b'{"name": "r\xff"}')
    run = read_run(tmp_path)  # a finished run's summary is enough for most readers: the spec's problem is kept
    assert run.spec == {} and (run.variant, run.seed) == ("kd", 1)
    assert run.spec_problem is not None and run.spec_problem.reason == "is not UTF-8 text at line 1, column 12"
    assert "spec.json (the run directory is damaged): line 1, column 12 is not UTF-8 text" in str(run.spec_problem)


# ---- predictions.jsonl and the evaluation set's content hash --------------------------------------


def test_predictions_round_trip_and_a_damaged_line_is_named(tmp_path):
    from kdgeo.rundir import PREDICTIONS, read_predictions, write_predictions

    assert read_predictions(tmp_path) is None  # a run from before predictions were written
    records = [
        {"index": 0, "text_sha256": "a" * 64, "label": 1, "prediction": 1, "correct": True},
        {"index": 1, "text_sha256": "b" * 64, "rougeL": float("nan"), "nll": 2.5, "tokens": 3},
    ]
    write_predictions(tmp_path / PREDICTIONS, records)
    back = read_predictions(tmp_path)
    assert back == [records[0], {**records[1], "rougeL": None}]  # NaN is written as null, as in every run file
    for line, reason in ((b"[1, 2]", "holds a JSON list, not an object"), (b'{"index": 1', "is not JSON"),
                         (b'{"index": "x", "text_sha256": "c"}', 'lacks an integer "index"'), (b"\xff", "is not UTF-8 text")):
        (tmp_path / PREDICTIONS).write_bytes(b'{"index": 0, "text_sha256": "a"}\n' + line + b"\n")
        with pytest.raises(KdgeoError, match=rf"predictions.jsonl, line 2 {reason}.*delete predictions.jsonl"):
            read_predictions(tmp_path)


def test_eval_sha256_covers_every_text_field_each_target_and_the_order():
    import hashlib

    from kdgeo.rundir import eval_sha256, text_sha256

    assert text_sha256(["ab", "c"]) == hashlib.sha256("ab\x1fc".encode()).hexdigest()
    assert text_sha256(["ab", "c"]) != text_sha256(["a", "bc"]) != text_sha256(["abc"])
    a, b = text_sha256(["a"]), text_sha256(["b"])
    want = hashlib.sha256(f"{a}\x1f0\n{b}\x1f1\n".encode()).hexdigest()
    assert eval_sha256([(a, "0"), (b, "1")]) == want
    others = [[(b, "1"), (a, "0")], [(a, "0"), (b, "2")], [(a, "0")], [(a, "0"), (b, "1"), (a, "0")]]
    assert len({want, *(eval_sha256(o) for o in others)}) == 5  # order, a label, fewer or more examples


def test_the_eval_set_keys_read_back_and_an_older_summary_has_none():
    from kdgeo.rundir import ClassificationData, RunData

    old = {"dataset": "d", "config": None, "train_split": "train", "eval_split": "validation", "eval_dataset": None,
           "max_train_samples": None, "max_eval_samples": 8, "text_column": "text", "label_column": "label"}
    data = RunData.from_dict(old)
    assert (data.eval_sha256, data.eval_examples) == (None, None) and data.to_dict() == old  # nothing added on write
    new = {**old, "eval_sha256": "f" * 64, "eval_examples": 8}
    data = RunData.from_dict(new)
    assert isinstance(data, ClassificationData) and (data.eval_sha256, data.eval_examples) == ("f" * 64, 8)
    assert list(data.to_dict()) == list(new)  # the task's keys first, the evaluation set's last
    assert RunData.from_dict({"dataset": "d"}).eval_sha256 is None  # a spec's data table: never recorded


def test_a_classification_run_writes_predictions_that_agree_with_its_summary(tiny, tmp_path, capsys):
    """accuracy = mean(correct) exactly; eval_sha256 is the same for another student (with another tokenizer)
    on the same examples, differs for another max_eval_samples, and `kdgeo eval` on the run reproduces both."""
    import json

    from cli_helpers import run_cli, tiny_spec, write_spec

    from kdgeo.data import load_split
    from kdgeo.rundir import eval_sha256, read_predictions, read_run, text_sha256

    def distill(name, **sections):
        spec = tiny_spec(tiny, tmp_path, train={"max_steps": 1}, monitor={"every": 0}, **sections)
        code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / f"{name}.toml", {**spec, "name": name})), "-q")
        assert code == 0, err
        return read_run(tmp_path / "runs" / name)

    a = distill("a")
    records = read_predictions(a.path)
    assert a.summary is not None and a.summary.data is not None and records is not None
    rows = load_split("kdgeo:wordnet-supersenses", None, "validation")[:32]
    assert [r["index"] for r in records] == list(range(32)) and a.summary.data.eval_examples == 32
    assert [r["text_sha256"] for r in records] == [text_sha256([t]) for t in rows["text"]]
    assert [r["label"] for r in records] == rows["label"]
    assert all(r["correct"] == (r["label"] == r["prediction"]) for r in records)
    assert a.summary.scores["accuracy"] == sum(r["correct"] for r in records) / len(records)
    assert a.summary.data.eval_sha256 == eval_sha256((text_sha256([t]), str(y)) for t, y in zip(rows["text"], rows["label"]))

    other = {"init": "pretrained", "model": str(tiny["student_other_tok"])}
    b = distill("b", student=other, features={"rows": "mean", "pairs": "uniform"})
    assert b.summary and b.summary.data and b.summary.data.eval_sha256 == a.summary.data.eval_sha256
    # Another evaluation set, from the plan alone (what summary.json's data is written from).
    from kdgeo import events
    from kdgeo.plan import make_plan
    from kdgeo.spec import validate_spec

    for data, count in (({"max_eval_samples": 16}, 16), ({"eval_split": "train"}, 32)):
        plan = make_plan(validate_spec(tiny_spec(tiny, tmp_path, data=data)), 1, False, events.ignore)
        other_set = plan.task.summary_data(plan.data, plan.train, plan.evals)
        assert other_set.eval_examples == count and other_set.eval_sha256 not in (None, a.summary.data.eval_sha256)

    out, preds = tmp_path / "eval.json", tmp_path / "preds.jsonl"
    code, _, err = run_cli(capsys, "eval", str(a.path), "--json", str(out), "--predictions", str(preds), "-q")
    assert code == 0, err
    assert json.loads(out.read_text())["eval_sha256"] == a.summary.data.eval_sha256
    assert [json.loads(line) for line in preds.read_text().splitlines()] == records


# ---- permissions and durability ---------------------------------------------------------------------


def test_write_text_atomic_gives_the_mode_the_umask_allows(tmp_path):
    from kdgeo.rundir import current_umask, write_text_atomic

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027 and current_umask() == 0o027  # read without being changed
        write_text_atomic(tmp_path / "a.json", "{}\n")
        os.umask(0o002)
        write_text_atomic(tmp_path / "b.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o664


@pytest.mark.parametrize(
    "umask, mode", [pytest.param(0o022, 0o644, id="umask-022"), pytest.param(0o077, 0o600, id="umask-077", marks=pytest.mark.slow)]
)
def test_a_real_run_writes_every_file_with_the_umask_s_mode(tiny, tmp_path, umask, mode):
    import subprocess
    import sys

    from cli_helpers import REPO, tiny_spec, write_spec

    from kdgeo.rundir import METRICS, PREDICTIONS, RUN_MARKER, SPEC_JSON, SPEC_TOML, STUDENT, SUMMARY

    spec = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path, train={"max_steps": 2, "checkpoint_every": 1}, monitor={"every": 0}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "kdgeo", "distill", str(spec), "-q"],
        capture_output=True, text=True, env=env, cwd=tmp_path, umask=umask, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "t"
    files = [run / name for name in (SUMMARY, SPEC_JSON, SPEC_TOML, RUN_MARKER, METRICS, PREDICTIONS)]
    files += sorted((run / STUDENT).iterdir()) + sorted((run / "checkpoint-1").iterdir())
    assert any(p.name == "model.safetensors" for p in files)
    assert {p.relative_to(run).as_posix(): oct(p.stat().st_mode & 0o777) for p in files} == {
        p.relative_to(run).as_posix(): oct(mode) for p in files
    }
