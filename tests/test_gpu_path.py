"""The init's GPU path, as far as a CPU shows it: what a GPU runs is the torch backend of inits/linalg.py (forced
here), float32 matmuls pinned to float32 precision whatever the caller set, weights sent to the device as stored
and converted there, bottom-r in one eigh per matrix, and the accuracy promise on real weights.

What only a GPU can show (cuBLAS/cuSOLVER numerics, pinned memory, timings, bytes across batch plans) is run by
benchmarks/device_check.sh.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from adapter_helpers import assert_top_r_matches_float64_svd

from loraforge.inits import compute, linalg
from loraforge.inits.linalg import exact_spectrum, full_float32_matmul

# A caller's TF32 / reduced-precision setting, each by one of the ways torch offers. torch refuses to READ the
# setting once both its legacy and its per-backend API were used in a process, so each runs in its own process: one
# forked per setting from a parent that imported torch and loraforge once (and ran nothing: the precision settings
# and torch's thread pools are as a fresh process has them), where five fresh interpreters spent most of their time
# importing.
CALLER_SETTINGS = {
    "default": "pass",
    "legacy high": 'torch.set_float32_matmul_precision("high")',
    "legacy medium": 'torch.set_float32_matmul_precision("medium")',
    "allow_tf32": "torch.backends.cuda.matmul.allow_tf32 = True",
    "per-backend": 'torch.backends.cuda.matmul.fp32_precision = "tf32"; '
    'torch.backends.mkldnn.matmul.fp32_precision = "bf16"',
}

PROBE = r"""
import hashlib, json, os, sys, torch
import safetensors.torch, transformers  # noqa: F401 (what an init imports, once, before the forks)
from loraforge import InitConfig, init_adapter
from loraforge.inits import compute, linalg

def snap():
    def get(f):
        try:
            return f()
        except RuntimeError:
            return "raises"
    m = torch.backends
    return [get(torch.get_float32_matmul_precision), m.cuda.matmul.fp32_precision, m.mkldnn.matmul.fp32_precision,
            get(lambda: m.cuda.matmul.allow_tf32)]

def probe(model, out, setting):
    exec(setting)
    before, inside = snap(), []
    linalg._backend = lambda X: linalg._TorchBackend  # the GPU path's code, on the CPU
    gram, residualise = linalg._TorchBackend.gram, compute._residualise
    linalg._TorchBackend.gram = staticmethod(lambda X, full=False: (inside.append(snap()), gram(X, full))[1])
    compute._residualise = lambda *a, **k: (inside.append(snap()), residualise(*a, **k))[1]
    digests = {}
    for svd in ("exact", "fast"):
        init_adapter(model, f"{out}/{svd}", InitConfig(method="pissa", r=4, svd=svd))
        digests[svd] = hashlib.sha256(open(f"{out}/{svd}/adapter_model.safetensors", "rb").read()).hexdigest()
    return {"before": before, "inside": inside, "after": snap(), "digests": digests}

model, root, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
results = {}
for i, (name, setting) in enumerate(settings.items()):
    out = f"{root}/{i}"
    pid = os.fork()
    if pid == 0:  # the child: one caller's setting in a process of its own
        code = 1
        try:
            with open(f"{out}.json", "w") as f:
                json.dump(probe(model, out, setting), f)
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()  # os._exit below would end the child without a word
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        sys.exit(f"the probe of {name!r} failed (wait status {status})")
    results[name] = json.load(open(f"{out}.json"))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def probes(tiny_models, tmp_path_factory):
    """Per caller setting: the precision settings before, inside (at every Gram and residual) and after a pissa
    init (exact and --svd fast) through the GPU path's code, and the adapter's sha256."""
    work = tmp_path_factory.mktemp("tf32")
    p = subprocess.run(
        [sys.executable, "-c", PROBE, str(tiny_models["llama"]), str(work), json.dumps(CALLER_SETTINGS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert list(out) == list(CALLER_SETTINGS)
    return out


@pytest.mark.parametrize("setting", list(CALLER_SETTINGS))
def test_float32_products_run_at_float32_precision_whatever_the_caller_set(probes, setting):
    got = probes[setting]
    # inside: cuBLAS and oneDNN at full float32 ("ieee", or "none": never set, torch's default float32)
    assert got["inside"] and all(s[1] in ("ieee", "none") and s[2] in ("ieee", "none") for s in got["inside"])
    # after: the caller's setting exactly as each getter reported it before (including getters that raised)
    assert got["after"] == got["before"]
    # and the same adapters as with torch's default setting (float32 rounding, not TF32's or bf16's)
    assert got["digests"] == probes["default"]["digests"]


def test_the_precision_pin_is_shared_by_nested_and_concurrent_users():
    # The per-GPU worker threads of one init enter and leave the pin at different times: the caller's setting must
    # come back only when the last one leaves. (Legacy API only, so this process's getters keep working.)
    torch.set_float32_matmul_precision("high")
    try:
        entered, release = threading.Barrier(2), threading.Event()
        seen = []

        def worker():
            with full_float32_matmul():
                entered.wait()
                release.wait()

        t = threading.Thread(target=worker)
        t.start()
        with full_float32_matmul():
            entered.wait()
            with full_float32_matmul():
                seen.append(torch.get_float32_matmul_precision())
            seen.append(torch.get_float32_matmul_precision())
        seen.append(torch.get_float32_matmul_precision())  # the worker is still inside
        release.set()
        t.join()
        seen.append(torch.get_float32_matmul_precision())
        assert seen == ["highest", "highest", "highest", "high"]
    finally:
        torch.set_float32_matmul_precision("highest")


def test_weights_cross_to_the_device_as_stored_and_are_converted_there(monkeypatch):
    # A bf16 weight goes to a non-CPU device as bf16 (two bytes a value, not float64's eight); the meta device
    # stands in for a GPU here (pinned memory needs CUDA). On the CPU nothing is copied at all.
    w = torch.randn(6, 4).to(torch.bfloat16)
    sent = compute.upload(w, torch.device("meta"))
    assert sent.device.type == "meta" and sent.dtype == torch.bfloat16
    assert compute.upload(w, torch.device("cpu")) is w and compute.stage(w, torch.device("cpu")) is w
    # and _load_batch fills its float64 / float32 copies from what upload returned, as stored
    calls = []
    real = compute.upload
    monkeypatch.setattr(compute, "upload", lambda t, d: (calls.append(t.dtype), real(t, d))[1])
    from loraforge.inits.config import InitConfig

    cfg = InitConfig(method="rlpo", r=2)
    stored = [torch.randn(6, 4).to(torch.bfloat16) for _ in range(3)]
    W, W32, _ = compute._load_batch([_Unit()] * 3, stored, cfg, torch.device("cpu"), compute.Workspace(), [None] * 3)
    assert calls == [torch.bfloat16] * 3
    assert torch.equal(W, torch.stack(stored).double()) and torch.equal(W32, torch.stack(stored).float())


class _Unit:
    transposed = False
    unit = "m"


def test_bottom_r_on_the_gpu_path_is_one_eigh_per_matrix(monkeypatch):
    # Before: an eigvalsh for the largest eigenvalue, then an eigh, and another eigh for each widening past a
    # rank-deficient matrix's zeros. Now one eigh of each n x n Gram gives all three. Rank 20 in 80 x 60 with
    # r = 3: 40 zero directions, more than a first look at r + 16 = 19 eigenpairs holds.
    from test_methods import make_matrix

    monkeypatch.setattr(linalg, "_backend", lambda X: linalg._TorchBackend)
    calls = []
    eigh, eigvalsh = torch.linalg.eigh, torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigh", lambda G, *a, **k: (calls.append(("eigh", G.shape[-1])), eigh(G))[1])
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda G, *a, **k: (calls.append(("eigvalsh",)), eigvalsh(G))[1])
    W = torch.from_numpy(np.stack([make_matrix(80, 60, rank=20, seed=3), make_matrix(80, 60, seed=4)]))
    spectrum = exact_spectrum(W, 3, "bottom")
    assert calls == [("eigh", 60), ("eigh", 60)]
    assert spectrum.rank.tolist() == [20, 60]
    _, S, _ = np.linalg.svd(W[0].numpy())
    np.testing.assert_allclose(spectrum.S[0].numpy(), S[17:20], rtol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["chebyshev", "full eigh"])
def test_gpu_path_top_r_matches_a_float64_svd_on_real_weights(smollm2, monkeypatch, solver):
    # The exactness bar of the CPU path (tests/test_smollm2.py), on the GPU path's code: SmolLM2's flat spectra
    # (s_32 / s_49 = 1.04-1.6) with the Chebyshev filter forced on every matrix (a GPU uses it from n = 24 q,
    # above SmolLM2's sizes), or the full float64 eigh a GPU uses below that. Three blocks, 21 matrices.
    from safetensors import safe_open

    monkeypatch.setattr(linalg, "_backend", lambda X: linalg._TorchBackend)
    monkeypatch.setattr(linalg, "CHEBYSHEV_MIN_N_OVER_Q", 0 if solver == "chebyshev" else 10**9)
    r = 32
    with safe_open(str(smollm2 / "model.safetensors"), "pt") as f:
        names = [n for n in f.keys() if n.endswith("proj.weight") and n.split(".")[2] in ("0", "15", "29")]
        weights = {n: f.get_tensor(n).double() for n in names}
    assert len(weights) == 21
    assert_top_r_matches_float64_svd(weights, r)


@pytest.mark.parametrize("backend", ["cpu", "gpu path on the cpu"])
@pytest.mark.parametrize("method", ["rlpo", "rlmo", "pissa"])
def test_adapter_and_base_bytes_do_not_depend_on_the_batch_plan(tiny_models, tmp_path, monkeypatch, method, backend):
    # --batch-mib 1 puts one matrix in each batch, the default all same-shaped matrices of this tiny model in one:
    # the files are the same bytes. (On a GPU the device script checks the same thing.)
    from loraforge import InitConfig, init_adapter

    if backend != "cpu":
        monkeypatch.setattr(linalg, "_backend", lambda X: linalg._TorchBackend)
        monkeypatch.setattr(linalg, "CHEBYSHEV_MIN_N_OVER_Q", 0)

    def files(out):
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}

    one, all_ = tmp_path / "one", tmp_path / "all"
    init_adapter(str(tiny_models["qwen2"]), one, InitConfig(method=method, r=4, batch_mib=1))
    init_adapter(str(tiny_models["qwen2"]), all_, InitConfig(method=method, r=4))
    assert files(one) == files(all_)
