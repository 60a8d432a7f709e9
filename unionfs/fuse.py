"""The pyfuse3 adapter: translates kernel requests to the union view.

Every handler runs on the trio thread; anything that may block on a disk for
long (opening, reading, writing and syncing files, copying data up) goes to a
worker thread, so one large copy-up never stalls the other requests.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from .core import acl, fileflags
from .core.atime import AccessTimes
from .core.data import read_cached
from .core.nodes import Caller, FsError, Node
from .core.reading import DataSource
from .core.records import Entry
from .core.syscalls import fallocate
from .core.upper import RENAME_EXCHANGE
from .core.view import UnionView
from .errors import shorten
from .idmap import IdMap, Ownership
from .kernel_sync import KernelSync, Unavailable
from .passthrough import CACHED, PASSTHROUGH, BackingFiles, Busy, Identity, Passthrough
from .threads import in_worker

log = logging.getLogger(__name__)

# Lower layers never change under a mount and every change to the writable
# layer passes through strata, which the kernel sees; so it may keep what it
# learns for long.
CACHE_TIMEOUT = 24 * 3600.0
# While layers stream in, what is shown may still change (a directory's link
# count, a file that gains a hardlink): the kernel keeps it briefly.
STREAMING_TIMEOUT = 1.0
# A lower file up to this size is read whole with a cold open (one kernel
# read request, max_read, covers it).
PREFETCH_MAX = 128 * 1024
# Writes up to this size are made on the trio thread (see write).
INLINE_WRITE_MAX = 64 * 1024

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# ioctl numbers (x86-64 and most others: _IOR/_IOW of 'f' 1 and 2 with a
# long, of 'X' 31 and 32 with struct fsxattr), and struct fsxattr itself.
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS = 0x80086601, 0x40086602
_FS_IOC_FSGETXATTR, _FS_IOC_FSSETXATTR = 0x801C581F, 0x401C5820
_FSXATTR = struct.Struct("<IIIII8x")  # xflags, extsize, nextents, projid, cowextsize
_FALLOC_FL_KEEP_SIZE = 0x01
T = TypeVar("T")

# Whether pyfuse3 hands readdir the directory's inode when opendir is not
# implemented (tools/pyfuse3-no-opendir.patch, which tools/setup.sh applies);
# without it, directories are opened as before, and listed from strata each time.
OPENDIR_OPTIONAL: bool = getattr(pyfuse3, "OPENDIR_OPTIONAL", False)

# Whether an open can tell the kernel its close needs no flush request
# (FOPEN_NOFLUSH, tools/pyfuse3-noflush.patch): then only a file whose close
# may have an error to report (a background copy-up) costs a flush.
NOFLUSH: bool = hasattr(pyfuse3.FileInfo, "noflush")

# Whether nothing waits for the trio thread: no request to read, no task or
# worker result for trio (tools/pyfuse3-idle-wait.patch); never, without it.
_nothing_waiting: Callable[[], bool] = getattr(pyfuse3, "nothing_waiting", lambda: False)


async def _briefly_blocking(function: Callable[..., T], *args: Any) -> T:
    """Run a call that may wait for the disk a little (an open, a read of
    at most max_read): here when nothing else waits for the trio thread,
    else in a worker thread, so other requests go on meanwhile. A serial
    client, the common case, then pays no worker round trip, which costs
    more CPU (~100 µs, and twice that with cold caches) than the call."""
    if _nothing_waiting():
        return function(*args)
    return await in_worker(function, *args)


_DONT_MASK_SUPPORTED = bool(getattr(pyfuse3, "DONT_MASK_SUPPORTED", False))


def _fuse_errors(handler: F) -> F:
    """Turn core and OS errors into FUSE replies with the same errno.

    Anything else is a bug in strata: that one request fails with EIO and the
    traceback is logged with the operation and the path, but the daemon keeps
    serving, since every process and container on the mount depends on it.
    """

    @functools.wraps(handler)
    async def wrapper(self: StrataOperations, *args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(self, *args, **kwargs)
        except FsError as failure:  # (each except clause its own name: see unionfs.native)
            if failure.errno in (errno.ESTALE, errno.EIO):  # trouble worth a line in the log
                log.error("%s", failure.args[1])
            raise pyfuse3.FUSEError(failure.errno) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception(
                "%s%s failed; answered EIO", handler.__name__, self.describe_request(args)
            )
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(F, wrapper)


def _caller_status(ctx: pyfuse3.RequestContext) -> dict[bytes, bytes]:
    """The caller's /proc status lines, or none: it is gone, or in a PID
    namespace this daemon cannot see into."""
    try:
        with open(f"/proc/{ctx.pid}/status", "rb") as status:
            return dict(line.rstrip(b"\n").split(b":\t", 1) for line in status if b":\t" in line)
    except OSError:
        return {}


def _caller_may_keep_setid(ctx: pyfuse3.RequestContext) -> bool:
    """Whether the caller has CAP_FSETID, as the kernel asks before it keeps
    set-id bits through a write or truncation: root (of the initial user
    namespace: a user namespace's root shows as its host uid here) unless its
    capability set lacks it (a container started with fewer capabilities)."""
    if ctx.uid != 0:
        return False
    effective = _caller_status(ctx).get(b"CapEff")
    return effective is None or bool(int(effective, 16) & (1 << _CAP_FSETID))


def _caller_in_group(ctx: pyfuse3.RequestContext, gid: int) -> bool:
    if ctx.gid == gid:
        return True
    groups = _caller_status(ctx).get(b"Groups", b"").split()
    return str(gid).encode() in groups


_CAP_FSETID = 4


def _times_given(fields: pyfuse3.SetattrFields) -> bool:
    """Whether a setattr sets a time of the caller's own rather than "now"
    (tools/pyfuse3-time-now.patch; an unpatched pyfuse3 does not say, and
    every time counts as "now")."""
    atime_now = getattr(fields, "update_atime_now", None)
    if atime_now is None:
        return False
    mtime_now = getattr(fields, "update_mtime_now", False)
    return bool((fields.update_atime and not atime_now) or (fields.update_mtime and not mtime_now))


def _invalidate_attributes(inodes: list[int]) -> None:
    for ino in inodes:
        with contextlib.suppress(OSError):  # an inode the kernel has dropped meanwhile
            pyfuse3.invalidate_inode(ino, attr_only=True)


# The descriptor of a handle whose file has not been read yet.
NOT_OPENED = -1


class Handle:
    """An open file: the host descriptor and which copy of the data it reads."""

    __slots__ = ("errors_seen", "fd", "head", "ino", "io", "replaced", "version", "write")

    def __init__(self, ino: int, fd: int, version: int, write: bool, errors_seen: int) -> None:
        self.ino = ino
        self.fd = fd
        self.version = version
        self.write = write
        # The last background error of the file this handle's fsync or close reported
        # (or that was already reported when it was opened): see LostWrites.
        self.errors_seen = errors_seen
        # Descriptors this handle read before a copy-up moved the data: kept
        # open until release, since a read still in a worker thread may use
        # one, and a number closed under it could be reused by another file.
        self.replaced: list[int] | None = None
        # A small lower file's whole data, read with a cold open: its first
        # read is answered without another worker-thread round trip.
        self.head: bytes | None = None
        # How the kernel does this handle's I/O (passthrough.py); None: passthrough is off.
        self.io: int | None = None

    @property
    def opened(self) -> bool:
        """Whether the descriptor is open: a lower file's is opened at its
        first read (NOT_OPENED until then)."""
        return self.fd != NOT_OPENED

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        for fd in self.replaced or ():
            if fd >= 0:
                os.close(fd)


class LostWrites:
    """Errors met by work done for a file after its request was answered (a
    background copy-up), kept until an fsync or close reports them, as the
    kernel's errseq does for writeback: each open file sees an error once, at
    its next fsync or close; a file opened after it was reported does not."""

    def __init__(self) -> None:
        self._serial = 0
        # inode -> (serial, error, whether an fsync has reported it)
        self._errors: dict[int, tuple[int, OSError, bool]] = {}

    def record(self, ino: int, error: OSError) -> None:
        self._serial += 1
        self._errors[ino] = (self._serial, error, False)

    def sample(self, ino: int) -> int:
        """What a new handle has seen: an error not reported yet is still to come."""
        found = self._errors.get(ino)
        return found[0] if found is not None and found[2] else 0

    def check(self, handle: Handle) -> None:
        """Raise the file's error if this handle has not reported it yet."""
        found = self._errors.get(handle.ino)
        if found is None or found[0] <= handle.errors_seen:
            return
        serial, error, _ = found
        handle.errors_seen = serial
        self._errors[handle.ino] = (serial, error, True)
        raise OSError(error.errno or errno.EIO, error.strerror)

    def forget(self, ino: int) -> None:
        self._errors.pop(ino, None)


class StrataOperations(pyfuse3.Operations):
    # A symlink's target never changes (a new target is a new inode, and
    # inode numbers are never reused within a mount): the kernel keeps it in
    # its page cache and asks readlink once per inode (with the pyfuse3 patch
    # tools/setup.sh applies; ignored by an unpatched pyfuse3).
    enable_symlink_caching = True
    # A file's data changes only through this mount (the layers never change;
    # a copy-up copies the same bytes), and the kernel keeps its page cache
    # right through writes, truncation and mmap. So a new mtime in a getattr
    # reply is no reason to drop the pages just written: without this a file
    # read right after it is written (an object file, an unpacked package) is
    # read through the daemon again (tools/pyfuse3-keep-data.patch).
    auto_invalidate_data = False
    # strata clears set-id bits itself (FUSE_HANDLE_KILLPRIV_V2, with
    # tools/pyfuse3-killpriv.patch): the kernel then stops asking for
    # security.capability before every write (dpkg: 5,757 GETXATTR requests).
    # It still drops a file capability on write; what it leaves to strata is
    # the set-id bits: see _may_kill_setid.
    handle_killpriv = True
    # POSIX ACLs: the kernel checks access ACLs (asking for each inode's
    # once, and keeping it); strata gives a new object the ACLs and mode its
    # directory's default ACL makes, which is why it must see the mode before
    # the umask (FUSE_DONT_MASK, tools/pyfuse3-dont-mask.patch; without it the
    # kernel's umask would come first, so ACLs stay as they were: stored,
    # not enforced).
    dont_mask = _DONT_MASK_SUPPORTED
    enable_acl = _DONT_MASK_SUPPORTED  # (not `a = b = ...`: mypyc compiles one target)

    def __init__(
        self,
        view: UnionView,
        *,
        timeout: float = CACHE_TIMEOUT,
        ownership: Ownership | None = None,
    ) -> None:
        super().__init__()
        self.view = view
        self.timeout = timeout
        # How owners the layers store are shown (uidmapping=, squash_to_*=).
        self.ownership = ownership if ownership is not None else Ownership.identity()
        self._mapped = not self.ownership.is_identity
        self.handles: dict[int, Handle] = {}
        # Inode -> its open handles: a file open when its last name goes keeps
        # an anchor in the view (ReadPath.held_open).
        self._opens: dict[int, int] = {}
        view.held_open = self._opens.__contains__
        self._next_fh = 1
        self._copy_locks: dict[int, trio.Lock] = {}
        self.lost_writes = LostWrites()
        # Where copy-ups that finish after their request run (mount.py sets it).
        self.background: trio.Nursery | None = None
        # Where fsync goes when the kernel takes it as AIO (mount.py sets it).
        self.kernel_sync: KernelSync | None = None
        # `--record-reads`: the paths of image files opened, in the order first
        # opened (a prefetch list for `strata convert --estargz`); None: off.
        self.reads: dict[bytes, None] | None = None
        # Set once every streamed layer is in the index (or lost: streams_lost).
        self.streams_arrived = trio.Event()
        self.streams_lost: str | None = None
        # What indexes the streamed layers once here (mount.py sets it).
        self.stream_finish: Callable[[], tuple[Entry, dict[int, str]]] | None = None
        # Whether to ask the kernel for passthrough at init; each inode's I/O
        # mode, kept from the first request when passthrough may come; and
        # once it is in use (mount.py starts it), where backing files come from.
        self.enable_passthrough = False
        self.backing_files: BackingFiles | None = None
        self.passthrough: Passthrough | None = None
        # Files opened for writing through passthrough (inode: its handles): a
        # shared mapping writes their host files with no request here, so the
        # kernel keeps none of their attributes (their times move unseen).
        # Not files create made for the handle: dpkg-like work (create, write,
        # fchown, fchmod) would pay a getattr for each change, about 3% more
        # requests (a mapping of such a file shows its times once the file
        # changes otherwise).
        self._kernel_writes: dict[int, set[int]] = {}
        # With relatime or strictatime, what counts accesses to the container
        # layer's files (core/atime.py); None: noatime.
        self.access_times: AccessTimes | None = None
        if view.streaming is None:
            self.streams_arrived.set()

    async def follow_streams(self, finish: Callable[[], tuple[Entry, dict[int, str]]]) -> None:
        """Wait (in a worker thread) until *finish* has indexed the streamed
        layers, then serve from the index; listings and changes wait for this."""
        try:
            root, layers = await trio.to_thread.run_sync(  # waits that may be abandoned
                finish, abandon_on_cancel=True
            )
        except Exception as exc:
            self.streams_lost = str(exc) or type(exc).__name__
            log.error("streamed layers lost: %s", self.streams_lost)
        else:
            self.view.switch_to_index(root, layers)
            # What the kernel keeps of the provisional view (directory link
            # counts, attributes an implied directory took) is read again.
            known = list(self.view.nodes)
            await in_worker(_invalidate_attributes, known)
        self.streams_arrived.set()

    def _check_streams(self) -> None:
        """A streamed layer found bad (or a stack refused once indexed): what
        it served was never verified, so nothing more of the mount is."""
        streaming = self.view.streaming
        lost = self.streams_lost or (streaming.failed if streaming is not None else None)
        if lost is not None:
            raise FsError(errno.EIO, f"streamed layers lost: {lost}")

    async def _all_arrived(self) -> None:
        """Wait until no layer is still streaming in: listings and changes need
        the whole tree (any name may still arrive)."""
        while not self.streams_arrived.is_set():
            streaming = self.view.streaming
            if streaming is not None and streaming.stalled():
                raise FsError(errno.EIO, "nothing streamed in for the mount's --lazy-timeout")
            with trio.move_on_after(0.5):
                await self.streams_arrived.wait()
        if self.streams_lost is not None:
            raise FsError(errno.EIO, f"streamed layers lost: {self.streams_lost}")

    def _attributes(self, entry: Entry) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = entry.ino
        attrs.generation = 0
        timeout = self.timeout if self.view.streaming is None else STREAMING_TIMEOUT
        # A hardlinked file's names are looked up at every walk: a change to
        # it is linked in UPPER by the name it comes by (copyup.py).
        attrs.entry_timeout = 0 if entry.nlink > 1 and not stat.S_ISDIR(entry.mode) else timeout
        attrs.attr_timeout = 0 if entry.ino in self._kernel_writes else timeout
        attrs.st_mode = entry.mode
        attrs.st_nlink = entry.nlink
        if self._mapped:
            attrs.st_uid = self.ownership.uids.shown(entry.uid)
            attrs.st_gid = self.ownership.gids.shown(entry.gid)
        else:
            attrs.st_uid = entry.uid
            attrs.st_gid = entry.gid
        attrs.st_rdev = entry.rdev
        attrs.st_size = entry.size
        attrs.st_blksize = 4096
        attrs.st_blocks = entry.blocks
        attrs.st_atime_ns = entry.atime_ns
        attrs.st_mtime_ns = entry.mtime_ns
        attrs.st_ctime_ns = entry.ctime_ns
        return attrs

    def describe_request(self, args: tuple[Any, ...]) -> str:
        """The paths a failed request was about, for its log line: each inode
        (or open file) it names, joined with the name that follows a directory."""
        paths: list[str] = []
        for position, arg in enumerate(args):
            if not isinstance(arg, int) or position not in (0, 2):
                continue  # inodes come first and third (rename, link); the rest are data
            handle = self.handles.get(arg) if arg not in self.view.nodes else None
            node = self.view.nodes.get(arg if handle is None else handle.ino)
            if node is None:
                continue
            with contextlib.suppress(Exception):  # the view may be what broke
                path = "/" + os.fsdecode(self.view.rel(node))
                name = args[position + 1] if position + 1 < len(args) else None
                if node.is_dir and isinstance(name, bytes):
                    path = os.path.join(path, os.fsdecode(name))
                paths.append(shorten(path, 120))
        return "".join(" " + path for path in paths)

    def _node_attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        return self._attributes(self.view.attributes(node))

    def _caller(self, ctx: pyfuse3.RequestContext) -> Caller:
        """Who asks, as the layers store owners (what a new file gets)."""
        uid, gid = self.ownership.uids.stored(ctx.uid), self.ownership.gids.stored(ctx.gid)
        return Caller(
            self.ownership.uids.overflow if uid is None else uid,
            self.ownership.gids.overflow if gid is None else gid,
            ctx.umask,
        )

    def _stored_owner(self, shown: int | None, ids: IdMap) -> int | None:
        """The id chown stores for *shown*: EINVAL if no range holds it (when
        squashing, the owner is left as it is, and chown succeeds)."""
        if shown is None:
            return None
        stored = ids.stored(shown)
        if stored is None and ids.squash is None:
            raise FsError(errno.EINVAL, f"id {shown} is outside the mount's id mapping")
        return stored

    # Lookups ----------------------------------------------------------------

    @_fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_streams()
        if not self.view.lookup_ready(parent_inode, name):
            # A streamed layer may still bring this name: wait off the trio thread.
            await trio.to_thread.run_sync(  # waits that may be abandoned
                self.view.wait_lookup, parent_inode, name, abandon_on_cancel=True
            )
        found = self.view.lookup_with_attributes(parent_inode, name)
        if found is None:
            # st_ino 0 with a timeout: the kernel caches the miss.
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            # While layers stream in, a miss may rest on the stream's order
            # (core/streaming.py): kept briefly, in case that order breaks.
            streaming = self.view.streaming is not None
            negative.entry_timeout = STREAMING_TIMEOUT if streaming else self.timeout
            return negative
        return self._attributes(found[1])

    async def forget(self, inode_list: Any) -> None:
        # forget has no reply to carry an error: a bug here is logged, never raised.
        try:
            for ino, count in inode_list:
                self.view.forget(ino, count)
                if ino not in self.view.nodes:
                    self.lost_writes.forget(ino)
                    if self.backing_files is not None:
                        self.backing_files.forget(ino)
        except Exception:
            log.exception("forget failed")

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self._current_attributes(inode))

    def _current_attributes(self, inode: int) -> Entry:
        try:
            return self.view.getattr(inode)
        except FsError as exc:
            if exc.errno != errno.ESTALE:
                raise
            # Every name of it went while the kernel holds it (fstat after
            # unlink, rmdir or a rename over it, or an O_TMPFILE file): an
            # open descriptor still answers, else the attributes it had.
            handle = self._open_handle(inode)
            if handle is not None:
                return self.view.attributes_of_open(inode, handle.fd)
            last = self.view.last_attributes(inode)
            if last is None:
                raise
            return last

    def _open_handle(self, inode: int, *, write: bool = False) -> Handle | None:
        """A handle with a descriptor open on the inode (for writing if asked)."""
        for handle in self.handles.values():
            if handle.ino == inode and handle.opened and (handle.write or not write):
                return handle
        return None

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.view.readlink(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        # ENOSYS: the kernel stops sending opendir and releasedir, and keeps
        # every listing it has read until the directory changes (each change
        # of a directory's entries passes through the mount, and the kernel
        # drops its cached listing on each). A second walk then costs no
        # request at all. With the patch tools/setup.sh applies to pyfuse3,
        # readdir gets the directory's inode as its handle.
        # Under strictatime every listing counts as an access: none is kept.
        every_listing = self.access_times is not None and self.access_times.policy.every_listing
        if OPENDIR_OPTIONAL and not every_listing:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return inode

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self._check_streams()
        if not self.view.listing_ready(fh):
            # A streamed layer may still bring names here: wait off the trio thread.
            await trio.to_thread.run_sync(  # waits that may be abandoned
                self.view.wait_listing, fh, abandon_on_cancel=True
            )
        if start_id == 0 and self.access_times is not None:
            await self._accessed(fh, directory=True)
        listing = self.view.listdir_with_attributes(fh, start_id)
        try:
            for offset, name, node, entry in listing:
                if not pyfuse3.readdir_reply(token, name, self._attributes(entry), offset):
                    break
                if name not in (b".", b".."):  # the kernel takes no reference for these
                    self.view.remember(node)
        finally:
            listing.close()

    async def releasedir(self, fh: int) -> None:
        return None

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    # Data -------------------------------------------------------------------

    async def _copy_data_up(self, ino: int) -> None:
        """Copy a lower file's data into the writable layer, in a worker thread."""
        missing = self.view.lower_data_missing(ino)
        if missing is not None:  # lazy pulling: fetch it off the trio thread
            await in_worker(self.view.ensure_lower_data, missing)
        if not self.view.needs_data_copy(ino):
            return
        lock = self._copy_locks.setdefault(ino, trio.Lock())
        try:
            async with lock:
                if not self.view.needs_data_copy(ino):
                    return
                job = self.view.prepare_copy(self.view.node(ino))
                try:
                    await in_worker(self.view.fill, job)
                except BaseException:
                    self.view.abandon_copy(job)
                    raise
                self.view.finish_copy(job)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._copy_locks.pop(ino, None)

    def _add_handle(self, ino: int, fd: int, write: bool, version: int | None = None) -> int:
        """A handle for *fd*, reading the data of *version* (default: the current)."""
        fh = self._next_fh
        self._next_fh += 1
        if version is None:
            version = self.view.node(ino).version
        self.handles[fh] = Handle(ino, fd, version, write, self.lost_writes.sample(ino))
        self._opens[ino] = self._opens.get(ino, 0) + 1
        return fh

    def _drop_handle(self, fh: int) -> Handle | None:
        """Forget a handle (released, or its open failed): the caller closes it."""
        handle = self.handles.pop(fh, None)
        if handle is not None:
            left = self._opens[handle.ino] - 1
            if left:
                self._opens[handle.ino] = left
            else:
                del self._opens[handle.ino]
        return handle

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._check_streams()
        write = flags & os.O_ACCMODE != os.O_RDONLY
        truncate = bool(flags & os.O_TRUNC)
        if (write or truncate) and not self.view.writable:
            raise FsError(errno.EROFS)
        if write or truncate:
            await self._all_arrived()
            self.view.refuse_write(inode, append=bool(flags & os.O_APPEND), truncate=truncate)
        if self.reads is not None and not self.view.node(inode).upper:
            self.reads.setdefault(self.view.rel(self.view.node(inode)), None)
        if write or truncate:
            missing = None if truncate else self.view.lower_data_missing(inode)
            if missing is not None:
                # A lazily pulled file's data first, off the trio thread.
                await in_worker(self.view.ensure_lower_data, missing)
            # A large lower file is copied chunk by chunk: the writes copy what
            # they touch, a background task the rest.
            chunked = not truncate and self.view.start_partial(inode)
            if not truncate and not chunked:
                await self._copy_data_up(inode)
            fd = self.view.open_for_write(inode, truncate)
            if truncate and self._kill_setid(inode, ctx):
                # The kernel keeps a file's mode through a truncating open.
                await in_worker(_invalidate_attributes, [inode])
            if chunked and self.background is not None:
                self.background.start_soon(self._fill_in_background, inode)
            # Its close reports what the background copy meets.
            return await self._answer(self._add_handle(inode, fd, write), flush=chunked)
        if self.access_times is not None:
            await self._accessed(inode, directory=False)
        # Nothing waits from here to the answer but a cold open, which
        # takes the version before it: the node, its version and what
        # _backable answers stay as they are now (_answer need not ask again).
        node = self.view.node(inode)
        backable = self.passthrough is not None and self._backable(node)
        if backable:
            # The kernel reads the host file itself: nothing to open here but
            # the file it registers.
            fh = self._add_handle(inode, NOT_OPENED, write, node.version)
            return await self._answer(fh, backable=True)
        elif node.partial is not None:
            fd = self.view.open_data(inode, write=True)  # reads go through the partial copy
        elif self.view.lower_data_is_fixed(node):
            # Opened at the first read that reaches the daemon: most opens of
            # a lower file read pages the kernel keeps (keep_cache), and then
            # neither the open nor the close costs a system call here.
            fd = NOT_OPENED
        else:
            cached = self.view.open_cached(inode)
            self.view.opened_lower(inode, cold=cached is None)
            if cached is None:
                # An open that may wait for the disk goes to a worker thread,
                # which reads a small lower file whole while it is there: its
                # pages are not in the cache either, and the read follows.
                # The version before the open: a copy-up while the worker
                # runs makes the first read reopen (and skip what was read).
                version = node.version
                fd, head = await self._open_moving(inode, self._open_cold)
                fh = self._add_handle(inode, fd, write, version)
                self.handles[fh].head = head
                return await self._answer(fh)
            fd = cached
        fh = self._add_handle(inode, fd, write, node.version)
        return await self._answer(fh, backable=backable)

    async def _accessed(self, inode: int, *, directory: bool) -> None:
        """An open for reading, or a listing: the container layer's copy gets
        the atime the mount's rule gives it (core/atime.py), and the kernel
        forgets the one it keeps. Lower layers' files keep theirs."""
        assert self.access_times is not None
        found = self.view.access_place(inode)
        if found is None:
            return
        place, st = found
        if st is not None and not self.access_times.may_change(st, directory):
            # The lstat that found the file says the host would keep its
            # atime (relatime, read since its last change): no open to ask.
            return
        try:
            try:  # mostly all in the caches: no thread, however busy the mount
                changed = self.access_times.accessed(place, directory, nowait=True)
                blocked = False
            except BlockingIOError:
                blocked = True  # (awaited outside the except clause: see unionfs.native)
            if blocked:
                changed = await _briefly_blocking(self.access_times.accessed, place, directory)
        except OSError as exc:  # moved or removed meanwhile: nothing was read
            log.debug("atime of inode %d not updated: %s", inode, exc)
            return
        if changed:
            _invalidate_attributes([inode])  # attributes only: never blocks, no thread

    @staticmethod
    def _file_info(fh: int, *, flush: bool = False, keep_cache: bool = True) -> pyfuse3.FileInfo:
        """What open answers without passthrough: pages kept across opens; a
        flush at close only where it may have an error to report."""
        info = pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)
        if NOFLUSH:
            info.noflush = not flush
        return info

    def _backable(self, node: Node) -> bool:
        """Whether the kernel may read and write the node's data itself (see
        passthrough.py): a whole upper file, or a lower file here (not still
        to be pulled or streamed in) on a mount that cannot change it."""
        assert self.passthrough is not None
        if self.passthrough.failed or node.partial is not None or self.view.streaming is not None:
            return False
        if self.view.is_tmpfile(node.ino):
            return False
        if node.upper and not node.metacopy:
            return True
        return self.passthrough.lower and self.view.lower_data_missing(node.ino) is None

    async def _answer(
        self,
        fh: int,
        *,
        flush: bool = False,
        backable: bool | None = None,
        made: DataSource | None = None,
    ) -> pyfuse3.FileInfo:
        """What open and create answer for a new handle: with passthrough
        where the inode's open files allow it (see passthrough.py), else
        cached. A handle whose open fails here is dropped. *backable*: what
        _backable answered for it, if nothing could change it since; *made*:
        the data source of the file create made for it (its descriptor's)."""
        files, passthrough = self.backing_files, self.passthrough
        if files is None:
            return self._file_info(fh, flush=flush)
        handle = self.handles[fh]
        try:
            outstanding = files.outstanding(handle.ino)
            if outstanding is not None and outstanding != CACHED:
                assert passthrough is not None  # backing files come only once it is in use
                info = await self._answer_backed(passthrough, handle, fh, flush)
                if info is not None:
                    return info
                raise FsError(errno.EIO, "passthrough failed for a file open through it")
            if (
                outstanding is None
                and passthrough is not None
                and (self._backable(self.view.node(handle.ino)) if backable is None else backable)
            ):
                info = await self._answer_backed(passthrough, handle, fh, flush, made)
                if info is not None:
                    return info
            handle.io = CACHED
            keep = files.open_cached(handle.ino)
            return self._file_info(fh, flush=flush, keep_cache=keep)
        except BaseException:
            self._drop_handle(fh)
            handle.close()
            raise

    async def _answer_backed(
        self,
        passthrough: Passthrough,
        handle: Handle,
        fh: int,
        flush: bool,
        made: DataSource | None = None,
    ) -> pyfuse3.FileInfo | None:
        """Answer with the inode's backing file (registered now if it has
        none); None: answer cached (cached opens came meanwhile, or
        registering failed, which ends passthrough here). *made*: as _answer."""
        if made is not None:
            source, identity = made, made.upper_file
        else:
            source = self.view.data_source(handle.ino, write=handle.write)
            identity = self._identity(handle, source)
        try:
            backing_id = passthrough.files.attach(handle.ino, identity)
            if backing_id is None:
                backing_id = await self._register(passthrough, handle.ino, source)
        except Busy:
            raise FsError(
                errno.EIO, "its open files use another backing file than its data now"
            ) from None
        if backing_id is None:
            return None
        handle.io = PASSTHROUGH
        if handle.write and made is None:
            writers = self._kernel_writes.setdefault(handle.ino, set())
            if not writers:
                # Attributes the kernel has (with the long timeout) are asked again.
                _invalidate_attributes([handle.ino])
            writers.add(fh)
        info = pyfuse3.FileInfo(fh=fh, keep_cache=False)
        # (Typed loosely: pyfuse3 has the field only with passthrough built in.)
        cast(Any, info).backing_id = backing_id
        if NOFLUSH:
            info.noflush = not flush
        return info

    def _identity(self, handle: Handle, source: DataSource) -> Identity | None:
        """The host file holding the data *source* names (None: no one file)."""
        assert self.passthrough is not None
        if source.lower is not None:
            return self.passthrough.trees.lower_identity(source.lower)
        if source.anchor is not None:
            return source.upper_file
        if source.upper is None:
            return None
        if handle.opened:
            st = os.fstat(handle.fd)
        elif source.upper_file is not None:
            return source.upper_file
        else:
            assert self.view.store is not None
            st = os.lstat(self.view.store.host_path(source.upper))
        return (st.st_dev, st.st_ino)

    async def _register(self, passthrough: Passthrough, ino: int, source: DataSource) -> int | None:
        """Open the host file *source* names through the private mounts and
        register it: its backing id, or None (see _answer_backed)."""
        if source.partial is not None:
            return None
        try:
            cached: int | None = passthrough.trees.open(source, cached_only=True)
        except BlockingIOError:
            cached = None  # (awaited outside the except clause: see unionfs.native)
        self.view.opened_lower(ino, cold=cached is None)
        fd = cached if cached is not None else await self._open_moving(ino, passthrough.trees.open)
        try:
            return passthrough.files.register(ino, fd)
        except OSError as exc:
            log.error("passthrough: cannot register a backing file (%s); not used any more",
                      exc.strerror)  # fmt: skip
            passthrough.failed = True
            return None
        finally:
            os.close(fd)

    async def _open_moving(self, ino: int, opener: Callable[[DataSource], T]) -> T:
        """Open the node's data (in a worker thread if other requests wait:
        _briefly_blocking) where the request thread found it. If the file
        moved meanwhile, that path no longer leads to it (nor, beneath
        UPPER, through a symlink anywhere else): open it again where it is."""
        source = self.view.data_source(ino)
        for _ in range(2):
            try:
                return await _briefly_blocking(opener, source)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):
                    raise
                moved = self.view.data_source(ino)
                if moved == source:
                    raise
                source = moved
        return await _briefly_blocking(opener, source)

    def _open_cold(self, source: DataSource) -> tuple[int, bytes | None]:
        """Open (and read a small lower file). Safe in a worker thread: it
        opens what the request thread decided, and reads no node."""
        fd = self.view.open_source(source)
        if source.lower is None or os.fstat(fd).st_size > PREFETCH_MAX:
            return fd, None  # an upper file may change under the handle: read when asked
        try:
            return fd, os.pread(fd, PREFETCH_MAX + 1, 0)
        except OSError:
            return fd, None

    @_fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        await self._all_arrived()  # changes need the whole tree
        node, fd = self.view.create(parent_inode, name, mode, flags,
                                    self._caller(ctx))  # fmt: skip
        made = os.fstat(fd)
        attributes = self._attributes(self.view.attributes(node, made))
        fh = self._add_handle(node.ino, fd, True)
        return await self._answer(fh, made=self.view.made_source(node, made)), attributes

    @_fuse_errors
    async def tmpfile(
        self, parent_inode: int, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        await self._all_arrived()  # changes need the whole tree
        node, fd = self.view.tmpfile(parent_inode, mode, self._caller(ctx))
        attributes = self._attributes(self.view.attributes_of_open(node.ino, fd))
        # Served through the daemon: a file with no name has no backing path.
        return await self._answer(self._add_handle(node.ino, fd, True)), attributes

    async def _open_late(self, handle: Handle) -> None:
        """Open the descriptor of a handle opened without one, at its first
        read: where its data is now (a copy-up since the open reads the copy)."""
        version = self.view.node(handle.ino).version
        cached = self.view.open_cached(handle.ino)
        self.view.opened_lower(handle.ino, cold=cached is None)
        head = None
        if cached is None:
            fd, head = await self._open_moving(handle.ino, self._open_cold)
        else:
            fd = cached
        if handle.opened:  # a concurrent read of the same handle opened it first
            os.close(fd)
            return
        handle.fd, handle.version, handle.head = fd, version, head

    async def _current_fd(self, handle: Handle) -> int:
        """The handle's descriptor, reopened if the data moved up since it was opened."""
        node = self.view.nodes.get(handle.ino)
        if node is not None and node.version != handle.version and not handle.write:
            version = node.version
            fd = await self._open_moving(handle.ino, self.view.open_source)
            if handle.version == version:  # a concurrent read reopened it first
                os.close(fd)
            else:
                handle.replaced = [*(handle.replaced or ()), handle.fd]
                handle.fd, handle.version = fd, version
        return handle.fd

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles[fh]
        if not handle.opened:
            await self._open_late(handle)
        if handle.head is not None:
            head = handle.head
            node = self.view.nodes.get(handle.ino)
            if node is not None and node.version == handle.version:
                if off + size >= len(head):
                    handle.head = None  # read to the end: the kernel caches the pages
                return head[off : off + size]
            handle.head = None
        partial = self.view.partial(handle.ino)
        if partial is not None:
            data = await in_worker(partial.read, off, size)
            if data is not None:
                return data
        fd = await self._current_fd(handle)
        # Pages in the cache are copied here: a worker thread costs ~100x a
        # cached read. What would wait for the disk goes to a worker, unless
        # nothing else waits meanwhile.
        data = read_cached(fd, size, off)
        if data is not None:
            return data
        return await _briefly_blocking(os.pread, fd, size, off)

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        partial = self.view.partial(handle.ino)
        if partial is not None:
            written = await in_worker(partial.write, off, buf)
            if written is not None:
                return written
        if len(buf) <= INLINE_WRITE_MAX:
            # A small buffered write only copies into the page cache: cheaper
            # here than the hop to a worker thread (fsync is where the disk waits).
            return os.pwrite(handle.fd, buf, off)
        return await in_worker(os.pwrite, handle.fd, buf, off)

    async def _fill_in_background(self, ino: int) -> None:
        """Copy a partial copy's remaining chunks, one per worker-thread call,
        so requests interleave; then make it a whole file. Cancelled at
        unmount, where the mount fills what is left."""
        try:
            partial = self.view.partial(ino)
            while partial is not None and await in_worker(partial.fill_next):
                pass
            await self._copy_data_up(ino)
        except FsError as failure:
            if failure.errno not in (errno.ESTALE, errno.ENOENT):  # else: unlinked meanwhile
                log.error("copy-up of inode %d in the background failed: %s", ino, failure)
                self.lost_writes.record(ino, OSError(failure.errno, failure.args[1]))
        except OSError as exc:
            # The file still reads right (what was not copied is read from
            # the lower file); its next fsync says the copy failed.
            log.error("copy-up of inode %d in the background failed: %s", ino, exc)
            self.lost_writes.record(ino, exc)

    async def _whole(self, ino: int | None) -> None:
        """Finish a partial copy before a change that needs the whole data."""
        if ino is not None and self.view.partial(ino) is not None:
            await self._copy_data_up(ino)

    @_fuse_errors
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the upper copy a write handle has (the kernel sends
        allocation, KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE); the host answers
        for what its filesystem supports, as under overlayfs."""
        await self._all_arrived()  # changes need the whole tree
        handle = self.handles[fh]
        if not handle.write:
            raise FsError(errno.EBADF)
        # As vfs_fallocate: an append-only file may only grow in place.
        protection = self.view.file_flags(handle.ino)
        if protection & fileflags.IMMUTABLE_FL or (
            protection & fileflags.APPEND_FL and mode & ~_FALLOC_FL_KEEP_SIZE
        ):
            raise FsError(errno.EPERM)
        # The whole data first: a punched or zeroed range of a chunked copy
        # must never be filled from the lower file afterwards.
        await self._copy_data_up(handle.ino)
        await in_worker(fallocate, handle.fd, mode, offset, length)

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handles[fh]
        if handle.opened:
            await self._sync(handle.fd, datasync)
        elif handle.io == PASSTHROUGH and self._is_upper(handle.ino):
            # A backed handle opened for reading keeps no descriptor here, but
            # fsync covers what other descriptors wrote to the file.
            fd = await self._open_moving(handle.ino, self.view.open_source)
            try:
                await self._sync(fd, datasync)
            finally:
                os.close(fd)
        # Else a lower file, never read here: nothing to sync.
        self.lost_writes.check(handle)

    async def _sync(self, fd: int, datasync: bool) -> None:
        """fsync (fdatasync) off the trio thread: by the kernel's AIO workers
        where it takes it (kernel_sync.py), else in a worker thread."""
        if self.kernel_sync is not None:
            try:
                return await self.kernel_sync.sync(fd, datasync)
            except Unavailable:
                pass
        await in_worker(os.fdatasync if datasync else os.fsync, fd)

    def _is_upper(self, ino: int) -> bool:
        node = self.view.nodes.get(ino)
        return node is not None and node.upper

    @_fuse_errors
    async def flush(self, fh: int) -> None:
        # Nothing is buffered here, so close(2) has nothing to wait for; it
        # reports what a background copy-up of the file met, as fsync does.
        # Without FOPEN_NOFLUSH every close would ask: ENOSYS then tells the
        # kernel never to send flush again (one request less per close).
        if not NOFLUSH:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        handle = self.handles.get(fh)
        if handle is not None:
            self.lost_writes.check(handle)

    @_fuse_errors
    async def release(self, fh: int) -> None:
        handle = self._drop_handle(fh)
        if handle is not None:
            handle.close()
            if handle.io is not None and self.backing_files is not None:
                self.backing_files.release(handle.ino, handle.io)
            writers = self._kernel_writes.get(handle.ino) if handle.write else None
            if writers is not None:
                writers.discard(fh)
                if not writers:
                    del self._kernel_writes[handle.ino]

    # Changes ----------------------------------------------------------------

    @_fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        await self._all_arrived()  # changes need the whole tree
        if not self.view.writable:
            raise FsError(errno.EROFS)
        if fields.update_size and attr.st_size:
            await self._copy_data_up(inode)
        handle = self.handles.get(fh) if fh is not None else None
        if handle is None and self.view.last_attributes(inode) is not None:
            handle = self._open_handle(inode, write=True)  # no name left to change it by
        mode = attr.st_mode if fields.update_mode else None
        if mode is None and self._may_kill_setid(fields):
            cleared = self._mode_without_setid(inode, ctx)
            # Asked last: it reads the caller's /proc status.
            if cleared is not None and (
                getattr(fields, "kill_suidgid", False) or not _caller_may_keep_setid(ctx)
            ):
                mode = cleared
        entry = self.view.setattr(
            inode,
            mode=mode,
            uid=self._stored_owner(attr.st_uid if fields.update_uid else None, self.ownership.uids),
            gid=self._stored_owner(attr.st_gid if fields.update_gid else None, self.ownership.gids),
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fd=handle.fd if handle is not None and handle.write else None,
            times_given=_times_given(fields),
        )
        return self._attributes(entry)

    @staticmethod
    def _may_kill_setid(fields: pyfuse3.SetattrFields) -> bool:
        """Whether a setattr may ask for the set-id bits to go (under
        KILLPRIV_V2). The kernel flags a chown, and a truncation by a caller
        without CAP_FSETID (kill_suidgid). Before a write by such a caller it
        sends a setattr of no field at all (its own clearing, with the bits
        left to strata); it sends that too before removing a file capability,
        whoever writes, so for that one the caller must be asked."""
        if getattr(fields, "kill_suidgid", False):
            return True
        changes = (
            fields.update_mode, fields.update_uid, fields.update_gid, fields.update_size,
            fields.update_atime, fields.update_mtime, fields.update_ctime,
        )  # fmt: skip
        return not any(changes)

    def _mode_without_setid(self, inode: int, ctx: pyfuse3.RequestContext) -> int | None:
        """The file's mode as the kernel leaves it when it drops set-id bits
        (a chown, or a write or truncation by a caller without CAP_FSETID):
        no S_ISUID, and no S_ISGID where the group may execute, or where the
        caller is neither in the file's group nor has CAP_FSETID; None if that
        changes nothing."""
        attrs = self._attributes(self._current_attributes(inode))
        mode = attrs.st_mode
        if not stat.S_ISREG(mode):
            return None
        kept = mode & ~stat.S_ISUID
        if mode & stat.S_ISGID and (
            mode & stat.S_IXGRP  # else asked only here: it reads the caller's /proc status
            or not (_caller_in_group(ctx, attrs.st_gid) or _caller_may_keep_setid(ctx))
        ):
            kept &= ~stat.S_ISGID
        return kept if kept != mode else None

    def _kill_setid(self, inode: int, ctx: pyfuse3.RequestContext) -> bool:
        """Clear the set-id bits of a file a caller without CAP_FSETID truncates
        by open(O_TRUNC): the kernel leaves that to a filesystem that
        truncates in open (FUSE_ATOMIC_O_TRUNC), and libfuse does not pass on
        its flag for it. True if the mode changed."""
        mode = self._mode_without_setid(inode, ctx)
        if mode is None or _caller_may_keep_setid(ctx):  # the /proc read last
            return False
        self.view.setattr(inode, mode=mode)
        return True

    @_fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._all_arrived()  # changes need the whole tree
        node = self.view.mkdir(parent_inode, name, mode, self._caller(ctx))
        return self._node_attributes(node)

    @_fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._all_arrived()  # changes need the whole tree
        node = self.view.mknod(parent_inode, name, mode, rdev, self._caller(ctx))
        return self._node_attributes(node)

    @_fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._all_arrived()  # changes need the whole tree
        node = self.view.symlink(parent_inode, name, target, self._caller(ctx))
        return self._node_attributes(node)

    @_fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._all_arrived()  # changes need the whole tree
        if self.view.is_tmpfile(inode):
            handle = self._open_handle(inode)
            if handle is None:  # linkat passes a descriptor: there is one
                raise FsError(errno.ENOENT)
            node = self.view.link_tmpfile(inode, handle.fd, new_parent_inode, new_name)
            return self._node_attributes(node)
        await self._whole(inode)
        return self._node_attributes(self.view.link(inode, new_parent_inode, new_name))

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._all_arrived()  # changes need the whole tree
        self.view.unlink(parent_inode, name)

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._all_arrived()  # changes need the whole tree
        self.view.rmdir(parent_inode, name)

    @_fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self._all_arrived()  # changes need the whole tree
        moving = self.view.peek(parent_inode_old, name_old)
        if moving is not None:
            await self._copy_data_up(moving.ino)
        if flags & RENAME_EXCHANGE:
            other = self.view.peek(parent_inode_new, name_new)
            if other is not None:
                await self._copy_data_up(other.ino)
        self.view.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # File flags (chattr, lsattr) ---------------------------------------------

    # The only ioctls strata answers; the kernel turns chattr's and lsattr's
    # (and xfs_io's) into these, on a file it opens for the purpose.
    ioctl_commands = frozenset(
        {_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_IOC_FSGETXATTR, _FS_IOC_FSSETXATTR}
    )

    @_fuse_errors
    async def ioctl(
        self, inode: int, fh: int, cmd: int, data: bytes, out_size: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[int, bytes]:  # fmt: skip
        if cmd == _FS_IOC_GETFLAGS:
            return 0, struct.pack("<I", self.view.file_flags(inode))[:out_size]
        if cmd == _FS_IOC_FSGETXATTR:
            xflags = fileflags.to_xflags(self.view.file_flags(inode))
            return 0, _FSXATTR.pack(xflags, 0, 0, 0, 0)[:out_size]
        # The kernel has checked the caller may (owner, CAP_LINUX_IMMUTABLE).
        await self._all_arrived()  # changes need the whole tree
        if not self.view.writable:
            raise FsError(errno.EROFS)
        if cmd == _FS_IOC_SETFLAGS and len(data) >= 4:
            self.view.set_file_flags(inode, struct.unpack_from("<I", data)[0])
        elif cmd == _FS_IOC_FSSETXATTR and len(data) >= _FSXATTR.size:
            flags = fileflags.from_xflags(_FSXATTR.unpack_from(data)[0])
            if flags is None:
                raise FsError(errno.EOPNOTSUPP)
            self.view.set_file_flags(inode, flags)
        else:
            raise FsError(errno.EINVAL)
        return 0, b""

    # Extended attributes ----------------------------------------------------

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self.view.find_xattr(inode, name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.view.listxattr(inode)

    @_fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self._all_arrived()  # changes need the whole tree
        if not self.view.writable:
            raise FsError(errno.EROFS)
        self.view.setxattr(inode, name, value)
        if name == acl.ACCESS:
            # The host keeps the mode in step with the ACL, but as its root:
            # the caller's S_ISGID rule is strata's to apply (posix_acl_update_mode).
            attrs = self._attributes(self.view.getattr(inode))
            gid = attrs.st_gid
            if attrs.st_mode & stat.S_ISGID and not (
                _caller_in_group(ctx, gid) or _caller_may_keep_setid(ctx)
            ):
                self.view.setattr(inode, mode=stat.S_IMODE(attrs.st_mode) & ~stat.S_ISGID)

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._all_arrived()  # changes need the whole tree
        if not self.view.writable:
            raise FsError(errno.EROFS)
        self.view.removexattr(inode, name)

    # The filesystem ---------------------------------------------------------

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await in_worker(os.statvfs, self.view.statfs_path())
        data = pyfuse3.StatvfsData()
        data.f_bsize = st.f_bsize
        data.f_frsize = st.f_frsize
        data.f_blocks = st.f_blocks
        data.f_bfree = st.f_bfree
        data.f_bavail = st.f_bavail
        data.f_files = st.f_files
        data.f_ffree = st.f_ffree
        data.f_favail = st.f_favail
        data.f_namemax = st.f_namemax
        return data

    @_fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self.view.node(inode)
        return True
