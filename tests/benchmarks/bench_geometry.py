"""Benchmark kdgeo.geometry: the all-pairs streaming probe and the training-path loss cost.

Usage::

    python tests/benchmarks/bench_geometry.py [--quick]

Not collected by pytest (no ``test_`` names). Prints two tables:

1. All-pairs probe, teacher 13 layers x 768, student 7 layers x 384, synthetic correlated
   features, metrics procrustes + cka + gram. ``stream``: CrossLayerAccumulator fed 512-row
   chunks (one float64 GEMM over the concatenated layers per chunk). ``per-pair``: hold every
   activation in memory (float32, as a forward pass returns them) and call ``pair_metrics`` on
   each of the 91 pairs in float64 (same precision as the probe) -- the anatome/netrep pattern.
   Each configuration runs in a fresh subprocess; memory is ``ru_maxrss`` after the run minus
   ``ru_maxrss`` after imports and setup (peak resident growth, honest but coarse). Time covers
   the metric work only (data synthesis excluded on both sides). ``max|diff|`` compares the two
   methods' tables.
2. Training-path cost: forward + backward of each geometry loss on a (4096 x 768 teacher,
   4096 x 384 student) batch, relative to the projection-MSE baseline (learned W: Y W then MSE,
   gradients to Y and W). Medians over alternating repetitions; ``torch.set_num_threads(2)``.
3. Routes: forward + backward ms of procrustes D^2 and FG with the ``n x n`` route, the ``d x d``
   route and ``auto``, for n in 64..4096 and widths 768/384, 384/384, 384/256, all measured in
   turns in one run; ``auto/fastest`` is the picked route's median over the faster one's (goal <= 1.10).

``--routes-only`` skips table 1. The load average is printed at the start and the end: ratios are
measured side by side, absolute times only mean something on a quiet machine.
"""

from __future__ import annotations

import os

# Must precede `import torch` (libgomp reads it at load). With the default spinning policy, MKL's
# threaded LAPACK (svdvals, eigh) slows down ~100x on an oversubscribed CPU: measured 4.0 s vs
# 0.04 s for svdvals of a 768 x 384 float32 matrix on this shared 2-core machine under load 5.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

try:  # run from a checkout without `pip install -e .`
    import kdgeo  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

T_LAYERS, T_WIDTH = 13, 768
S_LAYERS, S_WIDTH = 7, 384
LATENT = 64
CHUNK = 512
PROBE_METRICS = ("procrustes", "cka", "gram")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class _Synth:
    """Deterministic synthetic activations: layer l = z W_l + noise, W_l drifting with depth."""

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.t_maps = self._drifting(T_LAYERS, T_WIDTH, gen)  # list of (LATENT, 768)
        self.s_maps = self._drifting(S_LAYERS, S_WIDTH, gen)  # list of (LATENT, 384)

    @staticmethod
    def _drifting(layers: int, width: int, gen: torch.Generator) -> list[Tensor]:
        w = torch.randn(LATENT, width, generator=gen)
        maps = []
        for _ in range(layers):
            w = 0.8 * w + 0.6 * torch.randn(LATENT, width, generator=gen)
            maps.append(w.clone())
        return maps

    def chunk(self, index: int, rows: int) -> tuple[list[Tensor], list[Tensor]]:
        gen = torch.Generator().manual_seed(10_000 + index)
        z = torch.randn(rows, LATENT, generator=gen)  # (rows, LATENT)
        teacher = [z @ m + 0.5 * torch.randn(rows, T_WIDTH, generator=gen) for m in self.t_maps]
        student = [z @ m + 0.5 * torch.randn(rows, S_WIDTH, generator=gen) for m in self.s_maps]
        return teacher, student


def _probe_worker(method: str, n: int) -> dict[str, object]:
    from kdgeo.geometry import CrossLayerAccumulator, pair_metrics

    torch.set_num_threads(2)
    synth = _Synth()
    starts = list(range(0, n, CHUNK))
    base_rss = _maxrss_mb()
    busy = 0.0
    if method == "stream":
        acc = CrossLayerAccumulator([T_WIDTH] * T_LAYERS, [S_WIDTH] * S_LAYERS)
        for k, start in enumerate(starts):
            teacher, student = synth.chunk(k, min(CHUNK, n - start))
            t0 = time.perf_counter()
            acc.update(teacher, student)
            busy += time.perf_counter() - t0
        t0 = time.perf_counter()
        tables = {m: acc.compute(m).tolist() for m in PROBE_METRICS}
        busy += time.perf_counter() - t0
    elif method == "per-pair":
        teacher_all = [torch.empty(n, T_WIDTH) for _ in range(T_LAYERS)]  # all activations held
        student_all = [torch.empty(n, S_WIDTH) for _ in range(S_LAYERS)]
        for k, start in enumerate(starts):
            teacher, student = synth.chunk(k, min(CHUNK, n - start))
            for dst, src in zip(teacher_all + student_all, teacher + student):
                dst[start : start + src.shape[0]] = src
        del teacher, student
        t0 = time.perf_counter()
        out = [[pair_metrics(t.double(), s.double()) for s in student_all] for t in teacher_all]
        busy = time.perf_counter() - t0
        tables = {m: [[cell[m] for cell in row] for row in out] for m in PROBE_METRICS}
    else:
        raise ValueError(method)
    return {"seconds": busy, "rss_growth_mb": _maxrss_mb() - base_rss, "tables": tables}


def _run_probe(method: str, n: int) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", method, "--n", str(n)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_table_diff(a: dict[str, list[list[float]]], b: dict[str, list[list[float]]]) -> float:
    return max(abs(x - y) for m in PROBE_METRICS for ra, rb in zip(a[m], b[m]) for x, y in zip(ra, rb))


def probe_table(ns: list[int]) -> None:
    print(
        f"\n## All-pairs probe: teacher {T_LAYERS}x{T_WIDTH}, student {S_LAYERS}x{S_WIDTH}, "
        f"{T_LAYERS * S_LAYERS} pairs, metrics {'+'.join(PROBE_METRICS)}, chunks of {CHUNK} rows"
    )
    print(f"{'n':>7} | {'method':>8} | {'time s':>8} | {'RSS growth MiB':>14} | {'speed-up':>8} | {'max|diff|':>9}")
    print("-" * 70)
    for n in ns:
        stream = _run_probe("stream", n)
        pairs = _run_probe("per-pair", n)
        diff = _max_table_diff(stream["tables"], pairs["tables"])  # type: ignore[arg-type]
        speed = pairs["seconds"] / stream["seconds"]  # type: ignore[operator]
        print(
            f"{n:>7} | {'stream':>8} | {stream['seconds']:>8.2f} | {stream['rss_growth_mb']:>14.0f} | "
            f"{speed:>7.2f}x | {diff:>9.1e}"
        )
        print(f"{n:>7} | {'per-pair':>8} | {pairs['seconds']:>8.2f} | {pairs['rss_growth_mb']:>14.0f} | {'1.00x':>8} |")
    held = lambda n: n * (T_LAYERS * T_WIDTH + S_LAYERS * S_WIDTH) * 4 / 2**20  # noqa: E731
    state = (T_LAYERS * T_WIDTH * S_LAYERS * S_WIDTH + T_LAYERS * T_WIDTH**2 + S_LAYERS * S_WIDTH**2) * 8 / 2**20
    print(
        f"(stream state: {state:.0f} MiB float64 for any n; per-pair holds "
        + ", ".join(f"{held(n):.0f} MiB at n={n}" for n in ns)
        + " of float32 activations)"
    )


def loss_table(reps: int, n: int = 4096) -> None:
    from kdgeo import geometry as g

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(n, LATENT, generator=gen)
    x = z @ torch.randn(LATENT, T_WIDTH, generator=gen) + torch.randn(n, T_WIDTH, generator=gen)  # (n, 768)
    y0 = z @ torch.randn(LATENT, S_WIDTH, generator=gen) + torch.randn(n, S_WIDTH, generator=gen)  # (n, 384)
    w0 = torch.randn(S_WIDTH, T_WIDTH, generator=gen) / S_WIDTH**0.5  # (384, 768)

    def fwd_bwd(loss_fn: Callable[[Tensor], Tensor], with_w: bool = False) -> Callable[[], None]:
        def run() -> None:
            y = y0.clone().requires_grad_(True)
            if with_w:
                w = w0.clone().requires_grad_(True)
                loss = torch.nn.functional.mse_loss(y @ w, x)
            else:
                loss = loss_fn(y)
            loss.backward()

        return run

    cases: list[tuple[str, Callable[[], None]]] = [
        ("projection-MSE (Y W, baseline)", fwd_bwd(lambda y: y, with_w=True)),
        ("procrustes D^2", fwd_bwd(lambda y: g.procrustes_distance(x, y))),
        ("procrustes angular", fwd_bwd(lambda y: g.procrustes_distance(x, y, angular=True))),
        ("gram (FG)", fwd_bwd(lambda y: g.gram_distance(x, y))),
        ("1 - cka", fwd_bwd(lambda y: 1.0 - g.cka(x, y))),
        ("1 - cka (debiased)", fwd_bwd(lambda y: 1.0 - g.cka(x, y, debiased=True))),
        ("gram (FG), n x n route forced", fwd_bwd(lambda y: g.gram_distance(x, y, route="gram"))),
    ]
    print(
        f"\n## Training-path loss cost: forward+backward, teacher {n}x{T_WIDTH}, student {n}x{S_WIDTH}, "
        f"median of {reps} alternating repeats, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'loss':>32} | {'ms':>8} | {'x baseline':>10}")
    print("-" * 56)
    ts = _alternating_medians(dict(cases), reps)
    base = ts[cases[0][0]]
    for name, _ in cases:
        print(f"{name:>32} | {ts[name] * 1e3:>8.1f} | {ts[name] / base:>10.2f}")
    print(f"procrustes D^2 / projection-MSE: {ts['procrustes D^2'] / base:.2f}x (goal <= 1.5x)")


def eigh_table(reps: int, k: int = 384, batch: int = 4) -> None:
    """The batched Procrustes eigh: torch's batched call against kdgeo's one matrix per thread (geometry._eigh)."""
    from kdgeo import geometry as g

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(batch, 2 * k, k, generator=gen, dtype=torch.float64)
    gram = a.mT @ a  # (batch, k, k), as _NuclearNormEigh forms it
    ts = _alternating_medians(
        {"batched": lambda: torch.linalg.eigh(gram), "threads": lambda: g._eigh(gram)},  # type: ignore[dict-item]
        reps,
    )
    same = all(torch.equal(u, v) for u, v in zip(torch.linalg.eigh(gram), g._eigh(gram)))
    print(
        f"\n## Procrustes eigh: {batch} x ({k} x {k}) float64, {torch.get_num_threads()} threads, median of {reps}: "
        f"torch batched {ts['batched'] * 1e3:.1f} ms, kdgeo one matrix per thread {ts['threads'] * 1e3:.1f} ms "
        f"({ts['batched'] / ts['threads']:.2f}x faster; results bitwise equal: {same})"
    )


ROUTE_GRID_N = (64, 128, 256, 512, 1024, 2048, 4096)
ROUTE_GRID_WIDTHS = ((768, 384), (384, 384), (384, 256))


def _alternating_medians(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Median seconds of each fn, run in turns (A B C, B C A, ...) so load drifts hit all alike."""
    for fn in fns.values():
        fn()  # warm-up
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def route_grid(reps: int, ns: tuple[int, ...] = ROUTE_GRID_N) -> list[float]:
    """Forward+backward ms of each route and of ``auto`` for procrustes D^2 and FG over n x widths.

    Returns the ratios auto / fastest route (goal <= 1.10 everywhere).
    """
    from kdgeo import geometry as g

    ratios: list[float] = []
    print(
        f"\n## Routes: forward+backward ms, float32, median of {reps} alternating repeats; "
        "'auto' is what the default picks (kdgeo.geometry's measured cost model)"
    )
    print(
        f"{'loss':>10} | {'n':>5} | {'d_t/d_s':>7} | {'picks':>5} | {'gram (n x n)':>12} | {'cov (d x d)':>11} | "
        f"{'auto':>7} | {'auto/fastest':>12} | {'picked/fastest':>14}"
    )
    print("-" * 113)
    for loss in ("procrustes", "gram"):
        for d_t, d_s in ROUTE_GRID_WIDTHS:
            for n in ns:
                gen = torch.Generator().manual_seed(n + d_t + d_s)
                z = torch.randn(n, LATENT, generator=gen)
                x = z @ torch.randn(LATENT, d_t, generator=gen) + torch.randn(n, d_t, generator=gen)  # (n, d_t)
                y0 = z @ torch.randn(LATENT, d_s, generator=gen) + torch.randn(n, d_s, generator=gen)  # (n, d_s)
                fn = g.procrustes_distance if loss == "procrustes" else g.gram_distance

                def run(route: str, fn: Callable[..., Tensor] = fn, x: Tensor = x, y0: Tensor = y0) -> None:
                    y = y0.clone().requires_grad_(True)
                    fn(x, y, route=route).backward()

                ts = _alternating_medians({r: (lambda r=r: run(r)) for r in ("gram", "cov", "auto")}, reps)
                if loss == "procrustes":
                    pick = "gram" if g._procrustes_gram_route_cheaper(n, d_t, d_s) else "cov"
                else:
                    pick = "gram" if g._gram_route_cheaper(n, d_t, d_s) else "cov"
                # auto runs the picked route's code, so its own median differs from that route's by noise
                # only: both are shown, auto's own median over the fastest route's and the picked route's.
                ratio = ts["auto"] / min(ts["gram"], ts["cov"])
                picked = ts[pick] / min(ts["gram"], ts["cov"])
                ratios.append(ratio)
                print(
                    f"{loss:>10} | {n:>5} | {f'{d_t}/{d_s}':>7} | {pick:>5} | {ts['gram'] * 1e3:>12.1f} | "
                    f"{ts['cov'] * 1e3:>11.1f} | {ts['auto'] * 1e3:>7.1f} | {ratio:>12.2f} | {picked:>14.2f}"
                )
    print(f"worst auto/fastest: {max(ratios):.2f} (goal <= 1.10)")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller n and fewer repetitions")
    parser.add_argument("--routes-only", action="store_true", help="skip the all-pairs probe table")
    parser.add_argument("--worker", choices=["stream", "per-pair"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_probe_worker(args.worker, args.n)))
        return
    torch.set_num_threads(2)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
        f"{os.environ['OMP_WAIT_POLICY']}, load average {os.getloadavg()[0]:.1f}, "
        f"{'quick' if args.quick else 'full'} run"
    )
    t0 = time.perf_counter()
    if not args.routes_only:
        probe_table([1024, 4096] if args.quick else [2048, 32768])
    loss_table(reps=5 if args.quick else 7)
    eigh_table(reps=5 if args.quick else 7)
    route_grid(reps=5 if args.quick else 7, ns=(64, 256, 1024, 4096) if args.quick else ROUTE_GRID_N)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
