"""`loraforge inspect`: the paper's diagnostics of an adapter, per module and averaged.

For every adapted module, against the ORIGINAL pretrained weight W0 = U S V^T:
- spectrum: the singular values of W0, in particular the top-r and the bottom-r (smallest nonzero)
  ones the inits use (paper Fig. 9);
- init norm ||B0 A0||_F (paper Table 4);
- subspace similarity ||A V_r||_F / ||A||_F with the principal (V_r) and minor (V_-r) right singular
  vectors, for A0 and, for a trained adapter, for the trained A (paper Fig. 7);
- for a trained adapter, the update dW = s B A - s0 B0 A0 (the change of the weight the model
  computes, from the original W0) along W0's singular directions: c_i = |u_i^T dW v_i|,
  p_i = c_i / sum_j c_j and the cumulative energy sum_{j<=i} c_j^2 / sum_j c_j^2 (paper Fig. 3).
  For B0 = 0 methods dW = s B A as in the paper; for residualised methods the B0 A0 part the init
  moved out of the base is subtracted, so dW is what training changed.

What is ADAPTER: an init directory (its own init), or a trained/converted adapter whose init is
--init (or unknown: B0 = 0 is assumed for a plain PEFT adapter, and said so). W0 comes from --base,
else the manifest's source model, else adapter_config.json's base_model_name_or_path; when that is
a loraforge residual base (OUT/base), W0 = base + s0 B0 A0 is rebuilt from its init.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from loraforge.adapters.directory import Adapter, load_adapter, residual_base_of
from loraforge.adapters.writers import ADAPTER_WEIGHTS, check_factors
from loraforge.core.errors import LoraforgeError
from loraforge.models.checkpoint import sha256_file
from loraforge.models.source import resolve_source
from loraforge.ship.analysis import (
    aligned_update,
    cumulative_energy,
    subspace_similarity,
    thin_svd,
    update_distribution,
)

INIT_FORMAT = "loraforge-manifest/1"
CONVERTED_FORMAT = "loraforge-converted/1"


@dataclass
class InspectConfig:
    """What to inspect. Every field has a flag in `loraforge inspect`."""

    modules: Optional[list[str]] = None  # module names or suffixes (q_proj, mlp.down_proj); None: all
    layers: Optional[list[int]] = None  # transformer blocks; None: all
    device: str = "auto"  # where the SVDs run: auto (cuda if present), cpu, cuda, cuda:N


@dataclass
class ModuleDiagnostics:
    """The diagnostics of one module (None where they do not apply)."""

    name: str
    kind: str  # the module with its layer index removed, e.g. "self_attn.q_proj": curves are averaged per kind
    layer: Optional[int]
    shape: tuple[int, int]
    r: int
    rank: int  # numerical rank of W0
    sigma: list[float]  # all singular values of W0, descending (spectrum plots)
    sigma_top_mean: float  # mean of the r largest singular values
    sigma_bottom_mean: float  # mean of the r smallest nonzero ones
    init_norm: Optional[float] = None  # ||B0 A0||_F (None when the init is unknown)
    init_sim_top: Optional[float] = None  # ||A0 V_r||_F / ||A0||_F
    init_sim_bottom: Optional[float] = None  # ||A0 V_-r||_F / ||A0||_F
    sim_top: Optional[float] = None  # the same for the trained A
    sim_bottom: Optional[float] = None
    update_norm: Optional[float] = None  # ||dW||_F
    p: Optional[list[float]] = None  # p_i over W0's singular directions, largest singular value first
    energy: Optional[list[float]] = None  # cumulative energy
    p_top: Optional[float] = None  # sum of p_i over the top r directions
    p_bottom: Optional[float] = None  # ... over the bottom r (nonzero) directions
    energy_top: Optional[float] = None  # cumulative energy after the top r directions

    SCALARS = (
        "shape",
        "rank",
        "sigma_top_mean",
        "sigma_bottom_mean",
        "init_norm",
        "init_sim_top",
        "init_sim_bottom",
        "sim_top",
        "sim_bottom",
        "update_norm",
        "p_top",
        "p_bottom",
        "energy_top",
    )

    def scalars(self) -> dict:
        return {k: getattr(self, k) for k in self.SCALARS}


def diagnose_module(
    W0: torch.Tensor,
    r: int,
    A0: Optional[torch.Tensor] = None,
    B0: Optional[torch.Tensor] = None,
    s0: float = 1.0,
    A: Optional[torch.Tensor] = None,
    B: Optional[torch.Tensor] = None,
    s: float = 1.0,
) -> dict:
    """All diagnostics of one module as a dict of ModuleDiagnostics fields (a pure function).

    W0 (m, n): the original weight. A0 (r, n), B0 (m, r), s0: the init (None if unknown). A, B, s:
    the trained adapter (None for an init). The update is s B A - s0 B0 A0 (B0 A0 = 0 if unknown).
    """
    svd = thin_svd(W0)
    V_top, V_bottom = svd.top(r), svd.bottom(r)
    out = {
        "rank": svd.rank,
        "sigma": svd.S_all.tolist(),
        "sigma_top_mean": float(svd.S[:r].mean()),
        "sigma_bottom_mean": float(svd.S[-r:].mean()),
    }
    if A0 is not None:
        out["init_norm"] = float((B0.double() @ A0.double()).norm())
        out["init_sim_top"] = float(subspace_similarity(A0, V_top))
        out["init_sim_bottom"] = float(subspace_similarity(A0, V_bottom))
    if A is not None:
        out["sim_top"] = float(subspace_similarity(A, V_top))
        out["sim_bottom"] = float(subspace_similarity(A, V_bottom))
        # dW = [s B | -s0 B0] [A ; A0], kept factored so the m x n update is never formed.
        Bs, As = s * B.double(), A.double()
        if A0 is not None:
            Bs = torch.cat([Bs, -s0 * B0.double()], dim=1)
            As = torch.cat([As, A0.double()], dim=0)
        c = aligned_update(svd.U, svd.V, Bs, As)
        # An unchanged adapter gives dW = 0 up to rounding; do not normalise rounding noise into a
        # distribution. The floor is float64 rounding of the two products that cancel.
        floor = 64 * torch.finfo(torch.float64).eps * float(Bs.norm() * As.norm()) * max(1, c.numel())
        if float(c.sum()) <= floor:
            c = torch.zeros_like(c)
        p, energy = update_distribution(c), cumulative_energy(c)
        gram = (Bs.T @ Bs) * (As @ As.T)  # ||B A||_F^2 = sum_ij (B^T B)_ij (A A^T)_ij
        out.update(
            update_norm=float(gram.sum().clamp_min(0).sqrt()),
            p=p.tolist(),
            energy=energy.tolist(),
            p_top=float(p[:r].sum()),
            p_bottom=float(p[-r:].sum()),
            energy_top=float(energy[min(r, len(energy)) - 1]),
        )
    return out


@dataclass
class InspectReport:
    adapter: Path
    method: Optional[str]
    r: int
    base_model: str
    trained: bool  # True when the adapter is not its own init (the update diagnostics apply)
    modules: list[ModuleDiagnostics]
    notes: list[str] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return list(dict.fromkeys(m.kind for m in self.modules))

    def mean(self, kind: Optional[str] = None) -> dict:
        """Mean of every scalar over all modules (or over the modules of one KIND)."""
        rows = [m for m in self.modules if kind is None or m.kind == kind]
        out = {"modules": len(rows)}
        for k in ModuleDiagnostics.SCALARS:
            values = [getattr(m, k) for m in rows if isinstance(getattr(m, k), (int, float))]
            if values and k not in ("shape", "rank"):
                out[k] = sum(values) / len(values)
        return out

    def curves(self, kind: str) -> Optional[dict]:
        """p_i and cumulative energy of one module kind, averaged over its layers (all share one shape)."""
        rows = [m for m in self.modules if m.kind == kind and m.p is not None]
        if not rows:
            return None
        k = min(len(m.p) for m in rows)  # the numerical rank can differ by a few between layers
        p = torch.tensor([m.p[:k] for m in rows]).mean(0)
        energy = torch.tensor([m.energy[:k] for m in rows]).mean(0)
        return {"p": p.tolist(), "energy": energy.tolist(), "layers": len(rows)}

    def to_json(self) -> dict:
        return {
            "adapter": str(self.adapter),
            "method": self.method,
            "r": self.r,
            "base_model": self.base_model,
            "trained": self.trained,
            "notes": self.notes,
            "mean": self.mean(),
            "by_kind": {k: self.mean(k) for k in self.kinds()},
            "curves": {k: c for k in self.kinds() if (c := self.curves(k)) is not None},
            "modules": {
                m.name: m.scalars()
                | {"sigma_top": m.sigma[: m.r], "sigma_bottom": m.sigma[max(m.rank - m.r, 0) : m.rank]}
                for m in self.modules
            },
        }


def module_kind(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj' (GPT-2's attn.c_proj and mlp.c_proj stay apart);
    an expert 'model.layers.3.mlp.experts.down_proj.7' -> 'mlp.experts.down_proj'."""
    m = re.search(r"(?:^|\.)\d+\.(.+)$", name)
    kind = m.group(1) if m else name
    return re.sub(r"(\.experts\.[^.]+)\.\d+$", r"\1", kind)


def select_modules(names: list[str], config: InspectConfig) -> list[str]:
    from loraforge.models.targets import layer_index

    # safetensors stores keys sorted as strings (layers.10 before layers.2): order by layer number.
    chosen = sorted(names, key=lambda n: (layer_index(n) if layer_index(n) is not None else -1, n))
    if config.modules:
        chosen = [n for n in chosen if any(n == w or n.endswith("." + w) for w in config.modules)]
        if not chosen:
            kinds = ", ".join(dict.fromkeys(module_kind(n) for n in names))
            raise LoraforgeError(
                f"--modules {','.join(config.modules)} matches no adapted module; the adapter has {kinds}."
            )
    if config.layers is not None:
        present = sorted({layer_index(n) for n in chosen if layer_index(n) is not None})
        chosen = [n for n in chosen if layer_index(n) in set(config.layers)]
        if not chosen:
            raise LoraforgeError(
                f"--layers {config.layers} selects no adapted module; the adapter's layers are "
                f"{present[0]}-{present[-1]}."
                if present
                else "--layers selects no adapted module."
            )
    return chosen


def inspect_adapter(
    adapter: str | Path,
    init: Optional[str | Path] = None,
    base: Optional[str] = None,
    config: Optional[InspectConfig] = None,
) -> InspectReport:
    """Compute the diagnostics of ADAPTER (see the module docstring for what is compared with what)."""
    from loraforge.core.devices import resolve_device
    from loraforge.models.targets import layer_index
    from loraforge.models.weights import open_model_weights

    config = config or InspectConfig()
    ad = load_adapter(adapter, "ADAPTER")
    ad.check_plain_lora("inspect")
    notes: list[str] = []
    init_ad = _find_init(ad, init, notes)

    candidate = base or _manifest_source(init_ad) or _manifest_source(ad) or ad.config.get("base_model_name_or_path")
    if not candidate:
        raise LoraforgeError(f"{ad.path} does not say which model it belongs to; pass the original model with --base.")
    via_residual = residual_base_of(Path(candidate)) if Path(candidate).is_dir() else None
    if via_residual is not None:
        notes.append(f"{candidate} is the residual base of {via_residual.path}: W0 is rebuilt as base + s0 B0 A0.")
        if init_ad is None:
            init_ad = via_residual
            notes.append(f"the init is {via_residual.path} (whose residual base the adapter names).")
    trained = init_ad is None or init_ad.path.resolve() != ad.path.resolve()
    if trained and init_ad is None:
        notes.append(
            "no init given: B0 A0 = 0 assumed (right for lora/rlpo/rlmo/dct/wavelet inits and converted "
            "adapters; pass --init for a pissa/milora/olora/olora-tail init)."
        )
    source = resolve_source(candidate)  # once: the skeleton and W0 below come from this one
    _name_experts(source, ad, init_ad, via_residual)
    if init_ad is not None and trained:
        _check_same_modules(ad, init_ad)

    names = select_modules(ad.modules, config)
    weights = open_model_weights(source, names, role="--base" if base else "the base model")
    device = resolve_device(config.device)
    r = ad.r
    rows = []
    # One module at a time: memory holds one W0 and its SVD, whatever the model's size.
    for name in names:
        t = weights.targets[name]
        W0 = weights.matrix(name).to(device)
        if via_residual is not None:
            A0r, B0r = (x.to(device, torch.float64) for x in via_residual.factors(name))
            W0 = W0 + via_residual.scaling * (B0r @ A0r)
        A, B = (x.to(device, torch.float64) for x in ad.factors(name))
        # NaN or inf factors gave a table of NaN statistics with exit 0: refuse, as eval does
        check_factors(str(ad.path), name, {"lora_A": A, "lora_B": B}, "nothing was inspected")
        if A.shape[1] != t.in_features or B.shape[0] != t.out_features:
            raise LoraforgeError(
                f"Module {name}: the adapter is {B.shape[0]} x {A.shape[1]} but {candidate} has "
                f"{t.out_features} x {t.in_features}: a different base model. Pass the right --base."
            )
        A0 = B0 = None
        if init_ad is not None:
            A0, B0 = (x.to(device, torch.float64) for x in init_ad.factors(name))
            check_factors(f"{init_ad.path} (the init)", name, {"lora_A": A0, "lora_B": B0}, "nothing was inspected")
        if trained:
            d = diagnose_module(W0, r, A0, B0, init_ad.scaling if init_ad else 1.0, A, B, ad.scaling)
        else:
            d = diagnose_module(W0, r, A, B, ad.scaling)
        rows.append(
            ModuleDiagnostics(name=name, kind=module_kind(name), layer=layer_index(name), shape=t.shape, r=r, **d)
        )
    method = (init_ad.manifest or {}).get("method") if init_ad else (ad.manifest or {}).get("method")
    return InspectReport(ad.path, method, r, candidate, trained, rows, notes)


def _name_experts(source, *adapters: Optional[Adapter]) -> None:
    """Fused expert stacks are diagnosed expert by expert: name their factors per expert from what PEFT builds
    from each adapter's config on CANDIDATE's skeleton (the saved names do not say which parameter they hold)."""
    adapters = tuple(a for a in adapters if a is not None and a.config.get("target_parameters"))
    if not adapters:
        return
    from loraforge.adapters.peft_view import adapted_by_peft
    from loraforge.models.targets import build_skeleton

    skeleton = build_skeleton(source.path)
    for a in adapters:
        try:
            a.use_peft_view(adapted_by_peft(skeleton, a.config))
        except ValueError as e:
            raise LoraforgeError(f"PEFT cannot load {a.path} on {source.model_id}: {e}") from None


def _find_init(ad: Adapter, init: Optional[str | Path], notes: list[str]) -> Optional[Adapter]:
    if init is not None:
        init_ad = load_adapter(init, "--init")
        if (init_ad.manifest or {}).get("format") != INIT_FORMAT:
            raise LoraforgeError(f"--init {init} has no loraforge.json from `loraforge init`; pass the init directory.")
        return init_ad
    manifest = ad.manifest or {}
    if manifest.get("format") != INIT_FORMAT:
        return None
    recorded = (manifest.get("files") or {}).get(ADAPTER_WEIGHTS)
    if recorded is None or recorded == sha256_file(ad.weights_file):
        return ad  # an untouched init: its own init
    method = manifest.get("method")
    if manifest.get("base"):
        raise LoraforgeError(
            f"{ad.path}'s adapter_model.safetensors differs from the one its manifest records, "
            f"so it was trained from a {method} init whose B0 A0 is needed: pass that init directory with --init."
        )
    notes.append(
        f"{ad.path} changed since init (sha256 differs from its manifest): inspected as trained from a {method} "
        "init with B0 = 0."
    )
    return None


def _manifest_source(ad: Optional[Adapter]) -> Optional[str]:
    if ad is None or not ad.manifest:
        return None
    return (ad.manifest.get("source") or {}).get("model_id")


def _check_same_modules(trained: Adapter, init: Adapter) -> None:
    missing = [m for m in trained.modules if m not in init.factor_keys]
    if missing or trained.r != init.r:
        what = (
            f"module {missing[0]} is not in the init" if missing else f"r = {trained.r} but the init has r = {init.r}"
        )
        raise LoraforgeError(
            f"{trained.path} was not trained from --init {init.path}: {what}. Pass the init it was trained from."
        )


def format_table(report: InspectReport) -> str:
    """The per-module table, then the mean per module kind and over all modules."""
    cols = [
        ("module", None, 0),
        ("shape", None, 0),
        ("s_top", "sigma_top_mean", 4),
        ("s_bot", "sigma_bottom_mean", 4),
        ("|B0A0|", "init_norm", 4),
        ("A0.Vr", "init_sim_top", 3),
        ("A0.V-r", "init_sim_bottom", 3),
    ]
    if report.trained:
        cols += [
            ("A.Vr", "sim_top", 3),
            ("A.V-r", "sim_bottom", 3),
            ("|dW|", "update_norm", 4),
            ("p_top", "p_top", 3),
            ("p_bot", "p_bottom", 3),
            ("E_top", "energy_top", 3),
        ]

    def fmt(v, digits):
        if v is None:
            return "-"
        return f"{v:.{digits}g}" if digits else str(v)

    rows = [
        [m.name, f"{m.shape[0]}x{m.shape[1]}"] + [fmt(getattr(m, k), d) for _, k, d in cols[2:]] for m in report.modules
    ]
    rows.append(None)
    for kind in report.kinds() + [None]:
        mean = report.mean(kind)
        label = f"mean {kind} ({mean['modules']})" if kind else f"MEAN all ({mean['modules']})"
        rows.append([label, ""] + [fmt(mean.get(k), d) for _, k, d in cols[2:]])
    header = [c[0] for c in cols]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows if r)) for i in range(len(cols))]
    line = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [line(header)] + [line(r) if r else "-" * (sum(widths) + 2 * (len(widths) - 1)) for r in rows]
    return "\n".join(out)


LEGEND = (
    "s_top/s_bot: mean of the top-r / bottom-r nonzero singular values of W0; |B0A0|: init norm ||B0 A0||_F; "
    "A0.Vr, A0.V-r: ||A V||_F/||A||_F of A0 with the principal / minor right singular vectors; A.Vr, A.V-r: the same "
    "for the trained A; |dW|: ||s B A - s0 B0 A0||_F; p_top/p_bot: share of the update along the top/bottom r "
    "singular directions; E_top: cumulative energy after the top r."
)
