"""GPU init: loraforge rlpo, rlmo and pissa on a Qwen2.5-7B-shaped checkpoint, each from a cold and a warm page
cache, and PEFT's pissa beside loraforge's pissa like with like (a residual base written on both sides).

A prepared run for a lent GPU (one H100/H200; several GPUs are used and reported per device when visible). It keeps
to --budget-s and skips what no longer fits. Steps:
1. A random bf16 checkpoint with Qwen2.5-7B's shapes (hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 kv
   heads, vocab 152064; ~15 GB) whose projections have a pretrained-like top spectrum (checkpoints.py,
   spectrum="powerlaw": the partial eigensolver's work depends on it; Gaussian weights would be its worst case),
   generated on the device and written to --dir (never the repository or $OUT). Reused if present.
2. Per method (B0 = 0 ones first, residualised ones after step 3), one fresh process (`workers.init_cold_warm`;
   imports, CUDA warm-up and a first init of block 0 once, timed apart) runs
   `init_adapter(DIR, OUT, InitConfig(method, r=32, device=...))` twice: cold (the shards' page cache dropped with
   posix_fadvise DONTNEED just before; the resident share is recorded) and warm (the shards read in first).
   Reported per run: wall s, loraforge's phase timings, peak GPU memory of every visible GPU; per process: peak
   RSS (both runs; the host-memory goal).
3. Like with like, on a copy of the checkpoint truncated to its first --peft-layers blocks (both sides read the
   same files, warm): PEFT pissa (load, get_peft_model, save adapter + residual base) and loraforge pissa
   (adapter + residual base), each in a fresh process, end to end. PEFT's init part is also extrapolated to the
   whole model (init_s x layers / peft_layers, the SVDs scale with the blocks) for reference.
Prints a JSON summary and writes it to --json (default $OUT/gpu_init.json when $OUT is set).

    python benchmarks/gpu_init.py                                  # on the GPU machine
    python benchmarks/gpu_init.py --tiny --force-gpu-backend       # small shapes on a CPU, the GPU path's code
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402
import machine  # noqa: E402
import processes  # noqa: E402
import report  # noqa: E402
import workers  # noqa: E402

# The goals on one H200, warm page cache: rlpo <= 10 s, rlmo <= 25 s, host memory <= 2 GiB.
GOALS_S = {"rlpo": 10.0, "rlmo": 25.0}
GOAL_RSS_GIB = 2.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes (QWEN2_PRESETS['tiny']); CPU if no GPU")
    p.add_argument("--dir", default=None, help="checkpoint directory [/tmp/loraforge-bench/<preset>-powerlaw]")
    p.add_argument("--r", type=int, default=32, help="adapter rank [%(default)s]")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cuda:N, cpu")
    p.add_argument("--methods", default="rlpo,rlmo,pissa", help="loraforge methods, exact [%(default)s]")
    p.add_argument("--modes", default="cold,warm", help="page cache before each run [%(default)s]")
    p.add_argument("--peft-layers", type=int, default=None, help="blocks of the like-with-like run [4; 2 with --tiny]")
    p.add_argument("--no-peft", action="store_true", help="skip the like-with-like step")
    p.add_argument("--force-gpu-backend", action="store_true", help="the GPU path's code on any device (CPU checks)")
    p.add_argument("--budget-s", type=float, default=330, help="stop starting steps after this many seconds")
    p.add_argument("--json", default=None, help="summary file [$OUT/gpu_init.json or ./gpu_init.json]")
    return p.parse_args(argv)


class Budget:
    """Seconds left of --budget-s; steps get the remainder as their timeout."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def run_worker(name: str, worker: str, args, budget: Budget, min_s: float = 10) -> dict:
    """One worker in a fresh process (wall, CPU and peak RSS measured from outside); never raises."""
    left = budget.left()
    if left < min_s:
        print(f"[{name}] skipped: {left:.0f} s of budget left", flush=True)
        return {"skipped": f"budget ({left:.0f} s left)"}
    print(f"[{name}] running (timeout {left:.0f} s)", flush=True)
    res = processes.run_measured(workers.command(worker, args), timeout=left)
    rec = {k: res[k] for k in ("wall_s", "cpu_s", "peak_rss_mib", "rc", "timed_out")}
    rec["process_wall_s"] = rec.pop("wall_s")
    inner = workers.parse_result(res["stdout"])
    if inner is None:
        rec["error"] = processes.tail(res["stderr"], 3000)
        print(f"[{name}] FAILED rc={res['rc']} timed_out={res['timed_out']}\n{processes.tail(res['stderr'], 1500)}")
        return rec
    rec.update(inner)
    for mode, run in inner.get("runs", {"": inner}).items():
        gpu = f", GPU peak {run['gpu_peak_alloc_mib'] / 1024:.2f} GiB" if "gpu_peak_alloc_mib" in run else ""
        print(f"[{name}{' ' + mode if mode else ''}] {run['wall_s']:.1f} s{gpu}", flush=True)
    print(f"[{name}] process {res['wall_s']:.1f} s, peak RSS {res['peak_rss_mib'] / 1024:.2f} GiB", flush=True)
    return rec


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peft_layers is None:
        args.peft_layers = 2 if args.tiny else 4
    preset = "tiny" if args.tiny else "qwen2.5-7b"
    layers = checkpoints.QWEN2_PRESETS[preset]["num_hidden_layers"]
    ckpt = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / "loraforge-bench" / f"{preset}-powerlaw"
    # refused now, before the imports and minutes of work: a taken or unwritable summary file, a --dir (or its
    # truncated copy) holding anything but a checkpoint of ours
    out_json = report.ResultFile(args.json or Path(os.environ.get("OUT", ".")) / "gpu_init.json")
    checkpoints.check_dest(ckpt, "bench_checkpoint.json")
    if not args.no_peft:
        checkpoints.check_dest(small_dir(ckpt, args.peft_layers), "bench_truncated.json")
    budget = Budget(args.budget_s)
    machine.ensure_loraforge_importable()  # a bare GPU machine has only the repository
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    summary = {"benchmark": "gpu_init", "preset": preset, "device": device, "r": args.r, "args": vars(args)}
    summary.update(machine=machine.machine_info(), steps={})

    def save():
        summary["elapsed_s"] = round(budget.seconds - budget.left(), 1)
        out_json.write(summary)

    print(f"[checkpoint] {ckpt} ({preset}, powerlaw spectrum, generated on {device})", flush=True)
    gen_device = device if device.startswith("cuda") else "cpu"
    summary["checkpoint"] = checkpoints.write_random_checkpoint(ckpt, preset, device=gen_device, spectrum="powerlaw")
    c = summary["checkpoint"]
    print(f"[checkpoint] {'reused' if c['reused'] else 'written'} {c['bytes'] / 2**30:.1f} GiB in {c['seconds']:.1f} s")
    save()

    work = Path(tempfile.mkdtemp(prefix="lf-bench-gpu-"))
    modes = [m for m in args.modes.split(",") if m]
    from loraforge.inits.methods import METHODS

    # B0 = 0 methods (the goals) first, then like with like, then residualised ones (each writes a 15 GB base
    # twice): what a short budget skips is the least needed.
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    order = [m for m in methods if not METHODS[m].residual] + ([None] if not args.no_peft else [])
    for method in order + [m for m in methods if METHODS[m].residual]:
        if method is None:
            summary["steps"].update(like_with_like(ckpt, work, args, device, budget))
            save()
            continue
        kwargs = dict(model_dir=str(ckpt), out=str(work / method), method=method, r=args.r, device=device)
        kwargs.update(force_gpu_backend=args.force_gpu_backend, modes=modes)
        summary["steps"][method] = run_worker(method, "init_cold_warm", kwargs, budget)
        save()
    shutil.rmtree(work, ignore_errors=True)
    summary["results"] = headline(summary["steps"], args, layers)
    save()
    print(json.dumps({k: summary[k] for k in ("preset", "device", "checkpoint", "results", "elapsed_s")}, indent=2))
    print(f"summary: {out_json.path}")
    return 0


def like_with_like(ckpt: Path, work: Path, args, device: str, budget: Budget) -> dict:
    """PEFT pissa and loraforge pissa, both writing adapter + residual base, on the first --peft-layers blocks."""
    small = checkpoints.truncate_checkpoint(ckpt, small_dir(ckpt, args.peft_layers), args.peft_layers)
    (peft_out, lf_out) = (work / "peft", work / "lf")
    steps = {}
    peft_kwargs = dict(model_dir=str(small), out=str(peft_out), r=args.r, init="pissa", device=device, save_base=True)
    steps["peft-pissa"] = run_worker("peft pissa", "gpu_measure", ["peft_init", peft_kwargs, device], budget)
    shutil.rmtree(peft_out, ignore_errors=True)
    lf_kwargs = dict(model_dir=str(small), out=str(lf_out), method="pissa", r=args.r, device=device)
    lf_kwargs["force_gpu_backend"] = args.force_gpu_backend
    steps["loraforge-pissa-small"] = run_worker(
        "loraforge pissa", "gpu_measure", ["loraforge_init", lf_kwargs, device], budget
    )
    shutil.rmtree(lf_out, ignore_errors=True)
    return steps


def small_dir(ckpt: Path, layers: int) -> Path:
    return ckpt.with_name(f"{ckpt.name}-{layers}L")


def headline(steps: dict, args, layers: int) -> dict:
    """Per method and mode: wall s, GPU peak (max over devices, and per device), peak RSS, the goals; the
    like-with-like ratio; PEFT's init extrapolated to all blocks."""
    out = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        st = steps.get(method, {})
        if "runs" not in st:
            why = st.get("skipped") or (st.get("error") or "").strip()[-300:]
            out[method] = {"missing": why or ("timed out" if st.get("timed_out") else f"failed (rc {st.get('rc')})")}
            continue
        rss_gib = st["peak_rss_mib"] / 1024
        out[method] = {"peak_rss_gib": rss_gib, "imports_s": st["imports_s"], "cuda_warmup_s": st["cuda_warmup_s"]}
        for mode, run in st["runs"].items():
            out[method][mode] = {
                "wall_s": run["wall_s"],
                "page_cache_resident_at_start": run["page_cache_resident_at_start"],
                "gpu_peak_alloc_gib": _gib(run.get("gpu_peak_alloc_mib")),
                "gpu_peak_alloc_gib_per_device": [_gib(x) for x in run.get("gpu_peak_alloc_mib_per_device", [])],
                "timings": run.get("timings"),
            }
        if method in GOALS_S and "warm" in st["runs"]:
            out[method]["goal"] = f"warm <= {GOALS_S[method]:g} s, host <= {GOAL_RSS_GIB:g} GiB"
            out[method]["goal_met"] = st["runs"]["warm"]["wall_s"] <= GOALS_S[method] and rss_gib <= GOAL_RSS_GIB
    peft, lf = steps.get("peft-pissa", {}), steps.get("loraforge-pissa-small", {})
    if "wall_s" in peft and "wall_s" in lf:
        out["like_with_like"] = {
            "blocks": args.peft_layers,
            "both_write": "adapter + residual base",
            "peft_pissa_s": peft["wall_s"],
            "peft_phases_s": {k: peft.get(k) for k in ("load_s", "init_s", "save_s")},
            "loraforge_pissa_s": lf["wall_s"],
            "x_faster": peft["wall_s"] / lf["wall_s"],
            "peft_init_s_extrapolated_to_all_blocks": peft["init_s"] * layers / args.peft_layers,
            "peft_gpu_peak_alloc_gib": _gib(peft.get("gpu_peak_alloc_mib")),
            "loraforge_gpu_peak_alloc_gib": _gib(lf.get("gpu_peak_alloc_mib")),
        }
    return out


def _gib(mib):
    return None if mib is None else mib / 1024


if __name__ == "__main__":
    sys.exit(main())
