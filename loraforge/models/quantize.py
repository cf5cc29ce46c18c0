"""Quantized bases through bitsandbytes: the one description of how a base is quantized, used by
`train --quantize`, `init --quantize`, `verify --quantize` and the 4-bit TRL recipe.

- `QUANT_TYPES`: nf4 and fp4 (QLoRA's 4-bit formats: the weight flattened in blocks of 64, one float32
  absmax per block, each value rounded to the nearest of 16 codes times its block's absmax) and int8
  (LLM.int8: one absmax per output row, the weight cast to float16 first, values rounded to
  round(127 w / absmax)).
- `bnb_config(quantize, compute_dtype)`: the `BitsAndBytesConfig` that transformers loads a base with.
- `quantize_dequantize(w, quantize)`: the weight a quantized layer computes with, for a weight as
  stored. It calls bitsandbytes' own quantize and dequantize functions (the ones `Params4bit` and
  `Int8Params` call on load), so what init and verify compute against is what `train` trains on;
  `verify --quantize` checks the two agree on the loaded model.

Departures from common QLoRA recipes, on purpose: no double quantization (`bnb_4bit_use_double_quant`
off, transformers' default): the 8-bit absmax it adds saves 0.4 bits per weight and changes the
dequantized weight, and one fixed format keeps init, verify and train on the same weight.
"""

from __future__ import annotations

import torch

from loraforge.core.errors import LoraforgeError

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # bitsandbytes' 4-bit block, the one transformers' BitsAndBytesConfig loads with
MIN_BNB = (0, 50)  # bitsandbytes 0.50 is the first release that runs 4-bit layers on CPU
INSTALL = "pip install -e '.[quant]' (bitsandbytes >= 0.50)"


def check_quantize(value: str | None, flag: str = "--quantize") -> None:
    """Refuse an unknown quantization name in one line (None = not quantized)."""
    if value is not None and value not in QUANT_TYPES:
        raise LoraforgeError(f"{flag} must be one of {', '.join(QUANT_TYPES)}, got {value!r}")


def require_bitsandbytes(flag: str = "--quantize"):
    """bitsandbytes, imported; or one line saying how to install it (or that it is too old)."""
    try:
        import bitsandbytes
    except ImportError:
        raise LoraforgeError(f"{flag} needs bitsandbytes, which is not installed: {INSTALL}") from None
    except Exception as e:  # a broken native library raises all sorts of errors at import
        raise LoraforgeError(f"{flag}: bitsandbytes is installed but does not import ({e}): {INSTALL}") from None
    version = getattr(bitsandbytes, "__version__", "0")
    if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < MIN_BNB:
        raise LoraforgeError(
            f"{flag} needs bitsandbytes >= 0.50 (4-bit layers on CPU), found {version}: "
            "pip install --upgrade 'bitsandbytes>=0.50'"
        )
    return bitsandbytes


def bnb_config(quantize: str, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig for QUANTIZE, whose 4-bit layers compute in COMPUTE_DTYPE."""
    check_quantize(quantize)
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=False,
    )


def quantize_dequantize(w: torch.Tensor, quantize: str) -> torch.Tensor:
    """Q(w): what a layer of quantization QUANTIZE computes with when the checkpoint stores W (out, in),
    as float32 of W's shape (on W's device).

    4-bit: bitsandbytes.functional.quantize_4bit / dequantize_4bit with blocks of 64, as Params4bit on
    load. The codes and absmax are the same whether W is given in bf16 or float32 (checked in the tests);
    a bf16 base then rounds absmax * code to bf16, which this float32 result leaves out (about 2^-9 of
    each value, against nf4's 1/10 of W). int8: LLM.int8's row-wise quantization of W in float16,
    dequantized as code * absmax / 127.
    """
    check_quantize(quantize)
    require_bitsandbytes()
    import bitsandbytes.functional as F

    if quantize == "int8":
        codes, absmax, _ = F.int8_vectorwise_quant(w.to(torch.float16).contiguous())
        return codes.float() * (absmax.float()[:, None] / 127.0)
    codes, state = F.quantize_4bit(w.float().contiguous(), blocksize=BLOCKSIZE, quant_type=quantize)
    return F.dequantize_4bit(codes, state).reshape(w.shape)


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The float32 weight a loaded bitsandbytes layer computes with (None if MODULE is not one)."""
    import bitsandbytes as bnb

    weight = getattr(module, "weight", None)
    if isinstance(module, bnb.nn.Linear4bit):
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked for AVX512-BF16 CPUs: undo first
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            return bnb.functional.dequantize_4bit(data, state).float()
        return bnb.functional.dequantize_4bit(weight.data, state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        return weight.CB.float() * (weight.SCB.float()[:, None] / 127.0)
    return None


def pin_cpu_kernel(model: torch.nn.Module) -> int:
    """Keep every 4-bit layer of MODEL on bitsandbytes' dequantize-then-matmul path on CPU; returns how
    many layers it set.

    Why: on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight the first time it runs without
    gradients in eval mode and from then on uses another kernel (gemv_4bit). The trainer samples and
    computes old log-probs without gradients and new ones with, so the two would run different kernels
    and the PPO ratio would start away from 1. A departure from bitsandbytes' default, for CPUs only.
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n
