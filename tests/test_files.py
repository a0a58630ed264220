"""User files: non-UTF-8 text and broken JSON named by file and line, OS path errors as KdgeoErrors,
model directories without tokenizer files or with a broken config.json, and caches that a
read-only HOME cannot stop (issue 11, sections D, E and H)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import tiny_spec, write_spec
from conftest import write_jsonl
from kdgeo import files
from kdgeo.errors import DataError, KdgeoError, ModelLoadError

LONG = "x" * 300
"""A path component over the 255-byte NAME_MAX: every system call on it fails with ENAMETOOLONG."""


# ---- UTF-8 and JSON in data files ---------------------------------------------------------------


@pytest.mark.parametrize("chunk", [7, 64, 1 << 22])
def test_check_utf8_names_line_and_column_across_chunk_boundaries(tmp_path, monkeypatch, chunk):
    """The check reads in chunks cut at newlines: the reported line must not depend on the chunk size."""
    monkeypatch.setattr(files, "_CHUNK", chunk)
    lines = [f"row {i} café".encode() for i in range(40)]
    lines[29] = b"row 29 caf\xe9 latin-1"  # column 11
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"line 30, column 11 is not UTF-8 text \(byte 0xe9\)"):
        files.check_utf8(path, "data.dataset = 'd.jsonl'", DataError)
    path.write_bytes(b"\n".join(lines[:29]) + b"\n")
    files.check_utf8(path, "x", DataError)  # valid UTF-8, multi-byte characters included


@pytest.mark.parametrize(
    ("name", "content", "expect"),
    [
        ("a.jsonl", b'{"text": "ok", "label": 0}\n{"text": "bad \xff", "label": 1}\n', "line 2, column 15 is not UTF-8"),
        ("a.csv", b"text,label\nok,0\nbad \xff,1\n", "line 3, column 5 is not UTF-8"),
        ("a.json", b'[{"text": "ok", "label": 0},\n {"text": "\xfe", "label": 1}]', "line 2, column 12 is not UTF-8"),
        ("a.jsonl", b'{"text": "ok", "label": 0}\n{"text": "ok", "label": 0\n{"text": "x", "label": 1}\n', "line 2, column 26: Expecting ','"),
        ("a.jsonl", b'{"text": "ok", "label": 0}\n[1, 2]\n', "line 2 holds a JSON list, not an object"),
        ("a.json", b'[{"text": "ok", "label": 0},\n {"text": "x" "label": 1}]', "line 2, column 15: Expecting ','"),
        ("a.csv", b"text,label\nok,0\nbad,1,3\n", "Expected 2 fields in line 3, saw 3"),
    ],
)
def test_broken_local_data_names_file_and_line(tmp_path, name, content, expect):
    """Invalid UTF-8 used to pass the JSON reader and raise UnicodeDecodeError when a row was read;
    a corrupt JSON line gave "An error occurred while generating the dataset" with the row only in a log line."""
    from kdgeo.data import load_split

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_split(str(path), None, "train", where="data.dataset")
    text = str(err.value)
    assert f"data.dataset = '{path}'" in text and expect in text, text


def test_local_data_never_touches_the_home_cache(tmp_path, monkeypatch):
    """Local files are converted to Arrow in a temporary directory, not under HF_DATASETS_CACHE."""
    import datasets.config

    from kdgeo.data import load_split

    blocked = tmp_path / "blocker"
    blocked.write_text("a file, so nothing can be created below it")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(blocked / "datasets"))
    ds = load_split(str(write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}])), None, "train")
    assert ds["text"] == ["a"] and ds["label"] == [0]


# ---- the run directory's own files --------------------------------------------------------------


def test_read_jsonl_tolerates_a_cut_last_line_but_names_a_damaged_one(tmp_path):
    from kdgeo.rundir import read_jsonl

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
    from kdgeo.rundir import read_json

    path = tmp_path / "summary.json"
    path.write_bytes(b'{\n  "name": "r\xffo"\n}\n')
    with pytest.raises(KdgeoError, match=r"summary.json cannot be read as JSON: line 2, column 13 is not UTF-8"):
        read_json(path)


# ---- path errors --------------------------------------------------------------------------------


def test_stat_path_turns_os_errors_into_kdgeo_errors(tmp_path):
    with pytest.raises(DataError, match=r"the path component 'xxx.*' is 300 bytes long, more than the 255"):
        files.stat_path(tmp_path / LONG, "data.dataset", DataError)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(KdgeoError, match="loop of symbolic links"):
        files.exists(loop, "x")
    (tmp_path / "f").write_text("x")
    assert files.stat_path(tmp_path / "missing", "x") is None
    with pytest.raises(KdgeoError, match="a part of the path that should be a directory is a file"):
        files.exists(tmp_path / "f" / "below", "x")  # ENOTDIR


@pytest.mark.parametrize("where", ["spec", "data", "model", "run"])
def test_a_name_over_255_bytes_is_reported_not_raised(tiny, tmp_path, where):
    """ENAMETOOLONG used to escape as an OSError traceback from Path.exists()."""
    from kdgeo.compare import CompareArgs, compare
    from kdgeo.data import load_split
    from kdgeo.models import ModelRef, load_config
    from kdgeo.spec import load_spec

    long = tmp_path / LONG
    calls = {
        "spec": lambda: load_spec(long / "run.toml"),
        "data": lambda: load_split(str(long) + ".jsonl", None, "train"),
        "model": lambda: load_config(ModelRef(str(long))),
        "run": lambda: compare(CompareArgs([str(long)])),
    }
    with pytest.raises(KdgeoError, match=r"is 30\d bytes long, more than the 255 bytes"):
        calls[where]()


# ---- model directories --------------------------------------------------------------------------


def _without_tokenizer(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (dest / name).unlink(missing_ok=True)
    return dest


def test_a_model_without_tokenizer_files_is_refused(tiny, tiny_lm, tmp_path):
    """transformers builds a 5-token BERT (or 1-token GPT-2) tokenizer from nothing: every word
    became [UNK] and runs exited 0."""
    from kdgeo.models import ModelRef, load_tokenizer

    bert = _without_tokenizer(tiny["teacher_clf"], tmp_path / "bert")
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer(ModelRef(str(bert)))
    text = str(err.value)
    assert "has no tokenizer" in text and "vocab.txt, tokenizer.json" in text and "holds: config.json, model.safetensors" in text
    opt = _without_tokenizer(tiny_lm["opt_teacher"], tmp_path / "opt")
    with pytest.raises(ModelLoadError, match="vocab.json, merges.txt, tokenizer.json"):
        load_tokenizer(ModelRef(str(opt)), shared_with="The student")
    assert len(load_tokenizer(ModelRef(str(tiny["teacher_clf"])))) > 100  # a real one loads


def test_character_and_byte_tokenizers_count_as_vocabularies():
    """Only special tokens means empty; a byte-level tokenizer without vocabulary files is not."""
    from transformers import ByT5Tokenizer

    from kdgeo.models import _has_vocabulary

    assert _has_vocabulary(ByT5Tokenizer())


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ('{"model_type": "bert", "num_hidden_layers": "four"}', '"num_hidden_layers": "four"; it must be a positive integer'),
        ('{"model_type": "bert", "hidden_size": 64.0}', '"hidden_size": 64.0; it must be a positive integer'),
        ('{"model_type": "bert", "max_position_embeddings": null}', '"max_position_embeddings": null'),
        ('{"model_type": "bert", "num_hidden_layers": true}', '"num_hidden_layers": true'),
        ('{"model_type": "bert", "hidden_size": -64}', '"hidden_size": -64'),
        ("{not json", "is not valid JSON (line 1, column 2"),
        ("[1, 2]", "holds a JSON list, not an object"),
    ],
)
def test_a_broken_config_json_names_file_and_field(tiny, tmp_path, content, expect):
    """A field of the wrong type raised huggingface_hub's StrictDataclassFieldValidationError (a traceback)."""
    from kdgeo.models import ModelRef, load_config

    model = tmp_path / "m"
    shutil.copytree(tiny["teacher_clf"], model)
    (model / "config.json").write_text(content)
    with pytest.raises(ModelLoadError) as err:
        load_config(ModelRef(str(model)))
    assert str(model / "config.json") in str(err.value) and expect in str(err.value), str(err.value)


def test_layer_count_and_width_must_be_positive_integers():
    from types import SimpleNamespace

    from kdgeo.models import hidden_width, num_layers

    with pytest.raises(ModelLoadError, match="at least one layer"):
        num_layers(SimpleNamespace(num_hidden_layers=0))
    with pytest.raises(ModelLoadError, match="no num_hidden_layers"):
        num_layers(SimpleNamespace(num_hidden_layers=True))  # a bool is no layer count
    with pytest.raises(ModelLoadError, match="must be positive"):
        hidden_width(SimpleNamespace(hidden_size=-1))


# ---- a read-only HOME ---------------------------------------------------------------------------


def _unwritable_home(tmp_path: Path) -> Path:
    """A HOME where nothing can be created: below a regular file (ENOTDIR), which stops root too
    (a chmod 555 directory does not); a real read-only HOME fails the same calls with EROFS/EACCES."""
    blocker = tmp_path / "home-blocker"
    blocker.write_text("not a directory")
    return blocker / "home"


def test_matplotlib_gets_a_temporary_config_dir_when_home_is_unwritable(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    for name in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(_unwritable_home(tmp_path)))
    files.prepare_matplotlib()
    chosen = Path(os.environ["MPLCONFIGDIR"])
    assert chosen.is_dir() and os.access(chosen, os.W_OK)
    monkeypatch.setenv("HOME", str(tmp_path))  # a writable HOME is left to matplotlib
    monkeypatch.delenv("MPLCONFIGDIR")
    files.prepare_matplotlib()
    assert "MPLCONFIGDIR" not in os.environ


@pytest.mark.slow
def test_distill_and_probe_plot_run_with_an_unwritable_home(tiny, tmp_path):
    """The datasets Arrow cache (~/.cache/huggingface) used to fail local files with "check the data
    file's format"; matplotlib's ~/.config/matplotlib printed warnings. Real processes, as a user runs them."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"a small tree {i}", "label": i % 8} for i in range(16)])
    spec = tiny_spec(tiny, tmp_path, data={"dataset": str(data), "eval_dataset": str(data)}, train={"max_steps": 1, "batch_size": 4})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HOME", "HF_DATASETS_CACHE", "XDG_", "MPLCONFIGDIR"))}
    env.update(HOME=str(_unwritable_home(tmp_path)), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "kdgeo", "distill", str(write_spec(tmp_path / "run.toml", spec)), "-q"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "runs" / "t" / "summary.json").exists()
    plot = tmp_path / "probe.png"
    probe = subprocess.run(
        [sys.executable, "-m", "kdgeo", "probe", str(tiny["teacher"]), str(tiny["student"]), "--data", str(data),
         "--max-samples", "8", "--plot", str(plot), "-q"], env=env, capture_output=True, text=True, timeout=300,
    )
    assert probe.returncode == 0, probe.stderr
    assert plot.stat().st_size > 0
    assert "Matplotlib" not in probe.stderr and "mkdir" not in probe.stderr, probe.stderr
