"""Host paths at any depth.

A system call takes a path of at most PATH_MAX bytes, but a tree may be deeper
(a merged path alone may be 4095 bytes, and UPPER or a layer adds its own
root). A path within the limit is used as it is; a deeper one goes through a
descriptor of its parent directory, as /proc/self/fd/N/NAME, which every call
accepts (the xattr calls have no *at form).
"""

from __future__ import annotations

import os

PATH_MAX = 4096  # bytes of a path a system call takes, its NUL included
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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


class DeepPaths:
    """Paths under *top* that one system call accepts, whatever the depth."""

    def __init__(self, top: bytes) -> None:
        self.top = top
        self._dirs: dict[bytes, int] = {}  # parent directory -> its descriptor
        self._retired: list[int] = []

    def path(self, rel: bytes) -> bytes:
        if not rel:
            return self.top
        if len(self.top) + len(rel) + 2 <= PATH_MAX:  # a slash and the NUL
            return self.top + b"/" + rel
        parent, _, name = rel.rpartition(b"/")
        fd = self._dirs.get(parent)
        if fd is None:
            fd = self._dirs[parent] = open_directory(self.top, parent)
        return fd_path(fd, name)

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
