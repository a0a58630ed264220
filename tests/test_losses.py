"""kdgeo.losses: the KD loss against textbook definitions, and the dtypes the objective computes in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdgeo.losses import LossTerm, Objective, kd_loss


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_directions_match_textbook_kl(temperature):
    """forward = T^2 mean_i sum_c p_t log(p_t / p_s), reverse swaps p_t and p_s, mixed blends (rtol 1e-6)."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(7, 11, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(7, 11, generator=gen, dtype=torch.float64) * 3
    p_s, p_t = _softmax(s.numpy() / temperature), _softmax(t.numpy() / temperature)
    from scipy.special import rel_entr

    forward = rel_entr(p_t, p_s).sum(-1).mean() * temperature**2
    reverse = rel_entr(p_s, p_t).sum(-1).mean() * temperature**2
    assert float(kd_loss(s, t, temperature, "forward")) == pytest.approx(forward, rel=1e-6)
    assert float(kd_loss(s, t, temperature, "reverse")) == pytest.approx(reverse, rel=1e-6)
    assert float(kd_loss(s, t, temperature, "mixed", mix=0.3)) == pytest.approx(0.3 * forward + 0.7 * reverse, rel=1e-6)
    assert forward != pytest.approx(reverse, rel=1e-3)  # the two directions really differ here
    assert float(kd_loss(t, t, temperature, "reverse")) == pytest.approx(0.0, abs=1e-12)


def test_float64_inputs_keep_float64_through_every_loss():
    """The losses upcast half precision to float32 but never cut float64 down to it: ce, kd and
    projection of float64 inputs equal a float64 reference to 1e-12 (float32 would miss by ~1e-8)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    s = torch.randn(16, 8, generator=gen, dtype=torch.float64)  # (N, C)
    t = s + 1e-3 * torch.randn(16, 8, generator=gen, dtype=torch.float64)  # near the student: KL ~ 1e-7
    labels = torch.randint(0, 8, (16,), generator=gen)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)  # (n, d_t)
    y = torch.randn(16, 4, generator=gen, dtype=torch.float64)  # (n, d_s)
    kd = kd_loss(s, t, 2.0)
    reference = 4.0 * (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean()
    assert kd.dtype == torch.float64
    torch.testing.assert_close(kd, reference, rtol=1e-12, atol=0.0)

    terms = [LossTerm("ce"), LossTerm("kd"), LossTerm("projection")]
    objective = Objective(terms, [(1, 2)], [(4, 6)]).double()
    logit_total, feature_total, parts = objective.grouped(s, labels, t, [x], [y])
    total = logit_total + feature_total
    proj = objective.projections[0]
    assert total.dtype == torch.float64 and all(v.dtype == torch.float64 for v in parts.values())
    torch.testing.assert_close(parts["ce"], F.cross_entropy(s, labels), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(parts["projection"], ((y @ proj.weight.T + proj.bias - x) ** 2).mean(), rtol=1e-12, atol=0.0)
    # float32 (and autocast's half precision) still compute in float32, as before
    assert kd_loss(s.float(), t.half(), 2.0).dtype == torch.float32


# ---- LossTerm.from_spec: one [[losses]] entry -> one term ---------------------------------------


def test_loss_term_from_spec_takes_each_kinds_options_and_agrees_with_the_defaults():
    from kdgeo.spec import LOSS_CLASSES, CELoss, KDLoss, ProcrustesLoss

    kd = KDLoss(kind="kd", weight=0.5, temperature=4.0, direction="mixed", mix=0.25)
    assert LossTerm.from_spec(kd) == LossTerm("kd", weight=0.5, temperature=4.0, direction="mixed", mix=0.25)
    assert LossTerm.from_spec(ProcrustesLoss(kind="procrustes", form="angular")) == LossTerm("procrustes", angular=True)
    squared = ProcrustesLoss(kind="procrustes", weight=2.0)
    assert LossTerm.from_spec(squared) == LossTerm("procrustes", weight=2.0, angular=False)
    assert LossTerm.from_spec(CELoss(kind="ce", weight=0.1)) == LossTerm("ce", weight=0.1)
    # Every kind with the spec's defaults gives the term with the dataclass's: the two never drift apart.
    for kind, cls in LOSS_CLASSES.items():
        assert LossTerm.from_spec(cls(kind=kind)) == LossTerm(kind), kind  # type: ignore[call-arg]
