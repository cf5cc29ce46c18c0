"""Drift on a 4-bit base: lora, rlpo and pissa trained with `loraforge train --quantize nf4`, a few seeds.

The paper's stability picture is per step: kl = KL(pi_new || pi_old) on the step's response tokens after its
updates, and grad_norm = the pre-clip gradient norm (loraforge.rl.metrics). This runs the same short DAPO run for
each method and seed on the NF4 base, one run at a time, and tabulates both (mean over steps and seeds, and the
spread over seeds). Adapters come from `loraforge init --quantize nf4` (r 16, alpha 32): rlpo and pissa are
deterministic functions of the weights, so one adapter serves every seed; lora's A0 is drawn with the seed.

    python benchmarks/quant_drift.py --model models/SmolLM2-135M-Instruct --work /tmp/drift --seeds 0,1
    python benchmarks/quant_drift.py --work /tmp/drift --table-only         # the table from finished runs

Each run: --data synthetic:level=1-3 --reward number, 2 prompts x 4 responses, 24 response tokens, 2 optimizer
steps per step (--mini-batch 1), no dynamic sampling (it refills batches, and its cost varies by method and seed),
--steps 3: sized to a shared 2-core CPU, where one step of 2 prompts x 8 x 32 tokens took 290 s on the NF4 base.
The metrics files are copied to benchmarks/results/quant_drift/ and the table printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "quant_drift"
TRAIN = [
    "--algo", "dapo", "--data", "synthetic:level=1-3,n=4000,split=train", "--reward", "number",
    "--prompt-template", "{question} Give only the final answer, as: Answer: N", "--max-response-length", "24",
    "--overlong-buffer", "4", "--group-size", "4", "--prompt-batch", "2", "--mini-batch", "1", "--micro-batch", "16",
    "--lr", "1e-4", "--no-dynamic-sampling", "--device", "cpu", "--no-tensorboard", "--quantize", "nf4",
]  # fmt: skip


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "loraforge", *map(str, args)]


def adapter(work: Path, model: str, method: str, seed: int, r: int) -> Path:
    """`loraforge init --quantize nf4` (reused when present); lora per seed, rlpo and pissa once."""
    path = work / "adapters" / (f"{method}_s{seed}" if method == "lora" else method)
    if not (path / "loraforge.json").exists():
        init = cli("init", model, "--method", method, "-r", r, "--alpha", 2 * r, "--seed", seed, "--device", "cpu")
        subprocess.run([*init, "--quantize", "nf4", "-o", path], check=True)
    return path


def run(work: Path, model: str, method: str, seed: int, steps: int, r: int) -> Path:
    out = work / "runs" / f"{method}_s{seed}"
    if (out / "adapter" / "adapter_model.safetensors").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    a = adapter(work, model, method, seed, r)
    base = a / "base" if (a / "base").is_dir() else model  # pissa trains on its residual base
    started = time.perf_counter()
    cmd = cli("train", "--model", base, "--adapter", a, "-o", out, "--steps", steps, "--seed", seed, *TRAIN)
    subprocess.run(cmd, check=True)
    print(f"{method} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


def table(work: Path, methods: list[str]) -> str:
    """Markdown: per method, kl and grad_norm (mean over steps, then mean and range over seeds), and acc."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = ["| method | seeds | steps | kl per step, mean (range over seeds) | grad_norm, mean (range) | acc, mean |"]
    rows.append("|---|---|---|---|---|---|")
    for method in methods:
        per_seed = []
        for f in sorted((work / "runs").glob(f"{method}_s*/metrics.jsonl")):
            lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            if lines:
                shutil.copyfile(f, RESULTS / f"{f.parent.name}.jsonl")
                per_seed.append({k: statistics.mean(m[k] for m in lines) for k in ("kl", "grad_norm", "acc")})
                per_seed[-1]["steps"] = len(lines)
        if not per_seed:
            continue
        steps = ",".join(str(s["steps"]) for s in per_seed)
        acc = statistics.mean(s["acc"] for s in per_seed)
        kl, grad = _cell(per_seed, "kl", ".2e"), _cell(per_seed, "grad_norm", ".3f")
        rows.append(f"| {method} | {len(per_seed)} | {steps} | {kl} | {grad} | {acc:.3f} |")
    return "\n".join(rows) + "\n\n" + per_run(work, methods)


def per_run(work: Path, methods: list[str]) -> str:
    """Markdown: every run's kl and grad_norm at each step."""
    rows = ["| run | kl at steps 1, 2, ... | grad_norm at steps 1, 2, ... | acc at each step |", "|---|---|---|---|"]
    for method in methods:
        for f in sorted((work / "runs").glob(f"{method}_s*/metrics.jsonl")):
            lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            kl = ", ".join(f"{m['kl']:.3f}" for m in lines)
            grad = ", ".join(f"{m['grad_norm']:.2f}" for m in lines)
            acc = ", ".join(f"{m['acc']:.2f}" for m in lines)
            rows.append(f"| {f.parent.name} | {kl} | {grad} | {acc} |")
    return "\n".join(rows)


def _cell(per_seed: list[dict], key: str, fmt: str) -> str:
    vals = [s[key] for s in per_seed]
    return f"{statistics.mean(vals):{fmt}} ({min(vals):{fmt}} to {max(vals):{fmt}})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # what examples/quickstart.sh writes
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--work", required=True, help="adapters/ and runs/ go here (finished runs are reused)")
    p.add_argument("--methods", default="lora,rlpo,pissa")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args(argv)
    work, methods = Path(args.work), args.methods.split(",")
    if not args.table_only:
        for seed in map(int, args.seeds.split(",")):  # seed by seed: a cut-short sweep still has whole seeds
            for method in methods:
                run(work, args.model, method, seed, args.steps, args.r)
    print(table(work, methods))
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
