"""The page cache of a checkpoint's files: drop it before a cold run, read it in before a warm one, and measure how
much of it is resident (so a "cold" figure can show it was cold).

- `drop(paths)`: posix_fadvise(POSIX_FADV_DONTNEED) on each file, after an fsync. Needs no root (unlike
  /proc/sys/vm/drop_caches) and touches only these files. The kernel drops clean, unmapped pages; in a virtual
  machine the host may still hold the file in its own cache, which no guest call can drop (say so with the figure).
- `warm(paths)`: read every byte once.
- `resident_fraction(paths)`: the share of the files' pages in the page cache, from mincore(2).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path


def checkpoint_files(model_dir) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def drop(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths, chunk: int = 64 << 20) -> None:
    buf = bytearray(chunk)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def resident_fraction(paths) -> float | None:
    """Pages of PATHS in the page cache / all their pages (None where mincore is unavailable)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    resident = total = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                resident += sum(b & 1 for b in vec)
                total += pages
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return resident / total if total else None
