"""POSIX ACLs: inherited from default ACLs, checked by the kernel, as on overlayfs.

The unit tests take the inheritance rule (posix_acl_create) alone; the
differential test runs the same steps on the kernel's overlayfs and on
strata over the same lower layer and compares modes, ACLs and what an
unprivileged user may read.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from typing import Any

import pyfuse3
import pytest

from tests.layers import write
from tests.mounts import overlay_oracle, strata_mount, unmount
from unionfs.core import acl
from unionfs.core.acl import GROUP_OBJ, MASK, OTHER, USER, USER_OBJ, AclEntry
from unionfs.core.nodes import FsError

needs_dont_mask = pytest.mark.skipif(
    not getattr(pyfuse3, "DONT_MASK_SUPPORTED", False),
    reason="pyfuse3 without tools/pyfuse3-dont-mask.patch: ACLs are stored, not inherited",
)


def _acl(*entries: tuple[int, int] | tuple[int, int, int]) -> bytes:
    return acl.encode([AclEntry(*entry) for entry in entries])


def test_a_default_acl_of_base_entries_only_masks_the_mode_and_gives_no_access_acl() -> None:
    default = _acl((USER_OBJ, 7), (GROUP_OBJ, 5), (OTHER, 0))
    inherited = acl.inherit(default, 0o100666)
    assert inherited.mode == 0o100640  # no umask: the ACL stands in for it
    assert inherited.access is None and inherited.default is None


def test_named_entries_make_an_access_acl_whose_mask_is_the_group_bits() -> None:
    default = _acl((USER_OBJ, 7), (USER, 7, 1234), (GROUP_OBJ, 5), (MASK, 7), (OTHER, 0))
    inherited = acl.inherit(default, 0o100664)
    assert inherited.mode == 0o100660
    assert inherited.access == _acl(
        (USER_OBJ, 6), (USER, 7, 1234), (GROUP_OBJ, 5), (MASK, 6), (OTHER, 0)
    )
    directory = acl.inherit(default, 0o42777)  # a directory keeps the default ACL too
    assert directory.mode == 0o42770 and directory.default == default


@pytest.mark.parametrize(
    "value",
    [
        b"",
        _acl((USER_OBJ, 7), (OTHER, 0)),  # no group entry
        _acl((USER_OBJ, 7), (USER, 7, 5), (GROUP_OBJ, 5), (OTHER, 0)),  # named, no mask
        b"\x01\x00\x00\x00" + _acl((USER_OBJ, 7), (GROUP_OBJ, 5), (OTHER, 0))[4:],  # version 1
        _acl((USER_OBJ, 7), (GROUP_OBJ, 5), (OTHER, 0)) + b"\x01",
    ],
)
def test_a_malformed_default_acl_is_an_io_error(value: bytes) -> None:
    with pytest.raises(FsError) as error:
        acl.inherit(value, 0o100644)
    assert error.value.errno == errno.EIO


USER_ID = 1234
OVERLAYFS_CLI = [sys.executable, "-c", "from unionfs.overlayfs_cli import main; main()"]
NAMED = _acl((USER_OBJ, 7), (USER, 7, USER_ID), (GROUP_OBJ, 5), (MASK, 7), (OTHER, 0))
READER = _acl((USER_OBJ, 6), (USER, 4, USER_ID), (GROUP_OBJ, 0), (MASK, 4), (OTHER, 0))
PLAIN = _acl((USER_OBJ, 7), (GROUP_OBJ, 7), (OTHER, 5))

# What root does in the mount, under umask 022 (each step's objects named
# for it); the user's steps follow.
_AS_ROOT = f"""
import os, sys
NAMED, READER = {NAMED!r}, {READER!r}
os.umask(0o022)
m = sys.argv[1]
os.mkdir(f"{{m}}/acl", 0o755)
os.setxattr(f"{{m}}/acl", "system.posix_acl_default", NAMED)
os.close(os.open(f"{{m}}/acl/file", os.O_CREAT | os.O_WRONLY, 0o666))
os.mkdir(f"{{m}}/acl/sub", 0o777)
os.close(os.open(f"{{m}}/acl/sub/deeper", os.O_CREAT | os.O_WRONLY, 0o644))
os.mkfifo(f"{{m}}/acl/fifo", 0o666)
os.symlink("file", f"{{m}}/acl/link")
os.close(os.open(f"{{m}}/acl/chmodded", os.O_CREAT | os.O_WRONLY, 0o666))
os.chmod(f"{{m}}/acl/chmodded", 0o640)
os.close(os.open(f"{{m}}/plain", os.O_CREAT | os.O_WRONLY, 0o666))
os.mkdir(f"{{m}}/plaindir", 0o777)
os.close(os.open(f"{{m}}/lowerdir/new", os.O_CREAT | os.O_WRONLY, 0o666))
os.mkdir(f"{{m}}/lowerdir/newdir", 0o777)
for name in ("secret", "secret-without-acl"):
    with open(f"{{m}}/{{name}}", "w") as handle:
        handle.write("s")
    os.chmod(f"{{m}}/{{name}}", 0o600)
os.setxattr(f"{{m}}/secret", "system.posix_acl_access", READER)
with open(f"{{m}}/sgid", "w") as handle:
    handle.write("g")
os.chown(f"{{m}}/sgid", {USER_ID}, 0)
os.chmod(f"{{m}}/sgid", 0o2775)
os.chmod(f"{{m}}/lower-acl", 0o660)  # copied up: the mask follows the group bits
"""

_AS_USER = f"""
import os, sys
m = sys.argv[1]
for name in ("secret", "secret-without-acl", "lower-secret"):
    try:
        with open(f"{{m}}/{{name}}") as handle:
            print(name, "read", handle.read())
    except PermissionError:
        print(name, "EACCES")
os.setxattr(f"{{m}}/sgid", "system.posix_acl_access", {PLAIN!r})  # not in group 0
"""


def _xattr(path: str, name: bytes) -> str:
    try:
        return os.getxattr(path, os.fsdecode(name), follow_symlinks=False).hex()
    except OSError as error:
        return errno.errorcode[error.errno or 0]


def _exercise(mount: str) -> dict[str, Any]:
    subprocess.run(["/usr/bin/python3", "-c", _AS_ROOT, mount], check=True)
    user = ["setpriv", f"--reuid={USER_ID}", f"--regid={USER_ID}", "--clear-groups"]
    done = subprocess.run(
        [*user, "/usr/bin/python3", "-c", _AS_USER, mount], check=True, capture_output=True
    )
    seen: dict[str, Any] = {"user": done.stdout.decode().splitlines()}
    for top, directories, files in os.walk(mount):
        for name in directories + files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            seen[os.path.relpath(path, mount)] = (
                oct(st.st_mode),
                _xattr(path, acl.ACCESS),
                _xattr(path, acl.DEFAULT),
            )
    return seen


@needs_dont_mask
def test_acls_are_inherited_checked_and_kept_in_step_with_the_mode_as_on_overlayfs(
    scratch: str,
) -> None:
    os.chmod(scratch, 0o755)  # the user walks into the mounts
    lower = os.path.join(scratch, "lower")
    os.makedirs(f"{lower}/lowerdir")
    os.setxattr(f"{lower}/lowerdir", "system.posix_acl_default", NAMED)
    write(f"{lower}/lower-secret", b"l")
    os.chmod(f"{lower}/lower-secret", 0o600)
    os.setxattr(f"{lower}/lower-secret", "system.posix_acl_access", READER)
    write(f"{lower}/lower-acl", b"a")
    os.chmod(f"{lower}/lower-acl", 0o600)
    os.setxattr(f"{lower}/lower-acl", "system.posix_acl_access", READER)
    results = {}
    with overlay_oracle(scratch, lower) as oracle:
        results["overlay"] = _exercise(oracle)
    for passthrough in ("auto", "off"):
        upper, work = (os.path.join(scratch, f"{name}-{passthrough}") for name in ("up", "wk"))
        os.makedirs(upper)
        mount = os.path.join(scratch, f"strata-{passthrough}")
        args = ("--upper", upper, "--work", work, "--passthrough", passthrough)
        with strata_mount(os.path.join(scratch, "store"), [lower], mount, *args) as ours:
            results[passthrough] = _exercise(ours)
    oracle_seen = results["overlay"]
    # The steps tell something apart: umask, default ACL and the user's reads.
    assert oracle_seen["plain"][0] == oct(0o100644)
    assert oracle_seen["acl/file"][0] == oct(0o100660)
    assert oracle_seen["user"] == [
        "secret read s",
        "secret-without-acl EACCES",
        "lower-secret read l",
    ]
    assert oracle_seen["sgid"][0] == oct(0o100775)
    assert oracle_seen["lower-acl"][1] != READER.hex()
    assert results["auto"] == oracle_seen
    assert results["off"] == oracle_seen


_READ_AS_USER = """
import sys
try:
    with open(sys.argv[1]) as handle:
        print(handle.read())
except PermissionError:
    print("EACCES")
"""


@needs_dont_mask
@pytest.mark.parametrize("options", ["", ",noacl"])
def test_strata_overlayfs_noacl_leaves_the_kernel_to_mode_bits(scratch: str, options: str) -> None:
    os.chmod(scratch, 0o755)
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/secret", b"s")
    os.chmod(f"{lower}/secret", 0o600)
    os.setxattr(f"{lower}/secret", "system.posix_acl_access", READER)
    mount = os.path.join(scratch, "mnt")
    os.makedirs(mount)
    env = {**os.environ, "STRATA_ROOT": f"{scratch}/root"}
    subprocess.run([*OVERLAYFS_CLI, "-o", f"lowerdir={lower}{options}", mount], env=env,
                   check=True)  # fmt: skip
    try:
        user = ["setpriv", f"--reuid={USER_ID}", f"--regid={USER_ID}", "--clear-groups"]
        done = subprocess.run([*user, "/usr/bin/python3", "-c", _READ_AS_USER, f"{mount}/secret"],
                              check=True, capture_output=True, text=True)  # fmt: skip
        # The ACL is there to read either way; only without noacl does it grant.
        assert os.getxattr(f"{mount}/secret", "system.posix_acl_access") == READER
        assert done.stdout.strip() == ("EACCES" if options else "s")
    finally:
        unmount(f"{scratch}/root", mount)
