"""Reading and writing safetensors files one tensor at a time.

Why not `safetensors.safe_open`: it memory-maps the file, and the pages it touches stay mapped
(and counted in the process's RSS) for as long as the file is open. We read each tensor with a
plain positioned read instead, so memory holds exactly the tensors we are working on. Writing is
the mirror image: the header is computed from shapes and dtypes up front, then tensors are produced
and written one by one, so a residual shard of several GB never sits in memory whole.

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, an
N-byte JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}
padded with spaces to a multiple of 8, then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.core.readers import loads

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


# The safetensors format caps the header at 100 MB; a larger length field is a damaged file, and
# reading it would allocate that much memory before failing.
MAX_HEADER_BYTES = 100_000_000
# Dtypes whose tensors loraforge can decompose (a target weight must be one of them).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def damaged(path: Path, what: str) -> LoraforgeError:
    return LoraforgeError(f"{path}: {what}; the file is damaged or not a safetensors file. Re-download or re-save it.")


class SafetensorsFile:
    """Lazy reader of one .safetensors file: the header at open, tensor bytes on demand.

    The header is checked against the file before anything is read from it (`parse_header`): tensors
    tile the data area exactly (contiguous, in range, nothing left over), every dtype is one loraforge
    knows, and every shape needs exactly its byte range."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata, self.tensors = parse_header(self.path)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        out = torch.empty(info.shape, dtype=DTYPES[info.dtype])
        nbytes = info.end - info.begin
        if nbytes:
            # Straight into the tensor's memory: one copy from the page cache (f.read + bytearray
            # made two, and touching fresh pages costs as much as the copy itself).
            with open(self.path, "rb") as f:
                f.seek(info.begin)
                got = f.readinto(out.reshape(-1).view(torch.uint8).numpy())
            if got != nbytes:  # the file shrank after its header was checked
                raise LoraforgeError(
                    f"{self.path} is truncated: tensor {key} needs bytes {info.begin}..{info.end}, "
                    f"but the file ends at {info.begin + got}. Re-download or re-save it."
                )
        return out

    def read_index(self, key: str, index: int) -> torch.Tensor:
        """KEY[index] (one entry along dim 0, e.g. one expert of a fused stack), reading only its bytes."""
        info = self.tensors[key]
        if info.dtype not in DTYPES or not info.shape or not 0 <= index < info.shape[0]:
            return self.read(key)[index]  # the full read raises the right error (or IndexError)
        out = torch.empty(info.shape[1:], dtype=DTYPES[info.dtype])
        nbytes = out.numel() * out.element_size()
        if nbytes * info.shape[0] != info.end - info.begin:
            return self.read(key)[index]
        if nbytes:
            with open(self.path, "rb") as f:
                f.seek(info.begin + index * nbytes)
                got = f.readinto(out.reshape(-1).view(torch.uint8).numpy())
            if got != nbytes:
                return self.read(key)[index]  # truncated: the full read names it
        return out


def parse_header(path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """(metadata, {name: TensorInfo}) of the safetensors file PATH, after checking the header against
    the file; a LoraforgeError naming the file and the fault otherwise."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise damaged(path, f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise damaged(path, f"the header claims {n} bytes, but the file has {size - 8} after the length field")
        raw = f.read(n)
    try:
        header = loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise damaged(path, f"the header is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise damaged(path, f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise damaged(path, "__metadata__ is not an object")
    start = 8 + n
    tensors = {k: _tensor_info(path, k, v, start) for k, v in header.items()}
    _check_tiling(path, tensors, start, size)
    return metadata, tensors


def _tensor_info(path: Path, key: str, v, start: int) -> TensorInfo:
    """One header entry, checked: known dtype, non-negative integer shape, byte range that fits it."""
    ok = isinstance(v, dict) and isinstance(v.get("dtype"), str)
    shape, offsets = (v.get("shape"), v.get("data_offsets")) if ok else (None, None)
    ints = lambda xs, n=None: (  # noqa: E731
        isinstance(xs, list) and (n is None or len(xs) == n) and all(type(x) is int and x >= 0 for x in xs)
    )
    if not (ok and ints(shape) and ints(offsets, 2) and offsets[0] <= offsets[1]):
        raise damaged(path, f"tensor {key}'s header entry is malformed ({json.dumps(v)[:120]})")
    if v["dtype"] not in DTYPES:
        raise LoraforgeError(
            f"{path}: tensor {key} has dtype {v['dtype']}, which loraforge cannot read "
            f"(it reads {', '.join(DTYPES)}). Re-save the checkpoint in one of those."
        )
    nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[v["dtype"]]).element_size()
    if nbytes != offsets[1] - offsets[0]:
        raise damaged(
            path,
            f"tensor {key} is {offsets[1] - offsets[0]} bytes in the header, but {v['dtype']}{shape} needs {nbytes}",
        )
    return TensorInfo(v["dtype"], tuple(shape), start + offsets[0], start + offsets[1])


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], start: int, size: int) -> None:
    """Tensors must cover the data area exactly once: sorted by offset, each begins where the last
    ended, and the last ends at the end of the file (the rule the safetensors library enforces)."""
    pos = start
    for key, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            what = "overlaps the tensor before it" if info.begin < pos else f"leaves a gap of {info.begin - pos} bytes"
            raise damaged(path, f"tensor {key} starts at byte {info.begin - start} of the data and {what}")
        pos = info.end
    if pos > size:
        raise LoraforgeError(
            f"{path} is truncated: its tensors need {pos} bytes, but the file has {size}. Re-download or re-save it."
        )
    if pos < size:
        raise damaged(path, f"{size - pos} bytes after the last tensor belong to none (inconsistent header offsets)")


@dataclass
class PlannedTensor:
    """A tensor to be written: its name, dtype and shape now, its values later from `produce`."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


def write_streaming(path: str | os.PathLike, tensors: Iterable[PlannedTensor], metadata: dict | None = None) -> str:
    """Write a safetensors file producing one tensor at a time; return the file's sha256 hex digest.

    Tensors are written in the order given (which is the order of the source shard), and each
    produced tensor is checked against its planned dtype and shape.
    """
    tensors = list(tensors)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * torch.empty((), dtype=t.dtype).element_size()
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    # The hash of tensor i is computed on another thread while tensor i+1 is produced and written
    # (hashlib releases the GIL on large buffers), and tensors are written from their own memory.
    with open(path, "wb") as f, concurrent.futures.ThreadPoolExecutor(max_workers=1) as hasher:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            digest.update(chunk)
        hashing = None
        for t in tensors:
            value = t.produce()
            if value.dtype != t.dtype or tuple(value.shape) != tuple(t.shape):
                raise RuntimeError(
                    f"internal error: {t.name} planned as {t.dtype}{list(t.shape)}, "
                    f"produced {value.dtype}{list(value.shape)}"
                )
            data = memoryview(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            f.write(data)
            if hashing is not None:
                hashing.result()  # in order: one update at a time
            hashing = hasher.submit(digest.update, data)
        if hashing is not None:
            hashing.result()
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
