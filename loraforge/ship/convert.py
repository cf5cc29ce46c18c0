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
from loraforge.adapters.lineage import read_lineage
from loraforge.adapters.writers import ADAPTER_WEIGHTS
from loraforge.core.clients import vllm_serve_command
from loraforge.core.errors import LoraforgeError
from loraforge.models.checkpoint import sha256_file
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


def _check_factors(ad: Adapter, role: str, stacks: dict[str, int]) -> None:
    """writers.check_tensor on every factor of AD (one tensor at a time; a fused stack names the expert)."""
    from loraforge.adapters import writers

    for name in ad.modules:
        for which, t in zip("AB", ad.factors(name)):
            writers.check_tensor(writers.adapter_key(name, which), t, stacks.get(name, 1), role)


def convert_adapter(trained: str | Path, init: str | Path, out: str | Path, overwrite: bool = False) -> ConvertResult:
    """Write to OUT the rank-2r LoRA for the original base equivalent to TRAINED on INIT's residual base."""
    from loraforge.adapters import writers
    from loraforge.inits.methods import METHODS

    out = Path(out)
    check_output(out, {"TRAINED_ADAPTER": trained, "--init": init})  # before any work
    init_ad = load_adapter(init, "--init")
    manifest = init_ad.manifest
    if manifest is None or manifest.get("method") not in METHODS:
        raise LoraforgeError(
            f"--init {init} has no loraforge.json naming a method: pass the directory `loraforge init` wrote, "
            "the one the adapter was trained from."
        )
    method = METHODS[manifest["method"]]
    original = manifest["source"]["model_id"]
    trained_ad = load_adapter(trained, "TRAINED_ADAPTER")
    stacks = _expert_stacks(init_ad)
    # the writer's check on what is read, each expert named: a lineage record says which init the adapter was
    # trained from, not that its factors are sound; and a B0 = 0 adapter is handed on as it is
    for ad, role in ((trained_ad, f"TRAINED_ADAPTER {trained}"), (init_ad, f"--init {init}")):
        _check_factors(ad, role, stacks)
    check_lineage(trained_ad, init_ad)  # then: a wrong --init must not even say "nothing to convert"
    if not method.residual:
        return ConvertResult(
            needed=False,
            message=(
                f"{method.name} starts from B0 = 0 and leaves the base untouched, so {trained} already is a plain "
                f"rank-{manifest['r']} LoRA for the original base {original}: serve or merge it as is "
                f"({vllm_serve_command(original, str(trained), manifest['r'])}). Nothing written."
            ),
        )

    for ad, role in ((trained_ad, "TRAINED_ADAPTER"), (init_ad, "--init")):
        ad.check_plain_lora(f"convert ({role})")
    _check_matches(trained_ad, init_ad)

    r2 = 2 * trained_ad.r
    alpha2 = converted_alpha(trained_ad.alpha, trained_ad.r, trained_ad.rslora)
    factors = {}
    for name in trained_ad.modules:
        A, B = trained_ad.factors(name)
        A0, B0 = init_ad.factors(name)
        factors[name] = concat_factors(A, B, A0, B0, stacks.get(name, 1))

    with writers.staged_dir(out, overwrite) as tmp:
        # Tensors that are not LoRA factors (e.g. modules_to_save copies) do not depend on the base:
        # carried over unchanged.
        other = {k: trained_ad.read(k).contiguous() for k in trained_ad.other_keys}
        adapter_sha = writers.write_adapter_weights(tmp / writers.ADAPTER_WEIGHTS, factors, extra=other)
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
            "files": {writers.ADAPTER_WEIGHTS: adapter_sha},
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
            f"{method.name}: {len(factors)} modules, rank {trained_ad.r} -> {r2}, "
            f"alpha {trained_ad.alpha:g} -> {alpha2:g} "
            f"(scaling {trained_ad.scaling:g} kept) -> {out}. Load it on the original base {original}: "
            f"{vllm_serve_command(original, str(out), r2)}"
        ),
    )


def check_output(out: Path, adapters: dict[str, str | Path]) -> None:
    """The path rule (core/paths) for a library caller of convert: -o must not be, contain or lie inside
    the adapters it reads, the init's residual base, or the original model their manifests name."""
    from loraforge.adapters.directory import related_paths
    from loraforge.core.paths import check_paths, name_path

    inputs = []
    for flag, given in adapters.items():
        inputs.append(name_path(flag, given))
        inputs += [name_path(what, path) for what, path in related_paths(given)]
    check_paths(inputs, [name_path("-o", out)])


# Without a lineage file, how far a trained adapter may be from an init it was trained from
# (`init_distance`): the median over modules of how much each row of A (column of B) changed ALONG the
# init's row, relative to it; and, for B0 = 0 inits, how large B grew relative to A0. Measured with
# adapters fake-trained from their own init (each factor moved by 5% of its mean size; tests/test_convert.py
# and docs/ship.md): matched pairs change <= 0.010 along (B growth <= 0.060); another method's init of the
# same model >= 0.535 along on the tiny test llama, >= 0.156 on SmolLM2-135M (milora vs olora-tail: the same
# bottom singular directions, scaled by sqrt(S/s) or not: the closest pair), or B growth >= 0.90 (an
# olora-trained adapter against rlpo's init, which has the same A0).
MAX_INIT_DISTANCE = 0.1
MAX_B_GROWTH = 0.5


def check_lineage(trained: Adapter, init: Adapter) -> None:
    """Refuse an --init that TRAINED was not trained from.

    With TRAINED/loraforge-lineage.json (written by `loraforge train`) the init's adapter sha256 must
    be the recorded one. Without it (an adapter trained elsewhere) the trained factors must still be
    near the init's: training moves A and B a little, another init is a different point altogether."""
    lineage = read_lineage(trained.path)
    if lineage is not None:
        recorded = lineage["init"]  # checked by read_lineage: files is a map of names to sha256 or null
        want = recorded["files"].get(ADAPTER_WEIGHTS)
        got = sha256_file(init.weights_file)
        if want != got:
            raise LoraforgeError(
                f"TRAINED_ADAPTER {trained.path} was trained from the init at {recorded.get('path')} "
                f"({recorded.get('method')}, adapter sha256 {str(want)[:12]}...), but --init {init.path} is a "
                f"different init ({(init.manifest or {}).get('method')}, sha256 {got[:12]}...). "
                f"Pass --init {recorded.get('path')}."
            )
        return
    distance = init_distance(trained, init)
    if distance is None:
        return
    along, growth = distance
    if not along <= MAX_INIT_DISTANCE:
        raise LoraforgeError(
            f"TRAINED_ADAPTER {trained.path} is far from --init {init.path}: its factors differ from the init's by "
            f"{along:.2f} along the init's directions (median over modules; an adapter trained from an init stays "
            f"within {MAX_INIT_DISTANCE}). It was not trained from this init (another method or model?). Pass the "
            "init directory the adapter was trained from."
        )
    if not growth <= MAX_B_GROWTH:
        raise LoraforgeError(
            f"TRAINED_ADAPTER {trained.path} has B as large as A ({growth:.2f} of ||A0||, median over modules), but "
            f"--init {init.path} starts from B0 = 0 (an adapter trained from it stays within {MAX_B_GROWTH}): it was "
            "not trained from this init (from olora or olora-tail, whose A0 is the same?). Pass the init directory "
            "the adapter was trained from."
        )


def init_distance(trained: Adapter, init: Adapter) -> Optional[tuple[float, float]]:
    """(median over modules of the along-the-init change, median of ||B|| / ||A0|| where B0 = 0 else 0).

    The change of a row a_i of A against the init's a0_i is |<a_i, a0_i> / ||a0_i||^2 - 1|: 0 for the
    init itself, small after training (a training step is not aligned with a0_i, and its projection on
    one direction is ~1/sqrt(in_features) of it), 1 for an init with other directions, |c - 1| for one
    that only rescales them (pissa vs olora, milora vs olora-tail). The median over rows ignores a few
    tiny rows that training moves a lot. B's columns likewise where B0 != 0; where B0 = 0, B grows from
    zero, and ||B|| / ||A0|| tells an adapter trained from OLoRA (B ~ U_r) from one trained from rlpo
    (the same A0 = V_r^T). None when no module can be compared (shapes differ: _check_matches says so)."""
    import torch

    along, growth = [], []
    for name in init.modules:
        if name not in trained.factor_keys:
            continue
        (A, B), (A0, B0) = trained.factors(name), init.factors(name)
        if A.shape != A0.shape or B.shape != B0.shape:
            return None
        A, B, A0, B0 = (t.double() for t in (A, B, A0, B0))
        d = [_along_change(A, A0, dim=1)]
        if float(B0.norm()) > 0:
            d.append(_along_change(B, B0, dim=0))
        elif float(A0.norm()) > 0:
            growth.append(float(B.norm() / A0.norm()))
        d = [x for x in d if x is not None]
        if d:
            along.append(max(d))
    if not along:
        return None
    return float(torch.tensor(along).median()), float(torch.tensor(growth).median()) if growth else 0.0


def _along_change(x, x0, dim: int) -> Optional[float]:
    """Median over the rows (dim=1) or columns (dim=0) of X0 that are nonzero of |<x, x0> / ||x0||^2 - 1|."""
    n0 = (x0 * x0).sum(dim=dim)
    nonzero = n0 > 0
    if not bool(nonzero.any()):
        return None
    ratio = (x * x0).sum(dim=dim)[nonzero] / n0[nonzero]
    return float((ratio - 1).abs().median())


def _check_matches(trained: Adapter, init: Adapter) -> None:
    """The trained adapter must be the init's adapter after training: same modules, r and scaling."""
    if trained.r != init.r:
        hint = " It looks converted already." if trained.r == 2 * init.r else ""
        raise LoraforgeError(
            f"TRAINED_ADAPTER has r = {trained.r} but --init has r = {init.r}: "
            f"it was not trained from this init.{hint} "
            "Pass the init directory the adapter was trained from."
        )
    if not math.isclose(trained.scaling, init.scaling, rel_tol=1e-12):
        raise LoraforgeError(
            f"TRAINED_ADAPTER's scaling is {trained.scaling:g} (alpha {trained.alpha:g}, rsLoRA {trained.rslora}) "
            f"but the init's is {init.scaling:g} (alpha {init.alpha:g}, rsLoRA {init.rslora}). "
            "The residual base subtracted s B0 A0 with the init's scaling; "
            "train with the init's adapter_config.json unchanged."
        )
    missing = [m for m in init.modules if m not in trained.factor_keys]
    extra = [m for m in trained.modules if m not in init.factor_keys]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the init does not"
        raise LoraforgeError(
            f"TRAINED_ADAPTER {what} ({len(missing)} missing, {len(extra)} extra modules): "
            "it was not trained from this init. Pass the init directory the adapter was trained from."
        )
    for name in init.modules:
        A, B = trained.factors(name)
        A0, B0 = init.factors(name)
        if A.shape != A0.shape or B.shape != B0.shape:
            raise LoraforgeError(
                f"Module {name}: TRAINED_ADAPTER has A {list(A.shape)}, B {list(B.shape)}; "
                f"the init has A {list(A0.shape)}, "
                f"B {list(B0.shape)}. Pass the init directory the adapter was trained from."
            )
