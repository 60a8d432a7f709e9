"""The merged view as a filesystem sees it: inodes, lookups, listings, data.

Knows nothing of FUSE. Keeps the lookup counts the kernel holds (a node lives
while the kernel may still name it) and answers from the index, so serving
metadata never touches a layer directory.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Generator

from .index import ROOT_INO, Index
from .layer import open_beneath, open_layer_root
from .records import Entry

DOT_OFFSET = 1
DOTDOT_OFFSET = 2


class FsError(Exception):
    """A filesystem operation failed with *errno*."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message or os.strerror(code))
        self.errno = code


class Node:
    """An inode the kernel knows, with the number of lookups it holds."""

    __slots__ = ("entry", "lookups", "parent")

    def __init__(self, entry: Entry, parent: int) -> None:
        self.entry = entry
        self.lookups = 0
        self.parent = parent


class MergedView:
    def __init__(self, index: Index, root: Entry, layers: dict[int, str]) -> None:
        self.index = index
        self.layer_paths = layers
        self.layer_fds = {number: open_layer_root(path) for number, path in layers.items()}
        self.nodes: dict[int, Node] = {ROOT_INO: Node(root, ROOT_INO)}
        self.nodes[ROOT_INO].lookups = 1  # the kernel never forgets the root

    def close(self) -> None:
        for fd in self.layer_fds.values():
            os.close(fd)
        self.layer_fds.clear()
        self.nodes.clear()

    # Inodes ---------------------------------------------------------------

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT) from None

    def entry(self, ino: int) -> Entry:
        return self.node(ino).entry

    def _directory(self, ino: int) -> Entry:
        entry = self.node(ino).entry
        if not entry.is_dir:
            raise FsError(errno.ENOTDIR)
        return entry

    def remember(self, entry: Entry, parent: int) -> None:
        """Count one more kernel reference to *entry* (lookup, readdirplus)."""
        node = self.nodes.get(entry.ino)
        if node is None:
            node = self.nodes[entry.ino] = Node(entry, parent)
        node.lookups += 1

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == ROOT_INO:
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self.nodes[ino]

    def lookup(self, parent: int, name: bytes) -> Entry | None:
        """Resolve *name* in directory *parent*; None when it does not exist."""
        directory = self._directory(parent)
        if name == b".":
            entry: Entry | None = directory
        elif name == b"..":
            entry = self.entry(self.node(parent).parent)
        else:
            with self.index.read() as txn:
                entry = self.index.lookup(txn, directory.listing, name)
        if entry is not None:
            self.remember(entry, parent)
        return entry

    # Listings -------------------------------------------------------------

    def listdir(self, ino: int, offset: int = 0) -> Generator[tuple[int, bytes, Entry], None, None]:
        """Yield (offset, name, entry) after *offset*, "." and ".." first.

        An offset is the entry's name hash and its place among equal hashes,
        so it stays valid while the directory changes (telldir/seekdir work).
        """
        directory = self._directory(ino)
        if offset < DOT_OFFSET:
            yield DOT_OFFSET, b".", directory
        if offset < DOTDOT_OFFSET:
            yield DOTDOT_OFFSET, b"..", self.entry(self.node(ino).parent)
        with self.index.read() as txn:
            for hashed, group in self.index.scan(txn, directory.listing, offset >> 8):
                for position, (name, entry) in enumerate(group, 1):
                    here = hashed << 8 | position
                    if here > offset:
                        yield here, name, entry

    # Contents -------------------------------------------------------------

    def readlink(self, ino: int) -> bytes:
        entry = self.entry(ino)
        if not stat.S_ISLNK(entry.mode):
            raise FsError(errno.EINVAL)
        return entry.target

    def open_data(self, ino: int) -> int:
        """Open the layer file holding the data of *ino* (read-only). Blocking."""
        entry = self.entry(ino)
        if not stat.S_ISREG(entry.mode):
            raise FsError(errno.EINVAL)
        try:
            fd = open_beneath(self.layer_fds[entry.layer], entry.path, os.O_RDONLY)
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO) from exc
        st = os.fstat(fd)
        if st.st_ino != entry.host_ino or st.st_ctime_ns != entry.ctime_ns:
            os.close(fd)
            # Lower layers must not change under a mount; refuse rather than
            # serve data that does not match the indexed attributes.
            raise FsError(errno.ESTALE, f"layer changed under the mount: {entry.path!r}")
        return fd

    def getxattr(self, ino: int, name: bytes) -> bytes:
        for key, value in self.entry(ino).xattrs:
            if key == name:
                return value
        raise FsError(errno.ENODATA)

    def listxattr(self, ino: int) -> list[bytes]:
        return [key for key, _ in self.entry(ino).xattrs]

    def statfs_path(self) -> str:
        """The filesystem whose figures statfs reports: the top layer's."""
        return list(self.layer_paths.values())[-1]  # insertion order: bottom to top
