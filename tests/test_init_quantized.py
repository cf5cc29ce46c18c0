"""`loraforge init --quantize` and `loraforge verify --quantize`, on tiny models (Llama with a bf16 checkpoint, GPT-2
whose Conv1D stores W^T), against an independent float64 reference built from torch.linalg.svd and Q (the weight a
bitsandbytes layer computes with, checked against bitsandbytes itself in tests/test_quantize.py):

- rlpo / rlmo: A0 spans the top / bottom-r right singular subspace of Q(W), not of W;
- pissa / olora: s B0 A0 is the refinement docs/quantized.md states (P_t = the method's s B0 A0 of W - Q(W - P_{t-1}),
  5 times), recomputed here with full SVDs; the residual base is still W - s B0 A0; the quantized error falls with
  the refinements; and `quant_rel` in the manifest is ||Q(base) + s B0 A0 - W|| / ||W||;
- verify passes on every such adapter, reports the quantized checks, catches a changed factor, and refuses a
  --quantize that contradicts the manifest;
- without bitsandbytes, `init --quantize` and `verify --quantize` say in one line how to install it, and init writes
  nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke

pytest.importorskip("bitsandbytes")

from loraforge import InitConfig, init_adapter  # noqa: E402
from loraforge.adapters.directory import load_adapter  # noqa: E402
from loraforge.core.errors import LoraforgeError  # noqa: E402
from loraforge.models.quantize import quantize_dequantize  # noqa: E402
from loraforge.models.weights import open_model_weights  # noqa: E402
from loraforge.ship.verify import verify_adapter  # noqa: E402

R = 4


@pytest.fixture(scope="module")
def qinits(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("qinits")
    out = {}
    for method in ("rlpo", "rlmo", "pissa", "olora"):
        cfg = InitConfig(method=method, r=R, device="cpu", quantize="nf4")
        out[method] = init_adapter(str(tiny_models["llama"]), root / method, cfg).out
    plain = InitConfig(method="pissa", r=R, device="cpu", quantize="nf4", quant_iters=0)
    out["pissa-0"] = init_adapter(str(tiny_models["llama"]), root / "pissa-0", plain).out
    return out


def Q(W: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """The quantized weight as float64, for W stored in DTYPE (the llama checkpoint's bf16)."""
    return quantize_dequantize(W.to(dtype), "nf4").double()


def factors(adapter_dir, name):
    a = load_adapter(adapter_dir)
    A, B = a.factors(name)
    return A.double(), B.double(), a.scaling


def weights_of(model_dir, adapter_dir):
    names = load_adapter(adapter_dir).modules
    return names, open_model_weights(str(model_dir), names)


@pytest.mark.parametrize("method, side", [("rlpo", "top"), ("rlmo", "bottom")])
def test_b0_zero_methods_take_the_spectrum_of_the_quantized_weight(qinits, tiny_models, method, side):
    names, w = weights_of(tiny_models["llama"], qinits[method])
    for name in names:
        A, _, _ = factors(qinits[method], name)
        W = w.matrix(name)
        Vq = torch.linalg.svd(Q(W), full_matrices=False).Vh
        Vw = torch.linalg.svd(W, full_matrices=False).Vh
        sub = slice(0, R) if side == "top" else slice(-R, None)
        on_q = (A @ Vq[sub].T).norm() ** 2 / R  # 1 when A0's rows span Q(W)'s subspace
        assert on_q > 1 - 1e-6, name
        if side == "bottom":  # and Q(W)'s minor subspace is not W's (nf4 noise >> W's smallest singular values)
            assert (A @ Vw[sub].T).norm() ** 2 / R < 0.99, name
    manifest = json.loads((qinits[method] / "loraforge.json").read_text())
    assert manifest["quantize"]["type"] == "nf4" and manifest["quantize"]["iters"] == 0
    assert manifest["quantize"]["computed"] == f"A0 from the {side}-r spectrum of Q(W)"


def method_part(M: torch.Tensor, method: str, s: float) -> torch.Tensor:
    """The method's s B0 A0 of M from a float64 SVD: pissa's rank-r part, olora's s U_r V_r^T."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    if method == "pissa":
        return (U[:, :R] * S[:R]) @ Vh[:R]
    return s * U[:, :R] @ Vh[:R]


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_principal_residualised_methods_are_refined_against_the_quantized_residual(qinits, tiny_models, method):
    names, w = weights_of(tiny_models["llama"], qinits[method])
    residual = open_model_weights(str(qinits[method] / "base"), names)
    manifest = json.loads((qinits[method] / "loraforge.json").read_text())
    assert manifest["quantize"]["iters"] == 5
    for name in names:
        A, B, s = factors(qinits[method], name)
        W = w.matrix(name)
        P = method_part(W, method, s)
        for _ in range(5):
            P = method_part(W - Q(W - P), method, s)
        # float32 factors, and a rounding-boundary value may quantize the other way: well within 1e-4
        assert (s * B @ A - P).norm() / P.norm() < 1e-4, name
        # the base is still the exact residual, to bf16's rounding (verify's tolerance: eps(bf16) relative)
        base = residual.matrix(name)
        assert (base + s * B @ A - W).norm() / W.norm() <= torch.finfo(torch.bfloat16).eps, name
        quant_rel = float((Q(base) + s * B @ A - W).norm() / W.norm())
        assert manifest["modules"][name]["quant_rel"] == pytest.approx(quant_rel, rel=1e-6), name


def test_refinements_bring_the_quantized_base_closer_to_w(qinits):
    m5 = json.loads((qinits["pissa"] / "loraforge.json").read_text())
    m0 = json.loads((qinits["pissa-0"] / "loraforge.json").read_text())
    rlpo = json.loads((qinits["rlpo"] / "loraforge.json").read_text())  # B0 = 0: Q(W) itself
    assert m5["summary"]["quant_rel_median"] < m0["summary"]["quant_rel_median"] < rlpo["summary"]["quant_rel_median"]
    assert m0["quantize"]["iters"] == 0


@pytest.mark.parametrize("method", ["rlpo", "rlmo", "pissa", "olora"])
def test_verify_passes_and_reports_the_quantized_checks(qinits, method):
    report = verify_adapter(qinits[method], device="cpu")
    failing = {c.name: c.failures for c in report.checks if not c.ok}
    assert report.ok, failing
    checks = {c.name: c for c in report.checks}
    assert checks["quantized (nf4)"].checked == 14 and "median" in checks["quantized (nf4)"].detail
    assert checks["peft logits (nf4)"].checked == 1
    assert "= dequantized float32 model + adapter" in checks["peft logits (nf4)"].detail


def test_verify_catches_a_changed_factor_of_a_quantize_aware_init(qinits, tmp_path):
    import shutil

    from adapter_helpers import rewrite_factor

    copy = tmp_path / "pissa"
    shutil.copytree(qinits["pissa"], copy)
    module = load_adapter(copy).modules[0]
    rewrite_factor(copy, module, "B", lambda t: t * 1.01)  # hash re-recorded: only the math can notice
    report = verify_adapter(copy, device="cpu")
    failed = {c.name: c.failures for c in report.checks if not c.ok}
    assert set(failed["formula"]) == {module} and set(failed["quantized (nf4)"]) == {module}


def test_verify_quantize_on_a_plain_adapter_and_a_contradicting_flag(tiny_models, qinits, tmp_path):
    plain = init_adapter(str(tiny_models["gpt2"]), tmp_path / "gpt2", InitConfig(method="pissa", r=R, device="cpu"))
    res = invoke("verify", plain.out, "--quantize", "nf4", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "quantized (nf4) ok" in res.output and "peft logits (nf4) ok" in res.output
    with pytest.raises(LoraforgeError, match="--quantize fp4, but the adapter was computed for a nf4 base"):
        verify_adapter(qinits["rlpo"], device="cpu", quantize="fp4")


def test_init_model_refuses_a_model_loaded_in_4_bits(tiny_models):
    from transformers import AutoModelForCausalLM

    from loraforge import init_model
    from loraforge.models.quantize import bnb_config

    model = AutoModelForCausalLM.from_pretrained(
        tiny_models["llama"], quantization_config=bnb_config("nf4", torch.float32), device_map={"": "cpu"}
    )
    with pytest.raises(LoraforgeError, match="init_model needs the model's weights in floating point"):
        init_model(model, InitConfig(method="rlpo", r=R))


def test_without_bitsandbytes_init_and_verify_say_how_to_install_in_one_line(tiny_models, tmp_path, hide_package):
    plain = init_adapter(str(tiny_models["llama"]), tmp_path / "plain", InitConfig(method="rlpo", r=R, device="cpu"))
    hide_package("bitsandbytes")
    want = (
        "Error: --quantize needs bitsandbytes, which is not installed: pip install -e '.[quant]' (bitsandbytes >= 0.50)"
    )
    res = invoke("init", tiny_models["llama"], "--method", "rlpo", "-r", R, "--quantize", "nf4", "-o", tmp_path / "q")
    assert res.exit_code == 1 and res.output.strip().splitlines() == [want]
    assert not (tmp_path / "q").exists()
    res = invoke("verify", plain.out, "--quantize", "nf4", "--device", "cpu")
    assert res.exit_code == 1 and res.output.strip().splitlines()[-1] == want
