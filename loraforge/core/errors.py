"""The one error type the library raises for anything a user can cause, and the one place that turns
an operating-system error into a message a user can act on.

The CLI turns both into a message on stderr and exit code 1; the library never calls sys.exit.
"""

from __future__ import annotations

import errno


class LoraforgeError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


# errno -> what to do about it. The path and the system's own wording come from the error itself.
_ADVICE = {
    errno.ENOSPC: "free some space there (or choose another -o on a disk with room) and run again",
    errno.EDQUOT: "your disk quota is used up there; free some space or choose another -o, and run again",
    errno.EROFS: "that file system is mounted read-only; choose an -o on a writable disk",
    errno.EACCES: "you lack permission there; choose a directory you can write (or fix its permissions)",
    errno.EPERM: "the operation is not permitted there; choose a directory you own",
    errno.EBUSY: "it is in use (a mount point, or open elsewhere); choose another path or retry when it is free",
    errno.ENOENT: "it does not exist; check the path",
    errno.ENOTDIR: "a part of that path is a file, not a directory; check the path",
    errno.EISDIR: "it is a directory where a file was expected; check the path",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and run again",
    errno.ENFILE: "the system has too many open files; close some programs and run again",
    errno.EIO: "the disk reported an I/O error; check the device (dmesg), then retry on a healthy disk",
    errno.ENOMEM: "the system ran out of memory; close other programs or use a machine with more memory",
    errno.EXDEV: "it is on another file system than the output directory; put both on one disk",
    errno.ENOTEMPTY: "the directory is not empty; choose another path",
    errno.EEXIST: "something already exists there; choose another path",
    errno.ECONNREFUSED: "the connection was refused; check the network or the server, and retry",
    errno.ECONNRESET: "the connection was reset; check the network and retry",
    errno.ETIMEDOUT: "the connection timed out; check the network and retry",
    errno.ENETUNREACH: "the network is unreachable; check the network and retry",
    errno.EHOSTUNREACH: "the host is unreachable; check the network and retry",
}


def os_error_message(err: OSError) -> str:
    """One line for an OSError: what failed (errno name and the system's words), on which path, and
    what to do. Used by cli/_common.user_errors, so every command reports OS errors the same way."""
    code = err.errno
    name = errno.errorcode.get(code, "OSError") if code is not None else type(err).__name__
    reason = err.strerror or str(err) or type(err).__name__
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    where = " -> ".join(str(p.decode(errors="replace") if isinstance(p, bytes) else p) for p in paths)
    advice = _ADVICE.get(code, "check the path and the disk, then run again")
    return f"{reason} ({name}){': ' + where if where else ''}; {advice}."
