"""On-policy distillation: a batch source that trains a micro-batch on the student's own samples.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes", arXiv 2306.13649): with probability lambda (``train.on_policy``) a micro-batch's reference
responses are replaced by responses the student samples from the same prompts, so the student learns
from the teacher on the sequences it produces itself, the distribution it meets at inference (a
reference-only student never sees its own mistakes: the train/inference mismatch of exposure bias).
Both models then read prompt + sampled response, and the losses of :class:`kdgeo.step_loss.StepLoss`
are computed on the sampled tokens: ``kd`` per token (GKD pairs it with the generalized JSD,
``kd.direction = "jsd"``), every feature loss on those tokens' hidden states. ``ce`` needs the
reference response and is not applied there. TRL's ``GKDTrainer`` is the same scheme without
feature losses; MiniLLM's policy-gradient reverse KL (Gu et al. 2024) is a different objective and is
not implemented.

Exact resume and torchrun: the on/off choice and the sampling randomness are functions of
(run seed, epoch, global micro-batch index) -- hashed, never drawn from the global RNG -- so every
process makes the same choice, a resumed run replays the same samples, and ``train.on_policy = 0``
leaves the global RNG stream (dropout) and so the run exactly as it was.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdgeo import data as data_mod
from kdgeo.generation import generate

COUNTS = ("micro_batches", "generations", "generated_tokens", "hit_max_new_tokens", "generation_seconds")
"""TrainState.on_policy's keys: on-policy micro-batches, responses sampled, their tokens (the end-of-sequence
token included), responses that ended without one (at ``max_new_tokens`` or at ``data.max_length``), and the
seconds spent sampling (part of the step time, and also counted apart)."""


def _hash(*parts: object) -> int:
    """64 bits of blake2b over the parts: a counter-based random number, independent of every RNG."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def chosen(rate: float, seed: int, epoch: int, micro: int) -> bool:
    """Whether global micro-batch ``micro`` of ``epoch`` is on-policy: u < rate with u ~ U[0, 1) a hash of
    (seed, epoch, micro). rate 0 is never and rate 1 always (u is in [0, 1)); no RNG state is read or moved."""
    if rate <= 0.0:
        return False
    return _hash("on-policy", seed, epoch, micro) / 2.0**64 < rate


def summary(counts: dict[str, float], rate: float) -> dict[str, float | int] | None:
    """summary.json's ``on_policy`` record (None when ``rate`` is 0): the cumulative counts plus the mean
    sampled length and the share of samples that hit the length limit."""
    if rate <= 0.0:
        return None
    gens = counts.get("generations", 0.0)
    return {
        "rate": rate,
        "micro_batches": int(counts.get("micro_batches", 0)),
        "generations": int(gens),
        "generated_tokens_mean": counts.get("generated_tokens", 0.0) / gens if gens else 0.0,
        "hit_max_new_tokens": counts.get("hit_max_new_tokens", 0.0) / gens if gens else 0.0,
        "generation_seconds": counts.get("generation_seconds", 0.0),
    }


@dataclass(frozen=True)
class OnPolicy:
    """How one process turns a reference micro-batch into an on-policy one (flat values from the plan)."""

    rate: float
    """lambda: the probability that a micro-batch is on-policy."""
    seed: int
    max_new_tokens: int
    temperature: float
    top_p: float
    max_length: int
    """data.max_length: prompt + sampled response is cut to it, as the reference examples are."""
    gen_batch_size: int
    stop_ids: Sequence[int]
    """Tokens that end a sample (:func:`kdgeo.evaluate_lm.stop_tokens`)."""
    eos_id: int | None
    """Closes a sample that stopped, as every reference response ends (:func:`kdgeo.lm_data.encode_lm`)."""
    pad_ids: dict[str, int]
    """Per role ("student", "teacher"): the split's padding id."""
    rank: int = 0
    counts: dict[str, float] = field(default_factory=dict)
    """TrainState.on_policy (shared, mutated here): checkpointed with the loop state, so resume keeps it."""

    def applies(self, batch: dict[str, Any]) -> bool:
        """Whether ``batch`` (tagged by the loop with ``position`` = (epoch, global micro-batch)) is on-policy."""
        position = batch.get("position")
        return position is not None and chosen(self.rate, self.seed, position[0], position[1])

    def sample(self, model: nn.Module, batch: dict[str, Any], device: torch.device, amp: Any) -> dict[str, Any]:
        """The micro-batch with every reference response replaced by the student's sample.

        ``model`` is the plain student (not a DDP wrapper): it samples under no_grad in eval mode (dropout
        off; :func:`kdgeo.generation.generate` restores train mode) with per-row generators seeded from
        (seed, epoch, micro-batch, rank), so no global RNG moves. Returns a batch of the same layout as
        :func:`kdgeo.data.collate`'s: per role, that role's prompt + the shared sampled tokens, right-padded,
        and ``response_mask`` 1 on the sampled tokens only (prompt, padding and anything after the stop
        token never reach a loss: a sample ends at its stop token, closed by ``eos_id``).
        """
        epoch, micro = batch["position"]
        prompts = {role: _prompts(batch, role) for role in self.pad_ids}  # role -> (B) lists of ids
        longest_prompt = [max(len(p[i]) for p in prompts.values()) for i in range(len(batch["index"]))]
        # No row may outgrow data.max_length (the positions the models were checked against, and the memory
        # of a reference batch): one limit for the whole micro-batch, set by its longest prompt.
        cap = max(1, min(self.max_new_tokens, self.max_length - max(longest_prompt)))
        t0 = time.perf_counter()
        new = generate(
            model,
            self.pad_ids["student"],
            list(self.stop_ids),
            prompts["student"],
            cap,
            self.gen_batch_size,
            device,
            amp,
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=_hash("sample", self.seed, epoch, micro, self.rank) & 0x7FFFFFFF,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        responses, hit = [], 0
        for ids, plen in zip(new, longest_prompt):
            stopped = len(ids) < cap  # generate() drops the stop token; a row of cap tokens had none
            response = list(ids) + ([self.eos_id] if stopped and self.eos_id is not None else [])
            room = max(self.max_length - plen, 1)  # >= cap: only a closing eos can be cut here
            hit += int(not stopped or len(response) > room)
            responses.append(response[:room])
        encodings = {
            role: data_mod.Encoded(
                input_ids=[p + r for p, r in zip(prompts[role], responses)],
                token_type_ids=None,
                pad_id=pad,
                response_start=[len(p) for p in prompts[role]],
            )
            for role, pad in self.pad_ids.items()
        }
        split = data_mod.TextSplit(texts=[""] * len(responses), labels=None, encodings=encodings)
        out = data_mod.collate(split, range(len(responses)))
        out["index"] = batch["index"]
        out["position"] = batch["position"]
        c = self.counts
        for key, value in zip(COUNTS, (1, len(responses), sum(len(r) for r in responses), hit, seconds)):
            c[key] = c.get(key, 0.0) + value
        return out


def _prompts(batch: dict[str, Any], role: str) -> list[list[int]]:
    """Each row's prompt ids: the real tokens before the response (right padding: a prefix of the row)."""
    ids = batch[role]["input_ids"]  # (B, T)
    real = batch[role]["attention_mask"].sum(-1)  # (B,)
    response = batch["response_mask"][role].sum(-1)  # (B,)
    return [ids[i, : int(real[i] - response[i])].tolist() for i in range(ids.shape[0])]
