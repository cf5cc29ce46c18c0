"""The model card (README.md) written into every adapter directory: Hub YAML metadata + text."""

from __future__ import annotations

import json


def _yaml_list(items) -> str:
    return "\n".join(f"- {json.dumps(i)}" for i in items)


def render_model_card(manifest: dict) -> str:
    """A model card for the adapter described by MANIFEST (the loraforge.json dict)."""
    src = manifest["source"]
    base_id = src["model_id"]
    residual = manifest["base"] is not None
    tags = ["loraforge", "lora", "peft", manifest["method"], "rlvr"]
    s = manifest["summary"]
    lines = [
        "---",
        f"base_model: {json.dumps(base_id)}",
        "library_name: peft",
        "pipeline_tag: text-generation",
        "tags:",
        _yaml_list(tags),
        "---",
        "",
        f"# {manifest['paper_name']} adapter (r={manifest['r']}) for {base_id}",
        "",
        f"Initialised by [loraforge](https://pypi.org/project/loraforge/) with `{manifest['method']}`: "
        f"A0 = {manifest['A0']}, B0 = {manifest['B0']}.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {manifest['method']} ({manifest['paper_name']}) |",
        f"| r / alpha / scaling | {manifest['r']} / {manifest['alpha']:g} / {manifest['scaling']:g}"
        f"{' (rsLoRA)' if manifest['rslora'] else ''} |",
        f"| seed | {manifest['seed']} |",
        f"| source | {base_id} @ {src['revision'] or 'local directory'} |",
        f"| target modules | {manifest['target_modules']} |",
        f"| modules | {s['modules']} |",
        f"| mean init norm ||B0 A0||_F | {s['init_norm_mean']:.4g} |",
        f"| max relative reconstruction error | {s['recon_rel_max']:.3g} |",
        "",
    ]
    if residual:
        lines += [
            "This method moves the top/bottom singular part into the adapter: the base weights become",
            "`W0 - s * B0 A0` (s = alpha / r; PiSSA/MiLoRA divide S by s as PEFT does, so s * B0 A0 is exactly the",
            "rank-r SVD part). **Load this adapter on the residual base in `base/`**, not on the original model.",
            "",
        ]
    else:
        lines += ["B0 = 0, so the adapter starts as an exact no-op: load it on the original base model.", ""]
    base_ref = "DIR/base" if residual else base_id
    lines += [
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        f'base = AutoModelForCausalLM.from_pretrained("{base_ref}")',
        'model = PeftModel.from_pretrained(base, "DIR", is_trainable=True)',
        "```",
        "",
        f"verl: `actor_rollout_ref.model.lora_adapter_path=DIR` with `actor_rollout_ref.model.path={base_ref}`.",
        "",
    ]
    return "\n".join(lines)
