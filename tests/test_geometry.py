"""Tests for kdgeo.geometry: parity with plain references, invariances, the paper's
counterexamples, streaming == batch, finite gradients on degenerate input, and precision.

Every reference here is written out plainly (centring matrix H = I - 11^T/n, explicit Grams,
scipy's Procrustes) and compared with explicit rtol/atol.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import scipy.spatial
import torch
from torch import Tensor

from kdgeo import geometry as g

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# data and plain references
# --------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated(n: int, d_x: int, d_y: int, seed: int = 0, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    """Teacher/student features sharing a latent factor, so every metric is well away from 0."""
    gen = _gen(seed)
    z = torch.randn(n, 5, generator=gen, dtype=F64)  # (n, 5) shared latent
    x = z @ torch.randn(5, d_x, generator=gen, dtype=F64) + 0.5 * torch.randn(n, d_x, generator=gen, dtype=F64)
    y = z @ torch.randn(5, d_y, generator=gen, dtype=F64) + 0.5 * torch.randn(n, d_y, generator=gen, dtype=F64)
    return x.to(dtype), y.to(dtype)


def _orthogonal(d: int, seed: int) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=F64))
    return q  # (d, d)


def _ref_normalized(x: Tensor) -> Tensor:
    """H X / ||H X||_F with the explicit centring matrix H = I - 11^T / n."""
    n = x.shape[0]
    h = torch.eye(n, dtype=F64) - torch.ones(n, n, dtype=F64) / n  # (n, n)
    xc = h @ x.to(F64)
    return xc / torch.linalg.matrix_norm(xc)


def _ref_fg(x: Tensor, y: Tensor) -> float:
    xn, yn = _ref_normalized(x), _ref_normalized(y)
    return float(torch.linalg.matrix_norm(xn @ xn.T - yn @ yn.T) ** 2)


def _ref_cka(x: Tensor, y: Tensor) -> float:
    """Kornblith et al. 2019, Gram form: <HKH, HLH> / (||HKH|| ||HLH||)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=F64) - torch.ones(n, n, dtype=F64) / n
    k = h @ (x.to(F64) @ x.to(F64).T) @ h  # (n, n)
    ell = h @ (y.to(F64) @ y.to(F64).T) @ h  # (n, n)
    return float((k * ell).sum() / (torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(ell)))


def _ref_hsic_unbiased(k: Tensor, ell: Tensor) -> Tensor:
    """Song et al. 2012, eq. (5), written out."""
    n = k.shape[0]
    k, ell = k.clone(), ell.clone()
    k.fill_diagonal_(0.0)
    ell.fill_diagonal_(0.0)
    ones = torch.ones(n, dtype=F64)
    term1 = torch.trace(k @ ell)
    term2 = (ones @ k @ ones) * (ones @ ell @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones @ k @ ell @ ones)
    return (term1 + term2 - term3) / (n * (n - 3))


def _ref_dcka(x: Tensor, y: Tensor) -> float:
    """Debiased CKA on centred features (as in Kornblith et al.'s reference code)."""
    xc = x.to(F64) - x.to(F64).mean(0)
    yc = y.to(F64) - y.to(F64).mean(0)
    k, ell = xc @ xc.T, yc @ yc.T
    h_xy = _ref_hsic_unbiased(k, ell)
    return float(h_xy / torch.sqrt(_ref_hsic_unbiased(k, k) * _ref_hsic_unbiased(ell, ell)))


def _close(actual: float | Tensor, expected: float | Tensor, rtol: float, atol: float) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64), rtol=rtol, atol=atol
    )


# --------------------------------------------------------------------------------------------
# parity with references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("d_x", "d_y"), [(6, 4), (5, 5), (3, 7)])
def test_procrustes_matches_scipy_with_zero_padding(d_x: int, d_y: int) -> None:
    x, y = _correlated(40, d_x, d_y, seed=1)
    d = max(d_x, d_y)
    xp = np.pad(x.numpy(), ((0, 0), (0, d - d_x)))
    yp = np.pad(y.numpy(), ((0, 0), (0, d - d_y)))
    _, _, disparity = scipy.spatial.procrustes(xp, yp)  # standardises both; 1 - rho^2
    rho = g.procrustes_rho(x, y)
    _close(1.0 - rho**2, disparity, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("d_x", "d_y"), [(6, 4), (4, 6)])
def test_procrustes_matches_explicit_orthogonal_fit(d_x: int, d_y: int) -> None:
    x, y = _correlated(30, d_x, d_y, seed=2)
    d = max(d_x, d_y)
    xn = torch.nn.functional.pad(_ref_normalized(x), (0, d - d_x))  # (n, d)
    yn = torch.nn.functional.pad(_ref_normalized(y), (0, d - d_y))  # (n, d)
    u, _, vh = torch.linalg.svd(yn.T @ xn)  # Schönemann 1966: Q = U V^T maximises tr(X^T Y Q)
    q = u @ vh  # (d, d) orthogonal
    fit = float(torch.linalg.matrix_norm(xn - yn @ q) ** 2)
    _close(g.procrustes_distance(x, y), fit, rtol=1e-10, atol=1e-12)
    rho = 1.0 - fit / 2.0
    _close(g.procrustes_distance(x, y, angular=True), math.acos(rho), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("route", ["auto", "gram", "cov"])
@pytest.mark.parametrize(("n", "d_x", "d_y"), [(50, 7, 3), (6, 20, 11)])
def test_gram_and_cka_match_naive_gram_formulas(route: str, n: int, d_x: int, d_y: int) -> None:
    x, y = _correlated(n, d_x, d_y, seed=3)
    _close(g.gram_distance(x, y, route=route), _ref_fg(x, y), rtol=1e-10, atol=1e-12)
    _close(g.cka(x, y, route=route), _ref_cka(x, y), rtol=1e-10, atol=1e-12)
    _close(1.0 - g.cka(x, y, route=route), 1.0 - _ref_cka(x, y), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("route", ["gram", "cov"])
def test_debiased_cka_matches_unbiased_hsic_reference(route: str) -> None:
    x, y = _correlated(25, 6, 4, seed=4)
    expected = _ref_dcka(x, y)
    _close(g.cka(x, y, debiased=True, route=route), expected, rtol=1e-10, atol=1e-12)
    # HSIC_1 is translation invariant: an offset of 1e3 changes nothing.
    _close(g.cka(x + 1e3, y - 1e3, debiased=True, route=route), expected, rtol=1e-9, atol=1e-12)
    # ... and debiased CKA differs from the biased one (the correction is real).
    assert abs(float(g.cka(x, y)) - expected) > 1e-3


def test_projection_residual_matches_least_squares() -> None:
    x, y = _correlated(40, 6, 4, seed=5)
    xn, yn = _ref_normalized(x), _ref_normalized(y)
    w = torch.linalg.lstsq(yn, xn).solution  # (d_y, d_x)
    expected = float(torch.linalg.matrix_norm(yn @ w - xn) ** 2)
    _close(g.projection_residual(x, y), expected, rtol=1e-10, atol=1e-12)
    assert 0.0 < expected < 1.0


@pytest.mark.parametrize("n", [8, 30])
def test_procrustes_routes_agree_on_values_and_gradients(n: int) -> None:
    """The n x n route (detached QR bases) and the svdvals-of-X^T Y route: same value and gradient."""
    x0, y0 = _correlated(n, 16, 12, seed=6)
    results = {}
    for route in ("gram", "cov"):
        x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
        loss = g.procrustes_distance(x, y, route=route)
        loss.backward()
        results[route] = (loss.detach(), x.grad, y.grad)
    for a, b in zip(results["gram"], results["cov"]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert g._procrustes_gram_route_cheaper(64, 768, 384)
    assert not g._procrustes_gram_route_cheaper(4096, 768, 384)
    assert g._gram_route_cheaper(64, 768, 384) and not g._gram_route_cheaper(4096, 768, 384)


def test_pair_metrics_equals_individual_functions() -> None:
    x, y = _correlated(33, 9, 5, seed=7)
    out = g.pair_metrics(x, y)
    assert set(out) == {"procrustes", "cka", "gram"}
    _close(out["procrustes"], g.procrustes_distance(x, y), rtol=1e-12, atol=1e-14)
    _close(out["cka"], g.cka(x, y), rtol=1e-12, atol=1e-14)
    _close(out["gram"], g.gram_distance(x, y), rtol=1e-10, atol=1e-14)


def test_mse_and_cosine() -> None:
    x, y = _correlated(10, 4, 4, seed=8)
    _close(g.mse(x, y), ((x - y) ** 2).mean(), rtol=1e-12, atol=1e-14)
    ref_cos = torch.nn.functional.cosine_similarity(x, y, dim=1).mean()
    _close(g.cosine_distance(x, y), 1.0 - ref_cos, rtol=1e-12, atol=1e-14)
    _close(g.cosine_distance(x, 5.0 * x), 0.0, rtol=0.0, atol=1e-12)
    with pytest.raises(ValueError, match="equal widths"):
        g.mse(x, y[:, :3])
    with pytest.raises(ValueError, match="equal widths"):
        g.cosine_distance(x, y[:, :3])


def test_center_and_normalize() -> None:
    x, _ = _correlated(12, 5, 5, seed=9)
    out = g.center_and_normalize(x + 7.0)
    _close(out, _ref_normalized(x), rtol=1e-12, atol=1e-13)
    assert out.dtype == F64 and g.center_and_normalize(x.float()).dtype == torch.float32
    # zero variance (to the rounding of centring) -> the zero matrix
    assert torch.equal(g.center_and_normalize(torch.full((9, 3), 0.1, dtype=F64)), torch.zeros(9, 3, dtype=F64))


# --------------------------------------------------------------------------------------------
# invariances and identities
# --------------------------------------------------------------------------------------------

INVARIANT: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "procrustes": lambda x, y: g.procrustes_distance(x, y),
    "procrustes_angular": lambda x, y: g.procrustes_distance(x, y, angular=True),
    "gram": lambda x, y: g.gram_distance(x, y),
    "cka": lambda x, y: g.cka(x, y),
    "cka_debiased": lambda x, y: g.cka(x, y, debiased=True),
}


@pytest.mark.parametrize("name", list(INVARIANT))
def test_invariant_to_orthogonal_maps_and_isotropic_scaling(name: str) -> None:
    fn = INVARIANT[name]
    x, y = _correlated(40, 6, 4, seed=10)
    base = fn(x, y)
    variants = [
        (x @ _orthogonal(6, 11), y),
        (x, y @ _orthogonal(4, 12)),
        (x @ _orthogonal(6, 13), y @ _orthogonal(4, 14)),
        (3.7 * x, y),
        (x, 1e-3 * y),
        (1e4 * x + 2.0, -0.01 * y),  # negative scale is an orthogonal map (-I) times a scale
    ]
    for xv, yv in variants:
        _close(fn(xv, yv), base, rtol=1e-9, atol=1e-12)


def test_identical_inputs_give_zero_distance_and_unit_cka() -> None:
    x, _ = _correlated(30, 6, 6, seed=15)
    _close(g.procrustes_distance(x, x), 0.0, rtol=0.0, atol=1e-12)
    _close(g.procrustes_distance(x, 2.0 * x @ _orthogonal(6, 16)), 0.0, rtol=0.0, atol=1e-12)
    # arccos amplifies the rounding of rho ~ 1 - 1e-16 to ~1e-8
    _close(g.procrustes_distance(x, x, angular=True), 0.0, rtol=0.0, atol=1e-7)
    _close(g.gram_distance(x, x), 0.0, rtol=0.0, atol=1e-14)
    _close(g.cka(x, x), 1.0, rtol=0.0, atol=1e-12)
    _close(g.cka(x, x, debiased=True), 1.0, rtol=0.0, atol=1e-12)
    _close(g.projection_residual(x, x), 0.0, rtol=0.0, atol=1e-12)
    _close(g.mse(x, x), 0.0, rtol=0.0, atol=0.0)


def test_zero_variance_conventions() -> None:
    """A zero-variance side is the zero matrix: rho = 0 (D^2 = 2, angle pi/2), CKA = 0."""
    _, y = _correlated(20, 3, 5, seed=17)
    const = torch.full((20, 3), 0.3, dtype=F64)
    yn = _ref_normalized(y)
    _close(g.procrustes_rho(const, y), 0.0, rtol=0.0, atol=0.0)
    _close(g.procrustes_distance(const, y), 2.0, rtol=0.0, atol=0.0)
    _close(g.procrustes_distance(const, y, angular=True), math.pi / 2, rtol=1e-15, atol=0.0)
    _close(g.cka(const, y), 0.0, rtol=0.0, atol=0.0)
    _close(g.cka(const, y, debiased=True), 0.0, rtol=0.0, atol=0.0)
    _close(g.gram_distance(const, y), torch.linalg.matrix_norm(yn.T @ yn) ** 2, rtol=1e-12, atol=0.0)
    _close(g.projection_residual(const, y), 0.0, rtol=0.0, atol=0.0)  # nothing to explain
    _close(g.projection_residual(y, const), 1.0, rtol=0.0, atol=1e-15)  # nothing to explain with
    _close(g.procrustes_distance(const, const), 2.0, rtol=0.0, atol=0.0)

    acc = g.CrossLayerAccumulator([3], [5])
    acc.update([const[:7]], [y[:7]])
    acc.update([const[7:]], [y[7:]])
    _close(acc.compute("procrustes"), [[2.0]], rtol=0.0, atol=0.0)
    _close(acc.compute("procrustes_angular"), [[math.pi / 2]], rtol=1e-15, atol=0.0)
    _close(acc.compute("cka"), [[0.0]], rtol=0.0, atol=0.0)
    _close(acc.compute("gram"), [[g.gram_distance(const, y)]], rtol=1e-12, atol=0.0)
    _close(acc.compute("projection"), [[0.0]], rtol=0.0, atol=0.0)


@pytest.mark.parametrize(
    ("n", "value", "dtype"),
    [(16, 0.7, torch.float32), (1000, 1000.1, torch.float32), (4097, 1.0 / 3.0, F64), (33, 0.7, F64)],
)
def test_constant_input_is_zero_variance_despite_centring_rounding(n: int, value: float, dtype: torch.dtype) -> None:
    """One-pass centring of these constants leaves residues of 1.3-2.6 eps relative (measured),
    above the zero-variance floor; the second centring pass removes them exactly."""
    x = torch.full((n, 4), value, dtype=dtype)
    one_pass = x - x.mean(dim=0, keepdim=True)
    assert float(torch.linalg.vector_norm(one_pass)) > torch.finfo(dtype).eps * float(torch.linalg.vector_norm(x))
    y = torch.randn(n, 3, generator=_gen(18), dtype=dtype)
    assert torch.equal(g.center_and_normalize(x), torch.zeros_like(x))
    _close(g.procrustes_distance(x, y), 2.0, rtol=0.0, atol=0.0)
    _close(g.cka(x, y), 0.0, rtol=0.0, atol=0.0)


# --------------------------------------------------------------------------------------------
# the paper's counterexamples (arXiv 2509.25253)
# --------------------------------------------------------------------------------------------


def test_counterexample_cka_blind_to_orthogonal_perturbation_of_a_subset() -> None:
    """CKA barely sees a perturbation of 20 of 200 rows along a new, orthogonal feature dimension.

    Teacher X (200 x 8, anisotropic); student Y = X (an exact, narrower copy of the perturbed
    teacher); perturbed teacher X' = [X, eps * ||X_c|| * u / ||u||] with u the centred indicator
    of the 20 perturbed rows. Linear CKA moves at 4th order in eps, Procrustes at 2nd (D^2)
    and 1st (angle). Measured (seed 0): eps = 0.1 -> 1 - CKA(X', Y) = 2.76e-4, D^2 = 9.65e-3,
    angle = 0.098 rad; eps = 0.05 -> 1 - CKA = 1.73e-5 (16x less), D^2 = 2.43e-3 (4x less).
    (FG also moves at 4th order here: 1.1e-4 at eps = 0.1.)
    """
    gen = _gen(0)
    n, d = 200, 8
    x = torch.randn(n, d, generator=gen, dtype=F64) @ torch.diag(torch.linspace(1.0, 0.3, d, dtype=F64))
    y = x.clone()
    u = torch.zeros(n, 1, dtype=F64)
    u[:20] = 1.0
    u = u - u.mean()
    xc_norm = torch.linalg.matrix_norm(x - x.mean(0))

    def perturbed(eps: float) -> Tensor:
        return torch.cat([x, eps * xc_norm * u / torch.linalg.vector_norm(u)], dim=1)  # (n, d + 1)

    _close(g.cka(x, y), 1.0, rtol=0.0, atol=1e-12)
    _close(g.procrustes_distance(x, y), 0.0, rtol=0.0, atol=1e-12)
    x1, x2 = perturbed(0.1), perturbed(0.05)
    gap1, gap2 = 1.0 - float(g.cka(x1, y)), 1.0 - float(g.cka(x2, y))
    d1, d2 = float(g.procrustes_distance(x1, y)), float(g.procrustes_distance(x2, y))
    # CKA cannot tell X' from X (a 0.03% change) ...
    _close(g.cka(x1, y), g.cka(x, y), rtol=0.0, atol=5e-4)
    # ... while Procrustes clearly can: D^2 is 35x the CKA gap, the angle ~ eps.
    assert d1 > 30 * gap1
    _close(d1, 9.65e-3, rtol=1e-2, atol=0.0)
    _close(g.procrustes_distance(x1, y, angular=True), 0.0983, rtol=1e-2, atol=0.0)
    # orders in eps: halving eps divides the CKA gap by ~16 and D^2 by ~4
    _close(gap1 / gap2, 16.0, rtol=0.05, atol=0.0)
    _close(d1 / d2, 4.0, rtol=0.05, atol=0.0)


def test_counterexample_zero_projection_loss_with_different_geometry() -> None:
    """A learned least-squares projection reaches ~0 MSE while Procrustes and FG stay large.

    Teacher X = Z B (300 x 16, rank 4); compressed student Y = Z A (300 x 4) with A a rotation
    times diag(1, 0.1, 0.03, 0.01) (condition number 100). W = A^{-1} B maps Y onto X exactly,
    so the FitNets-style loss is ~1e-30, yet the geometry differs. Measured (seed 0):
    projection residual 0, D^2 = 0.94 (of a maximum 2), FG = 0.87, CKA = 0.38.
    """
    gen = _gen(0)
    z = torch.randn(300, 4, generator=gen, dtype=F64)  # (n, 4)
    b = torch.randn(4, 16, generator=gen, dtype=F64)
    x = z @ b  # (300, 16) teacher
    a = _orthogonal(4, 21) @ torch.diag(torch.tensor([1.0, 0.1, 0.03, 0.01], dtype=F64))
    y = z @ a  # (300, 4) student
    xc, yc = x - x.mean(0), y - y.mean(0)
    w = torch.linalg.lstsq(yc, xc).solution  # (4, 16) learned projection
    proj_mse = float(((yc @ w - xc) ** 2).mean())
    assert proj_mse < 1e-20 * float((xc**2).mean())
    _close(g.projection_residual(x, y), 0.0, rtol=0.0, atol=1e-12)
    assert float(g.procrustes_distance(x, y)) > 0.5
    assert float(g.gram_distance(x, y)) > 0.5
    assert float(g.cka(x, y)) < 0.6


# --------------------------------------------------------------------------------------------
# streaming accumulator
# --------------------------------------------------------------------------------------------

T_WIDTHS, S_WIDTHS = [12, 5, 9], [4, 7, 3]
CHUNKS = [7, 1, 50, 13]


def _layers(n: int, widths: list[int], z: Tensor, seed: int, offset: float) -> list[Tensor]:
    gen = _gen(seed)
    return [
        z @ torch.randn(z.shape[1], w, generator=gen, dtype=F64)
        + 0.7 * torch.randn(n, w, generator=gen, dtype=F64)
        + offset
        for w in widths
    ]


def _two_models(n: int, offset: float = 1e3, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    z = torch.randn(n, 4, generator=_gen(seed), dtype=F64)  # shared latent: all pairs correlated
    return _layers(n, T_WIDTHS, z, seed + 1, offset), _layers(n, S_WIDTHS, z, seed + 2, -offset)


def _batch_table(metric: str, teacher: list[Tensor], student: list[Tensor]) -> Tensor:
    fns: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "procrustes": lambda x, y: g.procrustes_distance(x, y),
        "procrustes_angular": lambda x, y: g.procrustes_distance(x, y, angular=True),
        "gram": lambda x, y: g.gram_distance(x, y),
        "cka": lambda x, y: g.cka(x, y),
        "cka_debiased": lambda x, y: g.cka(x, y, debiased=True),
        "projection": lambda x, y: g.projection_residual(x, y),
    }
    return torch.tensor([[float(fns[metric](t, s)) for s in student] for t in teacher], dtype=F64)


def _feed(acc: g.CrossLayerAccumulator, teacher: list[Tensor], student: list[Tensor], chunks: list[int]) -> None:
    start = 0
    for c in chunks:
        acc.update([t[start : start + c] for t in teacher], [s[start : start + c] for s in student])
        start += c
    assert start == teacher[0].shape[0]


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_streaming_equals_batch(offset: float) -> None:
    teacher, student = _two_models(sum(CHUNKS), offset=offset)
    acc = g.CrossLayerAccumulator(T_WIDTHS, S_WIDTHS, debiased=True)
    _feed(acc, teacher, student, CHUNKS)
    assert acc.n == sum(CHUNKS)
    for metric in g.METRICS:
        table = acc.compute(metric)
        assert table.shape == (3, 3) and table.dtype == F64
        torch.testing.assert_close(table, _batch_table(metric, teacher, student), rtol=1e-9, atol=1e-12)
    # debiased CKA against the plain n x n unbiased-HSIC reference, too
    ref = torch.tensor([[_ref_dcka(t, s) for s in student] for t in teacher], dtype=F64)
    torch.testing.assert_close(acc.compute("cka_debiased"), ref, rtol=1e-9, atol=1e-12)


def test_streaming_float32_inputs_and_rank_deficient_layers() -> None:
    """n (=20) below the widths: rank-deficient scatters; float32 inputs are accumulated in float64."""
    gen = _gen(30)
    teacher = [torch.randn(20, w, generator=gen) for w in (32, 24)]
    student = [teacher[0][:, :24] @ torch.randn(24, 24, generator=gen) + torch.randn(20, 24, generator=gen)]
    acc = g.CrossLayerAccumulator([32, 24], [24])
    _feed(acc, teacher, student, [3, 9, 8])
    t64, s64 = [t.double() for t in teacher], [s.double() for s in student]
    for metric in ("procrustes", "procrustes_angular", "gram", "cka"):
        torch.testing.assert_close(acc.compute(metric), _batch_table(metric, t64, s64), rtol=1e-9, atol=1e-12)
    # the 24-wide student spans the whole 19-dim centred sample space: it explains everything
    torch.testing.assert_close(acc.compute("projection"), torch.zeros(2, 1, dtype=F64), rtol=0.0, atol=1e-9)
    torch.testing.assert_close(_batch_table("projection", t64, s64), torch.zeros(2, 1, dtype=F64), rtol=0.0, atol=1e-9)


def test_merge_equals_single_accumulator() -> None:
    teacher, student = _two_models(90, offset=1e3, seed=3)
    single = g.CrossLayerAccumulator(T_WIDTHS, S_WIDTHS, debiased=True)
    _feed(single, teacher, student, [30, 25, 35])
    a = g.CrossLayerAccumulator(T_WIDTHS, S_WIDTHS, debiased=True)
    b = g.CrossLayerAccumulator(T_WIDTHS, S_WIDTHS, debiased=True)
    _feed(a, [t[:41] for t in teacher], [s[:41] for s in student], [40, 1])
    # b's reference shift differs from a's by a lot: the merge must re-centre its sums
    _feed(b, [t[41:] + 0.0 for t in teacher], [s[41:] for s in student], [2, 47])
    empty = g.CrossLayerAccumulator(T_WIDTHS, S_WIDTHS, debiased=True)
    empty.merge(a)
    empty.merge(b)
    a.merge(b)
    assert a.n == empty.n == single.n == 90 and b.n == 49
    for metric in g.METRICS:
        torch.testing.assert_close(a.compute(metric), single.compute(metric), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(empty.compute(metric), single.compute(metric), rtol=1e-9, atol=1e-12)


def test_merge_rescales_reference_frames_with_a_large_shift() -> None:
    """Accumulators whose first batches sit far apart (mean shift 50 sigma) still merge exactly."""
    teacher, student = _two_models(60, offset=0.0, seed=4)
    teacher = [torch.cat([t[:30], t[30:] + 50.0]) for t in teacher]
    a = g.CrossLayerAccumulator(T_WIDTHS, S_WIDTHS, debiased=True)
    b = g.CrossLayerAccumulator(T_WIDTHS, S_WIDTHS, debiased=True)
    _feed(a, [t[:30] for t in teacher], [s[:30] for s in student], [30])
    _feed(b, [t[30:] for t in teacher], [s[30:] for s in student], [30])
    a.merge(b)
    torch.testing.assert_close(
        a.compute("cka_debiased"), _batch_table("cka_debiased", teacher, student), rtol=1e-9, atol=1e-12
    )


def test_accumulator_rejects_bad_input() -> None:
    acc = g.CrossLayerAccumulator([4, 3], [2])
    with pytest.raises(ValueError, match="no rows"):
        acc.compute("cka")
    with pytest.raises(ValueError, match="expected 2 teacher layers"):
        acc.update([torch.zeros(5, 4)], [torch.zeros(5, 2)])
    with pytest.raises(ValueError, match=r"expected \(n_b, 3\)"):
        acc.update([torch.zeros(5, 4), torch.zeros(5, 4)], [torch.zeros(5, 2)])
    with pytest.raises(ValueError, match="same number of rows"):
        acc.update([torch.zeros(5, 4), torch.zeros(5, 3)], [torch.zeros(6, 2)])
    acc.update([torch.randn(5, 4), torch.randn(5, 3)], [torch.randn(5, 2)])
    with pytest.raises(ValueError, match="unknown metric 'cca'"):
        acc.compute("cca")
    with pytest.raises(ValueError, match="debiased=True"):
        acc.compute("cka_debiased")
    with pytest.raises(ValueError, match="widths differ"):
        acc.merge(g.CrossLayerAccumulator([4, 3], [3]))
    with pytest.raises(ValueError, match="positive ints"):
        g.CrossLayerAccumulator([4, 0], [2])
    with pytest.raises(ValueError, match="empty"):
        g.CrossLayerAccumulator([], [2])


def test_metric_tables_are_consistent() -> None:
    assert set(g.METRICS) == set(g.METRIC_HIGHER_IS_BETTER)
    assert g.METRIC_HIGHER_IS_BETTER["cka"] and not g.METRIC_HIGHER_IS_BETTER["procrustes"]


def test_batch_functions_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="same rows"):
        g.procrustes_distance(torch.zeros(5, 3), torch.zeros(6, 3))
    with pytest.raises(ValueError, match="2-D"):
        g.cka(torch.zeros(2, 5, 3), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="n >= 4"):
        g.cka(torch.randn(3, 2), torch.randn(3, 2), debiased=True)
    with pytest.raises(ValueError, match="route"):
        g.gram_distance(torch.randn(5, 2), torch.randn(5, 2), route="fast")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# gradients on degenerate input
# --------------------------------------------------------------------------------------------


def _case(name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    gen = _gen(40)
    if name == "n_lt_d":
        x, y = torch.randn(5, 12, generator=gen), torch.randn(5, 12, generator=gen)
    elif name == "duplicated_rows":
        base = torch.randn(6, 8, generator=gen)
        x, y = base[[0, 0, 1, 1, 2, 2, 3, 3, 4, 5]], torch.randn(10, 8, generator=gen)
    elif name == "constant_column":
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 6, generator=gen)
        x[:, 2] = 3.0
    elif name == "identical":
        x = torch.randn(16, 6, generator=gen)
        y = x.clone()
    elif name == "fully_constant":
        x, y = torch.full((16, 6), 0.7), torch.randn(16, 6, generator=gen)
    elif name == "both_constant":
        x, y = torch.full((16, 6), 0.7), torch.full((16, 6), -2.0)
    elif name == "zeros":
        x, y = torch.zeros(16, 6), torch.randn(16, 6, generator=gen)
    else:
        raise AssertionError(name)
    return x.to(dtype).requires_grad_(True), y.to(dtype).requires_grad_(True)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "procrustes": lambda x, y: g.procrustes_distance(x, y),
    "procrustes_gram_route": lambda x, y: g.procrustes_distance(x, y, route="gram"),
    "procrustes_cov_route": lambda x, y: g.procrustes_distance(x, y, route="cov"),
    "procrustes_angular": lambda x, y: g.procrustes_distance(x, y, angular=True),
    "procrustes_angular_gram_route": lambda x, y: g.procrustes_distance(x, y, angular=True, route="gram"),
    "gram": lambda x, y: g.gram_distance(x, y),
    "gram_gram_route": lambda x, y: g.gram_distance(x, y, route="gram"),
    "gram_cov_route": lambda x, y: g.gram_distance(x, y, route="cov"),
    "cka": lambda x, y: 1.0 - g.cka(x, y),
    "cka_gram_route": lambda x, y: 1.0 - g.cka(x, y, route="gram"),
    "cka_cov_route": lambda x, y: 1.0 - g.cka(x, y, route="cov"),
    "cka_debiased": lambda x, y: 1.0 - g.cka(x, y, debiased=True),
    "mse": g.mse,
    "cosine": g.cosine_distance,
}
CASES = ["n_lt_d", "duplicated_rows", "constant_column", "identical", "fully_constant", "both_constant", "zeros"]


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_gradients_are_finite(loss: str, case: str, dtype: torch.dtype) -> None:
    x, y = _case(case, dtype)
    value = LOSSES[loss](x, y)
    value.backward()
    assert torch.isfinite(value), f"{loss} on {case}: value {value}"
    assert x.grad is not None and y.grad is not None
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all(), f"{loss} on {case}"


def test_angular_gradient_is_capped_near_rho_one() -> None:
    """Near identical inputs the arccos slope is capped at 1/sqrt(1 - (1 - 1e-7)^2) ~ 2.2e3."""
    x, _ = _correlated(20, 5, 5, seed=41)
    x = x.requires_grad_(True)
    y = (x.detach() + 1e-9 * torch.randn(20, 5, generator=_gen(42), dtype=F64)).requires_grad_(True)
    value = g.procrustes_distance(x, y, angular=True)
    value.backward()
    assert 0.0 <= value.item() < 1e-6
    assert torch.isfinite(x.grad).all() and float(torch.linalg.matrix_norm(x.grad)) < 1e4


@pytest.mark.parametrize("route", ["gram", "cov"])
@pytest.mark.parametrize(("n", "d_x", "d_y"), [(12, 5, 3), (6, 10, 8)])
def test_gradients_match_finite_differences(route: str, n: int, d_x: int, d_y: int) -> None:
    """Analytic gradients equal finite differences, also for n < d (rank-deficient X^T Y, where
    the nuclear norm is still differentiable along centred data) on both routes."""
    x, y = _correlated(n, d_x, d_y, seed=43)
    fns: list[Callable[[Tensor, Tensor], Tensor]] = [
        lambda a, b: g.procrustes_distance(a, b, route=route),
        lambda a, b: g.procrustes_distance(a, b, angular=True, route=route),
        lambda a, b: g.gram_distance(a, b, route=route),
        lambda a, b: 1.0 - g.cka(a, b, route=route),
        lambda a, b: 1.0 - g.cka(a, b, debiased=True, route=route),
    ]
    for fn in fns:
        inputs = (x.clone().requires_grad_(True), y.clone().requires_grad_(True))
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# precision: bf16/fp16 inputs, autocast, reduced-precision matmul settings
# --------------------------------------------------------------------------------------------

VALUE_FNS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    **INVARIANT,
    "projection": g.projection_residual,
    "mse": g.mse,
    "cosine": g.cosine_distance,
}


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(VALUE_FNS))
def test_half_precision_inputs_are_computed_in_float32(name: str, half: torch.dtype) -> None:
    x, y = _correlated(64, 16, 16, seed=50, dtype=torch.float32)
    fn = VALUE_FNS[name]
    xh, yh = x.to(half), y.to(half)
    out = fn(xh, yh)
    assert out.dtype == torch.float32
    # exactly the float32 computation on the same (rounded) numbers ...
    torch.testing.assert_close(out, fn(xh.float(), yh.float()), rtol=0.0, atol=1e-6)
    # ... and within 1e-3 of the float32 answer on the unrounded features (relative for the
    # scale-dependent MSE, whose value here is ~10)
    rtol = 1e-3 if name == "mse" else 0.0
    torch.testing.assert_close(out, fn(x, y), rtol=rtol, atol=1e-3)


def test_half_precision_gradients_flow_back_in_input_dtype() -> None:
    x, y = _correlated(32, 8, 4, seed=51, dtype=torch.bfloat16)
    x.requires_grad_(True)
    g.procrustes_distance(x, y).backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("name", list(VALUE_FNS))
def test_autocast_is_disabled_inside(name: str) -> None:
    x, y = _correlated(64, 16, 16, seed=52, dtype=torch.float32)
    fn = VALUE_FNS[name]
    expected = fn(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x.T @ y).dtype == torch.bfloat16  # the test has teeth: autocast is live here
        out = fn(x, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0.0, atol=1e-6)  # well within the 1e-3 bound


def test_float32_matmul_precision_is_forced_and_restored() -> None:
    x, y = _correlated(64, 16, 16, seed=53, dtype=torch.float32)
    expected = g.cka(x.double(), y.double()).float()
    mkl = torch.backends.mkldnn.matmul
    if not hasattr(mkl, "fp32_precision"):  # torch < 2.9: legacy knob
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("medium")
        try:
            torch.testing.assert_close(g.cka(x, y), expected, rtol=0.0, atol=1e-5)
            assert torch.get_float32_matmul_precision() == "medium"
        finally:
            torch.set_float32_matmul_precision(old)
        return
    old = mkl.fp32_precision
    mkl.fp32_precision = "bf16"  # a user's reduced-precision setting
    try:
        torch.testing.assert_close(g.cka(x, y), expected, rtol=0.0, atol=1e-5)
        assert mkl.fp32_precision == "bf16"  # restored
    finally:
        mkl.fp32_precision = old


# ---- non-finite features are reported as NaN, never as "zero variance" ------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("side", ["x", "y"])
def test_nonfinite_features_give_nan_not_the_zero_variance_value(bad: float, side: str) -> None:
    """A NaN/inf entry used to pass as zero variance (D^2 = 2, CKA = 0, cosine 0): now NaN."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(24, 8, generator=gen, dtype=F64)
    y = torch.randn(24, 8, generator=gen, dtype=F64)
    (x if side == "x" else y)[5, 3] = bad
    values = {
        "procrustes": g.procrustes_distance(x, y),
        "angular": g.procrustes_distance(x, y, angular=True),
        "rho": g.procrustes_rho(x, y),
        "gram": g.gram_distance(x, y),
        "cka": g.cka(x, y),
        "cka_debiased": g.cka(x, y, debiased=True),
        "projection_residual": g.projection_residual(x, y),
        "mse": g.mse(x, y),
        "cosine": g.cosine_distance(x, y),
        **{f"monitor_{k}": torch.tensor(v) for k, v in g.pair_metrics(x, y).items()},
    }
    for name, value in values.items():
        if name == "mse":  # element-wise: inf - x stays inf
            assert not torch.isfinite(value).item(), (name, value)
        else:
            assert torch.isnan(value).item(), (name, value)


def test_streaming_accumulator_refuses_a_nonfinite_batch_naming_the_layer() -> None:
    acc = g.CrossLayerAccumulator([4, 4], [3], device=torch.device("cpu"))
    ok = torch.randn(6, 4, dtype=F64)
    bad = ok.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"teacher layer\(s\) \[1\] hold NaN or inf"):
        acc.update([ok, bad], [torch.randn(6, 3, dtype=F64)])
    assert acc.n == 0  # nothing was merged
    assert g.nonfinite_layers([ok, bad, torch.full((2, 2), float("inf"))]) == [1, 2]


# --------------------------------------------------------------------------------------------
# the eigh nuclear-norm route, the measured route costs, batched layer pairs
# --------------------------------------------------------------------------------------------


def _nuclear_value_and_grad(m: Tensor, fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    leaf = m.clone().requires_grad_(True)
    value = fn(leaf)
    value.backward()
    assert leaf.grad is not None
    return value.detach(), leaf.grad


def _eigh_nuclear(m: Tensor) -> Tensor:
    out = g._NuclearNormEigh.apply(m)
    assert isinstance(out, Tensor)
    return out


def _svd_nuclear(m: Tensor) -> Tensor:
    return torch.linalg.svdvals(m).sum()


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (25, 25), (768, 384)])
def test_eigh_nuclear_norm_matches_svdvals_in_float64(shape: tuple[int, int]) -> None:
    """Value and gradient U V^T of the eigh route equal svdvals' to 1e-10 relative on well-conditioned M."""
    m = torch.randn(*shape, generator=_gen(50), dtype=F64)
    v_eigh, g_eigh = _nuclear_value_and_grad(m, _eigh_nuclear)
    v_svd, g_svd = _nuclear_value_and_grad(m, _svd_nuclear)
    _close(v_eigh, v_svd, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(g_eigh, g_svd, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (768, 384)])
def test_eigh_nuclear_norm_float32_is_at_least_as_accurate_as_float32_svdvals(shape: tuple[int, int]) -> None:
    """Against float64 svdvals of the same float32 matrix: value to 1e-6, gradient to 1e-5 relative
    (measured ~1e-8 and ~1e-7; float32 svdvals: ~1e-7 and ~2e-6)."""
    m = torch.randn(*shape, generator=_gen(51), dtype=torch.float32)
    v_ref, g_ref = _nuclear_value_and_grad(m.to(F64), _svd_nuclear)
    v_eigh, g_eigh = _nuclear_value_and_grad(m, _eigh_nuclear)
    v_svd32, g_svd32 = _nuclear_value_and_grad(m, _svd_nuclear)
    assert v_eigh.dtype == torch.float32 and g_eigh.dtype == torch.float32
    err_v = abs(float(v_eigh) - float(v_ref)) / float(v_ref)
    err_g = float((g_eigh.to(F64) - g_ref).abs().max() / g_ref.abs().max())
    assert err_v < 1e-6 and err_g < 1e-5, (err_v, err_g)
    assert err_g <= float((g_svd32.to(F64) - g_ref).abs().max() / g_ref.abs().max())


def test_eigh_nuclear_norm_rank_deficient_gives_the_minimum_norm_subgradient() -> None:
    """Rank 3 of 10 x 6: the zero singular values fall under the pseudo-inverse cut, the gradient is
    U_r V_r^T of the nonzero part (finite, no component on the null spaces); float64 and float32.
    The value carries the documented floor: a zero singular value reads ~sqrt(eps_64) sigma_max."""
    gen = _gen(52)
    m = torch.randn(10, 3, generator=gen, dtype=F64) @ torch.randn(3, 6, generator=gen, dtype=F64)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    expected = u[:, :3] @ vh[:3]  # (10, 6)
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-4)):
        value, grad = _nuclear_value_and_grad(m.to(dtype), _eigh_nuclear)
        assert torch.isfinite(grad).all()
        _close(value, s.sum(), rtol=0.0, atol=max(tol, 3 * 1.5e-8) * float(s[0]))
        torch.testing.assert_close(grad.to(F64), expected, rtol=tol, atol=tol)
    _, grad = _nuclear_value_and_grad(torch.zeros(5, 4), _eigh_nuclear)  # all below the cut
    assert torch.equal(grad, torch.zeros(5, 4))


@pytest.fixture
def two_threads() -> Iterator[None]:
    """g._eigh uses threads only with torch.get_num_threads() >= 2 (the suite may run with OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("batch", [(), (1,), (3,), (2, 3)])
def test_threaded_eigh_is_the_batched_call_bit_for_bit(batch: tuple[int, ...], two_threads: None) -> None:
    """g._eigh spreads a CPU batch over threads, one matrix each: the same numbers as torch's batched call,
    any batch shape (none, one matrix, more matrices than threads, two batch dims)."""
    a = torch.randn(*batch, 20, 12, generator=_gen(55), dtype=F64)
    gram = a.mT @ a  # (*batch, 12, 12)
    lam, vec = g._eigh(gram)
    ref_lam, ref_vec = torch.linalg.eigh(gram)
    assert lam.shape == ref_lam.shape and vec.shape == ref_vec.shape
    assert torch.equal(lam, ref_lam) and torch.equal(vec, ref_vec)


def test_threaded_eigh_follows_a_larger_thread_count(two_threads: None) -> None:
    gram = torch.eye(5, dtype=F64).expand(3, 5, 5).contiguous()
    g._eigh(gram)
    torch.set_num_threads(3)  # the fixture puts it back
    lam, _ = g._eigh(gram)
    assert g._EIGH_POOL is not None and g._EIGH_POOL[1]._max_workers >= 3
    assert torch.equal(lam, torch.ones(3, 5, dtype=F64))


def test_threaded_eigh_works_in_a_forked_child(two_threads: None) -> None:
    """A fork copies the thread pool but not its threads; the child makes its own instead of waiting forever."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    gram = torch.eye(6, dtype=F64).expand(4, 6, 6).contiguous()
    g._eigh(gram)  # the parent's pool exists before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's teardown
        ok = False
        try:
            ok = torch.equal(g._eigh(gram)[0], torch.ones(4, 6, dtype=F64))
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        reply = pipe.read()
    os.waitpid(pid, 0)
    assert reply == b"1"


def test_float32_uses_the_eigh_route_and_float64_keeps_svdvals(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.dtype] = []
    real = g._NuclearNormEigh.apply

    def spy(m: Tensor) -> Tensor:
        calls.append(m.dtype)
        return real(m)

    monkeypatch.setattr(g._NuclearNormEigh, "apply", spy)
    x, y = _correlated(30, 8, 6, seed=53)
    for route in ("gram", "cov"):
        g.procrustes_distance(x, y, route=route)  # type: ignore[arg-type]
    assert calls == []  # float64: the exact svdvals route, oracles unchanged
    g.procrustes_distance(x.float(), y.float())
    g.procrustes_distance(x.to(torch.bfloat16), y.float())
    assert calls == [torch.float32, torch.float32]


@pytest.mark.parametrize("route", ["gram", "cov"])
def test_float32_procrustes_matches_the_float64_oracle_with_its_gradient(route: str) -> None:
    """The float32 loss (eigh route) against the float64 loss (svdvals): D^2 to 1e-6 absolute, gradient 1e-4
    relative. The float32 centring and X^T Y dominate: measured ~3e-7 here with the eigh route and with the
    older float32 svdvals alike."""
    x, y = _correlated(48, 64, 40, seed=54)
    results = {}
    for dtype in (F64, torch.float32):
        xv, yv = x.to(dtype).clone().requires_grad_(True), y.to(dtype).clone().requires_grad_(True)
        value = g.procrustes_distance(xv, yv, route=route)  # type: ignore[arg-type]
        value.backward()
        assert xv.grad is not None and yv.grad is not None
        results[dtype] = (value.detach().to(F64), xv.grad.to(F64), yv.grad.to(F64))
    (v64, gx64, gy64), (v32, gx32, gy32) = results[F64], results[torch.float32]
    _close(v32, v64, rtol=0.0, atol=1e-6)
    for a, b in ((gx32, gx64), (gy32, gy64)):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-4


def test_float32_procrustes_invariances_on_the_eigh_route() -> None:
    x, y = _correlated(40, 12, 8, seed=55, dtype=torch.float32)
    base = g.procrustes_distance(x, y)
    q_x, q_y = _orthogonal(12, 56).float(), _orthogonal(8, 57).float()
    for xv, yv in ((x @ q_x, y @ q_y), (3.7 * x + 1.0, 1e-2 * y), (x, -y)):
        _close(g.procrustes_distance(xv, yv), base, rtol=1e-5, atol=1e-6)
    _close(g.procrustes_distance(x, 2.0 * x @ q_x), 0.0, rtol=0.0, atol=1e-6)


def test_route_choice_follows_the_measured_cost_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto picks by the fixed, measured cost constants (never by timing): pinned picks on the
    benchmark grid, and a changed table changes the pick, which the QR call count shows."""
    picks = {
        w: ["gram" if g._procrustes_gram_route_cheaper(n, *w) else "cov" for n in (64, 128, 256, 512, 4096)]
        for w in ((768, 384), (384, 384), (384, 256))
    }
    assert picks == {
        (768, 384): ["gram", "gram", "gram", "cov", "cov"],
        (384, 384): ["gram", "gram", "gram", "cov", "cov"],
        (384, 256): ["gram", "gram", "cov", "cov", "cov"],
    }
    assert not g._procrustes_gram_route_cheaper(384, 768, 384, float64=False)  # n >= min(d): no reduction
    qr_calls = []
    real_qr = torch.linalg.qr

    def counting_qr(a: Tensor, *args: object, **kwargs: object) -> object:
        qr_calls.append(tuple(a.shape))
        return real_qr(a, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.linalg, "qr", counting_qr)
    x, y = torch.randn(20, 64), torch.randn(20, 48)
    g.procrustes_distance(x, y)
    assert len(qr_calls) == 2  # the gram route at n = 20 < 48
    monkeypatch.setattr(g, "_COST_QR", 1e6)  # a table in which QR is prohibitive
    qr_calls.clear()
    value = g.procrustes_distance(x, y)
    assert qr_calls == []
    _close(value, g.procrustes_distance(x.double(), y.double()), rtol=0.0, atol=1e-6)


def _pairs(dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor]]:
    """Five layer pairs: three share (30, 16) x (30, 10), one is wider, one a zero-variance student side."""
    xs, ys = [], []
    for k, (d_x, d_y) in enumerate([(16, 10), (16, 10), (24, 10), (16, 10), (16, 10)]):
        x, y = _correlated(30, d_x, d_y, seed=60 + k, dtype=dtype)
        xs.append(x)
        ys.append(torch.full_like(y, 0.3) if k == 4 else y)
    return xs, ys


@pytest.mark.parametrize(("dtype", "tol"), [(F64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("angular", [False, True])
def test_batched_pairs_equal_one_call_per_pair(dtype: torch.dtype, tol: float, angular: bool) -> None:
    xs0, ys0 = _pairs(dtype)
    results = []
    for batched in (False, True):
        xs = [x.clone().requires_grad_(True) for x in xs0]
        ys = [y.clone().requires_grad_(True) for y in ys0]
        if batched:
            values = g.procrustes_distances(xs, ys, angular)
        else:
            values = [g.procrustes_distance(x, y, angular) for x, y in zip(xs, ys)]
        torch.stack(values).sum().backward()
        results.append((torch.stack(values).detach(), [t.grad for t in xs + ys]))
    (v_one, g_one), (v_bat, g_bat) = results
    torch.testing.assert_close(v_bat, v_one, rtol=tol, atol=tol)
    for a, b in zip(g_bat, g_one):
        assert a is not None and b is not None and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
    assert float(v_bat[4]) == pytest.approx(math.pi / 2 if angular else 2.0)  # zero-variance side


def test_batched_pairs_nan_only_where_the_input_is_nonfinite() -> None:
    xs, ys = _pairs(torch.float32)
    ys[1] = ys[1].clone()
    ys[1][3, 2] = float("inf")
    values = torch.stack(g.procrustes_distances(xs, ys))
    assert torch.isnan(values[1]) and torch.isfinite(values[[0, 2, 3, 4]]).all()
    with pytest.raises(ValueError, match="procrustes_distances"):
        g.procrustes_distances(xs, ys[:2])
    with pytest.raises(ValueError, match=r"procrustes_distances\[1\]"):
        g.procrustes_distances(xs[:2], [ys[0], ys[1][:5]])
    assert g.procrustes_distances([], []) == []


def test_the_objective_batches_its_procrustes_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdgeo.losses import LossTerm, Objective

    xs, ys = _pairs(torch.float32)
    objective = Objective(
        [LossTerm("procrustes")], [(k, k) for k in range(5)], [(y.shape[1], x.shape[1]) for x, y in zip(xs, ys)]
    )
    singles: list[int] = []
    real = g.procrustes_distance
    monkeypatch.setattr(g, "procrustes_distance", lambda *a, **kw: singles.append(1) or real(*a, **kw))
    values = objective.feature_term("procrustes", LossTerm("procrustes"), xs, ys)
    assert len(singles) == 1  # only the pair of its own shape (24 wide) goes alone
    expected = [real(x, y) for x, y in zip(xs, ys)]
    torch.testing.assert_close(torch.stack(values), torch.stack(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_check_by_min_and_max(bad: float) -> None:
    """The one-pass finiteness check that replaced isfinite(x).all(): every kind of non-finite value, per matrix
    of a stack, and empty input."""
    x = torch.randn(3, 7, 5, generator=_gen(70))
    assert bool(g._all_finite(x))
    x[1, 4, 2] = bad
    assert not bool(g._all_finite(x))
    assert g._all_finite(x, dims=(-2, -1)).tolist() == [True, False, True]
    assert bool(g._all_finite(torch.empty(0, 4)))
    assert g._all_finite(torch.empty(2, 0, 4), dims=(-2, -1)).tolist() == [True, True]
