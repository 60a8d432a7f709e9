"""Access times under relatime, strictatime and nodiratime, as the kernel's
overlayfs keeps them (core/atime.py): the same accesses on both, the same
atimes changed; lower layers' files never."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tests.layers import write
from tests.mounts import STRATA, drop_caches, force_unmount, overlay_mount, strata_mount
from tests.tracing import syscalls_of
from unionfs.core.atime import AtimeMode, AtimePolicy
from unionfs.mount import pid_file

PAST = 1_500_000_000_000_000_000  # 2017
DAY = 24 * 3600 * 10**9
OVERLAY = [sys.executable, "-c", "from unionfs.overlayfs_cli import main; main()"]


def test_the_relatime_rule() -> None:
    """The kernel's relatime_need_update, without mounting."""
    now = PAST + 10 * DAY
    relatime, strict = AtimePolicy(AtimeMode.RELATIME), AtimePolicy(AtimeMode.STRICTATIME)
    recent = now - 60 * 10**9  # a minute old, newer than mtime and ctime
    assert not relatime.wants_update(recent, recent - 1, recent - 1, now)
    assert relatime.wants_update(recent, recent, recent - 1, now)  # not newer than mtime
    assert relatime.wants_update(recent, recent - 1, recent + 1, now)  # older than ctime
    assert relatime.wants_update(now - DAY, now - 2 * DAY, now - 2 * DAY, now)  # a day old
    assert not relatime.wants_update(now - DAY + 1, now - 2 * DAY, now - 2 * DAY, now)
    assert strict.wants_update(recent, recent - 1, recent - 1, now)
    assert not AtimePolicy().wants_update(0, now, now, now)
    nodiratime = AtimePolicy(AtimeMode.RELATIME, nodiratime=True)
    assert nodiratime.applies_to(False) and not nodiratime.applies_to(True)
    assert not AtimePolicy().applies_to(False)


def _lower(scratch: str) -> str:
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/low/file", b"lower data")
    write(f"{lower}/low/other", b"more")
    for path in (f"{lower}/low/file", f"{lower}/low/other", f"{lower}/low"):
        os.utime(path, ns=(PAST, PAST))  # an atime relatime would update, were it upper
    return lower


def _read(path: str) -> None:
    with open(path, "rb") as handle:
        handle.read()


def _changed(path: str, access: Callable[[str], object]) -> bool:
    """Whether *access* changed the atime of *path*. The pauses keep the
    kernel's coarse clock (a tick) from giving the old and new atime alike."""
    before = os.stat(path).st_atime_ns
    time.sleep(0.02)
    access(path)
    changed = os.stat(path).st_atime_ns != before
    time.sleep(0.02)
    return changed


def _accesses(mount: str) -> list[tuple[str, bool]]:
    """A sequence of accesses, each with whether it changed an atime."""
    write(f"{mount}/up", b"upper data")
    os.mkdir(f"{mount}/updir")
    write(f"{mount}/updir/inside", b"x")
    for path in (f"{mount}/up", f"{mount}/updir"):
        os.utime(path, ns=(PAST, PAST))  # atime not newer than mtime
    time.sleep(0.02)  # the ctime the utime set is older than the reads below
    seen = [
        ("read an upper file", _changed(f"{mount}/up", _read)),
        ("read it again", _changed(f"{mount}/up", _read)),
        ("open it for writing only", _changed(f"{mount}/up", lambda p: open(p, "ab").close())),
        ("list an upper directory", _changed(f"{mount}/updir", os.listdir)),
        ("list it again", _changed(f"{mount}/updir", os.listdir)),
        ("read a lower file", _changed(f"{mount}/low/file", _read)),
        ("list a lower directory", _changed(f"{mount}/low", os.listdir)),
    ]
    with open(f"{mount}/up", "ab") as handle:
        handle.write(b"more")  # the mtime moves past the atime
    time.sleep(0.02)
    seen.append(("read it after a write", _changed(f"{mount}/up", _read)))
    # A lower file copied up by a metadata change, then read.
    os.chmod(f"{mount}/low/other", 0o600)
    time.sleep(0.02)
    seen.append(("read a copied-up file", _changed(f"{mount}/low/other", _read)))
    return seen


@contextlib.contextmanager
def _strata_overlayfs(scratch: str, lower: str, options: str, top: str = "") -> Iterator[str]:
    """strata-overlayfs over *lower* with *options*, the same UPPER each time
    (in *top*, scratch unless told)."""
    mount = os.path.join(scratch, "s-mnt")
    upper, work = (os.path.join(top or scratch, name) for name in ("s-upper", "s-work"))
    for path in (mount, upper, work):
        os.makedirs(path, exist_ok=True)
    env = {**os.environ, "STRATA_ROOT": os.path.join(scratch, "store")}
    layers = f"lowerdir={lower},upperdir={upper},workdir={work}"
    command = [*OVERLAY, "-o", f"{layers}{',' + options if options else ''}", mount]
    subprocess.run(command, check=True, env=env)
    try:
        yield mount
    finally:
        subprocess.run([*STRATA, "umount", mount], capture_output=True, env=env)
        force_unmount(mount)


# What overlayfs does under each set of options (it is checked too, so that
# the comparison means something): reads and listings of the container
# layer's files count, writes and lower layers' files do not.
EXPECTED = {
    "": [True, False, False, True, False, False, False, True, True],  # relatime, the default
    "strictatime": [True, True, False, True, True, False, False, True, True],
    "nodiratime": [True, False, False, False, False, False, False, True, True],
    "noatime": [False] * 9,
}


@pytest.mark.parametrize("options", list(EXPECTED), ids=lambda o: o or "relatime")
def test_atime_options_as_on_overlayfs(scratch: str, options: str) -> None:
    lower = _lower(scratch)
    kernel_upper = os.path.join(scratch, "k-upper")
    os.makedirs(kernel_upper)
    with overlay_mount(
        [lower],
        os.path.join(scratch, "k-mnt"),
        options=",".join(filter(None, ["redirect_dir=on,index=on", options])),
        upper=kernel_upper,
        work=os.path.join(scratch, "k-work"),
    ) as mount:
        theirs = _accesses(mount)
    with _strata_overlayfs(scratch, lower, options) as mount:
        ours = _accesses(mount)
        with open("/proc/self/mounts") as mounts:
            flags = next(line.split()[3] for line in mounts if line.split()[1] == mount)
    assert [changed for _, changed in theirs] == EXPECTED[options], theirs
    assert ours == theirs
    # findmnt shows the policy (relatime is the kernel's default for a mount).
    assert ("noatime" in flags.split(",")) == (options == "noatime"), flags
    assert ("nodiratime" in flags.split(",")) == (options == "nodiratime"), flags
    # The lower layer's files keep their atime, whatever was read.
    assert os.stat(f"{lower}/low/file").st_atime_ns == PAST


@contextlib.contextmanager
def _tmpfs(path: str) -> Iterator[str]:
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        force_unmount(path)


@pytest.mark.parametrize("passthrough", ["on", "off"])
def test_atimes_on_a_tmpfs_upper_as_on_overlayfs(scratch: str, passthrough: str) -> None:
    """UPPER on a tmpfs, as for many containers: it cannot say whether a read
    would wait (RWF_NOWAIT answers EOPNOTSUPP), and reads there still count.
    Without passthrough (whose reads the kernel counts itself) strata once
    gave up on them, and such files kept their atime."""
    lower = _lower(scratch)
    with _tmpfs(os.path.join(scratch, "tmpfs")) as top:
        os.makedirs(f"{top}/k-upper")
        with overlay_mount([lower], os.path.join(scratch, "k-mnt"),
                           options="redirect_dir=on,index=on",
                           upper=f"{top}/k-upper", work=f"{top}/k-work") as mount:  # fmt: skip
            theirs = _accesses(mount)
        with _strata_overlayfs(scratch, lower, f"passthrough={passthrough}", top) as mount:
            ours = _accesses(mount)
    assert [changed for _, changed in theirs] == EXPECTED[""], theirs
    assert ours == theirs


def test_a_read_that_changes_no_atime_opens_nothing_for_it(scratch: str) -> None:
    """Under relatime most reads change no atime (read since the file last
    changed): the lstat that finds the file says so, and no open of the host
    file asks it again (one per open before; counted by tracepoints)."""
    lower = _lower(scratch)
    with _strata_overlayfs(scratch, lower, "") as mount:
        write(f"{mount}/up", b"upper data")
        os.utime(f"{mount}/up", ns=(PAST, PAST))
        time.sleep(0.02)
        assert _changed(f"{mount}/up", _read)  # this read counts, the next ones do not
        with open(pid_file(os.path.realpath(mount))) as handle:
            daemon = int(handle.read())
        opens = {"sys_enter_openat": "", "sys_enter_openat2": ""}
        with syscalls_of(daemon, opens) as traced:
            for _ in range(200):
                _read(f"{mount}/up")
            calls = traced.counts()
        assert sum(calls.values()) < 20, calls
        assert not _changed(f"{mount}/up", _read)


def test_atimes_set_by_a_mount_stay_after_a_remount(scratch: str) -> None:
    """strata mount --atime strictatime: the atime a read gave a file is the
    host file's own, kept over a remount; a read-only mount and strata
    mount's default (noatime) change none."""
    lower = _lower(scratch)
    store, mount = os.path.join(scratch, "store"), os.path.join(scratch, "mnt")
    upper, work = os.path.join(scratch, "s-upper"), os.path.join(scratch, "s-work")
    os.makedirs(upper)
    layers = ["--upper", upper, "--work", work]
    with strata_mount(store, [lower], mount, *layers, "--atime", "strictatime"):
        write(f"{mount}/file", b"data")
        os.utime(f"{mount}/file", ns=(PAST, PAST))
        drop_caches(mount)  # the update waits for the disk: a worker thread's
        _read(f"{mount}/file")
        read_at = os.stat(f"{mount}/file").st_atime_ns
        assert read_at > PAST
    assert os.stat(f"{upper}/file").st_atime_ns == read_at
    with _strata_overlayfs(scratch, lower, "ro,strictatime") as mount:
        _read(f"{mount}/file")
        assert os.stat(f"{mount}/file").st_atime_ns == read_at
    with strata_mount(store, [lower], mount, *layers):
        _read(f"{mount}/file")
        assert os.stat(f"{mount}/file").st_atime_ns == read_at
    bad = subprocess.run([*STRATA, "--root", store, "mount", "--layer", lower, "--nodiratime",
                          mount], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "--nodiratime goes with --atime" in bad.stderr, bad.stderr
