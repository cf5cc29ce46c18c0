"""The README's 4-bit TRL recipe (QLoRA), run as written with the pinned TRL and bitsandbytes (the `test` extra):
GRPOTrainer takes an adapter made by `loraforge init --quantize nf4`, loaded as a PeftModel on the base that
BitsAndBytesConfig quantizes to NF4 (rlpo on the original, pissa on its residual base), and trains exactly the
adapter's float32 LoRA factors for a step while the 4-bit base stays as loaded.

The README block has three parts: imports, "your run" (base, adapter, device, prompts, reward, settings, compute
dtype) and the recipe (quantized load; GRPOTrainer; train). The test keeps the imports and the recipe verbatim and
replaces only "your run" with a tiny CPU run: the tiny llama, float32 compute, a reward that differs between
completions (GRPO's advantages are zero when every completion of a group scores the same), one step.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge import InitConfig, init_adapter

trl = pytest.importorskip("trl", reason="TRL is in the `test` extra: pip install -e '.[test]' (scripts/setup.sh)")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the `test` extra (and `quant`)")

ROOT = Path(__file__).resolve().parents[2]
YOUR_RUN = "# your run:"
LOAD = "# the 4-bit base"
TRAIN = "# train on the 4-bit base:"


def readme_recipe() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    # the README's block that loads a 4-bit base (the plain TRL recipe before it starts with the same imports)
    blocks = re.findall(r"```python\n(import torch\nfrom datasets import Dataset\n.*?)```", text, re.S)
    block = next(b for b in blocks if LOAD in b and "BitsAndBytesConfig" in b)
    imports, rest = block.split(YOUR_RUN)
    _, recipe = rest.split(LOAD)
    load, train = recipe.split(TRAIN)
    return {"imports": imports, "load": LOAD + load, "train": TRAIN + train}


def tiny_run(base_id: Path, adapter_dir: Path, out: Path) -> str:
    return f"""
base_id, adapter_dir, device = {str(base_id)!r}, {str(adapter_dir)!r}, "cpu"
dataset = Dataset.from_list([{{"prompt": "12+30=", "answer": "42"}}] * 4)


def reward(completions, answer, **kwargs):
    return [float(sum(map(ord, c)) % 7) for c in completions]


args = GRPOConfig(
    output_dir={str(out)!r}, max_steps=1, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
    learning_rate=1e-2, beta=0.0, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
    disable_tqdm=True, dataloader_num_workers=0, seed=0,
)
compute_dtype = torch.float32
"""


def run(source: str) -> dict:
    namespace: dict = {"__name__": "readme_trl_recipe_4bit"}
    exec(compile(source, "README.md 4-bit TRL recipe", "exec"), namespace)
    return namespace


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def four_bit(model) -> dict[str, torch.Tensor]:
    """The packed NF4 data of every 4-bit layer."""
    return {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("method", ["rlpo", "pissa"])
def test_readme_4bit_recipe_trains_our_adapter_on_an_nf4_base(method, model_dir, tmp_path):
    adapter = init_adapter(str(model_dir), tmp_path / method, InitConfig(method=method, r=4, quantize="nf4")).out
    base = adapter / "base" if method == "pissa" else model_dir  # pissa trains on its residual base
    recipe = readme_recipe()
    ns = run(recipe["imports"] + tiny_run(base, adapter, tmp_path / "run") + recipe["load"])
    packed = four_bit(ns["model"])
    # every linear layer of the tiny llama (2 blocks x 7) is NF4 under its LoRA; the output head is not quantized
    assert len(packed) == 14
    assert {m.weight.quant_state.quant_type for m in ns["model"].modules() if isinstance(m, bnb.nn.Linear4bit)} == {
        "nf4"
    }
    before = lora_params(ns["model"])
    stored = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(before) == set(stored) and all(torch.equal(before[k], stored[k]) for k in stored)
    assert {t.dtype for t in before.values()} == {torch.float32}

    ns = run(recipe["imports"] + tiny_run(base, adapter, tmp_path / "run") + recipe["load"] + recipe["train"])
    model = ns["trainer"].model
    trainable = {n.replace(".default", "") for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(before), "GRPOTrainer trains exactly the adapter's LoRA factors"
    assert list(model.peft_config) == ["default"], "TRL built no adapter of its own"
    after = lora_params(model)
    assert {t.dtype for t in after.values()} == {torch.float32}
    for name, value in before.items():
        moved = not torch.equal(after[name], value)
        if "lora_B" in name or method == "pissa":
            assert moved, f"{name} did not move"
        else:  # B0 = 0: A gets no gradient on the first step
            assert not moved, f"{name} moved although B0 = 0"
    now = four_bit(model)
    assert now.keys() == packed.keys() and all(torch.equal(now[k], packed[k]) for k in packed), "the base moved"
