"""The scripts under benchmarks/ and examples/ that a user runs directly: a results file or checkpoint directory
that is taken is refused in one line before any work (never written over, never deleted to make room), and
--help prints usage without doing anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import checkpoints  # noqa: E402
import report  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def run(args, cwd, **kw):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, **kw)


def test_result_file_refuses_a_previous_result(tmp_path, capsys):
    old = tmp_path / "result.json"
    old.write_text('{"old": 1}')
    with pytest.raises(SystemExit) as e:
        report.ResultFile(old)
    assert e.value.code == 2 and old.read_text() == '{"old": 1}'
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1


def test_result_file_refuses_a_file_for_a_directory(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        report.ResultFile(tmp_path / "f" / "sub" / "r.json")
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only directory")
def test_result_file_refuses_a_read_only_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(SystemExit):
            report.ResultFile(ro / "new" / "r.json")
        assert "not writable" in capsys.readouterr().err and not (ro / "new").exists()
    finally:
        ro.chmod(0o755)


def test_result_file_is_created_on_write_and_rewritten_by_its_own_run(tmp_path):
    out = report.ResultFile(tmp_path / "a" / "r.json")
    assert not (tmp_path / "a").exists()  # the check creates nothing
    assert out.write({"step": 1}) == tmp_path / "a" / "r.json"
    assert out.write({"step": 2}) == tmp_path / "a" / "r.json"  # a summary rewritten after each step
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"step": 2}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["r.json"]  # no staging file left


def test_a_file_that_appears_meanwhile_is_kept_and_the_result_goes_beside_it(tmp_path, capsys):
    out = report.ResultFile(tmp_path / "r.json")
    (tmp_path / "r.json").write_text("another run's")
    assert out.write({"mine": 1}) == tmp_path / "r-1.json"
    assert (tmp_path / "r.json").read_text() == "another run's"
    assert json.loads((tmp_path / "r-1.json").read_text()) == {"mine": 1}
    assert "r-1.json instead" in capsys.readouterr().err


def test_checkpoint_dir_holding_user_files_is_refused_not_deleted(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    for write in (
        lambda: checkpoints.write_random_checkpoint(user, "tiny", num_hidden_layers=1),
        lambda: checkpoints.truncate_checkpoint(tmp_path / "src", user, 1),
    ):
        with pytest.raises(SystemExit) as e:
            write()
        assert e.value.code == 2
    assert [p.name for p in user.iterdir()] == ["notes.txt"] and (user / "notes.txt").read_text() == "precious"
    assert "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging directory left beside it


def test_checkpoint_goes_into_an_empty_dir_and_replaces_only_its_own(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    made = checkpoints.write_random_checkpoint(ck, "tiny", num_hidden_layers=1)
    assert not made["reused"] and (ck / "bench_checkpoint.json").is_file()
    assert checkpoints.write_random_checkpoint(ck, "tiny", num_hidden_layers=1)["reused"]
    other = checkpoints.write_random_checkpoint(ck, "tiny", num_hidden_layers=1, seed=1)  # ours, other settings
    assert not other["reused"] and json.loads((ck / "bench_checkpoint.json").read_text())["seed"] == 1
    small = checkpoints.truncate_checkpoint(ck, tmp_path / "ck-1L", 1)
    assert (small / "bench_truncated.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "ck-1L"]


def test_gpu_init_refuses_a_taken_dir_and_json_before_any_work(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    p = run(["benchmarks/gpu_init.py", "--tiny", "--dir", user, "--json", tmp_path / "g.json"], REPO, timeout=60)
    assert p.returncode == 2 and "did not write" in p.stderr and p.stdout == "", p.stderr
    assert [q.name for q in user.iterdir()] == ["notes.txt"] and not (tmp_path / "g.json").exists()
    (tmp_path / "g.json").write_text("old")
    p = run(["benchmarks/gpu_init.py", "--tiny", "--dir", tmp_path / "ck", "--json", tmp_path / "g.json"], REPO)
    assert p.returncode == 2 and "already exists" in p.stderr and (tmp_path / "g.json").read_text() == "old"
    assert not (tmp_path / "ck").exists()


SCRIPTS = sorted(
    str(p.relative_to(REPO)) for p in (REPO / "benchmarks").glob("*.py") if '__name__ == "__main__"' in p.read_text()
) + ["examples/load_in_peft.py", "examples/replication/replicate.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_does_nothing(script, tmp_path):
    p = run([REPO / script, "--help"], tmp_path, timeout=120)
    assert p.returncode == 0 and "usage" in p.stdout.lower(), p.stdout[-500:] + p.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran (such as a directory named --help)


def test_device_check_help_and_unknown_arguments_run_nothing(tmp_path):
    env = dict(ENV, OUT=str(tmp_path / "out"), PYTHON="false")  # a step that ran would fail at once
    sh = ["bash", str(REPO / "benchmarks" / "device_check.sh")]
    p = subprocess.run([*sh, "--help"], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "--cpu" in p.stdout and not (tmp_path / "out").exists()
    p = subprocess.run([*sh, "--cpu", "extra"], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "unknown arguments" in p.stderr and not (tmp_path / "out").exists()


def test_device_check_refuses_an_out_with_a_previous_check(tmp_path):
    (tmp_path / "gpu_init.json").write_text("previous")
    env = dict(ENV, OUT=str(tmp_path), PYTHON="false")
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--cpu"], env=env, capture_output=True)
    assert p.returncode == 2 and b"already exists" in p.stderr
    assert [f.name for f in tmp_path.iterdir()] == ["gpu_init.json"]
    assert (tmp_path / "gpu_init.json").read_text() == "previous"


@pytest.mark.parametrize(
    "args, words",
    [
        (["examples/load_in_peft.py", "no-such-model", "no-such-adapter"], "has no config.json"),
        (["benchmarks/device_report.py", "no-such-dir"], "is not a directory"),
        (["benchmarks/workers.py", "no_such_worker", "{}"], "expected a worker name"),
        (["benchmarks/workers.py", "peft_init", "{not json"], "is not JSON"),
    ],
)
def test_a_wrong_argument_is_one_message_not_a_traceback(args, words, tmp_path):
    p = run([REPO / args[0], *args[1:]], tmp_path, timeout=60)
    assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr
