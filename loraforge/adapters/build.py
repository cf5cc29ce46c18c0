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

import hashlib
import shutil
import time
import types
import warnings
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


# What a residualised model from `init_model` names as its base until `save_init` writes one: not a
# loadable model, so AutoPeftModel fails on it, printing this text, instead of loading the original.
RESIDUAL_PLACEHOLDER = "<residual base in memory: save it with loraforge.save_init(model, OUT)>"


@dataclass
class InMemoryInit:
    """What `init_model` did, kept on the returned PeftModel as `loraforge_init` for `save_init`."""

    config: InitConfig
    adapter_name: str
    original: str  # the model's name_or_path at init: the model verify compares against
    revision: Optional[str]  # its Hub commit, when transformers downloaded it
    source_config: dict  # the model's config.json fields (for the manifest's source dtype)
    target_modules: object  # what adapter_config.json lists
    fan_in_fan_out: bool
    devices: list
    stats: dict  # module name -> init statistics, as in the manifest
    fingerprints: dict  # module name -> sha256 of A0 and B0 as initialised
    seconds: float
    saved_base: Optional[str] = None  # OUT/base once save_init wrote it

    @property
    def residual(self) -> bool:
        return self.config.method_spec.residual


def init_model(model: torch.nn.Module, config: InitConfig, adapter_name: str = "default", progress: bool = False):
    """Initialise a model already in memory and return it wrapped as a PeftModel.

    Works on a plain model and on one dispatched across devices by accelerate (device_map), as long
    as the target weights are materialised (not offloaded to disk). For residualised methods the
    target weights are replaced IN PLACE by the residual (in the model's own dtype). The result is
    ready for TRL's GRPOTrainer (pass it as `model`, with no `peft_config`).

    `save_init(peft_model, OUT)` writes it as `loraforge init` would (adapter, residual base, manifest).
    For residualised methods the model's own `save_pretrained` writes an adapter without its base:
    it warns, and marks the adapter_config.json it writes (see `_warn_on_plain_save`).
    """
    from peft import get_peft_model

    started = time.perf_counter()
    targets = find_targets(model, config.target_modules, config.layers)
    devices = decomposition_devices(config.device)
    inits = _init_in_place(model, targets, config, devices, progress)
    original = getattr(model, "name_or_path", "") or ""
    target_modules = peft_target_modules(model, targets)
    fan_in_fan_out = any(t.transposed for t in targets)
    model_config = getattr(model, "config", None)
    peft_model = get_peft_model(
        model, lora_config(config, target_modules, original, fan_in_fan_out), adapter_name=adapter_name
    )
    with torch.no_grad():
        for m in inits:
            layer = peft_model.base_model.model.get_submodule(m.target.name)
            layer.lora_A[adapter_name].weight.copy_(m.A)
            layer.lora_B[adapter_name].weight.copy_(m.B)
    record = InMemoryInit(
        config,
        adapter_name,
        original,
        getattr(model_config, "_commit_hash", None),  # set when transformers loaded it from the Hub
        model_config.to_dict() if model_config is not None else {},
        target_modules,
        fan_in_fan_out,
        devices,
        {m.target.name: m.stats for m in inits},
        _fingerprints(peft_model, adapter_name, [m.target.name for m in inits]),
        time.perf_counter() - started,
    )
    peft_model.loraforge_init = record
    if record.residual:
        peft_model.peft_config[adapter_name].base_model_name_or_path = RESIDUAL_PLACEHOLDER
        # On the instance, as a bound method: copy.deepcopy re-binds it to the copy.
        peft_model.save_pretrained = types.MethodType(_warn_on_plain_save, peft_model)
    return peft_model


def _init_in_place(model: torch.nn.Module, targets, config: InitConfig, devices, progress: bool) -> list:
    """Compute every target's init from the model's weights; residualised methods replace the weights."""
    modules = dict(model.named_modules())
    for t in targets:
        if modules[t.name].weight.device.type == "meta":
            raise LoraforgeError(
                f"Module {t.name}'s weight is offloaded (on the meta device); init_model needs materialised weights. "
                "Use `loraforge init MODEL_DIR` (the streaming path) for models that do not fit in memory."
            )
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
    return inits


def _factors(peft_model, adapter_name: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = peft_model.base_model.model.get_submodule(name)
    return layer.lora_A[adapter_name].weight.detach(), layer.lora_B[adapter_name].weight.detach()


def _fingerprints(peft_model, adapter_name: str, names: list[str]) -> dict[str, str]:
    """sha256 of each module's A and B bytes: lets save_init tell the initialisation from a trained adapter."""
    out = {}
    for name in names:
        digest = hashlib.sha256()
        for t in _factors(peft_model, adapter_name, name):
            digest.update(t.float().cpu().contiguous().numpy().tobytes())
        out[name] = digest.hexdigest()
    return out


def _warn_on_plain_save(self, save_directory, *args, **kwargs):
    """PeftModel.save_pretrained for a residualised init_model result: saves as PEFT does, then marks
    each adapter_config.json it wrote and warns. Not an error: TRL calls save_pretrained at every
    checkpoint, and those checkpoints are right on the residual base that save_init writes."""
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if self.loraforge_init.saved_base is not None:  # the adapter names OUT/base, which save_init wrote
        return
    method = self.loraforge_init.config.method
    for name in self.peft_config:
        writers.mark_unsaved_residual(Path(save_directory) / ("" if name == "default" else name), method)
    warnings.warn(
        f"loraforge: {save_directory} holds a {method} adapter without its base. init_model subtracted the adapter "
        "from the weights in memory, so on the original model it gives wrong outputs, and its adapter_config.json "
        "names no loadable base. Save the initialised model with loraforge.save_init(model, OUT) (adapter, residual "
        "base and manifest; `loraforge verify OUT` checks it) and load adapters trained from it on OUT/base.",
        UserWarning,
        stacklevel=2,
    )


def save_init(
    peft_model,
    out: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    original: Optional[str] = None,
) -> InitResult:
    """Write the PeftModel `init_model` returned to OUT as `loraforge init` would: adapter_config.json,
    adapter_model.safetensors, loraforge.json, README.md and, for residualised methods, base/ (the
    residual model in memory, with TOKENIZER if given). ORIGINAL names the pretrained model verify
    compares against [default: the model's name_or_path at init]. Call it before training: it
    refuses an adapter whose factors are no longer the initialisation. OUT is written atomically.
    """
    started = time.perf_counter()
    record, original = _unchanged_init(peft_model, original)
    out = Path(out)
    with writers.staged_dir(out, overwrite) as tmp:
        files, base_dtype = _write_in_memory_outputs(peft_model, record, original, out, tmp, tokenizer)
        files.update(writers.hash_remaining(tmp, files))  # config, tokenizer...: verify covers every file
        source = _InMemorySource(original, record.revision, Path(original).exists(), record.source_config)
        timings = {"decompose_s": round(record.seconds, 3), "write_s": round(time.perf_counter() - started, 3)}
        manifest = build_manifest(
            record.config,
            source,
            record.target_modules,
            record.fan_in_fan_out,
            base_dtype,
            "in-memory",
            record.devices,
            timings,
            files,
            record.stats,
        )
        writers.write_json(tmp / writers.MANIFEST, manifest)
        (tmp / "README.md").write_text(render_model_card(manifest))
    if record.residual:  # from now on the model's own save_pretrained (a trainer's checkpoints) names OUT/base
        record.saved_base = str(out.resolve() / writers.BASE_DIR)
        peft_model.peft_config[record.adapter_name].base_model_name_or_path = record.saved_base
    return InitResult(out=out, manifest=manifest, seconds=time.perf_counter() - started)


def _unchanged_init(peft_model, original: Optional[str]) -> tuple[InMemoryInit, str]:
    """init_model's record of PEFT_MODEL and the original model's name; refuses anything else."""
    record = getattr(peft_model, "loraforge_init", None)
    if not isinstance(record, InMemoryInit):
        raise LoraforgeError(
            "save_init writes a model returned by loraforge.init_model; this one was not (it has no loraforge_init "
            "record). Use `loraforge init MODEL -o OUT` for a model on disk."
        )
    original = original or record.original
    if not original:
        raise LoraforgeError(
            "The model had no name_or_path at init_model (built from a config?), so the manifest cannot name the "
            "original model that `loraforge verify` compares against. Pass original='ORG/NAME' or a directory."
        )
    now = _fingerprints(peft_model, record.adapter_name, list(record.stats))
    changed = [n for n, h in now.items() if h != record.fingerprints[n]]
    if changed:
        raise LoraforgeError(
            f"The adapter's factors changed since init_model ({len(changed)} modules, e.g. {changed[0]}): it has been "
            "trained, and save_init writes the initialisation. Call save_init right after init_model; save a trained "
            "adapter with peft_model.save_pretrained(DIR) and load it on the residual base save_init wrote."
        )
    return record, original


def _write_in_memory_outputs(
    peft_model, record: InMemoryInit, original: str, out: Path, tmp: Path, tokenizer
) -> tuple[dict, Optional[str]]:
    """The adapter weights and config, and the residual base; returns the files' hashes and the base dtype."""
    config = record.config
    adapter_dtype = DTYPES[config.adapter_dtype]
    factors = {}
    for name in record.stats:
        A, B = _factors(peft_model, record.adapter_name, name)
        factors[name] = (A.to("cpu", adapter_dtype), B.to("cpu", adapter_dtype))
    writers.write_adapter_weights(tmp / writers.ADAPTER_WEIGHTS, factors)
    # As the streaming path: a residualised adapter names OUT/base, where save_init puts the residual model.
    base_model = str(out.resolve() / writers.BASE_DIR) if record.residual else original
    writers.write_adapter_config(tmp, adapter_config(config, record.target_modules, base_model, record.fan_in_fan_out))
    files = {writers.ADAPTER_WEIGHTS: writers.sha256_file(tmp / writers.ADAPTER_WEIGHTS)}
    if not record.residual:
        return files, None
    base_dtype = _save_residual_model(peft_model, tmp / writers.BASE_DIR, tokenizer)
    files.update(writers.hash_tree(tmp, writers.BASE_DIR))
    return files, base_dtype


@dataclass
class _InMemorySource:
    """The manifest's view of the model init_model read (build_manifest takes a models.source.Source)."""

    model_id: str
    revision: Optional[str]
    is_local: bool
    config: dict


def _save_residual_model(peft_model, base_dir: Path, tokenizer) -> str:
    """The base model without its LoRA layers, as transformers saves it; returns its dtype's name."""
    base = peft_model.get_base_model()
    state = {}
    for key, value in base.state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        state[".".join(p for p in parts if p != "base_layer")] = value
    base.save_pretrained(str(base_dir), state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(base_dir))
    return str(base.dtype).removeprefix("torch.")


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
