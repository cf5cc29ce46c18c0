"""What a benchmark's numbers depend on, and which loraforge it measures.

- `machine_info()`: CPU model, cores, memory, library versions, GPU, load average, loraforge commit.
- `loraforge_commit()`: the commit (+ "-dirty") of the imported loraforge, recorded per run.
- `ensure_loraforge_importable()`: the installed loraforge, else the repository these scripts live in.
- `loraforge_cli()`: the `loraforge` console script next to this Python.

Only the standard library is imported at module level; torch inside `machine_info`.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _git(path: Path, *args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def loraforge_commit() -> str | None:
    """Commit (+ "-dirty") of the loraforge that is imported; recorded per run, since the code
    under test may change during a long benchmark."""
    import importlib.util

    spec = importlib.util.find_spec("loraforge")
    if spec is None or not spec.origin:
        return None
    src = Path(spec.origin).resolve().parent
    head = _git(src, "rev-parse", "--short=10", "HEAD")
    dirty = _git(src, "status", "--porcelain", "--untracked-files=no", "--", ".")
    return None if head is None else head + ("-dirty" if dirty else "")


def machine_info() -> dict:
    """What the numbers depend on: CPU, cores, memory, versions, threads, GPU, load, loraforge commit."""
    import importlib.metadata as md

    import torch

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for pkg in ("loraforge", "torch", "transformers", "peft", "safetensors", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    info = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": mem_total_gib,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "load_avg": list(os.getloadavg()),
        "versions": versions,
        "cuda": None,
    }
    try:
        import loraforge

        src = Path(loraforge.__file__).resolve().parent
        info["loraforge_path"] = str(src)
        info["loraforge_commit"] = _git(src, "rev-parse", "HEAD")
        status = _git(src, "status", "--porcelain", "--untracked-files=no", "--", ".")
        info["loraforge_dirty"] = bool(status) if status is not None else None
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda"] = {
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "memory_gib": [
                round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)
                for i in range(torch.cuda.device_count())
            ],
            "torch_cuda": torch.version.cuda,
        }
    return info


def ensure_loraforge_importable() -> None:
    """Use the installed loraforge when there is one; otherwise (e.g. a bare GPU machine with only
    a copy of the repository) the repository this script lives in, for this process and its
    children (PYTHONPATH)."""
    import importlib.util

    if importlib.util.find_spec("loraforge") is not None:
        return
    root = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


def loraforge_cli() -> list[str]:
    """The `loraforge` console script next to this Python (or on PATH); `python -m loraforge`
    when it is not installed as a command."""
    exe = shutil.which("loraforge", path=str(Path(sys.executable).parent)) or shutil.which("loraforge")
    return [exe] if exe else [sys.executable, "-m", "loraforge"]
