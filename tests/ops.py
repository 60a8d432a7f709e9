"""Random filesystem operations, applied alike to two mounts.

Every operation returns what a program would see (a value or an errno), so
the same sequence run on strata and on the kernel's overlayfs can be compared
step by step. Some operations run as an unprivileged user (uid 1000) in a
forked child, so the kernel's permission checks take part.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import stat
from dataclasses import dataclass
from typing import Any

from unionfs.core import acl
from unionfs.core.syscalls import renameat2
from unionfs.core.upper import RENAME_EXCHANGE, RENAME_NOREPLACE

USER = 1000
# Never through a symlink: a layer may hold `passwd -> /etc/passwd`, and a
# write through it would change the host.
_NO_FOLLOW = os.O_NONBLOCK | os.O_NOFOLLOW
NAMES = ["a", "b", "c", "d", "e", "new", "x" * 120]
DATA = [b"", b"z", b"hello world\n", bytes(range(256)) * 40]
KINDS = [
    "create", "create_excl", "open_trunc", "write_at", "append", "truncate", "read",
    "read_across_copy_up", "unlink", "rmdir", "mkdir", "mkfifo", "mknod_chr", "symlink",
    "link", "rename", "rename_noreplace", "rename_exchange", "chmod", "chown", "utime",
    "setxattr", "removexattr", "stat", "listdir", "fsync", "fallocate", "setfacl",
]  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10
# Every mode the kernel passes a FUSE filesystem; the range from the op's number.
FALLOCATE_MODES = [0, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE, ZERO_RANGE | KEEP_SIZE]
# An access ACL granting the test's user read and write (and, on a
# directory, the same as its default ACL, which what is made in it inherits).
_ACL = acl.encode([
    acl.AclEntry(acl.USER_OBJ, 6), acl.AclEntry(acl.USER, 6, USER), acl.AclEntry(acl.GROUP_OBJ, 4),
    acl.AclEntry(acl.MASK, 6), acl.AclEntry(acl.OTHER, 0),
])  # fmt: skip


def fallocate(fd: int, mode: int, offset: int, length: int) -> str:
    """fallocate(2) with *mode*: "ok" or the errno's name."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        return errno.errorcode[ctypes.get_errno()]
    return "ok"


@dataclass(frozen=True)
class Op:
    kind: str
    path: str
    other: str = ""
    number: int = 0
    data: bytes = b""
    as_user: bool = False

    def __repr__(self) -> str:
        who = " as user" if self.as_user else ""
        size = f"{len(self.data)} bytes"
        return f"{self.kind}({self.path!r}, {self.other!r}, {self.number}, {size}){who}"


def choose(rng: random.Random, paths: list[str], dirs: list[str]) -> Op:
    """A random operation on existing paths, or on new names in existing dirs."""
    kind = rng.choice(KINDS)

    def existing() -> str:
        return rng.choice(paths) if paths and rng.random() < 0.8 else fresh()

    def fresh() -> str:
        parent = rng.choice(dirs) if dirs else ""
        name = rng.choice(NAMES)
        return f"{parent}/{name}" if parent else name

    path = fresh() if kind in ("create", "mkdir", "mkfifo", "mknod_chr", "symlink") else existing()
    other = ""
    if kind in ("link", "rename", "rename_noreplace", "rename_exchange"):
        other = existing() if kind == "rename_exchange" or rng.random() < 0.3 else fresh()
    number = rng.choice([0, 1, 7, 4096, 5000, 70000, 0o600, 0o755, 0o4755, 0o2775, 0o1777])
    if kind in ("chmod", "mkdir", "create", "create_excl"):
        number = rng.choice([0o644, 0o600, 0o755, 0o4755, 0o2775, 0o1777, 0o700, 0o444])
    if kind == "chown":
        number = rng.choice([0, USER, 65534])
    if kind == "utime":
        number = rng.randrange(1, 2_000_000_000) * 1_000_000_000 + rng.randrange(1_000_000_000)
    if kind == "symlink":
        other = rng.choice(["target", "../up", "/abs/path", "a"])
    as_user = kind not in ("chown", "mknod_chr") and rng.random() < 0.25
    return Op(kind, path, other, number, rng.choice(DATA), as_user)


def apply(root: str, op: Op) -> Any:
    """Run *op* under *root*; its result or ("errno", name)."""
    if not op.as_user:
        return _guarded(root, op)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(USER, USER, USER)
            os.setresuid(USER, USER, USER)
            result = repr(_guarded(root, op)).encode()
            os.write(write_end, result)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return ("user", b"".join(chunks).decode())


def _guarded(root: str, op: Op) -> Any:
    try:
        return _run(root, op)
    except OSError as exc:
        return ("errno", errno.errorcode.get(exc.errno or 0, str(exc.errno)))


def _stat_view(st: os.stat_result) -> tuple[int, ...]:
    size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
    nlink = 0 if stat.S_ISDIR(st.st_mode) else st.st_nlink
    return (st.st_mode, st.st_uid, st.st_gid, size, nlink)


def _names(directory: str) -> list[str]:
    """The names a directory lists that exist: overlayfs's readdir of a directory
    found in one layer only also lists its whiteouts (README: deliberate
    differences), which lstat then does not find."""
    return sorted(
        name for name in os.listdir(directory) if os.path.lexists(os.path.join(directory, name))
    )


def _digest(fd: int) -> str:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        return f"not a regular file: {stat.S_IFMT(mode):o}"  # a device may never end
    hasher = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.hexdigest()


def _run(root: str, op: Op) -> Any:
    path = os.path.join(root, op.path)
    other = os.path.join(root, op.other) if op.other else ""
    kind = op.kind
    if kind in ("create", "create_excl"):
        flags = os.O_CREAT | os.O_WRONLY | _NO_FOLLOW
        flags |= os.O_EXCL if kind == "create_excl" else 0
        fd = os.open(path, flags, op.number)
        try:
            os.write(fd, op.data)
            return _stat_view(os.fstat(fd))
        finally:
            os.close(fd)
    if kind == "open_trunc":
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | _NO_FOLLOW)
        try:
            os.write(fd, op.data)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)
    if kind == "write_at":
        fd = os.open(path, os.O_RDWR | _NO_FOLLOW)
        try:
            os.pwrite(fd, op.data or b"w", op.number)
            return (os.fstat(fd).st_size, _digest(fd))
        finally:
            os.close(fd)
    if kind == "append":
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | _NO_FOLLOW)
        try:
            os.write(fd, op.data or b"+")
            return os.fstat(fd).st_size
        finally:
            os.close(fd)
    if kind == "truncate":
        fd = os.open(path, os.O_WRONLY | _NO_FOLLOW)
        try:
            os.ftruncate(fd, op.number)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)
    if kind == "read":
        fd = os.open(path, os.O_RDONLY | _NO_FOLLOW)
        try:
            return _digest(fd)
        finally:
            os.close(fd)
    if kind == "read_across_copy_up":
        # A descriptor opened before the copy-up must see the new data.
        reader = os.open(path, os.O_RDONLY | _NO_FOLLOW)
        try:
            writer = os.open(path, os.O_WRONLY | _NO_FOLLOW)
            try:
                os.pwrite(writer, b"NEW", 0)
            finally:
                os.close(writer)
            return os.pread(reader, 3, 0)
        finally:
            os.close(reader)
    if kind == "unlink":
        os.unlink(path)
        return "ok"
    if kind == "rmdir":
        os.rmdir(path)
        return "ok"
    if kind == "mkdir":
        os.mkdir(path, op.number)
        return _stat_view(os.lstat(path))
    if kind == "mkfifo":
        os.mkfifo(path, 0o640)
        return _stat_view(os.lstat(path))
    if kind == "mknod_chr":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        return _stat_view(os.lstat(path))
    if kind == "symlink":
        os.symlink(op.other, path)
        return os.readlink(path)
    if kind == "link":
        os.link(path, other, follow_symlinks=False)
        return (_stat_view(os.lstat(path)), _stat_view(os.lstat(other)))
    if kind in ("rename", "rename_noreplace", "rename_exchange"):
        flags = {"rename": 0, "rename_noreplace": RENAME_NOREPLACE,
                 "rename_exchange": RENAME_EXCHANGE}[kind]  # fmt: skip
        renameat2(os.fsencode(path), os.fsencode(other), flags)
        return _names(os.path.dirname(other) or root)
    if kind == "chmod":
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return "symlink"  # Linux cannot chmod a symlink, and the target is not ours
        os.chmod(path, op.number)
        return _stat_view(os.lstat(path))
    if kind == "chown":
        os.chown(path, op.number, op.number, follow_symlinks=False)
        return _stat_view(os.lstat(path))
    if kind == "utime":
        os.utime(path, ns=(op.number, op.number), follow_symlinks=False)
        st = os.lstat(path)
        return (st.st_mtime_ns, st.st_atime_ns)
    if kind == "setxattr":
        os.setxattr(path, "user.tag", op.data or b"v", follow_symlinks=False)
        return sorted(os.listxattr(path, follow_symlinks=False))
    if kind == "removexattr":
        os.removexattr(path, "user.tag", follow_symlinks=False)
        return sorted(os.listxattr(path, follow_symlinks=False))
    if kind == "stat":
        return _stat_view(os.lstat(path))
    if kind == "listdir":
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        os.close(fd)  # a symlink to a directory is not listed through
        return _names(path)
    if kind == "fallocate":
        fd = os.open(path, os.O_RDWR | _NO_FOLLOW)
        try:
            mode = FALLOCATE_MODES[op.number % len(FALLOCATE_MODES)]
            outcome = fallocate(fd, mode, op.number % 9000, 1 + op.number % 5000)
            return (outcome, os.fstat(fd).st_size, _digest(fd))
        finally:
            os.close(fd)
    if kind == "setfacl":
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return "symlink"
        os.setxattr(path, acl.ACCESS.decode(), _ACL, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.setxattr(path, acl.DEFAULT.decode(), _ACL, follow_symlinks=False)
        return (_stat_view(os.lstat(path)), sorted(os.listxattr(path, follow_symlinks=False)))
    if kind == "fsync":
        fd = os.open(path, os.O_RDONLY | _NO_FOLLOW)
        try:
            os.fsync(fd)
            return "ok"
        finally:
            os.close(fd)
    raise AssertionError(f"unknown operation {kind}")


def tree_paths(root: str) -> tuple[list[str], list[str]]:
    """All paths under *root* and the directories among them (relative)."""
    paths: list[str] = []
    dirs: list[str] = []
    for top, subdirs, files in os.walk(root):
        rel = os.path.relpath(top, root)
        rel = "" if rel == "." else rel
        if rel:
            dirs.append(rel)
        for name in subdirs + files:
            paths.append(os.path.join(rel, name) if rel else name)
    return sorted(paths), sorted(dirs)
