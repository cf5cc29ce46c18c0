"""The factors an init writes: per-matrix inits collected into (A0, B0) per target, fused expert stacks in PEFT's
ParamWrapper layout, and the manifest's per-target statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from loraforge.inits.compute import ModuleInit
from loraforge.inits.config import DTYPES, InitConfig
from loraforge.models.targets import Target


class FactorSet:
    """Collects per-matrix inits into what is written: (A0, B0) per target, fused experts in PEFT's ParamWrapper
    layout, and the manifest's per-target statistics.

    PEFT's layout for a stack of E experts at rank r (peft/tuners/lora/layer.py, ParamWrapper.get_delta_weight):
    lora_A (r*E, in) with A_e = rows e*r:(e+1)*r (expert-major), lora_B (out, r*E) with B_e = columns e::E
    (expert-minor), and delta[e] = s B_e A_e (transposed for is_transposed stacks, as the stored matrix is)."""

    def __init__(self, targets: list[Target], config: InitConfig, spill: Optional[Path] = None):
        self.targets = {t.name: t for t in targets}
        self.r = config.r
        self.dtype = DTYPES[config.adapter_dtype]
        # name -> (A0, B0), or the file they wait in: beyond config.residual_mib of factors (an MoE adapter at
        # r = 32 is gigabytes), finished targets are parked in SPILL until the adapter file is written.
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor] | Path] = {}
        self.stats: dict[str, dict] = {}
        self._experts: dict[str, list[dict]] = {}
        self._spill, self._budget, self._held = spill, config.residual_mib * 2**20, 0

    def add(self, m: ModuleInit) -> None:
        t, r = m.target, self.r
        if t.expert is None:
            self.factors[t.name] = (m.A, m.B)
            self.stats[t.name] = m.stats
            self._settle(t.name)
            return
        E = t.experts
        if t.name not in self.factors:
            self.factors[t.name] = (
                torch.zeros(r * E, t.in_features, dtype=self.dtype),
                torch.zeros(t.out_features, r * E, dtype=self.dtype),
            )
            self._experts[t.name] = [None] * E
        A, B = self.factors[t.name]
        A[t.expert * r : (t.expert + 1) * r] = m.A
        B[:, t.expert :: E] = m.B
        per = self._experts[t.name]
        per[t.expert] = m.stats
        if all(p is not None for p in per):
            self.stats[t.name] = stack_stats(t, per)
            del self._experts[t.name]
            self._settle(t.name)

    def _settle(self, name: str) -> None:
        """Keep NAME's finished factors in memory within the budget, else park them on disk."""
        A, B = self.factors[name]
        size = A.numel() * A.element_size() + B.numel() * B.element_size()
        if self._spill is None or self._held + size <= self._budget:
            self._held += size
            return
        from loraforge.adapters.writers import write_tensors

        self._spill.mkdir(exist_ok=True)
        path = self._spill / f"factors{len(list(self._spill.iterdir())):05d}.safetensors"
        write_tensors(path, {"A": A, "B": B})
        self.factors[name] = path


def stack_stats(t: Target, per: list[dict]) -> dict:
    """A fused stack's manifest entry: norms over the whole stack, worst errors, and each expert's numbers."""
    stats = {
        "shape": [t.out_features, t.in_features],
        "experts": t.experts,
        "init_norm": sum(p["init_norm"] ** 2 for p in per) ** 0.5,
        "update_norm": sum(p["update_norm"] ** 2 for p in per) ** 0.5,
        "recon_max_abs": max(p["recon_max_abs"] for p in per),
        "recon_rel": max(p["recon_rel"] for p in per),
    }
    for key in ("init_norm", "energy", "rank", "recon_rel"):
        if key in per[0]:
            stats.setdefault("per_expert", {})[key] = [p[key] for p in per]
    return stats
