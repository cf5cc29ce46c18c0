"""Claiming an output directory atomically, and the lock that keeps two loraforge writers apart.

The rule these serve: a command either puts its complete result at OUT or leaves OUT as it found it.
Results are built in a staging directory beside OUT; `claim` moves it into place only if OUT is
still what the command checked at the start (absent, or the very directory --overwrite was given
for), in one atomic step where the kernel offers it:

- absent OUT:  renameat2(RENAME_NOREPLACE) fails with EEXIST if anything appeared there, even an
               empty directory (a plain rename(2) would silently replace an empty one);
- --overwrite: renameat2(RENAME_EXCHANGE) swaps staging and OUT in one step; if what came out is not
               the directory that was checked, it is swapped back and the claim fails.

Where renameat2 is missing (not Linux, or a filesystem without it) the fallback re-checks, then
renames (overwrite: old OUT aside to a trash name first); the window between check and rename is
then a few system calls wide, not zero.

Before a result is renamed into place its files are flushed to the disk (fsync), and after the rename the
directory holding it: a rename is atomic for other processes at once, but after a power cut or a kernel crash
the disk could otherwise hold the new name with empty or partial contents. LORAFORGE_FSYNC=0 skips the flushes
(the test suite does: thousands of small results on one disk); kill -9 safety does not depend on them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from loraforge.core.errors import LoraforgeError

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return lib if hasattr(lib, "renameat2") else None
    except OSError:
        return None


_LIBC = _libc()


def _durable() -> bool:
    return os.environ.get("LORAFORGE_FSYNC", "1") != "0"


def fsync_path(path: Path) -> None:
    """Flush PATH (a file or a directory) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_tree(root: Path) -> None:
    """fsync every file and directory under ROOT (a staging directory about to be renamed into place)."""
    if not _durable():
        return
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def flush_dir(path: Path) -> None:
    """fsync the directory PATH, so that a rename inside it survives a crash."""
    if _durable():
        fsync_path(path)


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """rename SRC to DST with FLAGS; False when the kernel or filesystem does not support it."""
    if _LIBC is None:
        return False
    rc = _LIBC.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


@dataclass(frozen=True)
class Snapshot:
    """What was at a path when it was checked: nothing, or this (device, inode).

    A snapshot of an existing path holds it open until `close`: while it is open its inode cannot be
    freed and reused, so a directory deleted and re-created meanwhile (which would otherwise often get
    the same inode number back) never passes for the one that was checked."""

    ident: Optional[tuple[int, int]]
    fd: Optional[int] = None

    @classmethod
    def of(cls, path: Path, hold: bool = False) -> "Snapshot":
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return cls(None)
        fd = None
        if hold:
            fd = os.open(path, getattr(os, "O_PATH", os.O_RDONLY) | os.O_NOFOLLOW)
            held = os.fstat(fd)
            if (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino):  # replaced between lstat and open
                os.close(fd)
                return cls.of(path, hold)
        return cls((st.st_dev, st.st_ino), fd)

    def __eq__(self, other) -> bool:
        return isinstance(other, Snapshot) and self.ident == other.ident

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def describe(self) -> str:
        return "absent" if self.ident is None else "the directory that was checked"


class ClaimLost(LoraforgeError):
    """OUT changed while the command ran; the result was not put there."""


def _lost(out: Path, was: Snapshot) -> ClaimLost:
    if was.ident is None:
        found = "something appeared there"
    else:
        found = "it was replaced by something else"
    return ClaimLost(
        f"{out} changed while this command ran ({found}; it was {was.describe()} at the start). "
        f"Left {out} as it is now and discarded this run's result; check what is there, then run again "
        "(with --overwrite to replace it)."
    )


def claim(staging: Path, out: Path, was: Snapshot) -> None:
    """Put STAGING at OUT if OUT is still WAS; otherwise raise ClaimLost and leave OUT untouched.

    On success STAGING no longer exists (with --overwrite the old OUT is deleted)."""
    flush_tree(staging)
    _claim(staging, out, was)
    flush_dir(out.parent)


def _claim(staging: Path, out: Path, was: Snapshot) -> None:
    import shutil

    if was.ident is None:
        try:
            if renameat2(staging, out, _RENAME_NOREPLACE):
                return
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise _lost(out, was) from None
            raise
        if Snapshot.of(out).ident is not None:  # fallback: re-check, then a plain rename
            raise _lost(out, was)
        os.rename(staging, out)
        return

    now = Snapshot.of(out)
    if now.ident is None:  # the old OUT is gone already: nothing left to replace
        return _claim(staging, out, now)
    if now != was:
        raise _lost(out, was)
    if renameat2(staging, out, _RENAME_EXCHANGE):
        # STAGING now holds what was at OUT a moment ago: the checked directory, unless it changed
        # between the stat above and the swap; then swap back.
        if Snapshot.of(staging) != was:
            renameat2(staging, out, _RENAME_EXCHANGE)
            raise _lost(out, was)
        shutil.rmtree(staging, ignore_errors=True)
        return
    trash = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, trash)
    os.rename(staging, out)
    shutil.rmtree(trash, ignore_errors=True)


class DirLock:
    """An exclusive flock on `.OUT.lock` beside OUT, held while a command writes OUT.

    Non-blocking: a second writer fails at once with a message naming the holder's pid. The lock
    file is removed on release; one left by a killed process is reused (flock dies with its holder).
    """

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.lock"
        self.fd: Optional[int] = None

    def acquire(self) -> "DirLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                out = self.path.parent / self.path.name[1:].removesuffix(".lock")
                raise LoraforgeError(
                    f"Another loraforge command (pid {holder}) is writing {out} right now. Wait for it to "
                    "finish, or choose another -o."
                ) from None
            # The file we locked may have been removed by its previous holder between our open and our
            # flock; then the lock protects nothing. Retry on the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:  # a full disk: say which output could not be written, not the lock file
            os.close(fd)
            self.path.unlink(missing_ok=True)
            out = self.path.parent / self.path.name[1:].removesuffix(".lock")
            raise OSError(e.errno, e.strerror, str(out)) from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


OWNER_FILE = ".loraforge-owner"


def write_owner(staging: Path) -> None:
    """Record this process as the owner of STAGING, so a later run can tell stale litter from live work."""
    (staging / OWNER_FILE).write_text(f"{os.getpid()}\n")


def owner_alive(staging: Path) -> Optional[int]:
    """The pid that owns STAGING if that process is still running, else None."""
    try:
        pid = int((staging / OWNER_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid == os.getpid():
        return pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


# --- single files --------------------------------------------------------------------------------
# A file output (eval's report and samples, inspect --json, plot's images) is written to a staging
# file beside it, `.NAME.partial-PID-XXXX`, and renamed over NAME only when complete: a failure or a
# kill leaves the previous NAME as it was. os.replace is atomic within a directory; a symlink at NAME
# is replaced, never followed (its target is left alone).


def staging_file(path: Path) -> Path:
    """A new, empty staging file beside PATH, named after it and this process (for `clean_stale_files`)."""
    import tempfile

    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-{os.getpid()}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes 0600; the result gets what an ordinary open() would give it
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def clean_stale_files(path: Path) -> list[str]:
    """Remove staging files of PATH left by killed processes; return one line per file removed."""
    import glob as _glob

    lines = []
    for stale in sorted(path.parent.glob(f".{_glob.escape(path.name)}.partial-*")):
        try:
            pid = int(stale.name[len(path.name) + 10 :].split("-")[0])
        except ValueError:
            pid = None
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue  # a live writer's (or this process's own) staging file
        try:
            stale.unlink()
        except OSError:
            continue
        lines.append(f"loraforge: removed {stale}, left by an interrupted run.")
    return lines


def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)  # one name for the final rename (the fault tests fail it on purpose)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileStaging:
    """Stage new contents for several files and put them in place together at the end.

        with FileStaging() as stage:
            tmp = stage.add(report_path)   # write tmp as you like
        # on success every staged file replaced its destination, in the order added; on any error none did,
        # and the staging files are gone

    The replaces at the end are a few renames apart, so a kill there can leave some files new and the
    later ones old; each file alone is always whole."""

    def __init__(self, echo=None):
        import sys

        self.staged: list[tuple[Path, Path]] = []
        self.echo = echo or (lambda line: print(line, file=sys.stderr))

    def add(self, path: str | os.PathLike) -> Path:
        path = Path(os.path.abspath(path))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            blocker = next(p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir())
            raise LoraforgeError(f"{path}: {blocker} is a file, not a directory; choose another path.") from None
        for line in clean_stale_files(path):
            self.echo(line)
        try:
            tmp = staging_file(path)
        except OSError as e:  # named after the output the user gave, not the staging file's odd name
            raise OSError(e.errno, e.strerror, str(path)) from None
        self.staged.append((tmp, path))
        return tmp

    def commit(self) -> None:
        if _durable():
            for tmp, _ in self.staged:
                fsync_path(tmp)
        for tmp, path in self.staged:
            _replace(tmp, path)
        for parent in dict.fromkeys(path.parent for _, path in self.staged):
            flush_dir(parent)
        self.staged = []

    def discard(self) -> None:
        for tmp, _ in self.staged:
            try:
                tmp.unlink()
            except OSError:
                pass
        self.staged = []

    def __enter__(self) -> "FileStaging":
        return self

    def __exit__(self, kind, value, tb) -> None:
        first = self.staged[0][1] if self.staged else None
        names = {str(tmp): str(dest) for tmp, dest in self.staged}
        if kind is None:
            try:
                self.commit()
                return
            except OSError as e:
                value = e
            finally:
                self.discard()  # nothing left after a commit; after a failed one, the rest
        else:
            self.discard()
        if isinstance(value, OSError) and value.errno is not None and first is not None:
            # a full disk's write() names no file, an open() names the staging file: name the output instead
            if value.filename is None or str(value.filename) in names:
                raise OSError(value.errno, value.strerror, names.get(str(value.filename), str(first))) from None
        if kind is None:
            raise value


def write_file_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write DATA to PATH through a staging file and one rename: PATH is the old file or the new one, never half."""
    with FileStaging() as stage:
        tmp = stage.add(path)
        if isinstance(data, str):
            data = data.encode("utf-8")
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(os.path.abspath(path))
