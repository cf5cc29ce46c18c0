"""Settings dataclasses carry their help text in field metadata: `setting(default, "help")` is a
dataclass field with `metadata={"help": ...}`. The CLI reads it (`help_texts`) for its options' help,
so a setting and the sentence that explains it are written once, side by side."""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A dataclass field with its help text; a setting without one is a programming error."""
    if not help:
        raise ValueError("every setting needs a help text")
    return dataclasses.field(default=default, metadata={"help": help})


def help_texts(cls: type) -> dict[str, str]:
    """Field name -> help text of a settings dataclass (empty for a field not made with `setting`)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
