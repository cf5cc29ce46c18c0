"""What adapter_config.json and loraforge.json must hold to be read back (core/readers.py): the keys loraforge
uses, each of the kind it uses it as. `load_adapter` applies them, so verify, inspect, convert, push and train
refuse a damaged or hand-edited file in one line naming the file and the key, instead of failing somewhere
downstream with a TypeError. Keys not named here pass through (PEFT adds keys every release)."""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath
from typing import Any

from loraforge.core.readers import ANY, BOOL, INT, LIST, NUMBER, OBJECT, TEXT, Key, at_least, describe, problems

INIT_FORMAT = "loraforge-manifest/1"
CONVERTED_FORMAT = "loraforge-converted/1"


def _positive_finite(v: Any) -> bool:
    return math.isfinite(v) and v > 0


def _shape(v: Any) -> bool:
    return len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)


def _is_sha256(v: Any) -> bool:
    return len(v) == 64 and all(c in "0123456789abcdef" for c in v)


RANK = Key(INT, test=at_least(1), expect="an integer >= 1")
ALPHA = Key(NUMBER, test=_positive_finite, expect="a finite number > 0")
SHA256 = Key(TEXT, test=_is_sha256, expect="a sha256 (64 lowercase hex digits)")

ADAPTER_CONFIG = {
    "r": RANK,
    "lora_alpha": ALPHA,
    "use_rslora": Key(BOOL, required=False, null=True),
    "use_dora": Key(BOOL, required=False, null=True),
    "peft_type": Key(TEXT, required=False),
    "base_model_name_or_path": Key(TEXT, required=False, null=True),
    "revision": Key(TEXT, required=False, null=True),
    "rank_pattern": Key(OBJECT, required=False, null=True),
    "alpha_pattern": Key(OBJECT, required=False, null=True),
    "target_parameters": Key(LIST, required=False, null=True),
    "target_modules": Key(
        ANY, required=False, null=True, test=lambda v: isinstance(v, (str, list)), expect="a string or a list"
    ),
}


def adapter_config_problems(config: dict) -> list[str]:
    """What is wrong with an adapter_config.json: ADAPTER_CONFIG, and a target named. Without target_modules
    and target_parameters PEFT falls back to its default targets for the model type (q_proj and v_proj for a
    Llama) and drops the adapter's other factors with a warning: a damaged config, silently another adapter."""
    found = problems(config, ADAPTER_CONFIG)
    if not found and not config.get("target_modules") and not config.get("target_parameters"):
        found.append("it names no target_modules and no target_parameters")
    return found


def read_adapter_config(adapter_dir: Path, role: str = "--adapter") -> dict:
    """ADAPTER_DIR/adapter_config.json, read and checked (for commands that hand the adapter to PEFT without
    opening it with `load_adapter`): a damaged file is one line here, not an error inside PEFT."""
    from loraforge.core.errors import LoraforgeError
    from loraforge.core.readers import read_json

    path = Path(adapter_dir) / "adapter_config.json"
    remedy = f"Restore it, or pass the {role} directory `loraforge init` or PEFT's save_pretrained wrote."
    config = read_json(path, "the adapter config", remedy=remedy)
    found = adapter_config_problems(config)
    if found:
        raise LoraforgeError(f"{path}: {found[0]}; the adapter config is damaged. {remedy}")
    return config


_SOURCE = Key(
    OBJECT,
    fields={
        "model_id": Key(TEXT),
        "revision": Key(TEXT, required=False, null=True),
        "local": Key(BOOL, required=False),
    },
)
_COMMON = {
    "method": Key(TEXT),
    "r": RANK,
    "alpha": ALPHA,
    "rslora": Key(BOOL),
    "scaling": ALPHA,
    "source": _SOURCE,
    "files": Key(OBJECT, required=False, null=True, values=SHA256),
}
INIT_MANIFEST = _COMMON | {
    "seed": Key(INT),
    "svd": Key(TEXT, required=False, null=True),
    # `base` is a directory name inside the adapter: the only one init writes is "base"
    "base": Key(TEXT, null=True, test=lambda v: v == "base", expect='"base" or null'),
    "files_unhashed": Key(LIST, required=False, null=True),
    "modules": Key(
        OBJECT,
        values=Key(
            OBJECT,
            fields={
                "shape": Key(LIST, test=_shape, expect="[out_features, in_features], two integers >= 1"),
                "experts": Key(INT, required=False, null=True, test=at_least(1), expect="an integer >= 1"),
            },
        ),
    ),
}
CONVERTED_MANIFEST = _COMMON | {"modules": Key(INT, required=False)}


def manifest_problems(manifest: dict) -> list[str]:
    """What is wrong with a loraforge.json of a known format (an unknown format is left to the command, which
    says whether it can use it), and file names in `files` that leave the adapter directory."""
    schema = {INIT_FORMAT: INIT_MANIFEST, CONVERTED_FORMAT: CONVERTED_MANIFEST}.get(manifest.get("format"))
    if schema is None:
        return []
    found = problems(manifest, schema)
    if not found and schema is INIT_MANIFEST:  # a residualised method's init has its residual base, by name
        from loraforge.inits.methods import METHODS

        method = METHODS.get(manifest["method"])
        if method is not None and method.residual and manifest["base"] != "base":
            found.append(f'key base is {describe(manifest["base"])}, expected "base" (a {method.name} init has one)')
    for name in manifest.get("files") or {} if not found else ():
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            found.append(f"files names {name!r}, which is not a path inside the adapter directory")
    return found
