"""Host paths beneath a root (core/paths.py), used directly: no mount."""

from __future__ import annotations

import errno
import os

import pytest

from tests.layers import write
from unionfs.core import paths, syscalls
from unionfs.core.paths import BeneathPaths, chmod_here, truncate_here
from unionfs.core.upper import RENAME_EXCHANGE, RENAME_NOREPLACE


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_directory_on_the_way_that_is_a_symlink_is_refused(scratch: str) -> None:
    top, outside = os.path.join(scratch, "top"), os.path.join(scratch, "outside")
    write(f"{top}/d/f", "inside")
    write(f"{outside}/f", "outside")
    os.symlink(outside, f"{top}/link")
    tree = BeneathPaths(os.fsencode(top))
    try:
        with open(tree.path(b"d/f"), "rb") as handle:
            assert handle.read() == b"inside"
        for call in (
            lambda: tree.path(b"link/f"),
            lambda: tree.at(b"link/f"),
            lambda: tree.directory(b"link"),
        ):
            with pytest.raises(OSError) as caught:
                call()
            assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)
        # The last component is the call's own: an lstat sees the symlink itself.
        assert os.path.islink(tree.path(b"link"))
        directory, name = tree.at(b"d/f")
        assert os.stat(name, dir_fd=directory).st_size == len("inside")
    finally:
        tree.close()


def test_a_held_directory_is_the_one_it_was_until_forgotten(scratch: str) -> None:
    top = os.path.join(scratch, "top")
    write(f"{top}/d/f", "first")
    tree = BeneathPaths(os.fsencode(top))
    try:
        tree.path(b"d/f")  # d is held from now on
        os.rename(f"{top}/d", f"{top}/moved")
        write(f"{top}/d/f", "second")
        with open(tree.path(b"d/f"), "rb") as handle:
            assert handle.read() == b"first"  # why a mover must call forget()
        tree.forget()
        with open(tree.path(b"d/f"), "rb") as handle:
            assert handle.read() == b"second"
    finally:
        tree.close()


def test_held_directories_are_bounded_and_closed(
    scratch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(paths, "PARENTS_KEPT", 8)
    top = os.path.join(scratch, "top")
    for number in range(100):
        write(f"{top}/d{number}/f", "x")
    before = _open_fds()
    tree = BeneathPaths(os.fsencode(top))
    for number in range(100):
        assert os.path.exists(tree.path(b"d%d/f" % number))
    assert _open_fds() - before <= 1 + 3 * 8  # the top, those held, those retired
    tree.close()
    assert _open_fds() == before


def test_chmod_and_truncate_never_follow_a_symlink(scratch: str) -> None:
    target = os.path.join(scratch, "target")
    write(target, "data")
    os.chmod(target, 0o644)
    os.symlink(target, os.path.join(scratch, "link"))
    link = os.fsencode(os.path.join(scratch, "link"))
    with pytest.raises(OSError) as caught:
        chmod_here(link, 0o600)
    assert caught.value.errno in (errno.EOPNOTSUPP, errno.ELOOP)
    with pytest.raises(OSError) as caught:
        truncate_here(link, 0)
    assert caught.value.errno == errno.ELOOP
    assert os.stat(target).st_mode & 0o777 == 0o644
    assert os.path.getsize(target) == 4
    chmod_here(os.fsencode(target), 0o600)
    truncate_here(os.fsencode(target), 1)
    assert os.stat(target).st_mode & 0o777 == 0o600
    assert os.path.getsize(target) == 1


def test_the_system_calls_made_through_ctypes_fail_as_os_calls_do(scratch: str) -> None:
    """core/syscalls.py raises what an os function would (the errno's own
    OSError subclass, with the paths), which its callers tell apart."""
    write(f"{scratch}/a", "a")
    write(f"{scratch}/b", "b")
    a, b, missing = (os.fsencode(f"{scratch}/{name}") for name in ("a", "b", "missing"))
    with pytest.raises(FileExistsError) as caught:
        syscalls.renameat2(a, b, RENAME_NOREPLACE)
    assert (caught.value.filename, caught.value.filename2) == (a, b)
    with pytest.raises(FileNotFoundError) as gone:
        syscalls.linkat(missing, b, 0)
    assert gone.value.filename == missing
    top = os.open(scratch, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(FileNotFoundError):
            syscalls.openat2(top, b"missing", os.O_RDONLY, 0)
        fd = syscalls.openat2(top, b"a", os.O_RDONLY | os.O_CLOEXEC, 0)
        assert os.read(fd, 8) == b"a"
        os.close(fd)
    finally:
        os.close(top)
    syscalls.renameat2(a, b, RENAME_EXCHANGE)
    with open(b, "rb") as handle:
        assert handle.read() == b"a"
