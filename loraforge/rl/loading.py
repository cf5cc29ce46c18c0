"""Loading the base model `train` trains on: straight onto its device, in its dtype, quantized when asked.

Straight onto the device: `from_pretrained(path)` followed by `.to(device)` first builds the whole base in
host memory (in float32 by default: about 30 GB per training process for a 7B model, and every process
of a multi-GPU run does it at once). With `device_map={"": device}` transformers reads the safetensors
shards tensor by tensor and puts each on the device in the requested dtype, so host memory holds one
tensor at a time (plus the page cache of the mapped shards).

Quantized (`--quantize nf4|fp4|int8`): the same load with bitsandbytes' BitsAndBytesConfig
(models/quantize.py), which quantizes each linear layer as it lands; every other module (embeddings,
norms, the output head) stays in `--dtype`, 4-bit layers compute in `--quant-compute-dtype` (default:
`--dtype`), and the adapter PEFT loads on top stays float32 (PEFT keeps LoRA weights in float32 and casts
activations to them).
"""

from __future__ import annotations

from typing import Any

import torch

from loraforge.rl.config import TrainConfig


def base_load_kwargs(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The keyword arguments of `AutoModelForCausalLM.from_pretrained` for the run's base on DEVICE."""
    kw: dict[str, Any] = {
        "dtype": getattr(torch, cfg.dtype),
        "trust_remote_code": cfg.trust_remote_code,
        "device_map": {"": str(device)},
    }
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
    if cfg.quantize:
        from loraforge.models.quantize import bnb_config

        kw["quantization_config"] = bnb_config(cfg.quantize, getattr(torch, cfg.quant_compute_dtype or cfg.dtype))
    return kw


def load_base(cfg: TrainConfig, model_src: str, device: torch.device):
    """The base model for the run, on DEVICE (raises what from_pretrained raises; the caller words it)."""
    from transformers import AutoModelForCausalLM

    if cfg.quantize:
        from loraforge.models.quantize import require_bitsandbytes

        require_bitsandbytes()  # one line on how to install it, before any weight is read
    base = AutoModelForCausalLM.from_pretrained(model_src, **base_load_kwargs(cfg, device))
    if cfg.quantize and device.type == "cpu":
        from loraforge.models.quantize import pin_cpu_kernel

        pin_cpu_kernel(base)
    return base
