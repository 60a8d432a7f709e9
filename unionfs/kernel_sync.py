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
import errno
import itertools
import logging
import os
from collections.abc import Callable

import trio

from .core.syscalls import AioContext

log = logging.getLogger(__name__)

# Syncs in flight at once; one more waits for a worker thread instead.
QUEUE_DEPTH = 256


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
        try:
            self._aio = AioContext(QUEUE_DEPTH)
        except OSError as exc:
            raise Unavailable(f"io_setup: {exc.strerror}") from None
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._keys = itertools.count(1)
        self._waiting: dict[int, _Waiter] = {}

    async def sync(self, fd: int, datasync: bool) -> None:
        """fsync(fd) (fdatasync with *datasync*); raises OSError as they do,
        Unavailable where the kernel would not take it."""
        key = next(self._keys)
        waiter = self._waiting[key] = _Waiter()
        try:
            self._aio.submit_sync(key, fd, datasync, self._eventfd)
        except OSError as exc:
            del self._waiting[key]
            if exc.errno in (errno.EAGAIN, errno.EINVAL, errno.ENOSYS):
                raise Unavailable(exc.strerror) from None
            raise
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
            finished = self._aio.finished()
            for key, result in finished:
                waiter = self._waiting.pop(key, None)
                if waiter is not None:  # (else its caller was cancelled)
                    waiter.result = result
                    waiter.done.set()
            if len(finished) < AioContext.EVENTS:
                return

    async def collect(self) -> None:
        """Wake the waiting syncs as they finish (a task of the mount's)."""
        while True:
            await trio.lowlevel.wait_readable(self._eventfd)
            self._reap()

    def close(self) -> None:
        """Wait for the syncs in flight (io_destroy does) and free the context."""
        self._aio.close()
        os.close(self._eventfd)


def open_kernel_sync(quiet_wait: Callable[[int], bool] | None = None) -> KernelSync | None:
    try:
        return KernelSync(quiet_wait)
    except (Unavailable, OSError) as exc:
        log.info("fsync: through worker threads (%s)", exc)
        return None
