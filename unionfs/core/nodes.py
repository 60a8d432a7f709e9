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

# Node._flags
_UPPER, _OPAQUE, _METACOPY, _LINKED = 1, 2, 4, 8
# chattr's append-only and immutable flags (fileflags.py), once read
_PROTECTION_KNOWN, _APPEND_ONLY, _IMMUTABLE = 16, 32, 64
_APPEND_FL, _IMMUTABLE_FL = 0x20, 0x10
# The upper file is known to have no security.capability; a directory's
# upper copy no default ACL, and no set-group-ID bit
_NO_CAPABILITY, _NO_DEFAULT_ACL, _NO_SETGID = 128, 256, 512


class NodeMore:
    """What few nodes need: directories, files with several names, files
    copied up or being filled. Kept apart so a plain node stays small."""

    __slots__ = ("lower_path", "names", "partial", "subdirs", "version")

    def __init__(self) -> None:
        self.lower_path: bytes | None = None
        self.names: set[tuple[int, bytes]] | None = None
        self.partial: PartialCopy | None = None
        self.subdirs: int | None = None
        self.version = 0


class Node:
    """An inode of the merged view, with the number of lookups the kernel holds.

    `lower` is the lower layers' entry at this node's place (for a directory:
    the listing merged under its upper contents; for a file: the data until it
    is copied up). `upper` says whether the writable layer holds it. A file may
    have several names (hardlinks); its names are those the kernel knows.

    A node is kept for every inode the kernel holds, so it is kept small (96
    bytes): a file only in the lower layers need not hold its entry
    (`find_lower_by`: found again in the index by its name), the four flags
    share one int, and what few nodes need lives in a `NodeMore`.
    """

    __slots__ = ("_flags", "_lower", "_more", "ino", "lookups", "mode", "name", "parent")

    def __init__(self, ino: int, mode: int, parent: int, name: bytes) -> None:
        self.ino = ino
        self.mode = _MODES.setdefault(mode, mode)  # one int object per mode, not per node
        self.lookups = 0
        self.parent = parent
        self.name = name  # the latest name; every name is in `_more.names` once there are two
        # An Entry, None, or the function that finds the entry again.
        self._lower: Entry | Callable[[Node], Entry] | None = None
        self._flags = 0
        self._more: NodeMore | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def _more_state(self) -> NodeMore:
        more = self._more
        if more is None:
            more = self._more = NodeMore()
        return more

    # Where the data and entry are ------------------------------------------

    @property
    def lower(self) -> Entry | None:
        found = self._lower
        if found is None or type(found) is Entry:
            return found
        return found(self)  # type: ignore[operator]

    @lower.setter
    def lower(self, entry: Entry | None) -> None:
        self._lower = entry

    @property
    def keeps_lower(self) -> bool:
        """Whether the node holds its lower entry (else finds it when asked)."""
        return self._lower is None or type(self._lower) is Entry

    def find_lower_by(self, find: Callable[[Node], Entry]) -> None:
        """Keep no lower entry: *find* finds it again when asked."""
        self._lower = find

    def keep_lower(self) -> None:
        """Hold the lower entry from now on: the node is about to change
        place or layer, after which its name no longer finds that entry."""
        if not self.keeps_lower:
            self._lower = self.lower

    def _flag(self, bit: int, value: bool) -> None:
        self._flags = self._flags | bit if value else self._flags & ~bit

    @property
    def upper(self) -> bool:
        return bool(self._flags & _UPPER)

    @upper.setter
    def upper(self, value: bool) -> None:
        self._flag(_UPPER, value)

    @property
    def opaque(self) -> bool:
        return bool(self._flags & _OPAQUE)

    @opaque.setter
    def opaque(self, value: bool) -> None:
        self._flag(_OPAQUE, value)

    @property
    def metacopy(self) -> bool:
        return bool(self._flags & _METACOPY)

    @metacopy.setter
    def metacopy(self, value: bool) -> None:
        self._flag(_METACOPY, value)

    @property
    def protection(self) -> int | None:
        """FS_APPEND_FL | FS_IMMUTABLE_FL as chattr left them; None until read."""
        flags = self._flags
        if not flags & _PROTECTION_KNOWN:
            return None
        return (_APPEND_FL if flags & _APPEND_ONLY else 0) | (
            _IMMUTABLE_FL if flags & _IMMUTABLE else 0
        )

    @protection.setter
    def protection(self, value: int | None) -> None:
        self._flags &= ~(_PROTECTION_KNOWN | _APPEND_ONLY | _IMMUTABLE)
        if value is not None:
            self._flags |= _PROTECTION_KNOWN
            self._flag(_APPEND_ONLY, bool(value & _APPEND_FL))
            self._flag(_IMMUTABLE, bool(value & _IMMUTABLE_FL))

    @property
    def no_capability(self) -> bool:
        """Whether the upper file is known to have no security.capability:
        found so, or made so, and no xattr set since. The kernel asks before
        every write through passthrough (backing files strip privileges as
        any write does), so the answer is kept, not looked up each time."""
        return bool(self._flags & _NO_CAPABILITY)

    @no_capability.setter
    def no_capability(self, value: bool) -> None:
        self._flag(_NO_CAPABILITY, value)

    @property
    def no_default_acl(self) -> bool:
        """Whether the directory's upper copy is known to have no default
        ACL: every create in it asks, and mostly there is none."""
        return bool(self._flags & _NO_DEFAULT_ACL)

    @no_default_acl.setter
    def no_default_acl(self, value: bool) -> None:
        self._flag(_NO_DEFAULT_ACL, value)

    @property
    def no_setgid(self) -> bool:
        """Whether the directory's upper copy is known to be without the
        set-group-ID bit (whose group a new object would take): every create
        in it asks, and mostly it is not set."""
        return bool(self._flags & _NO_SETGID)

    @no_setgid.setter
    def no_setgid(self, value: bool) -> None:
        self._flag(_NO_SETGID, value)

    def forget_xattrs(self) -> None:
        """An xattr of the upper copy changed: what was known absent may not be."""
        self._flags &= ~(_NO_CAPABILITY | _NO_DEFAULT_ACL | _NO_SETGID)

    @property
    def linked(self) -> bool:
        """A hardlinked lower file whose shared copy is in WORK."""
        return bool(self._flags & _LINKED)

    @linked.setter
    def linked(self, value: bool) -> None:
        self._flag(_LINKED, value)

    @property
    def lower_path(self) -> bytes | None:
        """Directories: the lower path merged in."""
        more = self._more
        return None if more is None else more.lower_path

    @lower_path.setter
    def lower_path(self, value: bytes | None) -> None:
        if value is not None or self._more is not None:
            self._more_state().lower_path = value

    @property
    def version(self) -> int:
        """Moves when the data changes place (copy-up)."""
        more = self._more
        return 0 if more is None else more.version

    @version.setter
    def version(self, value: int) -> None:
        self._more_state().version = value

    @property
    def subdirs(self) -> int | None:
        """Directories: the subdirectory count st_nlink shows, counted by the
        first getattr and kept by every change after, so none lists again."""
        more = self._more
        return None if more is None else more.subdirs

    @subdirs.setter
    def subdirs(self, value: int | None) -> None:
        if value is not None or self._more is not None:
            self._more_state().subdirs = value

    @property
    def partial(self) -> PartialCopy | None:
        """A metacopy being filled chunk by chunk."""
        more = self._more
        return None if more is None else more.partial

    @partial.setter
    def partial(self, value: PartialCopy | None) -> None:
        if value is not None or self._more is not None:
            self._more_state().partial = value

    # Names ------------------------------------------------------------------

    @property
    def _names(self) -> set[tuple[int, bytes]] | None:
        """None: the one name (parent, name); else every name, maybe none left."""
        more = self._more
        return None if more is None else more.names

    def has_name(self, parent: int, name: bytes) -> bool:
        names = self._names
        if names is None:
            return parent == self.parent and name == self.name
        return (parent, name) in names

    def add_name(self, parent: int, name: bytes) -> None:
        names = self._names
        if names is None:
            if parent == self.parent and name == self.name:
                return
            names = self._more_state().names = {(self.parent, self.name)}
        names.add((parent, name))

    def drop_name(self, parent: int, name: bytes) -> None:
        names = self._names
        if names is None:
            if parent == self.parent and name == self.name:
                self._more_state().names = set()
            return
        names.discard((parent, name))

    def move_name(self, old_parent: int, old_name: bytes, parent: int, name: bytes) -> None:
        """Rename: the name (old_parent, old_name) becomes (parent, name), the latest."""
        names = self._names
        if names is not None:
            names.discard((old_parent, old_name))
            names.add((parent, name))
        elif (old_parent, old_name) != (self.parent, self.name):
            self._more_state().names = {(self.parent, self.name), (parent, name)}
        self.parent, self.name = parent, name

    def all_names(self) -> list[tuple[int, bytes]]:
        names = self._names
        if names is None:
            return [(self.parent, self.name)]
        return list(names)


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
    umask: int = 0  # applied to what it creates, unless a default ACL stands in


def count_subdir(directory: Node, change: int) -> None:
    """A change made *change* subdirectories more (or fewer) in *directory*."""
    if directory.subdirs is not None:
        directory.subdirs += change
