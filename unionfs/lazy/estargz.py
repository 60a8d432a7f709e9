"""eStargz: gzip layers whose files can be fetched and checked one by one
(stargz-snapshotter's format, a valid tar.gz for every other tool).

A blob is a concatenation of gzip members. Every non-empty regular file's
data starts a new member, and so does every chunk of a large file; the table
of contents (TOC, `stargz.index.json`, the last tar entry) starts the member
that ends the tar, and a 51-byte empty member (the footer) names the TOC's
offset. The TOC lists every entry with the compressed offset and digest of
each chunk; the layer descriptor's annotation holds the TOC's digest, so a
reader that trusts the manifest can check every byte it fetches. A landmark
entry separates the files a workload reads first from the rest.

Knows nothing of FUSE or of the store: it writes and reads blobs.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import itertools
import json
import re
import struct
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Protocol

from ..errors import StrataError
from ..image.layertar import (
    ESTARGZ_ENTRIES,
    ESTARGZ_NO_PREFETCH_LANDMARK,
    ESTARGZ_PREFETCH_LANDMARK,
    ESTARGZ_TOC_NAME,
)
from ..image.layertar import (
    TOC_DIGEST_ANNOTATION as TOC_DIGEST_ANNOTATION,
)

# Entries of the tar that are the format's own (a mounted layer hides them),
# and the annotation with the TOC's digest: known to image/ too, for unpacking.
TOC_NAME = ESTARGZ_TOC_NAME
PREFETCH_LANDMARK = ESTARGZ_PREFETCH_LANDMARK
NO_PREFETCH_LANDMARK = ESTARGZ_NO_PREFETCH_LANDMARK
FORMAT_ENTRIES = ESTARGZ_ENTRIES
LANDMARK_DATA = b"\x0f"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
FOOTER_SIZE = 51
CHUNK_SIZE = 4 << 20  # stargz-snapshotter's default
TOC_LIMIT = 64 << 20  # a TOC larger than this is refused as absurd
BLOCK = 512

_TYPES = {
    tarfile.DIRTYPE: "dir",
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
_XATTR_PAX = "SCHILY.xattr."


def footer(toc_offset: int) -> bytes:
    """The empty gzip member that ends a blob and names the TOC's offset."""
    subfield = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(subfield)) + subfield
    header = b"\x1f\x8b\x08\x04" + b"\x00" * 4 + b"\x00\xff" + struct.pack("<H", len(extra))
    stored_empty_block = b"\x01\x00\x00\xff\xff"
    return header + extra + stored_empty_block + struct.pack("<II", 0, 0)


def parse_footer(data: bytes, label: str) -> int:
    """The TOC's offset from a blob's last FOOTER_SIZE bytes."""
    if (
        len(data) != FOOTER_SIZE
        or data[:4] != b"\x1f\x8b\x08\x04"
        or data[10:12] != struct.pack("<H", 26)
        or data[12:16] != b"SG\x16\x00"
        or data[32:38] != b"STARGZ"
    ):
        raise StrataError(f"{label}: no eStargz footer at the end of the blob")
    try:
        return int(data[16:32], 16)
    except ValueError:
        raise StrataError(f"{label}: the eStargz footer's TOC offset is not a number") from None


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


@dataclass(frozen=True, slots=True)
class Converted:
    digest: str  # of the compressed blob
    size: int
    diff_id: str
    uncompressed_size: int
    toc_digest: str

    def annotations(self) -> dict[str, str]:
        return {
            TOC_DIGEST_ANNOTATION: self.toc_digest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size),
        }


class EStargzWriter:
    """Writes tar entries to *target* as an eStargz blob, in the order given."""

    def __init__(self, target: Sink, chunk_size: int = CHUNK_SIZE) -> None:
        self.target = target
        self.chunk_size = chunk_size
        self.compressed = hashlib.sha256()
        self.offset = 0  # compressed bytes written
        self.plain = hashlib.sha256()
        self.plain_size = 0
        self.member: Any = None  # the open gzip member's compressor
        self.entries: list[dict[str, Any]] = []

    def _emit(self, data: bytes) -> None:
        if data:
            self.target.write(data)
            self.compressed.update(data)
            self.offset += len(data)

    def _write(self, data: bytes) -> None:
        if self.member is None:
            self.member = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: with a gzip header
        self.plain.update(data)
        self.plain_size += len(data)
        self._emit(self.member.compress(data))

    def _new_member(self) -> None:
        if self.member is not None:
            self._emit(self.member.flush(zlib.Z_FINISH))
            self.member = None

    def add(self, info: tarfile.TarInfo, data: IO[bytes] | None = None) -> None:
        kind = _TYPES.get(info.type)
        if kind is None:
            raise StrataError(f"{info.name}: tar entry type {info.type!r} has no eStargz form")
        info = copy.copy(info)
        info.uname = info.gname = ""
        if kind == "dir" and not info.name.endswith("/"):
            info.name += "/"  # as tar and stargz-snapshotter write directories
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        entry: dict[str, Any] = {
            "name": info.name,
            "type": kind,
            "modtime": _rfc3339(info.mtime),
            "mode": info.mode,
            "uid": info.uid,
            "gid": info.gid,
        }
        if kind in ("symlink", "hardlink"):
            entry["linkName"] = info.linkname
        if kind in ("char", "block"):
            entry["devMajor"], entry["devMinor"] = info.devmajor, info.devminor
        xattrs = {
            key[len(_XATTR_PAX) :]: base64.b64encode(
                value.encode("utf-8", "surrogateescape")
            ).decode()
            for key, value in info.pax_headers.items()
            if key.startswith(_XATTR_PAX)
        }
        if xattrs:
            entry["xattrs"] = xattrs
        if kind != "reg" or info.size == 0:
            if kind == "reg":
                entry["size"] = 0
            self.entries.append(entry)
            return
        assert data is not None
        entry["size"] = info.size
        whole = hashlib.sha256()
        first = entry
        chunk_offset = 0
        while chunk_offset < info.size:
            length = min(self.chunk_size, info.size - chunk_offset)
            chunk = data.read(length)
            if len(chunk) != length:
                raise StrataError(f"{info.name}: the layer ended inside the file's data")
            self._new_member()
            this: dict[str, Any] = (
                first if chunk_offset == 0 else {"name": info.name, "type": "chunk"}
            )
            this["offset"] = self.offset
            this["chunkOffset"] = chunk_offset
            # The format gives a file's last (or only) chunk the size 0.
            this["chunkSize"] = 0 if chunk_offset + length == info.size else length
            this["chunkDigest"] = "sha256:" + hashlib.sha256(chunk).hexdigest()
            whole.update(chunk)
            self._write(chunk)
            self.entries.append(this)
            chunk_offset += length
        first["digest"] = "sha256:" + whole.hexdigest()
        padding = -info.size % BLOCK
        if padding:
            self._write(b"\x00" * padding)

    def add_landmark(self, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(LANDMARK_DATA), 0o644, 0
        self.add(info, io.BytesIO(LANDMARK_DATA))

    def close(self) -> Converted:
        toc = json.dumps({"version": 1, "entries": self.entries}, separators=(",", ":")).encode()
        self._new_member()
        toc_offset = self.offset
        info = tarfile.TarInfo(TOC_NAME)
        info.size, info.mode, info.mtime = len(toc), 0o644, 0
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self._write(toc + b"\x00" * (-len(toc) % BLOCK))
        self._write(b"\x00" * (2 * BLOCK))  # the tar's end
        self._new_member()
        self._emit(footer(toc_offset))
        return Converted(
            "sha256:" + self.compressed.hexdigest(),
            self.offset,
            "sha256:" + self.plain.hexdigest(),
            self.plain_size,
            "sha256:" + hashlib.sha256(toc).hexdigest(),
        )


def clean_name(name: str) -> str:
    """A tar name as a relative path without `./`, `/` or a trailing slash."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    return "/".join(parts)


def prefetch_order(members: list[tarfile.TarInfo], prefetch: Iterable[str]) -> list[int]:
    """Indexes of *members* to write before the prefetch landmark: each listed
    regular file that appears once in the layer, after its parent directories'
    entries. A file of the list that the layer lacks is left out."""
    where: dict[str, int] = {}
    seen_twice: set[str] = set()
    for number, member in enumerate(members):
        name = clean_name(member.name)
        if name in where:
            seen_twice.add(name)
        where[name] = number
    chosen: list[int] = []
    taken: set[int] = set()
    for wanted in prefetch:
        name = clean_name(wanted)
        found = where.get(name)
        if found is None or name in seen_twice or not members[found].isreg():
            continue
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = where.get("/".join(parts[:depth]))
            if parent is not None and parent not in taken and members[parent].isdir():
                chosen.append(parent)
                taken.add(parent)
        if found not in taken:
            chosen.append(found)
            taken.add(found)
    return chosen


def convert_tar(
    tar_file: IO[bytes],
    target: Sink,
    prefetch: Iterable[str] = (),
    *,
    skip_format_entries: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> Converted:
    """Rewrite the uncompressed, seekable tar *tar_file* as eStargz into
    *target*: the prefetched files first, then the landmark, then the rest in
    the layer's order. *skip_format_entries* drops an eStargz source's own TOC
    and landmarks."""
    with tarfile.open(
        fileobj=tar_file, mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as tar:
        members = [
            member
            for member in tar.getmembers()
            if not (skip_format_entries and clean_name(member.name) in FORMAT_ENTRIES)
        ]
        first = prefetch_order(members, prefetch)
        writer = EStargzWriter(target, chunk_size)

        def write(member: tarfile.TarInfo) -> None:
            writer.add(member, tar.extractfile(member) if member.isreg() else None)

        if not first:
            writer.add_landmark(NO_PREFETCH_LANDMARK)
        for number in first:
            write(members[number])
        if first:
            writer.add_landmark(PREFETCH_LANDMARK)
        chosen = set(first)
        for number, member in enumerate(members):
            if number not in chosen:
                write(member)
        return writer.close()


# Reading ------------------------------------------------------------------------

_NAME_PART = re.compile(r"^[^\x00]+$")


@dataclass(frozen=True, slots=True)
class Chunk:
    offset: int  # of its gzip member in the blob
    end: int  # where the next member starts (the bytes to fetch)
    file_offset: int
    size: int
    digest: str


def decompress_member(data: bytes, size: int, label: str) -> bytes:
    """The first *size* bytes of the gzip member at the start of *data*."""
    try:
        decompressor = zlib.decompressobj(31)
        plain = decompressor.decompress(data, size)
    except zlib.error as exc:
        raise StrataError(f"{label}: corrupt chunk ({exc})") from None
    if len(plain) != size:
        raise StrataError(f"{label}: chunk shorter than its TOC says")
    return plain


def verified_chunk(data: bytes, chunk: Chunk, label: str) -> bytes:
    """A chunk's data from its fetched bytes, checked against its digest."""
    plain = decompress_member(data, chunk.size, label)
    if "sha256:" + hashlib.sha256(plain).hexdigest() != chunk.digest:
        raise StrataError(f"{label}: chunk at {chunk.file_offset} does not match its digest")
    return plain


def toc_bytes(data: bytes, label: str) -> bytes:
    """The TOC's own bytes from its gzip member (the bytes from the footer's
    offset to the footer)."""
    try:
        plain = zlib.decompressobj(31).decompress(data, TOC_LIMIT + 3 * BLOCK)
        with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as tar:
            member = tar.next()
            if member is None or member.name != TOC_NAME or not member.isreg():
                raise StrataError(f"{label}: the TOC's member does not hold {TOC_NAME}")
            if member.size > TOC_LIMIT:
                raise StrataError(f"{label}: the TOC is larger than {TOC_LIMIT >> 20} MiB")
            handle = tar.extractfile(member)
            assert handle is not None
            return handle.read()
    except (zlib.error, tarfile.TarError, EOFError) as exc:
        raise StrataError(f"{label}: corrupt TOC ({exc})") from None


def parse_toc(raw: bytes, digest: str, label: str) -> dict[str, Any]:
    """The TOC, checked against *digest* (the layer descriptor's annotation)."""
    if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
        raise StrataError(f"{label}: the TOC does not match the digest its descriptor gives")
    return toc_json(raw, label, "TOC")


def toc_json(raw: bytes, label: str, what: str) -> dict[str, Any]:
    """A version 1 table of contents with a list of entries (eStargz's TOC,
    zstd:chunked's manifest)."""
    try:
        toc = json.loads(raw)
    except ValueError as exc:
        raise StrataError(f"{label}: the {what} is not JSON ({exc})") from None
    if not isinstance(toc, dict) or toc.get("version") != 1:
        raise StrataError(f"{label}: not a version 1 {what}")
    if not isinstance(toc.get("entries"), list):
        raise StrataError(f"{label}: the {what} has no entries")
    return toc


def file_chunks(toc: dict[str, Any], toc_offset: int, label: str) -> dict[str, list[Chunk]]:
    """Every regular file's chunks by clean name, each checked to lie in the
    blob before the TOC, in order, without overlaps or gaps."""
    files: dict[str, list[Chunk]] = {}
    sizes: dict[str, int] = {}
    starts: list[int] = []
    for raw in toc["entries"]:
        if not isinstance(raw, dict) or raw.get("type") not in ("reg", "chunk"):
            continue
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME_PART.match(name):
            raise StrataError(f"{label}: a TOC entry has no usable name")
        clean = clean_name(name)
        if raw["type"] == "reg":
            size = raw.get("size", 0)
            if not isinstance(size, int) or size < 0 or size > 1 << 40:
                raise StrataError(f"{label}: {name}: absurd size in the TOC")
            sizes[clean] = size
            files[clean] = []
            if size == 0:
                continue
        elif clean not in files:
            raise StrataError(f"{label}: {name}: a chunk before its file in the TOC")
        offset, file_offset = raw.get("offset"), raw.get("chunkOffset", 0)
        digest = raw.get("chunkDigest")
        if not isinstance(offset, int) or not isinstance(file_offset, int):
            raise StrataError(f"{label}: {name}: a chunk without offsets in the TOC")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise StrataError(f"{label}: {name}: a chunk without a sha256 chunkDigest")
        if not 0 <= offset < toc_offset:
            raise StrataError(f"{label}: {name}: a chunk outside the blob")
        chunks = files[clean]
        expected = chunks[-1].file_offset + chunks[-1].size if chunks else 0
        if file_offset != expected:
            raise StrataError(f"{label}: {name}: chunks overlap or leave a gap")
        size = raw.get("chunkSize", 0) or sizes[clean] - file_offset
        if not isinstance(size, int) or size <= 0 or file_offset + size > sizes[clean]:
            raise StrataError(f"{label}: {name}: a chunk runs past its file's end")
        chunks.append(Chunk(offset, 0, file_offset, size, digest))
        starts.append(offset)
    ordered = [*sorted(set(starts)), toc_offset]
    if len(ordered) - 1 != len(starts):
        raise StrataError(f"{label}: two chunks share one offset in the TOC")
    following = dict(itertools.pairwise(ordered))
    for name, chunks in files.items():
        if chunks and chunks[-1].file_offset + chunks[-1].size != sizes[name]:
            raise StrataError(f"{label}: {name}: its chunks do not cover the file")
        files[name] = [
            Chunk(c.offset, following[c.offset], c.file_offset, c.size, c.digest) for c in chunks
        ]
    return files
