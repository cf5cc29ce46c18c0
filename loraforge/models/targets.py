"""Which modules get adapters.

Targets are found on a model skeleton (built on the meta device, no weights in memory) or on a
loaded model. For the common decoder architectures in HEADER_LAYOUTS the skeleton is read from the
checkpoint's header instead, which spares `loraforge init` importing transformers (seconds of
start-up: benchmarks/RESULTS.md). The default set ("all-linear") is every nn.Linear and GPT-2 Conv1D
except the output head and MoE routers/gates, plus every fused expert parameter (transformers 5's 3-D
expert stacks, adapted expert by expert). A name in --target-modules matches a module or expert
parameter whose path equals it or ends with `.name` (PEFT's rule). Departures from PEFT's own
all-linear are explained in docs/design.md.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from loraforge.core.errors import LoraforgeError


@dataclass(frozen=True)
class Target:
    """One module that gets an adapter. Its weight W is (out_features, in_features) after
    un-transposing GPT-2's Conv1D, which stores (in_features, out_features)."""

    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    out_features: int
    in_features: int
    transposed: bool  # True for Conv1D and (E, in, out) experts (is_transposed): the stored matrix is W^T
    layer: Optional[int]  # the first integer in the path (the transformer block), if any
    experts: int = 0  # E for a fused expert parameter (NAME is then module.param, e.g. ...mlp.experts.down_proj)
    expert: Optional[int] = None  # set on the per-expert units an expert stack is computed as (see `units`)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def module(self) -> str:
        """The module holding the weight (for experts: the experts module)."""
        return self.name.rsplit(".", 1)[0] if self.experts else self.name

    @property
    def param(self) -> str:
        """The adapted parameter of `module`: "weight", or the fused experts' parameter name."""
        return self.name.rsplit(".", 1)[1] if self.experts else "weight"

    @property
    def weight_key(self) -> str:
        return self.name if self.experts else f"{self.name}.weight"

    @property
    def unit(self) -> str:
        """What a per-module seed and a message name: the target, or one expert of a stack ("...gate_up_proj.3")."""
        return self.name if self.expert is None else f"{self.name}.{self.expert}"

    def units(self) -> list["Target"]:
        """The matrices an init computes: the target itself, or each expert of a fused stack."""
        if not self.experts:
            return [self]
        return [dataclasses.replace(self, expert=e) for e in range(self.experts)]


def layer_index(name: str) -> Optional[int]:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


MAX_LAYER = 100_000  # far beyond any model's block count; bounds what one --layers flag can allocate


def parse_layers(spec: Optional[str]) -> Optional[list[int]]:
    """'0-3,7' -> [0, 1, 2, 3, 7]; None or '' -> None (all layers)."""
    if not spec:
        return None
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise LoraforgeError(f"--layers: cannot read {part!r}; expected numbers and ranges like 0-3,7.")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi > MAX_LAYER:  # checked before the range is expanded: 0-10**12 would fill memory
            raise LoraforgeError(
                f"--layers: {part!r} reaches block {hi}; no model has that many. Pass block numbers of this model."
            )
        if hi < lo:
            raise LoraforgeError(f"--layers: range {part!r} runs backwards; write it as {hi}-{lo}.")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def parse_target_modules(spec: str | Sequence[str]) -> str | list[str]:
    """'all-linear' stays a string; 'q_proj,v_proj' -> ['q_proj', 'v_proj']."""
    if isinstance(spec, str):
        if spec.strip() == "all-linear":
            return "all-linear"
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = list(spec)
    if not names:
        raise LoraforgeError("--target-modules is empty; pass all-linear or module names like q_proj,v_proj.")
    return names


def _is_linear(module: torch.nn.Module) -> tuple[bool, bool]:
    """(is a linear layer, stores its weight transposed)."""
    if isinstance(module, torch.nn.Linear):
        return True, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return True, True
    return False, False


def _expert_stacks(name: str, module: torch.nn.Module, notes: dict[str, str]) -> list[Target]:
    """The fused expert parameters of MODULE (3-D, one (d1, d2) matrix per expert), as PEFT's ParamWrapper sees them.

    transformers' `use_experts_implementation` marks expert classes with `is_transposed`: False means (E, out, in),
    True (gpt-oss) means (E, in, out). A 3-D parameter without the flag (Llama4's experts are (E, in, out) unflagged)
    would be read by PEFT as (E, out, in), its lora_A on the output side: left out, with a note in NOTES."""
    if isinstance(module, torch.nn.modules.conv._ConvNd):  # e.g. Qwen3-Next's short convolution
        return []
    stacks = []
    for pname, p in module.named_parameters(recurse=False):
        if p.dim() != 3:
            continue
        full = f"{name}.{pname}"
        if not hasattr(module, "is_transposed"):
            notes[full] = (
                f"fused 3-D parameter of {type(module).__name__} without transformers' is_transposed flag: PEFT would "
                "take its in and out sides the wrong way round; not adapted"
            )
            continue
        transposed = bool(module.is_transposed)
        E, d1, d2 = p.shape
        out_f, in_f = (d2, d1) if transposed else (d1, d2)
        stacks.append(Target(full, out_f, in_f, transposed, layer_index(full), experts=E))
    return stacks


def _expert_count(experts: torch.nn.Module) -> Optional[int]:
    for p in experts.parameters(recurse=False):
        if p.dim() == 3:
            return p.shape[0]
    return len(experts) if isinstance(experts, torch.nn.ModuleList) else None


def _router_weight(modules: dict[str, torch.nn.Module], name: str, module: torch.nn.Module) -> list[Target]:
    """A router of an MoE block that is not a linear layer (transformers 5's TopKRouter modules: a 2-D `weight`,
    logits = x W^T), as a Target for --target-modules to name (PEFT adapts it through target_parameters)."""
    parent = name.rpartition(".")[0]
    weight = module._parameters.get("weight")
    if weight is None or weight.dim() != 2 or f"{parent}.experts" not in modules or name.endswith(".experts"):
        return []
    if isinstance(module, torch.nn.Embedding) or "norm" in type(module).__name__.lower():
        return []
    return [Target(name, weight.shape[0], weight.shape[1], False, layer_index(name))]


def router_targets(model: torch.nn.Module) -> dict[str, Target]:
    """{name: Target} of MODEL's routers that are not linear layers (see `_router_weight`)."""
    modules = dict(model.named_modules())
    return {t.name: t for name, m in modules.items() for t in _router_weight(modules, name, m)}


def _router_reason(modules: dict[str, torch.nn.Module], t: Target) -> Optional[str]:
    """Why linear target T is a router or gate of an MoE block (None if it is not): a linear layer inside a block
    that holds `experts` whose output is one score per expert or a single gate value (Qwen's shared_expert_gate), or
    named gate/router/shared_expert_gate there."""
    parent, _, leaf = t.name.rpartition(".")
    grandparent = parent.rpartition(".")[0]
    # The block holding `experts`: the router's parent, or its grandparent (GraniteMoE: block.router.layer).
    experts = next((modules[k] for k in (f"{parent}.experts", f"{grandparent}.experts") if k in modules), None)
    if experts is None:
        return None
    count = _expert_count(experts)
    if t.out_features in (1, count) or leaf in ("gate", "router", "shared_expert_gate"):
        return (
            f"router/gate of an MoE block ({t.out_features} x {t.in_features}): routing stays as pretrained; "
            "name it in --target-modules to adapt it"
        )
    return None


def is_linear_module(model: torch.nn.Module, name: str) -> bool:
    """NAME is an nn.Linear / Conv1D of MODEL (a LoRA layer for PEFT), not a parameter holder like a router."""
    try:
        return _is_linear(model.get_submodule(name))[0]
    except AttributeError:
        return False


def find_targets(
    model: torch.nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    layers: Optional[Sequence[int]] = None,
    skipped: Optional[dict[str, str]] = None,
) -> list[Target]:
    """Target weights of MODEL (a skeleton or a loaded model), in module order.

    The default set ("all-linear"): every nn.Linear / Conv1D except the output head and MoE routers and gates,
    plus every fused expert parameter (each expert adapted on its own). Names pick linear modules and expert
    parameters by PEFT's suffix rule (`q_proj`, `gate_up_proj`, `mlp.experts`). What the default set leaves out is
    recorded in SKIPPED ({name: reason}) when given."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = dict(model.named_modules())
    found: list[Target] = []
    routers: list[Target] = []  # routers that are not linear layers: targets only when named
    notes: dict[str, str] = {}
    for name, module in modules.items():
        is_linear, transposed = _is_linear(module)
        if is_linear and module is not head:
            rows, cols = module.weight.shape
            out_f, in_f = (cols, rows) if transposed else (rows, cols)
            found.append(Target(name, out_f, in_f, transposed, layer_index(name)))
        elif not is_linear:
            found.extend(_expert_stacks(name, module, notes))
            routers.extend(_router_weight(modules, name, module))
    leaf_names = list(dict.fromkeys(t.name.rsplit(".", 1)[-1] for t in found + routers))

    wanted = parse_target_modules(target_modules)
    if wanted == "all-linear":
        gates = {t.name: why for t in found if not t.experts and (why := _router_reason(modules, t))}
        notes.update(gates)
        chosen = [t for t in found if t.name not in gates]
    else:
        notes = {}
        chosen = [t for t in found + routers if any(_matches(t, w) for w in wanted)]
        if not chosen:
            raise LoraforgeError(
                f"No modules match {wanted} in {type(model).__name__}. Linear modules and expert parameters: "
                f"{', '.join(leaf_names)}. Pass --target-modules with some of these, or all-linear."
            )
    if layers is not None:
        present = sorted({t.layer for t in chosen if t.layer is not None})
        absent = sorted(set(layers) - set(present))
        if absent:  # every block asked for must exist: a typo must not silently shrink the adapter
            span = f"{present[0]}-{present[-1]}" if present else "none"
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise LoraforgeError(
                f"--layers names block {absent[0]}{more}, which has no target module; the model's layers are {span}. "
                "Pass --layers within that range."
            )
        chosen = [t for t in chosen if t.layer in set(layers)]
        notes = {n: why for n, why in notes.items() if layer_index(n) in set(layers)}
    if skipped is not None:
        skipped.update(notes)
    return chosen


def _matches(t: Target, wanted: str) -> bool:
    return any(n == wanted or n.endswith("." + wanted) for n in ({t.name, t.module}))


def peft_target_modules(model: torch.nn.Module, targets: list[Target]) -> str | list[str]:
    """The `target_modules` value for adapter_config.json that makes PEFT wrap exactly TARGETS (linear modules).

    Leaf names (["q_proj", ...], PEFT's usual form) when they select exactly our targets; otherwise
    (a --layers subset, or a name shared with an excluded module) a regex that PEFT full-matches.
    An empty TARGETS gives [] (every target is then a target_parameters entry).
    """
    if not targets:
        return []
    names = {t.name for t in targets}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    by_leaf = {n for n, m in model.named_modules() if _is_linear(m)[0] and n.rsplit(".", 1)[-1] in leaves}
    if by_leaf == names:
        return leaves
    return "(?:" + "|".join(re.escape(t.name) for t in targets) + ")"


def peft_target_parameters(model: torch.nn.Module, targets: list[Target]) -> list[str]:
    """The `target_parameters` value that makes PEFT wrap exactly TARGETS' weights with its ParamWrapper.

    "<module leaf>.<param>" forms (experts.gate_up_proj, gate_proj.weight) when they select exactly these
    parameters by PEFT's rule (a parameter path equal to the entry or ending in "." + entry); else full paths."""
    if not targets:
        return []
    wanted = {f"{t.module}.{t.param}" for t in targets}
    short = sorted({".".join(p.rsplit(".", 2)[-2:]) for p in wanted})
    every = {f"{m}.{p}" if m else p for m, mod in model.named_modules() for p, _ in mod.named_parameters(recurse=False)}
    selected = {k for k in every if any(k == f or k.endswith("." + f) for f in short)}
    return short if selected == wanted else sorted(wanted)


def build_skeleton(path, trust_remote_code: bool = False) -> torch.nn.Module:
    """A causal-LM skeleton from the config at PATH, on the meta device (no memory for weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise LoraforgeError(
                f"This model's code lives in its repository; loraforge runs it only if you pass --trust-remote-code "
                f"after reviewing it. ({e})"
            ) from None
        raise LoraforgeError(f"transformers cannot build a causal LM from {path}/config.json: {e}") from None


def meta_skeleton(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """An empty (meta-device) copy of a transformers model, built from its config; None for other models."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "_from_config"):
        return None
    from accelerate import init_empty_weights

    with init_empty_weights():
        return type(model)._from_config(config)


# Decoder architectures whose safetensors checkpoints name every weight by its module path and whose
# only 2-D weights are nn.Linear layers and the token embedding. For these a skeleton holding just
# those modules is read from the checkpoint header (`header_skeleton`), in the order the
# transformers class defines them (embedding, then per block the order below, then lm_head).
# tests/test_targets.py checks every entry against the transformers skeleton.
_DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEADER_LAYOUTS: dict[str, tuple[str, ...]] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "phi3": ("o_proj", "qkv_proj", "gate_up_proj", "down_proj"),  # Phi3Attention defines o_proj first
}
_HEADER_KEY = re.compile(r"model\.embed_tokens|lm_head|model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")


class _MetaLinear(torch.nn.Linear):
    def reset_parameters(self) -> None:  # nothing to initialise on the meta device (and torch's
        pass  # meta init path imports torch._dynamo, a second of start-up: benchmarks/RESULTS.md)


class _MetaEmbedding(torch.nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class HeaderSkeleton(torch.nn.Module):
    """Linear layers (and the embedding) on the meta device, named as in the checkpoint."""

    def get_output_embeddings(self):
        return self.get_submodule("lm_head") if hasattr(self, "lm_head") else None


def header_skeleton(source) -> Optional[torch.nn.Module]:
    """The skeleton of SOURCE (a loraforge.models.source.Source) read from its config and safetensors
    headers, or None when its architecture is not in HEADER_LAYOUTS or a 2-D weight is named
    unexpectedly (then `build_skeleton` is the way)."""
    model_type = source.config.get("model_type")
    order = HEADER_LAYOUTS.get(model_type)
    if order is None or source.weight_format != "safetensors" or not source.config.get("architectures"):
        return None
    modules = []
    for key, shard in source.weight_map.items():
        shape = source.open_shard(shard).tensors[key].shape
        if len(shape) != 2:
            continue
        name = key.removesuffix(".weight")
        match = _HEADER_KEY.fullmatch(name) if name != key else None
        if match is None or (match.group(2) is not None and match.group(2) not in order):
            return None
        if match.group(1) is not None:  # a block's module: by block, then in the class's order
            rank = (1, int(match.group(1)), order.index(match.group(2)))
        else:  # the embedding first, lm_head last
            rank = (2, 0, 0) if name == "lm_head" else (0, 0, 0)
        modules.append((rank, name, shape))
    arch = source.config["architectures"][0]
    root = type(arch, (HeaderSkeleton,), {})()  # named as the model class, for messages
    for _, name, (rows, cols) in sorted(modules):
        if name == "model.embed_tokens":
            module = _MetaEmbedding(rows, cols, device="meta")
        else:
            module = _MetaLinear(cols, rows, bias=False, device="meta")
        parent = root
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name.rsplit(".", 1)[-1], module)
    return root


def checkpoint_keys(targets: Sequence[Target], source, skeleton) -> Optional[dict[str, str]]:
    """Checkpoint key of each target's weight, allowing for a missing or extra base-model prefix
    (e.g. GPT-2 checkpoints saved without `transformer.`). None when some target is not found."""
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    keys = {}
    for t in targets:
        candidates = [t.weight_key]
        if prefix and t.weight_key.startswith(prefix + "."):
            candidates.append(t.weight_key[len(prefix) + 1 :])
        elif prefix:
            candidates.append(f"{prefix}.{t.weight_key}")
        found = next((c for c in candidates if c in source.weight_map), None)
        if found is None:
            return None
        keys[t.name] = found
    return keys
