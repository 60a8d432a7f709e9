"""A bug in one request must cost that request, never the mount.

The daemon runs with a fault injected into one core operation (the real mount
code, started in a child Python that patches the core before serving): the
faulty request gets EIO, the traceback is logged once with the operation and
path, and every request after it is served as before.
"""

from __future__ import annotations

import errno
import os

import pytest

from tests.layers import write
from tests.mounts import patched_mount, strata, strata_mount

_FAULTS = """
import unionfs.core.copyup as copyup
import unionfs.core.view as view

original_setxattr = view.UnionView.setxattr
def setxattr(self, ino, name, value):
    if name == b"user.fault":
        raise RuntimeError("injected fault")
    return original_setxattr(self, ino, name, value)
view.UnionView.setxattr = setxattr

original_copy = copyup.copy_data
def copy_data(source, target, size):
    original_copy(source, target, size // 2)
    raise AssertionError("injected fault half-way through a copy-up")
copyup.copy_data = copy_data
"""


def _eio(call: object, *args: object) -> None:
    with pytest.raises(OSError) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.errno == errno.EIO


def test_a_failing_request_answers_eio_and_the_mount_keeps_serving(scratch: str) -> None:
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/dir/file", "lower data")
    write(f"{lower}/dir/big", b"0123456789" * 100_000)
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    root, log_path = os.path.join(scratch, "store"), os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _FAULTS, log_path) as (mount, daemon):
        _eio(os.setxattr, f"{mount}/dir/file", "user.fault", b"x")
        # A fault half-way through a data copy-up: the copy is abandoned.
        _eio(os.open, f"{mount}/dir/big", os.O_WRONLY)
        # Everything after the faults is served.
        with open(f"{mount}/dir/file") as handle:
            assert handle.read() == "lower data"
        with open(f"{mount}/dir/big", "rb") as handle:
            assert handle.read() == b"0123456789" * 100_000
        os.setxattr(f"{mount}/dir/file", "user.fine", b"y")
        assert os.getxattr(f"{mount}/dir/file", "user.fine") == b"y"
        write(f"{mount}/dir/new", "new data")
        os.rename(f"{mount}/dir/new", f"{mount}/renamed")
        assert sorted(os.listdir(mount)) == ["dir", "renamed"]
        assert sorted(os.listdir(f"{mount}/dir")) == ["big", "file"]
    assert daemon.returncode == 0
    with open(log_path) as log:
        text = log.read()
    assert text.count("setxattr /dir/file failed; answered EIO") == 1, text
    assert text.count("RuntimeError: injected fault") == 1, text
    assert text.count("open /dir/big failed; answered EIO") == 1, text
    assert text.count("AssertionError: injected fault half-way") == 1, text
    # Nothing half-done is left: the abandoned copy is gone, fsck is clean.
    assert os.listdir(os.path.join(work, "strata-tmp")) == []
    result = strata(root, "fsck", "--layer", lower, "--upper", upper, "--work", work, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_metadata_only_copy_without_its_data_fails_alone(scratch: str) -> None:
    """An UPPER's metadata-only copy whose lower file is gone (the layer it
    came from is no longer in the stack): renaming it tripped an assertion
    that took the daemon down; now that file answers EIO and nothing else
    changes."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/dir/kept", "kept")
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    orphan = write(f"{upper}/dir/orphan")
    os.truncate(orphan, 4096)  # sparse, as a metadata-only copy is
    os.setxattr(orphan, "trusted.overlay.metacopy", b"")
    root, mount = os.path.join(scratch, "store"), os.path.join(scratch, "mnt")
    with strata_mount(root, [lower], mount, "--upper", upper, "--work", work):
        assert os.stat(f"{mount}/dir/orphan").st_size == 4096
        _eio(os.rename, f"{mount}/dir/orphan", f"{mount}/dir/moved")
        _eio(open, f"{mount}/dir/orphan", "rb")
        assert sorted(os.listdir(f"{mount}/dir")) == ["kept", "orphan"]
        os.rename(f"{mount}/dir/kept", f"{mount}/dir/still")
        with open(f"{mount}/dir/still") as handle:
            assert handle.read() == "kept"
    result = strata(root, "fsck", "--layer", lower, "--upper", upper, "--work", work, check=False)
    assert "dir/orphan: metadata-only copy whose lower data is gone" in result.stdout
