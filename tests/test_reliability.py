"""Failing closed: OUT is claimed atomically, two writers of one OUT never both win, killed runs leave
litter the next run removes, and OS errors (read-only disk, full disk...) are one line, not a traceback."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loraforge import InitConfig, LoraforgeError, init_adapter
from loraforge.adapters import writers
from loraforge.cli import main
from loraforge.core.atomic import OWNER_FILE, ClaimLost, DirLock
from loraforge.core.errors import os_error_message


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def litter(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def make_old(out: Path) -> Path:
    out.mkdir()
    (out / "keep.txt").write_text("old result")
    return out


# --- the atomic claim ----------------------------------------------------------------------------


@pytest.fixture(params=["renameat2", "fallback"])
def claim_mode(request, monkeypatch):
    """Each claim test runs with renameat2 and with the re-check-then-rename fallback (no renameat2)."""
    from loraforge.core import atomic

    if request.param == "fallback":
        monkeypatch.setattr(atomic, "_LIBC", None)
    return request.param


def test_a_directory_that_appears_during_the_run_is_not_replaced(tmp_path, claim_mode):
    out = tmp_path / "out"
    with pytest.raises(ClaimLost, match="changed while this command ran"):
        with writers.staged_dir(out, overwrite=False) as tmp:
            (tmp / "new.txt").write_text("new")
            make_old(out)  # a user (or another tool) creates OUT meanwhile
    assert (out / "keep.txt").read_text() == "old result"
    assert litter(tmp_path, "out") == []


def test_an_empty_directory_that_appears_during_the_run_is_not_replaced(tmp_path, claim_mode):
    # rename(2) would silently replace an empty directory; RENAME_NOREPLACE (or the re-check) must not.
    out = tmp_path / "out"
    with pytest.raises(ClaimLost):
        with writers.staged_dir(out, overwrite=False) as tmp:
            (tmp / "new.txt").write_text("new")
            out.mkdir()
    assert out.is_dir() and list(out.iterdir()) == []


def test_overwrite_replaces_only_the_directory_it_was_given_for(tmp_path, claim_mode):
    out = make_old(tmp_path / "out")
    with pytest.raises(ClaimLost):
        with writers.staged_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            shutil.rmtree(out)
            out.mkdir()
            (out / "other.txt").write_text("someone else's")  # a different directory now
    assert (out / "other.txt").read_text() == "someone else's"
    assert litter(tmp_path, "out") == []


def test_overwrite_replaces_the_checked_directory(tmp_path, claim_mode):
    out = make_old(tmp_path / "out")
    with writers.staged_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]  # no owner file, no old file
    assert litter(tmp_path, "out") == []


def test_a_failure_inside_keeps_the_old_out_and_leaves_nothing(tmp_path):
    out = make_old(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with writers.staged_dir(out, overwrite=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert litter(tmp_path, "out") == []


def _record_fsyncs(monkeypatch):
    """Turn the flushes on (the suite turns them off) and record, per fsync, the path and whether it existed
    under that name at that moment (a staged name, not yet renamed)."""
    from loraforge.core import atomic

    monkeypatch.setenv("LORAFORGE_FSYNC", "1")
    synced = []
    real = atomic.fsync_path

    def record(path):
        real(path)
        synced.append(Path(path))

    monkeypatch.setattr(atomic, "fsync_path", record)
    return synced


def test_a_claimed_directory_is_on_the_disk_before_its_name(tmp_path, monkeypatch, claim_mode):
    """A rename is atomic for other processes at once, but after a power cut the new name could point at
    contents never written: every staged file and the staging directory are flushed before the rename, and
    the parent after it."""
    synced = _record_fsyncs(monkeypatch)
    out = make_old(tmp_path / "out")
    with writers.staged_dir(out, overwrite=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_text("a")
        (tmp / "sub" / "b.txt").write_text("b")
    assert {p.relative_to(tmp) for p in synced if tmp in p.parents or p == tmp} == {
        Path("."),
        Path("sub"),
        Path("a.txt"),
        Path("sub/b.txt"),
    }
    assert synced[-1] == tmp_path  # the rename itself, last
    assert (out / "sub" / "b.txt").read_text() == "b"


def test_staged_files_are_on_the_disk_before_their_names(tmp_path, monkeypatch):
    from loraforge.core.atomic import FileStaging

    synced = _record_fsyncs(monkeypatch)
    with FileStaging() as stage:
        staged = [stage.add(tmp_path / "report.json"), stage.add(tmp_path / "d" / "samples.jsonl")]
        for f in staged:
            f.write_text("x")
    assert synced == [*staged, tmp_path, tmp_path / "d"]  # each file before any rename, then the directories
    assert (tmp_path / "d" / "samples.jsonl").read_text() == "x"


def test_loraforge_fsync_0_skips_the_flushes(tmp_path, monkeypatch):
    synced = _record_fsyncs(monkeypatch)
    monkeypatch.setenv("LORAFORGE_FSYNC", "0")
    with writers.staged_dir(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "a.txt").write_text("a")
    assert synced == [] and (tmp_path / "out" / "a.txt").exists()


def test_a_second_writer_of_the_same_out_fails_at_once(tmp_path):
    out = tmp_path / "out"
    with writers.staged_dir(out, overwrite=False) as tmp:
        (tmp / "a.txt").write_text("first")
        with pytest.raises(LoraforgeError, match=rf"Another loraforge command \(pid {os.getpid()}\) is writing"):
            with writers.staged_dir(out, overwrite=True):
                pass
    assert (out / "a.txt").read_text() == "first"
    assert litter(tmp_path, "out") == []  # the lock file is gone too


def test_two_concurrent_cli_inits_to_one_out_exactly_one_wins(tiny_models, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "loraforge", "init", str(tiny_models["llama"]), "--method", "pissa", "-r", "4"]
    cmd += ["-o", str(out)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    # Either it found the lock held, or it started after the winner finished and found OUT there.
    assert "Another loraforge command" in loser or "already exists" in loser, loser
    assert "Traceback" not in loser and len(loser.strip().splitlines()) == 1
    assert invoke("verify", out).exit_code == 0
    assert litter(tmp_path, "out") == []


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text("999999\n")  # nobody holds the flock
    with writers.staged_dir(out, overwrite=False) as tmp:
        (tmp / "a.txt").write_text("x")
    assert (out / "a.txt").exists() and litter(tmp_path, "out") == []


def test_lock_is_exclusive_between_open_files(tmp_path):
    with DirLock(tmp_path / "x"):
        with pytest.raises(LoraforgeError, match="writing"):
            DirLock(tmp_path / "x").acquire()


# --- litter of killed runs -----------------------------------------------------------------------


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_staging_of_a_dead_run_is_removed_and_named(tmp_path, capsys):
    out = tmp_path / "out"
    stale = tmp_path / ".out.partial-abc123"
    (stale / "base").mkdir(parents=True)
    (stale / OWNER_FILE).write_text(f"{dead_pid()}\n")
    ownerless = tmp_path / ".out.partial-killed-before-it-said"
    ownerless.mkdir()
    alive = tmp_path / ".out.partial-live"
    alive.mkdir()
    (alive / OWNER_FILE).write_text(f"{os.getppid()}\n")  # a live process (not a loraforge writer)
    with writers.staged_dir(out, overwrite=False) as tmp:
        (tmp / "a.txt").write_text("x")
    err = capsys.readouterr().err
    assert not stale.exists() and not ownerless.exists()
    assert f"removed {stale}" in err and f"removed {ownerless}" in err
    assert alive.exists() and f"left {alive} alone" in err
    shutil.rmtree(alive)


def test_an_old_out_moved_aside_by_a_killed_run_is_put_back(tmp_path, capsys):
    # The non-atomic fallback moves OUT to .OUT.old-PID before renaming the new one in; killed there,
    # OUT is missing. The next run restores it, and then (no --overwrite) refuses to replace it.
    out = tmp_path / "out"
    make_old(tmp_path / ".out.old-4242")
    with pytest.raises(LoraforgeError, match="already exists"):
        with writers.staged_dir(out, overwrite=False):
            pass
    assert (out / "keep.txt").read_text() == "old result"
    assert "restored" in capsys.readouterr().err


def test_out_dot_is_refused_before_any_work(tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("init", tiny_models["llama"], "--method", "pissa", "-r", "4", "-o", ".", "--overwrite")
    assert r.exit_code == 1 and "current directory" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


# --- OS errors: one line with the path -----------------------------------------------------------


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "free some space"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission"),
        (errno.EBUSY, "in use"),
    ],
)
def test_os_error_message_names_the_error_the_path_and_what_to_do(code, words):
    msg = os_error_message(OSError(code, os.strerror(code), "/data/out"))
    assert errno.errorcode[code] in msg and "/data/out" in msg and words in msg
    assert "\n" not in msg


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EBUSY, errno.EIO])
def test_an_os_error_while_writing_is_one_line_and_keeps_the_old_out(tiny_models, tmp_path, monkeypatch, code):
    # The OS-error shim: the streaming writer fails as the kernel would, after the computation.
    out = make_old(tmp_path / "out")

    def failing(path, *a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(writers, "write_streaming", failing)
    r = invoke("init", tiny_models["llama"], "--method", "pissa", "-r", "4", "-o", out, "--overwrite")
    assert r.exit_code == 1, r.output
    line = r.output.strip()
    assert line.startswith("Error: ") and "\n" not in line and errno.errorcode[code] in line and str(out) in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert litter(tmp_path, "out") == []


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        if shutil.which("mount") is None or not _mount_tmpfs(path, options):
            pytest.skip("cannot mount a tmpfs here (needs root); the OS-error shim tests cover this path")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_a_real_full_disk_is_one_line_and_leaves_nothing(tiny_models, tmpfs):
    disk = tmpfs("small", "size=100k")  # the tiny pissa init needs ~230 kB
    r = invoke("init", tiny_models["llama"], "--method", "pissa", "-r", "4", "-o", disk / "out")
    assert r.exit_code == 1 and "ENOSPC" in r.output and str(disk / "out") in r.output, r.output
    assert list(disk.iterdir()) == []  # no staging directory, no lock file


def test_a_real_read_only_disk_is_one_line(tiny_models, tmpfs):
    disk = tmpfs("ro", "ro,size=1m")
    r = invoke("init", tiny_models["llama"], "--method", "pissa", "-r", "4", "-o", disk / "out")
    assert r.exit_code == 1 and "EROFS" in r.output and "read-only" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_init_writes_the_same_adapter_bytes_twice(tiny_models, tmp_path):
    # Our own writer replaced safetensors' save_file for the adapter: still deterministic, still PEFT-loadable.
    a = init_adapter(str(tiny_models["llama"]), tmp_path / "a", InitConfig(method="rlpo", r=4)).out
    b = init_adapter(str(tiny_models["llama"]), tmp_path / "b", InitConfig(method="rlpo", r=4)).out
    assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()
    from safetensors.torch import load_file

    assert len(load_file(str(a / "adapter_model.safetensors"))) == 2 * len(
        json.loads((a / "loraforge.json").read_text())["modules"]
    )


# --- validation before commit: an init that cannot train is never written -----------------------


@pytest.mark.parametrize(
    "method, flags, words",
    [
        ("pissa", ["--alpha", "1e-30", "--adapter-dtype", "float16"], "overflow"),  # sqrt(S/s) > 65504
        ("milora", ["--alpha", "1e-300"], "overflow"),  # sqrt(S/s) ~ 1e150 > float32's 3e38
        ("pissa", ["--alpha", "1e30", "--adapter-dtype", "float16"], "underflowed to zero"),
        ("milora", ["--alpha", "1e300"], "underflowed to zero"),  # even in float32
        ("milora", ["--alpha", "1e8", "--adapter-dtype", "float16"], "to underflow"),  # subnormal rows
        ("olora", ["--alpha", "1e8"], "cannot hold W - s B0 A0"),  # W - s U V^T rounds W away in bf16
    ],
)
def test_flags_that_make_an_untrainable_init_exit_1_and_keep_the_old_out(tiny_models, tmp_path, method, flags, words):
    # Before: these printed "error nan" or wrote all-zero factors, and exited 0.
    out = make_old(tmp_path / "out")
    r = invoke("init", tiny_models["llama"], "--method", method, "-r", "4", *flags, "-o", out, "--overwrite")
    assert r.exit_code == 1 and words in r.output and "Nothing was written" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and litter(tmp_path, "out") == []


def test_the_same_check_guards_init_model(tiny_models):
    from transformers import AutoModelForCausalLM

    from loraforge import init_model

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(LoraforgeError, match="underflowed to zero"):
        init_model(model, InitConfig(method="pissa", r=4, alpha=1e300))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)  # untouched


def test_an_out_below_a_file_is_one_line(tiny_models, tmp_path):
    (tmp_path / "afile").write_text("x")
    r = invoke("init", tiny_models["llama"], "--method", "rlpo", "-r", "4", "-o", tmp_path / "afile" / "sub")
    assert r.exit_code == 1 and "is a file, not a directory" in r.output, r.output


@pytest.mark.parametrize("command", ["verify", "inspect"])
@pytest.mark.parametrize("damage", [b"\xff\xfe{}", b"[1, 2]", b'{"r": '])
def test_a_damaged_adapter_config_or_manifest_is_one_line(tiny_models, tmp_path, command, damage):
    out = init_adapter(str(tiny_models["llama"]), tmp_path / "a", InitConfig(method="rlpo", r=2)).out
    for name in ("adapter_config.json", "loraforge.json"):
        saved = (out / name).read_bytes()
        (out / name).write_bytes(damage)
        r = CliRunner().invoke(main, [command, str(out)])
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        assert r.exit_code == 1 and name in r.output and len(r.output.strip().splitlines()) == 1, r.output
        (out / name).write_bytes(saved)


def test_inspect_json_to_a_read_only_disk_is_one_line(tiny_models, tmp_path, tmpfs):
    out = init_adapter(str(tiny_models["llama"]), tmp_path / "a", InitConfig(method="rlpo", r=2)).out
    disk = tmpfs("ro-json", "ro,size=1m")
    r = CliRunner().invoke(main, ["inspect", str(out), "--json", str(disk / "n.json")])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 1 and "EROFS" in r.output and str(disk / "n.json") in r.output
