"""Rollout backends: what turns prompts into sampled responses for the train loop (`--rollout`).

    backend = make_rollout(cfg.rollout, trainer)   # in rl.trainer
    backend.sync(model, step)                  # before each step's rollout: run the current adapter
    gen = backend.generate(prompts, params)    # a loraforge.sampling.generation.Generation (+ sampler_logprobs)

- `transformers` (default): the in-process sampler of loraforge.sampling.generation on the very module being
  trained; `sync` is a no-op and there is nothing to compare.
- `vllm` (loraforge.rl.vllm_rollout): vLLM with its LoRA support; `sync` saves the adapter (adapter
  only, the base is never merged) and points a new LoRARequest at it. A separate sampler reports the
  log-prob of every token it sampled, and the loop compares them each step with the trainer's
  (`logprob_gap`, `sampler_verdict`): a sampler that silently stopped receiving the adapter is the most
  reported failure of LoRA RL (reward flat while grad norm and KL climb), and it fails the run here.
- `module:factory`: `factory(trainer)` returns any object with `generate`, `sync` and `separate`.

Backends do not score: the loop scores the decoded texts, so every backend gets the same rewards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.sampling.generation import Generation, SamplingParams, generate, left_pad


class RolloutBackend(Protocol):
    separate: bool  # True when the sampler is not the trained module (then log-probs are compared)

    def sync(self, model, step: int) -> None: ...

    def generate(self, prompts: list[str], params: SamplingParams) -> Generation: ...


@dataclass
class SampledGeneration(Generation):
    """A Generation from a separate sampler, with the log-prob it assigned to each sampled token
    (raw model distribution: logits before temperature and top-k/top-p, vLLM V1's default)."""

    sampler_logprobs: list[list[float]] | None = None


class TransformersRollout:
    """The default: loraforge.sampling.generation.generate on the trained PeftModel itself."""

    separate = False

    def __init__(self, model, tokenizer, generator: torch.Generator, batch_size: int | None, progress=None):
        self.model, self.tokenizer, self.generator, self.batch_size = model, tokenizer, generator, batch_size
        self.progress = progress  # generate's progress(rows done, rows, tokens): the run's progress display

    def sync(self, model, step: int) -> None:  # same module: nothing to sync
        return None

    def generate(self, prompts: list[str], params: SamplingParams) -> Generation:
        return generate(
            self.model,
            self.tokenizer,
            prompts,
            params,
            generator=self.generator,
            batch_size=self.batch_size,
            progress=self.progress,
        )


def generation_from_tokens(
    prompt_ids: Sequence[Sequence[int]],
    rows: Sequence[tuple[int, Sequence[int], bool]],
    tokenizer,
    pad: int,
    sampler_logprobs: Sequence[Sequence[float]] | None = None,
) -> SampledGeneration:
    """Assemble a Generation from token lists (for samplers other than loraforge.sampling.generation).

    `prompt_ids[i]` are prompt i's tokens; `rows` are (prompt index, response token ids, truncated)
    grouped by prompt as `generate` returns them. Responses keep their EOS token, as `generate` does.
    """
    p_ids, p_mask = left_pad([list(prompt_ids[pi]) for pi, _, _ in rows], pad)
    width = max(1, max(len(r) for _, r, _ in rows))
    r_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    r_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (_, resp, _) in enumerate(rows):
        if resp:
            r_ids[i, : len(resp)] = torch.tensor(list(resp), dtype=torch.long)
            r_mask[i, : len(resp)] = 1
    lengths = [len(r) for _, r, _ in rows]
    texts = [tokenizer.decode(list(r), skip_special_tokens=True) for _, r, _ in rows]
    return SampledGeneration(
        prompt_ids=p_ids,
        prompt_mask=p_mask,
        response_ids=r_ids,
        response_mask=r_mask,
        texts=texts,
        prompt_index=[pi for pi, _, _ in rows],
        truncated=torch.tensor([t for _, _, t in rows], dtype=torch.bool),
        pad_token_id=pad,
        lengths=lengths,
        sampler_logprobs=[list(map(float, lp)) for lp in sampler_logprobs] if sampler_logprobs is not None else None,
    )


# ------------------------------------------------------------------------------------------------
# the sampler-vs-trainer log-prob check (pure functions)
def logprob_gap_terms(
    sampler: Sequence[Sequence[float]], trainer: Sequence[torch.Tensor | Sequence[float]]
) -> tuple[float, int]:
    """(sum over tokens of |logp_sampler - logp_trainer|, token count) for aligned sequences; a sum
    and a count so that processes can add theirs before dividing."""
    total, count = 0.0, 0
    for s, t in zip(sampler, trainer):
        t = t.tolist() if isinstance(t, torch.Tensor) else list(t)
        if len(s) != len(t):
            raise LoraforgeError(f"the sampler returned {len(s)} log-probs for a response of {len(t)} tokens")
        total += sum(abs(float(a) - float(b)) for a, b in zip(s, t))
        count += len(t)
    return total, count


def logprob_gap(sampler: Sequence[Sequence[float]], trainer: Sequence[torch.Tensor | Sequence[float]]) -> float:
    """mean |logp_sampler - logp_trainer| over all tokens of the sequences (nats per token)."""
    total, count = logprob_gap_terms(sampler, trainer)
    return total / count if count else 0.0


def sampler_verdict(gap: float, tol: float, gap_base: float | None = None) -> str | None:
    """None when the sampler runs the current adapter as far as log-probs can tell, else why not.

    gap       mean |logp_sampler - logp_trainer(current adapter)| per token
    gap_base  mean |logp_sampler - logp_trainer(adapter disabled)| per token, when measured

    Rule 1: gap > tol. Two engines running the same weights differ only by numerics (bf16 vs fp32
            kernels: of order 1e-2 nats per token), so the default tol 0.1 leaves a wide margin.
    Rule 2: the sampler agrees at least twice better with the model WITHOUT the adapter than with it,
            and gap > tol / 4: the adapter is not applied at all. This catches a missing adapter even
            when the adapter changes the log-probs by less than tol (early in training); the tol / 4
            floor keeps it quiet when both gaps are numerical noise.
    A sampler lagging one step behind is only caught once the policy has moved by more than tol.
    """
    if not math.isfinite(gap):
        return f"the sampler's log-probs are not finite (mean |difference| {gap})"
    if gap > tol:
        return (
            f"the sampler's log-probs differ from the trainer's by {gap:.3g} nats per token on average "
            f"(> --logprob-check-tol {tol:g})"
        )
    if gap_base is not None and gap_base * 2 < gap and gap > tol / 4:
        return (
            f"the sampler's log-probs match the base model WITHOUT the adapter (mean |difference| "
            f"{gap_base:.3g}) better than the current adapter ({gap:.3g}): the adapter is not applied"
        )
    return None


def check_sampler(gap: float, tol: float, step: int, gap_base: float | None = None, engine: str = "sampler") -> None:
    """Raise a LoraforgeError when `sampler_verdict` finds the sampler is not running the current adapter."""
    why = sampler_verdict(gap, tol, gap_base)
    if why is not None:
        raise LoraforgeError(
            f"step {step}: {engine} is not running the current adapter: {why}. The adapter sync to the sampler "
            "failed (check the engine's LoRA support and --rollout settings); continuing would train on samples "
            "from a different policy (reward flat while grad norm and KL climb). Raise --logprob-check-tol only "
            "if this difference is numerical noise"
        )
