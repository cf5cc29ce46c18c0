"""`loraforge train --backend verl`: the generated verl command read back as data, key by key."""

import importlib.util
import json
import shlex
import shutil

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from rl_helpers import make_adapter, make_model

from loraforge.cli import main
from loraforge.rl.verl_launch import VERL_ENTRY, hydra_value, read_lora_settings

ENTRY = f"python3 -m {VERL_ENTRY}"


def _invoke(model_dir, adapter_dir, out, *extra, model=True):
    args = [
        "train",
        "--backend",
        "verl",
        "--adapter",
        str(adapter_dir),
        "-o",
        str(out),
        "--data",
        "synthetic:n=40,max=2",
        *extra,
    ]
    if model:
        args[3:3] = ["--model", str(model_dir)]
    return CliRunner().invoke(main, args)


def read_command(script):
    """The overrides of run_verl.sh as {key: value string}, parsed the way a shell would."""
    text = script.read_text()
    start = text.index(ENTRY)
    argv = shlex.split(text[start:].replace("\\\n", " "))
    assert argv[:3] == ["python3", "-m", VERL_ENTRY] and argv[-1] == "$@"
    pairs = [a.split("=", 1) for a in argv[3:-1]]
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), "a key is given twice"
    return dict(pairs)


def test_dapo_run_as_verl_overrides(model_dir, adapter_dir, tmp_path):
    out = tmp_path / "run"
    r = _invoke(
        model_dir,
        adapter_dir,
        out,
        "--algo",
        "dapo",
        "--eps-low",
        "0.15",
        "--eps-high",
        "0.3",
        "--clip-c",
        "5",
        "--overlong-buffer",
        "64",
        "--overlong-penalty",
        "0.5",
        "--max-response-length",
        "256",
        "--max-prompt-length",
        "128",
        "--max-gen-batches",
        "7",
        "--group-size",
        "4",
        "--prompt-batch",
        "8",
        "--mini-batch",
        "4",
        "--micro-batch",
        "2",
        "--lr",
        "2e-5",
        "--weight-decay",
        "0.05",
        "--grad-clip",
        "0.5",
        "--lr-schedule",
        "cosine",
        "--warmup-steps",
        "3",
        "--min-lr-ratio",
        "0.1",
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--top-k",
        "20",
        "--steps",
        "10",
        "--epochs",
        "2",
        "--save-every",
        "5",
        "--keep-checkpoints",
        "3",
        "--no-tensorboard",
        "--vllm-gpu-memory",
        "0.4",
        "--verl-gpus-per-node",
        "2",
    )
    assert r.exit_code == 0, r.output
    assert "python3 -m recipe.dapo.main_dapo \\" in r.output and "run_verl.sh" in r.output
    got = read_command(out / "verl" / "run_verl.sh")
    d = (out / "verl").resolve()
    expected = {
        # data
        "data.train_files": str(d / "train.parquet"),
        "data.val_files": str(d / "val.parquet"),
        "data.prompt_key": "prompt",
        "data.truncation": "left",
        "data.max_prompt_length": "128",
        "data.max_response_length": "256",
        "data.train_batch_size": "8",
        "data.gen_batch_size": "8",
        # DAPO: clip-higher + dual clip, token-mean, dynamic sampling, overlong shaping, no KL
        "algorithm.adv_estimator": "grpo",
        "algorithm.use_kl_in_reward": "False",
        "algorithm.kl_ctrl.kl_coef": "0.0",
        "algorithm.filter_groups.enable": "True",
        "algorithm.filter_groups.metric": "acc",
        "algorithm.filter_groups.max_num_gen_batches": "7",
        "actor_rollout_ref.actor.clip_ratio_low": "0.15",
        "actor_rollout_ref.actor.clip_ratio_high": "0.3",
        "actor_rollout_ref.actor.clip_ratio_c": "5.0",
        "actor_rollout_ref.actor.loss_agg_mode": "token-mean",
        "actor_rollout_ref.actor.entropy_coeff": "0",
        "actor_rollout_ref.actor.use_kl_loss": "False",
        "actor_rollout_ref.actor.kl_loss_coef": "0.0",
        "actor_rollout_ref.actor.kl_loss_type": "low_var_kl",
        "reward_model.reward_manager": "dapo",
        "reward_model.overlong_buffer.enable": "True",
        "reward_model.overlong_buffer.len": "64",
        "reward_model.overlong_buffer.penalty_factor": "0.5",
        "custom_reward_function.path": str(d / "reward.py"),
        "custom_reward_function.name": "compute_score",
        # the adapter: the plain LoRA of conftest (r 4, alpha 8, all linear layers) on --model
        "actor_rollout_ref.model.path": str(model_dir.resolve()),
        "actor_rollout_ref.model.lora_adapter_path": str(adapter_dir.resolve()),
        "actor_rollout_ref.model.lora_rank": "4",
        "actor_rollout_ref.model.lora_alpha": "8",
        "actor_rollout_ref.model.target_modules": "[down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj]",
        "actor_rollout_ref.model.trust_remote_code": "False",
        "actor_rollout_ref.model.use_remove_padding": "True",
        # optimisation
        "actor_rollout_ref.actor.optim.lr": "2e-05",
        "actor_rollout_ref.actor.optim.weight_decay": "0.05",
        "actor_rollout_ref.actor.optim.lr_warmup_steps": "3",
        "actor_rollout_ref.actor.optim.warmup_style": "cosine",
        "actor_rollout_ref.actor.optim.min_lr_ratio": "0.1",
        "actor_rollout_ref.actor.grad_clip": "0.5",
        "actor_rollout_ref.actor.ppo_epochs": "2",
        "actor_rollout_ref.actor.ppo_mini_batch_size": "4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": "2",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": "2",
        # rollout: vLLM with LoRA, the sampling settings, greedy validation
        "actor_rollout_ref.rollout.name": "vllm",
        "actor_rollout_ref.rollout.load_format": "safetensors",
        "actor_rollout_ref.rollout.tensor_model_parallel_size": "1",
        "actor_rollout_ref.rollout.gpu_memory_utilization": "0.4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": "2",
        "actor_rollout_ref.rollout.n": "4",
        "actor_rollout_ref.rollout.temperature": "0.9",
        "actor_rollout_ref.rollout.top_p": "0.95",
        "actor_rollout_ref.rollout.top_k": "20",
        "actor_rollout_ref.rollout.val_kwargs.temperature": "0",
        "actor_rollout_ref.rollout.val_kwargs.do_sample": "False",
        "actor_rollout_ref.rollout.val_kwargs.n": "1",
        # trainer: 10 steps x 8 prompts x up to 7 generation batches over 40 prompts = 14 epochs, + 1
        "trainer.total_training_steps": "10",
        "trainer.total_epochs": "15",
        "trainer.save_freq": "5",
        "trainer.test_freq": "-1",
        "trainer.val_before_train": "False",
        "trainer.n_gpus_per_node": "2",
        "trainer.nnodes": "1",
        "trainer.default_local_dir": str(d / "checkpoints"),
        "trainer.max_actor_ckpt_to_keep": "3",
        "trainer.project_name": "loraforge",
        "trainer.experiment_name": "run",
        "trainer.logger": "[console]",
    }
    assert got == expected
    # overrides.json holds the same settings as typed data
    data = json.loads((out / "verl" / "overrides.json").read_text())
    assert {k: hydra_value(v) for k, v in data.items()} == expected
    assert (
        data["actor_rollout_ref.model.target_modules"][0] == "down_proj" and data["trainer.max_actor_ckpt_to_keep"] == 3
    )
    # the prompts in verl's row format, with DAPO-Math's instruction (verl applies the chat template)
    rows = pq.read_table(out / "verl" / "train.parquet").to_pylist()
    assert len(rows) == 40 and rows[0]["data_source"] == "loraforge"
    assert rows[0]["prompt"][0]["role"] == "user" and "What is " in rows[0]["prompt"][0]["content"]
    assert rows[0]["prompt"][0]["content"].startswith("Solve the following math problem")
    assert rows[0]["reward_model"]["ground_truth"].isdigit() and rows[0]["extra_info"] == {"index": 0}
    # reward.py scores with loraforge's scorer and reports acc for dynamic sampling
    spec = importlib.util.spec_from_file_location("verl_reward", out / "verl" / "reward.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.compute_score("loraforge", "so Answer: 5", "5") == {"score": 1.0, "acc": True, "pred": "5"}
    assert mod.compute_score("loraforge", "Answer: 0.5", "\\frac{1}{2}")["score"] == -1.0


def test_grpo_settings_and_defaults(model_dir, adapter_dir, tmp_path):
    r = _invoke(
        model_dir,
        adapter_dir,
        tmp_path / "run",
        "--algo",
        "grpo",
        "--group-size",
        "4",
        "--prompt-batch",
        "4",
        "--mini-batch",
        "4",
        "--micro-batch",
        "4",
        "--verl-gpus-per-node",
        "1",
        "--save-every",
        "0",
        "--steps",
        "20",
        "--eval-data",
        "synthetic:n=5,seed=3",
        "--eval-every",
        "5",
    )
    assert r.exit_code == 0, r.output
    got = read_command(tmp_path / "run" / "verl" / "run_verl.sh")
    # the paper's 7B recipe: KL beta 0.001 (k3) in the actor loss, no dynamic sampling, no overlong shaping
    assert (
        got["actor_rollout_ref.actor.use_kl_loss"] == "True" and got["actor_rollout_ref.actor.kl_loss_coef"] == "0.001"
    )
    assert got["actor_rollout_ref.actor.kl_loss_type"] == "low_var_kl"
    assert got["algorithm.filter_groups.enable"] == "False" and got["reward_model.overlong_buffer.enable"] == "False"
    assert (
        got["actor_rollout_ref.actor.clip_ratio_high"] == "0.2"
        and got["actor_rollout_ref.actor.clip_ratio_low"] == "0.2"
    )
    # defaults: constant lr 1e-5, wd 0.1, clip 1.0, c 10, T 1, top-p 1, top-k off; save at the end only
    assert (
        got["actor_rollout_ref.actor.optim.lr"] == "1e-05"
        and got["actor_rollout_ref.actor.optim.warmup_style"] == "constant"
    )
    assert (
        got["actor_rollout_ref.actor.optim.weight_decay"] == "0.1" and got["actor_rollout_ref.actor.grad_clip"] == "1.0"
    )
    assert got["actor_rollout_ref.actor.clip_ratio_c"] == "10.0" and got["actor_rollout_ref.rollout.top_k"] == "-1"
    assert got["trainer.save_freq"] == "20" and got["trainer.test_freq"] == "5"
    assert got["trainer.logger"] == "[console,tensorboard]"
    assert len(pq.read_table(tmp_path / "run" / "verl" / "val.parquet")) == 5


@pytest.fixture
def residual_adapter(tmp_path, adapter_dir):
    """An adapter directory laid out like `loraforge init --method pissa`: manifest "base": "base" and the
    residual base in ADAPTER/base."""
    ad = tmp_path / "pissa"
    shutil.copytree(adapter_dir, ad)
    (ad / "loraforge.json").write_text(
        json.dumps({"format": "loraforge-manifest/1", "method": "pissa", "base": "base"})
    )
    make_model(seed=1).save_pretrained(str(ad / "base"))
    return ad


def test_residual_base_becomes_model_path(model_dir, residual_adapter, tmp_path):
    r = _invoke(
        model_dir,
        residual_adapter,
        tmp_path / "run",
        "--algo",
        "grpo",
        "--prompt-batch",
        "4",
        "--mini-batch",
        "4",
        "--group-size",
        "2",
        "--micro-batch",
        "8",
        "--verl-gpus-per-node",
        "1",
        model=False,
    )
    assert r.exit_code == 0, r.output
    got = read_command(tmp_path / "run" / "verl" / "run_verl.sh")
    assert got["actor_rollout_ref.model.path"] == str((residual_adapter / "base").resolve())
    assert got["actor_rollout_ref.model.lora_adapter_path"] == str(residual_adapter.resolve())
    # GRPO's KL in verl is against the adapter-disabled actor = the residual base: said out loud
    assert (
        "NOT the initial policy" in r.output
        and "NOT the initial policy" in (tmp_path / "run" / "verl" / "run_verl.sh").read_text()
    )
    # passing the residual base as --model is the same thing
    r = _invoke(
        residual_adapter / "base",
        residual_adapter,
        tmp_path / "run2",
        "--prompt-batch",
        "4",
        "--mini-batch",
        "4",
        "--group-size",
        "2",
        "--micro-batch",
        "8",
        "--verl-gpus-per-node",
        "1",
    )
    assert r.exit_code == 0, r.output


def test_mismatches_are_errors(model_dir, residual_adapter, tmp_path):
    # a residualised adapter with another --model: verl would start from a different policy
    r = _invoke(model_dir, residual_adapter, tmp_path / "run", "--verl-gpus-per-node", "1")
    assert r.exit_code == 1 and "does not match the adapter" in r.output and "residual base" in r.output
    # an adapter made for another architecture: named by module and shapes, from the file headers only
    make_adapter(make_model(hidden=48), tmp_path / "ad48")
    r = _invoke(model_dir, tmp_path / "ad48", tmp_path / "run2", "--verl-gpus-per-node", "1")
    assert r.exit_code == 1, r.output
    assert "module model.layers.0.mlp.down_proj has lora_A of shape [4, 96]" in r.output and "[32, 64]" in r.output
    assert not (tmp_path / "run2" / "verl").exists()


def test_gpu_count_must_divide_the_batch(model_dir, adapter_dir, tmp_path):
    base = ["--prompt-batch", "4", "--mini-batch", "2", "--group-size", "3", "--micro-batch", "1"]
    r = _invoke(model_dir, adapter_dir, tmp_path / "run", *base, "--verl-gpus-per-node", "8")
    assert (
        r.exit_code == 1
        and "the GPU count 8 does not divide the batch: --prompt-batch 4 x --group-size 3 = 12 rows" in r.output
    )
    r = _invoke(model_dir, adapter_dir, tmp_path / "run", *base, "--verl-gpus-per-node", "4")
    assert (
        r.exit_code == 1 and "does not divide the PPO mini-batch: --mini-batch 2 x --group-size 3 = 6 rows" in r.output
    )
    r = _invoke(
        model_dir,
        adapter_dir,
        tmp_path / "run",
        "--prompt-batch",
        "4",
        "--mini-batch",
        "2",
        "--group-size",
        "4",
        "--micro-batch",
        "3",
        "--verl-gpus-per-node",
        "2",
    )
    assert r.exit_code == 1 and "(4 rows) is not a multiple of --micro-batch 3" in r.output


@pytest.mark.skipif(importlib.util.find_spec("verl") is not None, reason="verl is installed here")
def test_run_without_verl_says_how_to_install(model_dir, adapter_dir, tmp_path):
    r = _invoke(
        model_dir,
        adapter_dir,
        tmp_path / "run",
        "--prompt-batch",
        "4",
        "--mini-batch",
        "4",
        "--group-size",
        "2",
        "--micro-batch",
        "8",
        "--verl-gpus-per-node",
        "1",
        "--run",
    )
    assert r.exit_code == 1 and "--run needs verl" in r.output and "pip install verl" in r.output
    assert (tmp_path / "run" / "verl" / "run_verl.sh").is_file()  # written anyway, to copy to a GPU machine
    r = CliRunner().invoke(main, ["train", "--run", "--adapter", "x"])
    assert r.exit_code == 2 and "go with --backend verl" in r.output


def test_hydra_values_and_lora_settings(tmp_path):
    assert [hydra_value(v) for v in (True, None, 3, 1e-05, "token-mean", "a b", "it's", ["q", "v"], "true")] == [
        "True",
        "null",
        "3",
        "1e-05",
        "token-mean",
        "'a b'",
        "'it\\'s'",
        "[q,v]",
        "'true'",
    ]
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 16,
                "lora_alpha": 32,
                "target_modules": "all-linear",
                "rank_pattern": {"q_proj": 64},
            }
        )
    )
    s = read_lora_settings(tmp_path)
    assert (s.r, s.alpha, s.target_modules, s.max_rank, s.patterns) == (16, 32, "all-linear", 64, True)
