"""The README's TRL recipe, run as written with the pinned TRL (the `test` extra): GRPOTrainer takes a loraforge
adapter loaded as a PeftModel (rlpo on the original base, pissa on its residual base) or the PeftModel that
`init_model` returns, as `model` with no peft_config, and trains exactly the adapter's LoRA factors for a step.

The README block has three parts: imports, "your run" (base, adapter, prompts, reward, settings) and the recipe
(load the adapter; GRPOTrainer; train). The test keeps the imports and the recipe verbatim and replaces only
"your run" with a tiny CPU run: the tiny llama, a reward that differs between completions (GRPO's advantages
are zero when every completion of a group scores the same, and nothing would move), one step.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge import InitConfig, init_adapter

trl = pytest.importorskip("trl", reason="TRL is in the `test` extra: pip install -e '.[test]' (scripts/setup.sh)")

ROOT = Path(__file__).resolve().parents[2]
YOUR_RUN = "# your run:"
LOAD = "# the adapter as loraforge wrote it"
TRAIN = "# train:"


def readme_recipe() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(from datasets import Dataset\n.*?)```", text, re.S).group(1)
    imports, rest = block.split(YOUR_RUN)
    _, recipe = rest.split(LOAD)
    load, train = recipe.split(TRAIN)
    return {"imports": imports, "load": LOAD + load, "train": TRAIN + train}


def tiny_run(base_id: Path, adapter_dir: Path | None, out: Path) -> str:
    return f"""
base_id, adapter_dir = {str(base_id)!r}, {str(adapter_dir)!r}
dataset = Dataset.from_list([{{"prompt": "12+30=", "answer": "42"}}] * 4)


def reward(completions, answer, **kwargs):
    return [float(sum(map(ord, c)) % 7) for c in completions]


args = GRPOConfig(
    output_dir={str(out)!r}, max_steps=1, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
    learning_rate=1e-2, beta=0.0, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
    disable_tqdm=True, dataloader_num_workers=0, seed=0,
)
"""


def run(source: str) -> dict:
    namespace: dict = {"__name__": "readme_trl_recipe"}
    exec(compile(source, "README.md TRL recipe", "exec"), namespace)
    return namespace


def lora_params(model) -> dict[str, torch.Tensor]:
    """The PeftModel's LoRA factors by their adapter-file name (PEFT adds the adapter name, `.default`)."""
    return {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def check_trained(ns: dict, before: dict[str, torch.Tensor], b0_zero: bool) -> None:
    model = ns["trainer"].model
    trainable = {n.replace(".default", "") for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(before), "GRPOTrainer trains exactly the adapter's LoRA factors"
    assert list(model.peft_config) == ["default"], "TRL built no adapter of its own"
    after = lora_params(model)
    for name, value in before.items():
        moved = not torch.equal(after[name], value)
        if "lora_B" in name or not b0_zero:
            assert moved, f"{name} did not move"
        else:
            # B0 = 0: dL/dA = s B^T dL/d(delta W) = 0 on the first step, and Adam moves a zero gradient by 0
            assert not moved, f"{name} moved although B0 = 0"


@pytest.mark.parametrize("method", ["rlpo", "pissa"])
def test_readme_recipe_trains_our_adapter(method, model_dir, tmp_path):
    adapter = init_adapter(str(model_dir), tmp_path / method, InitConfig(method=method, r=4)).out
    base = adapter / "base" if method == "pissa" else model_dir  # pissa trains on its residual base
    recipe = readme_recipe()
    ns = run(recipe["imports"] + tiny_run(base, adapter, tmp_path / "run") + recipe["load"])
    before = lora_params(ns["model"])
    stored = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(before) == set(stored) and all(torch.equal(before[k], stored[k].float()) for k in stored)
    ns = run(recipe["imports"] + tiny_run(base, adapter, tmp_path / "run") + recipe["load"] + recipe["train"])
    check_trained(ns, before, b0_zero=method == "rlpo")


def test_readme_recipe_trains_init_model(model_dir, tmp_path):
    """The same recipe with the PeftModel that loraforge.init_model returns in place of the loading lines."""
    recipe = readme_recipe()
    load = f"""
from loraforge import InitConfig, init_model

model = init_model(AutoModelForCausalLM.from_pretrained({str(model_dir)!r}), InitConfig(method="rlmo", r=4))
tokenizer = AutoTokenizer.from_pretrained(base_id)
"""
    ns = run(recipe["imports"] + tiny_run(model_dir, None, tmp_path / "run") + load)
    before = lora_params(ns["model"])
    assert before and all("lora_A" in n or "lora_B" in n for n in before)
    ns = run(recipe["imports"] + tiny_run(model_dir, None, tmp_path / "run") + load + recipe["train"])
    check_trained(ns, before, b0_zero=True)
