"""`loraforge init`: from a pretrained model to a ready-to-train PEFT adapter directory.

Two entry points share one computation (`compute_inits`):
- `init_adapter(model, out, config)`: the streaming path. Targets are found on a meta-device
  skeleton; target weights are read from the safetensors checkpoint one batch of same-shaped
  matrices at a time (the next batch is read while the current one is decomposed); the adapter,
  the residual base (shard by shard) and the manifest are written to a staged directory.
  Memory grows with the largest batch, not with the model.
- `init_model(model, config)`: a model already in memory (possibly dispatched across devices by
  accelerate) is initialised in place and returned as a PeftModel, ready for TRL's GRPOTrainer.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from loraforge.adapters import writers
from loraforge.adapters.card import render_model_card
from loraforge.adapters.manifest import build_manifest, source_dtype
from loraforge.adapters.peft_config import adapter_config, lora_config
from loraforge.core.devices import decomposition_devices
from loraforge.core.errors import LoraforgeError
from loraforge.inits.compute import compute_inits
from loraforge.inits.config import DTYPES, InitConfig
from loraforge.inits.sanity import check_inits
from loraforge.models.source import companion_files, resolve_source
from loraforge.models.targets import (
    HeaderSkeleton,
    build_skeleton,
    checkpoint_keys,
    find_targets,
    header_skeleton,
    peft_target_modules,
)
from loraforge.models.validate import check_blocks, check_target_tensors


@dataclass
class InitResult:
    """What `init_adapter` did."""

    out: Path
    manifest: dict
    seconds: float

    @property
    def modules(self) -> int:
        return len(self.manifest["modules"])


def init_model(model: torch.nn.Module, config: InitConfig, adapter_name: str = "default", progress: bool = False):
    """Initialise a model already in memory and return it wrapped as a PeftModel.

    Works on a plain model and on one dispatched across devices by accelerate (device_map), as long
    as the target weights are materialised (not offloaded to disk). For residualised methods the
    target weights are replaced IN PLACE by the residual (in the model's own dtype). The result is
    ready for TRL's GRPOTrainer (pass it as `model`, with no `peft_config`).
    """
    from peft import get_peft_model

    targets = find_targets(model, config.target_modules, config.layers)
    modules = dict(model.named_modules())
    for t in targets:
        if modules[t.name].weight.device.type == "meta":
            raise LoraforgeError(
                f"Module {t.name}'s weight is offloaded (on the meta device); init_model needs materialised weights. "
                "Use `loraforge init MODEL_DIR` (the streaming path) for models that do not fit in memory."
            )
    devices = decomposition_devices(config.device)
    inits = [
        m
        for batch in compute_inits(targets, lambda t: modules[t.name].weight.detach(), config, devices, progress)
        for m in batch
    ]
    check_inits(inits, config)  # before the model is touched
    with torch.no_grad():
        for m in inits:
            if m.base is not None:
                weight = modules[m.target.name].weight
                weight.copy_(m.base.to(weight.device, weight.dtype))
    cfg = lora_config(
        config,
        peft_target_modules(model, targets),
        getattr(model, "name_or_path", "") or "",
        any(t.transposed for t in targets),
    )
    peft_model = get_peft_model(model, cfg, adapter_name=adapter_name)
    with torch.no_grad():
        for m in inits:
            layer = peft_model.base_model.model.get_submodule(m.target.name)
            layer.lora_A[adapter_name].weight.copy_(m.A)
            layer.lora_B[adapter_name].weight.copy_(m.B)
    return peft_model


def init_adapter(
    model: str,
    out: str | Path,
    config: InitConfig,
    revision: Optional[str] = None,
    device_map: Optional[str] = None,
    overwrite: bool = False,
    token: Optional[str] = None,
    trust_remote_code: bool = False,
    progress: bool = False,
) -> InitResult:
    """Write a PEFT adapter directory initialised by CONFIG.method for MODEL (a Hub id or directory).

    OUT gets adapter_config.json, adapter_model.safetensors, loraforge.json (the manifest),
    README.md (a model card) and, for residualised methods, base/ (the residual base model).
    With DEVICE_MAP (e.g. "auto", "cpu"), the model is loaded through transformers with that
    accelerate device map and initialised in memory; otherwise the checkpoint is streamed.
    """
    started = time.perf_counter()
    out = Path(out)
    writers.check_destination(out, overwrite)
    source = resolve_source(model, revision, token, trust_remote_code)
    writers.check_destination(out, overwrite, protect=source.path)
    devices = decomposition_devices(config.device)
    plan = _plan(source, config, device_map, trust_remote_code)
    _validate_plan(plan, config)

    with writers.staged_dir(out, overwrite) as tmp:
        t0 = time.perf_counter()
        factors, stats, residuals = _run_inits(plan, config, devices, tmp, progress)
        decompose_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        files, base_dtype = _write_outputs(plan, config, out, tmp, factors, residuals, trust_remote_code)
        files.update(writers.hash_remaining(tmp, files))  # config, tokenizer...: verify covers every file
        timings = {
            "decompose_s": round(decompose_s, 3),
            "write_s": round(time.perf_counter() - t1, 3),
            "total_s": round(time.perf_counter() - started, 3),
        }
        manifest = build_manifest(
            config,
            source,
            plan.target_modules,
            plan.fan_in_fan_out,
            base_dtype,
            "in-memory" if plan.loaded is not None else "streaming",
            devices,
            timings,
            files,
            stats,
        )
        writers.write_json(tmp / writers.MANIFEST, manifest)
        (tmp / "README.md").write_text(render_model_card(manifest))
    return InitResult(out=out, manifest=manifest, seconds=time.perf_counter() - started)


@dataclass
class _Plan:
    """What an init works on: the source, its targets, and how their weights are read."""

    source: object
    targets: list
    target_modules: object  # what adapter_config.json lists
    fan_in_fan_out: bool
    loaded: Optional[torch.nn.Module]  # the model in memory (device_map or legacy checkpoints), else None
    keys: Optional[dict[str, str]]  # streaming: target name -> checkpoint key
    skeleton: Optional[torch.nn.Module] = None  # what the targets were found on

    def read(self, t) -> torch.Tensor:
        if self.loaded is not None:
            return self.loaded.get_submodule(t.name).weight.detach()
        key = self.keys[t.name]
        return self.source.open_shard(self.source.weight_map[key]).read(key)


def _plan(source, config: InitConfig, device_map: Optional[str], trust_remote_code: bool) -> _Plan:
    """Find the targets, on a skeleton when the checkpoint can be streamed, else on the loaded model."""
    loaded, keys = None, None
    if device_map is not None or source.weight_format != "safetensors":
        loaded = skeleton = _load_model(source, config, device_map, trust_remote_code)
        targets = find_targets(skeleton, config.target_modules, config.layers)
    else:
        skeleton, targets = _skeleton_and_targets(source, config, trust_remote_code)
        keys = checkpoint_keys(targets, source, skeleton)
        if keys is None:  # names in the checkpoint differ from the model's (legacy layout): load it
            loaded = _load_model(source, config, None, trust_remote_code)
            targets = find_targets(loaded, config.target_modules, config.layers)
    return _Plan(
        source,
        targets,
        peft_target_modules(skeleton, targets),
        any(t.transposed for t in targets),
        loaded,
        keys,
        loaded if loaded is not None else skeleton,
    )


def _validate_plan(plan: _Plan, config: InitConfig) -> None:
    """Before any work: each streamed target weight is a float tensor of the shape the config implies,
    and a model read off its header has every block the config declares. (Headers and the index were
    checked when the source was resolved; --layers and -r against the targets where they are found.)"""
    if plan.keys is None:  # loaded through transformers, which checks shapes against the config itself
        return
    from_header = isinstance(plan.skeleton, HeaderSkeleton)
    check_target_tensors(plan.source, plan.targets, plan.keys, from_header)
    if from_header:
        check_blocks(plan.source, find_targets(plan.skeleton, config.target_modules, None))


def _run_inits(plan: _Plan, config: InitConfig, devices, tmp: Path, progress: bool):
    """Compute every init; residuals go into the loaded model, or are kept for the base writer:
    in memory up to config.residual_mib, parked in tmp/.residuals beyond that."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    stats: dict[str, dict] = {}
    residual_files: dict[str, Path | torch.Tensor] = {}  # checkpoint key -> residual, or the file holding it
    held = 0  # bytes of residuals kept in memory
    for batch_no, batch in enumerate(compute_inits(plan.targets, plan.read, config, devices, progress)):
        check_inits(batch, config)  # before anything of the batch is kept: a bad init stops the run
        residuals = {}
        for m in batch:
            factors[m.target.name] = (m.A, m.B)
            stats[m.target.name] = m.stats
            if m.base is None:
                continue
            if plan.loaded is not None:
                weight = plan.loaded.get_submodule(m.target.name).weight
                with torch.no_grad():
                    weight.copy_(m.base.to(weight.device, weight.dtype))
            else:
                residuals[plan.keys[m.target.name]] = m.base
        if not residuals:
            continue
        size = sum(r.numel() * r.element_size() for r in residuals.values())
        if held + size <= config.residual_mib * 2**20:  # e.g. a small model's: keep until written
            held += size
            residual_files.update(residuals)
            continue
        spill = tmp / ".residuals" / f"batch{batch_no:05d}.safetensors"
        spill.parent.mkdir(exist_ok=True)
        writers.write_tensors(spill, residuals)
        residual_files.update({k: spill for k in residuals})
    return factors, stats, residual_files


def _write_outputs(
    plan: _Plan, config: InitConfig, out: Path, tmp: Path, factors, residuals, trust_remote_code: bool
) -> tuple[dict, Optional[str]]:
    """The adapter weights and config, and the residual base; returns the files' hashes and the base dtype."""
    method = config.method_spec
    source = plan.source
    adapter_sha = writers.write_adapter_weights(tmp / writers.ADAPTER_WEIGHTS, factors)
    # For residualised methods the adapter belongs on OUT/base, not on the source model, so that
    # is what PEFT's AutoPeftModel must load (`loraforge push` rewrites it to the base's Hub repo).
    base_model = str(out.resolve() / writers.BASE_DIR) if method.residual else source.model_id
    writers.write_adapter_config(tmp, adapter_config(config, plan.target_modules, base_model, plan.fan_in_fan_out))
    files = {writers.ADAPTER_WEIGHTS: adapter_sha}
    if not method.residual:
        return files, None
    cast_to = None if config.base_dtype == "auto" else DTYPES[config.base_dtype]
    base_dtype = config.base_dtype if cast_to is not None else source_dtype(source.config)
    if plan.loaded is not None:
        _save_loaded_base(plan.loaded, source, tmp / writers.BASE_DIR, cast_to, trust_remote_code)
        files.update(writers.hash_tree(tmp, writers.BASE_DIR))
    else:
        files.update(writers.write_residual_base(source, tmp / writers.BASE_DIR, residuals, cast_to, trust_remote_code))
    shutil.rmtree(tmp / ".residuals", ignore_errors=True)
    return files, base_dtype


def _skeleton_and_targets(source, config: InitConfig, trust_remote_code: bool):
    """The skeleton to find targets on, and the targets. Known decoder layouts come from the
    checkpoint header (no transformers import); if the names asked for are not among them, the
    transformers skeleton has the final word."""
    header = header_skeleton(source)
    if header is not None:
        try:
            return header, find_targets(header, config.target_modules, config.layers)
        except LoraforgeError:
            pass
    skeleton = build_skeleton(source.path, trust_remote_code)
    return skeleton, find_targets(skeleton, config.target_modules, config.layers)


def _load_model(source, config: InitConfig, device_map: Optional[str], trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    dtype = "auto" if config.base_dtype == "auto" else DTYPES[config.base_dtype]
    try:
        return AutoModelForCausalLM.from_pretrained(
            source.path, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code, use_safetensors=None
        )
    except (OSError, ValueError) as e:
        raise LoraforgeError(f"transformers could not load {source.model_id}: {e}") from None


def _save_loaded_base(model, source, base_dir: Path, cast_to, trust_remote_code: bool) -> None:
    if cast_to is not None:
        model.to(cast_to)
    with writers.os_errors(base_dir):
        model.save_pretrained(str(base_dir), safe_serialization=True)
    for f in companion_files(source, trust_remote_code):
        if not (base_dir / f.name).exists():
            shutil.copy2(f, base_dir / f.name)
