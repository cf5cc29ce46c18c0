"""The path guard: no command writes where it reads, and every path is resolved once, at the edge.

The rule: before any work, an output that IS an input, CONTAINS one or LIES INSIDE one (after `~`,
the current directory and every symlink are resolved) is refused in one line, and so is an output
named twice. `--overwrite` never overrides it: it replaces a previous result, never what the command
reads. A path that cannot be resolved (a symlink loop, a parent that cannot be searched, a file where
a directory is wanted) is one line too.

Which paths a command reads and writes is declared once per command (loraforge/cli/_paths.py applies
the declarations to every command of the CLI); `check_paths` here is the rule itself, used by the CLI
and by library entry points that take an output (init, convert, save_init).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from loraforge.core.errors import LoraforgeError, os_error_message


class UnresolvablePath(LoraforgeError):
    """A path that cannot be resolved (ERRNO says why: ELOOP, EACCES, ENOTDIR...)."""

    def __init__(self, message: str, errno_: Optional[int]):
        super().__init__(message)
        self.errno = errno_


@dataclass(frozen=True)
class NamedPath:
    """A path as the user named it, and where it really is."""

    flag: str  # how the message names it: "-o", "--model", "MODEL", "the residual base of --adapter"
    given: str  # as given
    path: Path  # absolute, symlinks resolved as far as the path exists, the rest appended


def resolve_path(given: str | os.PathLike, flag: str) -> Path:
    """GIVEN made absolute with every symlink of its existing part resolved; the part that does not exist
    yet is appended as written. Raises a one-line LoraforgeError for a symlink loop, a parent that cannot
    be searched, or a file where a directory is wanted."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(given))))
    missing: list[str] = []
    cur = path
    while True:
        try:
            real = Path(os.path.realpath(cur, strict=True))
            break
        except FileNotFoundError:
            if os.path.islink(cur):  # a dangling symlink: what it names is where a write would land
                real = Path(os.path.realpath(cur))
                break
            if cur.parent == cur:
                real = cur
                break
            missing.append(cur.name)
            cur = cur.parent
        except OSError as e:
            raise UnresolvablePath(_unresolvable(flag, given, e), e.errno) from None
    if missing and real.exists() and not real.is_dir():
        raise UnresolvablePath(
            f"{flag} {given}: {real} is a file, not a directory, so nothing can be below it; check the path.",
            errno.ENOTDIR,
        )
    return real.joinpath(*reversed(missing))


def _unresolvable(flag: str, given, e: OSError) -> str:
    where = e.filename if e.filename is not None else given
    if e.errno == errno.ELOOP:
        return (
            f"{flag} {given}: {where} is a symlink loop (links that lead back to themselves); "
            "remove or fix the link, or choose another path."
        )
    if e.errno == errno.EACCES:
        return (
            f"{flag} {given}: a directory on the way to {where} cannot be searched (permission denied); "
            "fix its permissions or choose another path."
        )
    if e.errno == errno.ENOTDIR:
        blocker = next((p for p in [Path(where), *Path(where).parents] if p.is_file()), where)
        return f"{flag} {given}: {blocker} is a file, not a directory, so nothing can be below it; check the path."
    return f"{flag} {given}: {os_error_message(e)}"


def name_path(flag: str, given: str | os.PathLike) -> NamedPath:
    return NamedPath(flag, os.fspath(given), resolve_path(given, flag))


def _ident(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def overlap(out: Path, inp: Path) -> Optional[str]:
    """How OUT overlaps INP: "is", "lies inside" or "contains"; None when they are apart. By resolved path,
    and by (device, inode) where the paths exist, which also sees a bind mount or a hard link."""
    if out == inp:
        return "is"
    if inp in out.parents:
        return "lies inside"
    if out in inp.parents:
        return "contains"
    inp_id, out_id = _ident(inp), _ident(out)
    if inp_id is None:
        return None
    if out_id == inp_id:
        return "is"
    if any(_ident(p) == inp_id for p in out.parents):
        return "lies inside"
    if out_id is not None and any(_ident(p) == out_id for p in inp.parents):
        return "contains"
    return None


def check_paths(inputs: Iterable[NamedPath], outputs: Iterable[NamedPath]) -> None:
    """Refuse an output that is, contains or lies inside an input, and an output named twice (one line)."""
    inputs, outputs = list(inputs), list(outputs)
    for i, out in enumerate(outputs):
        for inp in inputs:
            how = overlap(out.path, inp.path)
            if how is not None:
                raise LoraforgeError(_refusal(out, inp, how))
        for other in outputs[:i]:
            if other.path == out.path:
                raise LoraforgeError(
                    f"{_named(out)} and {_named(other)} are the same path ({out.path}); "
                    "one output would overwrite the other. Choose different paths."
                )


def _named(p: NamedPath) -> str:
    # a flag as "--init P"; a path found through another ("the model R was made from") as "M (the model ...)"
    return f"{p.given} ({p.flag})" if p.flag.startswith("the ") else f"{p.flag} {p.given}"


def _refusal(out: NamedPath, inp: NamedPath, how: str) -> str:
    resolved = "" if str(out.path) == os.path.abspath(os.path.expanduser(out.given)) else f" (resolved: {out.path})"
    what = {"is": "is the same path as", "lies inside": "lies inside", "contains": "contains"}[how]
    return (
        f"{_named(out)}{resolved} {what} {_named(inp)}, which this command reads; writing there could destroy "
        f"it, and --overwrite never allows that. Choose a path outside it for {out.flag}."
    )
