"""`loraforge init`: from a pretrained model to a ready-to-train PEFT adapter directory.

Two entry points share one computation (`compute_inits`):
- `init_adapter(model, out, config)`: the streaming path. Targets are found on a meta-device
  skeleton; target weights are read from the safetensors checkpoint one batch of same-shaped
  matrices at a time (the next batch is read while the current one is decomposed); the adapter,
  the residual base (shard by shard) and the manifest are written to a staged directory.
  Memory grows with the largest batch, not with the model.
- `init_model(model, config)`: a model already in memory (possibly dispatched across devices by
  accelerate) is initialised in place and returned as a PeftModel, ready for TRL's GRPOTrainer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from loraforge.devices import decomposition_devices, resolve_device  # noqa: F401 (resolve_device re-exported)
from loraforge.errors import LoraforgeError
from loraforge.linalg import exact_spectrum, fast_spectrum
from loraforge.methods import MethodInput, get_method
from loraforge.targets import Target, find_targets

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class InitConfig:
    """How to initialise. Every field has a --flag of the same name in `loraforge init`."""

    method: str  # one of METHODS: lora, rlpo, rlmo, pissa, milora, olora, olora-tail, dct, wavelet
    r: int  # adapter rank, >= 1 and <= min(out, in) of every target module
    alpha: Optional[float] = None  # LoRA alpha; None means 2 * r (the paper's setting)
    rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    target_modules: str | list[str] = "all-linear"  # "all-linear" (no output head) or module names
    layers: Optional[list[int]] = None  # only these transformer blocks; None = all
    seed: int = 0  # seed of the random methods (lora, wavelet); per module it is mixed with the name
    device: str = "auto"  # where decompositions run: auto (cuda if present), cpu, cuda, cuda:N
    adapter_dtype: str = "float32"  # dtype of the stored A0, B0: float32, bfloat16, float16
    base_dtype: str = "auto"  # residual base dtype: auto (as the checkpoint), float32, bfloat16, float16
    svd: str = "exact"  # exact, or fast (randomised; principal methods only)
    batch_mib: int = 512  # memory budget for one batch of float64 matrices, in MiB
    residual_mib: int = 512  # residuals held in memory until their shard is written, in MiB; the rest wait on disk

    def __post_init__(self):
        self.method_spec = get_method(self.method)
        if not isinstance(self.r, int) or self.r < 1:
            raise LoraforgeError(f"-r/--rank must be a positive integer, got {self.r!r}.")
        if self.alpha is None:
            self.alpha = 2.0 * self.r
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise LoraforgeError(f"--alpha must be a positive number, got {self.alpha!r}.")
        if self.adapter_dtype not in ("float32", "bfloat16", "float16"):
            raise LoraforgeError(f"--adapter-dtype must be float32, bfloat16 or float16, got {self.adapter_dtype!r}.")
        if self.base_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise LoraforgeError(f"--base-dtype must be auto, float32, bfloat16 or float16, got {self.base_dtype!r}.")
        if self.svd not in ("exact", "fast"):
            raise LoraforgeError(f"--svd must be exact or fast, got {self.svd!r}.")
        if self.svd == "fast" and not self.method_spec.fast_ok:
            if self.method_spec.spectrum is None:
                raise LoraforgeError(f"--svd fast does not apply to {self.method}, which needs no SVD; drop --svd.")
            raise LoraforgeError(
                f"--svd fast cannot be used with {self.method}: it needs the bottom of the spectrum, and a randomised "
                "SVD finds only the top singular subspace. Drop --svd fast (the exact path is batched and fast)."
            )
        if self.seed < 0:
            raise LoraforgeError(f"--seed must be >= 0, got {self.seed}.")
        if self.batch_mib < 1:
            raise LoraforgeError(f"batch_mib must be >= 1, got {self.batch_mib}.")
        if self.residual_mib < 0:
            raise LoraforgeError(f"residual_mib must be >= 0, got {self.residual_mib}.")

    @property
    def scaling(self) -> float:
        """s in y = W x + s * B A x: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items()}
        d["scaling"] = self.scaling
        return d


@dataclass
class ModuleInit:
    """The initialisation of one target module, ready to write."""

    target: Target
    A: torch.Tensor  # (r, in_features), adapter dtype, CPU
    B: torch.Tensor  # (out_features, r), adapter dtype, CPU
    base: Optional[torch.Tensor]  # residual in the stored layout and base dtype (None: base unchanged)
    stats: dict = field(default_factory=dict)


@dataclass
class InitResult:
    """What `init_adapter` did."""

    out: Path
    manifest: dict
    seconds: float

    @property
    def modules(self) -> int:
        return len(self.manifest["modules"])


def module_seed(seed: int, name: str) -> int:
    """Per-module seed: the same module gets the same numbers however modules are batched or ordered."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def plan_batches(targets: Sequence[Target], budget_bytes: int) -> list[list[Target]]:
    """Group targets by shape (first-appearance order) and cut each group to the memory budget.

    One float64 matrix costs about 3x its size while decomposed (W, the other side's vectors, the
    residual), so a batch holds budget / (24 * m * n) matrices, at least one.
    """
    groups: dict[tuple[int, int, bool], list[Target]] = {}
    for t in targets:
        groups.setdefault((t.out_features, t.in_features, t.transposed), []).append(t)
    batches = []
    for (m, n, _), members in groups.items():
        size = max(1, budget_bytes // (24 * m * n))
        batches.extend(members[i : i + size] for i in range(0, len(members), size))
    return batches


def check_ranks(targets: Sequence[Target], r: int) -> None:
    for t in targets:
        if r > min(t.shape):
            raise LoraforgeError(
                f"-r {r} is larger than module {t.name} allows: its weight is {t.out_features} x {t.in_features} "
                f"(out x in), so the rank is at most {min(t.shape)}. Lower -r or leave this module out with "
                "--target-modules/--layers."
            )


class Workspace:
    """Reusable buffers for a batch's big temporaries (the float64 and float32 copies of W).

    Why: a fresh CPU tensor of a few hundred MB is paid for again in page faults on first touch
    (~0.1 s per 200 MB here, a fifth of SmolLM2's whole init); one buffer per role, grown to the
    largest batch, is touched once. Nothing that outlives the batch may point into it. On a GPU
    torch's caching allocator already reuses memory, so this hands out plain tensors there.
    """

    def __init__(self):
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        n = math.prod(shape)
        buf = self._buffers.get((role, dtype))
        if buf is None or buf.numel() < n:
            buf = self._buffers[(role, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)


def _init_batch(batch: list[Target], stored: list[torch.Tensor], config: InitConfig, device: torch.device,
                workspace: Optional[Workspace] = None) -> list[ModuleInit]:
    method = config.method_spec
    s = config.scaling
    workspace = workspace or Workspace()
    shape = (len(stored), *stored[0].shape)
    base_dtypes = [w.dtype if config.base_dtype == "auto" else DTYPES[config.base_dtype] for w in stored]
    # Our own float64 copy (and a float32 one for top-r spectra), filled in one pass per matrix: copy_
    # converts as it copies, and float32 holds bf16/fp16/fp32 weights exactly. `--svd fast` works in
    # float32 alone when the residual is stored in 16 bits: float32 residual arithmetic (DESIGN.md
    # allows it) errs by ~6e-8 of W, 1/60000 of bf16's own rounding, and the reported reconstruction
    # error still measures that rounding. A float32 base would hide float32's error behind a zero, so
    # it keeps float64.
    fast32 = config.svd == "fast" and all(d in (torch.bfloat16, torch.float16) for d in base_dtypes)
    W = workspace.take("W", shape, torch.float32 if fast32 else torch.float64, device)
    W32 = workspace.take("W32", shape, torch.float32, device) if method.spectrum == "top" and not fast32 else None
    for i, w in enumerate(stored):
        W[i].copy_(w)
        if W32 is not None:
            W32[i].copy_(w)
    if batch[0].transposed:  # Conv1D stores W^T
        W = W.transpose(1, 2)
        W32 = W32.transpose(1, 2) if W32 is not None else None
    # In W's own precision: asking for a float64 norm of a float32 W costs 4x a plain one. A NaN or
    # inf anywhere makes the norm non-finite (bf16/fp16/fp32 values cannot overflow a float64 sum of
    # squares, nor a float32 one short of weights near 1e19), so one (batch,) check replaces an
    # elementwise isfinite pass over W.
    w_norm = torch.linalg.vector_norm(W, dim=(1, 2)).double()
    finite = torch.isfinite(w_norm)
    if not bool(finite.all()):
        bad = batch[int((~finite).nonzero()[0])]
        raise LoraforgeError(f"Module {bad.name} has non-finite weights (NaN or inf); the checkpoint is damaged. Re-download or re-save it.")

    spectrum = None
    if method.spectrum is not None:
        if config.svd == "fast":
            spectrum = fast_spectrum(W, config.r, seed=config.seed, W32=W32)
        else:
            spectrum = exact_spectrum(W, config.r, method.spectrum, left=method.residual, W32=W32)
            low = (spectrum.rank < config.r).nonzero()
            if len(low):
                i = int(low[0])
                raise LoraforgeError(
                    f"Module {batch[i].name} ({batch[i].out_features} x {batch[i].in_features}) has numerical rank "
                    f"{int(spectrum.rank[i])}, fewer than -r {config.r} nonzero singular values, so {method.name} has no "
                    f"{config.r} singular directions to use. Lower -r to at most {int(spectrum.rank[i])}."
                )
    seeds = [module_seed(config.seed, t.name) for t in batch]
    A, B = method.init(MethodInput(W=W, r=config.r, scaling=s, spectrum=spectrum, seeds=seeds))

    adapter_dtype = DTYPES[config.adapter_dtype]
    A_s, B_s = A.to(adapter_dtype), B.to(adapter_dtype)
    # Norms and residuals use the factors AS STORED (after rounding to the adapter dtype), so
    # base + s * B0 A0 reproduces W as closely as the base dtype allows. B0 = 0 methods skip the
    # (m x n) product: it is exactly zero.
    update_norm = torch.zeros(len(batch), dtype=torch.float64)
    if method.residual:
        Bd, Ad = B_s.double(), A_s.double()
        # ||s B A||_F^2 = s^2 tr((B^T B)(A A^T)): r x r products instead of a pass over the m x n update
        gram_B, gram_A = Bd.transpose(1, 2) @ Bd, Ad @ Ad.transpose(1, 2)
        update_norm = (s * (gram_B * gram_A).sum(dim=(1, 2)).clamp_min(0).sqrt()).cpu()
        # W <- W - s B A in W's precision, inside the GEMM (no m x n temporary): W is now the residual
        # and W itself is not needed any more. (Stored factors are exact in float32 as in float64.)
        W.baddbmm_(Bd.to(W.dtype), Ad.to(W.dtype), alpha=-s)
    results = []
    for i, t in enumerate(batch):
        stats = {
            "shape": [t.out_features, t.in_features],
            "init_norm": float(update_norm[i]) / s,  # ||B0 A0||_F (the paper's Table 4)
            "update_norm": float(update_norm[i]),  # ||s B0 A0||_F: what the adapter adds at step 0
        }
        if spectrum is not None:
            if method.spectrum == "bottom":  # bottom-r counts every zero direction: the rank is exact
                stats["rank"] = int(spectrum.rank[i])
            # Share of ||W||_F^2 in the chosen singular directions (captured energy).
            stats["energy"] = float((spectrum.S[i] ** 2).sum() / w_norm[i] ** 2) if w_norm[i] > 0 else 0.0
        base = None
        if method.residual:
            residual = W[i].to(base_dtypes[i], copy=True)  # copy: W lives in the workspace
            err = W[i].sub_(residual)  # W - (base + s B0 A0), as stored (in place; promotes as it goes)
            lo, hi = torch.aminmax(err)  # max |err| in one pass, without an |err| copy
            stats["recon_max_abs"] = float(torch.maximum(-lo, hi))
            stats["recon_rel"] = float(torch.linalg.vector_norm(err) / w_norm[i]) if w_norm[i] > 0 else 0.0
            base = (residual.T if t.transposed else residual).contiguous().cpu()
        else:
            stats["recon_max_abs"] = 0.0  # the base is not touched and s * B0 A0 = 0 exactly
            stats["recon_rel"] = 0.0
        results.append(ModuleInit(t, A_s[i].contiguous().cpu(), B_s[i].contiguous().cpu(), base, stats))
    return results


def compute_inits(targets: Sequence[Target], read: Callable[[Target], torch.Tensor], config: InitConfig,
                  devices: torch.device | Sequence[torch.device], progress: bool = False) -> Iterator[list[ModuleInit]]:
    """Initialise TARGETS batch by batch, in order; READ returns a target's weight as stored in the checkpoint.

    Reading the next batch overlaps with decomposing the current one (a background thread does the
    I/O; torch releases the GIL in both). With several DEVICES (GPUs), batch i is decomposed on
    device i mod len(DEVICES), one batch per device at a time; every batch is computed whole on one
    device, so the results are the same as on one device of that kind.
    """
    devices = [devices] if isinstance(devices, torch.device) else list(devices)
    check_ranks(targets, config.r)
    batches = plan_batches(targets, config.batch_mib * 2**20)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(targets), unit="module", desc=f"{config.method} r={config.r}", disable=not progress, file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader, \
            concurrent.futures.ThreadPoolExecutor(max_workers=len(devices)) as workers:
        pending = reader.submit(lambda b=batches[0]: [read(t) for t in b]) if batches else None
        running: collections.deque = collections.deque()  # batches being decomposed, oldest first
        workspaces = [Workspace() for _ in devices]
        for i, batch in enumerate(batches):
            stored = pending.result()
            if i + 1 < len(batches):
                pending = reader.submit(lambda b=batches[i + 1]: [read(t) for t in b])
            if len(devices) == 1:  # on this thread: no hand-over, errors surface where they happen
                yield _init_batch(batch, stored, config, devices[0], workspaces[0])
                bar.update(len(batch))
                continue
            k = i % len(devices)  # one batch per device at a time, so one workspace per device
            running.append(workers.submit(_init_batch, batch, stored, config, devices[k], workspaces[k]))
            if len(running) == len(devices):  # every device busy: wait for the oldest, hand it on in order
                done = running.popleft().result()
                yield done
                bar.update(len(done))
        while running:
            done = running.popleft().result()
            yield done
            bar.update(len(done))
    bar.close()


def adapter_config(config: InitConfig, target_modules, base_model: str, fan_in_fan_out: bool) -> dict:
    """adapter_config.json's fields: PEFT's LoraConfig with our values (init_lora_weights=True: see
    writers.write_adapter_config). Written as a dict so that `loraforge init` need not import PEFT
    (and through it transformers); PEFT fills every field left out with its default on load.
    `lora_config` turns it into the LoraConfig itself."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "use_rslora": config.rslora,
        "target_modules": sorted(target_modules) if isinstance(target_modules, (list, set, tuple)) else target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": False,
    }


def lora_config(config: InitConfig, target_modules, base_model: str, fan_in_fan_out: bool):
    """The PEFT LoraConfig describing the adapter."""
    from peft import LoraConfig

    fields = adapter_config(config, target_modules, base_model, fan_in_fan_out)
    fields.pop("peft_type")  # LoraConfig sets it itself
    return LoraConfig(**fields)


def init_model(model: torch.nn.Module, config: InitConfig, adapter_name: str = "default", progress: bool = False):
    """Initialise a model already in memory and return it wrapped as a PeftModel.

    Works on a plain model and on one dispatched across devices by accelerate (device_map), as long
    as the target weights are materialised (not offloaded to disk). For residualised methods the
    target weights are replaced IN PLACE by the residual (in the model's own dtype). The result is
    ready for TRL's GRPOTrainer (pass it as `model`, with no `peft_config`).
    """
    from peft import get_peft_model

    targets = find_targets(model, config.target_modules, config.layers)
    modules = dict(model.named_modules())
    for t in targets:
        if modules[t.name].weight.device.type == "meta":
            raise LoraforgeError(
                f"Module {t.name}'s weight is offloaded (on the meta device); init_model needs materialised weights. "
                "Use `loraforge init MODEL_DIR` (the streaming path) for models that do not fit in memory."
            )
    devices = decomposition_devices(config.device)
    inits = [m for batch in compute_inits(targets, lambda t: modules[t.name].weight.detach(), config, devices, progress) for m in batch]
    with torch.no_grad():
        for m in inits:
            if m.base is not None:
                weight = modules[m.target.name].weight
                weight.copy_(m.base.to(weight.device, weight.dtype))
    from loraforge.targets import peft_target_modules

    cfg = lora_config(config, peft_target_modules(model, targets), getattr(model, "name_or_path", "") or "",
                      any(t.transposed for t in targets))
    peft_model = get_peft_model(model, cfg, adapter_name=adapter_name)
    with torch.no_grad():
        for m in inits:
            layer = peft_model.base_model.model.get_submodule(m.target.name)
            layer.lora_A[adapter_name].weight.copy_(m.A)
            layer.lora_B[adapter_name].weight.copy_(m.B)
    return peft_model


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("loraforge", "torch", "transformers", "peft", "safetensors", "huggingface-hub", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _source_dtype(source_config: dict) -> Optional[str]:
    d = source_config.get("dtype") or source_config.get("torch_dtype")
    if d is None and isinstance(source_config.get("text_config"), dict):
        d = source_config["text_config"].get("dtype") or source_config["text_config"].get("torch_dtype")
    return d


def init_adapter(model: str, out: str | Path, config: InitConfig, revision: Optional[str] = None,
                 device_map: Optional[str] = None, overwrite: bool = False, token: Optional[str] = None,
                 trust_remote_code: bool = False, progress: bool = False) -> InitResult:
    """Write a PEFT adapter directory initialised by CONFIG.method for MODEL (a Hub id or directory).

    OUT gets adapter_config.json, adapter_model.safetensors, loraforge.json (the manifest),
    README.md (a model card) and, for residualised methods, base/ (the residual base model).
    With DEVICE_MAP (e.g. "auto", "cpu"), the model is loaded through transformers with that
    accelerate device map and initialised in memory; otherwise the checkpoint is streamed.
    """
    from loraforge import writers
    from loraforge.card import render_model_card
    from loraforge.source import resolve_source
    from loraforge.targets import peft_target_modules

    started = time.perf_counter()
    out = Path(out)
    writers.check_destination(out, overwrite)
    source = resolve_source(model, revision, token, trust_remote_code)
    writers.check_destination(out, overwrite, protect=source.path)
    devices = decomposition_devices(config.device)
    method = config.method_spec

    loaded = None
    if device_map is not None or source.weight_format != "safetensors":
        loaded = _load_model(source, config, device_map, trust_remote_code)
        skeleton = loaded
        targets = find_targets(skeleton, config.target_modules, config.layers)
    else:
        skeleton, targets = _skeleton_and_targets(source, config, trust_remote_code)
    if loaded is None:
        keys = _checkpoint_keys(targets, source, skeleton)
        if keys is None:  # names in the checkpoint differ from the model's (legacy layout): load it
            loaded = _load_model(source, config, None, trust_remote_code)
            targets = find_targets(loaded, config.target_modules, config.layers)
    target_modules = peft_target_modules(skeleton, targets)
    fan_in_fan_out = any(t.transposed for t in targets)

    with writers.staged_dir(out, overwrite) as tmp:
        t0 = time.perf_counter()
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        stats: dict[str, dict] = {}
        residual_files: dict[str, Path | torch.Tensor] = {}  # checkpoint key -> residual, or the file holding it
        held = 0  # bytes of residuals kept in memory (up to residual_mib; the rest go to disk)
        modules = dict(loaded.named_modules()) if loaded is not None else None
        if loaded is not None:
            read = lambda t: modules[t.name].weight.detach()  # noqa: E731
        else:
            read = lambda t: source.open_shard(source.weight_map[keys[t.name]]).read(keys[t.name])  # noqa: E731
        for batch_no, batch in enumerate(compute_inits(targets, read, config, devices, progress)):
            residuals = {}
            for m in batch:
                factors[m.target.name] = (m.A, m.B)
                stats[m.target.name] = m.stats
                if m.base is not None:
                    if loaded is not None:
                        weight = modules[m.target.name].weight
                        with torch.no_grad():
                            weight.copy_(m.base.to(weight.device, weight.dtype))
                    else:
                        residuals[keys[m.target.name]] = m.base
            if residuals:
                size = sum(r.numel() * r.element_size() for r in residuals.values())
                if held + size <= config.residual_mib * 2**20:  # e.g. a small model's: keep until written
                    held += size
                    residual_files.update(residuals)
                    continue
                # Park this batch's residuals on disk until their shard is written.
                from safetensors.torch import save_file

                spill = tmp / ".residuals" / f"batch{batch_no:05d}.safetensors"
                spill.parent.mkdir(exist_ok=True)
                save_file(residuals, str(spill))
                residual_files.update({k: spill for k in residuals})
        decompose_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        writers.write_adapter_weights(tmp / writers.ADAPTER_WEIGHTS, factors)
        # For residualised methods the adapter belongs on OUT/base, not on the source model, so that
        # is what PEFT's AutoPeftModel must load (`loraforge push` rewrites it to the base's Hub repo).
        base_model = str(out.resolve() / writers.BASE_DIR) if method.residual else source.model_id
        writers.write_adapter_config(tmp, adapter_config(config, target_modules, base_model, fan_in_fan_out))
        files = {writers.ADAPTER_WEIGHTS: writers.sha256_file(tmp / writers.ADAPTER_WEIGHTS)}
        base_dtype = None
        if method.residual:
            cast_to = None if config.base_dtype == "auto" else DTYPES[config.base_dtype]
            base_dtype = config.base_dtype if cast_to is not None else _source_dtype(source.config)
            if loaded is not None:
                _save_loaded_base(loaded, source, tmp / writers.BASE_DIR, cast_to, trust_remote_code)
                files.update(writers.hash_tree(tmp, writers.BASE_DIR))
            else:
                files.update(writers.write_residual_base(source, tmp / writers.BASE_DIR, residual_files, cast_to, trust_remote_code))
            shutil.rmtree(tmp / ".residuals", ignore_errors=True)
        write_s = time.perf_counter() - t1

        timings = {"decompose_s": round(decompose_s, 3), "write_s": round(write_s, 3),
                   "total_s": round(time.perf_counter() - started, 3)}
        manifest = _manifest(config, source, target_modules, fan_in_fan_out, base_dtype,
                             "in-memory" if loaded is not None else "streaming", devices, timings, files, stats)
        writers.write_json(tmp / writers.MANIFEST, manifest)
        (tmp / "README.md").write_text(render_model_card(manifest))
    return InitResult(out=out, manifest=manifest, seconds=time.perf_counter() - started)


def _manifest(config: InitConfig, source, target_modules, fan_in_fan_out: bool, base_dtype: Optional[str], path: str,
              devices: list[torch.device], timings: dict, files: dict, stats: dict) -> dict:
    """loraforge.json: everything needed to reproduce, verify and explain the adapter."""
    method = config.method_spec
    return {
        "format": "loraforge-manifest/1",
        "method": method.name,
        "paper_name": method.paper_name,
        "A0": method.A0,
        "B0": method.B0,
        "r": config.r,
        "alpha": config.alpha,
        "rslora": config.rslora,
        "scaling": config.scaling,
        "seed": config.seed,
        "svd": config.svd if method.spectrum else None,
        "source": {"model_id": source.model_id, "revision": source.revision, "local": source.is_local},
        "target_modules": target_modules,
        "layers": config.layers,
        "fan_in_fan_out": fan_in_fan_out,
        "dtypes": {"adapter": config.adapter_dtype, "base": base_dtype, "source": _source_dtype(source.config)},
        "base": "base" if method.residual else None,
        "path": path,  # "streaming" or "in-memory"
        "device": ",".join(str(d) for d in devices),  # several when batches were spread over GPUs
        "versions": _versions(),
        "timings": timings,
        "files": files,
        "summary": _summary(stats),
        "modules": stats,
    }


def _summary(stats: dict[str, dict]) -> dict:
    n = len(stats)
    rel = [s["recon_rel"] for s in stats.values()]
    return {
        "modules": n,
        "init_norm_mean": sum(s["init_norm"] for s in stats.values()) / max(n, 1),
        "recon_rel_max": max(rel, default=0.0),
        "recon_rel_mean": sum(rel) / max(n, 1),
        "recon_max_abs": max((s["recon_max_abs"] for s in stats.values()), default=0.0),
    }


def _skeleton_and_targets(source, config: InitConfig, trust_remote_code: bool):
    """The skeleton to find targets on, and the targets. Known decoder layouts come from the
    checkpoint header (no transformers import); if the names asked for are not among them, the
    transformers skeleton has the final word."""
    from loraforge.targets import build_skeleton, header_skeleton

    header = header_skeleton(source)
    if header is not None:
        try:
            return header, find_targets(header, config.target_modules, config.layers)
        except LoraforgeError:
            pass
    skeleton = build_skeleton(source.path, trust_remote_code)
    return skeleton, find_targets(skeleton, config.target_modules, config.layers)


def _checkpoint_keys(targets: Sequence[Target], source, skeleton) -> Optional[dict[str, str]]:
    """Checkpoint key of each target's weight, allowing for a missing or extra base-model prefix
    (e.g. GPT-2 checkpoints saved without `transformer.`). None when some target is not found."""
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    keys = {}
    for t in targets:
        candidates = [t.weight_key]
        if prefix and t.weight_key.startswith(prefix + "."):
            candidates.append(t.weight_key[len(prefix) + 1 :])
        elif prefix:
            candidates.append(f"{prefix}.{t.weight_key}")
        found = next((c for c in candidates if c in source.weight_map), None)
        if found is None:
            return None
        keys[t.name] = found
    return keys


def _load_model(source, config: InitConfig, device_map: Optional[str], trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    dtype = "auto" if config.base_dtype == "auto" else DTYPES[config.base_dtype]
    try:
        return AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, device_map=device_map,
                                                    trust_remote_code=trust_remote_code, use_safetensors=None)
    except (OSError, ValueError) as e:
        raise LoraforgeError(f"transformers could not load {source.model_id}: {e}") from None


def _save_loaded_base(model, source, base_dir: Path, cast_to, trust_remote_code: bool) -> None:
    from loraforge.source import companion_files

    if cast_to is not None:
        model.to(cast_to)
    model.save_pretrained(str(base_dir), safe_serialization=True)
    for f in companion_files(source, trust_remote_code):
        if not (base_dir / f.name).exists():
            shutil.copy2(f, base_dir / f.name)
