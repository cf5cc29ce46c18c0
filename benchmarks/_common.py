"""Shared helpers for the loraforge benchmarks.

Only the standard library is imported at module level, so a script that imports this module
starts fast; torch, transformers and peft are imported inside the functions that need them.

- `machine_info()`: CPU model, cores, memory, library versions, GPU, load average.
- `run_measured(cmd)`: run a command in a fresh process; wall time, CPU time and peak RSS
  (ru_maxrss from wait4, i.e. the kernel's VmHWM of that process: anonymous + file-mapped pages
  it touched), plus sampled peaks of RssAnon / RssFile from /proc/PID/status.
- `run_function(func, args)`: run a self-contained function of this module in a fresh
  `python -c` process (its source is sent as the script) and return what it returned.
- `peft_init(...)`: PEFT end to end, as a user writes it (from_pretrained + get_peft_model +
  save adapter + save residual base); self-contained so it runs in-process or via `python -c`.
- `write_random_checkpoint(...)`: a random bf16 Qwen2 checkpoint of a given shape, written shard
  by shard from a meta-device skeleton (never the whole model in memory).
- `truncate_checkpoint(...)`: a copy of a checkpoint keeping only its first N blocks.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

RESULT_MARKER = "BENCH_RESULT_JSON "

# Shapes of the models the issue names (random weights; only the shapes matter for timing/memory).
QWEN2_PRESETS = {
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    ),
    # Small enough to check the scripts on a laptop CPU in seconds.
    "tiny": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
    ),
}


# --------------------------------------------------------------------------- machine


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


# --------------------------------------------------------------------------- loraforge itself


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


# --------------------------------------------------------------------------- processes


def _proc_status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


# A small launcher between the benchmark and the measured command. The kernel charges a child's
# ru_maxrss with the RSS of the process it was forked/vforked from (exec_mmap records the old mm's
# high-water mark), so a command spawned straight from a big benchmark process would report the
# benchmark's own RSS. The launcher is small; its forked child starts from it, execs the command,
# and the launcher reports the child's rusage from wait4 and the wall time from fork to reap.
_LAUNCHER = r"""
import json, os, sys, time
result_path, pid_path, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"cannot run {cmd[0]}: {e}", file=sys.stderr, flush=True)
    os._exit(127)
with open(pid_path, "w") as f:
    f.write(str(pid))
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(result_path, "w") as f:
    json.dump({"wall_s": wall, "rc": os.waitstatus_to_exitcode(status), "maxrss_kib": ru.ru_maxrss,
               "cpu_s": ru.ru_utime + ru.ru_stime}, f)
"""


def run_measured(cmd: list[str], env: dict | None = None, timeout: float | None = None, sample_s: float = 0.05) -> dict:
    """Run CMD in a fresh process and measure it like /usr/bin/time -v does.

    Returns wall_s (fork to reap), cpu_s (user+sys of the process), rc, peak_rss_mib (ru_maxrss
    from wait4: the kernel's high-water mark of the process's RSS, the same number as its VmHWM,
    counting the file pages it mapped), sampled peaks of RssAnon / RssFile (polled every SAMPLE_S
    from /proc; they can miss a short spike), stdout, stderr, timed_out. CMD runs under a small
    launcher (see _LAUNCHER) so that the benchmark's own RSS does not leak into the number.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lf-bench-run-") as tmp:
        result_path, pid_path = Path(tmp) / "result.json", Path(tmp) / "pid"
        with open(Path(tmp) / "stdout", "w+") as out, open(Path(tmp) / "stderr", "w+") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, str(result_path), str(pid_path), *cmd],
                stdout=out,
                stderr=err,
                env=env,
                text=True,
            )
            peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
            timed_out = []
            child = None
            while proc.poll() is None:
                if child is None and pid_path.exists():
                    text = pid_path.read_text()
                    child = int(text) if text else None
                if child is not None:
                    st = _proc_status_kib(child)
                    for k in peaks:
                        peaks[k] = max(peaks[k], st.get(k, 0))
                if timeout is not None and time.perf_counter() - start > timeout and not timed_out:
                    timed_out.append(True)
                    if child is not None:
                        os.kill(child, 9)
                    proc.kill()
                time.sleep(sample_s)
            res = json.loads(result_path.read_text()) if result_path.exists() else {}
            out.seek(0)
            err.seek(0)
            return {
                "wall_s": res.get("wall_s", time.perf_counter() - start),
                "cpu_s": res.get("cpu_s"),
                "rc": res.get("rc", proc.returncode),
                "timed_out": bool(timed_out),
                "peak_rss_mib": res["maxrss_kib"] / 1024 if "maxrss_kib" in res else None,  # KiB on Linux
                "sampled_peak_hwm_mib": peaks["VmHWM"] / 1024,
                "sampled_peak_anon_mib": peaks["RssAnon"] / 1024,
                "sampled_peak_file_mib": peaks["RssFile"] / 1024,
                "stdout": out.read(),
                "stderr": err.read(),
            }


# This file's text as it was when imported: worker sources are cut from it, not re-read from disk
# (inspect.getsource re-reads the file, so an edit during a long run would send the wrong lines).
_SELF_SOURCE = Path(__file__).read_text()


def source_of(func) -> str:
    """Source of a top-level function of this module, from the snapshot taken at import."""
    import ast

    for node in ast.parse(_SELF_SOURCE).body:
        if isinstance(node, ast.FunctionDef) and node.name == func.__name__:
            return textwrap.dedent(ast.get_source_segment(_SELF_SOURCE, node)) + "\n"
    raise ValueError(f"{func.__name__} is not a top-level function of {__file__}")


def function_script(func, args: list) -> list[str]:
    """`python -c SCRIPT ARGS_JSON` that defines FUNC from its source, calls it with ARGS, and
    prints its JSON result after RESULT_MARKER. FUNC must import what it needs inside itself."""
    source = source_of(func)
    script = (
        f"{source}\nimport json as _json, sys as _sys\n"
        f"_r = {func.__name__}(*_json.loads(_sys.argv[1]))\n"
        f"print({RESULT_MARKER!r} + _json.dumps(_r), flush=True)\n"
    )
    return [sys.executable, "-c", script, json.dumps(args)]


def parse_result(stdout: str):
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    return None


def run_function(func, args: list, env: dict | None = None, timeout: float | None = None) -> dict:
    """run_measured(function_script(FUNC, ARGS)) plus the function's return value under "result"."""
    res = run_measured(function_script(func, args), env=env, timeout=timeout)
    res["result"] = parse_result(res["stdout"])
    return res


def tail(text: str, n: int = 2000) -> str:
    return text[-n:]


# --------------------------------------------------------------------------- workers
# Self-contained functions: they run in-process and, via function_script, as `python -c`.


def peft_init(model_dir, out, r, init, device="cpu", num_hidden_layers=None):
    """PEFT end to end, the way its docs do PiSSA: load the checkpoint (dtype as stored), wrap it
    with LoRA on all linear layers initialised by INIT ("pissa", "pissa_niter_16", ...), save the
    adapter (with init_lora_weights=True so loading does not re-run the init) and the residual
    base (the base model after init, unload()ed). Returns the phase timings in seconds."""
    import os
    import time

    t0 = time.perf_counter()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    t1 = time.perf_counter()
    kwargs = {}
    if num_hidden_layers is not None:  # only the first blocks (the checkpoint's other tensors are ignored)
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_dir)
        cfg.num_hidden_layers = num_hidden_layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:num_hidden_layers]
        kwargs["config"] = cfg
    if str(device).startswith("cuda"):
        kwargs["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", **kwargs)
    sync()
    t2 = time.perf_counter()
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules="all-linear",
        lora_dropout=0.0,
        init_lora_weights=init,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    sync()
    t3 = time.perf_counter()
    modules = len(getattr(peft_model.base_model, "targeted_module_names", []))
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(out)
    base = peft_model.unload()
    base.save_pretrained(os.path.join(out, "base"))
    t4 = time.perf_counter()
    return {
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "init_s": t3 - t2,
        "save_s": t4 - t3,
        "total_s": t4 - t1,
        "modules": modules,
    }


def loraforge_init(model_dir, out, method, r, device="cpu", svd="exact"):
    """loraforge end to end through its Python API; returns wall time (after imports) and
    loraforge's own phase timings from the manifest."""
    import time

    t0 = time.perf_counter()
    from loraforge import InitConfig, init_adapter

    t1 = time.perf_counter()
    result = init_adapter(model_dir, out, InitConfig(method=method, r=r, device=device, svd=svd))
    t2 = time.perf_counter()
    return {
        "import_s": t1 - t0,
        "total_s": t2 - t1,
        "timings": result.manifest.get("timings"),
        "path": result.manifest.get("path"),
        "modules": result.modules,
    }


def gpu_measure(func_name, kwargs, warm_device="cuda"):
    """Run loraforge_init / peft_init (by name, from this file's source) after its imports and a
    CUDA warm-up (context + cuSOLVER handles), both timed separately; report the timed part's
    wall time and peak GPU memory (torch.cuda.max_memory_allocated / max_memory_reserved)."""
    import time

    t_imp = time.perf_counter()
    import torch
    import transformers  # noqa: F401  (both sides use it: loraforge for its meta skeleton)

    if func_name == "loraforge_init":
        import loraforge.adapters.build  # noqa: F401
    else:
        import peft  # noqa: F401
    imports_s = time.perf_counter() - t_imp
    t0 = time.perf_counter()
    if str(warm_device).startswith("cuda"):
        x = torch.randn(64, 64, device=warm_device, dtype=torch.float64)
        torch.linalg.eigh(x @ x.T)
        torch.linalg.svd(x.float())
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = globals()[func_name](**kwargs)
    if str(warm_device).startswith("cuda"):
        torch.cuda.synchronize()
        res["gpu_peak_alloc_mib"] = torch.cuda.max_memory_allocated() / 2**20
        res["gpu_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    res["wall_s"] = time.perf_counter() - t1
    res["cuda_warmup_s"] = warm_s
    res["imports_s"] = imports_s
    return res


def gpu_measure_script(func_name: str, kwargs: dict, warm_device: str) -> list[str]:
    """`python -c` running gpu_measure with the worker FUNC_NAME defined alongside it."""
    source = "\n".join(source_of(f) for f in (peft_init, loraforge_init, gpu_measure))
    script = (
        f"{source}\nimport json as _json, sys as _sys\n"
        f"_r = gpu_measure(*_json.loads(_sys.argv[1]))\n"
        f"print({RESULT_MARKER!r} + _json.dumps(_r), flush=True)\n"
    )
    return [sys.executable, "-c", script, json.dumps([func_name, kwargs, warm_device])]


# --------------------------------------------------------------------------- checkpoints


def _tensor_plan(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the checkpoint must hold, from a meta-device skeleton.
    Tied parameters appear once (named_parameters drops duplicates); buffers that are not in the
    state dict (rotary inv_freq) are left out."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state_keys = set(model.state_dict().keys())
    plan = [(k, tuple(p.shape)) for k, p in model.named_parameters()]
    plan += [(k, tuple(b.shape)) for k, b in model.named_buffers() if k in state_keys]
    return plan


def write_random_checkpoint(
    path,
    preset: str,
    num_hidden_layers: int | None = None,
    seed: int = 0,
    shard_mib: int = 2048,
    device: str = "cpu",
    reuse: bool = True,
) -> dict:
    """Write a random bf16 Qwen2 checkpoint with PRESET's shapes (QWEN2_PRESETS) to PATH.

    Tensors are generated one at a time (N(0, 0.02) weights and biases, ones for norms; each seeded
    by SEED and its name, so the files are reproducible) and written shard by shard with
    safetensors, plus model.safetensors.index.json and config.json. At most one shard (SHARD_MIB)
    is in memory. The directory is built next to PATH and renamed into place; with REUSE an
    existing directory made with the same settings is kept. Returns {"path", "reused", "seconds",
    "bytes"}.
    """
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    path = Path(path)
    spec = dict(QWEN2_PRESETS[preset])
    if num_hidden_layers is not None:
        spec["num_hidden_layers"] = num_hidden_layers
    marker = {"preset": preset, "spec": spec, "seed": seed, "format": "loraforge-bench-random/1"}
    if reuse and (path / "bench_checkpoint.json").exists():
        if json.loads((path / "bench_checkpoint.json").read_text()) == marker:
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            return {"path": str(path), "reused": True, "seconds": 0.0, "bytes": size}
    started = time.perf_counter()
    config = Qwen2Config(**spec, dtype="bfloat16")
    plan = _tensor_plan(config)
    limit = shard_mib * 2**20
    shards, current, size = [], [], 0
    for name, shape in plan:
        nbytes = 2 * _numel(shape)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {}
        for name, shape in shard:
            tensors[name] = _random_tensor(name, shape, seed, device).cpu()
            weight_map[name] = fname
            total += 2 * _numel(shape)
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    config.save_pretrained(str(tmp))
    (tmp / "bench_checkpoint.json").write_text(json.dumps(marker))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"path": str(path), "reused": False, "seconds": time.perf_counter() - started, "bytes": size}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _random_tensor(name: str, shape, seed: int, device: str):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(shape, generator=g, dtype=torch.bfloat16, device=device).mul_(0.02)


def truncate_checkpoint(src, dst, num_layers: int) -> Path:
    """Copy the safetensors checkpoint SRC to DST keeping only blocks 0..NUM_LAYERS-1 (for quick
    runs: both sides of a benchmark then read the same smaller checkpoint). Tokenizer and other
    small files are copied; reused when DST already holds the same truncation."""
    import re

    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    marker = {"src": str(src.resolve()), "num_layers": num_layers}
    if (dst / "bench_truncated.json").exists() and json.loads((dst / "bench_truncated.json").read_text()) == marker:
        return dst
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    files = sorted(src.glob("*.safetensors"))
    layer_re = re.compile(r"\.layers\.(\d+)\.")
    tensors = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                m = layer_re.search(k)
                if m is None or int(m.group(1)) < num_layers:
                    tensors[k] = h.get_tensor(k)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if (
            f.is_file()
            and not f.name.endswith(".safetensors")
            and f.name not in ("config.json", "model.safetensors.index.json")
        ):
            shutil.copy2(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "bench_truncated.json").write_text(json.dumps(marker))
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst


# --------------------------------------------------------------------------- output


def median(xs):
    return statistics.median(xs) if xs else None


def table(rows: list[list], header: list[str]) -> str:
    cells = [
        [
            ("" if c is None else c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float) else str(c))
            for c in row
        ]
        for row in [header] + rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
