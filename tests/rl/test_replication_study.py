"""examples/replication/replicate.py, the study script: its grid order, and on a tiny model that it
trains through the real CLI, skips a finished run, and continues a run when --steps is raised (its commands are
real processes: the first the console script, the rest forked from a server that imported loraforge once)."""

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("replicate", ROOT / "examples" / "replication" / "replicate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["replicate"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_grid_runs_entry_by_entry_and_seed_by_seed():
    rep = _script()
    runs = rep.plan_runs(rep.parse_grid(["1e-4:0,1", "5e-4:0:pissa"], ["rlpo", "pissa"]))
    # the first entry whole, seed by seed with every method of a seed together; then the stress entry's methods
    assert [r.name for r in runs] == [
        "rlpo_lr0.0001_s0",
        "pissa_lr0.0001_s0",
        "rlpo_lr0.0001_s1",
        "pissa_lr0.0001_s1",
        "pissa_lr0.0005_s0",
    ]
    assert [r.grid for r in runs] == [0, 0, 0, 0, 1]
    with pytest.raises(SystemExit, match="LR:SEED"):
        rep.parse_grid(["fast:0"], ["rlpo"])
    with pytest.raises(SystemExit, match="unknown method"):
        rep.parse_grid(["1e-4:0:dora"], ["rlpo"])


def test_heldout_stats_of_a_grid_cut_short_use_the_finished_runs(tmp_path):
    """A grid stopped midway still gives its table: a run counts at the steps it was evaluated at, and a seed
    that has not reached a step does not hold its method out of it."""
    rep = _script()
    sys.path.insert(0, str(ROOT / "examples" / "replication"))
    import numpy as np
    from study_analysis import heldout_stats

    args = rep.parse_args(["--work", str(tmp_path), "--steps", "2", "--save-every", "2"])
    runs = rep.plan_runs(rep.parse_grid(["1e-4:0,1"], ["rlpo", "pissa"]))
    finished = {"rlpo_lr0.0001_s0", "pissa_lr0.0001_s0", "rlpo_lr0.0001_s1"}  # pissa's seed 1 was cut short
    # 4 problems; rlpo solves 3 of 4 at step 2 on both seeds, pissa 1 of 4
    solved = {"rlpo": np.array([1.0, 1, 1, 0]), "pissa": np.array([1.0, 0, 0, 0])}
    curves = {r.name: {0: {"greedy": np.zeros(4), "mean": np.zeros(4)}} for r in runs}
    for r in runs:
        if r.name in finished:  # pissa's seed 1 has only its init's evaluation
            curves[r.name][2] = {"greedy": solved[r.method], "mean": solved[r.method]}
    stats = heldout_stats(args, runs, curves)["0.0001"]["heldout"]["greedy"]
    assert stats[2]["methods"]["rlpo"]["seeds"] == 2 and stats[2]["methods"]["pissa"]["seeds"] == 1
    assert set(stats) == {0, 2}  # step 0 (the init) and the one evaluated step
    # rlpo - pissa = 0.75 - 0.25 = 0.5 on every resample that keeps both problems' signs apart
    assert stats[2]["contrasts"]["rlpo-pissa"]["diff"] == pytest.approx(0.5)


# --- a fork server for the study's commands ------------------------------------------------------
# The study test below runs nine `loraforge` commands (init, two evals, train, inspect, three plots, train
# --resume) whose work on the tiny model is a fraction of a second; started as the console script, each spends
# seconds importing torch, transformers and peft on a 2-core machine, most of the test. So the study's own
# subprocess calls (replicate.py's and study_analysis.py's, unchanged) are pointed at a small client that asks a
# server, which imported all of that once, to fork a child running `main(prog_name="loraforge")`: a real process
# with the client's argv, environment, working directory, stdin/stdout/stderr and exit status, run in parallel
# as the study schedules it. The first command (the init) still runs as the real console script: the entry
# point the study uses is covered too. (tests/test_kill.py's fork server is the same idea for one command at a
# time, killed by signals.)
_CLIENT = """
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
socket.send_fds(s, [b"."], [0, 1, 2])
s.sendall(json.dumps({"argv": sys.argv[2:], "env": dict(os.environ), "cwd": os.getcwd()}).encode())
s.shutdown(socket.SHUT_WR)
code = s.recv(16)
sys.exit(int(code) if code else 1)
"""


def _serve(path: str) -> None:
    """The server's loop (its own process): per connection, the client's three descriptors and its request
    (argv, env, cwd) until EOF; fork a child that runs the command and sends back its exit status."""
    import signal

    import test_kill

    main = test_kill.preload()  # what the commands import, once here
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the children are reaped by the kernel
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    while True:
        conn, _ = server.accept()
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        data = b""
        while chunk := conn.recv(1 << 16):
            data += chunk
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _child(main, json.loads(data), fds, conn)
        conn.close()
        for fd in fds:
            os.close(fd)


def _child(main, request: dict, fds: list[int], conn) -> None:
    import traceback

    import test_kill

    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        code = test_kill.run_command(main, request["argv"])
    except BaseException:  # noqa: BLE001 (setting up the child failed: say why, exit 1)
        traceback.print_exc()
    finally:
        try:
            conn.sendall(str(code).encode())
        finally:
            os._exit(code)


class _Launcher:
    """Stands in for the `subprocess` module in replicate.py and study_analysis.py: a `loraforge` command (CLI
    prefix) after the first goes through the fork server's client; anything else is started as given."""

    STDOUT = subprocess.STDOUT

    def __init__(self, prefix: list[str], client: list[str]):
        self.prefix, self.client, self.real, self.forked = prefix, client, [], []

    def _cmd(self, cmd: list[str]) -> list[str]:
        if cmd[: len(self.prefix)] != self.prefix:
            return cmd
        if not self.real:
            self.real.append(cmd)
            return cmd
        self.forked.append(cmd)
        return self.client + cmd[len(self.prefix) :]

    def call(self, cmd, **kwargs):
        return subprocess.call(self._cmd(cmd), **kwargs)

    def Popen(self, cmd, **kwargs):  # noqa: N802 (subprocess's name)
        return subprocess.Popen(self._cmd(cmd), **kwargs)


@contextlib.contextmanager
def _forked(rep, monkeypatch):
    """The study's modules launch through _Launcher while inside; the server gets this process's environment
    (each child then takes its client's)."""
    path = str(Path(tempfile.mkdtemp(prefix="lf-forks-")) / "sock")  # short: a socket's path has ~100 bytes at most
    # one thread, as replicate.py's thread_env gives every command under its default --threads 1: torch reads
    # it at import, which is the server's
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys, test_replication_study as t; t._serve(sys.argv[1])", path], env=env
    )
    try:
        while not os.path.exists(path):  # bound once its imports are done
            assert server.poll() is None, f"the fork server exited ({server.returncode})"
            time.sleep(0.05)
        launcher = _Launcher(rep.cli(), [sys.executable, "-c", _CLIENT, path])
        monkeypatch.setattr(rep, "subprocess", launcher)
        monkeypatch.setattr(sys.modules["study_analysis"], "subprocess", launcher)
        yield launcher
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(Path(path).parent, ignore_errors=True)


def test_study_runs_the_cli_skips_done_runs_and_continues_raised_steps(model_dir, tmp_path, monkeypatch, capsys):
    rep = _script()
    # the trainings are subprocesses: they find loraforge and the test reward through PYTHONPATH
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), here, os.environ.get("PYTHONPATH", "")]))
    with _forked(rep, monkeypatch) as launcher:
        work, out = tmp_path / "work", tmp_path / "out"
        argv = [
            "--work", str(work), "--out", str(out), "--model", str(model_dir), "--methods", "rlpo",
            "--grid", "1e-2:0", "--data", "synthetic:n=40,max=2,style=bare", "--reward", "rl_helpers:answer_scorer",
            "--prompt-template", "none", "--max-response-length", "1", "--overlong-buffer", "0", "--group-size", "4",
            "--prompt-batch", "2", "--mini-batch", "1", "--micro-batch", "8", "--window", "1", "--poll", "0.2",
            "--inspect-layers", "0", "--rank", "2", "--alpha", "4", "--train-args=--no-chat-template",
            "--heldout", "synthetic:n=5,max=9,style=bare,split=heldout", "--eval-args=--no-chat-template",
            "--eval-samples", "2", "--save-every", "1",
        ]  # fmt: skip
        rep.main(argv + ["--steps", "1"])
        run = work / "runs" / "rlpo_lr0.01_s0"
        first = capsys.readouterr().out
        assert "loraforge init" in first and "loraforge train --algo dapo" in first and "loraforge inspect" in first
        assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == {"rlpo_lr0.01_s0": "done"}
        # held-out evaluation of the init (step 0) and of the step-1 checkpoint, on its own base, copied beside the run
        for step in (0, 1):
            report = json.loads((out / "runs" / "rlpo_lr0.01_s0" / "heldout" / f"step_{step:06d}.json").read_text())
            bench = report["benchmarks"]["synthetic:n=5,max=9,style=bare,split=heldout"]
            assert bench["problems"] == 5 and {m["metric"] for m in bench["metrics"]} >= {"greedy", "mean@2"}
        stats = json.loads((out / "stats.json").read_text())
        assert set(stats["heldout"]["0.01"]["heldout"]["mean"]) == {"0", "1"}
        # the collapse criterion on both held-out measures, and the rollout check, each with a verdict for the run
        assert {k: list(v) for k, v in stats["collapse"].items()} == {
            "mean": ["rlpo_lr0.01_s0"],
            "greedy": ["rlpo_lr0.01_s0"],
            "rollout_dead_from": ["rlpo_lr0.01_s0"],
        }
        assert "Runs meeting it on greedy accuracy: " in (out / "table.md").read_text()
        assert "Held-out mean@2" in (out / "table.md").read_text() and (out / "fig_heldout_lr0.01.png").is_file()
        row = summary["runs"]["rlpo_lr0.01_s0"]
        metrics = json.loads((run / "metrics.jsonl").read_text())
        assert row["kl_step1"] == metrics["kl"] and row["grad_mean"] == metrics["grad_norm"]
        assert row["sim_top"] > 0.99  # RLPO's A starts in the principal subspace and moved little in one step
        assert "| 0.01 | LoRA-RLPO | 1 |" in (out / "table.md").read_text()
        assert (out / "runs" / "rlpo_lr0.01_s0" / "samples.jsonl").is_file()
        # a finished run is skipped: nothing is trained again
        before = (run / "metrics.jsonl").stat().st_mtime_ns
        rep.main(argv + ["--steps", "1", "--no-eval"])
        assert "skip rlpo_lr0.01_s0: done" in capsys.readouterr().out
        assert (run / "metrics.jsonl").stat().st_mtime_ns == before
        # more steps: the run is continued from its checkpoint, not restarted
        rep.main(argv + ["--steps", "2", "--no-inspect", "--no-eval"])
        assert "train --resume" in capsys.readouterr().out
        assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        # one real console-script start (the init), every other command forked from the server
        cmds = [c[len(launcher.prefix)] for c in launcher.real + launcher.forked]
        assert cmds[0] == "init" and sorted(cmds[1:]) == [
            "eval",
            "eval",
            "inspect",
            "plot",
            "plot",
            "plot",
            "train",
            "train",
        ]


def _stats():
    sys.path.insert(0, str(ROOT / "examples" / "replication"))
    import study_stats

    return study_stats


def test_collapse_criterion_is_a_drop_of_ten_points_below_an_earlier_peak():
    st = _stats()
    # peak 0.50 at step 10; 0.45 at step 20 is within 10 points; 0.39 at step 30 is 11 points below it
    assert st.collapse({0: 0.20, 10: 0.50, 20: 0.45, 30: 0.39}) == {
        "step": 30,
        "value": 0.39,
        "peak_step": 10,
        "peak": 0.5,
    }
    assert st.collapse({0: 0.20, 10: 0.50, 20: 0.41, 30: 0.60}) is None  # 0.41 > 0.50 - 0.10
    assert st.collapse({0: 0.30, 10: 0.10}) == {"step": 10, "value": 0.10, "peak_step": 0, "peak": 0.30}


def test_rollout_accuracy_dead_from_a_step_to_the_end():
    st = _stats()
    # steps 1-2 learn, 3-6 are all wrong: dead from step 3 (4 steps >= 3)
    assert st.dead_from([0.07, 0.12, 0.0, 0.0, 0.0, 0.0]) == 3
    assert st.dead_from([0.0, 0.0, 0.0]) == 1
    assert st.dead_from([0.1, 0.0, 0.0]) is None  # 2 steps: too short to call
    assert st.dead_from([0.0, 0.0, 0.0, 0.2]) is None  # it recovered: not dead at the end
    assert st.dead_from([]) is None


def test_t_interval_over_seeds():
    st = _stats()
    # mean 0.2, sd 0.1, t(0.975, 2 df) = 4.303: half-width 4.303 * 0.1 / sqrt(3) = 0.24843
    iv = st.t_interval([0.1, 0.2, 0.3])
    assert iv.mean == pytest.approx(0.2) and iv.low == pytest.approx(0.2 - 0.24843, abs=1e-5)
    assert iv.high == pytest.approx(0.2 + 0.24843, abs=1e-5)


def test_bootstrap_pairs_problems_across_methods():
    import numpy as np

    st = _stats()
    rng = np.random.default_rng(1)
    hard = rng.random(256) < 0.3  # problems every run gets right
    base = [hard.astype(float) for _ in range(3)]
    better = [np.where(np.arange(256) < 26, 1.0, b) for b in base]  # the same, plus problems 0-25 right
    runs = {"a": better, "b": base}
    boot = st.hier_bootstrap(runs, draws=2000, seed=0)
    d = st.difference("a", "b", runs, boot)
    # seeds agree, so all the spread is the problems': a - b is the share of resampled problems among 0-25
    # that b gets wrong (26 of 256 minus those in `hard`), never 0 -> significant
    expected = float(np.mean(better[0]) - np.mean(base[0]))
    assert d["diff"] == pytest.approx(expected) and d["significant"] and d["p_boot"] == 0.0
    assert d["low"] < expected < d["high"] and d["low"] > 0
    # identical methods: the paired difference is exactly 0 in every draw
    same = st.difference("b", "b", runs, boot)
    assert same["low"] == same["high"] == 0.0 and not same["significant"]
