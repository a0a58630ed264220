"""The task is a type: what differs between distilling a classifier and a causal LM.

Everything else in a run (the plan, the teacher's preparation, the loop, the losses, the run
directory) is the same for both and asks the task for the parts that differ:

- pre-flight: which models qualify (:meth:`Task.check_model`), loading and tokenizing the data
  with both tokenizers and checking that they agree where the losses pair tokens (:meth:`Task.load`);
- models: loading a teacher or a pretrained student with the right head (:meth:`Task.load_model`,
  :meth:`Task.load_teacher`), or a fresh student from a config (:meth:`Task.student_from_config`);
- a batch: which token rows count (:meth:`Task.row_mask`: real tokens, or response tokens), the
  logits and targets of the logit losses (:meth:`Task.logits_and_labels`), and what a mean loss is
  a mean over (:meth:`Task.example_weights`: examples, or response tokens);
- evaluation (:meth:`Task.evaluate`: accuracy & co., or perplexity and ROUGE-L of generations);
- the fields a cache key and the run summary record (:meth:`Task.data_key`, :meth:`Task.summary_data`).

A third task (token classification, seq2seq) is one more subclass registered in :data:`TASKS`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from kdgeo import data as data_mod
from kdgeo import data_split, lm_data, rundir
from kdgeo.errors import DataError, KdgeoError, ModelLoadError, TokenizerMismatchError
from kdgeo.events import Progress, Stage
from kdgeo.features import check_tokenizers_agree
from kdgeo.generation import GenerationArgs
from kdgeo.kinds import Rows
from kdgeo.models import ModelRef, check_decoder, load_causal_lm, load_classifier, student_from_config
from kdgeo.rundir import CausalLMData, ClassificationData, RunData

if TYPE_CHECKING:
    from kdgeo.data_split import DataSplit
    from kdgeo.spec import DataSpec


@dataclass(frozen=True)
class Preflight:
    """What a task's pre-flight reads: the data settings (the spec's ``[data]``, at the edge), both
    tokenizers and configs (``s_cfg`` None when the student is built from the teacher), and the
    settings its checks name in messages."""

    data: DataSpec
    t_tok: Any
    s_tok: Any
    t_cfg: Any
    s_cfg: Any
    teacher: str
    student: str
    loss_kinds: frozenset[str]
    rows: Rows
    max_new_tokens: int
    emit: Progress
    data_split: DataSplit | None = None
    """A resumed run's recorded data.eval_fraction split (data_split.json), reused instead of drawn again."""


@dataclass(frozen=True)
class EvalSettings:
    """How evaluations run: batch size, device and autocast; for a causal LM the generation
    settings (None: perplexity only), how many prompts generate and whether every evaluation does."""

    batch_size: int
    device: torch.device
    amp: torch.dtype | None
    generation: GenerationArgs | None = None
    max_samples: int | None = None
    every_eval: bool = False


@dataclass(frozen=True)
class Evaluation:
    """One model scored on one split (:meth:`Task.evaluate`)."""

    scores: dict[str, float]
    predictions: list[int] | None = None
    """A classifier's arg-max class per example: the reference a student's teacher agreement is measured against."""
    records: list[dict[str, Any]] | None = None
    """A final evaluation's per-example records, predictions.jsonl's lines (:func:`kdgeo.rundir.read_predictions`);
    None for the evaluations during training, which write none."""


@dataclass(frozen=True)
class LoadedSplits:
    task: Task
    train: data_mod.TextSplit
    evals: data_mod.TextSplit
    data_split: DataSplit | None = None
    """The data.eval_fraction split the evaluation set was held out by (None without eval_fraction)."""


class Task(ABC):
    """One task's side of a run; instances are immutable and built by :meth:`load`."""

    name: ClassVar[str]
    per_token_logits: ClassVar[bool]
    """True when the logit losses and cached logits have one row per (response) token, not per example."""

    label_names: tuple[str, ...] = ()

    # ---- pre-flight -------------------------------------------------------------------------
    # B027: an optional hook with a do-nothing default, deliberately not abstract
    @classmethod  # noqa: B027
    def check_model(cls, config: Any, ref: str, setting: str) -> None:
        """Refuse a model this task cannot distill (before any weights load). The default accepts every model."""

    @classmethod
    @abstractmethod
    def load(cls, pre: Preflight) -> LoadedSplits:
        """The training and evaluation splits, tokenized for ``"teacher"`` and ``"student"``, and the task."""

    # ---- models -----------------------------------------------------------------------------
    @abstractmethod
    def load_model(self, ref: ModelRef) -> nn.Module:
        """A model with this task's head (a classifier for the labels, or a causal LM)."""

    @abstractmethod
    def load_teacher(self, ref: ModelRef, config: Any, finetune: bool, force: bool) -> tuple[nn.Module, bool]:
        """The teacher and whether it must be fine-tuned first (``finetune``: a [teacher.finetune]
        table exists; ``force``: its ``force = true``)."""

    @abstractmethod
    def student_from_config(self, teacher: nn.Module, overrides: dict[str, int], seed: int) -> nn.Module:
        """A fresh student from the teacher's config with ``student.arch`` overrides."""

    # ---- a batch ----------------------------------------------------------------------------
    @abstractmethod
    def row_mask(
        self, batch: dict[str, Any], role: str, inputs: dict[str, torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        """(B, T) mask of the token rows the feature losses and the monitor see."""

    @abstractmethod
    def predictions(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """The logits the logit losses compare, (n, C): per example, or per response token (a teacher's
        side needs no targets)."""

    @abstractmethod
    def logits_and_labels(
        self,
        logits: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        mask: torch.Tensor,
        batch: dict[str, Any],
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits the logit losses compare, (n, C), and their targets, (n,)."""

    @abstractmethod
    def token_rows(self, enc: data_mod.Encoded, indices: Sequence[int] | None = None) -> list[int]:
        """Per example (of ``indices``, or all), its token rows (:meth:`row_mask`'s ones)."""

    @abstractmethod
    def logit_rows(self, enc: data_mod.Encoded, indices: Sequence[int] | None = None) -> list[int]:
        """Per example, its rows of :meth:`logits_and_labels` (1, or one per response token)."""

    def example_weights(self, split: data_mod.TextSplit) -> list[int]:
        """Per example, what a micro-batch's mean loss counts it as: its logit rows (the student's)."""
        return self.logit_rows(split.encodings["student"])

    # ---- evaluation -------------------------------------------------------------------------
    @abstractmethod
    def evaluate(
        self,
        model: nn.Module,
        tokenizer: Any,
        split: data_mod.TextSplit,
        role: str,
        settings: EvalSettings,
        final: bool,
        reference: list[int] | None = None,
    ) -> Evaluation:
        """Scores of ``model`` on ``split``; for a classifier its predictions (the reference a student's
        teacher agreement is measured against); with ``final``, the per-example records."""

    def eval_batch_size(self, train_batch: int) -> int:
        return train_batch

    def scoring_note(self, split: data_mod.TextSplit, settings: EvalSettings) -> str | None:
        """A line to show before the teacher is scored, when scoring takes a while."""
        return None

    # ---- records ----------------------------------------------------------------------------
    @abstractmethod
    def data_key(self, data: dict[str, Any], train: data_mod.TextSplit) -> dict[str, Any]:
        """The data settings that change a fine-tuned teacher (its cache key)."""

    @abstractmethod
    def summary_data(self, data: dict[str, Any], train: data_mod.TextSplit, evals: data_mod.TextSplit) -> RunData:
        """summary.json's ``data``: the common keys and the task's own."""

    @abstractmethod
    def cached_logit_width(self, teacher: nn.Module) -> int:
        """How many logits per row the teacher-output cache stores."""


def _load_datasets(
    pre: Preflight, columns: dict[str, str | None]
) -> tuple[Any, Any, str, str, data_split.DataSplit | None]:
    """The training and evaluation datasets (capped, columns checked), how to name each in errors, and the
    data.eval_fraction split when the evaluation set is held out of the training split (max_train_samples and
    max_eval_samples cap the two parts after the split)."""
    d = pre.data
    splits = {"where": "data.dataset", "split_key": "data.train_split"}
    train_ds = data_mod.load_split(d.dataset, d.config, d.train_split, **splits)
    train_where = f"data.dataset ({d.dataset}, split {d.train_split})"
    held_out = None
    if d.eval_fraction is not None:
        data_mod.check_columns(train_ds, columns, train_where)
        seed = d.split_seed if d.split_seed is not None else data_split.DEFAULT_SPLIT_SEED
        train_ds, eval_ds, held_out = data_split.split_rows(
            train_ds, d.dataset, d.train_split, d.eval_fraction, seed, pre.data_split, train_where
        )
        eval_where = f"data.dataset ({d.dataset}, data.eval_fraction = {d.eval_fraction} of {d.train_split})"
        pre.emit(
            Stage(
                f"data.eval_fraction = {d.eval_fraction}: {len(eval_ds)} of {held_out.rows} rows held out for "
                f"evaluation (split_seed {seed}{', as recorded' if pre.data_split is not None else ''}), "
                f"{len(train_ds)} to train on"
            )
        )
    elif d.eval_dataset is not None:
        eval_ds = data_mod.load_split(
            d.eval_dataset, None, d.eval_split, where="data.eval_dataset", split_key="data.eval_split"
        )
        eval_where = f"data.eval_dataset ({d.eval_dataset})"
    elif data_mod.is_local_file(d.dataset) and not data_mod.is_sliced(d.eval_split):
        raise DataError(
            f"data.dataset = '{d.dataset}' is a single file, so it has no '{d.eval_split}' split; hold part of it "
            'out with data.eval_fraction = 0.1, or slice it (data.train_split = "train[:90%]" and data.eval_split = '
            '"train[90%:]"), or set data.eval_dataset to a separate evaluation file.'
        )
    else:
        eval_ds = data_mod.load_split(
            d.dataset, d.config, d.eval_split, where="data.dataset", split_key="data.eval_split"
        )
        eval_where = f"data.dataset ({d.dataset}, split {d.eval_split})"
    data_mod.check_columns(train_ds, columns, train_where)
    data_mod.check_columns(eval_ds, columns, eval_where)
    if d.max_train_samples is not None:
        train_ds = train_ds.select(range(min(d.max_train_samples, len(train_ds))))
    if d.max_eval_samples is not None:
        eval_ds = eval_ds.select(range(min(d.max_eval_samples, len(eval_ds))))
    return train_ds, eval_ds, train_where, eval_where, held_out


def _held_out_key(data: dict[str, Any]) -> dict[str, Any]:
    """A fine-tuned teacher's cache key part for data.eval_fraction: the held-out rows are not trained on, so
    another fraction or seed is another training set. Empty without eval_fraction, so existing keys stay valid."""
    if data.get("eval_fraction") is None:
        return {}
    seed = data.get("split_seed")
    return {
        "eval_fraction": data["eval_fraction"],
        "split_seed": data_split.DEFAULT_SPLIT_SEED if seed is None else seed,
    }


def _common_data(data: dict[str, Any], evals: data_mod.TextSplit) -> dict[str, Any]:
    """The keys of summary.json's ``data`` every task writes (:class:`kdgeo.rundir.RunData`): the data
    settings, and the evaluated examples' content hash and count, by which `kdgeo compare` tells whether
    two runs were scored on the same examples (settings alone cannot: a file may change under its name)."""
    common = {f.name: data.get(f.name) for f in dataclasses.fields(RunData)}
    return {**common, "eval_sha256": rundir.eval_sha256(evals.eval_keys()), "eval_examples": len(evals)}


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Sequence classification: one label per text (or text pair); rows are all real tokens."""

    name: ClassVar[str] = "classification"
    per_token_logits: ClassVar[bool] = False
    label_names: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @classmethod
    def load(cls, pre: Preflight) -> LoadedSplits:
        d = pre.data
        columns = {"text_column": d.text_column, "text_pair_column": d.text_pair_column, "label_column": d.label_column}
        train_ds, eval_ds, train_where, eval_where, held_out = _load_datasets(pre, columns)
        info = data_mod.infer_labels(train_ds, d.label_column, train_where)
        if info.num_labels < 2:
            raise DataError(
                f"{train_where}: column '{d.label_column}' has a single class; classification needs at least two."
            )
        splits = []
        for ds, where in ((train_ds, train_where), (eval_ds, eval_where)):
            split = data_mod.TextSplit(
                texts=data_mod.texts_of(ds, d.text_column, where),
                labels=data_mod.labels_as_ids(ds, d.label_column, info, where),
            )
            if d.text_pair_column:
                split.pair_texts = data_mod.texts_of(ds, d.text_pair_column, where)
            _encode(split, {"student": pre.s_tok, "teacher": pre.t_tok}, d.max_length)
            splits.append(split)
        train, evals = splits
        if pre.rows == "tokens" and pre.s_tok is not pre.t_tok:
            # Token rows pair the k-th teacher token with the k-th student token (losses and monitor alike).
            check_tokenizers_agree(
                pre.t_tok,
                pre.s_tok,
                train.texts[:64],
                hint='Set features.rows = "mean" (or "cls") to compare pooled features, or use a student with the '
                "teacher's tokenizer.",
            )
        return LoadedSplits(cls(label_names=tuple(info.names)), train, evals, held_out)

    def load_model(self, ref: ModelRef) -> nn.Module:
        return load_classifier(ref, self.num_labels, list(self.label_names)).model

    def load_teacher(self, ref: ModelRef, config: Any, finetune: bool, force: bool) -> tuple[nn.Module, bool]:
        loaded = load_classifier(ref, self.num_labels, list(self.label_names))
        if loaded.has_trained_head:
            _check_label_order(config, list(self.label_names), ref.ref)
        needs = not loaded.has_trained_head or (finetune and force)
        if needs and not finetune:
            raise ModelLoadError(
                f"teacher.model = '{ref.ref}' has no trained classification head for these {self.num_labels} labels "
                "(freshly initialised: "
                f"{', '.join(loaded.new_keys[:3])}{', ...' if len(loaded.new_keys) > 3 else ''}). Add a "
                "[teacher.finetune] table to fine-tune it on the task first, or give a teacher fine-tuned for this "
                "task."
            )
        return loaded.model, needs

    def student_from_config(self, teacher: nn.Module, overrides: dict[str, int], seed: int) -> nn.Module:
        config: Any = teacher.config
        student = student_from_config(config, overrides, self.num_labels, seed, causal_lm=False)
        student_config: Any = student.config
        student_config.id2label = dict(config.id2label)
        student_config.label2id = dict(config.label2id)
        return student

    def row_mask(
        self, batch: dict[str, Any], role: str, inputs: dict[str, torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        return inputs["attention_mask"]

    def predictions(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return logits  # (B, C)

    def logits_and_labels(
        self,
        logits: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        mask: torch.Tensor,
        batch: dict[str, Any],
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return logits, batch["labels"].to(device)  # (B, C), (B,)

    def token_rows(self, enc: data_mod.Encoded, indices: Sequence[int] | None = None) -> list[int]:
        ids = enc.input_ids if indices is None else [enc.input_ids[i] for i in indices]
        return [len(x) for x in ids]

    def logit_rows(self, enc: data_mod.Encoded, indices: Sequence[int] | None = None) -> list[int]:
        return [1] * (len(enc.input_ids) if indices is None else len(indices))

    def evaluate(
        self,
        model: nn.Module,
        tokenizer: Any,
        split: data_mod.TextSplit,
        role: str,
        settings: EvalSettings,
        final: bool,
        reference: list[int] | None = None,
    ) -> Evaluation:
        from kdgeo.evaluate import prediction_records, score

        s = settings
        scores, preds = score(model, split, self.num_labels, role, s.batch_size, s.device, s.amp, reference=reference)
        return Evaluation(scores, preds, prediction_records(split, preds) if final else None)

    def eval_batch_size(self, train_batch: int) -> int:
        return max(64, train_batch)

    def data_key(self, data: dict[str, Any], train: data_mod.TextSplit) -> dict[str, Any]:
        d = data
        return {
            "dataset": d["dataset"],
            "config": d["config"],
            "split": d["train_split"],
            "text": d["text_column"],
            "pair": d["text_pair_column"],
            "label": d["label_column"],
            "max_length": d["max_length"],
            "max_train_samples": d["max_train_samples"],
            "group_by_length": d["group_by_length"],
            **_held_out_key(d),
        }

    def summary_data(self, data: dict[str, Any], train: data_mod.TextSplit, evals: data_mod.TextSplit) -> RunData:
        return ClassificationData(
            **_common_data(data, evals), text_column=data["text_column"], label_column=data["label_column"]
        )

    def cached_logit_width(self, teacher: nn.Module) -> int:
        return self.num_labels


@dataclass(frozen=True)
class CausalLMTask(Task):
    """Instruction following with a decoder: prompts formatted by a template, losses on response
    tokens only, evaluation by perplexity of the references and ROUGE-L of generated responses.

    ``logit_width``: how many logits the KD term compares when the two models pad their output
    layers differently (None: all)."""

    name: ClassVar[str] = "causal-lm"
    per_token_logits: ClassVar[bool] = True
    logit_width: int | None = None

    @classmethod
    def check_model(cls, config: Any, ref: str, setting: str) -> None:
        check_decoder(config, ref, setting)

    @classmethod
    def load(cls, pre: Preflight) -> LoadedSplits:
        logit_width = _check_vocabularies(pre)
        d = pre.data
        columns = {
            "prompt_column": d.prompt_column,
            "response_column": d.response_column,
            "context_column": d.context_column,
        }
        train_ds, eval_ds, train_where, eval_where, held_out = _load_datasets(pre, columns)
        fmt = lm_data.PromptFormat(d.template, d.context_template, d.chat_template)
        max_prompt = d.max_prompt_length or d.max_length // 2
        splits = []
        for ds, where in ((train_ds, train_where), (eval_ds, eval_where)):
            examples = lm_data.read_examples(ds, d.prompt_column, d.response_column, d.context_column, where)
            split, notes = lm_data.build_split(
                examples,
                fmt,
                {"student": pre.s_tok, "teacher": pre.t_tok},
                d.max_length,
                max_prompt,
                d.long_examples,
                where,
            )
            for note in notes:
                pre.emit(Stage(note))
            splits.append(split)
        train, evals = splits
        s_cfg = pre.s_cfg if pre.s_cfg is not None else pre.t_cfg
        for cfg, role, who in (
            (pre.t_cfg, "teacher", f"the teacher {pre.teacher}"),
            (s_cfg, "student", f"the student {pre.student}".rstrip()),
        ):
            limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
            longest = max(len(p) for p in lm_data.prompt_ids(evals.encodings[role]))
            if isinstance(limit, int) and longest + pre.max_new_tokens > limit:
                raise KdgeoError(
                    f"generate.max_new_tokens = {pre.max_new_tokens}: an evaluation prompt of {longest} tokens plus "
                    f"that many new tokens exceeds the {limit} positions {who} accepts; lower "
                    "generate.max_new_tokens or data.max_prompt_length."
                )
        if pre.s_tok is not pre.t_tok and (pre.rows == "tokens" or "kd" in pre.loss_kinds):
            # Token rows and token-level KD pair the k-th response token of teacher and student: their
            # responses must be the same tokens (prompts may differ, e.g. by a BOS token).
            _check_responses_agree(train, evals, pre)
        return LoadedSplits(cls(logit_width=logit_width), train, evals, held_out)

    def load_model(self, ref: ModelRef) -> nn.Module:
        return load_causal_lm(ref)

    def load_teacher(self, ref: ModelRef, config: Any, finetune: bool, force: bool) -> tuple[nn.Module, bool]:
        # A causal LM always has its head: a [teacher.finetune] table itself asks for SFT.
        return load_causal_lm(ref), finetune

    def student_from_config(self, teacher: nn.Module, overrides: dict[str, int], seed: int) -> nn.Module:
        return student_from_config(teacher.config, overrides, 0, seed, causal_lm=True)

    def row_mask(
        self, batch: dict[str, Any], role: str, inputs: dict[str, torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        return batch["response_mask"][role].to(device)  # (B, T): response tokens only

    def logits_and_labels(
        self,
        logits: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        mask: torch.Tensor,
        batch: dict[str, Any],
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return lm_data.response_predictions(logits, inputs["input_ids"], mask)  # (n, V), (n,)

    def predictions(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return lm_data.response_predictions(logits, inputs["input_ids"], mask)[0]  # (n, V)

    def token_rows(self, enc: data_mod.Encoded, indices: Sequence[int] | None = None) -> list[int]:
        starts = enc.response_start
        assert starts is not None  # set by lm_data.build_split for every causal-LM split
        chosen = range(len(enc.input_ids)) if indices is None else indices
        return [len(enc.input_ids[i]) - starts[i] for i in chosen]  # response tokens

    def logit_rows(self, enc: data_mod.Encoded, indices: Sequence[int] | None = None) -> list[int]:
        return self.token_rows(enc, indices)  # one prediction per response token

    def evaluate(
        self,
        model: nn.Module,
        tokenizer: Any,
        split: data_mod.TextSplit,
        role: str,
        settings: EvalSettings,
        final: bool,
        reference: list[int] | None = None,
    ) -> Evaluation:
        from kdgeo.evaluate_lm import split_scores

        s = settings
        generate = s.generation if (final or s.every_eval) else None
        scored = split_scores(model, tokenizer, split, role, generate, s.batch_size, s.device, s.amp, s.max_samples)
        return Evaluation(scored.scores, None, scored.records(split) if final else None)

    def scoring_note(self, split: data_mod.TextSplit, settings: EvalSettings) -> str | None:
        n = min(len(split), settings.max_samples or len(split))
        return f"scoring the teacher: perplexity and ROUGE-L on {n} generated responses"

    def data_key(self, data: dict[str, Any], train: data_mod.TextSplit) -> dict[str, Any]:
        from kdgeo.teacher_outputs import encoding_digest

        d = data
        return {
            "task": "causal-lm",
            "dataset": d["dataset"],
            "config": d["config"],
            "split": d["train_split"],
            "prompt": d["prompt_column"],
            "response": d["response_column"],
            "context": d["context_column"],
            "template": d["template"],
            "context_template": d["context_template"],
            "chat_template": d["chat_template"],
            "max_prompt_length": d["max_prompt_length"],
            "long_examples": d["long_examples"],
            "max_length": d["max_length"],
            "max_train_samples": d["max_train_samples"],
            "group_by_length": d["group_by_length"],
            "examples": encoding_digest(train),  # which examples survive truncation depends on both tokenizers
            **_held_out_key(d),
        }

    def summary_data(self, data: dict[str, Any], train: data_mod.TextSplit, evals: data_mod.TextSplit) -> RunData:
        return CausalLMData(
            **_common_data(data, evals),
            prompt_column=data["prompt_column"],
            response_column=data["response_column"],
            context_column=data["context_column"],
            max_prompt_length=data["max_prompt_length"] or data["max_length"] // 2,
            long_examples=data["long_examples"],
            # what fitting prompts into max_prompt_length and examples into max_length cut or dropped
            truncation={"train": train.truncation, "eval": evals.truncation},
        )

    def cached_logit_width(self, teacher: nn.Module) -> int:
        config: Any = teacher.config
        return self.logit_width or int(config.vocab_size)


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (ClassificationTask, CausalLMTask)}
"""Tasks by their spec name (``task = "..."``)."""


def _encode(split: data_mod.TextSplit, tokenizers: dict[str, Any], max_length: int) -> None:
    """Tokenize ``split`` for each role; roles that share a tokenizer share one encoding."""
    shared: dict[int, data_mod.Encoded] = {}
    for role, tok in tokenizers.items():
        if id(tok) not in shared:
            shared[id(tok)] = data_mod.encode(tok, split.texts, split.pair_texts, max_length)
        split.encodings[role] = shared[id(tok)]


def _check_label_order(config: Any, names: Sequence[str], teacher: str) -> None:
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


def _check_responses_agree(train: data_mod.TextSplit, evals: data_mod.TextSplit, pre: Preflight) -> None:
    for split, which in ((train, "training"), (evals, "evaluation")):
        t_resp = lm_data.response_ids(split.encodings["teacher"])
        s_resp = lm_data.response_ids(split.encodings["student"])
        for k, (a, b) in enumerate(zip(t_resp, s_resp)):
            if a != b:
                short = split.responses[k] if split.responses else ""
                short = short if len(short) <= 60 else short[:57] + "..."
                uses = [
                    n
                    for n, on in (('features.rows = "tokens"', pre.rows == "tokens"), ("kd", "kd" in pre.loss_kinds))
                    if on
                ]
                raise TokenizerMismatchError(
                    f"{' and '.join(uses)} pair the teacher's and the student's response tokens one by one, but "
                    f"their tokenizers split {which} response {k} ({short!r}) into {len(a)} and {len(b)} tokens "
                    '(end-of-sequence included). Use features.rows = "mean" and geometry losses without kd, or a '
                    "student with the teacher's tokenizer."
                )


def _check_vocabularies(pre: Preflight) -> int | None:
    """Token-level KD compares distributions over the same vocabulary: refuse a pair that has
    none in common. Returns the number of logits to compare (models may pad their output
    layers beyond the tokenizer differently), or None when no loss compares logits."""
    if "kd" not in pre.loss_kinds:
        return None
    t_tok, s_tok = pre.t_tok, pre.s_tok
    if s_tok is not t_tok and t_tok.get_vocab() != s_tok.get_vocab():
        t_vocab, s_vocab = t_tok.get_vocab(), s_tok.get_vocab()
        differ = sorted(set(t_vocab.items()) ^ set(s_vocab.items()))
        example = ", ".join(repr(tok) for tok, _ in differ[:3])
        raise TokenizerMismatchError(
            "losses: kd compares the teacher's and the student's next-token distributions, which needs one shared "
            f"vocabulary, but teacher.model = '{pre.teacher}' has {len(t_vocab)} tokens and student.model = "
            f"'{pre.student}' has {len(s_vocab)} ({len(differ)} entries differ, e.g. {example}). What is possible: "
            'drop kd and distill with geometry losses on pooled features (features.rows = "mean"), which need no '
            "shared vocabulary, or pick a student from the teacher's family (same tokenizer)."
        )
    t_out = getattr(pre.t_cfg, "vocab_size", None)
    s_out = getattr(pre.s_cfg, "vocab_size", None) if pre.s_cfg is not None else t_out
    if isinstance(t_out, int) and isinstance(s_out, int) and t_out != s_out:
        return len(t_tok) if min(t_out, s_out) >= len(t_tok) else min(t_out, s_out)
    return None
