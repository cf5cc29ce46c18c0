"""How to initialise: `InitConfig`, the one description of an init that the CLI, the Python API and
the manifest share."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.inits.methods import get_method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class InitConfig:
    """How to initialise. Every field has a --flag of the same name in `loraforge init`."""

    method: str  # one of METHODS: lora, rlpo, rlmo, pissa, milora, olora, olora-tail, dct, wavelet
    r: int  # adapter rank, >= 1 and <= min(out, in) of every target module
    alpha: Optional[float] = None  # LoRA alpha; None means 2 * r (the paper's setting)
    rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    target_modules: str | list[str] = "all-linear"  # "all-linear" (no output head) or module names
    layers: Optional[list[int]] = None  # only these transformer blocks; None = all
    seed: int = 0  # seed of the random methods (lora, wavelet); per module it is mixed with the name
    device: str = "auto"  # where decompositions run: auto (cuda if present), cpu, cuda, cuda:N
    adapter_dtype: str = "float32"  # dtype of the stored A0, B0: float32, bfloat16, float16
    base_dtype: str = "auto"  # residual base dtype: auto (as the checkpoint), float32, bfloat16, float16
    svd: str = "exact"  # exact, or fast (randomised; principal methods only)
    batch_mib: int = 512  # memory budget for one batch of float64 matrices, in MiB
    residual_mib: int = (
        512  # residuals (and, separately, factors) held in memory until written, in MiB; the rest wait on disk
    )

    def __post_init__(self):
        self.method_spec = get_method(self.method)
        if not isinstance(self.r, int) or self.r < 1:
            raise LoraforgeError(f"-r/--rank must be a positive integer, got {self.r!r}.")
        if self.alpha is None:
            self.alpha = 2.0 * self.r
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise LoraforgeError(f"--alpha must be a positive number, got {self.alpha!r}.")
        if self.adapter_dtype not in ("float32", "bfloat16", "float16"):
            raise LoraforgeError(f"--adapter-dtype must be float32, bfloat16 or float16, got {self.adapter_dtype!r}.")
        if self.base_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise LoraforgeError(f"--base-dtype must be auto, float32, bfloat16 or float16, got {self.base_dtype!r}.")
        if self.svd not in ("exact", "fast"):
            raise LoraforgeError(f"--svd must be exact or fast, got {self.svd!r}.")
        if self.svd == "fast" and not self.method_spec.fast_ok:
            if self.method_spec.spectrum is None:
                raise LoraforgeError(f"--svd fast does not apply to {self.method}, which needs no SVD; drop --svd.")
            raise LoraforgeError(
                f"--svd fast cannot be used with {self.method}: it needs the bottom of the spectrum, and a randomised "
                "SVD finds only the top singular subspace. Drop --svd fast (the exact path is batched and fast)."
            )
        if self.seed < 0:
            raise LoraforgeError(f"--seed must be >= 0, got {self.seed}.")
        if self.batch_mib < 1:
            raise LoraforgeError(f"batch_mib must be >= 1, got {self.batch_mib}.")
        if self.residual_mib < 0:
            raise LoraforgeError(f"residual_mib must be >= 0, got {self.residual_mib}.")

    @property
    def scaling(self) -> float:
        """s in y = W x + s * B A x: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items()}
        d["scaling"] = self.scaling
        return d
