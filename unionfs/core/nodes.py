"""The merged view's inodes and the values its operations pass around."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .chunks import PartialCopy
from .records import Entry


class FsError(Exception):
    """A filesystem operation failed with *errno*."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message or os.strerror(code))
        self.errno = code


class Node:
    """An inode of the merged view, with the number of lookups the kernel holds.

    `lower` is the lower layers' entry at this node's place (for a directory:
    the listing merged under its upper contents; for a file: the data until it
    is copied up). `upper` says whether the writable layer holds it. A file may
    have several names (hardlinks); `names` are those the kernel knows.
    """

    __slots__ = (
        "ino",
        "linked",
        "lookups",
        "lower",
        "lower_path",
        "metacopy",
        "mode",
        "name",
        "names",
        "opaque",
        "parent",
        "partial",
        "subdirs",
        "upper",
        "version",
    )  # fmt: skip

    def __init__(self, ino: int, mode: int, parent: int, name: bytes) -> None:
        self.ino = ino
        self.mode = mode
        self.lookups = 0
        self.parent = parent
        self.name = name
        self.names: set[tuple[int, bytes]] = {(parent, name)}
        self.lower: Entry | None = None
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
