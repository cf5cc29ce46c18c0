"""`train` fails safe: a failed step saves the last complete one, resumable; a reward bug is one line naming
the function and row; resume survives a torn metrics line and a damaged checkpoint; exit statuses 130/143;
adapters record the init they came from."""

import json
import os
import shutil
from pathlib import Path

import pytest
import rl_helpers
import torch
from click.testing import CliRunner
from rl_helpers import answer_scorer
from safetensors.torch import load_file
from test_trainer import quiet, tiny_cfg

from loraforge.cli import main
from loraforge.core.errors import LoraforgeError
from loraforge.models.checkpoint import sha256_file
from loraforge.rl import checkpoint as ckpt
from loraforge.rl import failsafe
from loraforge.rl.checkpoint import list_checkpoints
from loraforge.rl.metrics import read_metrics
from loraforge.rl.trainer import resume, train


def weights(path):
    return load_file(str(path / "adapter_model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def solved_after(steps_ok: int, lines: list):
    """(scorer, echo): answer_scorer until the trainer has printed step `steps_ok`'s line, then every response
    right: every group has the same outcome, as when a policy has learned its task."""
    state = {"solved": steps_ok == 0}

    def echo(line):
        lines.append(line)
        if line.startswith(f"step {steps_ok}/"):
            state["solved"] = True

    def scorer(response, gt):
        r = answer_scorer(response, gt)
        return type(r)(1.0, True, r.pred) if state["solved"] else r

    return scorer, echo


def test_dynamic_sampling_exhausted_saves_last_step_and_says_how_to_go_on(model_dir, adapter_dir, tmp_path):
    run = tmp_path / "run"
    # 2 generation batches allowed; steps 1-2 vary (each draws 1-2 batches), step 3 is all-right everywhere
    cfg = tiny_cfg(model_dir, adapter_dir, run, steps=4, max_gen_batches=2, save_every=0)
    scorer, echo = solved_after(2, [])
    with pytest.raises(LoraforgeError) as e:
        train(cfg, scorer=scorer, echo=echo)
    msg = str(e.value)
    # what happened: 2 batches x 4 prompts, every group all right
    assert msg.startswith("step 3: dynamic sampling kept 0 of the 4 groups needed after 2 generation batches")
    assert "in 8 of the 8 groups drawn every response had the same outcome (8 all right, 0 all wrong)" in msg
    assert "the task is solved (or unsolvable) for this policy at this difficulty" in msg
    # what was saved and how to go on, with the flags as the CLI spells them
    assert f"the adapter to {run / 'adapter'}" in msg and "step_000002" in msg
    assert f"`loraforge train --resume {run} --max-gen-batches 6`" in msg
    assert f"`loraforge train --resume {run} --no-dynamic-sampling`" in msg
    assert f"or stop here: the adapter is at {run / 'adapter'}" in msg
    assert [p.name for p in list_checkpoints(run)] == ["step_000002"]
    assert same(weights(run / "adapter"), weights(run / "checkpoints" / "step_000002" / "adapter"))
    # the CLI's way on: --resume with dynamic sampling off, which the saved config.json then records
    lines = []
    resume(run, scorer=answer_scorer, echo=lines.append, overrides={"dynamic_sampling": False})
    assert "resuming with --no-dynamic-sampling (the run had dynamic_sampling = True)" in lines
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]
    assert json.loads((run / "config.json").read_text())["dynamic_sampling"] is False


def test_failure_in_step_one_leaves_a_directory_that_can_be_started_again_or_resumed(model_dir, adapter_dir, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(model_dir, adapter_dir, run, steps=1, max_gen_batches=1)
    scorer, echo = solved_after(0, [])
    with pytest.raises(LoraforgeError, match="No step had completed, so nothing was saved"):
        train(cfg, scorer=scorer, echo=echo)
    assert (run / "config.json").is_file() and list_checkpoints(run) == []
    # the same command on the same -o is accepted (nothing there to lose) ...
    lines = []
    train(tiny_cfg(model_dir, adapter_dir, run, steps=1), scorer=answer_scorer, echo=lines.append)
    assert f"{run} holds a run that saved no checkpoint; starting it afresh" in lines
    assert (run / "adapter").is_dir()
    # ... but not once the run has saved something
    with pytest.raises(LoraforgeError, match="already holds a run"):
        train(tiny_cfg(model_dir, adapter_dir, run, steps=1), scorer=answer_scorer, echo=quiet([]))
    # --resume of a run that saved nothing starts it from step 0 with its config.json
    run2 = tmp_path / "run2"
    with pytest.raises(LoraforgeError):
        train(tiny_cfg(model_dir, adapter_dir, run2, steps=1, max_gen_batches=1), scorer=scorer, echo=echo)
    lines = []
    resume(run2, scorer=answer_scorer, echo=lines.append, overrides={"max_gen_batches": 0})
    assert f"{run2} holds no checkpoint: starting its run from step 0 with its config.json" in lines
    assert same(weights(run / "adapter"), weights(run2 / "adapter"))  # the same run as run's second try


def test_reward_that_raises_or_returns_a_non_number_names_function_and_row(model_dir, adapter_dir, tmp_path):
    def none(response, gt):
        return None

    with pytest.raises(LoraforgeError) as e:
        train(tiny_cfg(model_dir, adapter_dir, tmp_path / "a"), scorer=none, echo=quiet([]))
    msg = str(e.value)
    assert "reward function test_reward_that_raises_or_returns_a_non_number_names_function_and_row.<locals>.none" in msg
    assert "returned NoneType None for prompt 1 of this batch (data row " in msg and "response row 1" in msg
    assert "Traceback" not in msg and "\n" not in msg
    # a module:function reward, by name, through the CLI: one line, exit status 1
    args = ["train", "--model", str(model_dir), "--adapter", str(adapter_dir), "-o", str(tmp_path / "b")]
    args += ["--data", "synthetic:n=60,max=9,style=bare", "--max-response-length", "1", "--overlong-buffer", "0"]
    args += ["--group-size", "2", "--prompt-batch", "20", "--mini-batch", "20", "--no-tensorboard"]
    r = CliRunner().invoke(main, args + ["--reward", "rl_helpers:raises_on_sevens"])
    assert r.exit_code == 1, r.output
    assert "reward function rl_helpers:raises_on_sevens raised KeyError: 'seven' for prompt " in r.output
    assert "ground truth '7'" in r.output or "ground truth '17'" in r.output


@pytest.mark.parametrize("bad", [float("nan"), "1.0", {"acc": True}])
def test_reward_guard_refuses_nan_strings_and_dicts_without_score(bad):
    from loraforge.rl.rewards import RewardGuard

    guard = RewardGuard(lambda r, g: bad, "mine")
    with pytest.raises(LoraforgeError, match=r"reward function mine (returned|.*) .* for prompt 3"):
        guard("x", "1", "prompt 3")


def test_resume_drops_a_torn_metrics_line_and_falls_back_from_a_damaged_checkpoint(model_dir, adapter_dir, tmp_path):
    over = dict(steps=3, save_every=1, keep_checkpoints=0, dynamic_sampling=False)
    train(tiny_cfg(model_dir, adapter_dir, tmp_path / "straight", **over), scorer=answer_scorer, echo=quiet([]))
    run = tmp_path / "run"
    train(tiny_cfg(model_dir, adapter_dir, run, **over), scorer=answer_scorer, echo=quiet([]))
    # what a kill -9 mid-write leaves: a half line at the end of metrics.jsonl, a truncated newest checkpoint
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "rew')
    newest = run / "checkpoints" / "step_000003"
    state = newest / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    shutil.rmtree(run / "adapter")
    lines = []
    resume(run, scorer=answer_scorer, echo=lines.append)
    assert any(ln.startswith(f"warning: checkpoint {newest} is unreadable") and "falling back" in ln for ln in lines)
    assert any("metrics.jsonl: 1 line(s) dropped (line 4: not valid JSON" in ln for ln in lines)
    assert f"resumed from {run / 'checkpoints' / 'step_000002'} at step 2" in lines
    assert (run / "checkpoints" / "damaged-step_000003").is_dir()  # kept for inspection, never loaded again
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    assert same(weights(run / "adapter"), weights(tmp_path / "straight" / "adapter"))
    # when no checkpoint reads back whole, --resume says so instead of starting over
    for c in list_checkpoints(run):
        (c / "state.json").write_text("{")
    with pytest.raises(LoraforgeError, match=r"none of its 3 checkpoint\(s\) reads back whole"):
        resume(run, scorer=answer_scorer, echo=quiet([]))
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]  # the run's history is kept


def test_sigterm_abandons_the_step_saves_the_last_one_and_exits_143(model_dir, adapter_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    over = ["--steps", "3", "--group-size", "8", "--no-dynamic-sampling", "--save-every", "0"]
    args = ["train", "--model", str(model_dir), "--adapter", str(adapter_dir), "-o", str(run)]
    args += ["--data", "synthetic:n=60,max=2,style=bare", "--max-response-length", "1", "--overlong-buffer", "0"]
    args += ["--prompt-batch", "4", "--mini-batch", "2", "--lr", "1e-2", "--no-tensorboard", *over]
    monkeypatch.setitem(rl_helpers.signal_calls, "n", 0)
    monkeypatch.setenv("LF_TEST_SIGNAL", "SIGTERM")
    monkeypatch.setenv("LF_TEST_SIGNAL_AT", "40")  # during step 2's rollout (32 responses per step)
    r = CliRunner().invoke(main, args + ["--reward", "rl_helpers:signalling_scorer"])
    assert r.exit_code == 143, r.output
    assert "SIGTERM during step 2: saved the last complete step 1" in r.output
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"]
    # Ctrl-C: the step finishes, is saved, exit status 130
    monkeypatch.setitem(rl_helpers.signal_calls, "n", 0)
    monkeypatch.setenv("LF_TEST_SIGNAL", "SIGINT")
    r = CliRunner().invoke(main, ["train", "--resume", str(run)])
    assert r.exit_code == 130, r.output
    assert "interrupted at step 3" in r.output or "interrupted at step 2" in r.output
    # and the result is the uninterrupted run's, bit for bit
    assert CliRunner().invoke(main, ["train", "--resume", str(run)]).exit_code == 0
    straight = tmp_path / "straight"
    r = CliRunner().invoke(
        main, [a if a != str(run) else str(straight) for a in args] + ["--reward", "rl_helpers:answer_scorer"]
    )
    assert r.exit_code == 0, r.output
    assert same(weights(run / "adapter"), weights(straight / "adapter"))


def test_a_save_that_fails_too_keeps_the_first_error(model_dir, adapter_dir, tmp_path, monkeypatch):
    import errno

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    scorer, echo = solved_after(1, [])
    monkeypatch.setattr(ckpt, "save_checkpoint", full_disk)
    cfg = tiny_cfg(model_dir, adapter_dir, tmp_path / "run", steps=3, max_gen_batches=2)
    with pytest.raises(LoraforgeError) as e:
        train(cfg, scorer=scorer, echo=echo)
    msg = str(e.value)
    assert msg.startswith("step 2: dynamic sampling kept 0 of the 4 groups needed")
    assert "Saving the last complete step 1 failed too ([Errno 28] No space left on device); on disk: nothing" in msg


def test_adapters_record_the_init_model_and_data_they_were_trained_from(model_dir, adapter_dir, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(adapter_dir, init)
    (init / "loraforge.json").write_text(json.dumps({"method": "rlpo", "r": 4}))
    run = tmp_path / "run"
    train(tiny_cfg(model_dir, init, run, steps=2, save_every=1), scorer=answer_scorer, echo=quiet([]))
    want_init = {
        "path": str(init),
        "method": "rlpo",
        "files": {name: sha256_file(init / name) for name in ckpt_files},
    }
    records = [json.loads((a / ckpt.LINEAGE_FILE).read_text()) for a in [run / "adapter"] + saved_adapters(run)]
    want = records[0]
    assert want["format"] == "loraforge-lineage/1" and want["init"] == want_init
    assert want["model"]["path"] == str(model_dir.resolve()) and len(want["model"]["fingerprint"]) == 64
    assert want["data"]["source"] == "synthetic:n=60,max=2,style=bare" and want["data"]["rows"] == 60
    assert all(r == want for r in records)
    # the init changed since the run started (here its manifest): --resume refuses before loading anything
    manifest = (init / "loraforge.json").read_bytes()
    (init / "loraforge.json").write_text(json.dumps({"method": "pissa"}))
    with pytest.raises(LoraforgeError, match=r"the init at .*init changed since the run started: its loraforge.json"):
        resume(run, steps=3, scorer=answer_scorer, echo=quiet([]))
    # restored, the run goes on, and the record is still the one it started with
    (init / "loraforge.json").write_bytes(manifest)
    resume(run, steps=3, scorer=answer_scorer, echo=quiet([]))
    assert json.loads((run / "adapter" / ckpt.LINEAGE_FILE).read_text()) == want
    # an adapter not made by `loraforge init`: method and manifest hash are null
    train(tiny_cfg(model_dir, adapter_dir, tmp_path / "plain", steps=1), scorer=answer_scorer, echo=quiet([]))
    plain = json.loads((tmp_path / "plain" / "adapter" / ckpt.LINEAGE_FILE).read_text())
    assert plain["init"]["method"] is None and plain["init"]["files"]["loraforge.json"] is None


ckpt_files = ("adapter_model.safetensors", "loraforge.json", "adapter_config.json")


def saved_adapters(run):
    return [c / "adapter" for c in list_checkpoints(run)]


def test_a_second_run_on_the_same_directory_is_refused(model_dir, adapter_dir, tmp_path):
    run = tmp_path / "run"
    held = failsafe.RunLock(run)
    held.acquire()
    try:
        with pytest.raises(
            LoraforgeError, match=rf"{run} is in use by another `loraforge train` \(pid {os.getpid()}\)"
        ):
            train(tiny_cfg(model_dir, adapter_dir, run), scorer=answer_scorer, echo=quiet([]))
    finally:
        held.release()


def test_an_output_path_that_is_a_file_is_one_line(model_dir, adapter_dir, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(LoraforgeError, match=r"run directory .*taken: cannot write there \(File exists\)"):
        train(tiny_cfg(model_dir, adapter_dir, tmp_path / "taken"), scorer=answer_scorer, echo=quiet([]))


def test_litter_of_a_killed_save_is_cleaned_or_put_back(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step_000004" / "adapter").mkdir(parents=True)
    (run / "checkpoints" / ".del-step_000001").mkdir()
    (run / "checkpoints" / "step_000003").mkdir()
    (run / ".old-adapter").mkdir()  # killed between renaming the old adapter aside and the new one in
    (run / ".old-adapter" / "adapter_model.safetensors").write_bytes(b"old")
    (run / ".tmp-adapter").mkdir()
    (run / ".tmp-metrics.jsonl").write_text("")
    done = ckpt.clean_litter(run)
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoints"]
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003"]
    assert len(done) == 5 and any(ln.startswith(f"put back {run / 'adapter'}") for ln in done)


def test_a_checkpoint_is_on_the_disk_before_its_name(tmp_path, monkeypatch):
    """After a power cut a renamed-in checkpoint must not be empty: its files and directories are flushed
    before the rename, the run directory after it (the suite turns flushing off; on here)."""
    from loraforge.core import atomic

    monkeypatch.setenv("LORAFORGE_FSYNC", "1")
    synced = []
    monkeypatch.setattr(atomic, "fsync_path", lambda p: synced.append((Path(p), Path(p).exists())))
    tmp, dest = tmp_path / ".tmp-adapter", tmp_path / "adapter"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "adapter_model.safetensors").write_bytes(b"new")
    (tmp / "sub" / "x").write_bytes(b"x")
    ckpt._replace_dir(tmp, dest)
    # every flush of the staged tree happened while it still had its staging name, then the parent's
    assert [p.relative_to(tmp).as_posix() for p, existed in synced[:-1] if existed] == [
        "adapter_model.safetensors",
        ".",
        "sub/x",
        "sub",
    ]
    assert synced[-1] == (tmp_path, True)
    assert (dest / "adapter_model.safetensors").read_bytes() == b"new"


def test_non_utf8_data_file_is_one_line(model_dir, adapter_dir, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(
        '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "caf\u00e9 1+2=", "answer": "3"}\n'.encode("latin-1")
    )
    cfg = tiny_cfg(model_dir, adapter_dir, tmp_path / "run", data=str(data))
    with pytest.raises(LoraforgeError, match=r"latin1.jsonl is not UTF-8 text: byte 0xe9 at offset 49 \(line 2\)"):
        train(cfg, scorer=answer_scorer, echo=quiet([]))


def test_second_ctrl_c_aborts_with_130(model_dir, adapter_dir, tmp_path, monkeypatch):
    import loraforge.cli.train_options as opts

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(opts, "run_train", interrupted)
    monkeypatch.setattr("loraforge.cli.train_cmd.run_train", interrupted)
    r = CliRunner().invoke(main, ["train", "--resume", str(tmp_path)])
    assert r.exit_code == 130 and "aborted without saving" in r.output
