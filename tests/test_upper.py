"""The writable layer through a real mount: what the random test does not look at."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.layers import write
from tests.mounts import strata_mount


def _inos(mount: str, paths: dict[str, str]) -> dict[str, int]:
    return {key: os.lstat(os.path.join(mount, path)).st_ino for key, path in paths.items()}


def test_inode_numbers_survive_copy_up_rename_and_remount(scratch: str) -> None:
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/dir/file", "data")
    write(f"{lower}/dir/sub/deep", "deep")
    write(f"{lower}/meta", "meta only")
    upper = os.path.join(scratch, "upper")
    os.makedirs(upper)
    store, mount = os.path.join(scratch, "store"), os.path.join(scratch, "mnt")
    args = ("--upper", upper, "--work", os.path.join(scratch, "work"))
    with strata_mount(store, [lower], mount, *args):
        before = _inos(mount, {"file": "dir/file", "dir": "dir", "deep": "dir/sub/deep",
                               "meta": "meta"})  # fmt: skip
        with open(f"{mount}/dir/file", "a") as handle:  # data copy-up
            handle.write(" more")
        os.chmod(f"{mount}/meta", 0o600)  # metadata-only copy-up
        os.rename(f"{mount}/dir", f"{mount}/moved")  # a redirect
        os.rename(f"{mount}/moved/file", f"{mount}/moved/renamed")
        write(f"{mount}/new", "new")
        after = _inos(mount, {"file": "moved/renamed", "dir": "moved", "deep": "moved/sub/deep",
                              "meta": "meta"})  # fmt: skip
        assert after == before
        new = os.lstat(f"{mount}/new").st_ino
        assert new not in before.values()
    with strata_mount(store, [lower], mount, *args):
        again = _inos(mount, {"file": "moved/renamed", "dir": "moved", "deep": "moved/sub/deep",
                              "meta": "meta"})  # fmt: skip
        assert again == before
        assert os.lstat(f"{mount}/new").st_ino == new
        with open(f"{mount}/moved/renamed") as handle:
            assert handle.read() == "data more"


_WRITER = """
import os, sys
mount, me, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
for index in range(rounds):
    line = f"{me} {index}\\n".encode()
    fd = os.open(os.path.join(mount, "shared"), os.O_WRONLY | os.O_APPEND)
    os.write(fd, line)
    os.close(fd)
    with open(os.path.join(mount, f"own-{me}"), "ab") as handle:
        handle.write(line)
    os.stat(os.path.join(mount, "big"))
    with open(os.path.join(mount, "shared"), "rb") as handle:
        handle.read()
"""


def test_many_processes_write_at_once(scratch: str) -> None:
    """Writers appending to one lower file and to their own files, readers
    alongside, while a large lower file is copied up: every line lands once."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/shared", "")
    with open(write(f"{lower}/big"), "wb") as handle:
        handle.write(os.urandom(1 << 20) * 64)
    upper = os.path.join(scratch, "upper")
    os.makedirs(upper)
    store, mount = os.path.join(scratch, "store"), os.path.join(scratch, "mnt")
    writers, rounds = 4, 200
    with strata_mount(store, [lower], mount, "--upper", upper):
        procs = [
            subprocess.Popen([sys.executable, "-c", _WRITER, mount, str(me), str(rounds)])
            for me in range(writers)
        ]
        with open(f"{mount}/big", "r+b") as handle:  # a 64 MiB copy-up meanwhile
            handle.write(b"x")
        for proc in procs:
            assert proc.wait(timeout=300) == 0
        with open(f"{mount}/shared") as handle:
            lines = handle.read().splitlines()
        assert sorted(lines) == sorted(f"{me} {i}" for me in range(writers) for i in range(rounds))
        for me in range(writers):
            with open(f"{mount}/own-{me}") as handle:
                assert handle.read().splitlines() == [f"{me} {i}" for i in range(rounds)]
