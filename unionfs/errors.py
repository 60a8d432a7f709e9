"""Errors a user can cause; the CLI prints them as one line, never a traceback."""

from __future__ import annotations

import re

# An error line a person can read at once: long names and paths in it are
# shortened in the middle, where they say least.
LINE_LIMIT = 200
_WORD_LIMIT = 80  # a sha256 digest (71) stays whole
_LONG_WORD = re.compile(rf"\S{{{_WORD_LIMIT + 1},}}")


class StrataError(Exception):
    """A problem with the user's input or environment, stated in one line."""


def shorten(text: str, limit: int) -> str:
    """*text* if it fits in *limit* characters, else its start and end around '...'."""
    if len(text) <= limit:
        return text
    keep = max(limit - 3, 2)
    return text[: (keep + 1) // 2] + "..." + text[len(text) - keep // 2 :]


def error_line(program: str, message: object) -> str:
    """`PROGRAM: error: MESSAGE` on one line of at most LINE_LIMIT characters."""
    text = re.sub(r"\s*[\r\n]+\s*", " ", str(message).strip())
    text = _LONG_WORD.sub(lambda found: shorten(found.group(), _WORD_LIMIT), text)
    return shorten(f"{program}: error: {text}", LINE_LIMIT)
