"""Datasets: loading (built-in and local files), columns, labels, encoding, batching, and their errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_jsonl
from kdgeo import data as D
from kdgeo.errors import DataError, KdgeoError

ROWS = [
    {"text": "a dog is an animal", "label": 0},
    {"text": "bread is food", "label": 1},
    {"text": "the tree grows", "label": 2},
    {"text": "an oak", "label": 2},
]
DEMO_NAMES = ["noun.animal", "noun.artifact", "noun.body", "noun.food",
              "noun.location", "noun.person", "noun.plant", "noun.substance"]


def dataset(**columns):
    import datasets

    return datasets.Dataset.from_dict(columns)


def data_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, KdgeoError)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# the built-in dataset


@pytest.mark.parametrize("split, n", [("train", 2400), ("validation", 800)])
def test_builtin_splits(split, n):
    import datasets

    ds = D.load_split("kdgeo:wordnet-supersenses", None, split)
    assert len(ds) == n
    assert ds.column_names == ["text", "label", "label_name", "synset"]
    feature = ds.features["label"]
    assert isinstance(feature, datasets.ClassLabel)
    assert feature.names == DEMO_NAMES and feature.num_classes == 8
    info = D.infer_labels(ds, "label", "w")
    assert info.names == DEMO_NAMES and info.num_labels == 8 and info.string_to_id is None
    ids = D.labels_as_ids(ds, "label", info, "w")
    assert sorted(set(ids)) == list(range(8))
    assert [info.names[i] for i in ids[:50]] == ds["label_name"][:50]
    D.check_columns(ds, {"text_column": "text", "label_column": "label", "text_pair_column": None}, "w")
    assert len(D.texts_of(ds, "text", "w")) == n


def test_builtin_unknown_name_and_split():
    msg = data_error(D.load_split, "kdgeo:wordnet", None, "train")
    assert msg == "data.dataset = 'kdgeo:wordnet': no such built-in dataset; built-ins are: kdgeo:wordnet-supersenses."
    msg = data_error(D.load_split, "kdgeo:wordnet-supersenses", None, "test", where="data.eval_split")
    assert msg == "data.eval_split = 'kdgeo:wordnet-supersenses' has no split 'test'; its splits are: train, validation."


# --------------------------------------------------------------------------------------------
# local files


def write(tmp_path, fmt: str):
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", ROWS)
    if fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
        return path
    if fmt == "csv":
        path = tmp_path / "d.csv"
        path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS))
        return path
    if fmt == "parquet":
        import pandas as pd

        path = tmp_path / "d.parquet"
        pd.DataFrame(ROWS).to_parquet(path)
        return path
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_files_load(tmp_path, fmt):
    path = write(tmp_path, fmt)
    ds = D.load_split(str(path), None, "validation")  # the split is ignored for local files
    assert sorted(ds.column_names) == ["label", "text"]
    assert ds["text"][:] == [r["text"] for r in ROWS]
    assert ds["label"][:] == [r["label"] for r in ROWS]
    info = D.infer_labels(ds, "label", "w")
    assert info.names == ["0", "1", "2"] and info.string_to_id is None
    assert D.labels_as_ids(ds, "label", info, "w") == [0, 1, 2, 2]


def test_local_suffix_is_case_insensitive(tmp_path):
    path = tmp_path / "D.JSONL"
    write_jsonl(path, ROWS)
    assert len(D.load_split(str(path), None, "train")) == 4


def test_missing_file(tmp_path):
    ref = str(tmp_path / "nope.jsonl")
    msg = data_error(D.load_split, ref, None, "train")
    assert msg == (f"data.dataset = '{ref}': file not found. Give an existing .csv, .json, .jsonl or .parquet file, "
                   "or a hub dataset id.")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("a dog\n")
    msg = data_error(D.load_split, str(path), None, "train", where="data.eval_dataset")
    assert msg == f"data.eval_dataset = '{path}': unsupported file type '.txt'; use .csv, .json, .jsonl or .parquet."


def test_directory(tmp_path):
    msg = data_error(D.load_split, str(tmp_path), None, "train")
    assert msg == f"data.dataset = '{tmp_path}' is a directory; give one .csv, .json, .jsonl or .parquet file."


def test_unreadable_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    msg = data_error(D.load_split, str(path), None, "train")
    assert msg.startswith(f"data.dataset = '{path}': cannot read it as json: ")
    assert msg.endswith("Check the file's format.")


def _empty_file(tmp_path, fmt):
    if fmt == "jsonl":
        path = tmp_path / "e.jsonl"
        path.write_text("")
    elif fmt == "csv":
        path = tmp_path / "e.csv"
        path.write_text("text,label\n")
    else:
        import pandas as pd

        path = tmp_path / "e.parquet"
        pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype="int64")}).to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_empty_local_file_is_a_data_error(tmp_path, fmt):
    path = _empty_file(tmp_path, fmt)
    data_error(D.load_split, str(path), None, "train")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_empty_local_file_says_empty(tmp_path, fmt):
    path = _empty_file(tmp_path, fmt)
    with pytest.raises(DataError) as info:
        ds = D.load_split(str(path), None, "train")
        D.check_columns(ds, {"text_column": "text"}, "data.dataset")
    # the message, less the path (the temporary directory's name contains "empty" too)
    msg = str(info.value).replace(str(path), "PATH")
    assert "is empty" in msg or "0 rows" in msg or "no rows" in msg, msg


# --------------------------------------------------------------------------------------------
# columns


def test_missing_column_lists_available_and_names_the_key():
    ds = dataset(sentence=["a", "b"], label=[0, 1])
    msg = data_error(D.check_columns, ds, {"text_column": "text", "label_column": "label"}, "data.dataset = 'x.csv'")
    assert msg == ("data.dataset = 'x.csv': no column 'text' (set by data.text_column); the dataset has columns: "
                   "sentence, label. Set data.text_column to one of them.")
    msg = data_error(D.check_columns, ds, {"text_column": "sentence", "label_column": "gold"}, "w")
    assert "no column 'gold' (set by data.label_column)" in msg and "Set data.label_column" in msg


def test_optional_column_may_be_unset():
    D.check_columns(dataset(text=["a"], label=[0]), {"text_column": "text", "text_pair_column": None}, "w")


def test_empty_dataset():
    msg = data_error(D.check_columns, dataset(text=[], label=[]), {"text_column": "text"}, "data.dataset = 'x'")
    assert msg == "data.dataset = 'x': the dataset is empty (0 rows); check the file or the split name."


def test_texts_of():
    assert D.texts_of(dataset(text=["a", "b"]), "text", "w") == ["a", "b"]


@pytest.mark.parametrize("values, shown", [
    (["a", None], "row 1 of column 'text' is NoneType (None), not text."),
    ([5, 6], "row 0 of column 'text' is int (5), not text."),
])
def test_non_text_values(values, shown):
    assert data_error(D.texts_of, dataset(text=values), "text", "w").startswith(f"w: {shown}")


def test_non_text_values_from_a_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": None, "label": 1}])
    ds = D.load_split(str(path), None, "train")
    assert data_error(D.texts_of, ds, "text", "data.dataset").startswith("data.dataset: row 1 of column 'text' is NoneType (None), not text.")


# --------------------------------------------------------------------------------------------
# labels


def test_string_labels_map_in_sorted_order():
    ds = dataset(label=["pos", "neg", "neutral", "neg"])
    info = D.infer_labels(ds, "label", "w")
    assert info.names == ["neg", "neutral", "pos"] and info.num_labels == 3
    assert info.string_to_id == {"neg": 0, "neutral": 1, "pos": 2}
    assert D.labels_as_ids(ds, "label", info, "w") == [2, 0, 1, 0]


def test_unknown_string_label_in_eval():
    info = D.infer_labels(dataset(label=["b", "a"]), "label", "train")
    msg = data_error(D.labels_as_ids, dataset(label=["a", "c"]), "label", info, "data.eval_split")
    assert msg == "data.eval_split: row 1 has label 'c', which the training data never uses (known: a, b)."


def test_unknown_string_label_lists_at_most_ten_names():
    names = [f"c{i:02d}" for i in range(12)]
    info = D.infer_labels(dataset(label=names), "label", "train")
    msg = data_error(D.labels_as_ids, dataset(label=["zz"]), "label", info, "ev")
    assert "(known: c00, c01, c02, c03, c04, c05, c06, c07, c08, c09...)" in msg


def test_integer_labels():
    info = D.infer_labels(dataset(label=[2, 0, 2]), "label", "w")
    assert info.names == ["0", "1", "2"]  # 0..max, even if a class is absent
    info = D.infer_labels(dataset(label=[1.0, 0.0]), "label", "w")  # integral floats are integers
    assert info.names == ["0", "1"]
    assert D.labels_as_ids(dataset(label=[1.0, 0.0]), "label", info, "w") == [1, 0]


def test_negative_labels():
    msg = data_error(D.infer_labels, dataset(label=[0, -1, 1]), "label", "data.dataset")
    assert msg.startswith("data.dataset: column 'label' has negative labels (e.g. -1); labels must be 0..num_labels-1")
    assert "unlabelled test split uses -1" in msg


def test_missing_labels():
    msg = data_error(D.infer_labels, dataset(label=[0, None]), "label", "w")
    assert msg == "w: column 'label' has empty labels; every training row needs a label."


@pytest.mark.parametrize("values, kinds", [([0.5, 1.0], "float"), ([[1], [2]], "list")])
def test_label_values_of_the_wrong_kind(values, kinds):
    msg = data_error(D.infer_labels, dataset(label=values), "label", "w")
    assert msg == f"w: column 'label' holds {kinds} values; labels must be integers or class-name strings."


def test_label_out_of_range():
    info = D.infer_labels(dataset(label=[0, 1, 2]), "label", "train")
    msg = data_error(D.labels_as_ids, dataset(label=[0, 3]), "label", info, "data.eval_split")
    assert msg == ("data.eval_split: row 1 has label 3, outside 0..2 (the training data has 3 classes). "
                   "Fix the labels, or train on data that has every class.")
    msg = data_error(D.labels_as_ids, dataset(label=[-1]), "label", info, "ev")
    assert "row 0 has label -1, outside 0..2" in msg


@pytest.mark.parametrize("value", [0.5, "1"])
def test_non_integer_label_in_eval(value):
    info = D.infer_labels(dataset(label=[0, 1, 2]), "label", "train")
    msg = data_error(D.labels_as_ids, dataset(label=[value]), "label", info, "ev")
    assert msg == f"ev: row 0 has label {value!r}; labels must be integers 0..2."


def test_class_label_out_of_range_in_eval():
    import datasets

    features = datasets.Features({"label": datasets.ClassLabel(names=["x", "y"])})
    train = datasets.Dataset.from_dict({"label": [0, 1]}, features=features)
    info = D.infer_labels(train, "label", "w")
    assert info.names == ["x", "y"]
    unlabelled = datasets.Dataset.from_dict({"label": [-1]})  # GLUE test splits use -1
    assert "row 0 has label -1, outside 0..1" in data_error(D.labels_as_ids, unlabelled, "label", info, "ev")


# --------------------------------------------------------------------------------------------
# encoding and batching

LETTERS = list("abcdefghijklmnopqrstuvwxyz")
WORDS = ["a", "dog", "is", "an", "animal", "bread", "food", "the", "tree", "grows", "oak"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + LETTERS + ["##" + c for c in LETTERS] + WORDS
    (directory / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    tok = AutoTokenizer.from_pretrained(directory)
    assert tok.tokenize("a dog") == ["a", "dog"]
    return tok


def test_encode_single_texts(tok):
    enc = D.encode(tok, ["a dog", "bread is food"], None, max_length=16)
    ids = tok.convert_tokens_to_ids
    assert enc.input_ids == [
        ids(["[CLS]", "a", "dog", "[SEP]"]),
        ids(["[CLS]", "bread", "is", "food", "[SEP]"]),
    ]
    assert enc.pad_id == tok.pad_token_id == 0
    assert enc.token_type_ids == [[0] * 4, [0] * 5]


def test_encode_truncates(tok):
    enc = D.encode(tok, ["a dog is an animal a dog is an animal"], None, max_length=5)
    assert len(enc.input_ids[0]) == 5
    assert enc.input_ids[0][-1] == tok.sep_token_id


def test_encode_pairs_have_segment_ids(tok):
    enc = D.encode(tok, ["a dog"], ["an oak"], max_length=16)
    ids = tok.convert_tokens_to_ids
    assert enc.input_ids == [ids(["[CLS]", "a", "dog", "[SEP]", "an", "oak", "[SEP]"])]
    assert enc.token_type_ids == [[0, 0, 0, 0, 1, 1, 1]]


def test_collate_pads_and_masks():
    split = D.TextSplit(
        texts=["x", "y", "z"],
        labels=[2, 0, 1],
        encodings={
            "student": D.Encoded(input_ids=[[5, 6], [5, 6, 7, 8], [9]], token_type_ids=[[0, 0], [0, 0, 1, 1], [0]], pad_id=3),
            "teacher": D.Encoded(input_ids=[[1, 2, 3], [4], [5, 6]], token_type_ids=None, pad_id=0),
        },
    )
    batch = D.collate(split, [1, 2, 0])
    s = batch["student"]
    assert torch.equal(s["input_ids"], torch.tensor([[5, 6, 7, 8], [9, 3, 3, 3], [5, 6, 3, 3]]))
    assert torch.equal(s["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]))
    assert torch.equal(s["token_type_ids"], torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]))
    t = batch["teacher"]
    assert set(t) == {"input_ids", "attention_mask"}  # no token_type_ids when the tokenizer gives none
    assert torch.equal(t["input_ids"], torch.tensor([[4, 0, 0], [5, 6, 0], [1, 2, 3]]))
    assert torch.equal(t["attention_mask"], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]]))
    assert torch.equal(batch["labels"], torch.tensor([0, 1, 2]))
    assert torch.equal(batch["index"], torch.tensor([1, 2, 0]))
    assert all(v.dtype == torch.long for v in (*s.values(), *t.values(), batch["labels"], batch["index"]))


def test_collate_without_labels():
    split = D.TextSplit(texts=["x"], labels=None, encodings={"student": D.Encoded([[1, 2]], None, 0)})
    assert "labels" not in D.collate(split, [0])


def test_collate_real_tokenizer_pairs(tok):
    texts, pairs = ["a dog", "bread is food"], ["an oak", "the tree"]
    split = D.TextSplit(texts=texts, labels=[0, 1], pair_texts=pairs)
    split.encodings["student"] = D.encode(tok, texts, pairs, max_length=32)
    batch = D.collate(split, [0, 1])["student"]
    ref = tok(texts, pairs, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[key], ref[key]), key


def test_subset_keeps_everything_aligned():
    split = D.TextSplit(
        texts=["a", "b", "c"], labels=[0, 1, 2], pair_texts=["x", "y", "z"],
        encodings={"student": D.Encoded([[1], [2], [3]], [[0], [0], [1]], 0)},
    )
    sub = split.subset([2, 0])
    assert (sub.texts, sub.labels, sub.pair_texts) == (["c", "a"], [2, 0], ["z", "x"])
    assert sub.encodings["student"].input_ids == [[3], [1]]
    assert sub.encodings["student"].token_type_ids == [[1], [0]]
    assert len(sub) == 2


@pytest.mark.parametrize("n, batch_size", [(10, 3), (10, 5), (1, 4), (37, 8)])
def test_batch_indices_cover_every_index_once(n, batch_size):
    for shuffle in (False, True):
        batches = D.batch_indices(n, batch_size, shuffle, seed=3, epoch=1)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        assert 1 <= len(batches[-1]) <= batch_size
        if not shuffle:
            assert flat == list(range(n))


def test_batch_indices_depend_only_on_seed_and_epoch():
    a = D.batch_indices(50, 8, True, seed=1, epoch=0)
    torch.manual_seed(123)  # the global RNG does not matter
    torch.rand(10)
    assert D.batch_indices(50, 8, True, seed=1, epoch=0) == a
    assert D.batch_indices(50, 8, True, seed=1, epoch=1) != a
    assert D.batch_indices(50, 8, True, seed=2, epoch=0) != a


def test_batch_indices_empty():
    assert D.batch_indices(0, 4, True, seed=0, epoch=0) == []


def test_iterate_batches():
    split = D.TextSplit(texts=["a", "b", "c"], labels=[0, 1, 0], encodings={"student": D.Encoded([[1], [2, 2], [3]], None, 0)})
    batches = list(D.iterate_batches(split, 2))
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2]]
    assert batches[0]["student"]["input_ids"].shape == (2, 2)


# --------------------------------------------------------------------------------------------
# split slicing for local files and the built-in dataset (issue 16 D)


@pytest.mark.parametrize("spec", ["train[:90%]", "train[90%:]", "train[:7]", "train[:1000]", "train[10%:30%]",
                                  "train[:5%]+train[-5%:]", "train[-3:]"])
def test_local_slices_match_the_datasets_library(tmp_path, spec):
    """Parity: the rows datasets.load_dataset(..., split=spec) gives a file (its ReadInstruction rounding)."""
    import datasets

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(23)])
    expected = datasets.load_dataset("json", data_files=str(path), split=spec, cache_dir=str(tmp_path / "cache"))
    got = D.load_split(str(path), None, spec, split_key="data.train_split")
    assert list(got["text"]) == list(expected["text"])


def test_a_plain_split_name_is_still_ignored_for_a_local_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert len(D.load_split(str(path), None, "validation")) == len(ROWS)


@pytest.mark.parametrize("spec, message", [
    ("train[:90]%", "data.train_split = 'train[:90]%' is not a split name or a split slice (Unrecognized instruction "
     "format: train[:90]%); write a split name (train) or a slice in the datasets syntax: train[:90%], train[90%:], "
     "train[:1000], train[10%:20%], train[:5%]+train[-5%:]."),
    ("validation[:5]", "has no split 'validation'; its splits: train. Slice one of them, e.g. train[:90%]."),
    ("train[10:]", "data.train_split = 'train[10:]' selects no rows of data.dataset"),
])
def test_bad_local_slices_name_the_key_and_the_syntax(tmp_path, spec, message):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert message in data_error(D.load_split, str(path), None, spec, split_key="data.train_split")


def test_a_bad_slice_of_a_hub_dataset_is_named_before_any_download():
    msg = data_error(D.load_split, "kdgeo-test/no-such-dataset", None, "train[a:b]", split_key="data.eval_split")
    assert msg.startswith("data.eval_split = 'train[a:b]' is not a split name or a split slice")


def test_builtin_slices():
    train = D.load_split("kdgeo:wordnet-supersenses", None, "train")
    got = D.load_split("kdgeo:wordnet-supersenses", None, "train[:10]+validation[:5]")
    validation = D.load_split("kdgeo:wordnet-supersenses", None, "validation")
    assert list(got["text"]) == list(train["text"][:10]) + list(validation["text"][:5])
    assert "has no split 'test'; its splits: train, validation" in data_error(
        D.load_split, "kdgeo:wordnet-supersenses", None, "test[:5]"
    )
