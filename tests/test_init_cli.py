"""`loraforge init` through click's CliRunner, bad input included, and once through the installed script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import invoke

from loraforge.inits.methods import METHODS


def test_init_writes_adapter_and_prints_a_summary(tiny_models, tmp_path):
    res = invoke("init", tiny_models["llama"], "--method", "rlpo", "-r", 4, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "rlpo r=4: 14 modules in" in res.output and str(tmp_path / "out") in res.output
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_initialises_through_the_cli(tiny_models, tmp_path, method):
    res = invoke("init", tiny_models["llama"], "--method", method, "-r", 2, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"{method} r=2: 14 modules in")
    assert json.loads((tmp_path / "out" / "loraforge.json").read_text())["method"] == method
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_init_help_is_the_config_fields_metadata_help():
    import dataclasses

    from loraforge.inits.config import InitConfig

    fields = dataclasses.fields(InitConfig)
    assert all(f.metadata.get("help") for f in fields), [f.name for f in fields if not f.metadata.get("help")]
    shown = " ".join(invoke("init", "--help").output.split())  # click wraps the help column
    not_flags = {"batch_mib", "residual_mib"}  # library-only settings
    for f in fields:
        if f.name not in not_flags:
            assert " ".join(f.metadata["help"].split()) in shown, f.name
    assert "Seed of the random methods (lora, wavelet). [default: 0" in shown


def test_every_listed_command_loads_and_shows_its_help():
    # the group lists commands from a table without importing them: each entry must import and run
    from loraforge.cli import COMMANDS, HELP_SUMMARY

    listing = " ".join(invoke("--help").output.split())
    for name in COMMANDS:
        assert f"{name} {HELP_SUMMARY[name]}" in listing, name
        res = invoke(name, "--help")
        assert res.exit_code == 0 and res.output.startswith(f"Usage: main {name} "), (name, res.output[:200])


def test_unknown_method_is_a_usage_error(tiny_models, tmp_path):
    res = invoke("init", tiny_models["llama"], "--method", "qlora", "-r", 4, "-o", tmp_path / "o")
    assert res.exit_code == 2 and "qlora" in res.output and "rlpo" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/model"], "No such directory: /nonexistent/model"),
        (["no-such-org/no-such-model"], "not in the local cache"),
    ],
)
def test_missing_model_says_so(tmp_path, args, message):
    res = invoke("init", *args, "--method", "rlpo", "-r", 4, "-o", tmp_path / "o")
    assert res.exit_code == 1 and message in res.output
    assert not (tmp_path / "o").exists()


def test_relative_path_that_does_not_exist_is_no_such_directory(tiny_models, tmp_path, monkeypatch):
    """`models/nope` beside a `models/` directory is a missing directory, not a Hub id to download; an `org/name`
    whose `org/` is not here still goes to the Hub (offline in the tests: "not in the local cache")."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    res = invoke("init", "models/nope", "--method", "rlpo", "-r", 4, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "No such directory: models/nope (models/ is a directory here" in res.output
    res = invoke("init", "HuggingFaceTB/nope", "--method", "rlpo", "-r", 4, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "not in the local cache" in res.output and "No such directory" not in res.output
    (tmp_path / "models" / "tiny").symlink_to(tiny_models["llama"])  # and an existing one is read as it is
    assert invoke("init", "models/tiny", "--method", "rlpo", "-r", 4, "-o", tmp_path / "o").exit_code == 0


def test_rank_no_module_can_hold_says_the_largest_allowed(tiny_models, tmp_path):
    # tiny llama: q_proj/o_proj 64 x 64, k/v 32 x 64, gate/up 96 x 64, down 64 x 96: every module has min side <= 64
    res = invoke("init", tiny_models["llama"], "--method", "rlpo", "-r", 1000, "-o", tmp_path / "o")
    assert res.exit_code == 1 and not (tmp_path / "o").exists()
    assert "the largest -r allowed is 64 (model.layers.0.self_attn.q_proj, 64 x 64)" in res.output
    assert "-r 32 or less keeps every module (the smallest, model.layers.0.self_attn.k_proj, is 32 x 64)" in res.output


def test_directory_without_weights(tiny_models, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", d)
    res = invoke("init", d, "--method", "rlpo", "-r", 4, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "has no weights" in res.output and "config.json" in res.output


def test_rank_too_large_names_the_module_and_its_shape(tiny_models, tmp_path):
    # k_proj is 32 x 64 (2 kv heads x 16): named explicitly at -r 40 it is an error...
    args = ("init", tiny_models["llama"], "--method", "rlpo", "-r", 40)
    res = invoke(*args, "--target-modules", "k_proj,q_proj", "-o", tmp_path / "o")
    assert res.exit_code == 1 and not (tmp_path / "o").exists()
    assert "-r 40 is larger than module model.layers.0.self_attn.k_proj allows: its weight is 32 x 64" in res.output
    # ... while the default set leaves it (and v_proj) out with a note and a manifest entry.
    res = invoke(*args, "-o", tmp_path / "d")
    assert res.exit_code == 0, res.output
    note = "note: model.layers.*.self_attn.k_proj (2 modules) left out of the default targets"
    assert f"{note} (32 x 64: smaller than r = 40)" in res.output
    manifest = json.loads((tmp_path / "d" / "loraforge.json").read_text())
    assert set(manifest["skipped"]) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("k_proj", "v_proj")}
    assert "model.layers.0.self_attn.q_proj" in manifest["modules"]


def test_rank_above_numerical_rank_is_refused(tmp_path):
    from conftest import build_tiny, make_tokenizer

    model = build_tiny("llama")
    with torch.no_grad():  # make one weight rank 2
        w = model.model.layers[1].mlp.up_proj.weight
        w.copy_(w[:, :2] @ torch.randn(2, w.shape[1]))
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    res = invoke("init", tmp_path / "m", "--method", "rlmo", "-r", 4, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "model.layers.1.mlp.up_proj (96 x 64) has numerical rank 2" in res.output


def test_target_modules_that_match_nothing_list_the_linear_modules(tiny_models, tmp_path):
    res = invoke(
        "init", tiny_models["llama"], "--method", "rlpo", "-r", 4, "--target-modules", "qkv", "-o", tmp_path / "o"
    )
    assert res.exit_code == 1
    listed = "Linear modules and expert parameters: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    assert f"No modules match ['qkv'] in LlamaForCausalLM. {listed}" in res.output


def test_layers_out_of_range(tiny_models, tmp_path):
    res = invoke("init", tiny_models["llama"], "--method", "rlpo", "-r", 4, "--layers", "5-9", "-o", tmp_path / "o")
    assert res.exit_code == 1 and "the model's layers are 0-1" in res.output


def test_existing_out_needs_overwrite(tiny_models, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = invoke("init", tiny_models["llama"], "--method", "rlpo", "-r", 4, "-o", out)
    assert res.exit_code == 1 and "already exists. Pass --overwrite" in res.output
    assert (out / "keep.txt").read_text() == "mine"
    res = invoke("init", tiny_models["llama"], "--method", "rlpo", "-r", 4, "-o", out, "--overwrite")
    assert res.exit_code == 0 and not (out / "keep.txt").exists()


def test_out_cannot_be_the_model_directory(tiny_models, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    res = invoke("init", model, "--method", "rlpo", "-r", 4, "-o", model, "--overwrite")
    assert res.exit_code == 1 and f"is the same path as MODEL {model}, which this command reads" in res.output
    assert (model / "config.json").exists()
    # the library refuses it too, for callers that do not come through the CLI's guard
    from loraforge import InitConfig, LoraforgeError, init_adapter

    with pytest.raises(LoraforgeError, match="is the same path as .* \\(the source model\\)"):
        init_adapter(str(model), model, InitConfig(method="rlpo", r=4), overwrite=True)
    assert (model / "config.json").exists()


def test_non_finite_weights_name_the_module(tmp_path):
    from conftest import build_tiny

    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "m")
    res = invoke("init", tmp_path / "m", "--method", "lora", "-r", 4, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "model.layers.0.mlp.gate_proj has non-finite weights" in res.output
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))


def test_truncated_checkpoint_is_named_and_nothing_is_written(tiny_models, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], model)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # cut the last tensor's bytes short, as an interrupted download does
        f.truncate(size // 2)
    res = invoke("init", model, "--method", "rlpo", "-r", 4, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "model.safetensors is truncated" in res.output and "Re-download" in res.output
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))


def test_fast_svd_is_refused_for_bottom_r_methods(tiny_models, tmp_path):
    res = invoke("init", tiny_models["llama"], "--method", "rlmo", "-r", 4, "--svd", "fast", "-o", tmp_path / "o")
    assert res.exit_code == 1 and "needs the bottom of the spectrum" in res.output


def test_fast_svd_for_principal_methods(tiny_models, tmp_path):
    res = invoke("init", tiny_models["llama"], "--method", "pissa", "-r", 4, "--svd", "fast", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "loraforge.json").read_text())["svd"] == "fast"


def test_interruption_leaves_the_previous_result(tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert invoke("init", tiny_models["qwen2"], "--method", "rlpo", "-r", 4, "-o", out).exit_code == 0
    before = (out / "adapter_model.safetensors").read_bytes()

    import loraforge.adapters.writers

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loraforge.adapters.writers, "write_residual_base", interrupted)
    res = invoke("init", tiny_models["qwen2"], "--method", "pissa", "-r", 4, "-o", out, "--overwrite")
    assert res.exit_code == 1 and "Aborted" in res.output  # click's answer to Ctrl-C
    assert (out / "adapter_model.safetensors").read_bytes() == before  # the old, complete rlpo adapter
    assert json.loads((out / "loraforge.json").read_text())["method"] == "rlpo"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no partial directory left behind


def test_installed_console_script_and_python_m(tiny_models, tmp_path):
    exe = shutil.which("loraforge") or str(__import__("pathlib").Path(sys.executable).parent / "loraforge")
    res = subprocess.run(
        [exe, "init", str(tiny_models["gpt2"]), "--method", "olora", "-r", "4", "-o", str(tmp_path / "a")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "olora r=4: 8 modules" in res.stdout
    res = subprocess.run([sys.executable, "-m", "loraforge", "init", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--method" in res.stdout


def test_readme_method_table_is_the_registry():
    from pathlib import Path

    from loraforge.inits.methods import method_table_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert method_table_markdown() in readme


def test_unreachable_hub_is_a_clear_error_within_seconds(tmp_path, monkeypatch):
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    res = invoke("init", "some-org/some-model", "--method", "rlpo", "-r", 4, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "Could not reach the Hugging Face Hub to get 'some-org/some-model'" in res.output
    assert time.monotonic() - started < 30 and not (tmp_path / "o").exists()
