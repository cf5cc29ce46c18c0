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
- one prefill per DISTINCT prompt (its KV cache is then copied to its n samples), then one token per
  step with the KV cache; rows that reached EOS leave the decoding batch;
- logits / temperature, then top-k (k = -1 or 0: off), then top-p (1.0: off), then a categorical draw
  by inverse CDF with one uniform per row and step from a `torch.Generator` seeded by the caller, so a
  run is reproducible and resumable (a uniform is drawn for finished rows too, so dropping them
  changes no other row's sample); temperature 0 means greedy (argmax), the usual way evaluation
  asks for pass@1; `greedy_first=g` decodes the first g samples of each prompt greedily and samples the
  rest in the same pass (one prefill per prompt for both: `loraforge eval --greedy`);
- a row stops at any of the model's EOS ids (generation_config.eos_token_id may be a list, as for
  chat models whose turn ends with <|im_end|>); tokens after it are padding and masked out.

The model is put in eval mode (no dropout) for sampling; its previous mode is restored afterwards.
Prompts may be strings (tokenised here, no special tokens added: apply the chat template first) or
lists of token ids. Rows are processed `batch_size` prompts-times-samples at a time to bound memory.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.core.settings import MIN_TEMPERATURE


@dataclass
class SamplingParams:
    """How to sample. Defaults: the paper's training rollouts (T = 1, top-p 1, top-k off)."""

    n: int = 1  # samples per prompt (the group size G in GRPO/DAPO)
    max_new_tokens: int = 256  # response budget per sample, EOS included
    temperature: float = 1.0  # 0 = greedy decoding
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    top_k: int = -1  # keep the k most probable tokens; -1 or 0 = off
    max_prompt_tokens: int | None = None  # left-truncate longer prompts to this many tokens (None: keep all)
    greedy_first: int = 0  # the first g of each prompt's n samples are greedy (argmax), the others sampled

    def check(self) -> None:
        if self.n < 1:
            raise LoraforgeError(f"samples per prompt must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise LoraforgeError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < float("inf")):
            raise LoraforgeError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, inf), got {self.temperature}: "
                "a smaller one overflows the logits; use 0 for greedy decoding"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise LoraforgeError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise LoraforgeError(f"top-k must be -1 (off) or >= 0, got {self.top_k}")
        if not 0 <= self.greedy_first <= self.n:
            raise LoraforgeError(f"greedy samples per prompt must be in [0, n={self.n}], got {self.greedy_first}")


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
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
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


# Tokens kept beyond the limit when a prompt is cut by characters: the first tokens of a cut text may merge
# differently from the same characters in the whole text; they are the ones left truncation then drops.
CUT_SLACK_TOKENS = 16
_max_chars: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def max_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token of TOKENIZER stands for: its longest vocabulary entry as
    stored (byte-level BPE stores a byte per character, SentencePiece a character per character, byte-fallback
    tokens <0xNN> six for one byte, so no token decodes to more characters than it is long), doubled for
    normalisers that shrink text (NFKC composes two characters into one). Computed once per tokenizer."""
    try:
        return _max_chars[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    bound = 2 * max((len(t) for t in vocab), default=64)
    try:
        _max_chars[tokenizer] = bound
    except TypeError:  # not weak-referenceable: computed again next time
        pass
    return bound


def prompt_ids(tokenizer, text: str, max_prompt_tokens: int | None) -> list[int]:
    """The token ids of TEXT, left-truncated to MAX_PROMPT_TOKENS, as the paper's runs did.

    Memory and time are bounded by the setting, not by the text: a text longer than (max_prompt_tokens + 16) x
    `max_token_chars` characters is cut to that many trailing characters BEFORE it is tokenised (a 5 MB row
    would otherwise be tokenised whole: 2 GB and tens of seconds, for 512 tokens kept). Those characters hold
    at least max_prompt_tokens + 16 tokens, so the ids kept are the whole text's last max_prompt_tokens, except
    where a tokeniser's merges reach more than 16 tokens across the cut (a BPE merge joins neighbours within
    one pre-tokenised word; such a run needs a word of hundreds of characters at exactly the cut)."""
    if max_prompt_tokens is not None:
        keep = (max_prompt_tokens + CUT_SLACK_TOKENS) * max_token_chars(tokenizer)
        if len(text) > keep:
            text = text[-keep:]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        ids = ids[-max_prompt_tokens:]
    return ids


def _tokenize(tokenizer, prompts, max_prompt_tokens) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = prompt_ids(tokenizer, p, max_prompt_tokens)
        else:
            ids = [int(t) for t in p]
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                ids = ids[-max_prompt_tokens:]  # left truncation, as the paper's runs did
        if not ids:
            raise LoraforgeError(f"prompt {i} is empty after tokenisation; every prompt needs at least one token")
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


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse CDF: the token whose cumulative-probability interval holds
    u * (total mass), with u in [0, 1) one uniform per row. Pure function.

    The cumulative sum is taken in float64, so every token keeps its float32 probability mass to
    within 1e-16 (a zero-probability token, e.g. one removed by top-p, is never drawn). Unlike
    torch.multinomial, which draws one exponential per vocabulary entry (a noticeable share of a CPU
    decoding step at 49k tokens: benchmarks/RESULTS.md), it needs one random number per row.
    """
    cdf = probs.cumsum(-1, dtype=torch.float64)
    target = (u.to(torch.float64) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
    empty = probs.gather(-1, idx[:, None]).squeeze(-1) <= 0
    if bool(empty.any()):  # u * total rounded up to the total: take the last token that has mass
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1)
        idx = torch.where(empty, last, idx)
    return idx


def _draw(logits, params: SamplingParams, generator, rows: int, active: torch.Tensor, greedy=None) -> torch.Tensor:
    """The next token of each decoding row. `active` lists which of the `rows` rows of the whole
    batch are still being decoded: a uniform is drawn for every row, finished or not, so that
    dropping finished rows from the batch leaves the other rows' samples unchanged. `greedy` (rows,)
    marks rows decoded by argmax; their uniforms are drawn and unused, for the same reason."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p).softmax(-1)
    u = torch.rand(rows, generator=generator, dtype=torch.float64, device=probs.device)
    tokens = sample_from_probs(probs, u[active])
    if greedy is not None:
        tokens = torch.where(greedy[active], logits.argmax(-1), tokens)
    return tokens


def _select_rows(past, index: torch.Tensor):
    """The KV cache of the rows `index` (repeats allowed: a prompt's cache copied to its n samples)."""
    if hasattr(past, "reorder_cache"):  # transformers Cache objects (index_select on every layer)
        past.reorder_cache(index)
        return past
    return tuple(tuple(t.index_select(0, index) for t in layer) for layer in past)  # legacy tuples


@torch.inference_mode()
def _sample_rows(
    model,
    prompt_ids,
    prompt_mask,
    params,
    eos: set[int],
    pad: int,
    generator,
    expand=None,
    drop_finished: bool = True,
    greedy=None,
    on_step: Callable[[int, int], None] | None = None,
):
    """Sample one response per row; returns (ids, mask, truncated) for the rows. `on_step(rows finished,
    tokens sampled)` is called after each decoding step (counts for these rows).

    `prompt_ids`/`prompt_mask` hold the distinct prompts (left-padded) and `expand` maps every row to
    its prompt (None: one row per prompt). Each distinct prompt is prefilled once and its KV cache
    copied to its rows. With `drop_finished`, rows that ended (EOS) leave the decoding batch; the
    random draws do not depend on it (see _draw), so the samples are the same either way. `greedy`
    (rows,) bool marks the rows decoded by argmax (None: none).
    """
    device = prompt_ids.device
    rows = prompt_ids.shape[0] if expand is None else int(expand.numel())
    budget = params.max_new_tokens
    cache_kw, can_keep = model_forward_kwargs(model)
    extra = {"logits_to_keep": 1} if can_keep else {}
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        use_cache=True,
        **extra,
    )
    past = _cache_of(out)
    logits = out.logits[:, -1, :]
    attn = prompt_mask
    if expand is not None:
        past = _select_rows(past, expand)
        logits, attn = logits[expand], attn[expand]
    next_pos = attn.sum(-1, keepdim=True)  # position of the first generated token, per row
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device) if eos else None
    ids = torch.full((rows, budget), pad, dtype=torch.long, device=device)
    mask = torch.zeros((rows, budget), dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    active = torch.arange(rows, device=device)  # the rows in the decoding batch, in batch order
    used = sampled = 0
    for step in range(budget):
        nxt = _draw(logits, params, generator, rows, active, greedy)
        alive = ~finished[active]
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad))
        ids[active, step] = nxt
        mask[active, step] = alive.long()
        used = step + 1
        if eos_t is not None:
            finished[active] = finished[active] | (alive & torch.isin(nxt, eos_t))
        if on_step is not None:
            sampled += int(alive.sum())
            on_step(rows if step == budget - 1 else int(finished.sum()), sampled)
        if bool(finished.all()) or step == budget - 1:
            break
        if drop_finished:
            keep = ~finished[active]
            if not bool(keep.all()):
                sel = keep.nonzero().squeeze(-1)
                past = _select_rows(past, sel)
                active, attn, next_pos, nxt = active[sel], attn[sel], next_pos[sel], nxt[sel]
        attn = torch.cat([attn, torch.ones((attn.shape[0], 1), dtype=attn.dtype, device=device)], dim=-1)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=attn,
            position_ids=next_pos,
            use_cache=True,
            **{cache_kw: past},
        )
        past = _cache_of(out)
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    return ids[:, :used], mask[:, :used], ~finished


def generate(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    params: SamplingParams | None = None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    share_prefix: bool = True,
    drop_finished: bool = True,
    progress: Callable[[int, int, int], None] | None = None,
) -> Generation:
    """Sample `params.n` responses for every prompt; see the module docstring for the returned fields.

    Randomness comes from `generator` if given (its state advances), else from a fresh generator
    seeded with `seed`, else from torch's global RNG. `batch_size` bounds the rows (prompt x sample)
    decoded together; None decodes all rows at once.

    The two switches only change speed, never the samples (they exist to measure each and to test
    that the fast paths agree with the plain one): `share_prefix` prefills each distinct prompt once
    and copies its KV cache to its samples; `drop_finished` takes rows that hit EOS out of the
    decoding batch.

    `progress(rows done, rows in all, tokens sampled)`, when given, is called after each decoding step (how
    `loraforge train` shows a rollout's progress).
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
    sampled = [0]  # tokens sampled by the chunks already done
    try:
        for start in range(0, len(row_prompts), step):
            idx = row_prompts[start : start + step]
            distinct = sorted(set(idx)) if share_prefix else idx
            expand = None
            if len(distinct) < len(idx):  # rows of the same prompt are contiguous: prefill each prompt once
                where = {p: k for k, p in enumerate(distinct)}
                expand = torch.tensor([where[i] for i in idx], dtype=torch.long, device=device)
            p_ids, p_mask = left_pad([token_lists[i] for i in distinct], pad)
            p_ids, p_mask = p_ids.to(device), p_mask.to(device)
            greedy = None
            if params.greedy_first:  # row r of the whole call is sample r % n of its prompt
                rows = torch.arange(start, start + len(idx), device=device)
                greedy = rows % params.n < params.greedy_first
            on_step = None
            if progress is not None:

                def on_step(done, tokens, start=start):
                    progress(start + done, len(row_prompts), sampled[0] + tokens)

            try:
                r_ids, r_mask, trunc = _sample_rows(
                    model,
                    p_ids,
                    p_mask,
                    params,
                    eos,
                    pad,
                    generator,
                    expand,
                    drop_finished=drop_finished,
                    greedy=greedy,
                    on_step=on_step,
                )
            except torch.OutOfMemoryError as e:
                raise LoraforgeError(
                    f"out of memory while sampling {len(idx)} rows of up to {params.max_new_tokens} new tokens; "
                    "lower the rollout batch size (rows decoded at once), the max response length or the group size"
                ) from e
            chunks.append((r_ids.cpu(), r_mask.cpu(), trunc.cpu()))
            if progress is not None:
                sampled[0] += int(r_mask.sum())
    finally:
        model.train(was_training)

    p_ids, p_mask = left_pad([token_lists[i] for i in row_prompts], pad)
    r_width = max(c[0].shape[1] for c in chunks)
    r_ids = torch.cat([torch.nn.functional.pad(c[0], (0, r_width - c[0].shape[1]), value=pad) for c in chunks])
    r_mask = torch.cat([torch.nn.functional.pad(c[1], (0, r_width - c[1].shape[1]), value=0) for c in chunks])
    truncated = torch.cat([c[2] for c in chunks])
    lengths = r_mask.sum(-1).tolist()
    texts = [tokenizer.decode(r_ids[i, : lengths[i]].tolist(), skip_special_tokens=True) for i in range(r_ids.shape[0])]
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
