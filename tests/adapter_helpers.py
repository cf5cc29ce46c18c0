"""Helpers shared by the verify, convert, inspect and push tests: a stand-in for training, logits, tampering,
card parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run each of those test modules with one torch thread, then restore the setting.

    The matrices here are tiny (at most 112 x 64): on a shared 2-core machine, waking torch's worker
    threads for every float64 SVD/eigh cost up to 200x the work itself (3 min vs 26 s for these files).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROBE = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def fake_train(init_dir: Path, base_dir: Path, out: Path, seed: int = 0, eps: float = 0.05) -> Path:
    """Stand-in for training: load INIT_DIR on BASE_DIR with PEFT, perturb every A and B, save to OUT.

    The perturbation is relative to each factor's size (with a floor, so B0 = 0 moves too), which is
    what a few optimizer steps do; PEFT's save_pretrained writes the adapter exactly as a trainer would.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(init_dir), is_trainable=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(eps * p.abs().mean().clamp_min(0.05) * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(str(out))
    return out


def logits(model_dir, adapter=None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model(PROBE).logits.double()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def rewrite_factor(out: Path, module: str, which: str, change, update_hash: bool = True) -> None:
    """Change one stored factor of OUT (e.g. multiply A by 1.01); optionally re-record its sha256 so
    that only the math checks can notice."""
    from safetensors.torch import load_file, save_file

    from loraforge.models.checkpoint import sha256_file

    path = out / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = f"base_model.model.{module}.lora_{which}.weight"
    tensors[key] = change(tensors[key]).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    if update_hash:
        manifest = json.loads((out / "loraforge.json").read_text())
        manifest["files"]["adapter_model.safetensors"] = sha256_file(path)
        (out / "loraforge.json").write_text(json.dumps(manifest, indent=2))


def front_matter(card: str) -> dict:
    """The YAML block of a model card, parsed the way the Hub does (safe_load)."""
    assert card.startswith("---\n"), card[:80]
    end = card.index("\n---\n", 4)
    return yaml.safe_load(card[4:end])


def assert_top_r_matches_float64_svd(weights: dict, r: int) -> None:
    """exact_spectrum's rank-r part of each float64 weight equals numpy's float64 SVD truncated at r (relative
    Frobenius error under TOP_RANK_R_RTOL), and so does its energy sum(S[:r]^2) (to 1e-6)."""
    import numpy as np

    from loraforge.inits.linalg import TOP_RANK_R_RTOL, exact_spectrum

    for name, W in weights.items():
        spectrum = exact_spectrum(W.unsqueeze(0), r, "top")
        U, S, Vt = np.linalg.svd(W.numpy(), full_matrices=False)
        ref = (U[:, :r] * S[:r]) @ Vt[:r]
        got = ((spectrum.U[0] * spectrum.S[0]) @ spectrum.V[0].T).numpy()
        assert np.linalg.norm(got - ref) < TOP_RANK_R_RTOL * np.linalg.norm(ref), name
        energy = float((spectrum.S[0] ** 2).sum())
        assert abs(energy - (S[:r] ** 2).sum()) / (S[:r] ** 2).sum() < 1e-6, name
