"""Quantized bases (loraforge.models.quantize): the weight a quantized layer computes with.

- `quantize_dequantize` against an independent float64 reference of NF4 (the 16 code values printed in
  the QLoRA paper, blocks of 64 of the flattened weight, absmax scaling, nearest code) and of LLM.int8
  (per-row absmax, round(127 w / absmax));
- the same as what transformers + bitsandbytes load: every quantized layer of a tiny Llama loaded with
  `bnb_config` computes with exactly quantize_dequantize(stored W), and (4-bit) its logits are those of a
  float32 model holding those weights;
- bf16 and float32 copies of one weight quantize to the same codes;
- without bitsandbytes, one line says how to install it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("bitsandbytes")

from loraforge.core.errors import LoraforgeError  # noqa: E402
from loraforge.models.quantize import (  # noqa: E402
    bnb_config,
    dequantized_weight,
    pin_cpu_kernel,
    quantize_dequantize,
    require_bitsandbytes,
)

# Dettmers et al. 2023 (QLoRA), appendix E: the NF4 data type's 16 values
NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def nf4_reference(w: np.ndarray, block: int = 64) -> np.ndarray:
    """NF4 in float64: per block of BLOCK consecutive values of the row-major weight, x / absmax rounded to
    the nearest NF4 value, times absmax."""
    flat = w.astype(np.float64).reshape(-1)
    pad = (-len(flat)) % block
    blocks = np.concatenate([flat, np.zeros(pad)]).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    scaled = blocks / np.where(absmax > 0, absmax, 1.0)
    codes = np.asarray(NF4)[np.abs(scaled[..., None] - np.asarray(NF4)).argmin(axis=-1)]
    return (codes * absmax).reshape(-1)[: len(flat)].reshape(w.shape)


def test_nf4_matches_the_papers_code_table_to_float32_rounding():
    # in_features a multiple of the 64-value block, as in real models' linear layers: bitsandbytes 0.50's CPU
    # dequantize kernel gets misaligned rows wrong on AVX-512 machines (test_misaligned_rows_follow_bitsandbytes)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0)) * 0.02  # 6144 = 96 blocks
    got = quantize_dequantize(w, "nf4").double().numpy()
    want = nf4_reference(w.numpy())
    # bitsandbytes stores absmax and codes in float32: equal to the float64 reference within float32 rounding
    assert np.abs(got - want).max() <= 2 * np.finfo(np.float32).eps * np.abs(want).max()
    rel = np.linalg.norm(got - w.numpy()) / np.linalg.norm(w.numpy())
    assert 0.05 < rel < 0.15  # NF4 on Gaussian weights: about 9.5% relative error, not 0, not garbage


def test_misaligned_rows_follow_bitsandbytes():
    """A weight whose in_features is not a multiple of 64: bitsandbytes' blocks run over the flattened weight,
    across rows. Its generic dequantize (CUDA, AVX2 CPUs) gives the format's values; its AVX-512 CPU kernel (0.50.2)
    takes each row's blocks from the row start and gets them wrong. quantize_dequantize is what the loaded layer
    computes with on the machine it runs on (test_loaded_layers_compute_with_...), so on an AVX-512 CPU it follows
    that kernel; docs/quantized.md names the limit. Here: whichever the machine, the aligned part is exact."""
    import bitsandbytes.functional as F

    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(0)) * 0.02  # 3840 = 60 blocks, rows of 80
    codes, state = F.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
    flat, flat_state = F.quantize_4bit(w.reshape(1, -1).contiguous(), blocksize=64, quant_type="nf4")
    assert torch.equal(codes, flat)  # the same codes and block scales: only dequantizing can differ
    want = nf4_reference(w.numpy())
    exact = F.dequantize_4bit(flat, flat_state).reshape(w.shape).double().numpy()
    assert np.abs(exact - want).max() <= 2 * np.finfo(np.float32).eps * np.abs(want).max()
    got = quantize_dequantize(w, "nf4").double().numpy()
    # the first row's first block starts at 0 either way: identical under both kernels
    assert np.array_equal(got[0, :64], exact[0, :64])


def test_int8_is_rowwise_absmax_rounding():
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(1)) * 0.02
    got = quantize_dequantize(w, "int8").double().numpy()
    w16 = w.to(torch.float16).double().numpy()
    absmax = np.abs(w16).max(axis=1, keepdims=True)
    want = np.round(w16 * 127 / absmax) * absmax / 127
    step = absmax / 127
    # the same code for (nearly) every value (float32 arithmetic: within 1e-4 of a step; a wrong code is a
    # whole step away); a value at a rounding tie may land one code away
    assert (np.abs(got - want) <= 1e-4 * step).mean() > 0.999
    assert (np.abs(got - want) <= step * (1 + 1e-4)).all()


def test_bf16_and_float32_copies_quantize_to_the_same_weight():
    w = (torch.randn(64, 128, generator=torch.Generator().manual_seed(2)) * 0.02).bfloat16()
    for q in ("nf4", "fp4"):
        assert torch.equal(quantize_dequantize(w, q), quantize_dequantize(w.float(), q))


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_loaded_layers_compute_with_quantize_dequantize_of_the_stored_weight(tmp_path, quant):
    from conftest import save_tiny
    from transformers import AutoModelForCausalLM

    path = save_tiny("llama", tmp_path / "llama")  # bf16 checkpoint
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=bnb_config(quant, torch.float32), device_map={"": "cpu"}
    )
    simulated = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n = 0
    for name, module in loaded.named_modules():
        deq = dequantized_weight(module)
        if deq is None:
            continue
        want = quantize_dequantize(original.get_submodule(name).weight.detach(), quant)
        assert torch.equal(deq, want), name
        simulated.get_submodule(name).weight.data.copy_(want)
        n += 1
    assert n == 14  # 2 blocks x 7 linear layers; the output head stays unquantized
    # the dequantize-then-matmul path train pins on CPU (on AVX-512 CPUs bitsandbytes' own bf16 kernel would
    # round activations to bf16, and cannot run the tiny model's 96-wide down_proj at all)
    pin_cpu_kernel(loaded)
    if quant == "int8":  # LLM.int8 also quantizes the activations: no weight-only model to compare with
        return
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = loaded(tokens).logits, simulated(tokens).logits
        plain = original(tokens).logits
    tol = 1e-5  # float32 compute: the same weights, summed in another order
    assert (got - want).abs().max() <= tol * want.abs().max()
    assert (plain - want).abs().max() > 10 * tol * want.abs().max()  # and quantizing did change the model


def test_without_bitsandbytes_one_line_says_how_to_install(hide_package):
    hide_package("bitsandbytes")
    with pytest.raises(LoraforgeError, match=r"--quantize needs bitsandbytes, which is not installed: pip install "):
        require_bitsandbytes()
    with pytest.raises(LoraforgeError, match=r"pip install -e '\.\[quant\]'"):
        bnb_config("nf4", torch.float32)


def test_unknown_quantization_is_refused():
    with pytest.raises(LoraforgeError, match="--quantize must be one of nf4, fp4, int8, got 'nf3'"):
        bnb_config("nf3", torch.float32)
