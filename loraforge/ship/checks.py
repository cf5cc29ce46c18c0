"""`Check`: one property that `verify` checks over all modules or files, with what it found. Shared by
`ship.verify` (the file and math checks) and `ship.client_check` (what PEFT builds)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Check:
    """One property checked over all modules (or files)."""

    name: str
    applies: bool = True
    detail: str = ""  # what was measured, e.g. "max rel 1.2e-03 <= 7.8e-03 (bfloat16 base)"
    failures: dict[str, str] = field(default_factory=dict)  # module or file -> what was found
    checked: int = 0  # how many modules (or files) were checked

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def status(self) -> str:
        if not self.applies:
            return "n/a"
        if self.failures:
            return "FAILED"
        return "ok" if self.checked else "skipped"

    def fail(self, what: str, message: str) -> None:
        self.failures.setdefault(what, message)
