"""Response log-probs with each distinct prompt run once: the training-side half of "prefill once".

In GRPO/DAPO every prompt has G responses, and the prompt is usually longer than the response
(the DAPO-Math instruction plus a chat template is ~100 tokens). A plain forward pass over
[prompt + response] rows runs every prompt G times, and so does its backward pass. Here a micro-batch
is computed in two passes instead:

    1. the distinct prompts (left-padded), with the KV cache on, keeping only the last position's
       logits (they predict response token 0);
    2. the responses (all but their last token, which predicts nothing), attending to their prompt's
       KV cache copied to each of its rows (index_select, so gradients flow back through it and are
       summed over the G rows, as they are in the plain pass).

Mathematically this is the plain pass; numerically it differs by float rounding only (the matrix
products have other shapes): on the test model the log-probs agree to ~1e-6 and the gradients to
~1e-6 relative (tests/rl/test_prefix.py). Batches whose prompts are all distinct take the plain path.
"""

from __future__ import annotations

import torch

from loraforge.generation import _cache_of, _select_rows, model_forward_kwargs, position_ids_from_mask


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """(first row of each distinct prompt, row -> index of its distinct prompt), or None when no two
    rows share a prompt. Rows are compared on their real (unmasked) tokens."""
    seen: dict[tuple[int, ...], int] = {}
    firsts: list[int] = []
    expand: list[int] = []
    for row in range(prompt_ids.shape[0]):
        key = tuple(prompt_ids[row][prompt_mask[row].bool()].tolist())
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(row)
        expand.append(seen[key])
    if len(firsts) == prompt_ids.shape[0]:
        return None
    return torch.tensor(firsts, dtype=torch.long), torch.tensor(expand, dtype=torch.long)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float, entropy: bool = False):
    """log softmax(logits / temperature) at `ids`, (rows, L); with `entropy`, the entropy too (no grad)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, ids[..., None]).squeeze(-1) - lse
    if not entropy:
        return logp, None
    with torch.no_grad():
        ent = lse - (logits.softmax(-1) * logits).sum(-1)
    return logp, ent


def shared_prefix_logprobs(model, batch: dict[str, torch.Tensor], temperature: float, entropy: bool = False,
                           params: dict[str, torch.Tensor] | None = None):
    """What trainer.response_logprobs returns ((rows, R) log-probs, entropy or None), computed with one
    forward pass per distinct prompt; None when the batch has no shared prompt (use the plain pass)."""
    groups = prompt_groups(batch["prompt_ids"], batch["prompt_mask"])
    if groups is None:
        return None
    device = next(model.parameters()).device
    firsts, expand = groups[0].to(device), groups[1].to(device)
    p_ids, p_mask = batch["prompt_ids"].to(device)[firsts], batch["prompt_mask"].to(device)[firsts]
    r_ids, r_mask = batch["response_ids"].to(device), batch["response_mask"].to(device)
    keep = p_mask.any(0).nonzero()  # drop the columns that are padding for every distinct prompt
    start = int(keep[0]) if keep.numel() else 0
    p_ids, p_mask = p_ids[:, start:], p_mask[:, start:]
    cache_kw, can_keep = model_forward_kwargs(model)

    def call(**kw):
        if params is None:
            return model(**kw)
        return torch.func.functional_call(model, params, args=(), kwargs=kw, strict=False)

    extra = {"logits_to_keep": 1} if can_keep else {}
    out = call(input_ids=p_ids, attention_mask=p_mask, position_ids=position_ids_from_mask(p_mask), use_cache=True,
               **extra)
    first = out.logits[:, -1:, :][expand]  # (rows, 1, V): predicts response token 0
    lp0, ent0 = token_logprobs(first, r_ids[:, :1], temperature, entropy)
    R = r_ids.shape[1]
    if R == 1:
        return lp0, ent0
    past = _select_rows(_cache_of(out), expand)
    attn = torch.cat([p_mask[expand], r_mask[:, :-1]], dim=1)
    pos = p_mask.sum(-1)[expand, None] + torch.arange(R - 1, device=device)[None, :]
    out = call(input_ids=r_ids[:, :-1], attention_mask=attn, position_ids=pos, use_cache=True, **{cache_kw: past})
    lp, ent = token_logprobs(out.logits, r_ids[:, 1:], temperature, entropy)
    return torch.cat([lp0, lp], dim=1), (torch.cat([ent0, ent], dim=1) if entropy else None)
