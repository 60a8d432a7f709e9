"""A minimal read-only pyfuse3 passthrough of one directory, on trio: the
floor of what a Python FUSE filesystem costs per request on this machine,
against which `strata bench` W8 shows strata's own work.

    python benchmarks/passthrough.py SOURCE MOUNTPOINT
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Any

import pyfuse3
import trio


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self.paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: os.fsencode(source)}
        self.by_host: dict[int, int] = {}
        self.next_ino = pyfuse3.ROOT_INODE + 1

    def _entry(self, path: bytes) -> pyfuse3.EntryAttributes:
        st = os.lstat(path)
        ino = self.by_host.get(st.st_ino)
        if ino is None:
            ino = self.by_host[st.st_ino] = self.next_ino
            self.next_ino += 1
            self.paths[ino] = path
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.entry_timeout = attrs.attr_timeout = 24 * 3600.0
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                      "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blocks"):  # fmt: skip
            setattr(attrs, field, getattr(st, field))
        attrs.st_blksize = 4096
        return attrs

    async def lookup(self, parent: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        try:
            return self._entry(os.path.join(self.paths[parent], name))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc

    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._entry(self.paths[inode])

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        names = sorted(os.listdir(self.paths[fh]))
        for index, name in enumerate(names[start_id:], start=start_id):
            attrs = self._entry(os.path.join(self.paths[fh], os.fsencode(name)))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, index + 1):
                break

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        fd = await trio.to_thread.run_sync(os.open, self.paths[inode], os.O_RDONLY)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, fh, size, off)

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.readlink(self.paths[inode])

    async def forget(self, inode_list: Any) -> None:
        return None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        st = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):  # fmt: skip
            setattr(data, field, getattr(st, field))
        return data


def main() -> None:
    source, mountpoint = sys.argv[1:3]
    if not stat.S_ISDIR(os.stat(source).st_mode):
        raise SystemExit(f"{source}: not a directory")
    options = set(pyfuse3.default_options)
    options |= {"fsname=passthrough", "ro", "noatime"}
    pyfuse3.init(Passthrough(source), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
