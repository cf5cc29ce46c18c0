"""Pure tensor functions behind verify and inspect: no files, no models, no printing.

Conventions as in methods.py: W (out, in) = U S V^T with singular values descending, an adapter
adds s * B A with A (r, in) and B (out, r). Every function works in float64 on whatever device its
inputs are on; most accept a leading batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraforge.inits.linalg import canonicalise_signs, numerical_rank


@dataclass
class ThinSVD:
    """Thin SVD of one matrix restricted to its numerical rank k: U (m, k), S (k,), V (n, k)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    S_all: torch.Tensor  # all min(m, n) singular values, zeros included (for spectrum plots)

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def top(self, r: int) -> torch.Tensor:
        """V_r: the right singular vectors of the r largest singular values, (n, r)."""
        return self.V[:, :r]

    def bottom(self, r: int) -> torch.Tensor:
        """V_-r: those of the r smallest NONZERO singular values (as loraforge init picks them), (n, r)."""
        return self.V[:, max(self.rank - r, 0) :]


def thin_svd(W: torch.Tensor) -> ThinSVD:
    """Thin SVD of W (m, n) in float64, cut at the numerical rank init uses (linalg.numerical_rank).

    torch.linalg.svd rather than init's Gram + eigh: the update diagnostics need every singular
    pair, including the small ones, where a Gram matrix loses half the digits.
    """
    W = W.to(torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = int(numerical_rank(S.unsqueeze(0), *W.shape)[0])
    U, V = canonicalise_signs(U[:, :k].unsqueeze(0), Vh[:k].T.unsqueeze(0))
    return ThinSVD(U[0], S[:k], V[0], S)


def subspace_similarity(A: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """||A V||_F / ||A||_F (the paper's Fig. 7): the share of A's rows that lies in span(V).

    A: (..., r, n); V: (..., n, k) with orthonormal columns. 1 when every row of A lies in span(V),
    0 when A is orthogonal to it. A zero A gives 0.
    """
    A = A.to(torch.float64)
    num = (A @ V.to(torch.float64)).flatten(-2).norm(dim=-1)
    den = A.flatten(-2).norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(den))


def orthonormality_error(A: torch.Tensor) -> torch.Tensor:
    """max |A A^T - I| over entries: 0 for orthonormal rows. A: (..., r, n). For columns pass B^T."""
    A = A.to(torch.float64)
    gram = A @ A.transpose(-1, -2)
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
    return (gram - eye).abs().flatten(-2).amax(dim=-1)


def reconstruction_error(
    W0: torch.Tensor, base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |err|, ||err||_F / ||W0||_F) with err = W0 - (base + s B A), all in float64.

    The error of a residualised init: base is W0 - s B0 A0 rounded to the base dtype.
    W0, base: (..., m, n); A: (..., r, n); B: (..., m, r).
    """
    W0 = W0.to(torch.float64)
    err = W0 - (base.to(torch.float64) + scaling * (B.to(torch.float64) @ A.to(torch.float64)))
    w_norm = W0.flatten(-2).norm(dim=-1)
    rel = err.flatten(-2).norm(dim=-1) / w_norm.clamp_min(torch.finfo(torch.float64).tiny)
    return err.abs().flatten(-2).amax(dim=-1), torch.where(w_norm > 0, rel, err.flatten(-2).norm(dim=-1))


def aligned_update(U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """c_i = |u_i^T (B A) v_i| for every singular pair (u_i, v_i) of W0 (the paper's Fig. 3).

    The update is passed factored (dW = B A, B: (m, q), A: (q, n)) so the full m x n product is
    never formed: diag(U^T B A V) = sum_j (U^T B)_ij (A V)_ji. Fold the scaling into B.
    U: (m, k), V: (n, k) -> (k,).
    """
    left = U.to(torch.float64).T @ B.to(torch.float64)  # (k, q)
    right = A.to(torch.float64) @ V.to(torch.float64)  # (q, k)
    return (left * right.T).sum(dim=1).abs()


def update_distribution(c: torch.Tensor) -> torch.Tensor:
    """p_i = c_i / sum_j c_j; all zeros when the update is zero."""
    total = c.sum()
    return c / total if total > 0 else torch.zeros_like(c)


def cumulative_energy(c: torch.Tensor) -> torch.Tensor:
    """sum_{j <= i} c_j^2 / sum_j c_j^2 (the paper's Fig. 3, right); all zeros for a zero update."""
    sq = c.to(torch.float64) ** 2
    total = sq.sum()
    return sq.cumsum(0) / total if total > 0 else torch.zeros_like(sq)


def concat_factors(
    A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, experts: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """[A ; A0] and [B | -B0]: the rank-2r factors with B' A' = B A - B0 A0 exactly.

    Concatenation and negation are exact in any floating-point format, so no rounding is added.
    A, A0: (r, n); B, B0: (m, r) -> A' (2r, n), B' (m, 2r). With EXPERTS = E > 1 the factors are a fused
    expert stack in PEFT's ParamWrapper layout (A: (r*E, n), expert e's rows at e*r..(e+1)*r; B: (m, r*E),
    expert e's columns at e::E), and each expert's factors are concatenated: A'_e = [A_e ; A0_e], B'_e = [B_e | -B0_e].
    """
    dtype = torch.promote_types(torch.promote_types(A.dtype, A0.dtype), torch.promote_types(B.dtype, B0.dtype))
    E = experts
    if E > 1:  # rows (e, k) -> e*2r + k; columns (k, e) -> k*E + e, so B's columns concatenate as they are
        A2 = torch.cat([A.to(dtype).reshape(E, -1, A.shape[1]), A0.to(dtype).reshape(E, -1, A0.shape[1])], dim=1)
        A2 = A2.reshape(-1, A.shape[1])
    else:
        A2 = torch.cat([A.to(dtype), A0.to(dtype)], dim=0)
    B2 = torch.cat([B.to(dtype), -B0.to(dtype)], dim=1)
    return A2.contiguous(), B2.contiguous()
