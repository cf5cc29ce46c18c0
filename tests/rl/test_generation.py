"""Batched sampling: left padding gives the same tokens as one prompt alone; EOS stops a row."""

import torch

from loraforge.sampling.generation import SamplingParams, filter_logits, generate, left_pad


def test_left_pad_and_filter():
    ids, mask = left_pad([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # top-k 2 keeps 0.5 and 0.3
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # top-p 0.8: mass before each token 0, 0.5, 0.8, 0.95 -> drop those with mass before >= 0.8
    assert torch.isinf(filter_logits(logits, -1, 0.8)).tolist() == [[False, False, True, True]]
    # top-p 0.81 keeps the third token too (mass before it 0.8 < 0.81)
    assert torch.isinf(filter_logits(logits, -1, 0.81)).tolist() == [[False, False, False, True]]


def test_greedy_batch_equals_single(tiny_model, tokenizer):
    params = SamplingParams(n=1, max_new_tokens=6, temperature=0.0)
    prompts = ["1+2=", "12+34+5="]
    batch = generate(tiny_model, tokenizer, prompts, params)
    for i, p in enumerate(prompts):
        single = generate(tiny_model, tokenizer, [p], params)
        n = single.lengths[0]
        assert batch.lengths[i] == n
        assert batch.response_ids[i, :n].tolist() == single.response_ids[0, :n].tolist()
        assert batch.texts[i] == single.texts[0]


def test_sampling_shapes_seed_and_eos(tiny_model, tokenizer):
    params = SamplingParams(n=3, max_new_tokens=5, temperature=1.0)
    a = generate(tiny_model, tokenizer, ["1+1=", "2+2="], params, seed=7)
    b = generate(tiny_model, tokenizer, ["1+1=", "2+2="], params, seed=7)
    c = generate(tiny_model, tokenizer, ["1+1=", "2+2="], params, seed=8, batch_size=2)
    assert a.prompt_index == [0, 0, 0, 1, 1, 1]
    assert a.response_ids.shape[0] == 6 and len(a.texts) == 6
    assert a.response_ids.tolist() == b.response_ids.tolist()  # same seed, same samples
    assert c.response_ids.shape[0] == 6 and c.prompt_index == a.prompt_index  # chunked decoding
    for i in range(6):
        n = a.lengths[i]
        row = a.response_ids[i].tolist()
        assert a.response_mask[i, :n].all() and not a.response_mask[i, n:].any()
        if 1 in row[:n]:  # a row that produced EOS ends exactly there and is not truncated
            assert row.index(1) == n - 1 and not a.truncated[i]
        else:
            assert n == 5 and a.truncated[i]


def test_eos_stops_generation(tiny_model, tokenizer):
    # an output head with zero weights and a bias only on EOS (id 1): every step's argmax is EOS
    head = torch.nn.Linear(tiny_model.config.hidden_size, tiny_model.config.vocab_size)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[1] = 10.0
    tiny_model.lm_head = head
    out = generate(tiny_model, tokenizer, ["3+4="], SamplingParams(max_new_tokens=8, temperature=0.0))
    assert out.lengths == [1] and out.response_ids[0, 0].item() == 1 and out.texts == [""]
    assert not out.truncated[0]


def test_sample_from_probs_inverse_cdf():
    from loraforge.sampling.generation import sample_from_probs

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2]]).expand(7, 4)
    # cumulative mass 0.5, 0.5, 0.8, 1.0: u in [0, 0.5) -> 0, [0.5, 0.8) -> 2 (token 1 has no mass), [0.8, 1) -> 3
    u = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.8, 0.999, 1.0 - 2**-53], dtype=torch.float64)
    assert sample_from_probs(probs, u).tolist() == [0, 0, 2, 2, 3, 3, 3]
    # a last token without mass is never drawn, even for u rounding up to the total
    assert sample_from_probs(torch.tensor([[0.6, 0.4, 0.0]]), torch.tensor([1.0 - 2**-53])).tolist() == [1]
    # frequencies: 40000 draws from (0.1, 0.2, 0.3, 0.4); a frequency's std is at most 0.0025, allow 4 std
    g = torch.Generator().manual_seed(0)
    u = torch.rand(40000, generator=g, dtype=torch.float64)
    draws = sample_from_probs(torch.tensor([[0.1, 0.2, 0.3, 0.4]]).expand(40000, 4), u)
    freq = torch.bincount(draws, minlength=4).double() / 40000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.01)


def test_shared_prefix_and_dropping_finished_rows_give_the_plain_samples(tiny_model, tokenizer):
    # the fast paths (one prefill per distinct prompt, finished rows out of the batch) against the
    # plain one (every row prefilled, every row decoded to the end): the same tokens, seed for seed
    prompts = ["1+2=", "12+34+5=", "7*8=", "3="]
    finished_early = 0
    for seed in range(4):
        for temperature, n, top_p in ((0.0, 1, 1.0), (1.0, 4, 1.0), (0.7, 3, 0.9)):
            params = SamplingParams(n=n, max_new_tokens=12, temperature=temperature, top_p=top_p)
            plain = generate(tiny_model, tokenizer, prompts, params, seed=seed, share_prefix=False, drop_finished=False)
            for kw in ({}, {"share_prefix": False}, {"drop_finished": False}):
                fast = generate(tiny_model, tokenizer, prompts, params, seed=seed, **kw)
                assert fast.response_ids.tolist() == plain.response_ids.tolist(), (seed, temperature, kw)
                assert fast.lengths == plain.lengths and fast.texts == plain.texts
                assert fast.prompt_ids.tolist() == plain.prompt_ids.tolist()
                assert fast.truncated.tolist() == plain.truncated.tolist()
            finished_early += sum(1 for n_tok in plain.lengths if n_tok < 12)
    assert finished_early > 0  # some rows did leave the batch early


def test_greedy_first_rows_are_greedy_and_leave_the_sampled_rows_unchanged(tiny_model, tokenizer):
    # n=3, greedy_first=1: row 0 of each prompt is the argmax decode, rows 1-2 are the samples a plain
    # n=3 call draws for rows 1-2 (a uniform is drawn for the greedy row too, so the others' draws line up).
    # drop_finished=False keeps every decoding batch the same size, so the sampled rows match bit for bit.
    prompts = ["1+2=", "12+34+5="]
    mixed = SamplingParams(n=3, max_new_tokens=6, temperature=1.0, greedy_first=1)
    got = generate(tiny_model, tokenizer, prompts, mixed, seed=3, drop_finished=False, batch_size=4)
    greedy = generate(tiny_model, tokenizer, prompts, SamplingParams(n=1, max_new_tokens=6, temperature=0.0))
    plain = generate(
        tiny_model, tokenizer, prompts, SamplingParams(n=3, max_new_tokens=6), seed=3, drop_finished=False, batch_size=4
    )
    for p in range(2):
        assert got.texts[3 * p] == greedy.texts[p]
        assert got.texts[3 * p + 1 : 3 * p + 3] == plain.texts[3 * p + 1 : 3 * p + 3]
    # the default path (finished rows leave the batch) decodes the same greedy rows
    fast = generate(tiny_model, tokenizer, prompts, mixed, seed=3)
    assert [fast.texts[0], fast.texts[3]] == greedy.texts


def test_a_temperature_too_small_to_divide_by_is_refused(tiny_model, tokenizer):
    """logits / 1e-300 is +-inf in float32, the softmax NaN, and the inverse-CDF draw then took the vocabulary's
    last token on every step with no error (eval exited 0 with responses of that one token). The sampler, eval
    and train refuse temperatures in (0, 1e-5) (vLLM's greedy threshold); 1e-5 itself still samples finitely."""
    import pytest

    from loraforge.core.errors import LoraforgeError
    from loraforge.rl.config import TrainConfig

    for t in (1e-300, 1e-40, 9e-6):
        with pytest.raises(LoraforgeError, match="temperature must be 0 \\(greedy\\) or in \\[1e-05, inf\\)"):
            SamplingParams(temperature=t).check()
        with pytest.raises(LoraforgeError, match="--temperature must be >= 1e-05"):
            TrainConfig(adapter="a", data="d", output_dir="o", temperature=t).resolved()
    logits = torch.tensor([[3.0, 1.0, -2.0, 0.5]])
    probs = filter_logits(logits / 1e-5, -1, 1.0).softmax(-1)
    assert torch.isfinite(probs).all() and probs.argmax().item() == 0
    out = generate(tiny_model, tokenizer, ["1+2="], SamplingParams(max_new_tokens=4, temperature=1e-5))
    greedy = generate(tiny_model, tokenizer, ["1+2="], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert out.texts == greedy.texts  # at 1e-5 the top token takes all the mass: the greedy answer, not garbage
