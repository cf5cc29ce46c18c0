"""Facts about the clients that load what loraforge writes (vLLM, verl), kept in one place.

vLLM serves a LoRA adapter only when the engine's `--max-lora-rank` is at least the adapter's rank
(`PEFTHelper.validate_legal`; from vLLM 0.32 the largest rank of a `rank_pattern` counts too), and it
accepts only a fixed set of values for that flag (`LoRAConfig.max_lora_rank`): 8, 16, 32, 64, 128,
256, 320, 512 up to vLLM 0.11.0, and 1 as well from 0.11.1. The default is 16, which refuses every
adapter of rank above 16.
"""

from __future__ import annotations

from loraforge.core.errors import LoraforgeError

# The --max-lora-rank values every vLLM release accepts, ascending. Rank 1 rounds up to 8, which
# serves it on every release (1 itself is refused before vLLM 0.11.1).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds an adapter of rank RANK."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise LoraforgeError(
        f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]}), so vLLM cannot serve "
        f"this adapter; use -r {VLLM_LORA_RANKS[-1]} or less, or merge the adapter into the base before serving."
    )


def vllm_serve_command(base: str, adapter: str, rank: int, name: str = "adapter") -> str:
    """The `vllm serve` line for ADAPTER (rank RANK) on BASE, or a sentence saying why vLLM cannot serve it."""
    if rank > VLLM_LORA_RANKS[-1]:
        return (
            f"vLLM cannot serve this adapter: its rank {rank} is above vLLM's largest --max-lora-rank "
            f"({VLLM_LORA_RANKS[-1]}); merge it into the base first"
        )
    return f"vllm serve {base} --enable-lora --max-lora-rank {vllm_max_lora_rank(rank)} --lora-modules {name}={adapter}"
