"""loraforge.json, the manifest: everything needed to reproduce, verify and explain an adapter."""

from __future__ import annotations

import statistics
from typing import Optional

import torch

from loraforge.adapters.writers import UNHASHED
from loraforge.inits import quantized
from loraforge.inits.config import InitConfig

INIT_FORMAT = "loraforge-manifest/1"


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("loraforge", "torch", "transformers", "peft", "safetensors", "huggingface-hub", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def source_dtype(source_config: dict) -> Optional[str]:
    d = source_config.get("dtype") or source_config.get("torch_dtype")
    if d is None and isinstance(source_config.get("text_config"), dict):
        d = source_config["text_config"].get("dtype") or source_config["text_config"].get("torch_dtype")
    return d


def build_manifest(
    config: InitConfig,
    source,
    target_modules,
    fan_in_fan_out: bool,
    base_dtype: Optional[str],
    path: str,
    devices: list[torch.device],
    timings: dict,
    files: dict,
    stats: dict,
    peft: Optional[dict] = None,
    skipped: Optional[dict] = None,
) -> dict:
    """loraforge.json: everything needed to reproduce, verify and explain the adapter."""
    method = config.method_spec
    return {
        "format": INIT_FORMAT,
        "method": method.name,
        "paper_name": method.paper_name,
        "A0": method.A0,
        "B0": method.B0,
        "r": config.r,
        "alpha": config.alpha,
        "rslora": config.rslora,
        "scaling": config.scaling,
        "seed": config.seed,
        "svd": config.svd if method.spectrum else None,
        # the quantized base the init was computed for (init --quantize), and what was computed against it
        "quantize": quantized.record(config.quantize, config.quant_iters, method),
        "source": {"model_id": source.model_id, "revision": source.revision, "local": source.is_local},
        "target_modules": target_modules,
        # How adapter_config.json names the targets for PEFT (modules_as_parameters: modules written as
        # target_parameters because PEFT remaps them, or cannot wrap them, otherwise), and what the default set left
        # out and why.
        "peft": peft,
        "skipped": skipped or {},
        "layers": config.layers,
        "fan_in_fan_out": fan_in_fan_out,
        "dtypes": {"adapter": config.adapter_dtype, "base": base_dtype, "source": source_dtype(source.config)},
        "base": "base" if method.residual else None,
        "path": path,  # "streaming" or "in-memory"
        "device": ",".join(str(d) for d in devices),  # several when batches were spread over GPUs
        "versions": versions(),
        "timings": timings,
        "files": files,
        "files_unhashed": list(UNHASHED),  # every other file of OUT is in `files`
        "summary": summarize(stats),
        "modules": stats,
    }


def summarize(stats: dict[str, dict]) -> dict:
    n = len(stats)
    rel = [s["recon_rel"] for s in stats.values()]
    summary = {
        "modules": n,
        "init_norm_mean": sum(s["init_norm"] for s in stats.values()) / max(n, 1),
        "recon_rel_max": max(rel, default=0.0),
        "recon_rel_mean": sum(rel) / max(n, 1),
        "recon_max_abs": max((s["recon_max_abs"] for s in stats.values()), default=0.0),
    }
    quant = sorted(s["quant_rel"] for s in stats.values() if "quant_rel" in s)
    if quant:  # init --quantize: ||Q(base) + s B0 A0 - W|| / ||W|| over the quantized modules
        summary.update(quant_rel_max=quant[-1], quant_rel_median=statistics.median(quant))
    return summary
