"""Several processes: `accelerate launch -m loraforge train` with 2 CPU processes (gloo) trains
exactly like 1 process on the same data, writes metrics and checkpoints once, and keeps both processes'
adapters identical. Plus the pure sharding helpers and the world-size error."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_trainer import tiny_cfg

from loraforge.cli import main
from loraforge.core.errors import LoraforgeError
from loraforge.rl.checkpoint import list_checkpoints
from loraforge.rl.distributed import DistContext, plan_minibatches, split_evenly
from loraforge.rl.metrics import read_metrics
from loraforge.rl.trainer import Trainer, resume

REPO = Path(__file__).parents[2]


def test_split_evenly_and_plan():
    assert [list(split_evenly(10, 3, r)) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [list(split_evenly(1, 2, r)) for r in range(2)] == [[0], []]
    # one process: each mini-batch of 2 groups (of 3, 3, 2, 3 rows) is all local, as the single-process loop
    one = plan_minibatches([3, 3, 2, 3], 2, 1, 0)
    assert one == [([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]), ([6, 7, 8, 9, 10], [6, 7, 8, 9, 10])]
    # two processes: the same global mini-batches, their rows split in contiguous halves
    r0, r1 = plan_minibatches([3, 3, 2, 3], 2, 2, 0), plan_minibatches([3, 3, 2, 3], 2, 2, 1)
    assert [g for g, _ in r0] == [g for g, _ in one] == [g for g, _ in r1]
    assert [loc for _, loc in r0] == [[0, 1, 2], [6, 7, 8]] and [loc for _, loc in r1] == [[3, 4, 5], [9, 10]]


def test_world_size_must_divide_the_prompt_batch(model_dir, adapter_dir, tmp_path, monkeypatch):
    import loraforge.rl.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "init_distributed", lambda device: DistContext(rank=0, world=3))
    with pytest.raises(
        LoraforgeError,
        match=r"--prompt-batch 4 is not divisible by the 3 processes: .*"
        r"--prompt-batch 3 or 6",
    ):
        Trainer(tiny_cfg(model_dir, adapter_dir, tmp_path / "run")).run()
    with pytest.raises(LoraforgeError, match="not divisible by the 3 GPUs"):
        Trainer(tiny_cfg(model_dir, adapter_dir, tmp_path / "run", rollout="vllm", dtype="bfloat16")).run()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(model_dir, adapter_dir, tmp_path):
    # deterministic rollouts (rl_helpers.scripted_rollout) so that both runs see the same data; 4 prompts x
    # 4 samples, 2 mini-batches of 8 rows: 4 rows per process each, in micro-batches of 2 (accumulation; the
    # same micro-batches as one process has, so that ppo_kl and clipfrac, means over micro-batches, compare)
    args = [
        "train",
        "--model",
        str(model_dir),
        "--adapter",
        str(adapter_dir),
        "--data",
        "synthetic:n=60,max=2,style=bare",
        "--reward",
        "rl_helpers:answer_scorer",
        "--rollout",
        "rl_helpers:scripted_rollout",
        "--max-response-length",
        "2",
        "--overlong-buffer",
        "0",
        "--group-size",
        "4",
        "--prompt-batch",
        "4",
        "--mini-batch",
        "2",
        "--micro-batch",
        "2",
        "--steps",
        "2",
        "--lr",
        "1e-2",
        "--max-gen-batches",
        "0",
        "--save-every",
        "1",
        "--no-tensorboard",
        "--device",
        "cpu",
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "rl")]), "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "loraforge",
    ]
    proc = subprocess.run(launch + args + ["-o", str(two)], env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    # one voice: process 0 prints, logs and saves
    assert "training dapo for 2 steps on 2 processes" in out
    assert out.count("step 1/2 | reward") == 1 and out.count("finished at step 2") == 1
    assert "the adapter is identical on all 2 processes" in out
    assert [m["step"] for m in read_metrics(two)] == [1, 2]
    assert [p.name for p in list_checkpoints(two)] == ["step_000001", "step_000002"]
    blob = torch.load(two / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=True)
    assert len(blob["rng_ranks"]) == 2  # each process's sampler state

    r = CliRunner().invoke(main, args + ["-o", str(one)])
    assert r.exit_code == 0, r.output
    m2, m1 = read_metrics(two), read_metrics(one)
    for a, b in zip(m2, m1):
        # the same global rollouts ...
        for key in ("reward", "acc", "kept_frac", "gen_batches", "response_len", "lr"):
            assert a[key] == b[key], key
        # ... and the same update: the token-mean over the global mini-batch, summed over processes
        for key in ("grad_norm", "kl", "ppo_kl", "clipfrac", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    w2 = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    w1 = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    w0 = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert w2.keys() == w1.keys()
    for k in w1:
        assert torch.allclose(w2[k], w1[k], rtol=1e-4, atol=1e-6), (k, (w2[k] - w1[k]).abs().max())
    assert any(not torch.equal(w1[k], w0[k]) for k in w0)  # and it did train

    # a 2-process checkpoint resumed by one process: it continues, and says sampling will not replay
    lines = []
    resume(two, steps=3, echo=lines.append)
    assert any("saved by 2 process(es), resumed on 1" in ln for ln in lines)
    assert [m["step"] for m in read_metrics(two)] == [1, 2, 3]
