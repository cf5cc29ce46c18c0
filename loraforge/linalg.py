"""Exact decompositions of batches of same-shaped weight matrices.

Everything here is float64 and batched over a leading dimension, so all layers' q_proj (say) are
decomposed in one call. We never need the whole SVD: a method needs either the top r or the bottom
r (smallest NONZERO) singular triplets, so we eigendecompose the Gram matrix of the smaller side
(`W^T W` is n x n when n <= m) and recover the other side's vectors by one matmul.

Why Gram + eigh and not `torch.linalg.svd`: on CPU it is ~4x faster for these shapes (DESIGN.md,
"Measured anchors"), and in float64 it is exact for our purpose: eigenvalue errors are about
`n * eps64 * s_1^2`, i.e. singular values down to ~1e-7 * s_1 are resolved, far below the rank
threshold below. The top-r path starts cheaper (float32) and is made exact by a float64
refinement (see `_top_spectrum`). Randomised SVD (`svd_lowrank`) finds only the top subspace, so it is offered only
as the `fast` option for principal methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Numerical rank uses float32's machine epsilon: the precision the weights were trained and stored
# in. (numpy's matrix_rank would use float64's for float64 input, which would count the ~1e-7
# rounding noise of a float32 matrix as real directions.)
RANK_EPS = torch.finfo(torch.float32).eps


@dataclass
class Spectrum:
    """r singular triplets of each matrix in a batch, largest singular value first.

    U: (batch, m, r), S: (batch, r), V: (batch, n, r), rank: (batch,) numerical rank of each matrix.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    rank: torch.Tensor


def numerical_rank(S: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Number of singular values above `max(m, n) * eps32 * s_1`. S: (batch, k) descending."""
    tol = max(m, n) * RANK_EPS * S[:, :1]
    return (S > tol).sum(dim=1)


def canonicalise_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each (u_i, v_i) pair so the largest-magnitude entry of v_i is positive.

    Singular vectors are defined only up to a joint sign; fixing it makes outputs bit-for-bit
    reproducible across runs, batchings and devices. U: (batch, m, r), V: (batch, n, r).
    """
    idx = V.abs().argmax(dim=1, keepdim=True)  # (batch, 1, r)
    sign = torch.sign(torch.gather(V, 1, idx))
    sign[sign == 0] = 1
    return U * sign, V * sign


def exact_spectrum(W: torch.Tensor, r: int, which: str) -> Spectrum:
    """Top-r (`which="top"`) or bottom-r nonzero (`which="bottom"`) singular triplets of each matrix.

    W: (batch, m, n), float64. Returns a Spectrum with descending singular values; for "bottom" these
    are the r smallest singular values above the numerical-rank threshold (so a rank-deficient
    matrix's exact zeros are skipped). Matrices whose rank is below r come back with rank < r; the
    caller reports them.
    """
    if W.dtype != torch.float64:
        raise TypeError(f"exact_spectrum needs float64 input, got {W.dtype}")
    if which == "top":
        return _top_spectrum(W, r)
    if which == "bottom":
        return _bottom_spectrum(W, r)
    raise ValueError(f"which must be 'top' or 'bottom', got {which!r}")


def _tall(W: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """X with at least as many rows as columns (X = W or W^T), so its Gram matrix is the small one."""
    transposed = W.shape[1] < W.shape[2]
    return (W.transpose(1, 2) if transposed else W), transposed


def _finish(X: torch.Tensor, small: torch.Tensor, S: torch.Tensor, rank: torch.Tensor, transposed: bool) -> Spectrum:
    # The other side: x_i = X s_i / sigma_i. Guard zero singular values (only in rejected matrices).
    big = (X @ small) / S.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    U, V = (small, big) if transposed else (big, small)
    U, V = canonicalise_signs(U, V)
    return Spectrum(U=U, S=S, V=V, rank=rank)


def _top_spectrum(W: torch.Tensor, r: int) -> Spectrum:
    """Top-r triplets: float32 Gram + eigh for a guess of the top-q subspace (q = 1.5r), then one
    float64 subspace iteration and a float64 Rayleigh-Ritz step on W itself (`_refine_top`).

    Why: float32 eigh is ~2x cheaper than float64, and its errors are O(eps32 * s_1^2 / gap). The
    float64 step (cost ~4 m n q, a fraction of the Gram's m n^2) resolves every mixing inside the
    q-dimensional subspace exactly and shrinks what leaks outside it by (s_q+1 / s_r)^2. Measured on
    SmolLM2-135M: captured energy within 1e-13 of a float64 SVD, rank-r part within 5e-7.
    Numerical rank is only resolved up to q (rank = q means "at least q").
    """
    X, transposed = _tall(W)
    small = X.shape[2]
    q = min(small, r + max(16, r // 2))  # room above r so the float64 step converges fast
    X32 = X.float()
    _, guess = torch.linalg.eigh(X32.transpose(1, 2) @ X32)  # ascending
    return _refine_top(W, X, guess[:, :, small - q :].double(), r, transposed)


def _refine_top(W: torch.Tensor, X: torch.Tensor, Q: torch.Tensor, r: int, transposed: bool) -> Spectrum:
    """Top-r triplets of X from a guess Q (batch, small, q) of its top right singular subspace:
    one subspace iteration, then Rayleigh-Ritz (the eigenproblem of Q^T X^T X Q, q x q, in float64).
    X and Q in float64 for the exact path; the fast path passes float32 ones."""
    Q, _ = torch.linalg.qr(X.transpose(1, 2) @ (X @ Q))
    Y = X @ Q
    evals, Z = torch.linalg.eigh((Y.transpose(1, 2) @ Y).double())
    X, Q = X.double(), Q.double()
    evals, Z = evals.flip(-1), Z.flip(-1)
    S_q = evals.clamp_min(0).sqrt()
    tol = max(W.shape[1], W.shape[2]) * RANK_EPS * S_q[:, :1]
    rank = (S_q > tol).sum(dim=1)
    return _finish(X, Q @ Z[:, :, :r], S_q[:, :r], rank, transposed)


def _bottom_spectrum(W: torch.Tensor, r: int) -> Spectrum:
    """Bottom-r nonzero triplets from the whole spectrum: float64 Gram + eigh.

    The small singular values need float64: a float32 Gram's errors (~eps32 * s_1^2) would swamp
    eigenvalues s_i^2 with s_i / s_1 below ~1e-3.
    """
    X, transposed = _tall(W)
    evals, evecs = torch.linalg.eigh(X.transpose(1, 2) @ X)  # ascending
    evals, evecs = evals.flip(-1), evecs.flip(-1)  # descending
    S_all = evals.clamp_min(0).sqrt()
    rank = numerical_rank(S_all, W.shape[1], W.shape[2])
    # Indices rank-r .. rank-1 (clamped at 0 for matrices of rank < r, which the caller rejects).
    sel = (rank.unsqueeze(1) - r + torch.arange(r, device=W.device)).clamp_min(0)
    S = torch.gather(S_all, 1, sel)
    small = torch.gather(evecs, 2, sel.unsqueeze(1).expand(-1, evecs.shape[1], -1))
    return _finish(X, small, S, rank, transposed)


def fast_spectrum(W: torch.Tensor, r: int, niter: int = 6, seed: int = 0) -> Spectrum:
    """Randomised top-r SVD (Halko et al. 2011): a seeded Gaussian sketch of q = 2r columns, NITER
    power iterations in float32 (re-orthonormalised each time), then the refinement of the exact
    path (`_refine_top`: one more iteration and Rayleigh-Ritz), also in float32.

    W: (batch, m, n) float64. Only for principal methods: a random range finder captures the dominant
    subspace and nothing reliable about the bottom of the spectrum. Oversampling to 2r makes each
    iteration converge like (s_2r / s_r)^2 instead of (s_r+1 / s_r)^2, which is why 6 iterations
    capture more energy than PEFT's `pissa_niter_16` (q = r, 16 iterations) at less cost.
    """
    X, transposed = _tall(W)
    small = X.shape[2]
    q = min(small, 2 * r)
    X32 = X.float()
    gen = torch.Generator().manual_seed(seed)
    Q = torch.randn(small, q, generator=gen).to(X.device).expand(X.shape[0], -1, -1)
    for _ in range(niter):
        Q, _ = torch.linalg.qr(X32.transpose(1, 2) @ (X32 @ Q))
    return _refine_top(W, X32, Q, r, transposed)
