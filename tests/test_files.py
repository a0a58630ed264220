"""User files: non-UTF-8 text and broken JSON named by file and line, OS path errors as KdgeoErrors,
and caches that a read-only HOME cannot stop (issue 11, sections D, E and H). Model directories
without tokenizer files or with a broken config.json are in test_models.py, the run directory's
own files in test_rundir.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import tiny_spec, write_spec
from conftest import write_jsonl
from kdgeo import files
from kdgeo.errors import DataError, KdgeoError

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
    from kdgeo.comparison import CompareArgs, compare
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
