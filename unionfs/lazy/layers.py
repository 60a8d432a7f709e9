"""Lazy pulling: an eStargz image made mountable from its manifest, config and
each layer's TOC, without the layers' data. A layer's tree is laid out in the
store at once, every regular file sparse at its size; a file's data is
fetched on its first read (HTTP Range requests for its chunks), checked
against the TOC's chunk digests, written into the file, and only then
served. Meanwhile a background task fetches the files before the prefetch
landmark, then the whole blob; once the blob's digest and the layer's DiffID
check out, the layer is an ordinary stored layer.

The state of a lazy layer lives beside the store's layers, in lazy/<hex>:
source.json (where to fetch from), toc.json (the verified TOC), done (the
files whose data is in place, one JSON string per line, appended after the
data is on disk) and, at the end, complete. Knows nothing of FUSE: the
merged view calls needs() and ensure() on the layers it was given.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..errors import StrataError
from ..image.layertar import decompressed, unpack_skeleton
from ..image.reference import Reference
from ..image.store import Descriptor, Image, Store, parse_config, parse_manifest
from . import estargz, zstdchunked

log = logging.getLogger("strata.lazy")

DEFAULT_TIMEOUT = 30.0
PREFETCH_REQUEST = 16 << 20  # the prefetch range is fetched in requests of this size
RETRY_PAUSE = 0.5
_TYPES = {
    "dir": tarfile.DIRTYPE,
    "reg": tarfile.REGTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def state_dir(store: Store, diff_id: str) -> str:
    return store.lazy_state_dir(diff_id)


def is_incomplete(store: Store, diff_id: str) -> bool:
    """A layer laid out lazily whose data is not all in place yet."""
    state = state_dir(store, diff_id)
    return os.path.isdir(state) and not os.path.exists(os.path.join(state, "complete"))


def filled_in_place(store: Store, diff_id: str) -> bool:
    """A layer laid out lazily (complete or not): its files' data was written
    after they were made, so their change times are not those the index saw."""
    return os.path.isdir(state_dir(store, diff_id))


def _time(text: Any, label: str) -> float:
    if not text:
        return 0.0
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise StrataError(f"{label}: bad modtime {text!r} in the TOC") from None


def _int(raw: dict[str, Any], key: str, label: str, limit: int = 1 << 40) -> int:
    value = raw.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise StrataError(f"{label}: {raw.get('name')!r}: bad {key} in the TOC")
    return value


def toc_members(toc: dict[str, Any], label: str) -> list[tarfile.TarInfo]:
    """The TOC's entries as tar entries (without data), the format's own left out."""
    members = []
    for raw in toc["entries"]:
        if not isinstance(raw, dict):
            raise StrataError(f"{label}: a TOC entry is not an object")
        kind = raw.get("type")
        if kind == "chunk":
            continue
        if kind not in _TYPES:
            raise StrataError(f"{label}: TOC entry type {kind!r} is unknown")
        name = raw.get("name")
        if not isinstance(name, str) or not name or "\x00" in name:
            raise StrataError(f"{label}: a TOC entry has no usable name")
        if estargz.clean_name(name) in estargz.FORMAT_ENTRIES:
            continue
        info = tarfile.TarInfo(name)
        info.type = _TYPES[kind]
        info.mode = _int(raw, "mode", label, 0o177777) & 0o7777
        info.uid, info.gid = _int(raw, "uid", label, 1 << 32), _int(raw, "gid", label, 1 << 32)
        info.mtime = _time(raw.get("modtime"), label)
        if kind == "reg":
            info.size = _int(raw, "size", label)
        if kind in ("symlink", "hardlink"):
            link = raw.get("linkName")
            if not isinstance(link, str) or not link:
                raise StrataError(f"{label}: {name!r}: a link without a target in the TOC")
            info.linkname = link
        if kind in ("char", "block"):
            info.devmajor = _int(raw, "devMajor", label, 1 << 32)
            info.devminor = _int(raw, "devMinor", label, 1 << 32)
        xattrs = raw.get("xattrs") or {}
        if not isinstance(xattrs, dict):
            raise StrataError(f"{label}: {name!r}: bad xattrs in the TOC")
        try:
            info.pax_headers = {
                "SCHILY.xattr." + str(key): base64.b64decode(str(value), validate=True).decode(
                    "utf-8", "surrogateescape"
                )
                for key, value in xattrs.items()
            }
        except ValueError:
            raise StrataError(f"{label}: {name!r}: an xattr is not base64 in the TOC") from None
        members.append(info)
    return members


class LayerCorrupt(StrataError):
    """The whole blob does not match its digest or DiffID."""


class LazyLayer:
    """One lazily pulled layer of the store, with what fetches its data."""

    def __init__(
        self,
        store: Store,
        diff_id: str,
        fetch: RangeFetcher,
        timeout: float,
        *,
        background: bool = True,
    ) -> None:
        self.store = store
        self.background = background  # off: only what is read is fetched
        self.diff_id = diff_id
        self.layer_dir = store.layer_path(diff_id)
        self.state = state_dir(store, diff_id)
        self.label = f"layer {diff_id[:19]}"
        with open(os.path.join(self.state, "source.json")) as handle:
            self.source = json.load(handle)
        self.blob = Descriptor.parse(self.source["blob"], self.label)
        self.fetch = fetch
        self.timeout = timeout
        self.complete = os.path.exists(os.path.join(self.state, "complete"))
        self.chunks: dict[str, list[estargz.Chunk]] = {}
        self.aliases: dict[str, str] = {}
        self.first: list[str] = []  # the files before the prefetch landmark
        self.done: set[str] = set()
        # How a fetched chunk is unpacked and checked (by the layer's format).
        self.verify: Callable[[bytes, estargz.Chunk, str], bytes] = estargz.verified_chunk
        if not self.complete:
            self._load()
        self.lock = threading.Lock()
        self.file_locks: dict[str, threading.Lock] = {}

    def _load(self) -> None:
        with open(os.path.join(self.state, "toc.json"), "rb") as handle:
            raw = handle.read()
        if self.source.get("format") == "zstd:chunked":
            _, _, plain = zstdchunked.parse_position(
                self.blob.annotations[zstdchunked.MANIFEST_POSITION], self.label
            )
            checksum = self.blob.annotations[zstdchunked.MANIFEST_CHECKSUM]
            toc = zstdchunked.parse_manifest(
                zstdchunked.read_manifest(raw, checksum, plain, self.label), self.label
            )
            chunks = zstdchunked.file_chunks(toc, self.source["toc_offset"], self.label)
            self.verify = zstdchunked.verified_chunk
        else:
            annotation = self.blob.annotations[estargz.TOC_DIGEST_ANNOTATION]
            toc = estargz.parse_toc(raw, annotation, self.label)
            chunks = estargz.file_chunks(toc, self.source["toc_offset"], self.label)
        self.chunks = {
            name: file_chunks
            for name, file_chunks in chunks.items()
            if name not in estargz.FORMAT_ENTRIES  # hidden: not in the layer's tree
        }
        landmark_seen = False
        for entry in toc["entries"]:
            name = estargz.clean_name(str(entry.get("name", "")))
            if entry.get("type") == "hardlink":
                self.aliases[name] = estargz.clean_name(str(entry.get("linkName", "")))
            if name == estargz.PREFETCH_LANDMARK:
                landmark_seen = True
            elif entry.get("type") == "reg" and not landmark_seen and name in self.chunks:
                self.first.append(name)
        if not landmark_seen:
            self.first = []
        with (
            contextlib.suppress(FileNotFoundError),
            open(
                os.path.join(self.state, "done"), encoding="utf-8", errors="surrogateescape"
            ) as handle,
        ):
            for line in handle:
                with contextlib.suppress(ValueError):  # a line cut by a crash
                    self.done.add(json.loads(line))

    # What the view asks ---------------------------------------------------------

    def _name(self, path: bytes) -> str:
        name = estargz.clean_name(os.fsdecode(path))
        return self.aliases.get(name, name)

    def needs(self, path: bytes) -> bool:
        """Whether the data of the layer file at *path* is still to come."""
        if self.complete:
            return False
        name = self._name(path)
        return bool(self.chunks.get(name)) and name not in self.done

    def ensure(self, path: bytes) -> None:
        """Bring the file's data into place (blocking); OSError(EIO) if it
        cannot be fetched and checked within the timeout."""
        name = self._name(path)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._fill(name, self._from_registry)
                return
            except StrataError as exc:
                if "does not match" in str(exc) or "corrupt chunk" in str(exc):
                    log.error("%s", exc)  # bad data is not retried into the file
                    raise OSError(errno.EIO, str(exc)) from None
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("%s: %s: gave up after %.0f s: %s", self.label, name,
                              self.timeout, exc)  # fmt: skip
                    raise OSError(errno.EIO, str(exc)) from None
                time.sleep(min(RETRY_PAUSE, left))

    def _from_registry(self, chunk: estargz.Chunk) -> bytes:
        return self.fetch(self.blob.digest, chunk.offset, chunk.end)

    def _file_lock(self, name: str) -> threading.Lock:
        with self.lock:
            return self.file_locks.setdefault(name, threading.Lock())

    def _fill(self, name: str, source: Callable[[estargz.Chunk], bytes]) -> None:
        with self._file_lock(name):
            self._fill_locked(name, source)

    def _fill_locked(
        self, name: str, source: Callable[[estargz.Chunk], bytes], *, record: bool = True
    ) -> None:
        """Fill one file (its lock held), each chunk checked before it is written.
        Without *record* the caller records it as done (after its data is durable)."""
        if name in self.done or not self.chunks.get(name):
            return
        path = os.path.join(self.layer_dir, name)
        st = os.lstat(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except PermissionError:
            # Rootless, a read-only file of the image is ours to open for writing
            # only for a moment; its mode is put back before it is served.
            os.chmod(path, (st.st_mode & 0o7777) | 0o200)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            finally:
                os.chmod(path, st.st_mode & 0o7777)
        try:
            # Each chunk is checked before it is written; the file is served
            # only once every chunk is in and it is noted as done.
            for chunk in self.chunks[name]:
                data = self.verify(source(chunk), chunk, self.label)
                written = 0
                while written < len(data):
                    written += os.pwrite(fd, data[written:], chunk.file_offset + written)
            os.fdatasync(fd)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)
        if record:
            self._record_done([name])

    def _record_done(self, names: list[str]) -> None:
        """Note files whose data is on disk; appended, so a crash loses at most
        the last notes (and those files are fetched again)."""
        with open(os.path.join(self.state, "done"), "a", encoding="utf-8",
                  errors="surrogateescape") as handle:  # fmt: skip
            handle.write("".join(json.dumps(name) + "\n" for name in names))
            handle.flush()
            os.fsync(handle.fileno())
        self.done.update(names)

    # In the background ----------------------------------------------------------

    def local_bytes(self) -> int:
        """Compressed bytes of the blob whose data is in place."""
        if self.complete:
            return self.blob.size
        return sum(c.end - c.offset for name in self.done for c in self.chunks.get(name, []))

    def run_background(self, stop: threading.Event) -> None:
        """Fetch the prefetch files, then the whole blob; check it and finish
        the layer. Waits and goes on while the registry is away."""
        while self.background and not stop.is_set() and not self.complete:
            try:
                self._prefetch()
                self.finish(stop)
            except LayerCorrupt as exc:
                # The registry serves something else than the manifest names:
                # fetching it again would not help. Reads still check each chunk.
                log.error("%s: %s; the background fetch stops", self.label, exc)
                return
            except (StrataError, OSError) as exc:
                log.warning("%s: background fetch: %s; trying again", self.label, exc)
                stop.wait(2.0)

    def _prefetch(self) -> None:
        """The files before the prefetch landmark, still missing, in one Range
        request: they lie together at the start of the blob."""
        names = [name for name in self.first if name not in self.done]
        groups: list[list[str]] = []
        span = 0
        for name in names:  # requests of at most PREFETCH_REQUEST bytes
            size = sum(c.end - c.offset for c in self.chunks[name])
            if not groups or span + size > PREFETCH_REQUEST:
                groups.append([])
                span = 0
            groups[-1].append(name)
            span += size
        for group in groups:
            chunks = [chunk for name in group for chunk in self.chunks[name]]
            start, end = min(c.offset for c in chunks), max(c.end for c in chunks)
            locks = [self._file_lock(name) for name in group]
            for lock in locks:  # a read of one of them waits for this fetch
                lock.acquire()
            try:
                data = self.fetch(self.blob.digest, start, end)
                piece = _slicer(data, start)
                for name in group:
                    self._fill_locked(name, piece, record=False)
                self._record_done([name for name in group if self.chunks.get(name)])
            finally:
                for lock in locks:
                    lock.release()

    def finish(self, stop: threading.Event | None = None) -> None:
        """The whole blob into the store, checked; every file filled from it;
        the layer's DiffID checked; then the layer is complete."""
        if not self.store.has_blob(self.blob.digest) and not self._download(stop):
            return
        with open(self.store.blob_path(self.blob.digest), "rb") as blob:

            def local(chunk: estargz.Chunk) -> bytes:
                return os.pread(blob.fileno(), chunk.end - chunk.offset, chunk.offset)

            for name in self.chunks:
                if stop is not None and stop.is_set():
                    return
                self._fill(name, local)
            blob.seek(0)
            plain = decompressed(blob)
            digest = hashlib.sha256()
            while data := plain.read(1 << 20):
                digest.update(data)
        if "sha256:" + digest.hexdigest() != self.diff_id:
            raise LayerCorrupt(f"{self.label}: the blob's content does not match the DiffID")
        with open(os.path.join(self.state, "complete"), "w") as handle:
            handle.write("complete\n")
        self.complete = True
        log.info("%s: complete and checked", self.label)

    def _download(self, stop: threading.Event | None) -> bool:
        """The blob into the store (resumable, one writer at a time across
        processes); False if stopped first."""
        with self.store.blob_lock(self.blob.digest):
            if self.store.has_blob(self.blob.digest):  # another process brought it
                return True
            writer = self.store.blob_writer(self.blob.digest, resume=True, size=self.blob.size)
            try:
                step = 4 << 20
                while writer.size < self.blob.size:
                    if stop is not None and stop.is_set():
                        writer.abort(keep=True)
                        return False
                    end = min(writer.size + step, self.blob.size)
                    writer.write(self.fetch(self.blob.digest, writer.size, end))
            except BaseException:
                writer.abort(keep=True)
                raise
            try:
                writer.commit()
            except StrataError as exc:
                raise LayerCorrupt(str(exc)) from None
        return True


RangeFetcher = Callable[[str, int, int], bytes]


def _slicer(data: bytes, start: int) -> Callable[[estargz.Chunk], bytes]:
    """A chunk's bytes out of *data*, a range of the blob from *start*."""
    return lambda chunk: data[chunk.offset - start : chunk.end - start]


def range_fetcher(store: Store, diff_id: str, options: Any | None) -> RangeFetcher:
    """Fetches ranges of the layer's blob from where it was pulled (with the
    TLS settings of that pull, unless *options* are given)."""
    from ..image.registry import RegistryClient, RegistryOptions, load_credentials

    with open(os.path.join(state_dir(store, diff_id), "source.json")) as handle:
        source = json.load(handle)
    if options is None:
        user, password = load_credentials(None, None, source["registry"])
        options = RegistryOptions(
            tls_verify=source.get("tls_verify", True),
            ca_cert=source.get("ca_cert"),
            username=user,
            password=password,
            progress=False,
        )
    # One attempt per call: ensure() and the background task retry on their own
    # clock, so a read waits no longer than its timeout.
    client = RegistryClient(source["registry"], dataclasses.replace(options, retries=0))

    def fetch(digest: str, start: int, end: int) -> bytes:
        return client.fetch_range(source["repository"], digest, start, end)

    return fetch


def open_lazy_layers(
    store: Store,
    image: Image,
    options: Any | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    background: bool = True,
) -> list[LazyLayer]:
    """The image's lazily laid out layers, complete or not."""
    return [
        LazyLayer(
            store,
            diff_id,
            range_fetcher(store, diff_id, options),
            timeout,
            background=background,
        )
        for diff_id in image.diff_ids
        if filled_in_place(store, diff_id)
    ]


# Pulling ----------------------------------------------------------------------------


def lazy_format(layer: Descriptor) -> str | None:
    """The lazily readable format a layer descriptor announces, if any."""
    if estargz.TOC_DIGEST_ANNOTATION in layer.annotations:
        return "estargz"
    if {zstdchunked.MANIFEST_POSITION, zstdchunked.MANIFEST_CHECKSUM} <= set(layer.annotations):
        return "zstd:chunked"
    return None


def _fetch_toc(
    client: Any, repository: str, layer: Descriptor, label: str
) -> tuple[str, bytes, dict[str, Any], int]:
    """The layer's table of contents, checked: (format, the bytes its
    annotated digest covers, the TOC, the offset before which chunks lie)."""
    kind = lazy_format(layer)
    if kind == "zstd:chunked":
        offset, length, plain = zstdchunked.parse_position(
            layer.annotations[zstdchunked.MANIFEST_POSITION], label
        )
        if offset + length > layer.size:
            raise StrataError(f"{label}: the manifest position lies outside the blob")
        raw = client.fetch_range(repository, layer.digest, offset, offset + length)
        checksum = layer.annotations[zstdchunked.MANIFEST_CHECKSUM]
        toc = zstdchunked.parse_manifest(
            zstdchunked.read_manifest(raw, checksum, plain, label), label
        )
        zstdchunked.file_chunks(toc, offset, label)  # refuses hostile chunk tables now
        return kind, raw, toc, offset
    annotation = layer.annotations[estargz.TOC_DIGEST_ANNOTATION]
    if layer.size <= estargz.FOOTER_SIZE:
        raise StrataError(f"{label}: too small for an eStargz layer")
    end = layer.size - estargz.FOOTER_SIZE
    toc_offset = estargz.parse_footer(
        client.fetch_range(repository, layer.digest, end, layer.size), label
    )
    if not 0 <= toc_offset < end or end - toc_offset > estargz.TOC_LIMIT:
        raise StrataError(f"{label}: the footer's TOC offset lies outside the blob")
    raw = estargz.toc_bytes(client.fetch_range(repository, layer.digest, toc_offset, end), label)
    toc = estargz.parse_toc(raw, annotation, label)
    estargz.file_chunks(toc, toc_offset, label)  # refuses hostile chunk tables now
    return "estargz", raw, toc, toc_offset


def lay_out(store: Store, client: Any, repository: str, layer: Descriptor, diff_id: str) -> None:
    """Fetch a layer's table of contents, check it, and lay its tree out."""
    label = f"layer {layer.digest[:19]}"
    kind, raw, toc, toc_offset = _fetch_toc(client, repository, layer, label)
    members = toc_members(toc, label)
    hex_id = diff_id[len("sha256:") :]
    tree = os.path.join(store.tmp, f"lazy-tree-{hex_id}")
    state = os.path.join(store.tmp, f"lazy-state-{hex_id}")
    for leftover in (tree, state):
        if os.path.lexists(leftover):
            shutil.rmtree(leftover)
    try:
        os.mkdir(tree, 0o755)
        unpack_skeleton(members, tree, label=label)
        os.mkdir(state, 0o700)
        with open(os.path.join(state, "toc.json"), "wb") as handle:
            handle.write(raw)  # its own bytes: their digest is what the descriptor names
        with open(os.path.join(state, "source.json"), "w") as handle:
            json.dump(
                {
                    "registry": client.host,
                    "repository": repository,
                    "blob": layer.to_json(),
                    "format": kind,
                    "toc_offset": toc_offset,
                    "tls_verify": client.options.tls_verify,
                    "ca_cert": client.options.ca_cert,
                },
                handle,
            )
        os.makedirs(os.path.dirname(state_dir(store, diff_id)), exist_ok=True)
        # The state first: a layer directory without it would pass for complete.
        os.rename(state, state_dir(store, diff_id))
        os.rename(tree, store.layer_path(diff_id))
    except BaseException:
        shutil.rmtree(tree, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
        raise


def pull_lazy(
    store: Store,
    reference: Reference,
    options: Any,
    note: Callable[[str], None],
    *,
    stream: bool = False,
) -> Image:
    """Record an image whose eStargz layers are laid out from their TOCs; any
    other layer is pulled whole, except with *stream* the plain layers at the
    top of the image that are not stored yet: a mount streams those in."""
    from ..image.registry import ProgressLine, open_manifest

    client, data, digest = open_manifest(reference, options)
    _, config, layers = parse_manifest(data, digest)
    progress = ProgressLine(False, "")
    client.fetch_blob(store, reference.repository, config, progress)
    _, diff_ids = parse_config(store.read_blob(config.digest), config.digest, len(layers))
    lazy = 0
    streamed = len(layers)
    if stream:
        while streamed > 0 and not os.path.isdir(store.layer_path(diff_ids[streamed - 1])):
            if lazy_format(layers[streamed - 1]) is not None:
                break
            streamed -= 1
    for position, (layer, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
        if os.path.isdir(store.layer_path(diff_id)) or position >= streamed:
            continue
        if lazy_format(layer) is not None:
            lay_out(store, client, reference.repository, layer, diff_id)
            lazy += 1
        else:
            client.fetch_blob(store, reference.repository, layer, progress)
            store.unpack(layer, diff_id)
    store.note_sources([config.digest, *(layer.digest for layer in layers)],
                       reference.registry, reference.repository)  # fmt: skip
    if lazy:
        note(f"{lazy} of {len(layers)} layers laid out from their TOCs; data comes on demand")
    name = reference.name if not reference.digest else f"{reference.repo}@{digest}"
    return store.add_image(data, [name], note, coming=len(layers) - streamed)


def local_fraction(store: Store, image: Image) -> float:
    """How much of the image's compressed size is in the store."""
    total = local = 0
    for layer, diff_id in zip(image.layers, image.diff_ids, strict=True):
        total += layer.size
        if is_incomplete(store, diff_id):
            local += LazyLayer(store, diff_id, _no_fetch, 0).local_bytes()
        elif not os.path.isdir(store.layer_path(diff_id)):
            continue  # still to stream in (a mount is, or one ended early)
        else:
            local += layer.size
    return local / total if total else 1.0


def finish_from_store(store: Store, diff_id: str) -> None:
    """Complete a layer pulled lazily before whose blob is now in the store."""
    if is_incomplete(store, diff_id):
        LazyLayer(store, diff_id, _no_fetch, 0).finish()


def complete_layers(store: Store, image: Image, options: Any | None = None) -> None:
    """Fetch what is missing of the image's lazy layers and check them: after
    this the image is an ordinary stored image (push, export)."""
    for layer in open_lazy_layers(store, image, options):
        if not layer.complete:
            layer.finish()


def _no_fetch(digest: str, start: int, end: int) -> bytes:
    raise StrataError("nothing is fetched here")
