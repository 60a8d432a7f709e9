"""zstd:chunked (containers/storage's format, as skopeo and podman write it):
a zstd layer whose files' data are zstd frames of their own, cut into
content-defined chunks, with a table of contents (the "manifest", the same
JSON entries as eStargz's TOC plus each file's endOffset) in a skippable
frame near the end. The layer descriptor's annotations give the manifest's
position and the digest of its compressed bytes, so a reader that trusts the
manifest can check every chunk it fetches.

Knows nothing of FUSE or of the store: layers.py uses it beside estargz.py.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import zstandard

from ..errors import StrataError
from .estargz import TOC_LIMIT, Chunk, clean_name, toc_json

MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
MANIFEST_POSITION = "io.containers.zstd-chunked.manifest-position"
MANIFEST_TYPE_TOC = 1


def parse_position(text: str, label: str) -> tuple[int, int, int]:
    """(offset, compressed length, uncompressed length) of the manifest."""
    try:
        offset, length, plain, kind = (int(part) for part in text.split(":"))
    except ValueError:
        raise StrataError(f"{label}: bad zstd:chunked manifest position {text!r}") from None
    if kind != MANIFEST_TYPE_TOC or min(offset, length, plain) < 0 or plain > TOC_LIMIT:
        raise StrataError(f"{label}: unusable zstd:chunked manifest position {text!r}")
    return offset, length, plain


def read_manifest(data: bytes, checksum: str, plain: int, label: str) -> bytes:
    """The manifest's JSON from its compressed bytes, checked against the
    descriptor's checksum annotation."""
    if "sha256:" + hashlib.sha256(data).hexdigest() != checksum:
        raise StrataError(f"{label}: the manifest does not match the digest its descriptor gives")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=plain)
    except zstandard.ZstdError as exc:
        raise StrataError(f"{label}: corrupt zstd:chunked manifest ({exc})") from None
    return bytes(raw)


def parse_manifest(raw: bytes, label: str) -> dict[str, Any]:
    return toc_json(raw, label, "zstd:chunked manifest")


def _int(raw: dict[str, Any], key: str, name: str, label: str) -> int:
    value = raw.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 40:
        raise StrataError(f"{label}: {name}: bad {key} in the manifest")
    return value


def file_chunks(toc: dict[str, Any], limit: int, label: str) -> dict[str, list[Chunk]]:
    """Every regular file's chunks by clean name: each a zstd frame that ends
    where the file's next chunk starts (or at the file's endOffset), all
    before *limit* (the manifest's offset), in order, without gaps."""
    files: dict[str, list[Chunk]] = {}
    sizes: dict[str, int] = {}
    ends: dict[str, int] = {}
    pending: dict[str, list[tuple[int, int, int, str]]] = {}
    for raw in toc["entries"]:
        if not isinstance(raw, dict) or raw.get("type") not in ("reg", "chunk"):
            continue
        name = raw.get("name")
        if not isinstance(name, str) or not name or "\x00" in name:
            raise StrataError(f"{label}: a manifest entry has no usable name")
        clean = clean_name(name)
        if raw["type"] == "reg":
            size = _int(raw, "size", name, label)
            sizes[clean], pending[clean] = size, []
            if size == 0:
                continue
            ends[clean] = _int(raw, "endOffset", name, label)
        elif clean not in pending:
            raise StrataError(f"{label}: {name}: a chunk before its file in the manifest")
        offset = _int(raw, "offset", name, label)
        file_offset = _int(raw, "chunkOffset", name, label)
        size = _int(raw, "chunkSize", name, label) or sizes[clean] - file_offset
        digest = raw.get("chunkDigest") or (raw.get("digest") if raw["type"] == "reg" else None)
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise StrataError(f"{label}: {name}: a chunk without a sha256 digest")
        pending[clean].append((offset, file_offset, size, digest))
    for name, raw_chunks in pending.items():
        chunks: list[Chunk] = []
        expected = 0
        for number, (offset, file_offset, size, digest) in enumerate(raw_chunks):
            end = raw_chunks[number + 1][0] if number + 1 < len(raw_chunks) else ends[name]
            if file_offset != expected or size <= 0 or file_offset + size > sizes[name]:
                raise StrataError(f"{label}: {name}: chunks overlap, leave a gap or run past")
            if not 0 <= offset < end <= limit:
                raise StrataError(f"{label}: {name}: a chunk outside the blob")
            chunks.append(Chunk(offset, end, file_offset, size, digest))
            expected = file_offset + size
        if expected != sizes[name]:
            raise StrataError(f"{label}: {name}: its chunks do not cover the file")
        files[name] = chunks
    spans = sorted((c.offset, c.end) for chunks in files.values() for c in chunks)
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise StrataError(f"{label}: two chunks overlap in the blob")
    return files


def verified_chunk(data: bytes, chunk: Chunk, label: str) -> bytes:
    """A chunk's data from its zstd frame, checked against its digest."""
    try:
        plain = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except zstandard.ZstdError as exc:
        raise StrataError(f"{label}: corrupt chunk ({exc})") from None
    if len(plain) != chunk.size:
        raise StrataError(f"{label}: chunk at {chunk.file_offset} does not match its size")
    if "sha256:" + hashlib.sha256(plain).hexdigest() != chunk.digest:
        raise StrataError(f"{label}: chunk at {chunk.file_offset} does not match its digest")
    return bytes(plain)
