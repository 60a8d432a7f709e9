"""A full or failing UPPER loses nothing: every call that fails says so, and
no later read returns a byte the calls that succeeded did not put there.

UPPER and WORK live on a small tmpfs of the test's own (`size=`,
`nr_inodes=`), so the workload runs into the limit again and again; a model
of the tree (file data by hardlink group, user xattrs, directories) is
checked against the mount after every failure, after space is freed, after
each remount, and fsck must find nothing. Reads are O_DIRECT, so what is
compared comes from strata, not from the kernel's page cache.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tests.layers import write
from tests.mounts import patched_mount, strata, strata_mount, tmpfs

MiB = 1 << 20
FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class Model:
    """What the merged tree must hold: names by file (hardlinks share one)."""

    names: dict[str, int] = field(default_factory=dict)
    data: dict[int, bytearray] = field(default_factory=dict)
    xattrs: dict[int, dict[str, bytes]] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=lambda: {""})
    serial: int = 0

    @classmethod
    def of(cls, top: str) -> Model:
        model = cls()
        groups: dict[int, int] = {}
        for where, dirs, files in os.walk(top):
            rel = os.path.relpath(where, top)
            rel = "" if rel == "." else rel
            model.dirs.update(os.path.join(rel, name) for name in dirs)
            for name in files:
                st = os.lstat(os.path.join(where, name))
                fid = groups.setdefault(st.st_ino, len(groups) + 1)
                model.names[os.path.join(rel, name)] = fid
                with open(os.path.join(where, name), "rb") as handle:
                    model.data[fid] = bytearray(handle.read())
                model.xattrs[fid] = {}
        model.serial = len(groups) + 1
        return model

    def new_file(self, path: str) -> int:
        self.serial += 1
        self.names[path] = self.serial
        self.data[self.serial] = bytearray()
        self.xattrs[self.serial] = {}
        return self.serial

    def put(self, fid: int, offset: int, data: bytes) -> None:
        content = self.data[fid]
        if offset > len(content):
            content.extend(bytes(offset - len(content)))
        content[offset : offset + len(data)] = data


@dataclass(frozen=True)
class Layers:
    """A test's lower layer, its UPPER and WORK, and its store."""

    lower: str
    upper: str
    work: str
    root: str

    def mount(self, mountpoint: str) -> contextlib.AbstractContextManager[str]:
        return strata_mount(self.root, [self.lower], mountpoint, "--upper", self.upper,
                            "--work", self.work)  # fmt: skip

    def assert_fsck_clean(self) -> None:
        result = strata(self.root, "fsck", "--layer", self.lower, "--upper", self.upper,
                        "--work", self.work, check=False)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr


@contextlib.contextmanager
def small_upper(scratch: str, lower: str, options: str) -> Iterator[Layers]:
    """UPPER and WORK on a tmpfs of the test's own (*options*: size=, nr_inodes=)."""
    small = os.path.join(scratch, "small")
    with tmpfs(small, options):
        layers = Layers(lower, os.path.join(small, "upper"), os.path.join(small, "work"),
                        os.path.join(scratch, "store"))  # fmt: skip
        os.makedirs(layers.upper)
        yield layers


def _text(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def read_direct(path: str) -> bytes:
    """Read past every cache: into a page-aligned buffer, as O_DIRECT on a
    host filesystem needs (through passthrough the kernel reads the host file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        parts, offset = [], 0
        with mmap.mmap(-1, 4 * MiB) as buffer:
            while done := os.preadv(fd, [buffer], offset):
                parts.append(buffer[:done])
                offset += done
        return b"".join(parts)
    finally:
        os.close(fd)


def check(mount: str, model: Model, work: str, when: str) -> None:
    """The mount holds exactly the model, and WORK no half-made object."""
    seen_dirs, seen_files = {""}, set[str]()
    for where, dirs, files in os.walk(mount):
        rel = os.path.relpath(where, mount)
        rel = "" if rel == "." else rel
        seen_dirs.update(os.path.join(rel, name) for name in dirs)
        seen_files.update(os.path.join(rel, name) for name in files)
    assert seen_dirs == model.dirs, when
    assert seen_files == set(model.names), when
    inodes: dict[int, int] = {}
    for path, fid in sorted(model.names.items()):
        full = os.path.join(mount, path)
        data = read_direct(full)
        expected = bytes(model.data[fid])
        if data != expected:
            first = next(
                (i for i, (a, b) in enumerate(zip(data, expected, strict=False)) if a != b),
                min(len(data), len(expected)),
            )
            raise AssertionError(
                f"{when}: {path} reads {len(data)} bytes, the model {len(expected)}; "
                f"first difference at byte {first}"
            )
        shown = {
            name: os.getxattr(full, name) for name in os.listxattr(full) if name.startswith("user.")
        }
        assert shown == model.xattrs[fid], f"{when}: xattrs of {path}"
        # Hardlinks stay one file, with one inode number, through copy-up.
        assert inodes.setdefault(fid, os.stat(full).st_ino) == os.stat(full).st_ino, path
    leftovers = os.listdir(os.path.join(work, "strata-tmp"))
    assert leftovers == [], f"{when}: half-made objects left in WORK: {leftovers}"


class Workload:
    """Random changes through the mount, each applied to the model only as
    far as the call reported success."""

    def __init__(self, mount: str, model: Model, rng: random.Random) -> None:
        self.mount = mount
        self.model = model
        self.rng = rng

    def _full(self, path: str) -> str:
        return os.path.join(self.mount, path)

    def _fresh(self) -> str:
        self.model.serial += 1
        parent = self.rng.choice(sorted(self.model.dirs))
        return os.path.join(parent, f"n{self.model.serial}")

    def _file(self) -> str | None:
        files = sorted(self.model.names)
        return self.rng.choice(files) if files else None

    def _payload(self) -> bytes:
        size = self.rng.choice([1, 4096, 100_000, 700_000, 1_500_000])
        return self.rng.randbytes(size)

    def step(self) -> str:
        kind = self.rng.choice(
            ["write", "write", "write", "append", "create", "create", "truncate", "unlink",
             "mkdir", "rename", "link", "setxattr", "fsync"]
        )  # fmt: skip
        getattr(self, kind)()
        return kind

    def write(self, append: bool = False) -> None:
        path = self._file()
        if path is None:
            return
        fid = self.model.names[path]
        data = self._payload()
        size = len(self.model.data[fid])
        offset = size if append else self.rng.randrange(0, size + 65536)
        fd = os.open(self._full(path), os.O_WRONLY | (os.O_APPEND if append else 0))
        try:
            written = os.write(fd, data) if append else os.pwrite(fd, data, offset)
            self.model.put(fid, offset, data[:written])
        finally:
            os.close(fd)

    def append(self) -> None:
        self.write(append=True)

    def create(self) -> None:
        path = self._fresh()
        fd = os.open(self._full(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            fid = self.model.new_file(path)
            data = self._payload()
            written = os.write(fd, data)
            self.model.put(fid, 0, data[:written])
        finally:
            os.close(fd)

    def truncate(self) -> None:
        path = self._file()
        if path is None:
            return
        fid = self.model.names[path]
        size = self.rng.randrange(0, 2 * len(self.model.data[fid]) + 2)
        os.truncate(self._full(path), size)
        content = self.model.data[fid]
        del content[size:]
        content.extend(bytes(size - len(content)))

    def unlink(self) -> None:
        path = self._file()
        if path is not None:
            os.unlink(self._full(path))
            self._forget(path)

    def _forget(self, path: str) -> None:
        fid = self.model.names.pop(path)
        if fid not in self.model.names.values():
            del self.model.data[fid], self.model.xattrs[fid]

    def mkdir(self) -> None:
        path = self._fresh()
        os.mkdir(self._full(path))
        self.model.dirs.add(path)

    def rename(self) -> None:
        path = self._file()
        if path is None:
            return
        target = self._fresh()
        if self.rng.random() < 0.3 and (other := self._file()) not in (None, path):
            assert other is not None
            if self.model.names[other] != self.model.names[path]:
                target = other  # over another file
        os.rename(self._full(path), self._full(target))
        fid = self.model.names[path]
        if target in self.model.names:
            self._forget(target)
        del self.model.names[path]
        self.model.names[target] = fid

    def link(self) -> None:
        path = self._file()
        if path is None:
            return
        target = self._fresh()
        os.link(self._full(path), self._full(target))
        self.model.names[target] = self.model.names[path]

    def setxattr(self) -> None:
        path = self._file()
        if path is None:
            return
        name = f"user.k{self.rng.randrange(3)}"
        # Three of them fit the one block ext4 gives an inode's xattrs.
        value = self.rng.randbytes(self.rng.choice([8, 1000]))
        os.setxattr(self._full(path), name, value)
        self.model.xattrs[self.model.names[path]][name] = value

    def fsync(self) -> None:
        path = self._file()
        if path is None:
            return
        fd = os.open(self._full(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def free_space(self, expected: tuple[int, ...]) -> None:
        """Remove about half the files, the largest first (an unlink that
        fails with an *expected* errno leaves its file)."""
        by_size = sorted(self.model.names, key=lambda p: -len(self.model.data[self.model.names[p]]))
        for path in by_size[: max(1, len(by_size) // 2)]:
            try:
                os.unlink(self._full(path))
            except OSError as exc:
                if exc.errno not in expected:
                    raise
                continue
            self._forget(path)


def _lower_tree(lower: str, rng: random.Random) -> None:
    """Large files copied up chunk by chunk, a middling one copied whole,
    small ones, a hardlinked pair, a sparse file."""
    write(f"{lower}/big/chunked-a", rng.randbytes(6 * MiB))
    write(f"{lower}/big/chunked-b", rng.randbytes(5 * MiB))
    write(f"{lower}/whole", rng.randbytes(3 * MiB))
    for index in range(6):
        write(f"{lower}/etc/small{index}", rng.randbytes(rng.randrange(1, 9000)))
    write(f"{lower}/usr/lib/pair-a", rng.randbytes(300_000))
    os.link(f"{lower}/usr/lib/pair-a", f"{lower}/usr/lib/pair-b")
    with open(write(f"{lower}/usr/sparse"), "wb") as handle:
        handle.seek(40 * MiB)
        handle.write(b"end")


def _run(
    workload: Workload,
    steps: int,
    expected: tuple[int, ...],
    after_failure: Callable[[str], None],
) -> int:
    """*steps* random changes; returns how many failed with an *expected* errno."""
    failures = 0
    for step in range(steps):
        try:
            kind = workload.step()
        except OSError as exc:
            if exc.errno not in expected:
                raise
            failures += 1
            after_failure(f"step {step} failed with {errno.errorcode[exc.errno]}")
            if failures % 4 == 0:
                workload.free_space(expected)
                after_failure(f"step {step}, after freeing space")
        else:
            assert kind
    return failures


@pytest.mark.parametrize("seed", [int(s) for s in os.environ.get("FULL_SEEDS", "1,2").split(",")])
def test_a_full_upper_never_serves_a_wrong_byte(scratch: str, seed: int) -> None:
    rng = random.Random(seed)
    lower = os.path.join(scratch, "lower")
    _lower_tree(lower, rng)
    model, before = Model.of(lower), Model.of(lower)
    mount = os.path.join(scratch, "mnt")
    with small_upper(scratch, lower, "size=12m,nr_inodes=400") as layers:
        failures = 0
        round_ = 0
        # Three rounds, and more (up to six) while the workload has met a full
        # UPPER fewer than 5 times: any seed (FULL_SEEDS) tests what it should.
        while round_ < 3 or (failures < 5 and round_ < 6):
            round_ += 1
            with layers.mount(mount):
                workload = Workload(mount, model, rng)
                check(mount, model, layers.work, f"round {round_}, after the remount")
                failures += _run(
                    workload, 70, FULL, lambda when: check(mount, model, layers.work, when)
                )
                check(mount, model, layers.work, f"round {round_}, at its end")
        layers.assert_fsck_clean()
        with layers.mount(mount):
            check(mount, model, layers.work, "after the last remount")
    assert failures >= 5, f"the workload met a full UPPER only {failures} times"
    assert Model.of(lower) == before, "the lower layer changed"


def test_the_first_write_into_a_large_lower_file_fails_whole_on_a_full_upper(
    scratch: str,
) -> None:
    """The case that served wrong bytes: a 30 MiB lower file, a 16 MiB UPPER,
    one appended byte. The open (where the copy-up starts) fails with ENOSPC,
    as on overlayfs; the file reads as it was; nothing is left in UPPER."""
    lower = os.path.join(scratch, "lower")
    data = random.Random(3).randbytes(30 * MiB)
    write(f"{lower}/big", data)
    write(f"{lower}/medium", data[: 6 * MiB])
    mount = os.path.join(scratch, "mnt")
    with small_upper(scratch, lower, "size=16m") as layers:
        small, upper = os.path.dirname(layers.upper), layers.upper
        with layers.mount(mount):
            for flags in (os.O_WRONLY | os.O_APPEND, os.O_RDWR):
                with pytest.raises(OSError) as caught:
                    os.open(f"{mount}/big", flags)
                assert caught.value.errno == errno.ENOSPC
            with pytest.raises(OSError) as caught:
                os.truncate(f"{mount}/big", 1)
            assert caught.value.errno == errno.ENOSPC
            assert read_direct(f"{mount}/big") == data
            assert os.listdir(upper) == []
            assert os.statvfs(small).f_bfree == os.statvfs(small).f_blocks
            # A file that fits is written chunk by chunk as before.
            fd = os.open(f"{mount}/medium", os.O_WRONLY | os.O_APPEND)
            try:
                assert os.write(fd, b"x") == 1
                os.fsync(fd)
            finally:
                os.close(fd)
            assert read_direct(f"{mount}/medium") == data[: 6 * MiB] + b"x"
            assert read_direct(f"{mount}/big") == data
        assert os.listdir(upper) == ["medium"]
        layers.assert_fsck_clean()


def test_no_inode_left_in_upper_fails_each_change_cleanly(scratch: str) -> None:
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/etc/conf", "lower conf")
    write(f"{lower}/etc/other", "other")
    mount = os.path.join(scratch, "mnt")
    with small_upper(scratch, lower, "size=8m,nr_inodes=24") as layers:
        with layers.mount(mount):
            made = []
            with pytest.raises(OSError) as caught:
                for index in range(100):
                    write(f"{mount}/f{index}", b"x")
                    made.append(f"f{index}")
            assert caught.value.errno == errno.ENOSPC
            assert 0 < len(made) < 100
            failed = f"f{len(made)}"
            assert not os.path.lexists(f"{mount}/{failed}")
            changes: list[Callable[[], object]] = [
                lambda: os.mkdir(f"{mount}/dir"),
                lambda: os.symlink("target", f"{mount}/link"),
                lambda: os.mkfifo(f"{mount}/fifo"),
                lambda: os.link(f"{mount}/etc/conf", f"{mount}/conf-link"),
                lambda: os.open(f"{mount}/etc/conf", os.O_WRONLY),  # copy-up
                lambda: os.unlink(f"{mount}/etc/other"),  # a whiteout needs an inode
                lambda: os.rename(f"{mount}/etc/other", f"{mount}/moved"),
            ]
            for change in changes:
                with pytest.raises(OSError) as caught:
                    change()
                assert caught.value.errno == errno.ENOSPC
            assert sorted(os.listdir(mount)) == sorted(["etc", *made])
            assert sorted(os.listdir(f"{mount}/etc")) == ["conf", "other"]
            assert read_direct(f"{mount}/etc/conf") == b"lower conf"
            assert os.listdir(os.path.join(layers.work, "strata-tmp")) == []
            # Inodes given back: everything works again, without a remount.
            for name in made[:4]:
                os.unlink(f"{mount}/{name}")
            os.unlink(f"{mount}/etc/other")
            write(f"{mount}/etc/conf", "changed")
            os.mkdir(f"{mount}/dir")
            assert read_direct(f"{mount}/etc/conf") == b"changed"
            assert sorted(os.listdir(f"{mount}/etc")) == ["conf"]
        layers.assert_fsck_clean()


# Injects EIO into strata's own changes beneath UPPER and WORK, at random,
# once the flag file exists (after the mount is up): data writes, copies,
# syncs, truncation, and the namespace and xattr calls that build objects.
_IO_ERRORS = """
import errno, os, random
_upper, _work = (os.path.abspath(p) for p in (upper, work))
_flag = os.path.join(os.path.dirname(_upper), "inject")
_rng = random.Random(11)

def _beneath(target):
    path = f"/proc/self/fd/{target}" if isinstance(target, int) else os.fsdecode(target)
    if path.startswith("/proc/self/fd/"):  # a descriptor, or NAME in a directory open as one
        fd, _, name = path.removeprefix("/proc/self/fd/").partition("/")
        try:
            path = os.path.join(os.readlink(f"/proc/self/fd/{fd}"), name)
        except OSError:
            return False
    return path.startswith((_upper + "/", _work + "/"))

def _faulty(call, position):
    def wrapper(*args, **kwargs):
        if _beneath(args[position]) and os.path.exists(_flag) and _rng.random() < 0.04:
            raise OSError(errno.EIO, "injected I/O error")
        return call(*args, **kwargs)
    return wrapper

for _name, _position in [
    ("pwrite", 0), ("ftruncate", 0), ("fsync", 0), ("fdatasync", 0), ("sendfile", 0),
    ("copy_file_range", 1), ("mkdir", 0), ("mknod", 0), ("rename", 1), ("link", 1),
    ("symlink", 1), ("setxattr", 0),
]:
    setattr(os, _name, _faulty(getattr(os, _name), _position))

import unionfs.kernel_sync
_kernel_sync = unionfs.kernel_sync.KernelSync.sync
async def _faulty_kernel_sync(self, fd, datasync):
    if _beneath(fd) and os.path.exists(_flag) and _rng.random() < 0.04:
        raise OSError(errno.EIO, "injected I/O error")
    return await _kernel_sync(self, fd, datasync)
unionfs.kernel_sync.KernelSync.sync = _faulty_kernel_sync
"""


def test_io_errors_in_upper_are_reported_and_never_serve_wrong_bytes(scratch: str) -> None:
    rng = random.Random(5)
    lower = os.path.join(scratch, "lower")
    _lower_tree(lower, rng)
    model = Model.of(lower)
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    log_path = os.path.join(scratch, "daemon.log")
    failures = 0
    with patched_mount(scratch, lower, _IO_ERRORS, log_path) as (mount, daemon):
        check(mount, model, work, "before faults")
        write(os.path.join(scratch, "inject"))
        workload = Workload(mount, model, rng)
        failures = _run(workload, 150, (errno.EIO,), lambda when: check(mount, model, work, when))
        os.unlink(os.path.join(scratch, "inject"))
        check(mount, model, work, "after the faults stopped")
    assert daemon.returncode == 0
    assert failures >= 5, f"only {failures} calls met an injected error"
    layers = Layers(lower, upper, work, os.path.join(scratch, "store"))
    mount = os.path.join(scratch, "mnt")
    with layers.mount(mount):
        check(mount, model, work, "after a remount without faults")
    layers.assert_fsck_clean()


# The background fill of a chunked copy-up fails at one chunk (an I/O error
# in UPPER), until the flag file goes.
_FILL_FAILS = """
import errno, os
import unionfs.core.chunks as chunks
_flag = os.path.join(os.path.dirname(os.path.abspath(upper)), "inject")
_fill = chunks.PartialCopy._fill
def _failing_fill(self, index):
    if index == 3 and os.path.exists(_flag):
        raise OSError(errno.EIO, "injected I/O error")
    return _fill(self, index)
chunks.PartialCopy._fill = _failing_fill

import unionfs.fuse as fuse
_flushes = os.path.join(os.path.dirname(os.path.abspath(upper)), "flushes")
_flush = fuse.StrataOperations.flush
async def _counted_flush(self, fh):
    with open(_flushes, "a") as counted:
        counted.write("f")
    return await _flush(self, fh)
fuse.StrataOperations.flush = _counted_flush
"""


def _background_copy_failed(log_path: str) -> None:
    """Wait until the daemon logs that the background copy failed."""
    deadline = time.monotonic() + 30
    while "in the background failed" not in _text(log_path):
        assert time.monotonic() < deadline, "the background copy did not fail"
        time.sleep(0.05)


def test_an_error_of_the_background_copy_reaches_the_next_fsync(scratch: str) -> None:
    lower = os.path.join(scratch, "lower")
    data = random.Random(9).randbytes(6 * MiB)
    write(f"{lower}/big", data)
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    log_path = os.path.join(scratch, "daemon.log")
    write(os.path.join(scratch, "inject"))
    with patched_mount(scratch, lower, _FILL_FAILS, log_path) as (mount, daemon):
        fd = os.open(f"{mount}/big", os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"new", 0) == 3
            _background_copy_failed(log_path)
            with pytest.raises(OSError) as caught:
                os.fsync(fd)
            assert caught.value.errno == errno.EIO
            os.fsync(fd)  # reported once to this open file
            # A file opened after the error was reported is not told again
            # (read-only: a write open would start the copy anew).
            other = os.open(f"{mount}/big", os.O_RDONLY)
            try:
                os.fsync(other)
            finally:
                os.close(other)
        finally:
            os.close(fd)
        # The file reads right: the chunk that failed comes from the lower file.
        assert read_direct(f"{mount}/big") == b"new" + data[3:]
    assert daemon.returncode == 0
    with open(log_path) as log:
        assert "big: its copy-up could not be finished" in log.read()
    # fsck names the copy still partial; a repair finishes it from the lower file.
    layers = Layers(lower, upper, work, os.path.join(scratch, "store"))
    fsck = ("fsck", "--layer", lower, "--upper", upper, "--work", work)
    found = strata(layers.root, *fsck, check=False)
    assert found.returncode == 1
    assert "big: copy-up in progress; mount it once to finish" in found.stdout
    repaired = strata(layers.root, *fsck, "--repair", check=False)
    assert "big: copy-up in progress; mount it once to finish (repaired)" in repaired.stdout
    layers.assert_fsck_clean()
    markers = [name for name in os.listxattr(f"{upper}/big") if ".overlay." in name]
    assert markers == ["trusted.overlay.strata.ino"]  # no metacopy, no chunk map
    with open(f"{upper}/big", "rb") as handle:
        assert handle.read() == b"new" + data[3:]
    mount = os.path.join(scratch, "mnt")
    with layers.mount(mount):
        assert read_direct(f"{mount}/big") == b"new" + data[3:]


def test_the_close_of_such_a_file_reports_it_and_no_other_close_asks(scratch: str) -> None:
    """close(2) reports the background copy's error too (FOPEN_NOFLUSH on
    every other open, so only such a close costs a flush request)."""
    import pyfuse3

    assert hasattr(pyfuse3.FileInfo, "noflush"), "pyfuse3 lacks tools/pyfuse3-noflush.patch"
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/big", random.Random(9).randbytes(6 * MiB))
    for index in range(3):
        write(f"{lower}/small{index}", f"small {index}")
    log_path = os.path.join(scratch, "daemon.log")
    flushes = os.path.join(scratch, "flushes")
    write(flushes)
    write(os.path.join(scratch, "inject"))
    with patched_mount(scratch, lower, _FILL_FAILS, log_path) as (mount, daemon):
        for index in range(3):
            assert _text(f"{mount}/small{index}") == f"small {index}"
            with open(f"{mount}/small{index}", "a") as handle:  # a whole copy-up
                handle.write(" more")
            write(f"{mount}/new{index}", "new")
        assert _text(flushes) == "", "a close asked for a flush it did not need"
        fd = os.open(f"{mount}/big", os.O_WRONLY)
        os.pwrite(fd, b"new", 0)
        _background_copy_failed(log_path)
        with pytest.raises(OSError) as caught:
            os.close(fd)
        assert caught.value.errno == errno.EIO
        assert _text(flushes) == "f"
    assert daemon.returncode == 0


# Fails every update of a shared copy's name count (in WORK/strata-links)
# while the flag file exists.
_COUNT_FAILS = """
import errno, os
_flag = os.path.join(os.path.dirname(os.path.abspath(upper)), "inject")
_setxattr = os.setxattr
def _failing_setxattr(target, *args, **kwargs):
    if not isinstance(target, int) and b"strata-links" in os.path.realpath(os.fsencode(target)):
        if os.path.exists(_flag):
            raise OSError(errno.EIO, "injected I/O error")
    return _setxattr(target, *args, **kwargs)
os.setxattr = _failing_setxattr
"""


def test_a_name_that_went_is_gone_even_where_its_shared_copy_count_fails(scratch: str) -> None:
    """unlink of a name of a hard-linked file, or a rename over one: once the
    name is gone the call succeeds. Were it to fail, the caller would believe
    the name still there while it is not. The count the disk would not take
    stays one too high, which keeps the shared copy, and is logged."""
    lower = os.path.join(scratch, "lower")
    data = random.Random(3).randbytes(10_000)
    write(f"{lower}/a", data)
    for name in ("b", "c", "d"):
        os.link(f"{lower}/a", f"{lower}/{name}")
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _COUNT_FAILS, log_path) as (mount, daemon):
        os.unlink(f"{mount}/a")  # the group is copied up: its copy counts the names
        write(os.path.join(scratch, "inject"))
        os.unlink(f"{mount}/b")
        write(f"{mount}/new", "new")
        os.rename(f"{mount}/new", f"{mount}/c")
        os.unlink(os.path.join(scratch, "inject"))
        assert sorted(os.listdir(mount)) == ["c", "d"]
        assert read_direct(f"{mount}/d") == data
        assert read_direct(f"{mount}/c") == b"new"
    assert daemon.returncode == 0
    assert _text(log_path).count("count was not lowered") == 2
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    root, mount = os.path.join(scratch, "store"), os.path.join(scratch, "mnt")
    with strata_mount(root, [lower], mount, "--upper", upper, "--work", work):
        assert sorted(os.listdir(mount)) == ["c", "d"]
        assert read_direct(f"{mount}/d") == data
        assert read_direct(f"{mount}/c") == b"new"


def _fill(directory: str) -> str:
    """Take every free block of *directory*'s filesystem; the file that holds them."""
    path = os.path.join(directory, "fill")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return path


def test_a_full_disk_under_the_index_fails_new_files_with_enospc_not_eio(scratch: str) -> None:
    """The store's index lives beside UPPER on one disk (as under `strata
    mount IMAGE`). With that disk full, a new file whose inode number takes
    an index write gets ENOSPC, as on overlayfs, never EIO; once space is
    freed new files work again with no remount, and fsck is clean. Another
    reader of the index (another mount, a command) holds its pages, so the
    index must grow to record new numbers."""
    import lmdb

    lower = os.path.join(scratch, "lower")
    write(f"{lower}/etc/conf", "conf")
    small = os.path.join(scratch, "small")
    mount = os.path.join(scratch, "mnt")
    with tmpfs(small, "size=4m"):
        layers = Layers(lower, f"{small}/upper", f"{small}/work", f"{small}/store")
        os.makedirs(layers.upper)
        with layers.mount(mount):
            os.mkdir(f"{mount}/d")
            reader = lmdb.open(f"{layers.root}/index", max_dbs=8, readonly=True)
            pinned = reader.begin()
            try:
                fill = _fill(small)
                made, refused = [], 0
                for index in range(3000):
                    try:
                        os.close(os.open(f"{mount}/d/f{index}", os.O_CREAT | os.O_WRONLY, 0o644))
                        made.append(f"f{index}")
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, f"f{index}: {exc}"
                        assert not os.path.lexists(f"{mount}/d/f{index}")
                        refused += 1
            finally:
                pinned.abort()
                reader.close()
            assert refused, "the index never had to grow: nothing was tested"
            assert sorted(os.listdir(f"{mount}/d")) == sorted(made)
            os.unlink(fill)
            write(f"{mount}/d/after", "after")
            assert _text(f"{mount}/d/after") == "after"
        layers.assert_fsck_clean()
        with layers.mount(mount):
            assert sorted(os.listdir(f"{mount}/d")) == sorted([*made, "after"])


def test_a_store_on_a_full_disk_is_refused_in_one_line(scratch: str) -> None:
    """`strata mount` with its store on a full disk says so in one line and
    changes nothing: before, LMDB's sparse lock file killed it with SIGBUS
    (with no room at all) or the daemon reported EIO (room to open the
    index, none to index the layer)."""
    lower = os.path.join(scratch, "lower")
    for index in range(2000):
        write(f"{lower}/etc/f{index}", "x")
    small = os.path.join(scratch, "small")
    mount = os.path.join(scratch, "mnt")
    os.makedirs(mount)
    with tmpfs(small, "size=1m"):
        store = f"{small}/store"
        os.makedirs(store)
        fill = _fill(small)
        for room in (0, 300 * 1024):  # none; enough to open the index, not to fill it
            if room:
                os.truncate(fill, os.stat(fill).st_size - room)
            result = strata(store, "mount", "--layer", lower, mount, check=False)
            assert result.returncode == 1, result
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr
            assert not os.path.ismount(mount)
        os.unlink(fill)
        with strata_mount(store, [lower], mount):
            assert _text(f"{mount}/etc/f7") == "x"


def test_a_full_upper_mounts_for_the_first_time_and_reads(scratch: str) -> None:
    """A full disk under UPPER and WORK from the start: the mount still
    comes up and serves the lower files, and the mount's lock in WORK takes
    no block (its state is its size), so it neither fails there nor holds
    space the disk needs back."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/etc/conf", "conf")
    mount = os.path.join(scratch, "mnt")
    with small_upper(scratch, lower, "size=1m") as layers:
        small = os.path.dirname(layers.upper)
        os.makedirs(layers.work)
        fill = _fill(small)
        with layers.mount(mount):
            assert _text(f"{mount}/etc/conf") == "conf"
            with pytest.raises(OSError) as caught:  # its copy-up needs a block
                os.open(f"{mount}/etc/conf", os.O_WRONLY | os.O_APPEND)
            assert caught.value.errno in FULL
            assert _text(f"{mount}/etc/conf") == "conf"
        os.unlink(fill)
        assert os.statvfs(small).f_bfree == os.statvfs(small).f_blocks
        layers.assert_fsck_clean()


def test_an_index_an_older_strata_left_still_opens_on_a_full_disk(scratch: str) -> None:
    """An older strata left the index's lock file sparse (LMDB backs only
    the pages it touched). On a disk that has filled since, the index opens
    as it did then, rather than be refused for the pages it cannot back."""
    from unionfs.core.index import Index

    small = os.path.join(scratch, "small")
    with tmpfs(small, "size=1m"):
        path = os.path.join(small, "index")
        index = Index(path)
        made = index.store_id()
        index.close()
        lock = os.path.join(path, "lock.mdb")
        size = os.stat(lock).st_size
        os.truncate(lock, 0)
        with open(lock, "r+b") as handle:
            handle.write(bytes(4096))  # its first page, as LMDB leaves it
        os.truncate(lock, size)
        _fill(small)
        index = Index(path)
        try:
            assert index.store_id() == made
        finally:
            index.close()
