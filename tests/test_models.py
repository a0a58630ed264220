"""kdgeo.models: model references, config checks, hidden-state widths, and students built from a teacher."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from kdgeo.errors import LayerMapError, ModelLoadError
from kdgeo.models import check_cls_rows, hidden_widths, is_causal_decoder, student_config, student_from_teacher_layers


# ---- find_layer_list: one rule for students from teacher layers and for FSDP sharding ----------


def _tiny_architectures() -> dict[str, tuple[torch.nn.Module, str]]:
    """BERT, GPT-2, OPT and Llama built from configs in-process, each with the path of its block list."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    bert = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
    gpt2 = GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    opt = OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16)
    llama = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, intermediate_size=32, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=32)
    return {
        "bert": (BertForSequenceClassification(bert), "bert.encoder.layer"),
        "gpt2": (GPT2LMHeadModel(gpt2), "transformer.h"),
        "opt": (OPTForCausalLM(opt), "model.decoder.layers"),
        "llama": (LlamaForCausalLM(llama), "model.layers"),
    }


def test_find_layer_list_finds_the_blocks_of_common_architectures() -> None:
    from torch import nn

    from kdgeo import distributed
    from kdgeo.models import find_layer_list, num_layers

    assert distributed.find_layer_list is find_layer_list  # FSDP shards the blocks a teacher-layers student copies
    for name, (model, path) in _tiny_architectures().items():
        blocks = find_layer_list(model)
        assert blocks is model.get_submodule(path), name
        assert len(blocks) == num_layers(model), name
    assert find_layer_list(nn.Sequential(nn.Linear(2, 2))) is None


def test_find_layer_list_takes_the_list_as_long_as_the_config_says() -> None:
    """Where the two old heuristics disagreed: a shallower list under a block-list name but of the wrong
    length (the FSDP one took it), and a block list under another name (only the students' one found it)."""
    from types import SimpleNamespace

    from torch import nn

    from kdgeo.models import find_layer_list

    def linears(n: int) -> nn.ModuleList:
        return nn.ModuleList(nn.Linear(2, 2) for _ in range(n))

    model = nn.Module()
    model.config = SimpleNamespace(num_hidden_layers=3)  # type: ignore[assignment]
    model.h = linears(1)  # e.g. one adapter
    model.encoder = nn.Module()
    model.encoder.layer = linears(3)
    assert find_layer_list(model) is model.encoder.layer

    other = nn.Module()
    other.config = SimpleNamespace(num_layers=2)  # type: ignore[assignment]
    other.blocks = linears(2)
    assert find_layer_list(other) is other.blocks
    other.config = SimpleNamespace(num_layers=4)  # type: ignore[assignment]
    assert find_layer_list(other) is None  # no list of 4: layer indices would lie


def test_students_from_teacher_layers_of_each_architecture() -> None:
    from kdgeo.models import find_layer_list, num_layers, student_from_teacher_layers

    for name, (teacher, path) in _tiny_architectures().items():
        student = student_from_teacher_layers(teacher, [num_layers(teacher) - 1])
        assert num_layers(student) == 1 and find_layer_list(student) is student.get_submodule(path), name
        blocks = find_layer_list(teacher)
        assert blocks is not None and len(blocks) == num_layers(teacher), name


def test_student_from_a_model_without_a_block_list_is_refused() -> None:
    from types import SimpleNamespace

    import pytest
    from torch import nn

    from kdgeo.errors import ModelLoadError
    from kdgeo.models import student_from_teacher_layers

    model = nn.Sequential(nn.Linear(2, 2))
    model.config = SimpleNamespace(num_hidden_layers=2)  # type: ignore[assignment]
    with pytest.raises(ModelLoadError, match=r"Cannot find the list of 2 transformer layers inside Sequential; use student"):
        student_from_teacher_layers(model, [0])


# ---- model directories --------------------------------------------------------------------------


def _without_tokenizer(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (dest / name).unlink(missing_ok=True)
    return dest


def test_a_model_without_tokenizer_files_is_refused(tiny, tiny_lm, tmp_path):
    """transformers builds a 5-token BERT (or 1-token GPT-2) tokenizer from nothing: every word
    became [UNK] and runs exited 0."""
    from kdgeo.models import ModelRef, load_tokenizer

    bert = _without_tokenizer(tiny["teacher_clf"], tmp_path / "bert")
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer(ModelRef(str(bert)))
    text = str(err.value)
    assert "has no tokenizer" in text and "vocab.txt, tokenizer.json" in text and "holds: config.json, model.safetensors" in text
    opt = _without_tokenizer(tiny_lm["opt_teacher"], tmp_path / "opt")
    with pytest.raises(ModelLoadError, match="vocab.json, merges.txt, tokenizer.json"):
        load_tokenizer(ModelRef(str(opt)), shared_with="The student")
    assert len(load_tokenizer(ModelRef(str(tiny["teacher_clf"])))) > 100  # a real one loads


def test_character_and_byte_tokenizers_count_as_vocabularies():
    """Only special tokens means empty; a byte-level tokenizer without vocabulary files is not."""
    from transformers import ByT5Tokenizer

    from kdgeo.models import _has_vocabulary

    assert _has_vocabulary(ByT5Tokenizer())


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ('{"model_type": "bert", "num_hidden_layers": "four"}', '"num_hidden_layers": "four"; it must be a positive integer'),
        ('{"model_type": "bert", "hidden_size": 64.0}', '"hidden_size": 64.0; it must be a positive integer'),
        ('{"model_type": "bert", "max_position_embeddings": null}', '"max_position_embeddings": null'),
        ('{"model_type": "bert", "num_hidden_layers": true}', '"num_hidden_layers": true'),
        ('{"model_type": "bert", "hidden_size": -64}', '"hidden_size": -64'),
        ("{not json", "is not valid JSON (line 1, column 2"),
        ("[1, 2]", "holds a JSON list, not an object"),
    ],
)
def test_a_broken_config_json_names_file_and_field(tiny, tmp_path, content, expect):
    """A field of the wrong type raised huggingface_hub's StrictDataclassFieldValidationError (a traceback)."""
    from kdgeo.models import ModelRef, load_config

    model = tmp_path / "m"
    shutil.copytree(tiny["teacher_clf"], model)
    (model / "config.json").write_text(content)
    with pytest.raises(ModelLoadError) as err:
        load_config(ModelRef(str(model)))
    assert str(model / "config.json") in str(err.value) and expect in str(err.value), str(err.value)


def test_layer_count_and_width_must_be_positive_integers():
    from types import SimpleNamespace

    from kdgeo.models import hidden_width, num_layers

    with pytest.raises(ModelLoadError, match="at least one layer"):
        num_layers(SimpleNamespace(num_hidden_layers=0))
    with pytest.raises(ModelLoadError, match="no num_hidden_layers"):
        num_layers(SimpleNamespace(num_hidden_layers=True))  # a bool is no layer count
    with pytest.raises(ModelLoadError, match="must be positive"):
        hidden_width(SimpleNamespace(hidden_size=-1))


# ---- hidden-state widths by index (issue 11 C; their consumers are tested in test_layer_widths.py) ----


def _width_configs() -> dict[str, Callable[[], Any]]:
    from transformers import BertConfig, GPT2Config, OPTConfig

    def opt(proj: int, before: bool = True) -> Any:
        return OPTConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=2,
                         max_position_embeddings=32, word_embed_proj_dim=proj, do_layer_norm_before=before)

    return {
        "bert": lambda: BertConfig(
            vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        ),
        "gpt2": lambda: GPT2Config(vocab_size=60, n_embd=32, n_layer=3, n_head=2, n_positions=32),
        "opt": lambda: opt(32),
        "opt_narrow_last": lambda: opt(16, before=False),  # opt-350m's layout: post-norm, 512 of 1024
        "opt_wide_last": lambda: opt(48),
    }


def _real_widths(model: torch.nn.Module) -> list[int]:
    ids = torch.randint(3, 60, (2, 7))  # (B, T)
    with torch.no_grad():
        out = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    hidden = out.hidden_states  # L+1 x (B, T, d_i)
    return [int(h.shape[-1]) for h in hidden]


@pytest.mark.parametrize("family", list(_width_configs()))
def test_hidden_widths_agree_with_real_hidden_states(family):
    """The widths from the config equal the shapes a forward pass gives, for the bare model, the
    causal LM and the classifier, for a student made of teacher blocks, and for students built
    from the config with and without a new hidden_size."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = _width_configs()[family]()
    config.pad_token_id = 0
    expected = {"opt_narrow_last": [32, 32, 32, 16], "opt_wide_last": [32, 32, 32, 48]}.get(family, [32] * 4)
    assert hidden_widths(config) == expected
    torch.manual_seed(0)
    classes = [AutoModel, AutoModelForSequenceClassification] + ([AutoModelForCausalLM] if family != "bert" else [])
    for cls in classes:
        model = cls.from_config(config)
        assert _real_widths(model) == hidden_widths(model) == expected, cls.__name__
    kept = student_from_teacher_layers(model, [0, 2])
    assert _real_widths(kept) == hidden_widths(config, layers=2) == expected[:2] + expected[-1:]
    for overrides in ({"num_hidden_layers": 2}, {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2}):
        s_cfg = student_config(config, overrides, num_labels=3)
        assert _real_widths(AutoModelForSequenceClassification.from_config(s_cfg)) == hidden_widths(s_cfg), overrides


# ---- decoders and first-token rows (issue 11 F) ------------------------------------------------


def _decoder_configs():
    from transformers import BertConfig, GPT2Config, LlamaConfig, OPTConfig, PretrainedConfig, RobertaConfig, T5Config

    custom_lm = PretrainedConfig(architectures=["MyForCausalLM"])
    custom_enc = PretrainedConfig(architectures=["MyModel"])
    return [
        (BertConfig(), False), (RobertaConfig(), False), (T5Config(), False), (custom_enc, False),
        (BertConfig(is_decoder=True), True), (OPTConfig(), True), (GPT2Config(), True), (LlamaConfig(), True),
        (custom_lm, True),
    ]


def test_is_causal_decoder_from_the_config():
    for config, expected in _decoder_configs():
        assert is_causal_decoder(config) is expected, type(config).__name__


def test_cls_rows_refused_for_decoders_only():
    for config, decoder in _decoder_configs():
        if decoder:
            with pytest.raises(LayerMapError, match="the same BOS token for every example"):
                check_cls_rows(config, "m", "teacher.model", 'features.rows = "cls"', "Use mean.")
        else:
            check_cls_rows(config, "m", "teacher.model", 'features.rows = "cls"', "Use mean.")


def test_decoder_first_position_is_the_same_for_every_example(tiny_lm):
    """What the refusal is about: a causal LM's position-0 state depends on the first token only."""
    from kdgeo.models import ModelRef, load_encoder, load_tokenizer

    ref = ModelRef(str(tiny_lm["opt_teacher"]))
    tok, model = load_tokenizer(ref), load_encoder(ref).eval()
    enc = tok(["a small tree", "the large dog barked at night"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states  # L+1 x (2, T, d)
    assert all(torch.allclose(h[0, 0], h[1, 0], atol=1e-6) for h in hidden)


def test_save_model_dir_fsyncs_every_file_and_the_directories_before_the_rename(tiny, tmp_path, monkeypatch):
    """Durable, as the README says: each file's data and both directories reach the disk (os.fsync itself is
    watched, so the test holds whatever helper calls it)."""
    import os

    from transformers import AutoModel, AutoTokenizer

    from kdgeo.models import save_model_dir

    model, tokenizer = AutoModel.from_pretrained(tiny["student"]), AutoTokenizer.from_pretrained(tiny["student"])
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    dest = tmp_path / "out" / "student"
    save_model_dir(model, tokenizer, dest, extra={"note.txt": "hi\n"})
    tmp = str(tmp_path / "out" / f".student.tmp-{os.getpid()}")
    written = sorted(p.name for p in dest.iterdir())
    assert "model.safetensors" in written and "note.txt" in written and "config.json" in written
    assert sorted(os.path.basename(p) for p in synced if os.path.dirname(p) == tmp) == written
    assert tmp in synced and str(tmp_path / "out") in synced  # the entries, then the rename
    assert synced.index(str(tmp_path / "out")) == len(synced) - 1


def test_models_loaded_from_several_threads_at_once_keep_their_tied_head(tiny_lm):
    """transformers swaps ``PreTrainedModel.tie_weights`` for the whole process while it loads; two
    overlapping loads once restored each other's stand-in, and every causal LM loaded afterwards in the
    process had an untied, uninitialised ``lm_head``. kdgeo loads one model at a time per process."""
    import threading

    from transformers import PreTrainedModel

    from kdgeo.models import ModelRef, load_causal_lm

    tie_weights = PreTrainedModel.__dict__["tie_weights"]
    start = threading.Barrier(4, timeout=60)
    models: list[torch.nn.Module] = []
    errors: list[BaseException] = []

    def load() -> None:
        try:
            start.wait()
            for _ in range(3):
                models.append(load_causal_lm(ModelRef(str(tiny_lm["opt_teacher"]))))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(models) == 12
    assert PreTrainedModel.__dict__["tie_weights"] is tie_weights
    after = load_causal_lm(ModelRef(str(tiny_lm["opt_teacher"])))
    for model in [*models, after]:
        head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        assert head.data_ptr() == embed.data_ptr()


# --------------------------------------------------------------------------------------------
# a length nobody set is clamped to the models' positions; one the user set is checked (issue 16 D)


class _Cfg:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def test_fit_length_clamps_a_default_with_a_note():
    from kdgeo.models import fit_length

    models = [(_Cfg(max_position_embeddings=512), "the teacher T", "teacher"),
              (_Cfg(max_position_embeddings=64), "the student S", "student")]
    assert fit_length(128, False, models, "data.max_length") == (
        64, "data.max_length: using 64, the student's max_position_embeddings (the default 128 is longer)")
    assert fit_length(32, False, models, "data.max_length") == (32, None)


def test_fit_length_names_every_model_at_the_limit_and_gpt2_positions():
    from kdgeo.models import fit_length

    models = [(_Cfg(n_positions=64), "the model M", "model"), (_Cfg(max_position_embeddings=64), "the teacher T",
                                                                  "teacher")]
    length, note = fit_length(100, False, models, "--max-length", "the run's")
    assert length == 64
    assert note == "--max-length: using 64, the model's and the teacher's n_positions / max_position_embeddings " \
                   "(the run's 100 is longer)"


def test_fit_length_refuses_a_length_the_user_set():
    from kdgeo.models import fit_length

    with pytest.raises(ModelLoadError, match=r"--max-length = 128 is longer than the student S accepts \(64 positions\)"):
        fit_length(128, True, [(_Cfg(max_position_embeddings=64), "the student S", "student")], "--max-length")
    assert fit_length(64, True, [(_Cfg(max_position_embeddings=64), "the student S", "student")], "x") == (64, None)


def test_fit_length_without_a_known_limit_keeps_the_length():
    from kdgeo.models import fit_length

    assert fit_length(128, False, [(_Cfg(), "the model M", "model")], "--max-length") == (128, None)
