"""The DAPO/GRPO policy loss (clip-higher + dual clip), its aggregation, and the k3 KL penalty.

Pure functions on tensors of shape (rows, response_tokens); `mask` is 1 on response tokens.
The formulas are those of the RLVR reference in docs/design.md, which verl's `compute_policy_loss`
(vanilla) and `kl_penalty(..., "low_var_kl")` implement; tests/rl/test_loss.py pins them by hand.

One departure from verl, on purpose: when a mini-batch is split into micro-batches for memory,
verl averages the per-micro-batch token means (weighting micro-batches equally); here the caller
passes `denominator` = the token count of the WHOLE mini-batch, so gradient accumulation gives exactly
the token-mean over the mini-batch that DAPO defines, whatever the micro-batch size.
"""

from __future__ import annotations

import torch

LOSS_AGGS = ("token-mean", "seq-mean-token-mean")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def aggregate(
    loss_mat: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean", denominator: float | None = None
) -> torch.Tensor:
    """Reduce per-token losses to a scalar.

    token-mean: sum(mask * L) / sum(mask), over every token of the mini-batch (DAPO); long and short
      responses weigh by their tokens.
    seq-mean-token-mean: mean over responses of each response's token mean (the original GRPO).
    `denominator` overrides sum(mask) (token-mean) or the row count (seq-mean) with the whole
    mini-batch's, for gradient accumulation over micro-batches.
    """
    m = mask.to(loss_mat.dtype)
    if loss_agg == "token-mean":
        denom = m.sum().clamp(min=1) if denominator is None else denominator
        return (loss_mat * m).sum() / denom
    if loss_agg == "seq-mean-token-mean":
        per_seq = (loss_mat * m).sum(-1) / m.sum(-1).clamp(min=1)
        denom = per_seq.shape[0] if denominator is None else denominator
        return per_seq.sum() / denom
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_c: float = 10.0,
    *,
    loss_agg: str = "token-mean",
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clip-higher PPO loss with dual clip; returns (scalar loss, stats).

        delta = clamp(logp - old_logp, -20, 20); ratio = exp(delta)
        L1 = -A ratio; L2 = -A clip(ratio, 1 - eps_low, 1 + eps_high); Lc = max(L1, L2)
        L = min(-A c, Lc) where A < 0, else Lc            (dual clip: bounds the loss of a negative
                                                           advantage when the ratio explodes)
    `advantages` may be per row (rows,) or per token (rows, T). Stats (masked token means, floats):
        ppo_kl = mean(-delta)                 estimates KL(old || new) on the old samples
        clipfrac = mean(L2 > L1)              the clip acted
        clipfrac_lower = mean((Lc > -A c) & (A < 0))   the dual clip acted
        kl_new_old = mean(ratio*delta - (ratio - 1))   estimates KL(new || old), see metrics.md in docs
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    delta = torch.clamp(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(delta)
    l1 = -advantages * ratio
    l2 = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    lc = torch.maximum(l1, l2)
    l3 = -advantages * clip_c
    per_token = torch.where(advantages < 0, torch.minimum(l3, lc), lc)
    loss = aggregate(per_token, mask, loss_agg, denominator)
    with torch.no_grad():
        stats = {
            "ppo_kl": masked_mean(-delta, mask).item(),
            "clipfrac": masked_mean((l2 > l1).float(), mask).item(),
            "clipfrac_lower": masked_mean(((lc > l3) & (advantages < 0)).float(), mask).item(),
            "kl_new_old": masked_mean(kl_new_old_terms(delta), mask).item(),
        }
    return loss, stats


def kl_new_old_terms(delta: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi_new || pi_old) from samples of pi_old, delta = logp_new - logp_old.

    The RLVR reference's importance-weighted estimate is ratio * log ratio (E_old[r log r] = KL(new || old));
    we add the control variate -(r - 1), whose expectation under pi_old is 0, so every term
    r log r - r + 1 is >= 0 and the estimate is never negative, with lower variance.
    """
    ratio = torch.exp(delta)
    return ratio * delta - (ratio - 1.0)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """verl's "low_var_kl" (k3) per token: exp(ref - logp) - (ref - logp) - 1, with the log-ratio
    clamped to [-20, 20] and the result to [-10, 10]; estimates KL(pi || pi_ref) on pi's samples."""
    d = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)
