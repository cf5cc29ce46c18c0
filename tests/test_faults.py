"""A flaky disk under every command that writes: eval (report + samples), inspect (--json, --plots), plot,
convert, and push (which writes nothing locally). Each is run once to leave an "old" result, then again
for a different "new" one while the disk fails: an OS error at the first write or at the final rename
(the OS-error shim), a real full tmpfs and a real read-only tmpfs (these skip where `mount` is not
permitted), and kill -9 at points spread over the run (tests/test_kill.py's method and fork server). Always: one line
naming the error and the path, exit 1, the old result byte-for-byte, no staging file left behind (or one
the next run removes).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from adapter_helpers import fake_train, one_torch_thread  # noqa: F401 (autouse fixture)
from click.testing import CliRunner
from test_kill import Forks, env, kill_when, spread

from loraforge import InitConfig, init_adapter
from loraforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
PNG_END = b"IEND\xaeB`\x82"


@pytest.fixture(scope="module")
def things(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    fx = {"M": tiny_models["llama"]}
    fx["P"] = init_adapter(str(fx["M"]), root / "P", InitConfig(method="pissa", r=2)).out
    fx["R"] = init_adapter(str(fx["M"]), root / "R", InitConfig(method="rlpo", r=2)).out
    fx["T1"] = fake_train(fx["P"], fx["P"] / "base", root / "T1", seed=1)
    fx["T2"] = fake_train(fx["P"], fx["P"] / "base", root / "T2", seed=2)
    for i, rewards in ((1, (0.1, 0.4)), (2, (0.3, 0.2))):
        run = root / f"RUN{i}"
        run.mkdir()
        rows = [{"step": s + 1, "reward": r, "grad_norm": 1.0 + s, "kl": 0.01 * (s + 1)} for s, r in enumerate(rewards)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        fx[f"RUN{i}"] = run
    fx["B"] = root / "bench.jsonl"
    fx["B"].write_text("".join(json.dumps({"problem": f"t{i} t{i + 1}", "answer": str(i)}) + "\n" for i in range(3)))
    fx["old"] = root / "old"  # each command's old result, made once (make_old) and copied where a test needs it
    return fx


def eval_args(fx, out: Path, new: bool) -> list[str]:
    return [
        "eval", "--model", fx["M"], "--bench", fx["B"], "--limit", 2 if new else 1, "--samples", 1,
        "--temperature", 0, "--max-new-tokens", 2, "--prompt-template", "raw", "--no-chat-template",
        "--bootstrap", 0, "--device", "cpu", "--dtype", "float32", "-o", out / "report.json",
    ]  # fmt: skip


# command -> (argv for the old or the new result, written into OUT; the paths it writes, relative to OUT)
COMMANDS = {
    "eval": (eval_args, ["report.json", "report.samples.jsonl"]),
    "inspect --json": (
        lambda fx, out, new: ["inspect", fx["R"] if new else fx["P"], "--json", out / "n.json", "--device", "cpu"],
        ["n.json"],
    ),
    "inspect --plots": (
        lambda fx, out, new: ["inspect", fx["R"] if new else fx["P"], "--plots", out / "figs", "--device", "cpu"],
        ["figs/spectrum.png", "figs/similarity.png"],
    ),
    "plot": (lambda fx, out, new: ["plot", fx["RUN2" if new else "RUN1"], "-o", out / "curves.png"], ["curves.png"]),
    "convert": (
        lambda fx, out, new: ["convert", fx["T2" if new else "T1"], "--init", fx["P"], "-o", out / "c", "--overwrite"],
        ["c/adapter_model.safetensors", "c/adapter_config.json", "c/loraforge.json", "c/README.md"],
    ),
}


def cli(args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.output


def digest(out: Path, files: list[str]) -> dict[str, str]:
    return {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in files}


def litter(out: Path) -> list[str]:
    """Staging files and directories anywhere under OUT (the next run to the same output removes them)."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if ".partial-" in p.name)


def make_old(fx, command: str, out: Path) -> dict[str, str]:
    """Put COMMAND's old result at OUT; its digest. Run once per command, then copied: the same bytes, and
    the tests here are about the run that follows."""
    args, files = COMMANDS[command]
    made = fx["old"] / command.replace(" ", "_")
    if not made.exists():
        code, output = cli(args(fx, made, new=False))
        assert code == 0, output
    shutil.copytree(made, out)
    return digest(out, files)


def one_error_line(code: int, output: str) -> str:
    lines = [x for x in output.strip().splitlines() if x.startswith("Error: ")]
    assert code == 1 and len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


# --- the OS-error shim: the kernel fails the first write, or the final rename -----------------------


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("where", ["first write", "final rename"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO])
def test_an_os_error_is_one_line_and_keeps_the_old_result(things, tmp_path, monkeypatch, command, where, code):
    from loraforge.adapters import writers
    from loraforge.core import atomic

    out = tmp_path / "out"
    old = make_old(things, command, out)

    def failing(*a, **k):
        raise OSError(code, os.strerror(code))

    if command == "convert":  # a directory output: adapters/writers.staged_dir, as init
        monkeypatch.setattr(
            writers, "write_adapter_weights" if where == "first write" else "_normalise_permissions", failing
        )
    else:
        monkeypatch.setattr(atomic, "staging_file" if where == "first write" else "_replace", failing)
    args, files = COMMANDS[command]
    line = one_error_line(*cli(args(things, out, new=True)))
    assert errno.errorcode[code] in line and str(out) in line, line
    assert digest(out, files) == old
    assert litter(out) == []


# --- real disks: a full tmpfs, a read-only tmpfs ------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if shutil.which("mount") is None or r.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root); the OS-error shim tests cover this path")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)  # lazy: even with a file left open


def fill(disk: Path) -> None:
    """Use up every free byte of DISK."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_real_full_disk_is_one_line_and_keeps_the_old_result(things, tmpfs, command):
    out = tmpfs("full", "4m") / "out"
    old = make_old(things, command, out)
    fill(out.parent)
    args, files = COMMANDS[command]
    line = one_error_line(*cli(args(things, out, new=True)))
    assert "ENOSPC" in line and str(out) in line, line
    assert digest(out, files) == old and litter(out) == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_real_read_only_disk_is_one_line_and_keeps_the_old_result(things, tmpfs, command):
    disk = tmpfs("ro", "4m")
    out = disk / "out"
    old = make_old(things, command, out)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    args, files = COMMANDS[command]
    line = one_error_line(*cli(args(things, out, new=True)))
    assert "EROFS" in line and "read-only" in line, line
    assert digest(out, files) == old


def test_push_reads_a_read_only_adapter_and_writes_nothing(things, tmpfs):
    # push writes nothing locally: a read-only OUT pushes as any other, and is left as it was
    disk = tmpfs("ro-push", "4m")
    shutil.copytree(things["R"], disk / "R")
    before = {p.name: p.read_bytes() for p in (disk / "R").iterdir()}
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    code, output = cli(["push", disk / "R", "me/x", "--base-model", "org/tiny-llama", "--dry-run"])
    assert code == 0 and "Would upload" in output, output
    assert {p.name: p.read_bytes() for p in (disk / "R").iterdir()} == before


# --- push sends what it planned ------------------------------------------------------------------


def test_push_refuses_an_adapter_that_changes_while_pushing(things, tmp_path):
    from test_push import recording_api

    from loraforge.core.errors import LoraforgeError
    from loraforge.ship.hub import PushConfig, plan_push, push

    out = tmp_path / "P"
    shutil.copytree(things["P"], out)
    config = PushConfig("me/x", base_model="org/tiny-llama")
    plan = plan_push(out, config)
    time.sleep(0.01)
    (out / "adapter_model.safetensors").write_bytes((out / "adapter_model.safetensors").read_bytes())  # rewritten
    api = recording_api()
    with pytest.raises(LoraforgeError, match=r"adapter_model.safetensors changed while pushing.*still writing"):
        push(plan, config, api=api)
    # the base repository went first; the adapter repository was not committed
    assert [c.kwargs["repo_id"] for c in api.create_commit.call_args_list] == ["me/x-residual-base"]


# --- kill -9 at points spread over the run -------------------------------------------------------


def complete(command: str, out: Path, files: list[str]) -> bool:
    """A whole result of COMMAND (not necessarily this run's): parsable, its parts agreeing."""
    if command == "eval":
        report = json.loads((out / "report.json").read_text())
        sha = hashlib.sha256((out / "report.samples.jsonl").read_bytes()).hexdigest()
        return report.get("samples_sha256") == sha and len(report["benchmarks"]) == 1
    if command.startswith("inspect --json"):
        return "modules" in json.loads((out / "n.json").read_text())
    if command in ("inspect --plots", "plot"):
        return all((out / f).read_bytes().endswith(PNG_END) for f in files)
    from loraforge.ship.convert import CONVERTED_FORMAT

    manifest = json.loads((out / "c" / "loraforge.json").read_text())
    sha = hashlib.sha256((out / "c" / "adapter_model.safetensors").read_bytes()).hexdigest()
    return manifest["format"] == CONVERTED_FORMAT and manifest["files"]["adapter_model.safetensors"] == sha


@pytest.fixture(scope="module")
def forks():
    forks = Forks(env())
    yield forks
    forks.close()


KILLS = 5  # per command, at points spread over its run; then the next run


@pytest.mark.parametrize("command", list(COMMANDS))
def test_kill_9_at_points_spread_over_the_run_loses_nothing(things, forks, tmp_path, command):
    """KILLS runs of COMMAND over an old result, each killed at its point; what each left is the old result or
    a new whole one; the next run cleans up."""
    args, files = COMMANDS[command]
    out = tmp_path / "out"
    argv = [str(a) for a in args(things, out, True)]
    old = make_old(things, command, tmp_path / "old")
    shutil.copytree(tmp_path / "old", out)
    code, full = forks.run(argv, tmp_path / "calibrate.log")  # how long a whole run takes
    assert code == 0, (tmp_path / "calibrate.log").read_text()
    outcomes = {"old intact": 0, "new complete": 0, "litter left": 0}

    def killed(i: int, kill) -> None:
        shutil.rmtree(out)
        shutil.copytree(tmp_path / "old", out)
        inodes = {f: os.stat(out / f).st_ino for f in files}
        child = forks.start(argv, tmp_path / f"kill{i}.log")
        kill(child, inodes)
        child.wait()
        outcomes["litter left"] += bool(litter(out))
        if digest(out, files) == old:
            outcomes["old intact"] += 1
        else:
            # each file alone is old or whole: for eval, a kill between the two renames (a few microseconds)
            # would leave the new samples with the old report, which the report's samples_sha256 tells
            assert complete(command, out, files), f"{command} run {i}: a result that is neither old nor whole"
            outcomes["new complete"] += 1

    for i, at in enumerate(spread(KILLS)):
        killed(i, lambda child, _, at=at: (time.sleep(at * full), child.send_signal(signal.SIGKILL)))
    # The points are fractions of the calibrated length; should the machine's speed change afterwards and move
    # them all to one side of the final rename, one kill placed on the missing side makes sure both were hit:
    # before the run has loaded anything, or once every file of OUT is a new one (then it can only stay new).
    if not outcomes["old intact"]:
        killed(KILLS, lambda child, _: child.send_signal(signal.SIGKILL))
    if not outcomes["new complete"]:

        def replaced(inodes) -> bool:
            try:
                return all(os.stat(out / f).st_ino != inodes[f] for f in files)
            except FileNotFoundError:  # convert's directory between the two renames of the fallback
                return False

        killed(KILLS + 1, lambda child, inodes: kill_when(child, lambda: replaced(inodes)))
    print(f"kill outcomes {command}:", outcomes)  # README "Reliability" quotes these counts
    assert outcomes["old intact"] and outcomes["new complete"], outcomes
    code, _ = forks.run(argv, tmp_path / "next.log")  # the next run cleans up
    log = (tmp_path / "next.log").read_text()
    assert code == 0 and "Traceback" not in log, log
    assert litter(out) == [] and complete(command, out, files)
