"""The initialisation methods: one pure tensor function per method, registered once in METHODS.

Conventions (PEFT's; docs/design.md): `W: (out_features, in_features)` as nn.Linear stores it (GPT-2's Conv1D is
transposed before it gets here), thin SVD `W = U S V^T` with singular values descending, scaling
`s = alpha / r` (rsLoRA: `alpha / sqrt(r)`), and PEFT computes `y = W x + s * B A x`.

Every function takes a batch of same-shaped matrices and returns float64 factors:
    A0: (batch, r, n), B0: (batch, m, r)
The CLI's --method choices, the README's method table and the tests' parametrisation all read
METHODS, so a method added here is added everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from loraforge.inits.linalg import Spectrum


@dataclass(frozen=True)
class MethodInput:
    """What a method may use. W: (batch, m, n) float64 (float32 under `--svd fast`; methods read only
    its shape and device); spectrum: the triplets the method asked for (None for methods that need
    no SVD); seeds: one per matrix, for the random methods."""

    W: torch.Tensor
    r: int
    scaling: float
    spectrum: Optional[Spectrum]
    seeds: list[int]


@dataclass(frozen=True)
class Method:
    """A registered initialisation method."""

    name: str  # registry key and --method value
    paper_name: str  # the name used in the papers and in model cards
    spectrum: Optional[str]  # "top", "bottom" or None: which singular triplets it needs
    residual: bool  # True when B0 != 0, so the base weight becomes W0 - s * B0 A0
    orthonormal: bool  # True when A0 has orthonormal rows (A0 A0^T = I) and B0 = 0
    A0: str  # formula of A0, for the README and model cards
    B0: str  # formula of B0
    source: str  # where the method comes from
    init: Callable[[MethodInput], tuple[torch.Tensor, torch.Tensor]]

    @property
    def fast_ok(self) -> bool:
        """Randomised SVD finds only the top subspace: allowed for principal methods only."""
        return self.spectrum == "top"


def _zeros_B(x: MethodInput) -> torch.Tensor:
    batch, m, _ = x.W.shape
    return torch.zeros(batch, m, x.r, dtype=torch.float64, device=x.W.device)


def _gaussian(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    # Always drawn on the CPU in float64 from a per-matrix generator, so the numbers do not depend
    # on the device, the batching or the order in which modules are processed.
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def init_lora(x: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard LoRA as the paper states it (eq. 2): A0 ~ N(0, 1/n) i.i.d., B0 = 0.

    Source: Hu et al. 2022; the paper's baseline. Departure from PEFT: PEFT's default draws A0 from
    Kaiming-uniform(a=sqrt(5)); we follow the paper's Gaussian with variance 1/n, seeded per module.
    """
    n = x.W.shape[2]
    A = torch.stack([_gaussian((x.r, n), s) for s in x.seeds]).to(x.W.device) / math.sqrt(n)
    return A, _zeros_B(x)


def init_rlpo(x: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-RLPO (principal orthonormal): A0 = V_r^T, B0 = 0.

    Source: the paper, section 5.2. V_r: the top-r right singular vectors of W0, so A0 has
    orthonormal rows and the first step's update is bounded by full fine-tuning's (Prop. 5.3).
    """
    return x.spectrum.V.transpose(1, 2).contiguous(), _zeros_B(x)


def init_rlmo(x: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-RLMO (minor orthonormal): A0 = V_-r^T, B0 = 0.

    Source: the paper, section 5.2. V_-r: the right singular vectors of the r smallest NONZERO
    singular values (exact zeros of a rank-deficient W0 carry no direction of the weight).
    """
    return x.spectrum.V.transpose(1, 2).contiguous(), _zeros_B(x)


def _scaled_svd_factors(x: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    # Divide S by the scaling as PEFT does, so s * B0 A0 = U_r S_r V_r^T exactly, whatever alpha is.
    root = (x.spectrum.S / x.scaling).sqrt()  # (batch, r)
    A = root.unsqueeze(2) * x.spectrum.V.transpose(1, 2)
    B = x.spectrum.U * root.unsqueeze(1)
    return A, B


def init_pissa(x: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA: A0 = (S_r/s)^{1/2} V_r^T, B0 = U_r (S_r/s)^{1/2}; base = W0 - s B0 A0.

    Source: Meng et al. 2024 (paper eq. 3). S is divided by the scaling s as PEFT does, so s B0 A0
    is exactly the rank-r principal part of W0 and the base keeps the tail of the SVD.
    """
    return _scaled_svd_factors(x)


def init_milora(x: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    """MiLoRA: A0 = (S_-r/s)^{1/2} V_-r^T, B0 = U_-r (S_-r/s)^{1/2}; base = W0 - s B0 A0.

    Source: Wang et al. 2025 (paper eq. 4). S divided by s as for PiSSA; -r: the r smallest nonzero
    singular values.
    """
    return _scaled_svd_factors(x)


def init_olora(x: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA in the paper's SVD form (eq. 7): A0 = V_r^T, B0 = U_r; base = W0 - s B0 A0.

    Source: Buyukakyuz 2024 as the paper states it. Departure from PEFT: PEFT's
    init_lora_weights="olora" is QR based (B = Q[:, :r], A = R[:r]); this is the SVD form the paper
    uses to isolate singular-value scaling from subspace choice.
    """
    return x.spectrum.V.transpose(1, 2).contiguous(), x.spectrum.U.contiguous()


def init_olora_tail(x: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA on the minor subspace: A0 = V_-r^T, B0 = U_-r; base = W0 - s B0 A0.

    The paper's control for MiLoRA without singular-value scaling (bottom-r nonzero triplets).
    """
    return x.spectrum.V.transpose(1, 2).contiguous(), x.spectrum.U.contiguous()


def dct_rows(r: int, n: int) -> torch.Tensor:
    """First r rows of the orthonormal DCT-II matrix: D_ij = a_i cos(pi (2j+1) i / (2n)),
    a_0 = sqrt(1/n), a_i = sqrt(2/n). Returns (r, n) float64 with orthonormal rows."""
    i = torch.arange(r, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    D = torch.cos(math.pi * (2 * j + 1) * i / (2 * n)) * math.sqrt(2.0 / n)
    D[0] = math.sqrt(1.0 / n)
    return D


def init_dct(x: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    """DCT: A0 = first r rows of the orthonormal DCT-II matrix, B0 = 0.

    A data-independent orthonormal A0 (the paper's ablation of where orthonormal rows come from).
    """
    batch, _, n = x.W.shape
    A = dct_rows(x.r, n).to(x.W.device).expand(batch, -1, -1).contiguous()
    return A, _zeros_B(x)


def haar(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal multi-level Haar transform along the last dimension, for any length n.

    Each level maps pairs (a, b) to ((a+b)/sqrt2, (a-b)/sqrt2); with an odd length the unpaired last
    element is carried to the next level unchanged. Every level is orthogonal, so the whole map is.
    Output: [final approximation, details coarsest ... finest]. x: (..., n) -> (..., n).
    """
    details = []
    a = x
    while a.shape[-1] > 1:
        p = a.shape[-1] // 2
        even, odd = a[..., 0 : 2 * p : 2], a[..., 1 : 2 * p : 2]
        details.append((even - odd) / math.sqrt(2.0))
        s = (even + odd) / math.sqrt(2.0)
        if a.shape[-1] % 2:
            s = torch.cat([s, a[..., -1:]], dim=-1)
        a = s
    return torch.cat([a] + details[::-1], dim=-1)


def init_wavelet(x: MethodInput) -> tuple[torch.Tensor, torch.Tensor]:
    """Wavelet: A0 = Q^T with Q R = H(G)^T, G ~ N(0, 1)^{r x n} seeded, H the row-wise orthonormal
    Haar transform; B0 = 0.

    QR signs are fixed (diag(R) > 0) so A0 is unique for a given seed.
    """
    n = x.W.shape[2]
    rows = []
    for seed in x.seeds:
        Q, R = torch.linalg.qr(haar(_gaussian((x.r, n), seed)).T)  # Q: (n, r)
        sign = torch.sign(torch.diagonal(R))
        sign[sign == 0] = 1
        rows.append((Q * sign).T)
    return torch.stack(rows).to(x.W.device), _zeros_B(x)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "lora",
            "LoRA",
            None,
            False,
            False,
            "N(0, 1/n) i.i.d. (seeded)",
            "0",
            "Hu et al. 2022; the paper's eq. 2",
            init_lora,
        ),
        Method("rlpo", "LoRA-RLPO", "top", False, True, "V_r^T", "0", "the paper, section 5.2", init_rlpo),
        Method("rlmo", "LoRA-RLMO", "bottom", False, True, "V_-r^T", "0", "the paper, section 5.2", init_rlmo),
        Method(
            "pissa",
            "PiSSA",
            "top",
            True,
            False,
            "(S_r/s)^1/2 V_r^T",
            "U_r (S_r/s)^1/2",
            "Meng et al. 2024; the paper's eq. 3",
            init_pissa,
        ),
        Method(
            "milora",
            "MiLoRA",
            "bottom",
            True,
            False,
            "(S_-r/s)^1/2 V_-r^T",
            "U_-r (S_-r/s)^1/2",
            "Wang et al. 2025; the paper's eq. 4",
            init_milora,
        ),
        Method(
            "olora",
            "OLoRA",
            "top",
            True,
            False,
            "V_r^T",
            "U_r",
            "Buyukakyuz 2024, SVD form of the paper's eq. 7",
            init_olora,
        ),
        Method(
            "olora-tail",
            "OLoRA-tail",
            "bottom",
            True,
            False,
            "V_-r^T",
            "U_-r",
            "the paper's OLoRA on the minor subspace",
            init_olora_tail,
        ),
        Method(
            "dct",
            "DCT",
            None,
            False,
            True,
            "first r rows of the orthonormal DCT-II",
            "0",
            "orthonormal, data-independent",
            init_dct,
        ),
        Method(
            "wavelet",
            "Wavelet",
            None,
            False,
            True,
            "Q^T, Q R = Haar(G)^T, G ~ N(0,1) (seeded)",
            "0",
            "orthonormal, data-independent",
            init_wavelet,
        ),
    ]
}


def get_method(name: str) -> Method:
    from loraforge.core.errors import LoraforgeError

    try:
        return METHODS[name]
    except KeyError:
        raise LoraforgeError(f"Unknown method {name!r}. Known methods: {', '.join(METHODS)}.") from None


def method_table_markdown() -> str:
    """The README's method table, rendered from METHODS (tests check the README carries it verbatim)."""
    rows = [
        "| `--method` | paper name | A0 (r x n) | B0 (m x r) | base weight | needs | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METHODS.values():
        base = "`W0 - s B0 A0` (written to base/)" if m.residual else "unchanged"
        needs = {"top": "top-r SVD (exact or `--svd fast`)", "bottom": "bottom-r nonzero SVD (exact)", None: "no SVD"}[
            m.spectrum
        ]
        rows.append(f"| `{m.name}` | {m.paper_name} | `{m.A0}` | `{m.B0}` | {base} | {needs} | {m.source} |")
    return "\n".join(rows)
