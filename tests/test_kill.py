"""kill -9 (and SIGTERM) at random points of `loraforge init`, repeated: afterwards OUT is absent, or the old
result intact, or the new one complete and verifying; the next run succeeds and leaves no litter."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraforge import InitConfig, init_adapter
from loraforge.ship.verify import verify_adapter

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(path: Path) -> str:
    """One sha256 over every file name and content under PATH."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def init_cmd(model: Path, out: Path) -> list[str]:
    # pissa on the sharded qwen2: residual base shards, index, tokenizer... the most files to be half-written.
    return [sys.executable, "-m", "loraforge", "init", str(model), "--method", "pissa", "-r", "4", "-o", str(out)]


def litter(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def kill_runs(model: Path, tmp_path: Path, runs: int, seed: int) -> dict[str, int]:
    """RUNS inits to one OUT, each killed after a random delay; returns what each left."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    started = time.monotonic()
    subprocess.run(init_cmd(model, out), env=env, check=True, capture_output=True)  # how long a whole run takes
    full = time.monotonic() - started
    new_method = "pissa"
    rng = random.Random(seed)
    outcomes = {"old intact": 0, "new complete": 0, "absent": 0}
    for i in range(runs):
        # The old result: a different init (rlpo), so old and new are told apart by content.
        if i % 2 == 0:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            init_adapter(str(model), out, InitConfig(method="rlpo", r=2))
        old = tree_digest(out) if out.exists() else None
        proc = subprocess.Popen(
            [*init_cmd(model, out), "--overwrite"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        # Uniform over the part of the run past start-up, a little beyond its end.
        time.sleep(rng.uniform(0.3 * full, 1.05 * full))
        proc.send_signal(signal.SIGKILL if i % 3 else signal.SIGTERM)
        proc.wait()
        proc.stderr.close()
        if not out.exists():
            assert old is None, f"run {i}: the old OUT was lost"
            outcomes["absent"] += 1
        elif tree_digest(out) == old:
            outcomes["old intact"] += 1
        else:
            manifest = json.loads((out / "loraforge.json").read_text())
            assert manifest["method"] == new_method, f"run {i}: OUT is neither old nor new"
            report = verify_adapter(out)
            assert report.ok, f"run {i}: the new OUT does not verify: {[c.failures for c in report.checks]}"
            outcomes["new complete"] += 1
    # Whatever the kills left, the next run cleans it up and succeeds.
    r = subprocess.run([*init_cmd(model, out), "--overwrite"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert litter(out) == [], litter(out)
    assert verify_adapter(out).ok
    return outcomes


def test_kill_9_at_random_points_of_init_loses_nothing(tiny_models, tmp_path):
    outcomes = kill_runs(tiny_models["qwen2"], tmp_path, runs=6, seed=0)
    assert sum(outcomes.values()) == 6


@pytest.mark.slow
def test_kill_9_many_times(tiny_models, tmp_path):
    outcomes = kill_runs(tiny_models["qwen2"], tmp_path, runs=40, seed=1)
    print("kill outcomes:", outcomes)  # README "Reliability" quotes these counts
    assert sum(outcomes.values()) == 40
    assert outcomes["old intact"] and outcomes["new complete"]  # the kills did land before and after the claim
