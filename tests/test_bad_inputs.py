"""The catalogue of bad inputs (documented in the README): every case, across all four commands,
must exit 2 with a message naming the problem, print no traceback, and leave an existing run
directory byte for byte as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import math
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
    from kdgeo.distillation import run_distill
    from kdgeo.spec import validate_spec

    root = tmp_path_factory.mktemp("finished")
    spec = tiny_spec(tiny, root, train={"max_steps": 3, "checkpoint_every": 2})
    run_distill(validate_spec(spec))
    return root / "runs" / "t"


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


class Case:
    """``needs``: more session fixtures the build function reads from its first argument (e.g. ``t["tiny_lm"]``)."""

    def __init__(self, name: str, build: Callable[[dict, Path, Path], list[str]], expect: str, needs: tuple[str, ...] = ()) -> None:
        self.name, self.build, self.expect, self.needs = name, build, expect, needs


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

def _lm_spec_file(t: dict, tmp: Path, **data) -> str:
    """A causal-LM spec (tiny_lm) with short templates and ``data`` merged over its [data] table."""
    from cli_helpers import tiny_lm_spec

    spec = tiny_lm_spec(t["tiny_lm"], tmp.parent, train={"max_steps": 1})
    spec["data"].update({"template": "Q: {prompt}\nA:", "context_template": "Q: {prompt}\nC: {context}\nA:", **data})
    spec["output"]["name"] = "new-lm"
    return str(write_spec(tmp / "lm.toml", spec))


def _opt_projected_mse_spec(t: dict, tmp: Path) -> str:
    """mse on an OPT teacher whose last hidden state is projected (widths [64]*4 + [32], as
    opt-350m) and a student of its blocks ([64, 64, 32]), pairing student 2 (32) with teacher 3 (64)."""
    from cli_helpers import tiny_lm_spec
    from conftest import make_causal_lm

    teacher = make_causal_lm(tmp / "opt_projected", t["tiny_lm"]["root"] / "tok", "opt", layers=4, width=64, proj=32)
    spec = tiny_lm_spec(t["tiny_lm"], tmp.parent, teacher={"model": str(teacher)}, train={"max_steps": 1},
                        losses=[{"kind": "ce"}, {"kind": "mse"}], features={"rows": "tokens", "pairs": [[1, 2], [2, 3]]})
    spec["data"].update({"template": "Q: {prompt}\nA:", "context_template": "Q: {prompt}\nC: {context}\nA:"})
    spec["output"]["name"] = "new-lm"
    return str(write_spec(tmp / "lm.toml", spec))


def _no_tokenizer(model: Path, tmp: Path) -> str:
    """A copy of a model directory without its tokenizer files (config.json and weights only)."""
    dest = tmp / f"{model.name}-no-tokenizer"
    shutil.copytree(model, dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (dest / name).unlink(missing_ok=True)
    return str(dest)


def _config_field(model: Path, tmp: Path, **fields) -> str:
    """A copy of a model directory whose config.json has ``fields`` set (or is ``text=`` verbatim)."""
    dest = tmp / f"{model.name}-bad-config"
    shutil.copytree(model, dest)
    if "text" in fields:
        (dest / "config.json").write_text(fields["text"])
    else:
        (dest / "config.json").write_text(json.dumps({**json.loads((dest / "config.json").read_text()), **fields}))
    return str(dest)


def _damaged_run(run: Path, tmp: Path, name: str, old: bytes, new: bytes) -> str:
    """A copy of a finished run with ``old`` replaced by ``new`` in its file ``name`` (or ``new`` appended when ``old`` is empty)."""
    dest = tmp / f"damaged-{name.replace('.', '-')}"
    shutil.copytree(run, dest)
    raw = (dest / name).read_bytes()
    (dest / name).write_bytes(raw.replace(old, new, 1) if old else raw + new)
    return str(dest)


NOT_UTF8_ROWS = b'{"text": "a small tree", "label": 0}\n{"text": "caf\xe9 latin-1", "label": 1}\n'
LONG_NAME = "x" * 300
"""A path component over the 255-byte NAME_MAX (ENAMETOOLONG)."""


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
    # issue 11 E/F: numbers, devices, run names, rows per geometry step
    Case("lr = inf (--set)", lambda t, d, r: ["distill", _spec_file(t, d), "--set", "train.lr=inf"], "train.lr: Input should be a finite number, found inf"),
    Case("epochs = nan", lambda t, d, r: ["distill", _spec_file(t, d, train={"epochs": math.nan})], "train.epochs: Input should be a finite number"),
    Case("loss weight = inf", lambda t, d, r: ["distill", _spec_file(t, d, losses=[{"kind": "ce", "weight": math.inf}])], "losses[0].weight: Input should be a finite number"),
    Case("kd temperature = nan", lambda t, d, r: ["distill", _spec_file(t, d, losses=[{"kind": "kd", "temperature": math.nan}])], "losses[0].temperature: Input should be a finite number"),
    Case("teacher.finetune lr = nan", lambda t, d, r: ["distill", _spec_file(t, d, teacher={"model": str(t["teacher"]), "finetune": {"lr": math.nan}})], "teacher.finetune.lr: Input should be a finite number"),
    Case("epochs = 1e300", lambda t, d, r: ["distill", _spec_file(t, d), "--set", "train.epochs=1e300"], "train.epochs: Input should be less than or equal to 1000000"),
    Case("timeout_minutes = 1e14", lambda t, d, r: ["distill", _spec_file(t, d), "--set", "train.timeout_minutes=100000000000000"], "train.timeout_minutes: Input should be less than or equal to 43200"),
    Case("integer beyond 64 bits", lambda t, d, r: ["distill", _spec_file(t, d), "--set", "train.max_steps=99999999999999999999999"], "does not fit in a 64-bit integer"),
    Case("train.device = mps", lambda t, d, r: ["distill", _spec_file(t, d, train={"device": "mps"})], "train.device: 'mps' is not a supported device; use auto, cpu, cuda or cuda:N"),
    Case("train.device = meta (--set)", lambda t, d, r: ["distill", _spec_file(t, d), "--set", "train.device=meta"], "train.device: 'meta' is not a supported device"),
    Case("probe: --device xpu", lambda t, d, r: ["probe", str(t["teacher"]), str(t["student"]), "--device", "xpu"], "--device: 'xpu' is not a supported device; use auto, cpu, cuda or cuda:N"),
    Case("eval: --device meta", lambda t, d, r: ["eval", str(r), "--device", "meta"], "--device: 'meta' is not a supported device"),
    Case("eval: --temperature inf", lambda t, d, r: ["eval", str(r), "--temperature", "inf"], "inf is not a finite number"),
    Case("name over 100 characters", lambda t, d, r: ["distill", _spec_file(t, d), "--set", f"name={'n' * 101}"], "name: String should have at most 100 characters"),
    Case("output.name = ../x", lambda t, d, r: ["distill", _spec_file(t, d, name="../escaped")], "output.name: '../escaped' is a path, not a single directory name"),
    Case("output.name absolute", lambda t, d, r: ["distill", _spec_file(t, d, name=str(d / "abs"))], "is a path, not a single directory name"),
    Case("output.name = /", lambda t, d, r: ["distill", _spec_file(t, d, name="/")], "output.name: '/' is a path"),
    Case("output.name empty", lambda t, d, r: ["distill", _spec_file(t, d, name="")], "output.name: is empty"),
    Case("output.name with a newline", lambda t, d, r: ["distill", _spec_file(t, d, name="a\nb")], "contains the control character '\\n'"),
    Case("output.name over 255 bytes", lambda t, d, r: ["distill", _spec_file(t, d, name="é" * 128)], "output.name: is 256 bytes long (UTF-8); a directory name holds at most 255 bytes"),
    Case("sweep variant name over 100 characters", lambda t, d, r: ["distill", _spec_file(t, d, sweep={"seeds": [0], "variants": {"v" * 101: {}}})], "use at most 100 (it names run directories)"),
    Case("pooled procrustes on 2 rows a step", lambda t, d, r: ["distill", _spec_file(t, d, features={"rows": "mean"}, losses=[{"kind": "ce"}, {"kind": "procrustes"}], train={"batch_size": 2})], "they need at least 3"),
    Case("pooled monitor batch of 2", lambda t, d, r: ["distill", _spec_file(t, d, features={"rows": "cls"}, monitor={"samples": 2})], "monitor.samples = 2 gives the monitor 2 rows"),
    Case("pooled rows, evaluation split of 2", lambda t, d, r: ["distill", _spec_file(t, d, features={"rows": "mean"}, data=_local_data(d, (0, 1)))], "the evaluation split has 2 example(s)"),
    Case("pooled geometry, 2 training examples", lambda t, d, r: ["distill", _spec_file(t, d, features={"rows": "mean"}, losses=[{"kind": "gram"}], data={"max_train_samples": 2})], "2 training examples give fewer than 3 pooled feature rows"),
    Case("probe: --rows cls on a decoder", lambda t, d, r: ["probe", str(t["tiny_lm"]["opt_teacher"]), str(t["tiny_lm"]["opt_student"]), "--rows", "cls"], "--rows cls on TEACHER", needs=("tiny_lm",)),
    Case("rows = cls, decoder classifier", lambda t, d, r: ["distill", _spec_file(t, d, teacher={"model": str(t["tiny_lm"]["opt_teacher"])}, features={"rows": "cls"})], 'features.rows = "cls" on teacher.model', needs=("tiny_lm",)),
    Case("causal-lm: max_prompt_length shorter than the template", lambda t, d, r: ["distill", _lm_spec_file(t, d, max_prompt_length=3)], "data.max_prompt_length = 3 is shorter than the prompt template itself", needs=("tiny_lm",)),
    Case("causal-lm: a prompt over max_prompt_length, long_examples = error", lambda t, d, r: ["distill", _lm_spec_file(t, d, max_prompt_length=12, long_examples="error")], "tokens, longer than data.max_prompt_length = 12. Raise data.max_prompt_length", needs=("tiny_lm",)),
    Case("mse on a pair of unequal widths (OPT projected last layer)", lambda t, d, r: ["distill", _opt_projected_mse_spec(t, d)], "need equal widths, but layer pair(s) 2->3 (32 vs 64 wide) differ", needs=("tiny_lm",)),
    # issue 17: on-policy distillation and the generalized JSD
    Case("kd.beta without direction = jsd", lambda t, d, r: ["distill", _lm_spec_file(t, d), "--set", "losses.1.beta=0.3"], 'beta = 0.3 is for direction = "jsd" (the generalized JSD); this kd term has direction = "forward": remove beta, or set direction = "jsd"', needs=("tiny_lm",)),
    Case("train.on_policy on a classifier", lambda t, d, r: ["distill", _spec_file(t, d, train={"on_policy": 0.5})], 'train.on_policy = 0.5 samples responses from the student, which needs a decoder: set task = "causal-lm"'),
    Case("train.on_policy with fsdp", lambda t, d, r: ["distill", _lm_spec_file(t, d), "--set", "train.on_policy=0.5", "--set", "train.distributed=fsdp"], 'generating from a sharded student is not supported; use train.distributed = "ddp"', needs=("tiny_lm",)),
    Case("train.on_policy = 2", lambda t, d, r: ["distill", _lm_spec_file(t, d), "--set", "train.on_policy=2"], "train.on_policy: Input should be less than or equal to 1", needs=("tiny_lm",)),
    # issue 11 D/E: model directories without tokenizer files, broken config.json, text that is not UTF-8, long names
    Case("teacher without tokenizer files", lambda t, d, r: ["distill", _spec_file(t, d, teacher={"model": _no_tokenizer(t["teacher_clf"], d)})], 'The student (student.init = "teacher-layers") is built from the teacher and uses the teacher\'s tokenizer'),
    Case("probe: model without tokenizer files", lambda t, d, r: ["probe", str(t["teacher"]), _no_tokenizer(t["student"], d)], "has no tokenizer: none of the tokenizer files vocab.txt, tokenizer.json is in"),
    Case("eval: model without tokenizer files", lambda t, d, r: ["eval", _no_tokenizer(t["teacher_clf"], d), "--data", "kdgeo:wordnet-supersenses"], "has no tokenizer"),
    Case("config.json: num_hidden_layers = \"four\"", lambda t, d, r: ["distill", _spec_file(t, d, teacher={"model": _config_field(t["teacher_clf"], d, num_hidden_layers="four")})], 'config.json sets "num_hidden_layers": "four"; it must be a positive integer'),
    Case("probe: config.json not JSON", lambda t, d, r: ["probe", _config_field(t["teacher"], d, text="{oops"), str(t["student"])], "config.json is not valid JSON (line 1, column 2"),
    Case("data file not UTF-8", lambda t, d, r: ["distill", _spec_file(t, d, data={**_local_data(d), "dataset": _text_file(d, NOT_UTF8_ROWS, "latin1.jsonl")})], "latin1.jsonl': line 2, column 14 is not UTF-8 text (byte 0xe9)"),
    Case("probe: CSV not UTF-8", lambda t, d, r: ["probe", str(t["teacher"]), str(t["student"]), "--data", _text_file(d, b"text\nok\ncaf\xe9\n", "d.csv")], "d.csv': line 3, column 4 is not UTF-8 text"),
    Case("eval: data file not UTF-8", lambda t, d, r: ["eval", str(r), "--data", _text_file(d, NOT_UTF8_ROWS, "latin1.jsonl")], "line 2, column 14 is not UTF-8 text"),
    Case("corrupt JSON Lines row", lambda t, d, r: ["distill", _spec_file(t, d, data={**_local_data(d), "dataset": _text_file(d, '{"text": "a", "label": 0}\n{"text": "b" "label": 1}\n', "c.jsonl")})], "c.jsonl': cannot read it as json: line 2, column 14: Expecting ',' delimiter"),
    Case("compare: metrics.jsonl not UTF-8", lambda t, d, r: ["compare", _damaged_run(r, d, "metrics.jsonl", b"", b'{"event": "x\xff"}\n{"event": "y"}\n')], "metrics.jsonl, line"),
    Case("compare: summary.json not UTF-8", lambda t, d, r: ["compare", _damaged_run(r, d, "summary.json", b'"variant"', b'"vari\xffant"')], "summary.json is not UTF-8 text at line"),
    Case("eval: a run's spec.json not UTF-8", lambda t, d, r: ["eval", _damaged_run(r, d, "spec.json", b'"name"', b'"na\xffme"')], "spec.json (the run directory is damaged): line"),
    Case("spec path component over 255 bytes", lambda t, d, r: ["distill", str(d / LONG_NAME / "run.toml")], "is 300 bytes long, more than the 255 bytes"),
    Case("teacher path component over 255 bytes", lambda t, d, r: ["distill", _spec_file(t, d, teacher={"model": str(d / LONG_NAME)})], "is 300 bytes long, more than the 255 bytes"),
    Case("data path component over 255 bytes", lambda t, d, r: ["distill", _spec_file(t, d, data={**_local_data(d), "dataset": str(d / LONG_NAME / "d.jsonl")})], "is 300 bytes long, more than the 255 bytes"),
    Case("probe: --json name over 255 bytes", lambda t, d, r: ["probe", str(t["teacher"]), str(t["student"]), "--json", str(d / (LONG_NAME + ".json"))], "is 305 bytes long, more than the 255 bytes"),
    Case("probe: --plot name over 255 bytes", lambda t, d, r: ["probe", str(t["teacher"]), str(t["student"]), "--plot", str(d / (LONG_NAME + ".png"))], "is 304 bytes long, more than the 255 bytes"),
    Case("eval: --predictions name over 255 bytes", lambda t, d, r: ["eval", str(r), "--predictions", str(d / LONG_NAME / "p.jsonl")], "is 300 bytes long, more than the 255 bytes"),
    Case("eval: model path over 255 bytes", lambda t, d, r: ["eval", str(d / LONG_NAME)], "is 300 bytes long, more than the 255 bytes"),
    Case("compare: run path over 255 bytes", lambda t, d, r: ["compare", str(d / LONG_NAME)], "is 300 bytes long, more than the 255 bytes"),
    Case("compare: --csv name over 255 bytes", lambda t, d, r: ["compare", str(r), "--csv", str(d / LONG_NAME)], "is 300 bytes long, more than the 255 bytes"),
    Case("compare: --markdown name over 255 bytes", lambda t, d, r: ["compare", str(r), "--markdown", str(d / LONG_NAME)], "is 300 bytes long, more than the 255 bytes"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_names_the_problem_and_damages_nothing(tiny, finished_run, tmp_path, capsys, request, case):
    runs = tmp_path / "runs"
    run = runs / "t"
    shutil.copytree(finished_run, run)
    work = tmp_path / "work"
    work.mkdir()
    args = case.build({**tiny, **{f: request.getfixturevalue(f) for f in case.needs}}, work, run)
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
