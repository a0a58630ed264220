"""Sequence-level knowledge distillation: the student trains on the teacher's own responses.

Kim & Rush (2016, "Sequence-Level Knowledge Distillation", EMNLP, arXiv 1606.07947) replace each
training target y by the teacher's mode ŷ ≈ argmax_y p_T(y | x) and train the student on (x, ŷ):
word-level KD matches the teacher's next-token distribution along the *reference* prefix, while
sequence-level KD moves the data itself to the teacher's distribution, where the student's own
generations will later be. With ``train.sequence_kd = true`` (causal LM only):

- every training prompt's response is the teacher's continuation of that prompt, so ``ce`` trains on
  the teacher's outputs and ``kd`` and the feature losses run on them (both models see the same token
  sequence); the evaluation split keeps its reference responses, so scores stay comparable.
- decoding: greedy by default. Kim & Rush approximate the mode by beam search (beam 5); greedy is the
  common cheap approximation (one forward per new token, deterministic). With ``generate.do_sample``
  the response is sampled instead (``temperature``, ``top_p``), seeded per example by (run seed,
  example index), so a sampled entry does not depend on the batch size.
- length: at most ``generate.max_new_tokens`` new tokens, and never more than fit after the prompt in
  ``data.max_length``: a response that ends (end-of-sequence) gets the end-of-sequence token as its
  last target, one cut by the limit does not (like a reference cut to fit).
- a response whose first token is end-of-sequence (an empty answer) would teach the student to say
  nothing: that example keeps its reference response instead, and the count is reported.

The generations are cached: ``<output.teacher_outputs_dir>/sequence-kd/<key>/`` holds, for every
training example in order, the generated token ids (``tokens.i32``, int32 little-endian, concatenated),
``offsets.i64`` (n + 1 int64: example i is tokens offsets[i]:offsets[i + 1]), ``stopped.u8`` (1 where the
response ended with end-of-sequence) and ``manifest.json`` (written last, ``complete: true``). The key
(:func:`entry_payload`) hashes what determines the generations: the teacher (reference, revision, its
files, the fine-tune's key), the training prompts as the teacher tokenizes them, the tokenizer's special
ids, the decoding settings and the length limits, and the precision; so every run of a sweep over losses
or students reads one entry. It is built by one process at a time (a per-entry lock, :mod:`kdgeo.locks`)
in ``<key>.tmp-<pid>/`` and renamed into place once complete: a signal during generation
(:mod:`kdgeo.stopping`, checked between batches) or a crash leaves no entry, and the next run generates
again. Nothing is reused from a damaged or stale entry: it is reported and generated again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from kdgeo import data as data_mod
from kdgeo import generation, lm_data, locks, output_cache, stopping
from kdgeo.errors import OutputError, TokenizerMismatchError
from kdgeo.events import Progress, Stage
from kdgeo.generation import GenerationArgs
from kdgeo.rundir import fsync_dir
from kdgeo.runtime import autocast

if TYPE_CHECKING:
    from kdgeo.plan import DistillPlan

FORMAT_VERSION = 1
SUBDIR = "sequence-kd"
"""The entries' directory inside output.teacher_outputs_dir (beside the teacher-output cache's)."""
MANIFEST = "manifest.json"
TOKENS = "tokens.i32"
OFFSETS = "offsets.i64"
STOPPED = "stopped.u8"
_FILES: dict[str, np.dtype[Any]] = {TOKENS: np.dtype("<i4"), OFFSETS: np.dtype("<i8"), STOPPED: np.dtype("u1")}
PROGRESS_SECONDS = 10.0
"""At most one progress line per this many seconds (and one per tenth of the prompts)."""


@dataclass(frozen=True)
class Decoding:
    """How the teacher's responses are decoded (flat values from ``[generate]`` and the run's seed)."""

    max_new_tokens: int
    batch_size: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def of(cls, args: GenerationArgs) -> Decoding:
        return cls(args.max_new_tokens, args.batch_size, args.do_sample, args.temperature, args.top_p, args.seed)

    def key(self) -> dict[str, Any]:
        """What changes the generations: greedy decoding ignores the sampling settings and the seed,
        so runs with other seeds share a greedy entry. The batch size is left out: it changes only
        padding, never which token is chosen (up to float rounding)."""
        key: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            key.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return key

    def describe(self) -> str:
        how = f"sampled (temperature {self.temperature:g}, top-p {self.top_p:g})" if self.do_sample else "greedy"
        return f"{how}, at most {self.max_new_tokens} new tokens"


@dataclass(frozen=True)
class Generations:
    """The teacher's response to every training prompt (in the split's order), and where it is cached."""

    key: str
    path: Path
    tokens: list[list[int]]
    """Per example, the generated ids (the end-of-sequence token not included)."""
    stopped: list[bool]
    """Per example, whether the response ended with end-of-sequence (False: cut by the token limit)."""
    generated: bool
    """Generated by this process (False: read from the cache)."""
    seconds: float
    """Generation time (0 when read from the cache)."""


def cache_root(teacher_outputs_dir: str) -> Path:
    return Path(os.path.expanduser(teacher_outputs_dir)) / SUBDIR


def pad_and_eos(tokenizer: Any) -> tuple[int, int | None]:
    """(pad id, end-of-sequence id) as evaluation generates with them (:func:`kdgeo.generation.lm_scores`)."""
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    return int(pad), tokenizer.eos_token_id


def prompts_digest(prompts: Sequence[Sequence[int]]) -> str:
    """sha256 of the prompts' token ids in order: which example index holds which prompt."""
    digest = hashlib.sha256()
    for ids in prompts:
        digest.update((",".join(map(str, ids)) + ";").encode())
    return digest.hexdigest()


def budgets(prompts: Sequence[Sequence[int]], max_length: int, max_new_tokens: int) -> list[int]:
    """Per prompt, the most new tokens: ``min(max_new_tokens, max_length - len(prompt))`` (>= 1, since a
    prompt has at most max_prompt_length < max_length tokens)."""
    return [max(1, min(max_new_tokens, max_length - len(p))) for p in prompts]


def entry_payload(plan: DistillPlan, precision: str, finetune_key: str | None) -> dict[str, Any]:
    """Everything that determines the generations (the cache key is its :func:`output_cache.cache_key`).

    ``finetune_key``: the fine-tuned teacher's cache key (:func:`kdgeo.teacher.finetune_key`), None for
    a teacher used as it is. The teacher's files are fingerprinted (path, sizes, mtimes), so a changed
    checkpoint under the same path is a new entry.
    """
    from kdgeo.models import fingerprint_model

    assert plan.generation is not None  # a causal-LM plan always has its generation settings
    pad, eos = pad_and_eos(plan.t_tok)
    d = plan.data
    return {
        "format": FORMAT_VERSION,
        "teacher": plan.teacher_ref.ref,
        "revision": plan.teacher_ref.revision,
        "teacher_files": fingerprint_model(plan.teacher_ref),
        "finetune": finetune_key,
        "data_fingerprint": data_mod.fingerprint(d["dataset"]),
        "prompts": prompts_digest(lm_data.prompt_ids(plan.train.encodings["teacher"])),
        "examples": len(plan.train),
        "tokenizer": {"pad": pad, "eos": eos, "size": len(plan.t_tok)},
        "max_length": d["max_length"],
        "max_prompt_length": d["max_prompt_length"],
        "decoding": Decoding.of(plan.generation).key(),
        "precision": precision,
    }


def estimate_bytes(prompts: Sequence[Sequence[int]], max_length: int, max_new_tokens: int) -> int:
    """The most bytes an entry takes: every response at its limit (4 bytes a token), the offsets and flags."""
    n = len(prompts)
    return 4 * sum(budgets(prompts, max_length, max_new_tokens)) + 8 * (n + 1) + n


# --------------------------------------------------------------------------------------------
# the entry on disk


def check_entry(root: Path, key: str, n_examples: int) -> tuple[output_cache.Status, str]:
    """Whether ``<root>/<key>`` can be read for ``n_examples`` examples: ``("ok" | "missing" | "corrupt" |
    "stale", reason)``. Reads the manifest, the offsets and the sizes; the sha256 in the manifest is for
    checking by hand."""
    status, reason, _ = _check(root, key, n_examples)
    return status, reason


def _check(root: Path, key: str, n: int) -> tuple[output_cache.Status, str, np.ndarray | None]:
    entry = root / key
    if not entry.exists():
        return "missing", f"no entry {entry}", None
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "corrupt", f"{MANIFEST} is missing (the entry was not written by a completed build)", None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return "corrupt", f"{MANIFEST} cannot be read ({err})", None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        return "corrupt", f"{MANIFEST} does not mark the entry complete", None
    if manifest.get("format_version") != FORMAT_VERSION:
        return "stale", f"it was written in format {manifest.get('format_version')!r}, not {FORMAT_VERSION}", None
    payload = manifest.get("payload")
    if manifest.get("key") != key or not isinstance(payload, dict) or output_cache.cache_key(payload) != key:
        return "stale", "its manifest was written for another key (the directory was renamed, copied or edited)", None
    if manifest.get("n_examples") != n:
        return "stale", f"it holds {manifest.get('n_examples')!r} examples, this run has {n}", None
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "corrupt", f"{MANIFEST} lists no files", None
    for name, dtype in _FILES.items():
        record = files.get(name)
        try:
            size = (entry / name).stat().st_size
        except OSError:
            return "corrupt", f"{name} is missing", None
        if not isinstance(record, dict) or record.get("bytes") != size or size % dtype.itemsize:
            return "corrupt", f"{name} has {size} bytes, not the {MANIFEST}'s (truncated or overwritten)", None
    offsets = np.fromfile(entry / OFFSETS, dtype=_FILES[OFFSETS])  # (n + 1,)
    tokens = files[TOKENS]["bytes"] // 4
    if len(offsets) != n + 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != tokens:
        return "corrupt", f"{OFFSETS} does not run from 0 to the {tokens} tokens in {n + 1} steps", None
    if files[STOPPED]["bytes"] != n:
        return "corrupt", f"{STOPPED} has {files[STOPPED]['bytes']} bytes for {n} examples", None
    return "ok", f"{n} examples, {tokens} tokens; sizes and offsets checked", offsets


Read = tuple[output_cache.Status, str, "tuple[list[list[int]], list[bool]] | None"]
"""(status, reason, (tokens, stopped) when the status is "ok")."""


def _read(root: Path, key: str, n: int) -> Read:
    status, reason, offsets = _check(root, key, n)
    if status != "ok" or offsets is None:
        return status, reason, None
    flat = np.fromfile(root / key / TOKENS, dtype=_FILES[TOKENS]).astype(np.int64).tolist()
    stopped = np.fromfile(root / key / STOPPED, dtype=_FILES[STOPPED]).astype(bool).tolist()
    bounds = offsets.tolist()
    return status, reason, ([flat[bounds[i] : bounds[i + 1]] for i in range(n)], stopped)


def _write(
    root: Path,
    key: str,
    payload: dict[str, Any],
    tokens: list[list[int]],
    stopped: list[bool],
    stats: dict[str, Any],
) -> Path:
    """Write the entry whole or not at all: into ``<key>.tmp-<pid>/``, every file fsync'ed, the manifest
    last, then renamed into place. Any failure (a full disk, a second Ctrl-C) removes the build."""
    final, tmp = root / key, root / f"{key}.tmp-{os.getpid()}"
    lengths = [len(t) for t in tokens]
    arrays = {
        TOKENS: np.fromiter((i for t in tokens for i in t), dtype=_FILES[TOKENS], count=sum(lengths)),
        OFFSETS: np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(_FILES[OFFSETS]),
        STOPPED: np.array(stopped, dtype=_FILES[STOPPED]),
    }
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = {}
        for name, array in arrays.items():
            data = array.tobytes()
            with open(tmp / name, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "payload": payload,
            "n_examples": len(tokens),
            "files": files,
            "stats": stats,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "complete": True,
        }
        with open(tmp / MANIFEST, "x", encoding="utf-8") as fh:
            fh.write(json.dumps(manifest, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(
            f"output.teacher_outputs_dir: cannot write the sequence-KD cache entry {final} "
            f"({err.strerror or err}); make {root} writable with free space, or set output.teacher_outputs_dir to "
            "another directory. Nothing of this entry was kept."
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --------------------------------------------------------------------------------------------
# generating


def generate_responses(
    teacher: nn.Module,
    prompts: list[list[int]],
    limits: list[int],
    pad_id: int,
    stop_ids: Sequence[int],
    decoding: Decoding,
    device: torch.device,
    amp: torch.dtype | None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """The teacher's response to every prompt, in input order: (new ids without end-of-sequence, ended).

    Prompts are sorted by length into batches of ``decoding.batch_size`` (left-padded, as evaluation
    generates: :func:`kdgeo.generation.generate`); a batch decodes up to its longest limit and each row is
    then cut to its own ``limits[i]``, so every row is what generating it alone with max_new_tokens =
    limits[i] gives (greedy: the arg-max; sampling: row i draws from its own generator seeded by
    (decoding.seed, i)). A row *ended* when it produced one of ``stop_ids`` before its limit. The stop flag
    (:mod:`kdgeo.stopping`) is checked before each batch; ``progress`` is told the prompts done after each.
    """
    n = len(prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * n
    cache_kw, takes_positions, keep_kw = generation._forward_kwargs(teacher)
    was_training = teacher.training
    teacher.eval()
    done = 0
    try:
        with torch.no_grad(), autocast(device, amp):
            for idx in generation._length_batches([len(p) for p in prompts], decoding.batch_size):
                stopping.check(
                    f"while generating the teacher's responses for train.sequence_kd ({done} of {n} prompts): "
                    "nothing of the cache entry was written (it is written once complete); the next run generates "
                    "them again."
                )
                out = generation._generate_batch(
                    teacher,
                    [prompts[i] for i in idx],
                    pad_id,
                    list(stop_ids),
                    max(limits[i] for i in idx),
                    device,
                    cache_kw,
                    takes_positions,
                    keep_kw,
                    generation._row_generators(idx, decoding.seed) if decoding.do_sample else None,
                    decoding.temperature,
                    decoding.top_p,
                )
                for i, ids in zip(idx, out):
                    tokens[i] = ids[: limits[i]]
                    stopped[i] = len(ids) < limits[i]
                done += len(idx)
                if progress is not None:
                    progress(done)
    finally:
        teacher.train(was_training)
    return tokens, stopped


def ensure(
    root: Path,
    payload: dict[str, Any],
    teacher: nn.Module,
    t_tok: Any,
    split: data_mod.TextSplit,
    decoding: Decoding,
    max_length: int,
    device: torch.device,
    amp: torch.dtype | None,
    emit: Progress,
    build: bool = True,
) -> Generations:
    """The teacher's responses to ``split``'s prompts: read from the entry for ``payload``, or generated
    and cached first (under the entry's lock: a second process waits, then reads what the first wrote).
    A corrupt or stale entry is reported and generated again. ``build=False`` (torchrun ranks after rank 0
    built it) only reads."""
    key = output_cache.cache_key(payload)
    prompts = lm_data.prompt_ids(split.encodings["teacher"])
    status, reason, found = _read(root, key, len(prompts))
    if found is not None:
        return _read_back(root, key, found, emit)
    if not build:
        raise OutputError(f"the sequence-KD cache entry {root / key} is {status}: {reason}")
    what = f"the sequence-KD cache entry {root / key}"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"output.teacher_outputs_dir: cannot create {root} ({err.strerror or err}); set output.teacher_outputs_dir "
            "to a writable directory (train.sequence_kd caches the teacher's responses there)."
        ) from None
    lock = root / f".{key}.lock"
    with locks.entry_lock(lock, what, lambda m: emit(Stage(m)), lambda: stopping.check(f"waiting for {what}")):
        status, reason, found = _read(root, key, len(prompts))
        if found is not None:
            return _read_back(root, key, found, emit)
        if status in ("corrupt", "stale"):
            emit(Stage(f"{what} is {status} ({reason}): generating it again"))
            shutil.rmtree(root / key, ignore_errors=True)
        output_cache.clean_stale_builds(root)  # builds of processes that died
        return _generate(root, key, payload, teacher, t_tok, prompts, decoding, max_length, device, amp, emit)


def _read_back(root: Path, key: str, found: tuple[list[list[int]], list[bool]], emit: Progress) -> Generations:
    tokens, stopped = found
    emit(Stage(f"sequence_kd: the teacher's responses read from the cache {root / key}"))
    return Generations(key, root / key, tokens, stopped, generated=False, seconds=0.0)


def _generate(
    root: Path,
    key: str,
    payload: dict[str, Any],
    teacher: nn.Module,
    t_tok: Any,
    prompts: list[list[int]],
    decoding: Decoding,
    max_length: int,
    device: torch.device,
    amp: torch.dtype | None,
    emit: Progress,
) -> Generations:
    n = len(prompts)
    from kdgeo.evaluate_lm import stop_tokens  # evaluation's: end-of-sequence and the model's end-of-turn ids

    limits = budgets(prompts, max_length, decoding.max_new_tokens)
    pad, _ = pad_and_eos(t_tok)
    cost = output_cache.format_bytes(estimate_bytes(prompts, max_length, decoding.max_new_tokens))
    emit(
        Stage(
            f"sequence_kd: generating the teacher's responses to {n} training prompts ({decoding.describe()}, "
            f"batches of {decoding.batch_size}) into {root / key}: at most {cost} on disk"
        )
    )
    start = time.perf_counter()
    last = [start, 0]

    def progress(done: int) -> None:
        now = time.perf_counter()
        if done < n and now - last[0] < PROGRESS_SECONDS and done - last[1] < max(1, n // 10):
            return
        last[:] = [now, done]
        rate = done / max(now - start, 1e-9)
        eta = f", about {(n - done) / rate:.0f} s left" if done < n else ""
        emit(Stage(f"sequence_kd: {done} of {n} responses generated ({now - start:.0f} s{eta})"))

    stops = stop_tokens(teacher, t_tok)
    tokens, stopped = generate_responses(teacher, prompts, limits, pad, stops, decoding, device, amp, progress)
    seconds = time.perf_counter() - start
    stats = counts(tokens, stopped)
    path = _write(root, key, payload, tokens, stopped, {**stats, "seconds": round(seconds, 3)})
    return Generations(key, path, tokens, stopped, generated=True, seconds=seconds)


# --------------------------------------------------------------------------------------------
# the training split


def counts(tokens: list[list[int]], stopped: list[bool]) -> dict[str, Any]:
    """What the generations were like: how many ended at the token limit, how many were empty (their
    examples keep the reference), the mean generated length (end-of-sequence not counted)."""
    n = len(tokens)
    return {
        "examples": n,
        "empty_kept_reference": sum(1 for t in tokens if not t),
        "hit_token_limit": sum(1 for s in stopped if not s),
        "generated_tokens_mean": round(sum(len(t) for t in tokens) / n, 3) if n else 0.0,
    }


def apply(
    split: data_mod.TextSplit,
    gens: Generations,
    tokenizers: dict[str, Any],
    max_length: int,
    pair_tokens: bool,
) -> data_mod.TextSplit:
    """``split`` with each response replaced by the teacher's (:func:`kdgeo.lm_data.replace_responses`).

    A role whose tokenizer has the teacher's vocabulary takes the generated ids as they are (+ its
    end-of-sequence token where the response ended); another tokenizer encodes the decoded text, as it
    encodes reference responses. An empty generation keeps the reference response. ``pair_tokens``
    (token rows or kd): the roles' responses must be the same tokens, as the pre-flight checked for the
    references.
    """
    t_tok = tokenizers["teacher"]
    texts = [
        t_tok.decode(ids, skip_special_tokens=True) if ids else ref
        for ids, ref in zip(gens.tokens, split.responses or [""] * len(split))
    ]
    same_vocab: dict[int, bool] = {}

    def new(tok: Any, k: int) -> list[int] | None:
        ids = gens.tokens[k]
        if not ids:
            return None  # the teacher said nothing: the reference teaches more than an empty answer
        if id(tok) not in same_vocab:
            same_vocab[id(tok)] = tok is t_tok or tok.get_vocab() == t_tok.get_vocab()
        end = [tok.eos_token_id] if gens.stopped[k] and tok.eos_token_id is not None else []
        if same_vocab[id(tok)]:
            return list(ids) + end
        encoded = list(tok(texts[k], add_special_tokens=False)["input_ids"]) + end
        return encoded or None

    out = lm_data.replace_responses(split, tokenizers, new, texts, max_length)
    if pair_tokens and out.encodings["teacher"] is not out.encodings["student"]:
        t_resp = lm_data.response_ids(out.encodings["teacher"])
        s_resp = lm_data.response_ids(out.encodings["student"])
        for k, (a, b) in enumerate(zip(t_resp, s_resp)):
            if a != b:
                raise TokenizerMismatchError(
                    f"train.sequence_kd: the student's tokenizer splits the teacher's response to training prompt {k} "
                    f"into {len(b)} tokens and the teacher's into {len(a)}, but token rows and kd pair them one by "
                    'one. Use features.rows = "mean" and geometry losses without kd, or a student with the '
                    "teacher's tokenizer."
                )
    return out


def record(gens: Generations, decoding: Decoding) -> dict[str, Any]:
    """summary.json's ``sequence_kd``: the cache entry (key and path), whether this run generated it,
    the decoding and the counts of :func:`counts`."""
    return {
        "entry": gens.key,
        "path": str(gens.path),
        "generated": gens.generated,
        "generation_seconds": round(gens.seconds, 3),
        "decoding": decoding.key(),
        **counts(gens.tokens, gens.stopped),
    }
