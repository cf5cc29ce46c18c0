"""Quantization-aware inits (`loraforge init --quantize nf4|fp4|int8`): factors computed against the weight the
model trains on when `train --quantize` (or a BitsAndBytesConfig) loads the base quantized.

Q(X) below is models.quantize.quantize_dequantize of X as the base stores it (cast to the base dtype): the
weight a bitsandbytes layer computes with. s B0 A0 is the adapter's update at step 0. Per method:

- rlpo, rlmo (B0 = 0, the base stays W): the model trains on Q(W), so A0 comes from the spectrum of Q(W)
  instead of W. Measured (docs/quantized.md): nf4 leaves W's top-16 right singular subspace in place
  (SmolLM2: median overlap 0.99) but moves the bottom-16 one (median 0.57 in q_proj, 0.18 at worst), so for
  rlmo the minor directions of the weight actually trained on differ from W's.
- lora, dct, wavelet: data-free; the factors do not change.
- pissa, olora (principal, residualised): alternating refinement as LoftQ (Li et al. 2024) and PiSSA's
  QPiSSA do it. P_0 = s B0 A0 of W; then `iters` times P_t = s B0 A0 of M_t = W - Q(W - P_{t-1}), the
  method's own factors of M_t (pissa: (S_r/s)^1/2 V_r^T and U_r (S_r/s)^1/2 of M_t's top-r SVD; olora: V_r^T,
  U_r). The residual base stays W - s B0 A0, exact to its dtype as for every residualised init, and train
  loads Q(W - s B0 A0). Departure from LoftQ, which stores Q_T itself and takes the factors from W - Q_T:
  storing the exact residual keeps `verify`'s reconstruction and `convert` exact, and on SmolLM2 (pissa,
  r 16, 5 iterations) its quantized error is within 1% of LoftQ's form.
- milora, olora-tail (minor, residualised): the factors stay W's minor part (the bottom of W - Q(..) is
  quantization noise, not W's minor subspace); the base is the usual residual, loaded as Q(W - s B0 A0).

Every module's manifest entry gets `quant_rel` = ||Q(base) + s B0 A0 - W||_F / ||W||_F, what the quantized
model starts from. MoE expert stacks are not quantized by bitsandbytes (it replaces linear layers only):
their units are computed against W as without --quantize, and get no `quant_rel`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from loraforge.inits.linalg import exact_spectrum, fast_spectrum
from loraforge.inits.methods import Method, MethodInput
from loraforge.models.quantize import BLOCKSIZE, quantize_dequantize
from loraforge.models.targets import Target


def record(quantize: Optional[str], iters: int, method: Method) -> Optional[dict]:
    """The manifest's `quantize` entry: the format the init was computed for, and what was computed."""
    if quantize is None:
        return None
    if method.residual and method.spectrum == "top":
        computed = f"factors refined {iters} times against W - Q(W - s B0 A0); base W - s B0 A0"
    elif method.residual:
        computed = "factors of W (minor part); base W - s B0 A0, loaded as Q(base)"
    elif method.spectrum is not None:
        computed = f"A0 from the {method.spectrum}-r spectrum of Q(W)"
    else:
        computed = "data-free factors; base W, loaded as Q(W)"
    return {
        "type": quantize,
        "blocksize": BLOCKSIZE if quantize != "int8" else None,
        "double_quant": False,
        "iters": iters if method.residual and method.spectrum == "top" else 0,
        "computed": computed,
    }


def quantized(W: torch.Tensor, dtypes: Sequence[torch.dtype], quantize: str, keep: Sequence[bool]) -> torch.Tensor:
    """Q of each matrix of W (batch, m, n) stored in dtypes[i], in W's dtype; matrices with keep[i] False
    (expert units: bitsandbytes does not quantize them) are copied unchanged."""
    out = torch.empty_like(W)
    for i in range(W.shape[0]):
        out[i] = quantize_dequantize(W[i].to(dtypes[i]), quantize) if keep[i] else W[i]
    return out


def quantizable(batch: Sequence[Target]) -> list[bool]:
    """Which units bitsandbytes quantizes on load: linear layers, not fused MoE expert parameters."""
    return [not t.experts for t in batch]


def decompose_quantized(batch, W: torch.Tensor, W32: Optional[torch.Tensor], stored_dtypes, quantize: str) -> list:
    """B0 = 0 methods: overwrite W (and its float32 copy) with Q(W), the weight the model trains on, and return
    each module's ||Q(W) - W|| / ||W|| (None for units left unquantized)."""
    keep = quantizable(batch)
    Q = quantized(W, stored_dtypes, quantize, keep)
    norms = torch.linalg.vector_norm(W, dim=(1, 2)).clamp_min(torch.finfo(torch.float64).tiny)
    rel = (torch.linalg.vector_norm(Q - W, dim=(1, 2)) / norms).tolist()
    W.copy_(Q)
    if W32 is not None:
        W32.copy_(Q)
    return [r if k else None for r, k in zip(rel, keep)]


def refine_principal(batch, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, config, seeds, base_dtypes):
    """pissa, olora: `config.quant_iters` alternations P_t = the method's s B0 A0 of W - Q(W - P_{t-1}), from
    (A, B) = the method's factors of W; returns the final (A, B), float64. W is not changed."""
    keep = quantizable(batch)
    if config.quant_iters == 0 or not any(keep):
        return A, B
    method, r, s = config.method_spec, config.r, config.scaling
    mask = torch.tensor(keep, device=A.device).view(-1, 1, 1)  # expert units keep W's factors (not quantized)
    for _ in range(config.quant_iters):
        R = torch.baddbmm(W, B.to(W.dtype), A.to(W.dtype), alpha=-s)  # W - P_{t-1}
        M = (W - quantized(R, base_dtypes, config.quantize, keep)).double()
        if config.svd == "fast":
            spectrum = fast_spectrum(M, r, seed=config.seed)
        else:
            spectrum = exact_spectrum(M, r, "top", left=True)
        A_new, B_new = method.init(MethodInput(W=M, r=r, scaling=s, spectrum=spectrum, seeds=seeds))
        A, B = torch.where(mask, A_new, A), torch.where(mask, B_new, B)
    return A, B


def residual_error(t: Target, R: torch.Tensor, base_dtype: torch.dtype, w_norm, config) -> Optional[float]:
    """||Q(base) + s B0 A0 - W|| / ||W|| for one module whose exact residual W - s B0 A0 is R (None for expert
    units): the base is R cast to BASE_DTYPE, so the error is Q(base) - R."""
    if t.experts:
        return None
    err = quantize_dequantize(R.to(base_dtype), config.quantize).to(R.dtype) - R
    return float(torch.linalg.vector_norm(err) / w_norm) if w_norm > 0 else 0.0
