"""tests/benchmarks/bench_gpu.py's smoke mode (--device cpu --tiny): the GPU benchmark's code paths run
on tiny models, so the script does not rot between the times a GPU is at hand."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "benchmarks"


def test_bench_gpu_smoke_mode_runs_distill_and_probe_and_reports_mfu(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "bench_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", module)
    spec.loader.exec_module(module)
    figures = module.main(["--device", "cpu", "--tiny"])
    out = capsys.readouterr().out
    assert figures["samples_per_s"] > 0 and figures["probe_rows_per_s"] > 0
    assert figures["probe_pairs"] == 5 * 3  # tiny: 4 + 1 teacher hidden states x 2 + 1 student ones
    # MFU = (6 N_student + 2 N_teacher) * tokens/s / peak, with the H200's dense bf16 peak by default
    expected = (6 * figures["n_student"] + 2 * figures["n_teacher"]) * figures["tokens_per_s"] / 989e12
    assert math.isclose(figures["mfu"], expected, rel_tol=1e-12)
    assert "MFU" in out and "rows/s" in out and "15 pairs" in out
