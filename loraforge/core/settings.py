"""Settings dataclasses carry their help text in field metadata: `setting(default, "help")` is a
dataclass field with `metadata={"help": ...}`. The CLI reads it (`help_texts`) for its options' help,
so a setting and the sentence that explains it are written once, side by side."""

from __future__ import annotations

import dataclasses
import os
from typing import Any


def setting(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A dataclass field with its help text; a setting without one is a programming error."""
    if not help:
        raise ValueError("every setting needs a help text")
    return dataclasses.field(default=default, metadata={"help": help})


def help_texts(cls: type) -> dict[str, str]:
    """Field name -> help text of a settings dataclass (empty for a field not made with `setting`)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


# ------------------------------------------------------------------------------------------------
# typing settings, wherever they come from (flags, a YAML or JSON file, a config.json read back)
def typed_values(cls: type, values: dict[str, Any], source: str, lines: dict[str, int] | None = None) -> dict[str, Any]:
    """VALUES with each setting converted to its field's type, or one LoraforgeError naming SOURCE, the key and,
    where LINES knows it, the line of the file it is on.

    What converts (the rest is refused, saying what was found and what is expected):
    - float: an int, or a string that reads as a finite number: PyYAML reads `lr: 5e-6` as the STRING
      "5e-6" (YAML 1.1 wants `5.0e-6`), so "5e-6", "1e-5" and " 0.1 " are numbers here;
    - int: a float or string with an integral value (`steps: 1e3`, "200");
    - bool: true/false, and the strings true/false/yes/no/on/off/1/0 (any case), and the ints 0 and 1;
    - str: a string only (`verl_version: 0.9` is the float 0.9 to YAML: quote it);
    - None where the field allows it (`key: null`, `key: ~`).
    NaN and infinity are refused for every number: no setting means anything with them; so is a whole number
    outside the 64-bit range (INT64), which torch (seeds, sizes) cannot hold, and a number too large for a float."""
    import typing

    from loraforge.core.errors import LoraforgeError

    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None:  # unknown keys are the caller's to report
            out[key] = value
            continue
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        nullable = type(None) in typing.get_args(hint)
        if value is None and nullable:
            out[key] = None
            continue
        converted = _convert(value, kinds[0])
        if converted is _REFUSED:
            where = f"{source} line {lines[key]}" if lines and key in lines else source
            raise LoraforgeError(
                f"{where}: {key} is {_found(value)}, expected {_expected(kinds[0], nullable)}; fix that value"
            )
        out[key] = converted
    return out


# The smallest temperature sampling divides logits by (vLLM's _SAMPLING_EPS, below which it decodes greedily):
# logits / 1e-300 overflow to inf and the softmax to NaN, and the draw then takes the last token of the
# vocabulary on every step, with exit 0. Below it the sampler, eval and train refuse, pointing at 0 (greedy).
MIN_TEMPERATURE = 1e-5

_REFUSED = object()
INT64 = (-(2**63), 2**63 - 1)  # what torch takes for a seed or a size (a larger int: "Overflow when unpacking")


def in_int64(value: int) -> bool:
    """VALUE fits a signed 64-bit integer: a seed or count torch can hold."""
    return INT64[0] <= value <= INT64[1]


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _convert(value: Any, kind: type) -> Any:
    import math

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        text = value.strip().lower() if isinstance(value, str) else None
        return True if text in _TRUE else False if text in _FALSE else _REFUSED
    if kind in (int, float):
        if isinstance(value, bool):
            return _REFUSED
        if isinstance(value, str):
            text = value.strip()
            try:
                value = int(text) if kind is int and text.lstrip("+-").isdigit() else float(text)
            except ValueError:
                return _REFUSED
        if not isinstance(value, (int, float)):
            return _REFUSED
        if isinstance(value, float) and not math.isfinite(value):
            return _REFUSED
        if kind is int:
            whole = isinstance(value, int) or value.is_integer()
            return int(value) if whole and in_int64(int(value)) else _REFUSED
        try:
            return float(value)  # an int past 1.8e308 has no float: OverflowError
        except OverflowError:
            return _REFUSED
    if kind is str:
        if isinstance(value, os.PathLike):  # TrainConfig(adapter=Path(...)) from Python
            return os.fspath(value)
        return value if isinstance(value, str) else _REFUSED
    return value


def _found(value: Any) -> str:
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"the text {text!r}"
    if value is None:
        return "null"
    if isinstance(value, (dict, list, tuple, set)):  # never repr'd: a YAML alias bomb is tiny shared, huge printed
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    if isinstance(value, int) and value.bit_length() > 14_000:  # str() of an int past 4,300 digits raises
        return f"an int of {value.bit_length():,} bits"
    return f"{type(value).__name__} {value!r}"[:80]


def _expected(kind: type, nullable: bool) -> str:
    names = {bool: "true or false", int: "a whole number (64-bit)", float: "a finite number", str: "text (quote it)"}
    what = names.get(kind, kind.__name__)
    return what + (" or null" if nullable else "")
