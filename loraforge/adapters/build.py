"""`loraforge init`: from a pretrained model to a ready-to-train PEFT adapter directory.

Two entry points share one computation (`compute_inits`):
- `init_adapter(model, out, config)`: the streaming path. Targets are found on a meta-device
  skeleton; target weights are read from the safetensors checkpoint one batch of same-shaped
  matrices at a time (the next batch is read while the current one is decomposed); the adapter,
  the residual base (shard by shard) and the manifest are written to a staged directory.
  Memory grows with the largest batch, not with the model.
- `init_model(model, config)` (adapters/in_memory.py): a model already in memory (possibly
  dispatched across devices by accelerate) is initialised in place and returned as a PeftModel,
  ready for TRL's GRPOTrainer.
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
from loraforge.adapters.factors import FactorSet
from loraforge.adapters.manifest import build_manifest, source_dtype
from loraforge.adapters.peft_config import PeftForm, adapter_config, plan_peft_form
from loraforge.core.devices import decomposition_devices
from loraforge.core.errors import LoraforgeError
from loraforge.inits.compute import compute_inits
from loraforge.inits.config import DTYPES, InitConfig
from loraforge.inits.plan import drop_small, rank_limits
from loraforge.inits.sanity import check_inits
from loraforge.models.experts import ExpertKeys, expert_keys
from loraforge.models.source import companion_files, resolve_source
from loraforge.models.targets import (
    HeaderSkeleton,
    Target,
    build_skeleton,
    checkpoint_keys,
    find_targets,
    header_skeleton,
    parse_target_modules,
    peft_target_modules,
)
from loraforge.models.validate import FLOAT_DTYPES, check_blocks, check_target_tensors


@dataclass
class InitResult:
    """What `init_adapter` did."""

    out: Path
    manifest: dict
    seconds: float

    @property
    def modules(self) -> int:
        return len(self.manifest["modules"])


def _tensor(model: torch.nn.Module, t: Target) -> torch.Tensor:
    """T's weight in MODEL (for a unit of an expert stack: that expert's matrix), as stored."""
    weight = getattr(model.get_submodule(t.module), t.param)
    return (weight if t.expert is None else weight[t.expert]).detach()


def select_targets(model: torch.nn.Module, config: InitConfig) -> tuple[list[Target], dict[str, str]]:
    """The targets of CONFIG on MODEL and {name: why left out} for the default set's exclusions: routers and gates,
    unflagged fused parameters, and modules smaller than r (named modules smaller than r stop with an error)."""
    skipped: dict[str, str] = {}
    targets = find_targets(model, config.target_modules, config.layers, skipped)
    if parse_target_modules(config.target_modules) == "all-linear":
        found = targets
        targets, small = drop_small(targets, config.r)
        skipped.update(small)
        if not targets:
            raise LoraforgeError(
                f"No module of {type(model).__name__} can hold rank -r {config.r} ({len(small)} are smaller): "
                f"{rank_limits(found)}. Lower -r."
            )
    return targets, skipped


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
        stacks, residuals = _run_inits(plan, config, devices, tmp, progress)
        decompose_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        files, base_dtype = _write_outputs(plan, config, out, tmp, stacks.factors, residuals, trust_remote_code)
        files.update(writers.hash_remaining(tmp, files))  # config, tokenizer...: verify covers every file
        timings = {
            "decompose_s": round(decompose_s, 3),
            "write_s": round(time.perf_counter() - t1, 3),
            "total_s": round(time.perf_counter() - started, 3),
        }
        manifest = build_manifest(
            config,
            source,
            plan.form.target_modules,
            plan.fan_in_fan_out,
            base_dtype,
            "in-memory" if plan.loaded is not None else "streaming",
            devices,
            timings,
            files,
            stacks.stats,
            peft=plan.form.manifest(),
            skipped=plan.skipped,
        )
        writers.write_json(tmp / writers.MANIFEST, manifest)
        (tmp / "README.md").write_text(render_model_card(manifest))
    return InitResult(out=out, manifest=manifest, seconds=time.perf_counter() - started)


@dataclass
class _Plan:
    """What an init works on: the source, its targets, how PEFT is told about them, and how their weights are read."""

    source: object
    targets: list
    skipped: dict  # name -> why the default set leaves it out
    form: PeftForm  # adapter_config's target_modules / target_parameters, checked with PEFT
    fan_in_fan_out: bool
    loaded: Optional[torch.nn.Module]  # the model in memory (device_map or legacy checkpoints), else None
    keys: Optional[dict[str, str]]  # streaming: linear target name -> checkpoint key
    experts: Optional[dict[str, ExpertKeys]] = None  # streaming: fused expert target name -> where its experts are
    skeleton: Optional[torch.nn.Module] = None  # what the targets were found on

    def read(self, t: Target) -> torch.Tensor:
        if self.loaded is not None:
            return _tensor(self.loaded, t)
        if t.experts:
            return self.experts[t.name].read(self.source, t.expert)
        key = self.keys[t.name]
        return self.source.open_shard(self.source.weight_map[key]).read(key)

    def stacked(self) -> dict[str, list[str]]:
        """Fused-on-disk stacks: checkpoint key -> the residual entries of its experts (see writers)."""
        return {
            k.fused: [_piece(k.fused, e) for e in range(self.targets_by_name[n].experts)]
            for n, k in (self.experts or {}).items()
            if k.fused
        }

    @property
    def targets_by_name(self) -> dict[str, Target]:
        return {t.name: t for t in self.targets}


def _piece(key: str, e: int) -> str:
    return f"{key}.__expert{e}"


def _plan(source, config: InitConfig, device_map: Optional[str], trust_remote_code: bool) -> _Plan:
    """Targets on the meta skeleton and the PEFT form that loads them as planned (checked with PEFT before any
    heavy work); then how their weights are read: streamed from the safetensors checkpoint, or from the model
    loaded in memory (device_map, legacy .bin checkpoints, layouts the streaming reader does not know)."""
    skeleton, targets, skipped, form = _header_plan(source, config) if device_map is None else (None,) * 4
    if skeleton is None:
        skeleton = build_skeleton(source.path, trust_remote_code)
        targets, skipped = select_targets(skeleton, config)
        form = plan_peft_form(skeleton, targets, config, any(t.transposed and not t.experts for t in targets))
    fan_in_fan_out = any(t.transposed and not t.experts for t in targets)
    loaded, keys, experts = None, None, {}
    streaming = device_map is None and source.weight_format == "safetensors"
    if streaming:
        keys = checkpoint_keys([t for t in targets if not t.experts], source, skeleton)
        model_type = source.config.get("model_type")
        experts = {t.name: expert_keys(t, source, model_type) for t in targets if t.experts}
    if not streaming or keys is None or any(k is None for k in experts.values()):
        # names in the checkpoint differ from the model's (legacy layout), or not streamable: load it
        loaded = _load_model(source, config, device_map, trust_remote_code)
        keys = experts = None
    return _Plan(source, targets, skipped, form, fan_in_fan_out, loaded, keys, experts, skeleton)


def _header_plan(source, config: InitConfig):
    """(skeleton, targets, skipped, form) read from the checkpoint header for the dense decoder layouts of
    HEADER_LAYOUTS (no transformers or PEFT import: `loraforge init` starts fast), or Nones. PEFT's config
    rewriting applies only to model types transformers converts on load, none of which is in HEADER_LAYOUTS;
    tests/test_moe.py checks the first fact, tests/test_model_zoo.py that PEFT loads these adapters as written."""
    header = header_skeleton(source)
    if header is None:
        return None, None, None, None
    try:
        targets, skipped = select_targets(header, config)
    except LoraforgeError:  # names not in the header layout: the transformers skeleton has the final word
        return None, None, None, None
    return header, targets, skipped, PeftForm(peft_target_modules(header, targets), [])


def _validate_plan(plan: _Plan, config: InitConfig) -> None:
    """Before any work: each streamed target weight is a float tensor of the shape the config implies,
    and a model read off its header has every block the config declares. (Headers and the index were
    checked when the source was resolved; --layers and -r against the targets where they are found.)"""
    if plan.keys is None:  # loaded through transformers, which checks shapes against the config itself
        return
    from_header = isinstance(plan.skeleton, HeaderSkeleton)
    check_target_tensors(plan.source, [t for t in plan.targets if not t.experts], plan.keys, from_header)
    if from_header:
        check_blocks(plan.source, find_targets(plan.skeleton, config.target_modules, None))
    for name, where in (plan.experts or {}).items():  # shapes were matched when the expert keys were found
        for key in {k for e in range(plan.targets_by_name[name].experts) for k in where.keys(e)}:
            shard = plan.source.weight_map[key]
            dtype = plan.source.open_shard(shard).tensors[key].dtype
            if dtype not in FLOAT_DTYPES:
                raise LoraforgeError(
                    f"{plan.source.path / shard}: tensor {key} has dtype {dtype}; a weight loraforge decomposes must "
                    f"be one of {', '.join(FLOAT_DTYPES)}. Use an unquantised checkpoint (or re-save it in "
                    "bf16/fp16/fp32)."
                )


def _run_inits(plan: _Plan, config: InitConfig, devices, tmp: Path, progress: bool):
    """Compute every init; residuals go into the loaded model, or are kept for the base writer:
    in memory up to config.residual_mib, parked in tmp/.residuals beyond that."""
    stacks = FactorSet(plan.targets, config, spill=tmp / ".factors")
    residual_files: dict[str, Path | torch.Tensor] = {}  # checkpoint key -> residual, or the file holding it
    held = 0  # bytes of residuals kept in memory
    for batch_no, batch in enumerate(compute_inits(plan.targets, plan.read, config, devices, progress)):
        check_inits(batch, config)  # before anything of the batch is kept: a bad init stops the run
        residuals = {}
        for m in batch:
            stacks.add(m)
            if m.base is None:
                continue
            if plan.loaded is not None:
                weight = _tensor(plan.loaded, m.target)
                with torch.no_grad():
                    weight.copy_(m.base.to(weight.device, weight.dtype))
            elif m.target.experts:
                where = plan.experts[m.target.name]
                if where.fused:
                    residuals[_piece(where.fused, m.target.expert)] = m.base
                else:
                    residuals.update(where.split(m.target.expert, m.base))
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
    return stacks, residual_files


def _write_outputs(
    plan: _Plan, config: InitConfig, out: Path, tmp: Path, factors, residuals, trust_remote_code: bool
) -> tuple[dict, Optional[str]]:
    """The adapter weights and config, and the residual base; returns the files' hashes and the base dtype."""
    method = config.method_spec
    source = plan.source
    view = plan.form.view  # empty for header layouts: plain LoRA layers, saved under writers.adapter_key
    keys = {t.name: (view[(t.module, t.param)].key_A, view[(t.module, t.param)].key_B) for t in plan.targets if view}
    adapter_sha = writers.write_adapter_weights(tmp / writers.ADAPTER_WEIGHTS, factors, keys)
    shutil.rmtree(tmp / ".factors", ignore_errors=True)
    # For residualised methods the adapter belongs on OUT/base, not on the source model, so that
    # is what PEFT's AutoPeftModel must load (`loraforge push` rewrites it to the base's Hub repo).
    base_model = str(out.resolve() / writers.BASE_DIR) if method.residual else source.model_id
    writers.write_adapter_config(
        tmp,
        adapter_config(config, plan.form.target_modules, base_model, plan.fan_in_fan_out, plan.form.target_parameters),
    )
    files = {writers.ADAPTER_WEIGHTS: adapter_sha}
    if not method.residual:
        return files, None
    cast_to = None if config.base_dtype == "auto" else DTYPES[config.base_dtype]
    base_dtype = config.base_dtype if cast_to is not None else source_dtype(source.config)
    if plan.loaded is not None:
        _save_loaded_base(plan.loaded, source, tmp / writers.BASE_DIR, cast_to, trust_remote_code)
        files.update(writers.hash_tree(tmp, writers.BASE_DIR))
    else:
        files.update(
            writers.write_residual_base(
                source, tmp / writers.BASE_DIR, residuals, cast_to, trust_remote_code, stacked=plan.stacked()
            )
        )
    shutil.rmtree(tmp / ".residuals", ignore_errors=True)
    return files, base_dtype


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
