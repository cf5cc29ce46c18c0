"""Turning a --device flag into a torch.device, the same way for every command."""

from __future__ import annotations

import torch

from loraforge.core.errors import LoraforgeError


def resolve_device(device: str) -> torch.device:
    """auto -> cuda if torch sees a GPU, else cpu; cpu, cuda, cuda:N as given, checked to exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LoraforgeError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoraforgeError(f"--device {device}: no CUDA GPU is visible to torch. Use --device cpu (or auto).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LoraforgeError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible.")
    return dev


def decomposition_devices(flag: str) -> list[torch.device]:
    """Where `init` decomposes: the --device flag resolved, and for a bare `cuda` (or `auto`) on a
    machine with several GPUs, every visible GPU (batches are spread over them; CUDA_VISIBLE_DEVICES
    chooses which). `cuda:N` and `cpu` mean that one device."""
    device = resolve_device(flag)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]
