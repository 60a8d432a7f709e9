"""Access times as the mount's atime options ask: noatime (strata's default),
relatime, strictatime, and nodiratime beside either.

The kernel leaves a FUSE file's atime to the daemon. strata never sets one
with utimensat, which would move the ctime as well: it lets the host's own
rule do it. A private mount of UPPER and WORK carries the mount's atime
options, and a file of the container layer opened for reading (a directory
listed) is read once through it, so the host updates the atime exactly where
relatime or strictatime would, and changes nothing else. Backing files of
passthrough are opened through the same mounts, so the kernel's own reads of
them count too. Lower layers' files keep their atime, as on overlayfs (an
access copies nothing up).

Opening counts, not each read: reads the kernel serves from its page cache
reach no daemon. Listings do reach it under strictatime (the kernel is asked
to keep none); under relatime a listing the kernel kept would change no
atime anyway, unless the directory changed, which drops it.
"""

from __future__ import annotations

import enum
import errno
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .paths import open_beneath
from .syscalls import mount_setattr, open_tree

if TYPE_CHECKING:
    from .upper import Beneath

_OPEN_TREE_CLONE = 1
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_NOATIME = 0x10
_MOUNT_ATTR_STRICTATIME = 0x20
_MOUNT_ATTR__ATIME = 0x70
_MOUNT_ATTR_NODIRATIME = 0x80
_MOUNT_ATTR_RELATIME = 0x00
_DAY_NS = 24 * 3600 * 10**9


class AtimeMode(enum.Enum):
    NOATIME = "noatime"
    RELATIME = "relatime"
    STRICTATIME = "strictatime"


@dataclass(frozen=True, slots=True)
class AtimePolicy:
    mode: AtimeMode = AtimeMode.NOATIME
    nodiratime: bool = False

    @property
    def active(self) -> bool:
        return self.mode is not AtimeMode.NOATIME

    def applies_to(self, directory: bool) -> bool:
        return self.active and not (directory and self.nodiratime)

    @property
    def every_listing(self) -> bool:
        """Whether each listing of a directory counts (strictatime): the
        kernel must then ask for each instead of keeping what it read."""
        return self.mode is AtimeMode.STRICTATIME and not self.nodiratime

    def wants_update(self, atime_ns: int, mtime_ns: int, ctime_ns: int, now_ns: int) -> bool:
        """Whether an access now changes the atime (the kernel's relatime
        rule: an atime not newer than the mtime or ctime, or a day old)."""
        if self.mode is AtimeMode.NOATIME:
            return False
        return (
            self.mode is AtimeMode.STRICTATIME
            or atime_ns <= mtime_ns
            or atime_ns <= ctime_ns
            or now_ns - atime_ns >= _DAY_NS
        )

    def mount_attributes(self) -> int:
        """The MOUNT_ATTR_* bits of a mount that reads with this policy."""
        if self.mode is AtimeMode.NOATIME:
            return _MOUNT_ATTR_NOATIME
        strict = self.mode is AtimeMode.STRICTATIME
        base = _MOUNT_ATTR_STRICTATIME if strict else _MOUNT_ATTR_RELATIME
        return base | (_MOUNT_ATTR_NODIRATIME if self.nodiratime else 0)

    def fuse_options(self) -> set[str]:
        """The FUSE mount's own flags, so that findmnt shows the policy (the
        kernel applies none of them to a FUSE file: atimes are the daemon's).
        relatime is the kernel's default for a mount."""
        if self.mode is AtimeMode.NOATIME:
            return {"noatime"}
        return {"nodiratime"} if self.nodiratime else set()

    def describe(self) -> str:
        return self.mode.value + (",nodiratime" if self.nodiratime else "")


NOATIME = AtimePolicy()
RELATIME = AtimePolicy(AtimeMode.RELATIME)


def detached_mount(path: str, policy: AtimePolicy = NOATIME) -> int:
    """A private copy of the mount at *path* (rooted there, in no namespace,
    gone with its last user) whose reads follow *policy*: an O_PATH descriptor."""
    try:
        fd = open_tree(os.fsencode(path), _OPEN_TREE_CLONE | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot clone the mount of {path}: {exc.strerror}") from None
    clear = _MOUNT_ATTR__ATIME | _MOUNT_ATTR_NODIRATIME
    try:
        mount_setattr(fd, b"", _AT_EMPTY_PATH, policy.mount_attributes(), clear)
    except OSError as exc:
        os.close(fd)
        raise OSError(
            exc.errno,
            f"cannot make a private mount of {path} {policy.describe()}: {exc.strerror}",
        ) from None
    return fd


# What a read with RWF_NOWAIT answers when it would wait, or cannot tell.
_CANNOT_READ_NOW = (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL)


class AccessTimes:
    """Updates the atime of files in UPPER and WORK as *policy* says, through
    private mounts that carry it."""

    def __init__(self, upper: str, work: str, policy: AtimePolicy) -> None:
        assert policy.active
        self.policy = policy
        self._upper = detached_mount(upper, policy)
        try:
            self._work = detached_mount(work, policy)
        except BaseException:
            os.close(self._upper)
            raise

    def close(self) -> None:
        os.close(self._upper)
        os.close(self._work)

    def may_change(self, st: os.stat_result, directory: bool) -> bool:
        """Whether an access now may change the atime of the file *st* is
        an lstat of (taken now): False spares accessed() its open."""
        return self.policy.applies_to(directory) and self.policy.wants_update(
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, time.time_ns()
        )

    def accessed(self, place: Beneath, directory: bool, *, nowait: bool = False) -> bool:
        """Count an access to the file or directory at *place*: the host
        updates its atime if the policy asks. Whether it changed. Blocking
        (it reads a byte, or a directory's first entries); with *nowait*,
        BlockingIOError where a file's open or read would wait for the disk."""
        if not self.policy.applies_to(directory):
            return False
        root = self._work if place.in_work else self._upper
        flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
        fd = open_beneath(root, place.rel, flags, noatime=False, cached_only=nowait)
        try:
            st = os.fstat(fd)
            before = st.st_atime_ns
            if not self.policy.wants_update(before, st.st_mtime_ns, st.st_ctime_ns, time.time_ns()):
                return False  # the host would not change it either: no read
            if directory:
                with os.scandir(fd) as entries:
                    next(entries, None)
            elif nowait:
                try:
                    os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
                except OSError as exc:
                    # Not in the page cache, or a filesystem that cannot say
                    # (tmpfs answers EOPNOTSUPP): a worker thread reads.
                    if exc.errno not in _CANNOT_READ_NOW:
                        raise
                    if os.fstat(fd).st_atime_ns == before:  # (the host may count it anyway)
                        raise BlockingIOError(errno.EAGAIN, "would wait") from None
            else:
                os.pread(fd, 1, 0)
            return os.fstat(fd).st_atime_ns != before
        finally:
            os.close(fd)
