"""Fixtures for the training tests (builders in rl_helpers.py).

Everything is built locally from configs (no network, no GPU) and is small enough that the whole
tests/rl suite runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch
from rl_helpers import make_adapter, make_model, make_tokenizer

# The tiny models' matmuls gain nothing from threads, and on a shared 2-core machine two threads per
# process fight other test runs: one thread makes this suite about 10x faster there.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model():
    return make_model()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A saved tiny base model with its tokenizer, as `--model DIR` takes it."""
    d = tmp_path_factory.mktemp("tiny_base")
    make_model().save_pretrained(str(d))
    make_tokenizer().save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory):
    """A PEFT LoRA adapter (B = 0) for the saved tiny base."""
    d = tmp_path_factory.mktemp("tiny_adapter")
    return make_adapter(make_model(), d)
