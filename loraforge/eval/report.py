"""The outputs of an evaluation: the JSON report, the per-sample jsonl and the table on stdout."""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraforge.core.atomic import write_file_atomic
from loraforge.core.errors import LoraforgeError


def samples_path_for(report_path: str | os.PathLike) -> Path:
    """Where the per-sample jsonl goes by default: REPORT.json -> REPORT.samples.jsonl."""
    p = Path(report_path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(stem + ".samples.jsonl")


def check_writable(path: Path, what: str) -> None:
    """Refuse a directory where the file PATH is to go, and create its folder (before any work)."""
    if path.exists() and path.is_dir():
        raise LoraforgeError(f"the {what} path {path} is a directory; give a file name, e.g. {path}/report.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoraforgeError(f"cannot create the folder for the {what} {path}: {e}") from None


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write REPORT as JSON to PATH through a staging file and one rename: never half a report."""
    p = Path(path)
    check_writable(p, "report")
    return write_file_atomic(p, report_json(report))


def report_json(report: dict) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


class SampleWriter:
    """Appends per-sample records (one JSON object per line) to a jsonl file (run_eval gives it a staging file,
    renamed over REPORT.samples.jsonl when the whole evaluation is done)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        check_writable(self.path, "per-sample jsonl")
        self._f = open(self.path, "w", encoding="utf-8")

    def write(self, records) -> None:
        for r in records:
            self._f.write(json.dumps(r, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_table(report: dict) -> str:
    """One row per benchmark and metric, scores in percent as the paper prints them."""
    header = ("benchmark", "problems", "metric", "n", "score %", "spread", "scorer")
    rows = []
    for name, res in report["benchmarks"].items():
        for m in res["metrics"]:
            sp = m.get("spread") or {}
            spread = f"±{100 * sp.get('std', 0.0):.2f} ({sp.get('kind', '-')})" if sp else "-"
            rows.append(
                (name, str(res["problems"]), m["metric"], str(m["n"]), f"{100 * m['score']:.2f}", spread, res["scorer"])
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    model = report.get("model", {})
    foot = f"model: {model.get('name_or_path')}"
    if model.get("adapter"):
        foot += f"  adapter: {model['adapter']}"
    return "\n".join(lines + [foot])
