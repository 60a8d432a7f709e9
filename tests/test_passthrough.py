"""FUSE passthrough: the kernel reads and writes files' host copies itself.

A patched daemon logs every read, write and fsync request it serves, and
the number of backing files it registers and drops; the tests count them.
Where passthrough cannot be used here (a kernel before 6.9, pyfuse3 built
against libfuse older than 3.17, no CAP_SYS_ADMIN), each test says so and is
skipped, except the one that checks `--passthrough on` then refuses to mount.
"""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
import os
import random
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.layers import write
from tests.mounts import (
    LOG_WORKER_CALLS,
    WorkerCalls,
    daemon_logs,
    drop_caches,
    overlay_mount,
    patched_mount,
    strata,
    strata_mount,
)
from unionfs.mount import find_mount

# Logs each data request the daemon serves, each file it fsyncs, and the
# passthrough lines of the log.
_LOG_DATA = """
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
import unionfs.fuse
def _logging(name):
    original = getattr(unionfs.fuse.StrataOperations, name)
    async def logged(self, fh, *args):
        print(name + ":", self.handles[fh].ino, flush=True)
        return await original(self, fh, *args)
    setattr(unionfs.fuse.StrataOperations, name, logged)
for _name in ("read", "write", "fsync"):
    _logging(_name)
import os
_fsync = os.fsync
def _synced(fd):
    print("synced:", os.readlink(f"/proc/self/fd/{fd}"), flush=True)
    return _fsync(fd)
os.fsync = _synced
import unionfs.kernel_sync
_kernel_sync = unionfs.kernel_sync.KernelSync.sync
async def _kernel_synced(self, fd, datasync):
    print("synced:", os.readlink(f"/proc/self/fd/{fd}"), flush=True)
    return await _kernel_sync(self, fd, datasync)
unionfs.kernel_sync.KernelSync.sync = _kernel_synced
import pyfuse3
_open, _close = pyfuse3.backing_open, pyfuse3.backing_close
def _registered(fd):
    print("registered:", fd, flush=True)
    return _open(fd)
def _unregistered(backing_id):
    print("unregistered:", backing_id, flush=True)
    return _close(backing_id)
pyfuse3.backing_open, pyfuse3.backing_close = _registered, _unregistered
"""

MiB = 1 << 20


def _available() -> str | None:
    """Why passthrough cannot be used on this machine (None: it can)."""
    import tempfile

    top = tempfile.mkdtemp(prefix="strata-pt-probe-")
    try:
        layer, mountpoint = os.path.join(top, "layer"), os.path.join(top, "mnt")
        write(f"{layer}/f", b"x")
        os.makedirs(mountpoint)
        root = os.path.join(top, "store")
        result = strata(root, "mount", "--passthrough", "on", "--layer", layer, mountpoint,
                        check=False)  # fmt: skip
        if result.returncode != 0:
            return result.stderr.strip()
        strata(root, "umount", mountpoint)
        return None
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", top], check=False)


_WHY_NOT = _available()
needs_passthrough = pytest.mark.skipif(
    _WHY_NOT is not None, reason=f"passthrough not available here: {_WHY_NOT}"
)


def _in_use(log_path: str) -> None:
    """Wait until the daemon has started passthrough: the mount serves from
    the kernel's INIT on, and the first requests may come before it."""
    deadline = time.monotonic() + 30
    while not _logged(log_path, "passthrough: in use"):
        assert time.monotonic() < deadline, "passthrough did not start"
        time.sleep(0.02)


def _logged(log_path: str, text: str) -> bool:
    with open(log_path, encoding="utf-8", errors="replace") as log:
        return any(text in line for line in log)


def _served(log_path: str, name: str) -> list[str]:
    with open(log_path, encoding="utf-8", errors="replace") as log:
        return [line for line in log if line.startswith(name + ":")]


def _digest_tree(top: str) -> dict[str, str]:
    found = {}
    for directory, _, files in os.walk(top):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, top)] = hashlib.sha256(handle.read()).hexdigest()
    return found


@pytest.fixture
def lower(scratch: str) -> Iterator[str]:
    path = os.path.join(scratch, "lower")
    write(f"{path}/big", os.urandom(8 * MiB))
    for index in range(20):
        write(f"{path}/small/f{index}", os.urandom(4096 + index))
    write(f"{path}/log", b"first line\n")
    yield path


@needs_passthrough
def test_no_read_or_write_request_reaches_the_daemon_for_a_passthrough_file(
    scratch: str, lower: str
) -> None:
    """Upper files are read and written by the kernel; so are lower files on
    a read-only mount. Lower files of a writable mount are read through the
    daemon (they may be copied up under an open reader: see passthrough.py)."""
    log_path = os.path.join(scratch, "daemon.log")
    expected = _digest_tree(lower)
    with patched_mount(scratch, lower, _LOG_DATA, log_path, passthrough="on",
                       writable=False) as (mount, _):  # fmt: skip
        _in_use(log_path)
        drop_caches()
        assert _digest_tree(mount) == expected
        with open(f"{mount}/big", "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
            with open(f"{lower}/big", "rb") as original:
                assert mapped[3 * MiB : 4 * MiB] == original.read()[3 * MiB : 4 * MiB]
            mapped.close()
    assert _served(log_path, "read") == []

    with patched_mount(scratch, lower, _LOG_DATA, log_path, passthrough="on") as (mount, _):
        _in_use(log_path)
        data = os.urandom(3 * MiB + 5)
        write(f"{mount}/new", data)
        with open(f"{mount}/new", "r+b") as handle:
            handle.seek(MiB)
            handle.write(b"w" * 4096)
            os.fsync(handle.fileno())
        data = data[:MiB] + b"w" * 4096 + data[MiB + 4096 :]
        drop_caches()
        with open(f"{mount}/new", "rb") as handle:
            assert handle.read() == data
        with open(f"{mount}/log", "ab") as handle:  # copied up, then written by the kernel
            handle.write(b"second line\n")
        with open(f"{mount}/log", "rb") as handle:
            assert handle.read() == b"first line\nsecond line\n"
        assert _served(log_path, "write") == []
        assert _served(log_path, "read") == []
        assert len(_served(log_path, "fsync")) == 1  # fsync still reaches the daemon
        with open(f"{mount}/new", "rb") as handle:  # and syncs the file from a reader too
            os.fsync(handle.fileno())
        assert len(_served(log_path, "fsync")) == 2
        synced = [line.split()[-1] for line in _served(log_path, "synced")]
        assert synced == [f"{scratch}/upper/new"] * 2, synced
        with open(f"{mount}/big", "rb") as handle:  # a lower file of a writable mount
            assert len(handle.read()) == 8 * MiB
        assert _served(log_path, "read") != []
    with open(f"{scratch}/upper/new", "rb") as handle:
        assert handle.read() == data


@needs_passthrough
def test_a_reader_open_before_a_copy_up_sees_the_new_data_and_no_layer_changes(
    scratch: str, lower: str
) -> None:
    """overlayfs shows a descriptor opened before a copy-up the upper data
    after it. The kernel cannot move an open file to another backing file, so
    a lower file of a writable mount is never given one: the reader reads
    through the daemon and sees the write. Writes of every kind (write, append,
    truncate, mmap, fallocate) through files that are backed by their upper
    copy leave every lower file as it was."""
    before = _digest_tree(lower)
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _LOG_DATA, log_path, passthrough="on") as (mount, _):
        _in_use(log_path)
        with open(f"{lower}/big", "rb") as original:
            lower_data = original.read()
        reader = os.open(f"{mount}/big", os.O_RDONLY)
        try:
            assert os.pread(reader, 4, MiB) == lower_data[MiB : MiB + 4]
            writer = os.open(f"{mount}/big", os.O_RDWR)  # copies up; the reader is still open
            try:
                os.pwrite(writer, b"NEW!", MiB)
                with mmap.mmap(writer, 0) as mapped:
                    mapped[2 * MiB : 2 * MiB + 4] = b"MAP!"
                    mapped.flush()
                os.posix_fallocate(writer, 9 * MiB, 4096)
            finally:
                os.close(writer)
            assert os.pread(reader, 4, MiB) == b"NEW!"
            assert os.pread(reader, 4, 2 * MiB) == b"MAP!"
        finally:
            os.close(reader)
        # A file copied up while a cached open was outstanding is backed by
        # its upper copy once that open is gone: later opens go to the kernel.
        log_before = len(_served(log_path, "read"))
        drop_caches()
        with open(f"{mount}/big", "rb") as handle:
            data = handle.read()
        assert len(_served(log_path, "read")) == log_before
        assert data[MiB : MiB + 4] == b"NEW!" and data[2 * MiB : 2 * MiB + 4] == b"MAP!"
        assert len(data) == 9 * MiB + 4096
        os.truncate(f"{mount}/small/f3", 10)
        with (
            open(f"{mount}/small/f4", "r+b") as rewritten,
            mmap.mmap(rewritten.fileno(), 0) as mapped,
        ):
            mapped[:4] = b"MMAP"
        with open(f"{mount}/small/f4", "rb") as handle:
            assert handle.read(4) == b"MMAP"
    assert _digest_tree(lower) == before
    with open(f"{scratch}/upper/small/f4", "rb") as handle:
        assert handle.read(4) == b"MMAP"  # mmap writes land in UPPER
    with open(f"{scratch}/upper/big", "rb") as handle:
        assert handle.read() == data


@needs_passthrough
def test_a_serial_readers_cold_opens_register_their_files_on_the_trio_thread(
    scratch: str, lower: str
) -> None:
    # As test_request_path.py's test for opens through the daemon: with no
    # other request waiting, opening a host file out of the dentry cache
    # costs less than a worker thread's round trip.
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _LOG_DATA + LOG_WORKER_CALLS, log_path, passthrough="on",
                       writable=False) as (mount, _):  # fmt: skip
        _in_use(log_path)
        names = [f"small/f{index}" for index in range(20)]
        for name in names:
            os.lstat(f"{mount}/{name}")
        drop_caches(mount)
        calls = WorkerCalls(log_path)
        calls.since_last()
        registered = len(_served(log_path, "registered"))
        for name in names:
            with open(f"{mount}/{name}", "rb") as handle, open(f"{lower}/{name}", "rb") as source:
                assert handle.read() == source.read()
        assert len(_served(log_path, "registered")) == registered + 20
        assert calls.since_last() == []


@needs_passthrough
def test_sizes_and_times_written_through_passthrough_show(scratch: str, lower: str) -> None:
    """The kernel's writes change the upper file behind the daemon: stat
    through the mount shows the size and mtime the upper file has."""
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _LOG_DATA, log_path, passthrough="on") as (mount, _):
        _in_use(log_path)
        write(f"{mount}/grown", b"x" * 100)
        first = os.stat(f"{mount}/grown")
        with open(f"{mount}/grown", "ab") as handle:
            handle.write(b"y" * 5000)
            handle.flush()
            during = os.fstat(handle.fileno())
        after = os.stat(f"{mount}/grown")
        host = os.stat(f"{scratch}/upper/grown")
        assert during.st_size == after.st_size == host.st_size == 5100
        assert after.st_mtime_ns == host.st_mtime_ns
        assert after.st_mtime_ns >= first.st_mtime_ns
        assert _served(log_path, "write") == []


# Passthrough starts 1.5 s after the mount serves, as if INIT and the start
# were that far apart.
_LATE_START = """
import trio
import unionfs.mount
_start = unionfs.mount._start_passthrough
def _later(request, operations):
    async def start():
        await trio.sleep(1.5)
        _start(request, operations)
    operations.background.start_soon(start)
unionfs.mount._start_passthrough = _later
"""


@needs_passthrough
def test_files_opened_before_passthrough_starts_keep_their_inode_cached(
    scratch: str, lower: str
) -> None:
    """The mount serves requests before passthrough starts (from the kernel's
    INIT on). A file opened then stays open: a later open of it must not be
    backed (the kernel would refuse it with EIO); once it is closed, the next is."""
    log_path = os.path.join(scratch, "daemon.log")
    write(f"{scratch}/upper/early", b"e" * 10000)
    with patched_mount(scratch, lower, _LOG_DATA + _LATE_START, log_path,
                       passthrough="on") as (mount, _):  # fmt: skip
        early = os.open(f"{mount}/early", os.O_RDWR)
        try:
            assert not _logged(log_path, "passthrough: in use")
            _in_use(log_path)
            with open(f"{mount}/early", "r+b") as later:
                later.write(b"L")
                assert later.read(4) == b"eeee"
            assert os.pread(early, 2, 0) == b"Le"
        finally:
            os.close(early)
        before = len(_served(log_path, "write"))
        with open(f"{mount}/early", "r+b") as backed:
            backed.write(b"B")
        assert len(_served(log_path, "write")) == before  # backed now
    with open(f"{scratch}/upper/early", "rb") as handle:
        assert handle.read(3) == b"Bee"


def _workload(mount: str, seed: int) -> None:
    """Opens, reads, writes, appends and closes in one process, at random."""
    rng = random.Random(seed)
    names = [f"{mount}/small/f{index}" for index in range(20)] + [
        f"{mount}/new{index}" for index in range(5)
    ]
    held: list[int] = []
    for _ in range(400):
        name = rng.choice(names)
        action = rng.random()
        try:
            if action < 0.3:
                held.append(os.open(name, os.O_RDONLY))
            elif action < 0.5:
                held.append(os.open(name, os.O_RDWR | os.O_CREAT, 0o644))
                os.pwrite(held[-1], os.urandom(rng.randrange(1, 9000)), rng.randrange(0, 9000))
            elif action < 0.6:
                with open(name, "ab") as handle:
                    handle.write(b"a" * rng.randrange(1, 100))
            elif action < 0.9 and held:
                os.close(held.pop(rng.randrange(len(held))))
            elif held:
                os.pread(held[rng.randrange(len(held))], 4096, 0)
        except FileNotFoundError:
            pass
    for fd in held:
        os.close(fd)


@needs_passthrough
def test_every_backing_file_is_dropped_with_its_last_open(scratch: str, lower: str) -> None:
    """Four processes open, read, write and close files at random; at the end
    the daemon has dropped every backing file it registered."""
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _LOG_DATA, log_path, passthrough="on") as (mount, _):
        _in_use(log_path)
        context = multiprocessing.get_context("fork")
        workers = [context.Process(target=_workload, args=(mount, seed)) for seed in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
            assert worker.exitcode == 0
    registered, still = _end_counts(log_path)
    assert registered >= 5 and still == 0


def _end_counts(log_path: str) -> tuple[int, int]:
    """What the daemon's last line about backing files says: how many it
    registered, and how many were still in use at the end."""
    with open(log_path) as log:
        ends = [line for line in log if "backing files registered" in line]
    assert len(ends) == 1, ends
    registered, still = (int(word) for word in ends[0].split() if word.isdigit())
    return registered, still


@needs_passthrough
def test_a_backing_file_is_registered_once_while_the_kernel_knows_its_inode(
    scratch: str, lower: str
) -> None:
    """Opening the same files again and again registers each once: the id
    stays registered while no file is open (the daemon makes no open and no
    ioctl for the next open), and goes when the kernel forgets the inode."""
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _LOG_DATA, log_path, passthrough="on",
                       writable=False) as (mount, _):  # fmt: skip
        _in_use(log_path)
        probe = len(_served(log_path, "registered"))  # the mount's own check
        for _ in range(50):
            for index in range(3):
                with open(f"{mount}/small/f{index}", "rb") as handle:
                    handle.read()
        assert len(_served(log_path, "registered")) == probe + 3
        drop_caches()  # the kernel forgets the inodes: their ids go
        deadline = time.monotonic() + 30
        while len(_served(log_path, "unregistered")) < probe + 3:
            assert time.monotonic() < deadline, "forgotten inodes kept their backing ids"
            time.sleep(0.05)
        for index in range(3):
            with open(f"{mount}/small/f{index}", "rb") as handle:
                handle.read()
        assert len(_served(log_path, "registered")) == probe + 6
    assert _end_counts(log_path) == (6, 0)


@needs_passthrough
def test_an_upper_files_backing_file_stays_until_its_last_name_goes(
    scratch: str, lower: str
) -> None:
    """A file of the container layer opened again and again is registered
    once; removing its last name (unlink, or a rename over it) drops the idle
    id at once, not when the kernel forgets the inode, so its space is free;
    a name left keeps it."""
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _LOG_DATA, log_path, passthrough="on") as (mount, _):
        _in_use(log_path)
        for name in ("a", "b", "c"):
            write(f"{mount}/{name}", name.encode() * 100)
        os.link(f"{mount}/c", f"{mount}/c2")
        registered = len(_served(log_path, "registered"))
        for _ in range(20):
            for name in ("a", "b", "c"):
                with open(f"{mount}/{name}", "rb") as handle:
                    assert handle.read(1) == name.encode()
        assert len(_served(log_path, "registered")) == registered  # the creates' ids, idle
        unregistered = len(_served(log_path, "unregistered"))
        os.unlink(f"{mount}/a")
        assert len(_served(log_path, "unregistered")) == unregistered + 1
        os.rename(f"{mount}/c", f"{mount}/b")  # b's last name goes; c keeps c2
        assert len(_served(log_path, "unregistered")) == unregistered + 2
        with open(f"{mount}/b", "rb") as handle:  # c's file, with the id it had
            assert handle.read(1) == b"c"
        assert len(_served(log_path, "registered")) == registered
    registered, still = _end_counts(log_path)
    assert still == 0


@needs_passthrough
def test_overlayfs_stacks_on_a_strata_mount_with_passthrough(scratch: str, lower: str) -> None:
    """A read-only strata mount whose lower files are backed (as a
    snapshotter or podman stacks it) serves as overlayfs's lower layer."""
    root = os.path.join(scratch, "store")
    view = os.path.join(scratch, "view")
    upper, work = os.path.join(scratch, "ovl-upper"), os.path.join(scratch, "ovl-work")
    os.makedirs(upper)
    stacked = os.path.join(scratch, "ovl")
    with (
        strata_mount(root, [lower], view, "--passthrough", "on"),
        overlay_mount([view], stacked, upper=upper, work=work) as top,
    ):
        assert _digest_tree(top) == _digest_tree(lower)
        with open(f"{top}/log", "ab") as handle:
            handle.write(b"more\n")
        with open(f"{top}/log", "rb") as handle:
            assert handle.read() == b"first line\nmore\n"
    assert "passthrough: in use" in daemon_logs(root)


def test_passthrough_on_mounts_with_it_or_refuses_in_one_line(scratch: str, lower: str) -> None:
    """`--passthrough on` mounts only with passthrough in use, else says why
    in one line and mounts nothing; `off` and the default `auto` always
    mount, and serve the same tree."""
    root, mountpoint = os.path.join(scratch, "store"), os.path.join(scratch, "mnt")
    os.makedirs(mountpoint)
    result = strata(root, "mount", "--passthrough", "on", "--layer", lower, mountpoint,
                    check=False)  # fmt: skip
    if _WHY_NOT is None:
        assert result.returncode == 0, result.stderr
        assert _digest_tree(mountpoint) == _digest_tree(lower)
        strata(root, "umount", mountpoint)
    else:
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "passthrough is not available" in result.stderr
        assert find_mount(mountpoint) is None
    for mode in ("off", "auto"):
        with strata_mount(root, [lower], mountpoint, "--passthrough", mode):
            assert _digest_tree(mountpoint) == _digest_tree(lower)
    logs = daemon_logs(root)
    assert ("passthrough: in use" in logs) == (_WHY_NOT is None)
    # auto says in one line why it goes without.
    assert ("passthrough: not used: " in logs) == (_WHY_NOT is not None)


@needs_passthrough
def test_a_write_through_a_shared_mapping_shows_in_the_times(scratch: str, lower: str) -> None:
    """A mapping of a backed file writes the host file with no request to
    the daemon; its new mtime and ctime show all the same, while the file is
    mapped and after (xfstests generic/080)."""
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    store, mount = os.path.join(scratch, "store"), os.path.join(scratch, "mnt")
    layers = ["--upper", upper, "--work", work, "--passthrough", "on"]
    with strata_mount(store, [lower], mount, *layers):
        path = f"{mount}/mapped"
        write(path, b"x" * 4096)
        os.utime(path, ns=(OLD, OLD))
        before = _times(path)  # the kernel keeps these attributes
        time.sleep(0.05)  # a new ctime, whatever the clock's tick
        with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), 0) as mapped:
            assert mapped[0:1] == b"x"
            mapped[0:1] = b"y"
            mapped.flush()
            during = _times(path)
        after = _times(path)
        host = os.stat(f"{upper}/mapped")
        assert before[0] == OLD
        assert during[0] != before[0] and during[1] != before[1]
        assert after == (host.st_mtime_ns, host.st_ctime_ns)
        with open(path, "rb") as reread:
            assert reread.read(1) == b"y"


OLD = 1_500_000_000_000_000_000


def _times(path: str) -> tuple[int, int]:
    """mtime and ctime as stat(1) asks for them: a statx of those alone, which
    the kernel answers from its attributes unless they are stale (an access
    makes only the atime stale)."""
    shown = subprocess.run(["stat", "-c", "%.9Y %.9Z", path], capture_output=True, text=True)
    mtime, ctime = (int(field.replace(".", "")) for field in shown.stdout.split())
    return mtime, ctime
