"""Teacher-output cache, measured side by side in one process (prints figures; asserts nothing).

A five-variant sweep (``[sweep]``, one ``kdgeo.sweep.run_sweep`` over
``kdgeo.spec.expand_sweep``) run twice: with ``output.teacher_outputs = false`` (every run runs
the frozen teacher's forward on every training batch) and with ``output.teacher_outputs = true``
into a fresh, empty cache directory (so the first run builds the entry and its cost is counted;
the other four read it). Wall clock of the whole sweep; target: the cached sweep >= 1.5x faster.

Demo setting on real weights: teacher all-MiniLM-L6-v2 with an untrained 8-class head saved to
disk first (no fine-tuning is timed), student = 2 of its layers (``student.init =
"teacher-layers"``), ``kdgeo:wordnet-supersenses`` (first N training examples, 64 evaluation
examples), max_length 48, group_by_length, monitor.every 0. Every variant has kd and a feature
loss on the same ("uniform") layer pairs, so all five need the teacher's logits AND the same
paired layers' rows: one cache entry serves the whole sweep (the script counts the entries).

Also printed: the cache's size on disk, per-run ``train_seconds`` medians, the time spent
outside the training loops, and how far the final scores with and without the cache differ (the
cache stores fp16-rounded teacher outputs, so small differences are expected).

Sweeps alternate (uncached, cached / cached, uncached / ...) so drift on a shared machine hits
both; medians are reported. Each sweep writes into a fresh output directory.

    python tests/benchmarks/bench_teacher_cache.py [--quick] [--repeats R] [--train-samples N] [--epochs E] [--student-layers L]
"""

from __future__ import annotations

import os

# Must precede `import torch` (libgomp reads it at load): see bench_geometry.py. With the default
# spinning policy the SVD inside the Procrustes loss slows down badly on an oversubscribed CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import re
import statistics
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

from kdgeo.distillation import run_distill
from kdgeo.events import Event, RunFailed, Stage, Start
from kdgeo.sweep import run_sweep
from kdgeo.spec import expand_sweep, validate_spec

from _common import teacher_with_head  # noqa: E402  (beside this script)
KD = {"kind": "kd", "temperature": 2.0}
VARIANTS = {
    "kd-procrustes": {"losses": [KD, {"kind": "procrustes"}]},
    "kd-gram": {"losses": [KD, {"kind": "gram"}]},
    "kd-cka": {"losses": [KD, {"kind": "cka"}]},
    "kd-projection": {"losses": [KD, {"kind": "projection"}]},
    "ce-kd-procrustes": {"losses": [{"kind": "ce"}, KD, {"kind": "procrustes"}]},
}
_BUILD_DIR = re.compile(r"\.(tmp|trash)-\d+$")


SMALL_STUDENT = {"hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536}


def raw_spec(teacher: Path, out: Path, cache_dir: Path, cached: bool, args: argparse.Namespace, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "teacher": {"model": str(teacher)},
        "student": (
            {"init": "teacher-layers", "num_layers": args.student_layers} if args.teacher == "minilm"
            else {"init": "config", "arch": {"num_hidden_layers": args.student_layers, **SMALL_STUDENT}}
        ),
        "data": {
            "dataset": "kdgeo:wordnet-supersenses", "max_length": 48, "group_by_length": True,
            "max_train_samples": args.train_samples, "max_eval_samples": 64,
        },
        "features": {"rows": "tokens", "pairs": "uniform"},
        "losses": VARIANTS["kd-procrustes"]["losses"],
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "log_every": 10**6},
        "monitor": {"every": 0, "samples": 16},
        "output": {
            "dir": str(out), "overwrite": True, "save_student": False,
            "teacher_outputs": cached, "teacher_outputs_dir": str(cache_dir), "teacher_outputs_dtype": "fp16",
        },
        "sweep": {"seeds": [0], "variants": VARIANTS},
    }


class Events:
    """Quiet progress callback that keeps the stage messages (with times) and last losses."""

    def __init__(self) -> None:
        self.log: list[tuple[float, Event]] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, (Stage, Start, RunFailed)):
            self.log.append((time.perf_counter(), event))

    def messages(self, prefix: str) -> list[str]:
        return [e.message for _, e in self.log if isinstance(e, Stage) and e.message.startswith(prefix)]

    def build_seconds(self) -> float:
        """From the 'caching teacher outputs' stage event to the next event (the run's start):
        the entry's build, plus the teacher's scoring of the evaluation examples."""
        total = 0.0
        for k, (t, e) in enumerate(self.log):
            if isinstance(e, Stage) and e.message.startswith("caching teacher outputs") and k + 1 < len(self.log):
                total += self.log[k + 1][0] - t
        return total


def last_loss(run_dir: Path) -> float:
    loss = float("nan")
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
        for line in fh:
            event = json.loads(line)
            if event.get("event") == "step":
                loss = float(event["loss"])
    return loss


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def run_one_sweep(teacher: Path, root: Path, cached: bool, r: int, args: argparse.Namespace) -> dict[str, Any]:
    tag = "cached" if cached else "uncached"
    out, cache_dir = root / f"out-{tag}-{r}", root / f"cache-{r}"
    runs = expand_sweep(validate_spec(raw_spec(teacher, out, cache_dir, cached, args, "sweep")))
    events = Events()
    t0 = time.perf_counter()
    outcomes = run_sweep(runs, progress=events)
    wall = time.perf_counter() - t0
    failed = [o for o in outcomes if o.status != "done"]
    if failed:
        for o in failed:
            print(f"{tag} sweep: {o.variant} seed {o.seed} {o.status}: {o.error}", file=sys.stderr)
        raise SystemExit(1)
    summaries = {o.variant: o.summary for o in outcomes}
    entries = sorted(p.name for p in cache_dir.iterdir() if p.is_dir() and not _BUILD_DIR.search(p.name)) if cache_dir.exists() else []
    return {
        "wall": wall,
        "runs": len(outcomes),
        "train": [s["train_seconds"] for s in summaries.values()],
        "run_wall": [s["wall_seconds"] for s in summaries.values()],
        "scores": {v: s["scores"] for v, s in summaries.items()},
        "loss": {v: last_loss(Path(s["run_dir"])) for v, s in summaries.items()},
        "steps": {v: s["steps"] for v, s in summaries.items()},
        "entries": entries,
        "entries_used": sorted({s["teacher_outputs"] for s in summaries.values() if s["teacher_outputs"]}),
        "builds": len(events.messages("caching teacher outputs")),
        "reads": len(events.messages("teacher outputs read from the cache")),
        "build_seconds": events.build_seconds(),
        "disk": disk_bytes(cache_dir),
        "build_messages": events.messages("caching teacher outputs"),
    }


def fmt(xs: list[float], digits: int = 1) -> str:
    return ", ".join(f"{x:.{digits}f}" for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer examples, one epoch, one repeat")
    parser.add_argument("--repeats", type=int, default=None, help="sweep pairs (default 2; 1 with --quick)")
    parser.add_argument("--train-samples", type=int, default=None, help="training examples (default 512; 192 with --quick)")
    parser.add_argument("--epochs", type=float, default=None, help="epochs per run (default 2; 1 with --quick)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--student-layers", type=int, default=2, help="student layers (default 2; copied from MiniLM's 6)")
    parser.add_argument("--project-epochs", type=float, default=3.0,
                        help="also print the sweep speed-up projected from the measured step times, build and "
                             "per-run overhead at this many epochs per run (default 3: the demo's)")
    parser.add_argument("--teacher", choices=("minilm", "base"), default="minilm",
                        help="minilm: the real 6-layer, 384-wide MiniLM, student = its layers; base: a BERT-base-shaped teacher "
                             "(12 layers, 768 wide, random weights) and a 384-wide student built from its config")
    args = parser.parse_args()
    args.train_samples = args.train_samples or (192 if args.quick else 512)
    args.epochs = args.epochs or (1.0 if args.quick else 2.0)
    repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = teacher_with_head(root, args.teacher)
        # Warm the OS file cache, tokenizer and allocator once, outside both arms.
        warm = raw_spec(teacher, root / "warmup", root / "cache-warmup", False, args, "warmup")
        warm["train"] = {**warm["train"], "max_steps": 2}
        del warm["sweep"]
        run_distill(validate_spec(warm))

        results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for r in range(repeats):
            order = (False, True) if r % 2 == 0 else (True, False)
            for cached in order:
                results[cached].append(run_one_sweep(teacher, root, cached, r, args))

        plain, cache = results[False], results[True]
        w_plain = [x["wall"] for x in plain]
        w_cache = [x["wall"] for x in cache]
        ratios = [a / b for a, b in zip(w_plain, w_cache)]
        t_plain = [t for x in plain for t in x["train"]]
        t_cache = [t for x in cache for t in x["train"]]
        rw_plain = [t for x in plain for t in x["run_wall"]]
        rw_cache = [t for x in cache for t in x["run_wall"]]
        c0 = cache[0]
        steps = sorted(set(c0["steps"].values()))

        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
              f"{repeats} repeat(s), order alternates (uncached first on even repeats)")
        print(f"sweep: {len(VARIANTS)} variants x 1 seed ({', '.join(VARIANTS)})")
        who = ("teacher all-MiniLM-L6-v2 + untrained 8-class head; student = {n} of its layers" if args.teacher == "minilm" else
               "teacher BERT-base-shaped (12 x 768, random weights); student {n} x 384 from its config").format(n=args.student_layers)
        print(f"{who}; {args.train_samples} train / 64 eval "
              f"examples, max_length 48, group_by_length, batch {args.batch_size}, {args.epochs:g} epoch(s) = {', '.join(map(str, steps))} steps/run")
        print(f"cache entries built per cached sweep   : {fmt([float(x['builds']) for x in cache], 0)}  (runs that read the entry: "
              f"{fmt([float(x['reads']) for x in cache], 0)} of {c0['runs']})")
        print(f"distinct entries in the cache dir      : {fmt([float(len(x['entries'])) for x in cache], 0)}  "
              f"(distinct entries named in the runs' summaries: {fmt([float(len(x['entries_used'])) for x in cache], 0)})")
        for msg in c0["build_messages"]:
            print(f"  build message: {msg}")
        print(f"cache size on disk                     : {c0['disk'] / 2**20:.2f} MiB ({c0['disk']} bytes)")
        print(f"sweep wall s, no cache                 : median {statistics.median(w_plain):.1f}  (each: {fmt(w_plain)})")
        print(f"sweep wall s, cache (incl. its build)  : median {statistics.median(w_cache):.1f}  (each: {fmt(w_cache)})")
        print(f"speed-up, no cache / cache (wall)      : median {statistics.median(ratios):.2f}x  (each: {fmt(ratios, 2)}; target >= 1.5x)")
        print(f"cache build (+ teacher eval scoring) s : median {statistics.median([x['build_seconds'] for x in cache]):.1f}")
        print(f"per-run train_seconds, no cache        : median {statistics.median(t_plain):.2f}  (each: {fmt(t_plain, 2)})")
        print(f"per-run train_seconds, cache           : median {statistics.median(t_cache):.2f}  (each: {fmt(t_cache, 2)})")
        print(f"per-run train_seconds ratio            : {statistics.median(t_plain) / statistics.median(t_cache):.2f}x")
        print(f"per-run wall_seconds, no cache / cache : median {statistics.median(rw_plain):.2f} / {statistics.median(rw_cache):.2f}")
        outside = [x["wall"] - sum(x["train"]) for x in plain], [x["wall"] - sum(x["train"]) for x in cache]
        # The breakdown: all the cache can save is the teacher's forward inside each step (and its share of
        # the final evaluation's scoring); the student's own forward and backward stay. On a CPU the student
        # step dominates, which caps the speed-up well below teacher/student size ratios suggest.
        per_step = {c: statistics.median([t / n for x in xs for t, n in zip(x["train"], x["steps"].values())])
                    for c, xs in ((False, plain), (True, cache))}
        share = 1 - per_step[True] / per_step[False]
        print(f"seconds per step, no cache / cache     : {per_step[False]:.3f} / {per_step[True]:.3f}  "
              f"(teacher forward = {100 * share:.0f}% of an uncached step)")
        runs_n, build = c0["runs"], statistics.median([x["build_seconds"] for x in cache])
        per_epoch = statistics.median([n for x in cache for n in x["steps"].values()]) / args.epochs
        o_plain = statistics.median(outside[0]) / runs_n
        o_cache = (statistics.median(outside[1]) - build) / runs_n
        for e in sorted({args.epochs, args.project_epochs}):
            projected = runs_n * (o_plain + per_epoch * e * per_step[False]) / (
                build + runs_n * (o_cache + per_epoch * e * per_step[True]))
            what = "measured components" if e == args.epochs else "projected from the components above"
            print(f"sweep speed-up at {e:g} epoch(s) per run   : {projected:.2f}x  ({what}: {runs_n} runs x "
                  f"({per_epoch:.0f} steps/epoch x step time + {o_plain:.1f}s / {o_cache:.1f}s outside the loop), "
                  f"cache build {build:.1f}s)")
        print(f"sweep s outside training loops         : no cache median {statistics.median(outside[0]):.1f}, "
              f"cache median {statistics.median(outside[1]):.1f}  (loading, eval, monitor, cache build)")

        # Agreement of the final results: the same variant and seed, with and without the cache.
        keys = sorted({k for x in plain + cache for s in x["scores"].values() for k in s})
        print("final scores, cache vs no cache (same repeat, same variant):")
        for key in keys:
            diffs = [abs(a["scores"][v][key] - b["scores"][v][key]) for a, b in zip(plain, cache) for v in VARIANTS]
            print(f"  max |diff| {key:<18}: {max(diffs):.4f}  (64 eval examples: 1 example = {1 / 64:.4f})")
        loss_rel = [abs(a["loss"][v] - b["loss"][v]) / max(abs(a["loss"][v]), 1e-12) for a, b in zip(plain, cache) for v in VARIANTS]
        print(f"  max relative |diff| final train loss  : {max(loss_rel):.2e}")
        for v in VARIANTS:
            a, b = plain[0], cache[0]
            print(f"  {v:<17} accuracy {a['scores'][v]['accuracy']:.4f} / {b['scores'][v]['accuracy']:.4f}   "
                  f"final loss {a['loss'][v]:.5f} / {b['loss'][v]:.5f}")
        if repeats > 1:
            same = [abs(plain[0]["scores"][v]["accuracy"] - x["scores"][v]["accuracy"]) for x in plain[1:] for v in VARIANTS]
            print(f"  (run-to-run: max |diff| accuracy between uncached repeats: {max(same):.4f})")


if __name__ == "__main__":
    sys.exit(main())
