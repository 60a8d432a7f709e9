"""Times a copy-up must not change, checked against the kernel's overlayfs."""

from __future__ import annotations

import os

from tests.layers import write
from tests.mounts import on_both, writable_mount

OLD = 1_500_000_000_123_456_789  # 2017: far from any time an operation sets
SET = 1_700_000_000_987_654_321


def _lower(scratch: str) -> str:
    lower = os.path.join(scratch, "lower")
    for path in ("dir/meta", "dir/data", "dir/attr", "dir/sub/deep", "moved/file"):
        write(f"{lower}/{path}", path)
    for top, dirs, files in os.walk(lower, topdown=False):
        for name in dirs + files:
            os.utime(os.path.join(top, name), ns=(OLD, OLD))
    os.utime(lower, ns=(OLD, OLD))
    return lower


def _copy_ups(mount: str) -> None:
    """Copy-ups of every kind, none of which changes a directory."""
    os.chmod(f"{mount}/dir/meta", 0o600)  # metadata only
    with open(f"{mount}/dir/data", "r+b") as handle:  # data, written in place
        handle.write(b"D")
    os.setxattr(f"{mount}/dir/attr", "user.tag", b"v")
    os.chmod(f"{mount}/dir/sub/deep", 0o640)  # two directories copied up on the way
    # chmod (metadata-only copy), a time set, then a rename (data copied up):
    # the time set is the one that stays.
    os.chmod(f"{mount}/moved/file", 0o600)
    os.utime(f"{mount}/moved/file", ns=(SET, SET))
    os.rename(f"{mount}/moved/file", f"{mount}/moved/renamed")


def _times_paths() -> list[str]:
    return ["dir", "dir/sub", "dir/meta", "dir/attr", "dir/sub/deep", "moved/renamed"]


def _times(mount: str) -> dict[str, int]:
    return {path: os.lstat(f"{mount}/{path}").st_mtime_ns for path in _times_paths()}


def test_copy_up_changes_no_time(scratch: str) -> None:
    seen = on_both(scratch, [_lower(scratch)], _copy_ups, _times)
    expected = {path: OLD for path in _times_paths()} | {"moved/renamed": SET}
    for system, (_, live, remounted) in seen.items():
        assert live == expected, system
        assert remounted == expected, system


def test_a_noatime_mount_changes_no_atime(scratch: str) -> None:
    """strata mounts noatime: reading a file or listing a directory through
    the mount leaves their atime as it was, whatever the host filesystem under
    UPPER does on its own reads (relatime updates an atime older than mtime)."""
    lower = _lower(scratch)
    with writable_mount("strata", scratch, [lower]) as mount:
        assert "noatime" in _mount_options(mount)
        write(f"{mount}/dir/new", b"upper data")
        os.mkdir(f"{mount}/newdir")
        write(f"{mount}/newdir/inside", b"x")
        with open(f"{mount}/dir/data", "r+b") as handle:  # a lower file copied up
            handle.write(b"D")
        paths = [f"{mount}/{name}" for name in ("dir/new", "dir/data", "newdir", "dir")]
        for path in paths:
            os.utime(path, ns=(OLD, SET))  # an atime relatime would update
        with open("/proc/sys/vm/drop_caches", "w") as caches:
            caches.write("3\n")  # every read and listing below reaches the daemon
        for path in paths:
            if os.path.isdir(path):
                os.listdir(path)
            else:
                with open(path, "rb") as handle:
                    handle.read()
        with open("/proc/sys/vm/drop_caches", "w") as caches:
            caches.write("3\n")  # attributes asked afresh
        assert {path: os.stat(path).st_atime_ns for path in paths} == dict.fromkeys(paths, OLD)


def _mount_options(mount: str) -> list[str]:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[1] == mount:
                return fields[3].split(",")
    raise AssertionError(f"{mount} is not mounted")
