"""The error type of the command line."""


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""
