"""Where the experts of a fused expert parameter live in a safetensors checkpoint, and reading one expert.

In memory (transformers 5) the experts of an MoE block are fused 3-D parameters, e.g. `mlp.experts.gate_up_proj`
(E, 2I, H). On disk a checkpoint may hold the same stack under the same name (gpt-oss; anything saved with
save_original_format=False), or one matrix per expert, as transformers 4 wrote them and as
`save_pretrained` still writes them by default (`mlp.experts.{e}.gate_proj.weight` and `up_proj`, stacked into
gate_up_proj [gate; up]; Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`). Rather than keep our own table, the
per-expert keys come from transformers' own conversion mapping (`get_checkpoint_conversion_mapping`), the one
transformers applies on load and reverts on save. Layouts it describes with anything but stacking experts and
concatenating the parts along the output dim (a transpose, a custom converter) give None: the init then loads the
model through transformers instead of streaming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from loraforge.models.targets import Target

_REGEX = re.compile(r"[\\^$()\[\]|+?{}]")  # a pattern with these is a real regex: not a plain name we can invert


@dataclass(frozen=True)
class ExpertKeys:
    """How one fused expert parameter is stored: under one key, or per expert in parts."""

    fused: Optional[str] = None  # the whole stack under this key, in the in-memory shape
    parts: tuple[str, ...] = ()  # else per-expert key templates ("...experts.{e}.gate_proj.weight"), in order
    rows: tuple[int, ...] = ()  # rows of each part: expert e's matrix is the parts concatenated on dim 0

    def keys(self, e: int) -> list[str]:
        return [self.fused] if self.fused else [p.format(e=e) for p in self.parts]

    def read(self, source, e: int) -> torch.Tensor:
        """Expert E's matrix as the in-memory parameter stores it (stack[e])."""
        if self.fused:
            return source.open_shard(source.weight_map[self.fused]).read_index(self.fused, e)
        parts = [source.open_shard(source.weight_map[k]).read(k) for k in self.keys(e)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def split(self, e: int, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        """Expert E's matrix (stack[e] layout) as the per-expert checkpoint tensors it is stored in."""
        out, start = {}, 0
        for key, n in zip(self.keys(e), self.rows):
            out[key] = matrix[start : start + n].contiguous()
            start += n
        return out


def expert_keys(target: Target, source, model_type: Optional[str]) -> Optional[ExpertKeys]:
    """Where the experts of TARGET (a fused expert parameter) are in SOURCE's safetensors checkpoint, or None when
    its layout is not one we can read expert by expert."""
    stored = (target.in_features, target.out_features) if target.transposed else target.shape
    want = (target.experts, *stored)
    converters = _converters(model_type)
    renames = [
        (src, dst)
        for c in converters
        if type(c).__name__ == "WeightRenaming"
        for src, dst in zip((p.replace("\\.", ".") for p in c.source_patterns), c.target_patterns)
        if not _REGEX.search(src + dst)
    ]
    for (name,) in _renamed([target.name], renames):  # fused on disk, maybe under another name (GraniteMoE)
        info = _shape(source, name)
        if info is not None:
            return ExpertKeys(fused=name) if info == want else None
    if target.transposed:  # per-expert layouts of (E, in, out) stacks: not seen in transformers
        return None
    for c in converters:
        if type(c).__name__ != "WeightConverter" or not _stacks_and_concatenates(c):
            continue
        for dst in c.target_patterns:
            if _REGEX.search(dst) or not (target.name.endswith(dst) and (dst[0] == "." or _boundary(target.name, dst))):
                continue
            prefix = target.name[: len(target.name) - len(dst)]
            parts = [prefix + src.replace("*", "{e}") for src in c.source_patterns if not _REGEX.search(src)]
            for candidate in _renamed(parts, renames):
                found = _per_expert(source, candidate, target.experts, stored)
                if found is not None:
                    return found
    return None


def _converters(model_type: Optional[str]) -> list:
    if not model_type:
        return []
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return list(get_checkpoint_conversion_mapping(model_type) or [])


def _boundary(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _stacks_and_concatenates(converter) -> bool:
    """Stack the experts on dim 0, then (for several parts) concatenate them along the matrices' first dim."""
    ops = [(type(o).__name__, getattr(o, "dim", None)) for o in converter.operations]
    return ops in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])


def _renamed(parts: list[str], renames: list[tuple[str, str]]) -> list[list[str]]:
    """PARTS as in memory, and with each on-disk renaming undone (Mixtral: .mlp. was .block_sparse_moe.)."""
    out = [parts]
    for src, dst in renames:
        if any(dst in p for p in parts):
            out.append([p.replace(dst, src) for p in parts])
    return out


def _per_expert(source, parts: list[str], experts: int, stored: tuple[int, int]) -> Optional[ExpertKeys]:
    rows = []
    for e in range(experts):
        shapes = [_shape(source, p.format(e=e)) for p in parts]
        if any(s is None or len(s) != 2 or s[1] != stored[1] for s in shapes):
            return None
        if e == 0:
            rows = [s[0] for s in shapes]
        elif [s[0] for s in shapes] != rows:
            return None
    return ExpertKeys(parts=tuple(parts), rows=tuple(rows)) if sum(rows) == stored[0] else None


def _shape(source, key: str) -> Optional[tuple[int, ...]]:
    shard = source.weight_map.get(key)
    return None if shard is None else source.open_shard(shard).tensors[key].shape
