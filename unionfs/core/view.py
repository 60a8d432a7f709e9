"""The merged view as a filesystem sees it: inodes, lookups, listings, changes.

Knows nothing of FUSE. The lower layers are answered from the index (serving
their metadata never touches a layer directory); the optional writable layer
is a live directory in overlayfs's upper format (see upper.py) that shadows
them. Keeps the lookup counts the kernel holds: a node lives while the kernel
may still name it, and an inode number is never handed out twice.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

from . import overrides
from .chunks import CHUNKED_MIN, PartialCopy, data_written_unseen
from .index import ROOT_INO, Index, name_hash
from .layer import (
    HIDDEN_XATTR_PREFIXES,
    WHITEOUT_PREFIX,
    is_whiteout_device,
    open_beneath,
    open_layer_root,
)
from .records import Entry, entry_from_stat
from .upper import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    USER_PREFIX,
    LinkCounts,
    UpperStore,
    copy_data,
    copy_link_metadata,
    copy_metadata,
    join,
    redirect_target,
    renameat2,
)

DOT_OFFSET = 1
DOTDOT_OFFSET = 2
UPPER_LAYER = 0  # Entry.layer of everything that lives in the writable layer
_INO_BATCH = 1024


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


class UnionView:
    def __init__(
        self,
        index: Index,
        root: Entry,
        layers: dict[int, str],
        upper: UpperStore | None = None,
        *,
        metacopy: bool = True,
    ) -> None:
        self.index = index
        # Off: every copy-up copies the whole file at once (overlayfs's
        # metacopy=off), for tools that read UPPER directly while it is mounted.
        self.metacopy_allowed = metacopy
        self.layer_paths = layers
        self.layer_fds = {number: open_layer_root(path) for number, path in layers.items()}
        self.store = upper
        # A rootless UPPER (user.overlay.* markers) may hold stat overrides.
        self.rootless = upper is not None and upper.format.prefix == USER_PREFIX
        self.lower_root = root
        top = Node(ROOT_INO, root.mode, ROOT_INO, b"")
        top.lookups = 1  # the kernel never forgets the root
        top.lower = root
        top.lower_path = b""
        top.upper = upper is not None
        self.nodes: dict[int, Node] = {ROOT_INO: top}
        self._next_ino = 0
        self._last_ino = 0

    @property
    def writable(self) -> bool:
        return self.store is not None

    def close(self) -> None:
        for node in self.nodes.values():
            if node.partial is not None:
                node.partial.close()
        for fd in self.layer_fds.values():
            os.close(fd)
        self.layer_fds.clear()
        if self.store is not None:
            self.store.close()
        self.nodes.clear()

    # Inode numbers ----------------------------------------------------------

    def _allocate_ino(self) -> int:
        """A number no inode of this store ever had; reserved in batches."""
        if self._next_ino >= self._last_ino:
            with self.index.write() as txn:
                self._next_ino = self.index.allocate(txn, b"next_ino", _INO_BATCH)
            self._last_ino = self._next_ino + _INO_BATCH
        ino = self._next_ino
        self._next_ino += 1
        return ino

    # Nodes ------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT) from None

    def _directory(self, ino: int) -> Node:
        node = self.node(ino)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return node

    def rel(self, node: Node) -> bytes:
        """The node's path in the merged view (its latest name for a file)."""
        parts: list[bytes] = []
        while node.ino != ROOT_INO:
            parts.append(node.name)
            node = self.nodes[node.parent]
        return b"/".join(reversed(parts))

    def _rel_of(self, parent: Node, name: bytes) -> bytes:
        return join(self.rel(parent), name)

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == ROOT_INO:
            return
        node.lookups -= count
        if node.lookups <= 0 and node.partial is None:  # a partial copy stays until filled
            del self.nodes[ino]

    def remember(self, node: Node) -> None:
        """Count one more kernel reference (lookup, create, readdirplus)."""
        known = self.nodes.setdefault(node.ino, node)
        known.lookups += 1

    def _adopt(self, found: Node, parent: Node, name: bytes) -> Node:
        """The live node for what a lookup *found*: the known one, updated."""
        known = self.nodes.get(found.ino)
        if known is None:
            return found
        if known.is_dir:
            known.parent, known.name = parent.ino, name
        else:
            known.names.add((parent.ino, name))
            if found.upper or not known.upper:
                known.parent, known.name = parent.ino, name
        if found.upper and not known.upper:  # a lower hardlink met its copy
            known.upper, known.metacopy, known.version = True, found.metacopy, known.version + 1
        if known.metacopy and known.lower is None and found.lower is not None:
            known.lower = found.lower
        return known

    # Resolving names --------------------------------------------------------

    def _lower_child(self, parent: Node, name: bytes) -> Entry | None:
        if parent.opaque or parent.lower is None or not parent.lower.is_dir:
            return None
        with self.index.read() as txn:
            return self.index.lookup(txn, parent.lower.listing, name)

    def lower_entry(self, parent: Node, name: bytes) -> Entry | None:
        """What the lower layers hold at NAME in PARENT's place (None: nothing, or hidden)."""
        return self._lower_child(parent, name)

    def _lower_at(self, path: bytes) -> Entry | None:
        with self.index.read() as txn:
            return self.index.lookup_path(txn, self.lower_root, path)

    def _resolve(self, parent: Node, name: bytes) -> Node | None:
        """What NAME in PARENT is, without counting a reference."""
        up_st: os.stat_result | None = None
        if self.store is not None and parent.upper:
            parent_rel = self.rel(parent)
            up_st = self.store.lstat(join(parent_rel, name))
            lower = self._lower_child(parent, name)
            if up_st is None:
                if lower is None or self.store.is_whited_out(parent_rel, name, None):
                    return None
            elif self.store.is_whited_out(parent_rel, name, up_st):
                return None
        else:
            lower = self._lower_child(parent, name)
        if up_st is None:
            if lower is None:
                return None
            return self._lower_node(parent, name, lower)
        return self._upper_node(parent, name, up_st, lower)

    def _lower_node(self, parent: Node, name: bytes, lower: Entry) -> Node:
        node = Node(lower.ino, lower.mode, parent.ino, name)
        node.lower = lower
        if lower.is_dir:
            assert parent.lower_path is not None
            node.lower_path = join(parent.lower_path, name)
        elif self._is_linked(lower.ino):
            # Another name of this file was copied up: all names show that copy.
            node.upper = node.linked = True
        return node

    def _is_linked(self, ino: int) -> bool:
        return self.store is not None and os.path.lexists(self.store.link_path(ino))

    def _upper_node(
        self, parent: Node, name: bytes, st: os.stat_result, lower: Entry | None
    ) -> Node:
        assert self.store is not None
        rel = self._rel_of(parent, name)
        path = self.store.path(rel)
        if stat.S_ISDIR(st.st_mode):
            opaque = self.store.is_opaque(rel)
            redirect = self.store.redirect(rel)
            lower_path: bytes | None = None
            if redirect is not None:
                lower_path = redirect_target(parent.lower_path, redirect)
                lower = self._lower_at(lower_path)
            elif lower is not None and parent.lower_path is not None:
                lower_path = join(parent.lower_path, name)
            if opaque or lower is None or not lower.is_dir:
                lower, lower_path = None, None
            ino = lower.ino if lower is not None else self._upper_ino(path, None)
            node = Node(ino, st.st_mode, parent.ino, name)
            node.lower, node.lower_path, node.opaque = lower, lower_path, opaque
        else:
            mode = st.st_mode
            if self.rootless and stat.S_ISREG(mode):
                # A device a rootless store keeps as a plain file.
                override = overrides.read(path, overrides.USER_STAT_XATTR)
                if override is not None:
                    mode = override.mode
            metacopy = stat.S_ISREG(st.st_mode) and self.store.is_metacopy(rel)
            if metacopy:
                # A metadata-only copy reached by another name (a hardlink)
                # finds its data where its redirect says, as in overlayfs.
                redirect = self.store.redirect(rel)
                if redirect is not None:
                    lower = self._lower_at(redirect_target(parent.lower_path, redirect))
            same_kind = lower is not None and stat.S_IFMT(lower.mode) == stat.S_IFMT(mode)
            ino = self._upper_ino(path, lower.ino if lower is not None and same_kind else None)
            node = Node(ino, mode, parent.ino, name)
            node.linked = self._is_linked(ino)
            if metacopy:
                node.metacopy = True
                node.lower = lower if lower is not None and same_kind else None
                if node.lower is not None:
                    node.partial = self._resume_partial(path, node.lower)
        node.upper = True
        return node

    def _upper_ino(self, path: bytes, copied_from: int | None) -> int:
        """The inode number an upper file carries; one is given if it has none
        (a file overlayfs wrote: the lower file's number when it is a copy)."""
        assert self.store is not None
        ino = self.store.stored_ino(path)
        if ino is None:
            ino = copied_from if copied_from is not None else self._allocate_ino()
            self.store.set_ino(path, ino)
        return ino

    def lookup(self, parent_ino: int, name: bytes) -> Node | None:
        """Resolve NAME in PARENT and count the reference; None if it does not exist."""
        parent = self._directory(parent_ino)
        if name == b".":
            node: Node | None = parent
        elif name == b"..":
            node = self.node(parent.parent)
        else:
            found = self._resolve(parent, name)
            node = None if found is None else self._adopt(found, parent, name)
        if node is not None:
            self.remember(node)
        return node

    def peek(self, parent_ino: int, name: bytes) -> Node | None:
        """Like lookup, without counting: the node an operation is about to change."""
        parent = self._directory(parent_ino)
        found = self._resolve(parent, name)
        return None if found is None else self._adopt(found, parent, name)

    # Attributes -------------------------------------------------------------

    def attributes(self, node: Node) -> Entry:
        if not node.upper:
            assert node.lower is not None
            return node.lower
        assert self.store is not None
        st = os.lstat(self._host(node))
        nlink = st.st_nlink
        if node.linked:
            counts = self.store.link_counts(node.ino)
            nlink = counts.shown if counts is not None and counts.shown else nlink
        if node.is_dir and node.lower is not None:  # merged with a lower directory
            if node.subdirs is None:
                node.subdirs = sum(
                    1
                    for _, _, up_st, lower in self._merged(node, 0)
                    if (
                        stat.S_ISDIR(up_st.st_mode) if up_st else lower is not None and lower.is_dir
                    )
                )
            nlink = 2 + node.subdirs
        entry = entry_from_stat(
            node.ino,
            st,
            UPPER_LAYER,
            nlink=nlink,
            # A metadata-only copy is sparse; its data still takes the lower blocks.
            blocks=node.lower.blocks if node.metacopy and node.lower is not None else None,
            listing=node.lower.listing if node.lower is not None and node.is_dir else 0,
        )
        if self.rootless:
            override = overrides.read(self._host(node), overrides.USER_STAT_XATTR)
            if override is not None:
                entry = override.apply(entry)
        return entry

    def getattr(self, ino: int) -> Entry:
        return self.attributes(self.node(ino))

    def attributes_of_open(self, ino: int, fd: int) -> Entry:
        """Attributes of a file whose every name is gone, from a descriptor
        still open on it: fstat after unlink works, as on any filesystem."""
        entry = entry_from_stat(ino, os.fstat(fd), UPPER_LAYER)
        if self.rootless:
            override = overrides.read(fd, overrides.USER_STAT_XATTR)
            if override is not None:
                entry = override.apply(entry)
        return entry

    def _host(self, node: Node) -> bytes:
        """The path of the node's upper copy."""
        assert self.store is not None and node.upper
        if node.is_dir:
            return self.store.path(self.rel(node))
        if node.linked:
            link = self.store.link_path(node.ino)
            if not os.path.lexists(link):
                raise FsError(errno.ESTALE)  # its last name went; open files keep the data
            return link
        return self.store.path(self._upper_name(node))

    def _upper_name(self, node: Node) -> bytes:
        """A merged path at which UPPER holds this file: one of its live names,
        its latest first (a name it lost may hold another file by now)."""
        assert self.store is not None
        latest = (node.parent, node.name)
        candidates = sorted(node.names, key=lambda item: item != latest)
        for parent_ino, name in candidates:
            parent = self.nodes.get(parent_ino)
            if parent is None:
                node.names.discard((parent_ino, name))
                continue
            rel = self._rel_of(parent, name)
            st = self.store.lstat(rel)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                node.parent, node.name = parent_ino, name
                return rel
        raise FsError(errno.ESTALE)

    # Listings ---------------------------------------------------------------

    def listdir(self, ino: int, offset: int = 0) -> Generator[tuple[int, bytes, Node], None, None]:
        """Yield (offset, name, node) after *offset*, "." and ".." first.

        An offset is the name's hash and its place among equal hashes, so it
        stays valid while the directory changes (telldir/seekdir work).
        """
        directory = self._directory(ino)
        if offset < DOT_OFFSET:
            yield DOT_OFFSET, b".", directory
        if offset < DOTDOT_OFFSET:
            yield DOTDOT_OFFSET, b"..", self.node(directory.parent)
        for here, name, up_st, lower in self._merged(directory, offset):
            if up_st is None:
                assert lower is not None
                found = self._lower_node(directory, name, lower)
            else:
                found = self._upper_node(directory, name, up_st, lower)
            yield here, name, self._adopt(found, directory, name)

    def _merged(
        self, directory: Node, offset: int
    ) -> Generator[tuple[int, bytes, os.stat_result | None, Entry | None], None, None]:
        """The merged entries of a directory in offset order: for each name its
        upper status (None if only the lower layers have it) and lower entry."""
        upper_entries: dict[int, list[tuple[bytes, os.stat_result]]] = {}
        whiteouts: set[bytes] = set()
        if self.store is not None and directory.upper:
            upper_dir = self.store.read_dir(self.rel(directory))
            whiteouts = upper_dir.whiteouts
            for name, st in upper_dir.entries.items():
                upper_entries.setdefault(name_hash(name), []).append((name, st))
        start = offset >> 8
        upper_hashes = sorted(h for h in upper_entries if h >= start)
        with self.index.read() as txn:
            lower_buckets: Iterator[tuple[int, list[tuple[bytes, Entry]]]] = iter(())
            if directory.lower is not None and not directory.opaque:
                lower_buckets = self.index.scan(txn, directory.lower.listing, start)
            for hashed, lowers in _merge_by_hash(lower_buckets, upper_hashes):
                names: dict[bytes, tuple[os.stat_result | None, Entry | None]] = {}
                for name, entry in lowers:
                    if name not in whiteouts:
                        names[name] = (None, entry)
                for name, up in upper_entries.get(hashed, ()):
                    names[name] = (up, names.get(name, (None, None))[1])
                for position, name in enumerate(sorted(names), 1):
                    here = hashed << 8 | position
                    if here <= offset:
                        continue
                    yield here, name, *names[name]

    def _is_empty(self, directory: Node) -> bool:
        for _ in self._merged(directory, 0):
            return False
        return True

    # Contents ---------------------------------------------------------------

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if not stat.S_ISLNK(node.mode):
            raise FsError(errno.EINVAL)
        if node.upper:
            return os.readlink(self._host(node))
        assert node.lower is not None
        return node.lower.target

    def open_lower(self, entry: Entry, *, cached_only: bool = False) -> int:
        """Open the layer file holding a lower entry's data (read-only). Blocking,
        unless *cached_only*: then BlockingIOError where it would wait for the disk."""
        layer_fd = self.layer_fds[entry.layer]
        try:
            fd = open_beneath(layer_fd, entry.path, os.O_RDONLY, cached_only=cached_only)
        except BlockingIOError:
            raise
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO) from exc
        st = os.fstat(fd)
        if st.st_ino != entry.host_ino or st.st_ctime_ns != entry.ctime_ns:
            os.close(fd)
            # Lower layers must not change under a mount; refuse rather than
            # serve data that does not match the indexed attributes.
            raise FsError(errno.ESTALE, f"layer changed under the mount: {entry.path!r}")
        return fd

    def open_cached(self, ino: int) -> int | None:
        """A descriptor to read a lower file's data, if opening it cannot wait
        for the disk (its path is in the dentry cache); else None. Warm walks
        open many files, and a worker thread costs more than such an open."""
        node = self.node(ino)
        if node.upper or node.lower is None or not stat.S_ISREG(node.mode):
            return None
        try:
            return self.open_lower(node.lower, cached_only=True)
        except BlockingIOError:
            return None

    def open_data(self, ino: int, write: bool = False) -> int:
        """A host descriptor for the node's current data. Blocking.

        For writing, the node must be copied up (with its data) first.
        """
        node = self.node(ino)
        if not stat.S_ISREG(node.mode):
            raise FsError(errno.EINVAL)
        if node.partial is not None and not write:
            # A reader outside the mount (diff, commit), maybe while the mount
            # fills this copy: it gets the data as it stands, and writes nothing.
            return _snapshot(node.partial)
        if node.upper and (not node.metacopy or node.partial is not None):
            return os.open(self._host(node), (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
        if write:
            raise FsError(errno.EIO, "write to a file that is not copied up")
        if node.lower is None:
            if node.metacopy:  # metadata-only copy whose lower data is gone
                raise FsError(errno.EIO)
            raise FsError(errno.ENOENT)
        return self.open_lower(node.lower)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        node = self.node(ino)
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            raise FsError(errno.ENODATA)
        if node.upper:
            try:
                return os.getxattr(self._host(node), os.fsdecode(name), follow_symlinks=False)
            except OSError as exc:
                raise FsError(exc.errno or errno.EIO) from None
        assert node.lower is not None
        for key, value in node.lower.xattrs:
            if key == name:
                return value
        raise FsError(errno.ENODATA)

    def listxattr(self, ino: int) -> list[bytes]:
        node = self.node(ino)
        if node.upper:
            names = os.listxattr(self._host(node), follow_symlinks=False)
            return [
                key
                for key in (os.fsencode(name) for name in names)
                if not key.startswith(HIDDEN_XATTR_PREFIXES)
            ]
        assert node.lower is not None
        return [key for key, _ in node.lower.xattrs]

    def statfs_path(self) -> str:
        """The filesystem whose figures statfs reports: UPPER's, else the top layer's."""
        if self.store is not None:
            return os.fsdecode(self.store.root)
        return list(self.layer_paths.values())[-1]  # insertion order: bottom to top

    # Copy-up ----------------------------------------------------------------

    def _writable(self) -> UpperStore:
        if self.store is None:
            raise FsError(errno.EROFS)
        return self.store

    def _copy_up_dir(self, node: Node) -> None:
        """Give a directory (and its parents) a place in UPPER, no contents."""
        store = self._writable()
        if node.upper:
            return
        parent = self.nodes[node.parent]
        self._copy_up_dir(parent)
        lower = node.lower
        assert lower is not None
        existing = store.lstat(self._rel_of(parent, node.name))
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            node.upper = True  # made meanwhile for another name of a hardlinked file
            return
        parent_rel = self.rel(parent)
        with store.times_kept(parent_rel):
            store.place(self._copy_directory(node.ino, lower), parent_rel, node.name)
        node.upper = True

    def _copy_directory(self, ino: int, lower: Entry) -> bytes:
        """A new directory in WORK with the metadata of a lower one, no contents."""
        assert self.store is not None
        temp = self.store.new_directory()
        self.store.set_ino(temp, ino)
        copy_link_metadata(
            temp, uid=lower.uid, gid=lower.gid, atime_ns=lower.atime_ns,
            mtime_ns=lower.mtime_ns, xattrs=lower.xattrs, mode=lower.mode,
        )  # fmt: skip
        return temp

    def _copy_special(self, temp: bytes, ino: int, lower: Entry) -> None:
        """Copy a lower symlink, fifo, socket or device to *temp*."""
        assert self.store is not None
        placeholder = None
        if stat.S_ISLNK(lower.mode):
            os.symlink(lower.target, temp)
        else:
            placeholder = overrides.make_node(temp, lower.mode, lower.rdev)
        self.store.set_ino(temp, ino)
        copy_link_metadata(
            temp, uid=lower.uid, gid=lower.gid, atime_ns=lower.atime_ns,
            mtime_ns=lower.mtime_ns, xattrs=lower.xattrs,
            mode=None if stat.S_ISLNK(lower.mode) else lower.mode,
        )  # fmt: skip
        if placeholder is not None:  # rootless: a file standing for the device
            overrides.write(
                temp, overrides.StatOverride(lower.mode, lower.uid, lower.gid, lower.rdev)
            )

    def _copy_up(self, node: Node, *, data: bool) -> None:
        """Copy a file up; without *data* a regular file becomes a metacopy
        (where metacopies are allowed)."""
        store = self._writable()
        data = data or not self.metacopy_allowed
        if node.is_dir:
            self._copy_up_dir(node)
            return
        if node.upper:
            if data and node.metacopy:
                job = self.prepare_copy(node)
                try:
                    self.fill(job)
                except BaseException:
                    self.abandon_copy(job)
                    raise
                self.finish_copy(job)
            return
        lower = node.lower
        assert lower is not None
        if lower.nlink > 1:
            self._copy_up_group(node)
            return
        parent = self.nodes[node.parent]
        self._copy_up_dir(parent)
        temp = store.temp_path()
        if stat.S_ISREG(lower.mode):
            if data and lower.size:
                self.fill(self.prepare_copy(node, temp))
            else:
                fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
                try:
                    os.ftruncate(fd, lower.size)  # sparse: no data is written
                    if lower.size:
                        store.set_marker(temp, b"metacopy", b"")
                    self._finish_temp(fd, node.ino, lower)
                finally:
                    os.close(fd)
            node.metacopy = bool(lower.size) and not data
        else:
            self._copy_special(temp, node.ino, lower)
        parent_rel = self.rel(parent)
        with store.times_kept(parent_rel):
            store.place(temp, parent_rel, node.name)
        node.upper = True
        node.version += 1

    def _copy_up_group(self, node: Node) -> None:
        """Copy up a hardlinked lower file once, for all its names.

        The copy lives in WORK under its inode number and holds the merged link
        count; every visible name of the file is linked to it in UPPER, so the
        kernel's overlayfs reads the same UPPER alike.
        """
        store = self._writable()
        lower = node.lower
        assert lower is not None
        link = store.link_path(node.ino)
        if not os.path.lexists(link):
            temp = store.temp_path()
            if stat.S_ISREG(lower.mode):
                self.fill(self.prepare_copy(node, temp))
            else:
                self._copy_special(temp, node.ino, lower)
            os.rename(temp, link)
        with self.index.read() as txn:
            aliases = self.index.aliases_of(txn, node.ino)
            if store.link_counts(node.ino) is None:
                # The names the merged view shows: a lower layer may hide some
                # of the layer's links, which st_nlink still counts.
                names = sum(
                    1
                    for path in aliases
                    if (found := self.index.lookup_path(txn, self.lower_root, path)) is not None
                    and found.ino == node.ino
                )
                store.set_link_counts(node.ino, LinkCounts(lower.nlink, max(names, 1)))
        node.upper = node.linked = True
        node.metacopy = False
        node.version += 1
        for path in aliases:
            self._link_alias(node.ino, path)

    def _link_alias(self, ino: int, path: bytes) -> None:
        """Link the shared copy at *path* if the merged view still shows the
        lower file there (same path, nothing above it whited out or replaced)."""
        store = self._writable()
        parts = path.split(b"/")
        directory: Entry = self.lower_root
        rel = b""
        for depth, part in enumerate(parts):
            child = join(rel, part)
            st = store.lstat(child)
            if store.is_whited_out(rel, part, st):
                return
            with self.index.read() as txn:
                entry = self.index.lookup(txn, directory.listing, part)
            if entry is None:
                return
            if depth == len(parts) - 1:
                if st is None and entry.ino == ino:
                    with store.times_kept(rel):
                        os.link(store.link_path(ino), store.path(child))
                return
            if not entry.is_dir:
                return
            if st is None:
                with store.times_kept(rel):
                    store.place(self._copy_directory(entry.ino, entry), rel, part)
                live = self.nodes.get(entry.ino)  # the kernel may know this directory
                if live is not None:
                    live.upper = True
            elif (
                not stat.S_ISDIR(st.st_mode)
                or store.is_opaque(child)
                or store.redirect(child) is not None
            ):
                return
            directory, rel = entry, child

    def _name_in_upper(self, parent: Node, name: bytes, node: Node) -> None:
        """Make sure UPPER holds this name of a copied-up hardlinked file."""
        store = self._writable()
        if node.linked and store.lstat(self._rel_of(parent, name)) is None:
            self._copy_up_dir(parent)
            temp = store.temp_path()
            os.link(store.link_path(node.ino), temp)
            parent_rel = self.rel(parent)
            with store.times_kept(parent_rel):
                store.place(temp, parent_rel, name)

    def _index_group(self, node: Node) -> None:
        """Before a name of a hardlinked lower file goes, copy the file up so
        its other names keep a true link count."""
        if not node.is_dir and not node.upper and node.lower is not None and node.lower.nlink > 1:
            self._copy_up_group(node)

    def _count_link(self, node: Node, change: int) -> None:
        """Count a name more or less of a shared copy; the last name takes it."""
        if not node.linked:
            return
        assert self.store is not None
        counts = self.store.link_counts(node.ino)
        if counts is None:
            return
        names = None if counts.names is None else max(counts.names + change, 0)
        if names == 0:
            self.store.drop_link(node.ino)
            return
        self.store.set_link_counts(node.ino, LinkCounts(max(counts.shown + change, 0), names))

    def _finish_temp(self, fd: int, ino: int, lower: Entry) -> None:
        """Give a new file in WORK its inode number and the metadata of *lower*."""
        assert self.store is not None
        self.store.set_ino_fd(fd, ino)
        copy_metadata(
            fd,
            mode=lower.mode,
            uid=lower.uid,
            gid=lower.gid,
            atime_ns=lower.atime_ns,
            mtime_ns=lower.mtime_ns,
            xattrs=lower.xattrs,
        )

    def start_partial(self, ino: int) -> bool:
        """Make a large lower file writable without copying its data: a
        metadata-only copy whose chunks are copied as writes touch them (and
        by fill, in the background). False where the whole file is copied."""
        store = self._writable()
        node = self.node(ino)
        lower = node.lower
        if (
            node.partial is not None
            or not self.metacopy_allowed
            or lower is None
            or not stat.S_ISREG(node.mode)
            or lower.size < CHUNKED_MIN
            or lower.nlink > 1
            or node.linked
            or (node.upper and not node.metacopy)
        ):
            return node.partial is not None
        self._copy_up(node, data=False)
        raw = PartialCopy.empty_map(lower.size)
        partial = self._partial(lower, self._host(node), raw)
        try:
            store.set_chunk_map(partial.upper_fd, raw)
        except BaseException:
            partial.close()
            raise
        node.partial = partial
        return True

    def _partial(self, lower: Entry, upper_path: bytes, raw: bytes) -> PartialCopy:
        """A partial copy of *lower* into the upper file, from its chunk map."""
        store = self._writable()
        decoded = PartialCopy.decode(raw)
        assert decoded is not None
        chunk, _, present = decoded
        lower_fd = self.open_lower(lower)
        try:
            upper_fd = os.open(upper_path, os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            os.close(lower_fd)
            raise
        return PartialCopy(lower_fd, upper_fd, lower.size, present,
                           lambda value: store.set_chunk_map(upper_fd, value), chunk)  # fmt: skip

    def _resume_partial(self, path: bytes, lower: Entry) -> PartialCopy | None:
        """The chunk map of a metadata-only copy a stopped daemon was filling."""
        if self.store is None:
            return None
        raw = self.store.chunk_map(path)
        if raw is None:
            return None
        decoded = PartialCopy.decode(raw)
        if decoded is None or decoded[1] != lower.size:
            return None
        return self._partial(lower, path, raw)

    def partial(self, ino: int) -> PartialCopy | None:
        node = self.nodes.get(ino)
        return node.partial if node is not None else None

    def complete_partials(self) -> None:
        """Fill every partial copy (at unmount: UPPER then holds whole files)."""
        for node in list(self.nodes.values()):
            if node.partial is None:
                continue
            try:
                self._copy_up(node, data=True)
            except FsError:  # no name left (unlinked while open): nothing to keep
                node.partial.close()
                node.partial = None

    def needs_data_copy(self, ino: int) -> bool:
        """Whether writing to *ino* must first copy data up (a slow step)."""
        node = self.node(ino)
        if not stat.S_ISREG(node.mode) or node.lower is None:
            return False
        if node.lower.nlink > 1 and not node.upper:
            return False  # copied once for all names, by _copy_up_group
        return (not node.upper or node.metacopy) and node.lower.size > 0

    def prepare_copy(self, node: Node, temp: bytes | None = None) -> CopyJob:
        store = self._writable()
        lower = node.lower
        if lower is None:
            # An UPPER (or a layer that was one) whose metadata-only copy lost
            # the lower file it took its data from: nothing to copy (fsck says so).
            raise FsError(
                errno.EIO, f"{os.fsdecode(self.rel(node))}: metadata-only copy whose data is gone"
            )
        if node.upper and node.metacopy:
            fd = os.open(self._host(node), os.O_WRONLY | os.O_CLOEXEC)
            return CopyJob(node.ino, lower, in_place=fd, partial=node.partial)
        return CopyJob(node.ino, lower, temp=temp if temp is not None else store.temp_path())

    def fill(self, job: CopyJob) -> None:
        """Copy the data of a job. Blocking, thread-safe."""
        assert self.store is not None
        if job.partial is not None:
            # Only the chunks it lacks (the partial copy has the lower file open).
            while job.partial.fill_next():
                pass
            os.fdatasync(job.partial.upper_fd if job.in_place is None else job.in_place)
            return
        source = self.open_lower(job.entry)
        try:
            if job.in_place is not None:
                # Until the metacopy mark goes (finish_copy), reads still come
                # from the lower file, so a half-done copy is never seen. The
                # copy looks as the metadata-only copy did.
                with data_written_unseen(job.in_place):
                    copy_data(source, job.in_place, job.entry.size)
                os.fdatasync(job.in_place)
                return
            fd = os.open(job.temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                copy_data(source, fd, job.entry.size)
                self._finish_temp(fd, job.ino, job.entry)
                os.fdatasync(fd)  # as overlayfs: the copy is durable before it is visible
            finally:
                os.close(fd)
        finally:
            os.close(source)

    def abandon_copy(self, job: CopyJob) -> None:
        """Release what a copy that failed half-way holds."""
        if job.in_place is not None:
            os.close(job.in_place)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(job.temp)

    def finish_copy(self, job: CopyJob) -> None:
        """Make a filled copy the file's data (on the request thread, after fill)."""
        store = self._writable()
        node = self.nodes.get(job.ino)
        if job.in_place is not None:
            os.close(job.in_place)
            if job.partial is not None and (
                node is None or node.partial is not job.partial or not job.partial.complete
            ):
                return  # dropped (truncated, or the name is gone) before it was filled
            if node is not None and node.metacopy:
                self._drop_metacopy(node)
            return
        if node is None or node.upper or (node.parent, node.name) not in node.names:
            os.unlink(job.temp)  # someone else finished first, or the name is gone
            return
        parent = self.nodes[node.parent]
        self._copy_up_dir(parent)
        parent_rel = self.rel(parent)
        with store.times_kept(parent_rel):
            store.place(job.temp, parent_rel, node.name)
        node.upper = True
        node.metacopy = False
        node.version += 1

    # Changes ----------------------------------------------------------------

    def _new_object(
        self,
        parent: Node,
        name: bytes,
        caller: Caller,
        make: Callable[[bytes], int | None],
        mode: int,
        rdev: int = 0,
    ) -> tuple[Node, int | None]:
        """Create NAME in PARENT: built complete in WORK, then moved in place."""
        store = self._writable()
        if name in (b".", b"..") or name.startswith(WHITEOUT_PREFIX):
            raise FsError(errno.EINVAL if name.startswith(WHITEOUT_PREFIX) else errno.EEXIST)
        if self._resolve(parent, name) is not None:
            raise FsError(errno.EEXIST)
        self._copy_up_dir(parent)
        parent_rel = self.rel(parent)
        parent_st = os.lstat(store.path(parent_rel))
        gid = caller.gid
        if parent_st.st_mode & stat.S_ISGID:
            gid = parent_st.st_gid  # BSD group semantics of a setgid directory
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        temp = store.temp_path()
        fd = make(temp)
        ino = self._allocate_ino()
        try:
            store.set_ino(temp, ino)
            placeholder = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            placeholder = placeholder and stat.S_ISREG(os.lstat(temp).st_mode)
            if placeholder:  # rootless: a plain file stands for the device
                overrides.write(temp, overrides.StatOverride(mode, caller.uid, gid, rdev))
            else:
                overrides.set_owner(temp, mode, caller.uid, gid)
            if not stat.S_ISLNK(mode):
                os.chmod(temp, stat.S_IMODE(mode))
            lower = self._lower_child(parent, name)
            if stat.S_ISDIR(mode) and lower is not None:
                store.set_marker(temp, b"opaque", b"y")  # the old lower dir stays hidden
            store.place(temp, parent_rel, name)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        _count_subdir(parent, +1 if stat.S_ISDIR(mode) else 0)
        shown = mode if placeholder else os.lstat(store.path(join(parent_rel, name))).st_mode
        node = Node(ino, shown, parent.ino, name)
        node.upper = True
        node.opaque = stat.S_ISDIR(mode) and lower is not None
        if stat.S_ISDIR(mode):
            node.lower_path = None
        self.remember(node)
        return node, fd

    def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[Node, int]:
        parent = self._directory(parent_ino)

        def make(temp: bytes) -> int:
            return os.open(temp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)

        node, fd = self._new_object(parent, name, caller, make, stat.S_IFREG | (mode & 0o7777))
        assert fd is not None
        return node, fd

    def mkdir(self, parent_ino: int, name: bytes, mode: int, caller: Caller) -> Node:
        parent = self._directory(parent_ino)

        def make(temp: bytes) -> None:
            os.mkdir(temp, 0o700)

        return self._new_object(parent, name, caller, make, stat.S_IFDIR | (mode & 0o7777))[0]

    def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Node:
        parent = self._directory(parent_ino)

        def make(temp: bytes) -> None:
            overrides.make_node(temp, (mode & ~0o7777) | 0o600, rdev)

        return self._new_object(parent, name, caller, make, mode, rdev)[0]

    def symlink(self, parent_ino: int, name: bytes, target: bytes, caller: Caller) -> Node:
        parent = self._directory(parent_ino)

        def make(temp: bytes) -> None:
            os.symlink(target, temp)

        return self._new_object(parent, name, caller, make, stat.S_IFLNK | 0o777)[0]

    def link(self, ino: int, parent_ino: int, name: bytes) -> Node:
        store = self._writable()
        node = self.node(ino)
        parent = self._directory(parent_ino)
        if node.is_dir:
            raise FsError(errno.EPERM)
        if self._resolve(parent, name) is not None:
            raise FsError(errno.EEXIST)
        if node.partial is not None:
            self._copy_up(node, data=True)  # a second name needs whole data
        self._copy_up(node, data=False)
        if node.metacopy:
            self._pin_lower_data(node)
        self._copy_up_dir(parent)
        temp = store.temp_path()
        # Counted first: a crash in between leaves one name too many, which
        # keeps a shared copy, never one too few, which would drop it.
        self._count_link(node, +1)
        try:
            os.link(self._host(node), temp)
            store.place(temp, self.rel(parent), name)
        except BaseException:
            self._count_link(node, -1)
            raise
        node.names.add((parent.ino, name))
        self.remember(node)
        return node

    def _pin_lower_data(self, node: Node) -> None:
        """Record where a metadata-only copy's data lives, as an absolute
        redirect (overlayfs does the same before it links one): the new name's
        directory need not lead to that lower file."""
        assert self.store is not None and node.lower is not None
        host = self._host(node)
        if self.store.redirect_of(host) is not None:
            return
        parent = self.nodes.get(node.parent)
        lower_path = None
        if parent is not None and parent.lower_path is not None:
            lower_path = join(parent.lower_path, node.name)
        found = self._lower_at(lower_path) if lower_path is not None else None
        if lower_path is None or found is None or found.ino != node.lower.ino:
            # No path names the data: copy it, so nothing depends on a path.
            self._copy_up(node, data=True)
            return
        self.store.set_marker(host, b"redirect", b"/" + lower_path)

    def unlink(self, parent_ino: int, name: bytes) -> None:
        parent = self._directory(parent_ino)
        node = self.peek(parent_ino, name)
        if node is None:
            raise FsError(errno.ENOENT)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        self._index_group(node)
        self._remove(parent, name, node)
        self._count_link(node, -1)

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        parent = self._directory(parent_ino)
        node = self.peek(parent_ino, name)
        if node is None:
            raise FsError(errno.ENOENT)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if not self._is_empty(node):
            raise FsError(errno.ENOTEMPTY)
        self._remove(parent, name, node)

    def _remove(self, parent: Node, name: bytes, node: Node) -> None:
        store = self._writable()
        self._copy_up_dir(parent)
        parent_rel = self.rel(parent)
        hides_lower = self._lower_child(parent, name) is not None
        upper_here = store.lstat(join(parent_rel, name)) is not None
        if hides_lower:
            store.make_whiteout(parent_rel, name)
        elif upper_here:
            store.remove(parent_rel, name)
        _count_subdir(parent, -1 if node.is_dir else 0)
        node.names.discard((parent.ino, name))

    def rename(
        self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes, flags: int
    ) -> None:
        store = self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FsError(errno.EINVAL)
        old_parent = self._directory(old_parent_ino)
        new_parent = self._directory(new_parent_ino)
        node = self.peek(old_parent_ino, old_name)
        if node is None:
            raise FsError(errno.ENOENT)
        target = self.peek(new_parent_ino, new_name)
        if target is node:
            if (old_parent.ino, old_name) == (new_parent.ino, new_name):
                return
            if not node.is_dir:  # two names of one file: POSIX says do nothing
                return
        if new_name.startswith(WHITEOUT_PREFIX):
            raise FsError(errno.EINVAL)
        if flags & RENAME_NOREPLACE and target is not None:
            raise FsError(errno.EEXIST)
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise FsError(errno.ENOENT)
            self._exchange(old_parent, old_name, node, new_parent, new_name, target)
            return
        if target is not None:
            if node.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR)
            if not node.is_dir and target.is_dir:
                raise FsError(errno.EISDIR)
            if target.is_dir and not self._is_empty(target):
                raise FsError(errno.ENOTEMPTY)
        self._prepare_move(node)
        self._name_in_upper(old_parent, old_name, node)
        if target is not None and target is not node:
            self._index_group(target)
        self._copy_up_dir(new_parent)
        old_rel = self._rel_of(old_parent, old_name)
        new_parent_rel = self.rel(new_parent)
        new_rel = join(new_parent_rel, new_name)
        new_lower = self._lower_child(new_parent, new_name)
        self._fit_at(node, new_lower, store.path(old_rel))
        if target is not None and store.lstat(new_rel) is not None and target.is_dir:
            store.remove(new_parent_rel, new_name)  # empty, or whiteouts only
        leaves_lower = self._lower_child(old_parent, old_name) is not None
        dest = store.lstat(new_rel)
        if node.is_dir and dest is not None and is_whiteout_device(dest):
            # A directory cannot replace a device by rename: swap them, and the
            # whiteout lands where the directory was, which is where one is due.
            renameat2(store.path(old_rel), store.path(new_rel), RENAME_EXCHANGE)
            if not leaves_lower:
                os.unlink(store.path(old_rel))
        elif leaves_lower and store.format.device_whiteouts:
            renameat2(store.path(old_rel), store.path(new_rel), RENAME_WHITEOUT)
        else:
            os.rename(store.path(old_rel), store.path(new_rel))
            if leaves_lower:
                store.make_whiteout(self.rel(old_parent), old_name)
        store.remove_marker(new_parent_rel, new_name)
        if node.is_dir or (target is not None and target.is_dir):
            store.forget_directories()
        _count_subdir(old_parent, -node.is_dir)
        _count_subdir(new_parent, node.is_dir - (target is not None and target.is_dir))
        if target is not None and target is not node:
            target.names.discard((new_parent.ino, new_name))
            self._count_link(target, -1)
        self._moved(node, old_parent, old_name, new_parent, new_name)

    def _prepare_move(self, node: Node) -> None:
        """Copy up what moves: a directory alone (redirect), a file with data."""
        if node.is_dir:
            self._copy_up_dir(node)
        else:
            self._copy_up(node, data=True)

    def _fit_at(self, node: Node, new_lower: Entry | None, host: bytes) -> None:
        """Mark a moving directory so the right lower contents show at its new place."""
        assert self.store is not None
        if not node.is_dir:
            return
        if node.lower is not None and node.lower_path is not None:
            self.store.set_marker(host, b"redirect", b"/" + node.lower_path)
        elif new_lower is not None and not node.opaque:
            self.store.set_marker(host, b"opaque", b"y")
            node.opaque = True

    def _moved(
        self, node: Node, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes
    ) -> None:
        node.names.discard((old_parent.ino, old_name))
        node.names.add((new_parent.ino, new_name))
        node.parent, node.name = new_parent.ino, new_name

    def _exchange(
        self,
        old_parent: Node,
        old_name: bytes,
        node: Node,
        new_parent: Node,
        new_name: bytes,
        target: Node,
    ) -> None:
        store = self._writable()
        self._prepare_move(node)
        self._prepare_move(target)
        self._name_in_upper(old_parent, old_name, node)
        self._name_in_upper(new_parent, new_name, target)
        old_rel = self._rel_of(old_parent, old_name)
        new_rel = self._rel_of(new_parent, new_name)
        self._fit_at(node, self._lower_child(new_parent, new_name), store.path(old_rel))
        self._fit_at(target, self._lower_child(old_parent, old_name), store.path(new_rel))
        renameat2(store.path(old_rel), store.path(new_rel), RENAME_EXCHANGE)
        if node.is_dir or target.is_dir:
            store.forget_directories()
        _count_subdir(old_parent, target.is_dir - node.is_dir)
        _count_subdir(new_parent, node.is_dir - target.is_dir)
        self._moved(node, old_parent, old_name, new_parent, new_name)
        self._moved(target, new_parent, new_name, old_parent, old_name)

    def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        fd: int | None = None,
    ) -> Entry:
        node = self.node(ino)
        if size is not None:
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if not stat.S_ISREG(node.mode):
                raise FsError(errno.EINVAL)
            if size == 0 and (not node.upper or node.metacopy):
                self._copy_up(node, data=False)  # nothing to keep: no data moves
                self._drop_metacopy(node)
            else:
                self._copy_up(node, data=True)
        else:
            self._copy_up(node, data=False)
        try:
            path: bytes | int = self._host(node)
        except FsError as exc:
            if exc.errno != errno.ESTALE or fd is None:
                raise
            path = fd  # unlinked while open: change it through the descriptor
        if uid is not None or gid is not None:
            shown = self.attributes(node)
            overrides.set_owner(
                path,
                shown.mode,
                shown.uid if uid is None else uid,
                shown.gid if gid is None else gid,
                shown.rdev,
            )
        if mode is not None and not stat.S_ISLNK(node.mode):
            os.chmod(path, stat.S_IMODE(mode))
            if self.rootless:
                overrides.update_mode(path, stat.S_IMODE(mode))
        if size is not None:
            if fd is not None:
                os.ftruncate(fd, size)
            else:
                os.truncate(path, size)
        if atime_ns is not None or mtime_ns is not None:
            st = os.stat(path) if isinstance(path, int) else os.lstat(path)
            times = (
                st.st_atime_ns if atime_ns is None else atime_ns,
                st.st_mtime_ns if mtime_ns is None else mtime_ns,
            )
            if isinstance(path, int):
                os.utime(path, ns=times)
            else:
                os.utime(path, ns=times, follow_symlinks=False)
        if isinstance(path, int):
            return self.attributes_of_open(ino, path)
        return self.attributes(node)

    def _drop_metacopy(self, node: Node) -> None:
        if node.metacopy:
            assert self.store is not None
            host = self._host(node)
            if node.partial is not None:
                node.partial.close()
                node.partial = None
                self.store.clear_markers(host, (self.store.chunks_xattr,))
            self.store.clear_markers(host, self.store.metacopy_xattrs)
            self.store.clear_markers(host, self.store.redirect_xattrs)
            node.metacopy = False
            node.version += 1

    def open_for_write(self, ino: int, truncate: bool) -> int:
        """A descriptor to write the node's upper copy (data already copied up)."""
        node = self.node(ino)
        if truncate and (not node.upper or node.metacopy):
            self._copy_up(node, data=False)
            self._drop_metacopy(node)
            os.truncate(self._host(node), 0)
        elif node.partial is None:
            self._copy_up(node, data=True)
        fd = self.open_data(ino, write=True)
        if truncate:
            os.ftruncate(fd, 0)
        return fd

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        node = self.node(ino)
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            raise FsError(errno.EPERM)  # as overlayfs: its own xattrs are not the user's
        self._copy_up(node, data=False)
        os.setxattr(self._host(node), os.fsdecode(name), value, follow_symlinks=False)

    def removexattr(self, ino: int, name: bytes) -> None:
        node = self.node(ino)
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            raise FsError(errno.ENODATA)
        if not node.upper:
            self.getxattr(ino, name)  # ENODATA before anything is copied
        self._copy_up(node, data=False)
        os.removexattr(self._host(node), os.fsdecode(name), follow_symlinks=False)


# Helpers --------------------------------------------------------------------


def _merge_by_hash(
    lower: Iterator[tuple[int, list[tuple[bytes, Entry]]]], upper_hashes: list[int]
) -> Generator[tuple[int, list[tuple[bytes, Entry]]], None, None]:
    """Walk lower buckets and upper hashes together in hash order."""
    position = 0
    for hashed, group in lower:
        while position < len(upper_hashes) and upper_hashes[position] < hashed:
            yield upper_hashes[position], []
            position += 1
        if position < len(upper_hashes) and upper_hashes[position] == hashed:
            position += 1
        yield hashed, group
    for hashed in upper_hashes[position:]:
        yield hashed, []


def _snapshot(partial: PartialCopy) -> int:
    """A private copy of a partial copy's data, chunk by chunk (an unlinked file)."""
    fd = os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        while True:
            data = partial.read(offset, partial.chunk)
            if data is None:
                raise FsError(errno.EIO, "the partial copy was dropped while read")
            if not data:
                break
            os.pwrite(fd, data, offset)
            offset += len(data)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _count_subdir(directory: Node, change: int) -> None:
    """A change made *change* subdirectories more (or fewer) in *directory*."""
    if directory.subdirs is not None:
        directory.subdirs += change
