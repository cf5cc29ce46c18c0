"""The GPU path's partial eigensolver (inits/chebyshev.py), against float64 references, on the CPU.

What a GPU would run is the same torch code on another device; these tests pin its math: convergence to the
stated backward error, the subspace it finds, the filter's dynamic-range cap, the product cap and the fallback
behind it, and that a matrix's result does not depend on its batch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loraforge.inits import chebyshev, linalg
from loraforge.inits.linalg import exact_spectrum


def gram(spectrum: np.ndarray, seed: int = 0) -> torch.Tensor:
    """V diag(spectrum) V^T for a random orthogonal V (float64): a Gram matrix with known eigenvalues."""
    n = len(spectrum)
    V, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return torch.from_numpy((V * spectrum) @ V.T)


def projector(M: torch.Tensor) -> torch.Tensor:
    Q, _ = torch.linalg.qr(M)
    return Q @ Q.T


@pytest.mark.parametrize("decay", [0.97, 0.9], ids=["flat", "decaying"])
def test_top_eigenvectors_converge_to_the_stated_backward_error(decay):
    # Eigenvalues decay^i (i = 0..299): at 0.97 the top-16 subspace is hard to separate (l_16 / l_33 = 1.6),
    # the case pretrained weights present. Every wanted Ritz pair must have ||G x - theta x|| <= TOL * theta_1,
    # checked here in float64 independently of the solver, and span the true top 16 within residual / gap.
    lam = decay ** np.arange(300)
    G = gram(lam)
    q, r = 32, 16
    X, stats = chebyshev.top_eigenvectors(G, q, r, max_products=200)
    assert stats.converged and X.shape == (300, q)
    torch.testing.assert_close(X.T @ X, torch.eye(q, dtype=torch.float64), atol=1e-12, rtol=0)
    theta = torch.einsum("ni,nm,mi->i", X, G, X)
    residual = torch.linalg.vector_norm(G @ X[:, :r] - X[:, :r] * theta[:r], dim=0)
    assert float(residual.max()) <= chebyshev.TOL * lam[0] * 1.01
    torch.testing.assert_close(theta[:r], torch.from_numpy(lam[:r]), rtol=1e-12, atol=0)
    evecs = torch.linalg.eigh(G)[1].flip(-1)
    gap = lam[r - 1] - lam[q]  # Davis-Kahan: sin(angle) <= residual / gap
    err = float(torch.linalg.matrix_norm(projector(X[:, :r]) - projector(evecs[:, :r]), ord=2))
    assert err <= 2 * float(residual.max()) / gap


def test_the_filter_never_amplifies_the_top_more_than_max_range_over_the_rth():
    # T_d(t) by numpy's own Chebyshev series, t = 2 x / cut - 1: the degree chosen for each (theta_1, theta_r, cut)
    # keeps T_d(t_1) / T_d(t_r) within MAX_RANGE, and one degree more would not (unless capped at MAX_DEGREE).
    # The second is what makes the filter worth its cycles; the first is what keeps it exact.
    from numpy.polynomial import chebyshev as C

    def T(d, x, cut):
        return C.chebval(2 * x / cut - 1, [0] * d + [1])

    for theta_1, theta_r, cut in [(100.0, 1.2, 1.0), (5.0, 1.2, 1.0), (1.3, 1.2, 1.0), (1e4, 2.0, 1.0)]:
        d = chebyshev._degree(theta_1, theta_r, cut)
        assert T(d, theta_1, cut) / T(d, theta_r, cut) <= chebyshev.MAX_RANGE * 1.001
        if d < chebyshev.MAX_DEGREE:
            assert T(d + 1, theta_1, cut) / T(d + 1, theta_r, cut) > chebyshev.MAX_RANGE / 1.001


def test_rank_deficient_and_zero_grams():
    # Rank 10 < q = 24: the block holds the whole range; the top 8 are found exactly, nothing is NaN.
    lam = np.concatenate([np.geomspace(10, 1, 10), np.zeros(90)])
    X, stats = chebyshev.top_eigenvectors(gram(lam, seed=2), 24, 8, max_products=100)
    assert stats.converged and torch.isfinite(X).all()
    evecs = torch.linalg.eigh(gram(lam, seed=2))[1].flip(-1)
    assert float(torch.linalg.matrix_norm(projector(X[:, :8]) - projector(evecs[:, :8]), ord=2)) < 1e-10
    X0, stats0 = chebyshev.top_eigenvectors(torch.zeros(50, 50, dtype=torch.float64), 8, 4, max_products=10)
    assert stats0.converged and torch.isfinite(X0).all()


def test_a_spectrum_too_flat_stops_at_the_product_cap_and_the_gpu_path_falls_back_to_a_full_eigh(monkeypatch):
    # A Wishart (random Gaussian) Gram: its top eigenvalues crowd at the edge of the Marchenko-Pastur bulk, so the
    # filter cannot separate 8 of them in 5 products. The solver says so (converged False, products <= cap) and
    # the GPU path's top-r answer is still the exact one (a full float64 eigh).
    rng = np.random.default_rng(3)
    W = torch.from_numpy(rng.standard_normal((400, 120)))
    G = W.T @ W
    _, stats = chebyshev.top_eigenvectors(G, 24, 8, max_products=5)
    assert not stats.converged and stats.products <= 5
    monkeypatch.setattr(linalg, "_backend", lambda X: linalg._TorchBackend)
    monkeypatch.setattr(linalg, "CHEBYSHEV_MIN_N_OVER_Q", 0)
    monkeypatch.setattr(linalg, "CHEBYSHEV_MAX_PRODUCTS", 5)
    spectrum = exact_spectrum(W.unsqueeze(0), 8, "top")
    U, S, Vt = np.linalg.svd(W.numpy(), full_matrices=False)
    ref = (U[:, :8] * S[:8]) @ Vt[:8]
    got = ((spectrum.U[0] * spectrum.S[0]) @ spectrum.V[0].T).numpy()
    assert np.linalg.norm(got - ref) < linalg.TOP_RANK_R_RTOL * np.linalg.norm(ref)


def test_gpu_path_results_do_not_depend_on_the_batch(monkeypatch):
    # Matrix by matrix with 2-D kernels and small eighs on the CPU: a matrix decomposed in a batch of three gives
    # the same bits as alone (here on the CPU; the device script checks it on a GPU).
    monkeypatch.setattr(linalg, "_backend", lambda X: linalg._TorchBackend)
    monkeypatch.setattr(linalg, "CHEBYSHEV_MIN_N_OVER_Q", 0)
    rng = np.random.default_rng(5)
    W = torch.from_numpy(np.stack([rng.standard_normal((90, 60)) * 0.95 ** np.arange(60) for _ in range(3)]))
    for which in ("top", "bottom"):
        batched = exact_spectrum(W, 6, which)
        for i in range(3):
            alone = exact_spectrum(W[i : i + 1], 6, which)
            assert torch.equal(batched.V[i], alone.V[0]) and torch.equal(batched.S[i], alone.S[0]), which
            assert torch.equal(batched.U[i], alone.U[0]), which


def test_flop_count_arithmetic():
    # 3 products of a (10 x 10) @ (10 x 4): 3 * 2 * 10^2 * 4 = 2400; 2 cycles of QR + projection + Ritz vectors
    # (10 * 10 * 4^2 = 1600) and residuals (3 * 10 * 2 = 60): 2 * 1660 = 3320; 5720 in all.
    assert chebyshev.FilterStats(products=3, cycles=2).flops(n=10, q=4, r=2) == 5720


def test_small_eigh_is_descending_and_exact():
    H = gram(np.array([3.0, 1.0, 2.0, 0.5]), seed=7)
    theta, Z = chebyshev.small_eigh(H)
    torch.testing.assert_close(theta, torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(H @ Z, Z * theta, atol=1e-14, rtol=0)
    assert math.isclose(float(torch.linalg.det(Z).abs()), 1.0, rel_tol=1e-12)
