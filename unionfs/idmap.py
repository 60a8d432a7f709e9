"""Owner mapping between what the layers store and what a mount shows, as
fuse-overlayfs's `uidmapping=`/`gidmapping=` and `squash_to_*` options do.

A range STORED:SHOWN:LENGTH shows a stored id S in [STORED, STORED+LENGTH) as
SHOWN + (S - STORED); a request's id is stored by the same range backwards.
A stored id outside every range shows as the overflow id; a shown id outside
every range cannot be set (chown answers EINVAL) and a file made by such a
caller is stored as the overflow id, as fuse-overlayfs does. Squashing shows
every owner as one id and lets chown succeed.

Lookups bisect a sorted table built once, so a mapping costs the same with
one range or many.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

from .errors import StrataError

ID_MAX = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown


def overflow_id(kind: str) -> int:
    """The kernel's id for "not mapped" (/proc/sys/kernel/overflow{uid,gid})."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 65534


@dataclass(frozen=True, slots=True)
class IdRange:
    stored: int
    shown: int
    length: int


class _Table:
    """Ranges sorted by their start on one side, for bisecting."""

    def __init__(self, ranges: list[tuple[int, int, int]]) -> None:
        ranges.sort()
        self.starts = [start for start, _, _ in ranges]
        self.ranges = ranges

    def map(self, value: int) -> int | None:
        index = bisect.bisect_right(self.starts, value) - 1
        if index < 0:
            return None
        start, target, length = self.ranges[index]
        return target + (value - start) if value < start + length else None


class IdMap:
    """One kind of id (uid or gid): stored <-> shown."""

    def __init__(self, ranges: list[IdRange], overflow: int, squash: int | None = None) -> None:
        for kind, pick in (("stored", 0), ("shown", 1)):
            spans = sorted((r.stored if pick == 0 else r.shown, r.length) for r in ranges)
            for (start, length), (following, _) in itertools.pairwise(spans):
                if start + length > following:
                    raise StrataError(f"id mapping ranges overlap on the {kind} side")
        self._to_shown = _Table([(r.stored, r.shown, r.length) for r in ranges])
        self._to_stored = _Table([(r.shown, r.stored, r.length) for r in ranges])
        self.identity = not ranges
        self.overflow = overflow
        self.squash = squash

    def shown(self, stored: int) -> int:
        if self.squash is not None:
            return self.squash
        if self.identity:
            return stored
        mapped = self._to_shown.map(stored)
        return self.overflow if mapped is None else mapped

    def stored(self, shown: int) -> int | None:
        """The id to store for *shown*; None where no range holds it."""
        if self.identity:
            return shown
        return self._to_stored.map(shown)


def parse_ranges(text: str, option: str) -> list[IdRange]:
    """`STORED:SHOWN:LENGTH[:STORED:SHOWN:LENGTH...]`, fuse-overlayfs's format
    (containers-storage writes each triple as `:C:H:N` and joins them, so the
    text starts with `:`; as in fuse-overlayfs, empty fields are skipped)."""
    fields = [field for field in text.split(":") if field]
    if not fields or len(fields) % 3:
        raise StrataError(f"{option}={text}: expected STORED:SHOWN:LENGTH triples")
    ranges = []
    for index in range(0, len(fields), 3):
        try:
            stored, shown, length = (int(field, 10) for field in fields[index : index + 3])
        except ValueError:
            raise StrataError(f"{option}={text}: ids and lengths are decimal numbers") from None
        if min(stored, shown) < 0 or length <= 0:
            raise StrataError(f"{option}={text}: ids must be >= 0 and lengths > 0")
        if max(stored, shown) + length - 1 > ID_MAX:
            raise StrataError(f"{option}={text}: a range goes past the largest id {ID_MAX}")
        ranges.append(IdRange(stored, shown, length))
    return ranges


@dataclass(frozen=True, slots=True)
class Ownership:
    """The uid and gid maps of a mount; identity unless options say otherwise."""

    uids: IdMap
    gids: IdMap

    @classmethod
    def identity(cls) -> Ownership:
        return cls(IdMap([], overflow_id("uid")), IdMap([], overflow_id("gid")))

    @property
    def is_identity(self) -> bool:
        return (
            self.uids.identity
            and self.gids.identity
            and self.uids.squash is None
            and self.gids.squash is None
        )
