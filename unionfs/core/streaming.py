"""Lower layers that arrive as a stream while the view is mounted.

A plain (gzip, zstd, uncompressed) layer names its files only as its tar
stream passes them, so the index cannot hold it until it has arrived whole.
Until then the view answers lookups from what each streamed layer has
unpacked so far (a StreamTree per layer) over the indexed layers below them.
An answer is given only once nothing still to come can change it: a name the
topmost unfinished layer does not hold yet may still arrive, so such a lookup
waits until that layer's stream has passed the name's place (tars are written
in path order, which each tree watches) or has ended; a listing waits until
the stream has passed the whole directory.

Every entry gets its inode number when it arrives; `presets` hands those
numbers to the final merge, so the indexed view that replaces this one shows
the same inodes the kernel already knows.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator

from .index import ROOT_INO, Index, InodeBatches, name_hash
from .layer import OPAQUE_MARKER, WHITEOUT_PREFIX, read_xattrs
from .merge import Presets, layer_entry
from .nodes import FsError
from .paths import PATH_MAX, fd_path, open_directory
from .records import Entry, entry_from_stat
from .upper import join

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _host_path(root: bytes, rel: bytes) -> Iterator[bytes]:
    """A path to *rel* under *root* that system calls take, at any depth."""
    path = os.path.join(root, rel)
    if len(path) < PATH_MAX:
        yield path
        return
    head, name = _parent(rel)
    fd = open_directory(root, head)
    try:
        yield fd_path(fd, name)
    finally:
        os.close(fd)


class _Unknown:
    """The answer of a lookup that what is still to arrive may change."""


UNKNOWN = _Unknown()


def _parent(path: bytes) -> tuple[bytes, bytes]:
    head, _, tail = path.rpartition(b"/")
    return head, tail


def _prefixes(path: bytes) -> list[bytes]:
    parts = path.split(b"/") if path else []
    return [b"/".join(parts[: depth + 1]) for depth in range(len(parts))]


def _above(dir_path: bytes) -> list[bytes]:
    """The places of the entries that decide whether *dir_path* shows what the
    layers below hold: each directory on the way (a layer's root is never
    opaque), its opaque marker and its whiteout."""
    places = []
    for prefix in _prefixes(dir_path):
        head, tail = _parent(prefix)
        places += [prefix, join(prefix, OPAQUE_MARKER), join(head, WHITEOUT_PREFIX + tail)]
    return places


class StreamTree:
    """What one streamed layer has unpacked so far, by layer path."""

    def __init__(self, number: int, root: bytes) -> None:
        self.number = number
        self.root = root  # the directory it unpacks into
        self.entries: dict[bytes, Entry] = {}
        self.children: dict[bytes, set[bytes]] = {}  # names of entries, by directory
        self.links: dict[int, list[bytes]] = {}  # the names of each file, by inode number
        self.implicit: set[bytes] = set()  # directories only implied by deeper names
        self.whiteouts: dict[bytes, set[bytes]] = {}
        self.opaque: set[bytes] = set()
        self.done = False
        # The orders the stream has kept so far: full paths byte by byte (how
        # docker sorts a layer's changes) and name by name, depth first (a
        # directory walk: umoci, buildkit, containers/storage). Either keeps a
        # directory's entries together, so once the stream has passed a
        # path's place, that path will not come (see passed).
        self.last: bytes | None = None
        self.bytewise = True
        self.walkwise = True
        self.out_of_order = False

    def arrived(self, rel: bytes) -> bool:
        """Note that *rel* came next; False if that breaks an order the stream
        kept until now while that order said such a path would not come."""
        last = self.last
        claimed = last is not None and self.passed(rel)
        self.last = rel
        if last is None:
            return True
        if rel <= last:
            self.bytewise = False
        if rel.split(b"/") <= last.split(b"/"):
            self.walkwise = False
        return not claimed

    def passed(self, path: bytes) -> bool:
        """Whether the stream has gone past *path*'s place in an order it has
        kept so far (so, if it keeps it, an entry at *path* will not come)."""
        last = self.last
        if self.done:
            return True
        if last is None:
            return False
        if self.bytewise and path <= last:
            return True
        return self.walkwise and path.split(b"/") <= last.split(b"/")

    def settled(self, dir_path: bytes, name: bytes) -> bool:
        """Whether every entry that could still bring, hide or reveal NAME in
        *dir_path* in this layer has had its place in the stream: the name,
        its whiteout, and each directory above with its opaque marker and its
        own whiteout."""
        places = [join(dir_path, name), join(dir_path, WHITEOUT_PREFIX + name)]
        return all(self.passed(place) for place in places + _above(dir_path))

    def hides(self, dir_path: bytes) -> bool:
        """Whether this layer hides *dir_path* from the layers below it (a
        non-directory or a whiteout at it or above it)."""
        for prefix in _prefixes(dir_path):
            entry = self.entries.get(prefix)
            if entry is not None and not entry.is_dir:
                return True
            head, tail = _parent(prefix)
            if tail in self.whiteouts.get(head, ()):
                return True
        return False

    def opaque_at(self, dir_path: bytes) -> bool:
        """Whether this layer ends what shows of *dir_path* from below
        (a layer's root is never opaque, as in overlayfs)."""
        return any(prefix in self.opaque for prefix in _prefixes(dir_path))

    def add(self, path: bytes, entry: Entry) -> None:
        self.entries[path] = entry
        head, tail = _parent(path)
        self.children.setdefault(head, set()).add(tail)

    def drop(self, path: bytes) -> None:
        """Forget *path* and what lies beneath it: a later tar entry replaced it."""
        self.entries.pop(path, None)
        self.implicit.discard(path)
        head, tail = _parent(path)
        self.children.get(head, set()).discard(tail)
        prefix = path + b"/"
        for name in [name for name in self.entries if name.startswith(prefix)]:
            del self.entries[name]
            self.implicit.discard(name)
            self.children.pop(name, None)
        self.children.pop(path, None)

    def closed(self, dir_path: bytes) -> bool:
        """Whether the stream has gone past every place beneath *dir_path* in an
        order it has kept so far (the root closes only at the end)."""
        last = self.last
        if self.done:
            return True
        if last is None or not dir_path:
            return False
        # Every path beneath D sorts between "D/" and "D0" ('0' follows '/').
        if self.bytewise and last >= dir_path + b"0":
            return True
        parts = dir_path.split(b"/")
        return self.walkwise and last.split(b"/")[: len(parts)] > parts

    def listing_settled(self, dir_path: bytes) -> bool:
        """Whether this layer's part of the listing of *dir_path* is final."""
        if self.done:
            return True
        return self.closed(dir_path) and all(self.passed(place) for place in _above(dir_path))


class StreamedLayers:
    """The provisional lower view: streamed layers (top first) over an
    indexed base. Written by the threads that unpack the layers, read by the
    view; every access holds the condition's lock."""

    def __init__(
        self,
        index: Index,
        base_root: Entry | None,
        trees: list[StreamTree],
        timeout: float | None = None,
    ) -> None:
        self.index = index
        # A lookup that waits fails with EIO once nothing has arrived for this
        # long (a registry gone away); the stream itself goes on trying.
        self.timeout = timeout
        self.progress_at = time.monotonic()
        self.base_root = base_root
        self.trees = trees  # top first
        self.changed = threading.Condition()
        self.failed: str | None = None  # why a layer will never arrive
        self.dir_inos: dict[bytes, int] = {}
        self.file_inos: dict[tuple[int, int], int] = {}
        self._inodes = InodeBatches(index)  # used by the unpacking thread only
        self.root = self._initial_root()

    def _initial_root(self) -> Entry:
        if self.base_root is not None:
            return self.base_root
        st = os.lstat(self.trees[-1].root)
        return entry_from_stat(ROOT_INO, st, self.trees[-1].number, nlink=2)

    @property
    def complete(self) -> bool:
        return all(tree.done for tree in self.trees)

    def presets(self) -> Presets:
        with self.changed:
            return Presets(dict(self.dir_inos), dict(self.file_inos))

    # Written by the unpacking threads ------------------------------------------

    def record(self, tree: StreamTree, rel: bytes, mtime_ns: int) -> None:
        """Entry *rel* of *tree* is unpacked whole (data and metadata)."""
        if not rel:
            return  # the root's attributes come with the switch to the index
        head, name = _parent(rel)
        with self.changed:
            self.progress_at = time.monotonic()
            if not tree.arrived(rel) and not tree.out_of_order:
                tree.out_of_order = True  # said once
                log.warning(
                    "layer %s is not in path order (%s came late): lookups wait for"
                    " its end now, and a name answered missing before may exist",
                    os.fsdecode(tree.root),
                    os.fsdecode(rel),
                )
            self._imply(tree, head, mtime_ns)
            if name.startswith(WHITEOUT_PREFIX):
                if name == OPAQUE_MARKER:
                    tree.opaque.add(head)
                elif not name.startswith(b".wh..wh."):
                    tree.whiteouts.setdefault(head, set()).add(name[len(WHITEOUT_PREFIX) :])
                self.changed.notify_all()
                return
            with _host_path(tree.root, rel) as path:
                st = os.lstat(path)
                old = tree.entries.get(rel)
                if old is not None and (not old.is_dir or not stat.S_ISDIR(st.st_mode)):
                    tree.drop(rel)
                tree.implicit.discard(rel)
                entry = self._entry(tree, rel, path, st, mtime_ns)
                tree.add(rel, entry)
            if not entry.is_dir:
                # A hardlink: the names that came before show the new count.
                names = tree.links.setdefault(entry.ino, [])
                for other in names if st.st_nlink > 1 else ():
                    known = tree.entries.get(other)
                    if known is not None and known.ino == entry.ino:
                        tree.entries[other] = known._replace(
                            nlink=entry.nlink, ctime_ns=entry.ctime_ns
                        )
                names.append(rel)
            self.changed.notify_all()

    def _imply(self, tree: StreamTree, dir_path: bytes, mtime_ns: int) -> None:
        """Directories above an entry that the tar did not list (yet)."""
        for prefix in _prefixes(dir_path):
            if prefix not in tree.entries:
                with _host_path(tree.root, prefix) as path:
                    tree.add(prefix, self._entry(tree, prefix, path, os.lstat(path), mtime_ns))
                tree.implicit.add(prefix)

    def _entry(
        self, tree: StreamTree, rel: bytes, path: bytes, st: os.stat_result, mtime_ns: int
    ) -> Entry:
        xattrs = read_xattrs(path)
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir:
            ino = self.dir_inos.get(rel)
            if ino is None:
                ino = self.dir_inos[rel] = self._inodes.allocate()
        else:
            key = (st.st_dev, st.st_ino)
            ino = self.file_inos.get(key) or self._inodes.allocate()
            self.file_inos[key] = ino
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else b""
        entry = layer_entry(
            ino, st, tree.number, rel, xattrs, nlink=2 if is_dir else None, target=target
        )
        if is_dir:  # its own mtime moves as it fills; the tar's is what stays
            entry = entry._replace(mtime_ns=mtime_ns, atime_ns=mtime_ns)
        return entry

    def stalled(self) -> bool:
        """Whether nothing has arrived for longer than the timeout."""
        if self.timeout is None or self.complete:  # indexing what arrived is no stall
            return False
        return time.monotonic() - self.progress_at >= self.timeout

    def touch(self) -> None:
        """Bytes arrived (an entry may be long in coming)."""
        self.progress_at = time.monotonic()

    def finish(self, tree: StreamTree) -> None:
        with self.changed:
            tree.done = True
            self.changed.notify_all()

    def fail(self, reason: str) -> None:
        with self.changed:
            self.failed = reason
            self.changed.notify_all()

    # Read by the view ------------------------------------------------------------

    def child(self, dir_path: bytes, name: bytes, *, wait: bool = True) -> Entry | _Unknown | None:
        """What NAME in the merged directory *dir_path* is. Waits (blocking)
        until nothing still to arrive can change the answer; without *wait*,
        UNKNOWN then. FsError(EIO) if a layer will never arrive."""
        if wait:
            self.wait_child(dir_path, name)
        with self.changed:
            return self._child(0, dir_path, name)

    def wait_child(self, dir_path: bytes, name: bytes) -> None:
        """Block until child can answer. Reads no index: a thread the mount
        abandons when it ends must not be inside LMDB when the index closes."""
        with self.changed:
            while self._child(0, dir_path, name, probe=True) is UNKNOWN:
                self._wait_more()

    def listing(
        self, dir_path: bytes, *, wait: bool = True
    ) -> list[tuple[int, list[tuple[bytes, Entry]]]] | _Unknown:
        """The merged directory *dir_path* as index buckets (hash order), once
        no layer still to arrive can change it. Waits like child."""
        if wait:
            self.wait_listing(dir_path)
        with self.changed:
            return self._listing(dir_path)

    def wait_listing(self, dir_path: bytes) -> None:
        """Block until listing can answer (reads no index, as wait_child)."""
        with self.changed:
            while self._listing(dir_path, probe=True) is UNKNOWN:
                self._wait_more()

    def _wait_more(self) -> None:
        """Wait for more to arrive (lock held); EIO if nothing will."""
        if self.failed is not None:
            raise FsError(errno.EIO, f"streamed layer lost: {self.failed}")
        if self.timeout is None:
            self.changed.wait()
            return
        idle = time.monotonic() - self.progress_at
        if idle >= self.timeout:
            raise FsError(errno.EIO, f"nothing streamed in for {idle:.0f} s")
        self.changed.wait(self.timeout - idle)

    def _listing(
        self, dir_path: bytes, *, probe: bool = False
    ) -> list[tuple[int, list[tuple[bytes, Entry]]]] | _Unknown:
        """The listing, or UNKNOWN; with *probe* only whether it is known."""
        names: set[bytes] = set()
        hidden: set[bytes] = set()
        below = True  # whether the layers further down still show in it
        for tree in self.trees:
            if tree.hides(dir_path):
                below = False
                break
            if not tree.listing_settled(dir_path):
                return UNKNOWN
            names |= tree.children.get(dir_path, set()) - hidden
            hidden |= tree.whiteouts.get(dir_path, set())
            if tree.opaque_at(dir_path):
                below = False
                break
        if probe:
            return []
        if below and self.base_root is not None:
            with self.index.read() as txn:
                base = self.index.lookup_path(txn, self.base_root, dir_path)
                if base is not None and base.is_dir:
                    for _, group in self.index.scan(txn, base.listing):
                        names |= {name for name, _ in group if name not in hidden}
        buckets: dict[int, list[tuple[bytes, Entry]]] = {}
        for name in names:
            entry = self._child(0, dir_path, name)
            if entry is UNKNOWN:
                return UNKNOWN
            if isinstance(entry, Entry):
                buckets.setdefault(name_hash(name), []).append((name, entry))
        return sorted(buckets.items())

    def at(self, path: bytes) -> Entry | None:
        """The entry at a lower path, from the root (waits like child)."""
        entry: Entry | None = self.root
        parent = b""
        for part in path.split(b"/"):
            if not part:
                continue
            if entry is None or not entry.is_dir:
                return None
            found = self.child(parent, part)
            assert not isinstance(found, _Unknown)
            entry = found
            parent = join(parent, part)
        return entry

    def _child(
        self, first: int, dir_path: bytes, name: bytes, *, probe: bool = False
    ) -> Entry | _Unknown | None:
        """The answer from layer *first* down; with *probe* only whether it
        is known (None stands for any answer the index below would give)."""
        path = join(dir_path, name)
        for position in range(first, len(self.trees)):
            tree = self.trees[position]
            if tree.hides(dir_path):
                return None
            entry = tree.entries.get(path)
            if entry is not None:
                if path in tree.implicit:
                    # Only implied here: it shows the attributes of the directory
                    # below, if any; until that is known, its own (the name is
                    # sure to be a directory, which is what a walk needs).
                    below = self._child(position + 1, dir_path, name, probe=probe)
                    if isinstance(below, Entry) and below.is_dir:
                        return below._replace(ino=entry.ino)
                return entry
            if name in tree.whiteouts.get(dir_path, ()):
                return None
            if not tree.done and not tree.settled(dir_path, name):
                return UNKNOWN
            if tree.opaque_at(dir_path):
                return None
        if self.base_root is None or probe:
            return None
        with self.index.read() as txn:
            found = self.index.lookup_path(txn, self.base_root, path)
        if found is not None and found.is_dir and path in self.dir_inos:
            # A streamed layer made this directory first: its number stays.
            return found._replace(ino=self.dir_inos[path])
        return found

    def wait_complete(self) -> None:
        """Block until every streamed layer has arrived, or one is lost."""
        with self.changed:
            while not self.complete and self.failed is None:
                self.changed.wait()
