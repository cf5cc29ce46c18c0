"""Everything that writes to disk: the staged output directory, the PEFT adapter files, the
residual base (streamed shard by shard) and the manifest.

Every output is built in a hidden staging directory next to OUT and claimed atomically only when
complete (`staged_dir`), so an interrupted run leaves the previous result (or none) or the new one,
plus at most its staging directory, which the next run to the same OUT removes.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from loraforge.core import atomic
from loraforge.core.errors import LoraforgeError
from loraforge.models.checkpoint import DTYPES, PlannedTensor, SafetensorsFile, sha256_file, write_streaming
from loraforge.models.source import INDEX_NAMES, Source, companion_files

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MANIFEST = "loraforge.json"
BASE_DIR = "base"
# written by `loraforge train` beside a trained adapter: the init it was trained from (rl/checkpoint.py)
LINEAGE_FILE = "loraforge-lineage.json"


def check_destination(out: Path, overwrite: bool, protect: Optional[Path] = None) -> None:
    """Refuse an existing OUT without --overwrite, an OUT that would delete the source model, and an
    OUT that is (or holds) the current directory."""
    from loraforge.core.paths import check_paths, name_path

    out = Path(os.path.abspath(out))
    real = name_path("-o", out)  # a symlink loop or a file on the way: one line
    if protect is not None:
        check_paths([name_path("the source model", protect)], [real])
    cwd = Path.cwd().resolve()
    if real.path == cwd or real.path in cwd.parents:
        raise LoraforgeError(
            f"-o {out} is (or contains) the current directory, which loraforge would have to replace while you are "
            "in it; pass a new directory name, e.g. -o ./adapter."
        )
    if os.path.lexists(out) and not overwrite:
        raise LoraforgeError(f"{out} already exists. Pass --overwrite to replace it, or choose another -o.")
    if os.path.lexists(out) and not out.is_dir():
        raise LoraforgeError(f"{out} exists and is not a directory; choose another -o.")


@contextlib.contextmanager
def staged_dir(out: Path, overwrite: bool, replace: Optional[Callable[[Path, Path], bool]] = None) -> Iterator[Path]:
    """Yield a temporary directory beside OUT; on success it replaces OUT, on any failure it is removed.

    While it runs, `.OUT.lock` keeps other loraforge writers of OUT out. At the end the staging
    directory is claimed atomically (loraforge.core.atomic.claim): only if OUT is still absent, or
    still the directory --overwrite was given for; otherwise the result is discarded with a message
    and OUT is left as it is. Staging directories of killed runs (`.OUT.partial-*` whose owner pid is
    gone) are removed first, with one line on stderr.

    REPLACE, when given, decides about an OUT that exists instead of OVERWRITE: it is called with (the written
    staging directory, OUT) and returns True to replace OUT, False to leave it as it is (the result is
    discarded), or raises to refuse. An OS error inside the staging directory (or naming no file, as a write on
    a full disk does) is reported as OUT's.
    """
    out = Path(os.path.abspath(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in [out.parent, *out.parent.parents] if p.exists() and not p.is_dir())
        raise LoraforgeError(f"-o {out}: {blocker} is a file, not a directory; choose another -o.") from None
    with atomic.DirLock(out):
        clean_stale(out)  # first: it may put back an OUT that a killed run had moved aside
        check_destination(out, overwrite or replace is not None)
        was = atomic.Snapshot.of(out, hold=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            atomic.write_owner(tmp)
            yield tmp
            (tmp / atomic.OWNER_FILE).unlink()
            _normalise_permissions(tmp)
            if replace is None or was.ident is None or replace(tmp, out):
                atomic.claim(tmp, out, was)
        except OSError as e:
            if e.errno is not None and (e.filename is None or str(e.filename).startswith(str(tmp))):
                raise OSError(e.errno, e.strerror, str(out)) from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already once claimed
            was.close()


def clean_stale(out: Path) -> list[str]:
    """Remove what killed runs left beside OUT; return (and print) one line per item.

    `.OUT.partial-*`: staging directories whose owner process is gone (or never recorded itself).
    `.OUT.old-PID`: an old OUT moved aside by the non-atomic fallback of a run killed before it put
    the new one in place: put back at OUT if OUT is absent, else removed.
    Called under the OUT lock, so no live loraforge writer of OUT owns any of them.
    """
    import sys

    lines = []
    for stale in sorted(out.parent.glob(f".{glob.escape(out.name)}.partial-*")):
        pid = atomic.owner_alive(stale)
        if pid is not None:
            lines.append(f"loraforge: left {stale} alone: its owner (pid {pid}) is still running.")
            continue
        shutil.rmtree(stale, ignore_errors=True)
        lines.append(f"loraforge: removed {stale}, left by an interrupted run.")
    for trash in sorted(out.parent.glob(f".{glob.escape(out.name)}.old-*")):
        if not os.path.lexists(out):
            os.rename(trash, out)
            lines.append(f"loraforge: restored {out} from {trash.name}, moved aside by an interrupted run.")
        else:
            shutil.rmtree(trash, ignore_errors=True)
            lines.append(f"loraforge: removed {trash}, the old copy of {out.name} an interrupted run replaced.")
    for line in lines:
        print(line, file=sys.stderr)
    return lines


def _normalise_permissions(root: Path) -> None:
    # mkdtemp creates 0700 and some writers create 0600 files; give the result the permissions an
    # ordinary mkdir/open would have under the user's umask (a file made executable stays executable).
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        executable = path.is_dir() or os.stat(path).st_mode & 0o100
        os.chmod(path, (0o777 if executable else 0o666) & ~umask)


def adapter_key(module_name: str, which: str) -> str:
    """PEFT's saved key for a LoRA factor, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return f"base_model.model.{module_name}.lora_{which}.weight"


def tensor_problem(name: str, t: torch.Tensor, experts: int = 1, zero_rows: bool = True) -> Optional[str]:
    """The one check on every tensor loraforge writes or hands on (init, save_init, convert, each training step
    and save): None when T is finite and, for a LoRA A factor (`lora_A` in NAME), no row is all zero; else what
    is wrong, naming the tensor, the row and, for a fused stack of EXPERTS experts (PEFT's layout: expert e owns
    rows e*r..(e+1)*r of lora_A, and B's columns e::E), the expert. A zero row of A gets no gradient and adds
    nothing: no init makes one, and training never reaches one. B may be zero (B0 = 0 inits)."""
    if not t.is_floating_point():
        return None
    flat = t.detach().reshape(t.shape[0], -1) if t.dim() >= 2 else t.detach().reshape(1, -1)
    bad = ~torch.isfinite(flat)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        where = _where(row, col, t, name, experts)
        return f"{name} has {int(bad.sum())} non-finite value(s) (NaN or inf), the first at {where}"
    if zero_rows and "lora_A" in name and t.dim() == 2 and t.numel() > 0:
        zero = ~flat.ne(0).any(dim=1)
        if bool(zero.any()):
            row = int(zero.nonzero()[0, 0])
            return f"{name} has {int(zero.sum())} all-zero row(s), the first {_where(row, None, t, name, experts)}"
    return None


def _where(row: int, col: Optional[int], t: torch.Tensor, name: str, experts: int) -> str:
    """`row 5`, `row 5 (expert 1 of 4)`: where in T (a stack's lora_A rows and lora_B columns are per expert)."""
    if t.dim() < 2:
        return f"index {col}"
    at = f"row {row}" if col is None else f"row {row}, column {col}"
    if experts > 1 and "lora_A" in name:
        return f"{at} (expert {row // max(1, t.shape[0] // experts)} of {experts})"
    if experts > 1 and "lora_B" in name and col is not None:
        return f"{at} (expert {col % experts} of {experts})"
    return at


def check_tensor(name: str, t: torch.Tensor, experts: int = 1, what: str = "") -> torch.Tensor:
    """T, after `tensor_problem` found nothing; a LoraforgeError saying what is wrong otherwise."""
    problem = tensor_problem(name, t, experts)
    if problem is not None:
        raise LoraforgeError(f"{what + ': ' if what else ''}{problem}; nothing was written. {_ADVICE}")
    return t


def check_loaded_adapter(model, what: str) -> None:
    """The same check on every LoRA tensor of a loaded PeftModel before it is used (eval): a NaN or inf factor
    makes every output NaN, and sampling then draws the same token everywhere, scored 0 with exit 0. Only
    finiteness: a zero row of A in an adapter someone else made wastes rank but gives the right outputs."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            problem = tensor_problem(name, p, zero_rows=False)
            if problem is not None:
                raise LoraforgeError(f"{what}: {problem}; nothing was evaluated. {_ADVICE}")


def check_factors(what: str, module: str, factors: dict, done: str) -> None:
    """`tensor_problem` (finiteness only) on one module's FACTORS ({"lora_A": A, "lora_B": B}) of an adapter that is
    about to be read for a result (inspect): a LoraforgeError naming WHAT, the tensor and where, else nothing. DONE
    says what did not happen ("nothing was inspected")."""
    for which, t in factors.items():
        problem = tensor_problem(f"{module}.{which}", t, zero_rows=False)
        if problem is not None:
            raise LoraforgeError(f"{what}: {problem}; {done}. {_ADVICE}")


_ADVICE = (
    "An adapter with NaN or inf gives wrong outputs in every client, and a row of A that is all zero never trains: "
    "find where it came from (a diverged training run? take an earlier checkpoint of it)."
)


def write_adapter_weights(
    path: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor] | Path],
    keys: Optional[dict[str, tuple[str, str]]] = None,
    extra: Optional[dict[str, torch.Tensor]] = None,
) -> str:
    """Write {module name: (A0, B0)} (then EXTRA tensors) as PEFT's adapter_model.safetensors, in module order,
    one tensor at a time; return its sha256.

    A value may be the file a pair waits in (tensors "A" and "B", see adapters.factors.FactorSet). KEYS gives the
    saved names where they are not `adapter_key`'s (fused experts: PEFT nests ParamWrappers, see peft_view).
    Written by our own streaming writer, not safetensors' save_file: a full disk or a read-only directory is then
    an OSError with the path (save_file raises its own error type without one)."""
    planned = []
    for name, value in factors.items():
        key_a, key_b = (keys or {}).get(name) or (adapter_key(name, "A"), adapter_key(name, "B"))
        for key, which in ((key_a, "A"), (key_b, "B")):
            if isinstance(value, Path):
                parked = SafetensorsFile(value)
                info = parked.tensors[which]
                read = lambda f=parked, w=which, k=key: check_tensor(k, f.read(w))  # noqa: E731
                planned.append(PlannedTensor(key, DTYPES[info.dtype], info.shape, read))
            else:
                t = value[0] if which == "A" else value[1]
                planned.append(PlannedTensor(key, t.dtype, tuple(t.shape), lambda t=t, k=key: check_tensor(k, t)))
    planned += [
        PlannedTensor(k, t.dtype, tuple(t.shape), lambda t=t, k=k: check_tensor(k, t)) for k, t in (extra or {}).items()
    ]
    return write_streaming(path, planned, metadata={"format": "pt"})


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """A safetensors file of TENSORS (in this order) with PEFT's metadata; returns its sha256."""
    planned = [PlannedTensor(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()]
    return write_streaming(path, planned, metadata={"format": "pt"})


@contextlib.contextmanager
def os_errors(path: Path) -> Iterator[None]:
    """Turn a library's wrapped OS error (safetensors: "... (os error 28)") into an OSError on PATH,
    so the CLI reports it like any other (disk full, read-only...)."""
    try:
        yield
    except Exception as e:
        import errno as errno_mod
        import re

        m = re.search(r"\(os error (\d+)\)", str(e))
        if isinstance(e, OSError) or m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code) if code in errno_mod.errorcode else str(e), str(path)) from None


def write_adapter_config(out_dir: Path, config: dict) -> None:
    """adapter_config.json from init.adapter_config's fields, keys sorted (the same command writes
    the same bytes)."""
    # PEFT re-runs a named init (e.g. "pissa") when it loads an adapter whose config says so, and
    # would subtract from the base a second time: the config must say true (the default init).
    if config.get("init_lora_weights") is not True:
        raise RuntimeError(
            f"internal error: adapter_config.json says init_lora_weights={config.get('init_lora_weights')!r}"
        )
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_residual_base(
    source: Source,
    base_dir: Path,
    residual_files: dict[str, Path | torch.Tensor],
    cast_to: Optional[torch.dtype],
    trust_remote_code: bool = False,
    stacked: Optional[dict[str, list[str]]] = None,
) -> dict[str, str]:
    """Write the residual base model shard by shard; return {relative file name: sha256}.

    STACKED maps a checkpoint key of a fused expert stack to the residual_files entries of its experts, in
    order: the tensor written is their stack (one stack in memory at a time).

    residual_files maps checkpoint keys of target weights to their residual (already in the base
    dtype), or to the temporary safetensors file that holds it. Every other tensor is copied through from the
    source shard, cast to CAST_TO when that is set and the tensor is floating point. Shard names and
    tensor order follow the source, so the index keeps its shape.
    """
    base_dir.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, str] = {}
    total_size = 0
    residual_readers: dict[Path, SafetensorsFile] = {}

    def reader_for(file: Path) -> SafetensorsFile:
        if file not in residual_readers:
            residual_readers[file] = SafetensorsFile(file)
        return residual_readers[file]

    for shard in source.shards:
        src = source.open_shard(shard)
        planned = []
        for key, info in src.tensors.items():
            if stacked and key in stacked:
                parts = stacked[key]
                dtype = _residual_dtype(residual_files[parts[0]], parts[0], reader_for)
                planned.append(
                    PlannedTensor(
                        key,
                        dtype,
                        info.shape,
                        lambda parts=parts: torch.stack([_residual(residual_files[p], p, reader_for) for p in parts]),
                    )
                )
            elif isinstance(residual_files.get(key), torch.Tensor):
                t = residual_files[key]
                planned.append(PlannedTensor(key, t.dtype, tuple(t.shape), lambda t=t: t))
            elif key in residual_files:
                rf = reader_for(residual_files[key])
                rinfo = rf.tensors[key]
                planned.append(
                    PlannedTensor(key, DTYPES[rinfo.dtype], rinfo.shape, lambda rf=rf, key=key: rf.read(key))
                )
            else:
                dtype = DTYPES[info.dtype]
                target_dtype = cast_to if (cast_to is not None and dtype.is_floating_point) else dtype
                planned.append(
                    PlannedTensor(
                        key, target_dtype, info.shape, lambda src=src, key=key, d=target_dtype: src.read(key).to(d)
                    )
                )
        hashes[f"{BASE_DIR}/{shard}"] = write_streaming(
            base_dir / shard, planned, metadata=src.metadata or {"format": "pt"}
        )
        total_size += sum(torch.empty((), dtype=p.dtype).element_size() * math.prod(p.shape) for p in planned)

    if len(source.shards) > 1 or (source.path / INDEX_NAMES[0]).exists():
        index = {"metadata": {"total_size": total_size}, "weight_map": source.weight_map}
        write_json(base_dir / INDEX_NAMES[0], index)

    config = dict(source.config)
    if cast_to is not None:
        name = str(cast_to).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    write_json(base_dir / "config.json", config)
    for f in companion_files(source, trust_remote_code):
        shutil.copy2(f, base_dir / f.name)
    return hashes


def _residual(value, key: str, reader_for) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else reader_for(value).read(key)


def _residual_dtype(value, key: str, reader_for) -> torch.dtype:
    return value.dtype if isinstance(value, torch.Tensor) else DTYPES[reader_for(value).tensors[key].dtype]


# Files of OUT the manifest cannot hash: itself, and the model card rendered from it.
UNHASHED = (MANIFEST, "README.md")


def hash_remaining(root: Path, known: dict[str, str]) -> dict[str, str]:
    """sha256 of every file under ROOT not in KNOWN (nor UNHASHED, nor the staging owner file), keyed
    by path relative to ROOT: config and tokenizer files of base/ too, so verify covers all of OUT."""
    skip = set(known) | set(UNHASHED) | {atomic.OWNER_FILE}
    return {
        rel: sha256_file(root / rel)
        for rel in sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        if rel not in skip
    }


def hash_tree(root: Path, sub: str) -> dict[str, str]:
    """sha256 of every .safetensors file under ROOT/SUB, keyed by path relative to ROOT."""
    return {f"{sub}/{p.name}": sha256_file(p) for p in sorted((root / sub).glob("*.safetensors"))}


# adapter_config.json key that `init_model`'s save_pretrained adds for residualised methods: PEFT
# warns about the unknown key on load, and `resolve_base` refuses such an adapter with a message.
UNSAVED_RESIDUAL_KEY = "loraforge_residual_base_not_saved"


def mark_unsaved_residual(adapter_dir: Path, method: str) -> None:
    """Add UNSAVED_RESIDUAL_KEY to ADAPTER_DIR/adapter_config.json, if PEFT wrote one there."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    config[UNSAVED_RESIDUAL_KEY] = (
        f"This {method} adapter was saved from loraforge.init_model's PeftModel, whose residual base (the model with "
        "the adapter subtracted) was only in memory: on the original model it gives wrong outputs. Save the "
        "initialised model with loraforge.save_init(model, OUT) and load adapters trained from it on OUT/base."
    )
    tmp = path.with_name(f".{ADAPTER_CONFIG}.partial")  # replaced in one step: never a half-written config
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, path)
