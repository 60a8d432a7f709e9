"""The pyfuse3 adapter: translates kernel requests to the merged view.

Every handler runs on the trio thread; anything that may block on a disk
(opening or reading layer files) goes to a worker thread.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from .core.records import Entry
from .core.view import FsError, MergedView

log = logging.getLogger(__name__)

# Lower layers never change under a mount, so the kernel may keep what it learns.
LOWER_TIMEOUT = 24 * 3600.0

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _fuse_errors(handler: F) -> F:
    """Turn core and OS errors into FUSE replies with the same errno."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except FsError as exc:
            if exc.errno == errno.ESTALE:
                log.error("%s", exc.args[1])
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    return cast(F, wrapper)


class StrataOperations(pyfuse3.Operations):
    def __init__(self, view: MergedView, *, timeout: float = LOWER_TIMEOUT) -> None:
        super().__init__()
        self.view = view
        self.timeout = timeout

    def _attributes(self, entry: Entry) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = entry.ino
        attrs.generation = 0
        attrs.entry_timeout = self.timeout
        attrs.attr_timeout = self.timeout
        attrs.st_mode = entry.mode
        attrs.st_nlink = entry.nlink
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

    @_fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        entry = self.view.lookup(parent_inode, name)
        if entry is None:
            # st_ino 0 with a timeout: the kernel caches the miss.
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self.timeout
            return negative
        return self._attributes(entry)

    async def forget(self, inode_list: Any) -> None:
        for ino, count in inode_list:
            self.view.forget(ino, count)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self.view.entry(inode))

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.view.readlink(inode)

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not self.view.entry(inode).is_dir:
            raise FsError(errno.ENOTDIR)
        return inode

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.view.listdir(fh, start_id)
        try:
            for offset, name, entry in listing:
                if not pyfuse3.readdir_reply(token, name, self._attributes(entry), offset):
                    break
                if name not in (b".", b".."):  # the kernel takes no reference for these
                    self.view.remember(entry, fh)
        finally:
            listing.close()

    async def releasedir(self, fh: int) -> None:
        return None

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FsError(errno.EROFS)
        fd = await trio.to_thread.run_sync(self.view.open_data, inode)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, fh, size, off)

    async def release(self, fh: int) -> None:
        os.close(fh)

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await trio.to_thread.run_sync(os.statvfs, self.view.statfs_path())
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
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.view.getxattr(inode, name)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.view.listxattr(inode)

    @_fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self.view.entry(inode)
        return True
