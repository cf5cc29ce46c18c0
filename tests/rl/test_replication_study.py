"""examples/replication/replicate.py, the study script: its grid order, and on a tiny model that it
trains through the real CLI, skips a finished run, and continues a run when --steps is raised."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("replicate", ROOT / "examples" / "replication" / "replicate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["replicate"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_grid_runs_seed_0_of_every_lr_first():
    rep = _script()
    runs = rep.plan_runs(["rlpo", "pissa"], rep.parse_grid(["1e-5:0,1", "1e-4:0"]))
    # seed 0 at both lrs before any second seed: a grid cut short still compares every method
    assert [r.name for r in runs] == [
        "rlpo_lr1e-05_s0",
        "pissa_lr1e-05_s0",
        "rlpo_lr0.0001_s0",
        "pissa_lr0.0001_s0",
        "rlpo_lr1e-05_s1",
        "pissa_lr1e-05_s1",
    ]
    with pytest.raises(SystemExit, match="LR:SEED"):
        rep.parse_grid(["fast:0"])


def test_study_runs_the_cli_skips_done_runs_and_continues_raised_steps(model_dir, tmp_path, monkeypatch, capsys):
    rep = _script()
    # the trainings are subprocesses: they find loraforge and the test reward through PYTHONPATH
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), here, os.environ.get("PYTHONPATH", "")]))
    work, out = tmp_path / "work", tmp_path / "out"
    argv = [
        "--work", str(work), "--out", str(out), "--model", str(model_dir), "--methods", "rlpo",
        "--grid", "1e-2:0", "--data", "synthetic:n=40,max=2,style=bare", "--reward", "rl_helpers:answer_scorer",
        "--prompt-template", "none", "--max-response-length", "1", "--overlong-buffer", "0", "--group-size", "4",
        "--prompt-batch", "2", "--mini-batch", "1", "--micro-batch", "8", "--window", "1", "--poll", "0.2",
        "--inspect-layers", "0", "--rank", "2", "--alpha", "4", "--train-args=--no-chat-template",
    ]  # fmt: skip
    rep.main(argv + ["--steps", "1"])
    run = work / "runs" / "rlpo_lr0.01_s0"
    first = capsys.readouterr().out
    assert "loraforge init" in first and "loraforge train --algo dapo" in first and "loraforge inspect" in first
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == {"rlpo_lr0.01_s0": "done"}
    row = summary["runs"]["rlpo_lr0.01_s0"]
    metrics = json.loads((run / "metrics.jsonl").read_text())
    assert row["kl_step1"] == metrics["kl"] and row["grad_mean"] == metrics["grad_norm"]
    assert row["sim_top"] > 0.99  # RLPO's A starts in the principal subspace and moved little in one step
    assert "| 0.01 | LoRA-RLPO | 1 |" in (out / "table.md").read_text()
    assert (out / "runs" / "rlpo_lr0.01_s0" / "samples.jsonl").is_file()
    # a finished run is skipped: nothing is trained again
    before = (run / "metrics.jsonl").stat().st_mtime_ns
    rep.main(argv + ["--steps", "1"])
    assert "skip rlpo_lr0.01_s0: done" in capsys.readouterr().out
    assert (run / "metrics.jsonl").stat().st_mtime_ns == before
    # more steps: the run is continued from its checkpoint, not restarted
    rep.main(argv + ["--steps", "2", "--no-inspect"])
    assert "train --resume" in capsys.readouterr().out
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
