"""fsync and fdatasync done by the kernel's own workers, for handlers on the
trio thread.

An fsync may wait for the disk, so a handler must not make it on the trio
thread; a worker thread of ours costs two thread switches and as many hand-
overs of the GIL (about 60 µs of the daemon's CPU a call on a small VM, where
the fsync of a small file on a tmpfs costs 0.3). Linux AIO (4.18+) takes an
fsync as a request (IOCB_CMD_FSYNC, IOCB_CMD_FDSYNC): a kernel worker runs
vfs_fsync with the caller's credentials, and the completion is posted to an
eventfd trio waits on with the rest of its I/O. A sync that is done before
the handler looks (tmpfs, nothing dirty) answers at once, without a pass
through the scheduler; so does one the handler may wait for where it is (a
*quiet_wait* such as pyfuse3.wait_quietly: nothing else waits for the trio
thread, and the wait ends as soon as anything does). A handler that waits
through trio costs the daemon about 100 µs of CPU in task switches (an
fsync per file in `dpkg -i`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import logging
import os
import platform
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
# System call numbers of the AIO calls: x86_64 and aarch64.
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_FSYNC, _IOCB_CMD_FDSYNC = 2, 3
_IOCB_FLAG_RESFD = 1
# Syncs in flight at once; one more waits for a worker thread instead.
QUEUE_DEPTH = 256


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


class Unavailable(Exception):
    """This sync cannot be handed to the kernel (no AIO, a full queue, a
    file whose filesystem AIO cannot sync): make it another way."""


class _Waiter:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result = 0


class KernelSync:
    """An AIO context and its eventfd. `collect` must run in a trio task
    while syncs are made; `close` once none is. *quiet_wait(fd)*: waits
    for *fd* to be readable on the calling thread while nothing else needs
    it, True if it became so (False: await it through trio)."""

    def __init__(self, quiet_wait: Callable[[int], bool] | None = None) -> None:
        self._quiet_wait = quiet_wait
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None:
            raise Unavailable(f"no AIO system call numbers for {platform.machine()}")
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._context = ctypes.c_ulong(0)
        if _libc.syscall(self._setup, QUEUE_DEPTH, ctypes.byref(self._context)) != 0:
            code = ctypes.get_errno()
            raise Unavailable(f"io_setup: {os.strerror(code)}")
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._events = (_IoEvent * 64)()
        self._no_wait = _Timespec(0, 0)
        self._keys = itertools.count(1)
        self._waiting: dict[int, _Waiter] = {}

    async def sync(self, fd: int, datasync: bool) -> None:
        """fsync(fd) (fdatasync with *datasync*); raises OSError as they do,
        Unavailable where the kernel would not take it."""
        key = next(self._keys)
        request = _Iocb(
            aio_data=key,
            aio_lio_opcode=_IOCB_CMD_FDSYNC if datasync else _IOCB_CMD_FSYNC,
            aio_fildes=fd,
            aio_flags=_IOCB_FLAG_RESFD,
            aio_resfd=self._eventfd,
        )
        waiter = self._waiting[key] = _Waiter()
        # The kernel copies the request and takes its own reference to the file.
        requests = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(request))
        if _libc.syscall(self._submit, self._context, 1, requests) != 1:
            del self._waiting[key]
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EINVAL, errno.ENOSYS):
                raise Unavailable(os.strerror(code))
            raise OSError(code, os.strerror(code))
        self._reap()  # mostly done already: then no wait at all
        quiet_wait = self._quiet_wait
        while not waiter.done.is_set() and quiet_wait is not None and quiet_wait(self._eventfd):
            self._reap()  # (another sync's completion, maybe: wait on)
        if not waiter.done.is_set():
            await waiter.done.wait()
        if waiter.result < 0:
            raise OSError(-waiter.result, os.strerror(-waiter.result))

    def _reap(self) -> None:
        """Hand each finished sync its result, without waiting. The eventfd
        is read first (a completion is posted before it is signalled), so
        that the collecting task is not woken for syncs reaped here."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._eventfd)
        while True:
            found = _libc.syscall(
                self._getevents,
                self._context,
                0,
                len(self._events),
                self._events,
                ctypes.byref(self._no_wait),
            )
            if found <= 0:
                return
            for event in self._events[:found]:
                waiter = self._waiting.pop(event.data, None)
                if waiter is not None:  # (else its caller was cancelled)
                    waiter.result = event.res
                    waiter.done.set()
            if found < len(self._events):
                return

    async def collect(self) -> None:
        """Wake the waiting syncs as they finish (a task of the mount's)."""
        while True:
            await trio.lowlevel.wait_readable(self._eventfd)
            self._reap()

    def close(self) -> None:
        """Wait for the syncs in flight (io_destroy does) and free the context."""
        _libc.syscall(self._destroy, self._context)
        os.close(self._eventfd)


def open_kernel_sync(quiet_wait: Callable[[int], bool] | None = None) -> KernelSync | None:
    try:
        return KernelSync(quiet_wait)
    except (Unavailable, OSError) as exc:
        log.info("fsync: through worker threads (%s)", exc)
        return None
