"""How to initialise: `InitConfig`, the one description of an init that the CLI, the Python API and
the manifest share."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.core.settings import setting
from loraforge.inits.methods import get_method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class InitConfig:
    """How to initialise. Every field but batch_mib and residual_mib has a --flag of the same name in
    `loraforge init`, whose --help line is the field's metadata help."""

    method: str = setting(help="Initialisation method (see the README's method table).")
    r: int = setting(help="Adapter rank r, at most min(out, in) of every target module.")
    alpha: Optional[float] = setting(None, "LoRA alpha [default: 2 * r, the paper's setting].")
    rslora: bool = setting(False, "Scale by alpha / sqrt(r) instead of alpha / r.")
    target_modules: str | list[str] = setting(
        "all-linear",
        "all-linear (every Linear/Conv1D but the output head and MoE routers, plus fused MoE experts) or names like "
        "q_proj,v_proj,experts.",
    )
    layers: Optional[list[int]] = setting(None, "Only these transformer blocks, e.g. 0-3,7 [default: all].")
    # per module the seed is mixed with the module's name, so modules of one shape differ
    seed: int = setting(0, "Seed of the random methods (lora, wavelet).")
    device: str = setting(
        "auto",
        "Where decompositions run: auto (the GPUs if any, else cpu), cpu, cuda (every visible GPU), cuda:N (that one).",
    )
    adapter_dtype: str = setting("float32", "dtype of the stored A0 and B0.")
    base_dtype: str = setting(
        "auto", "Residual base dtype (pissa, milora, olora, olora-tail); auto keeps the checkpoint's."
    )
    svd: str = setting("exact", "exact, or fast: randomised SVD, principal methods only (rlpo, pissa, olora).")
    quantize: Optional[str] = setting(
        None,
        "nf4, fp4 or int8: compute the init for a base that bitsandbytes quantizes on load (train --quantize): "
        "rlpo/rlmo take the spectrum of the quantized weight, pissa/olora refine their factors against it.",
    )
    quant_iters: int = setting(
        5, "With --quantize: pissa/olora refinements against the quantized residual (LoftQ-style); 0 = none."
    )
    batch_mib: int = setting(
        512,
        "Memory budget of one batch of matrices decomposed together (an MoE expert stack is cut into batches of "
        "experts), in MiB of float64.",
    )
    residual_mib: int = setting(
        512, "Residuals (and, separately, adapter factors) kept in memory until written, in MiB; the rest wait on disk."
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
        if self.quantize is not None:
            from loraforge.models.quantize import check_quantize, require_bitsandbytes

            check_quantize(self.quantize)
            require_bitsandbytes()  # Q is bitsandbytes' own: one line on how to install it, before any weight is read
        if not isinstance(self.quant_iters, int) or self.quant_iters < 0:
            raise LoraforgeError(f"--quant-iters must be an integer >= 0, got {self.quant_iters!r}.")
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
