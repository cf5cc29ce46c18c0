"""Where the replication study keeps things: its grid's runs, their adapters, run directories, checkpoints and
held-out reports. Shared by replicate.py (which makes them) and study_analysis.py (which reads them)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

METHODS = ("lora", "rlpo", "rlmo", "pissa", "milora")
RESIDUAL = ("pissa", "milora")  # methods whose init moves B0 A0 out of the base (a residual base/)
# A short instruction instead of DAPO-Math's: responses of ~20 tokens instead of ~45 at the same starting
# accuracy for SmolLM2-135M (measured), which halves the cost of a CPU step.
SHORT_TEMPLATE = "{question} Give only the final answer, as: Answer: N"


@dataclass(frozen=True)
class Run:
    method: str
    lr: float
    seed: int
    grid: int = 0  # which --grid entry it comes from (its order in the schedule)

    @property
    def name(self) -> str:
        return f"{self.method}_lr{self.lr:g}_s{self.seed}"


LABELS = {"lora": "LoRA", "rlpo": "LoRA-RLPO", "rlmo": "LoRA-RLMO", "pissa": "PiSSA", "milora": "MiLoRA"}


def adapter_key(run: Run) -> str:
    """One adapter per method; LoRA's random A0 depends on the seed, so one per seed for it."""
    return f"{run.method}_s{run.seed}" if run.method == "lora" else run.method


def adapter_dir(args, run: Run) -> Path:
    return Path(args.work) / "adapters" / adapter_key(run)


def base_for(args, model: Path, run: Run) -> Path:
    """The base the run's adapters load on: the residual base/ for residualised methods."""
    return adapter_dir(args, run) / "base" if run.method in RESIDUAL else model


def run_dir(args, run: Run) -> Path:
    return Path(args.work) / "runs" / run.name


def eval_steps(args) -> list[int]:
    """The evaluated checkpoints: every --save-every steps, and the last step (step 0 is the init's)."""
    return sorted({*range(args.save_every, args.steps + 1, args.save_every), args.steps})


def heldout_report(args, run: Run, step: int) -> Path:
    if step == 0:
        return Path(args.work) / "heldout_init" / f"{adapter_key(run)}.json"
    return run_dir(args, run) / "heldout" / f"step_{step:06d}.json"


def read_metrics(d: Path) -> list[dict]:
    path = d / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def is_done(args, run: Run) -> bool:
    d = run_dir(args, run)
    if not (d / "adapter" / "adapter_config.json").exists():
        return False
    steps = [m["step"] for m in read_metrics(d)]
    return bool(steps) and max(steps) >= args.steps


def in_flight(args, run: Run) -> bool:
    """Another process holds the run's lock (its pid is alive): it is being trained, leave it alone."""
    try:
        pid = int((run_dir(args, run) / ".lock").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def report_done(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text())["benchmarks"])
    except (OSError, ValueError, KeyError):
        return False
