"""Distillation step cost, measured side by side in one process (prints figures; asserts nothing).

1. Geometry-loss overhead: step time of ce + kd + procrustes (4 token-level layer pairs) over
   ce + kd alone, on the demo models (all-MiniLM-L6-v2 teacher, 4-layer student copied from
   it), same data, same batches.
2. kdgeo's distill loop vs a plain hand-written PyTorch/transformers loop computing the same
   ce + kd on the same models, data and batch size: samples/s ratio.

Runs alternate (A B A B ...) so drift on a shared machine hits both; medians are reported.

    python tests/benchmarks/bench_distill.py [--quick] [--steps N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

from kdgeo import data as data_mod
from kdgeo.distillation import run_distill
from kdgeo.models import ModelRef, load_classifier, load_tokenizer, student_from_teacher_layers
from kdgeo.spec import validate_spec

from _common import teacher_with_head  # noqa: E402  (beside this script)


def spec_for(teacher: Path, out: Path, losses: list[dict], steps: int, batch: int, name: str):
    return validate_spec({
        "name": name,
        "teacher": {"model": str(teacher)},
        "student": {"init": "teacher-layers", "layers": [1, 2, 4, 5]},
        "data": {"dataset": "kdgeo:wordnet-supersenses", "max_length": 48, "max_eval_samples": 32},
        "features": {"rows": "tokens", "pairs": "uniform"},
        "losses": losses,
        "train": {"max_steps": steps, "batch_size": batch, "log_every": steps},
        "monitor": {"every": 0, "samples": 16},
        "output": {"dir": str(out), "overwrite": True, "save_student": False},
    })


def kdgeo_rate(teacher: Path, out: Path, losses: list[dict], steps: int, batch: int, name: str) -> tuple[float, float]:
    """(seconds per step, samples/s) of the training steps alone, as summary.json reports them."""
    result = run_distill(spec_for(teacher, out, losses, steps, batch, name))
    s = result.summary
    return s["train_seconds"] / s["steps"], s["samples_per_s"]


def plain_rate(teacher_dir: Path, steps: int, batch: int, seed: int = 0) -> float:
    """A plain loop: same models, data, batches, AdamW and ce + kd (T = 2); returns samples/s."""
    from kdgeo import demo

    tok = load_tokenizer(ModelRef(str(teacher_dir)))
    teacher = load_classifier(ModelRef(str(teacher_dir)), 8).model.eval()
    torch.manual_seed(seed)
    student = student_from_teacher_layers(teacher, [1, 2, 4, 5]).train()
    for p in student.parameters():
        p.requires_grad_(True)
    for p in teacher.parameters():
        p.requires_grad_(False)
    rows = demo.load_split("train")
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    # Tokenized once up front and padded per batch (DataCollatorWithPadding style), as kdgeo does.
    encoded = tok(texts, truncation=True, max_length=48)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.01)
    # The same batches kdgeo draws (same seed, epoch 0): padding lengths, hence compute, match.
    batches = data_mod.batch_indices(len(texts), batch, shuffle=True, seed=seed, epoch=0)
    seconds, seen = 0.0, 0
    for step in range(steps):
        idx = batches[step]
        t0 = time.perf_counter()
        enc = tok.pad({k: [encoded[k][i] for i in idx] for k in encoded.keys()}, return_tensors="pt")
        y = torch.tensor([labels[i] for i in idx])
        with torch.no_grad():
            t_logits = teacher(**enc).logits
        s_logits = student(**enc).logits
        loss = F.cross_entropy(s_logits, y) + 4.0 * F.kl_div(
            F.log_softmax(s_logits / 2, -1), F.log_softmax(t_logits / 2, -1), reduction="batchmean", log_target=True
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        seconds += time.perf_counter() - t0
        seen += len(idx)
    return seen / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    steps = args.steps or (6 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = [{"kind": "ce"}, {"kind": "kd", "temperature": 2.0}]
    geo = base + [{"kind": "procrustes"}]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = teacher_with_head(root)
        kdgeo_rate(teacher, root / "runs", base, 2, args.batch_size, "warmup")  # warm caches and allocator
        ratios, k_base, k_geo, plain = [], [], [], []
        for r in range(repeats):
            sb, rb = kdgeo_rate(teacher, root / "runs", base, steps, args.batch_size, f"base{r}")
            sg, _ = kdgeo_rate(teacher, root / "runs", geo, steps, args.batch_size, f"geo{r}")
            rp = plain_rate(teacher, steps, args.batch_size)
            ratios.append(sg / sb)
            k_base.append(rb)
            k_geo.append(sg)
            plain.append(rp)
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}, {steps} steps x {repeats} repeats")
        print("student: MiniLM layers [1, 2, 4, 5] (4 pairs, token rows), teacher: all-MiniLM-L6-v2 (6 layers, width 384)")
        print(f"step time ce+kd+procrustes / ce+kd : median {statistics.median(ratios):.3f}  (each: {', '.join(f'{x:.3f}' for x in ratios)})")
        print(f"kdgeo ce+kd samples/s              : median {statistics.median(k_base):.1f}")
        print(f"plain loop ce+kd samples/s         : median {statistics.median(plain):.1f}")
        print(f"kdgeo / plain samples/s            : {statistics.median(k_base) / statistics.median(plain):.3f}")


if __name__ == "__main__":
    sys.exit(main())
