"""Init memory: peak RSS of `loraforge init` on a checkpoint with Qwen2.5-1.5B's shapes.

What is measured: a RANDOM bf16 checkpoint with Qwen2.5-1.5B's shapes (hidden 1536,
intermediate 8960, 28 layers, 12 heads, 2 kv heads, vocab 151936, tied embeddings; ~3 GB) is
written once (shard by shard from a meta-device skeleton, never the whole model in memory) and
reused. Then `loraforge init DIR --method rlpo -r 32 -o OUT --device cpu` runs as a fresh process;
its peak RSS is ru_maxrss from wait4, i.e. its VmHWM, which counts the checkpoint pages it mapped
(safetensors mmap) as well as anonymous memory. Target: under 1.5 GiB. Sampled peaks of RssAnon
and RssFile show the split. With --peft, PEFT (from_pretrained + get_peft_model(pissa_niter_16 by
default) + save adapter + save residual base) runs the same way for comparison.

    python benchmarks/init_memory.py                 # full 1.5B shapes (writes ~3 GB once)
    python benchmarks/init_memory.py --layers 2      # quick check on a 2-block checkpoint
    python benchmarks/init_memory.py --peft          # also PEFT's peak RSS
"""

from __future__ import annotations

import argparse
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

LIMIT_GIB = 1.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=None, help="checkpoint directory, made if missing [/tmp/loraforge-bench/<shape>]")
    p.add_argument(
        "--preset", default="qwen2.5-1.5b", choices=list(checkpoints.QWEN2_PRESETS), help="shapes [%(default)s]"
    )
    p.add_argument("--layers", type=int, default=None, help="override the number of blocks (quick checks)")
    p.add_argument("--method", default="rlpo", help="loraforge method [%(default)s]")
    p.add_argument("--r", type=int, default=32, help="adapter rank [%(default)s]")
    p.add_argument("--device", default="cpu", help="loraforge --device [%(default)s]")
    p.add_argument("--extra", default="", help="extra `loraforge init` flags, e.g. '--batch-mib 256'")
    p.add_argument("--peft", action="store_true", help="also measure PEFT on the same checkpoint")
    p.add_argument("--peft-init", default="pissa_niter_16", help="PEFT init_lora_weights [%(default)s]")
    p.add_argument("--repeats", type=int, default=1, help="runs of each side [%(default)s]")
    p.add_argument("--json", default=None, help="results file [benchmarks/results/init_memory-<time>.json]")
    p.add_argument("--timeout", type=float, default=3600, help="per run, seconds [%(default)s]")
    return p.parse_args(argv)


def checkpoint_dir(args) -> Path:
    if args.dir:
        return Path(args.dir)
    suffix = f"-L{args.layers}" if args.layers else ""
    return Path(tempfile.gettempdir()) / "loraforge-bench" / f"{args.preset}{suffix}-random"


def measure(cmd: list[str], out: Path, timeout: float) -> dict:
    """Run CMD once in a fresh process (OUT removed before and after); wall time and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    res = processes.run_measured(cmd, timeout=timeout)
    shutil.rmtree(out, ignore_errors=True)
    if res["rc"] != 0:
        raise RuntimeError(
            f"{cmd[:3]}... failed (rc={res['rc']}, timed_out={res['timed_out']}):\n{processes.tail(res['stderr'])}"
        )
    return {
        k: res[k]
        for k in (
            "wall_s",
            "cpu_s",
            "peak_rss_mib",
            "sampled_peak_hwm_mib",
            "sampled_peak_anon_mib",
            "sampled_peak_file_mib",
        )
    }


def loraforge_command(args, ckpt: Path, out: Path) -> list[str]:
    return [
        *machine.loraforge_cli(),
        "init",
        str(ckpt),
        "--method",
        args.method,
        "-r",
        str(args.r),
        "-o",
        str(out),
        "--device",
        args.device,
        *args.extra.split(),
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    machine.ensure_loraforge_importable()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    ckpt = checkpoint_dir(args)
    default = Path(__file__).resolve().parent / "results" / f"init_memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_json = report.ResultFile(args.json or default)  # a taken or unwritable path: refused before the work
    print(f"checkpoint {ckpt} ({args.preset}{f', {args.layers} blocks' if args.layers else ''})", flush=True)
    made = checkpoints.write_random_checkpoint(ckpt, args.preset, num_hidden_layers=args.layers)
    how = "reused" if made["reused"] else f"written in {made['seconds']:.1f} s"
    print(f"  {how}: {made['bytes'] / 2**30:.2f} GiB", flush=True)
    info = machine.machine_info()
    work = Path(tempfile.mkdtemp(prefix="lf-bench-mem-"))
    runs = []
    sides = [("loraforge " + args.method, loraforge_command(args, ckpt, work / "loraforge"), work / "loraforge")]
    if args.peft:
        sides.append(
            (
                f"peft {args.peft_init}",
                workers.command("peft_init", [str(ckpt), str(work / "peft"), args.r, args.peft_init, "cpu"]),
                work / "peft",
            )
        )
    for i in range(args.repeats):
        for name, cmd, out in sides:
            rec = measure(cmd, out, args.timeout)
            rec.update({"side": name, "round": i})
            runs.append(rec)
            print(
                f"  {name:<26} {rec['wall_s']:8.1f} s  peak RSS {rec['peak_rss_mib'] / 1024:.2f} GiB "
                f"(sampled anon {rec['sampled_peak_anon_mib'] / 1024:.2f}, "
                f"file {rec['sampled_peak_file_mib'] / 1024:.2f})",
                flush=True,
            )
    shutil.rmtree(work, ignore_errors=True)

    rows = []
    for name, _, _ in sides:
        mine = [r for r in runs if r["side"] == name]
        rows.append(
            {
                "side": name,
                "n": len(mine),
                "median_wall_s": report.median([r["wall_s"] for r in mine]),
                "peak_rss_gib": max(r["peak_rss_mib"] for r in mine) / 1024,
            }
        )
    print(f"\n== peak RSS, {made['bytes'] / 2**30:.2f} GiB checkpoint ==")
    print(
        report.table(
            [[r["side"], r["n"], f"{r['median_wall_s']:.1f}", f"{r['peak_rss_gib']:.2f}"] for r in rows],
            ["side", "n", "median wall s", "peak RSS GiB"],
        )
    )
    lf = rows[0]["peak_rss_gib"]
    full = args.preset == "qwen2.5-1.5b" and not args.layers
    print(
        f"\n  {'PASS' if lf < LIMIT_GIB else 'FAIL'}  loraforge {args.method} peak RSS {lf:.2f} GiB < {LIMIT_GIB} GiB"
        + ("" if full else "  (not the full 1.5B shapes: the target applies to those)")
    )
    info["load_avg_end"] = list(os.getloadavg())
    result = {
        "benchmark": "init_memory",
        "args": vars(args),
        "checkpoint": made,
        "machine": info,
        "summary": rows,
        "target": {"limit_gib": LIMIT_GIB, "value_gib": lf, "pass": lf < LIMIT_GIB, "full_shapes": full},
        "runs": runs,
    }
    path = out_json.write(result)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
