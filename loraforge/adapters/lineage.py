"""The lineage record: what a trained adapter was trained from, in ADAPTER/loraforge-lineage.json.

`loraforge train` writes it beside every adapter it saves (each checkpoint, the final one, the one saved on an
error); `loraforge convert --init` reads it to refuse an init the adapter was not trained from, and `train
--resume` reads the checkpoint's to refuse an init, model or data that changed since the run started.

    {"format": "loraforge-lineage/1",
     "init":  {"path": as given, "method": loraforge.json's or null,
               "files": {"adapter_model.safetensors", "loraforge.json", "adapter_config.json": sha256 or null}},
     "model": {"path": the base loaded, "fingerprint": see model_fingerprint, or null for a Hub id},
     "data":  {"source": --data as given, "rows": N, "sha256": of the rows as read}}

"model", "data" and the hash of adapter_config.json were added in 0.3.0: a record without them is read
(nothing is checked for them).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

from loraforge.core.errors import LoraforgeError
from loraforge.core.readers import INT, OBJECT, TEXT, Key, at_least, loads, read_json
from loraforge.models.checkpoint import sha256_file

LINEAGE_FILE = "loraforge-lineage.json"
LINEAGE_FORMAT = "loraforge-lineage/1"
INIT_FILES = ("adapter_model.safetensors", "loraforge.json", "adapter_config.json")


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


SHA256 = Key(TEXT, null=True, test=_is_sha256, expect="a sha256 (64 lowercase hex digits) or null")
SCHEMA = {
    "format": Key(TEXT),
    "init": Key(
        OBJECT,
        fields={
            "path": Key(TEXT),
            "method": Key(TEXT, required=False, null=True),
            # the weights' hash is what convert checks: the key is always written (null for a .bin init)
            "files": Key(OBJECT, fields={INIT_FILES[0]: SHA256}, values=SHA256),
        },
    ),
    "model": Key(OBJECT, required=False, fields={"path": Key(TEXT), "fingerprint": SHA256}),
    "data": Key(
        OBJECT,
        required=False,
        fields={"source": Key(TEXT), "rows": Key(INT, test=at_least(0), expect="an integer >= 0"), "sha256": SHA256},
    ),
}


def read_lineage(adapter_dir: Path) -> Optional[dict]:
    """ADAPTER_DIR's lineage record, checked (core/readers.py); None when it has none. A damaged record (bad
    JSON or bytes, a key of the wrong kind: `files` a list, say) or one of another format is one line."""
    path = Path(adapter_dir) / LINEAGE_FILE
    if not path.exists() and not path.is_symlink():
        return None
    remedy = "It is the record `loraforge train` writes of the init an adapter was trained from; restore it."
    # the format first: a newer loraforge's record may differ in every other key
    record = read_json(path, "the lineage record", {"format": Key(TEXT)}, remedy)
    if record["format"] != LINEAGE_FORMAT:
        raise LoraforgeError(
            f"{path} is not a {LINEAGE_FORMAT} record (format {record['format']!r}); it may come from a newer "
            "loraforge. Upgrade loraforge."
        )
    return read_json(path, "the lineage record", SCHEMA, remedy)


def write_lineage(adapter_dir: Path, lineage: dict[str, Any]) -> None:
    (Path(adapter_dir) / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")


def init_record(adapter: str) -> dict[str, Any]:
    """The "init" entry for the adapter directory ADAPTER (the path as the user gave it): its method (from
    loraforge.json, None for an adapter not made by `loraforge init` or an unreadable manifest, whose hash
    still pins it) and the sha256 of its weights and manifest (None for a file it does not have)."""
    root = Path(adapter)
    manifest = root / INIT_FILES[1]
    method = None
    if manifest.is_file():
        try:
            found = loads(manifest.read_text()).get("method")
            method = found if isinstance(found, str) else None
        except (OSError, ValueError, AttributeError):
            method = None
    return {
        "path": adapter,
        "method": method,
        "files": {name: sha256_file(root / name) if (root / name).is_file() else None for name in INIT_FILES},
    }


# ------------------------------------------------------------------------------------------------
# the base model a run trains on
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
SAMPLES_PER_FILE, SAMPLE_BYTES = 16, 64 * 1024


def model_fingerprint(model: str | Path) -> Optional[str]:
    """A sha256 over a local model directory's config.json and weight files (None for a Hub id).

    Not a hash of every byte: hashing a 15 GB checkpoint at the start of every run and resume would cost
    minutes. Per weight file (sorted by name): its name, its size, its first 1 MiB (a safetensors header:
    every tensor's name, dtype, shape and offsets) and 16 evenly spaced 64 KiB samples of the rest. Any other
    checkpoint of the same architecture (another fine-tune, another residual base) differs in the samples; a
    file edited in place at a few bytes outside them would not be noticed."""
    root = Path(model)
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (*WEIGHT_SUFFIXES, ".json"))
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            if path.suffix not in WEIGHT_SUFFIXES:  # config.json, the index, tokenizer files: whole
                h.update(f.read(2**20 * 64))
                continue
            h.update(f.read(2**20))
            for i in range(SAMPLES_PER_FILE):
                f.seek(2**20 + (max(0, size - 2**20 - SAMPLE_BYTES) * i) // max(1, SAMPLES_PER_FILE - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()
