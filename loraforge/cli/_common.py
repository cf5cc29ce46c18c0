"""What every command shares: turning user-caused errors into one line and exit code 1."""

from __future__ import annotations

import contextlib

import click

from loraforge.core.errors import LoraforgeError, os_error_message


@contextlib.contextmanager
def user_errors():
    """Run a library call; a LoraforgeError or an operating-system error (disk full, read-only or
    forbidden path, ...) becomes `Error: ...` on stderr and exit code 1, never a traceback."""
    try:
        yield
    except LoraforgeError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(os_error_message(e)) from None
