"""`init_model` and `save_init`: the init of a model already in memory, and writing it as `loraforge init` would.

`init_model(model, config)` computes the same inits as the streaming path (`compute_inits`) from the
model's own weights, replaces residualised targets' weights in place, and returns a PeftModel ready
for TRL's GRPOTrainer. `save_init(peft_model, OUT)` writes that result as a full adapter directory
(adapter, residual base, manifest, card), atomically; until then a residualised model's own
`save_pretrained` warns, because what it writes has no loadable base.
"""

from __future__ import annotations

import hashlib
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from loraforge.adapters import writers
from loraforge.adapters.build import InitResult, _tensor, select_targets
from loraforge.adapters.card import render_model_card
from loraforge.adapters.factors import FactorSet
from loraforge.adapters.manifest import build_manifest
from loraforge.adapters.peft_config import PeftForm, adapter_config, differences, lora_config, plan_peft_form
from loraforge.core.devices import decomposition_devices
from loraforge.core.errors import LoraforgeError
from loraforge.inits.compute import compute_inits
from loraforge.inits.config import DTYPES, InitConfig
from loraforge.inits.sanity import check_inits
from loraforge.models.targets import meta_skeleton, peft_target_modules, peft_target_parameters

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
    form: PeftForm  # adapter_config's target_modules / target_parameters, checked with PEFT
    fan_in_fan_out: bool
    devices: list
    stats: dict  # module name -> init statistics, as in the manifest
    paths: dict  # module name -> the path of its LoRA layer in the PeftModel
    fingerprints: dict  # module name -> sha256 of A0 and B0 as initialised
    seconds: float
    saved_base: Optional[str] = None  # OUT/base once save_init wrote it

    @property
    def residual(self) -> bool:
        return self.config.method_spec.residual

    @property
    def target_modules(self):
        return self.form.target_modules


def init_model(model: torch.nn.Module, config: InitConfig, adapter_name: str = "default", progress: bool = False):
    """Initialise a model already in memory and return it wrapped as a PeftModel.

    Works on a plain model and on one dispatched across devices by accelerate (device_map), as long
    as the target weights are materialised (not offloaded to disk). For residualised methods the
    target weights are replaced IN PLACE by the residual (in the model's own dtype). The result is
    ready for TRL's GRPOTrainer (pass it as `model`, with no `peft_config`). The PEFT config form is
    checked on a meta copy of the model before any weight is touched (see `plan_peft_form`).

    `save_init(peft_model, OUT)` writes it as `loraforge init` would (adapter, residual base, manifest).
    For residualised methods the model's own `save_pretrained` writes an adapter without its base:
    it warns, and marks the adapter_config.json it writes (see `_warn_on_plain_save`).
    """
    from peft import get_peft_model

    from loraforge.adapters.peft_view import adapted_in

    started = time.perf_counter()
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise LoraforgeError(
            "init_model needs the model's weights in floating point, but this model was loaded quantized by "
            "bitsandbytes; load it without quantization_config, or write the adapter with init_adapter / `loraforge "
            "init --quantize nf4` and load it on the quantized base (README, 'On a 4-bit base')"
        )
    targets, _ = select_targets(model, config)
    fan_in_fan_out = any(t.transposed and not t.experts for t in targets)
    form = _peft_form(model, targets, config, fan_in_fan_out)
    devices = decomposition_devices(config.device)
    stacks = _init_in_place(model, targets, config, devices, progress)
    original = getattr(model, "name_or_path", "") or ""
    model_config = getattr(model, "config", None)
    cfg = lora_config(config, form.target_modules, original, fan_in_fan_out, form.target_parameters)
    peft_model = get_peft_model(model, cfg, adapter_name=adapter_name)
    built = adapted_in(peft_model, adapter_name)
    diff = differences(built, targets, config)
    if diff:  # the meta check makes this unreachable for transformers models whose modules match their config
        raise LoraforgeError(
            f"PEFT built a different adapter on this model than planned ({diff}); the model is not usable as is "
            "(residualised methods have already changed its target weights). Reload it, and pass "
            "--target-modules naming only modules PEFT adapts as planned."
        )
    paths = {name: built[(stacks.targets[name].module, stacks.targets[name].param)].path for name in stacks.factors}
    with torch.no_grad():
        for name, (A, B) in stacks.factors.items():
            layer = peft_model.base_model.model.get_submodule(paths[name])
            layer.lora_A[adapter_name].weight.copy_(A)
            layer.lora_B[adapter_name].weight.copy_(B)
    record = InMemoryInit(
        config,
        adapter_name,
        original,
        getattr(model_config, "_commit_hash", None),  # set when transformers loaded it from the Hub
        model_config.to_dict() if model_config is not None else {},
        form,
        fan_in_fan_out,
        devices,
        stacks.stats,
        paths,
        _fingerprints(peft_model, adapter_name, paths),
        time.perf_counter() - started,
    )
    peft_model.loraforge_init = record
    if record.residual:
        peft_model.peft_config[adapter_name].base_model_name_or_path = RESIDUAL_PLACEHOLDER
        # On the instance, as a bound method: copy.deepcopy re-binds it to the copy.
        peft_model.save_pretrained = types.MethodType(_warn_on_plain_save, peft_model)
    return peft_model


def _peft_form(model: torch.nn.Module, targets, config: InitConfig, fan_in_fan_out: bool) -> PeftForm:
    """How adapter_config names TARGETS so that PEFT adapts exactly them (checked on a meta copy)."""
    skeleton = meta_skeleton(model)
    if skeleton is not None:
        return plan_peft_form(skeleton, targets, config, fan_in_fan_out)
    # not a transformers model: PEFT rewrites nothing (it needs config.model_type); checked after wrapping
    linear, experts = [t for t in targets if not t.experts], [t for t in targets if t.experts]
    return PeftForm(peft_target_modules(model, linear), peft_target_parameters(model, experts))


def _init_in_place(model: torch.nn.Module, targets, config: InitConfig, devices, progress: bool) -> FactorSet:
    """Compute every target's init from the model's weights; residualised methods replace the weights."""
    for t in targets:
        if _tensor(model, t).device.type == "meta":
            raise LoraforgeError(
                f"Module {t.name}'s weight is offloaded (on the meta device); init_model needs materialised weights. "
                "Use `loraforge init MODEL_DIR` (the streaming path) for models that do not fit in memory."
            )
    stacks = FactorSet(targets, config)
    inits = [
        m for batch in compute_inits(targets, lambda u: _tensor(model, u), config, devices, progress) for m in batch
    ]
    check_inits(inits, config)  # before the model is touched
    with torch.no_grad():
        for m in inits:
            stacks.add(m)
            if m.base is not None:
                weight = _tensor(model, m.target)
                weight.copy_(m.base.to(weight.device, weight.dtype))
    return stacks


def _factors(peft_model, adapter_name: str, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) of the LoRA layer at PATH in PEFT_MODEL, as PEFT holds them."""
    layer = peft_model.base_model.model.get_submodule(path)
    return layer.lora_A[adapter_name].weight.detach(), layer.lora_B[adapter_name].weight.detach()


def _fingerprints(peft_model, adapter_name: str, paths: dict[str, str]) -> dict[str, str]:
    """sha256 of each module's A and B bytes: lets save_init tell the initialisation from a trained adapter."""
    out = {}
    for name, path in paths.items():
        digest = hashlib.sha256()
        for t in _factors(peft_model, adapter_name, path):
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
    if record.form.target_parameters:
        raise LoraforgeError(
            "save_init writes adapters whose targets are PEFT target_modules; this one also has target_parameters "
            f"({', '.join(record.form.target_parameters[:3])}...: MoE experts, or MLPs PEFT would remap on this model "
            "type). Write it from the checkpoint instead: `loraforge init MODEL_DIR -o OUT` (same init, streamed)."
        )
    now = _fingerprints(peft_model, record.adapter_name, record.paths)
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
        A, B = _factors(peft_model, record.adapter_name, record.paths[name])
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
