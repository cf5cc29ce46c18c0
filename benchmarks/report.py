"""Output helpers: medians, plain-text tables, JSON result files."""

from __future__ import annotations

import errno
import json
import os
import statistics
import sys
import tempfile
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


def refuse(message: str):
    """Stop the script with MESSAGE as one line on stderr (exit status 2), no traceback."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_new_file(path, flag: str = "--json") -> Path:
    """Before any work: PATH must not exist (a previous result is never written over) and the nearest existing
    directory above it must be one this process can write in; otherwise refuse in one line. Creates nothing."""
    path = Path(os.path.abspath(path))
    if path.exists() or path.is_symlink():
        refuse(
            f"{flag} {path} already exists (a previous result?); expected a new file. Nothing was run: "
            "give another path, or move that file away first."
        )
    above = path.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        refuse(f"{flag} {path}: {above} is a file, not a directory. Nothing was run: give another path.")
    if not os.access(above, os.W_OK | os.X_OK):
        refuse(f"{flag} {path}: {above} is not writable by this user. Nothing was run: give another path.")
    return path


class ResultFile:
    """A results file, checked when the script starts (`check_new_file`) and written whole (a staging file and one
    rename) when there is something to write. The first write never replaces a file: if one appeared at PATH
    meanwhile, the results go to a free name beside it (`name-1.json`, ...), and it is said so on stderr. Later
    writes (a summary rewritten after each step) replace this run's own file."""

    def __init__(self, path, flag: str = "--json"):
        self.path = check_new_file(path, flag)
        self.written = False

    def write_text(self, text: str) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.partial-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # what an ordinary open() would give it, not mkstemp's 0600
            if self.written:
                os.replace(tmp, self.path)
            else:
                self.path = _link_new(tmp, self.path)
                self.written = True
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        return self.path

    def write(self, data) -> Path:
        return self.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _link_new(tmp: str, path: Path) -> Path:
    """Hard-link TMP at PATH, or at the first free PATH-1, PATH-2, ... when PATH is taken; never replaces a file."""
    for i in range(1000):
        target = path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}")
        try:
            os.link(tmp, target)
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):  # no hard links here: O_EXCL instead
                raise
            try:
                with open(target, "x") as f, open(tmp) as src:
                    f.write(src.read())
            except FileExistsError:
                continue
        if i:
            print(f"{path} appeared while this ran; left it as it is and wrote {target} instead", file=sys.stderr)
        return target
    raise FileExistsError(errno.EEXIST, "no free name beside it", str(path))
