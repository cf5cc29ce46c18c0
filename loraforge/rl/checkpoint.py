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
`loraforge-lineage.json` (adapters/lineage.py): which init it was trained from, by path, method and file
hashes, and the fingerprints of the model and data, so that `loraforge convert --init` can refuse an init
that is not the one the adapter was trained from and `--resume` inputs that are not the run's.

Everything here is read back through core/readers.py: a checkpoint whose state.json, trainer_state.pt,
lineage record or adapter weights do not read back whole, or hold values of the wrong kind, is damaged
(`check_checkpoint`), set aside, and the one before it is used.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from loraforge.adapters.lineage import LINEAGE_FILE, LINEAGE_FORMAT, read_lineage, write_lineage  # noqa: F401
from loraforge.core.atomic import flush_dir, flush_tree
from loraforge.core.errors import LoraforgeError
from loraforge.core.readers import INT, OBJECT, Key, at_least, read_json, regular_file
from loraforge.models.checkpoint import SafetensorsFile

CKPT_DIR = "checkpoints"
STATE_FILE, TRAINER_STATE = "state.json", "trainer_state.pt"
_COUNT = Key(INT, test=at_least(0), expect="an integer >= 0")
STATE_SCHEMA = {
    "step": _COUNT,
    "data": Key(OBJECT, fields={"epoch": _COUNT, "cursor": _COUNT}),
    "skipped": Key(INT, required=False, test=at_least(0), expect="an integer >= 0"),
}
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
        # One state per GPU the saving process saw. A job that sees fewer GPUs restores those it has:
        # torch.cuda.set_rng_state_all would index a missing device ("invalid device ordinal"). Nothing is lost:
        # no GPU this process cannot see runs anything of it, and the rollouts draw from the sampler's own
        # generator ("sampler", below), not from these default ones. A job that sees more keeps its seeded state
        # on the others.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
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
    flush_tree(tmp)  # on the disk before its name is: a crash must not leave a named, empty checkpoint
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    flush_dir(dest.parent)
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
    """(trainer_state.pt contents, state.json contents) of a checkpoint, checked: the step a non-negative integer
    equal to the directory's, the data position two, the optimizer, scheduler and RNG states of the kinds
    torch restores. A LoraforgeError saying what is wrong otherwise."""
    state = read_json(ckpt / STATE_FILE, "the checkpoint's state", STATE_SCHEMA, "Resume from another checkpoint.")
    if ckpt.name.startswith("step_") and ckpt.name[5:].isdigit() and int(ckpt.name[5:]) != state["step"]:
        raise LoraforgeError(f"checkpoint {ckpt}: {STATE_FILE} says step {state['step']}, its directory another")
    try:
        regular_file(ckpt / TRAINER_STATE, "the checkpoint's trainer state")
        # plain tensors, dicts, numbers and python's random state (tuples): the safe loader suffices
        blob = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # OSError, a torn zip, a pickle error: all "damaged"
        raise LoraforgeError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {e})") from e
    problem = _trainer_state_problem(blob)
    if problem:
        raise LoraforgeError(f"checkpoint {ckpt}: {TRAINER_STATE} {problem}")
    return blob, state


def _trainer_state_problem(blob: Any) -> str | None:
    """What is wrong with the contents of a trainer_state.pt (None: the kinds `_restore` needs)."""
    if not isinstance(blob, dict):
        return f"holds {type(blob).__name__}, expected a dict"
    optimizer, rng = blob.get("optimizer"), blob.get("rng")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict):
        return "has no optimizer state"
    if not isinstance(optimizer.get("param_groups"), list) or not isinstance(blob.get("scheduler"), dict):
        return "has no optimizer parameter groups or scheduler state"
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        return "has no torch RNG state"
    python = rng.get("python")
    if not (isinstance(python, tuple) and len(python) == 3 and isinstance(python[1], tuple)):
        return "has no python RNG state"
    if "sampler" in rng and not isinstance(rng["sampler"], torch.Tensor):
        return "has a sampler RNG state that is not a tensor"
    return None


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
# damaged checkpoints
def check_checkpoint(path: Path) -> str | None:
    """None if the checkpoint reads back whole (state.json, trainer_state.pt, the adapter's weights and lineage
    record), else what is wrong with it."""
    from safetensors.torch import load_file

    try:
        blob, _ = load_trainer_state(path)
        tensors = SafetensorsFile(path / "adapter" / "adapter_model.safetensors").tensors  # header against the file
        load_file(str(path / "adapter" / "adapter_model.safetensors"))
        read_lineage(path / "adapter")
        problem = _optimizer_problem(blob["optimizer"], [tuple(t.shape) for t in tensors.values()])
        if problem:
            return f"checkpoint {path}: {problem}"
    except LoraforgeError as e:
        return str(e)
    except Exception as e:  # safetensors raises its own error types for a torn file
        return f"adapter/adapter_model.safetensors is unreadable ({e})"
    return None


def _optimizer_problem(optimizer: dict, shapes: list[tuple]) -> str | None:
    """The optimizer state must be for the checkpoint's own adapter tensors: as many, and moments of their shapes
    (compared as multisets: which index is which tensor is the model's order, not the file's)."""
    ids = [i for g in optimizer["param_groups"] if isinstance(g, dict) for i in g.get("params", [])]
    if len(ids) != len(shapes):
        return f"its optimizer state is for {len(ids)} tensors, its adapter has {len(shapes)}"
    moments = {}
    for i in ids:
        for name, t in (optimizer["state"].get(i) or {}).items():
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                moments.setdefault(name, []).append(tuple(t.shape))
    for name, found in moments.items():
        if len(found) == len(shapes) and sorted(found) != sorted(shapes):
            return f"its optimizer's {name} tensors do not have its adapter's shapes"
    return None


def newest_sound_checkpoint(run_dir: Path, echo: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that reads back whole. Damaged newer ones are renamed to
    checkpoints/damaged-step_N (kept for inspection, never loaded again), each with a line saying so."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = check_checkpoint(path)
        if problem is None:
            return path
        aside = path.parent / f"{DAMAGED}{path.name}"
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        elif os.path.lexists(aside):
            aside.unlink()
        os.replace(path, aside)
        echo(f"warning: {problem}; moved it to {aside} and falling back to the checkpoint before it")
    return None


def reference_problem(path: Path, params: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with RUN_DIR/reference_adapter.safetensors (the KL reference) for the adapter tensors
    PARAMS: missing, not a whole safetensors file, or other names or shapes (None: nothing)."""
    if not os.path.lexists(path):
        return f"{path} (the KL reference) is missing"
    try:
        tensors = SafetensorsFile(path).tensors
    except (LoraforgeError, OSError) as e:
        return f"{path} (the KL reference) is unreadable ({e})"
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    if {k: tuple(v.shape) for k, v in tensors.items()} != shapes:
        return f"{path} (the KL reference) does not hold the adapter's tensors"
    return None


def check_optimizer_state(optimizer: dict, params: list[torch.Tensor], ckpt: Path) -> None:
    """The optimizer state of checkpoint CKPT must be for PARAMS (one group over them, moments of their shapes):
    torch would load another one and fail, or train wrongly, only at the next step."""
    groups = optimizer["param_groups"]
    ids = [i for g in groups if isinstance(g, dict) for i in g.get("params", [])]
    if len(groups) != 1 or len(ids) != len(params):
        raise LoraforgeError(
            f"checkpoint {ckpt}: its optimizer state is for {len(ids)} tensors in {len(groups)} group(s), the "
            f"adapter has {len(params)}; it is not this run's checkpoint. Start a new run with -o."
        )
    for i, p in zip(ids, params):
        for name, t in (optimizer["state"].get(i) or {}).items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != tuple(p.shape):
                raise LoraforgeError(
                    f"checkpoint {ckpt}: its optimizer's {name} of tensor {i} has shape {list(t.shape)}, the adapter's "
                    f"is {list(p.shape)}; it is not this run's checkpoint. Start a new run with -o."
                )
