"""Geometry-loss overhead on a decoder student, measured side by side (prints figures; asserts nothing).

Step time of ce + kd + procrustes (token rows on the response tokens, 3 layer pairs) over ce + kd
alone, for ``task = "causal-lm"`` through ``kdgeo.distillation.run_distill``: same models, same
instruction data, same batches. The models are built in-process, offline: a byte-level BPE
tokenizer trained on the demo glosses, a 6-layer OPT teacher (width 256, random weights: the
cost of a step does not depend on them) and a 3-layer student copied from its layers [1, 3, 5]
(``student.init = "teacher-layers"``). Batch 8, max_length 128; the responses are several demo
glosses long, so most examples fill the 128 tokens and a batch has several hundred response-token
rows per layer pair.

Runs alternate (A B, B A, A B, ...) so drift on a shared machine hits both; medians are reported.
Times are the training steps alone (summary.json's ``train_seconds``), not loading or evaluation.

    python tests/benchmarks/bench_distill_lm.py [--quick] [--steps N] [--repeats R]
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
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from kdgeo.distillation import run_distill
from kdgeo.models import quiet_transformers
from kdgeo.spec import DEFAULT_CONTEXT_TEMPLATE, DEFAULT_TEMPLATE, validate_spec

LAYERS, WIDTH, STUDENT_LAYERS = 6, 256, 3
MAX_LENGTH = 128


def build_teacher(root: Path, vocab_size: int = 2000) -> tuple[Path, int]:
    """An OPT-style tokenizer (``</s>`` is BOS and EOS, ``<pad>`` pads) and a 6-layer OPT teacher
    saved together under ``root/teacher``; returns (directory, vocabulary size)."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    from kdgeo import demo

    texts = [r["text"] for r in demo.load_split("train")] + [DEFAULT_TEMPLATE, DEFAULT_CONTEXT_TEMPLATE]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=["<pad>", "</s>", "<unk>"])
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", bpe.token_to_id("</s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(
        vocab_size=len(tok), hidden_size=WIDTH, num_hidden_layers=LAYERS, ffn_dim=4 * WIDTH, num_attention_heads=4,
        max_position_embeddings=2 * MAX_LENGTH, word_embed_proj_dim=WIDTH, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dropout=0.0, attention_dropout=0.0,
    ))
    out = root / "teacher"
    with quiet_transformers():
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out, len(tok)


def instruction_rows(split: str, n: int) -> list[dict[str, str]]:
    """Instructions from the demo data; each response is 3-5 glosses (so examples reach max_length)."""
    from kdgeo import demo

    rows = demo.load_split(split)
    out = []
    for k in range(n):
        kind = rows[k % len(rows)]["label_name"].split(".")[1]
        glosses = [rows[(k + j) % len(rows)]["text"] for j in range(3 + k % 3)]
        out.append({
            "instruction": f"Describe a few things of the kind {kind}.",
            "context": f"Start from WordNet synset {rows[k % len(rows)]['synset']}." if k % 3 == 0 else "",
            "response": " ".join(glosses),
        })
    return out


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec_for(teacher: Path, train: Path, evals: Path, out: Path, losses: list[dict], steps: int, batch: int, name: str):
    return validate_spec({
        "name": name,
        "task": "causal-lm",
        "teacher": {"model": str(teacher)},
        "student": {"init": "teacher-layers", "num_layers": STUDENT_LAYERS},
        "data": {
            "dataset": str(train), "eval_dataset": str(evals), "prompt_column": "instruction", "response_column": "response",
            "context_column": "context", "max_length": MAX_LENGTH, "max_eval_samples": 8,
        },
        "features": {"rows": "tokens", "pairs": "uniform"},
        "losses": losses,
        "train": {"max_steps": steps, "batch_size": batch, "log_every": steps},
        "monitor": {"every": 0, "samples": 8},
        "generate": {"max_new_tokens": 4, "batch_size": 4, "max_samples": 4},
        "output": {"dir": str(out), "overwrite": True, "save_student": False, "teacher_cache": str(out / "cache")},
    })


def step_time(teacher: Path, train: Path, evals: Path, out: Path, losses: list[dict], steps: int, batch: int, name: str) -> tuple[float, float, dict]:
    """(seconds per optimizer step, samples/s, summary) of the training steps alone, as summary.json reports them."""
    result = run_distill(spec_for(teacher, train, evals, out, losses, steps, batch, name))
    s = result.summary
    return s["train_seconds"] / s["steps"], s["samples_per_s"], s


def response_rows_per_batch(teacher: Path, rows: list[dict[str, str]], batch: int) -> float:
    """Mean response tokens per batch of ``batch`` examples (the rows of each feature matrix), as kdgeo
    formats, tokenizes and truncates them (max_prompt_length: the default, half of max_length)."""
    import datasets

    from kdgeo import lm_data
    from kdgeo.models import ModelRef, load_tokenizer

    tok = load_tokenizer(ModelRef(str(teacher)))
    fmt = lm_data.PromptFormat(DEFAULT_TEMPLATE, DEFAULT_CONTEXT_TEMPLATE, False)
    examples = lm_data.read_examples(datasets.Dataset.from_list(rows), "instruction", "response", "context", "bench")
    split, _ = lm_data.build_split(examples, fmt, {"teacher": tok}, MAX_LENGTH, MAX_LENGTH // 2, "truncate", "bench")
    return batch * statistics.mean(len(r) for r in lm_data.response_ids(split.encodings["teacher"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20; --quick 6)")
    parser.add_argument("--repeats", type=int, default=None, help="A/B pairs of runs (default 5; --quick 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    steps = args.steps or (6 if args.quick else 20)
    repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = [{"kind": "ce"}, {"kind": "kd", "temperature": 1.0}]
    geo = base + [{"kind": "procrustes"}]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, vocab = build_teacher(root)
        train_rows = instruction_rows("train", max(64, steps * args.batch_size))
        train = write_jsonl(root / "train.jsonl", train_rows)
        evals = write_jsonl(root / "eval.jsonl", instruction_rows("validation", 8))
        runs = root / "runs"
        warm = step_time(teacher, train, evals, runs, geo, 2, args.batch_size, "warmup")[2]  # warm caches and allocator
        t_base, t_geo, r_base, r_geo, ratios = [], [], [], [], []
        for r in range(repeats):
            order = [("base", base), ("geo", geo)] if r % 2 == 0 else [("geo", geo), ("base", base)]
            got = {}
            for label, losses in order:
                got[label] = step_time(teacher, train, evals, runs, losses, steps, args.batch_size, f"{label}{r}")
            t_base.append(got["base"][0])
            t_geo.append(got["geo"][0])
            r_base.append(got["base"][1])
            r_geo.append(got["geo"][1])
            ratios.append(got["geo"][0] / got["base"][0])
        rows = response_rows_per_batch(teacher, train_rows[: steps * args.batch_size], args.batch_size)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}, max_length {MAX_LENGTH}, "
              f"{steps} steps x {repeats} A/B repeats, load average {load}")
        pairs = ", ".join(f"{s}->{t}" for s, t in warm["pairs"])
        print(f"teacher: OPT {LAYERS} layers, width {WIDTH}, vocab {vocab} (random weights); student: its layers "
              f"{warm['copied_teacher_layers']}; pairs {pairs}; token rows: ~{rows:.0f} response tokens per batch")
        print(f"ms/step ce+kd            : median {1e3 * statistics.median(t_base):.1f}  (each: {', '.join(f'{1e3 * x:.1f}' for x in t_base)})")
        print(f"ms/step ce+kd+procrustes : median {1e3 * statistics.median(t_geo):.1f}  (each: {', '.join(f'{1e3 * x:.1f}' for x in t_geo)})")
        print(f"step time ratio geo/base : median {statistics.median(ratios):.3f}  (each: {', '.join(f'{x:.3f}' for x in ratios)})")
        print(f"samples/s ce+kd          : median {statistics.median(r_base):.1f}")
        print(f"samples/s ce+kd+procr.   : median {statistics.median(r_geo):.1f}")


if __name__ == "__main__":
    sys.exit(main())
