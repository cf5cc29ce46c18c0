"""What every command shares: turning LoraforgeError into a message and exit code 1."""

from __future__ import annotations

import contextlib

import click

from loraforge.core.errors import LoraforgeError


@contextlib.contextmanager
def user_errors():
    """Run a library call; a LoraforgeError becomes `Error: ...` on stderr and exit code 1."""
    try:
        yield
    except LoraforgeError as e:
        raise click.ClickException(str(e)) from None
