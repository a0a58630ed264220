"""Feature rows, layer pairs and the monotone layer-map search, against plain references."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdgeo.errors import KdgeoError, LayerMapError, TokenizerMismatchError
from kdgeo.features import (
    check_tokenizers_agree,
    resolve_layer_pairs,
    select_rows,
    suggest_layer_map,
    uniform_pairs,
)

# --------------------------------------------------------------------------------------------
# select_rows


@pytest.fixture
def padded() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)  # (B, T, d)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])  # (B, T)
    return hidden, mask


def test_rows_tokens_keeps_real_tokens_in_order(padded):
    hidden, mask = padded
    expected = torch.stack([hidden[b, t] for b in range(3) for t in range(4) if mask[b, t]])  # (9, d)
    got = select_rows(hidden, mask, "tokens")
    assert got.shape == (9, 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_rows_cls_is_first_token(padded):
    hidden, mask = padded
    got = select_rows(hidden, mask, "cls")
    torch.testing.assert_close(got, torch.stack([hidden[b, 0] for b in range(3)]), rtol=0, atol=0)


def test_rows_mean_ignores_padding(padded):
    hidden, mask = padded
    expected = torch.stack([
        sum(hidden[b, t] for t in range(4) if mask[b, t]) / int(mask[b].sum()) for b in range(3)
    ])
    got = select_rows(hidden, mask, "mean")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # padding positions do not matter at all
    changed = hidden.clone()
    changed[mask == 0] = 1e6
    torch.testing.assert_close(select_rows(changed, mask, "mean"), expected, rtol=1e-12, atol=1e-12)


def test_rows_mean_of_fully_masked_example_is_zero_not_nan():
    hidden = torch.ones(2, 3, 4)
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]])
    got = select_rows(hidden, mask, "mean")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor([[1.0] * 4, [0.0] * 4]))


def test_rows_unknown():
    with pytest.raises(ValueError, match="unknown rows 'token'"):
        select_rows(torch.zeros(1, 1, 1), torch.ones(1, 1), "token")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# uniform / last / explicit pairs


@pytest.mark.parametrize("s, t, expected", [
    (2, 4, [(1, 2), (2, 4)]),
    (2, 6, [(1, 3), (2, 6)]),  # the demo: student 1 -> teacher 3, student 2 -> teacher 6
    (3, 12, [(1, 4), (2, 8), (3, 12)]),
    (6, 12, [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)]),
    (4, 4, [(1, 1), (2, 2), (3, 3), (4, 4)]),
    (1, 5, [(1, 5)]),
])
def test_uniform_pairs(s, t, expected):
    assert uniform_pairs(s, t) == expected
    assert resolve_layer_pairs("uniform", s, t) == expected


@pytest.mark.parametrize("s, t", [(2, 4), (3, 7), (5, 12), (4, 4), (6, 3)])
def test_uniform_pairs_invariants(s, t):
    pairs = uniform_pairs(s, t)
    assert [p[0] for p in pairs] == list(range(1, s + 1))
    teachers = [p[1] for p in pairs]
    assert teachers == sorted(teachers) and teachers[-1] == t
    assert all(0 <= x <= t for x in teachers)


def test_last_pair():
    assert resolve_layer_pairs("last", 2, 4) == [(2, 4)]
    assert resolve_layer_pairs("last", 6, 12) == [(6, 12)]


def test_explicit_pairs_are_checked_and_kept_in_order():
    assert resolve_layer_pairs([[2, 4], [1, 2]], 2, 4) == [(2, 4), (1, 2)]
    assert resolve_layer_pairs([(0, 0), (2, 4)], 2, 4) == [(0, 0), (2, 4)]
    assert all(type(x) is int for p in resolve_layer_pairs([[1, 3]], 2, 4) for x in p)


def test_student_index_out_of_range_message():
    with pytest.raises(LayerMapError) as info:
        resolve_layer_pairs([[1, 2], [3, 4]], 2, 4)
    msg = str(info.value)
    assert msg.startswith("features.pairs: impossible layer pair(s): [3, 4]: student index 3 is outside 0..2.")
    assert "the student has 2 layers and the teacher 4" in msg
    assert "0 = embeddings, i = output of layer i" in msg
    assert 'Use pairs = "uniform" or indices in range.' in msg
    assert isinstance(info.value, KdgeoError)


def test_every_bad_pair_is_listed():
    with pytest.raises(LayerMapError) as info:
        resolve_layer_pairs([[-1, 2], [1, 5], [2, 4]], 2, 4)
    msg = str(info.value)
    assert "[-1, 2]: student index -1 is outside 0..2; [1, 5]: teacher index 5 is outside 0..4." in msg


def test_layer_map_error_names_the_given_key():
    with pytest.raises(LayerMapError, match=r"^--pairs: impossible layer pair"):
        resolve_layer_pairs([[9, 9]], 2, 4, where="--pairs")


def test_duplicate_pair():
    with pytest.raises(LayerMapError) as info:
        resolve_layer_pairs([[1, 2], [1, 2]], 2, 4)
    assert str(info.value) == "features.pairs: the same layer pair is listed twice in [[1, 2], [1, 2]]; list each pair once."


def test_probe_is_not_resolved_here():
    with pytest.raises(ValueError, match="unresolved layer pairs 'probe'"):
        resolve_layer_pairs("probe", 2, 4)


def test_empty_explicit_pairs_are_refused():
    from kdgeo.errors import SpecError
    from kdgeo.spec import parse_spec

    text = 'losses = [{ kind = "procrustes" }]\n[teacher]\nmodel = "t"\n[data]\ndataset = "d"\n[features]\npairs = []\n'
    try:
        spec = parse_spec(text)
    except SpecError as err:
        assert "features.pairs" in str(err)
        return
    with pytest.raises(LayerMapError, match="features.pairs"):
        resolve_layer_pairs(spec.features.pairs, 2, 4)


# --------------------------------------------------------------------------------------------
# suggest_layer_map against brute force


def brute_force(table: torch.Tensor, higher_is_better: bool, include_embeddings: bool) -> tuple[list[tuple[int, int]], float]:
    first = 0 if include_embeddings else 1
    students = list(range(first, table.shape[1]))
    teachers = list(range(first, table.shape[0]))
    if len(teachers) >= len(students):
        maps = itertools.combinations(teachers, len(students))  # strictly increasing
    else:
        maps = itertools.combinations_with_replacement(teachers, len(students))  # non-decreasing
    sign = 1.0 if higher_is_better else -1.0
    best, best_map = -float("inf"), None
    for m in maps:
        total = sign * sum(float(table[t, s]) for s, t in zip(students, m))
        if total > best:
            best, best_map = total, m
    return list(zip(students, best_map)), best


def total(table: torch.Tensor, pairs: list[tuple[int, int]], higher_is_better: bool) -> float:
    sign = 1.0 if higher_is_better else -1.0
    return sign * sum(float(table[t, s]) for s, t in pairs)


SIZES = [(4, 2), (6, 2), (6, 3), (5, 5), (7, 4), (3, 1), (12, 6), (2, 4), (1, 3), (3, 5), (2, 2)]  # (L_t, L_s)


@pytest.mark.parametrize("l_t, l_s", SIZES)
@pytest.mark.parametrize("higher_is_better", [True, False])
@pytest.mark.parametrize("include_embeddings", [False, True])
def test_suggest_layer_map_matches_brute_force(l_t, l_s, higher_is_better, include_embeddings):
    gen = torch.Generator().manual_seed(1000 * l_t + 10 * l_s + int(higher_is_better) + 2 * int(include_embeddings))
    for _ in range(5):
        table = torch.rand(l_t + 1, l_s + 1, generator=gen, dtype=torch.float64)  # [teacher, student]
        got = suggest_layer_map(table, higher_is_better, include_embeddings=include_embeddings)
        expected, best = brute_force(table, higher_is_better, include_embeddings)
        assert got == expected
        assert total(table, got, higher_is_better) == pytest.approx(best, rel=1e-12, abs=1e-12)
        first = 0 if include_embeddings else 1
        assert [s for s, _ in got] == list(range(first, l_s + 1))
        teachers = [t for _, t in got]
        assert all(first <= t <= l_t for t in teachers)
        n_teachers = l_t + 1 - first
        if n_teachers >= len(got):
            assert all(b > a for a, b in zip(teachers, teachers[1:])), teachers
        else:
            assert all(b >= a for a, b in zip(teachers, teachers[1:])), teachers


def test_suggest_layer_map_float32_table():
    gen = torch.Generator().manual_seed(5)
    table = torch.rand(7, 4, generator=gen)  # float32 input
    expected, _ = brute_force(table.double(), True, False)
    assert suggest_layer_map(table, True) == expected


def test_suggest_layer_map_direction_matters():
    # peaks at (s=1, t=3) and (s=2, t=6): a similarity picks them, a distance avoids them
    table = torch.full((7, 3), 0.5, dtype=torch.float64)  # [teacher, student]
    table[3, 1] = table[6, 2] = 1.0
    table[1, 1] = table[2, 2] = 0.0
    assert suggest_layer_map(table, higher_is_better=True) == [(1, 3), (2, 6)]
    assert suggest_layer_map(table, higher_is_better=False) == [(1, 1), (2, 2)]


def test_suggest_layer_map_avoids_nan():
    table = torch.zeros(5, 3, dtype=torch.float64)
    table[4, 2] = float("nan")
    table[3, 2] = 0.5
    got = suggest_layer_map(table, higher_is_better=True)
    assert got[-1] == (2, 3)
    assert all(not torch.isnan(table[t, s]) for s, t in got)


def test_suggest_layer_map_no_student_layers():
    assert suggest_layer_map(torch.zeros(5, 1), True) == []


# --------------------------------------------------------------------------------------------
# tokenizers


LETTERS = list("abcdefghijklmnopqrstuvwxyz")
WORDS = ["a", "dog", "is", "an", "animal", "the", "tree", "grows", "in", "forest", "bread", "food"]


def vocab_tokenizer(directory, words):
    """A WordPiece BERT tokenizer from a vocab.txt, loaded the way every saved tokenizer is loaded."""
    from transformers import AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + LETTERS + ["##" + c for c in LETTERS] + words
    (directory / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    toks = {
        "teacher": vocab_tokenizer(root / "words", WORDS),
        "student": vocab_tokenizer(root / "words2", WORDS),
        "student_other_tok": vocab_tokenizer(root / "chars", []),
    }
    assert toks["teacher"].tokenize("a dog") == ["a", "dog"]
    assert toks["student_other_tok"].tokenize("a dog") == ["a", "d", "##o", "##g"]
    return toks


TEXTS = ["a dog is an animal", "the tree grows in the forest", "bread is food"]


def test_same_tokenizer_passes(toks):
    check_tokenizers_agree(toks["teacher"], toks["student"], TEXTS, hint="unused")
    check_tokenizers_agree(toks["teacher"], toks["teacher"], [], hint="unused")


def test_different_tokenizers_raise_with_hint(toks):
    hint = 'Set features.rows = "mean" (or "cls") to compare pooled features.'
    with pytest.raises(TokenizerMismatchError) as info:
        check_tokenizers_agree(toks["teacher"], toks["student_other_tok"], TEXTS, hint=hint)
    msg = str(info.value)
    assert msg == (
        "Teacher and student tokenizers split text differently, so token-level features cannot be paired row by "
        "row: 'a dog is an animal' is 7 teacher tokens [[CLS] a dog is an animal [SEP]] but 16 student tokens "
        "[[CLS] a d ##o ##g i ##s a ...]. " + hint
    )
    assert isinstance(info.value, KdgeoError)


def test_first_differing_text_is_quoted(toks):
    # a text both split alike ("a"), then one they do not
    with pytest.raises(TokenizerMismatchError, match="'bread is food' is 5 teacher tokens"):
        check_tokenizers_agree(toks["teacher"], toks["student_other_tok"], ["a", "bread is food"], hint="h")


def test_long_text_is_shortened_in_the_message(toks):
    text = "animal " * 20
    with pytest.raises(TokenizerMismatchError) as info:
        check_tokenizers_agree(toks["teacher"], toks["student_other_tok"], [text], hint="h")
    assert repr(text[:57] + "...") in str(info.value)


# The same checks on the shared `tiny` fixture's tokenizers, as the models under test load them.


@pytest.fixture(scope="module")
def tiny_toks(tiny):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(tiny[name]) for name in ("teacher", "student", "student_other_tok")}


def test_tiny_same_tokenizer_passes(tiny_toks):
    check_tokenizers_agree(tiny_toks["teacher"], tiny_toks["student"], TEXTS, hint="unused")


def test_tiny_different_tokenizers_raise(tiny_toks):
    assert len(tiny_toks["teacher"]) > 50, "the tiny tokenizer has only its special tokens"
    with pytest.raises(TokenizerMismatchError, match="Teacher and student tokenizers split text differently") as info:
        check_tokenizers_agree(tiny_toks["teacher"], tiny_toks["student_other_tok"], TEXTS, hint="HINT")
    assert str(info.value).endswith("HINT")
