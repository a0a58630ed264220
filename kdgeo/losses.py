"""Distillation objectives, built on :mod:`kdgeo.geometry`.

The total loss is a weighted sum of terms, ``L = sum_k w_k L_k``. Logit terms:

- ``ce``: cross-entropy of the student's logits against the gold labels.
- ``kd``: Hinton, Vinyals & Dean (2015), "Distilling the knowledge in a neural network":
  ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, averaged over rows (examples, or response
  tokens of a causal LM); the ``T^2`` keeps gradient magnitudes comparable across temperatures.
  ``direction = "reverse"`` uses ``KL(p_s || p_t)`` instead (mode-seeking; MiniLLM, Gu et al.
  2024, arXiv 2306.08543, argues for it in generation), ``"mixed"`` the blend
  ``mix * forward + (1 - mix) * reverse``, ``"jsd"`` the generalized Jensen-Shannon divergence of
  GKD (Agarwal et al. 2024, arXiv 2306.13649) with ``beta`` (see :func:`kd_loss`).

Causal LMs: :func:`kdgeo.lm_data.response_predictions` keeps the positions that predict a response token
(prompt and padding positions never reach a loss), so ``ce`` and ``kd`` above apply per token.

Feature terms, each averaged over the layer pairs (X = teacher rows, Y = student rows):

- ``procrustes``: ``2 - 2 * ||X^T Y||_*`` on centred, unit-Frobenius X, Y (or ``arccos``);
  Bhattarai et al. (2025), arXiv 2509.25253; Williams et al. (2021).
- ``gram``: ``||X X^T - Y Y^T||_F^2`` on centred, unit-Frobenius X, Y (arXiv 2509.25253).
- ``cka``: ``1 - CKA_linear(X, Y)``, Kornblith et al. (2019).
- ``projection``: ``mean((Y W + b - X)^2)`` with a learned ``W`` per pair: FitNets (Romero et
  al. 2015), TinyBERT (Jiao et al. 2020). The maps train with the student and are never saved
  into it.
- ``mse``: ``mean((Y - X)^2)``, equal widths only.
- ``cosine``: ``1 - mean_i cos(x_i, y_i)``, equal widths only.

To change a loss, change its ``case`` in :meth:`Objective.grouped` (logit terms) or
:meth:`Objective.feature_term` (feature terms), and its formula here; a new kind is named in
:mod:`kdgeo.kinds` first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdgeo import geometry
from kdgeo.kinds import EQUAL_WIDTH_KINDS as EQUAL_WIDTH_KINDS
from kdgeo.kinds import FEATURE_KINDS as FEATURE_KINDS
from kdgeo.kinds import LOGIT_KINDS as LOGIT_KINDS

# The loss kinds' one home is kdgeo.kinds (torch-free, shared with the spec); re-exported above for importers.

if TYPE_CHECKING:  # the spec never needs the losses (it is torch-free); typing only, no import at run time
    from kdgeo.spec import LossSpec


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 when it already is: losses of half-precision (autocast)
    outputs are computed in float32, and a ``train.precision = "fp64"`` run stays in float64
    end to end (a ``.float()`` there would bring back the float32 rounding it exists to avoid)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of the objective (flat values taken from the validated spec)."""

    kind: str
    weight: float = 1.0
    temperature: float = 2.0
    angular: bool = False
    direction: str = "forward"
    mix: float = 0.5
    beta: float | None = None
    """kd with ``direction = "jsd"``: the generalized JSD's beta (None for the other directions)."""

    @classmethod
    def from_spec(cls, loss: LossSpec) -> LossTerm:
        """The term for one validated ``[[losses]]`` entry (:class:`kdgeo.spec.KDLoss`, ...).

        Takes exactly the options the entry's kind has (kd: temperature, direction, mix, beta; procrustes:
        form); the others keep this dataclass's defaults, so no default is written a second time here.
        The spec's defaults for the options it has agree with these (tests/test_losses.py checks).
        """
        names = ("temperature", "direction", "mix", "beta")
        options = {name: getattr(loss, name) for name in names if hasattr(loss, name)}
        if hasattr(loss, "form"):
            options["angular"] = loss.form == "angular"
        return cls(kind=loss.kind, weight=loss.weight, **options)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    direction: str = "forward",
    mix: float = 0.5,
    beta: float = 0.5,
) -> Tensor:
    """T^2 * a divergence between p_t = softmax(z_t / T) and p_s = softmax(z_s / T), summed over classes
    (or the vocabulary), averaged over rows:

    - forward: KL(p_t || p_s) = sum_c p_t,c (log p_t,c - log p_s,c)
    - reverse: KL(p_s || p_t) = sum_c p_s,c (log p_s,c - log p_t,c)
    - mixed:   mix * forward + (1 - mix) * reverse
    - jsd:     the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy
      Distillation of Language Models: Learning from Self-Generated Mistakes", arXiv 2306.13649, eq. 1)
      in TRL's convention (``GKDTrainer.generalized_jsd_loss``):
      ``JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)``, ``m = beta * p_t + (1 - beta) * p_s``,
      with log m = logsumexp(log p_t + log beta, log p_s + log(1 - beta)) so no probability underflows.
      beta = 0 is defined as forward KL(p_t || p_s) and beta = 1 as reverse KL(p_s || p_t), as TRL does:
      the formula itself goes to 0 at both ends (JSD_beta is O(beta (1 - beta))), so the end points are
      a jump, not a limit. At beta = 0.5 it is the symmetric JSD, bounded by log 2; for any beta in (0, 1)
      it is at most the binary entropy H(beta) <= log 2.

    Every direction is multiplied by T^2 (Hinton et al. 2015: it keeps gradient magnitudes comparable
    across temperatures); TRL's GKD divides the logits by T but does not scale by T^2, so kdgeo's jsd at
    T != 1 is TRL's times T^2 (equal at the default T = 1 of the GKD presets).

    student_logits, teacher_logits: (N, C). Computed in float32 (float64 if either is).
    """
    t = temperature
    dtype = geometry.compute_dtype(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.to(dtype) / t, dim=-1)  # (N, C)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / t, dim=-1)  # (N, C)
    n = max(log_p_s.shape[0], 1)

    def forward() -> Tensor:
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)

    def reverse() -> Tensor:
        return (log_p_s.exp() * (log_p_s - log_p_t)).sum() / n

    def jsd() -> Tensor:
        if beta == 0.0:
            return forward()
        if beta == 1.0:
            return reverse()
        b = torch.tensor(beta, dtype=dtype, device=log_p_s.device)
        log_m = torch.logsumexp(torch.stack([log_p_t + torch.log(b), log_p_s + torch.log1p(-b)]), dim=0)  # (N, C)
        kl_t = (log_p_t.exp() * (log_p_t - log_m)).sum()  # KL(p_t || m), summed over rows
        kl_s = (log_p_s.exp() * (log_p_s - log_m)).sum()  # KL(p_s || m)
        return (b * kl_t + (1.0 - b) * kl_s) / n

    match direction:
        case "forward":
            value = forward()
        case "reverse":
            value = reverse()
        case "mixed":
            value = mix * forward() + (1.0 - mix) * reverse()
        case "jsd":
            value = jsd()
        case _:
            raise ValueError(f"unknown kd direction {direction!r}")
    return value * (t * t)


class Objective(nn.Module):
    """The weighted sum of loss terms; owns the learned projection maps (one per layer pair).

    ``pairs`` are (student, teacher) hidden-state indices; ``widths`` are (d_s, d_t) per pair.
    """

    def __init__(
        self, terms: Sequence[LossTerm], pairs: Sequence[tuple[int, int]], widths: Sequence[tuple[int, int]]
    ) -> None:
        super().__init__()
        self.terms = list(terms)
        self.pairs = list(pairs)
        self.widths = list(widths)
        kinds = {t.kind for t in self.terms}
        if kinds & FEATURE_KINDS and not self.pairs:
            raise ValueError("feature losses need at least one layer pair")
        if kinds & EQUAL_WIDTH_KINDS:
            bad = [(p, w) for p, w in zip(self.pairs, self.widths) if w[0] != w[1]]
            if bad:
                raise ValueError(f"mse/cosine need equal widths; pairs {bad} differ")
        self.projections = nn.ModuleList(
            [nn.Linear(d_s, d_t) for d_s, d_t in self.widths] if "projection" in kinds else []
        )

    @property
    def needs_features(self) -> bool:
        return any(t.kind in FEATURE_KINDS for t in self.terms)

    @property
    def needs_teacher_logits(self) -> bool:
        return any(t.kind == "kd" for t in self.terms)

    def feature_term(
        self, kind: str, term: LossTerm, teacher: Sequence[Tensor], student: Sequence[Tensor]
    ) -> list[Tensor]:
        """The term's value for each layer pair: teacher[k] (n, d_t), student[k] (n, d_s)."""
        if kind == "procrustes":
            # Pairs of equal shapes share one batched GEMM and eigh/svdvals (kdgeo.geometry.procrustes_distances).
            return geometry.procrustes_distances(teacher, student, angular=term.angular)
        values = []
        for k, (x, y) in enumerate(zip(teacher, student)):
            match kind:
                case "gram":
                    values.append(geometry.gram_distance(x, y))
                case "cka":
                    values.append(1.0 - geometry.cka(x, y))
                case "projection":
                    proj = self.projections[k]
                    assert isinstance(proj, nn.Linear)  # __init__ fills projections with Linear maps only
                    mapped = proj(y.to(proj.weight.dtype))  # (n, d_t)
                    dtype = geometry.compute_dtype(mapped, x)
                    values.append(F.mse_loss(mapped.to(dtype), x.to(dtype)))
                case "mse":
                    values.append(geometry.mse(x, y))
                case "cosine":
                    values.append(geometry.cosine_distance(x, y))
                case _:
                    raise ValueError(f"unknown feature loss {kind!r}")
        return values

    def grouped(
        self,
        student_logits: Tensor,
        labels: Tensor,
        teacher_logits: Tensor | None = None,
        teacher_features: Sequence[Tensor] = (),
        student_features: Sequence[Tensor] = (),
        references: bool = True,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(weighted sum of the per-row logit terms, weighted sum of the feature terms, parts): parts maps
        each term (and ``kind/pair s-t`` for feature terms) to its unweighted value; the total loss is the sum
        of the two groups.

        The two groups are apart because data-parallel training weights them differently: a
        logit term is a mean over rows, a geometry term a statistic of the whole row matrix.

        student_logits: (N, C) and labels (N,): examples of a classifier, or the response-token
        predictions of a causal LM (see :func:`kdgeo.lm_data.response_predictions`).
        teacher_features[k]: (n, d_t), student_features[k]: (n, d_s) for layer pair k.
        ``references = False`` (an on-policy batch of :mod:`kdgeo.on_policy`: the tokens are the student's
        own samples, not the dataset's answers): ``ce`` is not applied, and its part is logged as 0 so
        every step has the same keys.
        """
        logit_total = student_logits.new_zeros((), dtype=geometry.compute_dtype(student_logits))
        feature_total = student_logits.new_zeros((), dtype=geometry.compute_dtype(student_logits))
        parts: dict[str, Tensor] = {}
        for term in self.terms:
            match term.kind:
                case "ce" if not references:
                    parts["ce"] = student_logits.new_zeros((), dtype=logit_total.dtype)
                    continue
                case "ce":
                    value = F.cross_entropy(at_least_float32(student_logits), labels)
                case "kd":
                    if teacher_logits is None:
                        raise ValueError("kd needs teacher logits")
                    beta = 0.5 if term.beta is None else term.beta
                    value = kd_loss(student_logits, teacher_logits, term.temperature, term.direction, term.mix, beta)
                case kind if kind in FEATURE_KINDS:
                    per_pair = self.feature_term(kind, term, teacher_features, student_features)
                    for (s, t), v in zip(self.pairs, per_pair):
                        parts[f"{kind}/{s}-{t}"] = v.detach()
                    value = torch.stack(per_pair).mean()
                case other:
                    raise ValueError(f"unknown loss kind {other!r}")
            parts[term.kind] = value.detach()
            if term.kind in FEATURE_KINDS:
                feature_total = feature_total + term.weight * value
            else:
                logit_total = logit_total + term.weight * value
        return logit_total, feature_total, parts
