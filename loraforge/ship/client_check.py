"""What a client builds from an adapter directory, checked against the manifest.

`loraforge verify`'s other checks read the files. These ask PEFT itself what it makes of them, because
PEFT does not always build what adapter_config.json says: on transformers 5 it rewrites the config of
many MoE model types (PEFT 0.21.2: the 28 whose transformers checkpoint conversion is Mixtral's or
Qwen2-MoE's, e.g. deepseek_v3, glm4_moe, qwen3_moe, qwen3_next, olmoe, mixtral; not qwen2_moe itself)
so that `gate_proj`/`up_proj`/`down_proj` (Mixtral: `w1`/`w3`/`w2`) name the fused experts'
`target_parameters` instead of modules. The dense and shared-expert MLPs then get no LoRA, their saved
tensors are dropped, and PEFT warns only about missing keys, never about unexpected ones.

- peft modules: the modules and parameters PEFT attaches LoRA to, on a meta-device skeleton of the base
  (no weights read), are exactly the manifest's modules;
- peft keys:    every tensor in adapter_model.safetensors is loaded into one of them (no unexpected key,
  no missing one, every shape fits);
- peft logits:  residualised methods, on a base of at most `max_params` parameters: the original model and
  the residual base + adapter loaded through PeftModel.from_pretrained give the same logits on a few fixed
  tokens, up to the rounding of the residual base's dtype (see LOGIT_TOL_EPS).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from loraforge.adapters.peft_view import adapted_in
from loraforge.adapters.writers import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_DIR
from loraforge.core.errors import LoraforgeError
from loraforge.ship.checks import Check

# The logit check loads two float32 copies of the base; above this many parameters it is skipped with a note.
MAX_LOGIT_PARAMS = 200_000_000
# Relative error of the centred logits, in units of eps(residual base dtype). The residual base is
# W0 - s B0 A0 rounded to its dtype, so the logits move by about that rounding: measured at most ~1 eps
# for bf16 bases (tiny models and SmolLM2-135M, every residualised method whose reconstruction check
# passes; table in docs/ship.md). A module PEFT drops or a wrong base moves them by far more (a tiny
# DeepSeek-V3 losing its dense/shared MLP LoRA: 0.2, i.e. 27 eps of bf16).
LOGIT_TOL_EPS = 4.0
LOGIT_TOL_FLOOR = 1e-4  # float32 bases: the float32 forward passes round differently (SmolLM2: 3.8e-6)
PROBE_TOKENS = 16


@dataclass
class PeftView:
    """What PEFT builds from an adapter directory on a base model's skeleton."""

    model_type: str
    declared: dict  # target_modules / target_parameters as adapter_config.json says
    effective: dict  # the same after PEFT's own rewriting (they differ when PEFT rewrote the config)
    adapted: list[str]  # module paths with LoRA; "<module>.<parameter>" for a ParamWrapper on a non-weight param
    unexpected_keys: list[str]  # tensors in the file that PEFT does not load (it never says so)
    missing_keys: list[str]  # LoRA parameters the file does not fill
    shape_error: Optional[str]  # torch's message when a tensor does not fit its parameter
    n_params: int  # parameters of the base model

    @property
    def rewritten(self) -> bool:
        return self.declared != self.effective


def peft_view(adapter_dir: str | Path, skeleton: torch.nn.Module) -> PeftView:
    """Build the PeftModel PEFT would build from ADAPTER_DIR on SKELETON (a meta-device model), and load
    the adapter's tensor headers (shapes on the meta device, no data) into it the way PEFT loads them."""
    from peft import PeftConfig, PeftModel, __version__
    from peft.utils import set_peft_model_state_dict

    from loraforge.models.checkpoint import DTYPES, SafetensorsFile

    n_params = sum(p.numel() for p in skeleton.parameters())
    config = PeftConfig.from_pretrained(str(adapter_dir))
    declared = _targets(config)
    with warnings.catch_warnings():  # PEFT's own warnings: what matters in them is reported as failures
        warnings.simplefilter("ignore")
        model = PeftModel(skeleton, config, low_cpu_mem_usage=True)  # PEFT rewrites `config` in place here
    effective = _targets(config)

    # One reading of PEFT's layers for init and verify alike; a ParamWrapper on a non-weight parameter (fused
    # experts) is named "<module>.<parameter>", as the manifest names expert stacks.
    adapted = [m if p == "weight" else f"{m}.{p}" for (m, p) in adapted_in(model)]

    reader = SafetensorsFile(Path(adapter_dir) / ADAPTER_WEIGHTS)
    state = {
        k: torch.empty(info.shape, dtype=DTYPES.get(info.dtype, torch.float32), device="meta")
        for k, info in reader.tensors.items()
    }
    shape_error, unexpected, missing = None, [], []
    try:
        result = set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
        unexpected = [_file_key(k, state) for k in result.unexpected_keys]
        missing = [k for k in result.missing_keys if "lora_" in k and ".default." in k]
    except RuntimeError as e:  # load_state_dict: "size mismatch for ..." per tensor, one a line
        lines = [line.strip() for line in str(e).strip().splitlines()[1:]] or [str(e)]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        shape_error = f"PEFT {__version__} cannot load it: {lines[0]}{more}"
    return PeftView(
        getattr(skeleton.config, "model_type", "?"),
        declared,
        effective,
        adapted,
        unexpected,
        missing,
        shape_error,
        n_params,
    )


def _file_key(key: str, file_keys) -> str:
    """The file's name for KEY, which PEFT may have renamed on load (e.g. `lora_magnitude_vector` + `.weight`)."""
    if key in file_keys:
        return key
    return next((k for k in file_keys if key.startswith(k + ".")), key)


def _targets(config) -> dict:
    def norm(v):
        return sorted(v) if isinstance(v, (set, list, tuple)) else v

    return {
        "target_modules": norm(config.target_modules),
        "target_parameters": norm(getattr(config, "target_parameters", None) or []),
    }


def client_checks(out: Path, manifest: dict, source, residual: bool, max_params: int = MAX_LOGIT_PARAMS) -> list[Check]:
    """The checks on what PEFT builds from OUT: modules, keys and (residualised methods) logits. SOURCE: the
    original model, as verify resolved it (models/source.Source)."""
    from loraforge.models.targets import build_skeleton

    out = Path(out)
    modules, keys = Check("peft modules"), Check("peft keys")
    base_dir = out / (manifest.get("base") or BASE_DIR)
    # The skeleton of what the client loads: the residual base for residualised methods, else the original.
    load_on = base_dir if residual and (base_dir / "config.json").is_file() else source.path
    logits = Check("peft logits", applies=residual)
    try:
        view = peft_view(out, build_skeleton(load_on))
    except LoraforgeError:
        raise
    except Exception as e:  # whatever PEFT raises (ValueError, TypeError, AttributeError...), a client gets it too
        from peft import __version__

        modules.fail(ADAPTER_CONFIG, f"PEFT {__version__} cannot build a model from it: {type(e).__name__}: {e}")
        keys.detail = logits.detail = "skipped: PEFT builds nothing (see peft modules)"
        return [modules, keys, logits]
    _compare_modules(view, list(manifest["modules"]), modules)
    _check_keys(view, keys)
    if not residual:
        logits.detail = "B0 = 0: the adapter starts as a no-op (see B0 = 0)"
    elif view.n_params > max_params:
        logits.detail = f"skipped: the base has {_count(view.n_params)} parameters > {_count(max_params)}"
    elif not (base_dir / "config.json").is_file():
        logits.detail = "skipped: no residual base (see reconstruction)"
    elif view.shape_error:
        logits.detail = "skipped: PEFT cannot load the adapter (see peft keys)"
    else:
        _compare_logits(source.path, base_dir, out, logits)
    return [modules, keys, logits]


def _count(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 10**7 else f"{n:,}"


def _compare_modules(view: PeftView, expected: list[str], check: Check) -> None:
    from peft import __version__

    adapted = set(view.adapted)
    check.checked = len(expected)
    why_missing = "PEFT attaches no LoRA to it: adapter_config.json's target_modules do not select it"
    why_extra = "PEFT attaches LoRA here, but the manifest does not list it"
    if view.rewritten:
        dropped = sorted(set(_names(view.declared["target_modules"])) - set(_names(view.effective["target_modules"])))
        added = sorted(set(view.effective["target_parameters"]) - set(view.declared["target_parameters"]))
        why_missing = (
            f"PEFT {__version__} moved {'/'.join(dropped)} to the experts' target_parameters for model type "
            f"{view.model_type}: this module gets no LoRA, and its tensors are dropped on load"
        )
        why_extra = (
            f"PEFT {__version__} added target_parameters {', '.join(added)} for model type {view.model_type}: "
            "a LoRA the manifest does not list (PEFT's default init, not the method's)"
        )
        check.detail = (
            f"PEFT {__version__} rewrites adapter_config.json for {view.model_type}: target_modules lose "
            f"{', '.join(dropped)}, target_parameters gain {', '.join(added)}. Re-run init with --target-modules "
            f"leaving out {', '.join(dropped)}"
        )
    for name in expected:
        if name not in adapted:
            check.fail(name, why_missing)
    for name in view.adapted:
        if name not in expected:
            check.fail(name, why_extra)
    if check.ok:
        check.detail = f"PEFT attaches LoRA to exactly the manifest's {len(expected)} modules ({view.model_type})"


def _names(target_modules) -> list[str]:
    if isinstance(target_modules, str):
        return [target_modules]
    return list(target_modules or [])


def _check_keys(view: PeftView, check: Check) -> None:
    check.checked = 1
    if view.shape_error:
        check.fail(ADAPTER_WEIGHTS, view.shape_error)
        return
    for key in view.unexpected_keys:
        check.fail(key, "is in adapter_model.safetensors but PEFT loads it nowhere (and does not say so)")
    for key in view.missing_keys:
        check.fail(key, "PEFT creates this LoRA parameter but adapter_model.safetensors does not fill it")
    if check.ok:
        check.detail = "every tensor in adapter_model.safetensors loads into a LoRA parameter, and none is missing"


def probe_tokens(vocab_size: int) -> torch.Tensor:
    """A few fixed token ids (seeded), the same on every machine."""
    return torch.randint(0, vocab_size, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))


def logit_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Relative error of centred logits: ||d - mean(d)|| / ||l - mean(l)|| per position, the max.

    Softmax ignores a constant added to a position's logits, so the mean over the vocabulary is removed
    before comparing (it would otherwise dominate the norm and hide a real change)."""
    ref = reference.double() - reference.double().mean(-1, keepdim=True)
    diff = other.double() - other.double().mean(-1, keepdim=True) - ref
    return float((diff.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)).max())


def _compare_logits(original: Path, base_dir: Path, out: Path, check: Check) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load(path):
        try:
            return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        except (OSError, ValueError) as e:
            raise LoraforgeError(f"transformers could not load {path} for the logit check: {e}") from None

    reference = load(original)
    tokens = probe_tokens(reference.config.get_text_config().vocab_size)
    with torch.no_grad():
        want = reference(tokens).logits
    del reference
    base_dtype = _stored_dtype(base_dir)
    client = load(base_dir)
    check.checked = 1
    try:
        with warnings.catch_warnings():  # PEFT's warnings about this load are the other checks' findings
            warnings.simplefilter("ignore")
            client = PeftModel.from_pretrained(client, str(out)).eval()
        with torch.no_grad():
            got = client(tokens).logits
    except Exception as e:  # whatever PEFT or the model raises, a client gets it too
        check.fail("logits", f"PEFT cannot run the adapter on {base_dir}: {type(e).__name__}: {e}")
        return
    if got.shape != want.shape:
        check.fail("logits", f"the logits have shape {list(got.shape)}, the original model's {list(want.shape)}")
        return
    err = logit_error(want, got)
    tol = max(LOGIT_TOL_EPS * torch.finfo(base_dtype).eps, LOGIT_TOL_FLOOR)
    dtype = str(base_dtype).removeprefix("torch.")
    if not err <= tol:
        check.fail(
            "logits",
            f"residual base + adapter loaded by PEFT differ from the original model by {err:.2e} (relative, "
            f"centred logits on {PROBE_TOKENS} tokens) > {tol:.1e} ({dtype} base): a client does not get the "
            "original model back",
        )
    else:
        check.detail = (
            f"residual base + adapter = original model to {err:.1e} relative (tolerance {tol:.1e}, {dtype} base)"
        )


def _stored_dtype(model_dir: Path) -> torch.dtype:
    """The floating dtype the model's weights are stored in (the first floating tensor of its first shard)."""
    from loraforge.models.checkpoint import DTYPES, SafetensorsFile

    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        for info in SafetensorsFile(shard).tensors.values():
            if DTYPES[info.dtype].is_floating_point:
                return DTYPES[info.dtype]
    return torch.float32
