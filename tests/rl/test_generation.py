"""Batched sampling: left padding gives the same tokens as one prompt alone; EOS stops a row."""

import torch

from loraforge.generation import SamplingParams, filter_logits, generate, left_pad


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
