"""A request stays on the trio thread where it cannot wait for the disk.

A hop to a worker thread costs far more than a syscall served from the page
cache, and every handler shares the trio thread, so the daemon keeps cached
reads, small writes and opens whose path is in the dentry cache on it. What
may wait for the disk briefly (cold opens, uncached reads) goes to a worker
only while other requests wait; fsync and large writes always do. A patched
daemon logs every worker-thread call by name: the tests count them.
"""

from __future__ import annotations

import errno
import mmap
import multiprocessing
import os
import signal
import subprocess
import threading
import time

import pytest

from tests.layers import write
from tests.mounts import (
    LOG_WORKER_CALLS,
    NO_KERNEL_SYNC,
    WorkerCalls,
    drop_caches,
    forced_getattr,
    patched_mount,
)
from tests.tracing import syscalls_of
from unionfs.core.data import read_cached


def test_warm_opens_cached_reads_and_small_writes_need_no_worker_thread(scratch: str) -> None:
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/d/small", b"s" * 4096)
    write(f"{lower}/d/big", os.urandom(1 << 20))
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, LOG_WORKER_CALLS, log_path) as (mount, daemon):
        calls = WorkerCalls(log_path)
        with open(f"{mount}/d/new", "wb") as handle:  # an upper file
            handle.write(b"n" * 8192)
        with open(f"{mount}/d/big", "rb") as handle:
            big = handle.read()
        calls.since_last()

        # Upper and lower files whose paths and pages the host caches: every
        # open, read and small write is served on the trio thread.
        for _ in range(20):
            with open(f"{mount}/d/new", "r+b", buffering=0) as handle:
                assert handle.read(8192) == b"n" * 8192
                assert handle.write(b"m" * 4096) == 4096
                handle.seek(0)
                handle.write(b"n" * 4096)
            with open(f"{mount}/d/big", "rb", buffering=0) as handle:
                handle.seek(512 * 1024)
                assert handle.read(65536) == big[512 * 1024 : 576 * 1024]
        assert calls.since_last() == []

        # What can wait for the disk never runs on the trio thread: fsync
        # goes to the kernel's AIO workers (this kernel has them), a write
        # too large to copy there to a worker thread.
        with open(f"{mount}/d/new", "r+b", buffering=0) as handle:
            handle.write(b"x" * 4096)
            os.fsync(handle.fileno())
            handle.write(os.urandom(1 << 20))
        seen = calls.since_last()
        assert seen.count("kernel sync") == 1 and "fsync" not in seen, seen
        assert "pwrite" in seen, seen
        with open(f"{mount}/d/new", "rb") as handle:
            data = handle.read()
        assert data[:4096] == b"x" * 4096 and len(data) == 4096 + (1 << 20)
    assert daemon.returncode == 0


def test_a_serial_readers_cold_opens_and_uncached_reads_stay_on_the_trio_thread(
    scratch: str,
) -> None:
    # A worker thread is there so that other requests go on while one waits
    # for the disk. With none waiting its round trip only costs CPU: a cold
    # tar of 30,000 files took 8.4 s of the daemon's CPU through workers
    # and 3.7 s without.
    lower = os.path.join(scratch, "lower")
    data = os.urandom(4 << 20)
    write(f"{lower}/d/big", data)
    write(f"{lower}/d/small", data[:5000])
    log_path = os.path.join(scratch, "daemon.log")
    # (test_passthrough.py has the same for an open that registers the file.)
    with patched_mount(scratch, lower, LOG_WORKER_CALLS, log_path) as (mount, daemon):
        calls = WorkerCalls(log_path)
        for name in ("big", "small"):
            os.lstat(f"{mount}/d/{name}")
        drop_caches(mount)
        calls.since_last()
        with open(f"{mount}/d/big", "rb", buffering=0) as handle:
            handle.seek(1 << 20)
            assert handle.read(65536) == data[1 << 20 : (1 << 20) + 65536]
        with open(f"{mount}/d/small", "rb") as handle:
            assert handle.read() == data[:5000]
        assert calls.since_last() == []
    assert daemon.returncode == 0


# Holds the cold open of any file named "hold" for a second, wherever it runs.
_HOLD_COLD_OPENS = (
    LOG_WORKER_CALLS
    + """
import time
from unionfs import fuse
_unheld = fuse.StrataOperations._open_cold
def _open_cold(self, source):
    if source.lower is not None and source.lower.path.endswith(b"hold"):
        time.sleep(1.0)
    return _unheld(self, source)
fuse.StrataOperations._open_cold = _open_cold
"""
)


def test_a_cold_open_goes_to_a_worker_thread_while_other_requests_wait(scratch: str) -> None:
    lower = os.path.join(scratch, "lower")
    contents = {name: os.urandom(8192) for name in ("hold", "a", "b")}
    for name, data in contents.items():
        write(f"{lower}/d/{name}", data)
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _HOLD_COLD_OPENS, log_path) as (mount, daemon):
        calls = WorkerCalls(log_path)
        counts = []
        # The queue is made, not hoped for: all three files are opened first
        # (a lower file's open answers at once; its data is opened at the
        # first read), then the read of "hold" keeps the trio thread busy
        # while the reads of "a" and "b" queue up in the kernel. The first
        # of them served finds the other queued and goes to a worker.
        # Waiting on the first queued read for one second leaves a thread
        # that the host never schedules meanwhile as the only way to miss:
        # a second attempt covers it. Code that always or never uses a
        # worker fails both (3 or 0).
        for _ in range(2):
            for name in contents:
                os.lstat(f"{mount}/d/{name}")
            drop_caches(mount)
            fds = {name: os.open(f"{mount}/d/{name}", os.O_RDONLY) for name in contents}
            try:
                calls.since_last()
                read: dict[str, bytes] = {}

                def read_file(fd: int, name: str, read: dict[str, bytes] = read) -> None:
                    read[name] = os.pread(fd, 16384, 0)

                threads = [
                    threading.Thread(target=read_file, args=(fd, name)) for name, fd in fds.items()
                ]
                threads[0].start()
                time.sleep(0.2)  # "hold"'s read is on the trio thread, held there
                for thread in threads[1:]:
                    thread.start()
                for thread in threads:
                    thread.join(30)
                assert read == contents
                counts.append(calls.since_last().count("_open_cold"))
            finally:
                for fd in fds.values():
                    os.close(fd)
            if counts[-1] in (1, 2):
                break
        assert counts[-1] in (1, 2), counts
    assert daemon.returncode == 0


def test_a_cached_read_is_short_only_at_the_end_of_the_file(scratch: str) -> None:
    path = os.path.join(scratch, "f")
    data = os.urandom(64 * 4096 + 100)
    write(path, data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, len(data))  # every page in the cache
        assert read_cached(fd, 8192, 4096) == data[4096:12288]
        assert read_cached(fd, 8192, 64 * 4096) == data[64 * 4096 :]
        assert read_cached(fd, 4096, len(data) + 10) == b""
        # Only pages 0-15 and 40 back in the cache (no readahead): a read
        # across the others is not served in part.
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for page in [*range(16), 40]:
            os.pread(fd, 4096, page * 4096)
        assert read_cached(fd, 4096, 20 * 4096) is None
        assert read_cached(fd, 8 * 4096, 12 * 4096) is None
        assert read_cached(fd, 8 * 4096, 0) == data[: 8 * 4096]
        assert read_cached(fd, 4096, 40 * 4096) == data[40 * 4096 : 41 * 4096]
    finally:
        os.close(fd)


def test_opening_a_lower_file_costs_no_system_call_until_a_read_reaches_the_daemon(
    scratch: str,
) -> None:
    """The kernel keeps a lower file's pages across opens, so most opens
    never read through the daemon: the descriptor is opened at the first
    read that comes (strace counts), and that read returns the data as it is
    then, after a copy-up too."""
    lower = os.path.join(scratch, "lower")
    data = os.urandom(256 << 10)
    write(f"{lower}/d/lib.so", data)
    write(f"{lower}/d/conf", b"lower conf\n")
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, "", log_path) as (mount, daemon):
        with open(f"{mount}/d/lib.so", "rb") as handle:
            assert handle.read() == data  # the pages are cached now
        counts = os.path.join(scratch, "strace.txt")
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-e", "trace=open,openat,openat2,close", "-o", counts,
             "-p", str(daemon.pid)],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(0.5)  # attached
            for _ in range(200):
                with open(f"{mount}/d/lib.so", "rb") as handle:
                    assert handle.read(4096) == data[:4096]
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
        calls = _syscall_counts(counts, ("open", "openat", "openat2", "close"))
        assert sum(calls.values()) < 20, calls  # 200 opens and closes
        with open(f"{mount}/d/conf", "rb", buffering=0) as early:
            with open(f"{mount}/d/conf", "r+b", buffering=0) as writer:
                writer.write(b"UPPER")  # a copy-up after the first open
            with open("/proc/sys/vm/drop_caches", "w") as caches:
                caches.write("3\n")  # the next read reaches the daemon
            assert early.read() == b"UPPER conf\n"
        for path in (f"{mount}/d/conf", f"{mount}/d/lib.so"):  # upper, lower
            with pytest.raises(OSError) as missing:
                os.getxattr(path, "user.none")
            assert missing.value.errno == errno.ENODATA
    assert daemon.returncode == 0


# Logs every read request that reaches the daemon.
_LOG_READS = """
import unionfs.fuse
_read = unionfs.fuse.StrataOperations.read
async def _logged(self, fh, offset, size):
    print("read:", offset, size, flush=True)
    return await _read(self, fh, offset, size)
unionfs.fuse.StrataOperations.read = _logged
"""


def test_a_file_written_through_the_mount_is_read_back_from_the_kernels_cache(
    scratch: str,
) -> None:
    """Every write changes the mtime the next getattr reports; the kernel
    keeps the pages it has written all the same (pyfuse3-keep-data.patch),
    and still shows every change made through the mount, whichever way."""
    lower = os.path.join(scratch, "lower")
    old = os.urandom(64 << 10)
    write(f"{lower}/d/lower", old)
    write(f"{lower}/d/gone", b"g" * 8192)
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _LOG_READS, log_path) as (mount, daemon):
        new, data = f"{mount}/d/new", os.urandom(64 << 10)
        write(new, data)
        forced_getattr(new)  # a new mtime
        assert _read(new) == data
        with open(new, "r+b") as rewriter:
            rewriter.seek(4096)
            rewriter.write(b"w" * 4096)
        forced_getattr(new)
        data = data[:4096] + b"w" * 4096 + data[8192:]
        assert _read(new) == data
        seen = _lines(log_path, "read:")
        assert seen == [], seen

        # What the kernel keeps never hides a change made through the mount.
        path = f"{mount}/d/lower"
        with open(path, "rb", buffering=0) as early:
            assert early.read() == old  # the lower file's pages are cached
            with open(path, "r+b", buffering=0) as writer:
                writer.seek(100)
                writer.write(b"copied up")  # a copy-up while the pages are kept
            forced_getattr(path)
            early.seek(0)
            expected = old[:100] + b"copied up" + old[109:]
            assert early.read() == expected
        os.truncate(path, 1000)
        with open(path, "r+b") as extender:
            extender.seek(3000)
            extender.write(b"end")
        forced_getattr(path)
        expected = expected[:1000] + bytes(2000) + b"end"
        assert _read(path) == expected
        with open(path, "r+b") as mapper, mmap.mmap(mapper.fileno(), 0) as mapped:
            mapped[0:6] = b"mapped"
            mapped.flush()
        forced_getattr(path)
        assert _read(path) == b"mapped" + expected[6:]
        gone = f"{mount}/d/gone"
        assert _read(gone) == b"g" * 8192
        os.unlink(gone)
        write(gone, b"h" * 8192)  # the same name and size, new bytes
        assert _read(gone) == b"h" * 8192
        write(f"{mount}/d/other", b"o" * 8192)
        os.rename(f"{mount}/d/other", gone)
        assert _read(gone) == b"o" * 8192
    assert daemon.returncode == 0


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _lines(path: str, prefix: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as log:
        return [line for line in log if line.startswith(prefix)]


# A task of the daemon's own that wakes every 10 ms and logs each wakeup.
_TICKER = """
import time, trio, pyfuse3
_main = pyfuse3.main
async def _tick():
    while True:
        await trio.sleep(0.01)
        print("tick", time.monotonic(), flush=True)
async def _main_and_ticker(*args, **kwargs):
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_tick)
        await _main(*args, **kwargs)
        nursery.cancel_scope.cancel()
pyfuse3.main = _main_and_ticker
"""


def test_queued_requests_are_read_without_a_trip_through_the_event_loop(scratch: str) -> None:
    """Under requests from several processes at once the daemon reads each
    queued request straight away (pyfuse3-direct-reads.patch) and passes
    through trio's event loop (epoll) only when the queue is empty or after
    16 reads in a row, then only if trio has something to do: strace counts
    the calls. Other tasks still get their turn: a task of the daemon's own
    that sleeps 10 ms at a time keeps waking during the flood."""
    lower = os.path.join(scratch, "lower")
    for index in range(64):
        write(f"{lower}/small/f{index}", b"x")
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _TICKER, log_path) as (mount, daemon):
        files = [f"{mount}/small/f{index}" for index in range(64)]
        counts = os.path.join(scratch, "strace.txt")
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-e", "trace=read,epoll_wait", "-o", counts,
             "-p", str(daemon.pid)],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        flooders = [multiprocessing.Process(target=_flood, args=(files,)) for _ in range(6)]
        try:
            time.sleep(0.5)  # attached
            for process in flooders:
                process.start()
            time.sleep(0.5)  # flooding
            started = time.monotonic()
            time.sleep(2)
            ended = time.monotonic()
        finally:
            for process in flooders:
                process.kill()
                process.join()
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
        calls = _syscall_counts(counts)
    assert daemon.returncode == 0
    assert calls["read"] > 1000, calls  # requests were served
    assert calls["epoll_wait"] < calls["read"] / 4, calls
    ticks = [float(line.split()[1]) for line in _lines(log_path, "tick ")]
    during = [tick for tick in ticks if started <= tick <= ended]
    # 200 at most; a loop that never yielded during the flood would give none.
    assert len(during) >= 50, (len(during), len(ticks), calls)


def test_a_request_that_follows_a_reply_is_read_without_a_trip_through_the_event_loop(
    scratch: str,
) -> None:
    """One process asking one thing after another (dpkg, git, a compiler):
    the daemon waits for the next request in ppoll(2) while trio has nothing
    else to do (pyfuse3-idle-wait.patch), not in trio's scheduler (an
    epoll_ctl, an epoll_wait and about 10 µs of Python per request before).
    Counted by tracepoints: strace would slow the daemon until every request
    were queued before it looks."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/f", b"x")
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, "", log_path) as (mount, daemon):
        events = {"sys_enter_writev": "", "sys_enter_epoll_wait": ""}
        with syscalls_of(daemon.pid, events) as traced:
            for _ in range(2000):
                forced_getattr(f"{mount}/f")
            calls = traced.counts()
    assert daemon.returncode == 0
    assert calls.get("sys_enter_writev", 0) >= 2000, calls  # a reply to each
    # A pass through the scheduler only where trio has something to do, or
    # after a wait that ended with nothing to read (before: one or two per request).
    assert calls.get("sys_enter_epoll_wait", 0) < 2000 / 5, calls


# Holds every fsync in its worker thread for a while; logs when one ends.
_SLOW_FSYNC = (
    NO_KERNEL_SYNC
    + """
import os, time
import unionfs.fuse
_in_worker = unionfs.fuse.in_worker
def _slow_fsync(fd):
    time.sleep(3)
    os.fsync(fd)
    print("fsync done", flush=True)
async def _slowed(function, *args, **kwargs):
    if getattr(function, "__name__", "") == "fsync":
        function = _slow_fsync
    return await _in_worker(function, *args, **kwargs)
unionfs.fuse.in_worker = _slowed
"""
)


def test_a_request_waiting_in_a_worker_thread_holds_up_no_other(scratch: str) -> None:
    """The task that reads requests answers those whose handlers never wait
    itself; one that waits (here an fsync held 3 s in its worker thread)
    hands the reading on to another task, so the mount keeps answering."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/f", b"x")
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _SLOW_FSYNC, log_path) as (mount, daemon):
        syncer = multiprocessing.Process(target=_fsync_loop, args=(f"{mount}/new", 1))
        syncer.start()
        try:
            deadline = time.monotonic() + 30
            new = f"{scratch}/upper/new"
            while not os.path.exists(new) or os.path.getsize(new) == 0:  # written: in fsync
                assert time.monotonic() < deadline
                time.sleep(0.01)
            for _ in range(300):
                forced_getattr(f"{mount}/f")
            with open(log_path, "rb") as log:
                assert b"fsync done" not in log.read()  # all 300 answered meanwhile
            assert syncer.is_alive()
        finally:
            syncer.join(timeout=30)
        assert syncer.exitcode == 0
        with open(log_path, "rb") as log:
            assert b"fsync done" in log.read()  # the held worker was the one it waited for
    assert daemon.returncode == 0


def _fsync_loop(path: str, count: int) -> None:
    with open(path, "wb") as handle:
        for _ in range(count):
            handle.write(b"x")
            handle.flush()
            os.fsync(handle.fileno())


@pytest.mark.parametrize("sync", ["kernel", "worker thread"])
def test_a_reply_from_a_worker_thread_waits_for_no_idle_wait(scratch: str, sync: str) -> None:
    """A handler that waited for a worker thread or the kernel's AIO (fsync)
    answers once trio runs it again; the reading task's wait in ppoll(2)
    must never keep it from running (as it would if that task waited beside
    it in the same batch of trio's run queue). Each fsync would then end a
    wait by its timeout: tracepoints count the waits that timed out."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/f", b"x")
    log_path = os.path.join(scratch, "daemon.log")
    patch = NO_KERNEL_SYNC if sync == "worker thread" else ""
    with patched_mount(scratch, lower, patch, log_path) as (mount, daemon):
        events = {"sys_enter_ppoll": "", "sys_exit_ppoll": "ret == 0"}  # all; timed out
        with syscalls_of(daemon.pid, events) as traced:
            _fsync_loop(f"{mount}/new", 300)
            calls = traced.counts()
    assert daemon.returncode == 0
    assert calls.get("sys_exit_ppoll", 0) < 30, calls


def test_a_serial_clients_fsync_passes_through_no_event_loop(scratch: str) -> None:
    """The kernel's AIO fsync of a serial client is waited for where its
    handler is (pyfuse3.wait_quietly: nothing else waits for the trio
    thread), not through trio's scheduler: no epoll_wait for the 300 syncs
    (tracepoints; at least one per sync when the handler awaited it)."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/f", b"x")
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, "", log_path) as (mount, daemon):
        _fsync_loop(f"{mount}/warm", 5)
        with syscalls_of(daemon.pid, {"sys_enter_epoll_wait": ""}) as traced:
            _fsync_loop(f"{mount}/new", 300)
            calls = traced.counts()
    assert daemon.returncode == 0
    assert calls.get("sys_enter_epoll_wait", 0) < 30, calls


# The first fsync first waits quietly for a pipe nobody writes, before its
# sync is submitted: only something else (a request) can end that wait.
_HELD_QUIET_WAIT = """
import os, pyfuse3, unionfs.kernel_sync
_sync = unionfs.kernel_sync.KernelSync.sync
_held = [os.pipe()]
async def _first_held(self, fd, datasync):
    if _held:
        never, _ = _held.pop()
        print("held wait started", flush=True)
        print("held wait ended:", pyfuse3.wait_quietly(never), flush=True)
    return await _sync(self, fd, datasync)
unionfs.kernel_sync.KernelSync.sync = _first_held
"""


def test_a_request_ends_a_handlers_quiet_wait(scratch: str) -> None:
    """A handler waiting quietly (an fsync) holds the trio thread only while
    nothing else comes: a request ends the wait, is answered, and the sync
    is then awaited through trio and answers too."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/f", b"x")
    log_path = os.path.join(scratch, "daemon.log")

    def logged() -> bytes:
        with open(log_path, "rb") as log:
            return log.read()

    with patched_mount(scratch, lower, _HELD_QUIET_WAIT, log_path) as (mount, daemon):
        syncer = multiprocessing.Process(target=_fsync_loop, args=(f"{mount}/new", 1))
        syncer.start()
        try:
            deadline = time.monotonic() + 30
            while b"held wait started" not in logged():
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.3)
            assert syncer.is_alive() and b"held wait ended" not in logged()  # nothing else came
            getattr_done = threading.Event()

            def ask() -> None:
                forced_getattr(f"{mount}/f")
                getattr_done.set()

            threading.Thread(target=ask, daemon=True).start()
            assert getattr_done.wait(timeout=20)
            syncer.join(timeout=30)
        finally:
            if syncer.is_alive():
                syncer.kill()
        assert syncer.exitcode == 0
        assert b"held wait ended: False" in logged()
    assert daemon.returncode == 0


def _flood(files: list[str]) -> None:
    while True:
        for path in files:
            forced_getattr(path)


def _syscall_counts(path: str, names: tuple[str, ...] = ("read", "epoll_wait")) -> dict[str, int]:
    """`strace -c`'s table: syscall name -> calls."""
    counts = dict.fromkeys(names, 0)
    with open(path) as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 5 and fields[-1] in counts and fields[3].isdigit():
                counts[fields[-1]] = int(fields[3])
    return counts


def test_a_getattr_of_an_upper_file_lstats_it_once(scratch: str) -> None:
    """The attributes of a file in UPPER come from the lstat that finds it
    under its name: one system call per getattr (two before)."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/d/f", b"x")
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, "", log_path) as (mount, daemon):
        with open(f"{mount}/d/new", "wb") as handle:
            handle.write(b"new")
        with open(f"{mount}/d/f", "ab") as handle:  # a copied-up file
            handle.write(b"y")
        with syscalls_of(daemon.pid, {"sys_enter_newfstatat": ""}) as traced:
            for _ in range(200):
                forced_getattr(f"{mount}/d/new")
                forced_getattr(f"{mount}/d/f")
            calls = traced.counts()
    assert daemon.returncode == 0
    assert 400 <= calls.get("sys_enter_newfstatat", 0) < 440, calls


def test_a_listing_read_in_many_requests_lstats_each_upper_entry_once(scratch: str) -> None:
    """The kernel reads a large directory in many readdirplus requests, each
    from the offset the last one reached. Each lists UPPER's directory again
    (its names may have changed), but lstats only the entries it returns:
    strace counts the daemon's stats."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/big/from-lower", b"l")
    names = {f"file-{number:05d}" for number in range(3000)}
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, "", log_path) as (mount, daemon):
        for name in names:
            os.close(os.open(f"{mount}/big/{name}", os.O_CREAT | os.O_WRONLY, 0o644))
        with open("/proc/sys/vm/drop_caches", "w") as caches:
            caches.write("3\n")  # the kernel's cached listing and entries go
        counts = os.path.join(scratch, "strace.txt")
        stats = ("newfstatat", "statx", "lstat", "stat")
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-e", f"trace=getdents64,{','.join(stats)}", "-o", counts,
             "-p", str(daemon.pid)],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(0.5)  # attached
            listed = set(os.listdir(f"{mount}/big"))
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
        assert listed == names | {"from-lower"}
        calls = _syscall_counts(counts, ("getdents64", *stats))
        assert calls["getdents64"] >= 2 * 20, calls  # listed again by each of many requests
        assert sum(calls[name] for name in stats) < 1.2 * len(names), calls
    assert daemon.returncode == 0


def test_a_sync_handed_to_the_kernel_answers_as_fsync_does(scratch: str) -> None:
    """KernelSync, driven directly: an fsync and an fdatasync of a file
    finish, many at once are all answered, and a descriptor that cannot be
    synced gets fsync's own error."""
    import trio

    from unionfs.kernel_sync import KernelSync

    path = write(f"{scratch}/f", "data")
    fd = os.open(path, os.O_WRONLY)
    unsyncable = os.open(scratch, os.O_PATH)
    with pytest.raises(OSError) as expected:
        os.fsync(unsyncable)
    sync = KernelSync()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync.collect)
            await sync.sync(fd, False)
            await sync.sync(fd, True)
            async with trio.open_nursery() as syncs:
                for n in range(100):
                    syncs.start_soon(sync.sync, fd, bool(n % 2))
            with pytest.raises(OSError) as caught:
                await sync.sync(unsyncable, False)
            assert caught.value.errno == expected.value.errno
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        sync.close()
        os.close(fd)
        os.close(unsyncable)
