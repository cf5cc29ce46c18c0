"""A partial symmetric eigensolver for the GPU path: the top-q eigenvectors of a Gram matrix without a full eigh.

Chebyshev-filtered subspace iteration (Zhou and Saad, "A Chebyshev-Davidson algorithm for large symmetric
eigenproblems", SIAM J. Matrix Anal. Appl. 29(3), 2007; Zhou, Saad, Tiago and Chelikowsky, J. Comput. Phys. 219,
2006): a block of q vectors is multiplied by a Chebyshev polynomial of G that is bounded by 1 on [0, c] (c the
smallest Ritz value of the block, an estimate of the (q)th eigenvalue) and grows fast above it, re-orthonormalised,
and Rayleigh-Ritz'd, until the r wanted Ritz pairs are converged. Why it and not a full eigh: cuSOLVER's syevd
computes all n eigenpairs (about 10/3 n^3 flop at least, and latency-bound: 0.05-0.15 s at n = 3584) to keep q of
them; here the work is a few dozen (n x n) @ (n x q) products, which a GPU runs at GEMM speed.

Why Chebyshev and not plain subspace iteration: pretrained weights have flat spectra around r (on SmolLM2-135M
s_32 / s_49 is 1.04-1.6), so the top-r subspace converges like (s_q+1 / s_r)^2 per product, 0.85-0.92: 60-140
products. A degree-d Chebyshev polynomial converges like exp(-2 d sqrt(gap)) instead, about 40 products on the same
matrices (numbers in benchmarks/RESULTS.md). LOBPCG converges as fast but needs a (3q x 3q) eigh and two
orthonormalisations per product; this needs one (q x q) eigh per filter of several products.

Precision. The iteration runs in float64 on the float32 Gram (promoted), so it converges to that Gram's own
eigenvectors; stopping when every wanted Ritz pair's residual ||G x - theta x|| is below TOL * theta_1 makes them
exact eigenpairs of a matrix within TOL * ||G|| of G (a backward error), with TOL = eps32 / 4 below the float32
Gram's own rounding (eps32 / 2 relative per entry): the solver adds no error the float32 Gram did not already have.
The degree of each filter is capped so that the filter amplifies the top eigenvalue at most MAX_RANGE = 1e8 times
more than the r-th: larger would push the r-th direction below float64's rounding of the first (the classic
dynamic-range limit of polynomial filters), smaller costs more filters (more small eighs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TOL = torch.finfo(torch.float32).eps / 4
MAX_RANGE = 1e8
MAX_DEGREE = 16


@dataclass
class FilterStats:
    """What one solve cost: `products` (n x n) @ (n x q) products, `cycles` filter + Rayleigh-Ritz rounds (one
    q x q eigh and one QR each), `converged` False when it stopped at the product cap (the caller falls back)."""

    products: int = 0
    cycles: int = 0
    converged: bool = False

    def flops(self, n: int, q: int, r: int) -> float:
        """Floating-point operations, counted per product as 2 n^2 q (GEMM) and per cycle as the QR (4 n q^2),
        the projected matrix Q^T G Q (2 n q^2), the Ritz vectors X = Q Z and G X (4 n q^2) and the residuals
        (3 n r)."""
        return self.products * 2.0 * n * n * q + self.cycles * (10.0 * n * q * q + 3.0 * n * r)


def small_eigh(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a small symmetric float64 matrix H (q x q), largest first, computed on the CPU.

    Why the CPU: LAPACK's eigh of a 48 x 48 matrix takes tens of microseconds, cuSOLVER's is latency-bound, and
    torch's CUDA eigh picks a different algorithm (batched Jacobi) for n <= 32 in a batch than alone (syevd), so
    results would depend on the batching. Returns (theta (q,), Z (q, q)) on H's device."""
    evals, vecs = torch.linalg.eigh(H.detach().to("cpu", torch.float64))
    return evals.flip(-1).to(H.device), vecs.flip(-1).to(H.device)


def _start(n: int, q: int, device: torch.device) -> torch.Tensor:
    """An orthonormal (n x q) start, the same on every device and run (drawn on the CPU from a fixed seed)."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, q, generator=gen, dtype=torch.float64).to(device))
    return Q


def _growth(t: float) -> float:
    """The rate at which T_d(t) grows with d: T_d(t) ~ (t + sqrt(t^2 - 1))^d / 2 for t >= 1 (1 inside [-1, 1])."""
    return t + math.sqrt(t * t - 1) if t > 1 else 1.0


def _degree(theta_1: float, theta_r: float, cut: float) -> int:
    """The filter degree: as high as MAX_DEGREE allows while T_d(t(theta_1)) / T_d(t(theta_r)) <= MAX_RANGE,
    with t(x) = 2 x / cut - 1 mapping the damped interval [0, cut] onto [-1, 1]."""
    ratio = _growth(2 * theta_1 / cut - 1) / _growth(2 * theta_r / cut - 1)
    if ratio <= 1 + 1e-12:
        return MAX_DEGREE
    return max(1, min(MAX_DEGREE, int(math.log(MAX_RANGE) / math.log(ratio))))


def _filter(G: torch.Tensor, X: torch.Tensor, GX: torch.Tensor, cut: float, degree: int) -> torch.Tensor:
    """T_degree((2 G - cut I) / cut) X by the three-term recurrence (G X given: one product fewer).

    T_0 = X, T_1 = (G - e) X / e with e = cut / 2, T_k+1 = 2 (G - e) T_k / e - T_k-1. Values stay within
    MAX_RANGE of each other by the degree's choice, far from float64's overflow."""
    e = cut / 2
    prev, cur = X, (GX - e * X) / e
    for _ in range(degree - 1):
        prev, cur = cur, (G @ cur - e * cur) * (2 / e) - prev
    return cur


def top_eigenvectors(G: torch.Tensor, q: int, r: int, max_products: int) -> tuple[torch.Tensor, FilterStats]:
    """Ritz vectors (n x q, largest Ritz value first) of the top-q eigenspace of one symmetric positive
    semi-definite G (n x n, float64), the first r converged to TOL (see the module's docstring).

    Stops after MAX_PRODUCTS products even if not converged (stats.converged False): the caller then uses a full
    eigh, so a spectrum too flat for the filter costs at most that many products more than before."""
    n = G.shape[-1]
    stats = FilterStats()
    Q = _start(n, q, G.device)
    GQ = G @ Q
    stats.products += 1
    while True:
        stats.cycles += 1
        H = Q.T @ GQ
        theta, Z = small_eigh((H + H.T) / 2)
        X, GX = Q @ Z, GQ @ Z
        top = float(theta[0])
        if top <= 0:  # G = 0: every vector is an eigenvector
            stats.converged = True
            return X, stats
        residual = torch.linalg.vector_norm(GX[:, :r] - X[:, :r] * theta[:r], dim=0).max()
        if float(residual) <= TOL * top:
            stats.converged = True
            return X, stats
        if stats.products >= max_products:
            return X, stats
        # Damp [0, theta_q]; a cut at zero (G of rank below q) would make every filter degree 1, so floor it.
        cut = max(float(theta[q - 1]), top * 1e-6)
        degree = min(_degree(top, float(theta[r - 1]), cut), max(1, max_products - stats.products))
        Q, _ = torch.linalg.qr(_filter(G, X, GX, cut, degree))
        GQ = G @ Q
        stats.products += degree  # degree - 1 in the filter, one for G Q
