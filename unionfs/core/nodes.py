"""The merged view's inodes and the values its operations pass around."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .chunks import PartialCopy
from .records import Entry


class FsError(Exception):
    """A filesystem operation failed with *errno*."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message or os.strerror(code))
        self.errno = code


# Few distinct modes: the nodes share their int objects.
_MODES: dict[int, int] = {}


class Node:
    """An inode of the merged view, with the number of lookups the kernel holds.

    `lower` is the lower layers' entry at this node's place (for a directory:
    the listing merged under its upper contents; for a file: the data until it
    is copied up). `upper` says whether the writable layer holds it. A file may
    have several names (hardlinks); its names are those the kernel knows.

    A node is kept for every inode the kernel holds, so it is kept small: a
    file only in the lower layers need not hold its entry (`find_lower` finds
    it again in the index, by its name), and a file with one name keeps no set
    of names.
    """

    __slots__ = (
        "_lower",
        "_names",
        "find_lower",
        "ino",
        "linked",
        "lookups",
        "lower_path",
        "metacopy",
        "mode",
        "name",
        "opaque",
        "parent",
        "partial",
        "subdirs",
        "upper",
        "version",
    )  # fmt: skip

    def __init__(self, ino: int, mode: int, parent: int, name: bytes) -> None:
        self.ino = ino
        self.mode = _MODES.setdefault(mode, mode)  # one int object per mode, not per node
        self.lookups = 0
        self.parent = parent
        self.name = name
        # None: the one name (parent, name); else every name, maybe none left.
        self._names: set[tuple[int, bytes]] | None = None
        self._lower: Entry | None = None
        self.find_lower: Callable[[Node], Entry] | None = None
        self.lower_path: bytes | None = None  # directories: the lower path merged in
        self.upper = False
        self.opaque = False
        self.metacopy = False
        self.version = 0  # moves when the data changes place (copy-up)
        # Directories: the subdirectory count st_nlink shows, counted by the
        # first getattr and kept by every change after, so none lists again.
        self.subdirs: int | None = None
        self.linked = False  # a hardlinked lower file whose shared copy is in WORK
        self.partial: PartialCopy | None = None  # a metacopy being filled chunk by chunk

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def lower(self) -> Entry | None:
        if self.find_lower is not None:
            return self.find_lower(self)
        return self._lower

    @lower.setter
    def lower(self, entry: Entry | None) -> None:
        self._lower = entry
        self.find_lower = None

    def find_lower_by(self, find: Callable[[Node], Entry]) -> None:
        """Keep no lower entry: *find* finds it again when asked."""
        self._lower = None
        self.find_lower = find

    def keep_lower(self) -> None:
        """Hold the lower entry from now on: the node is about to change
        place or layer, after which its name no longer finds that entry."""
        if self.find_lower is not None:
            self.lower = self.find_lower(self)

    # Names ------------------------------------------------------------------

    def has_name(self, parent: int, name: bytes) -> bool:
        if self._names is None:
            return parent == self.parent and name == self.name
        return (parent, name) in self._names

    def add_name(self, parent: int, name: bytes) -> None:
        if self._names is None:
            if parent == self.parent and name == self.name:
                return
            self._names = {(self.parent, self.name)}
        self._names.add((parent, name))

    def drop_name(self, parent: int, name: bytes) -> None:
        if self._names is None:
            if parent == self.parent and name == self.name:
                self._names = set()
            return
        self._names.discard((parent, name))

    def move_name(self, old_parent: int, old_name: bytes, parent: int, name: bytes) -> None:
        """Rename: the name (old_parent, old_name) becomes (parent, name), the latest."""
        if self._names is not None:
            self._names.discard((old_parent, old_name))
            self._names.add((parent, name))
        elif (old_parent, old_name) != (self.parent, self.name):
            self._names = {(self.parent, self.name), (parent, name)}
        self.parent, self.name = parent, name

    def all_names(self) -> list[tuple[int, bytes]]:
        if self._names is None:
            return [(self.parent, self.name)]
        return list(self._names)


@dataclass(frozen=True, slots=True)
class CopyJob:
    """Data to copy from a lower file: into a new file in WORK (*temp*), or into
    the metadata-only copy itself (*in_place*, an open descriptor), which keeps
    its inode, so its upper hardlinks and metadata stay as they are."""

    ino: int
    entry: Entry
    temp: bytes = b""
    in_place: int | None = None
    partial: PartialCopy | None = None  # fill only the chunks it lacks


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    gid: int


def count_subdir(directory: Node, change: int) -> None:
    """A change made *change* subdirectories more (or fewer) in *directory*."""
    if directory.subdirs is not None:
        directory.subdirs += change
