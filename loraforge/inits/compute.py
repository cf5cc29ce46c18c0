"""Computing inits batch by batch: the stored weights of same-shaped modules in, factors A0, B0 and
residuals out. Pure tensor work; reading checkpoints and writing files happen elsewhere."""

from __future__ import annotations

import collections
import concurrent.futures
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.inits import quantized
from loraforge.inits.config import DTYPES, InitConfig
from loraforge.inits.linalg import at_full_float32, exact_spectrum, fast_spectrum
from loraforge.inits.methods import MethodInput
from loraforge.inits.plan import check_ranks, module_seed, plan_batches
from loraforge.models.targets import Target


@dataclass
class ModuleInit:
    """The initialisation of one target module (or one expert of a fused stack: target.expert), ready to write."""

    target: Target
    A: torch.Tensor  # (r, in_features), adapter dtype, CPU
    B: torch.Tensor  # (out_features, r), adapter dtype, CPU
    base: Optional[torch.Tensor]  # residual in the stored layout and base dtype (None: base unchanged)
    stats: dict = field(default_factory=dict)


class Workspace:
    """Reusable buffers for a batch's big temporaries (the float64 and float32 copies of W).

    Why: a fresh CPU tensor of a few hundred MB is paid for again in page faults on first touch
    (a measurable share of a small model's whole init: benchmarks/RESULTS.md); one buffer per role, grown to the
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


@at_full_float32  # the float32 Gram, power iterations and (under --svd fast) residuals: no TF32
def _init_batch(
    batch: list[Target],
    stored: list[torch.Tensor],
    config: InitConfig,
    device: torch.device,
    workspace: Optional[Workspace] = None,
) -> list[ModuleInit]:
    """One batch of same-shaped modules: load W, decompose, apply the method, residualise, report."""
    method = config.method_spec
    base_dtypes = [w.dtype if config.base_dtype == "auto" else DTYPES[config.base_dtype] for w in stored]
    W, W32, w_norm = _load_batch(batch, stored, config, device, workspace or Workspace(), base_dtypes)
    quant_rel = None  # --quantize: B0 = 0 methods decompose Q(W), the weight the model trains on (inits/quantized.py)
    if config.quantize and not method.residual:
        quant_rel = quantized.decompose_quantized(batch, W, W32, [w.dtype for w in stored], config.quantize)
    spectrum = _spectrum(batch, W, W32, config)
    seeds = [module_seed(config.seed, t.unit) for t in batch]
    A, B = method.init(MethodInput(W=W, r=config.r, scaling=config.scaling, spectrum=spectrum, seeds=seeds))
    if config.quantize and method.residual and method.spectrum == "top":
        A, B = quantized.refine_principal(batch, W, A, B, config, seeds, base_dtypes)
    adapter_dtype = DTYPES[config.adapter_dtype]
    A_s, B_s = A.to(adapter_dtype), B.to(adapter_dtype)
    rounding = torch.maximum(factor_rounding(A, A_s, dim=2), factor_rounding(B, B_s, dim=1)).cpu()
    update_norm = _residualise(W, A_s, B_s, config) if method.residual else torch.zeros(len(batch), dtype=torch.float64)
    results = []
    for i, t in enumerate(batch):
        stats = {
            "shape": [t.out_features, t.in_features],
            "init_norm": float(update_norm[i]) / config.scaling,  # ||B0 A0||_F (the paper's Table 4)
            "update_norm": float(update_norm[i]),  # ||s B0 A0||_F: what the adapter adds at step 0
            "factor_rounding": float(rounding[i]),  # worst row of A0 / column of B0 lost to the adapter dtype
        }
        if spectrum is not None:
            if method.spectrum == "bottom":  # bottom-r counts every zero direction: the rank is exact
                stats["rank"] = int(spectrum.rank[i])
            # Share of ||W||_F^2 in the chosen singular directions (captured energy).
            stats["energy"] = float((spectrum.S[i] ** 2).sum() / w_norm[i] ** 2) if w_norm[i] > 0 else 0.0
        if config.quantize:  # ||Q(base) + s B0 A0 - W|| / ||W||, before the residual's buffer is reused
            rel = (
                quant_rel[i]
                if quant_rel is not None
                else quantized.residual_error(t, W[i], base_dtypes[i], w_norm[i], config)
            )
            stats.update({} if rel is None else {"quant_rel": rel})
        base = None
        if method.residual:
            base = _store_residual(W[i], base_dtypes[i], w_norm[i], t.transposed, stats)
        else:
            stats["recon_max_abs"] = 0.0  # the base is not touched and s * B0 A0 = 0 exactly
            stats["recon_rel"] = 0.0
        results.append(ModuleInit(t, A_s[i].contiguous().cpu(), B_s[i].contiguous().cpu(), base, stats))
    return results


def _load_batch(batch, stored, config: InitConfig, device, workspace: Workspace, base_dtypes):
    """W (batch, m, n) in the working precision on DEVICE, a float32 copy for top-r spectra, and ||W||_F.

    Our own float64 copy (and a float32 one for top-r spectra), filled in one pass per matrix: copy_
    converts as it copies, and float32 holds bf16/fp16/fp32 weights exactly. On a GPU the matrix goes over
    as stored (`upload`) and is converted there. `--svd fast` works in
    float32 alone when the residual is stored in 16 bits: float32 residual arithmetic errs by ~6e-8
    of W, 1/60000 of bf16's own rounding, and the reported reconstruction error still measures that
    rounding. A float32 base would hide float32's error behind a zero, so it keeps float64.
    """
    method = config.method_spec
    shape = (len(stored), *stored[0].shape)
    fast32 = config.svd == "fast" and all(d in (torch.bfloat16, torch.float16) for d in base_dtypes)
    W = workspace.take("W", shape, torch.float32 if fast32 else torch.float64, device)
    W32 = workspace.take("W32", shape, torch.float32, device) if method.spectrum == "top" and not fast32 else None
    for i, w in enumerate(stored):
        w = upload(w, device)  # as stored (bf16: a quarter of float64's bytes), cast below on the device
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
        raise LoraforgeError(
            f"Module {bad.unit} has non-finite weights (NaN or inf); the checkpoint is damaged. "
            "Re-download or re-save it."
        )
    return W, W32, w_norm


def _spectrum(batch, W, W32, config: InitConfig):
    """The singular triplets the method needs (None for data-independent methods)."""
    method = config.method_spec
    if method.spectrum is None:
        return None
    if config.svd == "fast":
        return fast_spectrum(W, config.r, seed=config.seed, W32=W32)
    spectrum = exact_spectrum(W, config.r, method.spectrum, left=method.residual, W32=W32)
    low = (spectrum.rank < config.r).nonzero()
    if len(low):
        i = int(low[0])
        raise LoraforgeError(
            f"Module {batch[i].unit} ({batch[i].out_features} x {batch[i].in_features}) has numerical rank "
            f"{int(spectrum.rank[i])}, fewer than -r {config.r} nonzero singular values, so {method.name} has no "
            f"{config.r} singular directions to use. Lower -r to at most {int(spectrum.rank[i])}."
        )
    return spectrum


def _residualise(W: torch.Tensor, A_s: torch.Tensor, B_s: torch.Tensor, config: InitConfig) -> torch.Tensor:
    """W <- W - s B0 A0 in place, with the factors AS STORED (after rounding to the adapter dtype), so
    base + s B0 A0 reproduces W as closely as the base dtype allows; returns ||s B0 A0||_F per module."""
    s = config.scaling
    Bd, Ad = B_s.double(), A_s.double()
    # ||s B A||_F^2 = s^2 tr((B^T B)(A A^T)): r x r products instead of a pass over the m x n update
    gram_B, gram_A = Bd.transpose(1, 2) @ Bd, Ad @ Ad.transpose(1, 2)
    update_norm = (s * (gram_B * gram_A).sum(dim=(1, 2)).clamp_min(0).sqrt()).cpu()
    # In W's precision, inside the GEMM (no m x n temporary): W becomes the residual. (Stored
    # factors are exact in float32 as in float64.) Matrix by matrix: a batched GEMM's kernel may
    # depend on the batch count on a GPU, and a matrix's residual must not depend on its batch.
    for w, b, a in zip(W, Bd.to(W.dtype), Ad.to(W.dtype)):
        w.addmm_(b, a, alpha=-s)
    return update_norm


def _store_residual(R: torch.Tensor, base_dtype, w_norm, transposed: bool, stats: dict) -> torch.Tensor:
    """The residual R cast to the base dtype, in the checkpoint's layout; records its rounding error
    (max abs and relative Frobenius) in STATS. Overwrites R (it lives in the workspace)."""
    residual = R.to(base_dtype, copy=True)  # copy: R lives in the workspace
    err = R.sub_(residual)  # W - (base + s B0 A0), as stored (in place; promotes as it goes)
    lo, hi = torch.aminmax(err)  # max |err| in one pass, without an |err| copy
    stats["recon_max_abs"] = float(torch.maximum(-lo, hi))
    stats["recon_rel"] = float(torch.linalg.vector_norm(err) / w_norm) if w_norm > 0 else 0.0
    return (residual.T if transposed else residual).contiguous().cpu()


def stage(w: torch.Tensor, device: torch.device) -> torch.Tensor:
    """W ready to go to DEVICE: in page-locked (pinned) host memory when DEVICE is a GPU, as stored.

    Runs in the reader thread, so the host copy overlaps the decompositions. Why: from pageable memory the
    driver copies through a bounce buffer, synchronously; from pinned memory the copy is DMA and asynchronous.
    torch's caching host allocator reuses the pinned blocks, so pinning costs one memcpy per matrix after
    the first batches. Weights already on a GPU, and every weight for a CPU init, are returned as they are."""
    if device.type != "cuda" or w.device.type != "cpu" or w.is_pinned():
        return w
    return w.pin_memory()


def upload(w: torch.Tensor, device: torch.device) -> torch.Tensor:
    """W on DEVICE in its stored dtype (the caller converts it there), or W itself when it is there already.

    Why not `dest.copy_(w)` straight from the host: torch converts a blocking host-to-GPU copy's dtype ON
    THE HOST, so a bf16 weight crossed as float64, four times its bytes (about 78 GB of host memory traffic for
    Qwen2.5-7B's float64 and float32 copies), converted on the decomposing thread. As stored, from pinned
    memory (`stage`), the copy is asynchronous and the conversion a GPU kernel."""
    if w.device == device:
        return w
    return w.to(device, non_blocking=w.is_pinned())


def factor_rounding(exact: torch.Tensor, stored: torch.Tensor, dim: int) -> torch.Tensor:
    """Per module, the largest relative change that storing made to a row (DIM=2: A's rows) or column
    (DIM=1: B's columns): ||stored - exact|| / ||exact||. About the dtype's epsilon normally; near 1
    where a factor underflowed to zero, inf or NaN where it overflowed. A row that is exactly zero
    counts as 0 (B0 = 0 methods)."""
    num = torch.linalg.vector_norm(stored.to(exact.dtype) - exact, dim=dim)
    den = torch.linalg.vector_norm(exact, dim=dim)
    rel = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), num * math.inf)
    rel = torch.where(num == 0, torch.zeros_like(rel), rel)  # 0 * inf would be NaN
    return rel.amax(dim=1).double()


def compute_inits(
    targets: Sequence[Target],
    read: Callable[[Target], torch.Tensor],
    config: InitConfig,
    devices: torch.device | Sequence[torch.device],
    progress: bool = False,
) -> Iterator[list[ModuleInit]]:
    """Initialise TARGETS batch by batch, in order; READ returns a target's weight as stored in the checkpoint.

    A fused expert stack is computed expert by expert (`Target.units`: READ gets a unit with `expert` set and
    returns that expert's matrix as stored), so a stack is cut into batches of experts like any group of
    same-shaped matrices, and no more than one batch of experts is read at a time.

    Reading the next batch overlaps with decomposing the current one (a background thread does the
    I/O; torch releases the GIL in both). With several DEVICES (GPUs), batch i is decomposed on
    device i mod len(DEVICES), one batch per device at a time; every batch is computed whole on one
    device, so the results are the same as on one device of that kind.
    """
    devices = [devices] if isinstance(devices, torch.device) else list(devices)
    check_ranks(targets, config.r)
    units = [u for t in targets for u in t.units()]
    batches = plan_batches(units, config.batch_mib * 2**20)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(units), unit="matrix", desc=f"{config.method} r={config.r}", disable=not progress, file=sys.stderr
    )
    with (
        concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader,
        concurrent.futures.ThreadPoolExecutor(max_workers=len(devices)) as workers,
    ):
        pending = reader.submit(lambda b=batches[0]: [stage(read(t), devices[0]) for t in b]) if batches else None
        running: collections.deque = collections.deque()  # batches being decomposed, oldest first
        workspaces = [Workspace() for _ in devices]
        for i, batch in enumerate(batches):
            stored = pending.result()
            if i + 1 < len(batches):
                pending = reader.submit(lambda b=batches[i + 1]: [stage(read(t), devices[0]) for t in b])
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
