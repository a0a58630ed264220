"""kdgeo's Python API (kdgeo.api): distill, probe, compare, load_spec, the package's exports, and the README's
"Python API" snippets, run as written on tiny models.

README snippets: every ```python block that follows an ``<!-- api-snippet: NAME -->`` marker. A snippet's
top-level UPPER_CASE assignments (``SPEC = "examples.toml"``) are its inputs: the test replaces their values
with tiny models and paths and runs the rest unchanged, in a temporary working directory. The README read is
``KDGEO_README`` when set (to check a draft), else the repository's README.md.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import kdgeo
import pytest
from kdgeo import events
from kdgeo.errors import KdgeoError, RunInterrupted, SpecError

from cli_helpers import REPO, run_cli, tiny_spec, write_spec


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """One tiny run through kdgeo.distillation with CE + Procrustes, and the events its callback saw."""
    tmp = tmp_path_factory.mktemp("api_run")
    seen: list[events.Event] = []
    spec = tiny_spec(tiny, tmp, losses=[{"kind": "ce"}, {"kind": "procrustes", "weight": 0.5}])
    result = kdgeo.distill(spec, overrides={"train.epochs": 1}, progress=seen.append)
    return result, seen, tmp


# ---- the package ---------------------------------------------------------------------------------


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_kdgeo_is_cheap():
    out = _python(
        "import sys, kdgeo\n"
        "heavy = ('torch', 'transformers', 'pydantic', 'scipy')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "kdgeo.api, kdgeo.load_spec\n"
        "print(sorted(m for m in heavy if m in sys.modules and m != 'pydantic'))\n"
        "print('ok')"
    )
    assert out.splitlines() == ["[]", "[]", "ok"]  # nothing heavy until a name needs it


def test_distill_probe_compare_are_the_api_functions_whatever_is_imported_first():
    """The engine modules have other names (distillation, probing, comparison), so importing them never
    rebinds kdgeo.distill / probe / compare to a module."""
    out = _python(
        "import kdgeo, kdgeo.distillation, kdgeo.probing, kdgeo.comparison\n"
        "from kdgeo import api\n"
        "assert kdgeo.distill is api.distill and kdgeo.probe is api.probe and kdgeo.compare is api.compare\n"
        "assert kdgeo.comparison.CompareArgs.__module__ == 'kdgeo.comparison'\n"
        "print('ok')"
    )
    assert out.strip() == "ok"
    for name in kdgeo.__all__:
        assert getattr(kdgeo, name) is not None


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kdgeo.nope  # noqa: B018


# ---- load_spec -----------------------------------------------------------------------------------


def test_load_spec_from_a_path_a_dict_a_run_spec_and_a_run_directory(tiny, tmp_path, finished):
    raw = tiny_spec(tiny, tmp_path)
    path = write_spec(tmp_path / "run.toml", raw)
    from_path = kdgeo.load_spec(path, overrides=["train.lr=3e-5", "losses.0.weight=0.5"])
    from_dict = kdgeo.load_spec(raw, overrides={"train.lr": 3e-5, "losses.0.weight": 0.5})
    assert from_path == from_dict and from_path.train.lr == 3e-5 and from_path.losses[0].weight == 0.5
    assert kdgeo.load_spec(from_dict) is from_dict
    again = kdgeo.load_spec(from_dict, overrides={"train": {"epochs": 2, "batch_size": 8}, "features.pairs": [[1, 2]]})
    assert (again.train.epochs, again.train.batch_size, again.features.pairs) == (2, 8, [(1, 2)])
    assert raw["train"]["lr"] == 1e-3  # the caller's dict is not changed
    run = finished[0]
    from_run = kdgeo.load_spec(str(run.run_dir))  # the run's resolved spec, pointed where the run is
    assert (Path(from_run.output.dir) / from_run.output.name) == run.run_dir.resolve()


@pytest.mark.parametrize(
    "spec, overrides, match",
    [
        ({"name": "x"}, None, r"<dict>: \d+ problems in the run spec:(.|\n)*- teacher: is required"),
        ("missing.toml", None, "file not found"),
        (3, None, "a int is not a run spec"),
        ("RAW", {"train.lr": None}, "train.lr: is None; TOML has no null"),
        ("RAW", ["train.lr"], "expected KEY=VALUE"),
        ("RAW", {"train.nope": 1}, "train.nope: unknown key"),
    ],
)
def test_load_spec_errors_are_spec_errors(tiny, tmp_path, monkeypatch, spec, overrides, match):
    monkeypatch.chdir(tmp_path)
    if spec == "RAW":
        spec = tiny_spec(tiny, tmp_path)
    with pytest.raises(SpecError, match=match):
        kdgeo.load_spec(spec, overrides=overrides)


def test_load_spec_names_the_shipped_specs_as_distill_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no examples.toml here: the package's own is used
    assert kdgeo.load_spec("examples.toml").name == "demo"
    assert [loss.kind for loss in kdgeo.load_spec("demo-ce").losses] == ["ce"]
    (tmp_path / "examples.toml").write_text('teacher = {model = "t"}\nname = "mine"\n')
    with pytest.raises(SpecError, match="losses: is required"):  # a file of that name wins, even an unfinished one
        kdgeo.load_spec("examples.toml")


# ---- distill -------------------------------------------------------------------------------------


def test_distill_returns_the_run_and_sends_progress_to_the_callback(finished):
    result, seen, _ = finished
    assert isinstance(result, kdgeo.RunResult)
    on_disk = json.loads((result.run_dir / "summary.json").read_text())
    assert result.to_dict() == on_disk
    done = [e for e in seen if isinstance(e, events.Done)]
    assert len(done) == 1 and done[0].summary == result.to_dict()  # --json's "done" event
    kinds = [e.kind for e in seen]
    assert kinds.index("start") < kinds.index("step") < kinds.index("done")
    assert result.student_dir == result.run_dir / "student" and (result.student_dir / "config.json").exists()
    assert set(result.scores) >= {"accuracy", "macro_f1"} and result.steps == 4
    assert {"student", "teacher", "procrustes"} <= set(result.geometry[0])


def test_distill_refuses_bad_input_with_a_kdgeo_error_not_an_exit(tiny, tmp_path):
    with pytest.raises(SpecError, match=r"losses\[0\]: unknown loss kind 'procrustez'"):
        kdgeo.distill(tiny_spec(tiny, tmp_path, losses=[{"kind": "procrustez"}]))
    with pytest.raises(KdgeoError, match="progress='live' is not a view"):
        kdgeo.distill(tiny_spec(tiny, tmp_path), progress="live")  # type: ignore[arg-type]
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_a_signal_stops_the_run_and_resume_continues_it(tiny, tmp_path):
    spec = tiny_spec(tiny, tmp_path, train={"epochs": 1, "batch_size": 16, "lr": 1e-3, "log_every": 1,
                                            "warmup_ratio": 0.0, "checkpoint_every": 2})

    def interrupt_at_step_2(event: events.Event) -> None:
        if isinstance(event, events.Step) and event.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler kdgeo.distillation installed takes it

    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted) as stopped:
        kdgeo.distill(spec, progress=interrupt_at_step_2)
    assert signal.getsignal(signal.SIGINT) is previous  # restored
    err = stopped.value
    run_dir = tmp_path / "runs" / "t"
    assert err.exit_code == 130 and err.run_dir == str(run_dir)
    assert f"Resume with: kdgeo.distill({str(run_dir)!r}, resume=True)" in str(err)

    seen: list[events.Event] = []
    resumed = kdgeo.distill(run_dir, resume=True, progress=seen.append)
    assert isinstance(resumed, kdgeo.RunResult) and resumed.run_dir == run_dir
    assert resumed.summary["resumed_from"] and resumed.steps == 4
    assert any(isinstance(e, events.Resume) for e in seen)


def test_a_sweep_returns_every_run_and_compares(tiny, tmp_path, capsys):
    spec = tiny_spec(
        tiny, tmp_path, data={"dataset": "kdgeo:wordnet-supersenses", "max_train_samples": 16, "max_eval_samples": 8,
                              "max_length": 16},
        train={"epochs": 1, "batch_size": 16, "lr": 1e-3, "log_every": 1, "warmup_ratio": 0.0},
        monitor={"every": 0, "samples": 8},
        sweep={"seeds": [0], "variants": {"ce": {}, "ce-gram": {"losses": [{"kind": "ce"}, {"kind": "gram"}]}}},
    )
    result = kdgeo.distill(spec, progress="rich")  # the CLI's view: plain lines when stderr is no terminal
    assert "training:" in capsys.readouterr().err
    assert isinstance(result, kdgeo.SweepResult) and not result.failed
    assert [(r.variant, r.seed, r.status) for r in result.runs] == [("ce", 0, "done"), ("ce-gram", 0, "done")]
    assert result.to_dict()["runs"][1]["summary"] == result.runs[1].result.to_dict()

    comparison = kdgeo.compare(result, metrics=["accuracy", "procrustes"])
    assert comparison.baseline == "ce" and comparison.variants == ["ce", "ce-gram"]
    assert [m.metric for m in comparison.metrics] == ["accuracy", "procrustes"]


# ---- probe ---------------------------------------------------------------------------------------


def test_probe_to_dict_is_the_cli_json(tiny, capsys):
    seen: list[events.Event] = []
    result = kdgeo.probe(tiny["teacher"], tiny["student"], metrics="procrustes,cka", max_samples=24, batch_size=8,
                         max_length=24, rows="mean", progress=seen.append)
    assert isinstance(result, kdgeo.ProbeResult)
    assert result.map_metric == "procrustes" and list(result.tables) == ["procrustes", "cka"]
    assert len(result.tables["cka"]) == 5 and len(result.tables["cka"][0]) == 3  # (L_t + 1) x (L_s + 1)
    assert all(1 <= s <= 2 and 1 <= t <= 4 for s, t in result.suggested_map)
    assert isinstance(seen[-1], events.ProbeProgress) and seen[-1].done == 24

    code, out, _ = run_cli(capsys, "probe", str(tiny["teacher"]), str(tiny["student"]), "--metric", "procrustes",
                           "--metric", "cka", "--max-samples", "24", "--batch-size", "8", "--max-length", "24",
                           "--rows", "mean", "--json", "-", "-q")
    assert code == 0
    cli = json.loads(out)
    ours = result.to_dict()
    assert ours.pop("seconds") > 0 and cli.pop("seconds") > 0
    assert ours == cli
    assert result.warnings == cli["warnings"] and "n = 24" in result.warnings[0]  # 24 rows, 2 x 32 wide wanted


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rows": "pooled"}, "rows='pooled' is not one of tokens, cls, mean"),
        ({"max_samples": 0}, "max_samples=0 must be a whole number of at least 1"),
        ({"precision": "fp64"}, "precision='fp64' is not one of"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"metrics": ["procrustes", "nope"]}, "unknown metric"),
        ({"colour": "red"}, "unknown option"),
    ],
)
def test_probe_bad_input_is_a_kdgeo_error(tiny, kwargs, match):
    with pytest.raises(KdgeoError, match=match):
        kdgeo.probe(tiny["teacher"], tiny["student"], max_samples=kwargs.pop("max_samples", 8), **kwargs)


# ---- compare -------------------------------------------------------------------------------------


def test_compare_to_dict_is_the_cli_json_and_never_exits(tmp_path, capsys):
    from test_comparison import make_sweep

    root = make_sweep(tmp_path / "sweep", {"ce": 0.0, "kd": 0.01, "worse": -0.05})
    comparison = kdgeo.compare(root, baseline="ce", metrics=["accuracy", "procrustes"], fail_if_worse=True)
    assert comparison.exit_code == 1 and ("accuracy", "worse") in comparison.significantly_worse
    code, out, _ = run_cli(capsys, "compare", str(root), "--baseline", "ce", "--metric", "accuracy,procrustes",
                           "--fail-if-worse", "--json", "-")
    assert code == 1
    assert comparison.to_dict() == json.loads(out)
    comparison.print()
    assert "worse" in capsys.readouterr().out
    with pytest.raises(KdgeoError, match="unknown option\\(s\\) colour"):
        kdgeo.compare(root, colour="red")
    with pytest.raises(KdgeoError, match="baseline"):
        kdgeo.compare(root, baseline="nope")


# ---- the README's "Python API" section -----------------------------------------------------------

MARKER = re.compile(r"<!--\s*api-snippet:\s*([\w-]+)\s*-->\s*\n```python\n(.*?)\n```", re.S)
SNIPPETS = ("api", "trainer", "loop", "load-student")


def _readme() -> tuple[Path, dict[str, str]]:
    path = Path(os.environ.get("KDGEO_README") or REPO / "README.md")
    return path, {name: code for name, code in MARKER.findall(path.read_text(encoding="utf-8"))}


def _run_snippet(code: str, name: str, inputs: dict[str, Any]) -> None:
    """Run ``code`` with the values of its top-level UPPER_CASE assignments replaced by ``inputs``."""
    tree = ast.parse(code)
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target = node.targets[0].id
            if target in inputs:
                node.value = ast.parse(repr(inputs[target]), mode="eval").body
                found.add(target)
    assert found == set(inputs), f"snippet {name}: inputs {sorted(set(inputs) - found)} are not assigned at its top"
    exec(compile(ast.fix_missing_locations(tree), f"README snippet {name}", "exec"), {"__name__": f"snippet_{name}"})


@pytest.mark.parametrize("name", SNIPPETS)
def test_readme_snippet_runs(name, request, tmp_path, monkeypatch, capsys):
    path, snippets = _readme()
    if not snippets:
        pytest.skip(f"{path} has no <!-- api-snippet: NAME --> markers yet (the Python API section is not in it); "
                    "set KDGEO_README to check a draft")
    assert name in snippets, f"{path}: no <!-- api-snippet: {name} --> block"
    if name == "trainer" and importlib.util.find_spec("accelerate") is None:
        pytest.skip("transformers' Trainer needs accelerate (pip install accelerate; it is in the dev extra)")
    tiny = request.getfixturevalue("tiny")  # only now: a skipped snippet builds nothing
    monkeypatch.chdir(tmp_path)
    pairs = [(1, 2), (2, 4)]
    if name == "api":
        from test_comparison import make_sweep

        small = {"dataset": "kdgeo:wordnet-supersenses", "max_train_samples": 32, "max_eval_samples": 16,
                 "max_length": 24}
        raw = tiny_spec(tiny, tmp_path, losses=[{"kind": "ce"}, {"kind": "gram"}], data=small,
                        monitor={"every": 2, "samples": 8})
        spec = write_spec(tmp_path / "spec.toml", raw)
        sweep = make_sweep(tmp_path / "sweep", {"ce": 0.0, "kd": 0.01}, seeds=3)
        inputs: dict[str, Any] = {"SPEC": str(spec), "TEACHER": str(tiny["teacher_clf"]), "SWEEP": str(sweep)}
    elif name == "load-student":
        inputs = {"RUN": str(request.getfixturevalue("finished")[0].run_dir)}
    else:
        inputs = {"TEACHER": str(tiny["teacher"]), "STUDENT": str(tiny["student"]), "PAIRS": pairs}
    _run_snippet(snippets[name], name, inputs)
    out = capsys.readouterr().out
    if name == "api":
        assert "problems in the run spec" in out and "api-demo" in out
    if name == "loop":
        assert "projection/2-4" in out
    if name == "load-student":
        assert "noun." in out  # the label names came with the saved student
