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
import sys
from pathlib import Path
from typing import Any, Callable

from loraforge.core.readers import BOOL, INT, NUMBER, TEXT, JsonLines, Key, at_least, read_jsonl

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
# What a row must hold to be read back (core/readers.py): a row without an integer step is dropped, a value of
# the wrong kind under a known key is left out of its row (`"reward": null` is no point on the reward curve).
STEP = {"step": Key(INT, test=at_least(0), expect="an integer >= 0")}
METRIC_KEYS = (
    "reward score acc kept_frac gen_batches ppo_kl kl kl_ref grad_norm clipfrac clipfrac_lower entropy "
    "response_len response_clip_ratio lr tokens_per_s gen_time_s skipped time_s eval_acc eval_reward "
    "sampler_logp_diff sampler_logp_diff_base"
).split()
SAMPLE_KEYS = {"prompt": Key(TEXT), "response": Key(TEXT), "reward": Key(NUMBER), "score": Key(NUMBER)}
SAMPLE_KEYS["acc"] = Key(BOOL)


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
        self.path = Path(run_dir) / METRICS_FILE
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
        not read back (a kill -9 mid-write tears the last one; a bad byte, a row without an integer step),
        naming them; rewritten through a rename."""
        kept = [json.dumps(m) + "\n" for m in read_metrics_file(self.path, self.echo) if m["step"] <= resume_step]
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


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def read_metrics_file(path: Path, echo: Callable[[str], None] = _stderr) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl that read back (core/readers.py); what was left out is one line to ECHO."""
    read = read_jsonl(path, "a metrics log", STEP, optional_keys={k: Key(NUMBER) for k in METRIC_KEYS})
    _report(read, echo)
    return read.rows


def read_metrics(run_dir: Path, echo: Callable[[str], None] = _stderr) -> list[dict[str, Any]]:
    """The steps of RUN_DIR/metrics.jsonl; a line that does not read back (a run killed mid-write, a bad byte,
    a row without an integer step) is skipped and a value of the wrong kind (`"reward": null`) left out, with
    one line to ECHO saying which. A missing file is no steps."""
    return read_metrics_file(Path(run_dir) / METRICS_FILE, echo)


def _report(read: JsonLines, echo: Callable[[str], None]) -> None:
    summary = read.summary()
    if summary:
        echo(summary)


class SamplesLog:
    """RUN_DIR/samples.jsonl: a few scored responses per step (rollout_side.py chooses them). When a run starts,
    rows of steps after KEEP_STEP (redone after a resume; all of them for a run started afresh) and rows that do
    not read back (a torn last line, a bad byte) are dropped, naming them, and the file is rewritten through a
    rename; then rows are appended."""

    def __init__(self, run_dir: Path, keep_step: int, echo: Callable[[str], None]):
        self.path = Path(run_dir) / SAMPLES_FILE
        if os.path.lexists(self.path):
            read = read_jsonl(self.path, "the samples log", STEP, optional_keys=SAMPLE_KEYS)
            _report(read, echo)
            kept = "".join(json.dumps(r) + "\n" for r in read.rows if r["step"] <= keep_step)
            tmp = self.path.with_name(".tmp-" + self.path.name)
            tmp.write_text(kept)
            os.replace(tmp, self.path)

    def append(self, rows: list[dict[str, Any]]) -> None:
        with self.path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
