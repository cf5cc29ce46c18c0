"""Reading the weight matrices of named modules from a model (a local directory or a Hub id).

verify, convert and inspect need W0 of each adapted module, as the (out_features, in_features)
matrix nn.Linear stores (GPT-2's Conv1D is transposed back), or of one expert of a fused expert
stack ("<experts module>.<param>.<e>", from a fused or per-expert checkpoint: models/experts.py).
Weights are read one tensor at a time from the safetensors shards; a legacy .bin checkpoint is
loaded through transformers (which uses torch.load with weights_only=True).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.models.experts import expert_keys
from loraforge.models.source import Source, resolve_source
from loraforge.models.targets import Target, _is_linear, build_skeleton, checkpoint_keys, router_targets


@dataclass
class ModelWeights:
    """Weights of the modules MODULE_NAMES of one model, read on demand."""

    source: Source
    targets: dict[str, Target]
    keys: Optional[dict[str, str]]  # module -> checkpoint key (None when the model was loaded whole)
    loaded: Optional[torch.nn.Module] = None
    # expert units ("<experts module>.<param>.<e>") -> (the stack's Target with `expert` set, where it is stored)
    experts: dict = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return self.source.model_id

    def stored(self, name: str) -> torch.Tensor:
        """The weight as the checkpoint stores it (dtype and layout untouched)."""
        if name in self.experts:
            unit, where = self.experts[name]
            if self.loaded is not None:
                return getattr(self.loaded.get_submodule(unit.module), unit.param)[unit.expert].detach()
            return where.read(self.source, unit.expert)
        if self.loaded is not None:
            return self.loaded.get_submodule(name).weight.detach()
        key = self.keys[name]
        return self.source.open_shard(self.source.weight_map[key]).read(key)

    def matrix(self, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """W of module NAME as (out_features, in_features) in DTYPE."""
        w = self.stored(name).to(dtype)
        return w.T.contiguous() if self.targets[name].transposed else w

    def dtype(self, name: str) -> torch.dtype:
        return self.stored(name).dtype


def open_model_weights(
    model: str | Source,
    module_names: Sequence[str],
    role: str = "--base",
    revision: Optional[str] = None,
    token: Optional[str] = None,
) -> ModelWeights:
    """Find MODULE_NAMES in MODEL (an id or directory, or a Source a command resolved once at its start);
    ROLE names the model in error messages."""
    source = model if isinstance(model, Source) else resolve_source(model, revision, token)
    model = source.model_id
    skeleton = build_skeleton(source.path)
    modules = dict(skeleton.named_modules())
    targets, experts, routers = {}, {}, None
    for name in module_names:
        module = modules.get(name)
        is_linear, transposed = _is_linear(module) if module is not None else (False, False)
        unit = None if is_linear else _expert_unit(modules, name)
        if unit is not None:
            targets[name] = Target(name, unit.out_features, unit.in_features, unit.transposed, None)
            experts[name] = (unit, expert_keys(unit, source, source.config.get("model_type")))
            continue
        if not is_linear and module is not None and not isinstance(module, torch.nn.Embedding):
            routers = router_targets(skeleton) if routers is None else routers
            is_linear = name in routers  # a router holding a 2-D weight (logits = x W^T), adapted when named
        if not is_linear:
            raise LoraforgeError(
                f"{role} {model} has no linear module {name} (it is a {type(skeleton).__name__}); the adapter was made "
                "for another architecture. Pass the model the adapter was initialised from."
            )
        rows, cols = module.weight.shape
        out_f, in_f = (cols, rows) if transposed else (rows, cols)
        targets[name] = Target(name, out_f, in_f, transposed, None)
    loaded = None
    linear = [t for n, t in targets.items() if n not in experts]
    keys = checkpoint_keys(linear, source, skeleton) if source.weight_format == "safetensors" else None
    if keys is None or any(where is None for _, where in experts.values()):
        from transformers import AutoModelForCausalLM

        try:
            loaded = AutoModelForCausalLM.from_pretrained(source.path, dtype="auto")
        except (OSError, ValueError) as e:
            raise LoraforgeError(f"transformers could not load {role} {model}: {e}") from None
    return ModelWeights(source, targets, keys, loaded, experts)


def _expert_unit(modules: dict, name: str) -> Optional[Target]:
    """The expert unit NAME ("<experts module>.<param>.<e>") as a Target with `expert` set, or None."""
    stack, _, e = name.rpartition(".")
    module_name, _, param = stack.rpartition(".")
    module = modules.get(module_name)
    if module is None or not e.isdigit() or not hasattr(module, "is_transposed"):
        return None
    p = getattr(module, param, None)
    if not isinstance(p, torch.Tensor) or p.dim() != 3 or int(e) >= p.shape[0]:
        return None
    E, d1, d2 = p.shape
    out_f, in_f = (d2, d1) if module.is_transposed else (d1, d2)
    return Target(stack, out_f, in_f, bool(module.is_transposed), None, experts=E, expert=int(e))
