"""What `loraforge train` shows while a step runs: rollout rows and tokens, updates, and an ETA for the run.

A step on a CPU can take minutes (16 prompts x 8 responses of up to 1024 tokens), and the per-step metrics line
(metrics.py) comes only at its end. The loop tells a reporter where it is through a few hook calls:

    progress = StepProgress(total_steps, start_step, bar)   # bar: the run's tqdm bar, or None
    progress.step_started(step, updates_per_step)
    progress.rollout(rows_done, rows_total, tokens)          # from the sampler, after each decoding step
    progress.updated(done)                                   # after each optimizer step
    progress.step_finished()

and it shows `rollout 40/128 rows, 1,234 tokens | updates 0/4 | ETA 12 min`: in the tqdm bar's postfix on a
terminal, and elsewhere (a log file, a pipe) as a line on stderr at most every `interval` seconds while a step
runs, prefixed with the step (`step 3/10: ...`). Lines never go to stdout, which holds one line per step.

The ETA is the mean duration of the steps completed so far in this process times the steps still to run, less
the time the current step has already taken; it is unknown until one step has completed.

`banner(...)` is the line the run starts with; a resumed run says how many steps remain.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def duration(seconds: float) -> str:
    """`45 s`, `12 min`, `1 h 05 min` (pure; rounded to what a person waiting needs)."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s" if s < 600 else f"{round(s / 60)} min"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def banner(algo: str, total: int, start: int, detail: str, world: int = 1) -> str:
    """The run's first line (pure). A fresh run: `training dapo for 4 steps (DETAIL)`; a resumed one says how
    many steps remain: `training dapo: 1 of 4 steps remains (resumed after step 3; DETAIL)`."""
    where = f" on {world} processes" if world > 1 else ""
    if start <= 0:
        return f"training {algo} for {total} steps{where} ({detail})"
    left = max(0, total - start)
    remain = f"{left} of {total} steps remain{'s' if left == 1 else ''}"
    return f"training {algo}: {remain}{where} (resumed after step {start}; {detail})"


class StepProgress:
    """The reporter the loop calls (see the module docstring). Cheap to call often: it formats and writes only
    when the bar is shown or a line is due."""

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        bar=None,
        *,
        stream: TextIO | None = None,
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.start = total_steps, start_step
        self.bar = bar if bar is not None and not getattr(bar, "disable", False) else None
        self.stream = stream if stream is not None else sys.stderr
        self.interval, self.clock = interval, clock
        self.step = start_step
        self.step_t0 = self.last_line = clock()
        self.durations: list[float] = []
        self.rows = self.rows_total = self.tokens = 0
        self.done = self.updates = 0

    # -- hooks --------------------------------------------------------------------------------
    def step_started(self, step: int, updates_per_step: int) -> None:
        self.step, self.updates, self.done = step, updates_per_step, 0
        self.rows = self.rows_total = self.tokens = 0
        self.step_t0 = self.last_line = self.clock()

    def rollout(self, rows_done: int, rows_total: int, tokens: int) -> None:
        """The sampler's position in the current generation call (several per step with dynamic sampling:
        the counts are the current call's)."""
        self.rows, self.rows_total, self.tokens = rows_done, rows_total, tokens
        self._show()

    def updated(self, done: int) -> None:
        self.done = done
        self._show()

    def step_finished(self) -> None:
        self.durations.append(self.clock() - self.step_t0)
        if self.bar is not None:
            self.bar.set_postfix_str(self._eta_text(), refresh=False)

    # -- what is shown ------------------------------------------------------------------------
    def eta(self) -> float | None:
        """Seconds until the run ends, or None before a step has completed."""
        if not self.durations:
            return None
        per_step = sum(self.durations) / len(self.durations)
        left = self.total - self.step + 1  # the current step included
        return max(0.0, per_step * left - (self.clock() - self.step_t0))

    def _eta_text(self) -> str:
        eta = self.eta()
        return f"ETA {duration(eta)}" if eta is not None else "ETA after the first step"

    def status(self) -> str:
        """`rollout 40/128 rows, 1,234 tokens | updates 0/4 | ETA 12 min` (pure given the state)."""
        parts = []
        if self.rows_total:
            parts.append(f"rollout {self.rows}/{self.rows_total} rows, {self.tokens:,} tokens")
        if self.updates:
            parts.append(f"updates {self.done}/{self.updates}")
        parts.append(self._eta_text())
        return " | ".join(parts)

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self.status())  # tqdm redraws at most every mininterval
            return
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            print(f"step {self.step}/{self.total}: {self.status()}", file=self.stream, flush=True)


class NoProgress:
    """The reporter of processes other than 0, and of a trainer whose run() has not started: says nothing."""

    def step_started(self, step: int, updates_per_step: int) -> None:
        pass

    def rollout(self, rows_done: int, rows_total: int, tokens: int) -> None:
        pass

    def updated(self, done: int) -> None:
        pass

    def step_finished(self) -> None:
        pass
