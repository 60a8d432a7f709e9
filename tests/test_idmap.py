"""uidmapping=/gidmapping= and squash_to_*: strata-overlayfs shows and stores
owners as fuse-overlayfs does, checked against fuse-overlayfs itself on the
same layers: the owners each shows, and the ids each writes to its UPPER."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.layers import write
from tests.mounts import STRATA, force_unmount
from unionfs.errors import StrataError
from unionfs.idmap import IdMap, IdRange, parse_ranges
from unionfs.mount import find_mount

MAPPING = "0:1000:1:1:110000:65536"  # as containers-storage writes a user namespace's map
OVERLAYFS_CLI = [sys.executable, "-c", "from unionfs.overlayfs_cli import main; main()"]
OWNERS = {"root": 0, "one": 1, "five": 5000, "outside": 70000}


def test_ranges_map_both_ways_and_bad_ones_are_refused() -> None:
    ids = IdMap(parse_ranges(MAPPING, "uidmapping"), overflow=65534)
    assert [ids.shown(stored) for stored in (0, 1, 5000, 65536, 65537, 70000)] == [
        1000, 110000, 114999, 175535, 65534, 65534
    ]  # fmt: skip
    assert [ids.stored(shown) for shown in (1000, 999, 110000, 175535, 175536)] == [
        0, None, 1, 65536, None
    ]  # fmt: skip
    # Many ranges: every id maps by its own range.
    many = IdMap([IdRange(n * 10, 1000 + n * 20, 5) for n in range(500)], overflow=7)
    assert many.shown(4_993) == 1000 + 499 * 20 + 3 and many.shown(4_995) == 7
    assert many.stored(1000 + 250 * 20 + 4) == 2504
    # containers-storage's own spelling: every triple led by a colon.
    assert parse_ranges(":0:1:1001:1001:0:1", "uidmapping") == parse_ranges(
        "0:1:1001:1001:0:1", "uidmapping"
    )
    for text in ("", ":", "0:1000", "a:1:1", "0:1:0", "0:1:-1", "0:4294967290:10"):
        with pytest.raises(StrataError):
            parse_ranges(text, "uidmapping")
    with pytest.raises(StrataError, match="overlap"):
        IdMap(parse_ranges("0:100:10:5:200:10", "uidmapping"), overflow=65534)
    squashed = IdMap([], overflow=65534, squash=0)
    assert squashed.shown(1234) == 0 and squashed.stored(55) == 55


def _lower(scratch: str) -> str:
    os.chmod(scratch, 0o755)
    lower = os.path.join(scratch, "lower")
    for name, owner in OWNERS.items():
        os.chown(write(f"{lower}/{name}", name), owner, owner)
    os.makedirs(f"{lower}/shared")
    os.chmod(f"{lower}/shared", 0o1777)
    return lower


@contextmanager
def _mounted(command: list[str], scratch: str, name: str, lower: str, extra: str) -> Iterator[str]:
    upper, work, mount = (os.path.join(scratch, f"{name}-{part}") for part in ("u", "w", "m"))
    for directory in (upper, work, mount):
        os.makedirs(directory, exist_ok=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={work},{extra}"
    env = {**os.environ, "STRATA_ROOT": os.path.join(scratch, "store")}
    subprocess.run([*command, "-o", options, mount], check=True, env=env)
    try:
        yield mount
    finally:
        if command[0] != "fuse-overlayfs":
            subprocess.run([*STRATA, "umount", mount], capture_output=True)
        subprocess.run(["umount", mount], capture_output=True)
        if find_mount(mount) is not None:
            force_unmount(mount)


def _as(uid: int, *command: str) -> None:
    subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command], check=True
    )


def _changes(mount: str) -> None:
    _as(110005, "touch", f"{mount}/shared/made-by-110005")
    os.mkdir(f"{mount}/shared/made-by-root")  # root is outside the mapping
    os.chown(f"{mount}/five", 110010, 110010)
    os.chmod(f"{mount}/one", 0o600)  # a copy-up keeps the stored owner


def _owners(top: str) -> dict[str, tuple[int, int]]:
    seen = {}
    for name in [*OWNERS, "shared/made-by-110005", "shared/made-by-root"]:
        if os.path.lexists(f"{top}/{name}"):
            st = os.lstat(f"{top}/{name}")
            seen[name] = (st.st_uid, st.st_gid)
    return seen


def test_owners_show_and_store_as_with_fuse_overlayfs(scratch: str) -> None:
    if shutil.which("fuse-overlayfs") is None or shutil.which("setpriv") is None:
        pytest.skip("fuse-overlayfs or setpriv is missing")
    lower = _lower(scratch)
    extra = f"uidmapping={MAPPING},gidmapping={MAPPING}"
    seen = {}
    for name, command in (("fuse-overlayfs", ["fuse-overlayfs"]), ("strata", OVERLAYFS_CLI)):
        with _mounted(command, scratch, name, lower, extra) as mount:
            before = _owners(mount)
            _changes(mount)
            seen[name] = (before, _owners(mount), _owners(os.path.join(scratch, f"{name}-u")))
    assert seen["strata"] == seen["fuse-overlayfs"]
    shown_before, shown_after, stored = seen["strata"]
    assert shown_before == {"root": (1000, 1000), "one": (110000, 110000),
                            "five": (114999, 114999), "outside": (65534, 65534)}  # fmt: skip
    assert shown_after["shared/made-by-110005"] == (110005, 110005)
    assert stored["shared/made-by-110005"] == (6, 6)
    assert stored["five"] == (11, 11) and stored["one"] == (1, 1)
    # strata refuses an owner the mapping cannot store; it keeps what it had.
    with _mounted(OVERLAYFS_CLI, scratch, "strata", lower, extra) as mount:
        assert _owners(mount) == shown_after  # after a remount
        with pytest.raises(OSError) as refused:
            os.chown(f"{mount}/five", 70000, -1)
        assert refused.value.errno == errno.EINVAL
        assert _owners(mount)["five"] == (110010, 110010)


def test_squashing_shows_one_owner_and_chown_succeeds(scratch: str) -> None:
    lower = _lower(scratch)
    with _mounted(
        OVERLAYFS_CLI, scratch, "squash", lower, "squash_to_root,squash_to_gid=7"
    ) as mount:
        assert set(_owners(mount).values()) == {(0, 7)}
        os.chown(f"{mount}/five", 123, 456)
        assert _owners(mount)["five"] == (0, 7)
