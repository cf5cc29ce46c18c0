"""`loraforge verify`: clean inits pass; tampered files, tampered tensors and wrong bases fail, named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from adapter_helpers import one_torch_thread, rewrite_factor  # noqa: F401 (autouse fixture)
from conftest import build_tiny, invoke, make_tokenizer

from loraforge import InitConfig, LoraforgeError, init_adapter
from loraforge.inits.methods import METHODS
from loraforge.ship.verify import verify_adapter

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def inits(tiny_models, tmp_path_factory):
    """One init per method on the bf16 llama (r=4), made once; tests copy before tampering."""
    root = tmp_path_factory.mktemp("verify-inits")
    return {m: init_adapter(str(tiny_models["llama"]), root / m, InitConfig(method=m, r=4)).out for m in METHODS}


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory):
    """Same architecture and shapes as the llama fixture, different weights: the wrong base to catch."""
    path = tmp_path_factory.mktemp("other") / "llama-seed1"
    model = build_tiny("llama", seed=1)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("method", list(METHODS))
def test_fresh_init_passes_every_check_that_applies(inits, method):
    report = verify_adapter(inits[method])
    assert report.ok, {c.name: c.failures for c in report.checks}
    status = {c.name: c.status for c in report.checks}
    spec = METHODS[method]
    assert status["hashes"] == status["config"] == status["factors"] == status["formula"] == "ok"
    assert status["reconstruction"] == ("ok" if spec.residual else "n/a")
    assert status["B0 = 0"] == ("n/a" if spec.residual else "ok")
    promises_orthonormal = spec.orthonormal or method in ("olora", "olora-tail")
    assert status["orthonormal"] == ("ok" if promises_orthonormal else "n/a")
    assert len(report.modules) == 14
    if spec.residual:
        # bf16 residual base: the recorded error is the rounding of bf16, and it is reported per module.
        rel = max(m["recon_rel"] for m in report.modules.values())
        assert 1e-4 < rel < 1e-2
        assert "residual base" in report.serve and "NOT the original" in report.serve
    else:
        assert "original base" in report.serve and "residual" not in report.serve


@pytest.mark.parametrize("arch, method", [("gpt2", "pissa"), ("gpt2", "rlmo"), ("qwen2", "olora-tail")])
def test_conv1d_and_sharded_checkpoints_verify(tiny_models, tmp_path, arch, method):
    out = init_adapter(str(tiny_models[arch]), tmp_path / "a", InitConfig(method=method, r=4)).out
    report = verify_adapter(out)
    assert report.ok, {c.name: c.failures for c in report.checks}
    assert report.modules and all(m["formula_deviation"] < 1e-6 for m in report.modules.values())


@pytest.mark.parametrize("method", ["pissa", "rlpo", "olora"])  # olora: orthonormal B0 columns too
def test_fast_svd_inits_verify_against_the_same_randomised_svd(tiny_models, tmp_path, method):
    # --svd fast is reproduced from the manifest's seed and compared as a subspace (within FAST_SVD_TOL).
    out = init_adapter(str(tiny_models["llama"]), tmp_path / "a", InitConfig(method=method, r=4, svd="fast")).out
    report = verify_adapter(out)
    assert report.ok, {c.name: c.failures for c in report.checks}
    assert {c.name: c.status for c in report.checks}["formula"] == "ok"


def test_cli_prints_checks_and_the_server_base(inits):
    res = invoke("verify", inits["pissa"])
    assert res.exit_code == 0, res.output
    assert "reconstruction  ok      max rel" in res.output and "bfloat16 base" in res.output
    assert f"vLLM must load the residual base {inits['pissa']}/base" in res.output
    res = invoke("verify", inits["rlpo"])
    assert res.exit_code == 0 and "vLLM loads the original base" in res.output


def test_changed_byte_fails_the_hash_check_naming_the_file(inits, tmp_path):
    out = copy(inits["rlpo"], tmp_path)
    path = out / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    res = invoke("verify", out)
    assert res.exit_code == 1
    assert "hashes          FAILED" in res.output
    assert "adapter_model.safetensors: sha256" in res.output and "changed after init" in res.output


def test_changed_tensor_with_rerecorded_hash_is_caught_by_the_math(inits, tmp_path):
    # Orthonormal rows: scaling one A0 by 1.01 keeps its row space but breaks A0 A0^T = I.
    out = copy(inits["rlpo"], tmp_path)
    rewrite_factor(out, Q, "A", lambda a: a * 1.01)
    report = verify_adapter(out)
    check = {c.name: c for c in report.checks}
    assert check["hashes"].ok and not report.ok
    assert list(check["orthonormal"].failures) == [Q]
    assert report.failing == [Q]


def test_changed_b0_of_a_residual_init_fails_reconstruction_for_that_module(inits, tmp_path):
    out = copy(inits["pissa"], tmp_path)
    rewrite_factor(out, Q, "B", lambda b: b * 1.02)
    res = invoke("verify", out)
    assert res.exit_code == 1
    assert f"{Q}: relative error" in res.output and "is not the original weight" in res.output
    assert "verification failed for 1 module(s)/file(s): " + Q in res.output


def test_changed_random_init_fails_the_formula(inits, tmp_path):
    # lora promises no orthonormality; its A0 is the seeded Gaussian, recomputed exactly.
    out = copy(inits["lora"], tmp_path)
    rewrite_factor(out, Q, "A", lambda a: a.flip(0))
    report = verify_adapter(out)
    formula = next(c for c in report.checks if c.name == "formula")
    assert list(formula.failures) == [Q] and "seed 0" in formula.failures[Q]


def test_nonzero_b0_fails_for_a_b0_zero_method(inits, tmp_path):
    out = copy(inits["dct"], tmp_path)
    rewrite_factor(out, Q, "B", lambda b: b + 1e-3)
    report = verify_adapter(out)
    assert list(next(c for c in report.checks if c.name == "B0 = 0").failures) == [Q]


@pytest.mark.parametrize(
    "method, check", [("pissa", "reconstruction"), ("milora", "formula"), ("rlpo", "formula"), ("rlmo", "formula")]
)
def test_wrong_base_with_the_same_shapes_fails(inits, other_llama, method, check):
    report = verify_adapter(inits[method], base=str(other_llama))
    failed = next(c for c in report.checks if c.name == check)
    assert len(failed.failures) == 14, failed.failures  # every module
    assert report.base_model == str(other_llama)


def test_wrong_architecture_base_fails_on_shapes(inits, tiny_models):
    res = invoke("verify", inits["rlpo"], "--base", tiny_models["qwen2"])
    assert res.exit_code == 1
    assert "is 112 x 64 in" in res.output and "a different base model" in res.output


def test_config_that_would_rerun_the_init_fails(inits, tmp_path):
    out = copy(inits["pissa"], tmp_path)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa"
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    report = verify_adapter(out)
    failures = next(c for c in report.checks if c.name == "config").failures
    assert (
        "init_lora_weights" in failures["adapter_config.json"] and "re-run an init" in failures["adapter_config.json"]
    )


def test_missing_residual_base_is_reported(inits, tmp_path):
    out = copy(inits["olora"], tmp_path)
    shutil.rmtree(out / "base")
    report = verify_adapter(out)
    assert not report.ok
    assert "base/model.safetensors" in next(c for c in report.checks if c.name == "hashes").failures
    assert "missing" in next(c for c in report.checks if c.name == "reconstruction").failures["base/"]


def test_not_an_adapter_and_not_an_init_are_clear_errors(tiny_models, tmp_path, inits):
    res = invoke("verify", tiny_models["llama"])
    assert res.exit_code == 1 and "not a PEFT adapter directory" in res.output and "model directory" in res.output
    res = invoke("verify", tmp_path / "nothing")
    assert res.exit_code == 1 and "no such directory" in res.output
    plain = copy(inits["rlpo"], tmp_path)
    (plain / "loraforge.json").unlink()
    with pytest.raises(LoraforgeError, match="no loraforge.json"):
        verify_adapter(plain)


def test_source_moved_away_asks_for_base(tiny_models, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], src)
    out = init_adapter(str(src), tmp_path / "a", InitConfig(method="rlpo", r=2)).out
    shutil.rmtree(src)
    with pytest.raises(LoraforgeError, match="Pass the original model with --base"):
        verify_adapter(out)
    assert verify_adapter(out, base=str(tiny_models["llama"])).ok


@pytest.mark.parametrize("method, which", [("rlpo", "A"), ("lora", "A"), ("pissa", "AB"), ("olora", "AB")])
def test_all_zero_factors_fail_the_nonzero_check(inits, tmp_path, method, which):
    # What an underflowed init looks like (e.g. pissa at --alpha 1e300): with hashes re-recorded, only the
    # math can notice, and a zero A0 (or B0 of a residual init) is a direction that never trains.
    out = copy(inits[method], tmp_path)
    for w in which:
        rewrite_factor(out, Q, w, lambda t: torch.zeros_like(t))
    report = verify_adapter(out)
    nonzero = next(c for c in report.checks if c.name == "nonzero")
    assert list(nonzero.failures) == [Q] and "never train" in nonzero.failures[Q]
    assert not report.ok


def test_one_zero_row_of_a0_fails(inits, tmp_path):
    out = copy(inits["rlpo"], tmp_path)
    rewrite_factor(out, Q, "A", lambda a: torch.cat([a[:-1], torch.zeros_like(a[-1:])]))
    nonzero = next(c for c in verify_adapter(out).checks if c.name == "nonzero")
    assert "1 all-zero rows of A0" in nonzero.failures[Q]


@pytest.mark.parametrize("rel", ["base/config.json", "base/tokenizer.json", "base/generation_config.json"])
def test_a_changed_base_config_or_tokenizer_fails_the_hash_check(inits, tmp_path, rel):
    out = copy(inits["pissa"], tmp_path)
    with open(out / rel, "a") as f:
        f.write(" ")
    hashes = next(c for c in verify_adapter(out).checks if c.name == "hashes")
    assert rel in hashes.failures and "changed after init" in hashes.failures[rel]


def test_every_file_of_out_is_hashed_and_an_added_file_fails(inits, tmp_path):
    out = copy(inits["pissa"], tmp_path)
    manifest = json.loads((out / "loraforge.json").read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], *manifest["files_unhashed"]]) == on_disk
    (out / "base" / "special_tokens_map.json").write_text("{}")  # a file init did not write
    hashes = next(c for c in verify_adapter(out).checks if c.name == "hashes")
    assert "added after init" in hashes.failures["base/special_tokens_map.json"]


def test_an_older_manifest_names_the_files_it_does_not_cover(inits, tmp_path):
    out = copy(inits["pissa"], tmp_path)
    manifest = json.loads((out / "loraforge.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k.endswith(".safetensors")}
    del manifest["files_unhashed"]  # as init wrote it before every file was hashed
    (out / "loraforge.json").write_text(json.dumps(manifest))
    report = verify_adapter(out)
    hashes = next(c for c in report.checks if c.name == "hashes")
    assert report.ok and "NOT covered" in hashes.detail and "base/config.json" in hashes.detail
