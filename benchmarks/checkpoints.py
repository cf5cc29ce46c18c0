"""Checkpoints to benchmark on, made locally (no download).

- `QWEN2_PRESETS`: the shapes of Qwen2.5-1.5B and -7B (random weights; only the shapes matter for
  timing and memory), and a tiny one to check the scripts in seconds.
- `write_random_checkpoint(...)`: a random bf16 Qwen2 checkpoint of a preset's shape, written shard
  by shard from a meta-device skeleton (never the whole model in memory). `spectrum="powerlaw"` gives its
  projections a pretrained-like top spectrum (the init's partial eigensolver is timed on those; Gaussian
  weights crowd their top singular values at the noise edge, which no pretrained model does).
- `truncate_checkpoint(...)`: a copy of a checkpoint keeping only its first N blocks.

A checkpoint directory is only ever written where there is nothing, an empty directory, or a checkpoint these
benchmarks wrote (its marker file, `bench_checkpoint.json` / `bench_truncated.json`, inside): anything else (a
mistyped --dir, a real model) is refused in one line before any work, never deleted to make room.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

# Shapes of the models the benchmarks report on (random weights; only the shapes matter for timing/memory).
QWEN2_PRESETS = {
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    ),
    # Small enough to check the scripts on a laptop CPU in seconds.
    "tiny": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
    ),
}


def _tensor_plan(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the checkpoint must hold, from a meta-device skeleton.
    Tied parameters appear once (named_parameters drops duplicates); buffers that are not in the
    state dict (rotary inv_freq) are left out."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state_keys = set(model.state_dict().keys())
    plan = [(k, tuple(p.shape)) for k, p in model.named_parameters()]
    plan += [(k, tuple(b.shape)) for k, b in model.named_buffers() if k in state_keys]
    return plan


def write_random_checkpoint(
    path,
    preset: str,
    num_hidden_layers: int | None = None,
    seed: int = 0,
    shard_mib: int = 2048,
    device: str = "cpu",
    reuse: bool = True,
    spectrum: str = "gaussian",
) -> dict:
    """Write a random bf16 Qwen2 checkpoint with PRESET's shapes (QWEN2_PRESETS) to PATH.

    Tensors are generated one at a time (N(0, 0.02) weights and biases, ones for norms; each seeded
    by SEED and its name, so the files are reproducible) and written shard by shard with
    safetensors, plus model.safetensors.index.json and config.json. At most one shard (SHARD_MIB)
    is in memory. The directory is built next to PATH and renamed into place; with REUSE an
    existing directory made with the same settings is kept, one of ours with other settings is replaced, and
    anything else at PATH is refused (`check_dest`) before any work. Returns {"path", "reused", "seconds",
    "bytes"}.
    """
    from transformers import Qwen2Config

    path = Path(path)
    spec = dict(QWEN2_PRESETS[preset])
    if num_hidden_layers is not None:
        spec["num_hidden_layers"] = num_hidden_layers
    marker = {"preset": preset, "spec": spec, "seed": seed, "format": "loraforge-bench-random/2"}  # 2: architectures
    if spectrum != "gaussian":
        marker["spectrum"] = spectrum
    if reuse and (path / "bench_checkpoint.json").exists():
        if json.loads((path / "bench_checkpoint.json").read_text()) == marker:
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            return {"path": str(path), "reused": True, "seconds": 0.0, "bytes": size}
    check_dest(path, "bench_checkpoint.json")
    started = time.perf_counter()
    # `architectures` as save_pretrained of a real model writes it (loraforge reads targets off the header then)
    config = Qwen2Config(**spec, dtype="bfloat16", architectures=["Qwen2ForCausalLM"])
    plan = _tensor_plan(config)
    limit = shard_mib * 2**20
    shards, current, size = [], [], 0
    for name, shape in plan:
        nbytes = 2 * _numel(shape)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)

    with staging(path, "bench_checkpoint.json") as tmp:
        _write_shards(tmp, shards, seed, device, spectrum)
        config.save_pretrained(str(tmp))
        (tmp / "bench_checkpoint.json").write_text(json.dumps(marker))
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"path": str(path), "reused": False, "seconds": time.perf_counter() - started, "bytes": size}


def _write_shards(tmp: Path, shards, seed: int, device: str, spectrum: str) -> int:
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {}
        for name, shape in shard:
            tensors[name] = _random_tensor(name, shape, seed, device, spectrum).cpu()
            weight_map[name] = fname
            total += 2 * _numel(shape)
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return total


def check_dest(path, marker: str) -> None:
    """PATH may be (re)written: nothing there, an empty directory, or a directory holding MARKER (a checkpoint
    these benchmarks wrote, with other settings). Anything else is refused in one line, and nothing is changed."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and ((path / marker).is_file() or not any(path.iterdir())):
        return
    import report

    kind = "a directory" if path.is_dir() and not path.is_symlink() else "a file or link"
    report.refuse(
        f"{path} exists and is {kind} these benchmarks did not write (expected nothing there, an empty directory, "
        f"or a checkpoint with {marker}). Nothing was changed: choose another directory (--dir), or remove it "
        "yourself and run again."
    )


@contextlib.contextmanager
def staging(path: Path, marker: str):
    """A new staging directory beside PATH to write into; on success it is renamed to PATH (a previous checkpoint of
    ours there is replaced, anything else refused: `check_dest`); on failure it is removed and PATH left alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; this is an ordinary model directory
        check_dest(path, marker)  # again: something may have been put there while this was written
        old = None
        if path.exists() and any(path.iterdir()):  # ours (check_dest): moved aside, removed once replaced
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)  # onto nothing, or onto an empty directory
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _random_tensor(name: str, shape, seed: int, device: str, spectrum: str = "gaussian"):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    if spectrum == "powerlaw" and name.endswith("proj.weight"):
        return _powerlaw(shape, g, device)
    return torch.randn(shape, generator=g, dtype=torch.bfloat16, device=device).mul_(0.02)


def _powerlaw(shape, g, device: str):
    """N(0, 0.02) noise plus k = 256 spikes s_i = 4 edge i^-0.18 (edge = 0.02 (sqrt m + sqrt n), the noise's top
    singular value) on random directions: a top spectrum decaying like SmolLM2-135M's (s_32 / s_49 about 1.08, the
    middle of its 1.04-1.6), s_1 about 4x the noise edge, the 256th spike about 1.5x."""
    import torch

    m, n = shape
    k = min(256, min(m, n) // 2)
    edge = 0.02 * (m**0.5 + n**0.5)
    s = 4 * edge * torch.arange(1, k + 1, dtype=torch.float32, device=device) ** -0.18
    U = torch.randn(m, k, generator=g, device=device) / m**0.5
    V = torch.randn(n, k, generator=g, device=device) / n**0.5
    W = torch.randn(m, n, generator=g, device=device).mul_(0.02).addmm_(U * s, V.T)
    return W.to(torch.bfloat16)


def truncate_checkpoint(src, dst, num_layers: int) -> Path:
    """Copy the safetensors checkpoint SRC to DST keeping only blocks 0..NUM_LAYERS-1 (for quick
    runs: both sides of a benchmark then read the same smaller checkpoint). Tokenizer and other
    small files are copied; reused when DST already holds the same truncation."""
    src, dst = Path(src), Path(dst)
    marker = {"src": str(src.resolve()), "num_layers": num_layers, "format": 2}  # 2: layer_types truncated too
    if (dst / "bench_truncated.json").exists() and json.loads((dst / "bench_truncated.json").read_text()) == marker:
        return dst  # before importing safetensors.torch (torch): a reuse is then a quick process of its own
    check_dest(dst, "bench_truncated.json")
    import re

    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    if isinstance(config.get("layer_types"), list):  # transformers 5 checks it has one entry per block
        config["layer_types"] = config["layer_types"][:num_layers]
    files = sorted(src.glob("*.safetensors"))
    layer_re = re.compile(r"\.layers\.(\d+)\.")
    tensors = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                m = layer_re.search(k)
                if m is None or int(m.group(1)) < num_layers:
                    tensors[k] = h.get_tensor(k)
    with staging(dst, "bench_truncated.json") as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in src.iterdir():
            if (
                f.is_file()
                and not f.name.endswith(".safetensors")
                and f.name not in ("config.json", "model.safetensors.index.json")
            ):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "bench_truncated.json").write_text(json.dumps(marker))
    return dst
