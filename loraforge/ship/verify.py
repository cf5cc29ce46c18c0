"""`loraforge verify`: check an initialised adapter directory against its manifest and its base.

Checks, each reported with the modules or files that fail it:
- hashes:         every file in the manifest's `files` has the recorded sha256 (nothing changed since init),
                  and every file in OUT is listed (base/ config and tokenizer included; a manifest from
                  before they were hashed gets a note naming what it does not cover);
- config:         adapter_config.json says what the manifest says (r, alpha, rsLoRA, init_lora_weights: true);
- factors:        adapter_model.safetensors holds A (r, in) and B (out, r) for exactly the manifest's modules,
                  and the base model has those modules with those shapes;
- nonzero:        factors are finite, with no all-zero row of A0 (nor column of B0 where B0 != 0): such
                  a direction gets no gradient and never trains;
- reconstruction: residualised methods: residual base + s B0 A0 equals the original weight up to the
                  rounding of the base dtype (max and relative error reported);
- B0 = 0:         the other methods: B0 is exactly zero, so the adapter starts as a no-op;
- orthonormal:    A0 has orthonormal rows where the method promises it (rlpo, rlmo, dct, wavelet, olora,
                  olora-tail) and B0 orthonormal columns for olora/olora-tail;
- formula:        the factors are what the method gives for this base's weights, recomputed: the same A0
                  for data-free methods (lora, dct, wavelet: seeded), the same row space for rlpo/rlmo, the
                  same s B0 A0 for pissa/milora/olora/olora-tail. A wrong --base fails here.
Tolerances are a few machine epsilons of the dtype the numbers are stored in (see `_eps`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from loraforge.adapters.directory import Adapter, expert_units_of, load_adapter
from loraforge.adapters.writers import ADAPTER_CONFIG, MANIFEST
from loraforge.core.clients import vllm_serve_command
from loraforge.core.errors import LoraforgeError
from loraforge.inits.linalg import TOP_RANK_R_RTOL, exact_spectrum, fast_spectrum
from loraforge.inits.methods import METHODS, Method, MethodInput
from loraforge.models.checkpoint import sha256_file
from loraforge.models.source import resolve_source
from loraforge.ship.analysis import orthonormality_error, reconstruction_error, subspace_similarity
from loraforge.ship.checks import Check
from loraforge.ship.client_check import MAX_LOGIT_PARAMS, client_checks

INIT_FORMAT = "loraforge-manifest/1"
# Methods whose A0 has orthonormal rows. Method.orthonormal means "orthonormal A0 AND B0 = 0", so
# OLoRA's two variants (A0 = V_r^T, B0 = U_r) are added by hand; they also promise orthonormal B0 columns.
ORTHONORMAL_A = {name for name, m in METHODS.items() if m.orthonormal} | {"olora", "olora-tail"}
ORTHONORMAL_B = {"olora", "olora-tail"}
# Recomputing a method's factors on another machine (or with another thread count) rounds
# differently. Exact top-r factors are each within TOP_RANK_R_RTOL of a float64 SVD, so two runs
# differ by at most twice that. Randomised SVD (init --svd fast) is reproduced with the same seed,
# but it stops short of convergence, and on flat spectra rounding moves its rank-r part further: on
# SmolLM2-135M, r = 32, init with 1 thread and verify with 2 differ by up to 3e-5 (median 6e-6).
# A wrong base is off by O(1), so both tolerances still catch it.
EXACT_TOP_TOL = 2 * TOP_RANK_R_RTOL
FAST_SVD_TOL = 1e-3


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@dataclass
class VerifyReport:
    path: Path
    method: str
    r: int
    base_model: str  # the original model the checks compared against
    checks: list[Check]
    serve: str  # one line: which base a server must load with this adapter
    modules: dict[str, dict] = field(default_factory=dict)  # per-module measurements

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failing(self) -> list[str]:
        """Modules and files that failed some check, in first-failure order."""
        return list(dict.fromkeys(k for c in self.checks for k in c.failures))


def serve_line(adapter_dir: Path, method: Method, original: str, r: int) -> str:
    """One line naming the base a server (vLLM) must load with this adapter."""
    if method.residual:
        base = str(adapter_dir / "base")
        return (
            f"vLLM must load the residual base {base}, NOT the original {original}: "
            f"{vllm_serve_command(base, str(adapter_dir), r)}"
        )
    return (
        f"vLLM loads the original base {original} with this adapter (B0 = 0): "
        f"{vllm_serve_command(original, str(adapter_dir), r)}"
    )


@dataclass
class _Checks:
    """The checks of one verify run, and the worst value each measured so far."""

    hashes: Check
    config: Check
    factors: Check
    nonzero: Check
    recon: Check
    zero_b: Check
    ortho: Check
    formula: Check
    worst: dict = field(default_factory=lambda: {"recon_rel": 0.0, "recon_max_abs": 0.0, "ortho": 0.0, "formula": 0.0})

    @classmethod
    def for_method(cls, method: Method) -> "_Checks":
        ortho = method.name in ORTHONORMAL_A
        return cls(
            hashes=Check("hashes"),
            config=Check("config"),
            factors=Check("factors"),
            nonzero=Check("nonzero"),
            recon=Check(
                "reconstruction",
                applies=method.residual,
                detail="" if method.residual else "the base is the original model",
            ),
            zero_b=Check("B0 = 0", applies=not method.residual, detail=f"{method.name} starts from B0 = {method.B0}"),
            ortho=Check(
                "orthonormal",
                applies=ortho,
                detail="" if ortho else f"{method.name} does not promise orthonormal rows",
            ),
            formula=Check("formula"),
        )

    @property
    def all(self) -> list[Check]:
        return [
            self.hashes,
            self.config,
            self.factors,
            self.nonzero,
            self.recon,
            self.zero_b,
            self.ortho,
            self.formula,
        ]


def verify_adapter(
    out: str | Path,
    base: Optional[str] = None,
    device: str = "auto",
    batch_mib: int = 512,
    logit_max_params: int = MAX_LOGIT_PARAMS,
    quantize: Optional[str] = None,
) -> VerifyReport:
    """Check the loraforge init directory OUT; BASE overrides the original model the manifest names.
    The logit checks (residualised methods, quantized bases) run on bases of at most LOGIT_MAX_PARAMS parameters.
    QUANTIZE (or the manifest's `init --quantize`) adds the checks on a bitsandbytes base (ship/verify_quant.py)."""
    from loraforge.core.devices import resolve_device
    from loraforge.inits.plan import plan_batches
    from loraforge.ship import verify_quant

    out = Path(out)
    adapter = load_adapter(out, "OUT")
    manifest = _init_manifest(adapter)
    quantize = verify_quant.effective_quantize(manifest, quantize)
    method = METHODS[manifest["method"]]
    original = base or manifest["source"]["model_id"]
    _check_source_exists(manifest, base, original)
    source = resolve_source(original)  # once: every check below reads this one
    as_written = manifest  # PEFT sees expert stacks whole; the factor checks below go expert by expert
    if any(m.get("experts") for m in manifest["modules"].values()):
        # Fused expert stacks are compared expert by expert, as they were computed.
        _name_expert_factors(adapter, source)
        manifest = {**manifest, "modules": expert_units_of(manifest["modules"])}
    checks = _Checks.for_method(method)
    report = VerifyReport(
        out, method.name, manifest["r"], original, checks.all, serve_line(out, method, original, manifest["r"])
    )
    _check_hashes(adapter, manifest, checks.hashes)
    _check_config(adapter, manifest, checks.config)
    names = _check_module_sets(adapter, manifest, checks.factors)
    weights, residual = _open_weights(adapter, manifest, method, base, source, names, checks.recon)
    names = _check_shapes(adapter, manifest, weights, original, names, checks.factors)

    dev = resolve_device(device)
    targets = [weights.targets[n] for n in names]
    for batch in plan_batches(targets, batch_mib * 2**20):
        _check_batch(adapter, manifest, method, batch, weights, residual, dev, checks, report.modules)
    _finish_details(method, checks)
    report.checks.extend(client_checks(out, as_written, source, method.residual, logit_max_params))  # what PEFT builds
    if quantize:
        report.checks.append(
            verify_quant.check_quantized_errors(adapter, manifest, names, weights, residual, quantize, report.modules)
        )
        load_on = adapter.base_dir if method.residual else source.path
        report.checks.append(verify_quant.check_quantized_logits(out, load_on, source.path, quantize, logit_max_params))
    return report


def _check_module_sets(adapter: Adapter, manifest: dict, check: Check) -> list[str]:
    """The modules that are both in the manifest and in adapter_model.safetensors; the rest fail."""
    expected = manifest["modules"]
    for name in expected:
        if name not in adapter.factor_keys:
            check.fail(name, "in the manifest but not in adapter_model.safetensors")
    for name in adapter.factor_keys:
        if name not in expected:
            check.fail(name, "in adapter_model.safetensors but not in the manifest")
    return [n for n in expected if n in adapter.factor_keys]


def _open_weights(adapter: Adapter, manifest: dict, method: Method, base, source, names, recon: Check):
    """The original weights of NAMES, and the residual base's (None for B0 = 0 methods, or when missing)."""
    from loraforge.models.weights import open_model_weights

    weights = open_model_weights(source, names, role="--base" if base else "the manifest's source model")
    residual = None
    if method.residual and not adapter.base_dir.is_dir():
        recon.fail(manifest["base"] + "/", "the residual base directory is missing; re-run loraforge init")
    elif method.residual:
        residual = open_model_weights(str(adapter.base_dir), names, role="the residual base")
    return weights, residual


def _check_shapes(adapter: Adapter, manifest: dict, weights, original: str, names, check: Check) -> list[str]:
    """A (r, in) and B (out, r) for each module, and the base's weight of the manifest's shape; returns
    the modules that can be compared."""
    r = manifest["r"]
    ok = []
    for name in names:
        A, B = adapter.factors(name)
        m, n = weights.targets[name].shape
        want = tuple(manifest["modules"][name]["shape"])
        if (m, n) != want:
            check.fail(
                name,
                f"is {m} x {n} in {original} but {want[0]} x {want[1]} in the manifest: a different base "
                "model. Pass the model the adapter was initialised from with --base.",
            )
        elif tuple(A.shape) != (r, n) or tuple(B.shape) != (m, r):
            check.fail(name, f"A is {list(A.shape)} and B is {list(B.shape)}; expected A [{r}, {n}] and B [{m}, {r}]")
        else:
            ok.append(name)
    check.checked = len(ok)
    if check.ok:
        check.detail = (
            f"A [{r}, in] and B [out, {r}] for the manifest's {len(ok)} modules; the base has the same shapes"
        )
    return ok


def _check_batch(adapter, manifest, method, batch, weights, residual, dev, checks: _Checks, stats) -> None:
    """Every math check on one batch of same-shaped modules."""
    from loraforge.inits.plan import module_seed

    W = torch.stack([weights.matrix(t.name) for t in batch]).to(dev)
    pairs = [adapter.factors(t.name) for t in batch]
    adapter_dtype = pairs[0][0].dtype
    A = torch.stack([a for a, _ in pairs]).to(dev, torch.float64)
    B = torch.stack([b for _, b in pairs]).to(dev, torch.float64)
    for t in batch:
        stats[t.name] = {}
    _check_nonzero(method, batch, A, B, checks.nonzero)
    if residual is not None:
        R = torch.stack([residual.matrix(t.name) for t in batch]).to(dev)
        _check_reconstruction(batch, W, R, A, B, manifest["scaling"], residual.dtype(batch[0].name), checks, stats)
    elif not method.residual:
        _check_zero_b(method, batch, B, checks.zero_b)
    if checks.ortho.applies:
        _check_orthonormal(method, batch, A, B, adapter_dtype, checks, stats)
    W_ref, refine = W, None
    if manifest.get("quantize"):  # init --quantize: the factors were computed against the quantized base
        from loraforge.ship.verify_quant import quantized_reference

        dtypes = [weights.dtype(t.name) for t in batch]
        base_dtypes = [residual.dtype(t.name) for t in batch] if residual is not None else dtypes
        W_ref, refine = quantized_reference(method, manifest, batch, W, dtypes, base_dtypes)
    _check_formula(
        method, manifest, batch, W_ref, A, B, adapter_dtype, checks.formula, stats, checks.worst, module_seed, refine
    )


def _check_nonzero(method: Method, batch, A, B, check: Check) -> None:
    """Finite factors, no all-zero row of A0 and (where B0 != 0) no all-zero column of B0: such a
    direction gets no gradient and never trains (an underflowed init looks like this)."""
    check.checked += len(batch)
    for i, t in enumerate(batch):
        if not (torch.isfinite(A[i]).all() and torch.isfinite(B[i]).all()):
            check.fail(t.name, "A0 or B0 holds NaN or inf")
            continue
        zero_rows = int((A[i].abs().amax(dim=1) == 0).sum())
        zero_cols = int((B[i].abs().amax(dim=0) == 0).sum()) if method.residual else 0
        if zero_rows or zero_cols:
            check.fail(
                t.name,
                f"{zero_rows} all-zero rows of A0 and {zero_cols} all-zero columns of B0 of r = {A.shape[1]}: "
                "those directions never train (underflowed or zeroed factors). Re-run loraforge init",
            )
    if check.ok:
        which = "rows of A0 and columns of B0" if method.residual else "rows of A0"
        check.detail = f"finite, and no all-zero {which}"


def _check_reconstruction(batch, W, R, A, B, s: float, base_dtype, checks: _Checks, stats) -> None:
    """Residual base + s B0 A0 = W to the rounding of the base dtype."""
    max_abs, rel = reconstruction_error(W, R, A, B, s)
    tol = _eps(base_dtype)
    check, worst = checks.recon, checks.worst
    check.checked += len(batch)
    for i, t in enumerate(batch):
        stats[t.name].update(recon_max_abs=float(max_abs[i]), recon_rel=float(rel[i]))
        worst["recon_rel"] = max(worst["recon_rel"], float(rel[i]))
        worst["recon_max_abs"] = max(worst["recon_max_abs"], float(max_abs[i]))
        if not float(rel[i]) <= tol:
            check.fail(
                t.name,
                f"relative error {float(rel[i]):.3e} > {tol:.1e} (max abs {float(max_abs[i]):.3e}): "
                "residual base + s B0 A0 is not the original weight",
            )
    check.detail = (
        f"max rel {worst['recon_rel']:.2e}, max abs {worst['recon_max_abs']:.2e} "
        f"(tolerance rel {tol:.1e}, {str(base_dtype).removeprefix('torch.')} base)"
    )


def _check_zero_b(method: Method, batch, B, check: Check) -> None:
    nonzero = B.flatten(1).abs().amax(dim=1)
    check.checked += len(batch)
    for i, t in enumerate(batch):
        if float(nonzero[i]) != 0.0:
            check.fail(t.name, f"max |B0| = {float(nonzero[i]):.3e}; {method.name} starts from B0 = 0 exactly")
    check.detail = "B0 is exactly zero in every module" if check.ok else ""


def _check_orthonormal(method: Method, batch, A, B, adapter_dtype, checks: _Checks, stats) -> None:
    """Orthonormal rows of A0 (and columns of B0 for OLoRA) to a few epsilons of the adapter dtype."""
    tol = 4 * _eps(adapter_dtype)
    errs = [orthonormality_error(A)] + (
        [orthonormality_error(B.transpose(1, 2))] if method.name in ORTHONORMAL_B else []
    )
    err = torch.stack(errs).amax(dim=0)
    check, worst = checks.ortho, checks.worst
    check.checked += len(batch)
    for i, t in enumerate(batch):
        stats[t.name]["orthonormality_error"] = float(err[i])
        worst["ortho"] = max(worst["ortho"], float(err[i]))
        if not float(err[i]) <= tol:
            what = "A0 A0^T" + (" or B0^T B0" if method.name in ORTHONORMAL_B else "")
            check.fail(t.name, f"max |{what} - I| = {float(err[i]):.3e} > {tol:.1e}: rows are not orthonormal")
    dtype = str(adapter_dtype).removeprefix("torch.")
    check.detail = f"max |A0 A0^T - I| {worst['ortho']:.1e} (tolerance {tol:.1e}, {dtype} adapter)"


def _finish_details(method: Method, checks: _Checks) -> None:
    if checks.formula.ok and checks.formula.checked:
        checks.formula.detail = _formula_detail(method, checks.worst["formula"])
    for c in (checks.nonzero, checks.recon, checks.zero_b, checks.ortho, checks.formula):
        if c.applies and not c.checked and not c.failures:
            c.detail = "no module could be compared (see factors)"


def _check_source_exists(manifest: dict, base, original: str) -> None:
    if base is None and manifest["source"].get("local") and not Path(original).exists():
        raise LoraforgeError(
            f"The manifest's source model {original} (a local directory at init time) is not there any more. "
            "Pass the original model with --base."
        )


def _name_expert_factors(adapter: Adapter, source) -> None:
    """Name the adapter's fused-expert factors per expert, from what PEFT builds from its adapter_config on a meta
    skeleton of ORIGINAL (the saved names of a stack do not say which parameter they hold)."""
    from loraforge.adapters.peft_view import adapted_by_peft
    from loraforge.models.targets import build_skeleton

    skeleton = build_skeleton(source.path)
    try:
        adapter.use_peft_view(adapted_by_peft(skeleton, adapter.config))
    except ValueError as e:  # PEFT refuses this adapter_config on that model: the factors stay unnamed (and fail)
        raise LoraforgeError(f"PEFT cannot load {adapter.path} on {source.model_id}: {e}") from None


def _init_manifest(adapter: Adapter) -> dict:
    manifest = adapter.manifest
    if manifest is None:
        raise LoraforgeError(
            f"{adapter.path} has no loraforge.json, so there is nothing to verify it against: verify checks a "
            "directory written by `loraforge init`. For a trained or converted adapter use `loraforge inspect`."
        )
    if manifest.get("format") != INIT_FORMAT:
        raise LoraforgeError(
            f"{adapter.path}/loraforge.json has format {manifest.get('format')!r}, expected {INIT_FORMAT!r}: verify "
            "checks directories written by `loraforge init` (not converted adapters)."
        )
    if manifest.get("method") not in METHODS:
        raise LoraforgeError(
            f"{adapter.path}/loraforge.json names method {manifest.get('method')!r}, which this loraforge "
            f"does not know ({', '.join(METHODS)}). Upgrade loraforge."
        )
    return manifest


def _check_hashes(adapter: Adapter, manifest: dict, check: Check) -> None:
    """Every file the manifest lists has its sha256, and every file in OUT is listed (older manifests,
    which hashed only the weights, get a note naming the files they do not cover)."""
    files = manifest.get("files") or {}
    check.checked = len(files)
    for rel, digest in files.items():
        path = adapter.path / rel
        if not path.exists():
            check.fail(rel, "is missing (listed in the manifest)")
        elif (actual := sha256_file(path)) != digest:
            check.fail(
                rel,
                f"sha256 {actual[:12]}... differs from the manifest's {digest[:12]}...: the file changed after init",
            )
    unhashed = manifest.get("files_unhashed")
    present = sorted(
        p.relative_to(adapter.path).as_posix() for p in adapter.path.rglob("*") if p.is_file() or p.is_symlink()
    )
    uncovered = [f for f in present if f not in files and f not in (unhashed or (MANIFEST, "README.md"))]
    if unhashed is not None:  # this manifest hashed every file init wrote: anything else came later
        for rel in uncovered:
            check.fail(rel, "is not among the files init wrote (added after init); remove it or re-run init")
        uncovered = []
    if check.ok:
        check.detail = f"{len(files)} files match their sha256"
        if uncovered:
            shown = ", ".join(uncovered[:6]) + (f" and {len(uncovered) - 6} more" if len(uncovered) > 6 else "")
            check.detail += f"; NOT covered (this older manifest hashed only the weights): {shown}"


def _check_config(adapter: Adapter, manifest: dict, check: Check) -> None:
    cfg = adapter.config
    check.checked = 1
    for key, want in [
        ("r", manifest["r"]),
        ("lora_alpha", manifest["alpha"]),
        ("use_rslora", manifest["rslora"]),
        ("init_lora_weights", True),
    ]:
        if cfg.get(key) != want:
            check.fail(
                ADAPTER_CONFIG,
                f"{key} = {json.dumps(cfg.get(key))}, the manifest says {json.dumps(want)}"
                + (
                    " (any other value makes PEFT re-run an init and change the base again)"
                    if key == "init_lora_weights"
                    else ""
                ),
            )
    if abs(adapter.scaling - manifest["scaling"]) > 1e-12 * manifest["scaling"]:
        check.fail(ADAPTER_CONFIG, f"scaling {adapter.scaling} differs from the manifest's {manifest['scaling']}")
    check.detail = "r, alpha, rsLoRA and init_lora_weights: true agree with the manifest" if check.ok else ""


def _check_formula(
    method: Method, manifest: dict, batch, W, A, B, adapter_dtype, check: Check, stats, worst, module_seed, refine=None
) -> None:
    """Recompute the method's factors from W and compare them with the stored ones (REFINE: init --quantize's
    refinement of the factors, see ship/verify_quant.quantized_reference)."""
    r, s = manifest["r"], manifest["scaling"]
    spectrum = None
    if method.spectrum is not None:
        if manifest.get("svd") == "fast":
            spectrum = fast_spectrum(W, r, seed=manifest["seed"])
        else:
            spectrum = exact_spectrum(W, r, method.spectrum)
            for i, t in enumerate(batch):
                if int(spectrum.rank[i]) < r:
                    check.fail(
                        t.name,
                        f"this base's weight has numerical rank {int(spectrum.rank[i])} < r = {r}: not the weight "
                        "the adapter was made from",
                    )
    seeds = [module_seed(manifest["seed"], t.name) for t in batch]
    A_ref, B_ref = method.init(MethodInput(W=W, r=r, scaling=s, spectrum=spectrum, seeds=seeds))
    if refine is not None:
        A_ref, B_ref = refine(A_ref, B_ref)
    tol = 4 * _eps(adapter_dtype)
    if manifest.get("svd") == "fast":
        tol += FAST_SVD_TOL
    elif method.spectrum == "top" and method.residual:  # pissa, olora: compared as s B0 A0 (rlpo: as a subspace)
        tol += EXACT_TOP_TOL
    check.checked += len(batch)
    for i, t in enumerate(batch):
        if t.name in check.failures:
            continue
        if method.spectrum is None:
            # Data-free methods: the same seeded numbers, up to rounding to the adapter dtype.
            dev = float((A[i] - A_ref[i]).abs().max() / A_ref[i].abs().max().clamp_min(1e-300))
            what = f"A0 differs from the {method.name} formula (seed {manifest['seed']}) by {dev:.2e} (relative)"
        elif not method.residual:
            # rlpo/rlmo: the row space is what matters (a rotation inside a repeated singular value is
            # as good), so compare subspaces rather than vectors.
            dev = 1.0 - float(subspace_similarity(A[i], spectrum.V[i]))
            which = "top" if method.spectrum == "top" else "bottom (nonzero)"
            what = (
                f"A0's rows lie {100 * (1 - dev):.1f}% in the {which}-{r} right singular subspace of this base's weight"
            )
        else:
            ref = B_ref[i] @ A_ref[i]
            dev = float((B[i] @ A[i] - ref).norm() / ref.norm().clamp_min(1e-300))
            what = f"s B0 A0 differs from this base's rank-{r} SVD part by {dev:.2e} (relative)"
        stats[t.name]["formula_deviation"] = dev
        worst["formula"] = max(worst["formula"], dev)
        if not dev <= tol:
            check.fail(t.name, f"{what}; tolerance {tol:.1e}. Wrong --base, or the factors were changed")


def _formula_detail(method: Method, worst: float) -> str:
    if method.spectrum is None:
        return f"A0 equals the seeded {method.name} formula (max relative deviation {worst:.1e})"
    if not method.residual:
        return f"A0 spans the {method.spectrum}-r right singular subspace (min similarity {1 - worst:.6f})"
    return f"s B0 A0 is the base weight's rank-r SVD part (max relative deviation {worst:.1e})"
