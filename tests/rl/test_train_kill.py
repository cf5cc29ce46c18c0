"""kill -9 (and SIGTERM) at random points of `python -m loraforge train`: a killed run loses no completed
checkpoint, leaves only litter the next run cleans up, and `--resume` (again and again) ends with the adapter
an uninterrupted run writes, bit for bit.

The kill times are random (seeded), so which points are hit varies with the machine's speed; what is
asserted does not: every invariant must hold whatever point a kill lands on.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.rl import checkpoint as ckpt
from loraforge.rl import failsafe

pytestmark = pytest.mark.slow

KILLS = 10  # signals per test run (fewer if the run reaches its end first), then one --resume to the end
TERMS = 3  # the last TERMS of them are SIGTERM, the others SIGKILL
STEPS = 20
ROOT = Path(__file__).parents[2]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the same arithmetic in every run
    return env


def _args(model_dir, adapter_dir, run):
    return [
        *("train", "--model", str(model_dir), "--adapter", str(adapter_dir), "-o", str(run)),
        *("--data", "synthetic:n=60,max=2,style=bare", "--reward", "rl_helpers:answer_scorer"),
        *("--max-response-length", "1", "--overlong-buffer", "0", "--group-size", "8", "--prompt-batch", "4"),
        *("--mini-batch", "2", "--lr", "1e-2", "--max-gen-batches", "0", "--no-tensorboard"),
        *("--steps", str(STEPS), "--save-every", "1", "--keep-checkpoints", "2"),
    ]


def _start(argv, log: Path):
    out = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "loraforge", *argv], stdout=out, stderr=subprocess.STDOUT, env=_env()
    )


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


def _wait_for(log: Path, text: str, proc) -> float:
    """Wait until `text` appears in the log (or the process ends); returns the time it appeared."""
    deadline = time.monotonic() + 600
    while text not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return time.monotonic()


def test_kill_9_at_random_points_then_resume_equals_the_uninterrupted_run(model_dir, adapter_dir, tmp_path):
    # the uninterrupted run, timed: its start-up (imports, model load) and its steps
    t0 = time.monotonic()
    straight = _start(_args(model_dir, adapter_dir, tmp_path / "straight"), tmp_path / "straight.log")
    t_loop = _wait_for(tmp_path / "straight.log", "training dapo", straight)
    assert straight.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()
    startup, per_step = t_loop - t0, (time.monotonic() - t_loop) / STEPS

    rng = random.Random(1234)
    run = tmp_path / "run"
    newest, outcomes = 0, []
    for i in range(KILLS):
        argv = ["train", "--resume", str(run)] if (run / "config.json").exists() else _args(model_dir, adapter_dir, run)
        log = tmp_path / f"kill{i}.log"
        proc = _start(argv, log)
        if i % 3 == 0:  # during start-up or the first steps
            time.sleep(rng.uniform(0, startup + per_step))
        else:  # inside the training loop, somewhere in the steps left (a save, a prune, a metrics line, a step)
            _wait_for(log, "training dapo", proc)
            time.sleep(rng.uniform(0, per_step * (STEPS - newest)))
        # SIGKILL, and for the last few a SIGTERM: 143 after saving once the loop runs; -15 (the default
        # action) during start-up or the final adapter write, where nothing needs saving or the write is atomic
        sig = signal.SIGKILL if i < KILLS - TERMS else signal.SIGTERM
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
        outcomes.append((signal.Signals(sig).name, rc, _newest_sound(run)))
        assert rc in (0, -sig) + ((143,) if sig == signal.SIGTERM else ()), log.read_text()
        if rc == 143:
            assert "SIGTERM" in log.read_text() and "Traceback" not in log.read_text()
        newest = _check_invariants(run, newest)
        if newest == STEPS:
            break  # the run got to its end before the kill: nothing left to interrupt

    final = subprocess.run(
        [sys.executable, "-m", "loraforge", "train", "--resume", str(run)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert final.returncode == 0, final.stdout + final.stderr
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
