"""Golden values stay machine-independent only if CI reruns them on other CPU kernels.

`.ci/run` reruns `pytest -k "pinned or golden"` under ATEN_CPU_CAPABILITY=default (oneDNN and MKL
capped at AVX2) and under ATEN_CPU_CAPABILITY=avx2. These checks keep that selection honest: every
test that reads a pinned constant (a module-level name starting GOLDEN or PINNED) carries "pinned"
or "golden" in its name, so it is selected, and `.ci/run` really runs the selection.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).parent
ROOT = TESTS.parent
PINNED_NAME = re.compile(r"^(GOLDEN|PINNED)")


def _tests_reading_pinned_constants() -> dict[str, list[str]]:
    """{test file: names of its test functions that read a GOLDEN*/PINNED* name}."""
    found: dict[str, list[str]] = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                if any(PINNED_NAME.match(n) for n in names):
                    found.setdefault(path.name, []).append(node.name)
    return found


def test_every_test_reading_a_golden_constant_is_named_pinned_or_golden():
    found = _tests_reading_pinned_constants()
    assert "test_distillation.py" in found, "the training goldens moved: update this check"
    unnamed = [f"{file}::{name}" for file, names in found.items() for name in names if not re.search("pinned|golden", name)]
    assert not unnamed, f"rename these so that `-k \"pinned or golden\"` in .ci/run selects them: {unnamed}"


def test_ci_reruns_the_pinned_tests_on_other_cpu_kernels():
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert script.splitlines()[2] == "set -euo pipefail"
    assert 'python -m pytest -q -k "pinned or golden"' in script
    assert "pinned ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2" in script
    assert "pinned ATEN_CPU_CAPABILITY=avx2" in script
    assert '"$rc" -eq 5' in script  # an empty selection is reported, and fails
