"""chattr's append-only and immutable flags, enforced as on overlayfs.

The kernel leaves the checks of these flags to a FUSE server; strata keeps
them in overlayfs's `protattr` xattr. The same steps run on the kernel's
overlayfs and on strata over the same lower layer; every call's outcome is
compared, then the flags after a remount and through overlayfs reading
strata's UPPER.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable
from functools import partial

import pyfuse3
import pytest

from tests.layers import write
from tests.mounts import WRITABLE_OVERLAY, overlay_mount, overlay_oracle, strata_mount
from unionfs.core.fileflags import APPEND_FL, IMMUTABLE_FL

needs_ioctl = pytest.mark.skipif(
    "ioctl_commands" not in vars(pyfuse3.Operations),
    reason="pyfuse3 without tools/pyfuse3-ioctl.patch: no chattr",
)

_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS = 0x80086601, 0x40086602
GIVEN = 1_600_000_000_000_000_000  # a time of the caller's own, not "now"


def get_flags(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        flags: int = struct.unpack("I", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 4))[0]
        return flags
    finally:
        os.close(fd)


def set_flags(path: str, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("I", flags))
    finally:
        os.close(fd)


def _outcome(step: Callable[[], object]) -> str:
    try:
        step()
    except OSError as error:
        return errno.errorcode[error.errno or 0]
    return "ok"


def _open(path: str, flags: int) -> None:
    os.close(os.open(path, flags, 0o644))


def _steps(m: str) -> dict[str, Callable[[], object]]:
    """Each call the flags decide, on files and directories of each kind."""
    steps: dict[str, Callable[[], object]] = {}
    for name in ("imm", "app", "new-imm", "new-app", "plain"):
        f = f"{m}/{name}"
        steps |= {
            f"{name}: open for writing": partial(_open, f, os.O_WRONLY),
            f"{name}: open for appending": partial(_open, f, os.O_WRONLY | os.O_APPEND),
            f"{name}: append a line": partial(_append, f),
            f"{name}: open with O_TRUNC": partial(_open, f, os.O_WRONLY | os.O_TRUNC),
            f"{name}: truncate": partial(os.truncate, f, 1),
            f"{name}: chmod": partial(os.chmod, f, 0o600),
            f"{name}: chown": partial(os.chown, f, 7, 7),
            f"{name}: set times": partial(os.utime, f, ns=(GIVEN, GIVEN)),
            f"{name}: touch": partial(os.utime, f),  # "now": append-only allows it
            f"{name}: setxattr": partial(os.setxattr, f, "user.x", b"1"),
            f"{name}: link": partial(os.link, f, f + "-link"),
            f"{name}: rename": partial(os.rename, f, f + "-moved"),
            f"{name}: unlink": partial(os.unlink, f),
        }
    for name in ("dimm", "dapp", "dplain"):
        d = f"{m}/{name}"
        steps |= {
            f"{name}: create inside": partial(_open, f"{d}/made", os.O_CREAT | os.O_WRONLY),
            f"{name}: mkdir inside": partial(os.mkdir, f"{d}/sub"),
            f"{name}: write a file inside": partial(_append, f"{d}/inner"),
            f"{name}: rename inside": partial(os.rename, f"{d}/inner", f"{d}/inner2"),
            f"{name}: unlink inside": partial(os.unlink, f"{d}/gone"),
            f"{name}: move out": partial(os.rename, f"{d}/leaving", f"{m}/left-{name}"),
            f"{name}: move in": partial(os.rename, f"{m}/coming-{name}", f"{d}/came"),
            f"{name}: chmod": partial(os.chmod, d, 0o700),
            f"{name}: set times": partial(os.utime, d, ns=(GIVEN, GIVEN)),
            f"{name}: touch": partial(os.utime, d),
            f"{name}: rmdir": partial(os.rmdir, d),
        }
    return steps


def _append(path: str) -> None:
    with open(path, "a") as handle:
        handle.write("appended\n")


def _exercise(m: str) -> dict[str, object]:
    os.close(os.open(f"{m}/new-imm", os.O_CREAT | os.O_WRONLY, 0o644))
    os.close(os.open(f"{m}/new-app", os.O_CREAT | os.O_WRONLY, 0o644))
    for name in ("dimm", "dapp", "dplain"):
        os.close(os.open(f"{m}/coming-{name}", os.O_CREAT | os.O_WRONLY, 0o644))
    protect = {"imm": IMMUTABLE_FL, "new-imm": IMMUTABLE_FL, "dimm": IMMUTABLE_FL,
               "app": APPEND_FL, "new-app": APPEND_FL, "dapp": APPEND_FL}  # fmt: skip
    for name, flags in protect.items():
        set_flags(f"{m}/{name}", get_flags(f"{m}/{name}") | flags)
    seen: dict[str, object] = {name: _outcome(step) for name, step in _steps(m).items()}
    kept = IMMUTABLE_FL | APPEND_FL
    for top, directories, files in os.walk(m):
        for name in sorted(directories + files):
            path = os.path.join(top, name)
            rel = os.path.relpath(path, m)
            st = os.lstat(path)
            seen[f"{rel}: state"] = (oct(st.st_mode), st.st_size, get_flags(path) & kept)
    return seen


def _lower(top: str) -> None:
    for name in ("imm", "app", "plain"):
        write(f"{top}/{name}", b"lower line\n")
    for name in ("dimm", "dapp", "dplain"):
        write(f"{top}/{name}/inner", b"inner\n")
        write(f"{top}/{name}/gone", b"gone\n")
        write(f"{top}/{name}/leaving", b"leaving\n")


def _unprotect(m: str) -> None:
    """Clear the flags so the test's scratch can be removed."""
    for top, directories, files in os.walk(m):
        for name in directories + files:
            path = os.path.join(top, name)
            if get_flags(path) & (IMMUTABLE_FL | APPEND_FL):
                set_flags(path, get_flags(path) & ~(IMMUTABLE_FL | APPEND_FL))


@needs_ioctl
def test_append_only_and_immutable_refuse_what_they_do_on_overlayfs(scratch: str) -> None:
    lower = os.path.join(scratch, "lower")
    _lower(lower)
    with overlay_oracle(scratch, lower) as oracle:
        expected = _exercise(oracle)
        _unprotect(oracle)
    # The steps tell something apart.
    assert expected["imm: open for writing"] == "EPERM"
    assert expected["app: append a line"] == "ok"
    assert expected["app: open for writing"] == "EPERM"
    assert expected["dapp: create inside"] == "ok"
    assert expected["dapp: unlink inside"] == "EPERM"
    assert expected["plain: rename"] == "ok"
    assert expected["app: set times"] == "EPERM" and expected["app: touch"] == "ok"

    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    store, mount = os.path.join(scratch, "store"), os.path.join(scratch, "strata")
    with strata_mount(store, [lower], mount, "--upper", upper, "--work", work) as ours:
        assert _exercise(ours) == expected
    # The flags are the upper files' overlayfs protattr: kept over a remount,
    # and read by the kernel's overlayfs from strata's UPPER.
    with strata_mount(store, [lower], mount, "--upper", upper, "--work", work) as ours:
        assert get_flags(f"{ours}/imm") & IMMUTABLE_FL
        assert get_flags(f"{ours}/dapp") & APPEND_FL
        assert _outcome(lambda: _open(f"{ours}/imm", os.O_WRONLY)) == "EPERM"
    with overlay_mount(
        [lower],
        os.path.join(scratch, "overlay"),
        options=WRITABLE_OVERLAY,
        upper=upper,
        work=work,
    ) as kernel:
        assert get_flags(f"{kernel}/imm") & IMMUTABLE_FL
        assert _outcome(lambda: _open(f"{kernel}/imm", os.O_WRONLY)) == "EPERM"
    with strata_mount(store, [lower], mount, "--upper", upper, "--work", work) as ours:
        _unprotect(ours)
        assert _outcome(lambda: _append(f"{ours}/imm")) == "ok"


@needs_ioctl
def test_flags_other_than_append_only_and_immutable_are_refused(scratch: str) -> None:
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/f", b"f\n")
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    store, mount = os.path.join(scratch, "store"), os.path.join(scratch, "strata")
    with strata_mount(store, [lower], mount, "--upper", upper, "--work", work) as ours:
        fs_nodump_fl = 0x40
        refused = _outcome(lambda: set_flags(f"{ours}/f", fs_nodump_fl))
        assert refused == errno.errorcode[errno.EOPNOTSUPP]
        assert get_flags(f"{ours}/f") == 0
        assert not os.path.exists(f"{upper}/f")  # refused before any copy-up
