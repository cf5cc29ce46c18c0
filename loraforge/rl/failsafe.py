"""Failing safe: what a training run does when a step fails, a signal arrives, or another run holds its directory.

- The sound state: everything a checkpoint holds (adapter, optimizer, scheduler, RNGs, data position), copied to
  the CPU at the end of every complete step (`cpu_copy`, `FailSafe._capture`).
- Roll-back and rescue save: a step that fails for whatever reason (dynamic sampling gives up, a reward function
  raises, the loss turns NaN, out of memory, SIGTERM) puts that state back and saves it as a checkpoint and as
  RUN_DIR/adapter before the error is reported (`_roll_back`, `_rescue`, `_failure_message`), so `--resume`
  continues exactly where the uninterrupted run would have been.
- Signals: the first Ctrl-C finishes the step, saves and exits; SIGTERM abandons the step (`_deferred_interrupt`).
- The run lock: one `train` or `--resume` at a time in a run directory, after undoing what a killed run left there
  (`RunLock`, `run_lock`).

`FailSafe` is a mixin of `Trainer` (trainer.py); moved out of trainer.py and checkpoint.py unchanged.
"""

from __future__ import annotations

import copy
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.rl import checkpoint as ckpt
from loraforge.rl.advantage import GroupsExhausted


class TrainingDiverged(Exception):
    """The loss became non-finite; the trainer turns it into a LoraforgeError naming the checkpoint."""


class Terminated(BaseException):
    """Raised by the SIGTERM handler inside a step: abandon the step, roll back, save (not an Exception,
    so no `except Exception` on the way swallows it)."""


@dataclass
class SoundState:
    """Everything a checkpoint holds, as it was at the end of step `step`, copied to the CPU."""

    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    data: dict[str, int]
    skipped: int


# ------------------------------------------------------------------------------------------------
# the last sound state, kept in memory during a step
def cpu_copy(obj: Any, into: Any = None) -> Any:
    """A deep copy with every tensor copied to the CPU (parameters, optimizer and scheduler state dicts).
    `into`, an earlier copy of the same structure, has its tensors overwritten in place instead of new ones
    allocated: taken every step, the copy then costs a memcpy, not an allocation of the same size."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if (
            isinstance(into, torch.Tensor)
            and into.shape == t.shape
            and into.dtype == t.dtype
            and into.device.type == "cpu"
        ):
            return into.copy_(t)
        return t.to("cpu", copy=True)
    if isinstance(obj, dict):
        old = into if isinstance(into, dict) else {}
        return {k: cpu_copy(v, old.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        old = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(cpu_copy(v, o) for v, o in zip(obj, old))
    return copy.deepcopy(obj)


# ------------------------------------------------------------------------------------------------
# one run at a time in a run directory
LOCK_FILE = ".lock"


class RunLock:
    """An exclusive flock on RUN_DIR/.lock, held for the whole run: a second `train` or `--resume` on the
    same directory is refused instead of interleaving checkpoints. The kernel drops the lock when the
    process dies (kill -9 included), so a killed run never locks the directory out."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a file in the way, no permission, a read-only mount
            raise LoraforgeError(
                f"run directory {self.path.parent}: cannot write there ({e.strerror or e}); choose another -o directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by a live process
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LoraforgeError(
                f"{self.path.parent} is in use by another `loraforge train` (pid {holder}); wait for it to finish, "
                "stop it, or choose another -o directory"
            ) from None
        except OSError:  # a filesystem without flock (some network mounts): run unlocked, as before
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (removing it would race a new locker)
            self.fd = None


@contextmanager
def run_lock(run_dir: Path | None, dist, echo: Callable[[str], None]):
    """Hold RUN_DIR's lock (process 0) for the whole run, after undoing what a killed run left there."""
    lock = RunLock(run_dir) if run_dir is not None and dist.is_main else None
    if lock is not None:
        lock.acquire()
    try:
        if lock is not None:
            for line in ckpt.clean_litter(run_dir):
                echo(line)
        yield
    finally:
        if lock is not None:
            lock.release()


class FailSafe:
    """Trainer methods that keep the last complete step and fall back to it."""

    # -- the sound state: what a failed step rolls back to ------------------------------------
    def _capture(self, step: int, previous: SoundState | None) -> SoundState:
        """The state at the end of step `step` (before the next one changes anything), on the CPU; the
        previous step's copy is overwritten in place (it is of no use once a step has completed)."""
        return SoundState(
            step=step,
            params=cpu_copy(dict(self.params), previous.params if previous else None),
            optimizer=cpu_copy(self.optimizer.state_dict(), previous.optimizer if previous else None),
            scheduler=cpu_copy(self.scheduler.state_dict()),
            rng=ckpt.rng_state(self.generator),
            data=self.stream.state(),
            skipped=self.skipped,
        )

    def _roll_back(self, sound: SoundState) -> None:
        """Put the captured state back into the live model, optimizer, scheduler, RNGs and data stream."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(sound.params[n])
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.load_state_dict(sound.optimizer)
        self.scheduler.load_state_dict(sound.scheduler)
        ckpt.set_rng_state(sound.rng, self.generator)
        self.stream.load_state(sound.data)
        self.skipped = sound.skipped
        self._synced = None  # the sampler may hold weights of the abandoned step

    def _rescue(self, sound: SoundState, last_saved: int | None) -> tuple[int | None, str]:
        """After a failed step: roll back to the last complete step and save it (checkpoint + RUN_DIR/adapter).
        Returns (the step whose adapter is now RUN_DIR/adapter, or None; a sentence saying what was saved)."""
        if sound.step == 0:
            return None, (
                f"no step had completed, so nothing was saved ({self.run_dir} holds no checkpoint: the same "
                "command may be run on it again)"
            )
        try:
            self._roll_back(sound)
            if last_saved != sound.step:
                self.save(sound.step)
            adapter = self.save_adapter()
        except Exception as e:  # a full disk, say: the original error stays the one reported
            saved = f"checkpoint {ckpt.checkpoint_path(self.run_dir, last_saved)}" if last_saved else "nothing"
            return None, f"saving the last complete step {sound.step} failed too ({e}); on disk: {saved}"
        return sound.step, (
            f"saved the last complete step {sound.step}: the adapter to {adapter} and a checkpoint to "
            f"{ckpt.checkpoint_path(self.run_dir, sound.step)}"
        )

    def _failure_message(self, error: BaseException, step: int, saved: int | None, what_saved: str) -> str:
        """One message: what went wrong at `step`, what was saved, how to go on (the flags as the CLI spells them)."""
        run = self.run_dir
        if isinstance(error, GroupsExhausted):
            right, wrong = error.outcome_counts()
            bigger = max(2 * self.cfg.max_gen_batches, self.cfg.max_gen_batches + 4)
            what = (
                f"step {step}: dynamic sampling kept {len(error.kept)} of the {self.cfg.prompt_batch} groups needed "
                f"after {error.batches} generation batches (--max-gen-batches {self.cfg.max_gen_batches}): in "
                f"{right + wrong} of the {len(error.seen)} groups drawn every response had the same outcome ({right} "
                f"all right, {wrong} all wrong), so the task is solved (or unsolvable) for this policy at this "
                "difficulty"
            )
            how = (
                f"to go on: `loraforge train --resume {run} --max-gen-batches {bigger}` (0 = no limit), or "
                f"`loraforge train --resume {run} --no-dynamic-sampling`, or harder/easier --data in a new run"
            )
            if saved is not None:
                how += f", or stop here: the adapter is at {run / 'adapter'}"
            return f"{what}. {what_saved[0].upper() + what_saved[1:]}. {how[0].upper() + how[1:]}"
        if isinstance(error, TrainingDiverged):
            what = f"{error}: training stopped"
            how = "Lower --lr, check the reward function for NaN, or use --dtype float32"
        else:
            what = f"step {step} failed: {error}"
            how = "Fix the cause"
        # --resume always has a way on: the newest checkpoint, or step 0 of a run that saved none
        how += f", then continue with `loraforge train --resume {run}`"
        return f"{what}. {what_saved[0].upper() + what_saved[1:]}. {how}."

    @contextmanager
    def _deferred_interrupt(self):
        """First Ctrl-C: finish the current step, save, exit (status 130). A second one aborts at once.
        SIGTERM (what schedulers send before SIGKILL): abandon the current step at once, roll back to the
        last complete one, save it, exit (status 143); with several processes, like Ctrl-C."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_int(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested, self._stop_signal = True, signal.SIGINT
            self.echo("\nCtrl-C: finishing this step, then saving a checkpoint (press again to abort without saving)")

        def on_term(signum, frame):
            self._stop_requested, self._stop_signal = True, signal.SIGTERM
            if self._abortable and not self.dist.enabled:
                self._abortable = False
                raise Terminated
            self.echo("\nSIGTERM: saving a checkpoint after this step")

        previous = signal.signal(signal.SIGINT, on_int), signal.signal(signal.SIGTERM, on_term)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])
