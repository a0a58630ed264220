"""The catalogue of bad inputs (documented in the README): every case, across all four commands,
must exit 2 with a message naming the problem, print no traceback, and leave an existing run
directory byte for byte as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

from cli_helpers import run_cli, tiny_spec, write_spec
from conftest import write_jsonl


@pytest.fixture(scope="session")
def finished_run(tiny, tmp_path_factory) -> Path:
    """A finished tiny run (with a checkpoint), made once and copied into each test."""
    from kdgeo.distill import run_distill
    from kdgeo.spec import validate_spec

    root = tmp_path_factory.mktemp("finished")
    spec = tiny_spec(tiny, root, train={"max_steps": 3, "checkpoint_every": 2})
    run_distill(validate_spec(spec))
    return root / "runs" / "t"


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


class Case:
    def __init__(self, name: str, build: Callable[[dict, Path, Path], list[str]], expect: str) -> None:
        self.name, self.build, self.expect = name, build, expect


def _spec_file(tiny: dict, tmp: Path, name: str = "new", **sections) -> str:
    """A spec in the work directory whose runs go beside the existing run (tmp.parent / "runs")."""
    sections["train"] = {"max_steps": 1, **sections.get("train", {})}
    spec = tiny_spec(tiny, tmp.parent, **sections)
    spec.setdefault("output", {})["name"] = name
    spec["data"] = {k: v for k, v in spec["data"].items() if v is not None}
    return str(write_spec(tmp / "run.toml", spec))


def _text_file(tmp: Path, text: str | bytes, name: str = "run.toml") -> str:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _local_data(tmp: Path, eval_labels=(0, 1, 2)) -> dict:
    train = write_jsonl(tmp / "train.jsonl", [{"text": f"a small tree {i}", "label": i % 3} for i in range(12)])
    ev = write_jsonl(tmp / "eval.jsonl", [{"text": f"a large dog {i}", "label": lab} for i, lab in enumerate(eval_labels)])
    return {"dataset": str(train), "eval_dataset": str(ev), "max_train_samples": None, "max_eval_samples": None}


def _other_task_run(run: Path, tmp: Path) -> str:
    other = tmp / "other-task"
    shutil.copytree(run, other)
    summary = json.loads((other / "summary.json").read_text())
    summary["data"]["dataset"] = "nyu-mll/glue"
    summary["variant"] = "other"
    (other / "summary.json").write_text(json.dumps(summary))
    return str(other)


def _swapped_teacher(tiny: dict, tmp: Path) -> str:
    """The tiny classifier, its class names set to the demo's names in reverse order."""
    from kdgeo import demo

    target = tmp / "swapped"
    shutil.copytree(tiny["teacher_clf"], target)
    config = json.loads((target / "config.json").read_text())
    names = list(reversed(demo.load_labels()))
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def _resumable(run: Path) -> None:
    (run / "summary.json").unlink()


CONFIG_STUDENT = {"init": "config", "arch": {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2}}
MISSING_MINILM_ID = "kdgeo-test/no-such-model"

CASES = [
    # distill: the spec itself
    Case("spec file missing", lambda t, d, r: ["distill", str(d / "nope.toml")], "file not found"),
    Case("spec is a directory", lambda t, d, r: ["distill", str(d)], "is a directory"),
    Case("malformed TOML", lambda t, d, r: ["distill", _text_file(d, "name = \n[teacher")], "is not valid TOML"),
    Case("spec not UTF-8", lambda t, d, r: ["distill", _text_file(d, b"name = \"\xff\xfe\"\n")], "cannot be read"),
    Case("unknown key", lambda t, d, r: ["distill", _spec_file(t, d, trian={"epochs": 1})], "did you mean 'train'?"),
    Case("wrong type", lambda t, d, r: ["distill", _spec_file(t, d), "--set", "train.epochs=\"three\""], "train.epochs"),
    Case("unknown loss kind", lambda t, d, r: ["distill", _spec_file(t, d, losses=[{"kind": "procrustez"}])], "did you mean 'procrustes'?"),
    Case("loss kind twice", lambda t, d, r: ["distill", _spec_file(t, d, losses=[{"kind": "ce"}, {"kind": "ce"}])], "each kind may appear once"),
    Case("bad --set", lambda t, d, r: ["distill", _spec_file(t, d), "--set", "train.epochs"], "expected KEY=VALUE"),
    Case("unknown preset", lambda t, d, r: ["distill", _spec_file(t, d), "--preset", "nope"], "no such preset"),
    Case("bad sweep variant", lambda t, d, r: ["distill", _spec_file(t, d, sweep={"seeds": [0], "variants": {"a": {"train": {"lr": -1}}}})], "sweep.variants.a -> train.lr"),
    # distill: models
    Case("teacher directory missing", lambda t, d, r: ["distill", _spec_file(t, d, teacher={"model": str(d / "nope")})], "no such directory"),
    Case("hub id unavailable offline", lambda t, d, r: ["distill", _spec_file(t, d, teacher={"model": MISSING_MINILM_ID})], "Cannot load the config"),
    Case("directory without config.json", lambda t, d, r: ["distill", _spec_file(t, d, teacher={"model": str(r)})], "looks like a kdgeo run directory"),
    Case("teacher without a head", lambda t, d, r: ["distill", _spec_file(t, d, teacher={"model": str(t["teacher"])})], "Add a [teacher.finetune] table"),
    Case("teacher labels in another order", lambda t, d, r: ["distill", _spec_file(t, d, teacher={"model": _swapped_teacher(t, d)})], "would be read under the wrong labels"),
    Case("student layer out of range", lambda t, d, r: ["distill", _spec_file(t, d, student={"init": "teacher-layers", "layers": [1, 9]})], "student.layers = [1, 9]"),
    Case("layer pair out of range", lambda t, d, r: ["distill", _spec_file(t, d, features={"pairs": [[1, 2], [4, 4]]})], "student index 4 is outside 0..2"),
    Case("mse across widths", lambda t, d, r: ["distill", _spec_file(t, d, student=CONFIG_STUDENT, losses=[{"kind": "mse"}])], "need equal widths"),
    Case("tokenizers differ, token rows", lambda t, d, r: ["distill", _spec_file(t, d, student={"init": "pretrained", "model": str(t["student_other_tok"])})], 'features.rows = "mean"'),
    Case("CUDA device absent", lambda t, d, r: ["distill", _spec_file(t, d, train={"max_steps": 1, "device": "cuda:7"})], "device 'cuda:7'"),
    Case("fp16 without CUDA", lambda t, d, r: ["distill", _spec_file(t, d, train={"max_steps": 1, "precision": "fp16", "device": "cpu"})], "needs a CUDA device"),
    # distill: data
    Case("dataset file missing", lambda t, d, r: ["distill", _spec_file(t, d, data={"dataset": str(d / "no.csv"), "eval_dataset": str(d / "no.csv")})], "file not found"),
    Case("empty dataset", lambda t, d, r: ["distill", _spec_file(t, d, data={"dataset": _text_file(d, "", "e.jsonl"), "eval_dataset": _text_file(d, "", "e.jsonl")})], "has no rows"),
    Case("label column missing", lambda t, d, r: ["distill", _spec_file(t, d, data={"label_column": "category"})], "no column 'category'"),
    Case("label out of range", lambda t, d, r: ["distill", _spec_file(t, d, data=_local_data(d, (0, 7)))], "outside 0..2"),
    Case("max_length beyond the model", lambda t, d, r: ["distill", _spec_file(t, d, data={"max_length": 512})], "data.max_length = 512 is longer than"),
    Case("sparse integer labels", lambda t, d, r: ["distill", _spec_file(t, d, data={**_local_data(d), "dataset": str(write_jsonl(d / "s.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 5000}]))})], "the largest is 5000"),
    Case("single file, no eval file", lambda t, d, r: ["distill", _spec_file(t, d, data={**_local_data(d), "eval_dataset": None})], "set data.eval_dataset"),
    # distill: output and resume
    Case("output directory not writable", lambda t, d, r: ["distill", _spec_file(t, d, output={"dir": _text_file(d, "x", "blocker") + "/runs"})], "writable directory"),
    Case("run directory exists", lambda t, d, r: ["distill", _spec_file(t, d, name="t")], "already exists"),
    Case("resume a finished run", lambda t, d, r: ["distill", str(r), "--resume"], "has already finished"),
    Case("resume with a changed spec", lambda t, d, r: (_resumable(r), ["distill", str(r), "--resume", "--set", "train.lr=0.5"])[1], "train.lr: run has"),
    Case("resume another version's run", lambda t, d, r: (_resumable(r), (r / "run.json").write_text('{"format_version": 0}'), ["distill", str(r), "--resume"])[2], "cannot resume it"),
    # probe
    Case("probe: model missing", lambda t, d, r: ["probe", str(d / "nope"), str(t["student"])], "no such directory"),
    Case("probe: tokenizers differ, token rows", lambda t, d, r: ["probe", str(t["teacher"]), str(t["student_other_tok"]), "--rows", "tokens"], "--rows mean"),
    Case("probe: text column missing", lambda t, d, r: ["probe", str(t["teacher"]), str(t["student"]), "--text-column", "sentence"], "no column 'sentence'"),
    Case("probe: unknown metric", lambda t, d, r: ["probe", str(t["teacher"]), str(t["student"]), "--metric", "ckaa"], "unknown metric"),
    Case("probe: --json into a missing directory", lambda t, d, r: ["probe", str(t["teacher"]), str(t["student"]), "--json", str(d / "x" / "p.json")], "does not exist"),
    # eval
    Case("eval: model without a head", lambda t, d, r: ["eval", str(t["teacher"]), "--data", "kdgeo:wordnet-supersenses"], "no trained classification head"),
    Case("eval: no data for a plain model", lambda t, d, r: ["eval", str(t["teacher_clf"])], "give --data"),
    Case("eval: data of another task", lambda t, d, r: ["eval", str(r), "--data", str(write_jsonl(d / "x.jsonl", [{"text": "a", "label": 30}]))], "the data has 31 classes"),
    # compare
    Case("compare: no runs", lambda t, d, r: ["compare", str(d)], "no"),
    Case("compare: path does not exist", lambda t, d, r: ["compare", str(d / "nope")], "does not exist"),
    Case("compare: runs of different tasks", lambda t, d, r: ["compare", str(r), _other_task_run(r, d)], "different tasks"),
    Case("compare: metric missing", lambda t, d, r: ["compare", str(r), "--metric", "bleu"], "bleu"),
    Case("compare: unknown baseline", lambda t, d, r: ["compare", str(r), "--baseline", "kdd"], "kdd"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_names_the_problem_and_damages_nothing(tiny, finished_run, tmp_path, capsys, case):
    runs = tmp_path / "runs"
    run = runs / "t"
    shutil.copytree(finished_run, run)
    work = tmp_path / "work"
    work.mkdir()
    args = case.build(tiny, work, run)
    before = _digest(run)
    code, out, err = run_cli(capsys, *args)
    flat = " ".join(err.split())
    assert code == 2, (case.name, out, err)
    assert case.expect in flat, (case.name, err)
    assert "Traceback" not in err
    after = _digest(run)
    assert {k: v for k, v in after.items() if k in before} == before, "an existing run was modified"


def test_disk_full_while_training_is_reported_and_keeps_what_was_written(tiny, tmp_path, capsys, monkeypatch):
    """ENOSPC on the metrics log: exit 2, one message, and the lines written before it stay loadable."""
    from kdgeo import rundir

    real = rundir.os
    calls = {"n": 0}

    class FullDisk:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def write(fd, data):
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real.write(fd, data)

    monkeypatch.setattr(rundir, "os", FullDisk())
    (tmp_path / "work").mkdir()
    path = _spec_file(tiny, tmp_path / "work", train={"max_steps": 5})
    code, _, err = run_cli(capsys, "distill", path, "-q")
    assert code == 2, err
    assert "No space left on device" in " ".join(err.split()) and "Traceback" not in err
    lines = (tmp_path / "runs" / "new" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
