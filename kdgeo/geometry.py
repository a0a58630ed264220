"""Feature-space geometry: similarity metrics, distillation distances and streaming accumulators.

Pure tensor -> tensor code: no config, no I/O, no imports from the rest of kdgeo.

Notation. ``X`` is the teacher's feature matrix ``(n, d_t)`` and ``Y`` the student's ``(n, d_s)``;
row ``i`` of both is the same sample (a token with padding masked out, or a pooled sequence).
The widths may differ. Every metric except :func:`mse` and :func:`cosine_distance` first centres
the columns and scales each matrix to unit Frobenius norm (:func:`center_and_normalize`), so all
of them are invariant to a translation and an isotropic scaling of either side; Procrustes, FG
and CKA are also invariant to orthogonal maps of either side.

=====================  ============================================  ===========================
metric                 value (on centred, unit-norm X, Y)            as a loss
=====================  ============================================  ===========================
procrustes             D^2 = 2 - 2 rho,  rho = ||X^T Y||_*           D^2 (default)
procrustes_angular     arccos(rho)                                   arccos(rho)
gram (FG)              ||X X^T - Y Y^T||_F^2                         same
cka                    ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F)     1 - CKA
cka_debiased           HSIC_1(K, L) / sqrt(HSIC_1(K,K) HSIC_1(L,L))  (probing only)
projection             min_W ||Y W - X||_F^2 in [0, 1]               (metric only)
=====================  ============================================  ===========================

References: Bhattarai, Amjad, Zhylko, Alhanai, "Knowledge distillation through geometry-aware
representational alignment", arXiv 2509.25253 (Procrustes and FG distances as KD losses; the
CKA and projection counterexamples); Schönemann 1966, "A generalized solution of the orthogonal
Procrustes problem"; Williams, Kunz, Kornblith, Linderman 2021, "Generalized shape metrics on
neural representations" (rho, D^2 and arccos(rho) as metrics); Kornblith, Norouzi, Lee, Hinton
2019, "Similarity of neural network representations revisited" (linear CKA); Song, Smola,
Gretton, Bedo, Borgwardt 2012, "Feature selection via dependence maximization", JMLR 13 (the
unbiased HSIC estimator); Murphy, Zylberberg, Fyshe 2024 / Kornblith et al.'s reference code
(debiased CKA).

Conventions (each is tested in tests/test_geometry.py):

* Zero variance. A matrix whose centred Frobenius norm is at or below the rounding floor of
  centring, ``||X - 1 mu^T||_F <= eps * ||X||_F`` (eps of the compute dtype; relative, so scale
  invariance is kept), is treated as the zero matrix: rho = 0 (procrustes D^2 = 2, angular pi/2),
  CKA = 0, debiased CKA = 0, FG = ||Y^T Y||_F^2 of the other side, projection residual 0 when the
  target is constant and 1 when the source is. Divisions use the double-``torch.where`` pattern,
  so neither values nor gradients are NaN. No epsilon is ever added to a denominator.
* Non-finite input. NaN or inf anywhere in a feature matrix is not zero variance: every metric
  and loss of that matrix is NaN (so a training run's non-finite policy names the term and its
  layer pair), and the streaming accumulator refuses such a batch with a ValueError naming the
  layer.
* Precision. Inputs in fp16/bf16 (or anything else below float32) are upcast; the computation
  runs with autocast disabled and float32 matmuls forced to IEEE (no TF32, no bf16 on oneDNN).
  Results are float32, or float64 when an input is float64. The backward matmuls run later
  under the caller's global TF32 setting (autograd replays them outside our context); only the
  forward values are guaranteed IEEE. The streaming accumulator is float64 throughout.
* Routes. For a batch, Gram/CKA use the ``n x n`` Gram route (``<XX^T, YY^T>``) or the
  ``d x d`` covariance route (``||X^T Y||_F^2``), whichever costs fewer flops. Procrustes takes
  the nuclear norm of ``M = X^T Y`` (cov route) or, when ``n < min(d_t, d_s)``, of its ``n x n``
  reduction ``(X Q_x)^T (Y Q_y)`` with an orthonormal basis ``Q_x`` of the row space of X taken
  from a QR *without gradient*: ``||X^T Y||_* = ||(X Q_x)^T (Y Q_y)||_*``. The basis is a
  constant in the graph, which is exact: the (sub)gradient ``Y V U^T`` only has components in
  range(X^T) = span(Q_x). QR backward itself is never used (it divides by R, which is singular
  for centred data, whose rank is at most n - 1). ``auto`` picks the route by a cost model whose
  constants were measured (:func:`_procrustes_route_costs`; a k x k eigh costs ~60 GEMM flops per
  k^3, a QR ~3 per flop): fixed numbers, never a start-up timing, so no result depends on the load.
  The nuclear norm itself: float64 input keeps ``torch.linalg.svdvals`` (exact to ~1e-16; its
  backward ``U V^T`` is finite for repeated and zero singular values, unlike full-SVD backward);
  float32 (and upcast half) input uses :class:`_NuclearNormEigh`: ``eigh`` of the smaller Gram
  ``M^T M`` in float64, ``rho = sum sqrt(lambda)``, backward ``M V diag(1/sigma) V^T`` with a
  pseudo-inverse cut at ``lambda <= 100 k eps_64 lambda_max``, no SVD anywhere. Its values and
  gradients are at least as close to float64 svdvals as float32 svdvals were (~1e-8 / ~1e-7
  relative on the kernel; the float32 centring and X^T Y dominate at ~3e-7 in D^2). Layer pairs
  of equal shapes go through one batched computation (:func:`procrustes_distances`).
* Angular clamp. arccos has an infinite slope at rho = 1 (identical inputs). The value is
  arccos(clamp(rho, 0, 1)); the gradient is that of arccos at min(rho, 1 - 1e-7), i.e. its
  magnitude is capped at 1 / sqrt(1 - (1 - 1e-7)^2) ~ 2.2e3. Prefer D^2 = 2 - 2 rho.
* Rounding excursions. D^2, FG and CKA are clamped to their ranges in value only (straight-through
  clamp), so a rounding-level ``2 - 2 rho = -1e-7`` reads 0 but still passes a gradient.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor

from kdgeo import kinds

__all__ = [
    "METRICS",
    "METRIC_HIGHER_IS_BETTER",
    "CrossLayerAccumulator",
    "center_and_normalize",
    "cka",
    "cosine_distance",
    "cosine_similarity",
    "gram_distance",
    "mse",
    "pair_metrics",
    "procrustes_distance",
    "procrustes_distances",
    "procrustes_rho",
    "projection_residual",
]

METRICS: tuple[str, ...] = (
    "procrustes",
    "procrustes_angular",
    "gram",
    "cka",
    "cka_debiased",
    "projection",
)
"""Similarity-table metrics :meth:`CrossLayerAccumulator.compute` can produce."""

METRIC_HIGHER_IS_BETTER: dict[str, bool] = {m: kinds.METRIC_HIGHER_IS_BETTER[m] for m in METRICS}
"""Whether a larger value of the metric means more similar (the layer-map DP maximises or minimises):
the rows of :data:`kdgeo.kinds.METRIC_HIGHER_IS_BETTER`, the one table of metric directions, for :data:`METRICS`."""

Route = Literal["auto", "gram", "cov"]

# Gradient cap for arccos near rho = 1 (see module docstring, "Angular clamp").
_ARCCOS_GRAD_CAP = 1.0 - 1e-7


# --------------------------------------------------------------------------------------------
# precision plumbing
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """Force IEEE float32 matmuls (no TF32 on cuBLAS, no bf16 on oneDNN) and restore after.

    torch >= 2.9 has per-backend ``fp32_precision`` knobs and raises if the legacy and new APIs
    are mixed, so we save/set/restore through the new API when it exists (this leaves a user's
    legacy-API state readable exactly as before) and through the legacy one otherwise.
    """
    # Any: the knobs are looked up by name because older torch builds lack them
    saved: list[tuple[Any, str]] = []
    backends: list[Any] = [getattr(getattr(torch.backends, b, None), "matmul", None) for b in ("cuda", "mkldnn")]
    new_api = all(m is not None and hasattr(m, "fp32_precision") for m in backends)
    if new_api:
        for m in backends:
            old = m.fp32_precision
            if old != "ieee":
                saved.append((m, old))
                m.fp32_precision = "ieee"
        try:
            yield
        finally:
            for m, old in reversed(saved):
                m.fp32_precision = old
        return
    old_prec = torch.get_float32_matmul_precision()
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old_prec)
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


@contextlib.contextmanager
def _full_precision(device_type: str) -> Iterator[None]:
    """Autocast off and IEEE float32 matmuls for the enclosed forward computation."""
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is None or is_available(device_type):
        no_autocast: contextlib.AbstractContextManager[object] = torch.autocast(device_type=device_type, enabled=False)
    else:
        no_autocast = contextlib.nullcontext()
    with no_autocast, _ieee_fp32_matmul():
        yield


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 are never computed in)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _check_matrix(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(
            f"{what}: expected a 2-D (n, d) feature matrix, got shape {tuple(x.shape)}; "
            "flatten (B, T, d) to (B*T, d) after dropping padded positions"
        )
    if x.is_complex():
        raise ValueError(f"{what}: complex features are not supported (dtype {x.dtype})")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: needs at least one row, got shape {tuple(x.shape)}")


def _check_pair(x: Tensor, y: Tensor, fn: str, same_width: bool = False) -> None:
    _check_matrix(x, f"{fn}: x")
    _check_matrix(y, f"{fn}: y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{fn}: x and y must have the same rows (samples), got {x.shape[0]} and {y.shape[0]}")
    if same_width and x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{fn}: needs equal widths, got d_x={x.shape[1]} and d_y={y.shape[1]}; use a learned "
            "projection, or a width-free metric (procrustes, gram, cka)"
        )


def _clamp_keep_grad(v: Tensor, lo: float | None = None, hi: float | None = None) -> Tensor:
    """Value clamped to [lo, hi], gradient of the identity (straight-through clamp).

    Used for rounding-level excursions (``2 - 2 rho = -1e-7``): the reported value stays in
    range while the gradient keeps pointing the right way instead of becoming zero.
    """
    return v + (v.clamp(lo, hi) - v).detach()


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0; finite gradient either way (double-where)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _safe_sqrt(v: Tensor) -> Tensor:
    """sqrt(v) for v > 0, else 0, without the infinite slope of sqrt at 0."""
    ok = v > 0
    return torch.where(ok, torch.sqrt(torch.where(ok, v, torch.ones_like(v))), torch.zeros_like(v))


# --------------------------------------------------------------------------------------------
# centring and normalisation
# --------------------------------------------------------------------------------------------


def _center(x: Tensor) -> Tensor:
    """Column-centre with a second pass.

    The first pass leaves a rounding residue (the same value in every row of a constant column);
    the second pass removes it, so a constant column centres to ~eps^2 * |x|, far below the
    zero-variance floor, instead of ~eps * |x|.
    """
    xc = x - x.mean(dim=-2, keepdim=True)  # (..., n, d)
    return xc - xc.mean(dim=-2, keepdim=True)  # (..., n, d)


def _center_normalize(x: Tensor) -> Tensor:
    """Centre, then scale to unit Frobenius norm; zero-variance input -> zero matrix.

    Assumes ``x`` is already in the compute dtype and that we are inside ``_full_precision``.
    Works on a stack ``(..., n, d)`` too (each matrix on its own).
    """
    xc, scale = _center_scale(x)
    # NaN/inf input gets scale 0 too, so the linear algebra below stays finite; the public
    # functions then report NaN for it (_nan_unless_finite), never "zero variance".
    return torch.where(scale > 0, xc * scale, 0.0)  # (..., n, d)


def _center_scale(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(X - 1 mu^T, s)`` with ``s = 1 / ||X - 1 mu^T||_F``, or ``s = 0`` for zero variance or NaN/inf.

    For the bilinear Procrustes term the scale goes onto the small ``X^T Y`` instead of the
    ``(n, d)`` features (``X~^T Y~ = s_x s_y Xc^T Yc``), which saves two full-size passes per side
    forward and three backward.
    """
    xc = _center(x)  # (..., n, d)
    sq = xc.square().sum(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    eps = torch.finfo(xc.dtype).eps
    with torch.no_grad():
        # Relative floor: variance at or below the rounding of centring is no variance.
        ok = sq.sqrt() > eps * torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    scale = torch.where(ok, torch.rsqrt(torch.where(ok, sq, torch.ones_like(sq))), torch.zeros_like(sq))
    return xc, scale  # (..., n, d), (..., 1, 1)


def _nan_unless_finite(value: Tensor, *xs: Tensor) -> Tensor:
    """``value`` where every input is finite, else NaN (NaN/inf features are not zero variance)."""
    with torch.no_grad():
        finite = torch.stack([_all_finite(x) for x in xs]).all()
    return torch.where(finite, value, torch.full_like(value, float("nan")))


def _all_finite(x: Tensor, dims: tuple[int, ...] | None = None) -> Tensor:
    """Whether ``x`` (over ``dims``, default all) holds no NaN/inf, as a bool tensor, without a host sync.

    min and max propagate NaN, and an inf is the max or the min: one read of ``x``, ~5x faster on
    CPU than ``isfinite(x).all()`` (three full-size passes and a temporary) at 4096 x 768.
    """
    if x.numel() == 0:  # aminmax refuses empty input
        return torch.isfinite(x).all() if dims is None else torch.isfinite(x).all(dim=dims)
    if dims is None:
        lo, hi = torch.aminmax(x)
    else:
        lo, hi = x.amin(dim=dims), x.amax(dim=dims)
    return torch.isfinite(lo) & torch.isfinite(hi)


def center_and_normalize(x: Tensor) -> Tensor:
    """Centre the columns of ``x`` and scale it to unit Frobenius norm.

    ``X~ = (X - 1 mu^T) / ||X - 1 mu^T||_F`` with ``mu`` the column means. A zero-variance input
    (centred norm at or below ``eps * ||X||_F``) maps to the zero matrix, with zero gradient.

    Args:
        x: ``(n, d)`` features; any real dtype (fp16/bf16 are upcast).

    Returns:
        ``(n, d)`` in float32 (float64 for float64 input).
    """
    _check_matrix(x, "center_and_normalize: x")
    with _full_precision(x.device.type):
        return _center_normalize(x.to(compute_dtype(x)))


def _prepare(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Upcast both sides to the compute dtype, then centre and normalise each."""
    dtype = compute_dtype(x, y)
    return _center_normalize(x.to(dtype)), _center_normalize(y.to(dtype))


# --------------------------------------------------------------------------------------------
# routes (n x n Gram vs d x d covariance)
# --------------------------------------------------------------------------------------------


def _gram_route_cheaper(n: int, d_x: int, d_y: int) -> bool:
    """Flop estimate for ||X^T X||, ||Y^T Y||, ||X^T Y|| (Gram route vs covariance route)."""
    gram = n * n * (d_x + d_y)  # X X^T, Y Y^T, then an n x n inner product
    cov = n * (d_x * d_x + d_y * d_y + d_x * d_y)  # X^T X, Y^T Y, X^T Y
    return gram < cov


# Measured cost of the Procrustes building blocks, forward + backward, in units of one float32 GEMM
# flop (tests/benchmarks/bench_geometry.py, 2-core CPU, torch 2.13; see _procrustes_route_costs).
# A flop count alone was wrong by 3.6x at n = 256: a k x k eigh/SVD runs ~30x slower per flop
# than a GEMM, and QR with an explicit Q ~3x slower.
_COST_QR = 3.0  # per flop of Householder QR + forming Q (4 d n^2 - 4 n^3 / 3)
_COST_EIGH = 60.0  # per k^3 of the float32 eigh route (float64 Gram, eigh with vectors, backward)
_COST_SVD64 = 100.0  # per k^3 of float64 svdvals with its backward (full SVD)
_COST_FIXED = 2e6  # per decomposition call: LAPACK set-up, small-k inefficiency


def _procrustes_route_costs(n: int, d_x: int, d_y: int, float64: bool = False) -> tuple[float, float]:
    """(cov, gram) cost of ``||X^T Y||_*`` forward + backward, in float32-GEMM flop units.

    cov: ``C = X^T Y`` (2 n d_x d_y) and the two gradient GEMMs, then the nuclear-norm kernel of the
    ``(d_x, d_y)`` matrix. gram: two QRs with explicit Q, the three reduction GEMMs and their
    backward, then the kernel of the ``(k_x, k_y)`` matrix, ``k = min(n, d)``. The kernel is
    ``2 p k^2`` (its Gram) plus ``c k^3`` with c measured (:data:`_COST_EIGH`, :data:`_COST_SVD64`).
    The constants are fixed, not timed at start-up, so the route -- and the rounding of every
    result -- never depends on the machine's load (bit-for-bit resume).
    """
    per_k3 = _COST_SVD64 if float64 else _COST_EIGH

    def kernel(a: int, b: int) -> float:
        k, p = min(a, b), max(a, b)
        return 2.0 * p * k * k + per_k3 * k**3 + _COST_FIXED

    def qr(d: int) -> float:
        k = min(n, d)
        return _COST_QR * (4.0 * max(n, d) * k * k - 4.0 * k**3 / 3.0) + _COST_FIXED

    k_x, k_y = min(n, d_x), min(n, d_y)
    cov = 6.0 * n * d_x * d_y + kernel(d_x, d_y)
    gram = qr(d_x) + qr(d_y) + 6.0 * (n * d_x * k_x + n * d_y * k_y + n * k_x * k_y) + kernel(k_x, k_y)
    return cov, gram


def _procrustes_gram_route_cheaper(n: int, d_x: int, d_y: int, float64: bool = False) -> bool:
    """Whether the ``n x n`` reduction is cheaper than ``svd(X^T Y)`` by :func:`_procrustes_route_costs`."""
    if n >= min(d_x, d_y):
        return False  # no reduction possible: k = min(n, d) is not smaller
    cov, gram = _procrustes_route_costs(n, d_x, d_y, float64)
    return gram < cov


def _resolve(route: Route, gram_cheaper: bool) -> Literal["gram", "cov"]:
    if route == "auto":
        return "gram" if gram_cheaper else "cov"
    if route not in ("gram", "cov"):
        raise ValueError(f"route must be 'auto', 'gram' or 'cov', got {route!r}")
    return route


def _fro_terms(xn: Tensor, yn: Tensor, route: Route) -> tuple[Tensor, Tensor, Tensor]:
    """(||X^T X||_F^2, ||Y^T Y||_F^2, ||X^T Y||_F^2) of normalised inputs by the cheaper route.

    Gram route: ||X^T X||_F^2 = ||X X^T||_F^2 and ||X^T Y||_F^2 = <X X^T, Y Y^T>.
    """
    n, d_x = xn.shape
    d_y = yn.shape[1]
    if _resolve(route, _gram_route_cheaper(n, d_x, d_y)) == "gram":
        kx = xn @ xn.mT  # (n, n)
        ky = yn @ yn.mT  # (n, n)
        return kx.square().sum(), ky.square().sum(), (kx * ky).sum()
    return (
        (xn.mT @ xn).square().sum(),  # from (d_x, d_x)
        (yn.mT @ yn).square().sum(),  # from (d_y, d_y)
        (xn.mT @ yn).square().sum(),  # from (d_x, d_y)
    )


# --------------------------------------------------------------------------------------------
# Procrustes
# --------------------------------------------------------------------------------------------


# Pseudo-inverse cut of the eigh route's backward, relative to the largest eigenvalue of the Gram
# (see _NuclearNormEigh): eigenvalues below it are rounding noise of the float64 eigh.
_EIGH_CUT = 100.0 * torch.finfo(torch.float64).eps


_EIGH_POOL: tuple[int, ThreadPoolExecutor] | None = None
"""(process id, pool): the threads :func:`_eigh` spreads a CPU batch over (a forked child makes its own)."""
_EIGH_POOL_LOCK = threading.Lock()


def _eigh_pool(workers: int) -> ThreadPoolExecutor:
    global _EIGH_POOL
    with _EIGH_POOL_LOCK:
        if _EIGH_POOL is None or _EIGH_POOL[0] != os.getpid() or _EIGH_POOL[1]._max_workers < workers:
            if _EIGH_POOL is not None and _EIGH_POOL[0] == os.getpid():
                _EIGH_POOL[1].shutdown(wait=False)  # too few threads for torch's new thread count: its idle ones end
            # A fork copies the pool but not its threads (work sent to it would wait forever): a new one.
            _EIGH_POOL = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="kdgeo-eigh"))
        return _EIGH_POOL[1]


def _eigh(a: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a batch ``(..., k, k)``; on the CPU, one matrix per thread.

    On the CPU torch hands a batch to LAPACK one matrix at a time, and LAPACK's ``eigh`` at these
    sizes makes many short parallel regions. Where idle OpenMP threads sleep
    (``OMP_WAIT_POLICY=PASSIVE``, the benchmarks' setting, safer on a shared machine) each region pays
    their wake-up, and a second core gains nothing (four 384 x 384 float64 matrices on a 2-core CPU:
    168 ms batched with 2 threads, 121 ms with 1); decomposing the matrices side by side, at most
    ``torch.get_num_threads()`` at once, is faster there: 170 ms against 99 ms
    (tests/benchmarks/bench_geometry.py prints it). Under libgomp's default policy (threads spin a
    while before sleeping) the batched call already uses both cores and the two are even (91 against
    94 ms, quiet machine; no worse under load). Each matrix's decomposition is the same call either way, so the
    result is too (tests/test_geometry.py checks it bit for bit against the batched call).
    """
    batch = a.shape[:-2]
    count = batch.numel()
    workers = min(count, torch.get_num_threads())
    if a.device.type != "cpu" or workers < 2:
        return torch.linalg.eigh(a)
    flat = a.reshape(count, *a.shape[-2:])
    parts = list(_eigh_pool(workers).map(torch.linalg.eigh, flat.unbind(0)))
    lam = torch.stack([w for w, _ in parts]).reshape(*batch, a.shape[-1])  # (..., k)
    vec = torch.stack([v for _, v in parts]).reshape(a.shape)  # (..., k, k)
    return lam, vec


class _NuclearNormEigh(torch.autograd.Function):
    """``||M||_*`` of a (batch of) float32 matrices ``M (..., p, q)`` from ``eigh`` of the smaller Gram, no SVD.

    Forward: ``G = M^T M`` (or ``M M^T`` when p < q), ``k = min(p, q)``, formed and decomposed in
    float64; ``rho = sum_i sqrt(max(lambda_i, 0))`` (singular values are the square roots of the
    Gram's eigenvalues). Backward: d||M||_*/dM = U V^T = ``M V diag(1/sigma) V^T`` (or
    ``U diag(1/sigma) U^T M``), i.e. ``M (M^T M)^{+1/2}``, in float64, with a pseudo-inverse cut:
    components with ``lambda_i <= 100 k eps_64 lambda_max`` (sigma below ~``sqrt(100 k eps_64)``
    sigma_max, 3e-6 sigma_max at k = 384) get 0 -- the minimum-norm subgradient on a null space,
    so rank-deficient M (centred data, n < d, duplicated rows) gives finite gradients.

    Accuracy. Squaring M squares its condition number: eigh in float64 gives each lambda_i to
    ~k eps_64 lambda_max, so sigma_i to ~k eps_64 sigma_max^2 / sigma_i for large sigma_i and to
    ~sqrt(k eps_64) sigma_max for sigma_i near 0. That is below the rounding float32 M already
    carries (eps_32 sigma_max ~ 6e-8 sigma_max per singular value), so on float32 input this route
    is at least as accurate as float32 svdvals (tests/test_geometry.py measures both against float64
    svdvals). It is *not* float64-exact, so float64 input keeps :func:`torch.linalg.svdvals`.

    Cost. One ``k x k`` Gram and ``eigh`` (about ``p q^2 + 9 k^3`` flops) instead of a Golub-Kahan
    SVD, and svdvals' backward (which needs the full SVD, U and V) becomes two matmuls.
    """

    @staticmethod
    def forward(ctx: Any, m: Tensor) -> Tensor:  # m: (..., p, q)
        tall = m.shape[-2] >= m.shape[-1]
        m64 = m.to(torch.float64)
        gram = m64.mT @ m64 if tall else m64 @ m64.mT  # (..., k, k)
        lam, vec = _eigh(gram)  # (..., k), (..., k, k)
        lam = lam.clamp_min(0.0)
        ctx.tall = tall
        ctx.save_for_backward(m64, lam, vec)
        return lam.sqrt().sum(dim=-1).to(m.dtype)  # (...)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        m64, lam, vec = ctx.saved_tensors
        cut = _EIGH_CUT * lam.shape[-1] * lam.amax(dim=-1, keepdim=True)  # (..., 1)
        keep = lam > cut
        inv_sigma = torch.where(keep, torch.where(keep, lam, torch.ones_like(lam)).rsqrt(), torch.zeros_like(lam))
        p = (vec * inv_sigma.unsqueeze(-2)) @ vec.mT  # (..., k, k) = V diag(1/sigma) V^T = (M^T M)^{+1/2}
        polar = m64 @ p if ctx.tall else p @ m64  # (..., p, q) = U V^T
        return (polar * grad.to(torch.float64)[..., None, None]).to(grad.dtype)


def _nuclear_norm(m: Tensor) -> Tensor:
    """Sum of singular values over the last two dims: svdvals for float64 (exact to ~1e-16), else eigh."""
    if m.dtype == torch.float64:
        return torch.linalg.svdvals(m).sum(dim=-1)
    out = _NuclearNormEigh.apply(m)
    assert isinstance(out, Tensor)  # autograd.Function.apply is typed Any
    return out


def _rho(xn: Tensor, yn: Tensor, route: Route, scale: Tensor | None = None) -> Tensor:
    """Nuclear norm of ``scale * X^T Y`` (see module docstring, "Routes").

    ``scale=None``: X, Y are already normalised. Otherwise they are only centred and ``scale``
    ``(..., 1, 1)`` is ``s_x s_y`` from :func:`_center_scale`; where it is 0 (zero variance, NaN/inf)
    the small matrix is zeroed, so eigh/svdvals never see a NaN.
    """
    n, d_x = xn.shape[-2:]
    d_y = yn.shape[-1]
    if _resolve(route, _procrustes_gram_route_cheaper(n, d_x, d_y, xn.dtype == torch.float64)) == "gram":
        with torch.no_grad():
            # Orthonormal bases containing the row spaces; constants in the graph (exact, see
            # module docstring), so QR backward -- singular for rank-deficient X -- never runs.
            q_x = torch.linalg.qr(xn.detach().mT).Q  # (d_x, min(n, d_x))
            q_y = torch.linalg.qr(yn.detach().mT).Q  # (d_y, min(n, d_y))
        m = (xn @ q_x).mT @ (yn @ q_y)  # (k_x, k_y) = R_x R_y^T, same singular values as X^T Y
    else:
        m = xn.mT @ yn  # (d_x, d_y)
    if scale is not None:
        m = torch.where(scale > 0, m * scale, 0.0)
    return _nuclear_norm(m)


def procrustes_rho(x: Tensor, y: Tensor, *, route: Route = "auto") -> Tensor:
    """Procrustes similarity rho = ||X~^T Y~||_* (nuclear norm) in [0, 1].

    ``X~, Y~`` are centred and unit-Frobenius (:func:`center_and_normalize`); rho is the largest
    ``tr(X~^T Y~ Q)`` over Q with orthonormal columns (Schönemann 1966), i.e. the cosine of the
    angle between the two shapes (Williams et al. 2021, "Generalized shape metrics"; used as a KD
    objective in arXiv 2509.25253). A zero-variance side gives rho = 0.

    Args:
        x: teacher features ``(n, d_t)``.
        y: student features ``(n, d_s)``; widths may differ.
        route: ``"auto"`` (cheaper of the two by the measured cost model), ``"cov"`` (nuclear norm
            of the ``(d_t, d_s)`` cross product) or ``"gram"`` (of an ``n x n`` reduction, cheaper
            when n << d); see the module docstring, "Routes", for the svdvals / eigh kernels.

    Returns:
        Scalar tensor, float32 (float64 for float64 input); differentiable with finite gradients.
    """
    _check_pair(x, y, "procrustes_rho")
    with _full_precision(x.device.type):
        return _nan_unless_finite(_centered_rho(x, y, route), x, y)


def _centered_rho(x: Tensor, y: Tensor, route: Route) -> Tensor:
    """rho of raw ``x, y`` (any leading stack dims): centre, then put both scales on ``X^T Y``."""
    dtype = compute_dtype(x, y)
    xc, s_x = _center_scale(x.to(dtype))
    yc, s_y = _center_scale(y.to(dtype))
    return _rho(xc, yc, route, s_x * s_y)


def _angular(rho: Tensor) -> Tensor:
    """arccos(rho) with exact value and a capped slope near rho = 1 (module docstring)."""
    value = torch.arccos(rho.detach().clamp(0.0, 1.0))
    surrogate = torch.arccos(_clamp_keep_grad(rho, hi=_ARCCOS_GRAD_CAP))
    return surrogate + (value - surrogate).detach()


def procrustes_distance(x: Tensor, y: Tensor, angular: bool = False, *, route: Route = "auto") -> Tensor:
    """Procrustes distance between two feature configurations (arXiv 2509.25253, Sec. 3).

    Squared form (default, the recommended loss):
        ``D^2 = min_Q ||X~ - Y~ Q||_F^2 = 2 - 2 rho``, ``rho = ||X~^T Y~||_*``,
    the minimum over Q with orthonormal rows/columns (the narrower side zero-padded); Schönemann
    1966 for the minimiser, Williams et al. 2021 for the metric. Range [0, 2].

    Angular form: ``arccos(rho)`` in [0, pi/2], a proper metric on shapes (Williams et al. 2021).
    Its slope is infinite at rho = 1; the gradient is capped (module docstring, "Angular clamp").

    Args:
        x: teacher features ``(n, d_t)``.
        y: student features ``(n, d_s)``.
        angular: return ``arccos(rho)`` instead of ``2 - 2 rho``.
        route: see :func:`procrustes_rho`.

    Returns:
        Scalar tensor; a zero-variance side gives D^2 = 2 (angular pi/2).
    """
    _check_pair(x, y, "procrustes_distance")
    with _full_precision(x.device.type):
        rho = _centered_rho(x, y, route)
        value = _angular(rho) if angular else _clamp_keep_grad(2.0 - 2.0 * rho, lo=0.0, hi=2.0)
        return _nan_unless_finite(value, x, y)


def procrustes_distances(
    xs: Sequence[Tensor], ys: Sequence[Tensor], angular: bool = False, *, route: Route = "auto"
) -> list[Tensor]:
    """:func:`procrustes_distance` of every pair ``(xs[k], ys[k])``, pairs of equal shapes in one batched call.

    Layer pairs usually share their shapes (one teacher width, one student width, the same rows),
    so their centring, ``X^T Y`` products and nuclear norms run as one stacked computation
    ``(L, n, d)``: one batched GEMM and one batched ``eigh`` / ``svdvals`` instead of L of each
    (fewer kernel launches on a GPU; on a CPU the same work). Pairs of other shapes or dtypes form
    their own groups. Each value and gradient equals the per-pair call's to rounding
    (tests/test_geometry.py: 1e-12 relative in float64, 1e-6 in float32).

    Returns:
        One scalar tensor per pair, in the order given.
    """
    if len(xs) != len(ys):
        raise ValueError(f"procrustes_distances: {len(xs)} teacher and {len(ys)} student matrices")
    groups: dict[tuple[Any, ...], list[int]] = {}
    for k, (x, y) in enumerate(zip(xs, ys)):
        _check_pair(x, y, f"procrustes_distances[{k}]")
        key = (tuple(x.shape), tuple(y.shape), compute_dtype(x, y), x.device, y.device)
        groups.setdefault(key, []).append(k)
    out: list[Tensor | None] = [None] * len(xs)
    for (_, _, dtype, device, _), members in groups.items():
        if len(members) == 1:
            (k,) = members
            out[k] = procrustes_distance(xs[k], ys[k], angular, route=route)
            continue
        with _full_precision(device.type):
            x = torch.stack([xs[k].to(dtype) for k in members])  # (L, n, d_x)
            y = torch.stack([ys[k].to(dtype) for k in members])  # (L, n, d_y)
            rho = _centered_rho(x, y, route)  # (L,)
            value = _angular(rho) if angular else _clamp_keep_grad(2.0 - 2.0 * rho, lo=0.0, hi=2.0)
            with torch.no_grad():
                finite = _all_finite(x, dims=(-2, -1)) & _all_finite(y, dims=(-2, -1))  # (L,)
            value = torch.where(finite, value, torch.full_like(value, float("nan")))
        for i, k in enumerate(members):
            out[k] = value[i]
    return [v for v in out if v is not None]


# --------------------------------------------------------------------------------------------
# Gram (FG) and CKA
# --------------------------------------------------------------------------------------------


def _gram_distance(xn: Tensor, yn: Tensor, route: Route) -> Tensor:
    n, d_x = xn.shape
    d_y = yn.shape[1]
    if _resolve(route, _gram_route_cheaper(n, d_x, d_y)) == "gram":
        # Direct difference: no cancellation between three O(1) terms.
        return (xn @ xn.mT - yn @ yn.mT).square().sum()  # from (n, n)
    xx, yy, xy = _fro_terms(xn, yn, "cov")
    return _clamp_keep_grad(xx + yy - 2.0 * xy, lo=0.0)


def gram_distance(x: Tensor, y: Tensor, *, route: Route = "auto") -> Tensor:
    """Frobenius distance of the feature Gram matrices (FG; arXiv 2509.25253, Sec. 3).

    ``FG = ||X~ X~^T - Y~ Y~^T||_F^2 = ||X~^T X~||_F^2 + ||Y~^T Y~||_F^2 - 2 ||X~^T Y~||_F^2``
    on centred, unit-Frobenius features, so FG is in [0, 2]. Invariant to orthogonal maps and
    isotropic scaling of either side. Computed on the n x n Grams or the d x d covariances,
    whichever is cheaper (``route`` forces one).

    Args:
        x: teacher features ``(n, d_t)``.
        y: student features ``(n, d_s)``.
        route: ``"auto"``, ``"gram"`` or ``"cov"``.

    Returns:
        Scalar tensor. A zero-variance side counts as the zero matrix.
    """
    _check_pair(x, y, "gram_distance")
    with _full_precision(x.device.type):
        xn, yn = _prepare(x, y)
        return _nan_unless_finite(_gram_distance(xn, yn, route), x, y)


def _hsic1_centered(cross_sq: Tensor, a: Tensor, q_x: Tensor, q_y: Tensor, n: int) -> Tensor:
    """Unbiased HSIC (Song et al. 2012) of linear kernels on *centred* features.

    General form with K~, L~ the kernels with zeroed diagonals:
        HSIC_1 = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1)/((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3)).
    For centred X, Y (X^T 1 = 0): tr(K~ L~) = ||X^T Y||_F^2 - a, 1^T K~ 1 = -q_x,
    1^T K~ L~ 1 = a, with a = sum_i ||x_i||^2 ||y_i||^2 and q_x = ||X||_F^2. (HSIC_1 is
    translation invariant, so centring does not change the estimate; it only simplifies it.)
    """
    return (cross_sq - a * (n / (n - 2)) + q_x * q_y / ((n - 1) * (n - 2))) / (n * (n - 3))


def _cka(xn: Tensor, yn: Tensor, route: Route, debiased: bool) -> Tensor:
    xx, yy, xy = _fro_terms(xn, yn, route)
    if not debiased:
        value = _safe_div(xy, _safe_sqrt(xx * yy))
        return _clamp_keep_grad(value, lo=0.0, hi=1.0)
    n = xn.shape[0]
    r_x = xn.square().sum(dim=1)  # (n,) squared row norms
    r_y = yn.square().sum(dim=1)  # (n,)
    q_x, q_y = r_x.sum(), r_y.sum()
    h_xy = _hsic1_centered(xy, (r_x * r_y).sum(), q_x, q_y, n)
    h_xx = _hsic1_centered(xx, r_x.square().sum(), q_x, q_x, n)
    h_yy = _hsic1_centered(yy, r_y.square().sum(), q_y, q_y, n)
    # HSIC_1(K, K) estimates ||Cov||_F^2 >= 0 but can come out <= 0 for tiny or degenerate n;
    # then there is no usable scale and the similarity is reported as 0.
    den = h_xx * h_yy
    return _safe_div(h_xy, _safe_sqrt(torch.where(den > 0, den, torch.zeros_like(den))))


def cka(x: Tensor, y: Tensor, debiased: bool = False, *, route: Route = "auto") -> Tensor:
    """Linear centred kernel alignment (Kornblith et al. 2019), a similarity in [0, 1].

    ``CKA = ||X~^T Y~||_F^2 / (||X~^T X~||_F ||Y~^T Y~||_F) = <K, L> / (||K||_F ||L||_F)``
    with ``K = X~ X~^T``, ``L = Y~ Y~^T`` of the centred features. The loss is ``1 - CKA``.
    arXiv 2509.25253 shows CKA can be ~1 while the geometry differs (see the tests).

    ``debiased=True``: ``HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))`` with the unbiased
    HSIC estimator of Song et al. 2012 ("debiased CKA", Kornblith et al.'s reference code;
    Murphy et al. 2024); needs n >= 4, can be negative; for probing, not a training loss.

    Args:
        x: teacher features ``(n, d_t)``.
        y: student features ``(n, d_s)``.
        debiased: use the unbiased HSIC estimator.
        route: ``"auto"``, ``"gram"`` or ``"cov"``.

    Returns:
        Scalar tensor; 0 when either side has zero variance.
    """
    _check_pair(x, y, "cka")
    if debiased and x.shape[0] < 4:
        raise ValueError(f"cka(debiased=True) needs n >= 4 rows, got {x.shape[0]}")
    with _full_precision(x.device.type):
        xn, yn = _prepare(x, y)
        return _nan_unless_finite(_cka(xn, yn, route, debiased), x, y)


# --------------------------------------------------------------------------------------------
# projection residual, MSE, cosine
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def projection_residual(x: Tensor, y: Tensor) -> Tensor:
    """Least-squares projection residual ``min_W ||Y~ W - X~||_F^2`` in [0, 1] (metric only).

    ``= ||X~||_F^2 - ||U_r^T X~||_F^2`` with ``U_r`` an orthonormal basis of the column space of
    Y~ (thin SVD, numerical rank at tolerance ``s_max * max(n, d_s) * eps``). This is what a
    learned linear projection (FitNets / TinyBERT style) can reach; arXiv 2509.25253 shows it can
    be ~0 while Procrustes and FG distances stay large. Not differentiable (computed under
    ``no_grad``; the trainable projection loss lives in kdgeo.losses).

    Args:
        x: target (teacher) features ``(n, d_t)``.
        y: source (student) features ``(n, d_s)``.

    Returns:
        Scalar tensor: 0 if X is constant (nothing to explain), 1 if Y is constant.
    """
    _check_pair(x, y, "projection_residual")
    with _full_precision(x.device.type):
        xn, yn = _prepare(x, y)
        u, s, _ = torch.linalg.svd(yn, full_matrices=False)  # u: (n, k), s: (k,)
        tol = s.max() * max(yn.shape) * torch.finfo(s.dtype).eps
        u_r = u[:, s > tol]  # (n, r)
        explained = (u_r.mT @ xn).square().sum()  # from (r, d_t)
        return _nan_unless_finite((xn.square().sum() - explained).clamp(0.0, 1.0), x, y)


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error ``mean_ij (x_ij - y_ij)^2`` of raw (uncentred) features; equal widths.

    The FitNets (Romero et al. 2015) / TinyBERT hidden-state loss when widths already match.

    Returns:
        Scalar tensor (float32, or float64 for float64 input).
    """
    _check_pair(x, y, "mse", same_width=True)
    with _full_precision(x.device.type):
        dtype = compute_dtype(x, y)
        return (x.to(dtype) - y.to(dtype)).square().mean()


def cosine_similarity(x: Tensor, y: Tensor) -> Tensor:
    """Mean row cosine ``(1/n) sum_i <x_i, y_i> / (||x_i|| ||y_i||)``; equal widths.

    A row with zero norm has cosine 0 (defined value, finite gradient; no epsilon).
    """
    _check_pair(x, y, "cosine_similarity", same_width=True)
    with _full_precision(x.device.type):
        dtype = compute_dtype(x, y)
        x, y = x.to(dtype), y.to(dtype)
        dot = (x * y).sum(dim=1)  # (n,)
        norms = _safe_sqrt(x.square().sum(dim=1)) * _safe_sqrt(y.square().sum(dim=1))  # (n,)
        return _nan_unless_finite(_safe_div(dot, norms).mean(), x, y)


def cosine_distance(x: Tensor, y: Tensor) -> Tensor:
    """Cosine loss ``1 - mean_i cos(x_i, y_i)`` (DistilBERT's hidden-state cosine loss); equal widths."""
    return 1.0 - cosine_similarity(x, y)


@torch.no_grad()
def pair_metrics(x: Tensor, y: Tensor) -> dict[str, float]:
    """Procrustes D^2, CKA and FG for one feature pair, for live monitoring (no gradient).

    Centres and normalises once and shares the work between the three metrics.

    Returns:
        ``{"procrustes": D^2, "cka": CKA, "gram": FG}`` as Python floats.
    """
    _check_pair(x, y, "pair_metrics")
    with _full_precision(x.device.type):
        xn, yn = _prepare(x, y)
        rho = _rho(xn, yn, "auto")
        xx, yy, xy = _fro_terms(xn, yn, "auto")
        cka_value = _safe_div(xy, _safe_sqrt(xx * yy)).clamp(0.0, 1.0)
        values = torch.stack(
            [(2.0 - 2.0 * rho).clamp(0.0, 2.0), cka_value, (xx + yy - 2.0 * xy).clamp_min(0.0)]
        )  # (3,)
        procrustes, cka_v, gram = _nan_unless_finite(values, x, y).tolist()
        return {"procrustes": procrustes, "cka": cka_v, "gram": gram}


# --------------------------------------------------------------------------------------------
# streaming accumulator
# --------------------------------------------------------------------------------------------


class NonFiniteFeatures(ValueError):
    """A batch of features holds NaN or inf: ``side`` ("teacher" or "student") and its ``layers``."""

    def __init__(self, side: str, layers: list[int]) -> None:
        self.side, self.layers = side, layers
        super().__init__(f"update: {side} layer(s) {layers} hold NaN or inf values")


def nonfinite_layers(feats: Sequence[Tensor]) -> list[int]:
    """Indices of the feature matrices that hold a NaN or an inf (one host sync for all of them)."""
    if not feats:
        return []
    flags = torch.stack([torch.isfinite(f).all() for f in feats]).tolist()  # (L,)
    return [i for i, ok in enumerate(flags) if not ok]


def _offsets(widths: Sequence[int]) -> list[int]:
    out = [0]
    for w in widths:
        out.append(out[-1] + w)
    return out


def _membership(widths: Sequence[int], device: torch.device) -> Tensor:
    """One-hot (sum d, L) matrix: column l marks layer l's coordinates (segment sums by GEMM)."""
    e = torch.zeros(sum(widths), len(widths), dtype=torch.float64, device=device)  # (D, L)
    for layer, (lo, hi) in enumerate(zip(_offsets(widths)[:-1], _offsets(widths)[1:])):
        e[lo:hi, layer] = 1.0
    return e


def _mean_and_center64(x: Tensor) -> tuple[Tensor, Tensor]:
    """Refined column mean and centred copy (float64): mean + mean of residual, then recentre."""
    m1 = x.mean(dim=0)  # (D,)
    r = x - m1  # (n, D)
    m2 = r.mean(dim=0)  # (D,) rounding residue of the first pass
    return m1 + m2, r - m2


class _TensorKwargs(TypedDict):
    """``dtype`` / ``device`` keywords for ``torch.zeros``, typed so its overloads still match."""

    dtype: torch.dtype
    device: torch.device


class CrossLayerAccumulator:
    """Streaming float64 statistics for every teacher-layer x student-layer pair.

    Per layer it keeps the running count ``n``, the column means ``mu`` and the centred scatter
    ``M = sum_i (x_i - mu)(x_i - mu)^T`` (i.e. ``C = S - s s^T / n`` computed stably): diagonal
    blocks ``M_tt`` per teacher layer and ``M_ss`` per student layer, and the full cross scatter
    ``M_ts = T_c^T S_c`` of the concatenated layers, so one GEMM per batch serves all
    ``L_t x L_s`` pairs. Batches (and other accumulators, :meth:`merge`) are combined with Chan,
    Golub & LeVeque's pairwise update: each batch is centred on its own mean, and
    ``M = M_a + M_b + (n_a n_b / n) delta_x delta_y^T`` with ``delta = mu_b - mu_a``, so a large
    offset (1e3) costs no precision. Memory is independent of n.

    From the scatters, with ``t = tr M`` (the squared norm of the centred features):
    ``rho = ||M_xy||_* / sqrt(t_x t_y)`` (svdvals of the (d_t, d_s) block: ~1e-16 relative,
    where eigvalsh of ``M_xy^T M_xy`` loses ~sqrt(eps) on small singular values),
    ``CKA = ||M_xy||_F^2 / (||M_xx||_F ||M_yy||_F)``, ``FG`` by the expansion, and the projection
    residual ``(t_x - tr(M_xy M_yy^+ M_xy^T)) / t_x = (t_x - ||M_xy V_r L_r^{-1/2}||_F^2) / t_x``
    from the eigendecomposition ``M_yy = V L V^T`` (pseudo-inverse at rank tolerance
    ``L_max * d_s * eps``; conditioning is that of Y squared, so it can differ from the batch
    SVD route for singular values within ~sqrt(eps) of the largest). Zero-variance layers follow
    the module convention.

    ``debiased=True`` also keeps, relative to a reference shift ``r`` (the first batch's mean,
    so the sums stay O(sigma^4) under an offset), per pair ``A = sum_i |x_i|^2 |y_i|^2``,
    ``B = sum_i |x_i|^2 y_i``, ``C = sum_i |y_i|^2 x_i`` and per layer ``sum_i |x_i|^4``,
    ``sum_i |x_i|^2 x_i``. At :meth:`compute` they are shifted exactly to the mean frame and the
    centred unbiased-HSIC formula (:func:`cka`) applies; :meth:`merge` shifts the other
    accumulator's sums to this one's reference.

    Args:
        teacher_widths: width of each teacher layer, e.g. ``[768] * 13``.
        student_widths: width of each student layer.
        device: where the float64 statistics live (inputs are moved there).
        debiased: also keep the terms debiased CKA needs.
    """

    def __init__(
        self,
        teacher_widths: Sequence[int],
        student_widths: Sequence[int],
        device: torch.device | str = "cpu",
        debiased: bool = False,
    ) -> None:
        for side, widths in (("teacher_widths", teacher_widths), ("student_widths", student_widths)):
            if len(widths) == 0:
                raise ValueError(f"CrossLayerAccumulator: {side} is empty; need at least one layer")
            bad = [w for w in widths if not isinstance(w, int) or isinstance(w, bool) or w < 1]
            if bad:
                raise ValueError(f"CrossLayerAccumulator: {side} must be positive ints, got {list(widths)}")
        self.teacher_widths: tuple[int, ...] = tuple(teacher_widths)
        self.student_widths: tuple[int, ...] = tuple(student_widths)
        self.device = torch.device(device)
        self.debiased = bool(debiased)
        self._off_t = _offsets(self.teacher_widths)
        self._off_s = _offsets(self.student_widths)
        d_t, d_s = self._off_t[-1], self._off_s[-1]
        n_t, n_s = len(self.teacher_widths), len(self.student_widths)
        f64: _TensorKwargs = {"dtype": torch.float64, "device": self.device}
        self._n = 0
        self._mean_t = torch.zeros(d_t, **f64)  # (D_t,)
        self._mean_s = torch.zeros(d_s, **f64)  # (D_s,)
        self._m_tt = [torch.zeros(w, w, **f64) for w in self.teacher_widths]  # (d_t, d_t) each
        self._m_ss = [torch.zeros(w, w, **f64) for w in self.student_widths]  # (d_s, d_s) each
        self._m_ts = torch.zeros(d_t, d_s, **f64)  # (D_t, D_s) all pairs
        self._e_t = _membership(self.teacher_widths, self.device)  # (D_t, L_t)
        self._e_s = _membership(self.student_widths, self.device)  # (D_s, L_s)
        if self.debiased:
            self._ref_t = torch.zeros(d_t, **f64)  # (D_t,) reference shift
            self._ref_s = torch.zeros(d_s, **f64)  # (D_s,)
            self._a_ts = torch.zeros(n_t, n_s, **f64)  # (L_t, L_s) sum |x|^2 |y|^2
            self._a_tt = torch.zeros(n_t, **f64)  # (L_t,) sum |x|^4
            self._a_ss = torch.zeros(n_s, **f64)  # (L_s,)
            self._b_ts = torch.zeros(n_t, d_s, **f64)  # (L_t, D_s) sum |x|^2 y
            self._b_st = torch.zeros(n_s, d_t, **f64)  # (L_s, D_t) sum |y|^2 x
            self._b_tt = torch.zeros(d_t, **f64)  # (D_t,) sum |x|^2 x, own layer
            self._b_ss = torch.zeros(d_s, **f64)  # (D_s,)

    # -- bookkeeping ----------------------------------------------------------------------------

    @property
    def n(self) -> int:
        """Number of rows (samples) accumulated so far."""
        return self._n

    def _slices_t(self) -> list[slice]:
        return [slice(a, b) for a, b in zip(self._off_t[:-1], self._off_t[1:])]

    def _slices_s(self) -> list[slice]:
        return [slice(a, b) for a, b in zip(self._off_s[:-1], self._off_s[1:])]

    def _check_layers(self, feats: Sequence[Tensor], widths: tuple[int, ...], side: str) -> None:
        if len(feats) != len(widths):
            raise ValueError(f"update: expected {len(widths)} {side} layers, got {len(feats)}")
        for i, (f, w) in enumerate(zip(feats, widths)):
            if not isinstance(f, Tensor):
                raise TypeError(f"update: {side} layer {i} is a {type(f).__name__}, expected a Tensor")
            if f.ndim != 2 or f.shape[1] != w:
                raise ValueError(f"update: {side} layer {i} has shape {tuple(f.shape)}, expected (n_b, {w})")

    # -- accumulation -------------------------------------------------------------------------

    def update(self, teacher: Sequence[Tensor], student: Sequence[Tensor]) -> None:
        """Add one batch: per-layer ``(n_b, d)`` features, the same ``n_b`` rows on every layer.

        One ``(D_t, D_s)`` GEMM of the concatenated, batch-centred layers serves every pair.
        """
        self._check_layers(teacher, self.teacher_widths, "teacher")
        self._check_layers(student, self.student_widths, "student")
        for side, feats in (("teacher", teacher), ("student", student)):
            bad = nonfinite_layers(feats)
            if bad:
                # Accumulated sums cannot recover from one NaN: refuse the batch, naming the layers.
                raise NonFiniteFeatures(side, bad)
        rows = {f.shape[0] for f in list(teacher) + list(student)}
        if len(rows) != 1:
            raise ValueError(f"update: all layers must have the same number of rows, got {sorted(rows)}")
        n_b = rows.pop()
        if n_b == 0:
            return
        with torch.no_grad(), _full_precision(self.device.type):
            t = torch.cat([f.detach().to(self.device, torch.float64) for f in teacher], dim=1)  # (n_b, D_t)
            s = torch.cat([f.detach().to(self.device, torch.float64) for f in student], dim=1)  # (n_b, D_s)
            if self.debiased:
                if self._n == 0:
                    self._ref_t, self._ref_s = t.mean(dim=0), s.mean(dim=0)  # (D_t,), (D_s,)
                self._add_debiased_sums(t - self._ref_t, s - self._ref_s)
            mu_t, t = _mean_and_center64(t)  # (D_t,), (n_b, D_t) centred
            mu_s, s = _mean_and_center64(s)  # (D_s,), (n_b, D_s) centred
            n_a, n = self._n, self._n + n_b
            delta_t, delta_s = mu_t - self._mean_t, mu_s - self._mean_s  # (D_t,), (D_s,)
            w = n_a * n_b / n  # Chan's mean-difference weight
            self._m_ts.addmm_(t.mT, s).addr_(delta_t, delta_s, alpha=w)  # (D_t, D_s)
            for m, sl in zip(self._m_tt, self._slices_t()):
                m.addmm_(t[:, sl].mT, t[:, sl]).addr_(delta_t[sl], delta_t[sl], alpha=w)
            for m, sl in zip(self._m_ss, self._slices_s()):
                m.addmm_(s[:, sl].mT, s[:, sl]).addr_(delta_s[sl], delta_s[sl], alpha=w)
            self._mean_t.add_(delta_t, alpha=n_b / n)
            self._mean_s.add_(delta_s, alpha=n_b / n)
            self._n = n

    def _add_debiased_sums(self, t: Tensor, s: Tensor) -> None:
        """Accumulate the debiased-HSIC sums for features already shifted by the reference."""
        nrm_t = t.square() @ self._e_t  # (n_b, L_t) squared row norm per teacher layer
        nrm_s = s.square() @ self._e_s  # (n_b, L_s)
        self._a_ts.addmm_(nrm_t.mT, nrm_s)
        self._a_tt.add_(nrm_t.square().sum(dim=0))
        self._a_ss.add_(nrm_s.square().sum(dim=0))
        self._b_ts.addmm_(nrm_t.mT, s)  # (L_t, D_s)
        self._b_st.addmm_(nrm_s.mT, t)  # (L_s, D_t)
        self._b_tt.add_(((nrm_t @ self._e_t.mT) * t).sum(dim=0))  # (D_t,)
        self._b_ss.add_(((nrm_s @ self._e_s.mT) * s).sum(dim=0))  # (D_s,)

    def merge(self, other: CrossLayerAccumulator) -> None:
        """Fold ``other`` into this accumulator (Chan's pairwise update); ``other`` is unchanged.

        The result equals one accumulator fed all rows of both (to rounding) -- the primitive
        for DDP: all-gather the states and merge.
        """
        if not isinstance(other, CrossLayerAccumulator):
            raise TypeError(f"merge: expected a CrossLayerAccumulator, got {type(other).__name__}")
        if (other.teacher_widths, other.student_widths) != (self.teacher_widths, self.student_widths):
            raise ValueError(
                "merge: layer widths differ: "
                f"{self.teacher_widths} x {self.student_widths} vs {other.teacher_widths} x {other.student_widths}"
            )
        if other.debiased != self.debiased:
            raise ValueError("merge: one accumulator keeps debiased-CKA terms and the other does not")
        if other._n == 0:
            return
        dev = self.device
        with torch.no_grad(), _full_precision(dev.type):
            if self.debiased:
                if self._n == 0:
                    self._ref_t, self._ref_s = other._ref_t.to(dev).clone(), other._ref_s.to(dev).clone()
                shifted = other._shifted_debiased(
                    (self._ref_t - other._ref_t.to(dev)).to(other.device),
                    (self._ref_s - other._ref_s.to(dev)).to(other.device),
                )
                for name, value in shifted.items():
                    getattr(self, name).add_(value.to(dev))
            n_a, n_b = self._n, other._n
            n = n_a + n_b
            delta_t = other._mean_t.to(dev) - self._mean_t  # (D_t,)
            delta_s = other._mean_s.to(dev) - self._mean_s  # (D_s,)
            w = n_a * n_b / n
            self._m_ts.add_(other._m_ts.to(dev)).addr_(delta_t, delta_s, alpha=w)
            for m, mo, sl in zip(self._m_tt, other._m_tt, self._slices_t()):
                m.add_(mo.to(dev)).addr_(delta_t[sl], delta_t[sl], alpha=w)
            for m, mo, sl in zip(self._m_ss, other._m_ss, self._slices_s()):
                m.add_(mo.to(dev)).addr_(delta_s[sl], delta_s[sl], alpha=w)
            self._mean_t.add_(delta_t, alpha=n_b / n)
            self._mean_s.add_(delta_s, alpha=n_b / n)
            self._n = n

    # -- exact re-centring of the debiased sums -------------------------------------------------

    def _shifted_self(
        self,
        a: Tensor,
        b: Tensor,
        blocks: list[Tensor],
        slices: list[slice],
        mean: Tensor,
        ref: Tensor,
        c: Tensor,
        e: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Shift per-layer sums A = sum |x|^4, B = sum |x|^2 x from frame ``ref`` to ``ref + c``.

        With x' = x - c, P = |x|^2, s = sum x, S = sum x x^T, q = sum P (all in the old frame):
        A' = A - 4 c.B + 2|c|^2 q + 4 c^T S c - 4|c|^2 c.s + n|c|^4,
        B' = B - q c - 2 S c + 2 (c.s) c + |c|^2 s - n |c|^2 c.
        """
        n = self._n
        d = mean - ref  # (D,) old-frame mean
        s = n * d  # (D,) old-frame column sums
        cc = (c * c) @ e  # (L,) |c_l|^2
        cs = (c * s) @ e  # (L,) c_l . s_l
        q = torch.stack([torch.trace(m) for m in blocks]) + n * ((d * d) @ e)  # (L,) sum |x|^2
        sc = torch.cat(
            [m @ c[sl] + n * d[sl] * (d[sl] @ c[sl]) for m, sl in zip(blocks, slices)]
        )  # (D,) S c per layer block
        csc = (c * sc) @ e  # (L,) c^T S c
        a_new = a - 4.0 * ((c * b) @ e) + 2.0 * cc * q + 4.0 * csc - 4.0 * cc * cs + n * cc * cc
        ex = lambda v: e @ v  # noqa: E731  (L,) -> (D,) broadcast a per-layer scalar
        b_new = b - ex(q) * c - 2.0 * sc + 2.0 * ex(cs) * c + ex(cc) * s - n * ex(cc) * c
        return a_new, b_new

    def _shifted_debiased(self, c_t: Tensor, c_s: Tensor) -> dict[str, Tensor]:
        """All debiased sums re-expressed relative to ``ref + c`` (x' = x - c_t, y' = y - c_s).

        Cross terms, per teacher layer i and student layer j (P = |x|^2, Q = |y|^2):
        A' = A - 2 e.B - 2 c.C + |e|^2 q_x + |c|^2 q_y + 4 c^T S_xy e - 2|e|^2 c.s_x
             - 2|c|^2 e.s_y + n|c|^2|e|^2,
        B' = B - q_x e - 2 S_xy^T c + 2 (c.s_x) e + |c|^2 s_y - n|c|^2 e      (B = sum P y),
        C' = C - q_y c - 2 S_xy e + 2 (e.s_y) c + |e|^2 s_x - n|e|^2 c        (C = sum Q x).
        """
        n = self._n
        e_t, e_s = self._e_t, self._e_s
        d_t, d_s = self._mean_t - self._ref_t, self._mean_s - self._ref_s  # (D_t,), (D_s,)
        s_t, s_s = n * d_t, n * d_s  # old-frame column sums
        s_ts = self._m_ts + n * torch.outer(d_t, d_s)  # (D_t, D_s) old-frame cross sums
        q_t = torch.stack([torch.trace(m) for m in self._m_tt]) + n * ((d_t * d_t) @ e_t)  # (L_t,)
        q_s = torch.stack([torch.trace(m) for m in self._m_ss]) + n * ((d_s * d_s) @ e_s)  # (L_s,)
        cc, ee = (c_t * c_t) @ e_t, (c_s * c_s) @ e_s  # (L_t,), (L_s,)
        cs, es = (c_t * s_t) @ e_t, (c_s * s_s) @ e_s  # (L_t,), (L_s,)
        c_blk = e_t * c_t[:, None]  # (D_t, L_t) c restricted to each teacher layer
        e_blk = e_s * c_s[:, None]  # (D_s, L_s)
        s_c = s_ts.mT @ c_blk  # (D_s, L_t): column i = S_{i,:}^T c_i
        s_e = s_ts @ e_blk  # (D_t, L_s): column j = S_{:,j} e_j
        a_ts = (
            self._a_ts
            - 2.0 * ((self._b_ts * c_s) @ e_s)
            - 2.0 * ((self._b_st * c_t) @ e_t).mT
            + q_t[:, None] * ee[None, :]
            + cc[:, None] * q_s[None, :]
            + 4.0 * (c_blk.mT @ s_e)
            - 2.0 * cs[:, None] * ee[None, :]
            - 2.0 * cc[:, None] * es[None, :]
            + n * cc[:, None] * ee[None, :]
        )  # (L_t, L_s)
        b_ts = (
            self._b_ts
            - q_t[:, None] * c_s[None, :]
            - 2.0 * s_c.mT
            + 2.0 * cs[:, None] * c_s[None, :]
            + cc[:, None] * s_s[None, :]
            - n * cc[:, None] * c_s[None, :]
        )  # (L_t, D_s)
        b_st = (
            self._b_st
            - q_s[:, None] * c_t[None, :]
            - 2.0 * s_e.mT
            + 2.0 * es[:, None] * c_t[None, :]
            + ee[:, None] * s_t[None, :]
            - n * ee[:, None] * c_t[None, :]
        )  # (L_s, D_t)
        a_tt, b_tt = self._shifted_self(
            self._a_tt, self._b_tt, self._m_tt, self._slices_t(), self._mean_t, self._ref_t, c_t, e_t
        )
        a_ss, b_ss = self._shifted_self(
            self._a_ss, self._b_ss, self._m_ss, self._slices_s(), self._mean_s, self._ref_s, c_s, e_s
        )
        return {
            "_a_ts": a_ts, "_a_tt": a_tt, "_a_ss": a_ss,
            "_b_ts": b_ts, "_b_st": b_st, "_b_tt": b_tt, "_b_ss": b_ss,
        }  # fmt: skip

    # -- read-out -------------------------------------------------------------------------------

    def _zero_variance(self, blocks: list[Tensor], mean: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """(t, is_zero) per layer: t = tr M; zero when sqrt(t) <= eps * ||X||_F (raw norm)."""
        t = torch.stack([torch.trace(m) for m in blocks])  # (L,)
        raw = t + self._n * ((mean * mean) @ e)  # (L,) sum of squares of the raw features
        eps = torch.finfo(torch.float64).eps
        return t, t <= (eps * eps) * raw

    def compute(self, metric: str) -> Tensor:
        """The ``(L_teacher, L_student)`` float64 table of ``metric`` over all rows seen so far.

        Values: ``procrustes`` -> D^2 = 2 - 2 rho, ``procrustes_angular`` -> arccos(rho),
        ``gram`` -> FG distance, ``cka`` -> CKA similarity, ``cka_debiased`` -> debiased CKA
        (needs ``debiased=True`` and n >= 4), ``projection`` -> residual of a least-squares map
        from the student layer onto the teacher layer. See :data:`METRIC_HIGHER_IS_BETTER`.
        Equal to the batch functions on all rows (to ~1e-12 relative in float64).
        """
        if metric not in METRICS:
            raise ValueError(f"compute: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        if self._n == 0:
            raise ValueError("compute: no rows accumulated yet; call update() first")
        if metric == "cka_debiased":
            if not self.debiased:
                raise ValueError("compute('cka_debiased') needs CrossLayerAccumulator(..., debiased=True)")
            if self._n < 4:
                raise ValueError(f"compute('cka_debiased') needs n >= 4 rows, got {self._n}")
        with torch.no_grad(), _full_precision(self.device.type):
            t_t, zero_t = self._zero_variance(self._m_tt, self._mean_t, self._e_t)  # (L_t,)
            t_s, zero_s = self._zero_variance(self._m_ss, self._mean_s, self._e_s)  # (L_s,)
            sl_t, sl_s = self._slices_t(), self._slices_s()
            out = torch.zeros(len(sl_t), len(sl_s), dtype=torch.float64, device=self.device)  # (L_t, L_s)
            if metric in ("procrustes", "procrustes_angular"):
                for i, a in enumerate(sl_t):
                    for j, b in enumerate(sl_s):
                        if zero_t[i] or zero_s[j]:
                            continue  # rho = 0 by convention
                        nuc = torch.linalg.svdvals(self._m_ts[a, b]).sum()
                        out[i, j] = nuc / torch.sqrt(t_t[i] * t_s[j])
                if metric == "procrustes":
                    return (2.0 - 2.0 * out).clamp(0.0, 2.0)
                return torch.arccos(out.clamp(0.0, 1.0))
            if metric in ("gram", "cka"):
                fro_t = torch.stack([m.square().sum() for m in self._m_tt])  # (L_t,) ||M_xx||_F^2
                fro_s = torch.stack([m.square().sum() for m in self._m_ss])  # (L_s,)
                cross = torch.stack(
                    [torch.stack([self._m_ts[a, b].square().sum() for b in sl_s]) for a in sl_t]
                )  # (L_t, L_s) ||M_xy||_F^2
                if metric == "cka":
                    out = cross / torch.sqrt(torch.outer(fro_t, fro_s))
                    out = torch.where(zero_t[:, None] | zero_s[None, :], torch.zeros_like(out), out)
                    return out.clamp(0.0, 1.0)
                # FG on unit-norm features; a zero-variance side contributes nothing.
                ones_t, ones_s = torch.ones_like(t_t), torch.ones_like(t_s)
                kx = torch.where(zero_t, 0.0, fro_t / torch.where(zero_t, ones_t, t_t).square())  # (L_t,)
                ky = torch.where(zero_s, 0.0, fro_s / torch.where(zero_s, ones_s, t_s).square())  # (L_s,)
                kxy = cross / torch.outer(torch.where(zero_t, ones_t, t_t), torch.where(zero_s, ones_s, t_s))
                kxy = torch.where(zero_t[:, None] | zero_s[None, :], torch.zeros_like(kxy), kxy)
                return (kx[:, None] + ky[None, :] - 2.0 * kxy).clamp_min(0.0)
            if metric == "projection":
                eps = torch.finfo(torch.float64).eps
                for j, b in enumerate(sl_s):
                    if zero_s[j]:
                        out[:, j] = 1.0  # nothing to project from
                        continue
                    lam, vec = torch.linalg.eigh(self._m_ss[j])  # (d_s,), (d_s, d_s)
                    keep = lam > lam.max() * self.student_widths[j] * eps
                    w = vec[:, keep] * torch.rsqrt(lam[keep])  # (d_s, r) whitening of Y
                    z = self._m_ts[:, b] @ w  # (D_t, r)
                    explained = z.square().sum(dim=1) @ self._e_t  # (L_t,) per teacher layer
                    res = (t_t - explained) / torch.where(zero_t, torch.ones_like(t_t), t_t)
                    out[:, j] = torch.where(zero_t, torch.zeros_like(res), res)
                return out.clamp(0.0, 1.0)
            # cka_debiased: shift the sums to the mean frame, then the centred HSIC_1 formula.
            n = self._n
            shifted = self._shifted_debiased(self._mean_t - self._ref_t, self._mean_s - self._ref_s)
            fro_t = torch.stack([m.square().sum() for m in self._m_tt])  # (L_t,)
            fro_s = torch.stack([m.square().sum() for m in self._m_ss])  # (L_s,)
            cross = torch.stack([torch.stack([self._m_ts[a, b].square().sum() for b in sl_s]) for a in sl_t])
            h_xy = _hsic1_centered(cross, shifted["_a_ts"], t_t[:, None], t_s[None, :], n)  # (L_t, L_s)
            h_xx = _hsic1_centered(fro_t, shifted["_a_tt"], t_t, t_t, n)  # (L_t,)
            h_yy = _hsic1_centered(fro_s, shifted["_a_ss"], t_s, t_s, n)  # (L_s,)
            den = torch.outer(h_xx, h_yy)
            ok = (den > 0) & ~zero_t[:, None] & ~zero_s[None, :]
            return torch.where(ok, h_xy / torch.sqrt(torch.where(ok, den, torch.ones_like(den))), 0.0)
