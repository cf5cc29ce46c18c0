"""Reading the weight matrices of named modules from a model (a local directory or a Hub id).

verify, convert and inspect need W0 of each adapted module, as the (out_features, in_features)
matrix nn.Linear stores (GPT-2's Conv1D is transposed back). Weights are read one tensor at a time
from the safetensors shards; a legacy .bin checkpoint is loaded through transformers (which uses
torch.load with weights_only=True).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.models.source import Source, resolve_source
from loraforge.models.targets import Target, _is_linear, build_skeleton, checkpoint_keys


@dataclass
class ModelWeights:
    """Weights of the modules MODULE_NAMES of one model, read on demand."""

    source: Source
    targets: dict[str, Target]
    keys: Optional[dict[str, str]]  # module -> checkpoint key (None when the model was loaded whole)
    loaded: Optional[torch.nn.Module] = None

    @property
    def model_id(self) -> str:
        return self.source.model_id

    def stored(self, name: str) -> torch.Tensor:
        """The weight as the checkpoint stores it (dtype and layout untouched)."""
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
    model: str,
    module_names: Sequence[str],
    role: str = "--base",
    revision: Optional[str] = None,
    token: Optional[str] = None,
) -> ModelWeights:
    """Find MODULE_NAMES in MODEL; ROLE names the model in error messages."""

    source = resolve_source(model, revision, token)
    skeleton = build_skeleton(source.path)
    modules = dict(skeleton.named_modules())
    targets = {}
    for name in module_names:
        module = modules.get(name)
        is_linear, transposed = _is_linear(module) if module is not None else (False, False)
        if not is_linear:
            raise LoraforgeError(
                f"{role} {model} has no linear module {name} (it is a {type(skeleton).__name__}); the adapter was made "
                "for another architecture. Pass the model the adapter was initialised from."
            )
        rows, cols = module.weight.shape
        out_f, in_f = (cols, rows) if transposed else (rows, cols)
        targets[name] = Target(name, out_f, in_f, transposed, None)
    loaded = None
    keys = checkpoint_keys(list(targets.values()), source, skeleton) if source.weight_format == "safetensors" else None
    if keys is None:
        from transformers import AutoModelForCausalLM

        try:
            loaded = AutoModelForCausalLM.from_pretrained(source.path, dtype="auto")
        except (OSError, ValueError) as e:
            raise LoraforgeError(f"transformers could not load {role} {model}: {e}") from None
    return ModelWeights(source, targets, keys, loaded)
