"""The workloads of `strata bench`: each builds its fixture once, then is run
on every driver, a fresh mount each time.

A metric's unit is in its name: "(µs)", "(ms)" and "(s)" are costs (lower is
better); "(files/s)" and "(MiB/s)" are rates (higher is better); "(MiB)" is
memory.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import realwork
from drivers import drop_caches, mounted

MIB = 1 << 20
Metrics = dict[str, float]


@dataclass(frozen=True)
class Workload:
    id: str
    name: str
    title: str
    build: Callable[[str, bool], Any]  # (directory, quick) -> fixture
    run: Callable[[str, Any, str, bool], Metrics]  # (driver, fixture, scratch, quick) -> metrics
    # The drivers it is for: all but the passthrough, which serves one layer
    # read-only and is the floor only for the daemon's CPU per request.
    drivers: tuple[str, ...] = ("strata", "overlay", "fuse-overlayfs", "unionfs-fuse", "native")


# Workloads that move file data: strata runs with passthrough on and off.
DATA_DRIVERS = ("strata", "strata-no-passthrough", "overlay", "fuse-overlayfs", "unionfs-fuse",
                "native")  # fmt: skip


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def _big_file(path: str, size: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    chunk = os.urandom(MIB)
    with open(path, "wb") as handle:
        for _ in range(size // MIB):
            handle.write(chunk)


def _timed(command: str, cwd: str) -> float:
    started = time.perf_counter()
    subprocess.run(["sh", "-c", command], cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


# W1: lookup cost against stack depth -------------------------------------

FILES_PER_LAYER = 200


def _depths(quick: bool) -> list[int]:
    return [1, 8] if quick else [1, 8, 32, 128]


def build_lookup(top: str, quick: bool) -> dict[int, list[str]]:
    """For each depth, a stack whose every layer adds files to one shared
    directory, as /usr/lib is in real images."""
    stacks = {}
    for depth in _depths(quick):
        layers = []
        for number in range(depth):
            layer = os.path.join(top, f"d{depth}", str(number))
            for index in range(FILES_PER_LAYER):
                _write(os.path.join(layer, "usr", "lib", f"l{number}-f{index}"), b"x")
            layers.append(layer)
        stacks[depth] = layers
    return stacks


def _stat_us(paths: list[str], exist: bool = True) -> float:
    started = time.perf_counter_ns()
    for path in paths:
        try:
            os.lstat(path)
        except FileNotFoundError:
            if exist:
                raise
    return (time.perf_counter_ns() - started) / len(paths) / 1000


def run_lookup(driver: str, stacks: dict[int, list[str]], scratch: str, quick: bool) -> Metrics:
    out: Metrics = {}
    for depth, layers in stacks.items():
        where = os.path.join(scratch, f"d{depth}")
        with mounted(driver, layers, os.path.join(where, "mnt"), where) as mount:
            lib = os.path.join(mount.path, "usr", "lib")
            files = [os.path.join(lib, f"l{n}-f{i}")
                     for n in range(depth) for i in range(FILES_PER_LAYER)]  # fmt: skip
            drop_caches()
            out[f"stat, {depth} layers, cold (µs)"] = _stat_us(files)
            out[f"stat, {depth} layers, warm (µs)"] = min(_stat_us(files) for _ in range(3))
            absent = [os.path.join(lib, f"missing{i}") for i in range(2000)]
            out[f"stat of a missing name, {depth} layers (µs)"] = _stat_us(absent, exist=False)
    return out


# W2: merged readdir ---------------------------------------------------------

MERGED_LAYERS, MERGED_ENTRIES = 32, 5000


def build_readdir(top: str, quick: bool) -> list[str]:
    layers = []
    for number in range(MERGED_LAYERS):
        for index in range(number, MERGED_ENTRIES, MERGED_LAYERS):
            _write(os.path.join(top, str(number), "big", f"e{index}"), b"")
        layers.append(os.path.join(top, str(number)))
    return layers


def _listing_ms(directory: str) -> float:
    started = time.perf_counter()
    count = len(os.listdir(directory))
    elapsed = (time.perf_counter() - started) * 1000
    if count != MERGED_ENTRIES:
        raise AssertionError(f"{directory}: {count} entries, not {MERGED_ENTRIES}")
    return elapsed


def run_readdir(driver: str, layers: list[str], scratch: str, quick: bool) -> Metrics:
    with mounted(driver, layers, os.path.join(scratch, "mnt"), scratch) as mount:
        drop_caches()
        big = os.path.join(mount.path, "big")
        return {
            f"readdir of {MERGED_ENTRIES:,} entries merged from {MERGED_LAYERS} layers, "
            "cold (ms)": _listing_ms(big),
            "the same again, warm (ms)": _listing_ms(big),
        }


# W3: tree walks -------------------------------------------------------------

TREE_LAYERS = 4


def _tree_files(quick: bool) -> int:
    return 3000 if quick else 30000


def build_walk(top: str, quick: bool) -> list[str]:
    """Files of 4-16 KiB in directories of 20, three levels, over 4 layers."""
    layers = [os.path.join(top, str(number)) for number in range(TREE_LAYERS)]
    for index in range(_tree_files(quick)):
        directory = index // 20
        where = os.path.join(layers[directory % TREE_LAYERS], f"a{directory // 100}",
                             f"b{directory // 10}", f"c{directory}")  # fmt: skip
        _write(os.path.join(where, f"f{index}"), os.urandom(4096 * (1 + index % 4)))
    return layers


def run_walk(driver: str, layers: list[str], scratch: str, quick: bool) -> Metrics:
    files = f"{_tree_files(quick):,} files"
    out: Metrics = {}
    with mounted(driver, layers, os.path.join(scratch, "mnt"), scratch) as mount:
        drop_caches()
        out[f"find over {files}, cold (s)"] = _timed("find . >/dev/null", mount.path)
        out["find again, warm (s)"] = _timed("find . >/dev/null", mount.path)
        _timed("du -s . >/dev/null", mount.path)
        # GNU tar reads no data when the archive is /dev/null: a stat walk.
        out["tar -cf /dev/null right after du (s)"] = _timed("tar -cf /dev/null .", mount.path)
        drop_caches()
        out[f"tar -cf - . | cat, every byte of {files}, cold (s)"] = _timed(
            "tar -cf - . | cat >/dev/null", mount.path
        )
    return out


# W4: small files ------------------------------------------------------------


def _small_counts(quick: bool) -> tuple[int, int]:
    """Files to create, and lower directories of 100 files for rm -rf and reads."""
    return (500, 5) if quick else (5000, 50)


def build_small(top: str, quick: bool) -> list[str]:
    _, directories = _small_counts(quick)
    for directory in range(directories):
        for index in range(100):
            _write(os.path.join(top, "tree", f"d{directory}", f"f{index}"), b"lower")
            _write(os.path.join(top, "read", f"d{directory}", f"f{index}"),
                   os.urandom(4096 * (1 + index % 8)))  # fmt: skip
    return [top]


def _read_all(top: str) -> float:
    started = time.perf_counter()
    for where, _, names in os.walk(top):
        for name in names:
            with open(os.path.join(where, name), "rb") as handle:
                while handle.read(1 << 20):
                    pass
    return time.perf_counter() - started


def run_small(driver: str, layers: list[str], scratch: str, quick: bool) -> Metrics:
    files, directories = _small_counts(quick)
    lower_files = f"{directories * 100:,} lower files"
    data = b"x" * 4096
    out: Metrics = {}
    with mounted(driver, layers, os.path.join(scratch, "mnt"), scratch, writable=True) as mount:
        directory = os.path.join(mount.path, "new")
        os.mkdir(directory)
        tenth = max(files // 10, 1)
        started = last_tenth = time.perf_counter()
        for index in range(files):
            if index == files - tenth:
                last_tenth = time.perf_counter()
            with open(os.path.join(directory, f"f{index}"), "wb") as handle:
                handle.write(data)
        ended = time.perf_counter()
        out[f"create + write 4 KiB + close, {files:,} files in one directory (files/s)"] = files / (
            ended - started
        )
        out["the same, the last tenth alone (files/s)"] = tenth / (ended - last_tenth)
        started = time.perf_counter()
        for index in range(files):
            os.unlink(os.path.join(directory, f"f{index}"))
        out["unlink of those files (files/s)"] = files / (time.perf_counter() - started)
        out[f"rm -rf of {lower_files} in {directories} directories (s)"] = _timed(
            "rm -rf tree", mount.path
        )
        drop_caches()
        read = os.path.join(mount.path, "read")
        out[f"read every byte of {lower_files} of 4-32 KiB, cold (s)"] = _read_all(read)
        out["the same again, warm (s)"] = _read_all(read)
    return out


# W5: copy-up ----------------------------------------------------------------


def _copy_sizes(quick: bool) -> list[int]:
    return [16, 64] if quick else [16, 256, 1024]


def build_copyup(top: str, quick: bool) -> list[str]:
    for size in _copy_sizes(quick):
        _big_file(os.path.join(top, f"f{size}"), size * MIB)
    _big_file(os.path.join(top, "chmod-me"), _copy_sizes(quick)[-1] * MIB)
    return [top]


_PROBE = """
import os, sys, time
root, done = sys.argv[1:3]
latencies = []
index = 0
while not os.path.exists(done) or not latencies:
    index += 1
    started = time.perf_counter()
    try:
        os.lstat(os.path.join(root, f"new-name-{index}"))
    except FileNotFoundError:
        pass
    latencies.append(time.perf_counter() - started)
latencies.sort()
print(len(latencies), latencies[int(len(latencies) * 0.99)])
"""


def copied_whole(path: str, size: int) -> bool:
    """Whether the upper copy *path* holds all *size* bytes of its data. Its
    blocks alone do not say so: strata allocates a chunked copy's space
    before it copies, and marks the copy partial (or metadata-only) in an
    xattr until the last chunk is in."""
    try:
        if os.stat(path).st_blocks * 512 < size:
            return False
        names = os.listxattr(path)
    except FileNotFoundError:
        return False
    return not any(n.endswith((".metacopy", ".strata.chunks")) for n in names)


def run_copyup(driver: str, layers: list[str], scratch: str, quick: bool) -> Metrics:
    out: Metrics = {}
    sizes = _copy_sizes(quick)
    with mounted(driver, layers, os.path.join(scratch, "mnt"), scratch, writable=True) as mount:
        for size in sizes:
            drop_caches()
            started = time.perf_counter()
            fd = os.open(os.path.join(mount.path, f"f{size}"), os.O_WRONLY)
            os.pwrite(fd, b"w" * 4096, 0)
            os.close(fd)
            out[f"first 4 KiB write into a {size:,} MiB lower file (ms)"] = (
                time.perf_counter() - started
            ) * 1000
        started = time.perf_counter()
        os.chmod(os.path.join(mount.path, "chmod-me"), 0o600)
        out[f"chmod of a {sizes[-1]:,} MiB lower file (ms)"] = (
            time.perf_counter() - started
        ) * 1000
    # Lookups of new names from another process while the largest file copies
    # up: from the first write until its upper copy holds all the data (strata
    # copies in the background after the write returns; the peers within it).
    again = os.path.join(scratch, "again")
    with mounted(driver, layers, os.path.join(scratch, "mnt2"), again, writable=True) as mount:
        done = os.path.join(scratch, "copy-done")
        probe = subprocess.Popen([sys.executable, "-c", _PROBE, mount.path, done],
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(0.2)
        name = f"f{sizes[-1]}"
        fd = os.open(os.path.join(mount.path, name), os.O_WRONLY)
        os.pwrite(fd, b"w", 0)
        os.close(fd)
        copy = os.path.join(again, "upper", name)
        deadline = time.monotonic() + 600
        while driver != "native" and not copied_whole(copy, sizes[-1] * MIB):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{driver}: the copy-up of {name} did not finish")
            time.sleep(0.01)
        open(done, "w").close()
        _, p99 = probe.communicate(timeout=600)[0].split()
        out[f"lookup of a new name during that copy-up of {sizes[-1]:,} MiB, p99 (ms)"] = (
            float(p99) * 1000
        )
        # Writing a file already copied up (with passthrough the kernel's own
        # work, once strata has made its copy whole), right away and again.
        block = b"r" * MIB
        for when in ("right after", "again"):
            started = time.perf_counter()
            fd = os.open(os.path.join(mount.path, name), os.O_WRONLY)
            for index in range(sizes[-1]):
                os.pwrite(fd, block, index * MIB)
            os.fsync(fd)
            os.close(fd)
            out[f"sequential write of that {sizes[-1]:,} MiB file + fsync, {when} (s)"] = (
                time.perf_counter() - started
            )
    return out


# W6: sequential read --------------------------------------------------------


def build_seqread(top: str, quick: bool) -> list[str]:
    _big_file(os.path.join(top, "big"), (32 if quick else 256) * MIB)
    return [top]


def run_seqread(driver: str, layers: list[str], scratch: str, quick: bool) -> Metrics:
    size = os.path.getsize(os.path.join(layers[0], "big"))
    out: Metrics = {}
    with mounted(driver, layers, os.path.join(scratch, "mnt"), scratch) as mount:
        drop_caches()
        for when in ("cold", "warm"):
            started = time.perf_counter()
            with open(os.path.join(mount.path, "big"), "rb", buffering=0) as handle:
                while handle.read(MIB):
                    pass
            rate = size / MIB / (time.perf_counter() - started)
            out[f"sequential read of a {size // MIB} MiB lower file, {when} (MiB/s)"] = rate
    return out


# W7: mount time and memory of a large image ----------------------------------


def _image_files(quick: bool) -> int:
    return 2_000 if quick else 100_000


# The image of the memory figure per inode: ten times the first, so the
# daemon's growth from the first walk to the whole is what each inode costs.
_GROWTH = 10


def build_mount(top: str, quick: bool) -> list[str]:
    """10 layers of directories of 100 files; the first tenth of the
    directories hold the image the mount time and first figure are for."""
    layers = [os.path.join(top, str(number)) for number in range(10)]
    for index in range(_image_files(quick) * _GROWTH):
        directory = index // 100
        layer = layers[directory % 10]
        _write(os.path.join(layer, "usr", "share", f"d{directory}", f"f{index}"), b"y")
    return layers


def run_mount(driver: str, layers: list[str], scratch: str, quick: bool) -> Metrics:
    if driver == "native":
        return {}  # a copy is not a mount
    first = _image_files(quick)
    files, all_files = f"{first:,} files", f"{first * _GROWTH:,} files"
    if driver == "strata":
        # Index it once: the figure is for an image already in the store.
        with mounted(driver, layers, os.path.join(scratch, "first"), scratch):
            pass
    out: Metrics = {}
    with mounted(driver, layers, os.path.join(scratch, "mnt"), scratch) as mount:
        out[f"mount of an image of {all_files} in 10 layers, already indexed (s)"] = mount.seconds
        # The first tenth of the directories: `find` stats every file in them.
        dirs = " ".join(f"usr/share/d{number}" for number in range(first // 100))
        _timed(f"find {dirs} -type f -size +1k >/dev/null", mount.path)
        rss, own = mount.rss_mib(), mount.rss_mib("RssAnon")
        if rss is not None and own is not None:
            out[f"daemon memory after walking {files} (MiB)"] = rss
            # Without the pages of mapped files (strata's index, the
            # libraries): those are the page cache's, shared and reclaimable.
            out[f"daemon's own memory (anonymous) after walking {files} (MiB)"] = own
        _timed("find . -type f -size +1k >/dev/null", mount.path)
        rss_all, own_all = mount.rss_mib(), mount.rss_mib("RssAnon")
        if rss is not None and own is not None and rss_all is not None and own_all is not None:
            more = first * (_GROWTH - 1)
            out[f"daemon memory after walking all {all_files} (MiB)"] = rss_all
            out["daemon memory per inode beyond the first walk (bytes)"] = (
                (rss_all - rss) * MIB / more
            )
            out["daemon's own memory per inode beyond the first walk (bytes)"] = (
                (own_all - own) * MIB / more
            )
    return out


# W8: daemon CPU per request ---------------------------------------------------

_AT_FDCWD, _AT_SYMLINK_NOFOLLOW, _AT_STATX_FORCE_SYNC, _STATX_BASIC_STATS = (
    -100,
    0x100,
    0x2000,
    0x7FF,
)
_libc = ctypes.CDLL(None, use_errno=True)


def _forced_getattr(path: str) -> None:
    """statx with AT_STATX_FORCE_SYNC: the kernel asks the filesystem (a GETATTR)."""
    buffer = ctypes.create_string_buffer(256)
    flags = _AT_SYMLINK_NOFOLLOW | _AT_STATX_FORCE_SYNC
    if _libc.statx(_AT_FDCWD, os.fsencode(path), flags, _STATX_BASIC_STATS, buffer) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), path)


def _cpu_files(quick: bool) -> int:
    return 1000 if quick else 5000


def build_cpu(top: str, quick: bool) -> list[str]:
    for index in range(_cpu_files(quick)):
        _write(os.path.join(top, "files", f"f{index}"), os.urandom(4096))
    return [top]


def run_cpu(driver: str, layers: list[str], scratch: str, quick: bool) -> Metrics:
    count = _cpu_files(quick)
    with mounted(driver, layers, os.path.join(scratch, "mnt"), scratch) as mount:
        files = [os.path.join(mount.path, "files", f"f{index}") for index in range(count)]
        os.lstat(os.path.dirname(files[0]))
        drop_caches()
        steps: list[tuple[str, Callable[[str], object]]] = [
            ("daemon CPU per cold lookup (µs)", os.lstat),
            ("daemon CPU per getattr, statx forced (µs)", _forced_getattr),
            ("daemon CPU per open + 4 KiB read + close (µs)", _read_file),
        ]
        out: Metrics = {}
        for metric, step in steps:
            before = mount.cpu_seconds()
            for path in files:
                step(path)
            time.sleep(0.2)  # the releases the kernel sends after close
            out[metric] = (mount.cpu_seconds() - before) / count * 1e6
    return out


def _read_file(path: str) -> None:
    with open(path, "rb", buffering=0) as handle:
        handle.read(8192)


WORKLOADS = [
    Workload("W1", "lookup", "Lookup cost against stack depth", build_lookup, run_lookup),
    Workload("W2", "readdir", "Merged directory listing", build_readdir, run_readdir),
    Workload("W3", "walk", "Tree walks", build_walk, run_walk, DATA_DRIVERS),
    Workload(
        "W4", "small", "Small files in a writable mount", build_small, run_small, DATA_DRIVERS
    ),
    Workload("W5", "copyup", "Copy-up", build_copyup, run_copyup, DATA_DRIVERS),
    Workload("W6", "seqread", "Sequential read", build_seqread, run_seqread, DATA_DRIVERS),
    Workload("W7", "mount", "Mounting a large image", build_mount, run_mount),
    Workload(
        "W8",
        "cpu",
        "Daemon CPU per request",
        build_cpu,
        run_cpu,
        ("strata", "strata-python", "fuse-overlayfs", "unionfs-fuse", "passthrough"),
    ),
    Workload(
        "W9",
        "realwork",
        "Real work in a container rootfs",
        realwork.build,
        realwork.run,
        realwork.DRIVERS,
    ),
]
