"""Batched sampling from a causal LM with transformers: the rollout engine of `loraforge train`,
and the sampler `loraforge eval` reuses.

One public function, `generate(model, tokenizer, prompts, params)`, and two small dataclasses:

    params = SamplingParams(n=8, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=-1)
    out = generate(model, tokenizer, ["What is 2+3?"], params, seed=0)
    out.texts            # list[str], len(prompts) * n, grouped by prompt: [p0s0, p0s1, ..., p1s0, ...]
    out.prompt_index     # list[int]: which prompt each row answers
    out.response_ids     # LongTensor (rows, R), right-padded with the pad id
    out.response_mask    # LongTensor (rows, R), 1 on generated tokens (the EOS that ended a row included)
    out.prompt_ids       # LongTensor (rows, P), LEFT-padded; out.prompt_mask marks real tokens
    out.truncated        # BoolTensor (rows,): stopped by max_new_tokens, not by EOS

How it samples (the same semantics as vLLM's, which the paper's verl runs used):
- prompts are left-padded so that all rows end at the same position and decoding appends to the right;
  position ids are computed from the attention mask so padding does not shift positions;
- one prefill, then one token per step with the KV cache;
- logits / temperature, then top-k (k = -1 or 0: off), then top-p (1.0: off), then a multinomial draw
  from a `torch.Generator` seeded by the caller, so a run is reproducible and resumable;
  temperature 0 means greedy (argmax), the usual way evaluation asks for pass@1;
- a row stops at any of the model's EOS ids (generation_config.eos_token_id may be a list, as for
  chat models whose turn ends with <|im_end|>); tokens after it are padding and masked out.

The model is put in eval mode (no dropout) for sampling; its previous mode is restored afterwards.
Prompts may be strings (tokenised here, no special tokens added: apply the chat template first) or
lists of token ids. Rows are processed `batch_size` prompts-times-samples at a time to bound memory.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from loraforge.errors import LoraforgeError


@dataclass
class SamplingParams:
    """How to sample. Defaults: the paper's training rollouts (T = 1, top-p 1, top-k off)."""

    n: int = 1  # samples per prompt (the group size G in GRPO/DAPO)
    max_new_tokens: int = 256  # response budget per sample, EOS included
    temperature: float = 1.0  # 0 = greedy decoding
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    top_k: int = -1  # keep the k most probable tokens; -1 or 0 = off
    max_prompt_tokens: int | None = None  # left-truncate longer prompts to this many tokens (None: keep all)

    def check(self) -> None:
        if self.n < 1:
            raise LoraforgeError(f"samples per prompt must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise LoraforgeError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LoraforgeError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise LoraforgeError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise LoraforgeError(f"top-k must be -1 (off) or >= 0, got {self.top_k}")


@dataclass
class Generation:
    """The samples of one `generate` call; rows are grouped by prompt (all n samples of prompt 0 first)."""

    prompt_ids: torch.Tensor  # (rows, P) left-padded
    prompt_mask: torch.Tensor  # (rows, P) 1 = real prompt token
    response_ids: torch.Tensor  # (rows, R) right-padded with pad_token_id
    response_mask: torch.Tensor  # (rows, R) 1 = generated token (EOS included)
    texts: list[str]  # decoded responses, special tokens skipped
    prompt_index: list[int]  # row -> index into the prompts passed in
    truncated: torch.Tensor  # (rows,) bool: hit max_new_tokens without EOS
    pad_token_id: int = 0
    lengths: list[int] = field(default_factory=list)  # generated tokens per row (EOS included)


def eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a response: the generation config's EOS id(s) and the tokenizer's."""
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for source in (getattr(gen_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    return ids


def pad_id(tokenizer) -> int:
    """The pad id: the tokenizer's, else its EOS (padding is always masked out, so its value is moot)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, mask): the last real token of every row is in the last column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... counted over real tokens only (left padding gets position 0, never used)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p filtering (vLLM's order); filtered logits become -inf. Pure function."""
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass of the tokens strictly before it already reaches top_p:
        # the kept set is the smallest prefix whose mass is >= top_p (the top token is always kept)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _tokenize(tokenizer, prompts, max_prompt_tokens) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise LoraforgeError(f"prompt {i} is empty after tokenisation; every prompt needs at least one token")
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]  # left truncation, as the paper's runs did
        out.append(ids)
    return out


def model_forward_kwargs(model) -> tuple[str, bool]:
    """The KV-cache argument name of this model's forward (transformers 5.2x renamed `past_key_values`
    to `cache`) and whether it accepts `logits_to_keep` (compute only the last position's logits)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # unwrap a PeftModel
    params = inspect.signature(inner.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def _sample_rows(model, prompt_ids, prompt_mask, params, eos: set[int], pad: int, generator):
    """Sample one response per row of an already left-padded batch; returns (ids, mask, truncated)."""
    device = prompt_ids.device
    rows = prompt_ids.shape[0]
    attn = prompt_mask.clone()
    cache_kw, can_keep = model_forward_kwargs(model)
    extra = {"logits_to_keep": 1} if can_keep else {}
    out = model(
        input_ids=prompt_ids,
        attention_mask=attn,
        position_ids=position_ids_from_mask(attn),
        use_cache=True,
        **extra,
    )
    past = _cache_of(out)
    logits = out.logits[:, -1, :].float()
    next_pos = attn.sum(-1, keepdim=True)  # position of the first generated token, per row
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device) if eos else None
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens, masks = [], []
    for step in range(params.max_new_tokens):
        if params.temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits / params.temperature, params.top_k, params.top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        alive = ~finished
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad))
        tokens.append(nxt)
        masks.append(alive.long())
        if eos_t is not None:
            finished = finished | (alive & torch.isin(nxt, eos_t))
        if bool(finished.all()) or step == params.max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones((rows, 1), dtype=attn.dtype, device=device)], dim=-1)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=attn,
            position_ids=next_pos,
            use_cache=True,
            **{cache_kw: past},
        )
        past = _cache_of(out)
        logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1
    ids = torch.stack(tokens, dim=1)
    mask = torch.stack(masks, dim=1)
    return ids, mask, ~finished


def generate(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    params: SamplingParams | None = None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Generation:
    """Sample `params.n` responses for every prompt; see the module docstring for the returned fields.

    Randomness comes from `generator` if given (its state advances), else from a fresh generator
    seeded with `seed`, else from torch's global RNG. `batch_size` bounds the rows (prompt x sample)
    decoded together; None decodes all rows at once.
    """
    params = params or SamplingParams()
    params.check()
    if not prompts:
        raise LoraforgeError("no prompts to generate from")
    device = next(model.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    pad = pad_id(tokenizer)
    eos = eos_ids(model, tokenizer)
    token_lists = _tokenize(tokenizer, prompts, params.max_prompt_tokens)
    row_prompts = [i for i in range(len(token_lists)) for _ in range(params.n)]
    step = batch_size or len(row_prompts)

    was_training = model.training
    model.eval()
    chunks = []
    try:
        for start in range(0, len(row_prompts), step):
            idx = row_prompts[start:start + step]
            p_ids, p_mask = left_pad([token_lists[i] for i in idx], pad)
            p_ids, p_mask = p_ids.to(device), p_mask.to(device)
            try:
                r_ids, r_mask, trunc = _sample_rows(model, p_ids, p_mask, params, eos, pad, generator)
            except torch.OutOfMemoryError as e:
                raise LoraforgeError(
                    f"out of memory while sampling {len(idx)} rows of up to {params.max_new_tokens} new tokens; "
                    "lower the rollout batch size (rows decoded at once), the max response length or the group size"
                ) from e
            chunks.append((p_ids.cpu(), p_mask.cpu(), r_ids.cpu(), r_mask.cpu(), trunc.cpu()))
    finally:
        model.train(was_training)

    p_ids, p_mask = left_pad(
        [c[0][i][c[1][i].bool()].tolist() for c in chunks for i in range(c[0].shape[0])], pad
    )
    r_width = max(c[2].shape[1] for c in chunks)
    r_ids = torch.cat([torch.nn.functional.pad(c[2], (0, r_width - c[2].shape[1]), value=pad) for c in chunks])
    r_mask = torch.cat([torch.nn.functional.pad(c[3], (0, r_width - c[3].shape[1]), value=0) for c in chunks])
    truncated = torch.cat([c[4] for c in chunks])
    lengths = r_mask.sum(-1).tolist()
    texts = [
        tokenizer.decode(r_ids[i, : lengths[i]].tolist(), skip_special_tokens=True) for i in range(r_ids.shape[0])
    ]
    return Generation(
        prompt_ids=p_ids,
        prompt_mask=p_mask,
        response_ids=r_ids,
        response_mask=r_mask,
        texts=texts,
        prompt_index=row_prompts,
        truncated=truncated,
        pad_token_id=pad,
        lengths=[int(x) for x in lengths],
    )
