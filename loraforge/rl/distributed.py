"""Several processes for `loraforge train`: data-parallel rollouts and a gradient all-reduce.

    accelerate launch --multi_gpu --num_processes 4 -m loraforge train ...      (or torchrun --nproc_per_node 4)

The launcher (accelerate's, or torchrun, which accelerate runs underneath) sets RANK, WORLD_SIZE,
LOCAL_RANK and MASTER_ADDR/PORT; `init_distributed` reads them and starts torch.distributed (nccl on
GPUs, gloo on CPU). Without them, or with WORLD_SIZE 1, everything here is a no-op and the loop is the
single-process loop, bit for bit. The loop stays one loop:

  rollout   every process draws the same global prompt batch (the prompt stream is seeded), generates
            for its contiguous share (`split_evenly`) and all-gathers the scored groups, so every process
            holds the same global groups: dynamic sampling, advantages and the reward metrics are
            computed on the global batch exactly as one process would.
  update    each global mini-batch's rows are split between the processes; a process computes the loss of its
            rows divided by the token count of the WHOLE global mini-batch (known to every process), and
            the gradients are summed across processes (`sync_grads`): numerators summed, denominator
            global, so the token-mean is over the global mini-batch, as with one process. DDP averages
            gradients instead; the sum with a global denominator is the same thing without the 1/N.
            Clipping, the optimizer step and the skip on a non-finite norm then act on identical
            gradients, so the adapters stay identical (checked at the end: `check_in_sync`).
  metrics   statistics of the updates are reduced (sums and counts); only process 0 writes metrics,
            checkpoints and the final adapter.

This is DDP's data parallelism (the model is replicated); a model that does not fit on one device needs
sharding (FSDP), which the bundled loop does not do: hand such runs to verl (`--backend verl`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from loraforge.core.errors import LoraforgeError


@dataclass
class DistContext:
    """Where this process stands: rank, world size, and the device it should use."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # nccl | gloo, None when single-process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    # -- collectives (no-ops with one process) --------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every process."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is True on at least one."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the processes (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def sync_grads(self, params: Sequence[torch.nn.Parameter], failed: bool = False) -> bool:
        """Sum the gradients of `params` over the processes (one flat all-reduce), in place.

        A process that had no rows in this mini-batch contributes zeros. `failed` (e.g. a non-finite
        loss here) travels in the same buffer; returns True when any process failed, so that all of
        them stop together instead of waiting for each other.
        """
        if not self.enabled:
            return failed
        device = params[0].device
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat(
            [g.reshape(-1).to(torch.float32) for g in grads] + [torch.tensor([1.0 if failed else 0.0], device=device)]
        )
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype).clone()
            offset += n
        return bool(flat[-1].item() > 0)

    def check_in_sync(self, params: Sequence[torch.Tensor]) -> None:
        """Raise if the adapter weights differ between processes (they must be identical bit for bit)."""
        if not self.enabled:
            return
        sums = [float(p.detach().double().sum()) for p in params]
        sums += [float((p.detach().double() ** 2).sum()) for p in params]
        gathered = self.all_gather_object(sums)
        bad = [r for r, s in enumerate(gathered) if s != gathered[0]]
        if bad:
            raise LoraforgeError(
                f"the adapter weights of process(es) {bad} differ from process 0's after training; the gradient "
                "all-reduce did not keep the processes in step (please report this with the command line)"
            )

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


_CONTEXT: DistContext | None = None


def launched_world_size() -> int:
    """WORLD_SIZE set by accelerate launch / torchrun (1 when launched plainly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(device_flag: str = "auto") -> DistContext:
    """Start torch.distributed from the launcher's environment (idempotent); a no-op for one process.

    The backend follows the device: nccl when this run trains on CUDA, gloo on CPU (`--device cpu`, or
    no GPU), each process on the GPU of its LOCAL_RANK.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = launched_world_size()
    if world <= 1:
        _CONTEXT = DistContext()
        return _CONTEXT
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    use_cuda = torch.cuda.is_available() and not device_flag.startswith("cpu")
    if use_cuda:
        _refuse_one_gpu_for_all(device_flag, world)  # before anything is started
    if use_cuda and torch.cuda.device_count() <= local_rank:
        raise LoraforgeError(
            f"{world} processes were launched on this machine but only {torch.cuda.device_count()} GPU(s) are "
            f"visible; launch at most one process per GPU (--num_processes {torch.cuda.device_count()}) or "
            "pass --device cpu"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    _CONTEXT = DistContext(rank=rank, world=world, local_rank=local_rank, backend=backend)
    return _CONTEXT


def context() -> DistContext:
    """The current context (single-process until `init_distributed` ran in a launched job)."""
    return _CONTEXT if _CONTEXT is not None else DistContext()


def device_for(ctx: DistContext, device_flag: str) -> str:
    """The --device value this process should use: its own GPU under a multi-GPU launch.

    `auto` and `cuda` become cuda:LOCAL_RANK, the device `init_distributed` made current for nccl. `cuda:N` is
    refused there (`_refuse_one_gpu_for_all`); single-process runs and CPU processes keep the flag as given."""
    if ctx.backend == "nccl":
        _refuse_one_gpu_for_all(device_flag, ctx.world)
        if device_flag in ("auto", "cuda"):
            return f"cuda:{ctx.local_rank}"
    return device_flag


def _refuse_one_gpu_for_all(device_flag: str, world: int) -> None:
    """Every process of a launch gets the same flags: with `--device cuda:N` all of them would load the model onto
    GPU N while each one's NCCL communicator sits on the GPU of its local rank (NCCL's duplicate-GPU error, or
    out of memory on GPU N)."""
    if world > 1 and device_flag.startswith("cuda:"):
        raise LoraforgeError(
            f"--device {device_flag} under a launch of {world} processes: every process would load the model onto "
            f"that one GPU. Use --device cuda (each process takes the GPU of its local rank) and choose the GPUs "
            f"with CUDA_VISIBLE_DEVICES, e.g. CUDA_VISIBLE_DEVICES=2,3 accelerate launch --num_processes 2 ..."
        )


# ------------------------------------------------------------------------------------------------
# pure helpers
def check_world_divides(prompt_batch: int, world: int, what: str = "processes") -> None:
    """Each process takes the same share of the prompts: the world size must divide --prompt-batch."""
    if world > 1 and prompt_batch % world != 0:
        lower = prompt_batch - prompt_batch % world
        raise LoraforgeError(
            f"--prompt-batch {prompt_batch} is not divisible by the {world} {what}: each must get the same "
            f"number of prompts; use --prompt-batch {lower or world} or {lower + world}, or launch a number of "
            f"processes that divides {prompt_batch}"
        )


def split_evenly(n: int, world: int, rank: int) -> range:
    """The contiguous share of rank `rank` among `n` items split over `world` processes; shares differ
    by at most one item and are in rank order (rank 0 first), so concatenating them restores the list."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def plan_minibatches(
    group_sizes: Sequence[int], mini_batch: int, world: int, rank: int
) -> list[tuple[list[int], list[int]]]:
    """Rows (samples, groups laid end to end) of each global mini-batch and this process's share of it.

    A mini-batch is `mini_batch` consecutive groups (as with one process); its rows are split between the
    processes with `split_evenly` (advantages are computed on the global batch first, so rows of a group
    may go to different processes). Returns [(global rows, local rows), ...] in order. With one process,
    local rows = global rows: the single-process loop.
    """
    starts = [0]
    for g in group_sizes:
        starts.append(starts[-1] + g)
    plan = []
    for g0 in range(0, len(group_sizes), mini_batch):
        g1 = min(g0 + mini_batch, len(group_sizes))
        rows = list(range(starts[g0], starts[g1]))
        plan.append((rows, [rows[i] for i in split_evenly(len(rows), world, rank)]))
    return plan
