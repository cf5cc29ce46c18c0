"""`loraforge convert`: an adapter trained from a residualised init -> a plain LoRA for the ORIGINAL base.

PiSSA, MiLoRA, OLoRA and OLoRA-tail train on a residual base W_res = W0 - s B0 A0. After training
(A, B), the model computes W_res + s B A = W0 + s (B A - B0 A0), so on the original base the same
model is the rank-2r adapter

    delta W = s (B A - B0 A0) = s [B | -B0] [A ; A0].

Its rank is 2r, so its scaling must stay s: alpha' = 2 alpha for plain LoRA (s = alpha / r =
2 alpha / 2r, exactly), alpha' = sqrt(2) alpha for rsLoRA (s = alpha / sqrt(r) = sqrt(2) alpha /
sqrt(2r), to float64 rounding). Concatenation adds no rounding, so the converted adapter on the
original base differs from residual base + trained adapter only by the rounding the residual base
was stored with (nothing with a float32 base, ~1e-3 relative per weight with a bf16 one).

Methods with B0 = 0 (lora, rlpo, rlmo, dct, wavelet) never changed the base: their trained adapter
already is a plain LoRA for the original model, and conversion is refused rather than doubling the rank.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from loraforge.adapters.directory import Adapter, load_adapter
from loraforge.core.errors import LoraforgeError
from loraforge.ship.analysis import concat_factors

CONVERTED_FORMAT = "loraforge-converted/1"


def converted_alpha(alpha: float, r: int, rslora: bool) -> float:
    """alpha' for rank 2r that keeps PEFT's scaling: alpha'/2r = alpha/r, or alpha'/sqrt(2r) = alpha/sqrt(r)."""
    # 2 * alpha is exact in binary floating point, so plain LoRA keeps bit-identical scaling.
    return alpha * math.sqrt(2.0) if rslora else 2.0 * alpha


@dataclass
class ConvertResult:
    needed: bool  # False for B0 = 0 methods: nothing was written
    message: str  # what happened, for the CLI to print
    out: Optional[Path] = None
    r: Optional[int] = None
    alpha: Optional[float] = None
    modules: int = 0


def _expert_stacks(init_ad: Adapter) -> dict[str, int]:
    """{saved module name: E} for the fused expert stacks of INIT_AD (PEFT's ParamWrapper layout interleaves the
    experts, so their factors are concatenated expert by expert), from what PEFT builds on its residual base."""
    if not any(m.get("experts") for m in init_ad.manifest["modules"].values()):
        return {}
    from loraforge.adapters.peft_view import adapted_by_peft
    from loraforge.models.targets import build_skeleton

    view = adapted_by_peft(build_skeleton(init_ad.base_dir), init_ad.config)
    return {a.path: a.experts for a in view.values() if a.experts > 1}


def convert_adapter(trained: str | Path, init: str | Path, out: str | Path, overwrite: bool = False) -> ConvertResult:
    """Write to OUT the rank-2r LoRA for the original base equivalent to TRAINED on INIT's residual base."""
    from loraforge.adapters import writers
    from loraforge.inits.methods import METHODS

    init_ad = load_adapter(init, "--init")
    manifest = init_ad.manifest
    if manifest is None or manifest.get("method") not in METHODS:
        raise LoraforgeError(
            f"--init {init} has no loraforge.json naming a method: pass the directory `loraforge init` wrote, the one the "
            "adapter was trained from."
        )
    method = METHODS[manifest["method"]]
    original = manifest["source"]["model_id"]
    if not method.residual:
        return ConvertResult(
            needed=False,
            message=(
                f"{method.name} starts from B0 = 0 and leaves the base untouched, so {trained} already is a plain "
                f"rank-{manifest['r']} LoRA for the original base {original}: serve or merge it as is. Nothing written."
            ),
        )

    trained_ad = load_adapter(trained, "TRAINED_ADAPTER")
    for ad, role in ((trained_ad, "TRAINED_ADAPTER"), (init_ad, "--init")):
        ad.check_plain_lora(f"convert ({role})")
    _check_matches(trained_ad, init_ad)

    r2 = 2 * trained_ad.r
    alpha2 = converted_alpha(trained_ad.alpha, trained_ad.r, trained_ad.rslora)
    factors = {}
    stacks = _expert_stacks(init_ad)
    for name in trained_ad.modules:
        A, B = trained_ad.factors(name)
        A0, B0 = init_ad.factors(name)
        factors[name] = concat_factors(A, B, A0, B0, stacks.get(name, 1))

    out = Path(out)
    for given, role in ((trained, "TRAINED_ADAPTER"), (init, "--init")):
        o, p = out.resolve(), Path(given).resolve()
        if o == p or o in p.parents:
            raise LoraforgeError(
                f"-o {out} is (or contains) the {role} directory, which convert reads; choose another -o."
            )
    with writers.staged_dir(out, overwrite) as tmp:
        writers.write_adapter_weights(tmp / writers.ADAPTER_WEIGHTS, factors)
        if trained_ad.other_keys:
            _append_other_tensors(tmp / writers.ADAPTER_WEIGHTS, trained_ad)
        config = dict(trained_ad.config)
        config.update(
            r=r2,
            lora_alpha=alpha2,
            init_lora_weights=True,
            base_model_name_or_path=original,
            revision=manifest["source"].get("revision"),
        )
        (tmp / writers.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        converted = {
            "format": CONVERTED_FORMAT,
            "formula": "delta W = s (B A - B0 A0) = s [B | -B0] [A ; A0]",
            "method": method.name,
            "paper_name": method.paper_name,
            "r": r2,
            "alpha": alpha2,
            "rslora": trained_ad.rslora,
            "scaling": trained_ad.scaling,
            "source": manifest["source"],
            "init": {k: manifest[k] for k in ("method", "r", "alpha", "rslora", "scaling", "seed")}
            | {"adapter_sha256": writers.sha256_file(init_ad.weights_file)},
            "trained": {
                "r": trained_ad.r,
                "alpha": trained_ad.alpha,
                "adapter_sha256": writers.sha256_file(trained_ad.weights_file),
            },
            "files": {writers.ADAPTER_WEIGHTS: writers.sha256_file(tmp / writers.ADAPTER_WEIGHTS)},
            "modules": len(factors),
        }
        writers.write_json(tmp / writers.MANIFEST, converted)
        from loraforge.adapters.card import render_converted_card

        (tmp / "README.md").write_text(render_converted_card(converted))
    return ConvertResult(
        needed=True,
        out=out,
        r=r2,
        alpha=alpha2,
        modules=len(factors),
        message=(
            f"{method.name}: {len(factors)} modules, rank {trained_ad.r} -> {r2}, alpha {trained_ad.alpha:g} -> {alpha2:g} "
            f"(scaling {trained_ad.scaling:g} kept) -> {out}. Load it on the original base {original}."
        ),
    )


def _check_matches(trained: Adapter, init: Adapter) -> None:
    """The trained adapter must be the init's adapter after training: same modules, r and scaling."""
    if trained.r != init.r:
        hint = " It looks converted already." if trained.r == 2 * init.r else ""
        raise LoraforgeError(
            f"TRAINED_ADAPTER has r = {trained.r} but --init has r = {init.r}: it was not trained from this init.{hint} "
            "Pass the init directory the adapter was trained from."
        )
    if not math.isclose(trained.scaling, init.scaling, rel_tol=1e-12):
        raise LoraforgeError(
            f"TRAINED_ADAPTER's scaling is {trained.scaling:g} (alpha {trained.alpha:g}, rsLoRA {trained.rslora}) but the "
            f"init's is {init.scaling:g} (alpha {init.alpha:g}, rsLoRA {init.rslora}). The residual base subtracted "
            "s B0 A0 with the init's scaling; train with the init's adapter_config.json unchanged."
        )
    missing = [m for m in init.modules if m not in trained.factor_keys]
    extra = [m for m in trained.modules if m not in init.factor_keys]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the init does not"
        raise LoraforgeError(
            f"TRAINED_ADAPTER {what} ({len(missing)} missing, {len(extra)} extra modules): it was not trained from this "
            "init. Pass the init directory the adapter was trained from."
        )
    for name in init.modules:
        A, B = trained.factors(name)
        A0, B0 = init.factors(name)
        if A.shape != A0.shape or B.shape != B0.shape:
            raise LoraforgeError(
                f"Module {name}: TRAINED_ADAPTER has A {list(A.shape)}, B {list(B.shape)}; the init has A {list(A0.shape)}, "
                f"B {list(B0.shape)}. Pass the init directory the adapter was trained from."
            )


def _append_other_tensors(path: Path, trained: Adapter) -> None:
    # Tensors that are not LoRA factors (e.g. modules_to_save copies) do not depend on the base:
    # carry them over unchanged.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors.update({k: trained.read(k).contiguous() for k in trained.other_keys})
    save_file(tensors, str(path), metadata={"format": "pt"})
