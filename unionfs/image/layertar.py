"""Layer tars: unpacking one safely into a directory, and writing one.

An unpacked layer keeps OCI's on-disk convention (`.wh.NAME` files and
`.wh..wh..opq` markers), which the core reads directly. A directory the tar
only implies (it lists `a/b` but not `a/`) is marked with IMPLICIT_XATTR so
the merge keeps the metadata of the layers below, as containerd does.

Nothing in a tar may reach outside the directory being filled: absolute
names, `..`, names beneath a symlink or a file, hardlinks to names the layer
does not hold, and overlay marker xattrs are refused with a one-line reason.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, BinaryIO

import zstandard

from ..core import overrides
from ..core.layer import HIDDEN_XATTR_PREFIXES, IMPLICIT_XATTRS, OPAQUE_MARKER, WHITEOUT_PREFIX
from ..core.paths import BeneathPaths
from ..errors import StrataError

# eStargz (lazy/estargz.py) adds these entries to a layer's tar for its
# readers, and a layer descriptor names its TOC's digest in this annotation:
# an unpacked layer leaves them out.
ESTARGZ_TOC_NAME = "stargz.index.json"
ESTARGZ_PREFETCH_LANDMARK = ".prefetch.landmark"
ESTARGZ_NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
ESTARGZ_ENTRIES = frozenset(
    {ESTARGZ_TOC_NAME, ESTARGZ_PREFETCH_LANDMARK, ESTARGZ_NO_PREFETCH_LANDMARK}
)
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XATTR_PAX_PREFIX = "SCHILY.xattr."
CHUNK = 1 << 20


class LayerRefused(StrataError):
    """A layer that is broken or hostile."""


def _mark_implicit(path: str) -> None:
    """trusted.* where allowed (root), else user.* (rootless)."""
    try:
        os.setxattr(path, os.fsdecode(IMPLICIT_XATTRS[0]), b"y")
    except PermissionError:
        os.setxattr(path, os.fsdecode(IMPLICIT_XATTRS[1]), b"y")


_TAR_KINDS = {
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


# Streams ------------------------------------------------------------------------


class HashingReader(io.RawIOBase):
    """Reads through to *source*, hashing and counting; stops at *limit* bytes."""

    def __init__(self, source: IO[bytes], limit: int, label: str) -> None:
        self.source = source
        self.digest = hashlib.sha256()
        self.size = 0
        self.limit = limit
        self.label = label

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size if size >= 0 else CHUNK)
        self.digest.update(data)
        self.size += len(data)
        if self.size > self.limit:
            raise LayerRefused(f"{self.label}: larger than the limit of {self.limit} bytes")
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class HashingWriter(io.RawIOBase):
    """Writes through to *target*, hashing and counting."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target = target
        self.digest = hashlib.sha256()
        self.size = 0
        self.discarded = False

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.discarded:  # a failed layer's streams flush into nothing
            return len(data)
        self.target.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def compression_of(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def decompressed(raw: BinaryIO) -> IO[bytes]:
    """The tar stream inside a layer blob, whatever its compression (by magic)."""
    head = raw.read(4)
    raw.seek(0)
    kind = compression_of(head)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if kind == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


_STREAM_ERRORS = (
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    zstandard.ZstdError,
    tarfile.TarError,
    UnicodeError,
)


# Unpacking ----------------------------------------------------------------------


@dataclass(slots=True)
class Unpacked:
    diff_id: str
    size: int
    entries: int
    implicit: list[str] = field(default_factory=list)


def _ns(seconds: float) -> int:
    return round(seconds * 1_000_000_000)


def _clean_name(name: str, label: str) -> str:
    if name.startswith("/"):
        raise LayerRefused(f"{label}: entry {name!r} has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise LayerRefused(f"{label}: entry {name!r} leads outside the layer with '..'")
    return "/".join(parts)


class _Unpacker:
    def __init__(self, target: str, label: str) -> None:
        self.target = target
        self.label = label
        # What this layer holds so far, by path: True for directories. Only we
        # write into the target, so this map, not the disk, says what a name is.
        self.kinds: dict[str, bool] = {"": True}
        self.implicit: set[str] = {""}
        self.dir_times: dict[str, float] = {}
        self.entries = 0
        # Rootless: devices kept as plain files, by path, with their numbers.
        self.devices: dict[str, int] = {}
        # Entries deeper than PATH_MAX, and never through a symlink on the way.
        self.paths = BeneathPaths(os.fsencode(target))

    def path(self, rel: str) -> str:
        return os.fsdecode(self.paths.path(os.fsencode(rel)))

    def refuse(self, message: str) -> LayerRefused:
        return LayerRefused(f"{self.label}: {message}")

    def beneath_file(self, rel: str) -> bool:
        """Whether a parent of *rel* is a non-directory of this layer."""
        parts = rel.split("/")[:-1]
        return any(
            self.kinds.get("/".join(parts[: depth + 1])) is False for depth in range(len(parts))
        )

    def parent_ready(self, rel: str, mtime: float) -> None:
        """Make the directories above *rel* (implicit ones), never through a non-dir.

        An implicit directory no lower layer has takes the time of the entry
        that implied it, so every unpack of the layer gives the same tree."""
        parts = rel.split("/")[:-1]
        current = ""
        for part in parts:
            current = f"{current}/{part}" if current else part
            kind = self.kinds.get(current)
            if kind is None:
                os.mkdir(self.path(current), 0o755)
                self.kinds[current] = True
                self.implicit.add(current)
                self.dir_times[current] = mtime
            elif not kind:
                raise self.refuse(
                    f"entry {rel!r} lies beneath {current!r}, which is not a directory"
                )

    def clear(self, rel: str, keep_dir: bool) -> None:
        """Make room for *rel*; a later tar entry replaces an earlier one."""
        kind = self.kinds.get(rel)
        if kind is None:
            return
        if kind and keep_dir:
            return
        path = self.path(rel)
        if kind:
            shutil.rmtree(path)
            self.paths.forget()
            prefix = rel + "/"
            for name in [name for name in self.kinds if name.startswith(prefix)]:
                del self.kinds[name]
                self.implicit.discard(name)
                self.dir_times.pop(name, None)
            self.dir_times.pop(rel, None)
        else:
            os.unlink(path)
        del self.kinds[rel]
        self.implicit.discard(rel)

    def add(self, tar: tarfile.TarFile | None, member: tarfile.TarInfo) -> bool:
        """Unpack one entry; without *tar*, a regular file is made sparse at
        its size, its data to come later (a lazily pulled layer). False: the
        entry had nothing to unpack."""
        rel = _clean_name(member.name, self.label)
        self.entries += 1
        base = rel.rsplit("/", 1)[-1]
        if base.startswith(os.fsdecode(WHITEOUT_PREFIX)):
            hidden = base[len(WHITEOUT_PREFIX) :]
            if base != os.fsdecode(OPAQUE_MARKER) and hidden in ("", ".", ".."):
                raise self.refuse(f"whiteout {member.name!r} names {hidden or 'nothing'!r}")
            if not member.isreg():
                raise self.refuse(f"whiteout {member.name!r} is not a regular file")
            if self.beneath_file(rel):
                # umoci writes whiteouts of a directory's old children after the
                # symlink or file that replaced it; that entry hides them already.
                return False
        if not rel:
            if not member.isdir():
                raise self.refuse("the layer's root entry is not a directory")
            self.implicit.discard("")
            self.metadata(rel, member)
            self.dir_times[""] = member.mtime
            return True
        self.parent_ready(rel, member.mtime)
        path = self.path(rel)
        if member.isdir():
            self.clear(rel, keep_dir=True)
            if rel not in self.kinds:
                os.mkdir(path, 0o700)
                self.kinds[rel] = True
            self.implicit.discard(rel)
            self.metadata(rel, member)
            self.dir_times[rel] = member.mtime
            return True
        if member.islnk():
            target = _clean_name(member.linkname, self.label)
            if self.kinds.get(target) is not False:
                raise self.refuse(
                    f"hardlink {member.name!r} points to {member.linkname!r},"
                    " which is not a file of this layer"
                )
            self.clear(rel, keep_dir=False)
            os.link(self.path(target), path, follow_symlinks=False)
            self.kinds[rel] = False
            return True
        self.clear(rel, keep_dir=False)
        if member.isreg():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                if tar is None:
                    os.ftruncate(fd, member.size)
                else:
                    source = tar.extractfile(member)
                    assert source is not None
                    remaining = member.size
                    while remaining > 0:
                        data = source.read(min(CHUNK, remaining))
                        if not data:
                            raise self.refuse(f"entry {member.name!r} is cut short")
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view) :]
                        remaining -= len(data)
            finally:
                os.close(fd)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.ischr() or member.isblk():
            if member.ischr() and member.devmajor == 0 and member.devminor == 0:
                raise self.refuse(
                    f"entry {member.name!r} is a 0/0 character device, which reads as a whiteout"
                )
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            rdev = os.makedev(member.devmajor, member.devminor)
            if overrides.make_node(path, kind | 0o600, rdev) is not None:
                self.devices[rel] = rdev  # rootless: a plain file stands for it
        elif member.isfifo():
            os.mkfifo(path, 0o600)
        else:
            raise self.refuse(f"entry {member.name!r} has unsupported type {member.type!r}")
        self.kinds[rel] = False
        self.metadata(rel, member)
        os.utime(path, ns=(_ns(member.mtime),) * 2, follow_symlinks=False)
        return True

    def metadata(self, rel: str, member: tarfile.TarInfo) -> None:
        path = self.path(rel)
        link = member.issym()
        mode = _TAR_KINDS.get(member.type, stat.S_IFREG) | (member.mode & 0o7777)
        rdev = self.devices.get(rel)
        if rdev is not None:
            overrides.write(path, overrides.StatOverride(mode, member.uid, member.gid, rdev))
        else:
            # Rootless, an owner that cannot be set is kept in the stat override.
            overrides.set_owner(path, mode, member.uid, member.gid)
        if not link:  # chmod after chown: chown clears setuid bits
            os.chmod(path, member.mode & 0o7777, follow_symlinks=False)
        for key, value in member.pax_headers.items():
            if not key.startswith(XATTR_PAX_PREFIX):
                continue
            name = key[len(XATTR_PAX_PREFIX) :]
            raw_name = name.encode("utf-8", "surrogateescape")
            if raw_name.startswith(HIDDEN_XATTR_PREFIXES):
                raise self.refuse(f"entry {member.name!r} sets the reserved xattr {name!r}")
            try:
                os.setxattr(
                    path,
                    name,
                    value.encode("utf-8", "surrogateescape"),
                    follow_symlinks=False,
                )
            except OSError as exc:
                # user.* xattrs cannot live on symlinks; a filesystem without
                # xattrs of a namespace loses them, as tar does.
                if exc.errno not in (errno.EPERM, errno.ENOTSUP):
                    raise

    def finish(self) -> list[str]:
        for rel in sorted(self.implicit):
            _mark_implicit(self.path(rel))
        # Directory times last, deepest first: filling a directory moves its mtime.
        for rel in sorted(self.dir_times, key=lambda item: item.count("/"), reverse=True):
            os.utime(self.path(rel), ns=(_ns(self.dir_times[rel]),) * 2)
        return sorted(self.implicit)


def unpack_layer(
    blob: BinaryIO,
    target: str,
    *,
    limit: int,
    label: str,
    hidden: frozenset[str] = frozenset(),
    on_entry: Callable[[bytes, int], None] | None = None,
) -> Unpacked:
    """Unpack the layer blob *blob* (any compression) into the empty dir
    *target*. Entries at the top named in *hidden* are the blob format's own
    (eStargz's TOC and landmarks): hashed into the DiffID, not unpacked.
    *on_entry* hears of each entry once it is unpacked whole (its path in
    the layer and its tar mtime in ns), for a mount that serves the layer
    while it streams in."""
    unpacker = _Unpacker(target, label)
    current: str | None = None  # the entry being unpacked, for an error's line
    try:
        try:
            stream = HashingReader(decompressed(blob), limit, label)
            with tarfile.open(
                fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape"
            ) as tar:
                for member in tar:
                    if hidden and member.name.strip("/").removeprefix("./") in hidden:
                        continue
                    current = member.name
                    if unpacker.add(tar, member) and on_entry is not None:
                        rel = _clean_name(member.name, label)
                        on_entry(os.fsencode(rel), _ns(member.mtime))
                    current = None
            stream.drain()  # the DiffID covers the end-of-archive blocks too
        except _STREAM_ERRORS as exc:
            reason = str(exc) or type(exc).__name__
            raise LayerRefused(f"{label}: corrupt or truncated layer data ({reason})") from None
        except OSError as exc:
            raise _unpack_error(label, exc, current) from None
        implicit = unpacker.finish()
    finally:
        unpacker.paths.close()
    return Unpacked("sha256:" + stream.digest.hexdigest(), stream.size, unpacker.entries, implicit)


def _unpack_error(label: str, exc: OSError, entry: str | None) -> StrataError:
    """One line for a host error met while unpacking: the entry it met it at
    (the host path may be a /proc/self/fd one, which says nothing)."""
    if entry is not None:
        return StrataError(f"{label}: cannot unpack entry {entry!r}: {exc.strerror}")
    return StrataError(
        f"{label}: cannot unpack: {exc.strerror} ({os.fsdecode(exc.filename or b'')})"
    )


def unpack_skeleton(members: Iterable[tarfile.TarInfo], target: str, *, label: str) -> int:
    """A layer's tree from its entries alone, into the empty dir *target*:
    every regular file sparse at its size, its data to come later. The same
    checks as unpack_layer; returns the number of entries."""
    unpacker = _Unpacker(target, label)
    try:
        current: str | None = None
        try:
            for member in members:
                current = member.name
                unpacker.add(None, member)
            current = None
        except OSError as exc:
            raise _unpack_error(label, exc, current) from None
        unpacker.finish()
    finally:
        unpacker.paths.close()
    return unpacker.entries


# Writing ------------------------------------------------------------------------


@dataclass(slots=True)
class Written:
    digest: str  # of the compressed blob
    size: int
    diff_id: str


class LayerWriter:
    """Writes a gzip-compressed, reproducible layer tar to *target*.

    Every entry is stored as given: the caller orders them; times are whole
    seconds, owner names are left out, the gzip header carries no time or name.
    """

    def __init__(self, target: IO[bytes]) -> None:
        self.compressed = HashingWriter(target)
        self.gzip = gzip.GzipFile(fileobj=self.compressed, mode="wb", compresslevel=6, mtime=0)
        self.plain = HashingWriter(self.gzip)  # type: ignore[arg-type]
        self.tar = tarfile.open(  # noqa: SIM115 - closed in close()
            fileobj=self.plain,
            mode="w|",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        )

    def add(
        self,
        info: tarfile.TarInfo,
        data: IO[bytes] | None = None,
        xattrs: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        info.uname = info.gname = ""
        headers = dict(info.pax_headers)
        for name, value in xattrs:
            key = XATTR_PAX_PREFIX + name.decode("utf-8", "surrogateescape")
            headers[key] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = headers
        self.tar.addfile(info, data)

    def discard(self) -> None:
        self.plain.discarded = self.compressed.discarded = True

    def close(self) -> Written:
        self.tar.close()
        self.gzip.close()
        return Written(
            "sha256:" + self.compressed.digest.hexdigest(),
            self.compressed.size,
            "sha256:" + self.plain.digest.hexdigest(),
        )


def tar_info(
    name: str, *, kind: bytes, mode: int, uid: int, gid: int, mtime: int
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode & 0o7777
    info.uid, info.gid = uid, gid
    info.mtime = mtime
    return info
