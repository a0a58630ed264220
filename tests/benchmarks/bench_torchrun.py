"""torchrun (DDP over gloo, 2 CPU processes) vs one process, measured side by side (prints figures; asserts nothing).

The same run launched two ways, each as its own ``kdgeo distill`` command in a subprocess:

* 1 process:   ``python -m kdgeo distill spec.toml -q --set train.batch_size=2B``, OMP_NUM_THREADS=2
* 2 processes: ``python -m torch.distributed.run --nproc-per-node 2 --standalone -m kdgeo distill
  spec.toml -q`` with ``train.batch_size = B`` (per process), OMP_NUM_THREADS=1 in each process

``train.batch_size`` is per process, so both see the same global batches (same seed, same
examples, same padding) and do the same arithmetic; only the split over processes differs. With
ce + kd (per-example losses) the two updates are the same up to float rounding.

Demo setting on real weights: teacher all-MiniLM-L6-v2 with an untrained 8-class head saved to
disk first (no fine-tuning is timed), student = 2 of its layers (``student.init =
"teacher-layers"``), ``kdgeo:wordnet-supersenses`` (first N training examples, one epoch, 64
evaluation examples), max_length 48, group_by_length, monitor.every 0.

Reported: ``samples_per_s`` and ``train_seconds`` from each run's summary.json (global samples,
training steps alone, timed on rank 0), and the wall time of the whole command including
interpreter and torchrun start-up, loading, evaluation and writing. On a machine with 2 cores
two processes compete with each other (and with anything else running) for the same cores, and
DDP adds an all-reduce of every gradient (the student's 11.7M-parameter embedding table
included) per step: expect little or no gain, possibly a loss.

Runs alternate (1p 2p, 2p 1p, ...) so drift on a shared machine hits both; medians are reported.

    python tests/benchmarks/bench_torchrun.py [--quick] [--repeats R] [--train-samples N] [--batch-size B]
"""

from __future__ import annotations

import os

# Must precede `import torch` (libgomp reads it at load): see bench_geometry.py. Passed on to the
# subprocesses too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

try:  # run from a checkout without `pip install -e .`
    import kdgeo  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from _common import teacher_with_head  # noqa: E402  (beside this script)
REPO = Path(__file__).resolve().parents[2]


def write_spec(path: Path, teacher: Path, out: Path, args: argparse.Namespace) -> None:
    import tomli_w

    spec = {
        "name": "torchrun-bench",
        "teacher": {"model": str(teacher)},
        "student": {"init": "teacher-layers", "num_layers": 2},
        "data": {
            "dataset": "kdgeo:wordnet-supersenses", "max_length": 48, "group_by_length": True,
            "max_train_samples": args.train_samples, "max_eval_samples": 64,
        },
        "features": {"rows": "tokens", "pairs": "uniform"},
        "losses": [{"kind": "ce"}, {"kind": "kd", "temperature": 2.0}],
        "train": {"epochs": 1.0, "batch_size": args.batch_size, "log_every": 10**6, "device": "cpu"},
        "monitor": {"every": 0, "samples": 16},
        "output": {"dir": str(out), "overwrite": True, "save_student": False},
    }
    path.write_text(tomli_w.dumps(spec), encoding="utf-8")


def env_with(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"], "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    })
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def launch(mode: str, spec: Path, out: Path, name: str, batch: int) -> dict[str, Any]:
    """Run one `kdgeo distill` command; return its summary plus the command's wall time."""
    sets = ["--set", f"output.name={name}"]
    if mode == "1p":
        cmd = [sys.executable, "-m", "kdgeo", "distill", str(spec), "-q", *sets, "--set", f"train.batch_size={2 * batch}"]
        env = env_with(2)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "kdgeo", "distill", str(spec), "-q", *sets]
        env = env_with(1)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"{mode} run failed (exit {proc.returncode}): {' '.join(cmd)}", file=sys.stderr)
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(1)
    summary = json.loads((out / name / "summary.json").read_text(encoding="utf-8"))
    return {"wall": wall, **summary}


def threads_seen(threads: int) -> int:
    """torch.get_num_threads() in a fresh interpreter with OMP_NUM_THREADS=threads (what each run gets)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         env=env_with(threads), capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt(xs: list[float], digits: int = 1) -> str:
    return ", ".join(f"{x:.{digits}f}" for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer examples, one repeat")
    parser.add_argument("--repeats", type=int, default=None, help="pairs of runs (default 3; 1 with --quick)")
    parser.add_argument("--train-samples", type=int, default=None, help="training examples, one epoch (default 640; 256 with --quick)")
    parser.add_argument("--batch-size", type=int, default=16, help="per-process batch B of the 2-process run (1 process: 2B)")
    args = parser.parse_args()
    args.train_samples = args.train_samples or (256 if args.quick else 640)
    repeats = args.repeats or (1 if args.quick else 3)
    B = args.batch_size

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = teacher_with_head(root)
        out = root / "runs"
        spec = root / "spec.toml"
        write_spec(spec, teacher, out, args)
        launch("1p", spec, out, "warmup", B)  # warm the OS file cache (weights, Python modules) once

        results: dict[str, list[dict[str, Any]]] = {"1p": [], "2p": []}
        for r in range(repeats):
            for mode in (("1p", "2p") if r % 2 == 0 else ("2p", "1p")):
                results[mode].append(launch(mode, spec, out, f"{mode}-{r}", B))

        one, two = results["1p"], results["2p"]
        sps1, sps2 = [x["samples_per_s"] for x in one], [x["samples_per_s"] for x in two]
        tr1, tr2 = [x["train_seconds"] for x in one], [x["train_seconds"] for x in two]
        w1, w2 = [x["wall"] for x in one], [x["wall"] for x in two]
        rw1, rw2 = [x["wall_seconds"] for x in one], [x["wall_seconds"] for x in two]
        ratios = [b / a for a, b in zip(sps1, sps2)]
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
              f"{repeats} repeat(s), order alternates (1 process first on even repeats)")
        print(f"1 process  : OMP_NUM_THREADS=2 (torch sees {threads_seen(2)} threads), batch_size {2 * B}")
        print(f"2 processes: OMP_NUM_THREADS=1 each (torch sees {threads_seen(1)} thread each), batch_size {B} per process "
              f"(global {2 * B}), DDP over gloo (summary: processes={two[0].get('processes')}, {two[0].get('distributed')})")
        print(f"teacher all-MiniLM-L6-v2 + untrained 8-class head; student = 2 teacher layers; ce + kd; {args.train_samples} train / "
              f"64 eval examples, max_length 48, group_by_length, 1 epoch = {one[0]['steps']} / {two[0]['steps']} steps "
              f"({one[0]['train_samples']} samples)")
        print(f"samples/s, 1 process          : median {med(sps1):.1f}  (each: {fmt(sps1)})")
        print(f"samples/s, 2 processes        : median {med(sps2):.1f}  (each: {fmt(sps2)})")
        print(f"2 processes / 1 process       : median {med(ratios):.2f}x  (each: {fmt(ratios, 2)}; > 1 = torchrun faster)")
        print(f"train_seconds, 1p / 2p        : median {med(tr1):.2f} / {med(tr2):.2f}")
        print(f"run wall_seconds, 1p / 2p     : median {med(rw1):.1f} / {med(rw2):.1f}  (summary.json: run_distill start to summary)")
        print(f"command wall s incl. start-up : 1p median {med(w1):.1f} (each: {fmt(w1)}), 2p median {med(w2):.1f} (each: {fmt(w2)}); "
              f"ratio 1p/2p {med(w1) / med(w2):.2f}x")
        acc1 = [x["scores"].get("accuracy", float("nan")) for x in one]
        acc2 = [x["scores"].get("accuracy", float("nan")) for x in two]
        print(f"final accuracy, 1p / 2p       : {fmt(acc1, 4)} / {fmt(acc2, 4)}  (same global batches; ce + kd)")


if __name__ == "__main__":
    sys.exit(main())
