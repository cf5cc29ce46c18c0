"""`loraforge verify` checks what a client builds: PEFT's own modules, keys and logits, not only the files.

A tiny DeepSeek-V3 (layer 0 a dense MLP, layer 1 MoE with a shared expert) reproduces PEFT 0.21's rewrite of
adapter_config.json on transformers 5: `gate_proj`/`up_proj`/`down_proj` in target_modules become the fused
experts' target_parameters, so the dense and shared MLPs silently get no LoRA. `loraforge init` now writes those
modules as target_parameters (the form PEFT leaves alone); `plain_mlp_form` rewrites such an adapter into the form
earlier versions wrote (plain target_modules, no experts), which PEFT mis-loads.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from adapter_helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from click.testing import CliRunner
from conftest import make_tokenizer

from loraforge import InitConfig, init_adapter
from loraforge.cli import main
from loraforge.models.checkpoint import sha256_file
from loraforge.models.source import resolve_source
from loraforge.ship.client_check import LOGIT_TOL_EPS, logit_error
from loraforge.ship.verify import verify_adapter

DS3_ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
DS3_MLP = [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")] + [
    f"model.layers.1.mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")
]


def checks(report) -> dict:
    return {c.name: c for c in report.checks}


def status(report) -> dict:
    return {c.name: c.status for c in report.checks}


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory):
    """A tiny DeepSeek-V3 checkpoint (bf16): layer 0 dense MLP, layer 1 four routed experts + a shared expert."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "deepseek_v3",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # spread the spectrum like a trained model's (as conftest.build_tiny does)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("models") / "deepseek_v3"
    model.to(torch.bfloat16).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def inits(tiny_models, deepseek_v3, tmp_path_factory):
    root = tmp_path_factory.mktemp("client-inits")
    llama = str(tiny_models["llama"])
    return {
        "rlpo": init_adapter(llama, root / "rlpo", InitConfig(method="rlpo", r=4)).out,
        "pissa": init_adapter(llama, root / "pissa", InitConfig(method="pissa", r=4)).out,
        # today's init writes target_modules ["down_proj", "gate_proj", ...]: PEFT rewrites them
        "ds3-all": init_adapter(str(deepseek_v3), root / "ds3-all", InitConfig(method="pissa", r=4)).out,
        "ds3-attn": init_adapter(
            str(deepseek_v3), root / "ds3-attn", InitConfig(method="pissa", r=4, target_modules=DS3_ATTENTION)
        ).out,
    }


def copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def rehash(out, rel):
    manifest = json.loads((out / "loraforge.json").read_text())
    manifest["files"][rel] = sha256_file(out / rel)
    (out / "loraforge.json").write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize("name", ["rlpo", "pissa", "ds3-attn"])
def test_sound_adapters_pass_the_client_checks(inits, name):
    report = verify_adapter(inits[name])
    assert report.ok, {c.name: c.failures for c in report.checks}
    s = status(report)
    assert s["peft modules"] == s["peft keys"] == "ok"
    assert s["peft logits"] == ("n/a" if name == "rlpo" else "ok")
    if name != "rlpo":
        # bf16 residual base: the logits move by the rounding of bf16 (measured ~2e-3 here), far below a wrong base
        assert "bfloat16 base" in checks(report)["peft logits"].detail


def plain_mlp_form(src, tmp_path):
    """A copy of SRC (a DeepSeek-V3 init) as earlier loraforge wrote it: the dense/shared MLPs in target_modules,
    no expert stacks, every file's hash recorded as if init had written it."""
    from safetensors.torch import load_file, save_file

    out = copy(src, tmp_path)
    tensors = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if ".experts." not in k}
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "adapter_config.json").read_text())
    config["target_modules"] = sorted(DS3_ATTENTION + ["gate_proj", "up_proj", "down_proj"])
    config.pop("target_parameters", None)
    (out / "adapter_config.json").write_text(json.dumps(config))
    manifest = json.loads((out / "loraforge.json").read_text())
    manifest["modules"] = {k: v for k, v in manifest["modules"].items() if not v.get("experts")}
    manifest.pop("peft", None)
    manifest["target_modules"] = config["target_modules"]
    (out / "loraforge.json").write_text(json.dumps(manifest, indent=2))
    rehash(out, "adapter_config.json")
    rehash(out, "adapter_model.safetensors")
    return out


def test_init_writes_deepseek_v3_mlps_in_the_form_peft_loads(inits):
    # What `loraforge init` writes now: every client check passes, the dense/shared MLPs included.
    report = verify_adapter(inits["ds3-all"])
    assert report.ok, {c.name: c.failures for c in report.checks}
    config = json.loads((inits["ds3-all"] / "adapter_config.json").read_text())
    assert {"gate_proj.weight", "up_proj.weight", "down_proj.weight"} <= set(config["target_parameters"])
    assert checks(report)["peft logits"].status == "ok"


def test_peft_rewriting_deepseek_v3_mlp_targets_fails_naming_the_modules(inits, tmp_path):
    report = verify_adapter(plain_mlp_form(inits["ds3-all"], tmp_path))
    c = checks(report)
    # The files themselves are sound: only what PEFT builds from them is wrong.
    assert all(c[n].ok for n in ("hashes", "config", "factors", "reconstruction", "formula"))
    assert not report.ok
    modules = c["peft modules"]
    for name in DS3_MLP:  # the dense MLP of layer 0 and the shared expert of layer 1 lose their LoRA
        assert "moved down_proj/gate_proj/up_proj to the experts' target_parameters" in modules.failures[name]
        assert "deepseek_v3" in modules.failures[name]
    # ... and PEFT's rewrite adds a default-initialised LoRA on the fused experts that the manifest does not list
    assert set(modules.failures) == set(DS3_MLP) | {
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
    }
    assert "PEFT 0.21" in modules.detail and "--target-modules" in modules.detail
    # The saved tensors of those modules would be dropped on load without a word from PEFT.
    unexpected = [k for k, why in c["peft keys"].failures.items() if "loads it nowhere" in why]
    assert sorted(unexpected) == sorted(f"base_model.model.{m}.lora_{w}.weight" for m in DS3_MLP for w in "AB")
    # The client's model is not the original: pissa subtracted the MLP's top-r part from the base, and PEFT
    # does not add it back (measured ~0.2 relative on this tiny model; bf16 rounding is ~2e-3).
    assert list(c["peft logits"].failures) == ["logits"]


def test_the_same_tensors_as_target_parameters_pass(inits, tmp_path):
    # The form PEFT 0.21 leaves alone, given by hand to the earlier form: the dense/shared Linear weights as 2-D
    # target_parameters (ParamWrapper), the same tensor names and shapes. Only adapter_config.json changes, and every
    # check of what PEFT builds passes (the logits differ: the experts' top-r part is not in this adapter).
    out = plain_mlp_form(inits["ds3-all"], tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    config["target_modules"] = DS3_ATTENTION
    config["target_parameters"] = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    (out / "adapter_config.json").write_text(json.dumps(config))
    rehash(out, "adapter_config.json")
    c = checks(verify_adapter(out))
    assert c["peft modules"].ok and c["peft keys"].ok and c["peft modules"].checked == 16


def test_a_config_peft_refuses_fails_with_peft_s_message(inits, tmp_path):
    # lora_dropout != 0 with target_parameters: PEFT raises when it builds the model, so does every client.
    out = plain_mlp_form(inits["ds3-all"], tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(target_modules=DS3_ATTENTION, target_parameters=["gate_proj.weight"], lora_dropout=0.05)
    (out / "adapter_config.json").write_text(json.dumps(config))
    rehash(out, "adapter_config.json")
    report = verify_adapter(out)
    why = checks(report)["peft modules"].failures["adapter_config.json"]
    assert why.startswith("PEFT 0.21") and "ParamWrapper" in why and "lora_dropout" in why
    assert checks(report)["peft keys"].status == "skipped"


def test_tensors_that_do_not_fit_fail_the_key_check(inits, tmp_path):
    # adapter_config.json says r = 8 over r = 4 tensors: PEFT raises on load, so does every client.
    out = copy(inits["pissa"], tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(r=8, lora_alpha=16.0)
    (out / "adapter_config.json").write_text(json.dumps(config))
    report = verify_adapter(out)
    why = checks(report)["peft keys"].failures["adapter_model.safetensors"]
    assert "size mismatch for base_model.model.model.layers.0.self_attn.q_proj.lora_A" in why and "(and 27 more)" in why
    assert checks(report)["peft logits"].status == "skipped"


def test_an_extra_tensor_peft_would_drop_fails_the_key_check(inits, tmp_path):
    from safetensors.torch import load_file, save_file

    out = copy(inits["rlpo"], tmp_path)
    path = out / "adapter_model.safetensors"
    tensors = load_file(str(path))
    # A DoRA magnitude vector left in a plain-LoRA file: PEFT loads the rest and ignores it silently.
    extra = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    tensors[extra] = torch.ones(64)
    save_file(tensors, str(path), metadata={"format": "pt"})
    rehash(out, "adapter_model.safetensors")  # only the client check can notice
    report = verify_adapter(out)
    assert [n for n, c in checks(report).items() if not c.ok] == ["peft keys"]
    assert list(checks(report)["peft keys"].failures) == [extra]


def test_a_residual_adapter_on_the_wrong_base_fails_the_logit_check(inits, tiny_models, tmp_path):
    # base/ replaced by the original model (the usual mistake: the adapter loaded on the original weights).
    out = copy(inits["pissa"], tmp_path)
    shutil.copy(tiny_models["llama"] / "model.safetensors", out / "base" / "model.safetensors")
    rehash(out, "base/model.safetensors")
    report = verify_adapter(out)
    logits = checks(report)["peft logits"]
    assert list(logits.failures) == ["logits"] and "does not get the original model back" in logits.failures["logits"]


def test_logit_check_is_skipped_with_a_note_above_the_size_limit(inits):
    report = verify_adapter(inits["pissa"], logit_max_params=1000)
    logits = checks(report)["peft logits"]
    assert report.ok and logits.status == "skipped" and "parameters > 1,000" in logits.detail


def test_logit_error_ignores_a_constant_shift_and_catches_a_change():
    logits = torch.randn(1, 4, 128, dtype=torch.float64)
    # Softmax is unchanged by adding a constant per position: no error.
    assert logit_error(logits, logits + torch.arange(4.0).view(1, 4, 1)) < 1e-15
    # 1% of the centred logits added at one position: an error of 1e-2 there, the max over positions.
    centred = logits - logits.mean(-1, keepdim=True)
    changed = logits.clone()
    changed[0, 2] += 0.01 * centred[0, 2]
    assert abs(logit_error(logits, changed) - 0.01) < 1e-12
    assert LOGIT_TOL_EPS * torch.finfo(torch.bfloat16).eps < 0.05  # a dropped module (~0.2) is always caught


def test_cli_prints_the_client_checks(inits, tmp_path):
    res = CliRunner().invoke(main, ["verify", str(inits["pissa"])], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "peft modules    ok      PEFT attaches LoRA to exactly the manifest's 14 modules (llama)" in res.output
    assert "peft keys       ok" in res.output and "peft logits     ok      residual base + adapter" in res.output
    res = CliRunner().invoke(
        main, ["verify", str(plain_mlp_form(inits["ds3-all"], tmp_path)), "--logit-max-params", "0"]
    )
    assert res.exit_code == 1
    assert "peft modules    FAILED  PEFT 0.21" in res.output and "peft logits     skipped" in res.output
    assert "model.layers.0.mlp.gate_proj: PEFT" in res.output


def peft_checks(out) -> dict:
    """Only verify's checks of what PEFT builds (modules, keys, logits) on OUT, as verify_adapter runs them: on the
    real model the per-matrix recomputations cost far more and are tested on it by tests/test_smollm2.py."""
    from loraforge.ship.client_check import client_checks

    manifest = json.loads((out / "loraforge.json").read_text())
    source = resolve_source(manifest["source"]["model_id"])
    return {c.name: c for c in client_checks(out, manifest, source, residual=True)}


@pytest.mark.slow
def test_smollm2_pissa_logits_within_bf16_rounding_and_a_wrong_base_caught(smollm2, tmp_path):
    # The real model, bf16 residual base, r = 32 over all 210 linear modules: measured 8.3e-3 (about 1 eps of bf16),
    # well inside the tolerance of 4 eps (3.1e-2).
    out = init_adapter(str(smollm2), tmp_path / "pissa", InitConfig(method="pissa", r=32)).out
    c = peft_checks(out)
    assert all(check.ok for check in c.values()), {n: check.failures for n, check in c.items()}
    assert c["peft modules"].checked == 210 and "bfloat16 base" in c["peft logits"].detail
    # base/ replaced by the original weights: the top-32 part is then counted twice.
    shutil.copy(smollm2 / "model.safetensors", out / "base" / "model.safetensors")
    rehash(out, "base/model.safetensors")
    logits = peft_checks(out)["peft logits"]
    assert list(logits.failures) == ["logits"]
