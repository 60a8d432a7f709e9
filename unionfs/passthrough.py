"""FUSE passthrough: the kernel reads, writes and maps a file's host copy
itself, so no READ or WRITE request of an open file reaches the daemon.

At open the daemon registers the host file and answers with its id. The
kernel allows one backing file per FUSE inode while any open of it uses one,
offers no way to switch an open file to another, and refuses an open without
passthrough beside those (and one with it beside cached opens). What strata
serves through it follows from that:

- upper files whose data is whole (no chunked copy in progress, no metadata-
  only copy): their host file stays the same inode for good, whatever is
  written, renamed or linked;
- lower files, on a mount that cannot change them (no writable layer, or
  mounted read-only). On a writable mount a lower file open for reading may
  be copied up and written: overlayfs shows such a reader the new data, but
  a reader whose kernel file reads the lower copy would keep reading it. So
  there lower files are read through the daemon, as without passthrough.

An inode's open files share one mode: the first open decides, cached (no
backing file) or with one, until the last is released; a file copied up while
cached opens are outstanding stays cached until then.

The files registered are opened through private detached mounts of the
layers, made noatime, and of UPPER and WORK, made as the mount's atime options
say (core/atime.py): the kernel opens each backing file again per FUSE file,
and its reads then change the host files' atimes only where the mount's rule
would.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .core.atime import NOATIME, AtimePolicy, detached_mount
from .core.paths import open_beneath
from .core.reading import DataSource
from .core.records import Entry

# How a handle does its I/O: through the daemon and the kernel's page cache
# of the mount, or the kernel on the backing file.
CACHED = 0
PASSTHROUGH = 1

Identity = tuple[int, int]  # a host file's st_dev, st_ino


class BackingTrees:
    """Where backing files are opened: the detached mounts of each layer, of
    UPPER and of WORK."""

    def __init__(
        self,
        layers: dict[int, str],
        upper: str | None,
        work: str | None,
        atime: AtimePolicy = NOATIME,
    ) -> None:
        self._layers: dict[int, int] = {}
        self._layer_devices: dict[int, int] = {}
        self._upper: int | None = None
        self._work: int | None = None
        try:
            for number, path in layers.items():
                self._layers[number] = detached_mount(path)
                self._layer_devices[number] = os.fstat(self._layers[number]).st_dev
            if upper is not None and work is not None:
                # The kernel's reads of upper files count as accesses.
                self._upper = detached_mount(upper, atime)
                self._work = detached_mount(work, atime)
        except BaseException:
            self.close()
            raise

    def open(self, source: DataSource, *, cached_only: bool = False) -> int:
        """Open what *source* names (an upper file or a lower entry) read-only
        through the private mounts (the kernel opens it again with each FUSE
        file's flags). Blocking unless *cached_only*; safe in a worker thread."""
        if source.upper is not None:
            root = self._work if source.upper.in_work else self._upper
            assert root is not None
            return open_beneath(root, source.upper.rel, os.O_RDONLY, cached_only=cached_only)
        if source.anchor is not None:
            return replace(source, write=False).reopen()
        lower = source.lower
        assert lower is not None
        root = self._layers[lower.layer]
        fd = open_beneath(root, lower.path, os.O_RDONLY, cached_only=cached_only)
        if os.fstat(fd).st_ino != lower.host_ino:
            os.close(fd)  # as UnionView.open_lower: never serve a layer changed under the mount
            raise OSError(errno.ESTALE, f"layer changed under the mount: {lower.path!r}")
        return fd

    def lower_identity(self, lower: Entry) -> Identity:
        """The host file of a lower entry, without a system call (the index
        keeps its inode number, checked at every open)."""
        return (self._layer_devices[lower.layer], lower.host_ino)

    def close(self) -> None:
        for fd in (*self._layers.values(), self._upper, self._work):
            if fd is not None:
                os.close(fd)
        self._layers.clear()
        self._upper = self._work = None


@dataclass(slots=True)
class Backing:
    """A registered backing file: its id and the host file it is."""

    id: int
    identity: Identity


class _InodeIO:
    __slots__ = ("backing", "cached", "passthrough")

    def __init__(self) -> None:
        self.cached = 0  # handles answered without passthrough
        self.passthrough = 0  # handles answered with the backing file
        self.backing: Backing | None = None


class Busy(Exception):
    """The open would need another backing file than the inode's open files
    use (the rules above should make it never happen)."""


class BackingFiles:
    """The I/O mode of every inode with open files, and their backing files.

    A backing id is never dropped before the last handle using it is
    released (the kernel looks the id up after the open's reply). It then
    stays registered, idle, for the next open of its inode while the kernel
    knows the inode (a registration costs the daemon an open and two
    ioctls), up to IDLE_MAX of them. An upper file's goes as its last name
    does (removed): it would keep the file's space until the kernel forgets
    the inode. The next open reuses an idle one only for the same host file.
    """

    IDLE_MAX = 4096

    def __init__(self, register: Callable[[int], int], unregister: Callable[[int], None]) -> None:
        self._register = register
        self._unregister = unregister
        self._inodes: dict[int, _InodeIO] = {}
        # Backing files no open uses, least recently released first.
        self._idle: OrderedDict[int, Backing] = OrderedDict()
        # Inodes that had passthrough opens since their last cached open: a
        # cached open must not keep pages the kernel cached before (writes
        # through the backing file did not go through them).
        self._stale_pages: set[int] = set()
        self.registered = 0
        self.unregistered = 0

    def outstanding(self, ino: int) -> Backing | int | None:
        """The backing file the inode's open files use, CACHED if they use
        none, None if it has no open file."""
        io = self._inodes.get(ino)
        if io is None:
            return None
        if io.backing is not None:
            return io.backing
        return CACHED if io.cached else None

    def open_cached(self, ino: int) -> bool:
        """Count a cached open; whether it may keep the pages the kernel has."""
        io = self._inodes.get(ino)
        if io is None:
            io = self._inodes[ino] = _InodeIO()
        assert io.backing is None
        io.cached += 1
        if ino in self._stale_pages:
            self._stale_pages.discard(ino)
            return False
        return True

    def attach(self, ino: int, identity: Identity | None) -> int | None:
        """Count an open of the inode whose data is the host file *identity*
        (None: in no one host file, a chunked copy in progress) with the
        backing file registered for it, used or idle, and return its id;
        None if there is none (register one). Busy where the inode's open
        files use another."""
        io = self._inodes.get(ino)
        if io is not None and io.backing is not None:
            if io.backing.identity != identity:
                raise Busy
            io.passthrough += 1
            return io.backing.id
        idle = self._idle.pop(ino, None)
        if idle is not None:
            if idle.identity == identity:
                self._use(ino, idle)
                return idle.id
            self._drop(idle)
        return None

    def register(self, ino: int, fd: int) -> int | None:
        """Register the host file *fd* for an open of the inode and count
        the open; None if cached opens of it came meanwhile (answer it
        cached too). Busy if other opens registered another file meanwhile."""
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
        io = self._inodes.get(ino)
        if io is not None and io.cached:
            return None
        if io is not None and io.backing is not None:  # registered meanwhile
            if io.backing.identity != identity:
                raise Busy
            io.passthrough += 1
            return io.backing.id
        backing = Backing(self._register(fd), identity)
        self.registered += 1
        self._use(ino, backing)
        return backing.id

    def _use(self, ino: int, backing: Backing) -> None:
        io = self._inodes.get(ino)
        if io is None:
            io = self._inodes[ino] = _InodeIO()
        io.backing = backing
        io.passthrough += 1
        self._stale_pages.add(ino)

    def _drop(self, backing: Backing) -> None:
        self.unregistered += 1
        self._unregister(backing.id)

    def release(self, ino: int, mode: int) -> None:
        io = self._inodes.get(ino)
        if io is None:
            return
        if mode == CACHED:
            io.cached -= 1
        else:
            io.passthrough -= 1
            if not io.passthrough and io.backing is not None:
                backing, io.backing = io.backing, None
                self._idle[ino] = backing
                if len(self._idle) > self.IDLE_MAX:
                    self._drop(self._idle.popitem(last=False)[1])
        if not io.cached and not io.passthrough:
            del self._inodes[ino]

    def forget(self, ino: int) -> None:
        """The kernel dropped the inode: no open of it can come."""
        self._stale_pages.discard(ino)
        self.removed(ino)

    def removed(self, ino: int) -> None:
        """The inode's last name went: its idle backing file, if any, goes
        too, so that the host file's space is free at once."""
        idle = self._idle.pop(ino, None)
        if idle is not None:
            self._drop(idle)

    def closed(self) -> None:
        """The session ended: the kernel dropped every id with it."""
        self.unregistered += len(self._idle)
        self._idle.clear()

    @property
    def open_ids(self) -> int:
        return self.registered - self.unregistered


def _pyfuse3() -> Any:
    """pyfuse3, whose passthrough calls exist only when it is built with
    tools/pyfuse3-passthrough.patch (against libfuse 3.17)."""
    import pyfuse3

    return pyfuse3


def kernel_backing_files() -> BackingFiles:
    """BackingFiles registering with the kernel through pyfuse3's session."""
    return BackingFiles(
        lambda fd: int(_pyfuse3().backing_open(fd)),
        lambda backing_id: _pyfuse3().backing_close(backing_id),
    )


class Passthrough:
    """Passthrough as a mount uses it: where backing files are opened, the
    I/O mode of each inode with open files, and whether lower files are
    served through it (on a mount that cannot change them)."""

    def __init__(self, trees: BackingTrees, files: BackingFiles, *, lower: bool) -> None:
        self.trees = trees
        self.files = files
        self.lower = lower
        # Set when registering a file failed: no inode gets a backing file
        # any more (those that have one keep it until their opens are closed).
        self.failed = False

    def close(self) -> None:
        self.files.closed()
        self.trees.close()


def start(
    files: BackingFiles,
    layers: dict[int, str],
    upper: str | None,
    work: str | None,
    probe: str,
    *,
    lower: bool,
    atime: AtimePolicy = NOATIME,
) -> tuple[Passthrough | None, str]:
    """Passthrough for a mount the kernel has initialised, or why it cannot
    be used. *files*: the modes of the files opened so far (all cached).
    *probe*: a regular file on the store's filesystem, registered and
    dropped once to learn whether this process may register files."""
    pyfuse3 = _pyfuse3()
    if not getattr(pyfuse3, "PASSTHROUGH_SUPPORTED", False):
        return None, "pyfuse3 is built without it (libfuse older than 3.17; see tools/setup.sh)"
    if not pyfuse3.passthrough_enabled():
        return None, "the kernel does not offer it (Linux 6.9 or later, CONFIG_FUSE_PASSTHROUGH)"
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pyfuse3.backing_close(pyfuse3.backing_open(fd))
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            return None, "a backing file needs CAP_SYS_ADMIN in the initial user namespace"
        return None, f"registering a backing file failed: {exc.strerror}"
    try:
        # The layers' private mounts only where lower files are backed: a
        # writable mount of a deep stack makes none at mount time.
        trees = BackingTrees(layers if lower else {}, upper, work, atime)
    except OSError as exc:
        return None, str(exc.strerror)
    return Passthrough(trees, files, lower=lower), ""
