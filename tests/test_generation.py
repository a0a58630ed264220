"""kdgeo.generation: left-padded cached decoding, response NLL, ROUGE-L, lm_scores.

Tiny OPT and GPT-2 models are built in-process (2 layers, width 32) and their weights are
redrawn from N(0, 0.2^2) with a fixed generator: the default init (std 0.02, tied embeddings)
makes a model that only repeats its last input token, which would let position and padding
bugs pass unnoticed. Everything is compared with a plain reference: one unpadded sequence at a
time, no cache, arg-max / log-softmax of the last logits.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdgeo.generation import (
    GenerationArgs,
    _sample,
    generate,
    lm_scores,
    perplexity,
    response_nll,
    response_nll_each,
    rouge_l,
    rouge_l_each,
)

CPU = torch.device("cpu")
V = 64
OPT_PAD, OPT_BOS, OPT_EOS = 1, 2, 3
GPT2_EOS = V - 1
# lengths 3, 7, 1, 5, 9, 2, 4: up to 8 pads per row in one batch
PROMPTS = [
    [5, 6, 7],
    [8, 9, 10, 11, 12, 13, 14],
    [20],
    [30, 31, 32, 33, 34],
    [40, 41, 42, 43, 44, 45, 46, 47, 48],
    [50, 51],
    [9, 19, 29, 39],
]
RTOL, ATOL = 1e-5, 1e-6


def _scramble(model: nn.Module, std: float = 0.2, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def _opt(vocab_size: int = V, pad: int = OPT_PAD, bos: int = OPT_BOS, eos: int = OPT_EOS) -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                       max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=pad, bos_token_id=bos,
                       eos_token_id=eos)
    return _scramble(OPTForCausalLM(config))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=GPT2_EOS,
                        eos_token_id=GPT2_EOS)
    return _scramble(GPT2LMHeadModel(config))


@pytest.fixture(scope="module", params=["opt", "gpt2"])
def model(request: pytest.FixtureRequest) -> nn.Module:
    return _opt() if request.param == "opt" else _gpt2()


@torch.inference_mode()
def _naive_greedy(model: nn.Module, prompt: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Reference decoder: re-run the whole unpadded sequence each step, no mask, no cache."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        tok = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        if tok == eos_id:
            break
        seq.append(tok)
    return seq[len(prompt):]


@torch.inference_mode()
def _naive_nll(model: nn.Module, prompt: list[int], response: list[int]) -> tuple[float, float]:
    """(-sum log p over response targets, -sum log p over prompt targets) of one unpadded row."""
    seq = prompt + response
    logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)  # (T, V)
    nll = [-float(logp[t - 1, seq[t]]) for t in range(1, len(seq))]  # nll[t - 1] scores target seq[t]
    return math.fsum(nll[len(prompt) - 1:]), math.fsum(nll[:len(prompt) - 1])


# ------------------------------------------------------------------------------------------
# (a) batched left-padded greedy == one prompt alone == naive no-cache loop
# ------------------------------------------------------------------------------------------


def test_greedy_batched_equals_alone_and_naive(model: nn.Module) -> None:
    pad = OPT_PAD if model.config.model_type == "opt" else 0
    batched = generate(model, pad, None, PROMPTS, max_new_tokens=10, batch_size=len(PROMPTS), device=CPU)
    mixed = generate(model, pad, None, PROMPTS, max_new_tokens=10, batch_size=3, device=CPU)
    alone = generate(model, pad, None, PROMPTS, max_new_tokens=10, batch_size=1, device=CPU)
    naive = [_naive_greedy(model, p, 10) for p in PROMPTS]
    assert batched == alone == mixed == naive
    assert all(len(ids) == 10 for ids in batched)
    # the fixture model is not degenerate: answers differ between prompts and within one answer
    assert len({tuple(ids) for ids in naive}) > 1
    assert any(len(set(ids)) > 1 for ids in naive)


class _NoPositions(nn.Module):
    """GPT-2 behind a forward that cannot take position_ids (it then counts pads as positions).

    Must be put in eval mode itself: ``generate`` restores the wrapper's training flag, which
    ``nn.Module.train`` propagates to the wrapped model.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: object = None,
                use_cache: bool = True) -> object:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache)


def test_greedy_parity_check_catches_missing_position_ids() -> None:
    # The test above has teeth: without explicit positions, GPT-2 puts left-padded rows at
    # positions shifted by their pad count, and the batched answers drift from the alone ones.
    gpt2 = _gpt2()
    wrong = generate(_NoPositions(gpt2).eval(), 0, None, PROMPTS, max_new_tokens=10, batch_size=len(PROMPTS), device=CPU)
    right = [_naive_greedy(gpt2, p, 10) for p in PROMPTS]
    assert wrong[4] == right[4]  # the longest prompt has no pads, so its positions were right anyway
    assert wrong != right


def test_generate_restores_training_mode_and_validates() -> None:
    opt = _opt()
    opt.train()
    out = generate(opt, OPT_PAD, None, PROMPTS[:2], max_new_tokens=4, batch_size=2, device=CPU)
    assert opt.training
    opt.eval()
    assert out == [_naive_greedy(opt, p, 4) for p in PROMPTS[:2]]  # ran in eval mode (no dropout)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(opt, OPT_PAD, None, [[5], []], max_new_tokens=4, batch_size=2, device=CPU)
    with pytest.raises(ValueError, match="top_p"):
        generate(opt, OPT_PAD, None, [[5]], max_new_tokens=4, batch_size=2, device=CPU, do_sample=True, top_p=0.0)
    assert generate(opt, OPT_PAD, None, PROMPTS, max_new_tokens=0, batch_size=2, device=CPU) == [[] for _ in PROMPTS]
    assert generate(opt, OPT_PAD, None, [], max_new_tokens=4, batch_size=2, device=CPU) == []


def test_generate_under_bf16_autocast_runs() -> None:
    opt = _opt()
    out = generate(opt, OPT_PAD, None, PROMPTS, max_new_tokens=5, batch_size=4, device=CPU, amp=torch.bfloat16)
    assert [len(ids) for ids in out] == [5] * len(PROMPTS)
    assert all(0 <= t < V for ids in out for t in ids)


# ------------------------------------------------------------------------------------------
# (b) eos stops a row, and the batch stops when every row has
# ------------------------------------------------------------------------------------------


def test_eos_stops_rows(model: nn.Module) -> None:
    pad = OPT_PAD if model.config.model_type == "opt" else 0
    free = generate(model, pad, None, PROMPTS, max_new_tokens=10, batch_size=4, device=CPU)
    eos = free[0][0]  # the first token prompt 0 produces: as eos, prompt 0 must answer nothing
    stopped = generate(model, pad, eos, PROMPTS, max_new_tokens=10, batch_size=4, device=CPU)
    assert stopped[0] == []
    # every row is its free-running answer cut before the first eos (eos itself not returned)
    assert stopped == [ids[:ids.index(eos)] if eos in ids else ids for ids in free]
    assert stopped == [_naive_greedy(model, p, 10, eos_id=eos) for p in PROMPTS]
    assert any(len(ids) == 10 for ids in stopped) or all(eos in ids for ids in free)


def test_batch_stops_when_all_rows_are_done() -> None:
    opt = _opt()
    free = generate(opt, OPT_PAD, None, PROMPTS[:1], max_new_tokens=10, batch_size=1, device=CPU)
    calls: list[int] = []
    handle = opt.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = generate(opt, OPT_PAD, free[0][0], PROMPTS[:1], max_new_tokens=10, batch_size=1, device=CPU)
        assert out == [[]] and len(calls) == 1  # the prefill pass only
        calls.clear()
        generate(opt, OPT_PAD, None, PROMPTS[:1], max_new_tokens=10, batch_size=1, device=CPU)
        assert len(calls) == 10  # one pass per new token, none after the last
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------
# (c) sampling: seeded, reproducible, top_p -> 0 is greedy, nucleus mass is right
# ------------------------------------------------------------------------------------------


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model: nn.Module) -> None:
    pad = OPT_PAD if model.config.model_type == "opt" else 0
    kw = dict(max_new_tokens=8, device=CPU, do_sample=True, temperature=1.5)
    a = generate(model, pad, None, PROMPTS, batch_size=4, seed=7, **kw)
    b = generate(model, pad, None, PROMPTS, batch_size=4, seed=7, **kw)
    c = generate(model, pad, None, PROMPTS, batch_size=4, seed=8, **kw)
    alone = generate(model, pad, None, PROMPTS, batch_size=1, seed=7, **kw)
    assert a == b
    assert a != c
    assert a == alone  # a row's draws depend on (seed, its index), not on how rows are batched
    greedy = generate(model, pad, None, PROMPTS, max_new_tokens=8, batch_size=4, device=CPU)
    assert a != greedy
    nucleus = generate(model, pad, None, PROMPTS, batch_size=4, seed=7, **{**kw, "temperature": 1.0}, top_p=1e-6)
    assert nucleus == greedy


def test_sample_draws_from_renormalised_nucleus() -> None:
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log().expand(20000, 4)  # (N, 4)
    gens = [torch.Generator().manual_seed(i) for i in range(20000)]
    # top_p = 0.7: keep 0.5 (mass before 0) and 0.3 (mass before 0.5 < 0.7), cut 0.15 (mass before 0.8)
    draws = _sample(logits, 1.0, 0.7, gens)
    freq = torch.bincount(draws, minlength=4).double() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.625, 0.0, 0.375], dtype=torch.float64), rtol=0, atol=0.015)
    # top_p = 1: the full distribution; temperature 2: p ~ probs^(1/2)
    freq = torch.bincount(_sample(logits, 1.0, 1.0, gens), minlength=4).double() / 20000
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=0.015)
    tempered = probs.sqrt() / probs.sqrt().sum()
    freq = torch.bincount(_sample(logits, 2.0, 1.0, gens), minlength=4).double() / 20000
    torch.testing.assert_close(freq, tempered.double(), rtol=0, atol=0.015)


# ------------------------------------------------------------------------------------------
# (d) response NLL: hand computation, prompt targets never scored
# ------------------------------------------------------------------------------------------

RESPONSES = [[11, 12], [20, 21, 22, 23], [], [5], [60, 61, 62], [7, 7, 7, 7, 7, 7], [33]]


def test_response_nll_equals_hand_computation(model: nn.Module) -> None:
    pad = OPT_PAD if model.config.model_type == "opt" else 0
    nll, count = response_nll(model, PROMPTS, RESPONSES, pad, batch_size=3, device=CPU)
    hand = [_naive_nll(model, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert count == sum(len(r) for r in RESPONSES)
    assert nll == pytest.approx(math.fsum(h[0] for h in hand), rel=RTOL)
    # prompt targets carry real mass, so including them would be visible at this tolerance
    prompt_mass = math.fsum(h[1] for h in hand)
    assert prompt_mass > 1.0
    assert nll + prompt_mass != pytest.approx(nll, rel=RTOL)
    # batching and padding do not matter
    alone, alone_count = response_nll(model, PROMPTS, RESPONSES, pad, batch_size=1, device=CPU)
    assert (alone_count, alone) == (count, pytest.approx(nll, rel=RTOL))


def test_response_nll_each_gives_every_examples_own_sum_and_leaves_the_total_as_it_was() -> None:
    """Per-example NLL (predictions.jsonl) from the same batched passes: each equals that example scored
    alone (rel 1e-6: other rows' padding), they add up to the total, and the total is bit for bit response_nll's."""
    opt = _opt()
    total, count, each = response_nll_each(opt, PROMPTS, RESPONSES, OPT_PAD, batch_size=3, device=CPU)
    assert (total, count) == response_nll(opt, PROMPTS, RESPONSES, OPT_PAD, batch_size=3, device=CPU)
    assert len(each) == len(PROMPTS) and each[2] == 0.0  # the empty response
    for p, r, value in zip(PROMPTS, RESPONSES, each):
        alone, _ = response_nll(opt, [p], [r], OPT_PAD, batch_size=1, device=CPU)
        assert value == pytest.approx(alone, rel=1e-6, abs=1e-9)
    assert math.fsum(each) == pytest.approx(total, rel=1e-12)


def test_response_nll_scores_exactly_the_response_positions() -> None:
    opt = _opt()
    prompt, response = PROMPTS[1], RESPONSES[1]
    full, n_full = response_nll(opt, [prompt], [response], OPT_PAD, batch_size=1, device=CPU)
    # moving the first response token into the prompt removes exactly its term -log p(y_1 | x)
    rest, n_rest = response_nll(opt, [prompt + response[:1]], [response[1:]], OPT_PAD, batch_size=1, device=CPU)
    with torch.inference_mode():
        first = -float(torch.log_softmax(opt(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)[response[0]])
    assert (n_full, n_rest) == (len(response), len(response) - 1)
    assert full - rest == pytest.approx(first, rel=RTOL, abs=ATOL)
    # a row with an empty response adds nothing, even when it is batched (and padded) with others
    again, _ = response_nll(opt, [prompt, [5, 6, 7]], [response, []], OPT_PAD, batch_size=2, device=CPU)
    assert again == pytest.approx(full, rel=RTOL)


def test_response_nll_edge_cases() -> None:
    opt = _opt()
    assert response_nll(opt, [[5, 6]], [[]], OPT_PAD, batch_size=2, device=CPU) == (0.0, 0)
    with pytest.raises(ValueError, match="empty prompt"):
        response_nll(opt, [[]], [[5]], OPT_PAD, batch_size=2, device=CPU)
    with pytest.raises(ValueError, match="differ in length"):
        response_nll(opt, [[5]], [[5], [6]], OPT_PAD, batch_size=2, device=CPU)
    assert math.isnan(perplexity(0.0, 0))
    assert perplexity(2 * math.log(3.0), 2) == pytest.approx(3.0, rel=1e-12)
    assert perplexity(1e6, 1) == math.inf


# ------------------------------------------------------------------------------------------
# (e) ROUGE-L
# ------------------------------------------------------------------------------------------


def test_rouge_l_parity_and_known_values() -> None:
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat", "a quick brown fox", "Cats running fast.", "nothing here", "x"]
    refs = ["the cat is on the mat", "the quick brown dog jumps", "cat runs fast", "completely unrelated", "x y z"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    direct = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    assert rouge_l(preds, refs) == pytest.approx(100 * sum(direct) / len(direct), rel=1e-12)
    assert rouge_l_each(preds, refs) == direct  # the per-example values predictions.jsonl records (x 100)
    # golden values, by hand: LCS 5 of 6 and 6 tokens -> F = 5/6; stemming makes cats/cat, running/runs match
    assert rouge_l(preds[:1], refs[:1]) == pytest.approx(500 / 6, rel=1e-12)
    assert rouge_l(preds[2:3], refs[2:3]) == pytest.approx(100.0, rel=1e-12)
    assert rouge_l(["same words here"], ["same words here"]) == pytest.approx(100.0, rel=1e-12)
    assert rouge_l(["alpha beta"], ["gamma delta"]) == 0.0
    assert math.isnan(rouge_l([], []))
    with pytest.raises(ValueError, match="differ in length"):
        rouge_l(["a"], [])


# ------------------------------------------------------------------------------------------
# (f) lm_scores with a real (in-process) tokenizer
# ------------------------------------------------------------------------------------------

WORDS = "the a cat dog sat ran on under mat rug big small red blue is was and it".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


def test_lm_scores_keys_and_ranges() -> None:
    tok = _tokenizer()
    opt = _opt(vocab_size=len(tok), pad=tok.pad_token_id, bos=tok.eos_token_id, eos=tok.eos_token_id)
    texts = [("the cat sat on", "the mat"), ("a dog ran", "under the big rug"), ("it is", "red and blue"),
             ("the small dog was", "on the mat")]
    prompts = [tok.encode(p, add_special_tokens=False) for p, _ in texts]
    responses = [tok.encode(r + " </s>", add_special_tokens=False) for _, r in texts]
    references = [r for _, r in texts]
    args = GenerationArgs(max_new_tokens=6, batch_size=3)
    scores, preds = lm_scores(opt, tok, prompts, responses, references, args, CPU)

    assert set(scores) == {"rougeL", "perplexity", "response_nll", "response_tokens", "generated_tokens_mean"}
    assert 0.0 <= scores["rougeL"] <= 100.0
    assert scores["response_tokens"] == sum(len(r) for r in responses)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["response_nll"]), rel=1e-12)
    assert 1.0 < scores["perplexity"] < 1e4 and math.isfinite(scores["perplexity"])
    assert 0.0 <= scores["generated_tokens_mean"] <= args.max_new_tokens
    # the predictions are the decoded greedy generations, stopped at </s>, specials dropped
    ids = generate(opt, tok.pad_token_id, tok.eos_token_id, prompts, 6, 3, CPU)
    assert preds == [tok.decode(i, skip_special_tokens=True).strip() for i in ids]
    assert scores["generated_tokens_mean"] == pytest.approx(sum(map(len, ids)) / len(ids), rel=1e-12)
    assert scores["rougeL"] == pytest.approx(rouge_l(preds, references), rel=1e-12)
    nll, count = response_nll(opt, prompts, responses, tok.pad_token_id, 3, CPU)
    assert scores["response_nll"] == pytest.approx(nll / count, rel=1e-12)
    with pytest.raises(ValueError, match="differ in length"):
        lm_scores(opt, tok, prompts, responses, references[:-1], args, CPU)
