"""Planning an init: per-module seeds, batches of same-shaped matrices, rank checks.

Shared by the init pipeline and `verify` (which recomputes inits batch by batch)."""

from __future__ import annotations

import zlib
from typing import Sequence

from loraforge.core.errors import LoraforgeError
from loraforge.models.targets import Target


def module_seed(seed: int, name: str) -> int:
    """Per-module seed: the same module gets the same numbers however modules are batched or ordered."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def plan_batches(targets: Sequence[Target], budget_bytes: int) -> list[list[Target]]:
    """Group targets by shape (first-appearance order) and cut each group to the memory budget.

    The experts of a fused stack come in as one unit per expert (`Target.units`), so a stack is cut into
    batches of experts like any other group of same-shaped matrices.

    One float64 matrix costs about 3x its size while decomposed (W, the other side's vectors, the
    residual), so a batch holds budget / (24 * m * n) matrices, at least one.
    """
    groups: dict[tuple[int, int, bool], list[Target]] = {}
    for t in targets:
        groups.setdefault((t.out_features, t.in_features, t.transposed), []).append(t)
    batches = []
    for (m, n, _), members in groups.items():
        size = max(1, budget_bytes // (24 * m * n))
        batches.extend(members[i : i + size] for i in range(0, len(members), size))
    return batches


def check_ranks(targets: Sequence[Target], r: int) -> None:
    for t in targets:
        if r > min(t.shape):
            raise LoraforgeError(
                f"-r {r} is larger than module {t.name} allows: its weight is {t.out_features} x {t.in_features} "
                f"(out x in), so the rank is at most {min(t.shape)}. Lower -r or leave this module out with "
                "--target-modules/--layers."
            )


def rank_limits(targets: Sequence[Target]) -> str:
    """`the largest -r allowed is 576 (model.layers.0.mlp.up_proj, 1536 x 576); -r 192 or less keeps every module
    (the smallest, model.layers.0.self_attn.k_proj, is 192 x 576)`: what a refused -r is told (pure)."""
    big = max(targets, key=lambda t: min(t.shape))
    small = min(targets, key=lambda t: min(t.shape))
    text = f"the largest -r allowed is {min(big.shape)} ({big.name}, {big.out_features} x {big.in_features})"
    if min(small.shape) < min(big.shape):
        text += (
            f"; -r {min(small.shape)} or less keeps every module (the smallest, {small.name}, is "
            f"{small.out_features} x {small.in_features})"
        )
    return text


def drop_small(targets: Sequence[Target], r: int) -> tuple[list[Target], dict[str, str]]:
    """The targets of the default set that can hold rank R, and {name: reason} for those that cannot.

    A default-set module smaller than r (Qwen's 1 x hidden shared_expert_gate, a router of 8 experts at r = 16)
    has no r directions to initialise from; it is left out rather than failing the whole init. Modules named
    with --target-modules go through `check_ranks` instead, which stops with an error."""
    kept, skipped = [], {}
    for t in targets:
        if r > min(t.shape):
            skipped[t.name] = f"{t.out_features} x {t.in_features}: smaller than r = {r}"
        else:
            kept.append(t)
    return kept, skipped
