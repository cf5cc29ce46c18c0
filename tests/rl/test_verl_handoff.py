"""`loraforge train --backend verl`: the generated verl command read back as data, key by key, and the choice of
verl release. tests/rl/test_verl_real.py composes these commands against verl's own shipped configuration."""

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from rl_helpers import make_adapter, make_model

from loraforge.cli import main
from loraforge.core.errors import LoraforgeError
from loraforge.rl.verl_launch import (
    SUPPORTED_VERL,
    VERL_ENTRY,
    choose_verl_version,
    hydra_value,
    installed_verl_version,
    override_arg,
    read_lora_settings,
)

ENTRY = f"python3 -m {VERL_ENTRY}"


# a batch that verl divides evenly on one GPU: 4 prompts x 2 samples, one mini-batch, one micro-batch
ONE_GPU = (
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


def _invoke(model_dir, adapter_dir, out, *extra, model=True, version=SUPPORTED_VERL[-1]):
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
    if version:
        args += ["--verl-version", version]
    if model:
        args[3:3] = ["--model", str(model_dir)]
    return CliRunner().invoke(main, args)


def read_command(script):
    """The overrides of run_verl.sh as {key as written, `++` included: value string}, parsed the way a shell would."""
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
    assert "python3 -m verl.trainer.main_ppo \\" in r.output and "run_verl.sh" in r.output
    assert f"for verl {SUPPORTED_VERL[-1]}" in r.output
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
        "actor_rollout_ref.actor.clip_ratio_low": "0.15",
        "actor_rollout_ref.actor.clip_ratio_high": "0.3",
        "actor_rollout_ref.actor.clip_ratio_c": "5.0",
        "actor_rollout_ref.actor.loss_agg_mode": "token-mean",
        "actor_rollout_ref.actor.entropy_coeff": "0",
        "actor_rollout_ref.actor.use_kl_loss": "False",
        "actor_rollout_ref.actor.kl_loss_coef": "0.0",
        "actor_rollout_ref.actor.kl_loss_type": "low_var_kl",
        # reward: verl 0.9's keys; the DAPO manager's settings are added with ++ (the shipped yaml lacks them)
        "reward.reward_manager.name": "dapo",
        "reward.custom_reward_function.path": str(d / "reward.py"),
        "reward.custom_reward_function.name": "compute_score",
        "++reward.reward_kwargs.overlong_buffer_cfg.enable": "True",
        "++reward.reward_kwargs.overlong_buffer_cfg.len": "64",
        "++reward.reward_kwargs.overlong_buffer_cfg.penalty_factor": "0.5",
        "++reward.reward_kwargs.overlong_buffer_cfg.log": "True",
        "++reward.reward_kwargs.max_resp_len": "256",
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
        "actor_rollout_ref.actor.optim.lr_scheduler_type": "cosine",
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
        # trainer: 10 steps x 8 prompts x 10 generation batches (an allowance: verl 0.9 has no limit) over 40
        # prompts = 20 epochs, + 1
        "trainer.total_training_steps": "10",
        "trainer.total_epochs": "21",
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
    assert dict(override_arg(k, v).split("=", 1) for k, v in data.items()) == expected
    # the legacy keys that verl 0.9 composes and then ignores are never written
    assert not [k for k in got if k.lstrip("+").startswith(("reward_model.", "custom_reward_function."))]
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
    assert got["algorithm.filter_groups.enable"] == "False"
    assert got["++reward.reward_kwargs.overlong_buffer_cfg.enable"] == "False"
    assert got["++reward.reward_kwargs.max_resp_len"] == "1024"
    assert (
        got["actor_rollout_ref.actor.clip_ratio_high"] == "0.2"
        and got["actor_rollout_ref.actor.clip_ratio_low"] == "0.2"
    )
    # defaults: constant lr 1e-5, wd 0.1, clip 1.0, c 10, T 1, top-p 1, top-k off; save at the end only
    assert (
        got["actor_rollout_ref.actor.optim.lr"] == "1e-05"
        and got["actor_rollout_ref.actor.optim.lr_scheduler_type"] == "constant"
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
        *ONE_GPU,
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
        *ONE_GPU,
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
        *ONE_GPU,
        "--run",
    )
    assert r.exit_code == 1 and "--run needs verl" in r.output and "pip install -e '.[verl]'" in r.output
    assert (tmp_path / "run" / "verl" / "run_verl.sh").is_file()  # written anyway, to copy to a GPU machine
    r = CliRunner().invoke(main, ["train", "--run", "--adapter", "x"])
    assert r.exit_code == 2 and "go with --backend verl" in r.output
    r = CliRunner().invoke(main, ["train", "--verl-version", "0.9.1", "--adapter", "x"])
    assert r.exit_code == 2 and "--verl-version go with --backend verl" in r.output


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


def _fake_verl(root, version):
    """A directory holding only the metadata of an installed verl VERSION (what pip writes as dist-info)."""
    info = root / f"verl-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: verl\nVersion: {version}\n")
    return root


def test_verl_version_choice():
    newest = SUPPORTED_VERL[-1]
    assert SUPPORTED_VERL == ("0.9.0", "0.9.1")
    # not installed, not asked: the newest, said so
    v, notes = choose_verl_version(None, None)
    assert v == newest and "verl is not installed here" in notes[0]
    # installed and supported: that one, silently
    assert choose_verl_version(None, "0.9.0") == ("0.9.0", [])
    # asked for: that one; a different supported verl installed here is mentioned
    assert choose_verl_version("0.9.0", None) == ("0.9.0", [])
    v, notes = choose_verl_version("0.9.0", "0.9.1")
    assert v == "0.9.0" and "verl 0.9.1 is installed here" in notes[0]
    # unsupported, asked for or installed: one line naming the supported releases and what to do
    for requested, installed, said in [
        ("0.8.0", None, "--verl-version 0.8.0 is not supported"),
        ("0.10.0", "0.9.1", "--verl-version 0.10.0 is not supported"),
        (None, "0.7.1", "verl 0.7.1 is installed here"),
    ]:
        with pytest.raises(LoraforgeError) as e:
            choose_verl_version(requested, installed)
        assert said in str(e.value) and "0.9.0 or 0.9.1" in str(e.value) and "\n" not in str(e.value)


def test_installed_verl_is_detected(model_dir, adapter_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_fake_verl(tmp_path / "site080", "0.8.0")))
    assert installed_verl_version() == "0.8.0"
    base = ["--prompt-batch", "4", "--mini-batch", "4", "--group-size", "2", "--verl-gpus-per-node", "1"]
    r = _invoke(model_dir, adapter_dir, tmp_path / "run", *base, version=None)
    assert r.exit_code == 1 and "verl 0.8.0 is installed here" in r.output and "--verl-version 0.9.1" in r.output
    assert not (tmp_path / "run" / "verl").exists()
    # --verl-version writes the job for another machine even so
    r = _invoke(model_dir, adapter_dir, tmp_path / "run", *base, version="0.9.0")
    assert r.exit_code == 0, r.output
    assert "written for verl 0.9.0 (--verl-version), but verl 0.8.0 is installed here" in r.output
    # but --run refuses to start it on the wrong verl
    r = _invoke(model_dir, adapter_dir, tmp_path / "run2", *base, "--run", version="0.9.0")
    assert r.exit_code == 1 and "--run: verl 0.8.0 is installed, but the job is written for verl 0.9.0" in r.output


def test_script_refuses_an_unsupported_verl(model_dir, adapter_dir, tmp_path):
    """run_verl.sh's first command checks the installed verl before verl sees a key."""
    base = ["--prompt-batch", "4", "--mini-batch", "4", "--group-size", "2", "--verl-gpus-per-node", "1"]
    r = _invoke(model_dir, adapter_dir, tmp_path / "run", *base)
    assert r.exit_code == 0, r.output
    script = tmp_path / "run" / "verl" / "run_verl.sh"

    def run(site):
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
        return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)

    empty = tmp_path / "empty"
    empty.mkdir()
    p = run(empty)
    assert p.returncode == 1 and "run_verl.sh needs verl 0.9.1, which is not installed" in p.stderr
    p = run(_fake_verl(tmp_path / "site", "0.8.0"))
    assert p.returncode == 1
    assert "run_verl.sh is written for verl 0.9.1 (supported: 0.9.0 or 0.9.1), found verl 0.8.0" in p.stderr
    # a supported verl passes the check and reaches the entry point (here only metadata, so the import fails)
    p = run(_fake_verl(tmp_path / "site091", "0.9.1"))
    assert p.returncode == 1 and "No module named 'verl'" in p.stderr and "run_verl.sh" not in p.stderr


def test_ignored_verl_settings_are_refused(model_dir, adapter_dir, tmp_path):
    base = ["--prompt-batch", "4", "--mini-batch", "4", "--group-size", "2", "--verl-gpus-per-node", "1"]
    r = _invoke(model_dir, adapter_dir, tmp_path / "run", *base, "--algo", "dapo", "--max-gen-batches", "7")
    assert r.exit_code == 1 and "--max-gen-batches 7 cannot be handed to verl" in r.output
    assert "ignores algorithm.filter_groups.max_num_gen_batches" in r.output
    # 0 (never give up) is what verl does, and without dynamic sampling the flag means nothing
    r = _invoke(model_dir, adapter_dir, tmp_path / "ok0", *base, "--max-gen-batches", "0")
    assert r.exit_code == 0, r.output
    # the difference from the bundled loop is said in the output and the script
    assert "no limit on generation batches per step" in r.output
    assert "no limit on generation batches" in (tmp_path / "ok0" / "verl" / "run_verl.sh").read_text()
    r = _invoke(model_dir, adapter_dir, tmp_path / "ok7", *base, "--max-gen-batches", "7", "--no-dynamic-sampling")
    assert r.exit_code == 0, r.output


def test_adapters_with_target_parameters_are_not_handed_on(tmp_path):
    # MoE expert stacks are PEFT target_parameters; verl's settings cannot name them: refused, never dropped.
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["q_proj"],
                "target_parameters": ["experts.gate_up_proj", "experts.down_proj"],
            }
        )
    )
    with pytest.raises(LoraforgeError, match="target_parameters .*experts.gate_up_proj.*bundled loop"):
        read_lora_settings(tmp_path)


# --- an -o that already holds things ----------------------------------------------------------------------------
def _digest(root):
    """{relative path: bytes} of every file under ROOT, and its symlinks as 'link -> target'."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            found[rel] = ("link -> " + os.readlink(path)) if os.path.islink(path) else open(path, "rb").read()
    return found


def _error_line(r):
    lines = [x for x in r.output.strip().splitlines() if x.startswith("Error: ")]
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_a_job_with_verl_checkpoints_is_never_rewritten(model_dir, adapter_dir, tmp_path):
    """-o RUN where verl already ran RUN/verl/run_verl.sh and saved checkpoints: the checkpoints belong to that job
    (verl resumes from them with trainer.resume_mode=auto), so another job is refused, even with --overwrite; the same
    job again is left as it is (so `--run` continues it)."""
    run = tmp_path / "run"
    assert _invoke(model_dir, adapter_dir, run, *ONE_GPU).exit_code == 0
    step = run / "verl" / "checkpoints" / "global_step_50" / "actor"
    step.mkdir(parents=True)
    (step / "model.pt").write_bytes(b"verl's weights")
    (run / "verl" / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("50")
    before = _digest(run)
    for extra in ((), ("--overwrite",)):
        r = _invoke(model_dir, adapter_dir, run, *ONE_GPU, "--lr", "3e-5", "--data", "synthetic:n=20,max=2", *extra)
        line = _error_line(r)
        assert "holds a verl job prepared with other settings" in line and "checkpoints" in line, line
        assert "run_verl.sh" in line and "choose another -o" in line, line
        assert _digest(run) == before
    # the very same job: nothing is written, the checkpoints stay
    r = _invoke(model_dir, adapter_dir, run, *ONE_GPU)
    assert r.exit_code == 0 and "already holds this job" in r.output, r.output
    assert _digest(run) == before


def test_another_job_replaces_a_prepared_one_only_with_overwrite(model_dir, adapter_dir, tmp_path):
    run = tmp_path / "run"
    assert _invoke(model_dir, adapter_dir, run, *ONE_GPU).exit_code == 0
    before = _digest(run)
    r = _invoke(model_dir, adapter_dir, run, *ONE_GPU, "--lr", "3e-5")
    line = _error_line(r)
    assert "holds a verl job prepared with other settings" in line and "--overwrite" in line, line
    assert "run_verl.sh" in line and "overrides.json" in line and "train.parquet" not in line, line
    assert _digest(run) == before
    r = _invoke(model_dir, adapter_dir, run, *ONE_GPU, "--lr", "3e-5", "--overwrite")
    assert r.exit_code == 0, r.output
    assert read_command(run / "verl" / "run_verl.sh")["actor_rollout_ref.actor.optim.lr"] == "3e-05"
    assert os.access(run / "verl" / "run_verl.sh", os.X_OK)
    assert sorted(os.listdir(run)) == ["verl"]  # no staging directory or lock left beside it
    # --overwrite goes with --backend verl only
    r = CliRunner().invoke(main, ["train", "--overwrite", "--adapter", "x"])
    assert r.exit_code == 2 and "go with --backend verl" in r.output


def test_a_failed_prepare_changes_nothing(model_dir, adapter_dir, tmp_path, monkeypatch):
    """An error after the first file is written (here: --eval-data that cannot be read, then a full disk while
    writing val.parquet) left a mixed job: the new train.parquet under the old run_verl.sh."""
    run = tmp_path / "run"
    assert _invoke(model_dir, adapter_dir, run, *ONE_GPU).exit_code == 0
    before = _digest(run)
    missing = tmp_path / "missing.jsonl"
    new_data = ("--overwrite", "--data", "synthetic:n=20")
    r = _invoke(model_dir, adapter_dir, run, *ONE_GPU, *new_data, "--eval-data", missing)
    assert f"--eval-data {missing}: no such file" in _error_line(r)  # the flag that named it, not --data
    assert _digest(run) == before
    r = _invoke(model_dir, adapter_dir, tmp_path / "new", *ONE_GPU, "--eval-data", missing)
    assert str(missing) in _error_line(r)
    assert not (tmp_path / "new").exists()

    import errno

    from loraforge.rl import verl_launch

    real, calls = verl_launch.write_parquet, []

    def full_disk_at_the_second(examples, path, template):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(examples, path, template)

    monkeypatch.setattr(verl_launch, "write_parquet", full_disk_at_the_second)
    r = _invoke(model_dir, adapter_dir, run, *ONE_GPU, "--overwrite", "--data", "synthetic:n=20")
    line = _error_line(r)
    assert "ENOSPC" in line and str((run / "verl").resolve()) in line and ".partial" not in line, line
    assert _digest(run) == before


def test_a_verl_directory_that_is_a_symlink_is_refused(model_dir, adapter_dir, tmp_path):
    """RUN/verl a symlink to the directory --data is in: the path guard checks RUN, and the data file was read, then
    written over through the link."""
    elsewhere = tmp_path / "other" / "verl"
    assert _invoke(model_dir, adapter_dir, tmp_path / "other", *ONE_GPU).exit_code == 0
    run = tmp_path / "run"
    run.mkdir()
    (run / "verl").symlink_to(elsewhere)
    before = _digest(tmp_path / "other")
    r = _invoke(model_dir, adapter_dir, run, *ONE_GPU, "--data", elsewhere / "train.parquet", "--overwrite")
    line = _error_line(r)
    assert "is a symlink" in line and str(elsewhere) in line, line
    assert _digest(tmp_path / "other") == before and _digest(run) == {"verl": f"link -> {elsewhere}"}


def test_an_output_that_cannot_be_a_directory_is_one_line(model_dir, adapter_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out in (afile, afile / "sub"):
        line = _error_line(_invoke(model_dir, adapter_dir, out, *ONE_GPU))
        assert str(afile.name) in line and "file" in line, line
        assert afile.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["afile"]
    # RUN/verl a file: refused, kept
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "verl").write_text("mine")
    line = _error_line(_invoke(model_dir, adapter_dir, tmp_path / "run", *ONE_GPU, "--overwrite"))
    assert "not a directory" in line, line
    assert (tmp_path / "run" / "verl").read_text() == "mine" and os.listdir(tmp_path / "run") == ["verl"]


KILLED_PREPARE = """
import os, signal, sys
from click.testing import CliRunner
from loraforge.cli import main
from loraforge.rl import verl_launch
real, calls = verl_launch.write_parquet, []
def killed_at_the_second(examples, path, template):
    calls.append(path)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(examples, path, template)
verl_launch.write_parquet = killed_at_the_second
CliRunner().invoke(main, sys.argv[1:], catch_exceptions=False)
"""


def test_kill_9_while_writing_leaves_the_old_job(model_dir, adapter_dir, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--backend", "verl", "--model", str(model_dir), "--adapter", str(adapter_dir), "-o", str(run)]
    args += ["--verl-version", SUPPORTED_VERL[-1], *ONE_GPU]
    assert CliRunner().invoke(main, [*args, "--data", "synthetic:n=40,max=2"]).exit_code == 0
    before = _digest(run / "verl")
    new = [*args, "--data", "synthetic:n=20,max=2", "--overwrite"]
    p = subprocess.run([sys.executable, "-c", KILLED_PREPARE, *new], capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr
    assert _digest(run / "verl") == before  # train.parquet was new before the kill; it is in the staging directory
    assert [n for n in os.listdir(run) if n.startswith(".verl.partial-")]
    # the next run removes what the killed one left, and writes the new job
    r = CliRunner().invoke(main, new)
    assert r.exit_code == 0 and "left by an interrupted run" in r.output, r.output
    assert sorted(os.listdir(run)) == ["verl"] and len(pq.read_table(run / "verl" / "train.parquet")) == 20


def test_the_experiment_name_is_the_run_directorys_own(model_dir, adapter_dir, tmp_path):
    # `-o run/sub/..` is the directory `run`: its name, not "..", goes to verl's trainer.experiment_name
    (tmp_path / "run" / "sub").mkdir(parents=True)
    assert _invoke(model_dir, adapter_dir, tmp_path / "run" / "sub" / "..", *ONE_GPU).exit_code == 0
    overrides = json.loads((tmp_path / "run" / "verl" / "overrides.json").read_text())
    assert overrides["trainer.experiment_name"] == "run"


def test_a_running_job_is_not_replaced_under_verl(model_dir, adapter_dir, tmp_path, monkeypatch):
    """While `--run` runs verl (before its first checkpoint protects the job), RUN/verl stays locked: another
    prepare with --overwrite is refused naming the running command, and the job's files are unchanged."""
    from loraforge.rl import verl_launch

    run, seen = tmp_path / "run", []

    def verl_running(argv):  # the moment verl runs: a second command tries to put another job there
        before = _digest(run / "verl")
        r = _invoke(model_dir, adapter_dir, run, *ONE_GPU, "--overwrite", "--lr", "3e-5")
        seen.append((_error_line(r), _digest(run / "verl") == before))
        return 0

    monkeypatch.setattr(verl_launch, "installed_verl_version", lambda: SUPPORTED_VERL[-1])
    monkeypatch.setattr(verl_launch.subprocess, "call", verl_running)
    r = _invoke(model_dir, adapter_dir, run, *ONE_GPU, "--run")
    assert r.exit_code == 0, r.output
    [(line, unchanged)] = seen
    assert f"Another loraforge command (pid {os.getpid()}) is writing" in line and unchanged
    assert not list(run.glob(".verl*"))  # the lock is released (and removed) when verl ends
