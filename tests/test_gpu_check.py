"""tests/gpu/check.sh stays out of the default suite and never passes silently without a GPU.

The GPU check itself runs only by hand (tests/gpu/README.md); these guards are fast and run everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "gpu" / "check.sh"


def _run(device: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KDGEO_GPU_CHECK_DEVICE": device, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_pytest_collects_nothing_under_tests_gpu():
    assert SCRIPT.exists() and os.access(SCRIPT, os.X_OK)
    assert not list(SCRIPT.parent.rglob("*.py")), "pytest would collect or import a Python file under tests/gpu"
    syntax = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run for real")
def test_no_cuda_exits_3_with_a_clear_message():
    done = _run("cuda")
    assert done.returncode == 3, done.stderr
    assert "no CUDA device" in done.stderr and "nothing was checked" in done.stderr


def test_an_unknown_device_is_bad_usage():
    done = _run("tpu")
    assert done.returncode == 2 and "KDGEO_GPU_CHECK_DEVICE must be cuda or cpu" in done.stderr
