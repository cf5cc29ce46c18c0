"""Targets read from the checkpoint header (no transformers import) against the transformers skeleton.

For every architecture in HEADER_LAYOUTS, a tiny random model is built from a config and saved; the
header skeleton must give exactly the targets (names, shapes, order, layers) and the PEFT
target_modules value that transformers' own meta-device skeleton gives, for all-linear, a name
subset and a --layers subset.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraforge.models.source import resolve_source
from loraforge.models.targets import HEADER_LAYOUTS, build_skeleton, find_targets, header_skeleton, peft_target_modules

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)
EXTRA = {
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16),
    "qwen3": dict(head_dim=16),
    "phi3": dict(pad_token_id=0),
}


def save_arch(model_type: str, path: Path, tie: bool) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **COMMON, **EXTRA.get(model_type, {}), tie_word_embeddings=tie)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("model_type", sorted(HEADER_LAYOUTS))
def test_header_skeleton_gives_the_transformers_targets(model_type, tie, tmp_path):
    source = resolve_source(str(save_arch(model_type, tmp_path / model_type, tie)))
    header, full = header_skeleton(source), build_skeleton(source.path)
    assert header is not None and type(header).__name__ == type(full).__name__
    some = HEADER_LAYOUTS[model_type][:2]
    for kwargs in ({}, {"target_modules": list(some)}, {"layers": [1, 2]}):
        ours, theirs = find_targets(header, **kwargs), find_targets(full, **kwargs)
        assert ours == theirs and len(ours) > 0
        assert peft_target_modules(header, ours) == peft_target_modules(full, theirs)


def _rename_key(path: Path, old: str, new: str) -> None:
    """Rewrite model.safetensors with one tensor renamed."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors[new] = tensors.pop(old)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_unexpected_names_or_architectures_fall_back_to_transformers(tmp_path, tiny_models):
    # A 2-D weight outside the known layout: no header skeleton (build_skeleton decides).
    odd = save_arch("llama", tmp_path / "odd", tie=False)
    _rename_key(odd, "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.extra_proj.weight")
    assert header_skeleton(resolve_source(str(odd))) is None
    # An architecture not in the table (GPT-2's Conv1D) is never read from the header.
    assert header_skeleton(resolve_source(str(tiny_models["gpt2"]))) is None


def test_streaming_init_of_a_known_layout_imports_neither_transformers_nor_peft(tiny_models, tmp_path):
    # What makes `loraforge init` start fast; the adapter it writes still loads in PEFT (test_init.py).
    code = (
        "import sys; from loraforge import InitConfig, init_adapter; "
        f"init_adapter({str(tiny_models['llama'])!r}, {str(tmp_path / 'out')!r}, InitConfig(method='pissa', r=4)); "
        "print(sorted(m for m in ('transformers', 'peft', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_adapter_config_reads_back_in_peft_as_written(tiny_models, tmp_path):
    from peft import LoraConfig

    from loraforge import InitConfig, init_adapter

    init_adapter(str(tiny_models["llama"]), tmp_path / "a", InitConfig(method="rlpo", r=4, alpha=8, rslora=True))
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    loaded = LoraConfig.from_pretrained(str(tmp_path / "a")).to_dict()
    for key, value in written.items():
        got = loaded[key]
        assert (sorted(got) if isinstance(got, set) else got) == value, key
    assert loaded["use_rslora"] is True and loaded["r"] == 4 and loaded["lora_alpha"] == 8
