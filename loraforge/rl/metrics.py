"""Per-step metrics: one line on stdout, one JSON object per line in RUN_DIR/metrics.jsonl, and
TensorBoard scalars when tensorboard is installed (optional).

Keys (all floats unless said; "tokens" are response tokens):
  step (int), reward (mean over ALL generated responses, before dynamic-sampling filtering, overlong
  penalty included: the honest training reward), score (same, before the penalty), acc (accuracy, same
  rows), kept_frac (groups kept by dynamic sampling / generated), gen_batches (int), ppo_kl
  (mean(-delta), KL(old || new) on old samples, averaged over micro-batches), kl (KL(pi_new || pi_old) on
  the step's response tokens after its updates: the paper's stability diagnostic), kl_ref (k3 KL to
  the initial adapter, when --kl-beta > 0), grad_norm (pre-clip total norm, mean over the step's
  optimizer steps), clipfrac, clipfrac_lower, entropy (mean per-token entropy of the rollout policy),
  response_len (mean), response_clip_ratio (fraction stopped by --max-response-length), lr,
  tokens_per_s (prompt + response tokens generated per second of step time), skipped (optimizer steps
  skipped for a non-finite grad norm), time_s, and eval_acc / eval_reward on evaluation steps.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4) or math.isnan(x):
            return f"{x:.1e}"
        return f"{x:.2f}"
    return str(x)


def format_line(m: dict[str, Any], total_steps: int) -> str:
    """`step 12/200 | reward 0.41 | acc 0.55 | kl 3.1e-04 | grad 0.82 | len 212 | 3.2 s` (pure)."""
    parts = [f"step {m['step']}/{total_steps}"]
    for key, label in (("reward", "reward"), ("acc", "acc"), ("kl", "kl"), ("grad_norm", "grad")):
        if key in m:
            parts.append(f"{label} {_fmt(m[key])}")
    if "response_len" in m:
        parts.append(f"len {m['response_len']:.0f}")
    if "eval_acc" in m:
        parts.append(f"eval_acc {_fmt(m['eval_acc'])}")
    if "time_s" in m:
        parts.append(f"{m['time_s']:.1f} s")
    return " | ".join(parts)


class MetricsLogger:
    """Writes each step's dict to metrics.jsonl (and TensorBoard) and prints its one-line summary."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        echo: Callable[[str], None],
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total_steps = total_steps
        self.echo = echo
        if resume_step is not None and self.path.exists():
            self._truncate_to(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception:  # not installed: jsonl and stdout only
                self.tb = None

    def _truncate_to(self, resume_step: int) -> None:
        """Drop lines of steps after the checkpoint we resume from (they will be redone) and lines that do
        not parse (a kill -9 mid-write tears the last one), saying how many; rewritten through a rename."""
        rows, torn = parse_lines(self.path.read_text(errors="replace"))
        if torn:
            self.echo(f"warning: {self.path}: dropped {torn} unreadable line(s) (a write was interrupted)")
        kept = [json.dumps(m) + "\n" for m in rows if m.get("step", 0) <= resume_step]
        tmp = self.path.with_name(".tmp-" + self.path.name)
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def log(self, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, metrics["step"])
        self.echo(format_line(metrics, self.total_steps))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def parse_lines(text: str) -> tuple[list[dict[str, Any]], int]:
    """(the objects of the lines that parse, the number of non-empty lines that do not)."""
    rows, bad = [], 0
    for ln in text.splitlines():
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The steps of RUN_DIR/metrics.jsonl; a torn line (a run killed mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return parse_lines(path.read_text(errors="replace"))[0]
