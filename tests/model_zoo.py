"""Tiny random configs of transformers' causal-LM model types, and how loraforge's default targets differ from
PEFT's own `all-linear` on each (tests/test_model_zoo.py checks every entry; README's supported-architectures
table is rendered from it: `python tests/model_zoo.py`)."""

from __future__ import annotations

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_TOK = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
# MoE blocks: 4 experts, top-2, expert shapes that are not square (a transposition cannot hide).
_DEEPSEEK = dict(
    moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1
)

ZOO: dict[str, dict] = {
    # dense
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=8),
    "gemma": dict(_COMMON, head_dim=8),
    "gemma2": dict(_COMMON, head_dim=8, sliding_window=16),
    "gemma3_text": dict(_COMMON, head_dim=8, sliding_window=16),
    "phi": dict(_COMMON),
    "phi3": dict(_COMMON),
    "gpt2": dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, **_TOK),
    "gpt_neox": dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **_TOK,
    ),
    "falcon": dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        **_TOK,
    ),
    "olmo": dict(_COMMON),
    "olmo2": dict(_COMMON),
    "olmo3": dict(_COMMON),
    "granite": dict(_COMMON),
    "starcoder2": dict(_COMMON),
    "cohere": dict(_COMMON),
    "glm4": dict(_COMMON, head_dim=8),
    "smollm3": dict(_COMMON),
    "stablelm": dict(_COMMON),
    "exaone4": dict(_COMMON, head_dim=8),
    "helium": dict(_COMMON, head_dim=8),
    # MoE
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "minimax": dict(_COMMON, head_dim=8, num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        _COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=48
    ),
    "qwen3_moe": dict(_COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24),
    "olmoe": dict(_COMMON, num_experts=4, num_experts_per_tok=2),
    "flex_olmo": dict(_COMMON, num_experts=4, num_experts_per_tok=2),
    # layer 0 a dense MLP (mlp.gate_proj/up_proj/down_proj), layer 1 MoE with shared experts
    "deepseek_v2": dict(_COMMON, num_key_value_heads=4, first_k_dense_replace=1, **_DEEPSEEK, **_MLA),
    "deepseek_v3": dict(_COMMON, num_key_value_heads=4, first_k_dense_replace=1, **_DEEPSEEK, **_MLA),
    "glm4_moe": dict(_COMMON, head_dim=8, first_k_dense_replace=1, **_DEEPSEEK),
    "dots1": dict(_COMMON, head_dim=8, first_k_dense_replace=1, **_DEEPSEEK),
    "ernie4_5_moe": dict(
        _COMMON,
        head_dim=8,
        moe_intermediate_size=24,
        moe_num_experts=4,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
    ),
    "hunyuan_v1_moe": dict(_COMMON, head_dim=8, num_experts=4, moe_topk=2, moe_intermediate_size=24),
    "gpt_oss": dict(
        _COMMON,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=24,
        sliding_window=16,
        rope_parameters=dict(rope_type="default", rope_theta=150000.0),
    ),
    # layer 0 linear attention (Gated DeltaNet), layer 1 full attention, both MoE with a shared expert
    "qwen3_next": dict(
        _COMMON,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention"],
    ),
}

# Why loraforge's default targets differ from PEFT's all-linear (PEFT 0.21, transformers 5), by kind of difference.
REASONS = {
    "experts": "loraforge adapts the fused experts (each expert its own init); PEFT's all-linear does not reach them "
    "on this model type",
    "dense-mlp": "PEFT's all-linear loses the dense and shared-expert MLPs (gate/up/down_proj) to its MoE config "
    "rewriting; loraforge keeps them (written as target_parameters)",
    "router": "PEFT's all-linear adapts the router (a Linear router, or gate.weight added by its config rewriting); "
    "loraforge leaves routing as pretrained",
    "shared-expert-gate": "PEFT adapts the 1 x hidden shared_expert_gate; loraforge leaves it out (a gate, and "
    "smaller than any r > 1)",
}
# model type -> the kinds of difference found (empty: identical targets). Checked by tests/test_model_zoo.py.
DIFFERENCES: dict[str, set[str]] = {t: set() for t in ZOO}
DIFFERENCES.update(
    {
        "mixtral": {"router"},
        "minimax": {"router"},
        "phimoe": {"experts", "router"},
        "granitemoe": {"experts"},
        "qwen2_moe": {"experts", "shared-expert-gate"},
        "qwen3_moe": {"router"},
        "olmoe": {"router"},
        "flex_olmo": {"router"},
        "deepseek_v2": {"router", "dense-mlp"},
        "deepseek_v3": {"router", "dense-mlp"},
        "glm4_moe": {"router", "dense-mlp"},
        "dots1": {"router", "dense-mlp"},
        "ernie4_5_moe": {"router", "dense-mlp"},
        "hunyuan_v1_moe": {"router", "dense-mlp"},
        "gpt_oss": {"experts"},
        "qwen3_next": {"router", "dense-mlp", "shared-expert-gate"},
    }
)
MOE = {t for t, kw in ZOO.items() if any("expert" in k for k in kw)}


def readme_table() -> str:
    """The README's supported-architectures table."""
    rows = [
        "| model type | kind | experts adapted per expert | differences from PEFT's `all-linear` |",
        "|---|---|---|---|",
    ]
    for t in ZOO:
        diff = ", ".join(sorted(DIFFERENCES[t])) or "none"
        moe = t in MOE
        rows.append(f"| `{t}` | {'MoE' if moe else 'dense'} | {'yes' if moe else '-'} | {diff} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(readme_table())
