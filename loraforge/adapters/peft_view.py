"""What PEFT builds from an adapter_config: the one place that answers "which weights does this adapter adapt?".

PEFT does not always adapt what adapter_config.json names. Since transformers 5, every `inject_adapter` (so
`get_peft_model`, `PeftModel.from_pretrained`, transformers' `load_adapter`) first rewrites the LoRA config of MoE
model types that transformers converts on load (peft/utils/transformers_weight_conversion.py,
`_convert_peft_config_moe`): on DeepSeek-V3, GLM4-MoE, Qwen3-MoE, Qwen3-Next, OLMoE, Mixtral... a target
`gate_proj`, `up_proj` or `down_proj` is moved to the fused experts and the dense MLPs and shared experts named so
lose their LoRA, silently. Rather than keep a copy of PEFT's tables, we ask PEFT itself: the adapter_config is
applied to a copy of the model skeleton on the meta device (no weights, no memory) exactly as
`PeftModel.from_pretrained` applies it, and the LoRA layers it creates are read back.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Adapted:
    """One weight PEFT adapts: where it is, and the LoRA tensors PEFT expects in adapter_model.safetensors."""

    module: str  # module path in the base model, e.g. "model.layers.1.mlp.experts" (PEFT's wrappers removed)
    param: str  # "weight" for nn.Linear / Conv1D / 2-D parameters; the fused experts' parameter, e.g. "gate_up_proj"
    wrapper: str  # PEFT's layer class: "Linear", "Conv1D"... or "ParamWrapper" (target_parameters)
    experts: int  # E of a fused expert parameter (lora_A (r*E, in), lora_B (out, r*E)); 1 otherwise
    r: int
    scaling: float
    key_A: str  # the tensor names PEFT saves and loads, e.g. base_model.model.<module>.lora_A.weight
    key_B: str
    shape_A: tuple[int, int]
    shape_B: tuple[int, int]

    @property
    def path(self) -> str:
        """The LoRA layer's path in the PeftModel's base model (nested ParamWrappers: ....experts.base_layer)."""
        return self.key_A.removeprefix("base_model.model.").removesuffix(".lora_A.weight")


def peft_lora_config(adapter_config: dict):
    """The LoraConfig PEFT reads from ADAPTER_CONFIG (a dict as in adapter_config.json), the way
    PeftConfig.from_pretrained reads the file."""
    from peft import LoraConfig

    return LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**dict(adapter_config)))


def adapted_by_peft(skeleton: torch.nn.Module, adapter_config: dict) -> dict[tuple[str, str], Adapted]:
    """{(module, param): Adapted} for every weight PEFT adapts when it loads an adapter with ADAPTER_CONFIG onto a
    model shaped like SKELETON (a transformers model, best on the meta device; it is copied, not changed).

    Raises ValueError (PEFT's own) when PEFT refuses the config on this model."""
    from peft import PeftModel

    config = peft_lora_config(adapter_config)
    config.inference_mode = True  # as PeftModel.from_pretrained(is_trainable=False)
    model = copy.deepcopy(skeleton)
    with warnings.catch_warnings():  # PEFT warns about targets it drops; what it built is the answer here
        warnings.simplefilter("ignore")
        peft_model = PeftModel(model, config, adapter_name="default", low_cpu_mem_usage=True)
    return adapted_in(peft_model)


def adapted_in(peft_model, adapter_name: str = "default") -> dict[tuple[str, str], Adapted]:
    """{(module, param): Adapted} for the LoRA layers of adapter ADAPTER_NAME in a live PeftModel."""
    from peft.tuners.lora import LoraLayer

    adapted = {}
    for path, layer in peft_model.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
        module = ".".join(p for p in path.split(".") if p != "base_layer")  # nested ParamWrappers: x.base_layer
        param = getattr(layer, "parameter_name", None) or "weight"
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        adapted[(module, param)] = Adapted(
            module=module,
            param=param,
            wrapper=type(layer).__name__,
            experts=int(getattr(layer, "num_experts", 1) or 1),
            r=int(layer.r[adapter_name]),
            scaling=float(layer.scaling[adapter_name]),
            key_A=f"base_model.model.{path}.lora_A.weight",
            key_B=f"base_model.model.{path}.lora_B.weight",
            shape_A=tuple(a.shape),
            shape_B=tuple(b.shape),
        )
    return adapted
