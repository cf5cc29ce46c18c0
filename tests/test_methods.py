"""Golden tests of every method's math against an independent float64 numpy reference.

We compare products that do not depend on the sign ambiguity of singular vectors: s*B0 A0 (the
initial update), projectors A0^T A0, and residuals W - s*B0 A0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loraforge.inits import linalg
from loraforge.inits.linalg import RANK_EPS, exact_spectrum, fast_spectrum
from loraforge.inits.methods import METHODS, MethodInput, dct_rows, haar

SHAPES = [(24, 16), (16, 24), (20, 20)]  # tall, wide (Gram on the other side), square


@pytest.fixture(params=["lapack", "torch", "torch-chebyshev"])
def backend(request, monkeypatch):
    """Run a test with each Gram/eigensolver backend, all on the CPU here: LAPACK through SciPy (what the
    CPU runs), and what a GPU runs: full eighs ("torch", the GPU path for n < 24 q) or the Chebyshev filter
    for top-r wherever it has room (n > q; "torch-chebyshev", the GPU path for n >= 24 q)."""
    chosen = linalg._LapackBackend if request.param == "lapack" else linalg._TorchBackend
    monkeypatch.setattr(linalg, "_backend", lambda X: chosen)
    if request.param == "torch-chebyshev":
        monkeypatch.setattr(linalg, "CHEBYSHEV_MIN_N_OVER_Q", 0)
    return request.param


def make_matrix(m: int, n: int, rank: int | None = None, seed: int = 0) -> np.ndarray:
    """W = U diag(S) V^T with well-separated singular values (geometric 10 -> 0.05), and exact zeros
    beyond RANK when given, so the reference subspaces are unambiguous."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    S = np.geomspace(10.0, 0.05, k)
    if rank is not None:
        S[rank:] = 0.0
    return (U * S) @ V.T


def reference(W: np.ndarray, r: int, which: str):
    """(U_sel, S_sel, V_sel) of the top r or the bottom r NONZERO singular triplets, via np.linalg.svd."""
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    k = int((S > max(W.shape) * RANK_EPS * S[0]).sum())
    sel = slice(0, r) if which == "top" else slice(k - r, k)
    return U[:, sel], S[sel], Vt[sel].T


def run(method: str, W: np.ndarray, r: int, scaling: float, seed: int = 7):
    spec = METHODS[method]
    Wt = torch.from_numpy(W).unsqueeze(0)
    spectrum = exact_spectrum(Wt, r, spec.spectrum) if spec.spectrum else None
    A, B = spec.init(MethodInput(W=Wt, r=r, scaling=scaling, spectrum=spectrum, seeds=[seed]))
    assert A.shape == (1, r, W.shape[1]) and B.shape == (1, W.shape[0], r)
    assert A.dtype == B.dtype == torch.float64
    return A[0].numpy(), B[0].numpy()


def expected_update(method: str, W: np.ndarray, r: int, scaling: float) -> np.ndarray:
    """s * B0 A0 as the method's formula says it should be."""
    spec = METHODS[method]
    if not spec.residual:
        return np.zeros_like(W)
    U, S, V = reference(W, r, spec.spectrum)
    if method in ("pissa", "milora"):
        return (U * S) @ V.T  # S divided by s inside the factors, times s outside: the SVD part itself
    return scaling * U @ V.T  # olora, olora-tail: B0 A0 = U V^T


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("method", list(METHODS))
def test_update_and_residual_match_reference(method, shape, backend):
    W = make_matrix(*shape)
    r, scaling = 4, 2.0  # alpha = 8, r = 4
    A, B = run(method, W, r, scaling)
    update = scaling * B @ A
    # Bottom-r is a float64 eigh (float64-exact); top-r starts from a float32 eigh refined in float64,
    # which the exactness bar ("float32 tolerance") allows; we hold it to 1e-8 of ||W||.
    atol = 1e-10 if METHODS[method].spectrum != "top" else 1e-8 * np.linalg.norm(W)
    np.testing.assert_allclose(update, expected_update(method, W, r, scaling), atol=atol)
    np.testing.assert_allclose(W - update, W - expected_update(method, W, r, scaling), atol=atol)


@pytest.mark.parametrize("method", [m for m, s in METHODS.items() if s.spectrum])
def test_A0_spans_the_chosen_right_singular_subspace(method):
    W = make_matrix(24, 16, seed=1)
    r = 5
    A, _ = run(method, W, r, scaling=1.0)
    _, _, V = reference(W, r, METHODS[method].spectrum)
    # Projector onto A0's row space equals V V^T (sign-free comparison).
    Q, _ = np.linalg.qr(A.T)
    np.testing.assert_allclose(Q @ Q.T, V @ V.T, atol=1e-8)


def test_top_r_captured_energy_matches_float64_svd_on_a_flat_spectrum(backend):
    # A slowly decaying spectrum (ratio 0.97 per index) makes the top-r subspace hard to separate:
    # captured energy ||W V_r||_F^2 must still match a float64 SVD within 1e-6 relative (the exactness bar).
    rng = np.random.default_rng(4)
    U, _ = np.linalg.qr(rng.standard_normal((300, 120)))
    V, _ = np.linalg.qr(rng.standard_normal((120, 120)))
    W = (U * 0.97 ** np.arange(120)) @ V.T
    A, _ = run("rlpo", W, 16, scaling=1.0)
    _, _, Vr = reference(W, 16, "top")
    energy, ref = np.linalg.norm(W @ A.T) ** 2, np.linalg.norm(W @ Vr) ** 2
    assert abs(energy - ref) / ref < 1e-6


# What each method is, written out from its source rather than read from the registry (the tests
# above choose their cases by the registry's flags, so a wrong flag would silently skip a check):
# the singular subspace A0's rows span (None: data-independent), B0 = 0, A0's rows orthonormal.
DEFINITIONS = {
    "lora": (None, True, False),  # Gaussian A0 (Hu et al.)
    "rlpo": ("top", True, True),  # A0 = V_r^T (the paper, section 5.2)
    "rlmo": ("bottom", True, True),  # A0 = V_-r^T
    "pissa": ("top", False, False),  # A0 = (S_r/s)^1/2 V_r^T, B0 = U_r (S_r/s)^1/2
    "milora": ("bottom", False, False),  # the same on the minor triplets
    "olora": ("top", False, True),  # A0 = V_r^T, B0 = U_r
    "olora-tail": ("bottom", False, True),  # A0 = V_-r^T, B0 = U_-r
    "dct": (None, True, True),  # first r rows of the orthonormal DCT-II
    "wavelet": (None, True, True),  # orthonormalised Haar transform of a seeded Gaussian
}


def test_every_registered_method_has_a_definition_here():
    assert set(DEFINITIONS) == set(METHODS)


@pytest.mark.parametrize("method", list(METHODS))
def test_registry_flags_describe_what_the_method_returns(method):
    subspace, b0_zero, a0_orthonormal = DEFINITIONS[method]
    W = make_matrix(24, 16, seed=2)
    A, B = run(method, W, 4, scaling=1.0)
    assert (not B.any()) == b0_zero
    assert np.allclose(A @ A.T, np.eye(4), atol=1e-10) == a0_orthonormal
    Q, _ = np.linalg.qr(A.T)
    for which in ("top", "bottom"):
        _, _, V = reference(W, 4, which)
        assert np.allclose(Q @ Q.T, V @ V.T, atol=1e-8) == (subspace == which), which
    spec = METHODS[method]
    assert (spec.spectrum, spec.residual, spec.orthonormal) == (subspace, not b0_zero, b0_zero and a0_orthonormal)


@pytest.mark.parametrize("method", [m for m, s in METHODS.items() if s.orthonormal])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_orthonormal_methods_have_orthonormal_rows_and_zero_B(method, shape):
    W = make_matrix(*shape)
    A, B = run(method, W, 6, scaling=2.0)
    np.testing.assert_allclose(A @ A.T, np.eye(6), atol=1e-12)
    assert not B.any()
    # And in float32, as stored: A0 A0^T = I to float32 precision.
    A32 = torch.from_numpy(A).float()
    torch.testing.assert_close(A32 @ A32.T, torch.eye(6), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", [m for m, s in METHODS.items() if s.spectrum == "bottom"])
def test_bottom_r_skips_exact_zero_singular_values(method, backend):
    # Rank 10 in a 24 x 16 matrix: the bottom 3 NONZERO directions are singular values 8, 9, 10 (1-based).
    W = make_matrix(24, 16, rank=10, seed=2)
    A, B = run(method, W, 3, scaling=1.0)
    U, S, Vt = np.linalg.svd(W)
    V_minor = Vt[7:10].T  # the 8th..10th right singular vectors
    Q, _ = np.linalg.qr(A.T)
    np.testing.assert_allclose(Q @ Q.T, V_minor @ V_minor.T, atol=1e-9)
    # A0 is orthogonal to the null space (directions 11..16) of W.
    assert np.abs(A @ Vt[10:].T).max() < 1e-9


def test_numerical_rank_is_reported_for_rank_deficient_matrices(backend):
    W = torch.from_numpy(np.stack([make_matrix(24, 16, rank=10), make_matrix(24, 16)]))
    spectrum = exact_spectrum(W, 3, "bottom")
    assert spectrum.rank.tolist() == [10, 16]


def test_lora_is_gaussian_with_variance_one_over_n_and_seeded():
    W = np.zeros((64, 4096))
    A, B = run("lora", W, 8, scaling=1.0, seed=3)
    # 8 * 4096 = 32768 draws: the sample variance of N(0, 1/4096) is within ~2% of 1/4096.
    assert abs(A.var() * 4096 - 1) < 0.05 and abs(A.mean()) < 3 / math.sqrt(32768 * 4096)
    assert not B.any()
    A_again, _ = run("lora", W, 8, scaling=1.0, seed=3)
    A_other, _ = run("lora", W, 8, scaling=1.0, seed=4)
    assert np.array_equal(A, A_again) and not np.array_equal(A, A_other)


def test_dct_rows_match_the_textbook_formula():
    n, r = 10, 4
    ref = np.array(
        [
            [
                (math.sqrt(1 / n) if i == 0 else math.sqrt(2 / n)) * math.cos(math.pi * (2 * j + 1) * i / (2 * n))
                for j in range(n)
            ]
            for i in range(r)
        ]
    )
    np.testing.assert_allclose(dct_rows(r, n).numpy(), ref, atol=1e-15)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 13, 576])
def test_haar_is_orthonormal_for_any_length(n):
    H = haar(torch.eye(n, dtype=torch.float64))  # rows: the transform of each basis vector
    torch.testing.assert_close(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


def test_haar_of_a_pair_is_sum_and_difference_over_sqrt2():
    # [3, 1] -> [(3+1)/sqrt2, (3-1)/sqrt2] = [2.828..., 1.414...]
    out = haar(torch.tensor([3.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([4 / math.sqrt(2), 2 / math.sqrt(2)], dtype=torch.float64))


def test_wavelet_rows_span_the_haar_transform_of_the_seeded_gaussian():
    n, r, seed = 16, 4, 11
    A, _ = run("wavelet", np.zeros((8, n)), r, scaling=1.0, seed=seed)
    G = torch.randn((r, n), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    HG = haar(G).numpy()
    Q, _ = np.linalg.qr(HG.T)
    np.testing.assert_allclose(A.T @ A, Q @ Q.T, atol=1e-12)  # same row space
    # QR sign convention: diag(R) > 0, i.e. each row has a positive inner product with H(G)'s row.
    assert (np.diag(A @ HG.T) > 0).all()


def test_pissa_is_independent_of_alpha_in_the_update_but_not_in_the_factors():
    W = make_matrix(24, 16)
    A1, B1 = run("pissa", W, 4, scaling=1.0)
    A2, B2 = run("pissa", W, 4, scaling=4.0)
    np.testing.assert_allclose(1.0 * B1 @ A1, 4.0 * B2 @ A2, atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(A2), np.linalg.norm(A1) / 2, rtol=1e-10)  # sqrt(S/4) = sqrt(S)/2


def test_signs_are_canonical():
    W = torch.from_numpy(make_matrix(24, 16)).unsqueeze(0)
    spectrum = exact_spectrum(W, 4, "top")
    V = spectrum.V[0]
    idx = V.abs().argmax(dim=0)
    assert (V[idx, torch.arange(4)] > 0).all()
    flipped = exact_spectrum(-W, 4, "top")  # same V up to sign, so canonical V is identical
    torch.testing.assert_close(flipped.V, spectrum.V, atol=1e-12, rtol=0)


def test_fast_spectrum_captures_the_top_subspace(backend):
    W = torch.from_numpy(make_matrix(64, 48, seed=5)).unsqueeze(0)
    exact = exact_spectrum(W, 6, "top")
    fast = fast_spectrum(W, 6)
    energy = lambda V: float((W[0] @ V[0]).norm() ** 2)  # noqa: E731 captured energy ||W V_r||_F^2
    assert abs(energy(fast.V) - energy(exact.V)) / energy(exact.V) < 1e-6
    torch.testing.assert_close(fast.S, exact.S, rtol=1e-6, atol=0)
    # orthonormal to float64 precision (float32 products alone leave ~1e-6, which verify would flag)
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(fast.V[0].T @ fast.V[0], eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(fast.U[0].T @ fast.U[0], eye, atol=1e-12, rtol=0)


def test_batched_equals_one_by_one():
    Ws = [make_matrix(24, 16, seed=s) for s in range(3)]
    batched = exact_spectrum(torch.from_numpy(np.stack(Ws)), 4, "bottom")
    for i, W in enumerate(Ws):
        single = exact_spectrum(torch.from_numpy(W).unsqueeze(0), 4, "bottom")
        torch.testing.assert_close(batched.V[i], single.V[0], atol=1e-12, rtol=0)


def test_bottom_r_looks_past_more_zero_directions_than_the_first_subset_holds(backend):
    # Rank 20 in an 80 x 60 matrix: 40 zero directions, more than the first subset (r + 16 = 19
    # lowest eigenpairs) holds, so the solver has to widen it; the answer is the 18th..20th triplets.
    W = make_matrix(80, 60, rank=20, seed=3)
    spectrum = exact_spectrum(torch.from_numpy(W).unsqueeze(0), 3, "bottom")
    assert int(spectrum.rank[0]) == 20
    _, S, Vt = np.linalg.svd(W)
    np.testing.assert_allclose(spectrum.S[0].numpy(), S[17:20], rtol=1e-9)
    V = spectrum.V[0].numpy()
    np.testing.assert_allclose(V @ V.T, Vt[17:20].T @ Vt[17:20], atol=1e-9)


def test_top_eigenvalue_matches_eigvalsh():
    # Spectra 10 -> 0.05 (well separated) and 0.97^i (flat): block power + Rayleigh-Ritz from a fixed
    # start. The rank threshold (1e-4 * s_1 here) only needs a digit or two; we ask for 1e-3. On the
    # flat spectrum the error is about (l_9 / l_1)^(2 * 8 steps) = 0.97^(16 * 16) ~ 4e-4.
    for W in (
        make_matrix(40, 30, seed=6),
        (np.linalg.qr(np.random.default_rng(1).standard_normal((40, 30)))[0] * 0.97 ** np.arange(30)),
    ):
        G = torch.from_numpy(W.T @ W).unsqueeze(0)
        ref = float(torch.linalg.eigvalsh(G)[0, -1])
        top = float(linalg._LapackBackend.top_eigenvalue(G.triu())[0])  # syrk's one-triangle Gram
        assert top <= ref * (1 + 1e-12) and (ref - top) / ref < 1e-3  # a Rayleigh quotient: from below


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_left_vectors_are_skipped_only_where_they_cost_a_pass(shape):
    # B0 = 0 methods (rlmo) ask for V alone; U is left out when W is tall or square (it would cost
    # X @ V), and still comes for free when W is wide (then U is the Gram side's eigenvectors).
    W = torch.from_numpy(make_matrix(*shape)).unsqueeze(0)
    full = exact_spectrum(W, 3, "bottom")
    lean = exact_spectrum(W, 3, "bottom", left=False)
    torch.testing.assert_close(lean.V, full.V, atol=0, rtol=0)
    torch.testing.assert_close(lean.S, full.S, atol=0, rtol=0)
    assert (lean.U is None) == (shape[0] >= shape[1])


def test_cpu_gram_is_x_transpose_x():
    # syrk fills one triangle; full=True must give the symmetric X^T X (diagonal counted once).
    X = torch.from_numpy(make_matrix(30, 12, seed=8)).unsqueeze(0)
    ref = X[0].T @ X[0]
    torch.testing.assert_close(linalg._LapackBackend.gram(X, full=True)[0], ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(linalg._LapackBackend.gram(X)[0], ref.triu(), atol=1e-12, rtol=0)
