"""containerd's filter syntax, for the snapshot fields it filters on.

    filter    := selector ("," selector)*          all must match
    selector  := fieldpath [("==" | "!=" | "~=") value]
    fieldpath := field ("." field)*                 a field may be "quoted"
    value     := "quoted" | plain text up to ","

A list of filters matches what any one of them matches. A selector without an
operator asks that the field be present (for labels: set, even to "").
Snapshot fields: `name`, `parent`, `kind` (view, active, committed), `labels.KEY`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import api
from .catalog import Snapshot, SnapshotError

_OPERATORS = ("==", "!=", "~=")


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    operator: str  # "" (present), "==", "!=", "~="
    value: str


def _invalid(text: str, why: str) -> SnapshotError:
    return SnapshotError("INVALID_ARGUMENT", f"filter {text!r}: {why}")


def _quoted(text: str, pos: int, whole: str) -> tuple[str, int]:
    """A double-quoted string at *pos* (Go's escapes, as strconv.Unquote reads them)."""
    end = pos + 1
    while end < len(text) and text[end] != '"':
        end += 2 if text[end] == "\\" else 1
    if end >= len(text):
        raise _invalid(whole, "unterminated quote")
    try:
        value = json.loads(text[pos : end + 1])
    except ValueError:
        raise _invalid(whole, "bad quoted string") from None
    return str(value), end + 1


def parse(text: str) -> list[Selector]:
    selectors: list[Selector] = []
    pos = 0
    while True:
        path: list[str] = []
        while True:  # the field path
            if pos < len(text) and text[pos] == '"':
                part, pos = _quoted(text, pos, text)
            else:
                match = re.compile(r"[A-Za-z0-9_/\-]+").match(text, pos)
                if match is None:
                    raise _invalid(text, f"expected a field name at {pos}")
                part, pos = match.group(), match.end()
            path.append(part)
            if pos < len(text) and text[pos] == ".":
                pos += 1
                continue
            break
        operator, value = "", ""
        if text.startswith(_OPERATORS, pos):
            operator = text[pos : pos + 2]
            pos += 2
            if pos < len(text) and text[pos] == '"':
                value, pos = _quoted(text, pos, text)
            else:
                end = text.find(",", pos)
                end = len(text) if end < 0 else end
                value, pos = text[pos:end].strip(), end
            if operator == "~=":
                try:
                    re.compile(value)
                except re.error as exc:
                    raise _invalid(text, f"bad pattern: {exc}") from None
        selectors.append(Selector(tuple(path), operator, value))
        if pos == len(text):
            return selectors
        if text[pos] != ",":
            raise _invalid(text, f"unexpected {text[pos]!r} at {pos}")
        pos += 1


def _field(snapshot: Snapshot, path: tuple[str, ...]) -> str | None:
    head, rest = path[0], path[1:]
    if head == "labels":
        if not rest:
            return None
        return snapshot.labels.get(".".join(rest))
    if rest:
        return None
    if head == "name":
        return snapshot.name
    if head == "parent":
        return snapshot.parent
    if head == "kind":
        return api.KIND_NAMES.get(snapshot.kind, "unknown")
    return None


def _matches(selector: Selector, snapshot: Snapshot) -> bool:
    value = _field(snapshot, selector.path)
    if selector.operator == "":
        return value is not None
    if selector.operator == "==":
        return value == selector.value
    if selector.operator == "!=":
        return value != selector.value
    return value is not None and re.search(selector.value, value) is not None


def matcher(filters: Sequence[str]) -> Callable[[Snapshot], bool]:
    """A test for the snapshots *filters* select (all, if none)."""
    parsed = [parse(text) for text in filters if text]
    if not parsed:
        return lambda snapshot: True
    return lambda snapshot: any(
        all(_matches(selector, snapshot) for selector in selectors) for selectors in parsed
    )
