"""O_TMPFILE: an open file with no name, named later by linkat, as on overlayfs."""

from __future__ import annotations

import ctypes
import errno
import os

import pyfuse3
import pytest

from tests.layers import write
from tests.mounts import overlay_oracle, strata, strata_mount

needs_tmpfile = pytest.mark.skipif(
    "tmpfile" not in vars(pyfuse3.Operations),
    reason="pyfuse3 without tools/pyfuse3-tmpfile.patch (libfuse 3.17): no O_TMPFILE",
)

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400


def _link(fd: int, path: str) -> None:
    """linkat of an open file through its /proc link, as glibc's users do."""
    old = b"/proc/self/fd/%d" % fd
    if _libc.linkat(_AT_FDCWD, old, _AT_FDCWD, os.fsencode(path), _AT_SYMLINK_FOLLOW) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), path)


# What the steps leave in the named file: truncated to 3 bytes, then written
# at the descriptor's offset, 6.
WRITTEN = b"fir\0\0\0after"


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _outcome(step: object) -> str:
    try:
        assert callable(step)
        step()
    except OSError as error:
        return errno.errorcode[error.errno or 0]
    return "ok"


def _exercise(m: str) -> dict[str, object]:
    seen: dict[str, object] = {}
    old_umask = os.umask(0o022)
    try:
        fd = os.open(f"{m}/d", os.O_TMPFILE | os.O_RDWR, 0o666)
        os.write(fd, b"first ")
        st = os.fstat(fd)
        seen["before its name"] = (oct(st.st_mode), st.st_nlink, st.st_size, os.listdir(f"{m}/d"))
        os.fchmod(fd, 0o640)
        # Changes through the descriptor of a file with no name, and an open
        # of it through /proc (strata answered ESTALE to all but fchmod).
        seen["by its descriptor"] = [
            _outcome(lambda: os.fchown(fd, 1234, 5678)),
            _outcome(lambda: os.setxattr(fd, "user.note", b"kept")),
            _outcome(lambda: os.getxattr(fd, "user.note")),
            _outcome(lambda: os.utime(fd, ns=(1_000_000_000, 2_000_000_000))),
        ]
        again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            seen["reopened"] = os.read(again, 100)
            os.write(again, b"!")
        finally:
            os.close(again)
        os.ftruncate(fd, 3)
        _link(fd, f"{m}/d/named")
        os.write(fd, b"after")
        st = os.fstat(fd)
        seen["after its name"] = (oct(st.st_mode), st.st_nlink, st.st_size)
        seen["a second name"] = _outcome(lambda: _link(fd, f"{m}/d/named"))  # EEXIST
        named = os.stat(f"{m}/d/named")
        seen["its owner and xattr"] = (named.st_uid, named.st_gid,
                                       os.getxattr(f"{m}/d/named", "user.note"))  # fmt: skip
        os.close(fd)
        # One that is never named leaves nothing.
        lost = os.open(f"{m}/d", os.O_TMPFILE | os.O_WRONLY, 0o600)
        os.write(lost, b"lost")
        os.close(lost)
        # O_EXCL: never to be named.
        excl = os.open(f"{m}/d", os.O_TMPFILE | os.O_RDWR | os.O_EXCL, 0o600)
        seen["linking an O_EXCL one"] = _outcome(lambda: _link(excl, f"{m}/d/excl"))
        os.close(excl)
        # In a directory only the lower layer has, and over a whiteout.
        os.unlink(f"{m}/lowerdir/old")
        fd = os.open(f"{m}/lowerdir", os.O_TMPFILE | os.O_RDWR, 0o644)
        os.write(fd, b"over a whiteout")
        _link(fd, f"{m}/lowerdir/old")
        os.close(fd)
    finally:
        os.umask(old_umask)
    for top, directories, files in os.walk(m):
        for name in sorted(directories + files):
            path = os.path.join(top, name)
            st = os.lstat(path)
            data = _read(path) if os.path.isfile(path) else b""
            # (A merged directory's link count is 1 on overlayfs, the true one here.)
            nlink = None if os.path.isdir(path) else st.st_nlink
            seen[os.path.relpath(path, m)] = (oct(st.st_mode), nlink, data)
    return seen


@needs_tmpfile
def test_o_tmpfile_files_are_named_by_linkat_as_on_overlayfs(scratch: str) -> None:
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/d/f", b"lower\n")
    write(f"{lower}/lowerdir/old", b"old\n")
    with overlay_oracle(scratch, lower) as oracle:
        try:
            expected = _exercise(oracle)
        except OSError as error:
            if error.errno != errno.EOPNOTSUPP:
                raise
            pytest.skip("the kernel's overlayfs has no O_TMPFILE here")
    assert expected["before its name"] == (oct(0o100644), 0, 6, ["f"])
    assert expected["d/named"] == (oct(0o100640), 1, WRITTEN)
    assert expected["linking an O_EXCL one"] == "ENOENT"
    assert expected["by its descriptor"] == ["ok"] * 4
    assert expected["reopened"] == b"first "
    assert expected["its owner and xattr"] == (1234, 5678, b"kept")

    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    store, mount = os.path.join(scratch, "store"), os.path.join(scratch, "strata")
    args = ("--upper", upper, "--work", work)
    with strata_mount(store, [lower], mount, *args) as ours:
        assert _exercise(ours) == expected
        named = os.stat(f"{ours}/d/named").st_ino
    # Named, it is a file like any other: its number and bytes stay over a
    # remount, and nothing of the unnamed ones is left in WORK.
    with strata_mount(store, [lower], mount, *args) as ours:
        assert os.stat(f"{ours}/d/named").st_ino == named
        assert _read(f"{ours}/d/named") == WRITTEN
    assert sorted(os.listdir(f"{work}/strata-tmp")) == []
    checked = strata(store, "fsck", "--upper", upper, "--work", work, "--layer", lower)
    assert "0 problems" in checked.stdout + checked.stderr
