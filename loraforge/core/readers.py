"""The one validated reader for every file loraforge reads back: JSON objects (manifests, configs, lineage
records, checkpoint state) and JSON-lines logs (metrics.jsonl, samples.jsonl).

A file is read as bytes with a size limit, decoded as UTF-8 and parsed; then its keys are checked against a
schema (`Key`: the kind of value, whether it is required, whether null is allowed, nested schemas). What a
hostile or damaged file can do is then one of two things, never a traceback:

- refused in one line (`LoraforgeError`) that names the file, the line (and column, or byte) or the key, what
  was found, what was expected and what to do: a JSON object that a command needs (`read_json`);
- tolerated where that is safe, saying so (`read_jsonl`): a line of a log that does not decode, parse or pass
  its schema is dropped and listed (`JsonLines.dropped`, `JsonLines.summary`), a value of the wrong kind under
  an optional key is dropped from its row. A log is a record of what happened; the rows that read are kept.

A directory in place of the file, a missing file, an unreadable one (permissions, I/O error) and a file over
the size limit are refused in one line by both. Keys a schema does not name pass through untouched, so a
newer loraforge's extra keys do not make an older one refuse a file. Readers never write.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from loraforge.core.errors import LoraforgeError, os_error_message

# Kinds of value a key may hold. INT and NUMBER never accept a bool (JSON true is not 1 here).
INT = "an integer"
NUMBER = "a number"
TEXT = "a string"
BOOL = "true or false"
OBJECT = "an object"
LIST = "a list"
ANY = "any value"

# Size limits: far above any file loraforge writes of that kind, far below what would exhaust memory.
JSON_MAX_BYTES = 256 * 2**20  # a manifest of a large MoE model (per-expert statistics) is a few MB
LINE_MAX_BYTES = 16 * 2**20  # one metrics or samples row (a logged response is at most --max-response-length)


@dataclass(frozen=True)
class Key:
    """What one key of a JSON object must hold."""

    kind: str = ANY
    required: bool = True
    null: bool = False  # null accepted (and kept as None)
    fields: Optional[dict[str, "Key"]] = None  # OBJECT: the schema of the nested object (keys it must have)...
    values: Optional["Key"] = None  # ...and/or what every value must hold (a map of names to values)
    test: Optional[Callable[[Any], bool]] = None  # an extra condition on the value...
    expect: str = ""  # ...and how to say it ("at least 0")


def _kind_ok(value: Any, kind: str) -> bool:
    if kind == ANY:
        return True
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {TEXT: str, BOOL: bool, OBJECT: dict, LIST: list}[kind])


def describe(value: Any) -> str:
    """`a string ("2")`, `null`, `a list`: what was found, short enough for one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{'a string' if isinstance(value, str) else 'a number'} ({text})"


def problems(obj: Any, schema: dict[str, Key], where: str = "") -> list[str]:
    """What is wrong with OBJ against SCHEMA, one phrase per problem naming the key path (empty: nothing)."""
    if not isinstance(obj, dict):
        return [f"{where or 'the top level'} is {describe(obj)}, expected an object"]
    found = []
    for name, key in schema.items():
        path = f"{where}.{name}" if where else name
        if name not in obj:
            if key.required:
                found.append(f"key {path} is missing")
            continue
        found += _value_problems(obj[name], key, path)
    return found


def _value_problems(value: Any, key: Key, path: str) -> list[str]:
    if value is None:
        return [] if key.null else [f"key {path} is null, expected {key.kind}"]
    if not _kind_ok(value, key.kind):
        return [f"key {path} is {describe(value)}, expected {key.kind}"]
    if key.test is not None and not key.test(value):
        return [f"key {path} is {describe(value)}, expected {key.expect or 'another value'}"]
    found = problems(value, key.fields, path) if key.fields is not None else []
    if key.values is not None:
        found += [p for k, v in value.items() for p in _value_problems(v, key.values, f"{path}.{k}")]
    return found


# ------------------------------------------------------------------------------------------------
# bytes and text
def regular_file(path: Path, what: str) -> int:
    """The size of PATH, a regular file (after symlinks); one line for a directory, a device or a pipe (reading
    /dev/zero or a FIFO would never end)."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise LoraforgeError(f"{path} is a directory, expected {what} (a file); check the path.")
    if not stat.S_ISREG(st.st_mode):
        raise LoraforgeError(f"{path} is not a regular file (a device or a pipe?), expected {what}; check the path.")
    return st.st_size


def read_bytes(path: Path, what: str, max_bytes: int = JSON_MAX_BYTES) -> bytes:
    """The bytes of PATH, or one line: missing, a directory or not a regular file, unreadable, or larger than
    MAX_BYTES."""
    path = Path(path)
    try:
        size = regular_file(path, what)
        if size > max_bytes:
            raise LoraforgeError(
                f"{path} is {size:,} bytes, more than {what} can be ({max_bytes:,}); it is not the file "
                "loraforge wrote. Check the path, or restore the file."
            )
        return path.read_bytes()
    except FileNotFoundError:
        raise LoraforgeError(f"{path}: no such file, expected {what}; check the path.") from None
    except OSError as e:
        raise LoraforgeError(f"cannot read {what}: {os_error_message(e)}") from None


def decode_utf8(data: bytes, path: Path, what: str) -> str:
    """DATA as text; bytes that are not UTF-8 are refused naming the line and byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LoraforgeError(
            f"{path}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); {what} is "
            "damaged. Restore it, or remove the bad bytes."
        ) from None


def loads(text: str | bytes) -> Any:
    """json.loads for a file loraforge did not necessarily write. A whole number past 64 bits is read as a float
    (inf past 1.8e308): Python's int() refuses more than 4,300 digits with a ValueError that is not a
    JSONDecodeError, and a 400-digit step or rank would overflow wherever it went next. No file loraforge reads
    holds such a number, and every check that wants an integer refuses the float in one line."""
    return json.loads(text, parse_int=_parse_int)


def _parse_int(digits: str) -> int | float:
    if len(digits) <= 19:  # |x| < 10**18 fits int64 however it is signed
        return int(digits)
    value = int(digits) if len(digits) <= 4000 else None
    return value if value is not None and -(2**63) <= value < 2**63 else float(digits)


def parse_json(text: str, path: Path, what: str, remedy: str) -> Any:
    """TEXT parsed as JSON, or one line naming the line and column. NaN and Infinity (which Python's json
    writes) are accepted; a number too large for a float becomes inf rather than an error."""
    try:
        return loads(text)
    except json.JSONDecodeError as e:
        raise LoraforgeError(
            f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); {what} is damaged. {remedy}"
        ) from None
    except RecursionError:  # nesting deeper than the interpreter allows
        raise LoraforgeError(f"{path}: nested too deeply to read; {what} is damaged. {remedy}") from None


def read_json(
    path: Path,
    what: str,
    schema: Optional[dict[str, Key]] = None,
    remedy: str = "Restore it, or re-create it with the command that wrote it.",
    max_bytes: int = JSON_MAX_BYTES,
) -> dict:
    """PATH as a JSON object whose keys pass SCHEMA, or one line naming the file, what is wrong and REMEDY."""
    path = Path(path)
    data = parse_json(decode_utf8(read_bytes(path, what, max_bytes), path, what), path, what, remedy)
    found = problems(data, schema or {})
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise LoraforgeError(f"{path}: {found[0]}{more}; {what} is damaged. {remedy}")
    return data


# ------------------------------------------------------------------------------------------------
# JSON lines
@dataclass
class JsonLines:
    """The rows of a JSON-lines file that read, and what was left out."""

    path: Path
    rows: list[dict] = field(default_factory=list)
    linenos: list[int] = field(default_factory=list)  # the line number of each row
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (line, why) of each line left out
    cleared: list[tuple[int, str]] = field(default_factory=list)  # (line, why) of each value left out of a row

    def summary(self, limit: int = 3) -> Optional[str]:
        """One line saying what was left out (None when nothing was)."""
        if not self.dropped and not self.cleared:
            return None
        parts = []
        for items, what in ((self.dropped, "line(s) dropped"), (self.cleared, "value(s) ignored")):
            if items:
                shown = "; ".join(f"line {n}: {why}" for n, why in items[:limit])
                rest = f"; and {len(items) - limit} more" if len(items) > limit else ""
                parts.append(f"{len(items)} {what} ({shown}{rest})")
        return f"warning: {self.path}: {', '.join(parts)}"


def read_jsonl(
    path: Path,
    what: str,
    schema: dict[str, Key],
    max_line: int = LINE_MAX_BYTES,
    optional_keys: Optional[dict[str, Key]] = None,
) -> JsonLines:
    """The rows of PATH that decode, parse and pass SCHEMA; every other line is dropped and listed. A value
    under one of OPTIONAL_KEYS that is of the wrong kind is removed from its row (and listed) instead. A line
    longer than MAX_LINE bytes is dropped without being held in memory whole. A missing file reads as empty;
    a directory or an unreadable file is one line."""
    path = Path(path)
    out = JsonLines(path)
    if not os.path.lexists(path):
        return out
    try:
        regular_file(path, what)
        with path.open("rb") as f:
            for lineno, line in enumerate(_lines(f, max_line), 1):
                _read_line(line, lineno, schema, optional_keys or {}, out)
    except OSError as e:
        raise LoraforgeError(f"cannot read {what}: {os_error_message(e)}") from None
    return out


def _lines(f, max_line: int):
    """The lines of binary file F; a line longer than MAX_LINE is yielded as None (its bytes skipped)."""
    while True:
        line = f.readline(max_line + 1)
        if not line:
            return
        if len(line) > max_line and not line.endswith(b"\n"):
            while True:  # skip the rest of the over-long line, a chunk at a time
                rest = f.readline(max_line)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
            continue
        yield line


def _read_line(line: Optional[bytes], lineno: int, schema, optional_keys, out: JsonLines) -> None:
    if line is None:
        out.dropped.append((lineno, "longer than any row loraforge writes"))
        return
    if not line.strip():
        return
    try:
        row = loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        out.dropped.append((lineno, f"not UTF-8 (byte 0x{line[e.start]:02x})"))
        return
    except (json.JSONDecodeError, RecursionError):
        out.dropped.append((lineno, "not valid JSON (a torn write?)"))
        return
    found = problems(row, schema)
    if found:
        out.dropped.append((lineno, found[0]))
        return
    for name, key in optional_keys.items():
        if name in row:
            bad = _value_problems(row[name], key, name)
            if bad:
                del row[name]
                out.cleared.append((lineno, bad[0]))
    out.rows.append(row)
    out.linenos.append(lineno)


def finite(value: Any) -> bool:
    """For `Key.test`: a number that is not NaN or infinite."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def at_least(low: int) -> Callable[[Any], bool]:
    """For `Key.test`: a number >= LOW."""
    return lambda v: v >= low
