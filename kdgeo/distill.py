"""`kdgeo distill`: train a student from a teacher per a run spec, top to bottom.

The run, in order:

1. pre-flight: device, output directory, configs and tokenizers, data, labels, layer pairs.
   Everything cheap that can fail does so here, before any weights are read.
2. teacher: loaded with a classification head for the run's labels; fine-tuned first (and
   cached) when it has none and ``[teacher.finetune]`` says how. For ``task = "causal-lm"`` the
   teacher is a causal LM (fine-tuned on the responses when ``[teacher.finetune]`` is given),
   the losses see response tokens only, and evaluations are perplexity and ROUGE-L.
3. student: pretrained, copied teacher layers, or fresh from the teacher's config.
4. the objective (a weighted sum of loss terms) and AdamW with warm-up and decay.
5. the training loop: gradient accumulation, autocast, clipping; every ``log_every`` steps a
   loss line, every ``monitor.every`` steps the geometry of every layer pair on a fixed
   monitor batch, evaluations per epoch (or every ``eval_every`` steps).
6. the run directory: resolved spec, metrics.jsonl, summary.json, student/.

Progress goes out through a callback of event dicts; :mod:`kdgeo.report` draws them.
"""

from __future__ import annotations

import math
import platform
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from kdgeo import __version__, checkpoint, distributed, geometry, lm_data, rundir
from kdgeo import data as data_mod
from kdgeo.errors import DataError, KdgeoError, LayerMapError, ModelLoadError, OutputError, RunInterrupted, TokenizerMismatchError
from kdgeo.evaluate import score
from kdgeo.features import check_tokenizers_agree, resolve_layer_pairs, select_rows, suggest_layer_map
from kdgeo.losses import EQUAL_WIDTH_KINDS, FEATURE_KINDS, LossTerm, Objective, at_least_float32, response_predictions
from kdgeo.models import (
    SAVE_ERRORS,
    ModelRef,
    default_layer_choice,
    hidden_width,
    hidden_widths,
    load_classifier,
    load_config,
    load_tokenizer,
    align_pad_token,
    fingerprint_model,
    check_cls_rows,
    check_decoder,
    check_hidden_widths,
    check_max_length,
    load_causal_lm,
    num_layers,
    save_model_dir,
    student_config,
    student_from_config,
    student_from_teacher_layers,
)
from kdgeo.optim import build_optimizer, build_scheduler, param_groups
from kdgeo.probe import autocast_dtype, weight_dtype
from kdgeo.spec import GEOMETRY_LOSSES, MIN_GEOMETRY_ROWS, RunSpec, SweepRun, resume_differences
from kdgeo.evaluate_lm import split_scores
from kdgeo.generation import GenerationArgs
from kdgeo.teacher_outputs import OutputPlan, TeacherOutputs, encoding_digest
from kdgeo.teacher_outputs import ensure as ensure_teacher_outputs
from kdgeo.teacher import FinetuneArgs, cache_key, cached_teacher, finetune, save_to_cache

Progress = Callable[[dict[str, Any]], None]


@dataclass
class DistillResult:
    run_dir: Path
    summary: dict[str, Any]


def _versions() -> dict[str, str]:
    import transformers

    return {"kdgeo": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def _check_resumable(run_dir: Path, spec: RunSpec) -> Path:
    """A run can be resumed when it exists, has not finished, and its spec changes nothing that matters."""
    if not (run_dir / rundir.SPEC_JSON).exists():
        raise KdgeoError(
            f"nothing to resume: {run_dir} is not a kdgeo run directory (no {rundir.SPEC_JSON}). Run without --resume to start it."
        )
    if (run_dir / rundir.SUMMARY).exists():
        raise KdgeoError(f"{run_dir} has already finished (summary.json exists); there is nothing to resume.")
    marker = rundir.read_json(run_dir / rundir.RUN_MARKER) if (run_dir / rundir.RUN_MARKER).exists() else {}
    if marker.get("format_version") != rundir.FORMAT_VERSION:
        raise KdgeoError(
            f"{run_dir} was written by kdgeo {marker.get('kdgeo', 'of an unknown version')} (run format "
            f"{marker.get('format_version', 'unknown')}); this kdgeo ({__version__}) writes format {rundir.FORMAT_VERSION} and "
            "cannot resume it. Start a new run."
        )
    saved = rundir.read_json(run_dir / rundir.SPEC_JSON)
    current = spec.model_dump(mode="json", exclude_none=True)
    diffs = resume_differences(saved, current)
    if diffs:
        lines = "; ".join(f"{k}: run has {a!r}, spec now has {b!r}" for k, a, b in diffs[:12])
        raise KdgeoError(
            f"cannot resume {run_dir}: the spec differs from the run's in fields that change the results ({lines}). "
            "Undo those changes (or pass the run directory itself as SPEC), or start a new run under another output.name."
        )
    return run_dir


def _check_label_order(config: Any, names: list[str], teacher: str) -> None:
    """A trained teacher whose own class names are the data's names in another order would be
    distilled with every label swapped: refuse it (default LABEL_i names say nothing, so pass)."""
    own = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if len(own) != len(names) or all(v == f"LABEL_{k}" for k, v in own.items()):
        return
    ordered = [own[i].lower() for i in range(len(names))]
    wanted = [n.lower() for n in names]
    if ordered != wanted and sorted(ordered) == sorted(wanted):
        raise ModelLoadError(
            f"teacher.model = '{teacher}' numbers its classes {ordered}, but the data numbers them {wanted}: the "
            "teacher's predictions would be read under the wrong labels. Use data whose label ids follow the "
            "teacher's order, or fine-tune the teacher on this data ([teacher.finetune] with force = true)."
        )


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor], hidden: bool, amp: torch.dtype | None, device: torch.device) -> Any:
    with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return model(**inputs, output_hidden_states=hidden)


def _student_plan(spec: RunSpec, t_cfg: Any) -> tuple[int, list[int], Any, list[int] | None, ModelRef | None]:
    """What the student will be, known before any weights load:
    (layers, the width of each hidden-state index, its config, the teacher layers it copies or None,
    its own reference for init = "pretrained" or None, in which case it shares the teacher's tokenizer)."""
    t_layers = num_layers(t_cfg)
    s = spec.student
    if s.init == "pretrained":
        s_ref = ModelRef(s.model or "", s.revision, s.trust_remote_code)
        s_cfg = load_config(s_ref)
        return num_layers(s_cfg), hidden_widths(s_cfg), s_cfg, None, s_ref
    if s.init == "teacher-layers":
        if s.layers is not None:
            bad = [i for i in s.layers if i >= t_layers]
            if bad:
                raise LayerMapError(
                    f"student.layers = {s.layers} names teacher layer(s) {bad}, but the teacher has {t_layers} layers "
                    f"(0-based indices 0..{t_layers - 1}); pick indices in that range."
                )
            chosen = list(s.layers)
        else:
            chosen = default_layer_choice(t_layers, s.num_layers or 2)
        return len(chosen), hidden_widths(t_cfg, layers=len(chosen)), t_cfg, chosen, None
    overrides = {k: v for k, v in (s.arch.model_dump() if s.arch else {}).items() if v is not None}
    width = overrides.get("hidden_size", hidden_width(t_cfg))
    heads = overrides.get("num_attention_heads", getattr(t_cfg, "num_attention_heads", 1))
    if width % heads:
        raise KdgeoError(
            f"student.arch: hidden_size {width} is not divisible by num_attention_heads {heads} (taken from "
            f"{'the teacher' if 'num_attention_heads' not in overrides else 'student.arch'}); set student.arch.num_attention_heads to a divisor."
        )
    # An OPT student keeps the teacher's projected last entry unless student.arch sets hidden_size.
    widths = hidden_widths(student_config(t_cfg, overrides))
    return len(widths) - 1, widths, t_cfg, None, None


def _check_equal_widths(
    kinds: set[str], pairs: Sequence[tuple[int, int]], s_widths: Sequence[int], t_widths: Sequence[int], probe: bool,
) -> None:
    """mse and cosine compare features element by element: each paired student and teacher
    hidden-state index must be equally wide. Widths are per index (an OPT model with
    word_embed_proj_dim != hidden_size has a narrower last entry). With ``probe`` the pairs are the
    candidates: refuse only a student index that no teacher index matches in width."""
    names = ", ".join(sorted(kinds & EQUAL_WIDTH_KINDS))
    fix = "Use procrustes, gram, cka or projection, which work across widths"
    if probe:
        lonely = sorted({s for s, _ in pairs} - {s for s, t in pairs if s_widths[s] == t_widths[t]})
        if lonely:
            raise LayerMapError(
                f"losses: {names} compare features element by element and need equal widths, but student layer(s) "
                f"{', '.join(f'{s} ({s_widths[s]} wide)' for s in lonely)} match no teacher layer's width "
                f"(teacher widths by hidden-state index: {list(t_widths)}). {fix}."
            )
        return
    bad = [(s, t) for s, t in pairs if s_widths[s] != t_widths[t]]
    if bad:
        if len(set(s_widths)) == 1 and len(set(t_widths)) == 1:
            found = f"the student is {s_widths[0]} wide and the teacher {t_widths[0]}"
        else:
            listed = ", ".join(f"{s}->{t} ({s_widths[s]} vs {t_widths[t]} wide)" for s, t in bad)
            found = f"layer pair(s) {listed} differ"
        raise LayerMapError(
            f"losses: {names} compare features element by element and need equal widths, but {found}. {fix}, "
            "or pair layers of equal width in features.pairs."
        )


def _load_datasets(spec: RunSpec, columns: dict[str, str | None]) -> tuple[Any, Any, str, str]:
    """The training and evaluation datasets (capped, columns checked) and how to name each in errors."""
    d = spec.data
    train_ds = data_mod.load_split(d.dataset, d.config, d.train_split, where="data.dataset")
    if d.eval_dataset is not None:
        eval_ds = data_mod.load_split(d.eval_dataset, None, d.eval_split, where="data.eval_dataset")
        eval_where = f"data.eval_dataset ({d.eval_dataset})"
    elif data_mod.is_local_file(d.dataset):
        raise DataError(
            f"data.dataset = '{d.dataset}' is a single file, so it has no '{d.eval_split}' split; set data.eval_dataset "
            "to a separate evaluation file."
        )
    else:
        eval_ds = data_mod.load_split(d.dataset, d.config, d.eval_split, where="data.dataset")
        eval_where = f"data.dataset ({d.dataset}, split {d.eval_split})"
    train_where = f"data.dataset ({d.dataset}, split {d.train_split})"
    data_mod.check_columns(train_ds, columns, train_where)
    data_mod.check_columns(eval_ds, columns, eval_where)
    if d.max_train_samples is not None:
        train_ds = train_ds.select(range(min(d.max_train_samples, len(train_ds))))
    if d.max_eval_samples is not None:
        eval_ds = eval_ds.select(range(min(d.max_eval_samples, len(eval_ds))))
    return train_ds, eval_ds, train_where, eval_where


def _load_texts(spec: RunSpec) -> tuple[data_mod.TextSplit, data_mod.TextSplit, data_mod.LabelInfo]:
    d = spec.data
    columns = {"text_column": d.text_column, "text_pair_column": d.text_pair_column, "label_column": d.label_column}
    train_ds, eval_ds, train_where, eval_where = _load_datasets(spec, columns)
    info = data_mod.infer_labels(train_ds, d.label_column, train_where)
    if info.num_labels < 2:
        raise DataError(f"{train_where}: column '{d.label_column}' has a single class; classification needs at least two.")
    splits = []
    for ds, where in ((train_ds, train_where), (eval_ds, eval_where)):
        labels = data_mod.labels_as_ids(ds, d.label_column, info, where)
        texts = data_mod.texts_of(ds, d.text_column, where)
        splits.append(data_mod.TextSplit(texts=texts, labels=labels))
        if d.text_pair_column:
            splits[-1].pair_texts = data_mod.texts_of(ds, d.text_pair_column, where)
    return splits[0], splits[1], info


def _load_lm_texts(spec: RunSpec, t_tok: Any, s_tok: Any, emit: Progress) -> tuple[data_mod.TextSplit, data_mod.TextSplit]:
    """Causal-LM splits: prompts formatted by the template, tokenized with both tokenizers."""
    d = spec.data
    columns = {"prompt_column": d.prompt_column, "response_column": d.response_column, "context_column": d.context_column}
    train_ds, eval_ds, train_where, eval_where = _load_datasets(spec, columns)
    fmt = lm_data.PromptFormat(d.template, d.context_template, d.chat_template)
    max_prompt = d.max_prompt_length or d.max_length // 2
    splits = []
    for ds, where in ((train_ds, train_where), (eval_ds, eval_where)):
        examples = lm_data.read_examples(ds, d.prompt_column, d.response_column, d.context_column, where)
        split, notes = lm_data.build_split(
            examples, fmt, {"student": s_tok, "teacher": t_tok}, d.max_length, max_prompt, d.long_examples, where
        )
        for note in notes:
            emit({"event": "stage", "message": note})
        splits.append(split)
    return splits[0], splits[1]


def _check_responses_agree(train: data_mod.TextSplit, evals: data_mod.TextSplit, spec: RunSpec) -> None:
    for split, which in ((train, "training"), (evals, "evaluation")):
        t_resp = lm_data.response_ids(split.encodings["teacher"])
        s_resp = lm_data.response_ids(split.encodings["student"])
        for k, (a, b) in enumerate(zip(t_resp, s_resp)):
            if a != b:
                short = split.responses[k] if split.responses else ""
                short = short if len(short) <= 60 else short[:57] + "..."
                uses = [n for n, on in (("features.rows = \"tokens\"", spec.features.rows == "tokens"), ("kd", any(l.kind == "kd" for l in spec.losses))) if on]
                raise TokenizerMismatchError(
                    f"{' and '.join(uses)} pair the teacher's and the student's response tokens one by one, but their tokenizers "
                    f"split {which} response {k} ({short!r}) into {len(a)} and {len(b)} tokens (end-of-sequence included). "
                    'Use features.rows = "mean" and geometry losses without kd, or a student with the teacher\'s tokenizer.'
                )


def _check_vocabularies(t_tok: Any, s_tok: Any, t_cfg: Any, s_cfg: Any, spec: RunSpec) -> int | None:
    """Token-level KD compares distributions over the same vocabulary: refuse a pair that has
    none in common. Returns the number of logits to compare (models may pad their output
    layers beyond the tokenizer differently), or None when no loss compares logits."""
    if not any(loss.kind == "kd" for loss in spec.losses):
        return None
    if s_tok is not t_tok and t_tok.get_vocab() != s_tok.get_vocab():
        t_vocab, s_vocab = t_tok.get_vocab(), s_tok.get_vocab()
        differ = sorted(set(t_vocab.items()) ^ set(s_vocab.items()))
        example = ", ".join(repr(tok) for tok, _ in differ[:3])
        raise TokenizerMismatchError(
            f"losses: kd compares the teacher's and the student's next-token distributions, which needs one shared "
            f"vocabulary, but teacher.model = '{spec.teacher.model}' has {len(t_vocab)} tokens and student.model = "
            f"'{spec.student.model}' has {len(s_vocab)} ({len(differ)} entries differ, e.g. {example}). What is possible: "
            'drop kd and distill with geometry losses on pooled features (features.rows = "mean"), which need no shared '
            "vocabulary, or pick a student from the teacher's family (same tokenizer)."
        )
    t_out = getattr(t_cfg, "vocab_size", None)
    s_out = getattr(s_cfg, "vocab_size", None) if s_cfg is not None else t_out
    if isinstance(t_out, int) and isinstance(s_out, int) and t_out != s_out:
        return len(t_tok) if min(t_out, s_out) >= len(t_tok) else min(t_out, s_out)
    return None


def _encode(split: data_mod.TextSplit, tokenizers: dict[str, Any], max_length: int) -> None:
    pairs = split.pair_texts
    shared: dict[int, data_mod.Encoded] = {}
    for role, tok in tokenizers.items():
        if id(tok) not in shared:
            shared[id(tok)] = data_mod.encode(tok, split.texts, pairs, max_length)
        split.encodings[role] = shared[id(tok)]


def _write_run_files(run_dir: Path, spec: RunSpec) -> None:
    """A new run's directory: the format marker and the resolved spec (JSON and TOML)."""
    import tomli_w

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the run directory {run_dir}: {err.strerror or err}") from None
    if spec.output.overwrite:
        for name in (rundir.METRICS, rundir.SUMMARY):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / rundir.STUDENT, ignore_errors=True)
        for _, old in checkpoint.list_checkpoints(run_dir):
            shutil.rmtree(old, ignore_errors=True)
    resolved = spec.model_dump(mode="json", exclude_none=True)
    rundir.write_json(run_dir / rundir.RUN_MARKER, {"format_version": rundir.FORMAT_VERSION, "kdgeo": __version__})
    rundir.write_json(run_dir / rundir.SPEC_JSON, resolved)
    rundir.write_text_atomic(run_dir / rundir.SPEC_TOML, tomli_w.dumps(resolved))


def _epoch_batches(
    n: int, global_batch: int, world: int, seed: int, epoch: int, lengths: list[int] | None,
    min_rows: int = 1, gathered: bool = False,
) -> list[list[int]]:
    """One epoch's global micro-batches (the same on every rank). Under torchrun a last batch
    with fewer examples than processes is left out, since every process needs at least one.

    ``min_rows``: the fewest rows a geometry statistic may see (3 with pooled rows and a
    procrustes/gram/cka loss, see ``RunSpec._rows_per_step``). A batch that would give one
    fewer -- each process's share (``distributed.shard``: at least ``len // world``), or the
    whole batch when features are ``gathered`` -- is left out too. Only the one short batch of
    an epoch (n % global_batch examples) can be; the reshuffled epochs still train on them.
    """
    micro = data_mod.batch_indices(n, global_batch, shuffle=True, seed=seed, epoch=epoch, lengths=lengths)
    return [b for b in micro if len(b) >= world and (len(b) if gathered else len(b) // world) >= min_rows]


def _clip_sharded(groups: list[list[torch.Tensor]], max_norm: float) -> torch.Tensor:
    """Global-norm clipping over FSDP-sharded parameters (DTensors) and plain ones (the
    projections): one norm per group, made whole, then combined, since torch cannot stack the
    two kinds of tensor into one norm."""
    norms = []
    for params in groups:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            n = torch.nn.utils.get_total_norm(grads)
            norms.append((n.full_tensor() if hasattr(n, "full_tensor") else n).float().cpu())
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coef = max_norm / (float(total) + 1e-6)  # torch's clip_grad_norm_ formula, as a Python float:
    if coef < 1.0:  # a float scales DTensor and plain gradients alike
        for params in groups:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return total


def _feature_rows(hidden: tuple[torch.Tensor, ...], mask: torch.Tensor, indices: list[int], rows: str) -> list[torch.Tensor]:
    return [select_rows(hidden[i], mask, rows) for i in indices]  # each (n, d)


def chance_procrustes(n: int, d_t: int, d_s: int) -> float:
    """Procrustes D^2 of independent Gaussian features of shape (n, d_t) and (n, d_s), one draw.

    Unrelated features sit at D^2 ~ 2 only when n is far above both widths; with few rows they
    look aligned by chance (n = 32, widths 768 and 384: D^2 ~ 0.03). A private generator keeps
    the run's own random stream untouched.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_t, generator=gen, dtype=torch.float64)  # (n, d_t)
    y = torch.randn(n, d_s, generator=gen, dtype=torch.float64)  # (n, d_s)
    return float(geometry.procrustes_distance(x, y))


def _few_rows_warning(
    spec: RunSpec, train: data_mod.TextSplit, pairs: list[tuple[int, int]], t_widths: list[int], s_widths: list[int], world: int
) -> str | None:
    """A warning when a geometry loss sees fewer rows per micro-batch than its widest pair is wide.

    Rows per term: the per-process micro-batch for pooled rows (all processes' with
    train.gather_features), or its expected number of real (response) tokens for token rows.
    """
    batch = spec.train.batch_size * (world if spec.train.gather_features else 1)
    if spec.features.rows == "tokens":
        enc = train.encodings["student"]
        starts = enc.response_start or [0] * len(enc.input_ids)
        per_example = sum(len(ids) - b for ids, b in zip(enc.input_ids, starts)) / max(len(enc.input_ids), 1)
        n, how = int(batch * per_example), f"about {int(batch * per_example)} token rows ({batch} examples x {per_example:.1f} tokens)"
    else:
        n, how = batch, f"{batch} pooled rows (one per example)"
    widest = max(pairs, key=lambda p: max(t_widths[p[1]], s_widths[p[0]]))
    d_t, d_s = t_widths[widest[1]], s_widths[widest[0]]
    if n >= max(d_t, d_s) or n < 3:
        return None
    chance = chance_procrustes(n, d_t, d_s)
    return (
        f"each geometry loss term sees {how} per micro-batch, fewer than the widths it compares ({d_t} and {d_s} for pair "
        f"{widest[0]}-{widest[1]}). With so few rows Procrustes, Gram and CKA values are biased toward alignment: independent "
        f"random features of these shapes already give D^2 = {chance:.3f} (unrelated = 2). Raise train.batch_size"
        + ('; use features.rows = "tokens"' if spec.features.rows != "tokens" else "")
        + ("; or set train.gather_features = true" if world > 1 and not spec.train.gather_features else "") + "."
    )


def run_distill(spec: RunSpec, progress: Progress | None = None, resume: bool = False) -> DistillResult:
    """Train the student per ``spec``; with ``resume``, continue the run directory's newest checkpoint."""
    wall_start = time.perf_counter()
    train_cfg = spec.train

    # ---- 1. pre-flight ----------------------------------------------------------------------
    # Under torchrun every rank runs this function; rank 0 alone writes files and reports.
    dist, device = distributed.setup(train_cfg.device, "train.device", timedelta(minutes=train_cfg.timeout_minutes))
    emit = (progress or (lambda event: None)) if dist.is_main else (lambda event: None)
    world = dist.world_size
    fsdp = dist.enabled and train_cfg.distributed == "fsdp"
    if train_cfg.precision == "fp16" and device.type != "cuda":
        raise KdgeoError('train.precision = "fp16" needs a CUDA device; use "bf16" or "fp32" on CPU (or "auto").')
    amp = autocast_dtype(train_cfg.precision, device)
    # fp64: teacher (and its fine-tune), student and projection maps hold float64 weights, no autocast.
    param_dtype = weight_dtype(train_cfg.precision)
    precision_name = "fp64" if param_dtype is not None else (str(amp).replace("torch.", "") if amp else "fp32")
    if fsdp and amp == torch.float16 and any(loss.kind == "projection" for loss in spec.losses):
        # The fp16 gradient scaler unscales all gradients in one foreach call, which cannot mix
        # the student's sharded (DTensor) gradients with the projection maps' plain ones.
        raise KdgeoError(
            'train.distributed = "fsdp" with fp16 autocast and a projection loss is not supported: use train.precision = '
            '"bf16" (no gradient scaler), train.distributed = "ddp", or a loss without learned maps (procrustes, gram, cka).'
        )
    run_name = spec.output.name or spec.name
    parent = spec.output.dir
    if resume:
        run_dir = _check_resumable(Path(parent).expanduser() / run_name, spec)
    else:
        run_dir = distributed.on_main(lambda: rundir.prepare_run_dir(parent, run_name, spec.output.overwrite), dist)

    # Found now, not after a teacher fine-tune or a cache build that took an hour.
    if spec.teacher.finetune is not None:
        rundir.check_writable_dir(spec.output.teacher_cache, "output.teacher_cache", "the fine-tuned teacher is cached there")
    if spec.output.teacher_outputs:
        rundir.check_writable_dir(
            spec.output.teacher_outputs_dir, "output.teacher_outputs_dir", "output.teacher_outputs = true writes the teacher's outputs there"
        )
    teacher_ref = ModelRef(spec.teacher.model, spec.teacher.revision, spec.teacher.trust_remote_code)
    is_lm = spec.task == "causal-lm"
    emit({"event": "stage", "message": f"pre-flight: teacher {spec.teacher.model}, data {spec.data.dataset}"})
    t_cfg = load_config(teacher_ref)
    if is_lm:
        check_decoder(t_cfg, spec.teacher.model, "teacher.model")
    t_layers, t_widths = num_layers(t_cfg), hidden_widths(t_cfg)  # t_widths[i]: width of hidden_states[i]
    shared = None if spec.student.init == "pretrained" else f'The student (student.init = "{spec.student.init}") is built from the teacher and'
    t_tok = load_tokenizer(teacher_ref, shared_with=shared)
    s_layers, s_widths, s_cfg, copied_layers, s_ref = _student_plan(spec, t_cfg)
    s_tok = load_tokenizer(s_ref) if s_ref is not None else t_tok
    if is_lm and s_ref is not None:
        check_decoder(s_cfg, spec.student.model or "", "student.model")
    if spec.features.rows == "cls":  # a causal-lm spec already refuses it; a decoder classifier reaches here
        hint = 'Use features.rows = "mean" (the mean over tokens) or "tokens".'
        check_cls_rows(t_cfg, spec.teacher.model, "teacher.model", 'features.rows = "cls"', hint)
        if s_ref is not None:
            check_cls_rows(s_cfg, spec.student.model or "", "student.model", 'features.rows = "cls"', hint)

    check_max_length(t_cfg, spec.data.max_length, "data.max_length", f"the teacher {spec.teacher.model}")
    if s_ref is not None:
        check_max_length(s_cfg, spec.data.max_length, "data.max_length", f"the student {spec.student.model}")
    kinds = {loss.kind for loss in spec.losses}
    feature_kinds = kinds & FEATURE_KINDS
    logit_width = _check_vocabularies(t_tok, s_tok, t_cfg, s_cfg if s_ref is not None else None, spec) if is_lm else None
    label_info: data_mod.LabelInfo | None = None
    if is_lm:
        train, evals = _load_lm_texts(spec, t_tok, s_tok, emit)
        num_labels = 0
        gen = spec.generate
        for cfg, who in ((t_cfg, f"the teacher {spec.teacher.model}"), (s_cfg, f"the student {spec.student.model or ''}".rstrip())):
            limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
            longest = max(len(p) for p in lm_data.prompt_ids(evals.encodings["student" if cfg is s_cfg else "teacher"]))
            if isinstance(limit, int) and longest + gen.max_new_tokens > limit:
                raise KdgeoError(
                    f"generate.max_new_tokens = {gen.max_new_tokens}: an evaluation prompt of {longest} tokens plus that many new "
                    f"tokens exceeds the {limit} positions {who} accepts; lower generate.max_new_tokens or data.max_prompt_length."
                )
    else:
        train, evals, label_info = _load_texts(spec)
        num_labels = label_info.num_labels
        _encode(train, {"student": s_tok, "teacher": t_tok}, spec.data.max_length)
        _encode(evals, {"student": s_tok, "teacher": t_tok}, spec.data.max_length)
    if is_lm and s_tok is not t_tok and (spec.features.rows == "tokens" or "kd" in kinds):
        # Token rows and token-level KD pair the k-th response token of teacher and student: their
        # responses must be the same tokens (prompts may differ, e.g. by a BOS token).
        _check_responses_agree(train, evals, spec)
    elif spec.features.rows == "tokens" and s_tok is not t_tok:
        # Token rows pair the k-th teacher token with the k-th student token (losses and monitor alike).
        check_tokenizers_agree(
            t_tok, s_tok, train.texts[:64],
            hint='Set features.rows = "mean" (or "cls") to compare pooled features, or use a student with the teacher\'s tokenizer.',
        )

    if spec.features.rows != "tokens" and len(evals) < MIN_GEOMETRY_ROWS:
        # The spec checks monitor.samples; a smaller evaluation split caps the monitor batch below it.
        raise DataError(
            f"the evaluation split has {len(evals)} example(s): with features.rows = "
            f'"{spec.features.rows}" the monitor batch gets one row per example and its geometry needs at least '
            f"{MIN_GEOMETRY_ROWS}; use a larger evaluation split (data.eval_split, data.eval_dataset, "
            "data.max_eval_samples)."
        )
    probe_pairs = spec.features.pairs == "probe"
    pairs = [] if probe_pairs else resolve_layer_pairs(spec.features.pairs, s_layers, t_layers)
    if kinds & EQUAL_WIDTH_KINDS:
        # With probe pairs every (student, teacher) index pair is a candidate until the probe picks.
        candidates = [(s, t) for s in range(1, s_layers + 1) for t in range(1, t_layers + 1)] if probe_pairs else pairs
        _check_equal_widths(kinds, candidates, s_widths, t_widths, probe_pairs)

    # ---- 2. teacher -------------------------------------------------------------------------
    emit({"event": "stage", "message": "loading the teacher"})
    ft = spec.teacher.finetune
    # A head the checkpoint lacks is initialised from the global RNG: seed it, or runs differ.
    torch.manual_seed(ft.seed if ft is not None else spec.seed)
    if is_lm:
        teacher = load_causal_lm(teacher_ref)
        needs_finetune = ft is not None  # a causal LM always has its head: the table itself asks for SFT
    else:
        assert label_info is not None
        loaded = load_classifier(teacher_ref, num_labels, label_info.names)
        if loaded.has_trained_head:
            _check_label_order(t_cfg, label_info.names, spec.teacher.model)
        teacher = loaded.model
        needs_finetune = not loaded.has_trained_head or (ft is not None and ft.force)
        if needs_finetune and ft is None:
            raise ModelLoadError(
                f"teacher.model = '{spec.teacher.model}' has no trained classification head for these {num_labels} labels "
                f"(freshly initialised: {', '.join(loaded.new_keys[:3])}{', ...' if len(loaded.new_keys) > 3 else ''}). "
                "Add a [teacher.finetune] table to fine-tune it on the task first, or give a teacher fine-tuned for this task."
            )
    # fp64: cast before any fine-tune, which then trains in float64. Weights are drawn (a fresh
    # head, a student from a config) in float32 as in an fp32 run, so both runs start alike.
    teacher.to(dtype=param_dtype)
    teacher_source = spec.teacher.model
    finetune_info: dict[str, Any] | None = None
    if needs_finetune:
        assert ft is not None
        ft_args = FinetuneArgs(ft.epochs, ft.lr, ft.batch_size, ft.weight_decay, ft.warmup_ratio, ft.max_grad_norm, ft.seed)
        d = spec.data
        if is_lm:
            data_key = {
                "task": "causal-lm", "dataset": d.dataset, "config": d.config, "split": d.train_split, "prompt": d.prompt_column,
                "response": d.response_column, "context": d.context_column, "template": d.template, "context_template": d.context_template,
                "chat_template": d.chat_template, "max_prompt_length": d.max_prompt_length, "long_examples": d.long_examples,
                "max_length": d.max_length, "max_train_samples": d.max_train_samples, "group_by_length": d.group_by_length,
                "examples": encoding_digest(train),  # which examples survive truncation depends on both tokenizers
            }
        else:
            data_key = {
                "dataset": d.dataset, "config": d.config, "split": d.train_split, "text": d.text_column,
                "pair": d.text_pair_column, "label": d.label_column, "max_length": d.max_length, "max_train_samples": d.max_train_samples,
                "group_by_length": d.group_by_length,
            }
        data_key["fingerprint"] = data_mod.fingerprint(d.dataset)
        model_key = f"{spec.teacher.model}|{fingerprint_model(teacher_ref)}"
        names = label_info.names if label_info else []
        key = cache_key(model_key, spec.teacher.revision, data_key, names, ft_args, float64=param_dtype is not None)
        cache_dir = Path(spec.output.teacher_cache).expanduser()

        def finetune_once() -> dict[str, Any] | None:
            """Fine-tune and cache the teacher unless the cache has it; under torchrun rank 0 does
            this alone and the others load the cached result."""
            if cached_teacher(cache_dir, key) is not None:
                return None
            where = " on rank 0" if dist.enabled else ""
            emit({"event": "stage", "message": f"fine-tuning the teacher{where} ({ft.epochs:g} epochs on {len(train)} examples)"})
            stats = finetune(teacher, train, ft_args, device, amp, emit, group_by_length=spec.data.group_by_length, causal_lm=is_lm)
            entry = save_to_cache(teacher, t_tok, cache_dir, key, {"teacher": spec.teacher.model, "key": key, **stats})
            return {"path": str(entry), **stats}

        fresh = distributed.on_main(finetune_once, dist)
        hit = cached_teacher(cache_dir, key)
        if fresh is None or not dist.is_main:
            assert hit is not None
            if fresh is None:
                emit({"event": "stage", "message": f"using the cached fine-tuned teacher {hit}"})
            if is_lm:
                teacher = load_causal_lm(ModelRef(str(hit)))
            else:
                assert label_info is not None
                teacher = load_classifier(ModelRef(str(hit)), num_labels, label_info.names).model
        finetune_info = {"cached": fresh is None, "path": str(hit), "key": key, **(fresh or {})}
        teacher_source = finetune_info["path"]
    align_pad_token(teacher, t_tok)
    teacher.to(device=device, dtype=param_dtype).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    # ---- 3. student -------------------------------------------------------------------------
    torch.manual_seed(spec.seed)
    if spec.student.init == "pretrained":
        assert s_ref is not None
        if is_lm:
            student = load_causal_lm(s_ref)
        else:
            assert label_info is not None
            student = load_classifier(s_ref, num_labels, label_info.names).model
    elif spec.student.init == "teacher-layers":
        assert copied_layers is not None
        student = student_from_teacher_layers(teacher, copied_layers)
        for p in student.parameters():
            p.requires_grad_(True)
    else:
        overrides = {k: v for k, v in (spec.student.arch.model_dump() if spec.student.arch else {}).items() if v is not None}
        student = student_from_config(teacher.config, overrides, num_labels, spec.seed, causal_lm=is_lm)
        if not is_lm:
            student.config.id2label = dict(teacher.config.id2label)
            student.config.label2id = dict(teacher.config.label2id)
    align_pad_token(student, s_tok)
    student.to(device=device, dtype=param_dtype).train()

    # ---- fixed monitor batch and the teacher's side of it (computed once: the teacher is frozen)
    monitor_idx = list(range(min(spec.monitor.samples, len(evals))))
    monitor_batch = data_mod.collate(evals, monitor_idx)
    m_t_in = data_mod.to_device(monitor_batch["teacher"], device)
    m_s_in = data_mod.to_device(monitor_batch["student"], device)
    # Rows come from real tokens; for a causal LM from response tokens only.
    m_t_mask = monitor_batch["response_mask"]["teacher"].to(device) if is_lm else m_t_in["attention_mask"]
    m_s_mask = monitor_batch["response_mask"]["student"].to(device) if is_lm else m_s_in["attention_mask"]
    with torch.no_grad():
        m_t_hidden = _forward(teacher, m_t_in, True, amp, device).hidden_states  # L_t+1 x (B, T, d_t[i])
    check_hidden_widths(m_t_hidden, t_widths, f"the teacher {spec.teacher.model}")

    if probe_pairs:
        with torch.no_grad():
            m_s_hidden = _forward(student, m_s_in, True, amp, device).hidden_states  # L_s+1 x (B, T, d_s[j])
        check_hidden_widths(m_s_hidden, s_widths, "the student")
        acc = geometry.CrossLayerAccumulator(t_widths, s_widths, device=device)
        try:
            acc.update(
                [select_rows(h, m_t_mask, spec.features.rows) for h in m_t_hidden],
                [select_rows(h, m_s_mask, spec.features.rows) for h in m_s_hidden],
            )
        except geometry.NonFiniteFeatures as err:
            raise KdgeoError(
                f'features.pairs = "probe": the {err.side} produced NaN or inf hidden states (index '
                f"{', '.join(map(str, err.layers))}; 0 = embeddings) on the monitor batch, so no layer map can be chosen. "
                'Check its weights; with train.precision "bf16"/"fp16" try "fp32", or give features.pairs explicitly.'
            ) from None
        table = acc.compute("procrustes").cpu()  # (L_t+1, L_s+1)
        if kinds & EQUAL_WIDTH_KINDS:
            # mse/cosine can only pair equally wide indices: the map must not pick the others.
            unequal = torch.tensor([[tw != sw for sw in s_widths] for tw in t_widths])  # (L_t+1, L_s+1)
            table = table.masked_fill(unequal, float("nan"))
        # Rank 0's map for everyone: a near tie must not give processes different pairs.
        pairs = distributed.broadcast_object(suggest_layer_map(table, geometry.METRIC_HIGHER_IS_BETTER["procrustes"]), dist)
        emit({"event": "stage", "message": "layer pairs from probing: " + ", ".join(f"{s}->{t}" for s, t in pairs)})
        if kinds & EQUAL_WIDTH_KINDS:
            _check_equal_widths(kinds, pairs, s_widths, t_widths, probe=False)  # no monotone map of equal widths exists
    s_idx = [s for s, _ in pairs]
    t_idx = [t for _, t in pairs]
    if feature_kinds & GEOMETRY_LOSSES and pairs:
        few = _few_rows_warning(spec, train, pairs, t_widths, s_widths, world)
        if few:
            emit({"event": "warning", "message": few})
    m_t_rows = [at_least_float32(r) for r in _feature_rows(m_t_hidden, m_t_mask, t_idx, spec.features.rows)]
    del m_t_hidden

    # ---- 4. objective and optimiser ---------------------------------------------------------
    terms = [
        LossTerm(
            kind=l.kind, weight=l.weight, temperature=getattr(l, "temperature", 2.0), angular=getattr(l, "form", "squared") == "angular",
            direction=getattr(l, "direction", "forward"), mix=getattr(l, "mix", 0.5),
        )
        for l in spec.losses
    ]
    pair_widths = [(s_widths[s], t_widths[t]) for s, t in pairs] if feature_kinds else []  # (d_s, d_t) per pair
    objective = Objective(terms, pairs if feature_kinds else [], pair_widths).to(device=device, dtype=param_dtype)
    need_hidden = objective.needs_features
    need_teacher = objective.needs_teacher_logits or need_hidden
    model = student  # the user's module; under torchrun `student` becomes its DDP/FSDP wrapper
    if dist.enabled:
        emit({"event": "stage", "message": f"torchrun: {world} processes, {train_cfg.distributed}, backend {dist.backend}"})
        if fsdp:
            teacher = distributed.shard_frozen(teacher, dist)
        # Without a logit loss, the head (and layers above the deepest pair) get no gradient.
        student = distributed.wrap_student(
            student, dist, device, train_cfg.distributed, find_unused_parameters=not (kinds & {"ce", "kd"}),
        )
    # Evaluations and the monitor run on rank 0 only, unless FSDP needs every rank for a forward.
    measure_here = dist.is_main or fsdp
    # Under FSDP the optimizer state is read and written by parameter name across both modules.
    trained = nn.ModuleDict({"student": student, "objective": objective}) if fsdp else None
    groups = param_groups(student.named_parameters(), train_cfg.lr, train_cfg.weight_decay)
    if len(objective.projections):
        groups += param_groups(objective.named_parameters(), train_cfg.projection_lr or train_cfg.lr, train_cfg.weight_decay)
    optimizer = build_optimizer(groups, train_cfg.lr)
    global_batch = train_cfg.batch_size * world  # batch_size is per process
    # Pooled rows are one per example: a geometry loss on a short last batch (1 or 2 rows) would be
    # a constant (n = 1) or zero (n = 2), so such a batch is left out of the epoch.
    pooled_geometry = spec.features.rows != "tokens" and bool(kinds & GEOMETRY_LOSSES)
    batching = {
        "min_rows": MIN_GEOMETRY_ROWS if pooled_geometry else 1, "gathered": dist.enabled and train_cfg.gather_features,
    }
    epoch_batches = _epoch_batches(len(train), global_batch, world, spec.seed, 0, None, **batching)
    micro_per_epoch = len(epoch_batches)
    if micro_per_epoch == 0:
        if pooled_geometry:
            # not `geometry`: that name is the module, which the monitor closure below reads
            geometry_kinds = ", ".join(sorted(kinds & GEOMETRY_LOSSES))
            raise DataError(
                f"{len(train)} training examples give fewer than {MIN_GEOMETRY_ROWS} pooled feature rows per batch "
                f'and process (features.rows = "{spec.features.rows}" with {geometry_kinds}); use more data '
                '(data.max_train_samples), fewer processes, or features.rows = "tokens".'
            )
        raise DataError(
            f"{len(train)} training examples cannot be shared by {world} processes (each needs at least one per batch); "
            "use more data (data.max_train_samples) or fewer processes."
        )
    left_out = len(train) - sum(len(b) for b in epoch_batches)
    if pooled_geometry and left_out:
        emit({"event": "stage", "message": (
            f"{left_out} training example(s) per epoch left out: the last batch would give a geometry loss fewer than "
            f"{MIN_GEOMETRY_ROWS} pooled rows (the reshuffled epochs still use them)"
        )})
    steps_per_epoch = math.ceil(micro_per_epoch / train_cfg.grad_accum)
    total_steps = train_cfg.max_steps or max(1, int(round(train_cfg.epochs * steps_per_epoch)))
    scheduler = build_scheduler(optimizer, total_steps, train_cfg.warmup_ratio, train_cfg.schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    # ---- the teacher's training outputs from the cache (built on first use) -------------------
    touts: TeacherOutputs | None = None
    if spec.output.teacher_outputs and need_teacher:
        d = spec.data
        payload = {
            "format": 1, "task": spec.task, "teacher": spec.teacher.model, "revision": spec.teacher.revision,
            "teacher_files": fingerprint_model(ModelRef(teacher_source)), "finetune": (finetune_info or {}).get("key"),
            "data": {k: v for k, v in d.model_dump(mode="json").items() if k not in ("eval_split", "eval_dataset", "max_eval_samples")},
            "data_fingerprint": data_mod.fingerprint(d.dataset),
            "teacher_examples": encoding_digest(train),
            "precision": precision_name,
        }
        cached_logits = None
        if objective.needs_teacher_logits:
            cached_logits = (logit_width or int(teacher.config.vocab_size)) if is_lm else num_labels
        plan = OutputPlan(
            causal_lm=is_lm, rows=spec.features.rows, layers=tuple(t_idx) if need_hidden else (),
            widths=tuple(t_widths[t] for t in t_idx) if need_hidden else (), logit_width=cached_logits,
        )
        touts_root = Path(spec.output.teacher_outputs_dir).expanduser()
        if fsdp:
            # A sharded teacher's forward needs every rank; build the entry in one process (or under ddp) first.
            touts = ensure_teacher_outputs(touts_root, payload, plan, teacher, train, spec.output.teacher_outputs_dtype,
                                           max(64, train_cfg.batch_size), device, amp, emit, build=False)
        else:
            distributed.on_main(lambda: ensure_teacher_outputs(
                touts_root, payload, plan, teacher, train, spec.output.teacher_outputs_dtype, max(64, train_cfg.batch_size), device, amp, emit,
            ).reader.close(), dist)
            touts = ensure_teacher_outputs(touts_root, payload, plan, teacher, train, spec.output.teacher_outputs_dtype,
                                           max(64, train_cfg.batch_size), device, amp, lambda event: None, build=False)

    # ---- teacher's evaluation predictions (once) and the run directory ------------------------
    eval_batch = max(64, train_cfg.batch_size) if not is_lm else train_cfg.batch_size
    gen_args = None
    if is_lm:
        g = spec.generate
        gen_args = GenerationArgs(g.max_new_tokens, g.batch_size, g.do_sample, g.temperature, g.top_p, spec.seed)
    teacher_scores: dict[str, float] = {}
    teacher_preds: list[int] | None = None
    if is_lm and measure_here:
        emit({"event": "stage", "message": f"scoring the teacher: perplexity and ROUGE-L on {min(len(evals), g.max_samples or len(evals))} generated responses"})
        teacher_scores, _ = split_scores(teacher, t_tok, evals, "teacher", gen_args, eval_batch, device, amp, g.max_samples)
    elif measure_here:
        teacher_scores, teacher_preds = score(teacher, evals, num_labels, "teacher", eval_batch, device, amp)
    metrics_path = run_dir / rundir.METRICS
    resumed_from: Path | None = None
    ckpt_state: dict[str, Any] | None = None
    if resume:
        resumed_from = checkpoint.latest_checkpoint(run_dir)
        if resumed_from is not None:
            loaders: dict[str, Any] = {}
            if fsdp:
                loaders = {
                    "load_student": lambda sd: distributed.load_full_state_dict(student, sd, dist),
                    "load_optimizer": lambda state: distributed.load_full_optimizer_state(trained, optimizer, state, dist),
                }
            head = checkpoint.read_state(resumed_from)  # checked before loading: the layouts differ per launch
            saved = (head.get("world_size", 1), head.get("strategy", "ddp"))
            here = (world, train_cfg.distributed if dist.enabled else "ddp")
            if saved != here:
                raise KdgeoError(
                    f"{resumed_from} was written by {saved[0]} process(es) ({saved[1]}); this run has {here[0]} ({here[1]}). The "
                    "global batch is batch_size x processes and the optimizer state is laid out per strategy: resume with the same "
                    f"launch (torchrun --nproc-per-node {saved[0]} and train.distributed = \"{saved[1]}\"; no torchrun for 1 process)."
                )
            ckpt_state = checkpoint.load_checkpoint(resumed_from, distributed.unwrap(student), objective, optimizer, device, **loaders)
            scheduler.load_state_dict(ckpt_state["scheduler"])
            if ckpt_state.get("scaler"):
                scaler.load_state_dict(ckpt_state["scaler"])
            # Events after the checkpoint will be produced again; drop them so nothing is doubled.
            if dist.is_main:
                rundir.truncate_lines(metrics_path, ckpt_state["metrics_lines"])
            emit({"event": "stage", "message": f"resuming from {resumed_from} (step {ckpt_state['step']} of {total_steps})"})
        else:
            emit({"event": "stage", "message": f"{run_dir} has no checkpoint yet: starting the run again from step 0"})
            if dist.is_main:
                metrics_path.unlink(missing_ok=True)
    else:
        distributed.on_main(lambda: _write_run_files(run_dir, spec), dist)

    lines = {"n": ckpt_state["metrics_lines"] if ckpt_state is not None else 0}

    def record(event: dict[str, Any]) -> None:
        lines["n"] += 1  # on every rank: checkpoints carry the count
        if dist.is_main:
            rundir.append_jsonl(metrics_path, event)
            emit(event)

    def monitor(step: int) -> list[dict[str, Any]]:
        if not measure_here:
            return []
        # `model`, not the DDP wrapper: a wrapper's forward would wait for the other ranks.
        was = model.training
        model.eval()
        with torch.no_grad():
            hidden = _forward(model, m_s_in, True, amp, device).hidden_states
        model.train(was)
        s_rows = _feature_rows(hidden, m_s_mask, s_idx, spec.features.rows)
        values = []
        nonfinite = []
        for (s, t), x, y in zip(pairs, m_t_rows, s_rows):
            m = geometry.pair_metrics(x, at_least_float32(y))
            values.append({"student": s, "teacher": t, **{k: m[k] for k in spec.monitor.metrics}})
            if not all(math.isfinite(v) for v in m.values()):
                side = "student" if geometry.nonfinite_layers([y]) else "teacher"
                nonfinite.append(f"{side} hidden state of pair {s}-{t}")
        record({"event": "monitor", "step": step, "pairs": values})
        if nonfinite:
            # NaN/inf features are not "no variance": say so instead of logging a distance of 2.
            record({"event": "nonfinite", "step": step, "terms": nonfinite, "action": "monitor"})
        return values

    def evaluate(step: int, epoch: float, final: bool = False) -> dict[str, float]:
        if not measure_here:
            return {}
        if is_lm:
            generate_now = final or spec.generate.every_eval
            scores, _ = split_scores(
                model, s_tok, evals, "student", gen_args if generate_now else None, eval_batch, device, amp, spec.generate.max_samples
            )
        else:
            scores, _ = score(model, evals, num_labels, "student", eval_batch, device, amp, reference=teacher_preds)
        record({"event": "eval", "step": step, "epoch": epoch, "scores": scores})
        return scores

    # Loop state: everything a checkpoint needs besides weights, optimizer and RNG.
    st: dict[str, Any] = {
        "step": 0, "epoch": 0, "next_micro": 0, "train_seconds": 0.0, "samples_seen": 0,
        "window": {}, "window_n": 0, "window_samples": 0, "window_time": 0.0, "evaluated_at": -1, "last_scores": {},
        "last_monitor": [], "skipped_nonfinite": 0, "skipped_scaler": 0,
    }

    def save_checkpoint(extra_keep: int = 0) -> Path:
        state = {
            "step": st["step"], "total_steps": total_steps, "loop": st,
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "metrics_lines": lines["n"],  # metrics.jsonl is cut back to this on resume
            "world_size": world, "strategy": train_cfg.distributed if dist.enabled else "ddp",
        }
        extra: dict[str, Any] = {}
        if dist.enabled:
            per_rank = distributed.gather_objects(checkpoint.rng_states(), dist)
            rng = {f"rank{r}.{k}": v for r, states in enumerate(per_rank) for k, v in states.items()}
            extra["rng"] = {**{k: v.clone() for k, v in per_rank[0].items()}, **rng}  # plain keys: rank 0, as one process writes
            if fsdp:  # collectives: every rank takes part, rank 0 receives the full tensors
                extra["student_state"] = distributed.full_state_dict(student, dist)
                extra["optimizer_state"] = distributed.full_optimizer_state(trained, optimizer, dist)
        keep = train_cfg.keep_checkpoints + extra_keep
        path = distributed.on_main(
            lambda: checkpoint.save_checkpoint(run_dir, st["step"], model, objective, optimizer, state, keep, **extra), dist
        )
        record({"event": "checkpoint", "step": st["step"], "path": str(path)})
        return path

    s_enc = train.encodings["student"]
    gather = dist.enabled and train_cfg.gather_features

    def micro_weight(idx: list[int]) -> int:
        """What a micro-batch's mean loss is a mean over: examples, or a causal LM's response tokens."""
        if not is_lm:
            return len(idx)
        assert s_enc.response_start is not None
        return sum(len(s_enc.input_ids[i]) - s_enc.response_start[i] for i in idx)

    def micro_loss(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The objective on one micro-batch: forward passes, then the weighted logit terms and
        feature terms (on rows gathered from every rank with train.gather_features)."""
        s_in = data_mod.to_device(batch["student"], device)
        s_out = _forward(student, s_in, need_hidden, amp, device)
        if is_lm:
            s_mask = batch["response_mask"]["student"].to(device)  # (B, T)
            s_logits, labels = response_predictions(s_out.logits, s_in["input_ids"], s_mask)  # (n, V), (n,)
        else:
            s_mask, s_logits, labels = s_in["attention_mask"], s_out.logits, batch["labels"].to(device)
        t_logits, t_rows, s_rows = None, [], []
        if touts is not None:
            idx = batch["index"].tolist()
            t_logits = touts.logits(idx, device, param_dtype)
            if need_hidden:
                t_rows = touts.features(idx, device, param_dtype)
                s_rows = _feature_rows(s_out.hidden_states, s_mask, s_idx, spec.features.rows)
        elif need_teacher:
            t_in = data_mod.to_device(batch["teacher"], device)
            with torch.no_grad():
                t_out = _forward(teacher, t_in, need_hidden, amp, device)
            t_mask = batch["response_mask"]["teacher"].to(device) if is_lm else t_in["attention_mask"]
            t_logits = response_predictions(t_out.logits, t_in["input_ids"], t_mask)[0] if is_lm else t_out.logits
            if need_hidden:
                t_rows = _feature_rows(t_out.hidden_states, t_mask, t_idx, spec.features.rows)
                s_rows = _feature_rows(s_out.hidden_states, s_mask, s_idx, spec.features.rows)
        if logit_width is not None:
            # Output layers padded to different sizes: compare the tokenizer's ids only.
            s_logits = s_logits[..., :logit_width]
            t_logits = t_logits[..., :logit_width] if t_logits is not None else None
        if gather and s_rows:
            t_rows = [distributed.gather_rows(at_least_float32(r), dist) for r in t_rows]
            s_rows = [distributed.gather_rows(at_least_float32(r), dist) for r in s_rows]
        return objective.grouped(s_logits, labels, t_logits, t_rows, s_rows)

    # ---- 5. the training loop ----------------------------------------------------------------
    torch.manual_seed(spec.seed + dist.rank)  # rank 0 draws what a single process draws
    if ckpt_state is not None:
        st.update(ckpt_state["loop"])
        checkpoint.restore_rng(ckpt_state["_rng"], dist.rank)  # after the seeding above, which it must override
        record({"event": "resume", "step": st["step"], "checkpoint": str(resumed_from)})
    else:
        record({
            "event": "start", "run_dir": str(run_dir), "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "train_samples": len(train), "eval_samples": len(evals), "pairs": [list(p) for p in pairs],
            "device": str(device), "precision": precision_name,
            "teacher_scores": teacher_scores, "losses": [t.kind for t in terms],
        })
        st["last_monitor"] = monitor(0) if pairs else []
    lengths = data_mod.lengths_of(train) if spec.data.group_by_length else None
    workers = data_mod.loader_workers(train_cfg.loader_workers, device, world)
    params = [p for g in groups for p in g["params"]]
    stop: dict[str, int | None] = {"signal": None}

    def on_signal(signum: int, frame: Any) -> None:
        if stop["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        stop["signal"] = signum  # only a flag: the loop finishes the step, checkpoints and reports

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while st["step"] < total_steps:
            micro = _epoch_batches(len(train), global_batch, world, spec.seed, st["epoch"], lengths, **batching)
            # This process's shards of the rest of the epoch, collated ahead by `workers` processes.
            batches = data_mod.prefetch_batches(
                train, [distributed.shard(b, dist) for b in micro[st["next_micro"] :]], workers, pin_memory=device.type == "cuda"
            )
            while st["next_micro"] < len(micro) and st["step"] < total_steps:
                first = st["next_micro"]
                group = micro[first : first + train_cfg.grad_accum]  # global micro-batches
                n_step = sum(len(b) for b in group)
                total_weight = float(sum(micro_weight(b) for b in group))
                t0 = time.perf_counter()
                stop_agreed = stop["signal"] is not None
                optimizer.zero_grad(set_to_none=True)
                step_parts: dict[str, float] = {}
                nonfinite: list[str] = []
                for k, global_idx in enumerate(group):
                    batch = next(batches)
                    idx = batch["index"].tolist()  # == distributed.shard(global_idx, dist)
                    # Shares: the step's loss is a mean over its examples (response tokens for a
                    # causal LM), however they are split into micro-batches and processes; DDP
                    # averages over processes, so per-row terms carry a factor N
                    # (distributed.loss_share) and terms on gathered rows do not.
                    local_weight = micro_weight(idx)
                    log_share = local_weight / total_weight
                    local_share = distributed.loss_share(local_weight, total_weight, dist)
                    feature_share = micro_weight(global_idx) / total_weight if gather else local_share
                    with distributed.maybe_no_sync(student, sync=k == len(group) - 1):
                        logit_loss, feature_loss, parts = micro_loss(batch)
                        loss = logit_loss + feature_loss
                        if not torch.isfinite(loss):
                            nonfinite = [name for name, v in parts.items() if not torch.isfinite(v)] or ["the total loss"]
                            if not dist.enabled:
                                break
                        # Under torchrun every rank runs every backward (they synchronise), even past a NaN.
                        scaler.scale(logit_loss * local_share + feature_loss * feature_share).backward()
                    for name, v in parts.items():
                        step_parts[name] = step_parts.get(name, 0.0) + float(v) * log_share
                    step_parts["loss"] = step_parts.get("loss", 0.0) + float(loss.detach()) * log_share
                for _ in range(len(group) - 1 - k):
                    next(batches)  # micro-batches skipped after a non-finite loss: keep the stream in step
                if dist.enabled:
                    distributed.average_gradients(objective.parameters(), dist)  # the projections: outside DDP/FSDP
                    flags = {"nonfinite": float(bool(nonfinite)), "stop": float(stop["signal"] is not None)}
                    reduced = distributed.all_reduce_sum({**{f"part:{k}": v for k, v in step_parts.items()}, **flags}, dist)
                    step_parts = {k[5:]: v for k, v in reduced.items() if k.startswith("part:")}
                    if reduced["nonfinite"] and not nonfinite:
                        nonfinite = ["a loss term on another process"]
                    # Only the agreed flag counts: a signal landing after this point waits for the next step.
                    stop_agreed = reduced["stop"] > 0
                if not nonfinite:
                    scaler.unscale_(optimizer)
                    max_norm = train_cfg.max_grad_norm or float("inf")  # 0: no clipping
                    if fsdp:
                        norm = _clip_sharded([list(model.parameters()), list(objective.parameters())], max_norm)
                    else:
                        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                    if not torch.isfinite(norm) and not scaler.is_enabled():
                        nonfinite = ["the gradients (loss finite, gradient norm not)"]
                if nonfinite:
                    where = f"step {st['step'] + 1} (epoch {st['epoch'] + 1})"
                    if train_cfg.on_nonfinite == "abort":
                        optimizer.zero_grad(set_to_none=True)
                        path = save_checkpoint()
                        raise KdgeoError(
                            f"non-finite value at {where} in {', '.join(nonfinite)} (a name like procrustes/2-6 is the loss "
                            f"term and its student-teacher layer pair). The state before this step is saved in {path}. "
                            "Resume past it with --resume --set train.on_nonfinite=skip, or start a new run with a lower "
                            'train.lr or precision "fp32" (and check the data).'
                        )
                    optimizer.zero_grad(set_to_none=True)
                    st["skipped_nonfinite"] += 1
                    record({"event": "nonfinite", "step": st["step"] + 1, "terms": nonfinite, "action": "skipped"})
                else:
                    scale_before = scaler.get_scale() if scaler.is_enabled() else None
                    scaler.step(optimizer)
                    scaler.update()
                    if scale_before is not None and scaler.get_scale() < scale_before:
                        st["skipped_scaler"] += 1  # fp16 overflow: the scaler skipped this update
                scheduler.step()
                st["step"] += 1
                st["next_micro"] = first + len(group)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                st["train_seconds"] += dt
                st["samples_seen"] += n_step
                st["window_samples"] += n_step
                st["window_n"] += 1
                st["window_time"] += dt
                if not (dist.enabled and nonfinite):  # reduced parts of a skipped step carry the NaN of every rank
                    for k, v in step_parts.items():
                        st["window"][k] = st["window"].get(k, 0.0) + v
                step = st["step"]
                epoch_pos = round(st["epoch"] + min(1.0, st["next_micro"] / len(micro)), 4)
                if step % train_cfg.log_every == 0 or step == total_steps:
                    record({
                        "event": "step", "step": step, "total_steps": total_steps, "epoch": epoch_pos,
                        "lr": scheduler.get_last_lr()[0], "samples_per_s": st["window_samples"] / max(st["window_time"], 1e-9),
                        **{k: v / max(st["window_n"], 1) for k, v in st["window"].items()},
                    })
                    st.update(window={}, window_n=0, window_samples=0, window_time=0.0)
                if pairs and spec.monitor.every and step % spec.monitor.every == 0 and step != total_steps:
                    st["last_monitor"] = monitor(step)
                if train_cfg.eval_every and step % train_cfg.eval_every == 0 and step != total_steps:
                    st["last_scores"] = evaluate(step, epoch_pos)
                    st["evaluated_at"] = step
                if (stop_agreed if dist.enabled else stop["signal"] is not None) and step < total_steps:
                    path = save_checkpoint()
                    signum = stop["signal"] if stop["signal"] is not None else int(signal.SIGTERM)  # another rank's signal
                    stop["signal"] = signum
                    name = signal.Signals(signum).name
                    raise RunInterrupted(
                        f"{name} at step {step} of {total_steps}: checkpoint written to {path}.",
                        exit_code=128 + int(stop["signal"]), run_dir=str(run_dir), step=step,
                    )
                if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0 and step != total_steps:
                    save_checkpoint()
            if st["next_micro"] >= len(micro):
                st["epoch"] += 1
                st["next_micro"] = 0
                if not train_cfg.eval_every and st["step"] < total_steps:
                    st["last_scores"] = evaluate(st["step"], float(st["epoch"]))
                    st["evaluated_at"] = st["step"]
        if ckpt_state is None or ckpt_state["step"] < total_steps:
            # Insurance for the final phase (evaluation, saving): resume from here finishes the run.
            # It is removed once summary.json is written, so it does not count against keep_checkpoints.
            save_checkpoint(extra_keep=1)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    step = st["step"]
    train_seconds, samples_seen = st["train_seconds"], st["samples_seen"]
    last_monitor, last_scores, evaluated_at = st["last_monitor"], st["last_scores"], st["evaluated_at"]

    # ---- 6. final measurements and the run directory -----------------------------------------
    if pairs:
        last_monitor = monitor(step)
    if evaluated_at != step:
        last_scores = evaluate(step, round(step / steps_per_epoch, 4), final=True)
    student_dir = None
    if spec.output.save_student:
        student_dir = run_dir / rundir.STUDENT
        full = distributed.full_state_dict(student, dist) if fsdp else None  # a collective under FSDP

        def save_student() -> None:
            try:
                save_model_dir(model, s_tok, student_dir, state_dict=full)
            except SAVE_ERRORS as err:
                raise OutputError(
                    f"cannot save the student to {student_dir}: {getattr(err, 'strerror', None) or err}. metrics.jsonl and the "
                    "checkpoints hold the run so far: free some space and run the same command with --resume."
                ) from None

        distributed.on_main(save_student, dist)
    d = spec.data
    summary = {
        "format_version": rundir.FORMAT_VERSION,
        "name": spec.name,
        "variant": spec.variant or spec.name,
        "data": {
            "dataset": d.dataset, "config": d.config, "train_split": d.train_split, "eval_split": d.eval_split,
            "eval_dataset": d.eval_dataset, "max_train_samples": d.max_train_samples, "max_eval_samples": d.max_eval_samples,
            **({"prompt_column": d.prompt_column, "response_column": d.response_column, "context_column": d.context_column,
                "max_prompt_length": d.max_prompt_length or d.max_length // 2, "long_examples": d.long_examples,
                # what fitting prompts into max_prompt_length and examples into max_length cut or dropped
                "truncation": {"train": train.truncation, "eval": evals.truncation}}
               if is_lm else {"text_column": d.text_column, "label_column": d.label_column}),
        },
        "run_dir": str(run_dir),
        "task": spec.task,
        "seed": spec.seed,
        "teacher": spec.teacher.model,
        "teacher_path": teacher_source,
        "teacher_finetune": finetune_info,
        "student_init": spec.student.init,
        "student_layers": s_layers,
        "student_width": s_widths[0],
        "student_widths": s_widths,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "copied_teacher_layers": copied_layers,
        "student_dir": str(student_dir) if student_dir else None,
        "losses": [{"kind": t.kind, "weight": t.weight} for t in terms],
        "pairs": [list(p) for p in pairs],
        "rows": spec.features.rows,
        "label_names": label_info.names if label_info is not None else None,
        "steps": step,
        "epochs": round(step / steps_per_epoch, 4),
        "train_samples": len(train),
        "eval_samples": len(evals),
        "scores": last_scores,
        "teacher_scores": teacher_scores,
        "geometry": last_monitor,
        "skipped_steps_nonfinite": st["skipped_nonfinite"],
        "skipped_steps_fp16_overflow": st["skipped_scaler"],
        "resumed_from": str(resumed_from) if resumed_from else None,
        "teacher_outputs": str(touts.path) if touts is not None else None,
        "wall_seconds": time.perf_counter() - wall_start,
        "train_seconds": train_seconds,
        "samples_per_s": samples_seen / max(train_seconds, 1e-9),
        "device": str(device),
        "precision": precision_name,
        "versions": _versions(),
    }
    if dist.enabled:
        summary["processes"] = world
        summary["distributed"] = train_cfg.distributed
        summary["gather_features"] = train_cfg.gather_features

    def finish() -> None:
        rundir.write_json(run_dir / rundir.SUMMARY, summary)
        # The end-of-training checkpoint was insurance for the final phase, which is now done.
        shutil.rmtree(run_dir / f"{checkpoint.PREFIX}{total_steps}", ignore_errors=True)

    distributed.on_main(finish, dist)
    emit({"event": "done", "summary": summary})
    return DistillResult(run_dir=run_dir, summary=summary)


@dataclass
class SweepOutcome:
    variant: str
    seed: int
    run_dir: Path
    status: str
    """"done", "skipped" (finished earlier) or "failed"."""
    error: str | None = None
    summary: dict[str, Any] | None = None


def run_sweep(runs: list[SweepRun], progress: Progress | None = None) -> list[SweepOutcome]:
    """Run every variant x seed in turn. A failed run is reported and the sweep goes on; a run
    that finished earlier (its summary.json exists) is skipped, so re-running continues a sweep."""
    import traceback

    env = distributed.from_environment()
    emit = (progress or (lambda event: None)) if env.is_main else (lambda event: None)
    # Under torchrun a failed run stops the sweep: the other processes may be inside one of its
    # collectives, so going on would leave them waiting. Running the command again continues.
    torchrun = env.enabled
    outcomes: list[SweepOutcome] = []
    for k, run in enumerate(runs, 1):
        spec = run.spec
        run_dir = Path(spec.output.dir).expanduser() / (spec.output.name or spec.name)
        label = f"[{k}/{len(runs)}] {run.variant} seed {run.seed}"
        if (run_dir / rundir.SUMMARY).exists():
            saved = rundir.read_json(run_dir / rundir.SPEC_JSON) if (run_dir / rundir.SPEC_JSON).exists() else {}
            diffs = resume_differences(saved, spec.model_dump(mode="json", exclude_none=True))
            if diffs:
                changed = "; ".join(f"{k}: run has {a!r}, spec now has {b!r}" for k, a, b in diffs[:8])
                error = (
                    f"{run_dir} finished with a different spec ({changed}); its results would be mixed with the new ones. "
                    "Delete that run directory to redo it, or give the sweep another name."
                )
                emit({"event": "run_failed", "variant": run.variant, "seed": run.seed, "error": error})
                outcomes.append(SweepOutcome(run.variant, run.seed, run_dir, "failed", error=error))
                continue
            emit({"event": "stage", "message": f"{label}: already finished ({run_dir}), skipped"})
            outcomes.append(SweepOutcome(run.variant, run.seed, run_dir, "skipped", summary=rundir.read_json(run_dir / rundir.SUMMARY)))
            continue
        resume = False
        if run_dir.exists():
            if checkpoint.latest_checkpoint(run_dir) is not None:
                resume = True  # interrupted after a checkpoint: continue it
            else:
                # A run that died before its first checkpoint: start it again from scratch.
                spec = spec.model_copy(update={"output": spec.output.model_copy(update={"overwrite": True})})
        emit({"event": "stage", "message": f"{label} -> {run_dir}"})
        try:
            result = run_distill(spec, progress=progress, resume=resume)
            outcomes.append(SweepOutcome(run.variant, run.seed, run_dir, "done", summary=result.summary))
        except (KeyboardInterrupt, RunInterrupted):
            raise
        except KdgeoError as err:
            if torchrun:
                raise
            emit({"event": "run_failed", "variant": run.variant, "seed": run.seed, "error": err.render()})
            outcomes.append(SweepOutcome(run.variant, run.seed, run_dir, "failed", error=err.render()))
        except Exception as err:  # a bug in one run must not lose the others; keep its traceback
            if torchrun:
                raise
            text = traceback.format_exc()
            emit({"event": "run_failed", "variant": run.variant, "seed": run.seed, "error": text})
            outcomes.append(SweepOutcome(run.variant, run.seed, run_dir, "failed", error=f"{type(err).__name__}: {err}"))
    return outcomes

