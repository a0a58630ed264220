"""Static guarantees about what kdgeo does with files and processes."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = sorted((Path(__file__).resolve().parents[1] / "kdgeo").rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.AST) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    if isinstance(func, ast.Name):
        return func.id
    return ""


def test_every_torch_load_uses_weights_only():
    for path in SOURCE:
        for call in _calls(ast.parse(path.read_text())):
            if _name(call.func) == "torch.load":
                kw = {k.arg: k.value for k in call.keywords}
                assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, f"{path}:{call.lineno}"


def test_no_shell_no_pickle_no_eval():
    banned = {"os.system", "os.popen", "eval", "exec", "pickle.load", "pickle.loads", "subprocess.call", "subprocess.run", "subprocess.Popen", "subprocess.check_output"}
    for path in SOURCE:
        for call in _calls(ast.parse(path.read_text())):
            assert _name(call.func) not in banned, f"{path}:{call.lineno} calls {_name(call.func)}"


def test_remote_code_is_off_unless_the_spec_says_so():
    from kdgeo.spec import StudentSpec, TeacherSpec

    assert TeacherSpec(model="x").trust_remote_code is False
    assert StudentSpec().trust_remote_code is False
    text = (Path(__file__).resolve().parents[1] / "kdgeo" / "models.py").read_text()
    assert "trust_remote_code=True" not in text


def test_weights_are_written_as_safetensors(tiny, tmp_path):
    from cli_helpers import tiny_spec
    from kdgeo.distillation import run_distill
    from kdgeo.spec import validate_spec

    result = run_distill(validate_spec(tiny_spec(tiny, tmp_path, train={"max_steps": 2, "checkpoint_every": 1})))
    files = [p.name for p in result.run_dir.rglob("*") if p.is_file()]
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pkl")) for f in files)
