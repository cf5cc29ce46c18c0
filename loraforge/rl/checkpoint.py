"""Checkpoints of a training run: enough to continue it exactly.

    RUN_DIR/checkpoints/step_000010/
        adapter/              the trained adapter, PEFT format (PeftModel.from_pretrained works on it)
        trainer_state.pt      optimizer, lr scheduler, RNG states (torch, the rollout sampler, python)
        state.json            step, data position, skipped steps (written last: its presence = complete)

Each checkpoint is written to a temporary directory next to its destination and renamed into place,
so an interrupted save leaves the previous checkpoints intact and never a half-written one. What a
kill -9 can leave behind (`.tmp-*` being written, `.old-*` being replaced, `.del-*` being pruned) is
recognised by `clean_litter`, which the next run calls before it writes anything: a `.old-X` whose X
is missing is put back (the kill fell between the two renames of a replacement), the rest is removed.

Every adapter train saves (in a checkpoint, the final one, the one saved on an error) carries
`loraforge-lineage.json`: which init it was trained from, by path, method and file hashes, so that
`loraforge convert --init` can refuse an init that is not the one the adapter was trained from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.models.checkpoint import sha256_file

CKPT_DIR = "checkpoints"
LINEAGE_FILE = "loraforge-lineage.json"
LINEAGE_FORMAT = "loraforge-lineage/1"
# prefixes of what an interrupted write leaves; never matched by the step_* glob of list_checkpoints
TMP, OLD, DEL, DAMAGED = ".tmp-", ".old-", ".del-", "damaged-"


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
    lineage: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically; keep only the newest `keep` (0 = all). Returns its path.
    `extra` (tensors, plain data) is stored in trainer_state.pt beside the optimizer and RNG states;
    `lineage` goes to adapter/loraforge-lineage.json."""
    final = checkpoint_path(run_dir, step)
    tmp = final.parent / f"{TMP}{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp / "adapter"))
    if lineage is not None:
        write_lineage(tmp / "adapter", lineage)
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
    _replace_dir(tmp, final)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            _remove_dir(old)
    return final


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished directory tmp to dest. An existing dest is first renamed to .old-NAME and
    removed only once the new one is in place, so a kill at any point leaves the old or the new
    (clean_litter puts .old-NAME back if the kill fell between the two renames)."""
    old = dest.parent / f"{OLD}{dest.name}"
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old)


def _remove_dir(path: Path) -> None:
    """Delete a directory by renaming it to .del-NAME first: a kill midway leaves litter, never a
    half-deleted directory that still looks complete."""
    gone = path.parent / f"{DEL}{path.name}"
    if gone.exists():
        shutil.rmtree(gone)
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def clean_litter(run_dir: Path) -> list[str]:
    """Undo what a killed save left in run_dir and its checkpoints/ (see the module docstring).
    Returns one line per thing done. Call it only while holding the run's lock."""
    done = []
    for folder in (Path(run_dir), Path(run_dir) / CKPT_DIR):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.name.startswith(OLD):
                dest = folder / p.name[len(OLD) :]
                if not dest.exists():
                    os.replace(p, dest)
                    done.append(f"put back {dest} (a save was killed while replacing it)")
                    continue
            if p.name.startswith((TMP, OLD, DEL)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                done.append(f"removed {p} (left by an interrupted save)")
    return done


def load_trainer_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state.pt contents, state.json contents) of a checkpoint."""
    try:
        # plain tensors, dicts, numbers and python's random state (tuples): the safe loader suffices
        blob = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        state = json.loads((ckpt / "state.json").read_text())
        int(state["step"])
    except Exception as e:  # OSError, a torn zip, a pickle error, bad JSON, a missing key: all "damaged"
        raise LoraforgeError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {e})") from e
    return blob, state


def atomic_save_adapter(model, dest: Path, lineage: dict[str, Any] | None = None) -> None:
    """Save the adapter to dest (PEFT format, with its lineage) through a temporary sibling and a rename."""
    dest = Path(dest)
    tmp = dest.parent / f"{TMP}{dest.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    if lineage is not None:
        write_lineage(tmp, lineage)
    _replace_dir(tmp, dest)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file through a temporary sibling and a rename (a kill leaves the old file or the new)."""
    path = Path(path)
    tmp = path.parent / f"{TMP}{path.name}"
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# lineage: which init an adapter was trained from
def init_lineage(adapter: str) -> dict[str, Any]:
    """The lineage record of a run that trains the init at `adapter` (the path as the user gave it).

    {"format": "loraforge-lineage/1", "init": {"path", "method" (loraforge.json's, or None for an
    adapter not made by `loraforge init`), "files": {"adapter_model.safetensors": sha256,
    "loraforge.json": sha256 or None}}}. An init saved as adapter_model.bin has None for the weights."""
    root = Path(adapter)
    weights, manifest = root / "adapter_model.safetensors", root / "loraforge.json"
    method = None
    if manifest.is_file():
        try:
            method = json.loads(manifest.read_text()).get("method")
        except (OSError, ValueError, AttributeError):
            method = None  # an unreadable manifest: its hash below still pins it
    return {
        "format": LINEAGE_FORMAT,
        "init": {
            "path": adapter,
            "method": method,
            "files": {
                "adapter_model.safetensors": sha256_file(weights) if weights.is_file() else None,
                "loraforge.json": sha256_file(manifest) if manifest.is_file() else None,
            },
        },
    }


def read_lineage(adapter_dir: Path) -> dict[str, Any] | None:
    path = Path(adapter_dir) / LINEAGE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == LINEAGE_FORMAT else None


def write_lineage(adapter_dir: Path, lineage: dict[str, Any]) -> None:
    (Path(adapter_dir) / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# damaged checkpoints
def check_checkpoint(path: Path) -> str | None:
    """None if the checkpoint reads back whole (state.json, trainer_state.pt, the adapter's weights),
    else what is wrong with it."""
    from safetensors.torch import load_file

    try:
        load_trainer_state(path)
        load_file(str(path / "adapter" / "adapter_model.safetensors"))
    except LoraforgeError as e:
        return str(e)
    except Exception as e:  # safetensors raises its own error types for a torn file
        return f"adapter/adapter_model.safetensors is unreadable ({e})"
    return None


def newest_sound_checkpoint(run_dir: Path, echo: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that reads back whole. Damaged newer ones are renamed to
    checkpoints/damaged-step_N (kept for inspection, never loaded again), each with a line saying so."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = check_checkpoint(path)
        if problem is None:
            return path
        aside = path.parent / f"{DAMAGED}{path.name}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(path, aside)
        echo(f"warning: {problem}; moved it to {aside} and falling back to the checkpoint before it")
    return None
