"""The measured work, as functions that run in-process or in a fresh process:
`python benchmarks/workers.py NAME ARGS_JSON` calls NAME(*ARGS) (or NAME(**ARGS) for a JSON object)
and prints its JSON result after RESULT_MARKER; `command(NAME, ARGS)` is that command line and
`parse_result(stdout)` reads the result back.

- `peft_init(...)`: PEFT end to end, as a user writes it (from_pretrained + get_peft_model + save
  adapter + save residual base).
- `loraforge_init(...)`: loraforge end to end through its Python API.
- `gpu_measure(name, kwargs, device)`: one of the two after its imports and a CUDA warm-up, with the
  peak GPU memory of every visible GPU.
- `init_cold_warm(...)`: loraforge's init twice in one process, from a cold then a warm page cache
  (benchmarks/pagecache.py), each with its own peaks per GPU.

`force_gpu_backend=True` (loraforge's workers) runs the decompositions through the torch backend of
loraforge/inits/linalg.py on whatever device is given: what a GPU runs, on a CPU (the device script's CPU mode).

Each worker imports what it needs inside itself, so this module imports only the standard library
and a worker process pays only for its own imports. It is run by path (not `-m`), so the loraforge
it imports is the installed one (or PYTHONPATH's), as for a user.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULT_MARKER = "BENCH_RESULT_JSON "


def command(name: str, args: list | dict) -> list[str]:
    """The command line that runs worker NAME with ARGS in a fresh Python."""
    if name not in WORKERS:
        raise ValueError(f"no worker {name!r}; the workers are {sorted(WORKERS)}")
    return [sys.executable, str(Path(__file__).resolve()), name, json.dumps(args)]


def parse_result(stdout: str):
    """The worker's return value from its stdout (None when it printed none: it failed)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    return None


def peft_init(model_dir, out, r, init, device="cpu", num_hidden_layers=None, save_base=True):
    """PEFT end to end, the way its docs do PiSSA: load the checkpoint (dtype as stored), wrap it
    with LoRA on all linear layers initialised by INIT ("pissa", "pissa_niter_16", ...), save the
    adapter (with init_lora_weights=True so loading does not re-run the init) and, with SAVE_BASE, the
    residual base (the base model after init, unload()ed). Returns the phase timings in seconds."""
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
    if save_base:
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


def force_torch_backend() -> None:
    """Decompose with loraforge's torch backend (the GPU path's code) whatever the device."""
    from loraforge.inits import linalg

    linalg._backend = lambda X: linalg._TorchBackend


def loraforge_init(model_dir, out, method, r, device="cpu", svd="exact", force_gpu_backend=False, batch_mib=512):
    """loraforge end to end through its Python API; returns wall time (after imports) and
    loraforge's own phase timings from the manifest."""
    import time

    t0 = time.perf_counter()
    from loraforge import InitConfig, init_adapter

    if force_gpu_backend:
        force_torch_backend()
    t1 = time.perf_counter()
    config = InitConfig(method=method, r=r, device=device, svd=svd, batch_mib=batch_mib)
    result = init_adapter(model_dir, out, config, overwrite=True)
    t2 = time.perf_counter()
    return {
        "import_s": t1 - t0,
        "total_s": t2 - t1,
        "timings": result.manifest.get("timings"),
        "path": result.manifest.get("path"),
        "modules": result.modules,
    }


def _cuda_warmup(device) -> float:
    """CUDA context and cuSOLVER/cuBLAS handles on every visible GPU, then peaks reset; seconds taken."""
    import time

    import torch

    t0 = time.perf_counter()
    if str(device).startswith("cuda"):
        for i in range(torch.cuda.device_count()):
            x = torch.randn(64, 64, device=f"cuda:{i}", dtype=torch.float64)
            torch.linalg.eigh(x @ x.T)
            torch.linalg.qr(x)
            torch.linalg.svd(x.float())
            torch.cuda.synchronize(i)
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def _reset_peaks(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def _peaks(device) -> dict:
    """Peak GPU memory per visible device (MiB): max_memory_allocated and max_memory_reserved."""
    import torch

    if not str(device).startswith("cuda"):
        return {}
    n = torch.cuda.device_count()
    for i in range(n):
        torch.cuda.synchronize(i)
    alloc = [torch.cuda.max_memory_allocated(i) / 2**20 for i in range(n)]
    reserved = [torch.cuda.max_memory_reserved(i) / 2**20 for i in range(n)]
    return {
        "gpu_peak_alloc_mib": max(alloc),
        "gpu_peak_reserved_mib": max(reserved),
        "gpu_peak_alloc_mib_per_device": alloc,
        "gpu_peak_reserved_mib_per_device": reserved,
    }


def gpu_measure(func_name, kwargs, warm_device="cuda"):
    """Run loraforge_init / peft_init (by name) after its imports and a
    CUDA warm-up (context + cuSOLVER handles), both timed separately; report the timed part's
    wall time and peak GPU memory of every visible GPU (max_memory_allocated / max_memory_reserved)."""
    import time

    t_imp = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401  (both sides use it: loraforge for its meta skeleton)

    if func_name == "loraforge_init":
        import loraforge.adapters.build  # noqa: F401
    else:
        import peft  # noqa: F401
    imports_s = time.perf_counter() - t_imp
    warm_s = _cuda_warmup(warm_device)
    _reset_peaks(warm_device)
    t1 = time.perf_counter()
    res = WORKERS[func_name](**kwargs)
    res.update(_peaks(warm_device))
    res["wall_s"] = time.perf_counter() - t1
    res["cuda_warmup_s"] = warm_s
    res["imports_s"] = imports_s
    return res


def init_cold_warm(model_dir, out, method, r, device="cuda", force_gpu_backend=False, modes=("cold", "warm")):
    """loraforge's init of MODEL_DIR once per mode in MODES, in this process (imports, CUDA warm-up and a first
    init of block 0 once, timed apart): "cold" drops the checkpoint's page cache first (posix_fadvise DONTNEED),
    "warm" reads it in first.
    Per run: wall s, loraforge's phase timings, peak GPU memory per device, and the share of the checkpoint in the
    page cache when it started."""
    import shutil
    import time

    import pagecache

    t_imp = time.perf_counter()
    import torch  # noqa: F401

    from loraforge import InitConfig, init_adapter

    if force_gpu_backend:
        force_torch_backend()
    imports_s = time.perf_counter() - t_imp
    warm_s = _cuda_warmup(device)
    # What the first init of a process pays whatever the cache (lazy imports, first kernels): an init of block 0
    # alone, timed apart, so the cold run measures the cold read and not this; its pages are dropped below. A
    # residualised method would write the whole base for it: rlpo stands in (the same decomposition).
    from loraforge.inits.methods import METHODS

    first = "rlpo" if METHODS[method].residual else method
    t0 = time.perf_counter()
    init_adapter(model_dir, out, InitConfig(method=first, r=r, device=device, layers=[0]), overwrite=True)
    first_s = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    files = pagecache.checkpoint_files(model_dir)
    runs = {}
    for mode in modes:
        (pagecache.drop if mode == "cold" else pagecache.warm)(files)
        resident = pagecache.resident_fraction(files)
        _reset_peaks(device)
        t0 = time.perf_counter()
        result = init_adapter(model_dir, out, InitConfig(method=method, r=r, device=device), overwrite=True)
        runs[mode] = {
            "wall_s": time.perf_counter() - t0,
            "page_cache_resident_at_start": resident,
            "timings": result.manifest.get("timings"),
            "modules": result.modules,
            **_peaks(device),
        }
        shutil.rmtree(out, ignore_errors=True)
    return {"imports_s": imports_s, "cuda_warmup_s": warm_s, "first_init_block0_s": first_s, "runs": runs}


WORKERS = {
    "peft_init": peft_init,
    "loraforge_init": loraforge_init,
    "gpu_measure": gpu_measure,
    "init_cold_warm": init_cold_warm,
}


def main(argv: list[str]) -> None:
    usage = f"usage: python benchmarks/workers.py NAME ARGS_JSON  (NAME: {', '.join(WORKERS)})"
    if len(argv) == 2 and argv[1] in ("-h", "--help"):
        print(usage)
        return
    if len(argv) != 3 or argv[1] not in WORKERS:
        print(
            f"{usage}\nworkers.py: error: expected a worker name and one JSON argument, got {argv[1:]}", file=sys.stderr
        )
        sys.exit(2)
    try:
        name, args = argv[1], json.loads(argv[2])
    except ValueError as e:
        print(f"workers.py: error: ARGS_JSON is not JSON ({e}): {argv[2]!r}", file=sys.stderr)
        sys.exit(2)
    result = WORKERS[name](**args) if isinstance(args, dict) else WORKERS[name](*args)
    print(RESULT_MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv)
