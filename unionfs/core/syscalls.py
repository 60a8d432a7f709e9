"""System calls that Python's os module lacks, made through ctypes.

A module of their own, left Python: mypyc compiles the modules that call
them (the request path, unionfs.native) but not a ctypes structure. Each
raises OSError as an os function would.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]

AT_FDCWD = -100
# System call numbers of the unified table: the same on every architecture.
_SYS_OPEN_TREE = 428
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442
_SYS_FCHMODAT2 = 452  # Linux 6.6
# The AIO calls (io_setup, io_destroy, io_getevents, io_submit): by architecture.
_AIO_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_FSYNC, _IOCB_CMD_FDSYNC = 2, 3
_IOCB_FLAG_RESFD = 1


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _Iocb(ctypes.Structure):
    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _failed(filename: bytes | None = None, filename2: bytes | None = None) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code), filename, None, filename2)


def _syscall(number: int, path: bytes, *args: object) -> int:
    """syscall(2) *number* with *args*: its result, OSError naming *path*
    where it fails."""
    result = _libc.syscall(number, *args)
    if result < 0:
        raise _failed(path)
    return int(result)


def openat2(dir_fd: int, path: bytes, flags: int, resolve: int) -> int:
    """openat2(2) with no mode: a descriptor."""
    how = _OpenHow(flags, 0, resolve)
    size = ctypes.c_size_t(ctypes.sizeof(how))
    return _syscall(_SYS_OPENAT2, path, ctypes.c_int(dir_fd), path, ctypes.byref(how), size)


def fchmodat2(dir_fd: int, path: bytes, mode: int, flags: int) -> None:
    """fchmodat2(2): fchmodat that takes AT_SYMLINK_NOFOLLOW."""
    _syscall(_SYS_FCHMODAT2, path, ctypes.c_int(dir_fd), path, ctypes.c_uint(mode),
             ctypes.c_uint(flags))  # fmt: skip


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself: glibc's posix_fallocate writes zeros where the
    filesystem cannot allocate, which would fill a hole with real blocks."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        raise _failed()


def renameat2(old: bytes, new: bytes, flags: int = 0) -> None:
    """renameat2(2) of two paths (RENAME_NOREPLACE, _EXCHANGE, _WHITEOUT)."""
    if _libc.renameat2(AT_FDCWD, old, AT_FDCWD, new, flags) != 0:
        raise _failed(old, new)


def linkat(old: bytes, new: bytes, flags: int) -> None:
    """linkat(2) of two paths, which os.link does not take flags for."""
    if _libc.linkat(AT_FDCWD, old, AT_FDCWD, new, flags) != 0:
        raise _failed(old, new)


def open_tree(path: bytes, flags: int) -> int:
    """open_tree(2): a descriptor of the mount at *path* (a copy of it with
    OPEN_TREE_CLONE)."""
    return _syscall(_SYS_OPEN_TREE, path, ctypes.c_int(AT_FDCWD), path, ctypes.c_uint(flags))


def mount_setattr(fd: int, path: bytes, flags: int, attr_set: int, attr_clr: int) -> None:
    """mount_setattr(2) with no propagation or id mapping change."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    size = ctypes.c_size_t(ctypes.sizeof(attr))
    _syscall(_SYS_MOUNT_SETATTR, path, ctypes.c_int(fd), path, ctypes.c_uint(flags),
             ctypes.byref(attr), size)  # fmt: skip


def mount(source: bytes | None, target: bytes, flags: int) -> None:
    """mount(2) with no filesystem type or data: a bind, or its remount."""
    if _libc.mount(source, target, None, flags, None) != 0:
        raise _failed(target)


def umount2(target: bytes, flags: int) -> None:
    if _libc.umount2(target, flags) != 0:
        raise _failed(target)


class AioContext:
    """A Linux AIO context (4.18+) for fsync and fdatasync requests, whose
    completions are signalled on an eventfd."""

    EVENTS = 64  # completions collected per io_getevents

    def __init__(self, depth: int) -> None:
        numbers = _AIO_SYSCALLS.get(platform.machine())
        if numbers is None:
            raise OSError(errno.ENOSYS, f"no AIO system call numbers for {platform.machine()}")
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._context = ctypes.c_ulong(0)
        if _libc.syscall(self._setup, depth, ctypes.byref(self._context)) != 0:
            raise _failed()
        self._events = (_IoEvent * self.EVENTS)()
        self._no_wait = _Timespec(0, 0)

    def submit_sync(self, key: int, fd: int, datasync: bool, eventfd: int) -> None:
        """Submit an fsync of *fd* (fdatasync with *datasync*) known by *key*;
        the kernel copies the request and takes its own reference to the file."""
        request = _Iocb(
            aio_data=key,
            aio_lio_opcode=_IOCB_CMD_FDSYNC if datasync else _IOCB_CMD_FSYNC,
            aio_fildes=fd,
            aio_flags=_IOCB_FLAG_RESFD,
            aio_resfd=eventfd,
        )
        requests = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(request))
        if _libc.syscall(self._submit, self._context, 1, requests) != 1:
            raise _failed()

    def finished(self) -> list[tuple[int, int]]:
        """The requests finished since last asked, without waiting: each
        one's key and result (-errno where it failed); at most EVENTS."""
        found = _libc.syscall(
            self._getevents, self._context, 0, self.EVENTS, self._events,
            ctypes.byref(self._no_wait),
        )  # fmt: skip
        return [(int(event.data), int(event.res)) for event in self._events[: max(found, 0)]]

    def close(self) -> None:
        """Wait for the requests in flight (io_destroy does) and free the context."""
        _libc.syscall(self._destroy, self._context)
