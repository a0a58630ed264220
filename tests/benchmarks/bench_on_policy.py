"""The step-time cost of on-policy distillation, measured side by side (prints figures; asserts nothing).

``train.on_policy = 0.5`` (half the micro-batches trained on the student's own samples, GKD) against
``train.on_policy = 0`` (the references only), same models, data, losses (ce + kd with the generalized JSD,
beta 0.5 + procrustes on token rows) and batches, through ``kdgeo.distillation.run_distill``. The models
are bench_distill_lm.py's, built in-process and offline: a 6-layer OPT teacher (width 256, random weights:
the cost of a step does not depend on them) and a 3-layer student copied from its layers. The on-policy
micro-batches sample up to ``--max-new-tokens`` tokens per prompt (a random-weight student rarely emits
its end-of-sequence token, so most samples run to the limit: the worst case for the sampling cost).

Runs alternate (A B, B A, A B, ...) so drift on a shared machine hits both; medians of ``--repeats`` pairs
(at least 5 unless --quick) are reported. Times are the training steps alone (summary.json's
``train_seconds``, which includes sampling), with the sampling seconds (``on_policy.generation_seconds``)
also printed apart; the load average is printed so a noisy machine shows.

    python tests/benchmarks/bench_on_policy.py [--quick] [--steps N] [--repeats R] [--max-new-tokens T]
"""

from __future__ import annotations

import os

# Must precede `import torch` (libgomp reads it at load): see bench_geometry.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

try:  # run from a checkout without `pip install -e .`
    import kdgeo  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_distill_lm import MAX_LENGTH, build_teacher, instruction_rows, write_jsonl  # noqa: E402  (beside this script)
from kdgeo.distillation import run_distill
from kdgeo.spec import validate_spec

LOSSES = [{"kind": "ce"}, {"kind": "kd", "temperature": 1.0, "direction": "jsd", "beta": 0.5}, {"kind": "procrustes"}]


def run(teacher: Path, train: Path, evals: Path, out: Path, rate: float, steps: int, batch: int, new: int, name: str) -> dict[str, Any]:
    """summary.json of one run of ``steps`` optimizer steps with train.on_policy = ``rate``."""
    spec = validate_spec({
        "name": name,
        "task": "causal-lm",
        "teacher": {"model": str(teacher)},
        "student": {"init": "teacher-layers", "num_layers": 3},
        "data": {
            "dataset": str(train), "eval_dataset": str(evals), "prompt_column": "instruction", "response_column": "response",
            "context_column": "context", "max_length": MAX_LENGTH, "max_eval_samples": 4,
        },
        "features": {"rows": "tokens", "pairs": "uniform"},
        "losses": LOSSES,
        "train": {"max_steps": steps, "batch_size": batch, "log_every": steps, "on_policy": rate},
        "monitor": {"every": 0, "samples": 4},
        "generate": {"max_new_tokens": new, "batch_size": batch, "max_samples": 2},
        "output": {"dir": str(out), "overwrite": True, "save_student": False, "teacher_cache": str(out / "cache")},
    })
    return run_distill(spec).summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 16; --quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="A/B pairs of runs (default 5; --quick 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.5, help="train.on_policy of the B runs (default 0.5)")
    args = parser.parse_args()
    steps = args.steps or (4 if args.quick else 16)
    repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, vocab = build_teacher(root)
        train = write_jsonl(root / "train.jsonl", instruction_rows("train", max(64, steps * args.batch_size)))
        evals = write_jsonl(root / "eval.jsonl", instruction_rows("validation", 8))
        runs = root / "runs"
        b = args.batch_size
        run(teacher, train, evals, runs, args.rate, 2, b, args.max_new_tokens, "warmup")  # caches and allocator
        off, on, gen, ratios, on_batches, lengths = [], [], [], [], [], []
        for r in range(repeats):
            order = [0.0, args.rate] if r % 2 == 0 else [args.rate, 0.0]
            got = {rate: run(teacher, train, evals, runs, rate, steps, b, args.max_new_tokens, f"r{rate}-{r}") for rate in order}
            t_off = got[0.0]["train_seconds"] / got[0.0]["steps"]
            t_on = got[args.rate]["train_seconds"] / got[args.rate]["steps"]
            record = got[args.rate]["on_policy"]
            off.append(t_off)
            on.append(t_on)
            ratios.append(t_on / t_off)
            gen.append(record["generation_seconds"] / got[args.rate]["steps"])
            on_batches.append(record["micro_batches"])
            lengths.append(record["generated_tokens_mean"])
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {b}, max_length {MAX_LENGTH}, "
              f"max_new_tokens {args.max_new_tokens}, {steps} steps x {repeats} A/B repeats, load average {load}")
        print(f"teacher: OPT 6 layers, width 256, vocab {vocab} (random weights); student: 3 of its layers; "
              f"losses ce + kd (jsd, beta 0.5) + procrustes on token rows")
        print(f"on-policy micro-batches per run: {', '.join(map(str, on_batches))} of {steps}; "
              f"mean sampled length {statistics.median(lengths):.1f} tokens")
        print(f"ms/step on_policy = 0    : median {1e3 * statistics.median(off):.1f}  (each: {', '.join(f'{1e3 * x:.1f}' for x in off)})")
        print(f"ms/step on_policy = {args.rate:<4g} : median {1e3 * statistics.median(on):.1f}  (each: {', '.join(f'{1e3 * x:.1f}' for x in on)})")
        print(f"  of which sampling      : median {1e3 * statistics.median(gen):.1f} ms/step")
        print(f"step time ratio on/off   : median {statistics.median(ratios):.3f}  (each: {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    sys.exit(main())
