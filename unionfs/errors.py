"""Errors a user can cause; the CLI prints them as one line, never a traceback."""

from __future__ import annotations

import functools
import re

# An error line a person can read at once: long names and paths in it are
# shortened in the middle, where they say least.
LINE_LIMIT = 200
_WORD_LIMIT = 80  # a sha256 digest (71) stays whole where the line has room
_WORD_FLOOR = 24  # what is left of a long word at the least


class StrataError(Exception):
    """A problem with the user's input or environment, stated in one line."""


def os_error_text(exc: OSError) -> str:
    """What an OSError says to a person: its reason, then the path it names."""
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def shorten(text: str, limit: int) -> str:
    """*text* if it fits in *limit* characters, else its start and end around '...'."""
    if len(text) <= limit:
        return text
    keep = max(limit - 3, 2)
    return text[: (keep + 1) // 2] + "..." + text[len(text) - keep // 2 :]


def _shorten_found(limit: int, found: re.Match[str]) -> str:
    return shorten(found.group(), limit)


def error_line(program: str, message: object) -> str:
    """`PROGRAM: error: MESSAGE` on one line of at most LINE_LIMIT characters.

    Long names, paths and digests give way first, each shortened in its middle
    (the longest furthest), so the words that say what went wrong stay whole.
    """
    text = re.sub(r"\s*[\r\n]+\s*", " ", str(message).strip())
    line = f"{program}: error: {text}"
    limit = _WORD_LIMIT
    while limit >= _WORD_FLOOR:
        line = re.sub(rf"\S{{{limit + 1},}}", functools.partial(_shorten_found, limit), line)
        if len(line) <= LINE_LIMIT:
            return line
        limit -= 8
    return shorten(line, LINE_LIMIT)
