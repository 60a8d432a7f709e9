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


def _open_unlinked(mount: str) -> list[tuple[int, int, int]]:
    """fstat, write and ftruncate files whose names are gone: (size, nlink, mode) seen."""
    seen = []
    with open(f"{mount}/lower-file", "r+b") as handle:  # a lower file, copied up
        os.unlink(f"{mount}/lower-file")
        handle.seek(0, os.SEEK_END)
        handle.write(b" and more")
        handle.flush()
        st = os.fstat(handle.fileno())
        seen.append((st.st_size, st.st_nlink, st.st_mode))
        os.ftruncate(handle.fileno(), 3)
        st = os.fstat(handle.fileno())
        seen.append((st.st_size, st.st_nlink, st.st_mode))
    with open(f"{mount}/new-file", "wb") as handle:  # made in the container
        handle.write(b"fresh")
        handle.flush()
        os.rename(f"{mount}/other", f"{mount}/new-file-gone")
        os.unlink(f"{mount}/new-file")
        st = os.fstat(handle.fileno())
        seen.append((st.st_size, st.st_nlink, st.st_mode))
    return seen


def test_open_files_keep_working_after_unlink(scratch: str) -> None:
    """apt writes, unlinks and then fstats its files: strata answered ESTALE
    once every name of a copied-up file was gone. Same as the kernel now."""
    from tests.mounts import WRITABLE_OVERLAY, overlay_mount

    lower = os.path.join(scratch, "lower")
    write(f"{lower}/lower-file", "lower data")
    write(f"{lower}/other", "other")
    results = []
    for system in ("overlayfs", "strata"):
        upper, work = (
            os.path.join(scratch, f"{system}-upper"),
            os.path.join(scratch, f"{system}-work"),
        )
        os.makedirs(upper)
        mount = os.path.join(scratch, f"{system}-mnt")
        if system == "strata":
            with strata_mount(os.path.join(scratch, "store"), [lower], mount,
                              "--upper", upper, "--work", work):  # fmt: skip
                results.append(_open_unlinked(mount))
        else:
            with overlay_mount([lower], mount, options=WRITABLE_OVERLAY, upper=upper, work=work):
                results.append(_open_unlinked(mount))
    kernel, ours = results
    assert ours == kernel
    assert [size for size, _, _ in ours] == [19, 3, 5] and {n for _, n, _ in ours} == {0}
