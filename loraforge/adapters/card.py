"""Model cards (README.md): Hub YAML metadata + text that says what the adapter is and how to load it.

Three cards: the adapter written by `loraforge init` (render_model_card), the residual base pushed
as its own repository (render_base_card) and a converted rank-2r adapter (render_converted_card).
`CardRefs` says where things live: placeholders (DIR, DIR/base) for a local directory, repository
ids once pushed. Strings in the YAML block are JSON-quoted, which is valid YAML for any id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from loraforge.core.clients import vllm_serve_command

# The paper as the README names it (tests/test_push.py checks that the two agree), and where loraforge lives: the
# repository, since loraforge is not on the package index (installed from a clone).
ARXIV_ID = "2606.31813"
PAPER = (
    '"Geometry-Preserving Orthonormal Initialization for Low-Rank Adaptation in RLVR" '
    f"([arXiv {ARXIV_ID}](https://arxiv.org/abs/{ARXIV_ID}))"
)
REPOSITORY = "https://github.com/loraforge/loraforge"
LORAFORGE = f"[loraforge]({REPOSITORY})"


@dataclass
class CardRefs:
    """Where the adapter, the model to load it on, and the original model are."""

    adapter: str  # the adapter: "DIR" locally, the repo id once pushed
    base: str  # what the adapter must be loaded on: the original model, or the residual base
    original: str  # the pretrained model the init was computed from
    revision: Optional[str] = None  # branch the adapter (and residual base) were pushed to
    original_revision: Optional[str] = None  # commit of the original model the init read
    base_is_repo: bool = False  # True once the residual base is a Hub repository

    @classmethod
    def local(cls, manifest: dict) -> "CardRefs":
        src = manifest["source"]
        residual = manifest.get("base") is not None
        base = f"DIR/{manifest['base']}" if residual else src["model_id"]
        return cls("DIR", base, src["model_id"], original_revision=src.get("revision"))


def _q(value) -> str:
    return json.dumps(value)


def _front_matter(base_model: str, tags: list[str], library: str = "peft", relation: Optional[str] = None) -> list[str]:
    lines = ["---", f"base_model: {_q(base_model)}"]
    if relation:
        lines.append(f"base_model_relation: {relation}")
    lines += [f"library_name: {library}", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {_q(t)}" for t in dict.fromkeys(tags)]
    return lines + ["---", ""]


def _modules_text(target_modules) -> str:
    return ", ".join(target_modules) if isinstance(target_modules, list) else str(target_modules)


def _rev_arg(revision: Optional[str]) -> str:
    return f', revision="{revision}"' if revision and revision != "main" else ""


def _load_sections(refs: CardRefs, r: int, alpha: float, rslora: bool, target_modules) -> list[str]:
    """How to load the adapter with PEFT, TRL, verl and vLLM."""
    rev = _rev_arg(refs.revision)
    base_rev = _rev_arg(refs.revision if refs.base_is_repo else refs.original_revision)
    # verl and vLLM take the adapter as a local directory: download a pushed one first.
    local = refs.adapter if refs.adapter == "DIR" else "./adapter"
    download = (
        []
        if refs.adapter == "DIR"
        else [
            f"verl and vLLM read the adapter from disk: `hf download {refs.adapter}"
            + (f" --revision {refs.revision}" if refs.revision and refs.revision != "main" else "")
            + " --local-dir ./adapter`.",
            "",
        ]
    )
    rs = " actor_rollout_ref.model.use_rslora=True" if rslora else ""
    return [
        "## Load",
        "",
        "PEFT (training or inference):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        f'base = AutoModelForCausalLM.from_pretrained("{refs.base}"{base_rev}, dtype="auto")',
        f'model = PeftModel.from_pretrained(base, "{refs.adapter}"{rev}, is_trainable=True)',
        "```",
        "",
        "TRL (GRPO): pass the PeftModel above as `model` and no `peft_config`:",
        "",
        "```python",
        "from trl import GRPOConfig, GRPOTrainer",
        "trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=GRPOConfig(...), train_dataset=dataset)",
        "```",
        "",
        *download,
        f"verl: `actor_rollout_ref.model.path={refs.base} actor_rollout_ref.model.lora_adapter_path={local} "
        f"actor_rollout_ref.model.lora_rank={r} actor_rollout_ref.model.lora_alpha={alpha:g}{rs}` "
        f"(target modules: {_modules_text(target_modules)}).",
        "",
        f"vLLM: `{vllm_serve_command(refs.base, local, r)}`.",
        "",
    ]


def render_model_card(manifest: dict, refs: Optional[CardRefs] = None) -> str:
    """The card for the adapter described by MANIFEST (the loraforge.json dict of an init)."""
    from loraforge.inits.methods import METHODS

    refs = refs or CardRefs.local(manifest)
    method = METHODS.get(manifest["method"])
    residual = manifest.get("base") is not None
    s = manifest["summary"]
    scaling_formula = "alpha / sqrt(r) (rsLoRA)" if manifest["rslora"] else "alpha / r"
    # Hub metadata: base_model is what the adapter is loaded on (the model tree then shows the
    # residual base between the original and the adapter).
    lines = _front_matter(
        refs.base if (not residual or refs.base_is_repo) else refs.original,
        ["loraforge", "lora", "peft", manifest["method"], "rlvr", f"arxiv:{ARXIV_ID}"],
        relation="adapter",
    )
    lines += [
        f"# {manifest['paper_name']} adapter (r={manifest['r']}) for {refs.original}",
        "",
        f"A LoRA adapter initialised by {LORAFORGE} with `{manifest['method']}` "
        f"({manifest['paper_name']}{'; ' + method.source if method else ''}), ready for RL with verifiable rewards "
        f"(GRPO, DAPO). It has not been trained: it is the starting point the method prescribes.",
        "",
        "PEFT computes `y = W x + s * B A x` with",
        "",
        f"- `A0 = {manifest['A0']}`, `B0 = {manifest['B0']}`",
        f"- `s = {scaling_formula} = {manifest['scaling']:g}`",
        "- `W0 = U S V^T` the thin SVD of each pretrained weight (singular values descending); `V_r`: the top r right "
        "singular vectors, `V_-r`: those of the r smallest nonzero singular values.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | `{manifest['method']}` ({manifest['paper_name']}) |",
        f"| r / alpha / scaling | {manifest['r']} / {manifest['alpha']:g} / {manifest['scaling']:g}"
        f"{' (rsLoRA)' if manifest['rslora'] else ''} |",
        f"| seed | {manifest['seed']} |",
        f"| SVD | {manifest.get('svd') or 'none needed'} |",
        f"| source model | `{refs.original}` |",
        f"| source revision | {refs.original_revision or 'a local copy (no Hub commit recorded)'} |",
        f"| target modules | {_modules_text(manifest['target_modules'])} |",
        *(
            [f"| target parameters (PEFT ParamWrapper) | {_modules_text(params)} |"]
            if (params := (manifest.get("peft") or {}).get("target_parameters"))
            else []
        ),
        f"| adapted modules | {s['modules']} |",
        f"| adapter / base dtype | {manifest['dtypes']['adapter']} / {manifest['dtypes']['base'] or 'unchanged'} |",
        f"| mean init norm \\|\\|B0 A0\\|\\|_F | {s['init_norm_mean']:.4g} |",
        f"| max relative reconstruction error | {s['recon_rel_max']:.3g} |",
        f"| loraforge version | {(manifest.get('versions') or {}).get('loraforge')} |",
        "",
        "## Which base model to load",
        "",
    ]
    if residual:
        lines += [
            "This method moves a rank-r singular part of every target weight into the adapter: the base weights become "
            "`W0 - s * B0 A0`, so that base + adapter equals the original model at step 0"
            + (
                " (PiSSA/MiLoRA divide S by s as PEFT does, so `s * B0 A0` is exactly the rank-r SVD part whatever "
                "alpha is)."
                if manifest["method"] in ("pissa", "milora")
                else "."
            ),
            "",
            f"**Load this adapter on the residual base `{refs.base}`, not on `{refs.original}`.** "
            "On the original model it would add the rank-r part a second time. "
            "To serve or merge a *trained* adapter on the original model, convert it first: "
            "`loraforge convert TRAINED --init DIR -o CONVERTED` writes the equivalent rank-2r LoRA.",
            "",
        ]
    else:
        lines += [
            f"B0 = 0, so the adapter starts as an exact no-op: **load it on the original model `{refs.original}`**"
            + (f" (revision `{refs.original_revision}`)." if refs.original_revision else "."),
            "",
        ]
    lines += _load_sections(refs, manifest["r"], manifest["alpha"], manifest["rslora"], manifest["target_modules"])
    if refs.adapter == "DIR":
        get = ""
    else:
        get = (
            f"Download it first (`hf download {refs.adapter} --local-dir DIR`"
            + (f", and `hf download {refs.base} --local-dir DIR/base`" if residual else "")
            + "), then "
        )
    lines += [
        "## Check it",
        "",
        f"{get}`loraforge verify DIR` recomputes every module from the original weights: "
        "base + s B0 A0 = W0, B0 = 0 or orthonormal rows where the method promises them, the factors the method gives, "
        "and the sha256 of every file listed in `loraforge.json`. "
        "`loraforge inspect DIR` shows the spectra, init norms and subspace similarities.",
        "",
        f"Method reference: {PAPER}.",
        "",
    ]
    return "\n".join(lines)


def render_base_card(manifest: dict, refs: CardRefs) -> str:
    """The card of the residual base pushed as its own repository."""
    lines = _front_matter(
        refs.original,
        ["loraforge", "residual-base", manifest["method"], "rlvr"],
        library="transformers",
        relation="finetune",
    )
    lines += [
        f"# Residual base for the {manifest['paper_name']} adapter {refs.adapter}",
        "",
        f"`{refs.original}` with every target weight replaced by `W0 - s * B0 A0` (s = {manifest['scaling']:g}, "
        f"r = {manifest['r']}), written by {LORAFORGE}. Other weights, the "
        "config and the tokenizer are unchanged.",
        "",
        f"**It is not a usable model on its own**: load it together with the adapter "
        f"[`{refs.adapter}`](https://huggingface.co/{refs.adapter}), which adds `s * B0 A0` back at step 0.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        f'base = AutoModelForCausalLM.from_pretrained("{refs.base}"{_rev_arg(refs.revision)}, dtype="auto")',
        f'model = PeftModel.from_pretrained(base, "{refs.adapter}"{_rev_arg(refs.revision)}, is_trainable=True)',
        "```",
        "",
    ]
    return "\n".join(lines)


def render_converted_card(converted: dict, refs: Optional[CardRefs] = None) -> str:
    """The card of a rank-2r adapter written by `loraforge convert` (for the ORIGINAL base)."""
    original = converted["source"]["model_id"]
    refs = refs or CardRefs("DIR", original, original, original_revision=converted["source"].get("revision"))
    init = converted["init"]
    lines = _front_matter(
        refs.base, ["loraforge", "lora", "peft", converted["method"], "rlvr", "converted"], relation="adapter"
    )
    lines += [
        f"# {converted['paper_name']}-trained adapter converted for {refs.original} (r={converted['r']})",
        "",
        f"An adapter trained from a `{init['method']}` init (r = {init['r']}, which trains on a residual base), "
        f"rewritten by `loraforge convert` as a plain LoRA for the original model:",
        "",
        f"`{converted['formula']}`",
        "",
        f"r = {converted['r']} (2 x {init['r']}), alpha = {converted['alpha']:g}, scaling s = {converted['scaling']:g} "
        f"(unchanged{', rsLoRA' if converted['rslora'] else ''}). "
        f"**Load it on the original model `{refs.original}`**; it merges like any LoRA.",
        "",
    ]
    lines += _load_sections(refs, converted["r"], converted["alpha"], converted["rslora"], "as in adapter_config.json")
    return "\n".join(lines)


def render_plain_card(config: dict, refs: CardRefs) -> str:
    """The card of a PEFT adapter loraforge did not initialise (e.g. a trained checkpoint)."""
    lines = _front_matter(refs.base, ["loraforge", "lora", "peft", "rlvr"], relation="adapter")
    lines += [
        f"# LoRA adapter (r={config['r']}) for {refs.base}",
        "",
        f"A PEFT LoRA adapter (r = {config['r']}, alpha = {config['lora_alpha']:g}"
        f"{', rsLoRA' if config.get('use_rslora') else ''}) "
        f"uploaded with {LORAFORGE}. "
        f"Load it on `{refs.base}`.",
        "",
    ]
    lines += _load_sections(
        refs, config["r"], config["lora_alpha"], config.get("use_rslora", False), config.get("target_modules")
    )
    return "\n".join(lines)
