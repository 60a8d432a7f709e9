"""The kernel keeps directory listings, and drops one on every change.

strata's opendir answers ENOSYS, so the kernel opens directories without
asking and caches every listing it reads (pyfuse3 hands readdir the inode,
with the patch tools/setup.sh applies). The daemon counts the readdir
requests it is sent: an unchanged directory listed again costs none. After
each kind of change through the mount, the listing, its inode numbers and its
file types equal what the kernel's overlayfs shows after the same steps.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from tests.layers import write
from tests.mounts import WRITABLE_OVERLAY, overlay_mount, patched_mount
from unionfs.core.syscalls import renameat2
from unionfs.core.upper import RENAME_EXCHANGE
from unionfs.fuse import OPENDIR_OPTIONAL

_COUNT_READDIR = """
import os
import unionfs.fuse as fuse

count_path = os.path.join(os.path.dirname(mountpoint), "readdir-count")
original_readdir = fuse.StrataOperations.readdir
async def readdir(self, fh, start_id, token):
    with open(count_path, "a") as counted:
        counted.write("r")
    return await original_readdir(self, fh, start_id, token)
fuse.StrataOperations.readdir = readdir
"""


def _rename_exchange(mount: str) -> None:
    renameat2(os.fsencode(f"{mount}/d/a1"), os.fsencode(f"{mount}/d/sub"), RENAME_EXCHANGE)


def _mknod(mount: str) -> None:
    os.mknod(f"{mount}/d/fifo", 0o644 | stat.S_IFIFO)


def _append(path: str) -> Callable[[str], None]:
    def change(mount: str) -> None:
        with open(f"{mount}/{path}", "a") as handle:
            handle.write("more")

    return change


# Each change of d's entries (or of one of them) that a user can make.
CHANGES: list[tuple[str, Callable[[str], object]]] = [
    ("create", lambda m: write(f"{m}/d/new", "new")),
    ("mkdir", lambda m: os.mkdir(f"{m}/d/newdir")),
    ("mknod", _mknod),
    ("symlink", lambda m: os.symlink("a1", f"{m}/d/link")),
    ("hard link from elsewhere", lambda m: os.link(f"{m}/other/o1", f"{m}/d/hard")),
    ("copy-up of a lower file", _append("d/a2")),
    ("unlink of a lower file", lambda m: os.unlink(f"{m}/d/a2")),
    ("unlink of a new file", lambda m: os.unlink(f"{m}/d/new")),
    ("rmdir", lambda m: os.rmdir(f"{m}/d/newdir")),
    ("rmdir of a lower directory", lambda m: os.rmdir(f"{m}/d/empty")),
    ("rename within", lambda m: os.rename(f"{m}/d/a3", f"{m}/d/a3.moved")),
    ("rename in", lambda m: os.rename(f"{m}/other/o2", f"{m}/d/o2")),
    ("rename out", lambda m: os.rename(f"{m}/d/link", f"{m}/other/link")),
    ("rename over a file", lambda m: os.rename(f"{m}/d/hard", f"{m}/d/a3.moved")),
    ("rename of a lower directory in", lambda m: os.rename(f"{m}/other/odir", f"{m}/d/odir")),
    ("rename exchange", _rename_exchange),
    ("same name, new file", lambda m: write(f"{m}/d/a2", "again")),
    ("chmod of the directory", lambda m: os.chmod(f"{m}/d", 0o700)),
]


def _listing(directory: str) -> list[tuple[str, int, bool, bool]]:
    """Names with d_ino, and d_type checked against lstat (ino, dir?, symlink?)."""
    seen = []
    with os.scandir(directory) as entries:
        for entry in entries:
            st = os.lstat(entry.path)
            assert entry.inode() == st.st_ino, entry.path
            assert entry.is_dir(follow_symlinks=False) == stat.S_ISDIR(st.st_mode), entry.path
            assert entry.is_symlink() == stat.S_ISLNK(st.st_mode), entry.path
            seen.append((entry.name, st.st_nlink if stat.S_ISREG(st.st_mode) else 0,
                         entry.is_dir(follow_symlinks=False), entry.is_symlink()))  # fmt: skip
    return sorted(seen)


def _lower(scratch: str) -> str:
    lower = os.path.join(scratch, "lower")
    for name in ("a1", "a2", "a3"):
        write(f"{lower}/d/{name}", name)
    os.makedirs(f"{lower}/d/sub/deeper")
    os.makedirs(f"{lower}/d/empty")
    write(f"{lower}/other/o1", "o1")
    write(f"{lower}/other/o2", "o2")
    write(f"{lower}/other/odir/inside", "inside")
    return lower


def test_listings_stay_cached_until_the_directory_changes(scratch: str) -> None:
    assert OPENDIR_OPTIONAL, "pyfuse3 lacks tools/pyfuse3-no-opendir.patch: run tools/setup.sh"
    lower = _lower(scratch)
    expected: list[list[tuple[str, int, bool, bool]]] = []
    oracle = os.path.join(scratch, "oracle")
    os.makedirs(f"{oracle}/upper")
    with overlay_mount([lower], f"{oracle}/mnt", options=WRITABLE_OVERLAY,
                       upper=f"{oracle}/upper", work=f"{oracle}/work") as mount:  # fmt: skip
        expected.append(_listing(f"{mount}/d"))
        for _, change in CHANGES:
            change(mount)
            expected.append(_listing(f"{mount}/d"))

    strata_scratch = os.path.join(scratch, "strata")
    os.makedirs(strata_scratch)
    counted = os.path.join(strata_scratch, "readdir-count")
    log_path = os.path.join(scratch, "daemon.log")

    def readdirs() -> int:
        with open(counted) as handle:
            return len(handle.read())

    with patched_mount(strata_scratch, lower, _COUNT_READDIR, log_path) as (mount, _):
        assert _listing(f"{mount}/d") == expected[0]
        first = readdirs()
        assert first > 0
        assert _listing(f"{mount}/d") == expected[0]
        assert readdirs() == first, "an unchanged directory was read from strata again"
        for number, (what, change) in enumerate(CHANGES, start=1):
            change(mount)
            assert _listing(f"{mount}/d") == expected[number], what
            after_change = readdirs()
            assert _listing(f"{mount}/d") == expected[number], what
            assert readdirs() == after_change, f"after {what}: listing not cached again"
