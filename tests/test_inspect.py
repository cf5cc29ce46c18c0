"""`loraforge inspect`: the diagnostics on matrices with known answers, then on real init/trained adapters."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_helpers import fake_train, one_torch_thread  # noqa: F401 (autouse fixture)
from conftest import invoke

from loraforge import InitConfig, LoraforgeError, init_adapter
from loraforge.ship.analysis import (
    aligned_update,
    cumulative_energy,
    orthonormality_error,
    reconstruction_error,
    subspace_similarity,
    thin_svd,
    update_distribution,
)
from loraforge.ship.inspect import InspectConfig, diagnose_module, inspect_adapter, module_kind


def known_matrix(m=12, n=9, seed=0, sigma=None):
    """W = U diag(S) V^T with U, V orthonormal by construction and S chosen: the SVD is known."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    S = torch.tensor(sigma if sigma is not None else [9.0, 7, 5, 4, 3, 2, 1.5, 1, 0.5], dtype=torch.float64)
    return U, S, V, U @ torch.diag(S) @ V.T


# ---- pure math on known answers --------------------------------------------------------------


def test_principal_rows_have_similarity_one_with_principal_and_zero_with_minor():
    U, S, V, W = known_matrix()
    r = 3
    A0 = V[:, :r].T  # A0 = V_r^T
    svd = thin_svd(W)
    assert float(subspace_similarity(A0, svd.top(r))) == pytest.approx(1.0, abs=1e-12)
    assert float(subspace_similarity(A0, svd.bottom(r))) == pytest.approx(0.0, abs=1e-12)
    # and the other way round for A0 = V_-r^T
    assert float(subspace_similarity(V[:, -r:].T, svd.bottom(r))) == pytest.approx(1.0, abs=1e-12)
    # half in, half out: rows (v_1 + v_9)/sqrt2 -> ||A V_r||^2 / ||A||^2 = 1/2
    mixed = ((V[:, 0] + V[:, -1]) / 2**0.5).unsqueeze(0)
    assert float(subspace_similarity(mixed, svd.top(r))) == pytest.approx(0.5**0.5, abs=1e-12)
    torch.testing.assert_close(svd.S, S)


def test_bottom_subspace_skips_exact_zero_singular_values():
    U, S, V, W = known_matrix(sigma=[9.0, 7, 5, 4, 3, 2, 1.5, 0, 0])  # rank 7
    svd = thin_svd(W)
    assert svd.rank == 7
    # V_-2 = the vectors of 2 and 1.5, not of the zeros
    assert float(subspace_similarity(V[:, 5:7].T, svd.bottom(2))) == pytest.approx(1.0, abs=1e-10)


def test_update_along_one_singular_direction_puts_all_mass_there():
    U, S, V, W = known_matrix()
    svd = thin_svd(W)
    j = 4
    B, A = 3.0 * U[:, j : j + 1], V[:, j : j + 1].T  # dW = 3 u_j v_j^T
    c = aligned_update(svd.U, svd.V, B, A)
    expected = torch.zeros(9, dtype=torch.float64)
    expected[j] = 3.0
    torch.testing.assert_close(c, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(update_distribution(c), expected / 3)
    energy = cumulative_energy(c)
    assert float(energy[j - 1]) == pytest.approx(0.0, abs=1e-20) and float(energy[j]) == pytest.approx(1.0)


def test_update_with_known_coefficients_and_an_off_diagonal_part():
    U, S, V, W = known_matrix()
    svd = thin_svd(W)
    coef = torch.tensor([4.0, 0, 2, 0, 0, 0, 0, 0, 2], dtype=torch.float64)
    dW = U @ torch.diag(coef) @ V.T + 5.0 * torch.outer(U[:, 1], V[:, 2])  # u_1 v_2^T is along no single pair
    c = aligned_update(svd.U, svd.V, dW, torch.eye(9, dtype=torch.float64))  # B = dW, A = I
    torch.testing.assert_close(c, coef, atol=1e-12, rtol=0)
    torch.testing.assert_close(update_distribution(c), coef / 8)
    torch.testing.assert_close(
        cumulative_energy(c)[[0, 2, 8]], torch.tensor([16 / 24, 20 / 24, 1.0], dtype=torch.float64)
    )
    assert torch.equal(update_distribution(torch.zeros(3)), torch.zeros(3))  # no update: no division by zero


def test_orthonormality_and_reconstruction_errors():
    _, _, V, W = known_matrix()
    assert float(orthonormality_error(V[:, :4].T)) < 1e-14
    assert float(orthonormality_error(2 * V[:, :4].T)) == pytest.approx(3.0)
    A, B = V[:, :2].T, torch.ones(12, 2, dtype=torch.float64)
    max_abs, rel = reconstruction_error(W, W - 0.5 * B @ A, A, B, 0.5)
    assert float(max_abs) < 1e-14 and float(rel) < 1e-14
    max_abs, rel = reconstruction_error(W, W, A, B, 0.5)  # base not residualised: off by s B A
    assert float(rel) == pytest.approx(float((0.5 * B @ A).norm() / W.norm()))


def test_diagnose_module_pissa_like_init_and_training():
    U, S, V, W = known_matrix()
    r, s = 3, 2.0
    root = (S[:r] / s).sqrt()
    A0, B0 = root[:, None] * V[:, :r].T, U[:, :r] * root  # PiSSA: s B0 A0 = U_r S_r V_r^T
    d = diagnose_module(W, r, A0, B0, s)
    assert d["init_norm"] == pytest.approx(float(S[:r].norm()) / s)
    assert d["init_sim_top"] == pytest.approx(1.0) and d["init_sim_bottom"] == pytest.approx(0.0, abs=1e-12)
    assert d["sigma_top_mean"] == pytest.approx(7.0) and d["sigma_bottom_mean"] == pytest.approx(1.0)
    # "Trained" without moving: the update is exactly zero, so no direction gets mass.
    d = diagnose_module(W, r, A0, B0, s, A0.clone(), B0.clone(), s)
    assert d["update_norm"] == pytest.approx(0.0, abs=1e-12) and d["p_top"] == 0.0
    # Only B moves by dB = e u_1 e_1^T: dW = s dB A0 = s e sqrt(S_1/s) u_1 v_1^T, all on direction 1.
    B = B0.clone()
    B[:, 0] += 0.1 * U[:, 0]
    d = diagnose_module(W, r, A0, B0, s, A0, B, s)
    assert d["p"][0] == pytest.approx(1.0) and d["p_top"] == pytest.approx(1.0)
    assert d["update_norm"] == pytest.approx(s * 0.1 * float(root[0]))


def test_module_kind_strips_the_layer_only():
    assert module_kind("model.layers.12.self_attn.q_proj") == "self_attn.q_proj"
    assert module_kind("transformer.h.0.attn.c_proj") == "attn.c_proj"
    assert module_kind("transformer.h.0.mlp.c_proj") == "mlp.c_proj"
    assert module_kind("lm_head") == "lm_head"


# ---- on adapters -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inits(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    cfg = dict(r=4, base_dtype="float32")
    return {
        m: init_adapter(str(tiny_models["llama"]), root / m, InitConfig(method=m, **cfg)).out
        for m in ("rlpo", "rlmo", "pissa", "milora", "dct")
    }


@pytest.mark.parametrize(
    "method, top, bottom", [("rlpo", 1.0, 0.0), ("rlmo", 0.0, 1.0), ("pissa", 1.0, 0.0), ("milora", 0.0, 1.0)]
)
def test_init_similarities_follow_the_method(inits, method, top, bottom):
    report = inspect_adapter(inits[method])
    assert not report.trained and report.method == method and len(report.modules) == 14
    mean = report.mean()
    assert mean["init_sim_top"] == pytest.approx(top, abs=1e-6)
    assert mean["init_sim_bottom"] == pytest.approx(bottom, abs=1e-6)
    manifest = json.loads((inits[method] / "loraforge.json").read_text())
    for m in report.modules:  # the init norm is the one init recorded (Table 4)
        assert m.init_norm == pytest.approx(manifest["modules"][m.name]["init_norm"], rel=1e-9)


def test_data_free_init_is_in_neither_subspace(inits):
    mean = inspect_adapter(inits["dct"]).mean()
    assert 0.05 < mean["init_sim_top"] < 0.95 and 0.05 < mean["init_sim_bottom"] < 0.95
    assert mean["init_norm"] == 0.0


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_trained_update_concentrates_where_the_init_put_it(inits, tmp_path, method):
    """The paper's Fig. 3 finding, by construction: perturbing PiSSA's factors moves W along the top
    singular directions (dW = s(dB A0 + B0 dA + dB dA), and A0, B0 span only the chosen r; the small
    second-order dB dA spreads a little mass everywhere), MiLoRA's along the bottom ones. Small steps
    (eps) keep the first-order terms dominant, as early in training."""
    trained = fake_train(inits[method], inits[method] / "base", tmp_path / "t", eps=0.01)
    report = inspect_adapter(trained, init=inits[method])
    assert report.trained
    mean = report.mean()
    assert mean["update_norm"] > 0
    if method == "pissa":
        assert mean["p_top"] > 0.8 and mean["energy_top"] > 0.95 and mean["p_bottom"] < 0.05
    else:
        assert mean["p_bottom"] > 0.8 and mean["energy_top"] < 0.05 and mean["p_top"] < 0.05
    curves = report.curves("self_attn.q_proj")
    assert curves["layers"] == 2 and curves["energy"][-1] == pytest.approx(1.0)


def test_trained_adapter_naming_the_residual_base_finds_its_init(inits, tmp_path):
    trained = fake_train(inits["pissa"], inits["pissa"] / "base", tmp_path / "t")
    explicit = inspect_adapter(trained, init=inits["pissa"])
    cfg = json.loads((trained / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(inits["pissa"] / "base")
    (trained / "adapter_config.json").write_text(json.dumps(cfg))
    found = inspect_adapter(trained)
    assert any("residual base" in n for n in found.notes)
    for a, b in zip(explicit.modules, found.modules):
        assert a.update_norm == pytest.approx(b.update_norm, rel=1e-6)
        assert a.p_top == pytest.approx(b.p_top, rel=1e-6)


def test_trained_b0_zero_adapter_without_init_is_inspected_with_a_note(inits, tiny_models, tmp_path):
    trained = fake_train(inits["rlpo"], tiny_models["llama"], tmp_path / "t")
    report = inspect_adapter(trained)
    assert report.trained and any("B0 A0 = 0 assumed" in n for n in report.notes)
    assert report.mean()["sim_top"] > 0.9  # RLPO's A stays in the principal subspace


def test_cli_table_json_and_module_selection(inits, tmp_path):
    res = invoke(
        "inspect", inits["rlpo"], "--modules", "q_proj,down_proj", "--layers", "1", "--json", tmp_path / "d.json"
    )
    assert res.exit_code == 0, res.output
    assert "model.layers.1.self_attn.q_proj" in res.output and "model.layers.0" not in res.output
    assert "MEAN all (2)" in res.output and "A0.Vr" in res.output
    data = json.loads((tmp_path / "d.json").read_text())
    assert set(data["modules"]) == {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert data["mean"]["init_sim_top"] == pytest.approx(1.0, abs=1e-6)
    assert len(data["modules"]["model.layers.1.mlp.down_proj"]["sigma_top"]) == 4


def test_plots_are_written_as_pngs(inits, tmp_path):
    pytest.importorskip("matplotlib")
    trained = fake_train(inits["pissa"], inits["pissa"] / "base", tmp_path / "t")
    res = invoke(
        "inspect", trained, "--init", inits["pissa"], "--plots", tmp_path / "figs", "--plot-modules", "q_proj,down_proj"
    )
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["init_norm.png", "similarity.png", "spectrum.png", "update.png"]
    for p in (tmp_path / "figs").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    # B0 = 0 and untrained: no init-norm figure (all zero) and no update figure
    res = invoke("inspect", inits["rlpo"], "--plots", tmp_path / "figs2")
    assert sorted(p.name for p in (tmp_path / "figs2").iterdir()) == ["similarity.png", "spectrum.png"]


def test_plots_without_matplotlib_say_how_to_install(inits, tmp_path, hide_package):
    hide_package("matplotlib")
    res = invoke("inspect", inits["rlpo"], "--plots", tmp_path / "figs")
    assert res.exit_code == 1 and "pip install -e '.[plots]'" in res.output
    assert not (tmp_path / "figs").exists()


def test_bad_inputs(inits, tiny_models, tmp_path):
    res = invoke("inspect", inits["rlpo"], "--modules", "nope_proj")
    assert res.exit_code == 1 and "matches no adapted module" in res.output and "self_attn.q_proj" in res.output
    res = invoke("inspect", inits["rlpo"], "--layers", "7")
    assert res.exit_code == 1 and "layers are 0-1" in res.output
    res = invoke("inspect", tiny_models["llama"])
    assert res.exit_code == 1 and "not a PEFT adapter directory" in res.output
    res = invoke("inspect", inits["rlpo"], "--base", tiny_models["qwen2"])
    assert res.exit_code == 1 and "a different base model" in res.output
    # a trained residualised adapter that still carries the init's manifest needs --init
    import shutil

    trained = tmp_path / "t"
    shutil.copytree(inits["pissa"], trained)
    fake_train(inits["pissa"], inits["pissa"] / "base", tmp_path / "peft")
    shutil.copy(tmp_path / "peft" / "adapter_model.safetensors", trained / "adapter_model.safetensors")
    with pytest.raises(LoraforgeError, match="pass that init directory with --init"):
        inspect_adapter(trained)
    with pytest.raises(LoraforgeError, match="not trained from --init"):
        inspect_adapter(
            trained, init=init_adapter(str(tiny_models["llama"]), tmp_path / "r2", InitConfig(method="pissa", r=2)).out
        )
    assert inspect_adapter(trained, init=inits["pissa"], config=InspectConfig(layers=[0])).trained


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_adapter_with_a_non_finite_factor_is_refused_and_nothing_written(inits, tiny_models, tmp_path, value):
    """One NaN in a trained B: the table came out all NaN statistics, --json wrote them, exit 0. Now one line
    naming the tensor and where, exit 1, and no JSON file."""
    from safetensors.torch import load_file, save_file

    trained = fake_train(inits["rlpo"], tiny_models["llama"], tmp_path / "t")
    path = trained / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(k for k in tensors if "layers.1.mlp.up_proj.lora_B" in k)[0]
    tensors[key][2, 1] = value
    save_file(tensors, path)
    res = invoke("inspect", trained, "--init", inits["rlpo"], "--json", tmp_path / "d.json")
    errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert res.exit_code == 1 and len(errors) == 1 and "Traceback" not in res.output, res.output
    assert "model.layers.1.mlp.up_proj.lora_B has 1 non-finite value(s)" in errors[0]
    assert "row 2, column 1" in errors[0] and "nothing was inspected" in errors[0]
    assert not (tmp_path / "d.json").exists()


def test_unreachable_hub_base_is_a_clear_error(inits, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(LoraforgeError, match="Could not reach the Hugging Face Hub to get 'org/some-model'"):
        inspect_adapter(inits["rlpo"], base="org/some-model")
