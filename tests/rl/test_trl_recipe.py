"""The README's TRL recipe, run as written with the pinned TRL (the `test` extra): GRPOTrainer takes a loraforge
adapter loaded as a PeftModel (rlpo on the original base, pissa on its residual base) or the PeftModel that
`init_model` returns, as `model` with no peft_config, and trains exactly the adapter's LoRA factors.

The block is README.md's (the one marked `docs-test: run by tests/rl/test_trl_recipe.py`), run as a reader runs it,
on CPU, with the mappings tests/test_docs.py applies to every block: the Hub id is the docs' tiny model
(tests/doc_snippets.py), `out/rlpo` the adapter this test wrote, `max_completion_length` capped. Its settings,
its bf16 switch and its partial-credit reward are the README's; the one change is `args.max_steps = 1` before
`trainer.train()` (the recipe trains for 3 epochs of its 64 prompts).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from doc_snippets import ROOT, capped_source, read_blocks
from safetensors.torch import load_file

from loraforge import InitConfig, init_adapter

trl = pytest.importorskip("trl", reason="TRL is in the `test` extra: pip install -e '.[test]' (scripts/setup.sh)")

MARK = "tests/rl/test_trl_recipe.py"  # README.md's marker names this file
LOAD = "# the adapter as loraforge wrote it"
TRAIN = "# train:"


def readme_recipe() -> dict[str, str]:
    """README.md's TRL block in three parts: up to the loading lines, the loading lines, the training lines."""
    (block,) = [b for b in read_blocks(ROOT / "README.md") if b.marker == "run by" and MARK in b.marker_detail]
    head, rest = block.text.split(LOAD)
    load, train = rest.split(TRAIN)
    return {"head": head, "load": LOAD + load, "train": TRAIN + train}


def as_written(source: str, doc_model: Path, base: Path, adapter: Path | None) -> str:
    """The README's names for the base and the adapter pointed at this test's, then the docs' mappings."""
    source = source.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(base)))
    if adapter is not None:
        source = source.replace('"out/rlpo"', repr(str(adapter)))
    return capped_source(source, doc_model)


def run(source: str, namespace: dict | None = None) -> dict:
    namespace = namespace if namespace is not None else {"__name__": "readme_trl_recipe"}
    exec(compile(source, "README.md TRL recipe", "exec"), namespace)
    return namespace


def lora_params(model) -> dict[str, torch.Tensor]:
    """The PeftModel's LoRA factors by their adapter-file name (PEFT adds the adapter name, `.default`)."""
    return {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def train_one_step(ns: dict) -> dict[str, torch.Tensor]:
    """Run the recipe's training lines for one step; the LoRA factors before it."""
    assert ns["args"].bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())  # off on a CPU
    before = lora_params(ns["model"])
    ns["args"].max_steps = 1  # the one change: one step of the recipe's 3 epochs
    run(readme_recipe()["train"], ns)
    logged = ns["trainer"].state.log_history[0]
    # the partial credit at work: the group's 8 completions did not all score the same (else nothing would train)
    assert logged["frac_reward_zero_std"] < 1 and logged["reward_std"] > 0, logged
    return before


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


def test_partial_credit_reward_separates_wrong_answers():
    """The recipe's reward: +1 right; a wrong number scores -1 + 1 / (1 + distance); no number -1. (With dapo_score
    alone all three wrong ones would score -1, and a group of them would have zero advantages.)"""
    ns = run(readme_recipe()["head"].split("# TRL turns bf16 on")[0])
    texts = ["Answer: 42", "Answer: 41", "Answer: 32", "no idea"]
    assert ns["reward"](texts, ["42"] * 4) == [1.0, -0.5, -1 + 1 / 11, -1.0]
    chat = [[{"role": "assistant", "content": t}] for t in texts]  # TRL's conversational completions
    assert ns["reward"](chat, ["42"] * 4) == [1.0, -0.5, -1 + 1 / 11, -1.0]


@pytest.mark.parametrize("method", ["rlpo", "pissa"])
def test_readme_recipe_trains_our_adapter(method, doc_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's output_dir is relative
    adapter = init_adapter(str(doc_model), tmp_path / method, InitConfig(method=method, r=4)).out
    base = adapter / "base" if method == "pissa" else doc_model  # pissa trains on its residual base
    recipe = readme_recipe()
    ns = run(as_written(recipe["head"] + recipe["load"], doc_model, base, adapter))
    stored = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = lora_params(ns["model"])
    assert set(loaded) == set(stored) and all(torch.equal(loaded[k], stored[k].float()) for k in stored)
    before = train_one_step(ns)
    check_trained(ns, before, b0_zero=method == "rlpo")


def test_readme_recipe_trains_init_model(doc_model, tmp_path, monkeypatch):
    """The same recipe with the PeftModel that loraforge.init_model returns in place of the loading lines."""
    monkeypatch.chdir(tmp_path)
    load = """
from loraforge import InitConfig, init_model

model = init_model(AutoModelForCausalLM.from_pretrained(base_id), InitConfig(method="rlmo", r=4))
tokenizer = AutoTokenizer.from_pretrained(base_id)
"""
    ns = run(as_written(readme_recipe()["head"] + load, doc_model, doc_model, None))
    assert lora_params(ns["model"]) and all("lora_A" in n or "lora_B" in n for n in lora_params(ns["model"]))
    before = train_one_step(ns)
    check_trained(ns, before, b0_zero=True)
