"""Reading one directory layer: fingerprint, whiteouts, opaque dirs, safe opens.

A layer may use either on-disk convention, even mixed:
  OCI        `.wh.NAME` hides NAME below, `.wh..wh..opq` makes its dir opaque;
  overlayfs  a 0/0 character device hides its name, the xattr
             trusted.overlay.opaque=y (or user.overlay.opaque=y) makes a dir opaque.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass

import xxhash

from ..errors import StrataError

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
# Set by the image store on a directory a layer tar only implies (it lists
# `a/b` but not `a/`): such a directory keeps the metadata of the layers below.
IMPLICIT_XATTRS = (b"trusted.overlay.strata.implicit", b"user.overlay.strata.implicit")
# Bookkeeping xattrs of overlayfs (and ours) are never shown to users.
HIDDEN_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.")

_STAT = struct.Struct("<QIIIIQQqqH")


def is_whiteout_device(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _status(st: os.stat_result, name: bytes) -> bytes:
    return _STAT.pack(
        st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev,
        st.st_size, st.st_mtime_ns, st.st_ctime_ns, len(name),
    ) + name  # fmt: skip


def fingerprint(root: bytes) -> bytes:
    """A 128-bit digest of every name and inode status in the layer.

    The ctime of an inode moves on any change to its data or metadata, and the
    names cover renames, so a layer edited after indexing gets a new digest.
    Walked by directory descriptors, so a layer deeper than PATH_MAX is read whole.
    """
    digest = xxhash.xxh3_128()
    digest.update(_status(os.lstat(root), b""))

    def enter(rel: bytes, fd: int) -> list[bytes]:
        """Digest a directory's entries; return its subdirectories, last first."""
        with os.scandir(fd) as listing:
            items = sorted(listing, key=lambda item: item.name)
        digest.update(b"\0D" + root + (b"/" + rel if rel else b""))
        subdirs = []
        for item in items:
            name = os.fsencode(item.name)
            st = item.stat(follow_symlinks=False)
            digest.update(_status(st, name))
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(name)
        return subdirs[::-1]

    # Depth first with one descriptor per level open: a directory of many
    # subdirectories costs no more descriptors than a chain.
    top = os.open(root, _DIR_FLAGS)
    chain = [(b"", top, enter(b"", top))]
    try:
        while chain:
            rel, fd, subdirs = chain[-1]
            if not subdirs:
                os.close(fd)
                chain.pop()
                continue
            name = subdirs.pop(0)
            child_rel = rel + b"/" + name if rel else name
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            try:
                chain.append((child_rel, child, enter(child_rel, child)))
            except BaseException:
                os.close(child)
                raise
    finally:
        for _, fd, _ in chain:
            os.close(fd)
    return digest.digest()


def layer_identity(root: bytes, digest: bytes) -> bytes:
    return xxhash.xxh3_128_digest(root + b"\0" + digest)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_layer_dir(name: bytes, dir_fd: int | None = None) -> int:
    """A descriptor to list a layer directory, never through a symlink."""
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def read_xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """All xattrs of *path* itself (symlinks not followed), sorted by name."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    out = []
    for name in names:
        key = name.encode("utf-8", "surrogateescape")
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:  # removed meanwhile
                continue
            raise
        out.append((key, value))
    out.sort()
    return tuple(out)


def visible_xattrs(xattrs: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple(item for item in xattrs if not item[0].startswith(HIDDEN_XATTR_PREFIXES))


def is_implicit(xattrs: tuple[tuple[bytes, bytes], ...]) -> bool:
    return any(name in IMPLICIT_XATTRS and value == b"y" for name, value in xattrs)


def overlay_value(xattrs: tuple[tuple[bytes, bytes], ...], what: bytes) -> bytes | None:
    """An overlayfs marker (opaque, redirect, metacopy) in either namespace."""
    for name, value in xattrs:
        if name in (b"trusted.overlay." + what, b"user.overlay." + what):
            return value
    return None


def is_opaque(xattrs: tuple[tuple[bytes, bytes], ...]) -> bool:
    return any(name in OPAQUE_XATTRS and value == b"y" for name, value in xattrs)


@dataclass(slots=True)
class LayerDir:
    """One directory of one layer, its markers separated from its entries."""

    opaque: bool
    whiteouts: set[bytes]
    entries: list[tuple[bytes, os.stat_result]]


def read_layer_dir(fd: int) -> LayerDir:
    """The entries and markers of the layer directory open as *fd*."""
    opaque = False
    whiteouts: set[bytes] = set()
    entries: list[tuple[bytes, os.stat_result]] = []
    with os.scandir(fd) as listing:
        for item in listing:
            name = os.fsencode(item.name)
            if name.startswith(WHITEOUT_PREFIX):
                if name == OPAQUE_MARKER:
                    opaque = True
                elif not name.startswith(b".wh..wh."):  # other .wh..wh. names are reserved
                    whiteouts.add(name[len(WHITEOUT_PREFIX) :])
                continue
            st = item.stat(follow_symlinks=False)
            if is_whiteout_device(st):
                whiteouts.add(name)
                continue
            entries.append((name, st))
    return LayerDir(opaque, whiteouts, entries)


def open_layer_root(path: str) -> int:
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StrataError(f"cannot open layer {path}: {exc.strerror}") from exc
