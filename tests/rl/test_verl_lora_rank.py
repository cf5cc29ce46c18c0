"""The verl hand-off's LoRA rank: checked, not a defect. `--backend verl` writes the adapter's own rank as
`actor_rollout_ref.model.lora_rank` (4, 24, ...: ranks vLLM's `--max-lora-rank` does not list), and verl 0.9.x
rounds it up to vLLM's next allowed value itself (`get_vllm_max_lora_rank` in
verl/workers/rollout/vllm_rollout/utils.py) before it starts vLLM. These tests run that function from each supported
release as installed (scripts/setup.sh puts them in .cache/verl/VERSION) and check that verl's vLLM server still
passes the rank through it, so a verl release that drops the rounding is caught here instead of by a vLLM start-up
error on a GPU.

verl is not imported (its modules import vLLM and CUDA code at the top): the function is taken from the release's
source file with `ast` and run alone, exactly as written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import loraforge
from loraforge.core.clients import VLLM_LORA_RANKS, vllm_max_lora_rank
from loraforge.rl.verl_launch import SUPPORTED_VERL

CACHE = Path(loraforge.__file__).resolve().parents[1] / ".cache" / "verl"
UTILS = "verl/workers/rollout/vllm_rollout/utils.py"
SERVER = "verl/workers/rollout/vllm_rollout/vllm_async_server.py"


def release_file(version: str, rel: str) -> Path:
    path = CACHE / version / rel
    if not path.is_file():
        pytest.skip(f"{path} is missing: scripts/setup.sh installs verl {version} there (bash scripts/setup.sh)")
    return path


def verl_function(version: str, name: str):
    """Function NAME of verl VERSION's utils.py, compiled alone from the installed source (its module's imports
    for it: typing's Literal and get_args; it imports vLLM itself, inside a try, and falls back without it)."""
    tree = ast.parse(release_file(version, UTILS).read_text())
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert found, f"verl {version} no longer defines {name} in {UTILS}"
    namespace: dict = {}
    exec("from typing import Literal, get_args", namespace)
    exec(compile(ast.Module(body=found, type_ignores=[]), str(UTILS), "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("version", SUPPORTED_VERL)
def test_verl_rounds_an_unlisted_lora_rank_up_to_vllms_next(version):
    rounded = verl_function(version, "get_vllm_max_lora_rank")
    assert rounded(4) == 8 and rounded(24) == 32 and rounded(300) == 320
    for r in range(2, VLLM_LORA_RANKS[-1] + 1):
        # the same rule as loraforge's own `vllm serve` line (core/clients.py) for every rank vLLM can hold
        assert rounded(r) == vllm_max_lora_rank(r), r
    # rank 1: verl keeps 1 (vLLM accepts it from 0.11.1, which verl 0.9 needs); loraforge's serve line says 8,
    # which every vLLM release accepts. Both hold a rank-1 adapter.
    assert rounded(1) in (1, 8)
    with pytest.raises(ValueError, match="lora_rank must be less than or equal to 512"):
        rounded(VLLM_LORA_RANKS[-1] + 1)


@pytest.mark.parametrize("version", SUPPORTED_VERL)
def test_verl_starts_vllm_with_the_rounded_rank_of_model_lora_rank(version):
    # In verl's vLLM server: lora_rank falls back to model_config.lora_rank (the key the hand-off writes) and the
    # engine gets {"max_lora_rank": get_vllm_max_lora_rank(lora_rank)}.
    tree = ast.parse(release_file(version, SERVER).read_text())
    passes = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict)
        for key, value in zip(node.keys, node.values)
        if isinstance(key, ast.Constant)
        and key.value == "max_lora_rank"
        and isinstance(value, ast.Call)
        and getattr(value.func, "id", None) == "get_vllm_max_lora_rank"
        and [a.id for a in value.args if isinstance(a, ast.Name)] == ["lora_rank"]
    ]
    assert passes, f"verl {version}'s vLLM server no longer rounds max_lora_rank through get_vllm_max_lora_rank"
    reads = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and n.attr == "lora_rank" and getattr(n.value, "attr", None) == "model_config"
    ]
    assert reads, f"verl {version}'s vLLM server no longer reads model_config.lora_rank"
