"""The architecture zoo: tiny random configs of 39 transformers causal-LM model types (23 dense, 16 MoE), each
initialised with rlpo, rlmo and pissa and loaded back the way a user does (PeftModel.from_pretrained on the right
base). Checks, per model type and method:
- what PEFT builds from the adapter directory is exactly what the manifest lists, and every saved tensor is what
  PEFT holds after loading (nothing dropped, nothing remapped);
- logits equal the original float32 model's within 1e-4 relative (pissa: residual base + adapter);
- rlpo on fused experts: through PEFT's own ParamWrapper.get_delta_weight (random B), each expert's update lies in
  the top-r right singular subspace of THAT expert's matrix (the per-expert A layout, read by PEFT);
and per model type: the targets differ from PEFT's own all-linear only in ways tests/model_zoo.py explains.
"""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from model_zoo import DIFFERENCES, REASONS, ZOO, readme_table

R = 4
METHODS = ("rlpo", "rlmo", "pissa")


def _build(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **ZOO[model_type]))
    with torch.no_grad():  # some modules start at zero or constant; give every matrix a full spectrum
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.float().eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            model = _build(model_type)
            path = tmp_path_factory.mktemp(model_type) / "model"
            model.save_pretrained(path)
            cache.clear()  # one model at a time in memory
            cache[model_type] = (model, path)
        return cache[model_type]

    return get


def _name(a) -> str:
    return a.module if a.param == "weight" else f"{a.module}.{a.param}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", list(ZOO))
def test_peft_loads_what_the_manifest_lists(model_type, method, zoo, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loraforge import InitConfig, init_adapter
    from loraforge.adapters.peft_view import adapted_in

    model, src = zoo(model_type)
    out = tmp_path / "out"
    result = init_adapter(str(src), out, InitConfig(method=method, r=R))
    manifest = result.manifest
    assert manifest["path"] == "streaming"  # read matrix by matrix (expert by expert) from the checkpoint, not loaded
    if manifest["base"]:
        base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    else:
        base = copy.deepcopy(model)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    built = adapted_in(peft_model)
    assert {_name(a) for a in built.values()} == set(manifest["modules"])
    saved = load_file(out / "adapter_model.safetensors")
    state = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert set(saved) == set(state)
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key

    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(ids).logits, peft_model(ids).logits
    assert float((got - want).norm() / want.norm()) <= 1e-4

    if method == "rlpo":
        _experts_in_their_own_top_subspace(model, peft_model, built)


def _experts_in_their_own_top_subspace(model, peft_model, built) -> None:
    torch.manual_seed(2)
    for a in built.values():
        if a.experts == 1:
            continue
        layer = peft_model.base_model.model.get_submodule(a.path)
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_()
            delta = layer.get_delta_weight("default").double()
        W = getattr(model.get_submodule(a.module), a.param).detach().double()
        transposed = bool(getattr(model.get_submodule(a.module), "is_transposed", False))
        for e in range(a.experts):
            M, We = (delta[e].T, W[e].T) if transposed else (delta[e], W[e])  # (out, in)
            V = torch.linalg.svd(We, full_matrices=False).Vh[:R].T
            off = (M - M @ V @ V.T).norm() / M.norm()
            assert float(off) < 1e-5, (a.module, a.param, e, float(off))  # float32 A: ~1e-7; a wrong layout: O(1)


def _classify(model, module: str, param: str, ours: bool) -> str:
    leaf = module.rsplit(".", 1)[-1]
    if ours and param != "weight":
        return "experts"
    if ours and leaf in ("gate_proj", "up_proj", "down_proj"):
        return "dense-mlp"
    if not ours and leaf == "shared_expert_gate":
        return "shared-expert-gate"
    if not ours and {"gate", "router"} & set(module.split(".")):  # the router, or a Linear inside it (gate.wg)
        return "router"
    return f"unexplained: {'loraforge' if ours else 'PEFT'} only {module}.{param}"


@pytest.mark.parametrize("model_type", list(ZOO))
def test_targets_differ_from_peft_all_linear_only_as_explained(model_type, zoo):
    from loraforge import InitConfig
    from loraforge.adapters.build import select_targets
    from loraforge.adapters.peft_view import adapted_by_peft
    from loraforge.models.targets import meta_skeleton

    model, _ = zoo(model_type)
    skeleton = meta_skeleton(model)
    targets, _ = select_targets(skeleton, InitConfig(method="rlpo", r=R))
    ours = {(t.module, t.param) for t in targets}
    theirs = set(
        adapted_by_peft(skeleton, {"peft_type": "LORA", "r": R, "lora_alpha": 8, "target_modules": "all-linear"})
    )
    kinds = {_classify(model, m, p, True) for m, p in ours - theirs}
    kinds |= {_classify(model, m, p, False) for m, p in theirs - ours}
    assert kinds == DIFFERENCES[model_type]
    assert kinds <= set(REASONS)


def test_readme_table_is_the_zoo():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert readme_table() in readme, "README's supported-architectures table is stale: python tests/model_zoo.py"
