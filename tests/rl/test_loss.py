"""The policy loss, its aggregation and the KL terms, pinned by hand (torchtune style)."""

import math

import pytest
import torch

from loraforge.rl.loss import aggregate, kl_k3, kl_new_old_terms, policy_loss

# Two responses of 4 tokens; ratios exp(logp - old_logp) chosen to hit every branch.
# row 0, A = +1: ratios [1.0, 1.5, 0.5, 100 (masked out)]
# row 1, A = -1: ratios [0.5, 1.5, 12.0, 1.0]
RATIOS = torch.tensor([[1.0, 1.5, 0.5, 100.0], [0.5, 1.5, 12.0, 1.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
ADV = torch.tensor([1.0, -1.0])


def _inputs():
    old = torch.zeros(2, 4)
    logp = torch.log(RATIOS).clone().requires_grad_(True)
    return logp, old


def test_policy_loss_hand_computed():
    logp, old = _inputs()
    loss, stats = policy_loss(logp, old, ADV, MASK, eps_low=0.2, eps_high=0.28, clip_c=10.0)
    # per token, eps 0.2 / 0.28 (clip range [0.8, 1.28]), c = 10:
    # row 0 (A=+1): r=1.0:  L1=-1.0, L2=-1.0           -> -1.0
    #               r=1.5:  L1=-1.5, L2=-1.28, max     -> -1.28  (clipped: L2 > L1)
    #               r=0.5:  L1=-0.5, L2=-0.8,  max     -> -0.5
    # row 1 (A=-1): r=0.5:  L1=0.5,  L2=0.8,   max 0.8, min(10, 0.8)  -> 0.8  (clipped)
    #               r=1.5:  L1=1.5,  L2=1.28,  max 1.5, min(10, 1.5)  -> 1.5
    #               r=12:   L1=12,   L2=1.28,  max 12,  min(10, 12)   -> 10   (dual clip)
    #               r=1.0:  L1=1.0,  L2=1.0                           -> 1.0
    # token-mean over the 7 unmasked tokens: (-1 - 1.28 - 0.5 + 0.8 + 1.5 + 10 + 1) / 7 = 10.52 / 7
    assert loss.item() == pytest.approx(10.52 / 7, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(2 / 7, abs=1e-6)
    assert stats["clipfrac_lower"] == pytest.approx(1 / 7, abs=1e-6)
    # ppo_kl = mean(-delta) = -(0 + ln1.5 + ln0.5 + ln0.5 + ln1.5 + ln12 + 0) / 7
    #        = -(2*0.4054651 - 2*0.6931472 + 2.4849066) / 7 = -1.9095425 / 7 = -0.2727918
    assert stats["ppo_kl"] == pytest.approx(-0.2727918, abs=1e-6)


def test_policy_loss_gradient_flows_only_through_unclipped_tokens():
    logp, old = _inputs()
    loss, _ = policy_loss(logp, old, ADV, MASK, 0.2, 0.28, 10.0)
    loss.backward()
    # d/dlogp of -A r is -A r; clipped and dual-clipped tokens are constants (gradient 0); all / 7
    expected = torch.tensor([[-1.0, 0.0, -0.5, 0.0], [0.0, 1.5, 0.0, 1.0]]) / 7
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_seq_mean_and_denominator():
    logp, old = _inputs()
    loss, _ = policy_loss(logp, old, ADV, MASK, 0.2, 0.28, 10.0, loss_agg="seq-mean-token-mean")
    # row 0 mean (-1 - 1.28 - 0.5) / 3 = -0.9266667; row 1 mean (0.8 + 1.5 + 10 + 1) / 4 = 3.325
    # seq mean (-0.9266667 + 3.325) / 2 = 1.1991667
    assert loss.item() == pytest.approx(1.1991667, abs=1e-6)
    # gradient accumulation: half a mini-batch of 14 tokens divides by 14, not by its own 7
    half, _ = policy_loss(logp, old, ADV, MASK, 0.2, 0.28, 10.0, denominator=14)
    assert half.item() == pytest.approx(10.52 / 14, abs=1e-6)


def test_on_policy_ratio_one_means_no_clipping():
    # with one mini-batch and one epoch logp == old_logp: ratio 1, loss = -token-mean(A)
    lp = torch.randn(3, 5)
    adv = torch.tensor([0.5, -2.0, 1.0])
    mask = torch.ones(3, 5)
    loss, stats = policy_loss(lp, lp.clone(), adv, mask, 0.2, 0.28, 10.0)
    assert loss.item() == pytest.approx(-(0.5 - 2.0 + 1.0) / 3, abs=1e-6)
    assert stats["clipfrac"] == 0 and stats["clipfrac_lower"] == 0 and stats["ppo_kl"] == 0


def test_aggregate_ignores_masked_tokens():
    assert aggregate(torch.tensor([[1.0, 99.0]]), torch.tensor([[1, 0]])).item() == 1.0


def test_kl_terms_hand_computed():
    # k3 with logp = ln 0.5, ref = ln 0.25: d = ref - logp = ln 0.5 = -0.6931472
    # exp(d) - d - 1 = 0.5 + 0.6931472 - 1 = 0.1931472
    k = kl_k3(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert k.item() == pytest.approx(0.1931472, abs=1e-6)
    # clamp to 10 when the reference is far more likely: d = 20 -> exp(20) - 21 -> 10
    assert kl_k3(torch.tensor([-30.0]), torch.tensor([0.0])).item() == 10.0
    # KL(new || old) term with delta = ln 2: 2 ln 2 - (2 - 1) = 1.3862944 - 1 = 0.3862944
    assert kl_new_old_terms(torch.tensor([math.log(2.0)])).item() == pytest.approx(0.3862944, abs=1e-6)
    assert kl_new_old_terms(torch.tensor([0.0])).item() == 0.0
