"""Opening ahead: the lower files a reader will open next, warmed in the host's caches.

A process that reads a directory's files one after another (tar, cp -r, a
checksum of a tree, an interpreter importing a package) opens them in the
order the listing gave it. Cold, each open waits for the disk twice: for the
layer file's inode (the daemon's open) and for its first pages (the read);
the daemon's own work for the request comes on top, one after the other. The
kernel's overlayfs waits the same way. Here the index knows which files come
next, so a thread opens them ahead, a window of the listing at a time, and
asks for their first pages (POSIX_FADV_WILLNEED) while the reader and the
daemon work on the file before: the reader's open then finds the inode in
the cache (RESOLVE_CACHED), its reads find the pages.

Like the kernel's readahead of a file, a window starts where a reader shows
it reads in order (two cold opens of files next to each other in the
listing, or by name: git add, rsync and globs sort what they list) and moves
on as the reader reaches its middle; opens in another order start nothing.
While such a reader is at work, the next directory listed is warmed from
its first file (tar and cp -r list a directory, then read it). Lower
layers never change, so warming only reads them, and nothing it finds is
served: the request opens its file itself, as before.
Layers whose data is pulled lazily are left alone (a read there fetches).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import queue
import stat
import threading
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from .index import Index, name_hash
from .nodes import Node
from .paths import open_beneath
from .records import Entry

log = logging.getLogger(__name__)
T = TypeVar("T")

# Files warmed per window; the next window is queued when the reader opens
# the file in the middle of the last one.
WINDOW = 32
# Two cold opens start a window if the second file is among the first
# NEXT_TO after the first in the listing.
NEXT_TO = 4
# Listings after the last open in a window that still warm their directory
# (tar lists a directory of directories, then one of those, then reads).
LISTINGS_AFTER = 4
# The first pages asked for: the kernel's own first readahead window.
WARM_BYTES = 128 * 1024
# Directories whose window is kept; the oldest is dropped first.
DIRECTORIES_KEPT = 256
# Directories of at most this many entries are looked at in name order too,
# the last BY_NAME_KEPT used kept sorted (or known too large). The sort is
# made on the request thread, about 4 µs an entry (the index's scan half of
# it): up to 31 ms, once per directory while it is kept.
BY_NAME_MAX = 8192
BY_NAME_KEPT = 8
# Files queued and not yet warmed, at most: a reader faster than the disk
# gains nothing from a longer queue.
QUEUED_MAX = 4 * WINDOW

Key = tuple[int, bytes]  # (name hash, name) in listing order; (0, name) in name order
_FIRST: Key = (0, b"")  # before every entry


class _Job(NamedTuple):
    layer: int
    path: bytes
    size: int


class _Found(NamedTuple):
    key: Key
    job: _Job


# A directory's lower regular files sorted by name: the order of readers
# that sort what they list (git add, rsync, tar --sort=name, a glob).
_ByName = list[_Found]


def _key_of(found: _Found) -> Key:
    return found.key


class _Window:
    """Where warming stands in one directory, in one of the two orders."""

    __slots__ = ("by_name", "done", "frontier", "start", "trigger")

    def __init__(
        self, by_name: _ByName | None, start: Key, frontier: Key, trigger: Key, done: bool
    ) -> None:
        self.by_name = by_name  # None: in listing order
        self.start = start  # this pass began with the file after this entry
        self.frontier = frontier  # the last entry looked at
        self.trigger = trigger  # an open at or past this one queues the next window
        self.done = done  # the files ended at the frontier

    def key(self, name: bytes) -> Key:
        return (name_hash(name), name) if self.by_name is None else (0, name)


class OpenAhead:
    """Warms the lower files after the one a reader opens (see the module).
    `opened` and `listed` are called on the request thread; a thread of its
    own does the opens, on duplicates of the layer roots it closes itself."""

    def __init__(self, index: Index, layer_fds: dict[int, int], skip_layer: Callable[[int], bool]):
        self._index = index
        self._layer_fds = layer_fds
        self._skip_layer = skip_layer
        self._windows: dict[int, _Window] = {}
        # The name of the last cold open outside a window, by directory.
        self._last_cold: dict[int, bytes] = {}
        # Directories sorted by name lately (a reader in that order asks again).
        self._by_name: dict[int, _ByName | None] = {}
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.opens = 0  # opens of lower files told of
        self.cold = 0  # of them, those that waited for the disk
        self.queued = 0  # files queued to be warmed
        self.warmed = 0  # files the thread opened
        # Opens and listings told of, and their count at the last open of a
        # file inside a window.
        self._events = 0
        self._sequential_at = -LISTINGS_AFTER - 1

    def opened(self, directory: Node | None, node: Node, cold: bool) -> None:
        """A lower regular file *node* in *directory* was opened for its data;
        *cold*: its open had to wait for the disk."""
        self.opens += 1
        self._events += 1
        self.cold += cold
        if directory is None or self._closed:
            return
        listing = _listing(directory)
        if listing is None:
            return
        name = node.name
        window = self._windows.get(directory.ino)
        if window is not None:
            key = window.key(name)
            if window.start < key <= window.frontier:
                self._sequential_at = self._events  # a file of the window: a reader in order
                if key >= window.trigger and not window.done:
                    self._queue(directory.ino, listing, window.by_name, window.start,
                                window.frontier)  # fmt: skip
                return  # else the thread is on its way, or it was the last window
        # Outside any window. Two cold opens in a row of files next to each
        # other, in listing order or by name, start one (a new pass over the
        # directory); opens in another order (an interpreter's imports) warm
        # nothing they would not use.
        if not cold:
            return
        previous = self._last_cold.pop(directory.ino, None)
        if previous is not None and previous != name:
            key = (name_hash(name), name)
            if self._follows(listing, (name_hash(previous), previous), key):
                self._queue(directory.ino, listing, None, key, key)
                return
            by_name = self._sorted(directory.ino, listing) if name > previous else None
            if by_name is not None and _next_to(by_name, (0, previous), (0, name)):
                self._queue(directory.ino, listing, by_name, (0, name), (0, name))
                return
        _keep(self._last_cold, directory.ino, name)

    def listed(self, directory: Node) -> None:
        """A listing of *directory* begins. While a reader opens files in
        listing order (it opened a file inside a window since the last
        LISTINGS_AFTER listings), the next directory it lists is most likely
        the next it reads, as with tar and cp -r: its first files are warmed
        now, not after its first open waited. A walk that opens nothing
        (find, du) warms nothing, or the first few directories it lists
        right after such a reader."""
        self._events += 1
        if self._closed or self._events - self._sequential_at > LISTINGS_AFTER:
            return
        listing = _listing(directory)
        if listing is not None:
            self._queue(directory.ino, listing, None, _FIRST, _FIRST)

    def _follows(self, listing: int, previous: Key, key: Key) -> bool:
        """Whether *key* comes right after *previous* in listing order
        (within NEXT_TO regular files: a reader may skip some)."""
        if key <= previous:
            return False
        files, _, _ = self._next_in_listing(listing, previous, NEXT_TO)
        return any(found.key == key for found in files)

    def _sorted(self, directory: int, listing: int) -> _ByName | None:
        """The directory's files by name (None if it has more than BY_NAME_MAX
        entries: sorting them all on the request thread would cost more
        than warming saves)."""
        if directory in self._by_name:
            kept = self._by_name.pop(directory)  # kept again as the latest
            self._by_name[directory] = kept
            return kept
        files: list[_Found] = []
        by_name: _ByName | None = None
        with self._index.read() as txn:
            looked = 0
            for _, bucket in self._index.scan(txn, listing):
                looked += len(bucket)
                if looked > BY_NAME_MAX:
                    break
                for name, entry in bucket:
                    if _worth_warming(entry) and not self._skip_layer(entry.layer):
                        files.append(_Found((0, name), _job(entry)))
            else:
                by_name = sorted(files)
        _keep(self._by_name, directory, by_name, BY_NAME_KEPT)
        return by_name

    def _queue(
        self, directory: int, listing: int, by_name: _ByName | None, start: Key, after: Key
    ) -> None:
        """Queue the window of the directory's files after *after*."""
        if self._jobs.qsize() >= QUEUED_MAX:
            return
        if by_name is None:
            jobs, frontier, done = self._next_in_listing(listing, after, WINDOW)
        else:
            jobs, frontier, done = _next_by_name(by_name, after, WINDOW)
        trigger = jobs[len(jobs) // 2].key if jobs else frontier
        self._windows.pop(directory, None)
        _keep(self._windows, directory, _Window(by_name, start, frontier, trigger, done))
        for job in jobs:
            self._put(job.job)

    def _next_in_listing(
        self, listing: int, after: Key, count: int
    ) -> tuple[list[_Found], Key, bool]:
        """The lower regular files after *after* in a listing's order (at
        most *count*, looking at 4 * count entries), the last entry looked
        at, and whether the listing ended there."""
        found: list[_Found] = []
        frontier = after
        looked = 0
        with self._index.read() as txn:
            for hashed, bucket in self._index.scan(txn, listing, after[0]):
                for name, entry in sorted(bucket):
                    key = (hashed, name)
                    if key <= after:
                        continue
                    frontier = key
                    looked += 1
                    if _worth_warming(entry) and not self._skip_layer(entry.layer):
                        found.append(_Found(key, _job(entry)))
                    if len(found) >= count or looked >= 4 * count:
                        return found, frontier, False
        return found, frontier, True

    def _put(self, job: _Job) -> None:
        if self._thread is None:
            fds = {number: os.dup(fd) for number, fd in self._layer_fds.items()}
            self._thread = threading.Thread(
                target=self._warm_all, args=(fds,), name="open-ahead", daemon=True
            )
            self._thread.start()
        self.queued += 1
        self._jobs.put(job)

    def _warm_all(self, fds: dict[int, int]) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                if _warm(fds[job.layer], job):
                    self.warmed += 1
        finally:
            for fd in fds.values():
                os.close(fd)

    def close(self) -> None:
        """Stop the thread (what is still queued is dropped)."""
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is None:
            return
        while True:  # drop what waits, so the stop comes next
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        self._jobs.put(None)
        thread.join()


def _listing(directory: Node) -> int | None:
    """The lower listing of *directory* that shows, if any."""
    lower = directory.lower
    if lower is None or directory.opaque or not lower.listing:
        return None
    return lower.listing


def _worth_warming(entry: Entry) -> bool:
    return stat.S_ISREG(entry.mode) and bool(entry.path)


def _job(entry: Entry) -> _Job:
    return _Job(entry.layer, entry.path, entry.size)


def _next_to(by_name: _ByName, previous: Key, key: Key) -> bool:
    """Whether *key* is among the NEXT_TO files after *previous* by name."""
    at = bisect.bisect_right(by_name, previous, key=_key_of)
    return any(found.key == key for found in by_name[at : at + NEXT_TO])


def _next_by_name(by_name: _ByName, after: Key, count: int) -> tuple[list[_Found], Key, bool]:
    """As OpenAhead._next_in_listing, by name."""
    at = bisect.bisect_right(by_name, after, key=_key_of)
    found = by_name[at : at + count]
    frontier = found[-1].key if found else after
    return found, frontier, at + count >= len(by_name)


def _keep(kept: dict[int, T], key: int, value: T, most: int = DIRECTORIES_KEPT) -> None:
    """Keep *value* under *key*, dropping the oldest beyond *most*."""
    if len(kept) >= most:
        del kept[next(iter(kept))]
    kept[key] = value


def _warm(layer_fd: int, job: _Job) -> bool:
    """Bring a layer file's inode and first pages into the host's caches."""
    try:
        fd = open_beneath(layer_fd, job.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("open-ahead of %r: %s", job.path, exc)
        return False
    try:
        with contextlib.suppress(OSError):  # a hint: the open warmed the inode
            if job.size:  # (a length of 0 would mean the whole file)
                os.posix_fadvise(fd, 0, min(job.size, WARM_BYTES), os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
    return True
