"""GPU throughput of kdgeo's distill loop and probe (prints figures; asserts nothing).

1. distill: a BERT-base-shaped teacher (12 layers x 768, random weights, MiniLM's tokenizer, an
   8-class head) -> a 6-layer student copied from its layers (DistilBERT-style, ``student.init =
   "teacher-layers"``), losses ce + kd (T = 2) + procrustes on 6 token-level layer pairs, bf16
   autocast, through ``kdgeo.distillation.run_distill`` (the loop users get). Every example is a
   synthetic text of random words truncated to ``--seq-len`` tokens, so every batch is exactly
   batch x seq-len tokens and the FLOP count is exact. Printed: samples/s, tokens/s and

       MFU = (6 * N_student + 2 * N_teacher) * tokens/s / peak

   N_*: parameters outside the embedding tables (the matmul weights; embeddings are lookups), so
   6 * N_student * tokens is the student's forward (2 N) and backward (4 N), 2 * N_teacher * tokens
   the frozen teacher's forward (Kaplan et al. 2020, "Scaling Laws for Neural Language Models",
   sec. 2.1; the PaLM paper's MFU, Chowdhery et al. 2022, app. B). Attention-score FLOPs
   (2 * 2 * layers * seq * width per token forward) and the Procrustes loss's own matmuls are not
   counted, so the figure is a slight under-estimate. ``peak``: the device's dense bf16 FLOP/s,
   ``--peak-tflops``, default 989 (H100/H200 SXM dense BF16 tensor-core peak, no sparsity).
2. probe: ``kdgeo.api.probe`` of the teacher (13 hidden states: embeddings + 12 layers) against
   the student (7), all 91 pairs, token rows, streamed: feature rows per second (rows = real
   tokens of the probed examples).

Runs alternate nothing here (one configuration each); ``--repeats`` distill runs give a median.
No GPU at hand: ``--device cpu --tiny`` runs the same code paths on tiny models in seconds
(tests/test_bench_gpu.py runs it so this script does not rot).

    python tests/benchmarks/bench_gpu.py [--device cuda] [--steps 50] [--batch-size 64] [--seq-len 128]
        [--repeats 3] [--peak-tflops 989] [--probe-samples 2048]
    python tests/benchmarks/bench_gpu.py --device cpu --tiny
"""

from __future__ import annotations

import os

# Must precede `import torch` (libgomp reads it at load): see bench_geometry.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import random
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BASE_ARCH, MINILM  # noqa: E402  (beside this script)
from kdgeo.models import ModelRef, load_tokenizer, quiet_transformers, resolve_model_ref  # noqa: E402

H200_DENSE_BF16_TFLOPS = 989.0
"""NVIDIA H200 (and H100) SXM: 989 TFLOP/s dense BF16 on the tensor cores (1,979 with 2:4 sparsity)."""
TINY_ARCH = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}


def build_teacher(root: Path, arch: dict[str, int]) -> Path:
    """A randomly initialised BERT classifier of shape ``arch`` with MiniLM's tokenizer, saved to disk."""
    # The BERT classes directly: the Auto* lookup imports model modules and takes a minute on a loaded CPU.
    from transformers import BertConfig, BertForSequenceClassification

    tok = load_tokenizer(ModelRef(MINILM))
    config = BertConfig.from_pretrained(resolve_model_ref(MINILM), num_labels=8)
    for key, value in arch.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with quiet_transformers():
        model.save_pretrained(root / "teacher")
        tok.save_pretrained(root / "teacher")
    return root / "teacher"


def synthetic_data(path: Path, n: int, words: int, seed: int = 0) -> Path:
    """``n`` texts of ``words`` random lower-case words (each at least one token, so a text of
    seq-len words fills seq-len tokens after truncation) and labels 0-7, as .jsonl."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(2000)]
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words)), "label": i % 8}) + "\n")
    return path


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters outside embedding tables (the matmul weights, biases and norms)."""
    emb = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def distill_once(teacher: Path, data: Path, out: Path, args: argparse.Namespace, name: str) -> dict[str, Any]:
    from kdgeo.distillation import run_distill
    from kdgeo.spec import validate_spec

    spec = validate_spec(
        {
            "name": name,
            "teacher": {"model": str(teacher)},
            "student": {"init": "teacher-layers", "num_layers": args.student_layers},
            "data": {
                "dataset": str(data),
                "eval_dataset": str(data),
                "max_length": args.seq_len,
                "max_eval_samples": 32,
            },
            "features": {"rows": "tokens", "pairs": "uniform"},
            "losses": [{"kind": "ce"}, {"kind": "kd", "temperature": 2.0}, {"kind": "procrustes"}],
            "train": {
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "log_every": args.steps,
                "precision": args.precision,
                "device": args.device,
                "warmup_ratio": 0.0,
            },
            "monitor": {"every": 0, "samples": 16},
            "output": {"dir": str(out), "overwrite": True, "save_student": False},
        }
    )
    return run_distill(spec).summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models, a few steps: a smoke test of this script")
    parser.add_argument("--steps", type=int, default=None, help="training steps per distill run (default 50; 3 tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (4 with --tiny)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per example (default 128; 16 with --tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="distill runs, median reported (default 3; 1 tiny)")
    parser.add_argument("--precision", default=None, help="bf16 (default; fp32 with --tiny on a CPU)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H200_DENSE_BF16_TFLOPS,
        help=f"the device's dense bf16 peak, TFLOP/s (default {H200_DENSE_BF16_TFLOPS:g}: H200 SXM)",
    )
    parser.add_argument("--probe-samples", type=int, default=None, help="examples probed (default 2048; 16 tiny)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.steps = args.steps or (3 if tiny else 50)
    args.batch_size = args.batch_size or (4 if tiny else 64)
    args.seq_len = args.seq_len or (16 if tiny else 128)
    args.repeats = args.repeats or (1 if tiny else 3)
    args.precision = args.precision or ("fp32" if tiny and args.device == "cpu" else "bf16")
    args.probe_samples = args.probe_samples or (16 if tiny else 2048)
    arch = TINY_ARCH if tiny else BASE_ARCH
    args.student_layers = arch["num_hidden_layers"] // 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device here; use --device cpu --tiny for the smoke run.")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = build_teacher(root, arch)
        n_train = max(args.batch_size * args.steps, 64)
        data = synthetic_data(root / "train.jsonl", n_train, words=args.seq_len)
        from kdgeo.models import load_classifier, student_from_teacher_layers

        t_model = load_classifier(ModelRef(str(teacher)), 8).model
        s_model = student_from_teacher_layers(t_model, list(range(1, arch["num_hidden_layers"], 2)))
        n_teacher, n_student = non_embedding_params(t_model), non_embedding_params(s_model)
        del t_model, s_model
        flops_per_token = 6 * n_student + 2 * n_teacher

        if not tiny:  # allocator, kernels and autotuning warmed outside the timed runs
            distill_once(teacher, data, root / "runs", argparse.Namespace(**{**vars(args), "steps": 2}), "warmup")
        rates = [
            distill_once(teacher, data, root / "runs", args, f"r{r}")["samples_per_s"] for r in range(args.repeats)
        ]
        samples_s = statistics.median(rates)
        tokens_s = samples_s * args.seq_len
        mfu = flops_per_token * tokens_s / (args.peak_tflops * 1e12)

        from kdgeo import api

        student_dir = root / "student"
        s_model = student_from_teacher_layers(
            load_classifier(ModelRef(str(teacher)), 8).model, list(range(1, arch["num_hidden_layers"], 2))
        )
        with quiet_transformers():
            s_model.save_pretrained(student_dir)
            load_tokenizer(ModelRef(str(teacher))).save_pretrained(student_dir)
        probe_kw = dict(
            data=str(data),
            split="train",
            max_samples=args.probe_samples,
            batch_size=args.batch_size,
            max_length=args.seq_len,
            device=args.device,
            rows="tokens",
        )
        if not tiny:
            api.probe(teacher, student_dir, **{**probe_kw, "max_samples": args.batch_size})  # warm-up
        t0 = time.perf_counter()
        result = api.probe(teacher, student_dir, **probe_kw)
        probe_wall = time.perf_counter() - t0
        pairs = (result.teacher_layers + 1) * (result.student_layers + 1)

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    figures = {
        "device": device_name,
        "precision": args.precision,
        "samples_per_s": samples_s,
        "tokens_per_s": tokens_s,
        "mfu": mfu,
        "n_teacher": n_teacher,
        "n_student": n_student,
        "probe_rows_per_s": result.feature_rows / probe_wall,
        "probe_pairs": pairs,
    }
    print(
        f"torch {torch.__version__}, device {device_name}, precision {args.precision}{' (tiny models)' if tiny else ''}"
    )
    print(
        f"distill: teacher {arch['num_hidden_layers']} x {arch['hidden_size']} ({n_teacher / 1e6:.1f}M non-embedding "
        f"params) -> student {args.student_layers} layers ({n_student / 1e6:.1f}M), ce + kd + procrustes on "
        f"{args.student_layers} token-level pairs; batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.steps} steps x {args.repeats} runs"
    )
    print(f"  samples/s            : median {samples_s:.1f}  (each: {', '.join(f'{x:.1f}' for x in rates)})")
    print(f"  tokens/s             : {tokens_s:,.0f}")
    print(
        f"  MFU                  : {100 * mfu:.2f}%  = (6 * {n_student:,} + 2 * {n_teacher:,}) FLOP/token * tokens/s "
        f"/ {args.peak_tflops:g} TFLOP/s"
    )
    print(
        f"probe: {result.teacher_layers + 1} x {result.student_layers + 1} = {pairs} pairs, token rows, "
        f"{result.samples} examples, {result.feature_rows:,} rows"
    )
    print(
        f"  rows/s               : {figures['probe_rows_per_s']:,.0f}  (wall {probe_wall:.2f}s, model loading included)"
    )
    return figures


if __name__ == "__main__":
    main()
