"""On-policy distillation (issue 17): kd.direction = "jsd" (GKD's generalized JSD, TRL's convention) and
train.on_policy (the student's own samples as a batch source), its bookkeeping, exact resume and the spec errors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from kdgeo import data as data_mod
from kdgeo import lm_data
from kdgeo.losses import LossTerm, Objective, kd_loss
from kdgeo.models import ModelRef, load_tokenizer
from kdgeo.on_policy import OnPolicy, chosen
from kdgeo.rundir import read_jsonl
from scipy.special import log_softmax as np_log_softmax
from scipy.special import logsumexp, rel_entr

from cli_helpers import run_cli, tiny_lm_spec, tiny_spec, write_spec

SHORT = {"template": "Q: {prompt}\nA:", "context_template": "Q: {prompt}\nC: {context}\nA:"}


def _logits(seed: int, n: int = 7, c: int = 11, scale: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


# ---- kd.direction = "jsd" -----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_jsd_beta_0_and_1_are_forward_and_reverse_kl(temperature):
    s, t = _logits(0), _logits(1)
    forward = kd_loss(s, t, temperature, "forward")
    reverse = kd_loss(s, t, temperature, "reverse")
    assert float(kd_loss(s, t, temperature, "jsd", beta=0.0)) == pytest.approx(float(forward), rel=1e-6, abs=1e-12)
    assert float(kd_loss(s, t, temperature, "jsd", beta=1.0)) == pytest.approx(float(reverse), rel=1e-6, abs=1e-12)


def test_jsd_is_exactly_symmetric_at_beta_half_and_not_elsewhere():
    s, t = _logits(2, dtype=torch.float32), _logits(3, dtype=torch.float32)
    assert torch.equal(kd_loss(s, t, 1.0, "jsd", beta=0.5), kd_loss(t, s, 1.0, "jsd", beta=0.5))
    assert float(kd_loss(s, t, 1.0, "jsd", beta=0.2)) != pytest.approx(float(kd_loss(t, s, 1.0, "jsd", beta=0.2)))
    # beta <-> 1 - beta with the roles swapped is the same divergence
    assert float(kd_loss(s, t, 1.0, "jsd", beta=0.2)) == pytest.approx(float(kd_loss(t, s, 1.0, "jsd", beta=0.8)), rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_is_bounded_by_the_binary_entropy_times_t_squared(beta, temperature):
    # Nearly disjoint distributions (logits of scale 200) come close to the bound H(beta) <= log 2.
    s, t = _logits(4, scale=200.0), _logits(5, scale=200.0)
    value = float(kd_loss(s, t, temperature, "jsd", beta=beta))
    entropy = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
    assert 0.0 <= value <= entropy * temperature**2 + 1e-9
    assert value <= math.log(2) * temperature**2 + 1e-9
    assert value > 0.5 * entropy * temperature**2  # the test really reaches near the bound
    assert float(kd_loss(s, s, temperature, "jsd", beta=beta)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_gradients_are_finite_for_extreme_logits(beta):
    s = (_logits(6, scale=1e4, dtype=torch.float32)).requires_grad_(True)
    t = _logits(7, scale=1e4, dtype=torch.float32)
    value = kd_loss(s, t, 1.0, "jsd", beta=beta)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_jsd_float64_parity_with_a_scipy_reference(beta):
    temperature = 1.7
    s, t = _logits(8), _logits(9)
    log_p_s = np_log_softmax(s.numpy() / temperature, axis=-1)
    log_p_t = np_log_softmax(t.numpy() / temperature, axis=-1)
    p_s, p_t = np.exp(log_p_s), np.exp(log_p_t)
    if beta == 0.0:
        rows = rel_entr(p_t, p_s).sum(-1)
    elif beta == 1.0:
        rows = rel_entr(p_s, p_t).sum(-1)
    else:
        m = np.exp(logsumexp(np.stack([log_p_t + np.log(beta), log_p_s + np.log(1 - beta)]), axis=0))
        rows = beta * rel_entr(p_t, m).sum(-1) + (1 - beta) * rel_entr(p_s, m).sum(-1)
    want = rows.mean() * temperature**2
    got = kd_loss(s, t, temperature, "jsd", beta=beta)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_jsd_term_from_the_spec_and_its_summary_record():
    from kdgeo.rundir import loss_record
    from kdgeo.spec import KDLoss

    jsd = LossTerm.from_spec(KDLoss(kind="kd", direction="jsd"))
    assert jsd.beta == 0.5 and loss_record(jsd)["beta"] == 0.5
    forward = LossTerm.from_spec(KDLoss(kind="kd"))
    assert forward.beta is None and "beta" not in loss_record(forward)  # other runs' records unchanged
    objective = Objective([LossTerm("kd", temperature=1.0, direction="jsd", beta=0.3)], [], [])
    s, t = _logits(10), _logits(11)
    _, _, parts = objective.grouped(s, torch.zeros(7, dtype=torch.long), t)
    assert float(parts["kd"]) == pytest.approx(float(kd_loss(s, t, 1.0, "jsd", beta=0.3)), rel=1e-12)


def test_ce_is_left_out_of_on_policy_batches_and_logged_as_zero():
    objective = Objective([LossTerm("ce"), LossTerm("kd", direction="jsd", beta=0.5)], [], [])
    s, t = _logits(12).requires_grad_(True), _logits(13)
    labels = torch.zeros(7, dtype=torch.long)
    logit, _, parts = objective.grouped(s, labels, t, references=False)
    assert float(parts["ce"]) == 0.0
    assert float(logit.detach()) == pytest.approx(float(kd_loss(s, t, 2.0, "jsd", beta=0.5).detach()), rel=1e-12)


# ---- the spec ------------------------------------------------------------------------------------


def _spec_errors(spec: dict, tmp_path) -> str:
    from kdgeo.errors import SpecError
    from kdgeo.spec import load_spec

    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path / "bad.toml", spec))
    return str(info.value)


def test_spec_errors_name_the_problem_and_the_fix(tiny, tiny_lm, tmp_path, capsys):
    err = _spec_errors(tiny_lm_spec(tiny_lm, tmp_path, losses=[{"kind": "kd", "beta": 0.3}]), tmp_path)
    assert 'beta = 0.3 is for direction = "jsd"' in err and "remove beta" in err
    err = _spec_errors(tiny_spec(tiny, tmp_path, train={"on_policy": 0.5}), tmp_path)
    assert "train.on_policy = 0.5" in err and 'task = "causal-lm"' in err
    err = _spec_errors(tiny_lm_spec(tiny_lm, tmp_path, losses=[{"kind": "ce"}], train={"on_policy": 1.0}), tmp_path)
    assert "ce is not applied to on-policy batches" in err
    err = _spec_errors(tiny_lm_spec(tiny_lm, tmp_path, train={"on_policy": 0.5, "distributed": "fsdp"}), tmp_path)
    assert 'train.distributed = "fsdp"' in err and "sharded student" in err
    err = _spec_errors(tiny_lm_spec(tiny_lm, tmp_path, train={"on_policy": 1.5}), tmp_path)
    assert "train.on_policy" in err
    spec = write_spec(tmp_path / "cli.toml", tiny_lm_spec(tiny_lm, tmp_path, losses=[{"kind": "kd", "beta": 0.3}]))
    code, _, err = run_cli(capsys, "distill", str(spec))
    assert code == 2 and 'direction = "jsd"' in err and "Traceback" not in err


# ---- the on/off choice -----------------------------------------------------------------------------


def test_the_choice_is_a_counter_function_that_touches_no_rng():
    before = torch.get_rng_state()
    assert not any(chosen(0.0, 0, e, m) for e in range(3) for m in range(100))
    assert all(chosen(1.0, 0, e, m) for e in range(3) for m in range(100))
    picks = [chosen(0.5, 7, 0, m) for m in range(2000)]
    assert 0.45 < sum(picks) / len(picks) < 0.55
    assert picks == [chosen(0.5, 7, 0, m) for m in range(2000)]  # a resume replays the same choices
    assert picks != [chosen(0.5, 8, 0, m) for m in range(2000)]  # another seed, other choices
    assert torch.equal(before, torch.get_rng_state())


# ---- the on-policy batch -------------------------------------------------------------------------


def _reference_batch(tiny_lm, n: int = 6):
    tok = load_tokenizer(ModelRef(str(tiny_lm["opt_teacher"])))
    rows = [json.loads(line) for line in tiny_lm["train"].read_text().splitlines()[:n]]
    fmt = lm_data.PromptFormat(SHORT["template"], SHORT["context_template"])
    examples = lm_data.LMExamples(prompts=[], responses=[" " + r["response"] for r in rows], instructions=[r["instruction"] for r in rows])
    enc, texts, _ = lm_data.encode_lm(tok, fmt, examples, 64, 32, "truncate", "t")
    split = data_mod.TextSplit(texts=texts, labels=None, encodings={"student": enc, "teacher": enc})
    batch = data_mod.collate(split, list(range(n)))
    batch["position"] = (0, 3)
    return tok, enc, batch


def _source(tok, enc, max_new_tokens: int = 6, max_length: int = 64, counts=None) -> OnPolicy:
    return OnPolicy(
        rate=1.0, seed=0, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, max_length=max_length,
        gen_batch_size=4, stop_ids=[tok.eos_token_id], eos_id=tok.eos_token_id,
        pad_ids={"student": enc.pad_id, "teacher": enc.pad_id}, counts={} if counts is None else counts,
    )


def test_a_sampled_batch_is_prompt_plus_sample_with_the_mask_on_the_sample_only(tiny_lm):
    from transformers import AutoModelForCausalLM

    tok, enc, batch = _reference_batch(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm["opt_student"])
    model.config.dropout = 0.1  # dropout must be off while sampling, and train mode restored after
    model.train()
    counts: dict[str, float] = {}
    source = _source(tok, enc, counts=counts)
    rng = torch.get_rng_state()
    out = source.sample(model, batch, torch.device("cpu"), None)
    again = source.sample(model, batch, torch.device("cpu"), None)
    assert model.training and torch.equal(rng, torch.get_rng_state())  # the global RNG (dropout) is untouched
    assert torch.equal(out["student"]["input_ids"], again["student"]["input_ids"])  # counters, not RNG state
    ids, mask, attn = out["student"]["input_ids"], out["response_mask"]["student"], out["student"]["attention_mask"]
    stopped = 0
    for i in range(ids.shape[0]):
        prompt = enc.input_ids[i][: enc.response_start[i]]
        real = int(attn[i].sum())
        assert ids[i, : len(prompt)].tolist() == prompt and not mask[i, : len(prompt)].any()
        assert mask[i, len(prompt) : real].all() and not mask[i, real:].any()  # padding never in the mask
        sample = ids[i, len(prompt) : real].tolist()
        assert 1 <= len(sample) <= 6 + 1
        if tok.eos_token_id in sample:  # a sample that stopped ends with its stop token, and nothing after it
            assert sample.index(tok.eos_token_id) == len(sample) - 1
            stopped += 1
    assert torch.equal(out["student"]["input_ids"], out["teacher"]["input_ids"])  # one tokenizer: the same rows
    assert counts["micro_batches"] == 2 and counts["generations"] == 12
    assert counts["hit_max_new_tokens"] == 2 * (6 - stopped)
    assert counts["generated_tokens"] == 2 * int(mask.sum())
    # data.max_length cuts prompt + sample as it cuts the references (and counts as hitting the limit)
    short = _source(tok, enc, max_new_tokens=6, max_length=max(enc.response_start[:6]) + 2).sample(
        model, batch, torch.device("cpu"), None
    )
    assert short["student"]["attention_mask"].sum(-1).max() <= max(enc.response_start[:6]) + 2


class _Poisoned(torch.nn.Module):
    """A causal LM whose training forward writes NaN into every logit that does not predict a sampled token and
    every hidden state that is not a sampled token's -- prompt, padding, past the stop token -- worked out from the
    prompt lengths and the attention mask, independently of the batch's response mask."""

    def __init__(self, model: torch.nn.Module, prompt_lengths: list[int]) -> None:
        super().__init__()
        self.model, self.prompt_lengths = model, prompt_lengths

    def forward(self, cache=None, **kwargs):  # `cache`: the KV-cache keyword generation looks for (transformers 5)
        out = self.model(cache=cache, **kwargs)
        if not kwargs.get("output_hidden_states"):
            return out  # sampling: leave it alone
        attn = kwargs["attention_mask"]  # (B, T)
        b, t = attn.shape
        pos = torch.arange(t).expand(b, t)
        plen = torch.tensor(self.prompt_lengths).unsqueeze(-1)
        real = attn.sum(-1, keepdim=True)
        sampled = (pos >= plen) & (pos < real)  # (B, T)
        predicts_sampled = torch.zeros_like(sampled)
        predicts_sampled[:, :-1] = sampled[:, 1:]
        out.logits[~predicts_sampled] = float("nan")
        for h in out.hidden_states:
            h[~sampled] = float("nan")
        return out


def test_prompt_padding_and_tokens_after_the_stop_never_reach_a_loss_on_policy(tiny_lm):
    from kdgeo import distributed
    from kdgeo.step_loss import StepLoss
    from kdgeo.tasks import CausalLMTask
    from transformers import AutoModelForCausalLM

    tok, enc, batch = _reference_batch(tiny_lm)
    plen = enc.response_start[:6]
    student = AutoModelForCausalLM.from_pretrained(tiny_lm["opt_student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm["opt_teacher"]).eval()
    terms = [LossTerm("ce"), LossTerm("kd", direction="jsd", beta=0.5, temperature=1.0)] + [
        LossTerm(k) for k in ("procrustes", "gram", "cka", "projection")
    ]
    torch.manual_seed(0)
    objective = Objective(terms, [(1, 2), (2, 4)], [(32, 64)] * 2)
    dist = distributed.SINGLE

    def losses(s_model, t_model):
        step = StepLoss(s_model, t_model, objective, CausalLMTask(), ((1, 2), (2, 4)), "tokens", torch.device("cpu"),
                        None, None, None, None, False, dist, _source(tok, enc))
        logit, feature, parts = step(dict(batch))
        return {k: float(v) for k, v in parts.items()} | {"total": float((logit + feature).detach())}

    clean = losses(student, teacher)
    poisoned = losses(_Poisoned(student, plen), _Poisoned(teacher, plen))
    assert all(math.isfinite(v) for v in poisoned.values()), poisoned
    assert clean["ce"] == 0.0
    for key, value in clean.items():
        assert poisoned[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


# ---- end to end ------------------------------------------------------------------------------------


def _lm_spec(tiny_lm, tmp_path, **train):
    return tiny_lm_spec(
        tiny_lm, tmp_path,
        data={**tiny_lm_spec(tiny_lm, tmp_path)["data"], **SHORT, "max_train_samples": 16, "max_eval_samples": 3},
        losses=[{"kind": "ce"}, {"kind": "kd", "direction": "jsd", "temperature": 1.0}, {"kind": "procrustes"}],
        train={"epochs": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "warmup_ratio": 0.0, **train},
        monitor={"every": 0, "samples": 3},
        generate={"max_new_tokens": 4, "batch_size": 4, "temperature": 1.0},
    )


def _run(tiny_lm, tmp_path, capsys, name: str, *extra: str, **train) -> dict:
    path = write_spec(tmp_path / f"{name}.toml", _lm_spec(tiny_lm, tmp_path, **train))
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", f"output.name={name}", *extra)
    assert code == 0, err
    return json.loads((tmp_path / "runs" / name / "summary.json").read_text())


def _weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "student" / "model.safetensors")


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _steps(run) -> list[dict]:
    return [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "step"]


def test_on_policy_zero_is_todays_run_bit_for_bit(tiny_lm, tmp_path, capsys):
    today = _run(tiny_lm, tmp_path, capsys, "today", max_steps=4)
    zero = _run(tiny_lm, tmp_path, capsys, "zero", max_steps=4, on_policy=0.0)
    runs = tmp_path / "runs"
    assert _same_weights(runs / "today", runs / "zero")
    assert [e["loss"] for e in _steps(runs / "today")] == [e["loss"] for e in _steps(runs / "zero")]
    assert "on_policy" not in today and "on_policy" not in zero and "on_policy" not in _steps(runs / "zero")[0]


def test_on_policy_one_trains_every_step_on_samples_and_eval_scores_the_run(tiny_lm, tmp_path, capsys):
    summary = _run(tiny_lm, tmp_path, capsys, "gkd", on_policy=1.0)
    run = tmp_path / "runs" / "gkd"
    record = summary["on_policy"]
    assert record["rate"] == 1.0 and record["micro_batches"] == summary["steps"] == 8
    assert record["generations"] == 32 and 1.0 <= record["generated_tokens_mean"] <= 5.0
    assert 0.0 <= record["hit_max_new_tokens"] <= 1.0 and 0.0 < record["generation_seconds"] < summary["train_seconds"]
    steps = _steps(run)
    assert all(e["ce"] == 0.0 and math.isfinite(e["kd"]) and math.isfinite(e["procrustes"]) for e in steps)
    assert [e["on_policy"]["micro_batches"] for e in steps] == list(range(1, 9))
    # kdgeo eval scores an on-policy run like any causal-LM run: the run's own numbers
    code, _, err = run_cli(capsys, "eval", str(run), "--json", str(tmp_path / "eval.json"))
    assert code == 0, err
    scores = json.loads((tmp_path / "eval.json").read_text())["results"]["model"]["scores"]
    assert scores["rougeL"] == pytest.approx(summary["scores"]["rougeL"], abs=1e-6)
    assert scores["perplexity"] == pytest.approx(summary["scores"]["perplexity"], rel=1e-5)


@pytest.mark.slow
def test_on_policy_combines_with_sequence_kd(tiny_lm, tmp_path, capsys):
    """GKD with the teacher's responses as the off-policy data (TRL's `seq_kd` with `lmbda`): both records."""
    summary = _run(tiny_lm, tmp_path, capsys, "both", max_steps=4, on_policy=0.5, sequence_kd=True)
    assert summary["sequence_kd"]["examples"] == 16 and summary["on_policy"]["rate"] == 0.5
    steps = _steps(tmp_path / "runs" / "both")
    on = [e.get("on_policy", {}).get("micro_batches", 0) for e in steps]
    assert on == sorted(on) and 0 <= on[-1] <= 4 and all(math.isfinite(e["loss"]) for e in steps)


@pytest.mark.slow
def test_the_teacher_output_cache_serves_the_off_policy_batches_only(tiny_lm, tmp_path, capsys):
    """With every batch on-policy the cache is never read: the run equals the uncached one bit for bit (a cached
    value is rounded to fp16, so one read would show)."""
    _run(tiny_lm, tmp_path, capsys, "plain", on_policy=1.0)
    cached = _run(tiny_lm, tmp_path, capsys, "cached", "--set", "output.teacher_outputs=true",
                  "--set", f"output.teacher_outputs_dir={tmp_path / 'outputs'}", on_policy=1.0)
    assert cached["teacher_outputs"] is not None
    assert _same_weights(tmp_path / "runs" / "plain", tmp_path / "runs" / "cached")


def test_resume_in_the_middle_of_an_on_policy_run_is_bit_for_bit(tiny_lm, tmp_path, capsys):
    full = _run(tiny_lm, tmp_path, capsys, "crash", on_policy=0.5, checkpoint_every=3)
    run = tmp_path / "runs" / "crash"
    reference = shutil.copytree(run, tmp_path / "reference")
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    # seed 0 draws micro-batches 3 of epoch 0 and 1, 2 of epoch 1 (kdgeo.on_policy.chosen): both kinds of batch
    assert full["on_policy"]["micro_batches"] == 3
    (run / "summary.json").unlink()
    shutil.rmtree(run / "student")
    shutil.rmtree(run / "checkpoint-6")  # resume from step 3: the next micro-batch is the first on-policy one
    path = tmp_path / "crash.toml"
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "output.name=crash", "--resume")
    assert code == 0, err
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-3")
    assert _same_weights(reference, run)
    assert [(e["step"], e["loss"]) for e in _steps(reference)] == [(e["step"], e["loss"]) for e in _steps(run)]
    counts = ("micro_batches", "generations", "generated_tokens_mean", "hit_max_new_tokens")
    assert {k: resumed["on_policy"][k] for k in counts} == {k: full["on_policy"][k] for k in counts}


def test_step_events_carry_the_counts_and_the_view_shows_them():
    from kdgeo import events
    from kdgeo.report import on_policy_text

    counts = {"micro_batches": 3.0, "generations": 12.0, "generated_tokens": 30.0, "hit_max_new_tokens": 3.0,
              "generation_seconds": 1.25}
    step = events.Step(step=3, total_steps=8, epoch=0.5, lr=1e-3, samples_per_s=2.0, losses={"loss": 1.0},
                       on_policy=counts)
    line = events.to_dict(step)
    assert line["on_policy"] == counts and line["loss"] == 1.0
    assert events.from_dict(json.loads(json.dumps(line))) == step
    plain = events.Step(step=3, total_steps=8, epoch=0.5, lr=1e-3, samples_per_s=2.0, losses={"loss": 1.0})
    assert "on_policy" not in events.to_dict(plain)  # other runs' step lines keep their keys
    assert events.from_dict(events.to_dict(plain)) == plain
    assert on_policy_text(counts) == "on-policy 3 batches, 2.5 tok/sample, 25% at limit, 1.2s sampling"
    assert on_policy_text({}) == "on-policy 0 batches"


@pytest.mark.slow  # a torchrun launch of 2 processes
def test_ddp_on_policy_run_makes_the_counter_choices_on_both_processes(tiny_lm, tmp_path):
    """Under torchrun (2 processes, gloo) each process samples for its own share; the on/off choices are the
    counter's, so no process waits on another at a different kind of batch and the run finishes."""
    import os
    import subprocess
    import sys

    spec = _lm_spec(tiny_lm, tmp_path, on_policy=0.5, batch_size=2)
    path = write_spec(tmp_path / "ddp.toml", {**spec, "name": "ddp"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "kdgeo", "distill", str(path), "-q"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "ddp" / "summary.json").read_text())
    # 16 examples, 2 processes x batch 2: 4 global micro-batches an epoch, 2 epochs
    want = sum(chosen(0.5, 0, epoch, m) for epoch in range(2) for m in range(4))
    assert summary["processes"] == 2 and summary["steps"] == 8
    assert summary["on_policy"]["micro_batches"] == want and summary["on_policy"]["generations"] == 2 * want
