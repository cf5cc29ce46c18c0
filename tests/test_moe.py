"""MoE models: experts read expert by expert from either checkpoint layout, residual bases in the checkpoint's own
layout, PEFT's config rewriting caught and worked around, routers and tiny gates out of the default set, init_model
in memory. (Every architecture's round trip through PEFT is in test_model_zoo.py.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from adapter_helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from click.testing import CliRunner
from test_model_zoo import _build

from loraforge import InitConfig, init_adapter
from loraforge.cli import main


def _keys_and_shapes(directory) -> dict:
    from loraforge.models.source import resolve_source

    source = resolve_source(str(directory))
    return {k: source.open_shard(s).tensors[k].shape for k, s in source.weight_map.items()}


def _logits_rel(model, base_dir, adapter_dir) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(ids).logits, peft_model(ids).logits
    return float((got - want).norm() / want.norm())


@pytest.fixture(scope="module")
def qwen3_moe():
    return _build("qwen3_moe")


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert-keys", "fused-keys"])
@pytest.mark.parametrize("mib", [512, 0], ids=["held", "parked"])
def test_residual_base_keeps_the_checkpoint_layout(qwen3_moe, fused, mib, tmp_path):
    # save_pretrained writes experts per expert (transformers 4's names) by default, fused without it.
    src = tmp_path / "src"
    qwen3_moe.save_pretrained(src, save_original_format=not fused)
    layout = _keys_and_shapes(src)
    assert ("model.layers.0.mlp.experts.gate_up_proj" in layout) == fused
    assert ("model.layers.0.mlp.experts.3.up_proj.weight" in layout) == (not fused)
    result = init_adapter(str(src), tmp_path / "out", InitConfig(method="pissa", r=4, residual_mib=mib))
    assert result.manifest["path"] == "streaming"  # read expert by expert, not by loading the model
    assert _keys_and_shapes(tmp_path / "out" / "base") == layout
    assert _logits_rel(qwen3_moe, tmp_path / "out" / "base", tmp_path / "out") <= 1e-4
    stack = result.manifest["modules"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert stack["experts"] == 4 and stack["shape"] == [48, 32] and len(stack["per_expert"]["init_norm"]) == 4


def test_a_fused_stack_is_read_one_expert_at_a_time(qwen3_moe, tmp_path):
    from loraforge.models.experts import expert_keys
    from loraforge.models.source import resolve_source
    from loraforge.models.targets import Target

    qwen3_moe.save_pretrained(tmp_path, save_original_format=False)
    source = resolve_source(str(tmp_path))
    t = Target("model.layers.1.mlp.experts.down_proj", 32, 24, False, 1, experts=4)
    keys = expert_keys(t, source, "qwen3_moe")
    assert keys.fused == t.name
    W = qwen3_moe.model.layers[1].mlp.experts.down_proj.detach()
    for e in range(4):
        assert torch.equal(keys.read(source, e), W[e])


def test_an_expert_stack_is_cut_into_batches_of_experts():
    # A Qwen3-30B-A3B-shaped layer: 128 experts, gate_up (1536 x 2048), down (2048 x 768); --batch-mib 512.
    from loraforge.inits.plan import plan_batches
    from loraforge.models.targets import Target

    gate_up = Target("model.layers.0.mlp.experts.gate_up_proj", 1536, 2048, False, 0, experts=128)
    down = Target("model.layers.0.mlp.experts.down_proj", 2048, 768, False, 0, experts=128)
    budget = 512 * 2**20
    batches = plan_batches([u for t in (gate_up, down) for u in t.units()], budget)
    for batch in batches:
        m, n = batch[0].shape
        assert len(batch) * 24 * m * n <= budget  # float64 matrices at ~3x their size while decomposed
    assert sorted((b.name, b.expert) for batch in batches for b in batch) == sorted(
        (t.name, e) for t in (gate_up, down) for e in range(128)
    )


def test_peft_config_rewriting_is_caught_and_the_dense_mlps_written_as_parameters(tmp_path):
    # PEFT moves gate/up/down_proj targets of DeepSeek-V3 to the fused experts: the dense MLP of layer 0 and the
    # shared experts of layer 1 would get no LoRA. The plan is compared with what PEFT itself builds.
    from loraforge.adapters.build import select_targets
    from loraforge.adapters.peft_config import differences, plan_peft_form
    from loraforge.adapters.peft_view import adapted_by_peft
    from loraforge.models.targets import meta_skeleton

    model = _build("deepseek_v3")
    skeleton = meta_skeleton(model)
    config = InitConfig(method="pissa", r=4)
    targets, _ = select_targets(skeleton, config)
    naive = {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "target_parameters": ["experts.gate_up_proj"]}
    naive["target_modules"] = sorted({t.name.rsplit(".", 1)[-1] for t in targets if not t.experts})
    lost = differences(adapted_by_peft(skeleton, naive), targets, config)
    assert "model.layers.0.mlp.gate_proj" in lost and "model.layers.1.mlp.shared_experts.down_proj" in lost
    form = plan_peft_form(skeleton, targets, config, False)
    assert form.as_parameters == ["down_proj", "gate_proj", "up_proj"]
    assert {"gate_proj.weight", "experts.gate_up_proj"} <= set(form.target_parameters)
    assert not {"gate_proj", "up_proj", "down_proj"} & set(form.target_modules)

    model.save_pretrained(tmp_path / "src")
    res = CliRunner().invoke(
        main, ["init", str(tmp_path / "src"), "--method", "pissa", "-r", "4", "-o", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.output
    assert "written as PEFT target_parameters" in res.output
    assert "pissa r=4: 18 modules (2 of them expert stacks, 8 experts) in" in res.output
    manifest = json.loads((tmp_path / "o" / "loraforge.json").read_text())
    assert manifest["peft"]["modules_as_parameters"] == ["down_proj", "gate_proj", "up_proj"]
    assert _logits_rel(model, tmp_path / "o" / "base", tmp_path / "o") <= 1e-4


@pytest.fixture(scope="module")
def qwen2_moe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_moe")
    _build("qwen2_moe").save_pretrained(path)
    return path


def test_default_targets_leave_out_gates_and_modules_smaller_than_r(qwen2_moe_dir, tmp_path):
    res = CliRunner().invoke(
        main, ["init", str(qwen2_moe_dir), "--method", "rlpo", "-r", "4", "-o", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.output
    assert "note: model.layers.*.mlp.shared_expert_gate (2 modules) left out of the default targets (router/gate" in (
        res.output
    )
    manifest = json.loads((tmp_path / "o" / "loraforge.json").read_text())
    assert set(manifest["skipped"]) == {f"model.layers.{i}.mlp.shared_expert_gate" for i in (0, 1)}
    assert not any("shared_expert_gate" in m for m in manifest["modules"])
    assert "model.layers.1.mlp.experts.down_proj" in manifest["modules"]


def test_a_named_gate_smaller_than_r_is_an_error_and_at_r_1_it_is_adapted(qwen2_moe_dir, tmp_path):
    args = ["init", str(qwen2_moe_dir), "--method", "rlpo", "--target-modules", "shared_expert_gate"]
    res = CliRunner().invoke(main, [*args, "-r", "4", "-o", str(tmp_path / "a")])
    assert res.exit_code == 1 and "rank is at most 1" in res.output and not (tmp_path / "a").exists()
    res = CliRunner().invoke(main, [*args, "-r", "1", "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "b" / "loraforge.json").read_text())
    assert set(manifest["modules"]) == {f"model.layers.{i}.mlp.shared_expert_gate" for i in (0, 1)}


def test_a_default_set_with_nothing_as_large_as_r_asks_for_a_lower_r(tmp_path):
    # Default-set modules smaller than r are left out; when that leaves nothing (every matrix of this tiny model is
    # at most 32 wide), the init stops with one line saying what to do, and writes nothing.
    _build("qwen3_moe").save_pretrained(tmp_path / "src")
    res = CliRunner().invoke(
        main, ["init", str(tmp_path / "src"), "--method", "rlpo", "-r", "33", "-o", str(tmp_path / "o")]
    )
    assert res.exit_code == 1 and "Lower -r" in res.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("model_type", ["deepseek_v3", "gpt_oss"])
def test_init_model_in_memory_adapts_every_expert(model_type):
    from loraforge import init_model
    from loraforge.adapters.peft_view import adapted_in

    model = _build(model_type)
    original = copy.deepcopy(model)
    peft_model = init_model(model, InitConfig(method="pissa", r=4)).eval()
    built = adapted_in(peft_model)
    assert any(a.experts == 4 for a in built.values())
    assert ("model.layers.0.mlp.gate_proj", "weight") in built or model_type == "gpt_oss"
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = original(ids).logits, peft_model(ids).logits
    assert float((got - want).norm() / want.norm()) <= 1e-4


@pytest.mark.parametrize("method", ["rlpo", "pissa"])
def test_verify_checks_each_expert_against_its_own_weights(qwen3_moe, method, tmp_path):
    from safetensors.torch import load_file, save_file

    from loraforge.ship.verify import verify_adapter

    qwen3_moe.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    init_adapter(str(tmp_path / "src"), out, InitConfig(method=method, r=4))
    report = verify_adapter(out)
    assert report.ok, [(c.name, c.failures) for c in report.checks]
    assert "model.layers.1.mlp.experts.gate_up_proj.3" in report.modules

    # Swap experts 0 and 1 of one stack's lora_A (expert-major rows): the formula check names exactly those two.
    tensors = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"  # gate_up_proj: the inner wrapper
    A = tensors[key].clone()
    tensors[key] = torch.cat([A[4:8], A[0:4], A[8:]])
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    failing = verify_adapter(out).failing
    assert "model.layers.1.mlp.experts.gate_up_proj.0" in failing
    assert "model.layers.1.mlp.experts.gate_up_proj.1" in failing
    assert "model.layers.1.mlp.experts.gate_up_proj.2" not in failing


def test_one_expert_parameter_named_alone_loads_as_written(qwen3_moe, tmp_path):
    # With one parameter of the experts module targeted, PEFT saves it as experts.lora_A (no base_layer nesting).
    qwen3_moe.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    config = InitConfig(method="pissa", r=4, target_modules=["q_proj", "gate_up_proj"])
    result = init_adapter(str(tmp_path / "src"), out, config)
    assert set(result.manifest["modules"]) == {
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.experts.gate_up_proj")
    }
    assert _logits_rel(qwen3_moe, out / "base", out) <= 1e-4


def test_layers_scope_experts_and_dense_mlps_with_full_parameter_paths(tmp_path):
    # --layers 1 on DeepSeek-V3: layer 1's experts and shared experts only, not layer 0's dense MLP; a leaf name
    # in target_parameters would reach every layer, so the paths are written in full.
    model = _build("deepseek_v3")
    model.save_pretrained(tmp_path / "src")
    result = init_adapter(str(tmp_path / "src"), tmp_path / "out", InitConfig(method="pissa", r=4, layers=[1]))
    modules = set(result.manifest["modules"])
    assert "model.layers.1.mlp.experts.down_proj" in modules and "model.layers.1.mlp.shared_experts.up_proj" in modules
    assert not any(m.startswith("model.layers.0.") for m in modules)
    params = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_parameters"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in params
    assert _logits_rel(model, tmp_path / "out" / "base", tmp_path / "out") <= 1e-4


def test_header_layouts_are_types_peft_never_rewrites():
    # init reads these dense layouts from the checkpoint header and skips the PEFT check (no transformers import):
    # PEFT rewrites adapter configs only for model types with a transformers checkpoint conversion.
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from loraforge.models.targets import HEADER_LAYOUTS

    assert all(get_checkpoint_conversion_mapping(t) is None for t in HEADER_LAYOUTS)


def test_convert_concatenates_expert_factors_expert_by_expert(tmp_path):
    # A pissa adapter trained on its residual base -> a rank-2r LoRA for the original base: for fused experts the
    # concatenation [A_e ; A0_e], [B_e | -B0_e] must happen per expert, inside PEFT's interleaved layout.
    from adapter_helpers import fake_train, logits, rel_err

    from loraforge.ship.convert import convert_adapter

    _build("deepseek_v3").save_pretrained(tmp_path / "src")
    init_adapter(str(tmp_path / "src"), tmp_path / "init", InitConfig(method="pissa", r=4))
    fake_train(tmp_path / "init", tmp_path / "init" / "base", tmp_path / "trained")
    convert_adapter(tmp_path / "trained", tmp_path / "init", tmp_path / "plain")
    want = logits(tmp_path / "init" / "base", tmp_path / "trained")
    assert rel_err(logits(tmp_path / "src", tmp_path / "plain"), want) <= 1e-5
    assert rel_err(logits(tmp_path / "src"), want) > 1e-3  # training moved the model: the check has teeth


def test_convert_refuses_an_expert_with_nan_rows_even_with_a_lineage_record(qwen3_moe, tmp_path):
    # Once: with the lineage record `loraforge train` leaves, convert skipped every check on the factors and wrote a
    # non-finite experts lora_A with exit 0 (without it, the init-distance check happened to refuse it).
    from adapter_helpers import fake_train
    from safetensors.torch import load_file, save_file

    from loraforge.adapters.lineage import LINEAGE_FILE, LINEAGE_FORMAT, init_record

    qwen3_moe.save_pretrained(tmp_path / "src")
    init = init_adapter(str(tmp_path / "src"), tmp_path / "init", InitConfig(method="pissa", r=4)).out
    trained = fake_train(init, init / "base", tmp_path / "trained")
    (trained / LINEAGE_FILE).write_text(json.dumps({"format": LINEAGE_FORMAT, "init": init_record(str(init))}))
    weights = load_file(str(trained / "adapter_model.safetensors"))
    key = next(k for k in weights if "experts" in k and "lora_A" in k and weights[k].shape[0] == 4 * 4)
    weights[key][4:8] = float("nan")  # expert 1 of 4 (r = 4: rows 4..7)
    save_file(weights, str(trained / "adapter_model.safetensors"), metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["convert", str(trained), "--init", str(init), "-o", str(tmp_path / "plain")])
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: TRAINED_ADAPTER {trained}: {key} has ") and "non-finite value(s)" in line
    assert "the first at row 4, column 0 (expert 1 of 4)" in line and not (tmp_path / "plain").exists()


def test_inspect_diagnoses_each_expert(qwen3_moe, tmp_path):
    from adapter_helpers import fake_train

    from loraforge.ship.inspect import inspect_adapter

    qwen3_moe.save_pretrained(tmp_path / "src")
    init_adapter(str(tmp_path / "src"), tmp_path / "init", InitConfig(method="rlpo", r=4))
    fake_train(tmp_path / "init", tmp_path / "src", tmp_path / "trained")
    report = inspect_adapter(tmp_path / "trained", init=tmp_path / "init")
    names = {row.name for row in report.modules}
    assert {f"model.layers.1.mlp.experts.down_proj.{e}" for e in range(4)} <= names


def test_factors_and_residuals_parked_on_disk_write_the_same_adapter(tmp_path):
    # With no memory budget (residual_mib 0) every finished module's factors and residual wait in the staging
    # directory until written: the same tensors come out, and nothing of the parking is left behind.
    from safetensors.torch import load_file

    _build("deepseek_v3").save_pretrained(tmp_path / "src")
    for name, mib in (("held", 512), ("parked", 0)):
        init_adapter(str(tmp_path / "src"), tmp_path / name, InitConfig(method="pissa", r=4, residual_mib=mib))
    held, parked = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("held", "parked"))
    assert held.keys() == parked.keys() and all(torch.equal(held[k], parked[k]) for k in held)
    assert _keys_and_shapes(tmp_path / "held" / "base") == _keys_and_shapes(tmp_path / "parked" / "base")
    assert sorted(p.name for p in (tmp_path / "parked").iterdir()) == sorted(
        p.name for p in (tmp_path / "held").iterdir()
    )


def test_a_plan_peft_cannot_build_is_refused_naming_the_modules():
    # The safety net behind every init: whatever PEFT builds differently from the plan, in every form tried, is
    # refused before any work. Here the plan says q_proj is 40 x 32; PEFT (rightly) builds it 32 x 32.
    from loraforge.adapters.build import select_targets
    from loraforge.adapters.peft_config import plan_peft_form
    from loraforge.core.errors import LoraforgeError
    from loraforge.models.targets import Target, meta_skeleton

    skeleton = meta_skeleton(_build("deepseek_v3"))
    config = InitConfig(method="rlpo", r=4)
    targets, _ = select_targets(skeleton, config)
    wrong = [
        Target(t.name, 40, t.in_features, False, t.layer) if t.name.endswith("0.mlp.gate_proj") else t for t in targets
    ]
    with pytest.raises(LoraforgeError) as e:
        plan_peft_form(skeleton, wrong, config, False)
    message = str(e.value)
    assert "model.layers.0.mlp.gate_proj: PEFT builds lora_A [4, 32], lora_B [64, 4]" in message
    assert "Nothing was written" in message and "--target-modules down_proj,gate_up_proj,kv_a_proj" in message


@pytest.mark.parametrize("model_type, router", [("qwen3_moe", "gate"), ("gpt_oss", "router")])
def test_a_router_named_in_target_modules_is_adapted_and_verifies(model_type, router, tmp_path):
    # transformers 5's routers hold a 2-D weight but are not linear layers: PEFT adapts them through
    # target_parameters (router.weight), and attention stays an ordinary LoRA layer.
    from loraforge.ship.verify import verify_adapter

    model = _build(model_type)
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    result = init_adapter(
        str(tmp_path / "src"), out, InitConfig(method="pissa", r=2, target_modules=["q_proj", router])
    )
    assert result.manifest["peft"]["target_modules"] == ["q_proj"]
    assert result.manifest["peft"]["target_parameters"] == [f"{router}.weight"]
    assert f"model.layers.1.mlp.{router}" in result.manifest["modules"]
    assert _logits_rel(model, out / "base", out) <= 1e-4
    report = verify_adapter(out)
    assert report.ok, [(c.name, c.failures) for c in report.checks]
