"""`loraforge train` on CUDA, as far as a CPU shows it: the vLLM rollout's dtype rule, which GPU each process of a
launch takes, and restoring a checkpoint's RNG states on a job that sees fewer GPUs than the one that saved it.

Where a GPU would answer (torch.cuda's device count, its RNG setter), the tests stand in for it with the behaviour
CUDA has: a device index at or above the count is an invalid device ordinal."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from test_trainer import tiny_cfg

from loraforge.cli import main
from loraforge.core.errors import LoraforgeError
from loraforge.rl import checkpoint as ckpt
from loraforge.rl import distributed
from loraforge.rl.distributed import DistContext, device_for


# ---------------------------------------------------------------------------------------------- --rollout vllm
def test_rollout_vllm_refuses_float32_and_says_which_dtype(model_dir, adapter_dir, tmp_path):
    with pytest.raises(LoraforgeError, match=r"--rollout vllm needs --dtype bfloat16 or float16, got float32"):
        tiny_cfg(model_dir, adapter_dir, tmp_path / "run", rollout="vllm").resolved()
    for dtype in ("bfloat16", "float16"):
        assert tiny_cfg(model_dir, adapter_dir, tmp_path / "run", rollout="vllm", dtype=dtype).resolved()
    # the transformers rollout keeps float32 (the CPU default)
    assert tiny_cfg(model_dir, adapter_dir, tmp_path / "run").resolved().dtype == "float32"


def test_rollout_vllm_with_the_default_dtype_stops_in_one_line_before_loading(model_dir, adapter_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(model_dir), "--adapter", str(adapter_dir), "-o", str(out)]
    r = CliRunner().invoke(main, args + ["--data", "synthetic:n=8,max=2,style=bare", "--rollout", "vllm"])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("Error: --rollout vllm needs --dtype bfloat16")
        and "add --dtype" in lines[0]
    )
    assert not (out / "config.json").exists()


# ---------------------------------------------------------------------------------------------- --device
def test_each_process_of_a_gpu_launch_takes_the_gpu_of_its_local_rank():
    ctx = DistContext(rank=3, world=4, local_rank=1, backend="nccl")  # the second process of a second node
    assert device_for(ctx, "auto") == device_for(ctx, "cuda") == "cuda:1"
    # single process, and CPU processes (gloo): the flag as given
    assert device_for(DistContext(), "cuda:1") == "cuda:1" and device_for(DistContext(), "auto") == "auto"
    assert device_for(DistContext(rank=1, world=2, local_rank=1, backend="gloo"), "cpu") == "cpu"


@pytest.mark.parametrize("flag", ["cuda:0", "cuda:1"])
def test_one_fixed_gpu_for_every_process_is_refused(flag):
    # With --device cuda:N every process would load onto GPU N while each NCCL communicator is on its own GPU.
    with pytest.raises(LoraforgeError, match=rf"--device {flag} under a launch of 2 processes: .*CUDA_VISIBLE_DEVICES"):
        device_for(DistContext(rank=1, world=2, local_rank=1, backend="nccl"), flag)


def test_init_distributed_refuses_a_fixed_gpu_before_starting_anything(monkeypatch):
    # A 2-process launch on a machine with 2 GPUs (the count torch.cuda would report).
    monkeypatch.setattr(distributed, "_CONTEXT", None)
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    touched = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: touched.append(i))
    with pytest.raises(LoraforgeError, match=r"--device cuda:0 under a launch of 2 processes"):
        distributed.init_distributed("cuda:0")
    assert touched == [] and not torch.distributed.is_initialized() and distributed._CONTEXT is None


# ---------------------------------------------------------------------------------------------- --resume
def cuda_state(seed: int) -> torch.Tensor:
    """A CUDA generator's state as get_rng_state returns it: 8 bytes of seed, 8 of Philox offset."""
    return torch.tensor([seed, 0, 0, 0, 0, 0, 0, 0] + [0] * 8, dtype=torch.uint8)


@pytest.fixture
def gpus(monkeypatch):
    """torch.cuda with N visible GPUs whose RNG states are a dict; an index >= N fails as CUDA does."""

    def visible(n: int) -> dict:
        states: dict[int, torch.Tensor] = {}

        def set_state(state, device="cuda"):
            index = device if isinstance(device, int) else torch.device(device).index or 0
            if index >= n:
                raise RuntimeError("CUDA error: invalid device ordinal")
            states[index] = state

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
        monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_state)  # what set_rng_state_all calls
        return states

    return visible


def saved_on(n_gpus: int) -> dict:
    """The RNG part of a checkpoint saved by a process that saw N_GPUS GPUs (ckpt.rng_state's layout)."""
    gen = torch.Generator().manual_seed(7)
    return {
        "torch": torch.get_rng_state(),
        "python": __import__("random").getstate(),
        "cuda": [cuda_state(10 + i) for i in range(n_gpus)],
        "sampler": gen.get_state(),
    }


def test_resume_on_fewer_gpus_restores_the_states_of_the_gpus_it_has(gpus):
    states = gpus(1)  # saved by an 8-GPU run, resumed where one GPU is visible
    sampler = torch.Generator().manual_seed(99)
    ckpt.set_rng_state(saved_on(8), sampler)
    assert list(states) == [0] and torch.equal(states[0], cuda_state(10))
    assert torch.equal(sampler.get_state(), torch.Generator().manual_seed(7).get_state())  # the sampler's own


def test_resume_on_more_gpus_restores_those_it_saved(gpus):
    states = gpus(4)
    ckpt.set_rng_state(saved_on(2), None)
    assert sorted(states) == [0, 1] and torch.equal(states[1], cuda_state(11))
