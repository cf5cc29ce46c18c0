"""`--resume` checks that the init, model and data it finds are the ones the run started with, before it
loads anything; the logs it reads back tolerate damage and say which lines they dropped; the KL reference is
rebuilt when damaged; a prompt of any size costs what --max-prompt-length allows."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from rl_helpers import answer_scorer, make_adapter, make_model
from safetensors.torch import load_file
from test_trainer import quiet, tiny_cfg

from loraforge.cli import main
from loraforge.core.errors import LoraforgeError
from loraforge.rl.metrics import read_metrics
from loraforge.rl.trainer import resume, train


def first_run(model_dir, adapter_dir, tmp_path, **over):
    """A copy of the init, and a 1-step run from it that saved its checkpoint: what --resume finds."""
    init = tmp_path / "init"
    shutil.copytree(adapter_dir, init)
    run = tmp_path / "run"
    cfg = tiny_cfg(model_dir, init, run, steps=1, save_every=1, dynamic_sampling=False, **over)
    train(cfg, scorer=answer_scorer, echo=quiet([]))
    return init, run


def test_an_init_recreated_at_another_rank_is_refused_before_loading(model_dir, adapter_dir, tmp_path, monkeypatch):
    init, run = first_run(model_dir, adapter_dir, tmp_path)
    shutil.rmtree(init)
    make_adapter(make_model(), init, r=8)  # `init --overwrite` at another rank: the same path, another init
    import loraforge.rl.trainer as trainer_mod

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(trainer_mod, "load_policy", no_loading)
    with pytest.raises(LoraforgeError, match=r"shape \[4, \d+\] in the checkpoint but \[8, \d+\] in the init at"):
        resume(run, steps=2, scorer=answer_scorer, echo=quiet([]))
    # with the same shapes (another seed), the lineage record's hash tells them apart
    shutil.rmtree(init)
    make_adapter(make_model(seed=1), init)
    with pytest.raises(LoraforgeError, match=r"the init at .*init changed since the run started: its adapter_model"):
        resume(run, steps=2, scorer=answer_scorer, echo=quiet([]))


def test_changed_data_or_model_is_refused(model_dir, adapter_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8)))
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    init, run = first_run(model, adapter_dir, tmp_path, data=str(data))
    data.write_text(data.read_text().replace('"1+1="', '"1+2="'))  # one prompt edited
    with pytest.raises(LoraforgeError, match=r"--data .*data.jsonl reads 8 rows now, and they are not the 8 rows"):
        resume(run, steps=2, scorer=answer_scorer, echo=quiet([]))
    data.write_text(data.read_text().replace('"1+2="', '"1+1="'))
    make_model(seed=3).save_pretrained(str(model))  # another model of the same shapes in its place
    with pytest.raises(LoraforgeError, match=r"the base model .*model has other files or weights now"):
        resume(run, steps=2, scorer=answer_scorer, echo=quiet([]))


def test_damaged_logs_are_read_back_naming_the_lines_dropped(model_dir, adapter_dir, tmp_path):
    # one non-UTF-8 byte in samples.jsonl (once a UnicodeDecodeError on every later resume), a metrics row
    # {"step": "2"} (once a TypeError): each line is dropped and named, and the run goes on
    init, run = first_run(model_dir, adapter_dir, tmp_path)
    samples = (run / "samples.jsonl").read_bytes().splitlines()
    (run / "samples.jsonl").write_bytes(b"\n".join([samples[0][:10] + b"\xe9" + samples[0][10:], *samples[1:]]) + b"\n")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": "2", "reward": 1}\n')
    lines = []
    resume(run, steps=2, scorer=answer_scorer, echo=lines.append)
    assert f'warning: {run / "metrics.jsonl"}: 1 line(s) dropped (line 2: key step is a string ("2"), ' in "".join(
        lines
    )
    assert f"warning: {run / 'samples.jsonl'}: 1 line(s) dropped (line 1: not UTF-8 (byte 0xe9))" in lines
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
    assert [json.loads(ln)["step"] for ln in (run / "samples.jsonl").read_text().splitlines()][-1] == 2
    resume(run, steps=3, scorer=answer_scorer, echo=quiet([]))  # and every later resume reads them back too
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]


def test_a_damaged_kl_reference_is_rebuilt_from_the_unchanged_init(model_dir, adapter_dir, tmp_path):
    over = dict(algo="grpo", steps=2, save_every=1)
    straight = tmp_path / "straight"
    train(tiny_cfg(model_dir, adapter_dir, straight, **over), scorer=answer_scorer, echo=quiet([]))
    run = tmp_path / "run"
    train(tiny_cfg(model_dir, adapter_dir, run, **{**over, "steps": 1}), scorer=answer_scorer, echo=quiet([]))
    ref = run / "reference_adapter.safetensors"
    ref.write_bytes(ref.read_bytes()[:100])  # torn
    lines = []
    resume(run, steps=2, scorer=answer_scorer, echo=lines.append)
    assert any("(the KL reference) is unreadable" in ln and "written again from the init" in ln for ln in lines)
    assert load_file(str(ref)).keys() == load_file(str(straight / "reference_adapter.safetensors")).keys()
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (run, straight))
    assert all((a[k] == b[k]).all() for k in a)  # the run goes on exactly as the uninterrupted one


def test_yaml_and_hand_edited_config_json_are_typed(model_dir, adapter_dir, tmp_path):
    # `lr: 5e-6` is the string "5e-6" to PyYAML (once a TypeError); a config.json edited to "lr": "1e-2" before
    # --resume likewise: both are numbers
    out = tmp_path / "run"
    (tmp_path / "run.yaml").write_text(
        f"model: {model_dir}\nadapter: {adapter_dir}\ndata: synthetic:n=8,max=2,style=bare\noutput_dir: {out}\n"
        "lr: 5e-6\nsteps: 1\nmax_response_length: 1\ngroup_size: 2\nprompt_batch: 1\nmini_batch: 1\n"
        "overlong_buffer: 0\ndynamic_sampling: false\ntensorboard: false\nsave_every: 1\n"
    )
    runner = CliRunner()
    args = ["train", "--config", str(tmp_path / "run.yaml"), "--reward", "rl_helpers:answer_scorer"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 5e-6
    (out / "config.json").write_text(json.dumps(config | {"lr": "1e-2"}, indent=2))
    result = runner.invoke(main, ["train", "--resume", str(out), "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-2
    (out / "config.json").write_text(json.dumps(config | {"lr": -1}, indent=2))
    result = runner.invoke(main, ["train", "--resume", str(out), "--steps", "3"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"Error: --resume {out}: {out / 'config.json'} holds a bad setting: --lr must be > 0, got -1.0"
    ]


def test_a_huge_row_is_skipped_and_long_prompts_are_cut_before_tokenising(model_dir, adapter_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+2=", "answer": "3"}]
    rows.append({"prompt": "9" * 2_000_000 + "+1=", "answer": "1"})  # past MAX_ROW_CHARS: skipped, counted
    rows.append({"prompt": "1" * 200_000 + "+1=", "answer": "1"})  # long: cut by characters, then by tokens
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = []
    over = dict(data=str(data), steps=1, prompt_batch=3, mini_batch=3, dynamic_sampling=False)
    cfg = tiny_cfg(model_dir, adapter_dir, tmp_path / "run", **over)
    train(cfg, scorer=answer_scorer, echo=lines.append)
    assert f"warning: --data {data}: skipped 1 row(s) longer than 1,000,000 characters (row 3: 2,000,004)" in lines
    prompts = [json.loads(ln)["prompt"] for ln in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert max(len(p) for p in prompts) <= cfg.max_prompt_length  # one character per token here
