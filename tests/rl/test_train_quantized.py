"""`loraforge train --quantize`: RL on a 4-bit base (QLoRA), on CPU.

- rlpo (DAPO) and pissa (GRPO, with its KL to the initial adapter) adapters written by `loraforge init` train on an
  NF4 base: every linear layer of the base
  is a bitsandbytes 4-bit layer, exactly the LoRA factors train (in float32) and move, the quantized base
  does not change, and the run's config.json records the quantization;
- `--resume` keeps it: a 2 + 1 step run on the 4-bit base ends with the 3-step run's adapter, bit for bit;
- the CLI flags reach the loader (int8 and a bfloat16 compute dtype);
- what cannot be handed on is refused in one line: `--rollout vllm`, `--backend verl`, an unknown format,
  a compute dtype for int8;
- without bitsandbytes, `train --quantize` says in one line how to install it, and makes no run directory.
"""

from __future__ import annotations

import json

import pytest
import torch
from rl_helpers import answer_scorer
from safetensors.torch import load_file
from test_trainer import tiny_cfg

from loraforge.core.errors import LoraforgeError
from loraforge.rl.config import TrainConfig
from loraforge.rl.trainer import Trainer, resume, train

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def inits(model_dir, tmp_path_factory):
    """rlpo and pissa adapters for the tiny base, written by `loraforge init`."""
    from loraforge import InitConfig, init_adapter

    root = tmp_path_factory.mktemp("quant_inits")
    for method in ("rlpo", "pissa"):
        init_adapter(str(model_dir), str(root / method), InitConfig(method=method, r=4, device="cpu"))
    return root


def quantized_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("method, algo", [("rlpo", "dapo"), ("pissa", "grpo")])  # grpo: KL to the initial adapter
def test_rlpo_and_pissa_adapters_train_on_an_nf4_base(model_dir, inits, tmp_path, method, algo):
    from loraforge.models.quantize import dequantized_weight, quantize_dequantize
    from loraforge.models.weights import open_model_weights

    # pissa trains on its residual base ADAPTER/base, rlpo on the original
    base_dir = inits / method / "base" if method == "pissa" else model_dir
    cfg = tiny_cfg(base_dir, inits / method, tmp_path / "run", quantize="nf4", max_response_length=3, algo=algo)
    trainer = Trainer(cfg, scorer=answer_scorer, echo=lambda s: None)
    assert trainer.run().steps_done == 2
    layers = {n.removesuffix(".base_layer"): m for n, m in quantized_layers(trainer.model).items()}
    # 2 blocks x 7 linear layers, each a 4-bit layer under its LoRA (PEFT's lora.bnb.Linear4bit)
    assert len(layers) == 14 and {m.weight.quant_state.quant_type for m in layers.values()} == {"nf4"}
    # ... holding nf4 of the base the adapter was made for, unchanged by training
    names = [n.removeprefix("base_model.model.") for n in layers]
    stored = open_model_weights(str(base_dir), names)
    for name, module in layers.items():
        want = quantize_dequantize(stored.stored(name.removeprefix("base_model.model.")), "nf4")
        assert torch.equal(dequantized_weight(module), want), name
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert len(params) == 28 and all(".lora_A." in n or ".lora_B." in n for n in params)
    assert {p.dtype for p in params.values()} == {torch.float32}
    init = load_file(str(inits / method / "adapter_model.safetensors"))
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert init.keys() == saved.keys() and {t.dtype for t in saved.values()} == {torch.float32}
    # every factor trained (for rlpo: B from step 1, A from step 2, once B is nonzero)
    assert all(not torch.equal(init[k], saved[k]) for k in init)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["quantize"] == "nf4" and recorded["quant_compute_dtype"] is None
    if algo == "grpo":  # the k3 KL against the initial adapter ran on the 4-bit base, and the policy moved from it
        from loraforge.rl.metrics import read_metrics

        assert all(m["kl_ref"] > 0 for m in read_metrics(tmp_path / "run")[1:])


def test_resume_keeps_the_quantized_base_and_replays_the_run(model_dir, inits, tmp_path):
    over = dict(quantize="nf4", save_every=1, dynamic_sampling=False, max_response_length=2)
    quiet = lambda s: None  # noqa: E731
    train(tiny_cfg(model_dir, inits / "rlpo", tmp_path / "straight", steps=3, **over), scorer=answer_scorer, echo=quiet)
    train(tiny_cfg(model_dir, inits / "rlpo", tmp_path / "split", steps=2, **over), scorer=answer_scorer, echo=quiet)
    lines = []
    resume(tmp_path / "split", steps=3, scorer=answer_scorer, echo=lines.append)
    assert any("resumed from" in line for line in lines)
    assert TrainConfig.load(tmp_path / "split" / "config.json").quantize == "nf4"
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_flags_reach_the_loader(model_dir, inits, tmp_path):
    from loraforge.rl.loading import base_load_kwargs

    cfg = tiny_cfg(model_dir, inits / "rlpo", tmp_path / "r", quantize="nf4", quant_compute_dtype="bfloat16")
    kw = base_load_kwargs(cfg.resolved(), torch.device("cpu"))
    q = kw["quantization_config"]
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_compute_dtype) == (True, "nf4", torch.bfloat16)
    assert kw["device_map"] == {"": "cpu"} and kw["dtype"] == torch.float32
    from conftest import invoke

    res = invoke(
        "train", "--model", model_dir, "--adapter", inits / "rlpo", "--data", "synthetic:n=60,max=2,style=bare",
        "--reward", "rl_helpers:answer_scorer", "--max-response-length", "1", "--overlong-buffer", "0",
        "--group-size", "4", "--prompt-batch", "2", "--mini-batch", "2", "--steps", "1", "--max-gen-batches", "0",
        "--no-tensorboard", "--device", "cpu", "--quantize", "int8", "-o", tmp_path / "cli",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["quantize"] == "int8"


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(quantize="nf2"), "--quantize must be one of nf4, fp4, int8, got 'nf2'"),
        (dict(quantize="int8", quant_compute_dtype="bfloat16"), "--quant-compute-dtype goes with --quantize nf4"),
        (dict(quantize="nf4", quant_compute_dtype="float64"), "--quant-compute-dtype must be float32, bfloat16"),
        (dict(quant_compute_dtype="bfloat16"), "--quant-compute-dtype goes with --quantize nf4 or fp4"),
        (dict(quantize="nf4", rollout="vllm"), "--rollout vllm cannot sample from a --quantize nf4 base"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_anything_runs(model_dir, inits, tmp_path, over, message):
    with pytest.raises(LoraforgeError, match=message):
        tiny_cfg(model_dir, inits / "rlpo", tmp_path / "run", **over).resolved()
    assert not (tmp_path / "run").exists()


def test_the_verl_hand_off_refuses_a_quantized_base(model_dir, inits, tmp_path):
    from loraforge.rl.verl_launch import prepare

    with pytest.raises(LoraforgeError, match="--quantize nf4 cannot be handed to verl 0.9"):
        prepare(tiny_cfg(model_dir, inits / "rlpo", tmp_path / "run", quantize="nf4"), gpus_per_node=1)
    assert not (tmp_path / "run").exists()


def test_without_bitsandbytes_train_says_how_to_install_in_one_line(model_dir, inits, tmp_path, hide_package):
    from conftest import invoke

    hide_package("bitsandbytes")
    res = invoke(
        "train", "--model", model_dir, "--adapter", inits / "rlpo", "--data", "synthetic:n=60,max=2,style=bare",
        "--reward", "rl_helpers:answer_scorer", "--steps", "1", "--no-tensorboard", "--device", "cpu",
        "--quantize", "nf4", "-o", tmp_path / "run",
    )  # fmt: skip
    assert res.exit_code == 1
    want = (
        "Error: --quantize needs bitsandbytes, which is not installed: pip install -e '.[quant]' (bitsandbytes >= 0.50)"
    )
    assert res.output.strip().splitlines() == [want]
    assert not (tmp_path / "run").exists()
