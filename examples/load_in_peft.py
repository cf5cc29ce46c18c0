"""Load a loraforge adapter in PEFT, check it starts where the base model is, and generate.

    python examples/load_in_peft.py MODEL_DIR ADAPTER_DIR
For residualised methods (pissa, milora, olora, olora-tail) the adapter goes on ADAPTER_DIR/base.
"""

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, adapter = Path(sys.argv[1]), Path(sys.argv[2])
manifest = json.loads((adapter / "loraforge.json").read_text())
base_dir = adapter / manifest["base"] if manifest["base"] else model_dir

tok = AutoTokenizer.from_pretrained(model_dir)
messages = [{"role": "user", "content": "What is 12 + 7? End with 'Answer: <number>'."}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)

original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = PeftModel.from_pretrained(
    AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter, is_trainable=True
)
with torch.no_grad():
    diff = (model(**ids).logits - original(**ids).logits).abs().max().item()
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(
    f"{manifest['paper_name']} r={manifest['r']}: {len(manifest['modules'])} modules, "
    f"{trainable / 1e6:.2f}M trainable parameters, max |logits - original| = {diff:.2e}"
)
out = model.generate(**ids, max_new_tokens=24, do_sample=False)
print("reply:", tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
