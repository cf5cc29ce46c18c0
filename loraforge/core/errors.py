"""The one error type the library raises for anything a user can cause.

The CLI turns it into a message on stderr and exit code 1; the library never calls sys.exit.
"""


class LoraforgeError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
