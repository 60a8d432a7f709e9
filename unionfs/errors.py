"""Errors a user can cause; the CLI prints them as one line, never a traceback."""


class StrataError(Exception):
    """A problem with the user's input or environment, stated in one line."""
