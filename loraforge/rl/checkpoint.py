"""Checkpoints of a training run: enough to continue it exactly.

    RUN_DIR/checkpoints/step_000010/
        adapter/              the trained adapter, PEFT format (PeftModel.from_pretrained works on it)
        trainer_state.pt      optimizer, lr scheduler, RNG states (torch, the rollout sampler, python)
        state.json            step, data position, skipped steps (written last: its presence = complete)

Each checkpoint is written to a temporary directory next to its destination and renamed into place,
so an interrupted save leaves the previous checkpoints intact and never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from loraforge.core.errors import LoraforgeError

CKPT_DIR = "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (with state.json), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["sampler"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "sampler" in state:
        generator.set_state(state["sampler"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    generator,
    state: dict[str, Any],
    keep: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically; keep only the newest `keep` (0 = all). Returns its path.
    `extra` (tensors, plain data) is stored in trainer_state.pt beside the optimizer and RNG states."""
    final = checkpoint_path(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp / "adapter"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(generator),
            **(extra or {}),
        },
        tmp / "trainer_state.pt",
    )
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state.pt contents, state.json contents) of a checkpoint."""
    try:
        # plain tensors, dicts, numbers and python's random state (tuples): the safe loader suffices
        blob = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError, RuntimeError, Exception) as e:  # pickle errors vary
        raise LoraforgeError(f"checkpoint {ckpt} is unreadable ({e}); resume from an earlier one or start over") from e
    return blob, state


def atomic_save_adapter(model, dest: Path) -> None:
    """Save the adapter to dest (PEFT format) through a temporary sibling and a rename."""
    dest = Path(dest)
    tmp = dest.parent / f".tmp-{dest.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
