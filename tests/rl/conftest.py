"""Fixtures for the training tests: a character-level tokenizer, a tiny random Llama, PEFT adapters.

Everything is built locally from configs (no network, no GPU) and is small enough that the whole
tests/rl suite runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch

CHARS = list("0123456789+-*=: ")


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # decode without spaces between characters
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_model(seed: int = 0, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=3 + len(CHARS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def make_adapter(model, out_dir, r: int = 4, alpha: int = 8, targets=None):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                     target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model():
    return make_model()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A saved tiny base model with its tokenizer, as `--model DIR` takes it."""
    d = tmp_path_factory.mktemp("tiny_base")
    make_model().save_pretrained(str(d))
    make_tokenizer().save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory):
    """A PEFT LoRA adapter (B = 0) for the saved tiny base."""
    d = tmp_path_factory.mktemp("tiny_adapter")
    return make_adapter(make_model(), d)
