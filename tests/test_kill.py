"""kill -9 (and SIGTERM) at points spread over `loraforge init`, repeated: afterwards OUT is absent, or the old
result intact, or the new one complete and verifying; the next run succeeds and leaves no litter.

Also home of `Forks`, the fork server these kill tests share (tests/test_faults.py, tests/rl/test_train_kill.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from loraforge import InitConfig, init_adapter
from loraforge.ship.verify import verify_adapter

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# --- the fork server -----------------------------------------------------------------------------
# A killed command is a process killed at some point of its work; what it must not do is leave a torn
# result. Starting each killed command as `python -m loraforge` costs an import of torch, transformers,
# peft (seconds, most of every run on a 2-core machine), and kills timed over the whole run then mostly
# land in the imports, before anything is written. So the kill tests start one Python per module that
# imports all of that once, and fork a child per command that runs `main(prog_name="loraforge")` as
# loraforge/__main__.py does: a real process with its own pid, files and signal handlers, killed by a real
# signal, whose time is all the command's own work. The init test below runs its last command (the one
# that must clean up after the kills) as a real `python -m loraforge`: the entry point is covered too.


LAZY_IMPORTS = (
    "peft",
    "transformers.generation.utils",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.gpt2.modeling_gpt2",
    "scipy.linalg",
    "scipy.sparse.linalg",
    "safetensors.torch",
    "matplotlib.pyplot",
)


def preload(extra=()):
    """Import everything a command may import, once, in a fork server (here and in
    tests/rl/test_replication_study.py): loraforge's modules, what they import inside functions (peft alone, with
    the transformers modules it pulls in, is most of a command's start-up) and EXTRA. Optional extras that are not
    installed (vllm, ...) fail to import; a child that needs one then fails as the real command would. Returns
    the command line's `main`."""
    import importlib
    import pkgutil

    import loraforge

    names = [m.name for m in pkgutil.walk_packages(loraforge.__path__, "loraforge.")]
    names = [n for n in names if not n.endswith("__main__")]  # that one runs the command line
    for name in [*names, *LAZY_IMPORTS, *extra]:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001
            pass
    from loraforge.cli import main

    return main


def run_command(main, argv: list[str]) -> int:
    """Run `loraforge ARGV` in this forked child as loraforge/__main__.py would, then what interpreter shutdown
    would run (the child leaves by os._exit, which skips it); its exit status."""
    import atexit

    code = 1
    try:
        sys.argv = ["loraforge", *argv]
        main(argv, prog_name="loraforge")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def serve() -> None:
    """The fork server's loop, in its own process (Forks starts it). Per request line (JSON: argv, log): fork a
    child that runs the command with stdout and stderr to LOG, print its pid; on the next line ("wait") reap
    it and print its exit status (negative: killed by that signal)."""
    import gc

    main = preload(sys.argv[1:])
    gc.freeze()  # the children's collector leaves the imported objects alone (their pages stay shared)

    while line := sys.stdin.readline():
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(main, request)
        print(pid, flush=True)
        # Reaped only when the test says: until then a child that has exited stays a zombie, so its pid is
        # not reused and the test's signal can never reach another process.
        sys.stdin.readline()
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


def _child(main, request) -> None:
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the server's request pipe
        code = run_command(main, request["argv"])
    except BaseException:  # noqa: BLE001 (setting up the child failed: say why, exit 1)
        traceback.print_exc()
    finally:
        os._exit(code)


def env(*paths: Path) -> dict[str, str]:
    """The environment of every process these tests start: this checkout first, one thread."""
    pythonpath = os.pathsep.join([str(ROOT), *map(str, paths), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


class Child:
    def __init__(self, forks: "Forks", pid: int, log: Path):
        self.forks, self.pid, self.log, self.started = forks, pid, log, time.monotonic()
        self.returncode: int | None = None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # else reaped: the pid may be another process's now
            os.kill(self.pid, sig)

    def wait(self) -> int:
        if self.returncode is None:
            self.forks.server.stdin.write("wait\n")
            self.forks.server.stdin.flush()
            self.returncode = int(self.forks.server.stdout.readline())
        return self.returncode

    def exited(self) -> bool:
        """Whether the child has finished (it is then a zombie, still unreaped)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True


class Forks:
    """Starts commands as children of the fork server (see above), one at a time."""

    def __init__(self, environ: dict[str, str], preload: tuple[str, ...] = ()):
        self.child: Child | None = None
        self.server = subprocess.Popen(
            [sys.executable, "-c", "import test_kill; test_kill.serve()", *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(environ, PYTHONPATH=os.pathsep.join([str(TESTS), environ.get("PYTHONPATH", "")])),
            text=True,
        )

    def start(self, argv: list, log: Path) -> Child:
        log.write_text("")  # there from the start, for whoever reads it
        self.server.stdin.write(json.dumps({"argv": [str(a) for a in argv], "log": str(log)}) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        assert line, f"the fork server died (exit {self.server.wait()})"
        self.child = Child(self, int(line), log)
        return self.child

    def run(self, argv: list, log: Path) -> tuple[int, float]:
        """Run a command to its end: its exit status and how long it took."""
        child = self.start(argv, log)
        return child.wait(), time.monotonic() - child.started

    def close(self) -> None:
        if self.child is not None and self.child.returncode is None:  # a test that failed midway: stop its child
            self.child.send_signal(signal.SIGKILL)
            self.child.wait()
        self.server.stdin.close()
        self.server.wait(timeout=60)


def spread(n: int, lo: float = 0.35, hi: float = 1.05) -> list[float]:
    """N kill points evenly over [LO, HI] of a run's length: the work, its writes, the claim, and (past 1) the
    end, whatever the machine's speed does to a random draw."""
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def kill_when(child: Child, ready, sig: int = signal.SIGKILL, poll: float = 0.002) -> None:
    """Signal CHILD as soon as READY() holds (checked every POLL s) or it has exited."""
    while not ready() and not child.exited():
        time.sleep(poll)
    child.send_signal(sig)


# --- init ----------------------------------------------------------------------------------------


def tree_digest(path: Path) -> str:
    """One sha256 over every file name and content under PATH."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def init_argv(model: Path, out: Path) -> list[str]:
    # pissa on the sharded qwen2: residual base shards, index, tokenizer... the most files to be half-written.
    return ["init", str(model), "--method", "pissa", "-r", "4", "-o", str(out), "--overwrite"]


def litter(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


KILLS = 12


def test_kill_9_and_sigterm_at_points_spread_over_init_lose_nothing(tiny_models, tmp_path):
    model = tiny_models["qwen2"]
    out = tmp_path / "out"
    # the old result: a different init (rlpo), so old and new differ in content; built once, copied per kill
    old_tree = init_adapter(str(model), tmp_path / "old", InitConfig(method="rlpo", r=2)).out
    outcomes = {"old intact": 0, "new complete": 0, "absent": 0, "litter left": 0}
    old_kept = 0  # "old intact" where there was an OUT: a kill before the claim that had something to lose
    forks = Forks(env())

    def killed(i: int, start: str, kill) -> None:
        """One init over START ("old", "absent" or "left": what the previous kill left), signalled by
        KILL(child, inode of OUT before); checks and counts what it left."""
        nonlocal old_kept
        if start != "left":
            shutil.rmtree(out, ignore_errors=True)
        if start == "old":
            shutil.copytree(old_tree, out)
        old = tree_digest(out) if out.exists() else None
        inode = os.stat(out).st_ino if out.exists() else None
        child = forks.start(init_argv(model, out), tmp_path / f"kill{i}.log")
        kill(child, inode)
        child.wait()
        outcomes["litter left"] += bool(litter(out))  # removed by the next run (checked at the end)
        if not out.exists():
            assert old is None, f"run {i}: the old OUT was lost"
            outcomes["absent"] += 1
        elif tree_digest(out) == old:
            outcomes["old intact"] += 1
            old_kept += 1
        else:
            manifest = json.loads((out / "loraforge.json").read_text())
            assert manifest["method"] == "pissa", f"run {i}: OUT is neither old nor new"
            report = verify_adapter(out)
            assert report.ok, f"run {i}: the new OUT does not verify: {[c.failures for c in report.checks]}"
            outcomes["new complete"] += 1

    def after(seconds: float, sig: int):
        return lambda child, inode: (time.sleep(seconds), child.send_signal(sig))

    def staging(child, inode) -> None:  # the staging directory is being written, OUT still the old one
        kill_when(child, lambda: any(".partial-" in name for name in litter(out)))

    def claimed(child, inode) -> None:  # a new directory at OUT: the claim is done
        def swapped() -> bool:
            try:
                return os.stat(out).st_ino != inode
            except FileNotFoundError:
                return False

        kill_when(child, swapped)

    try:
        code, full = forks.run(init_argv(model, out), tmp_path / "calibrate.log")  # how long a whole run takes
        assert code == 0, (tmp_path / "calibrate.log").read_text()
        for i, at in enumerate(spread(KILLS)):
            sig = signal.SIGTERM if i % 4 == 3 else signal.SIGKILL
            killed(i, ("old", "absent", "left")[i % 3], after(at * full, sig))
        # The points above are fractions of the calibrated length: a machine that slows down or speeds up
        # afterwards can move them all to one side of the claim. Then kills placed by the run's own progress
        # make sure both sides were hit: after the claim always lands there; during staging, unless the run
        # finishes between one look and the signal (then it is tried again).
        for i in range(KILLS, KILLS + 3):
            if old_kept and outcomes["litter left"]:
                break
            killed(i, "old", staging)
        if not outcomes["new complete"]:
            killed(KILLS + 3, "old", claimed)
    finally:
        forks.close()
    print("kill outcomes:", outcomes)  # README "Reliability" quotes these counts
    assert old_kept and outcomes["new complete"] and outcomes["litter left"], outcomes

    # Whatever the kills left, the next run (a real `python -m loraforge`) cleans it up and succeeds.
    r = subprocess.run(
        [sys.executable, "-m", "loraforge", *init_argv(model, out)], env=env(), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert litter(out) == [], litter(out)
    assert verify_adapter(out).ok
