"""kill -9 (and SIGTERM) at points of `loraforge train` spread over its start-up and its steps: a killed run
loses no completed checkpoint, leaves only litter the next run cleans up, and `--resume` (again and again) ends
with the adapter an uninterrupted run writes, bit for bit.

The runs are children of tests/test_kill.py's fork server (torch imported once, so each run's time is its own
work: start-up is loading the model, not importing torch). The kill points are fractions of the uninterrupted
run's start-up and steps, so which points are hit varies with the machine's speed; what is asserted does not:
every invariant must hold whatever point a kill lands on.
"""

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_kill import Forks, env

from loraforge.rl import checkpoint as ckpt
from loraforge.rl import failsafe

# (phase, signal, fraction) per kill, then one --resume to the end; fewer if the run reaches its end first.
# start-up: FRACTION of the start-up and first step; loop: once training runs, FRACTION of the steps left
# (a save, a prune, a metrics line, a step). SIGTERM: 143 after saving once the loop runs; -15 (the
# default action) during start-up or the final adapter write, where nothing needs saving or the write is atomic.
KILLS = [
    ("start-up", signal.SIGKILL, 0.5),
    ("loop", signal.SIGKILL, 0.15),
    ("loop", signal.SIGKILL, 0.6),
    ("start-up", signal.SIGKILL, 0.95),
    ("loop", signal.SIGTERM, 0.35),
    ("start-up", signal.SIGTERM, 0.3),
]
STEPS = 12


def _env():
    return env(Path(__file__).parent)  # the same arithmetic (one thread) in every run; rl_helpers importable


def _args(model_dir, adapter_dir, run):
    return [
        *("train", "--model", str(model_dir), "--adapter", str(adapter_dir), "-o", str(run)),
        *("--data", "synthetic:n=60,max=2,style=bare", "--reward", "rl_helpers:answer_scorer"),
        *("--max-response-length", "1", "--overlong-buffer", "0", "--group-size", "8", "--prompt-batch", "4"),
        *("--mini-batch", "2", "--lr", "1e-2", "--max-gen-batches", "0", "--no-tensorboard"),
        *("--steps", str(STEPS), "--save-every", "1", "--keep-checkpoints", "2"),
    ]


def _newest_sound(run: Path) -> int:
    """The step of the newest checkpoint that reads back whole (0: none)."""
    for path in reversed(ckpt.list_checkpoints(run)):
        if ckpt.check_checkpoint(path) is None:
            return int(path.name.split("_")[1])
    return 0


def _check_invariants(run: Path, newest_before: int) -> int:
    """What must hold after any kill; returns the newest sound checkpoint's step."""
    newest = _newest_sound(run)
    assert newest >= newest_before, f"a completed checkpoint was lost: step {newest_before} -> {newest}"
    complete = ckpt.list_checkpoints(run)
    # every checkpoint that looks complete (has state.json) is whole: no half-written or half-deleted one
    assert all(ckpt.check_checkpoint(p) is None for p in complete), [ckpt.check_checkpoint(p) for p in complete]
    if (run / "config.json").exists():
        json.loads((run / "config.json").read_text())  # never torn
    if (run / "adapter").exists():
        load_file(str(run / "adapter" / "adapter_model.safetensors"))  # the old adapter or the new, whole
    for log in ("metrics.jsonl", "samples.jsonl"):  # appended logs: at most the last line torn
        if (run / log).exists():
            lines = [ln for ln in (run / log).read_text().splitlines() if ln.strip()]
            for ln in lines[:-1]:
                json.loads(ln)
    # anything else there is litter the next run recognises
    known = {"config.json", "metrics.jsonl", "samples.jsonl", "adapter", "checkpoints", failsafe.LOCK_FILE}
    litter = [p.name for p in run.iterdir() if p.name not in known] if run.exists() else []
    assert all(n.startswith((ckpt.TMP, ckpt.OLD, ckpt.DEL)) for n in litter), litter
    return newest


def _wait_for(log: Path, text: str, child) -> float:
    """Wait until `text` appears in the log (or the process ends); returns the time it appeared."""
    deadline = time.monotonic() + 600
    while text not in log.read_text() and not child.exited() and time.monotonic() < deadline:
        time.sleep(0.01)
    return time.monotonic()


@pytest.fixture(scope="module")
def forks():
    forks = Forks(_env(), preload=("rl_helpers",))
    yield forks
    forks.close()


def test_kill_9_and_sigterm_then_resume_equals_the_uninterrupted_run(model_dir, adapter_dir, forks, tmp_path):
    # the uninterrupted run, timed: its start-up (model load) and its steps
    straight = forks.start(_args(model_dir, adapter_dir, tmp_path / "straight"), tmp_path / "straight.log")
    t_loop = _wait_for(tmp_path / "straight.log", "training dapo", straight)
    assert straight.wait() == 0, (tmp_path / "straight.log").read_text()
    startup, per_step = t_loop - straight.started, (time.monotonic() - t_loop) / STEPS

    run = tmp_path / "run"
    newest, outcomes = 0, []
    for i, (phase, sig, fraction) in enumerate(KILLS):
        argv = ["train", "--resume", str(run)] if (run / "config.json").exists() else _args(model_dir, adapter_dir, run)
        log = tmp_path / f"kill{i}.log"
        proc = forks.start(argv, log)
        if phase == "start-up":
            time.sleep(fraction * (startup + per_step))
        else:
            _wait_for(log, "training dapo", proc)
            time.sleep(fraction * per_step * (STEPS - newest))
        proc.send_signal(sig)
        rc = proc.wait()
        outcomes.append((signal.Signals(sig).name, rc, _newest_sound(run)))
        assert rc in (0, -sig) + ((143,) if sig == signal.SIGTERM else ()), log.read_text()
        if rc == 143:
            assert "SIGTERM" in log.read_text() and "Traceback" not in log.read_text()
        newest = _check_invariants(run, newest)
        if newest == STEPS:
            break  # the run got to its end before the kill: nothing left to interrupt

    code = forks.run(["train", "--resume", str(run)], tmp_path / "final.log")[0]
    assert code == 0, (tmp_path / "final.log").read_text()
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), outcomes
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    # samples.jsonl: the rows of redone steps dropped on resume, so every step's rows once, in order
    sample_steps = [json.loads(ln)["step"] for ln in (run / "samples.jsonl").read_text().splitlines()]
    assert sample_steps == sorted(sample_steps) and set(sample_steps) == set(range(1, STEPS + 1))
    assert sorted(p.name for p in run.iterdir() if p.name != failsafe.LOCK_FILE) == [
        "adapter",
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "samples.jsonl",
    ]
    print(
        f"start-up {startup:.1f} s, {per_step:.2f} s/step; (signal, exit status, newest sound checkpoint): {outcomes}"
    )
