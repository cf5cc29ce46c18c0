"""The policy a run trains: loading it (model, adapter, tokenizer), the rows it trains on, their log-probs,
the lr schedule, and the rollout backend it samples with. Moved out of trainer.py unchanged."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from loraforge.adapters.directory import BaseModel, resolve_base
from loraforge.core.devices import resolve_device
from loraforge.core.errors import LoraforgeError
from loraforge.rl.config import TrainConfig
from loraforge.rl.prefix import shared_prefix_logprobs, token_logprobs
from loraforge.rl.rollout import RolloutBackend, TransformersRollout
from loraforge.sampling.generation import left_pad, model_forward_kwargs, position_ids_from_mask


# ------------------------------------------------------------------------------------------------
# small data holders
@dataclass
class Sample:
    """One response in a group."""

    prompt_ids: list[int]
    response_ids: list[int]
    reward: float  # score + overlong penalty
    score: float
    acc: bool
    truncated: bool
    sampler_logp: list[float] | None = None  # per response token, from a separate sampler (vLLM)
    text: str = ""  # the decoded response


@dataclass
class Group:
    """The G responses to one prompt."""

    samples: list[Sample]
    prompt: str = ""  # the formatted prompt text

    @property
    def accs(self) -> list[float]:
        return [float(s.acc) for s in self.samples]


@dataclass
class StepBatch:
    """The kept groups of one step as training rows: the global batch, its advantages, and this process's share."""

    samples: list[Sample]  # every kept response, the same on every process
    adv: torch.Tensor  # one advantage per row of `samples`
    plan: list  # per global mini-batch: (its rows, this process's rows of it)
    mine: list[Sample]  # this process's rows, first mini-batch first
    at: dict[int, int]  # row of `samples` -> its index in `mine`


# ------------------------------------------------------------------------------------------------
# pure helpers
def lr_factor(step: int, total: int, schedule: str, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for scheduler step `step` (0-based), as verl's schedulers compute it.

    constant: linear warmup from 0 over `warmup` steps, then 1 (transformers' constant-with-warmup).
    cosine: warmup from min_ratio to 1, then half a cosine from 1 down to min_ratio at `total`.
    """
    if schedule == "constant":
        return step / max(1, warmup) if step < warmup else 1.0
    if step < warmup:
        return min_ratio + (1.0 - min_ratio) * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(min_ratio, min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def pack(samples: list[Sample], pad: int) -> dict[str, torch.Tensor]:
    """Prompt (left-padded) and response (right-padded) tensors for a list of samples."""
    p_ids, p_mask = left_pad([s.prompt_ids for s in samples], pad)
    width = max(1, max(len(s.response_ids) for s in samples))
    r_ids = torch.full((len(samples), width), pad, dtype=torch.long)
    r_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        r_ids[i, : len(s.response_ids)] = torch.tensor(s.response_ids, dtype=torch.long)
        r_mask[i, : len(s.response_ids)] = 1
    return {"prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": r_ids, "response_mask": r_mask}


def response_logprobs(
    model,
    batch: dict[str, torch.Tensor],
    temperature: float,
    entropy: bool = False,
    params: dict[str, torch.Tensor] | None = None,
    share_prefix: bool = True,
):
    """log pi(response token | prefix) per response token, (rows, R); optionally the entropy too.

    Logits are divided by the rollout temperature, as verl does, so the log-probs are those of the
    distribution the rollout sampled from (top-p/top-k are ignored here, as in verl).
    `params` overrides parameters by name (torch.func.functional_call), used for the reference adapter.
    With `share_prefix`, rows that share a prompt (a group's G responses) run it once (rl/prefix.py).
    """
    if share_prefix:
        shared = shared_prefix_logprobs(model, batch, temperature, entropy, params)
        if shared is not None:
            return shared
    device = next(model.parameters()).device
    p_ids, p_mask = batch["prompt_ids"].to(device), batch["prompt_mask"].to(device)
    r_ids, r_mask = batch["response_ids"].to(device), batch["response_mask"].to(device)
    ids = torch.cat([p_ids, r_ids], dim=1)
    attn = torch.cat([p_mask, r_mask], dim=1)
    R = r_ids.shape[1]
    kwargs = {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": position_ids_from_mask(attn),
        "use_cache": False,
    }
    if model_forward_kwargs(model)[1]:
        kwargs["logits_to_keep"] = R + 1  # no logits for the prompt: they are the bulk of the memory
    if params is None:
        logits = model(**kwargs).logits
    else:
        logits = torch.func.functional_call(model, params, args=(), kwargs=kwargs, strict=False).logits
    # position t predicts token t+1: the R response tokens are predicted by positions P-1 .. P+R-2
    return token_logprobs(logits[:, -R - 1 : -1, :], r_ids, temperature, entropy)


def adapter_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------
# loading
def load_policy(
    cfg: TrainConfig, echo: Callable[[str], None] = print, device: str | None = None, base: BaseModel | None = None
):
    """(PeftModel with the adapter trainable, tokenizer, device) for the config (`device` overrides cfg.device;
    `base`, when the caller resolved it already, is the base model to load)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from loraforge.rl.loading import load_base

    adapter = Path(cfg.adapter)
    base = base or resolve_base(adapter, cfg.model)
    model_src = base.path
    if cfg.model is None:
        echo(f"base model: {model_src} (from the adapter directory)")
    device = resolve_device(device or cfg.device)
    try:
        base = load_base(cfg, model_src, device)  # straight onto the device, quantized if asked
        tok_kw = {"gguf_file": cfg.gguf_file} if cfg.gguf_file and not cfg.tokenizer else {}
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.tokenizer or model_src, trust_remote_code=cfg.trust_remote_code, **tok_kw
        )
    except (OSError, ValueError) as e:
        raise LoraforgeError(f"--model {model_src}: could not load the model or its tokenizer ({e})") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    except RuntimeError as e:
        raise LoraforgeError(_shape_mismatch_message(str(e), adapter, model_src)) from e
    model.to(device)
    trainable = adapter_params(model)
    if not trainable:
        raise LoraforgeError(f"--adapter {adapter}: the adapter has no trainable parameters after loading")
    return model, tokenizer, device


def _shape_mismatch_message(text: str, adapter: Path, model_src: str) -> str:
    import re

    found = re.findall(
        r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) from "
        r"checkpoint, the shape in current model is (torch.Size\(\[[^\]]*\]\))",
        text,
    )
    if not found:
        return f"--adapter {adapter} does not fit --model {model_src}: {text.splitlines()[0]}"
    name, got, want = found[0]
    name = name.replace("base_model.model.", "", 1)
    m = re.match(r"(.*)\.(lora_[A-Za-z_]+)(?:\.\w+)?\.weight$", name)
    module, tensor = (m.group(1), m.group(2)) if m else (name, "weight")
    return (
        f"--adapter {adapter} does not match --model {model_src}: module {module} has {tensor} of shape "
        f"{got[11:-1]} in the adapter but {want[11:-1]} in the model ({len(found)} mismatched tensors); "
        "pass the base model the adapter was made for (for PiSSA/MiLoRA/OLoRA: the adapter's base/ directory)"
    )


def make_rollout(name: str, trainer) -> RolloutBackend:
    """The backend named by --rollout, built for `trainer` (after its setup)."""
    if name == "transformers":
        return TransformersRollout(
            trainer.model,
            trainer.tokenizer,
            trainer.generator,
            trainer.cfg.rollout_batch_size,
            progress=lambda *counts: trainer.progress.rollout(*counts),
        )
    if name == "vllm":
        from loraforge.rl.vllm_rollout import VLLMRollout

        return VLLMRollout(trainer)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise LoraforgeError(f"--rollout {name}: cannot import {attr} from {module} ({e})") from e
        return factory(trainer)
    raise LoraforgeError(f"--rollout must be transformers, vllm or module:factory, got {name!r}")
