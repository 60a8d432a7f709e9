"""The kernel keeps symlink targets: readlink is asked once per inode.

A symlink's target never changes, and strata never gives an inode number
to a second file within a mount, so the kernel may cache each target in its
page cache (FUSE_CAP_CACHE_SYMLINKS, with the patch tools/setup.sh applies
to pyfuse3). The daemon counts the readlink requests it is sent; after each
change that gives a name a new symlink (or moves one), the name still reads
what the kernel's overlayfs shows after the same steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pyfuse3

from tests.layers import write
from tests.mounts import WRITABLE_OVERLAY, overlay_mount, patched_mount

_COUNT_READLINK = """
import os
import unionfs.fuse as fuse

count_path = os.path.join(os.path.dirname(mountpoint), "readlink-count")
original_readlink = fuse.StrataOperations.readlink
async def readlink(self, inode, ctx):
    with open(count_path, "a") as counted:
        counted.write("r")
    return await original_readlink(self, inode, ctx)
fuse.StrataOperations.readlink = readlink
"""

NAMES = ("d/lower-link", "d/lower-abs", "d/new-link")


def _replace(mount: str) -> None:
    os.unlink(f"{mount}/d/lower-link")
    os.symlink("target-replaced", f"{mount}/d/lower-link")


def _rename_over(mount: str) -> None:
    os.symlink("target-over", f"{mount}/d/tmp-link")
    os.rename(f"{mount}/d/tmp-link", f"{mount}/d/new-link")


def _swap(mount: str) -> None:
    os.rename(f"{mount}/d/lower-abs", f"{mount}/d/swap")
    os.rename(f"{mount}/d/lower-link", f"{mount}/d/lower-abs")
    os.rename(f"{mount}/d/swap", f"{mount}/d/lower-link")


CHANGES: list[tuple[str, Callable[[str], object]]] = [
    ("a new symlink", lambda m: os.symlink("target-new", f"{m}/d/new-link")),
    ("replaced by unlink and symlink", _replace),
    ("copied up by lchown", lambda m: os.chown(f"{m}/d/lower-abs", 1, 1, follow_symlinks=False)),
    ("renamed over another", _rename_over),
    ("names swapped", _swap),
]


def _targets(mount: str) -> dict[str, str | None]:
    return {
        name: os.readlink(f"{mount}/{name}") if os.path.lexists(f"{mount}/{name}") else None
        for name in NAMES
    }


def test_symlink_targets_are_cached_and_stay_right(scratch: str) -> None:
    assert getattr(pyfuse3.Operations, "enable_symlink_caching", None) is False, (
        "pyfuse3 lacks tools/pyfuse3-cache-symlinks.patch: run tools/setup.sh"
    )
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/d/file", "file")
    os.symlink("file", f"{lower}/d/lower-link")
    os.symlink("/etc/passwd", f"{lower}/d/lower-abs")
    expected: list[dict[str, str | None]] = []
    oracle = os.path.join(scratch, "oracle")
    os.makedirs(f"{oracle}/upper")
    with overlay_mount([lower], f"{oracle}/mnt", options=WRITABLE_OVERLAY,
                       upper=f"{oracle}/upper", work=f"{oracle}/work") as mount:  # fmt: skip
        expected.append(_targets(mount))
        for _, change in CHANGES:
            change(mount)
            expected.append(_targets(mount))

    strata_scratch = os.path.join(scratch, "strata")
    os.makedirs(strata_scratch)
    counted = os.path.join(strata_scratch, "readlink-count")
    write(counted)

    def readlinks() -> int:
        with open(counted) as handle:
            return len(handle.read())

    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(strata_scratch, lower, _COUNT_READLINK, log_path) as (mount, _):
        assert _targets(mount) == expected[0]
        first = readlinks()
        assert first == 2  # the two lower symlinks, once each
        for _ in range(3):
            assert _targets(mount) == expected[0]
        with open(f"{mount}/d/lower-link") as handle:  # followed, not only read
            assert handle.read() == "file"
        assert readlinks() == first, "a symlink's target was asked again"
        for number, (what, change) in enumerate(CHANGES, start=1):
            change(mount)
            assert _targets(mount) == expected[number], what
            asked = readlinks()
            assert _targets(mount) == expected[number], what
            assert readlinks() == asked, f"after {what}: the target was asked again"
