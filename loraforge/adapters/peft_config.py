"""adapter_config.json: PEFT's LoraConfig for an init, as a plain dict, and the form of it that PEFT loads exactly
as planned (checked with PEFT itself, `peft_view.adapted_by_peft`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraforge.core.errors import LoraforgeError
from loraforge.inits.config import InitConfig


def adapter_config(
    config: InitConfig, target_modules, base_model: str, fan_in_fan_out: bool, target_parameters=None
) -> dict:
    """adapter_config.json's fields: PEFT's LoraConfig with our values (init_lora_weights=True: see
    writers.write_adapter_config). Written as a dict so that PEFT need not be imported to write it; PEFT fills
    every field left out with its default on load. `target_parameters` (PEFT's ParamWrapper: fused experts, and
    linear weights PEFT would otherwise remap, see `plan_peft_form`) is written only when there are some, so a
    dense model's adapter_config.json is what older PEFT versions read too. `lora_config` turns it into the
    LoraConfig itself."""
    fields = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "use_rslora": config.rslora,
        "target_modules": sorted(target_modules) if isinstance(target_modules, (list, set, tuple)) else target_modules,
        "lora_dropout": 0.0,  # also required by PEFT's ParamWrapper (target_parameters)
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
    if target_parameters:
        fields["target_parameters"] = sorted(target_parameters)
    return fields


def lora_config(config: InitConfig, target_modules, base_model: str, fan_in_fan_out: bool, target_parameters=None):
    """The PEFT LoraConfig describing the adapter."""
    from peft import LoraConfig

    fields = adapter_config(config, target_modules, base_model, fan_in_fan_out, target_parameters)
    fields.pop("peft_type")  # LoraConfig sets it itself
    return LoraConfig(**fields)


@dataclass
class PeftForm:
    """How the targets are written in adapter_config.json, and what PEFT builds from that (checked)."""

    target_modules: object  # adapter_config's target_modules (PEFT's LoRA layers)
    target_parameters: list[str]  # adapter_config's target_parameters (PEFT's ParamWrapper)
    as_parameters: list[str] = field(default_factory=list)  # linear targets written as target_parameters
    view: dict = field(default_factory=dict)  # peft_view.adapted_by_peft of this form: (module, param) -> Adapted

    def manifest(self) -> dict:
        return {
            "target_modules": self.target_modules,
            "target_parameters": self.target_parameters,
            "modules_as_parameters": self.as_parameters,
        }


def plan_peft_form(skeleton, targets, config: InitConfig, fan_in_fan_out: bool) -> PeftForm:
    """target_modules / target_parameters that make PEFT adapt exactly TARGETS with rank r, checked on SKELETON.

    First form: linear targets in target_modules, fused experts (and routers that are not linear layers) in
    target_parameters. Where PEFT adapts something
    else from it (its transformers-5 MoE conversion moves gate_proj/up_proj/down_proj targets of DeepSeek-V3,
    GLM4-MoE, Qwen3-MoE, Qwen3-Next... to the fused experts, and the dense MLPs and shared experts lose their
    LoRA), the linear targets concerned go into target_parameters as their `.weight` instead: PEFT wraps them with
    its ParamWrapper, which saves and loads under the same keys as a LoRA Linear. A form PEFT still builds
    differently is refused, naming the modules and what PEFT would build."""
    from loraforge.models.targets import is_linear_module, peft_target_modules, peft_target_parameters

    experts = [t for t in targets if t.experts]
    linear = [t for t in targets if not t.experts]
    # 2-D weights of modules PEFT cannot wrap as a layer (a TopKRouter named in --target-modules) are parameters
    # from the start.
    moved = {t.name for t in linear if not is_linear_module(skeleton, t.name)}
    diff: dict[str, str] = {}
    for attempt in range(2):
        modules = [t for t in linear if t.name not in moved]
        params = [t for t in linear if t.name in moved] + experts
        form = PeftForm(peft_target_modules(skeleton, modules), peft_target_parameters(skeleton, params))
        form.as_parameters = sorted({t.name.rsplit(".", 1)[-1] for t in linear if t.name in moved})
        if form.target_parameters and fan_in_fan_out:  # PEFT's ParamWrapper has no fan_in_fan_out (GPT-2's Conv1D)
            diff = {"adapter_config": "needs target_parameters and fan_in_fan_out, which PEFT cannot combine"}
            break
        try:
            form.view = peft_view_of(skeleton, config, form, fan_in_fan_out)
        except ValueError as e:  # PEFT refuses the config on this model (e.g. gate_proj without up_proj on an MoE)
            diff = {"adapter_config": f"PEFT refuses it: {e}"}
            if moved == {t.name for t in linear}:
                break
            moved = {t.name for t in linear}
            continue
        diff = differences(form.view, targets, config)
        if not diff:
            return form
        if attempt == 0:
            wrong = {n.rsplit(".", 1)[-1] for n in diff}
            more = {t.name for t in linear if t.name.rsplit(".", 1)[-1] in wrong} - moved
            if not more:
                break
            moved |= more
    raise _refusal(skeleton, diff, targets)


def peft_view_of(skeleton, config: InitConfig, form: PeftForm, fan_in_fan_out: bool) -> dict:
    from loraforge.adapters.peft_view import adapted_by_peft

    cfg = adapter_config(config, form.target_modules, "", fan_in_fan_out, form.target_parameters)
    return adapted_by_peft(skeleton, cfg)


def differences(view: dict, targets, config: InitConfig) -> dict[str, str]:
    """{name: what differs} between what PEFT builds (VIEW) and the plan (TARGETS at rank r)."""
    r, diff = config.r, {}
    planned = {(t.module, t.param): t for t in targets}
    for key, t in planned.items():
        got = view.get(key)
        E = max(t.experts, 1)
        want = ((r * E, t.in_features), (t.out_features, r * E))
        if got is None:
            diff[t.name] = "PEFT does not adapt it"
        elif (got.shape_A, got.shape_B) != want or abs(got.scaling - config.scaling) > 1e-12 * config.scaling:
            diff[t.name] = (
                f"PEFT builds lora_A {list(got.shape_A)}, lora_B {list(got.shape_B)}, scaling {got.scaling:g} "
                f"instead of {list(want[0])}, {list(want[1])}, {config.scaling:g}"
            )
    for key, got in view.items():
        if key not in planned:
            diff[got.module if got.param == "weight" else f"{got.module}.{got.param}"] = (
                "PEFT adapts it though it is not a target"
            )
    return diff


def _refusal(skeleton, diff: dict[str, str], targets) -> LoraforgeError:
    import peft

    model_type = getattr(getattr(skeleton, "config", None), "model_type", type(skeleton).__name__)
    shown = "; ".join(f"{n}: {why}" for n, why in list(diff.items())[:4])
    more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
    failing = {n.rsplit(".", 1)[-1] for n in diff}
    working = sorted({t.name.rsplit(".", 1)[-1] for t in targets} - failing)
    hint = f"--target-modules {','.join(working)}" if working else "other --target-modules"
    return LoraforgeError(
        f"PEFT {peft.__version__} would not load this adapter as planned on {model_type}: {shown}{more}. No form of "
        f"adapter_config.json tried (these as target_modules, or as target_parameters) makes PEFT build them "
        f"exactly (PEFT rewrites the adapter config of some MoE models on load). Nothing was written. Use {hint}."
    )
