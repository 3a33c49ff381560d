"""The one error type the command line turns into a one-line message and a non-zero exit."""


class RnnbenchError(Exception):
    """A problem with the user's input or environment, stated in one line (no traceback shown)."""
