"""benchmarks/device_check.sh, the script a lent GPU runs, in its CPU mode (tiny shapes, the GPU path's code
forced): every step runs, and its figures come out as JSON and as a section for benchmarks/RESULTS.md. Slow (a few
minutes on 2 shared cores); what it measures is only meaningful on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_device_check_runs_every_step_in_cpu_mode(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), DEVICE_CHECK_DIR=str(tmp_path / "bench"))
    env["OMP_NUM_THREADS"] = "1"
    env["DEVICE_CHECK_LIMITS"] = "3600 3600 3600 600"  # a shared CPU can be very slow; these only catch hangs
    p = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "device_check.sh"), "--cpu"], env=env, capture_output=True, text=True
    )
    log = (out / "device_check.log").read_text() if (out / "device_check.log").exists() else p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    for step in ("init", "determinism", "train", "train-vllm"):
        assert f"=== {step}: rc 0" in log, log[-3000:]

    init = json.loads((out / "gpu_init.json").read_text())
    assert set(init["steps"]) == {"rlpo", "peft-pissa", "loraforge-pissa-small", "pissa"}  # the CPU mode's methods
    for method in ("rlpo", "pissa"):
        runs = init["steps"][method]["runs"]
        assert runs["cold"]["page_cache_resident_at_start"] < 0.5 <= runs["warm"]["page_cache_resident_at_start"]
        assert runs["cold"]["modules"] == runs["warm"]["modules"] == 28  # 4 blocks x 7
    assert init["results"]["like_with_like"]["x_faster"] > 0

    det = json.loads((out / "gpu_determinism.json").read_text())
    assert list(det["summary"]) == ["pissa"] and len(det["summary"]["pissa"]) == 4, det["summary"]
    assert all(all(plans.values()) for plans in det["summary"].values()), det["summary"]  # byte-identical
    assert det["verify_on_cpu"]["ok"], det["verify_on_cpu"]

    train = json.loads((out / "train_smoke.json").read_text())
    assert train["ok"] and train["steps_logged"] == 2
    vllm = json.loads((out / "train_vllm.json").read_text())
    assert "skipped" in vllm or vllm.get("ok")

    section = (out / "device_check.md").read_text()
    assert (
        section.startswith("### GPU: ")
        and "| rlpo |" in section
        and "| pissa |" in section
        and "byte-identical" in section
    )
