"""Set-id bits and file capabilities through writes, truncations and chown:
a security property, checked against the kernel's overlayfs.

A write or truncation by a caller without CAP_FSETID clears S_ISUID, and
S_ISGID where the group may execute (or the caller is not in the file's
group); a chown does the same for anyone; a write drops a file capability.
strata clears the set-id bits itself (FUSE_HANDLE_KILLPRIV_V2, so the kernel
asks for no security.capability before each write), and must clear them
exactly where the kernel would, with passthrough on and off. One case needed
strata even before: a truncating open(O_TRUNC) by an unprivileged user kept
S_ISUID (the kernel leaves it to a filesystem that truncates in open).
"""

from __future__ import annotations

import os
import subprocess

import pyfuse3
import pytest

from tests.layers import write
from tests.mounts import (
    overlay_oracle,
    patched_mount,
    strata_mount,
)

CAPABILITY = bytes.fromhex("0100000200040000000000000000000000000000")

# Who acts: root, root without CAP_FSETID (as a container started with fewer
# capabilities), and an unprivileged user.
CALLERS = {
    "root": [],
    "root-without-fsetid": ["setpriv", "--bounding-set=-fsetid", "--inh-caps=-fsetid"],
    "user": ["setpriv", "--reuid=1", "--regid=1", "--clear-groups"],
}

# What each does to the file named last on its command line.
_ACT = """
import os, sys
what, path = sys.argv[1:]
if what == "write":
    fd = os.open(path, os.O_WRONLY)
    os.write(fd, b"w")
    os.write(fd, b"w")  # a second write: the kernel no longer asks first
    os.close(fd)
elif what == "append":
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"a")
    os.close(fd)
elif what == "truncate":
    os.truncate(path, 3)
elif what == "open-truncate":
    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
elif what == "chown":
    try:
        os.chown(path, 5, 5)
    except PermissionError:
        pass  # the unprivileged caller may not: the same on both
"""

# Files of the lower layer: name -> mode; each is also copied up first by a
# root write in a second round ("up-" names), so both lower and upper files
# meet each case.
FILES = {
    "suid": 0o4777,
    "sgid-exec": 0o2777,
    "sgid-noexec": 0o2767,  # S_ISGID without S_IXGRP: mandatory locking, kept
    "both": 0o6777,
    "cap": 0o777,
    "suid-cap": 0o4777,
}
ACTIONS = ("write", "append", "truncate", "open-truncate", "chown")


def _layer(top: str) -> None:
    for action in ACTIONS:
        for name, mode in FILES.items():
            for prefix in ("", "up-"):
                path = f"{top}/{prefix}{action}-{name}"
                write(path, "0123456789")
                os.chmod(path, mode)
                if name.endswith("cap"):
                    os.setxattr(path, "security.capability", CAPABILITY)


def _capability(path: str) -> bool:
    try:
        os.getxattr(path, "security.capability")
    except OSError:
        return False
    return True


def _exercise(mount: str, caller: str) -> dict[str, tuple[str, bool]]:
    """Each action by *caller* on its files; their modes and capabilities after."""
    for action in ACTIONS:
        for name in FILES:
            # A copy-up by root first (its own write keeps the bits: CAP_FSETID).
            up = f"{mount}/up-{action}-{name}"
            with open(up, "r+b") as handle:
                handle.write(b"R")
            for path in (f"{mount}/{action}-{name}", up):
                subprocess.run(
                    [*CALLERS[caller], "/usr/bin/python3", "-c", _ACT, action, path], check=True
                )
    seen = {}
    for entry in sorted(os.listdir(mount)):
        path = f"{mount}/{entry}"
        seen[entry] = (oct(os.stat(path).st_mode), _capability(path))
    return seen


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_set_id_bits_and_capabilities_go_as_on_overlayfs(scratch: str, caller: str) -> None:
    os.chmod(scratch, 0o755)  # the unprivileged caller walks into the mounts
    lower = os.path.join(scratch, "lower")
    _layer(lower)
    results = {}
    for upper in ("up-auto", "up-off"):
        os.makedirs(os.path.join(scratch, upper))
    with overlay_oracle(scratch, lower) as oracle:
        results["overlay"] = _exercise(oracle, caller)
    for passthrough in ("auto", "off"):
        upper, work = (os.path.join(scratch, f"{name}-{passthrough}") for name in ("up", "wk"))
        mount = os.path.join(scratch, f"strata-{passthrough}")
        args = ("--upper", upper, "--work", work, "--passthrough", passthrough)
        with strata_mount(os.path.join(scratch, "store"), [lower], mount, *args) as ours:
            results[passthrough] = _exercise(ours, caller)
    # The cases tell something apart: the user's writes cleared bits.
    if caller == "user":
        assert results["overlay"]["write-suid"][0] == oct(0o100777)
    assert results["auto"] == results["overlay"]
    assert results["off"] == results["overlay"]


# Counts the kernel's getxattr requests for security.capability.
_COUNT_CAPABILITY_ASKS = """
import unionfs.fuse as fuse

_getxattr = fuse.StrataOperations.getxattr
async def _counting(self, inode, name, ctx):
    if name == b"security.capability":
        print("asked for security.capability", flush=True)
    return await _getxattr(self, inode, name, ctx)
fuse.StrataOperations.getxattr = _counting
"""


@pytest.mark.skipif(
    not hasattr(pyfuse3.SetattrFields(), "kill_suidgid"),
    reason="pyfuse3 is built without KILLPRIV_V2 (libfuse older than 3.17; see tools/setup.sh)",
)
def test_writes_cost_no_capability_request(scratch: str) -> None:
    """With set-id bits left to strata, the kernel asks for a file's
    capability once, not before each of 200 writes (5,757 requests in a
    `dpkg -i`)."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/f", "x")
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _COUNT_CAPABILITY_ASKS, log_path) as (mount, daemon):
        fd = os.open(f"{mount}/f", os.O_WRONLY | os.O_APPEND)
        for _ in range(200):
            os.write(fd, b"y")
        os.close(fd)
        with open(f"{mount}/f", "rb") as handle:
            assert handle.read() == b"x" + b"y" * 200
    assert daemon.returncode == 0
    with open(log_path) as log:
        asks = log.read().count("asked for security.capability")
    assert 1 <= asks <= 2, asks  # asked, but not per write
