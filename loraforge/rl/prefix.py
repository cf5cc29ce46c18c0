"""Response log-probs with each distinct prompt run once: the training-side half of "prefill once".

In GRPO/DAPO every prompt has G responses, and the prompt is usually longer than the response
(the DAPO-Math instruction plus a chat template is ~100 tokens). A plain forward pass over
[prompt + response] rows runs every prompt G times, and so does its backward pass. Here a micro-batch
is computed in two passes instead:

    1. the distinct prompts (left-padded), with the KV cache on, keeping only the last position's
       logits (they predict response token 0);
    2. the responses (all but their last token, which predicts nothing), attending to their prompt's
       KV cache copied to each of its rows (index_select, so gradients flow back through it and are
       summed over the G rows, as they are in the plain pass). The rows go through this pass in
       sub-batches of similar length (`length_buckets`): a plain pass pads every row to the longest
       response of the micro-batch, which with a 128-token budget and ~70-token mean length is ~40%
       of the positions computed.

Mathematically this is the plain pass; numerically it differs by float rounding only (the matrix
products have other shapes): on the test model the log-probs agree to ~1e-6 and the gradients to
~1e-6 relative (tests/rl/test_prefix.py). Positions past a row's end get log-prob 0 (masked anyway).
"""

from __future__ import annotations

import math

import torch

from loraforge.sampling.generation import _cache_of, model_forward_kwargs, position_ids_from_mask

# the fixed cost of one more pass, in (row x token) positions: Python and kernel-launch overhead plus
# the poorer efficiency of small matrix products. Chosen by timing SmolLM2-135M's forward + backward
# on CPU with overheads 4 to 64 (benchmarks/RESULTS.md): any of 16-64 takes about 40% less time than
# one pass per micro-batch, 4 makes too many small passes; 32 sits in the flat middle.
PASS_OVERHEAD = 32


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """(first row of each distinct prompt, row -> index of its distinct prompt); rows are compared on
    their real (unmasked) tokens."""
    seen: dict[tuple[int, ...], int] = {}
    firsts: list[int] = []
    expand: list[int] = []
    for row in range(prompt_ids.shape[0]):
        key = tuple(prompt_ids[row][prompt_mask[row].bool()].tolist())
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(row)
        expand.append(seen[key])
    return torch.tensor(firsts, dtype=torch.long), torch.tensor(expand, dtype=torch.long)


def length_buckets(lengths: list[int], overhead: int | None = None) -> list[list[int]]:
    """Split rows into sub-batches of similar length, longest first: of all splits of the rows sorted
    by length, the one minimising sum over sub-batches of (rows x longest length) + overhead, i.e. the
    padded positions the passes compute plus a fixed cost per pass. Exact, by dynamic programming."""
    overhead = PASS_OVERHEAD if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # the last sub-batch is order[i:j]; its longest row is order[i]
            cost = best[i] + (j - i) * lengths[order[i]] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets = []
    j = n
    while j > 0:
        buckets.append(order[cut[j] : j])
        j = cut[j]
    return buckets[::-1]


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


def _kv_tensors(cache):
    """[(keys, values)] per layer of a transformers KV cache, or None for caches this module does not
    handle (sliding-window or other special layers: the caller then takes the plain pass)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers 5.x
        if any(getattr(layer, "is_sliding", False) or getattr(layer, "keys", None) is None for layer in layers):
            return None  # sliding windows; layers that share another layer's cache (no keys of their own)
        return [(layer.keys, layer.values) for layer in layers]
    if hasattr(cache, "key_cache"):  # transformers 4.x DynamicCache
        if getattr(cache, "sliding_window", None):
            return None
        return list(zip(cache.key_cache, cache.value_cache))
    if isinstance(cache, (tuple, list)):
        return [(layer[0], layer[1]) for layer in cache]
    return None


def _cache_rows(kv, index: torch.Tensor):
    """A fresh DynamicCache holding rows `index` of the per-layer (keys, values) `kv` (differentiable)."""
    from transformers import DynamicCache

    return DynamicCache([(k.index_select(0, index), v.index_select(0, index)) for k, v in kv])


def shared_prefix_logprobs(
    model,
    batch: dict[str, torch.Tensor],
    temperature: float,
    entropy: bool = False,
    params: dict[str, torch.Tensor] | None = None,
):
    """What trainer.response_logprobs returns ((rows, R) log-probs, entropy or None), computed with one
    forward pass per distinct prompt and length-bucketed response passes; None when the model's KV
    cache is of a kind this does not handle (use the plain pass)."""
    device = next(model.parameters()).device
    firsts, expand = (t.to(device) for t in prompt_groups(batch["prompt_ids"], batch["prompt_mask"]))
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
    out = call(
        input_ids=p_ids, attention_mask=p_mask, position_ids=position_ids_from_mask(p_mask), use_cache=True, **extra
    )
    kv = _kv_tensors(_cache_of(out))
    if kv is None:
        return None
    first = out.logits[:, -1:, :][expand]  # (rows, 1, V): predicts response token 0
    lp0, ent0 = token_logprobs(first, r_ids[:, :1], temperature, entropy)
    rows, R = r_ids.shape
    if R == 1:
        return lp0, ent0
    n_prompt = p_mask.sum(-1)
    lengths = r_mask.sum(-1).tolist()
    done, lps, ents = [], [], []
    for bucket in length_buckets(lengths):
        width = max(lengths[i] for i in bucket) - 1  # response tokens fed in: all but the last
        if width < 1:
            continue  # one-token responses: token 0 is all there is
        idx = torch.tensor(bucket, dtype=torch.long, device=device)
        own = expand[idx]
        attn = torch.cat([p_mask[own], r_mask[idx, :width]], dim=1)
        pos = n_prompt[own, None] + torch.arange(width, device=device)[None, :]
        out = call(
            input_ids=r_ids[idx, :width],
            attention_mask=attn,
            position_ids=pos,
            use_cache=True,
            **{cache_kw: _cache_rows(kv, own)},
        )
        lp, ent = token_logprobs(out.logits, r_ids[idx, 1 : width + 1], temperature, entropy)
        lps.append(torch.nn.functional.pad(lp, (0, R - 1 - width)))
        if entropy:
            ents.append(torch.nn.functional.pad(ent, (0, R - 1 - width)))
        done.append(idx)
    rest = torch.zeros(rows, R - 1, device=device)
    rest_ent = None
    if done:
        where = torch.cat(done)
        rest = rest.index_copy(0, where, torch.cat(lps))
        if entropy:
            rest_ent = torch.zeros(rows, R - 1, device=device).index_copy(0, where, torch.cat(ents))
    if entropy and rest_ent is None:
        rest_ent = torch.zeros(rows, R - 1, device=device)
    return torch.cat([lp0, rest], dim=1), (torch.cat([ent0, rest_ent], dim=1) if entropy else None)
