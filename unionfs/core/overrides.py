"""Owners, modes and device numbers a rootless store cannot give a file.

Without CAP_CHOWN and CAP_MKNOD (a user, or a user namespace that maps one
uid) a file cannot be given another owner and a device node cannot be made.
The file then keeps the user's ownership, a device is an empty regular file,
and the xattr `user.overlay.strata.stat` holds "MODE UID GID RDEV" (decimal,
MODE with its file type) as the merged view shows it, in the spirit of
fuse-overlayfs's user.containers.override_stat. The xattr sits under the
overlay prefix, so it is never listed to users.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from dataclasses import dataclass

from .records import Entry

# A rootless writer can only set user.* xattrs; trusted.* is read too.
STAT_XATTRS = (b"user.overlay.strata.stat", b"trusted.overlay.strata.stat")
# What a rootless UPPER can hold: read on getattr, so one lookup, not two.
USER_STAT_XATTR = STAT_XATTRS[:1]
_NOT_PERMITTED = (errno.EPERM, errno.EINVAL)  # EINVAL: an id the namespace does not map


@dataclass(frozen=True, slots=True)
class StatOverride:
    mode: int
    uid: int
    gid: int
    rdev: int = 0

    def encode(self) -> bytes:
        return b"%d %d %d %d" % (self.mode, self.uid, self.gid, self.rdev)

    def apply(self, entry: Entry) -> Entry:
        return entry._replace(mode=self.mode, uid=self.uid, gid=self.gid, rdev=self.rdev)


def parse(value: bytes) -> StatOverride | None:
    try:
        mode, uid, gid, rdev = (int(part) for part in value.split())
    except ValueError:
        return None
    return StatOverride(mode, uid, gid, rdev)


def from_xattrs(xattrs: tuple[tuple[bytes, bytes], ...]) -> StatOverride | None:
    for name, value in xattrs:
        if name in STAT_XATTRS:
            return parse(value)
    return None


def read(target: bytes | int, names: tuple[bytes, ...] = STAT_XATTRS) -> StatOverride | None:
    """The override of a path (not following symlinks) or an open file."""
    for name in names:
        try:
            if isinstance(target, int):
                value = os.getxattr(target, os.fsdecode(name))
            else:
                value = os.getxattr(target, os.fsdecode(name), follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                continue
            raise
        return parse(value)
    return None


def write(target: bytes | str | int, override: StatOverride) -> None:
    name = os.fsdecode(STAT_XATTRS[0])
    if isinstance(target, int):
        os.setxattr(target, name, override.encode())
    else:
        os.setxattr(target, name, override.encode(), follow_symlinks=False)


def set_owner(target: bytes | str | int, mode: int, uid: int, gid: int, rdev: int = 0) -> bool:
    """chown; when that is not permitted, record the owner in the override.
    Returns whether an override was written. Symlinks cannot carry user xattrs:
    their owner is lost, as it is for any rootless unpacker."""
    try:
        if isinstance(target, int):
            os.fchown(target, uid, gid)
        else:
            os.chown(target, uid, gid, follow_symlinks=False)
        return False
    except OSError as exc:
        if exc.errno not in _NOT_PERMITTED:
            raise
    if stat.S_ISLNK(mode):
        return False
    write(target, StatOverride(mode, uid, gid, rdev))
    return True


def make_node(path: bytes | str, mode: int, rdev: int) -> StatOverride | None:
    """mknod; when that is not permitted, an empty file that stands for the
    device (the returned override must then be written with the owner)."""
    try:
        os.mknod(path, mode, rdev)
        return None
    except PermissionError:
        if not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
            raise
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    return StatOverride(mode, os.geteuid(), os.getegid(), rdev)


def update_mode(target: bytes | int, mode: int) -> None:
    """After a chmod: an override's mode must follow (it is what is shown)."""
    override = read(target)
    if override is not None:
        write(target, dataclasses.replace(override, mode=stat.S_IFMT(override.mode) | mode))
