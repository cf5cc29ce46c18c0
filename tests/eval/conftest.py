"""Fixtures for the eval tests: a tiny Llama whose answers are known in advance.

The model is a "bigram machine": one-hot embeddings, attention and MLP outputs zeroed (o_proj and
down_proj are 0), so the last hidden state is the current token's embedding and lm_head alone
decides the next token. Greedy decoding then follows a fixed table (NEXT below), and a prompt's
response depends only on its last word: "... plus three" answers "Answer: 5", "... plus four"
answers "Answer: 7". That makes a report's numbers countable by hand while the real sampling code
(loraforge.sampling.generation, left padding, KV cache, EOS) runs end to end. It also checks left padding:
with right padding the last real token would not be at the end and the answers would change.
"""

from __future__ import annotations

import json

import pytest
import torch

WORDS = [
    "what",
    "is",
    "one",
    "two",
    "three",
    "four",
    "plus",
    "maybe",
    "boxme",
    "half",
    "of",
    "hmm",
    "Answer: 5",
    "Answer: 7",
    "\\boxed{\\frac{1}{2}}",
]
SPECIAL = ["<pad>", "<eos>", "<unk>"]
VOCAB = {w: i for i, w in enumerate(SPECIAL + WORDS)}

# token -> the tokens that follow it (equally likely); anything not listed is followed by "hmm".
NEXT = {
    "three": ["Answer: 5"],
    "four": ["Answer: 7"],
    "maybe": ["Answer: 5", "Answer: 7"],  # a fair coin when sampling
    "boxme": ["\\boxed{\\frac{1}{2}}"],
    "Answer: 5": ["<eos>"],
    "Answer: 7": ["<eos>"],
    "\\boxed{\\frac{1}{2}}": ["<eos>"],
    "hmm": ["<eos>"],
}


def make_tokenizer():
    from conftest import word_level_tokenizer  # tests/conftest.py

    tok = word_level_tokenizer(WORDS)
    assert tok.get_vocab() == VOCAB  # the bigram table below indexes by VOCAB
    return tok


def make_bigram_model(hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    v = len(VOCAB)
    assert hidden >= v, "one-hot embeddings need hidden >= vocab"
    cfg = LlamaConfig(
        vocab_size=v,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=VOCAB["<pad>"],
        eos_token_id=VOCAB["<eos>"],
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        emb = torch.zeros(v, hidden)
        emb[:, :v] = torch.eye(v)
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(v, hidden)
        for w in VOCAB:
            for nxt in NEXT.get(w, ["hmm"]):
                # After RMSNorm a one-hot becomes sqrt(hidden) * one-hot: logit about 57 vs 0, so a
                # single successor wins even at temperature 1 and two tie exactly.
                head[VOCAB[nxt], VOCAB[w]] = 10.0
        model.lm_head.weight.copy_(head)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def bigram_model():
    return make_bigram_model()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The bigram model and its tokenizer saved as `--model DIR` takes them."""
    d = tmp_path_factory.mktemp("bigram_model")
    make_bigram_model().save_pretrained(str(d))
    make_tokenizer().save_pretrained(str(d))
    return d


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, rows) -> path: a benchmark file (a fixture, so tests need not import conftest)."""
    return _write_jsonl


# Five problems whose greedy answers are known (see NEXT): correct, correct, wrong, no answer, and a
# boxed fraction that only Math-Verify accepts (gold 0.5, response \boxed{\frac{1}{2}}).
GREEDY_ROWS = [
    {"id": "a", "problem": "what is two plus three", "answer": "5"},  # -> Answer: 5  right
    {"id": "b", "problem": "what is three plus four", "answer": "7"},  # -> Answer: 7  right
    {"id": "c", "problem": "what is one plus four", "answer": "5"},  # -> Answer: 7  wrong
    {"id": "d", "problem": "what is one plus one", "answer": "2"},  # -> hmm        no answer
    {"id": "e", "problem": "half of one boxme", "answer": "0.5"},  # -> \boxed{\frac{1}{2}}
]


@pytest.fixture
def greedy_file(tmp_path):
    return _write_jsonl(tmp_path / "tiny.jsonl", GREEDY_ROWS)
