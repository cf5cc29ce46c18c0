"""Shared-prefix log-probs (rl/prefix.py) against the plain forward pass: same values, same gradients."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from rl_helpers import make_model

from loraforge.rl.policy import Sample, pack, response_logprobs
from loraforge.rl.prefix import length_buckets, prompt_groups, shared_prefix_logprobs


def lora_model():
    model = get_peft_model(make_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():  # B nonzero, so the adapter changes the prompt's keys and values too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model.eval()


def samples():
    # two prompts of different lengths (left padding), responses of different lengths (right padding),
    # a row that is alone with its prompt, and a one-token response
    p1, p2, p3 = [7, 8, 9, 10], [11, 12], [13, 14, 15]
    rows = [(p1, [4, 5, 6, 1]), (p1, [6, 6]), (p1, [9]), (p2, [5, 4, 3, 2, 1]), (p2, [3, 1]), (p3, [8, 8, 8])]
    return [Sample(p, r, 0.0, 0.0, False, False) for p, r in rows]


def test_prompt_groups():
    batch = pack(samples(), pad=0)
    firsts, expand = prompt_groups(batch["prompt_ids"], batch["prompt_mask"])
    assert firsts.tolist() == [0, 3, 5] and expand.tolist() == [0, 0, 0, 1, 1, 2]
    distinct = pack(samples()[2:4], pad=0)
    assert [t.tolist() for t in prompt_groups(distinct["prompt_ids"], distinct["prompt_mask"])] == [[0, 1], [0, 1]]


def test_length_buckets():
    # lengths sorted: 128 128 120 90 70 40 20 5; overhead 16 per pass. One pass: 8 * 128 + 16 = 1040.
    # [128 128 120] [90] [70] [40] [20 5]: 384 + 90 + 70 + 40 + 40 + 5 * 16 = 704, the optimum (checked
    # against all 128 splits of the sorted rows below)
    lengths = [90, 128, 5, 70, 128, 40, 120, 20]
    assert length_buckets(lengths, overhead=16) == [[1, 4, 6], [0], [3], [5], [7, 2]]
    assert length_buckets([7, 7, 7], overhead=16) == [[0, 1, 2]]  # equal lengths: one pass
    assert length_buckets([50, 1], overhead=100) == [[0, 1]]  # a pass costs more than the padding saved
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 60, (7,), generator=g).tolist()
        buckets = length_buckets(lengths, overhead=10)
        assert sorted(i for b in buckets for i in b) == list(range(7))
        cost = sum(len(b) * max(lengths[i] for i in b) + 10 for b in buckets)
        ordered = sorted(lengths, reverse=True)
        brute = min(sum(len(part) * part[0] + 10 for part in _split(ordered, mask)) for mask in range(64))
        assert cost == brute


def _split(ordered, mask):
    parts, prev = [], 0
    for cut in [i + 1 for i in range(len(ordered) - 1) if mask >> i & 1] + [len(ordered)]:
        parts.append(ordered[prev:cut])
        prev = cut
    return parts


@pytest.mark.parametrize("overhead", [0, 10**6])  # a pass per distinct length; one pass for all rows
def test_shared_prefix_matches_the_plain_pass_values_entropy_and_gradients(overhead, monkeypatch):
    import loraforge.rl.prefix as prefix

    monkeypatch.setattr(prefix, "PASS_OVERHEAD", overhead)
    assert len(length_buckets([4, 2, 1, 5, 2, 3])) == (5 if overhead == 0 else 1)
    model = lora_model()
    batch = pack(samples(), pad=0)
    mask = batch["response_mask"].float()
    weights = torch.linspace(-1.0, 1.0, mask.numel()).reshape(mask.shape)  # a loss with signed per-token weights
    results = []
    for share in (False, True):
        model.zero_grad()
        logp, ent = response_logprobs(model, batch, 0.7, entropy=True, share_prefix=share)
        (logp * weights * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((logp.detach() * mask, ent * mask, grads))
    (lp0, e0, g0), (lp1, e1, g1) = results
    assert torch.allclose(lp0, lp1, atol=1e-5), (lp0 - lp1).abs().max()
    assert torch.allclose(e0, e1, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) == 3 * 2 * 2  # A and B of 3 modules in 2 layers
    for n in g0:  # the prompt's share of the gradient flows back through the copied KV cache
        assert g0[n].abs().sum() > 0
        rel = ((g0[n] - g1[n]).norm() / g0[n].norm()).item()
        assert rel < 1e-5, (n, rel)


def test_shared_prefix_with_override_params_and_without_sharing():
    model = lora_model()
    batch = pack(samples(), pad=0)
    mask = batch["response_mask"].float()
    ref = {
        n: torch.zeros_like(p) if "lora_B" in n else p.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    with torch.no_grad():
        plain, _ = response_logprobs(model, batch, 1.0, params=ref, share_prefix=False)
        shared, _ = shared_prefix_logprobs(model, batch, 1.0, params=ref)
        with model.disable_adapter():  # B = 0 is the base model
            base, _ = response_logprobs(model, batch, 1.0, share_prefix=False)
    assert torch.allclose(plain * mask, shared * mask, atol=1e-5)
    assert torch.allclose(base * mask, shared * mask, atol=1e-5)
    distinct = pack(samples()[2:4], pad=0)  # no shared prompt: the length buckets alone
    with torch.no_grad():
        a, _ = shared_prefix_logprobs(model, distinct, 1.0)
        b, _ = response_logprobs(model, distinct, 1.0, share_prefix=False)
    m = distinct["response_mask"].float()
    assert torch.allclose(a * m, b * m, atol=1e-5)
