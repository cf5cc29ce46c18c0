"""GPU init: loraforge exact rlpo / rlmo on a Qwen2.5-7B-shaped checkpoint, and PEFT pissa for the ratio.

A prepared run for a lent GPU (one H100/H200); it keeps to --budget-s (default 450 s, under the
8 minutes a lent GPU run gets) and skips what no longer fits. Steps, each timed:
1. Write a RANDOM bf16 checkpoint with Qwen2.5-7B's shapes (hidden 3584, intermediate 18944, 28
   layers, 28 heads, 4 kv heads, vocab 152064; ~15 GB) to local disk (--dir, default under /tmp;
   never the repository or $OUT), shard by shard, generating on the GPU. Reused if present.
2. loraforge exact rlpo, then PEFT, then loraforge exact rlmo, each in a fresh process
   (`benchmarks/workers.py` calling `init_adapter(DIR, OUT, InitConfig(method, r=32, device="cuda"))`), end to
   end from the checkpoint to the files written. Inside the process: a CUDA warm-up (context and
   cuSOLVER handles; reported separately as cuda_warmup_s), then the timed call with
   torch.cuda.max_memory_allocated / max_memory_reserved as the GPU peak. Outside: the whole
   process's wall time (imports included) and peak RSS.
3. PEFT pissa (full fp32 SVD per module) on the same GPU for the first --peft-layers blocks only
   (from_pretrained(num_hidden_layers=4, device_map="cuda")): load, get_peft_model (init_s), save
   adapter + residual base. Extrapolated to all blocks as init_s * L / 4 (the SVDs scale with the
   number of blocks), which is how the reference figure for PEFT pissa on an H200 (16.1 s for 4
   layers, ~112 s for 28) was taken; the ratio is that extrapolation over loraforge's end-to-end time.
Prints a JSON summary and writes it to --json (default $OUT/gpu_init.json when $OUT is set).

    python benchmarks/gpu_init.py                  # on the GPU machine
    python benchmarks/gpu_init.py --tiny           # small shapes, runs on a CPU in about a minute
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

TARGET_S, TARGET_GPU_GIB = 20.0, 2.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes (QWEN2_PRESETS['tiny']); CPU if no GPU")
    p.add_argument("--dir", default=None, help="checkpoint directory [/tmp/loraforge-bench/<preset>-random]")
    p.add_argument("--r", type=int, default=32, help="adapter rank [%(default)s]")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cuda:N, cpu")
    p.add_argument("--methods", default="rlpo,rlmo", help="loraforge methods, exact SVD [%(default)s]")
    p.add_argument("--peft-init", default="pissa", help="PEFT init_lora_weights [%(default)s]")
    p.add_argument(
        "--peft-layers", type=int, default=None, help="blocks PEFT runs on, then extrapolated [4; 2 with --tiny]"
    )
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT step")
    p.add_argument("--budget-s", type=float, default=450, help="stop starting steps after this many seconds")
    p.add_argument("--json", default=None, help="summary file [$OUT/gpu_init.json or ./gpu_init.json]")
    return p.parse_args(argv)


class Budget:
    """Seconds left of --budget-s; steps get the remainder as their timeout."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def run_step(name: str, func_name: str, kwargs: dict, device: str, budget: Budget, min_s: float = 5) -> dict:
    """One step in a fresh process via workers.gpu_measure; never raises, records errors/skips."""
    left = budget.left()
    if left < min_s:
        print(f"[{name}] skipped: {left:.0f} s of budget left", flush=True)
        return {"skipped": f"budget ({left:.0f} s left)"}
    print(f"[{name}] running (timeout {left:.0f} s)", flush=True)
    res = processes.run_measured(workers.command("gpu_measure", [func_name, kwargs, device]), timeout=left)
    rec = {
        "process_wall_s": res["wall_s"],
        "process_cpu_s": res["cpu_s"],
        "peak_rss_mib": res["peak_rss_mib"],
        "rc": res["rc"],
        "timed_out": res["timed_out"],
    }
    inner = workers.parse_result(res["stdout"])
    if inner is None:
        rec["error"] = processes.tail(res["stderr"], 3000)
        print(
            f"[{name}] FAILED rc={res['rc']} timed_out={res['timed_out']}\n{processes.tail(res['stderr'], 1500)}",
            flush=True,
        )
    else:
        rec.update(inner)
        gpu = f", GPU peak {inner['gpu_peak_alloc_mib'] / 1024:.2f} GiB" if "gpu_peak_alloc_mib" in inner else ""
        print(f"[{name}] {inner['wall_s']:.1f} s in-process (process {res['wall_s']:.1f} s){gpu}", flush=True)
    return rec


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peft_layers is None:
        args.peft_layers = 2 if args.tiny else 4
    budget = Budget(args.budget_s)
    machine.ensure_loraforge_importable()  # a bare GPU machine has only the repository
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    preset = "tiny" if args.tiny else "qwen2.5-7b"
    layers = checkpoints.QWEN2_PRESETS[preset]["num_hidden_layers"]
    ckpt = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / "loraforge-bench" / f"{preset}-random"
    summary = {
        "benchmark": "gpu_init",
        "preset": preset,
        "device": device,
        "r": args.r,
        "args": vars(args),
        "machine": machine.machine_info(),
        "steps": {},
    }
    out_json = Path(args.json) if args.json else Path(os.environ.get("OUT", ".")) / "gpu_init.json"

    def save():
        summary["elapsed_s"] = round(budget.seconds - budget.left(), 1)
        report.write_json(out_json, summary)

    print(f"[checkpoint] {ckpt} ({preset}, generated on {device})", flush=True)
    summary["checkpoint"] = checkpoints.write_random_checkpoint(ckpt, preset, device=device)
    print(
        f"[checkpoint] {'reused' if summary['checkpoint']['reused'] else 'written'} "
        f"{summary['checkpoint']['bytes'] / 2**30:.1f} GiB in {summary['checkpoint']['seconds']:.1f} s",
        flush=True,
    )
    save()

    work = Path(tempfile.mkdtemp(prefix="lf-bench-gpu-"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    plan = [
        (
            m,
            "loraforge_init",
            {"model_dir": str(ckpt), "out": str(work / m), "method": m, "r": args.r, "device": device, "svd": "exact"},
        )
        for m in methods
    ]
    if not args.no_peft:
        peft = (
            f"peft-{args.peft_init}-{args.peft_layers}layers",
            "peft_init",
            {
                "model_dir": str(ckpt),
                "out": str(work / "peft"),
                "r": args.r,
                "init": args.peft_init,
                "device": device,
                "num_hidden_layers": args.peft_layers,
            },
        )
        plan.insert(min(1, len(plan)), peft)  # after the first loraforge method, so a ratio exists early
    for name, func, kwargs in plan:
        summary["steps"][name] = run_step(name, func, kwargs, device, budget)
        shutil.rmtree(kwargs["out"], ignore_errors=True)
        save()
    shutil.rmtree(work, ignore_errors=True)

    summary["results"] = headline(summary["steps"], methods, args, layers)
    save()
    print(json.dumps({k: summary[k] for k in ("preset", "device", "checkpoint", "results", "elapsed_s")}, indent=2))
    print(f"summary: {out_json}")
    return 0


def headline(steps: dict, methods: list[str], args, layers: int) -> dict:
    """loraforge wall/GPU peak per method, PEFT extrapolated, ratios and the GPU targets."""
    out = {}
    peft = next((v for k, v in steps.items() if k.startswith("peft-")), None)
    peft_full = None
    if peft and "init_s" in peft:
        scale = layers / args.peft_layers
        peft_full = peft["init_s"] * scale
        out["peft"] = {
            "init": args.peft_init,
            "layers_run": args.peft_layers,
            "init_s": peft["init_s"],
            "modules": peft.get("modules"),
            "load_s": peft.get("load_s"),
            "save_s": peft.get("save_s"),
            "end_to_end_s": peft.get("wall_s"),
            "init_s_extrapolated": peft_full,
            "extrapolation": f"init_s x {layers}/{args.peft_layers}",
            "gpu_peak_alloc_mib": peft.get("gpu_peak_alloc_mib"),
        }
    for m in methods:
        st = steps.get(m, {})
        if "wall_s" not in st:
            out[m] = {"missing": st.get("skipped") or "failed"}
            continue
        gpu_gib = st.get("gpu_peak_alloc_mib", 0) / 1024 if "gpu_peak_alloc_mib" in st else None
        out[m] = {
            "end_to_end_s": st["wall_s"],
            "process_wall_s": st["process_wall_s"],
            "timings": st.get("timings"),
            "gpu_peak_alloc_gib": gpu_gib,
            "peak_rss_gib": st["peak_rss_mib"] / 1024,
            "x_vs_peft_init_extrapolated": (peft_full / st["wall_s"]) if peft_full else None,
            "target_time_pass": st["wall_s"] <= TARGET_S,
            "target_gpu_pass": (gpu_gib <= TARGET_GPU_GIB) if gpu_gib is not None else None,
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
