"""Checks on computed inits before anything is written: an init that cannot train, or a residual base
that no longer reproduces the weights, must stop the command (exit 1, old OUT kept), not ship.

Which flag values get here: PiSSA/MiLoRA scale their factors by sqrt(S / s), so a tiny --alpha
overflows them (inf, then NaN in the residual) and a huge one underflows them to zero in a 16-bit
--adapter-dtype (and even float32 at --alpha 1e300): an all-zero A0 and B0 get no gradient, ever.
OLoRA subtracts s U V^T, so a large --alpha leaves a residual whose rounding swamps W.
"""

from __future__ import annotations

from typing import Sequence

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.inits.config import DTYPES, InitConfig

# A stored row of A0 (column of B0) may differ from the exact one by rounding: at most eps/2 relative
# per entry, so eps/2 per row. 8 eps leaves a 16x margin; only subnormal (underflowing) values exceed it.
ROUNDING_EPS = 8


def _flags(config: InitConfig) -> str:
    return (
        f"{config.method} with --alpha {config.alpha:g} (s = {config.scaling:.3g}"
        f"{', rsLoRA' if config.rslora else ''}) and --adapter-dtype {config.adapter_dtype}"
    )


def check_inits(batch: Sequence, config: InitConfig) -> None:
    """Refuse a batch of ModuleInit whose factors are not finite, lost a row or column to underflow,
    or whose residual base does not reproduce W to the rounding of its dtype."""
    eps = torch.finfo(DTYPES[config.adapter_dtype]).eps
    for m in batch:
        name = m.target.unit
        if not (bool(torch.isfinite(m.A).all()) and bool(torch.isfinite(m.B).all())):
            raise LoraforgeError(
                f"{_flags(config)} makes module {name}'s factors overflow (inf or NaN). Raise --alpha (e.g. the "
                f"default 2r = {2 * config.r}) or use --adapter-dtype float32. Nothing was written."
            )
        rounding = m.stats.get("factor_rounding", 0.0)
        if not rounding <= ROUNDING_EPS * eps:
            what = "underflowed to zero" if rounding >= 0.999 else f"lost {rounding:.1%} of a row to underflow"
            raise LoraforgeError(
                f"{_flags(config)}: module {name}'s A0/B0 {what} in {config.adapter_dtype}, and such a factor "
                f"does not train. Lower --alpha (e.g. the default 2r = {2 * config.r}) or use --adapter-dtype "
                "float32. Nothing was written."
            )
        if m.base is not None:
            _check_reconstruction(m, config)


def _check_reconstruction(m, config: InitConfig) -> None:
    """The residual base plus s B0 A0 must give back W to the rounding of the base dtype (the tolerance
    `loraforge verify` applies)."""
    tol = torch.finfo(m.base.dtype).eps
    rel = m.stats.get("recon_rel", 0.0)
    if not rel <= tol:
        dtype = str(m.base.dtype).removeprefix("torch.")
        raise LoraforgeError(
            f"{_flags(config)}: the residual base of module {m.target.unit} cannot hold W - s B0 A0 in {dtype} "
            f"(relative reconstruction error {rel:.2e} > {tol:.1e}). Lower --alpha (e.g. the default 2r = "
            f"{2 * config.r}) or use --base-dtype float32. Nothing was written."
        )
