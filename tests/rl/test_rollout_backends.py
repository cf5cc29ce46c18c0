"""Rollout backends: the sampler-vs-trainer log-prob check as pure functions and wired into the
loop with separate CPU samplers (synced, stale, adapter missing), and --rollout vllm without vLLM."""

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from rl_helpers import answer_scorer, make_model, make_tokenizer
from test_trainer import tiny_cfg

from loraforge.cli import main
from loraforge.core.clients import vllm_max_lora_rank
from loraforge.core.errors import LoraforgeError
from loraforge.rl.distributed import check_world_divides
from loraforge.rl.metrics import read_metrics
from loraforge.rl.rollout import check_sampler, generation_from_tokens, logprob_gap, logprob_gap_terms, sampler_verdict
from loraforge.rl.trainer import train


def test_logprob_gap_hand_computed():
    # |-1.0 - -1.1| + |-2.0 - -2.0| = 0.1 over 2 tokens, then |-0.5 - -0.2| = 0.3: sum 0.4 over 3 tokens
    sampler = [[-1.0, -2.0], [-0.5]]
    trainer = [torch.tensor([-1.1, -2.0]), [-0.2]]
    total, count = logprob_gap_terms(sampler, trainer)
    assert total == pytest.approx(0.4) and count == 3
    assert logprob_gap(sampler, trainer) == pytest.approx(0.4 / 3)
    with pytest.raises(LoraforgeError, match="2 log-probs for a response of 1 tokens"):
        logprob_gap([[-1.0, -2.0]], [[-1.0]])


def test_sampler_verdict_rules():
    # in sync: numerical noise well under tol, and no closer to the base than to the adapter
    assert sampler_verdict(0.01, 0.1, gap_base=0.5) is None
    # rule 1: more than tol apart
    assert "0.25 nats per token" in sampler_verdict(0.25, 0.1)
    # rule 2: under tol, but twice closer to the model without the adapter, and above tol / 4
    assert "WITHOUT the adapter" in sampler_verdict(0.06, 0.1, gap_base=0.02)
    # ... not when the difference is at noise level (below tol / 4 = 0.025): the adapter barely matters yet
    assert sampler_verdict(0.02, 0.1, gap_base=0.005) is None
    assert "not finite" in sampler_verdict(float("nan"), 0.1)
    with pytest.raises(LoraforgeError, match=r"step 7: vllm is not running the current adapter.*--logprob-check-tol"):
        check_sampler(0.3, 0.1, 7, engine="vllm")
    check_sampler(0.01, 0.1, 7)  # no error


def test_generation_from_tokens():
    tok = make_tokenizer()
    eos = tok.eos_token_id
    one, two = tok("1", add_special_tokens=False)["input_ids"], tok("2", add_special_tokens=False)["input_ids"]
    g = generation_from_tokens(
        [[5, 6, 7], [8]],
        [(0, one + [eos], False), (0, two + two, True), (1, [], True)],
        tok,
        0,
        sampler_logprobs=[[-0.1, -0.2], [-1.0, -1.0], []],
    )
    assert g.prompt_index == [0, 0, 1] and g.lengths == [2, 2, 0] and g.texts == ["1", "22", ""]
    assert g.prompt_ids.tolist() == [[5, 6, 7], [5, 6, 7], [0, 0, 8]] and g.prompt_mask[2].tolist() == [0, 0, 1]
    assert g.response_ids[0].tolist() == one + [eos] and g.response_mask.tolist() == [[1, 1], [1, 1], [0, 0]]
    assert g.truncated.tolist() == [False, True, True] and g.sampler_logprobs[0] == [-0.1, -0.2]


def test_vllm_max_lora_rank_and_batch_division():
    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 16, 17, 64, 300)] == [8, 8, 8, 16, 32, 64, 320]
    check_world_divides(8, 4, "GPUs")
    check_world_divides(7, 1)  # one process takes everything
    with pytest.raises(
        LoraforgeError, match=r"--prompt-batch 6 is not divisible by the 4 GPUs: .*--prompt-batch 4 or 8"
    ):
        check_world_divides(6, 4, "GPUs")


def test_synced_separate_sampler_passes_the_check(model_dir, adapter_dir, tmp_path):
    cfg = tiny_cfg(
        model_dir,
        adapter_dir,
        tmp_path / "run",
        rollout="rl_helpers:synced_sampler",
        logprob_check_tol=1e-3,
        logprob_check_rows=6,
    )
    train(cfg, scorer=answer_scorer, echo=lambda s: None)
    m = read_metrics(tmp_path / "run")
    assert len(m) == 2 and all(x["sampler_logp_diff"] < 1e-5 for x in m)  # same weights, same code: ~0
    assert all("sampler_logp_diff_base" in x for x in m)


def test_stale_sampler_fails_loudly(model_dir, adapter_dir, tmp_path):
    # the sampler keeps the initial adapter; after step 1's updates the trainer has moved (lr 5e-2)
    cfg = tiny_cfg(
        model_dir,
        adapter_dir,
        tmp_path / "run",
        rollout="rl_helpers:stale_sampler",
        steps=3,
        lr=5e-2,
        logprob_check_tol=1e-3,
        logprob_check_rows=8,
    )
    with pytest.raises(
        LoraforgeError,
        match=r"step 2: the rl_helpers:stale_sampler sampler is not running the current "
        r"adapter: the sampler's log-probs differ",
    ):
        train(cfg, scorer=answer_scorer, echo=lambda s: None)
    assert len(read_metrics(tmp_path / "run")) == 1  # step 1 was fine and logged


def test_sampler_without_the_adapter_fails_at_step_1(model_dir, tmp_path):
    # an adapter whose B is not zero (like PiSSA): the sampler that ignores it is caught before any update
    peft_model = get_peft_model(make_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(str(tmp_path / "ad"))
    cfg = tiny_cfg(model_dir, tmp_path / "ad", tmp_path / "run", rollout="rl_helpers:base_sampler")
    with pytest.raises(LoraforgeError, match="step 1: .* is not running the current adapter"):
        train(cfg, scorer=answer_scorer, echo=lambda s: None)


def test_rollout_vllm_without_vllm_says_what_to_install(model_dir, adapter_dir, tmp_path, hide_package):
    hide_package("vllm")
    r = CliRunner().invoke(
        main,
        [
            "train",
            "--model",
            str(model_dir),
            "--adapter",
            str(adapter_dir),
            "-o",
            str(tmp_path / "run"),
            "--data",
            "synthetic:n=8,max=2,style=bare",
            "--rollout",
            "vllm",
            "--dtype",
            "bfloat16",
        ],
    )
    assert r.exit_code == 1 and "pip install -e '.[vllm]'" in r.output, r.output
    assert not (tmp_path / "run" / "config.json").exists()  # stopped before loading anything


def test_bad_rollout_names_the_flag(model_dir, adapter_dir, tmp_path):
    with pytest.raises(LoraforgeError, match="--rollout must be transformers, vllm or module:factory"):
        train(tiny_cfg(model_dir, adapter_dir, tmp_path / "run", rollout="sglang"))
    with pytest.raises(LoraforgeError, match="--rollout rl_helpers:nope: cannot import nope"):
        train(tiny_cfg(model_dir, adapter_dir, tmp_path / "run2", rollout="rl_helpers:nope"))


def test_vllm_rank_rule_refuses_ranks_vllm_cannot_serve():
    from loraforge.core.clients import vllm_serve_command

    # 513 is above vLLM's largest --max-lora-rank (512): one line saying so, never an invalid flag value
    with pytest.raises(LoraforgeError, match="above vLLM's largest --max-lora-rank"):
        vllm_max_lora_rank(513)
    assert "cannot serve" in vllm_serve_command("base", "out", 600)
    assert vllm_serve_command("b", "o", 32) == "vllm serve b --enable-lora --max-lora-rank 32 --lora-modules adapter=o"
