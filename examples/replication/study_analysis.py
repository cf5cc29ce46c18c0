"""The replication study's analysis: reads what the runs and evaluations wrote, copies it under --out, and writes
the tables (table.md), every number behind them (summary.json, stats.json) and the figures.

Only files are read: each run's metrics.jsonl (training reward, KL, gradient norm...) and its held-out eval reports
(`loraforge eval` JSON: per-problem correctness of the greedy response and of the 4 samples), so everything here can
be recomputed from the committed results/ folder with `replicate.py --analyse-only --work ... --out ...`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from study_layout import LABELS, adapter_dir, eval_steps, heldout_report, is_done, read_metrics, run_dir
from study_stats import collapse, dead_from, difference, hier_bootstrap, method_mean, percentile_interval, t_interval

# the comparisons the paper's claim is about: (a, b) reads "a - b"
CONTRASTS = [("rlpo", "pissa"), ("rlpo", "lora"), ("rlmo", "milora"), ("rlpo", "milora")]
HELDOUT_KINDS = ("greedy", "mean")


# ------------------------------------------------------------------------------------------------
# reading
def heldout_scores(path: Path) -> dict[str, np.ndarray] | None:
    """Per-problem held-out scores of one eval report: greedy 0/1 and mean@n (correct samples / n)."""
    try:
        report = json.loads(path.read_text())
        bench = next(iter(report["benchmarks"].values()))
        n = bench["settings"]["samples"]
        counts = bench["counts"]
        return {
            "greedy": np.array(counts["greedy_correct_per_problem"][0], dtype=float),
            "mean": np.array(counts["correct_per_problem"][0], dtype=float) / n,
        }
    except (OSError, ValueError, KeyError, StopIteration, IndexError):
        return None


def heldout_curve(args, run) -> dict[int, dict[str, np.ndarray]]:
    """step -> per-problem scores, for step 0 (the init) and every evaluated checkpoint that has a report."""
    curve = {}
    for step in [0, *eval_steps(args)]:
        scores = heldout_scores(heldout_report(args, run, step))
        if scores is not None:
            curve[step] = scores
    return curve


def window_mean(values: list[float], window: int) -> float:
    tail = [v for v in values[-window:] if v == v]
    return sum(tail) / len(tail) if tail else float("nan")


def run_summary(metrics: list[dict], window: int) -> dict:
    def col(key):
        return [float(m[key]) for m in metrics if key in m]

    kl, grad = col("kl"), [g for g in col("grad_norm") if g == g]
    gen, total = col("gen_time_s"), col("time_s")
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
        "s_per_step": statistics.fmean(total),
        "rollout_share": sum(gen) / sum(total),
        "gen_batches_mean": statistics.fmean(col("gen_batches")),
    }


# ------------------------------------------------------------------------------------------------
# copying results and running the per-run commands
def copy_run(args, run, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "samples.jsonl", "config.json"):
        if (run_dir(args, run) / f).exists():
            shutil.copyfile(run_dir(args, run) / f, dest / f)
    for step in [0, *eval_steps(args)]:
        src = heldout_report(args, run, step)
        if src.exists():
            (dest / "heldout").mkdir(exist_ok=True)
            shutil.copyfile(src, dest / "heldout" / f"step_{step:06d}.json")


def inspect_run(args, model: Path, run, dest: Path, cli: list[str], env: dict) -> dict | None:
    """`loraforge inspect` of the trained adapter against its init (geometry: where it moved)."""
    target = dest / "inspect.json"
    trained = run_dir(args, run) / "adapter" / "adapter_model.safetensors"
    if not target.exists() or target.stat().st_mtime < trained.stat().st_mtime:  # none yet, or the run went on
        cmd = cli + ["inspect", str(run_dir(args, run) / "adapter"), "--init", str(adapter_dir(args, run))]
        cmd += ["--base", str(model), "--json", str(target), "--device", args.device]
        if args.inspect_layers:
            cmd += ["--layers", args.inspect_layers]
        log = Path(args.work) / "logs" / f"{run.name}.inspect.log"
        print("+ " + " ".join(cmd), flush=True)
        with log.open("a") as f:
            if subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env) != 0:
                return None
    return json.loads(target.read_text())["mean"]


def plot_training(args, runs: list, out: Path, cli: list[str]) -> None:
    """`loraforge plot` of each grid entry's first seed: reward, gradient norm and KL per method."""
    for entry in sorted({r.grid for r in runs}):
        shown = [r for r in runs if r.grid == entry and is_done(args, r)]
        shown = [r for r in shown if r.seed == min(x.seed for x in shown)]
        if shown:
            cmd = (
                cli
                + ["plot"]
                + [str(run_dir(args, r)) for r in shown]
                + ["-o", str(out / f"fig_lr{shown[0].lr:g}.png")]
            )
            cmd += ["--smooth", str(args.smooth)] + [x for r in shown for x in ("--label", LABELS[r.method])]
            print("+ " + " ".join(cmd), flush=True)
            subprocess.call(cmd)


# ------------------------------------------------------------------------------------------------
# statistics per grid entry
def heldout_stats(args, runs: list, curves: dict) -> dict:
    """Per grid entry (lr), per held-out kind and evaluated step: each method's mean with its bootstrap and
    t intervals, and the contrasts' differences. A run counts at every step it has been evaluated at, so a
    grid cut short still gives its table; each cell records how many seeds it holds (`seeds`)."""
    stats = {}
    evaluated = [r for r in runs if len(curves.get(r.name, {})) > 1]  # the init's step 0 and at least one more
    for entry in sorted({r.grid for r in evaluated}):
        entry_runs = [r for r in evaluated if r.grid == entry]
        lr = entry_runs[0].lr
        methods = list(dict.fromkeys(r.method for r in entry_runs))
        per_kind = {}
        for kind in HELDOUT_KINDS:
            per_step = {}
            for step in [0, *eval_steps(args)]:
                by_method = {}
                for m in methods:
                    mine = [r for r in entry_runs if r.method == m and step in curves[r.name]]
                    if mine:
                        by_method[m] = [curves[r.name][step][kind] for r in mine]
                if by_method:
                    per_step[step] = step_stats(by_method)
            per_kind[kind] = per_step
        stats[f"{lr:g}"] = {"lr": lr, "methods": methods, "heldout": per_kind}
    return stats


def step_stats(by_method: dict[str, list[np.ndarray]]) -> dict:
    boot = hier_bootstrap(by_method, draws=10_000, seed=0)
    methods = {
        m: {
            "seeds": len(runs),
            "per_seed": [float(r.mean()) for r in runs],
            "boot": percentile_interval(method_mean(runs), boot[m]).as_dict(),
            "t": t_interval([float(r.mean()) for r in runs]).as_dict(),
        }
        for m, runs in by_method.items()
    }
    contrasts = {f"{a}-{b}": difference(a, b, by_method, boot) for a, b in CONTRASTS if a in boot and b in boot}
    return {"methods": methods, "contrasts": contrasts}


def collapses(runs: list, curves: dict, metrics: dict, drop: float = 0.10) -> dict[str, dict]:
    """The collapse criterion (study_stats.collapse) on held-out mean@k, as stated before the study, and on greedy
    accuracy (added with the stress entry: mean@k starts at a few percent, so a fall from the start cannot reach
    10 points); and each run's rollout accuracy dead from a step on (study_stats.dead_from). kind -> run -> result."""
    out: dict[str, dict] = {"mean": {}, "greedy": {}, "rollout_dead_from": {}}
    for r in runs:
        for kind in ("mean", "greedy"):
            curve = {step: float(s[kind].mean()) for step, s in curves.get(r.name, {}).items()}
            if curve:
                out[kind][r.name] = collapse(curve, drop)
        accuracy = [float(m["acc"]) for m in metrics.get(r.name, []) if "acc" in m]
        if accuracy:
            out["rollout_dead_from"][r.name] = dead_from(accuracy)
    return out


def analyse(args, model: Path, runs: list, status: dict) -> None:
    from study_report import heldout_figure, write_tables  # matplotlib only when there is something to draw

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    script = Path(sys.executable).with_name("loraforge")
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "loraforge"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    summaries, curves = {}, {}
    for r in runs:
        curves[r.name] = heldout_curve(args, r)
        dest = out / "runs" / r.name
        done = is_done(args, r)
        if done or len(curves[r.name]) > 1:  # a run evaluated beyond its init enters the statistics: it ships too
            copy_run(args, r, dest)
        if not done:
            continue
        summary = run_summary(read_metrics(run_dir(args, r)), args.window)
        geometry = inspect_run(args, model, r, dest, cli, env) if not args.no_inspect else None
        for k in ("sim_top", "sim_bottom", "p_top", "update_norm"):
            summary[k] = (geometry or {}).get(k, float("nan"))
        summaries[r.name] = summary
    plot_training(args, runs, out, cli)
    stats = heldout_stats(args, runs, curves)
    collapsed = collapses(runs, curves, {r.name: read_metrics(run_dir(args, r)) for r in runs})
    for entry, st in stats.items():
        heldout_figure(args, [r for r in runs if f"{r.lr:g}" == entry], st, out / f"fig_heldout_lr{entry}.png")
    text = write_tables(args, runs, summaries, stats, collapsed, out)
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "out")}
    done = {r.name: ("done" if is_done(args, r) else "not finished") for r in runs}
    (out / "summary.json").write_text(
        json.dumps({"settings": settings, "status": done, "jobs": status, "runs": summaries}, indent=2) + "\n"
    )
    (out / "stats.json").write_text(json.dumps({"heldout": stats, "collapse": collapsed}, indent=2) + "\n")
    print(text)
