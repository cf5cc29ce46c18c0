"""`loraforge verify --quantize nf4|fp4|int8`, and every adapter whose manifest records `init --quantize`: the
adapter on the base a bitsandbytes client loads (train --quantize, a BitsAndBytesConfig in TRL).

- quantized:         per module, the relative error ||Q(base) + s B0 A0 - W||_F / ||W||_F (Q: what the
                     quantized layer computes with, models/quantize.py; base: the residual base or the original
                     model), max and median, next to Q(W) alone (what plain LoRA on the quantized original starts
                     from). Fails where the manifest recorded another value for a module (the base or the factors
                     changed since init), or where the error is not finite.
- peft logits (Q):   on a base of at most `max_params` parameters: PEFT on the base loaded with transformers'
                     BitsAndBytesConfig gives the logits of a float32 model holding the dequantized weights plus
                     the adapter (4-bit formats; LLM.int8 also quantizes activations, so int8 is only reported),
                     and how far both are from the original model (reported, not checked: that is the price of the
                     quantized base).
- formula (quantize-aware inits): `quantized_reference` recomputes the factors the way init did (inits/quantized.py).
"""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path
from typing import Optional

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.inits.methods import Method
from loraforge.ship.checks import Check

# The manifest's quant_rel and verify's own differ by float rounding, and by the rare value that lands on the other
# side of a rounding boundary on another machine: far below 0.1% of the error itself.
RECORDED_RTOL = 1e-3
# PEFT on the 4-bit base against the float32 simulation of it: the same weights, summed in another order.
LOGIT_TOL = 1e-4


def effective_quantize(manifest: dict, quantize: Optional[str]) -> Optional[str]:
    """The quantization to verify against: --quantize, else the one the init was computed for; a conflict is refused."""
    recorded = (manifest.get("quantize") or {}).get("type")
    if quantize and recorded and quantize != recorded:
        raise LoraforgeError(
            f"--quantize {quantize}, but the adapter was computed for a {recorded} base (loraforge.json 'quantize'); "
            f"verify with --quantize {recorded}, or without --quantize"
        )
    if quantize:
        from loraforge.models.quantize import check_quantize, require_bitsandbytes

        check_quantize(quantize)
        require_bitsandbytes()
    return quantize or recorded


def check_quantized_errors(adapter, manifest, names, weights, residual, quantize: str, stats: dict) -> Check:
    """The `quantized` check: ||Q(base) + s B0 A0 - W|| / ||W|| per module, and Q(W) alone for comparison."""
    from loraforge.models.quantize import quantize_dequantize

    check = Check(f"quantized ({quantize})")
    base = residual if residual is not None else weights
    errs, plain = [], []
    for name in names:
        if weights.targets[name].experts:  # bitsandbytes leaves fused MoE experts unquantized
            continue
        W = weights.matrix(name)
        A, B = (t.double() for t in adapter.factors(name))
        Qb = quantize_dequantize(base.matrix(name).to(base.dtype(name)), quantize).double()
        rel = float((Qb + manifest["scaling"] * (B @ A) - W).norm() / W.norm().clamp_min(1e-300))
        alone = rel if base is weights else quantize_dequantize(W.to(weights.dtype(name)), quantize).double()
        alone = alone if isinstance(alone, float) else float((alone - W).norm() / W.norm().clamp_min(1e-300))
        stats.setdefault(name, {}).update(quant_rel=rel, quant_rel_plain=alone)
        errs.append(rel)
        plain.append(alone)
        check.checked += 1
        recorded = (manifest["modules"].get(name) or {}).get("quant_rel")
        if not torch.isfinite(torch.tensor(rel)):
            check.fail(name, f"the quantized error is {rel}: the base or the factors hold NaN or inf")
        elif recorded is not None and abs(rel - recorded) > RECORDED_RTOL * recorded:
            check.fail(
                name,
                f"relative error {rel:.4e} on a {quantize} base, but init recorded {recorded:.4e}: the base or the "
                "factors changed since init (or --base is another model)",
            )
    if errs:
        check.detail = (
            f"||Q(base) + s B0 A0 - W|| / ||W||: max {max(errs):.2e}, median {statistics.median(errs):.2e} "
            f"(Q(W) alone: max {max(plain):.2e}, median {statistics.median(plain):.2e})"
        )
    else:
        check.detail = "no module is quantized by bitsandbytes (MoE experts stay unquantized)"
    return check


def check_quantized_logits(out: Path, load_on: Path, original: Path, quantize: str, max_params: int) -> Check:
    """The `peft logits (Q)` check: PEFT on the bitsandbytes base (LOAD_ON, a local directory) against its float32
    simulation; ORIGINAL: the original model's local directory."""
    from loraforge.models.targets import build_skeleton
    from loraforge.ship.client_check import _count, logit_error, probe_tokens

    check = Check(f"peft logits ({quantize})")
    load_on, original = Path(load_on), Path(original)
    n_params = sum(p.numel() for p in build_skeleton(load_on).parameters())
    if n_params > max_params:
        check.detail = f"skipped: the base has {_count(n_params)} parameters > {_count(max_params)}"
        return check
    got, simulated, plain, want = _quantized_logits(out, load_on, original, quantize, probe_tokens)
    check.checked = 1
    gap, err, err_plain = logit_error(simulated, got), logit_error(want, got), logit_error(want, plain)
    exact = quantize != "int8"
    if exact and not gap <= LOGIT_TOL:
        check.fail(
            "logits",
            f"PEFT on the {quantize} base differs from the dequantized float32 model + adapter by {gap:.2e} "
            f"(relative, centred logits) > {LOGIT_TOL:.0e}: the client does not compute with the weights measured",
        )
        return check
    same = f"= dequantized float32 model + adapter to {gap:.1e}; " if exact else ""
    check.detail = (
        f"PEFT on the {quantize} base {same}against the original model {err:.2e} relative "
        f"(the {quantize} original alone: {err_plain:.2e}; centred logits, max over the probe tokens)"
    )
    return check


def _quantized_logits(out: Path, load_on: Path, original_path: Path, quantize: str, probe_tokens):
    """Logits of PEFT on the bitsandbytes base, of the float32 model holding its dequantized weights + the adapter,
    of the bare quantized original, and of the original model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from loraforge.models.quantize import bnb_config, dequantized_weight, pin_cpu_kernel

    def load(path, quantized: bool):
        extra = {"quantization_config": bnb_config(quantize, torch.float32), "device_map": {"": "cpu"}}
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **(extra if quantized else {}))
        except (OSError, ValueError) as e:
            raise LoraforgeError(f"transformers could not load {path} for the logit check: {e}") from None
        if quantized:
            # On CPUs with AVX512-BF16, bitsandbytes runs a gradient-free eval forward through its own bf16 kernel
            # (activations and block scales rounded to bf16: ~5e-3 on the logits), which would hide what this check
            # is for, the weights. The dequantize-then-matmul path is the one train pins on CPU and the one a
            # client computes with on a GPU.
            pin_cpu_kernel(model)
        return model

    def run(model, adapter: bool):
        with warnings.catch_warnings():  # PEFT's warnings about this load are the other checks' findings
            warnings.simplefilter("ignore")
            net = PeftModel.from_pretrained(model, str(out)) if adapter else model
            with torch.no_grad():
                return net.eval()(tokens).logits

    reference = load(original_path, False)
    tokens = probe_tokens(reference.config.get_text_config().vocab_size)
    want = run(reference, False)
    client = load(load_on, True)
    simulated = load(load_on, False)
    for name, module in client.named_modules():
        deq = dequantized_weight(module)  # (out, in): transformers quantizes GPT-2's Conv1D as a Linear
        if deq is not None:
            layer = simulated.get_submodule(name)
            layer.weight.data.copy_(deq.T if isinstance(layer, Conv1D) else deq)
    got, sim = run(client, True), run(simulated, True)
    plain = run(load(original_path, True), False) if load_on != original_path else run(client, False)
    return got, sim, plain, want


def quantized_reference(method: Method, manifest: dict, batch, W: torch.Tensor, stored_dtypes, base_dtypes):
    """For the formula check of a quantize-aware init: the matrix the method was applied to (Q(W) for rlpo/rlmo,
    else W), and a function that turns the method's factors of it into init's (pissa/olora: the refinements)."""
    from loraforge.inits.config import InitConfig
    from loraforge.inits.plan import module_seed
    from loraforge.inits.quantized import decompose_quantized, refine_principal

    q = manifest["quantize"]
    config = InitConfig(
        method=method.name,
        r=manifest["r"],
        alpha=manifest["alpha"],
        rslora=manifest["rslora"],
        seed=manifest["seed"],
        svd=manifest.get("svd") or "exact",
        quantize=q["type"],
        quant_iters=q.get("iters", 0),
    )
    if not method.residual and method.spectrum is not None:
        W = W.clone()
        decompose_quantized(batch, W, None, stored_dtypes, q["type"])
    seeds = [module_seed(manifest["seed"], t.name) for t in batch]

    def refine(A, B):
        if method.residual and method.spectrum == "top":
            return refine_principal(batch, W, A, B, config, seeds, base_dtypes)
        return A, B

    return W, refine
