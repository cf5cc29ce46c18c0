"""Builders for the training tests: a character-level tokenizer, a tiny random Llama, PEFT adapters,
and a reward for the bare synthetic task. A plain module (not conftest) so that `--reward
rl_helpers:answer_scorer` can name it from a CLI test.

Everything is built locally from configs (no network, no GPU).
"""

from __future__ import annotations

import torch

CHARS = list("0123456789+-*=: ")


def make_tokenizer():
    """One token per character of CHARS after <pad> 0, <eos> 1, <unk> 2."""
    from conftest import word_level_tokenizer  # tests/conftest.py; imported here, not at the top, so a
    # training subprocess that imports this module for its scorer does not need tests/ on its path

    return word_level_tokenizer(CHARS, split="chars")


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

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def answer_scorer(response: str, ground_truth: str):
    """The DAPO scorer on "Answer: " + response: for the bare synthetic task ("1+2=" -> "3"), where a
    tiny random model cannot be expected to write the "Answer:" line itself."""
    from loraforge.grading.dapo import dapo_result

    return dapo_result("Answer: " + response, ground_truth)


# ------------------------------------------------------------------------------------------------
# rollout backends for the scale-out tests (`--rollout rl_helpers:NAME`)
def scripted_rollout(trainer):
    """A deterministic sampler: response j to a prompt is one digit, (sum of the prompt's characters + j) % 5,
    then EOS. The same prompts give the same responses whatever the process count or RNG, so a
    2-process run and a 1-process run train on identical data."""
    return ScriptedRollout(trainer.tokenizer)


class ScriptedRollout:
    separate = False

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def sync(self, model, version):
        return None

    def generate(self, prompts, params):
        from loraforge.rl.rollout import generation_from_tokens
        from loraforge.sampling.generation import pad_id

        ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        eos = self.tok.eos_token_id
        rows = []
        for pi, p in enumerate(prompts):
            for j in range(params.n):
                digit = str((sum(map(ord, p)) + j) % 5)
                resp = self.tok(digit, add_special_tokens=False)["input_ids"] + [eos]
                rows.append((pi, resp[: params.max_new_tokens], len(resp) > params.max_new_tokens))
        return generation_from_tokens(ids, rows, self.tok, pad_id(self.tok))


class SeparateSampler:
    """A sampler that is NOT the trained module (like vLLM): a frozen copy of the policy that samples
    with loraforge.sampling.generation and reports its own log-probs (temperature 1). mode "synced" copies the
    trainer's weights at every sync; "stale" never does; "base" samples with the adapter disabled."""

    separate = True

    def __init__(self, trainer, mode):
        import copy

        self.model = copy.deepcopy(trainer.model)
        self.tok, self.mode = trainer.tokenizer, mode
        self.gen = torch.Generator().manual_seed(123)

    def sync(self, model, version):
        if self.mode == "synced":
            self.model.load_state_dict(model.state_dict())

    def generate(self, prompts, params):
        import contextlib
        import dataclasses

        from loraforge.rl.policy import response_logprobs
        from loraforge.rl.rollout import SampledGeneration
        from loraforge.sampling.generation import generate

        ctx = self.model.disable_adapter() if self.mode == "base" else contextlib.nullcontext()
        with ctx, torch.no_grad():
            g = generate(self.model, self.tok, prompts, params, generator=self.gen)
            batch = {
                "prompt_ids": g.prompt_ids,
                "prompt_mask": g.prompt_mask,
                "response_ids": g.response_ids,
                "response_mask": g.response_mask,
            }
            lp = response_logprobs(self.model, batch, 1.0)[0]
        fields = {f.name: getattr(g, f.name) for f in dataclasses.fields(g)}
        return SampledGeneration(**fields, sampler_logprobs=[lp[i, :n].tolist() for i, n in enumerate(g.lengths)])


def synced_sampler(trainer):
    return SeparateSampler(trainer, "synced")


def stale_sampler(trainer):
    return SeparateSampler(trainer, "stale")


def base_sampler(trainer):
    return SeparateSampler(trainer, "base")


# ------------------------------------------------------------------------------------------------
# rewards for the fail-safe tests (`--reward rl_helpers:NAME` from a CLI test)
signal_calls = {"n": 0}


def signalling_scorer(response: str, ground_truth: str):
    """answer_scorer that sends this process the signal named by $LF_TEST_SIGNAL (SIGINT, SIGTERM) at its
    call number $LF_TEST_SIGNAL_AT (counted in signal_calls, which a test resets)."""
    import os
    import signal

    signal_calls["n"] += 1
    if signal_calls["n"] == int(os.environ["LF_TEST_SIGNAL_AT"]):
        os.kill(os.getpid(), getattr(signal, os.environ["LF_TEST_SIGNAL"]))
    return answer_scorer(response, ground_truth)


def returns_none(response: str, ground_truth: str):
    return None


def raises_on_sevens(response: str, ground_truth: str):
    if "7" in ground_truth:
        raise KeyError("seven")
    return answer_scorer(response, ground_truth)
