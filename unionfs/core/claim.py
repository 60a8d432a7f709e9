"""One mount at a time on an UPPER: a lock in WORK, and what its holder is doing.

The holder (a mount's daemon) keeps an exclusive flock on WORK/strata-lock for
as long as it may change UPPER, and says by the file's size whether it serves
a mount or is finishing after an unmount (filling partial copies, closing). A FUSE
unmount returns before the daemon has seen it, so `umount X; mount ... X`
with the same UPPER, as scripts and test suites do after the kernel's
overlayfs, would otherwise find the lock held. Whoever wants UPPER then waits
for a holder that finishes, and briefly for one that has not yet seen its
unmount; a holder that still serves a mount is refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

LOCK_NAME = "strata-lock"

# The holder's state is the lock file's size: set by ftruncate, which takes
# no block (a full WORK still mounts) and is never read half-written.
_SERVING = 1
_FINISHING = 2

# How long a holder may take to see its unmount (it wakes at once; a busy
# host may be slow to run it), and to finish after it (a partial copy-up of a
# large file is completed before the daemon lets UPPER go).
SEEING_UNMOUNT = 3.0
FINISHING = 120.0
_POLL = 0.02


class Claimed(Exception):
    """Another process holds the UPPER: it serves a mount on it, or (with
    *finishing*) it still finishes after its unmount, longer than we wait."""

    def __init__(self, *, finishing: bool) -> None:
        super().__init__()
        self.finishing = finishing


class Claim:
    """This process's hold on an UPPER (its lock file's open descriptor)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def finishing(self) -> None:
        """The mount is gone: whoever waits for UPPER may wait for us."""
        if self._fd is not None:
            _say(self._fd, _FINISHING)

    def release(self) -> None:
        """Let UPPER go: nothing of this process touches it from now on."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def claim(work: str) -> Claim:
    """Take WORK's lock for this process, waiting for a holder that is
    finishing or has just been unmounted. Raises Claimed."""
    fd = os.open(os.path.join(work, LOCK_NAME), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        if not _lock_when_free(fd):
            raise Claimed(finishing=_state(fd) == _FINISHING)
        _say(fd, _SERVING)
    except BaseException:
        os.close(fd)
        raise
    return Claim(fd)


def is_claimed(work: str) -> bool:
    """Whether a daemon holds WORK's UPPER and serves a mount on it (one that
    finishes after an unmount is waited for)."""
    try:
        fd = os.open(os.path.join(work, LOCK_NAME), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return not _lock_when_free(fd)
    finally:
        os.close(fd)


def _lock_when_free(fd: int) -> bool:
    """flock *fd* (True), or find it held by a holder that serves (False)."""
    started = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        waited = time.monotonic() - started
        if waited >= (FINISHING if _state(fd) == _FINISHING else SEEING_UNMOUNT):
            return False
        time.sleep(_POLL)


def _say(fd: int, state: int) -> None:
    os.ftruncate(fd, state)


def _state(fd: int) -> int:
    return os.fstat(fd).st_size
