"""Builders for the training tests: a character-level tokenizer, a tiny random Llama, PEFT adapters,
and a reward for the bare synthetic task. A plain module (not conftest) so that `--reward
rl_helpers:answer_scorer` can name it from a CLI test.

Everything is built locally from configs (no network, no GPU).
"""

from __future__ import annotations

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


def make_model(seed: int = 0, hidden: int = 32, layers: int = 2, init_range: float = 0.3):
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
        initializer_range=init_range,
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


def answer_scorer(response: str, ground_truth: str):
    """The DAPO scorer on "Answer: " + response: for the bare synthetic task ("1+2=" -> "3"), where a
    tiny random model cannot be expected to write the "Answer:" line itself."""
    from loraforge.rl.rewards import dapo_result

    return dapo_result("Answer: " + response, ground_truth)
