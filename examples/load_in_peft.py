"""Load a loraforge adapter in PEFT, check it starts where the base model is, and generate.

    python examples/load_in_peft.py MODEL_DIR ADAPTER_DIR
For residualised methods (pissa, milora, olora, olora-tail) the adapter goes on ADAPTER_DIR/base.
"""

import argparse
import json
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model_dir", type=Path, help="the base model directory the adapter was made from")
parser.add_argument("adapter", type=Path, help="the directory `loraforge init -o` wrote")
cli = parser.parse_args()  # before the imports below: --help and a wrong path answer at once
model_dir, adapter = cli.model_dir, cli.adapter
if not (model_dir / "config.json").is_file():
    parser.error(f"MODEL_DIR {model_dir} has no config.json; expected a transformers model directory")
if not (adapter / "loraforge.json").is_file():
    parser.error(f"ADAPTER_DIR {adapter} has no loraforge.json; expected a directory written by `loraforge init -o`")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

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
