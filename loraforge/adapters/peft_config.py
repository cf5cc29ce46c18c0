"""adapter_config.json: PEFT's LoraConfig for an init, as a plain dict (so `init` need not import PEFT)."""

from __future__ import annotations

from loraforge.inits.config import InitConfig


def adapter_config(config: InitConfig, target_modules, base_model: str, fan_in_fan_out: bool) -> dict:
    """adapter_config.json's fields: PEFT's LoraConfig with our values (init_lora_weights=True: see
    writers.write_adapter_config). Written as a dict so that `loraforge init` need not import PEFT
    (and through it transformers); PEFT fills every field left out with its default on load.
    `lora_config` turns it into the LoraConfig itself."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "use_rslora": config.rslora,
        "target_modules": sorted(target_modules) if isinstance(target_modules, (list, set, tuple)) else target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": False,
    }


def lora_config(config: InitConfig, target_modules, base_model: str, fan_in_fan_out: bool):
    """The PEFT LoraConfig describing the adapter."""
    from peft import LoraConfig

    fields = adapter_config(config, target_modules, base_model, fan_in_fan_out)
    fields.pop("peft_type")  # LoraConfig sets it itself
    return LoraConfig(**fields)
