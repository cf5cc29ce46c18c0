"""Output helpers: medians, plain-text tables, JSON result files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def median(xs):
    return statistics.median(xs) if xs else None


def table(rows: list[list], header: list[str]) -> str:
    cells = [
        [
            ("" if c is None else c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float) else str(c))
            for c in row
        ]
        for row in [header] + rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
