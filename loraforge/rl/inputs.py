"""What a run trains from (the init adapter, the base model, the data), recorded when it starts and checked
when it resumes, before anything is loaded.

The record is the lineage record (adapters/lineage.py) that every adapter the run saves carries. On `--resume`
the checkpoint's record is compared with what the run's config.json points at now:

- the init: the sha256 of its adapter_model.safetensors, loraforge.json and adapter_config.json (an init
  re-created with --overwrite, at another rank or with another method, is another init);
- the adapter's tensors: the checkpoint's names and shapes against the init's (a record written before the
  init's files were hashed still catches a rank change here, before PEFT's size-mismatch error);
- the model: its fingerprint (adapters/lineage.model_fingerprint);
- the data: the number of rows and a sha256 of the rows as read (the data position saved in the
  checkpoint is an index into them).

A mismatch is one line naming what changed and what to do. A record from before 0.3.0 has no model or data
entry: those are recorded now (with a line saying they were not checked).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from loraforge.adapters.lineage import LINEAGE_FORMAT, init_record, model_fingerprint, read_lineage
from loraforge.core.errors import LoraforgeError
from loraforge.models.checkpoint import SafetensorsFile

WEIGHTS = "adapter_model.safetensors"


def data_record(source: str, examples: list) -> dict[str, Any]:
    """{"source", "rows", "sha256"}: the rows as read (prompt, ground truth, whether a template wraps it)."""
    h = hashlib.sha256()
    for e in examples:
        row = json.dumps([e.prompt, e.ground_truth, e.is_question], sort_keys=True, default=str)
        h.update(row.encode() + b"\n")
    return {"source": source, "rows": len(examples), "sha256": h.hexdigest()}


def model_record(model_path: str) -> dict[str, Any]:
    return {"path": model_path, "fingerprint": model_fingerprint(model_path)}


def new_record(adapter: str, model_path: str, data: dict[str, Any]) -> dict[str, Any]:
    """The lineage record of a run that starts now."""
    return {"format": LINEAGE_FORMAT, "init": init_record(adapter), "model": model_record(model_path), "data": data}


def check_resume(
    checkpoint: Path, adapter: str, model_path: str, data: dict[str, Any], echo: Callable[[str], None]
) -> dict[str, Any]:
    """Refuse to resume from CHECKPOINT when the init at ADAPTER, the model at MODEL_PATH or the rows read
    (DATA, `data_record`) are not the ones the run started with. Returns the record the run goes on with."""
    recorded = read_lineage(Path(checkpoint) / "adapter")
    where = f"--resume: checkpoint {checkpoint}"
    _check_shapes(Path(checkpoint) / "adapter" / WEIGHTS, Path(adapter) / WEIGHTS, where)
    if recorded is None:
        echo(f"note: {checkpoint} has no lineage record (an older loraforge): the init, model and data are not checked")
        return new_record(adapter, model_path, data)
    _check_init(recorded["init"], init_record(adapter), adapter, where)
    record = dict(recorded)
    missing = [k for k in ("model", "data") if k not in recorded]
    if missing:
        echo(f"note: the run's record has no {' or '.join(missing)} entry (an older loraforge): not checked")
    if "model" in recorded:
        _check_model(recorded["model"], model_path, where)
    else:
        record["model"] = model_record(model_path)
    if "data" in recorded:
        _check_data(recorded["data"], data, where)
    else:
        record["data"] = data
    return record


def _check_init(recorded: dict, now: dict, adapter: str, where: str) -> None:
    for name, want in recorded["files"].items():
        if name not in now["files"]:  # a file a newer loraforge hashes: nothing to compare it with here
            continue
        got = now["files"][name]
        if want is not None and got != want:
            state = "is missing" if got is None else f"has sha256 {got[:12]}..."
            raise LoraforgeError(
                f"{where}: the init at {adapter} changed since the run started: its {name} {state}, the run "
                f"started from sha256 {want[:12]}... (was it re-created with --overwrite?). Restore the init the "
                f"run started from ({recorded.get('method') or 'its method'}), or start a new run with -o."
            )


def _check_shapes(saved: Path, init: Path, where: str) -> None:
    """The checkpoint's adapter tensors must have the init's names and shapes (headers only: nothing loaded)."""
    if not init.is_file():
        if not init.parent.is_dir():
            raise LoraforgeError(f"{where}: the init adapter {init.parent} is missing; restore it, or start a new run")
        return  # a legacy adapter_model.bin: PEFT loads it, and a mismatch is named when it does
    a, b = SafetensorsFile(saved).tensors, SafetensorsFile(init).tensors
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            side = "the init" if key not in a else "the checkpoint"
            raise LoraforgeError(
                f"{where}: {key} is in {side} only: the init at {init.parent} is not the adapter the run trains. "
                "Restore that init, or start a new run with -o."
            )
        if a[key].shape != b[key].shape:
            raise LoraforgeError(
                f"{where}: {key} has shape {list(a[key].shape)} in the checkpoint but {list(b[key].shape)} in the "
                f"init at {init.parent} (re-created at another rank?). Restore the init the run started from, or "
                "start a new run with -o."
            )


def _check_model(recorded: dict, model_path: str, where: str) -> None:
    want, got = recorded["fingerprint"], model_fingerprint(model_path)
    if want is not None and got != want:
        state = "is not a local directory now" if got is None else "has other files or weights now"
        raise LoraforgeError(
            f"{where}: the base model {model_path} {state} than when the run started (recorded: {recorded['path']}). "
            "Restore that model, or start a new run with -o."
        )


def _check_data(recorded: dict, now: dict, where: str) -> None:
    if recorded["rows"] != now["rows"] or (recorded["sha256"] is not None and recorded["sha256"] != now["sha256"]):
        raise LoraforgeError(
            f"{where}: --data {now['source']} reads {now['rows']} rows now, and they are not the "
            f"{recorded['rows']} rows the run started with (the checkpoint's data position indexes those). "
            "Restore the data file, or start a new run with -o."
        )
