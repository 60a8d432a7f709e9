"""System calls that Python's os module lacks, made through ctypes.

A module of their own, left Python: mypyc compiles the modules that call
them (the request path, unionfs.native) but not a ctypes structure. Each
raises OSError as an os function would.
"""

from __future__ import annotations

import ctypes
import os

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


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


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
