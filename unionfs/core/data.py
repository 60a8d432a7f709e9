"""File data on its way into UPPER: copied by the fastest path with holes
kept, its space reserved before a copy becomes visible, and strata's own
writes kept from changing what the file shows."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator

from .syscalls import fallocate

CAPABILITY_XATTR = "security.capability"

_FICLONE = 0x40049409
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
# What a filesystem without fallocate answers: the copy is then made whole.
NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS)


def copy_data(source: int, target: int, size: int) -> None:
    """Copy *size* bytes by the fastest path: reflink, then copy_file_range
    over the data segments (holes stay holes), then sendfile."""
    try:
        fcntl.ioctl(target, _FICLONE, source)
        return
    except OSError:
        pass
    for start, end in data_segments(source, 0, size):
        _copy_range(source, target, start, end)
    os.ftruncate(target, size)


def data_segments(fd: int, offset: int, end: int) -> list[tuple[int, int]]:
    """The ranges of [offset, end) that hold data (the rest are holes)."""
    segments = []
    try:
        while offset < end:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            if start >= end:
                break
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            segments.append((start, stop))
            offset = stop
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data after offset
            return segments
        return [(offset, end)] if offset < end else segments  # no SEEK_DATA: all of it
    return segments


def _copy_range(source: int, target: int, start: int, end: int) -> None:
    offset = start
    try:
        while offset < end:
            copied = os.copy_file_range(source, target, end - offset, offset, offset)
            if copied == 0:
                return
            offset += copied
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    os.lseek(target, offset, os.SEEK_SET)
    while offset < end:
        sent = os.sendfile(target, source, offset, end - offset)
        if sent == 0:
            return
        offset += sent


def read_cached(fd: int, size: int, offset: int) -> bytes | None:
    """*size* bytes at *offset* if the page cache holds them all (the read
    cannot wait for the disk), else None: then a worker thread reads.
    Short only at the end of the file, as a read(2) is."""
    buffer = bytearray(size)
    try:
        got = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    # A read the cache could serve only in part stops early: the rest is at
    # the disk, not past the end.
    if got < size and offset + got < os.fstat(fd).st_size:
        return None
    return bytes(buffer) if got == size else bytes(buffer[:got])


def write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite all of *data*: a filesystem that runs out of space mid-way
    writes less than asked, and the rest must not be taken as written."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]
        offset += written


def can_reserve(directory: bytes) -> bool:
    """Whether files in *directory* can have space allocated ahead (fallocate)."""
    fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, 1)
        return True
    except OSError as exc:
        if exc.errno in NOT_SUPPORTED:
            return False
        raise
    finally:
        os.close(fd)


def reserve_space(target: int, source: int, size: int) -> None:
    """Allocate in *target* (a sparse copy of *source*'s size whose data is
    not written yet) the blocks *source*'s data will take, so that copying
    it later cannot run out of space. On failure (ENOSPC, EDQUOT) nothing
    stays allocated and the error is raised; a filesystem without fallocate
    reserves nothing."""
    try:
        with data_written_unseen(target):
            for start, end in data_segments(source, 0, size):
                fallocate(target, _FALLOC_FL_KEEP_SIZE, start, end - start)
    except OSError as exc:
        release_space(target, size)
        if exc.errno not in NOT_SUPPORTED:  # else the copy finds out for itself
            raise
    except BaseException:
        release_space(target, size)
        raise


def release_space(target: int, size: int) -> None:
    """Give back every block of *target*, a copy whose data is not in use (a
    metadata-only copy, or one whose copy failed): it reads as holes after."""
    with contextlib.suppress(OSError), data_written_unseen(target):
        try:
            fallocate(target, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, max(size, 1))
        except OSError:
            os.ftruncate(target, 0)
            os.ftruncate(target, size)


def file_capability(fd: int) -> bytes | None:
    try:
        return os.getxattr(fd, CAPABILITY_XATTR)
    except OSError:
        return None


@contextlib.contextmanager
def data_written_unseen(fd: int) -> Iterator[None]:
    """Around strata's own data writes into an upper file (a copy-up): put back
    what the host kernel changes on a write, so the copy shows as before: the
    times, the file capability, and set-id bits (stripped without CAP_FSETID)."""
    before = os.fstat(fd)
    capability = file_capability(fd)

    def put_back() -> None:
        if capability is not None:
            os.setxattr(fd, CAPABILITY_XATTR, capability)
        if os.fstat(fd).st_mode != before.st_mode:
            os.fchmod(fd, stat.S_IMODE(before.st_mode))
        os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))

    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):  # the first error is the one to tell
            put_back()
        raise
    put_back()
