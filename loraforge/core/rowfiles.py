"""Reading rows (one dict per example) from local .jsonl, .json and .parquet files.

Shared by `loraforge train --data` and `loraforge eval --bench`, so both accept the same files
with the same messages. Parquet (DAPO-Math-17k ships as parquet) needs pyarrow, imported only then.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from loraforge.core.errors import LoraforgeError
from loraforge.core.readers import describe, loads

SUFFIXES = (".jsonl", ".json", ".parquet")


def read_row_file(path: Path) -> list[dict]:
    """All rows of PATH. .json may hold a list or {"data": [...]}; .jsonl one object per line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LoraforgeError(
                f"{path} is a parquet file, which needs pyarrow: `pip install pyarrow` "
                "(or `pip install -e '.[train]'`), or convert it to .jsonl"
            ) from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's ArrowInvalid & co. for a torn or non-parquet file
            raise LoraforgeError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
    if suffix not in SUFFIXES:
        raise LoraforgeError(f"{path}: unknown file type {suffix!r}; expected .jsonl, .json or .parquet")
    text = _read_utf8(path)
    if suffix == ".json":
        try:
            data = loads(text)
        except RecursionError:
            raise LoraforgeError(f"{path} is nested too deeply to read; expected a list of objects") from None
        except json.JSONDecodeError as e:
            raise LoraforgeError(f"{path} is not valid JSON ({e}); expected a list of objects") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise LoraforgeError(f"{path}: expected a JSON list of objects, found a {type(data).__name__}")
        return data
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(loads(line))
        except RecursionError:
            raise LoraforgeError(f"{path}: line {lineno} is nested too deeply to read; expected one object") from None
        except json.JSONDecodeError as e:
            raise LoraforgeError(
                f"{path}: line {lineno} is not valid JSON ({e.msg}); expected one object per line"
            ) from None
    return rows


def _read_utf8(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is refused naming the line and byte, not decoded wrongly."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LoraforgeError(
            f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) {e.reason}; "
            "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8.jsonl`)"
        ) from None


def gold_answer(value, where: str, field: str) -> str:
    """A row's gold answer as text: a non-empty string, or a finite number (AIME stores ints). Anything else (null,
    true, a list, an object, NaN) is refused naming the row: as its repr ("None", "True", "nan") it would be the
    answer every sample is compared with, and every reward or score would be 0 with exit 0."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if number or (isinstance(value, str) and value.strip()):
        return str(value)
    found = "an empty string" if isinstance(value, str) else describe(value)
    raise LoraforgeError(f"{where}: `{field}` is {found}, expected the gold answer as text or a number; fix that row")
