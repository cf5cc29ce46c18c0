"""Reading adapter directories: a loraforge init (OUT), a trained PEFT adapter, or a converted one.

An adapter directory is what PEFT's `save_pretrained` writes: adapter_config.json plus
adapter_model.safetensors (or the legacy adapter_model.bin). A loraforge init adds loraforge.json
(the manifest) and, for residualised methods, base/. Factors are read lazily, one module at a
time, so verify/convert/inspect never hold a whole large adapter in memory twice.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from loraforge.adapters.writers import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_DIR,
    LINEAGE_FILE,
    MANIFEST,
    UNSAVED_RESIDUAL_KEY,
)
from loraforge.core.errors import LoraforgeError
from loraforge.core.readers import loads
from loraforge.inits.methods import METHODS, Method
from loraforge.models.checkpoint import SafetensorsFile
from loraforge.models.source import check_local_or_hub, read_json_object

LEGACY_WEIGHTS = "adapter_model.bin"
# PEFT saves factors as base_model.model.<module>.lora_A.weight (the adapter name stripped); a
# state dict taken from a live PeftModel still has it (lora_A.default.weight): accept both.
_FACTOR_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    """PEFT's scaling s in y = W x + s * B A x: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if rslora else r)


@dataclass
class Adapter:
    """An adapter directory on disk: its config, its manifest (loraforge inits only) and its factors."""

    path: Path
    config: dict  # adapter_config.json
    manifest: Optional[dict]  # loraforge.json, None for adapters loraforge did not write
    weights_file: Path
    factor_keys: dict[str, tuple[str, str]]  # module name -> (key of A, key of B), in file order
    other_keys: list[str] = field(default_factory=list)  # tensors that are not LoRA factors
    _reader: object = None
    # expert units ("<experts module>.<param>.<e>") -> (e, E): their factors are slices of the stack's tensors
    expert_units: dict[str, tuple[int, int]] = field(default_factory=dict)
    _last: tuple = (None, None)  # (key, tensor): the last stack tensor read, reused by the next expert

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.rslora)

    @property
    def modules(self) -> list[str]:
        return list(self.factor_keys)

    @property
    def method(self) -> Optional[Method]:
        """The loraforge init method, when the manifest names one."""
        if self.manifest is None:
            return None
        return METHODS.get(self.manifest.get("method"))

    @property
    def base_dir(self) -> Optional[Path]:
        """The residual base written by `loraforge init` (residualised methods only)."""
        if self.manifest is None or not self.manifest.get("base"):
            return None
        return self.path / self.manifest["base"]

    def read(self, key: str) -> torch.Tensor:
        if isinstance(self._reader, SafetensorsFile):
            return self._reader.read(key)
        return self._reader[key]

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of MODULE as stored: A (r, in_features), B (out_features, r). For an expert unit of a fused stack
        (see `use_peft_view`) that expert's slices: PEFT's ParamWrapper layout, A_e = lora_A[e*r:(e+1)*r] and
        B_e = lora_B[:, e::E]."""
        key_a, key_b = self.factor_keys[module]
        if module not in self.expert_units:
            return self.read(key_a), self.read(key_b)
        e, E = self.expert_units[module]
        A, B = self._stack(key_a), self._stack(key_b)
        r = A.shape[0] // E
        return A[e * r : (e + 1) * r], B[:, e::E]

    def _stack(self, key: str) -> torch.Tensor:
        if self._last[0] != key:
            self._last = (key, self.read(key))
        return self._last[1]

    def use_peft_view(self, view: dict) -> None:
        """Name the factors of fused expert stacks per expert, from what PEFT builds (peft_view.adapted_by_peft):
        the saved names of a stack (`...experts.base_layer.lora_A.weight`) do not say which parameter they belong
        to, PEFT's nesting does."""
        for a in view.values():
            if a.experts <= 1:
                continue
            self.factor_keys.pop(a.path, None)
            for e in range(a.experts):
                unit = f"{a.module}.{a.param}.{e}"
                self.factor_keys[unit] = (a.key_A, a.key_B)
                self.expert_units[unit] = (e, a.experts)

    def check_plain_lora(self, what: str) -> None:
        """Refuse adapter features whose weights are not just s * B A (per-module ranks, DoRA...)."""
        unsupported = []
        if self.config.get("rank_pattern"):
            unsupported.append("rank_pattern (per-module ranks)")
        if self.config.get("alpha_pattern"):
            unsupported.append("alpha_pattern (per-module alphas)")
        if self.config.get("use_dora"):
            unsupported.append("use_dora (DoRA magnitude vectors)")
        if unsupported:
            raise LoraforgeError(
                f"{self.path}: {what} handles plain LoRA adapters (y = W x + s B A x with one r and alpha); this "
                f"adapter uses {', '.join(unsupported)}, which it does not support."
            )


def load_adapter(path: str | Path, role: str = "adapter") -> Adapter:
    """Open the adapter directory PATH. ROLE names it in error messages (e.g. "--init")."""
    path = Path(path)
    if not path.exists():
        raise LoraforgeError(
            f"{role} {path}: no such directory. Pass a directory written by `loraforge init` or PEFT's save_pretrained."
        )
    if not path.is_dir():
        raise LoraforgeError(
            f"{role} {path} is a file; expected an adapter directory (adapter_config.json + {ADAPTER_WEIGHTS})."
        )
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.exists():
        found = sorted(p.name for p in path.iterdir())[:8]
        hint = " It looks like a model directory, not an adapter." if (path / "config.json").exists() else ""
        raise LoraforgeError(
            f"{role} {path} is not a PEFT adapter directory: it has no {ADAPTER_CONFIG} (found {found}).{hint} "
            "Pass the directory `loraforge init -o` or PEFT's save_pretrained wrote."
        )
    config = read_json_object(cfg_path, "the adapter config")  # damaged JSON, non-UTF-8, not an object: one line
    if config.get("peft_type", "LORA") != "LORA" or "r" not in config or "lora_alpha" not in config:
        raise LoraforgeError(
            f"{cfg_path} does not describe a LoRA adapter (peft_type={config.get('peft_type')!r}, "
            f"r={config.get('r')!r}, lora_alpha={config.get('lora_alpha')!r}); loraforge handles LoRA adapters only."
        )
    manifest = None
    if (path / MANIFEST).exists():
        manifest = read_json_object(path / MANIFEST, "the manifest")
    _check_schemas(cfg_path, config, path / MANIFEST, manifest)

    if (path / ADAPTER_WEIGHTS).exists():
        weights_file = path / ADAPTER_WEIGHTS
        try:
            reader = SafetensorsFile(weights_file)
        except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoraforgeError(
                f"{weights_file} is not a readable safetensors file ({e}); the adapter is damaged."
            ) from None
        keys = reader.keys()
    elif (path / LEGACY_WEIGHTS).exists():
        weights_file = path / LEGACY_WEIGHTS
        # Legacy pickles are read with weights_only=True: tensors only, so a downloaded adapter cannot run code.
        try:
            reader = torch.load(weights_file, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a damaged or non-tensor pickle
            raise LoraforgeError(
                f"{weights_file} could not be read as a tensor file ({type(e).__name__}: {e}); "
                "re-save the adapter with safetensors."
            ) from None
        keys = list(reader)
    else:
        raise LoraforgeError(
            f"{role} {path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (or {LEGACY_WEIGHTS}); "
            "the adapter is incomplete."
        )

    pairs: dict[str, dict[str, str]] = {}
    other = []
    for key in keys:
        m = _FACTOR_KEY.match(key)
        if m:
            pairs.setdefault(m.group("module"), {})[m.group("which")] = key
        else:
            other.append(key)
    incomplete = [mod for mod, p in pairs.items() if set(p) != {"A", "B"}]
    if incomplete:
        raise LoraforgeError(
            f"{weights_file}: module {incomplete[0]} has only lora_{next(iter(pairs[incomplete[0]]))}; "
            "the adapter is damaged."
        )
    if not pairs:
        raise LoraforgeError(f"{weights_file} holds no LoRA factors (no *.lora_A.weight / *.lora_B.weight tensors).")
    factor_keys = {mod: (p["A"], p["B"]) for mod, p in pairs.items()}
    return Adapter(path, config, manifest, weights_file, factor_keys, other, reader)


def _check_schemas(cfg_path: Path, config: dict, manifest_path: Path, manifest: Optional[dict]) -> None:
    """adapter_config.json and loraforge.json hold every key loraforge uses, of its kind (adapters/schemas.py)."""
    from loraforge.adapters.schemas import adapter_config_problems, manifest_problems

    checked = ((cfg_path, adapter_config_problems(config)), (manifest_path, manifest_problems(manifest or {})))
    for path, found in checked:
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise LoraforgeError(
                f"{path}: {found[0]}{more}; the adapter is damaged (edited by hand?). Restore it, or re-create the "
                "adapter with the command that wrote it."
            )


def expert_units_of(modules: dict[str, dict]) -> dict[str, dict]:
    """A manifest's `modules` with each fused expert stack (an entry with `experts`) listed per expert, as
    "<name>.<e>": {"shape": [out, in]}: the units an init computed (and seeded by these names)."""
    out = {}
    for name, stats in modules.items():
        if stats.get("experts"):
            out.update({f"{name}.{e}": {"shape": stats["shape"]} for e in range(stats["experts"])})
        else:
            out[name] = stats
    return out


def residual_base_of(model_path: Path) -> Optional[Adapter]:
    """The loraforge init whose residual base is MODEL_PATH (OUT/base), or None.

    Lets diagnostics notice that a trained adapter's base_model_name_or_path points at a residual
    base rather than at the pretrained model.
    """
    model_path = Path(model_path)
    parent = model_path.parent
    if model_path.name != BASE_DIR or not (parent / MANIFEST).exists() or not (parent / ADAPTER_CONFIG).exists():
        return None
    adapter = load_adapter(parent)
    return adapter if adapter.base_dir is not None else None


@dataclass
class BaseModel:
    """The model an adapter must be loaded on."""

    path: str  # a local directory (absolute) or a Hub id
    residual: bool  # True: the adapter's own residual base (PiSSA, MiLoRA, OLoRA), not the original model


def _residual_dir(adapter: Path) -> Optional[Path]:
    """ADAPTER's residual base directory, or None when it has none (B0 = 0 methods, PEFT adapters)."""
    manifest_path = adapter / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = loads(manifest_path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise LoraforgeError(
                f"{manifest_path} cannot be read ({e}); the adapter is damaged. Re-run loraforge init."
            ) from None
        base_name = manifest.get("base") if isinstance(manifest, dict) else None
        if not isinstance(manifest, dict) or not isinstance(base_name, (str, type(None))):
            raise LoraforgeError(
                f'{manifest_path}: expected a JSON object whose "base" is a directory name or null, found '
                f"{type(manifest).__name__ if not isinstance(manifest, dict) else repr(base_name)[:40]}; the adapter "
                "is damaged. Re-run loraforge init."
            )
        if not base_name:
            return None
        residual = adapter / base_name
        if not (residual / "config.json").is_file():
            raise LoraforgeError(
                f"{adapter}: its manifest names a residual base {residual}, which is missing or "
                "incomplete; re-run `loraforge init` or restore the directory"
            )
        return residual
    return adapter / BASE_DIR if (adapter / BASE_DIR / "config.json").is_file() else None


def _json_or_none(path: Path) -> Optional[dict]:
    """PATH as a JSON object, or None when it is missing, unreadable, damaged or implausibly large: callers
    that only look for related paths leave reporting a damaged file to the command's own reader."""
    try:
        if not path.is_file() or path.stat().st_size > 16 * 2**20:
            return None
        data = loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def init_of_residual_base(model: str | Path) -> Optional[Path]:
    """The loraforge init whose residual base MODEL is (MODEL = INIT/base, and INIT's manifest names it),
    or None. Reads the manifest only."""
    model = Path(model)
    if model.name != BASE_DIR or not (model / "config.json").is_file():
        return None
    manifest = _json_or_none(model.parent / MANIFEST)
    return model.parent if manifest is not None and manifest.get("base") == BASE_DIR else None


def _lineage_init(adapter: Path) -> Optional[Path]:
    """The init directory ADAPTER's lineage record (written by `loraforge train`) names, when it is one here."""
    init = (_json_or_none(adapter / LINEAGE_FILE) or {}).get("init")
    path = init.get("path") if isinstance(init, dict) else None
    if not isinstance(path, str) or not path or not Path(path).expanduser().is_dir():
        return None
    return Path(path).expanduser()


def _named_residual(adapter: Path, config: dict) -> Optional[Path]:
    """The residual base a trained adapter belongs on, from what it names: its adapter_config's
    base_model_name_or_path when that is a loraforge residual base (PEFT's save_pretrained in `loraforge
    train` or TRL names the base the adapter was trained on), else the residual base of the init its lineage
    record names."""
    named = config.get("base_model_name_or_path")
    if isinstance(named, str) and named and init_of_residual_base(named) is not None:
        return Path(named)
    init = _lineage_init(adapter)
    if init is None or os.path.realpath(init) == os.path.realpath(adapter):
        return None
    try:
        return _residual_dir(init)
    except LoraforgeError:  # a damaged init: the lineage check of the command that needs it reports it
        return None


def related_paths(adapter: str | Path, _seen: Optional[set] = None) -> list[tuple[str, Path]]:
    """[(what, path)] of the local paths a command that uses ADAPTER reads besides the directory itself: the
    residual base it belongs on, the model its manifest was made from, its base_model_name_or_path, and the
    init its lineage record names (with that init's own related paths). Only paths that exist; a damaged or
    missing file names nothing here (the command's own reader reports it). For the path guard (core/paths)."""
    adapter = Path(adapter)
    seen = _seen if _seen is not None else set()
    seen.add(os.path.realpath(adapter))
    found: list[tuple[str, Path]] = []

    def add(what: str, value) -> None:
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            found.append((what, Path(value).expanduser()))

    config = _json_or_none(adapter / ADAPTER_CONFIG) or {}
    manifest = _json_or_none(adapter / MANIFEST) or {}
    add(f"the base model {adapter} names", config.get("base_model_name_or_path"))
    source = manifest.get("source")
    if isinstance(source, dict):
        add(f"the model {adapter} was made from", source.get("model_id"))
    if isinstance(manifest.get("base"), str):
        add(f"the residual base of {adapter}", str(adapter / manifest["base"]))
    init = _lineage_init(adapter)
    if init is not None and os.path.realpath(init) not in seen:
        add(f"the init {adapter} was trained from", str(init))
        found += related_paths(init, seen)
    return found


def resolve_base(adapter: str | Path, model: Optional[str] = None, flag: str = "--model") -> BaseModel:
    """The base ADAPTER must be loaded on: its residual base when it has one (an init's base/, or the
    residual base a trained adapter names or was trained against), else MODEL, else the adapter's
    base_model_name_or_path. The one place that decides it (train, eval, the verl hand-off and the vLLM
    rollout all ask here).

    A MODEL other than the residual base is refused: PiSSA/MiLoRA/OLoRA subtracted the adapter from
    that base, so on the original weights the policy would not be the one the adapter starts from. So is
    a residual base under an adapter loraforge wrote for the original model (a B0 = 0 init, a converted one).
    """
    adapter = Path(adapter)
    cfg_path = adapter / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise LoraforgeError(
            f"--adapter {adapter}: no {ADAPTER_CONFIG} there; expected a PEFT adapter directory "
            "(made by `loraforge init` or PeftModel.save_pretrained)"
        )
    config = read_json_object(cfg_path, "the adapter config")
    residual = _residual_dir(adapter) or _named_residual(adapter, config)
    if residual is not None:
        if model is not None and Path(model).resolve() != residual.resolve():
            raise LoraforgeError(
                f"{flag} {model} does not match the adapter: {adapter} belongs on the residual base "
                f"{residual} (PiSSA/MiLoRA/OLoRA subtract the adapter from the base), so the base to load is "
                f"{residual.resolve()}; drop {flag} or pass that directory"
            )
        return BaseModel(str(residual.resolve()), True)
    # Saved by PeftModel.save_pretrained from init_model's residualised model (see in_memory.save_init): only a
    # residual base that save_init wrote is right for it.
    if UNSAVED_RESIDUAL_KEY in config and (model is None or residual_base_of(Path(model)) is None):
        raise LoraforgeError(
            f"--adapter {adapter}: {config[UNSAVED_RESIDUAL_KEY]} Pass that base with {flag} OUT/base."
        )
    if model is not None and (adapter / MANIFEST).is_file():
        owner = init_of_residual_base(model)
        if owner is not None:
            raise LoraforgeError(
                f"{flag} {model} is the residual base of the init {owner} (its adapter was subtracted from the "
                f"weights), but {adapter} was made for the original model; pass the original model with {flag}"
            )
    given = f"{flag} {model}"
    if model is None:
        model = config.get("base_model_name_or_path")
        if not model:
            raise LoraforgeError(f"--adapter {adapter} names no base model (base_model_name_or_path); pass {flag}")
        given = f"the base model {adapter} names (base_model_name_or_path; {flag} overrides it)"
    try:
        check_local_or_hub(model)  # `models/nope`: "no such directory", not a network error from the Hub
    except LoraforgeError as e:
        raise LoraforgeError(f"{given}: {e}") from None
    return BaseModel(str(Path(model).resolve()) if Path(model).exists() else model, False)
