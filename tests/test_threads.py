"""Blocking calls off the trio thread: in_worker (a worker thread, as
trio.to_thread.run_sync) and KernelSync (fsync by the kernel's AIO workers)."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
import trio

from unionfs.kernel_sync import KernelSync, Unavailable
from unionfs.threads import in_worker


def test_the_call_runs_in_another_thread_and_answers_or_raises() -> None:
    async def main() -> None:
        here = threading.get_ident()
        assert await in_worker(threading.get_ident) != here
        assert await in_worker(divmod, 7, 2) == (3, 1)
        with pytest.raises(ZeroDivisionError):
            await in_worker(divmod, 1, 0)

    trio.run(main)


def test_other_tasks_run_while_the_call_blocks() -> None:
    ticks: list[float] = []

    async def ticker(stop: trio.Event) -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await trio.sleep(0.01)

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker, stop)
            await in_worker(time.sleep, 0.3)
            stop.set()

    trio.run(main)
    assert len(ticks) >= 10


def test_a_cancelled_caller_starts_nothing_and_a_started_call_is_waited_for() -> None:
    ran: list[str] = []

    def record(what: str, pause: float = 0.0) -> None:
        time.sleep(pause)
        ran.append(what)

    async def main() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            await in_worker(record, "after the cancel")
        assert scope.cancelled_caught
        with trio.move_on_after(0.05):
            await in_worker(record, "started", 0.3)  # the cancel comes meanwhile
        assert ran == ["started"]  # finished before the scope gave up

    trio.run(main)


def test_the_kernel_syncs_files_and_says_what_it_cannot_sync(scratch: str) -> None:
    """Syncs that finish at once and syncs that wait (the collecting task
    wakes them) answer; a descriptor that is not open fails as fsync does;
    one AIO cannot sync (a pipe) is Unavailable: a worker thread does it."""
    kernel = KernelSync()
    reads, writes = os.pipe()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.collect)
            fds = []
            for number in range(8):
                fd = os.open(f"{scratch}/f{number}", os.O_CREAT | os.O_RDWR)
                os.write(fd, os.urandom(4 << 20))  # dirty pages: a sync that waits
                fds.append(fd)
            async with trio.open_nursery() as syncs:
                for number, fd in enumerate(fds):
                    syncs.start_soon(kernel.sync, fd, bool(number % 2))
            for fd in fds:
                await kernel.sync(fd, False)  # nothing dirty left: mostly done at once
                os.close(fd)
            with pytest.raises(OSError) as failed:
                await kernel.sync(fds[0], False)  # closed now
            assert failed.value.errno == errno.EBADF
            with pytest.raises(Unavailable):
                await kernel.sync(writes, False)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        kernel.close()
        os.close(reads)
        os.close(writes)
