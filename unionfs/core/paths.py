"""Host paths beneath a root, at any depth.

Two things stand between a tree's relative path and a system call. A call
takes a path of at most PATH_MAX bytes, but a tree may be deeper (a merged
path alone may be 4095 bytes, and UPPER or a layer adds its own root). And a
component of the tree may be a symlink (a layer may hold `etc -> /`; a
directory of UPPER may be swapped for a symlink to any host path), which the
host must never follow on the way: every component before the last must be a
real directory beneath the root. So files are opened with openat2's
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS (open_beneath), and calls that take
paths get one through a descriptor of the parent directory opened that way,
as /proc/self/fd/N/NAME, which every call accepts (the xattr calls have no
*at form): BeneathPaths.
"""

from __future__ import annotations

import errno
import os
import stat

from .syscalls import AT_FDCWD, fchmodat2, openat2

PATH_MAX = 4096  # bytes of a path a system call takes, its NUL included
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE_CACHED = 0x20
_openat2_works = True


def open_beneath(
    dir_fd: int,
    relpath: bytes,
    flags: int = os.O_RDONLY,
    *,
    cached_only: bool = False,
    noatime: bool = True,
) -> int:
    """Open *relpath* under *dir_fd* without following any symlink on the way.

    A layer may hold `etc -> /`; resolving a merged path through it must never
    reach the host, so every component must be a real directory of the layer.
    With *cached_only* the open never waits for the disk: BlockingIOError
    unless every component is in the kernel's dentry cache (RESOLVE_CACHED).
    Reads through the descriptor leave the file's atime as it is (O_NOATIME):
    the mount's atime is its own, never the host's, whose rules differ.
    """
    global _openat2_works
    if flags & os.O_PATH:
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC  # openat2 takes no other flag beside it
    else:
        if noatime and flags & os.O_ACCMODE != os.O_WRONLY:
            flags |= os.O_NOATIME
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    resolve = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
    if cached_only:
        if not _openat2_works or len(relpath) >= PATH_MAX:
            raise BlockingIOError(errno.EAGAIN, "no cached open here", relpath)
        resolve |= _RESOLVE_CACHED
    if _openat2_works and len(relpath) < PATH_MAX:  # deeper: a component at a time
        try:
            return openat2(dir_fd, relpath, flags, resolve)
        except OSError as exc:
            if exc.errno == errno.EPERM and flags & os.O_NOATIME:
                # As open_noatime: not the owner, without CAP_FOWNER.
                return open_beneath(dir_fd, relpath, flags & ~os.O_NOATIME,
                                    cached_only=cached_only, noatime=False)  # fmt: skip
            if cached_only and exc.errno in (errno.EAGAIN, errno.EINVAL):  # EINVAL: < Linux 5.12
                raise BlockingIOError(errno.EAGAIN, "not in the dentry cache", relpath) from None
            if exc.errno not in (errno.ENOSYS, errno.EPERM):  # EPERM: seccomp filters
                raise
        _openat2_works = False
        if cached_only:
            raise BlockingIOError(errno.EAGAIN, "no cached open here", relpath)
    return _open_by_components(dir_fd, relpath, flags)


def open_noatime(path: bytes, flags: int, *, dir_fd: int | None = None) -> int:
    """os.open whose reads leave the file's atime alone (O_NOATIME), or a
    plain open where the daemon may not ask for that: not the owner, without
    CAP_FOWNER (an id a user namespace does not map)."""
    try:
        return os.open(path, flags | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError as exc:
        if exc.errno != errno.EPERM:
            raise
        return os.open(path, flags, dir_fd=dir_fd)


def _open_by_components(dir_fd: int, relpath: bytes, flags: int) -> int:
    parts = [part for part in relpath.split(b"/") if part]
    if not parts or any(part in (b".", b"..") for part in parts):
        raise OSError(errno.EINVAL, "bad path inside a layer", relpath)
    current = dir_fd
    try:
        for part in parts[:-1]:
            nxt = os.open(
                part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current
            )
            if current != dir_fd:
                os.close(current)
            current = nxt
        if flags & os.O_NOATIME:
            return open_noatime(parts[-1], flags & ~os.O_NOATIME, dir_fd=current)
        return os.open(parts[-1], flags, dir_fd=current)
    finally:
        if current != dir_fd:
            os.close(current)


def open_directory(top: bytes, rel: bytes) -> int:
    """An O_PATH descriptor of directory *rel* under *top*, at any depth:
    opened a run of components at a time, each run shorter than PATH_MAX."""
    fd = os.open(top, _PATH_FLAGS)
    parts = rel.split(b"/") if rel else []
    try:
        while parts:
            run = [parts.pop(0)]
            while parts and len(b"/".join(run)) + len(parts[0]) + 2 <= PATH_MAX:
                run.append(parts.pop(0))
            deeper = os.open(b"/".join(run), _PATH_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = deeper
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_path(dir_fd: int, name: bytes) -> bytes:
    """A short path to NAME in the directory open as *dir_fd*."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


_AT_SYMLINK_NOFOLLOW = 0x100
_fchmodat2_works = True


def chmod_here(path: bytes, mode: int) -> None:
    """chmod of what is at *path*, never of what a symlink there leads to
    (EOPNOTSUPP or ELOOP: strata never changes a symlink's mode). One
    fchmodat2 where the kernel has it (Linux 6.6), else an O_PATH open on
    the way."""
    global _fchmodat2_works
    if _fchmodat2_works:
        try:
            fchmodat2(AT_FDCWD, path, mode, _AT_SYMLINK_NOFOLLOW)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EPERM):  # EPERM: seccomp filters
                raise
        _fchmodat2_works = False
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
        os.chmod(b"/proc/self/fd/%d" % fd, mode)
    finally:
        os.close(fd)


def truncate_here(path: bytes, size: int) -> None:
    """truncate of the file at *path*, never of what a symlink there leads to."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


# Parent directories kept open by BeneathPaths: those a workload touches
# (dpkg's few hundred) stay open; more are opened again when next used.
PARENTS_KEPT = 512


class BeneathPaths:
    """Paths of a tree under *top* that one system call takes at any depth
    and that follow no symlink before their last component: NAME in the
    parent directory, opened beneath *top* with no symlink on the way (so a
    parent swapped for a symlink fails with ELOOP, never leads outside).
    Whether the last component is followed is the call's own choice, as
    with any path. The parents are kept open by relative path, so whoever
    moves or removes a directory of the tree calls forget()."""

    def __init__(self, top: bytes) -> None:
        self.top = top
        self.top_fd = os.open(top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs: dict[bytes, int] = {}  # parent directory -> its descriptor
        self._retired: list[int] = []

    def path(self, rel: bytes) -> bytes:
        if not rel:
            return self.top
        parent, _, name = rel.rpartition(b"/")
        if not parent:  # the top is the caller's own: a plain path where it fits
            if len(self.top) + len(name) + 2 <= PATH_MAX:  # a slash and the NUL
                return self.top + b"/" + name
            return fd_path(self.top_fd, name)
        return fd_path(self._opened(parent), name)

    def at(self, rel: bytes) -> tuple[int, bytes]:
        """*rel* as the directory descriptor and name the *at calls take
        (os.stat, os.unlink, os.rename with dir_fd): the cheapest form."""
        parent, _, name = rel.rpartition(b"/")
        return (self._opened(parent) if parent else self.top_fd), name

    def directory(self, rel: bytes) -> bytes:
        """A path of the directory *rel* itself, a symlink at its end refused
        too: for calls that act in it (O_TMPFILE, a listing) or follow it
        (stat, utime)."""
        return b"/proc/self/fd/%d" % self._opened(rel) if rel else self.top

    def open_directory(self, rel: bytes) -> int:
        """A new O_PATH descriptor of the directory *rel* (the top for b""),
        opened with no symlink on the way or at its end; the caller's own."""
        if not rel:
            return os.open(b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.top_fd)
        return open_beneath(self.top_fd, rel, os.O_PATH | os.O_DIRECTORY)

    def _opened(self, rel: bytes) -> int:
        fd = self._dirs.get(rel)
        if fd is None:
            fd = self.open_directory(rel)
            if len(self._dirs) >= PARENTS_KEPT:  # the oldest goes (closed later)
                self._retired.append(self._dirs.pop(next(iter(self._dirs))))
                if len(self._retired) > 2 * PARENTS_KEPT:
                    for old in self._retired[:PARENTS_KEPT]:
                        os.close(old)
                    del self._retired[:PARENTS_KEPT]
            self._dirs[rel] = fd
        return fd

    def forget(self) -> None:
        """Directories moved or went: drop the descriptors that reach them by
        their old paths. Closed one round later, so a path handed out just
        before (in use by a worker thread) stays valid meanwhile."""
        for fd in self._retired:
            os.close(fd)
        self._retired = list(self._dirs.values())
        self._dirs.clear()

    def close(self) -> None:
        for fd in [*self._retired, *self._dirs.values()]:
            os.close(fd)
        self._retired = []
        self._dirs.clear()
        os.close(self.top_fd)
