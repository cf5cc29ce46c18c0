"""Init on an MoE checkpoint with real shapes: time and peak RSS of `loraforge init` against PEFT.

What is measured: a RANDOM bf16 checkpoint with Qwen3-30B-A3B's shapes (hidden 2048, 128 experts of
intermediate 768, 32 query / 4 kv heads of 128, vocab 151936, untied head), cut to the first
--layers blocks, written once in the layout the Hub checkpoint uses (one tensor per expert and
projection: `mlp.experts.{e}.gate_proj.weight`, ...) and reused. Each case runs as a fresh process
(peak RSS = ru_maxrss of that process, checkpoint pages it mapped included):

- `loraforge init DIR --method rlpo|pissa -r R` (default target set: attention and every expert,
  routers left out), streaming, expert stacks decomposed in batches;
- PEFT as a user would otherwise do it: `from_pretrained` + `get_peft_model(LoraConfig(
  target_modules="all-linear"))` + `save_pretrained`, with PEFT's default init (PEFT converts the
  all-linear config of a qwen3_moe model into expert `target_parameters` itself) and with
  `init_lora_weights="pissa"` (recorded as it ends: PEFT's PiSSA does not handle fused experts).

    python benchmarks/init_moe.py                    # 2 blocks of Qwen3-30B-A3B shapes (~4 GB once)
    python benchmarks/init_moe.py --preset tiny      # check the script in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402
import machine  # noqa: E402
import processes  # noqa: E402
import report  # noqa: E402
import workers  # noqa: E402

PRESETS = {
    "qwen3-30b-a3b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        tie_word_embeddings=False,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3-30b-a3b", choices=list(PRESETS), help="shapes [%(default)s]")
    p.add_argument("--layers", type=int, default=2, help="blocks of the model to write [%(default)s]")
    p.add_argument("--dir", default=None, help="checkpoint directory, made if missing [/tmp/loraforge-bench/...]")
    p.add_argument("--methods", default="rlpo,pissa", help="loraforge methods [%(default)s]")
    p.add_argument("--r", type=int, default=32, help="adapter rank [%(default)s]")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT cases")
    p.add_argument("--json", default=None, help="results file [benchmarks/results/init_moe-<time>.json]")
    p.add_argument("--timeout", type=float, default=3600, help="per run, seconds [%(default)s]")
    return p.parse_args(argv)


def _expert_keys(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], tuple]]:
    """On-disk (name, shape, slice of the fused tensor) for one in-memory tensor: fused experts
    are stored per expert and projection, as the Hub's Qwen3-MoE checkpoints are."""
    prefix, _, leaf = name.rpartition(".")
    if leaf == "gate_up_proj":  # (E, 2I, H) -> gate (I, H), up (I, H) per expert
        E, two_i, H = shape
        return [
            (f"{prefix}.{e}.{proj}.weight", (two_i // 2, H), (e, half))
            for e in range(E)
            for half, proj in enumerate(("gate_proj", "up_proj"))
        ]
    if leaf == "down_proj" and len(shape) == 3:  # (E, H, I) -> down (H, I) per expert
        E, H, I = shape  # noqa: E741 (the paper's and transformers' name for the intermediate size)
        return [(f"{prefix}.{e}.down_proj.weight", (H, I), (e, None)) for e in range(E)]
    return [(name, shape, None)]


def write_moe_checkpoint(path: Path, preset: str, layers: int, seed: int = 0, shard_mib: int = 2048) -> dict:
    """A random bf16 Qwen3-MoE checkpoint of PRESET's shapes at PATH, one shard in memory at a time;
    kept when one with the same settings is already there."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    spec = {**PRESETS[preset], "num_hidden_layers": layers}
    marker = {"preset": preset, "spec": spec, "seed": seed, "format": "loraforge-bench-moe/1"}
    if (path / "bench_checkpoint.json").exists() and json.loads((path / "bench_checkpoint.json").read_text()) == marker:
        return {"path": str(path), "reused": True, "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors"))}
    checkpoints.check_dest(path, "bench_checkpoint.json")  # before the minutes of work: never a user's directory
    started = time.perf_counter()
    config = Qwen3MoeConfig(**spec, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    plan = [(k, tuple(p.shape)) for k, p in skeleton.named_parameters()]
    with checkpoints.staging(path, "bench_checkpoint.json") as tmp:
        weight_map, shard, size, n, total = {}, {}, 0, 0, 0

        def flush():
            nonlocal shard, size, n
            if shard:
                n += 1
                fname = f"model-{n:05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
                shard, size = {}, 0

        for name, shape in plan:
            if name.endswith("norm.weight"):
                full = torch.ones(shape, dtype=torch.bfloat16)
            else:
                g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                full = torch.randn(shape, generator=g, dtype=torch.bfloat16).mul_(0.02)
            for key, key_shape, where in _expert_keys(name, shape):
                if where is None:
                    t = full
                else:
                    e, half = where
                    t = full[e] if half is None else full[e].chunk(2, dim=0)[half]
                shard[key] = t.contiguous().clone().reshape(key_shape)
                size += t.numel() * 2
                total += t.numel() * 2
                if size >= shard_mib * 2**20:
                    flush()
        flush()
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
        config.save_pretrained(str(tmp))
        (tmp / "bench_checkpoint.json").write_text(json.dumps(marker))
    return {"path": str(path), "reused": False, "seconds": time.perf_counter() - started, "bytes": total}


def measure(cmd: list[str], out: Path, timeout: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = processes.run_measured(cmd, env=env, timeout=timeout)
    row = {k: res[k] for k in ("rc", "wall_s", "cpu_s", "peak_rss_mib", "timed_out")}
    if res["rc"] != 0:
        row["error"] = processes.tail(res["stderr"], 600)
    else:
        adapter = out / "adapter_model.safetensors"
        row["adapter_mib"] = round(adapter.stat().st_size / 2**20, 1) if adapter.exists() else None
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    machine.ensure_loraforge_importable()
    ckpt = Path(args.dir or Path(tempfile.gettempdir()) / "loraforge-bench" / f"{args.preset}-L{args.layers}-moe")
    default = Path(__file__).resolve().parent / "results" / f"init_moe-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_json = report.ResultFile(args.json or default)  # a taken or unwritable path: refused before the work
    print(f"checkpoint {ckpt} ...", flush=True)
    made = write_moe_checkpoint(ckpt, args.preset, args.layers)
    print(f"  {made['bytes'] / 2**30:.2f} GiB ({'reused' if made['reused'] else 'written'})", flush=True)
    work = Path(tempfile.mkdtemp(prefix="lf-bench-moe-"))
    rows = []
    for method in args.methods.split(","):
        out = work / method
        cmd = [*machine.loraforge_cli(), "init", str(ckpt), "--method", method, "-r", str(args.r), "-o", str(out)]
        cmd += ["--device", "cpu"]
        row = {"case": f"loraforge {method}", **measure(cmd, out, args.timeout)}
        if row["rc"] == 0:
            manifest = json.loads((out / "loraforge.json").read_text())
            row["modules"] = len(manifest["modules"])
            row["timings"] = manifest.get("timings")
        rows.append(row)
        print(f"  {row['case']:<22} rc={row['rc']} {row['wall_s']:7.1f} s  peak RSS {row['peak_rss_mib']:.0f} MiB")
    if not args.no_peft:
        for init in (True, "pissa"):
            out = work / f"peft-{init}"
            cmd = workers.command("peft_init", [str(ckpt), str(out), args.r, init, "cpu"])
            row = {"case": f"PEFT {'default' if init is True else init}", **measure(cmd, out, args.timeout)}
            rows.append(row)
            print(f"  {row['case']:<22} rc={row['rc']} {row['wall_s']:7.1f} s  peak RSS {row['peak_rss_mib']:.0f} MiB")
    shutil.rmtree(work, ignore_errors=True)
    header = ["case", "rc", "wall s", "peak RSS MiB", "modules"]
    print(
        report.table(
            [[r["case"], r["rc"], f"{r['wall_s']:.1f}", f"{r['peak_rss_mib']:.0f}", r.get("modules")] for r in rows],
            header,
        )
    )
    result = {
        "machine": machine.machine_info(),
        "preset": args.preset,
        "layers": args.layers,
        "r": args.r,
        "checkpoint_gib": made["bytes"] / 2**30,
        "runs": rows,
    }
    path = out_json.write(result)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
