"""The merged view's read path: inode numbers, resolving names, attributes,
listings and contents. Knows nothing of FUSE.

The lower layers are answered from the index (serving their metadata never
touches a layer directory); the optional writable layer is a live directory
in overlayfs's upper format (see upper.py) that shadows them. Keeps the
lookup counts the kernel holds: a node lives while the kernel may still name
it, and an inode number is never handed out twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Generator, Iterator, Mapping
from typing import Protocol, cast

from . import overrides
from .acl import DEFAULT as DEFAULT_ACL_NAME
from .chunks import PartialCopy
from .data import CAPABILITY_XATTR
from .index import ROOT_INO, Index, InodeBatches, name_hash
from .layer import HIDDEN_XATTR_PREFIXES, is_whiteout_device, open_layer_root
from .nodes import FsError, Node
from .openahead import OpenAhead
from .paths import open_beneath
from .records import Entry, entry_from_stat
from .streaming import UNKNOWN, StreamedLayers
from .upper import (
    USER_PREFIX,
    Beneath,
    UpperStore,
    join,
    redirect_target,
)

DOT_OFFSET = 1
# How many lower entries of nodes that do not keep theirs stay at hand (Node.find_lower).
LOWER_ENTRIES_KEPT = 8192
# How many upper files met by a lookup stay known by their host inode number.
UPPER_HOSTS_KEPT = 65536
# How many upper directories stay open (O_PATH) to find names in them.
UPPER_DIRS_KEPT = 128
DOTDOT_OFFSET = 2
# The offset of a listing's last entry: resuming there is the end, known
# without reading the directory again (the kernel asks once more after the
# last entry, and a merged directory's UPPER would be scanned for nothing).
# Names added since may go unseen there, as POSIX allows after opendir.
END_OFFSET = (1 << 63) - 1
UPPER_LAYER = 0  # Entry.layer of everything that lives in the writable layer
CAPABILITY_NAME = CAPABILITY_XATTR.encode()


class LazyData(Protocol):
    """A lower layer whose files' data arrives after the mount (lazy pulling):
    laid out with every file at its size, filled in place, never changed after."""

    def needs(self, path: bytes) -> bool: ...

    def ensure(self, path: bytes) -> None:
        """Bring the data of the layer file at *path* into place (blocking);
        OSError where it cannot."""


class ReadPath:
    """What the merged view shows: nodes, names, attributes, listings, data."""

    def __init__(
        self,
        index: Index,
        root: Entry,
        layers: dict[int, str],
        upper: UpperStore | None = None,
        *,
        metacopy: bool = True,
        lazy: Mapping[str, LazyData] | None = None,
        streaming: StreamedLayers | None = None,
    ) -> None:
        self.index = index
        # Layers still arriving as streams: lookups are answered from what has
        # arrived until switch_to_index puts the whole stack in the index.
        self.streaming = streaming
        if streaming is not None:
            root = streaming.root
        # Layers (by number) whose data comes on demand; *lazy* is by layer path.
        by_path = {os.path.realpath(path): data for path, data in (lazy or {}).items()}
        self.lazy = {
            number: by_path[os.path.realpath(path)]
            for number, path in layers.items()
            if os.path.realpath(path) in by_path
        }
        # Off: every copy-up copies the whole file at once (overlayfs's
        # metacopy=off), for tools that read UPPER directly while it is mounted.
        self.metacopy_allowed = metacopy
        self.layer_paths = layers
        self.layer_fds = {number: open_layer_root(path) for number, path in layers.items()}
        self.open_ahead = OpenAhead(index, self.layer_fds, self.lazy.__contains__)
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
        self._inodes = InodeBatches(index)
        # The lower entries of files only in the lower layers are not kept in
        # their nodes (most nodes are such files); the last ones used are
        # kept here, and the rest found again in the index by name.
        self._lower_entries: OrderedDict[int, Entry] = OrderedDict()
        self._find_lower = self._lower_of_slim  # one bound method for every node
        # Upper files by host inode number -> the node each was resolved to.
        # A name resolved again (a lookup after the kernel dropped its entry,
        # the peeks of a rename or unlink) whose lstat finds the same file at
        # a name of that node is answered by the node, which this view keeps
        # up to date, without reading the file's markers and number again.
        self._upper_hosts: OrderedDict[int, int] = OrderedDict()
        # Directory node -> an O_PATH descriptor of its upper directory, the
        # last ones used: a name is looked up in it with one component to
        # walk, not the whole host path. A descriptor follows its directory
        # through renames, so it stays the node's own until the node goes.
        # Used and closed on the request thread only.
        self._upper_dirs: OrderedDict[int, int] = OrderedDict()
        # Inodes whose last name went (unlink, rmdir, rename over) while the
        # kernel still holds them, as an open descriptor does: their last
        # attributes, with st_nlink 0, until forgotten. Their old place may hold
        # another file now, so nothing else is done to them (ENOENT).
        self._gone: dict[int, Entry] = {}
        # The name a hardlinked file was last looked up by: the name a change
        # to it comes by (the kernel looks such a name up at every walk).
        self.last_named: dict[int, tuple[int, bytes]] = {}
        # O_TMPFILE files not linked yet (also in _gone: they have no name).
        self._tmpfiles: set[int] = set()
        # Upper files open by no name the view knows: hard links that lost
        # every name the kernel knows while names it never looked up keep
        # them, and O_TMPFILE files not named yet. An O_PATH descriptor, taken
        # while it could be, answers for their attributes and stands for them
        # in changes and opens through /proc until the kernel forgets them.
        self._anchors: dict[int, int] = {}
        # Told the number of a node the kernel holds whose last name just went
        # (the adapter drops what it keeps for the file: a passthrough id).
        self.last_name_gone: Callable[[int], None] | None = None
        # Whether a file is open (the adapter knows its handles): one whose
        # last name goes then keeps an anchor, for changes through the
        # descriptor (fchown, fsetxattr) and opens through /proc.
        self.held_open: Callable[[int], bool] | None = None

    @property
    def writable(self) -> bool:
        return self.store is not None

    def _writable(self) -> UpperStore:
        if self.store is None:
            raise FsError(errno.EROFS)
        return self.store

    def close(self) -> None:
        self.open_ahead.close()
        for node in self.nodes.values():
            if node.partial is not None:
                node.partial.close()
        for fd in self.layer_fds.values():
            os.close(fd)
        self.layer_fds.clear()
        for fd in (*self._upper_dirs.values(), *self._anchors.values()):
            os.close(fd)
        self._upper_dirs.clear()
        self._anchors.clear()
        if self.store is not None:
            self.store.close()
        self.nodes.clear()

    # Inode numbers ----------------------------------------------------------

    def _allocate_ino(self) -> int:
        """A number no inode of this store ever had."""
        return self._inodes.allocate()

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
        if self._gone and node.ino in self._gone:
            raise FsError(errno.ENOENT)  # its old place may hold another file now
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
            self._gone.pop(ino, None)
            self.last_named.pop(ino, None)
            self._tmpfiles.discard(ino)
            for fd in (self._upper_dirs.pop(ino, None), self._anchors.pop(ino, None)):
                if fd is not None:
                    os.close(fd)

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
            known.add_name(parent.ino, name)
            if found.upper or not known.upper:
                known.parent, known.name = parent.ino, name
        if found.upper and not known.upper:  # a lower hardlink met its copy
            known.keep_lower()
            known.upper, known.metacopy, known.version = True, found.metacopy, known.version + 1
        if known.metacopy and known.lower is None and found.lower is not None:
            known.lower = found.lower
        return known

    # Resolving names --------------------------------------------------------

    def _lower_child(self, parent: Node, name: bytes) -> Entry | None:
        if parent.opaque or parent.lower is None or not parent.lower.is_dir:
            return None
        if self.streaming is not None:
            assert parent.lower_path is not None
            found = self.streaming.child(parent.lower_path, name)
            assert found is not UNKNOWN  # child waits until it is known
            return cast(Entry | None, found)
        with self.index.read() as txn:
            return self.index.lookup(txn, parent.lower.listing, name)

    def lower_entry(self, parent: Node, name: bytes) -> Entry | None:
        """What the lower layers hold at NAME in PARENT's place (None: nothing, or hidden)."""
        return self._lower_child(parent, name)

    def _lower_at(self, path: bytes) -> Entry | None:
        if self.streaming is not None:
            return self.streaming.at(path)
        with self.index.read() as txn:
            return self.index.lookup_path(txn, self.lower_root, path)

    def _resolve(self, parent: Node, name: bytes) -> Node | None:
        """What NAME in PARENT is, without counting a reference."""
        return self._resolve_stat(parent, name)[0]

    def _resolve_stat(self, parent: Node, name: bytes) -> tuple[Node | None, os.stat_result | None]:
        """_resolve, and the lstat of NAME in UPPER if UPPER has it."""
        up_st: os.stat_result | None = None
        if self.store is not None and parent.upper:
            directory = self._upper_dir(parent)
            up_st = self.store.lstat_in(directory, name)
            if up_st is not None:
                if is_whiteout_device(up_st):
                    return None, None
                known = self._known_upper(parent, name, up_st)
                if known is not None:
                    return known, up_st
            lower = self._lower_child(parent, name)
            if up_st is None and (lower is None or self.store.has_marker_in(directory, name)):
                return None, None
        else:
            lower = self._lower_child(parent, name)
        if up_st is None:
            if lower is None:
                return None, None
            return self._lower_node(parent, name, lower), None
        node = self._upper_node(parent, name, up_st, lower)
        self.note_upper_host(up_st, node.ino)
        return node, up_st

    def _upper_dir(self, directory: Node) -> int:
        """An O_PATH descriptor of the upper copy of *directory* (see
        _upper_dirs); ENOENT once its last name went."""
        assert self.store is not None
        if self._gone and directory.ino in self._gone:
            raise FsError(errno.ENOENT)  # (its descriptor would find nothing, as rel)
        dirs = self._upper_dirs
        fd = dirs.get(directory.ino)
        if fd is not None:
            dirs.move_to_end(directory.ino)
            return fd
        rel = self.rel(directory)
        try:
            fd = self.store.open_directory(rel)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not dirs:
                raise
            while dirs:  # descriptors run short: open files come first
                os.close(dirs.popitem()[1])
            fd = self.store.open_directory(rel)
        dirs[directory.ino] = fd
        if len(dirs) > UPPER_DIRS_KEPT:
            os.close(dirs.popitem(last=False)[1])
        return fd

    def note_upper_host(self, st: os.stat_result, ino: int) -> None:
        """Node *ino* is the upper file *st* (see _known_upper)."""
        hosts = self._upper_hosts
        hosts[st.st_ino] = ino
        hosts.move_to_end(st.st_ino)
        if len(hosts) > UPPER_HOSTS_KEPT:
            hosts.popitem(last=False)

    def _known_upper(self, parent: Node, name: bytes, st: os.stat_result) -> Node | None:
        """The live node NAME in PARENT already is, if the upper file *st*
        found there is the one it was resolved to; else None (resolve it).
        A host inode number may be reused, but not while the node keeps this
        name: each change of UPPER through this view updates the node's names."""
        if self.streaming is not None:
            return None  # a name's lower entry may still be arriving
        ino = self._upper_hosts.get(st.st_ino)
        node = None if ino is None else self.nodes.get(ino)
        if node is None or not node.upper or not node.has_name(parent.ino, name):
            return None
        if stat.S_IFMT(node.mode) != stat.S_IFMT(st.st_mode) and not (
            self.rootless and stat.S_ISREG(st.st_mode)  # a device kept as a plain file
        ):
            return None
        return node

    def _lower_node(self, parent: Node, name: bytes, lower: Entry) -> Node:
        node = Node(lower.ino, lower.mode, parent.ino, name)
        node.lower = lower
        if lower.is_dir:
            assert parent.lower_path is not None
            node.lower_path = join(parent.lower_path, name)
        elif self._is_linked(lower.ino):
            # Another name of this file was copied up: all names show that copy.
            node.upper = node.linked = True
        elif self.streaming is None:
            node.find_lower_by(self._find_lower)
            self._keep_lower_entry(lower)
        return node

    def _keep_lower_entry(self, entry: Entry) -> None:
        entries = self._lower_entries
        if len(entries) >= LOWER_ENTRIES_KEPT:
            entries.popitem(last=False)  # the oldest, in constant time
        entries[entry.ino] = entry

    def _lower_of_slim(self, node: Node) -> Entry:
        """The lower entry of a node that does not keep it: the file its name
        finds in the lower layers (the node keeps its entry before it moves)."""
        entry = self._lower_entries.get(node.ino)
        if entry is not None:
            return entry
        parent = self.nodes.get(node.parent)
        found = self._lower_child(parent, node.name) if parent is not None else None
        if found is None or found.ino != node.ino:
            raise FsError(errno.ESTALE, f"inode {node.ino}: its lower entry is gone from its place")
        self._keep_lower_entry(found)
        return found

    def _is_linked(self, ino: int) -> bool:
        return self.store is not None and self.store.has_link(ino)

    def _upper_node(
        self, parent: Node, name: bytes, st: os.stat_result, lower: Entry | None
    ) -> Node:
        assert self.store is not None
        rel = self._rel_of(parent, name)
        path = self.store.path(rel)
        marks = self.store.marks(path)
        if stat.S_ISDIR(st.st_mode):
            opaque = self.store.is_opaque(rel, marks)
            redirect = self.store.redirect_of(path, marks)
            lower_path: bytes | None = None
            if redirect is not None:
                lower_path = redirect_target(parent.lower_path, redirect)
                lower = self._lower_at(lower_path)
            elif lower is not None and parent.lower_path is not None:
                lower_path = join(parent.lower_path, name)
            if opaque or lower is None or not lower.is_dir:
                lower, lower_path = None, None
            ino = lower.ino if lower is not None else self._upper_ino(path, None, marks)
            node = Node(ino, st.st_mode, parent.ino, name)
            node.lower, node.lower_path, node.opaque = lower, lower_path, opaque
        else:
            mode = st.st_mode
            if self.rootless and stat.S_ISREG(mode):
                # A device a rootless store keeps as a plain file.
                override = overrides.read(path, overrides.USER_STAT_XATTR)
                if override is not None:
                    mode = override.mode
            metacopy = stat.S_ISREG(st.st_mode) and self.store.is_metacopy(rel, marks)
            if metacopy:
                # A metadata-only copy reached by another name (a hardlink)
                # finds its data where its redirect says, as in overlayfs.
                redirect = self.store.redirect_of(path, marks)
                if redirect is not None:
                    lower = self._lower_at(redirect_target(parent.lower_path, redirect))
            same_kind = lower is not None and stat.S_IFMT(lower.mode) == stat.S_IFMT(mode)
            ino = self._upper_ino(
                path, lower.ino if lower is not None and same_kind else None, marks
            )
            node = Node(ino, mode, parent.ino, name)
            node.linked = self._is_linked(ino)
            if metacopy:
                node.metacopy = True
                node.lower = lower if lower is not None and same_kind else None
                if node.lower is not None:
                    node.partial = self._resume_partial(rel, node.lower, marks)
        node.upper = True
        return node

    def _upper_ino(
        self, path: bytes, copied_from: int | None, marks: Container[bytes] | None = None
    ) -> int:
        """The inode number an upper file carries; one is given if it has none
        (a file overlayfs wrote: the lower file's number when it is a copy).
        *marks*: the file's overlay xattrs, if known (UpperStore.marks)."""
        assert self.store is not None
        ino = self.store.stored_ino(path, marks)
        if ino is None:
            ino = copied_from if copied_from is not None else self._allocate_ino()
            self.store.set_ino(path, ino)
        return ino

    def _partial(self, lower: Entry, place: Beneath, raw: bytes) -> PartialCopy:
        """A partial copy of *lower* into the upper file, from its chunk map."""
        store = self._writable()
        decoded = PartialCopy.decode(raw)
        assert decoded is not None
        chunk, _, present = decoded
        lower_fd = self.open_lower(lower)
        try:
            upper_fd = store.open_beneath(place, os.O_RDWR)
        except BaseException:
            os.close(lower_fd)
            raise
        return PartialCopy(lower_fd, upper_fd, lower.size, present,
                           lambda value: store.set_chunk_map(upper_fd, value), chunk)  # fmt: skip

    def _resume_partial(
        self, rel: bytes, lower: Entry, marks: Container[bytes] | None = None
    ) -> PartialCopy | None:
        """The chunk map of a metadata-only copy a stopped daemon was filling."""
        if self.store is None:
            return None
        raw = self.store.chunk_map(self.store.path(rel), marks)
        if raw is None:
            return None
        decoded = PartialCopy.decode(raw)
        if decoded is None or decoded[1] != lower.size:
            return None
        return self._partial(lower, Beneath(False, rel), raw)

    # Streamed layers -------------------------------------------------------

    def lookup_ready(self, parent_ino: int, name: bytes) -> bool:
        """Whether a lookup of NAME in PARENT can be answered without waiting
        for streamed layers (wait_lookup waits, in a worker thread)."""
        streaming = self.streaming
        if streaming is None:
            return True
        parent = self.nodes.get(parent_ino)
        if parent is None or name in (b".", b".."):
            return True
        if parent.opaque or parent.lower is None or parent.lower_path is None:
            return True
        return streaming.child(parent.lower_path, name, wait=False) is not UNKNOWN

    def wait_lookup(self, parent_ino: int, name: bytes) -> None:
        """Block until streamed layers can answer a lookup (a worker thread:
        it touches no node, only the streams' shared state)."""
        streaming = self.streaming
        parent = self.nodes.get(parent_ino)
        if streaming is not None and parent is not None and parent.lower_path is not None:
            streaming.wait_child(parent.lower_path, name)

    def listing_ready(self, ino: int) -> bool:
        """Whether listing directory *ino* needs no wait for streamed layers."""
        streaming = self.streaming
        if streaming is None:
            return True
        node = self.nodes.get(ino)
        if node is None or node.lower is None or node.opaque or node.lower_path is None:
            return True
        return streaming.listing(node.lower_path, wait=False) is not UNKNOWN

    def wait_listing(self, ino: int) -> None:
        """Block until streamed layers can answer a listing (a worker thread)."""
        streaming = self.streaming
        node = self.nodes.get(ino)
        if streaming is not None and node is not None and node.lower_path is not None:
            streaming.wait_listing(node.lower_path)

    def switch_to_index(self, root: Entry, layers: dict[int, str]) -> None:
        """Every streamed layer is in the index now: serve from it. The nodes
        the kernel knows keep their numbers (the merge kept them)."""
        self.streaming = None
        self.lower_root = root
        self.layer_paths = layers
        with self.index.read() as txn:
            for node in list(self.nodes.values()):
                if node.lower is None:
                    continue
                if node.ino == ROOT_INO:
                    node.lower = root
                    node.mode = root.mode
                    continue
                if node.is_dir:
                    path = node.lower_path
                else:
                    parent = self.nodes.get(node.parent)
                    if parent is None or parent.lower_path is None:
                        continue
                    path = join(parent.lower_path, node.name)
                found = None if path is None else self.index.lookup_path(txn, root, path)
                if found is not None and found.ino == node.ino:
                    node.lower = found

    def lookup(self, parent_ino: int, name: bytes) -> Node | None:
        """Resolve NAME in PARENT and count the reference; None if it does not exist."""
        found = self._lookup_stat(parent_ino, name)
        return None if found is None else found[0]

    def lookup_with_attributes(self, parent_ino: int, name: bytes) -> tuple[Node, Entry] | None:
        """lookup, and the node's attributes from the lstat that resolved an
        upper NAME: a lookup answers with one lstat of it, not two."""
        found = self._lookup_stat(parent_ino, name)
        if found is None:
            return None
        node, up_st = found
        return node, self.attributes(node, up_st)

    def _lookup_stat(
        self, parent_ino: int, name: bytes
    ) -> tuple[Node, os.stat_result | None] | None:
        """The counted node, and the lstat of its upper file if the lookup took one."""
        parent = self._directory(parent_ino)
        up_st = None
        if name == b".":
            node: Node | None = parent
        elif name == b"..":
            node = self.node(parent.parent)
        else:
            found, up_st = self._resolve_stat(parent, name)
            node = None if found is None else self._adopt(found, parent, name)
        if node is None:
            return None
        self.remember(node)
        if node.linked or (not node.is_dir and node.lower is not None and node.lower.nlink > 1):
            self.last_named[node.ino] = (parent.ino, name)
        return node, up_st if node.upper else None

    def peek(self, parent_ino: int, name: bytes) -> Node | None:
        """Like lookup, without counting: the node an operation is about to change."""
        parent = self._directory(parent_ino)
        found = self._resolve(parent, name)
        return None if found is None else self._adopt(found, parent, name)

    # Attributes -------------------------------------------------------------

    def attributes(self, node: Node, st: os.stat_result | None = None) -> Entry:
        """The node's attributes; *st*: an lstat of its upper file just taken."""
        if not node.upper:
            assert node.lower is not None
            if self.streaming is not None and not node.is_dir:
                self._refresh_streamed(node)
            entry = self._lower_blocks(node.lower)
            if self.streaming is not None and node.is_dir and self._count_subdirs(node):
                assert node.subdirs is not None
                entry = entry._replace(nlink=2 + node.subdirs)
            return entry
        assert self.store is not None
        if st is None:
            st = self._upper_stat(node)
        nlink = st.st_nlink
        if node.linked:
            counts = self.store.link_counts(node.ino)
            nlink = counts.shown if counts is not None and counts.shown else nlink
        if node.is_dir and node.lower is not None and self._count_subdirs(node):
            assert node.subdirs is not None  # merged with a lower directory
            nlink = 2 + node.subdirs
        entry = entry_from_stat(
            node.ino,
            st,
            UPPER_LAYER,
            nlink=nlink,
            # A metadata-only copy is sparse; its data still takes the lower blocks.
            blocks=self._lower_blocks(node.lower).blocks
            if node.metacopy and node.lower is not None
            else None,
            listing=node.lower.listing if node.lower is not None and node.is_dir else 0,
        )
        if self.rootless:
            override = overrides.read(self._host(node), overrides.USER_STAT_XATTR)
            if override is not None:
                entry = override.apply(entry)
        return entry

    def _refresh_streamed(self, node: Node) -> None:
        """A file of a streamed layer as it stands now: a hardlink that came
        after its lookup counts in its st_nlink."""
        assert self.streaming is not None
        parent = self.nodes.get(node.parent)
        if parent is None or parent.lower_path is None or parent.opaque:
            return
        found = self.streaming.child(parent.lower_path, node.name, wait=False)
        if isinstance(found, Entry) and found.ino == node.ino:
            node.lower = found

    def _count_subdirs(self, directory: Node) -> bool:
        """Count a merged directory's subdirectories once (False: not yet
        known, as while streamed layers may still bring some)."""
        if directory.subdirs is None:
            if self.streaming is not None and not self.listing_ready(directory.ino):
                return False
            if self.streaming is None and self.store is not None and directory.upper:
                directory.subdirs = self._merged_subdirs(directory)
                return True
            with contextlib.closing(self._merged(directory, 0)) as merged:
                directory.subdirs = sum(
                    1
                    for _, _, upper, lower in merged
                    if (
                        upper.is_dir(follow_symlinks=False)
                        if upper is not None
                        else lower is not None and lower.is_dir
                    )
                )
        return True

    def getattr(self, ino: int) -> Entry:
        """The node's attributes; ESTALE once its last name went (an open
        descriptor may know better: `last_attributes` is the fallback)."""
        if ino in self._gone:
            raise FsError(errno.ESTALE, f"inode {ino}: every name of it went")
        return self.attributes(self.node(ino))

    def last_attributes(self, ino: int) -> Entry | None:
        """What an inode whose last name went shows: as it was, with no link."""
        return self._gone.get(ino)

    def _removing(self, node: Node) -> Entry | None:
        """The attributes a node will show once the name about to go is gone,
        if it is its last and the kernel holds the node (else None). The
        names the kernel looked up are not all a file has: a hard link's
        other names count too, by the link count it shows."""
        if self.nodes.get(node.ino) is not node or len(node.all_names()) > 1:
            return None
        try:
            shown = self.attributes(node)
        except (FsError, OSError):
            return None  # nothing to show: the removal itself must not fail for it
        if not node.is_dir and shown.nlink > 1:
            self._anchor(node)
            return None
        if not node.is_dir and self.held_open is not None and self.held_open(node.ino):
            self._anchor(node)
        return shown._replace(nlink=0)

    def _anchor(self, node: Node) -> None:
        """Keep an upper file found by the one name the kernel knows, which
        is about to go, while its other names or an open descriptor keep
        it: _upper_stat, reopen_anchored."""
        if not node.upper or node.linked or node.ino in self._anchors:
            return  # a shared copy in WORK is found by its number
        assert self.store is not None
        with contextlib.suppress(FsError, OSError):
            self._anchors[node.ino] = self.store.open_beneath(self._upper_place(node), os.O_PATH)

    def _removed(self, node: Node, last: Entry | None) -> None:
        if last is not None and not node.all_names():
            self._gone[node.ino] = last._replace(ctime_ns=time.time_ns())
            if self.last_name_gone is not None:
                self.last_name_gone(node.ino)

    def _merged_subdirs(self, directory: Node) -> int:
        """The subdirectories of a directory UPPER holds: its lower listing's
        count (the index keeps it, as the lower directory's st_nlink), then
        each name UPPER has or whites out, looked up below. UPPER holds what
        changed, mostly far fewer names than the layers: `find` over a tree
        a package install touched listed each such directory in full twice,
        once for its link count and once for itself."""
        assert self.store is not None
        below = directory.lower
        if below is None or not below.is_dir or directory.opaque:
            below = None
        count = 0 if below is None else below.nlink - 2
        with self.store.scan_dir(self.rel(directory)) as upper_dir, self.index.read() as txn:

            def lower_dir(name: bytes) -> bool:
                found = None if below is None else self.index.lookup(txn, below.listing, name)
                return found is not None and found.is_dir

            for name in upper_dir.whiteouts:
                count -= lower_dir(name)
            for name, item in upper_dir.entries.items():
                count += item.is_dir(follow_symlinks=False) - lower_dir(name)
        return count

    def _lower_blocks(self, entry: Entry) -> Entry:
        """A lazily pulled file was indexed sparse, before its data came: it
        shows the blocks its data takes once here, as a pulled file would."""
        if entry.blocks or not entry.size or entry.layer not in self.lazy:
            return entry
        return entry._replace(blocks=-(-entry.size // 4096) * 8)

    def attributes_of_open(self, ino: int, fd: int) -> Entry:
        """Attributes of a file whose every name is gone, from a descriptor
        still open on it: fstat after unlink works, as on any filesystem."""
        entry = entry_from_stat(ino, os.fstat(fd), UPPER_LAYER)
        if self.rootless:
            override = overrides.read(fd, overrides.USER_STAT_XATTR)
            if override is not None:
                entry = override.apply(entry)
        return entry

    def _upper_place(self, node: Node) -> Beneath:
        """Where UPPER (or WORK, for a shared copy) holds the node's file."""
        return self._upper_place_stat(node)[0]

    def _upper_place_stat(self, node: Node) -> tuple[Beneath, os.stat_result | None]:
        """_upper_place, and the lstat that confirmed a file's name there
        (None for a directory or a shared copy, found without one)."""
        assert self.store is not None and node.upper
        if node.linked:
            if not self.store.has_link(node.ino):
                raise FsError(errno.ESTALE)  # its last name went; open files keep the data
            return self.store.link_place(node.ino), None
        if node.is_dir:
            return Beneath(False, self.rel(node)), None
        rel, st = self._upper_name_stat(node)
        return Beneath(False, rel), st

    def _open_upper(self, node: Node, flags: int) -> int:
        assert self.store is not None
        return self.store.open_beneath(self._upper_place(node), flags)

    def _host(self, node: Node) -> bytes:
        """The path of the node's upper copy (for calls on the request thread)."""
        assert self.store is not None
        return self.store.host_path(self._upper_place(node))

    def _held_anchor(self, node: Node, stale: FsError) -> int:
        """The anchor of an upper file open by no name (_anchors), which its
        place could not be found for (*stale*); *stale* for any other file."""
        anchor = self._anchors.get(node.ino)
        if stale.errno != errno.ESTALE or anchor is None or node.all_names():
            raise stale
        return anchor

    def reopen_anchored(self, node: Node, flags: int, stale: FsError) -> int:
        """A descriptor of an upper file open by no name, reopened from its
        anchor with *flags*, for changes made through an open descriptor
        (fchown, fsetxattr): _held_anchor."""
        return reopen(self._held_anchor(node, stale), flags)

    @contextlib.contextmanager
    def upper_target(self, node: Node) -> Iterator[bytes | int]:
        """Where a call by path reaches the node's upper file: its host path,
        or a descriptor reopened from its anchor (reopen_anchored). Calls
        take follow_symlinks=follows(target)."""
        try:
            path = self._host(node)
        except FsError as exc:
            # (yielded outside the except clause: see unionfs.native)
            fd = self.reopen_anchored(node, os.O_RDONLY, exc)
        else:
            yield path
            return
        try:
            yield fd
        finally:
            os.close(fd)

    def _upper_stat(self, node: Node) -> os.stat_result:
        """An lstat of the node's upper file: for a file found by one of its
        names, the lstat that found it (one system call, not two)."""
        assert self.store is not None
        if node.is_dir:
            return os.stat(self._upper_dir(node))  # fstat of its O_PATH descriptor
        if node.linked:
            return os.lstat(self._host(node))
        anchor = self._anchors.get(node.ino)
        if anchor is not None and not node.all_names():
            return os.fstat(anchor)
        return self._upper_name_stat(node)[1]

    def _upper_name(self, node: Node) -> bytes:
        """A merged path at which UPPER holds this file: one of its live names,
        its latest first (a name it lost may hold another file by now)."""
        return self._upper_name_stat(node)[0]

    def _upper_name_stat(self, node: Node) -> tuple[bytes, os.stat_result]:
        """_upper_name, and the lstat of the file there that confirmed it."""
        assert self.store is not None
        candidates = node.all_names()
        if len(candidates) > 1:
            latest = (node.parent, node.name)
            candidates.sort(key=lambda item: item != latest)
        for parent_ino, name in candidates:
            parent = self.nodes.get(parent_ino)
            if parent is None:
                node.drop_name(parent_ino, name)
                continue
            rel = self._rel_of(parent, name)
            st = self.store.lstat_in(self._upper_dir(parent), name)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                node.parent, node.name = parent_ino, name
                return rel, st
        raise FsError(errno.ESTALE)

    # Listings ---------------------------------------------------------------

    def listdir(self, ino: int, offset: int = 0) -> Generator[tuple[int, bytes, Node], None, None]:
        """Yield (offset, name, node) after *offset*, "." and ".." first.

        An offset is the name's hash and its place among equal hashes, so it
        stays valid while the directory changes (telldir/seekdir work).
        """
        with contextlib.closing(self._listing(ino, offset)) as listing:
            for here, name, node, _ in listing:
                yield here, name, node

    def listdir_with_attributes(
        self, ino: int, offset: int = 0
    ) -> Generator[tuple[int, bytes, Node, Entry], None, None]:
        """listdir, each node with its attributes (readdirplus); an upper
        entry's come from the stat the listing of UPPER took."""
        with contextlib.closing(self._listing(ino, offset)) as listing:
            for here, name, node, up_st in listing:
                yield here, name, node, self.attributes(node, up_st)

    def _listing(
        self, ino: int, offset: int
    ) -> Generator[tuple[int, bytes, Node, os.stat_result | None], None, None]:
        """The entries after *offset*, the last one at END_OFFSET."""
        directory = self._directory(ino)
        if offset == END_OFFSET:
            return
        if offset == 0 and self.streaming is None:
            self.open_ahead.listed(directory)
        last = None
        with contextlib.closing(self._entries(directory, offset)) as entries:
            for entry in entries:
                if last is not None:
                    yield last
                last = entry
        if last is not None:
            yield (END_OFFSET, *last[1:])

    def _entries(
        self, directory: Node, offset: int
    ) -> Generator[tuple[int, bytes, Node, os.stat_result | None], None, None]:
        if offset < DOT_OFFSET:
            yield DOT_OFFSET, b".", directory, None
        if offset < DOTDOT_OFFSET:
            yield DOTDOT_OFFSET, b"..", self.node(directory.parent), None
        with contextlib.closing(self._merged(directory, offset)) as merged:
            for here, name, upper, lower in merged:
                up_st: os.stat_result | None = None
                if upper is None:
                    assert lower is not None
                    found = self._lower_node(directory, name, lower)
                else:
                    up_st = upper.stat(follow_symlinks=False)
                    known = self._known_upper(directory, name, up_st)
                    if known is not None:
                        found = known
                    else:
                        found = self._upper_node(directory, name, up_st, lower)
                        self.note_upper_host(up_st, found.ino)
                node = self._adopt(found, directory, name)
                yield here, name, node, up_st if found.upper and node.upper else None

    def _merged(
        self, directory: Node, offset: int
    ) -> Generator[tuple[int, bytes, os.DirEntry[str] | None, Entry | None], None, None]:
        """The merged entries of a directory in offset order: for each name its
        upper entry (None if only the lower layers have it) and lower entry.
        An upper entry is lstat'ed only if asked: a listing read in several
        requests takes the stats of what each request returns, not of all."""
        with contextlib.ExitStack() as scans:
            upper_entries: dict[int, list[tuple[bytes, os.DirEntry[str]]]] = {}
            whiteouts: set[bytes] = set()
            if self.store is not None and directory.upper:
                upper_dir = scans.enter_context(self.store.scan_dir(self.rel(directory)))
                whiteouts = upper_dir.whiteouts
                for name, item in upper_dir.entries.items():
                    upper_entries.setdefault(name_hash(name), []).append((name, item))
            yield from self._merge_with_lower(directory, offset, upper_entries, whiteouts)

    def _merge_with_lower(
        self,
        directory: Node,
        offset: int,
        upper_entries: dict[int, list[tuple[bytes, os.DirEntry[str]]]],
        whiteouts: set[bytes],
    ) -> Generator[tuple[int, bytes, os.DirEntry[str] | None, Entry | None], None, None]:
        start = offset >> 8
        upper_hashes = sorted(h for h in upper_entries if h >= start)
        with self.index.read() as txn:
            lower_buckets: Iterator[tuple[int, list[tuple[bytes, Entry]]]] = iter(())
            if directory.lower is not None and not directory.opaque:
                if self.streaming is not None:
                    # Waits (blocking) until no layer still to come can change
                    # it; the FUSE adapter waits first, in a worker thread.
                    assert directory.lower_path is not None
                    listing = self.streaming.listing(directory.lower_path)
                    assert isinstance(listing, list)  # listing waits until it is known
                    lower_buckets = iter([item for item in listing if item[0] >= start])
                else:
                    lower_buckets = self.index.scan(txn, directory.lower.listing, start)
            for hashed, lowers in _merge_by_hash(lower_buckets, upper_hashes):
                names: dict[bytes, tuple[os.DirEntry[str] | None, Entry | None]] = {}
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
        with contextlib.closing(self._merged(directory, 0)) as merged:
            return next(merged, None) is None

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
        lazy = self.lazy.get(entry.layer)
        if lazy is not None and lazy.needs(entry.path):
            if cached_only:
                raise BlockingIOError(errno.EWOULDBLOCK, "data still to be fetched")
            try:
                lazy.ensure(entry.path)
            except OSError as exc:
                raise FsError(exc.errno or errno.EIO) from exc
        try:
            fd = open_beneath(layer_fd, entry.path, os.O_RDONLY, cached_only=cached_only)
        except BlockingIOError:
            raise
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO) from exc
        st = os.fstat(fd)
        # A lazy layer's files change once, when their data is filled in place;
        # a streamed one's ctime moves when a later hardlink names them.
        moved = lazy is None and self.streaming is None and st.st_ctime_ns != entry.ctime_ns
        if st.st_ino != entry.host_ino or moved:
            os.close(fd)
            # Lower layers must not change under a mount; refuse rather than
            # serve data that does not match the indexed attributes.
            raise FsError(errno.ESTALE, f"layer changed under the mount: {entry.path!r}")
        return fd

    def lower_data_missing(self, ino: int) -> Entry | None:
        """The lower entry of a file whose data is still to be fetched (lazy
        pulling), for ensure_lower_data; None if there is none. Does not block."""
        node = self.nodes.get(ino)
        if not self.lazy or node is None or node.upper or not stat.S_ISREG(node.mode):
            return None
        lower = node.lower
        if lower is None:
            return None
        lazy = self.lazy.get(lower.layer)
        return lower if lazy is not None and lazy.needs(lower.path) else None

    def ensure_lower_data(self, entry: Entry) -> None:
        """Bring a lazily pulled lower file's data into place before a copy-up
        needs it (blocking: call it in a worker thread)."""
        lazy = self.lazy.get(entry.layer)
        if lazy is not None and lazy.needs(entry.path):
            try:
                lazy.ensure(entry.path)
            except OSError as exc:
                raise FsError(exc.errno or errno.EIO) from exc

    def lower_data_is_fixed(self, node: Node) -> bool:
        """Whether the node's data is a lower file that can be opened at any
        later time just as now: no copy of it in UPPER, no layer that fills
        it in (lazy pulling) or still streams in."""
        if node.upper or not stat.S_ISREG(node.mode) or self.streaming is not None:
            return False
        lower = node.lower
        return lower is not None and lower.layer not in self.lazy

    def open_cached(self, ino: int) -> int | None:
        """A descriptor to read a file's data, if opening it cannot wait for
        the disk (its path is in the dentry cache); else None. Warm walks and
        builds open many files, and a worker thread costs more than such an open."""
        node = self.node(ino)
        if not stat.S_ISREG(node.mode) or node.partial is not None:
            return None
        try:
            if node.upper and not node.metacopy:
                assert self.store is not None
                try:
                    place = self._upper_place(node)
                except FsError:
                    return None  # no name: open_source knows where (or says why not)
                return self.store.open_beneath(place, os.O_RDONLY, cached_only=True)
            if node.lower is None:
                return None
            return self.open_lower(node.lower, cached_only=True)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO) from exc

    def opened_lower(self, ino: int, *, cold: bool) -> None:
        """A file was opened for its data (*cold*: the open waited for the
        disk); if the lower layers hold it, the files after it in its
        directory are warmed ahead (openahead.py)."""
        node = self.nodes.get(ino)
        if node is None or node.upper or self.streaming is not None or not stat.S_ISREG(node.mode):
            return
        self.open_ahead.opened(self.nodes.get(node.parent), node, cold)

    def open_data(self, ino: int, write: bool = False) -> int:
        """A host descriptor for the node's current data. Blocking.

        For writing, the node must be copied up (with its data) first.
        """
        return self.open_source(self.data_source(ino, write))

    def data_source(self, ino: int, write: bool = False) -> DataSource:
        """Where the node's data is opened from, decided now (on the request
        thread): a worker thread then opens exactly that (open_source)."""
        node = self.node(ino)
        if not stat.S_ISREG(node.mode):
            raise FsError(errno.EINVAL)
        if node.partial is not None and not write:
            # A reader outside the mount (diff, commit), maybe while the mount
            # fills this copy: it gets the data as it stands, and writes nothing.
            return DataSource(partial=node.partial)
        if node.upper and (not node.metacopy or node.partial is not None):
            try:
                place, st = self._upper_place_stat(node)
            except FsError as exc:
                anchor = self._held_anchor(node, exc)  # open by no name: reopened from it
                st = os.fstat(anchor)
                return DataSource(anchor=anchor, write=write, upper_file=(st.st_dev, st.st_ino))
            found = (st.st_dev, st.st_ino) if st is not None else None
            return DataSource(upper=place, write=write, upper_file=found)
        if write:
            raise FsError(errno.EIO, "write to a file that is not copied up")
        lower = node.lower
        if lower is None:
            if node.metacopy:  # metadata-only copy whose lower data is gone
                raise FsError(errno.EIO)
            raise FsError(errno.ENOENT)
        return DataSource(lower=lower)

    def made_source(self, node: Node, st: os.stat_result) -> DataSource:
        """data_source of a file this request has just made (*st*: an fstat
        of it): nothing has run since, so its one name is where it was made."""
        return DataSource(upper=Beneath(False, self.rel(node)), write=True,
                          upper_file=(st.st_dev, st.st_ino))  # fmt: skip

    def access_place(self, ino: int) -> tuple[Beneath, os.stat_result | None] | None:
        """Where the container layer holds a file or directory whose access
        counts for its atime (core/atime.py), and the lstat that found a
        file there (None for a directory or a shared copy); None for one
        only lower layers hold, whose atime stays as it is."""
        node = self.node(ino)
        if self.store is None or not node.upper or not (node.is_dir or stat.S_ISREG(node.mode)):
            return None
        try:
            return self._upper_place_stat(node)
        except FsError:  # unlinked, or its last name gone: no file to update
            return None

    def open_source(self, source: DataSource) -> int:
        """Open what data_source decided. Blocking; safe in a worker thread:
        it reads no node, and UPPER is opened beneath its root by descriptor."""
        if source.partial is not None:
            return _snapshot(source.partial)
        if source.upper is not None:
            assert self.store is not None
            return self.store.open_beneath(source.upper, os.O_RDWR if source.write else os.O_RDONLY)
        if source.anchor is not None:
            return source.reopen()
        assert source.lower is not None
        return self.open_lower(source.lower)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.find_xattr(ino, name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def find_xattr(self, ino: int, name: bytes) -> bytes | None:
        """getxattr, None where the file has no such attribute: the kernel
        asks for security.capability before writes, and mostly there is none."""
        node = self.node(ino)
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            return None
        if node.upper:
            capability = name == CAPABILITY_NAME
            default_acl = name == DEFAULT_ACL_NAME
            if (capability and node.no_capability) or (default_acl and node.no_default_acl):
                return None
            try:
                with self.upper_target(node) as target:
                    return os.getxattr(target, os.fsdecode(name), follow_symlinks=follows(target))
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    if capability:
                        node.no_capability = True
                    elif default_acl:
                        node.no_default_acl = True
                    return None
                raise FsError(exc.errno or errno.EIO) from None
        assert node.lower is not None
        for key, value in node.lower.xattrs:
            if key == name:
                return value
        return None

    def listxattr(self, ino: int) -> list[bytes]:
        node = self.node(ino)
        if node.upper:
            with self.upper_target(node) as target:
                names = os.listxattr(target, follow_symlinks=follows(target))
            return [
                key
                for key in (os.fsencode(name) for name in names)
                if not key.startswith(HIDDEN_XATTR_PREFIXES)
            ]
        assert node.lower is not None
        return [key for key, _ in node.lower.xattrs]

    def statfs_path(self) -> str | int:
        """The filesystem whose figures statfs reports: UPPER's, else the top
        layer's (by descriptor: a layer streaming in moves when it is whole)."""
        if self.store is not None:
            return os.fsdecode(self.store.root)
        top = list(self.layer_paths)[-1]  # insertion order: bottom to top
        return self.layer_fds.get(top, self.layer_paths[top])


@dataclasses.dataclass(frozen=True, slots=True)
class DataSource:
    """Where to open a node's data: its upper file, its lower entry, or the
    partial copy in progress (a snapshot of it)."""

    upper: Beneath | None = None
    lower: Entry | None = None
    partial: PartialCopy | None = None
    write: bool = False
    # The upper file's (device, inode), where the lstat that found it just now
    # gave them: whoever registers it for passthrough needs no second one.
    upper_file: tuple[int, int] | None = None
    # An upper file open by a name it lost, whose other names the kernel never
    # looked up: the O_PATH descriptor that holds it (ReadPath._anchor). It
    # stays open while a request on the inode runs: the kernel forgets no
    # inode it is opening.
    anchor: int | None = None

    def reopen(self) -> int:
        """A descriptor of the anchored file, for reading (and writing)."""
        assert self.anchor is not None
        return reopen(self.anchor, os.O_RDWR if self.write else os.O_RDONLY)


def reopen(fd: int, flags: int) -> int:
    """The file open as *fd* opened again with *flags*, through its /proc
    link (which reaches a file with no name, as an O_PATH descriptor does)."""
    return os.open(b"/proc/self/fd/%d" % fd, flags | os.O_CLOEXEC)


def follows(target: bytes | int) -> bool:
    """follow_symlinks for a call on upper_target's *target*: never a link
    in UPPER itself; a descriptor takes only the default."""
    return isinstance(target, int)


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
