"""End to end: init_adapter on tiny checkpoints, loaded back with PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, build_tiny

from loraforge import InitConfig, LoraforgeError, init_adapter, init_model
from loraforge.inits.methods import METHODS

ARCHS = list(TINY)
PROBE = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model_dir, adapter=None, dtype=torch.float32):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    with torch.no_grad():
        return model(PROBE).logits.double()


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def original_logits(tiny_models):
    return {arch: logits(path) for arch, path in tiny_models.items()}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_round_trip_gives_the_original_logits(tiny_models, original_logits, tmp_path, arch, method):
    spec = METHODS[method]
    out = tmp_path / "adapter"
    result = init_adapter(str(tiny_models[arch]), out, InitConfig(method=method, r=4, base_dtype="float32"))
    base = out / "base" if spec.residual else tiny_models[arch]
    got = logits(base, out)
    if spec.residual:
        # float32 residual base: the only error is float32 rounding of W0 - s*B0 A0.
        assert rel_err(got, original_logits[arch]) < 1e-5
    else:
        assert torch.equal(got, original_logits[arch])  # B0 = 0: exactly the original model
    assert (out / "base").exists() == spec.residual
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["fan_in_fan_out"] == (arch == "gpt2")
    manifest = json.loads((out / "loraforge.json").read_text())
    assert manifest["method"] == method and manifest["scaling"] == 2.0
    assert len(manifest["modules"]) == result.modules > 0


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_bf16_base_error_is_reported_and_bounded(tiny_models, original_logits, tmp_path, method):
    # The llama fixture is a bf16 checkpoint; base_dtype auto keeps bf16 for the residual.
    out = tmp_path / "a"
    result = init_adapter(str(tiny_models["llama"]), out, InitConfig(method=method, r=4))
    assert result.manifest["dtypes"]["base"] == "bfloat16"
    rel = result.manifest["summary"]["recon_rel_max"]
    assert 1e-4 < rel < 1e-2  # bf16 rounding of the residual: ~3 significant digits
    assert rel_err(logits(out / "base", out), original_logits["llama"]) < 2e-2


def test_manifest_records_norms_errors_and_hashes(tiny_models, tmp_path):
    out = tmp_path / "a"
    init_adapter(str(tiny_models["qwen2"]), out, InitConfig(method="pissa", r=4, alpha=16, base_dtype="float32"))
    m = json.loads((out / "loraforge.json").read_text())
    assert m["alpha"] == 16 and m["scaling"] == 4.0 and m["seed"] == 0
    assert m["source"]["local"] is True and m["base"] == "base"
    assert m["dtypes"] == {"adapter": "float32", "base": "float32", "source": "float32"}
    assert set(m["versions"]) >= {"torch", "transformers", "peft"}
    q = m["modules"]["model.layers.0.self_attn.q_proj"]
    assert q["shape"] == [64, 64] and "rank" not in q  # top-r methods do not compute the whole spectrum
    # PiSSA: s*B0 A0 is the rank-4 SVD part, so update_norm = sqrt(sum of top-4 sigma^2) and
    # init_norm = update_norm / s.
    assert q["init_norm"] == pytest.approx(q["update_norm"] / 4.0)
    assert 0 < q["recon_rel"] < 1e-6
    import hashlib

    for rel, digest in m["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    assert any(k.startswith("base/") for k in m["files"])


def test_bottom_r_methods_record_the_numerical_rank(tiny_models, tmp_path):
    r = init_adapter(str(tiny_models["qwen2"]), tmp_path / "a", InitConfig(method="rlmo", r=4))
    assert r.manifest["modules"]["model.layers.0.mlp.down_proj"]["rank"] == 64  # 64 x 112, full rank


def test_pissa_update_norm_equals_top_singular_energy(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "a"
    init_adapter(str(tiny_models["llama-tied"]), out, InitConfig(method="pissa", r=3))
    m = json.loads((out / "loraforge.json").read_text())
    W = (
        AutoModelForCausalLM.from_pretrained(tiny_models["llama-tied"])
        .model.layers[1]
        .mlp.down_proj.weight.detach()
        .double()
    )
    S = torch.linalg.svdvals(W)
    assert m["modules"]["model.layers.1.mlp.down_proj"]["update_norm"] == pytest.approx(float(S[:3].norm()), rel=1e-6)


@pytest.mark.parametrize("method", ["rlpo", "pissa", "wavelet"])
def test_same_command_twice_gives_byte_identical_files(tiny_models, tmp_path, method):
    out = tmp_path / "a"

    def weight_files():
        return {
            p.relative_to(out): p.read_bytes()
            for p in sorted(out.rglob("*"))
            if p.suffix in (".safetensors", ".json") and p.name != "loraforge.json"
        }  # the manifest records timings

    init_adapter(str(tiny_models["qwen2"]), out, InitConfig(method=method, r=4))
    first = weight_files()
    init_adapter(str(tiny_models["qwen2"]), out, InitConfig(method=method, r=4), overwrite=True)
    assert weight_files() == first
    assert (out / "base").exists() == METHODS[method].residual


def test_residuals_held_in_memory_or_parked_on_disk_give_the_same_base(tiny_models, tmp_path):
    # residual_mib=0 parks every batch's residuals in OUT/.residuals until its shard is written (what a
    # 7B model does); the default holds a tiny model's in memory. Same bytes either way, nothing left over.
    def files(out):  # the weights and everything in base/ (the adapter config names OUT/base's absolute path)
        return {
            p.relative_to(out): p.read_bytes()
            for p in sorted(out.rglob("*"))
            if p.is_file() and (p.suffix == ".safetensors" or p.relative_to(out).parts[0] == "base")
        }

    held, parked = tmp_path / "held", tmp_path / "parked"
    init_adapter(str(tiny_models["qwen2"]), held, InitConfig(method="pissa", r=4))
    init_adapter(str(tiny_models["qwen2"]), parked, InitConfig(method="pissa", r=4, residual_mib=0))
    assert files(held) == files(parked) and any(p.parts[0] == "base" for p in files(held))
    assert not (parked / ".residuals").exists()


def test_auto_peft_model_finds_the_residual_base(tiny_models, original_logits, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "a"
    init_adapter(str(tiny_models["qwen2"]), out, InitConfig(method="olora", r=4, base_dtype="float32"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(out.resolve() / "base")
    model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = model(PROBE).logits.double()
    assert rel_err(got, original_logits["qwen2"]) < 1e-5


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_streaming_and_in_memory_paths_write_identical_adapters(tiny_models, tmp_path, arch):
    streamed, loaded = tmp_path / "s", tmp_path / "m"
    cfg = dict(method="milora", r=4, base_dtype="float32")
    r1 = init_adapter(str(tiny_models[arch]), streamed, InitConfig(**cfg))
    r2 = init_adapter(str(tiny_models[arch]), loaded, InitConfig(**cfg), device_map="cpu")
    assert (r1.manifest["path"], r2.manifest["path"]) == ("streaming", "in-memory")
    assert (streamed / "adapter_model.safetensors").read_bytes() == (loaded / "adapter_model.safetensors").read_bytes()
    ref = logits(streamed / "base", streamed)
    torch.testing.assert_close(logits(loaded / "base", loaded), ref, rtol=0, atol=0)


def test_init_model_in_memory_returns_a_ready_peft_model():
    from peft import PeftModel

    model = build_tiny("llama").float()
    model.name_or_path = "tiny-llama"
    with torch.no_grad():
        ref = model(PROBE).logits
    peft_model = init_model(model, InitConfig(method="pissa", r=4))
    assert isinstance(peft_model, PeftModel)
    with torch.no_grad():
        got = peft_model(PROBE).logits
    assert rel_err(got.double(), ref.double()) < 1e-5
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().sum() > 0  # PiSSA's B0 != 0 was copied in


def test_layers_and_target_modules_select_modules(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "a"
    r = init_adapter(
        str(tiny_models["llama-tied"]),
        out,
        InitConfig(method="rlpo", r=2, target_modules=["q_proj", "v_proj"], layers=[0, 2]),
    )
    assert sorted(r.manifest["modules"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 2) for p in ("q_proj", "v_proj")
    ]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["llama-tied"]), out)
    wrapped = sorted(n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A"))
    assert wrapped == sorted("base_model.model." + n for n in r.manifest["modules"])


def test_default_targets_are_all_linear_but_the_head(tiny_models, tmp_path):
    r = init_adapter(str(tiny_models["llama"]), tmp_path / "a", InitConfig(method="lora", r=2))
    assert len(r.manifest["modules"]) == 2 * 7 and not any("lm_head" in k for k in r.manifest["modules"])
    assert r.manifest["alpha"] == 4.0  # alpha defaults to 2r


def test_hub_id_resolves_through_the_huggingface_cache(tiny_models, tmp_path, monkeypatch):
    """The real huggingface_hub code path, offline, against a cache laid out as the Hub client does."""
    import shutil

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snap = repo / "snapshots" / sha
    shutil.copytree(tiny_models["llama"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    r = init_adapter("tiny-org/tiny-llama", tmp_path / "a", InitConfig(method="rlpo", r=2))
    assert r.manifest["source"] == {"model_id": "tiny-org/tiny-llama", "revision": sha, "local": False}
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny-org/tiny-llama"
    with pytest.raises(LoraforgeError, match="not in the local cache"):
        init_adapter("tiny-org/absent", tmp_path / "b", InitConfig(method="rlpo", r=2))


@pytest.mark.parametrize("method", ["pissa", "rlmo"])
def test_batches_spread_over_several_devices_give_the_single_device_result(method):
    # What `--device cuda` does on a machine with several GPUs, with two CPU "devices" standing in:
    # batches go round-robin to worker threads and come back in order, each computed whole on one
    # device, so every factor, residual and statistic equals the one-device run exactly.
    from loraforge.inits.compute import compute_inits
    from loraforge.models.targets import find_targets

    model = build_tiny("llama").float()
    modules = dict(model.named_modules())
    targets = find_targets(model)
    read = lambda t: modules[t.name].weight.detach()  # noqa: E731
    config = InitConfig(method=method, r=4, batch_mib=1)
    one = [m for b in compute_inits(targets, read, config, torch.device("cpu")) for m in b]
    two = [m for b in compute_inits(targets, read, config, [torch.device("cpu")] * 2) for m in b]
    assert [m.target for m in two] == [m.target for m in one] and sorted(m.target.name for m in one) == sorted(
        t.name for t in targets
    )
    for a, b in zip(one, two):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and a.stats == b.stats
        assert (a.base is None and b.base is None) or torch.equal(a.base, b.base)


def test_a_bare_cuda_device_means_every_visible_gpu(monkeypatch):
    # The selection rule only (no GPU here): cuda / auto with 3 GPUs -> all 3; cuda:1 -> just that one.
    from loraforge.core.devices import decomposition_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert decomposition_devices("cuda") == decomposition_devices("auto") == [torch.device("cuda", i) for i in range(3)]
    assert decomposition_devices("cuda:1") == [torch.device("cuda", 1)]
    assert decomposition_devices("cpu") == [torch.device("cpu")]


def test_results_do_not_share_memory_with_the_reused_workspace():
    # Batches reuse one buffer per role (W, its float32 copy, s B0 A0). A float64 checkpoint makes the
    # residual's dtype that of the buffer, the case where a cast could silently return a view into it.
    from loraforge.inits.compute import Workspace, _init_batch
    from loraforge.models.targets import Target

    gen = torch.Generator().manual_seed(0)
    targets = [Target(f"m{i}", 12, 10, False, i) for i in range(2)]
    first_w = [torch.randn(12, 10, generator=gen, dtype=torch.float64) for _ in targets]
    config = InitConfig(method="pissa", r=3)
    ws = Workspace()
    first = _init_batch(targets, first_w, config, torch.device("cpu"), ws)
    kept = [(m.A.clone(), m.B.clone(), m.base.clone()) for m in first]
    _init_batch(
        targets,
        [torch.randn(12, 10, generator=gen, dtype=torch.float64) for _ in targets],
        config,
        torch.device("cpu"),
        ws,
    )
    for m, (A, B, base) in zip(first, kept):
        assert torch.equal(m.A, A) and torch.equal(m.B, B) and torch.equal(m.base, base)
    # and the first batch's residual is right: base + s B0 A0 = W (float64 base: to ~1e-15)
    for m, w in zip(first, first_w):
        torch.testing.assert_close(m.base + config.scaling * m.B.double() @ m.A.double(), w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("base_dtype", ["auto", "float32"])
def test_fast_svd_residual_precision_follows_the_base_dtype(tiny_models, tmp_path, base_dtype):
    # --svd fast forms a 16-bit base's residual in float32 (its error, ~6e-8 of W, vanishes in bf16's
    # rounding, which recon_* still report) but a float32 base's in float64: float32 arithmetic there
    # would report a reconstruction error of exactly 0 that is not true.
    out = tmp_path / base_dtype
    result = init_adapter(
        str(tiny_models["llama"]), out, InitConfig(method="pissa", r=4, svd="fast", base_dtype=base_dtype)
    )
    worst = result.manifest["summary"]["recon_rel_max"]
    if base_dtype == "auto":  # the llama fixture is bf16: bf16 rounding, ~1e-3
        assert 1e-4 < worst < 1e-2
    else:  # float32 rounding of a float64 residual: nonzero, ~1e-8
        assert 0 < worst < 1e-6
    from loraforge.ship.verify import verify_adapter

    assert verify_adapter(out).ok
