"""Checks on a checkpoint and on the flags that select from it, made before any long work starts.

The safetensors headers themselves are checked when they are read (checkpoint.parse_header) and the
index against its shards when the source is resolved (source.check_index). What is left, and lives
here, needs the targets: each target weight is a float tensor loraforge can decompose, its stored
shape is what the model config implies, and every block of the config is in the checkpoint.
(--layers is checked against the model's blocks where targets are found, targets.find_targets.)
"""

from __future__ import annotations

from typing import Optional, Sequence

from loraforge.core.errors import LoraforgeError
from loraforge.models.checkpoint import FLOAT_DTYPES
from loraforge.models.source import INDEX_NAMES, Source
from loraforge.models.targets import HEADER_LAYOUTS, Target


def config_value(config: dict, *names: str) -> Optional[int]:
    """The first of NAMES set in the config (or its text_config), as an int."""
    for cfg in (config, config.get("text_config") or {}):
        for name in names:
            if isinstance(cfg.get(name), int):
                return cfg[name]
    return None


def expected_shape(config: dict, leaf: str) -> Optional[tuple[int, int]]:
    """(out, in) of a decoder block's linear LEAF (q_proj, ..., down_proj; Phi-3's fused qkv_proj and
    gate_up_proj) as the config implies, or None where the config does not say."""
    hidden = config_value(config, "hidden_size")
    heads = config_value(config, "num_attention_heads")
    inter = config_value(config, "intermediate_size")
    if hidden is None or heads is None or inter is None:
        return None
    kv = config_value(config, "num_key_value_heads") or heads
    head_dim = config_value(config, "head_dim") or hidden // heads
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv * head_dim, hidden),
        "v_proj": (kv * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "qkv_proj": ((heads + 2 * kv) * head_dim, hidden),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "gate_up_proj": (2 * inter, hidden),
        "down_proj": (hidden, inter),
    }.get(leaf)


def check_target_tensors(source: Source, targets: Sequence[Target], keys: dict[str, str], from_header: bool) -> None:
    """Each target weight, as the checkpoint header describes it, is a float tensor of the shape the
    model expects. FROM_HEADER: the targets were read off the checkpoint header (so their shapes are
    the header's); then the config is the reference."""
    config = source.config
    for t in targets:
        key = keys[t.name]
        shard = source.weight_map[key]
        info = source.open_shard(shard).tensors[key]
        where = f"{source.path / shard}: tensor {key}"
        if info.dtype not in FLOAT_DTYPES:
            raise LoraforgeError(
                f"{where} has dtype {info.dtype}; a weight loraforge decomposes must be one of "
                f"{', '.join(FLOAT_DTYPES)}. Use an unquantised checkpoint (or re-save it in bf16/fp16/fp32)."
            )
        stored = (t.in_features, t.out_features) if t.transposed else (t.out_features, t.in_features)
        want = expected_shape(config, t.name.rsplit(".", 1)[-1]) if from_header else stored
        if want is not None and (info.shape != want or len(info.shape) != 2):
            raise LoraforgeError(
                f"{where} has shape {list(info.shape)}, but config.json implies {list(want)}; the checkpoint and "
                "its config disagree. Re-download the model, or fix config.json."
            )


def checkpoint_file(source: Source):
    """The file to name for the checkpoint as a whole: its index, or its one shard."""
    return source.path / (INDEX_NAMES[0] if len(source.shards) > 1 else source.shards[0])


def check_blocks(source: Source, targets: Sequence[Target]) -> None:
    """A model read off its checkpoint header has, in every block 0..num_hidden_layers-1, the same
    linear modules, and no block past the last: a missing tensor would otherwise just drop its module
    from the adapter. TARGETS: every target before --layers selects."""
    n = config_value(source.config, "num_hidden_layers")
    if n is None or source.config.get("model_type") not in HEADER_LAYOUTS:
        return
    by_layer: dict[int, set[str]] = {}
    for t in targets:
        if t.layer is not None:
            by_layer.setdefault(t.layer, set()).add(t.name.rsplit(".", 1)[-1])
    if not by_layer:
        return
    beyond = [i for i in by_layer if i >= n]
    if beyond:
        raise LoraforgeError(
            f"{checkpoint_file(source)}: the checkpoint has block {max(beyond)}, but config.json says "
            f"num_hidden_layers = {n}; the checkpoint and its config disagree. Re-download the model, or fix "
            "config.json."
        )
    leaves = set().union(*by_layer.values())
    for i in range(n):
        lacking = sorted(leaves - by_layer.get(i, set()))
        if lacking:
            raise LoraforgeError(
                f"{checkpoint_file(source)}: block {i} has no {lacking[0]} weight "
                f"(model.layers.{i}...{lacking[0]}.weight) although config.json declares {n} blocks; the checkpoint "
                "is incomplete. Re-download the model."
            )
