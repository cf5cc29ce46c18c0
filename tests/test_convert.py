"""`loraforge convert`: a trained residualised adapter becomes a rank-2r LoRA for the original base."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from adapter_helpers import fake_train, logits, one_torch_thread, rel_err  # noqa: F401 (autouse fixture)
from conftest import invoke

from loraforge import InitConfig, LoraforgeError, init_adapter
from loraforge.ship.analysis import concat_factors
from loraforge.ship.convert import convert_adapter, converted_alpha


def test_concatenated_factors_give_exactly_the_update():
    g = torch.Generator().manual_seed(0)
    A, A0 = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    B, B0 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    A2, B2 = concat_factors(A, B, A0, B0)
    assert A2.shape == (6, 7) and B2.shape == (5, 6)
    torch.testing.assert_close(
        (B2.double() @ A2.double()), B.double() @ A.double() - B0.double() @ A0.double(), rtol=0, atol=1e-12
    )
    # Mixed dtypes (a bf16-trained adapter on a float32 init) are promoted, not rounded.
    A2, B2 = concat_factors(A.bfloat16(), B.bfloat16(), A0, B0)
    assert A2.dtype == B2.dtype == torch.float32 and torch.equal(A2[3:], A0)


@pytest.mark.parametrize("alpha, r, rslora", [(8.0, 4, False), (16.0, 4, True), (3.0, 7, True), (5.0, 3, False)])
def test_converted_alpha_keeps_the_scaling(alpha, r, rslora):
    new = converted_alpha(alpha, r, rslora)
    old_s = alpha / (math.sqrt(r) if rslora else r)
    new_s = new / (math.sqrt(2 * r) if rslora else 2 * r)
    assert new_s == pytest.approx(old_s, rel=1e-15)
    if not rslora:
        assert new_s == old_s  # bit for bit: 2 alpha / 2r


@pytest.mark.parametrize(
    "arch, method, rslora",
    [
        ("llama", "pissa", False),
        ("llama", "olora-tail", False),
        ("qwen2", "milora", True),  # sharded checkpoint, rsLoRA scaling
        ("gpt2", "olora", False),  # Conv1D (fan_in_fan_out)
    ],
)
def test_original_base_plus_converted_equals_residual_base_plus_trained(tiny_models, tmp_path, arch, method, rslora):
    init = init_adapter(
        str(tiny_models[arch]), tmp_path / "init", InitConfig(method=method, r=4, rslora=rslora, base_dtype="float32")
    ).out
    trained = fake_train(init, init / "base", tmp_path / "trained")
    result = convert_adapter(trained, init, tmp_path / "conv")
    assert result.needed and result.r == 8

    served = logits(init / "base", trained)  # how the trained model was trained and evaluated
    converted = logits(tiny_models[arch], result.out)  # the original model + the converted adapter
    assert rel_err(converted, served) < 1e-5
    # The test is not vacuous: the trained adapter on the wrong (original) base is a different model.
    assert rel_err(logits(tiny_models[arch], trained), served) > 1e-3

    cfg = json.loads((result.out / "adapter_config.json").read_text())
    trained_cfg = json.loads((trained / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["use_rslora"] == rslora and cfg["init_lora_weights"] is True
    assert cfg["lora_alpha"] == converted_alpha(trained_cfg["lora_alpha"], 4, rslora)
    assert cfg["base_model_name_or_path"] == str(tiny_models[arch])
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    manifest = json.loads((result.out / "loraforge.json").read_text())
    assert manifest["format"] == "loraforge-converted/1" and manifest["init"]["method"] == method


def test_peft_scaling_of_the_converted_rslora_adapter_is_the_trained_one(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    init = init_adapter(
        str(tiny_models["llama"]), tmp_path / "init", InitConfig(method="pissa", r=4, alpha=6, rslora=True)
    ).out
    trained = fake_train(init, init / "base", tmp_path / "trained")
    out = convert_adapter(trained, init, tmp_path / "conv").out
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), str(out))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.r["default"] == 8
    assert layer.scaling["default"] == pytest.approx(6 / math.sqrt(4), rel=1e-15)


def test_bf16_residual_base_differs_only_by_its_rounding(tiny_models, tmp_path):
    init = init_adapter(str(tiny_models["llama"]), tmp_path / "init", InitConfig(method="pissa", r=4)).out  # bf16 base
    trained = fake_train(init, init / "base", tmp_path / "trained")
    out = convert_adapter(trained, init, tmp_path / "conv").out
    assert rel_err(logits(tiny_models["llama"], out), logits(init / "base", trained)) < 2e-2


@pytest.mark.parametrize("method", ["rlpo", "lora"])
def test_b0_zero_methods_need_no_conversion(tiny_models, tmp_path, method):
    init = init_adapter(str(tiny_models["llama"]), tmp_path / "init", InitConfig(method=method, r=4)).out
    trained = fake_train(init, tiny_models["llama"], tmp_path / "trained")
    res = invoke("convert", trained, "--init", init, "-o", tmp_path / "conv")
    assert res.exit_code == 0
    assert "already is a plain rank-4 LoRA" in res.output and "Nothing written" in res.output
    assert not (tmp_path / "conv").exists()


@pytest.fixture(scope="module")
def pissa_pair(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("conv-bad")
    init = init_adapter(str(tiny_models["llama"]), root / "init", InitConfig(method="pissa", r=4)).out
    return init, fake_train(init, init / "base", root / "trained")


def test_cli_converts_and_refuses_an_existing_output(pissa_pair, tmp_path):
    init, trained = pissa_pair
    res = invoke("convert", trained, "--init", init, "-o", tmp_path / "c")
    assert res.exit_code == 0 and "rank 4 -> 8, alpha 8 -> 16" in res.output and "original base" in res.output
    res = invoke("convert", trained, "--init", init, "-o", tmp_path / "c")
    assert res.exit_code == 1 and "already exists" in res.output and "--overwrite" in res.output
    assert invoke("convert", trained, "--init", init, "-o", tmp_path / "c", "--overwrite").exit_code == 0


def test_tensors_that_are_not_factors_are_carried_over(pissa_pair, tmp_path):
    # modules_to_save copies do not depend on the base: the converted adapter holds them unchanged (once dropped)
    from safetensors.torch import load_file, save_file

    init, trained = pissa_pair
    t = tmp_path / "t"
    shutil.copytree(trained, t)
    weights = load_file(str(t / "adapter_model.safetensors"))
    head = torch.randn(128, 32)
    weights["base_model.model.lm_head.modules_to_save.default.weight"] = head
    save_file(weights, str(t / "adapter_model.safetensors"), metadata={"format": "pt"})
    convert_adapter(t, init, tmp_path / "c")
    got = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    assert torch.equal(got["base_model.model.lm_head.modules_to_save.default.weight"], head)


def test_adapter_from_another_init_is_refused(tiny_models, pissa_pair, tmp_path):
    init, trained = pissa_pair
    other = init_adapter(str(tiny_models["llama"]), tmp_path / "r8", InitConfig(method="pissa", r=8)).out
    with pytest.raises(LoraforgeError, match="r = 4 but --init has r = 8"):
        convert_adapter(trained, other, tmp_path / "c")
    subset = init_adapter(
        str(tiny_models["llama"]), tmp_path / "q", InitConfig(method="pissa", r=4, target_modules=["q_proj"])
    ).out
    with pytest.raises(LoraforgeError, match="not trained from this init"):
        convert_adapter(trained, subset, tmp_path / "c")
    # Converting twice would double the rank again.
    conv = convert_adapter(trained, init, tmp_path / "c1").out
    with pytest.raises(LoraforgeError, match="looks converted already"):
        convert_adapter(conv, init, tmp_path / "c2")


def test_changed_scaling_is_refused(pissa_pair, tmp_path):
    import shutil

    init, trained = pissa_pair
    changed = tmp_path / "t"
    shutil.copytree(trained, changed)
    cfg = json.loads((changed / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 2 * cfg["lora_alpha"]
    (changed / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraforgeError, match="scaling is 4 .* the init's is 2"):
        convert_adapter(changed, init, tmp_path / "c")


def test_bad_paths_are_clear_errors(tiny_models, pissa_pair, tmp_path):
    init, trained = pissa_pair
    res = invoke("convert", tmp_path / "none", "--init", init, "-o", tmp_path / "c")
    assert res.exit_code == 1 and "TRAINED_ADAPTER" in res.output and "no such directory" in res.output
    res = invoke("convert", trained, "--init", trained, "-o", tmp_path / "c")
    assert res.exit_code == 1 and "no loraforge.json" in res.output
    res = invoke("convert", trained, "--init", tiny_models["llama"], "-o", tmp_path / "c")
    assert res.exit_code == 1 and "not a PEFT adapter directory" in res.output
    res = invoke("convert", trained, "--init", init, "-o", trained, "--overwrite")
    assert res.exit_code == 1 and "is the same path as TRAINED_ADAPTER" in res.output
    assert (trained / "adapter_model.safetensors").exists()


# --- lineage: convert refuses an --init the adapter was not trained from ---------------------------


def write_lineage(trained, init, method):
    from loraforge.models.checkpoint import sha256_file

    record = {
        "format": "loraforge-lineage/1",
        "init": {
            "path": str(init),
            "method": method,
            "files": {
                "adapter_model.safetensors": sha256_file(init / "adapter_model.safetensors"),
                "loraforge.json": sha256_file(init / "loraforge.json"),
            },
        },
    }
    (trained / "loraforge-lineage.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def trained_by_method(tiny_models, tmp_path_factory):
    """pissa, milora, olora and rlpo inits of the tiny llama (r=4), and an adapter fake-trained from each."""
    root = tmp_path_factory.mktemp("lineage")
    out = {}
    for m in ("pissa", "milora", "olora", "rlpo"):
        init = init_adapter(str(tiny_models["llama"]), root / f"init-{m}", InitConfig(method=m, r=4)).out
        base = init / "base" if (init / "base").exists() else tiny_models["llama"]
        out[m] = (init, fake_train(init, base, root / f"trained-{m}"))
    return out


def test_lineage_accepts_the_recorded_init(trained_by_method, tmp_path):
    init, trained = trained_by_method["pissa"]
    t = tmp_path / "t"
    shutil.copytree(trained, t)
    write_lineage(t, init, "pissa")
    assert convert_adapter(t, init, tmp_path / "c").needed


@pytest.mark.parametrize("other", ["milora", "olora", "rlpo"])
def test_lineage_refuses_another_init_naming_the_right_one(trained_by_method, tmp_path, other):
    init, trained = trained_by_method["pissa"]
    t = tmp_path / "t"
    shutil.copytree(trained, t)
    write_lineage(t, init, "pissa")
    res = invoke("convert", t, "--init", trained_by_method[other][0], "-o", tmp_path / "c")
    assert res.exit_code == 1 and f"Pass --init {init}" in res.output and "(pissa" in res.output, res.output
    assert f"({other}" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_damaged_lineage_is_a_clear_error(trained_by_method, tmp_path):
    init, trained = trained_by_method["pissa"]
    t = tmp_path / "t"
    shutil.copytree(trained, t)
    (t / "loraforge-lineage.json").write_text("{not json")
    with pytest.raises(LoraforgeError, match=r"loraforge-lineage.json: line 1 column 2: not valid JSON"):
        convert_adapter(t, init, tmp_path / "c")
    # a record whose `files` is a list (once an AttributeError), and one of a newer format
    write_lineage(t, init, "pissa")
    record = json.loads((t / "loraforge-lineage.json").read_text())
    record["init"]["files"] = list(record["init"]["files"])
    (t / "loraforge-lineage.json").write_text(json.dumps(record))
    with pytest.raises(LoraforgeError, match=r"key init.files is a list, expected an object; the lineage record is"):
        convert_adapter(t, init, tmp_path / "c")
    (t / "loraforge-lineage.json").write_text(json.dumps({**record, "format": "loraforge-lineage/2"}))
    with pytest.raises(LoraforgeError, match=r"not a loraforge-lineage/1 record .* Upgrade loraforge"):
        convert_adapter(t, init, tmp_path / "c")
    assert not (tmp_path / "c").exists()


# convert.init_distance on the tiny llama (r=4), adapters fake-trained from their own init (every factor
# moved by 5% of its mean size): matched pairs change by 0.001-0.020 along the init's rows (rlpo's B grows to
# 0.02 of ||A0||); every mismatched pair of these four methods by 0.535 or more (pissa-trained vs olora init:
# the same directions, another scale), or, olora-trained vs rlpo init (the same A0), B at ~1.0 of ||A0||.
# SmolLM2-135M (r=16, docs/ship.md): matched <= 0.002, mismatched >= 0.156 (milora vs olora-tail).
# Before: each mismatched pair converted with exit 0 (or, for the rlpo init, "nothing to convert").
@pytest.mark.parametrize("trained_from", ["pissa", "milora", "olora", "rlpo"])
@pytest.mark.parametrize("init_of", ["pissa", "milora", "olora", "rlpo"])
def test_without_lineage_the_distance_tells_the_init_apart(trained_by_method, trained_from, init_of):
    from loraforge.adapters.directory import load_adapter
    from loraforge.ship.convert import MAX_B_GROWTH, MAX_INIT_DISTANCE, init_distance

    along, growth = init_distance(
        load_adapter(trained_by_method[trained_from][1]), load_adapter(trained_by_method[init_of][0])
    )
    if trained_from == init_of:
        assert along < MAX_INIT_DISTANCE / 4 and growth < MAX_B_GROWTH / 10, (along, growth)
    else:
        assert along > 5 * MAX_INIT_DISTANCE or growth > 1.5 * MAX_B_GROWTH, (along, growth)


@pytest.mark.parametrize("trained_from, init_of", [("pissa", "milora"), ("olora", "rlpo"), ("milora", "olora")])
def test_without_lineage_a_wrong_init_is_refused(trained_by_method, tmp_path, trained_from, init_of):
    trained = trained_by_method[trained_from][1]
    res = invoke("convert", trained, "--init", trained_by_method[init_of][0], "-o", tmp_path / "c")
    assert res.exit_code == 1 and "not trained from this init" in res.output, res.output
    assert "Nothing written" not in res.output and not (tmp_path / "c").exists()
