"""Distillation step cost, measured side by side in one process (prints figures; asserts nothing).

Six arms on the demo models (all-MiniLM-L6-v2 teacher with an untrained 8-class head saved to
disk, 4-layer student copied from its layers [1, 2, 4, 5]) and the demo data (2,400 examples,
max_length 48, batch 32):

  plain    a plain hand-written PyTorch/transformers loop: ce + kd (T = 2), AdamW, clipping,
           the same batches kdgeo draws without length grouping
  plain-fused  the same loop with AdamW(fused=True), the kernel kdgeo uses (kdgeo.optim): kdgeo /
           plain-fused is what kdgeo's checks, live view and bookkeeping cost by themselves
  base     kdgeo ce + kd, same settings (no length grouping, no cache)
  geo      kdgeo ce + kd + procrustes (4 token-level layer pairs), same settings
  grouped  kdgeo ce + kd with data.group_by_length = true (the demo's and a new user's setting)
  cached   grouped, reading the teacher-output cache (output.teacher_outputs = true; the entry is
           built once before the timed runs, as a sweep's later runs and a resumed run find it)

Figures: kdgeo / plain samples/s (same settings: goal >= 1.00x), kdgeo / plain-fused (the
overhead alone, no goal), grouped / plain and cached / plain (goal >= 1.5x), and the step time
geo / base (goal <= 1.10x). kdgeo's samples/s is
summary.json's (the training steps alone, as the plain loop's timer); every run trains --steps
steps. Each repeat runs every arm once, in an order rotated by one per repeat (A B C D E F, B C D
E F A, ...), so drift on a shared machine hits all arms; each figure is the median of its per-repeat
ratios (the two arms of one repeat ran minutes apart), printed with the load average before and
after (other processes on the machine slow every arm, not equally).

    python tests/benchmarks/bench_distill.py [--quick] [--steps N] [--repeats R] [--arms plain,base,...]
"""

from __future__ import annotations

import argparse
import os

# Must precede `import torch` (libgomp reads it at load): see bench_geometry.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


def spec_for(teacher: Path, out: Path, losses: list[dict], steps: int, batch: int, name: str,
             grouped: bool = False, cache_dir: Path | None = None):
    return validate_spec({
        "name": name,
        "teacher": {"model": str(teacher)},
        "student": {"init": "teacher-layers", "layers": [1, 2, 4, 5]},
        "data": {"dataset": "kdgeo:wordnet-supersenses", "max_length": 48, "max_eval_samples": 32,
                 "group_by_length": grouped},
        "features": {"rows": "tokens", "pairs": "uniform"},
        "losses": losses,
        "train": {"max_steps": steps, "batch_size": batch, "log_every": steps},
        "monitor": {"every": 0, "samples": 16},
        "output": {"dir": str(out), "overwrite": True, "save_student": False,
                   **({"teacher_outputs": True, "teacher_outputs_dir": str(cache_dir)} if cache_dir else {})},
    })


def kdgeo_rate(teacher: Path, out: Path, losses: list[dict], steps: int, batch: int, name: str,
               grouped: bool = False, cache_dir: Path | None = None) -> tuple[float, float]:
    """(seconds per step, samples/s) of the training steps alone, as summary.json reports them."""
    result = run_distill(spec_for(teacher, out, losses, steps, batch, name, grouped, cache_dir))
    s = result.summary
    return s["train_seconds"] / s["steps"], s["samples_per_s"]


def plain_rate(teacher_dir: Path, steps: int, batch: int, seed: int = 0, fused: bool = False) -> float:
    """A plain loop: same models, data, batches, AdamW (torch's default kernel, or ``fused``) and ce + kd
    (T = 2); returns samples/s."""
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
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.01, fused=fused or None)
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


ARMS = ("plain", "plain-fused", "base", "geo", "grouped", "cached")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 20; 8 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of every arm (default 5; 2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    args = parser.parse_args()
    steps = args.steps or (8 if args.quick else 20)
    repeats = args.repeats or (2 if args.quick else 5)
    arms = [a for a in ARMS if a in args.arms.split(",")]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = [{"kind": "ce"}, {"kind": "kd", "temperature": 2.0}]
    geo = base + [{"kind": "procrustes"}]
    load_before = load()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = teacher_with_head(root)
        cache = root / "teacher-outputs"
        runs = {
            "plain": lambda r: plain_rate(teacher, steps, args.batch_size),
            "plain-fused": lambda r: plain_rate(teacher, steps, args.batch_size, fused=True),
            "base": lambda r: kdgeo_rate(teacher, root / "runs", base, steps, args.batch_size, f"base{r}"),
            "geo": lambda r: kdgeo_rate(teacher, root / "runs", geo, steps, args.batch_size, f"geo{r}"),
            "grouped": lambda r: kdgeo_rate(teacher, root / "runs", base, steps, args.batch_size, f"grp{r}", True),
            "cached": lambda r: kdgeo_rate(
                teacher, root / "runs", base, steps, args.batch_size, f"cch{r}", True, cache
            ),
        }
        # Warm caches and the allocator; with "cached", build the cache entry (untimed, as a sweep's first run does).
        kdgeo_rate(teacher, root / "runs", base, 2, args.batch_size, "warmup", "cached" in arms,
                   cache if "cached" in arms else None)
        got: dict[str, list] = {a: [] for a in arms}
        for r in range(repeats):
            for a in arms[r % len(arms):] + arms[: r % len(arms)]:
                got[a].append(runs[a](r))
            # As it goes, so a run cut short still says something.
            latest = {a: got[a][-1] if a.startswith("plain") else got[a][-1][1] for a in arms}
            print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{a} {latest[a]:.1f}" for a in arms) + " samples/s; "
                  + load(), flush=True)
        load_after = load()
        rate = {a: [x if a.startswith("plain") else x[1] for x in v] for a, v in got.items()}
        med = {a: statistics.median(v) for a, v in rate.items()}
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, batch {args.batch_size}, {steps} steps per run, "
              f"{repeats} repeats, arm order rotated per repeat")
        print(f"{load_before} before, {load_after} after")
        print("student: MiniLM layers [1, 2, 4, 5] (4 pairs, token rows), teacher: all-MiniLM-L6-v2 (6 layers, width "
              "384), demo data (2,400 examples, max_length 48)")
        for a in arms:
            print(f"  {a:<11} samples/s: median {med[a]:7.1f}  (each: {', '.join(f'{x:.1f}' for x in rate[a])})")
        # Each figure pairs the two arms' runs of the same repeat (minutes apart at most): the median of those
        # ratios, not a ratio of medians taken over repeats that a drifting machine makes unequal.
        print("figure (median of the per-repeat ratios)            median   each repeat")
        if "plain" in arms:
            for a, label, goal in (("base", "kdgeo ce+kd / plain loop (same settings)", ">= 1.00x"),
                                   ("grouped", "kdgeo ce+kd, length grouping / plain loop", ">= 1.5x"),
                                   ("cached", "kdgeo ce+kd, grouping + cache / plain loop", ">= 1.5x")):
                if a in arms:
                    each = [x / p for x, p in zip(rate[a], rate["plain"])]
                    print(f"  {label:<49} {statistics.median(each):5.2f}x   {', '.join(f'{x:.2f}' for x in each)}"
                          f"   (goal {goal})")
        if "plain-fused" in arms and "base" in arms:
            each = [x / p for x, p in zip(rate["base"], rate["plain-fused"])]
            label = "kdgeo ce+kd / plain loop, fused AdamW (overhead)"
            print(f"  {label:<49} {statistics.median(each):5.2f}x   {', '.join(f'{x:.2f}' for x in each)}"
                  "   (no goal: kdgeo's own cost)")
        if "base" in arms and "geo" in arms:
            each = [g[0] / b[0] for g, b in zip(got["geo"], got["base"])]
            print(f"  {'step time ce+kd+procrustes / ce+kd':<49} {statistics.median(each):5.2f}x   "
                  f"{', '.join(f'{x:.2f}' for x in each)}   (goal <= 1.10x)")


if __name__ == "__main__":
    sys.exit(main())
