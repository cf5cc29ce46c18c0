"""`save_init`: a model initialised in memory by `init_model` written as `loraforge init` writes it, and the
plain `save_pretrained` of a residualised one made loud instead of silently wrong."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from adapter_helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from conftest import make_tokenizer

from loraforge import InitConfig, LoraforgeError, init_adapter, init_model, save_init
from loraforge.adapters.directory import resolve_base
from loraforge.adapters.in_memory import RESIDUAL_PLACEHOLDER
from loraforge.adapters.writers import UNSAVED_RESIDUAL_KEY
from loraforge.ship.verify import verify_adapter

PROBE = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits.double()


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def pissa(tiny_models, tmp_path_factory):
    """init_model(pissa) on the llama fixture, its logits, and save_init's directory."""
    model = load(tiny_models["llama"])
    peft_model = init_model(model, InitConfig(method="pissa", r=4))
    out = tmp_path_factory.mktemp("save-init") / "pissa"
    result = save_init(peft_model, out, tokenizer=make_tokenizer())
    return peft_model, run(peft_model), result


def test_save_init_writes_a_directory_verify_passes(pissa, tiny_models):
    _, _, result = pissa
    out = result.out
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "base",
        "loraforge.json",
    ]
    assert (out / "base" / "tokenizer.json").exists()
    report = verify_adapter(out)
    assert report.ok, {c.name: c.failures for c in report.checks}
    status = {c.name: c.status for c in report.checks}
    assert status["formula"] == status["reconstruction"] == status["peft logits"] == status["peft modules"] == "ok"
    assert report.base_model == str(tiny_models["llama"])  # the model's name_or_path: the original


def test_the_manifest_has_the_streaming_paths_fields(pissa, tiny_models, tmp_path):
    _, _, result = pissa
    streamed = init_adapter(str(tiny_models["llama"]), tmp_path / "s", InitConfig(method="pissa", r=4)).manifest
    manifest = json.loads((result.out / "loraforge.json").read_text())
    assert list(manifest) == list(streamed)
    assert manifest["path"] == "in-memory" and manifest["base"] == "base"
    # The bf16 checkpoint was loaded as float32: that is what the init read and the residual is stored in.
    assert manifest["dtypes"] == {"adapter": "float32", "base": "float32", "source": "float32"}
    assert set(manifest["files"]) == set(streamed["files"])  # every file of OUT is hashed, as init does
    assert list(manifest["modules"]) == list(streamed["modules"])
    config = json.loads((result.out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(result.out.resolve() / "base")
    assert config["init_lora_weights"] is True and UNSAVED_RESIDUAL_KEY not in config


def test_reloading_on_the_residual_base_gives_the_in_memory_model(pissa):
    from peft import AutoPeftModelForCausalLM, PeftModel

    _, in_memory, result = pissa
    reloaded = PeftModel.from_pretrained(load(result.out / "base"), str(result.out))
    assert rel_err(run(reloaded), in_memory) < 1e-5
    # AutoPeftModel finds the base through adapter_config.json alone.
    auto = AutoPeftModelForCausalLM.from_pretrained(str(result.out), dtype=torch.float32)
    assert rel_err(run(auto), in_memory) < 1e-5


def test_plain_save_pretrained_of_a_residualised_model_is_loud(tiny_models, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    peft_model = init_model(load(tiny_models["llama"]), InitConfig(method="pissa", r=4))
    in_memory = run(peft_model)
    plain = tmp_path / "plain"
    with pytest.warns(UserWarning, match=r"without its base.*loraforge\.save_init\(model, OUT\)"):
        peft_model.save_pretrained(str(plain))
    config = json.loads((plain / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == RESIDUAL_PLACEHOLDER
    assert "save_init" in config[UNSAVED_RESIDUAL_KEY]
    # AutoPeftModel cannot load the placeholder as a model, and its error shows what to do.
    with pytest.raises(OSError, match=r"loraforge\.save_init"):
        AutoPeftModelForCausalLM.from_pretrained(str(plain))
    # PEFT on the original model: PEFT warns about our key (it cannot be made to fail) ...
    with pytest.warns(UserWarning, match=UNSAVED_RESIDUAL_KEY):
        wrong = PeftModel.from_pretrained(load(tiny_models["llama"]), str(plain))
    assert rel_err(run(wrong), in_memory) > 1e-2  # ... and this is why: the pissa part is counted twice
    # loraforge train / the verl hand-off / vLLM rollout ask resolve_base, which refuses it.
    with pytest.raises(LoraforgeError, match=r"save_init"):
        resolve_base(plain)
    with pytest.raises(LoraforgeError, match=r"save_init"):
        resolve_base(plain, str(tiny_models["llama"]))


def test_after_save_init_plain_saves_name_the_base_it_wrote(pissa, tmp_path):
    # A trainer's checkpoints (save_pretrained) after save_init: loadable on their own, no warning.
    from peft import AutoPeftModelForCausalLM

    peft_model, in_memory, result = pissa
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="Could not find a config file")  # PEFT's, offline
        peft_model.save_pretrained(str(tmp_path / "ckpt"))
    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(result.out.resolve() / "base")
    assert UNSAVED_RESIDUAL_KEY not in config
    assert resolve_base(tmp_path / "ckpt").path == str(result.out.resolve() / "base")
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32)
    assert rel_err(run(auto), in_memory) < 1e-5


def test_a_marked_checkpoint_loads_on_the_base_save_init_wrote(pissa, tiny_models, tmp_path):
    # Saved plainly before save_init (marked), trained from the same init: right on OUT/base, which
    # resolve_base accepts when it is passed explicitly.
    _, _, result = pissa
    early = init_model(load(tiny_models["llama"]), InitConfig(method="pissa", r=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        early.save_pretrained(str(tmp_path / "ckpt"))
    base = resolve_base(tmp_path / "ckpt", str(result.out / "base"))
    assert base.path == str(result.out / "base")


def test_save_init_refuses_a_trained_adapter_and_a_foreign_model(tiny_models, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = init_model(load(tiny_models["llama"]), InitConfig(method="pissa", r=4))
    with torch.no_grad():
        peft_model.base_model.model.model.layers[1].mlp.up_proj.lora_A["default"].weight.mul_(1.01)
    with pytest.raises(LoraforgeError, match=r"changed since init_model.*model\.layers\.1\.mlp\.up_proj"):
        save_init(peft_model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    plain = get_peft_model(load(tiny_models["llama"]), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(LoraforgeError, match=r"returned by loraforge\.init_model"):
        save_init(plain, tmp_path / "b")


def test_save_init_is_atomic_and_does_not_replace_without_overwrite(tiny_models, tmp_path, monkeypatch):
    from loraforge.adapters import in_memory as build

    peft_model = init_model(load(tiny_models["llama"]), InitConfig(method="milora", r=2))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("existing data")
    with pytest.raises(LoraforgeError, match="already exists"):
        save_init(peft_model, out)

    def fail(_manifest):
        raise OSError("disk full")

    monkeypatch.setattr(build, "render_model_card", fail)
    with pytest.raises(OSError, match="disk full"):
        save_init(peft_model, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial directory left beside it
    assert [p.name for p in out.iterdir()] == ["keep"]  # and the existing OUT untouched
    monkeypatch.undo()
    save_init(peft_model, out, overwrite=True)
    assert verify_adapter(out).ok


def test_b0_zero_methods_save_plainly_and_through_save_init(tiny_models, tmp_path):
    from peft import PeftModel

    peft_model = init_model(load(tiny_models["llama"]), InitConfig(method="rlpo", r=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no loraforge warning: the original base is right
        peft_model.save_pretrained(str(tmp_path / "plain"))
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_models["llama"])
    out = save_init(peft_model, tmp_path / "out").out
    assert not (out / "base").exists()
    assert verify_adapter(out).ok
    original = load(tiny_models["llama"])
    reference = run(original)
    assert rel_err(run(PeftModel.from_pretrained(original, str(out))), reference) == 0.0  # B0 = 0
