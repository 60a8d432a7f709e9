"""Plain layers streamed into a mount that already serves (`mount --lazy`).

A layer with no table of contents (plain gzip, zstd, uncompressed) names its
files only as its stream passes. Its blob downloads as a pull would (resumable,
digest checked); meanwhile the part already here is unpacked, and each entry
is handed to the mount the moment it is whole, so lookups of names already
unpacked are answered before the pull ends. The layer is stored only once its
DiffID and blob digest check out; until then what was served came from an
unfinished, unverified stream (README, "Lazy pulling").
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import StrataError
from ..image.registry import ProgressLine, RegistryAway
from ..image.store import Descriptor, Store

log = logging.getLogger(__name__)

_POLL = 0.05  # seconds between looks at a download that has stalled


class _Arrivals(ProgressLine):
    """Told of every chunk the download writes: wakes the reader."""

    def __init__(self, progress: Callable[[], None] | None = None) -> None:
        super().__init__(False, "")
        self.arrived = threading.Condition()
        self.progress = progress  # told when bytes arrive

    def advance(self, count: int, finished: bool = False) -> None:
        with self.arrived:
            self.arrived.notify_all()
        if count > 0 and self.progress is not None:
            self.progress()


class GrowingBlob(io.RawIOBase):
    """Reads a blob's partial file while its download still appends to it."""

    def __init__(
        self,
        path: str,
        size: int,
        arrivals: _Arrivals,
        download: threading.Thread,
        errors: list[BaseException],
        stop: threading.Event,
    ) -> None:
        self.path = path
        self.size = size
        self.arrivals = arrivals
        self.download = download
        self.errors = errors
        self.stop = stop
        self.fd: int | None = None
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # within what has arrived: the magic is read, then read again

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self.position
        elif whence != io.SEEK_SET:
            raise OSError("a growing blob has no end to seek from yet")
        self.position = offset
        return offset

    def tell(self) -> int:
        return self.position

    def _open(self) -> int | None:
        if self.fd is not None:
            return self.fd
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return self.fd

    def _replaced(self) -> bool:
        """Whether the download started its partial file over (a server that
        ignored a Range): the same bytes come again in a new file."""
        if self.fd is None:
            return False
        try:
            now = os.stat(self.path).st_ino
        except FileNotFoundError:
            return False  # stored under its digest: the file we read is it
        if now == os.fstat(self.fd).st_ino:
            return False
        os.close(self.fd)
        self.fd = None
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            if self.stop.is_set():
                raise StrataError("the mount ended")
            if self.position >= self.size:
                return 0
            finished = not self.download.is_alive()  # looked at before the read
            fd = self._open()
            if fd is not None:
                data = os.pread(fd, min(len(view), self.size - self.position), self.position)
                if data:
                    view[: len(data)] = data
                    self.position += len(data)
                    return len(data)
            if self._replaced():
                continue
            if finished:
                if self.errors:
                    raise self.errors[0]
                raise StrataError(f"the download ended at {self.position} of {self.size} bytes")
            with self.arrivals.arrived:
                self.arrivals.arrived.wait(_POLL)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        super().close()


class LayerBusy(StrataError):
    """Another command unpacks a layer this mount would stream."""


@dataclass(frozen=True, slots=True)
class StreamedLayer:
    """A layer of the image to stream in: where it unpacks, where it ends up."""

    blob: Descriptor
    diff_id: str
    work_dir: str
    layer_dir: str


class LayerStream:
    """The plain layers of one image, streamed top first into a mount."""

    def __init__(
        self,
        store: Store,
        client: Any,
        repository: str,
        layers: list[StreamedLayer],
        timeout: float,
    ) -> None:
        self.store = store
        # How long a lookup waits for a stream that brings nothing (EIO then).
        self.timeout = timeout
        self.client = client
        self.repository = repository
        self.layers = layers  # lowest first, as the image lists them
        # Each layer's lock, held from here until it is stored (by the mount's
        # daemon, which inherits these descriptors): no other command unpacks
        # it, or prunes its work directory, meanwhile.
        self.locks: list[int] = []
        for layer in layers:
            fd = store.try_lock(layer.diff_id[len("sha256:") :])
            if fd is None:
                self.release()
                raise LayerBusy(f"layer {layer.diff_id} is being unpacked by another command")
            self.locks.append(fd)
        for layer in layers:
            # Empty now, so the mount can open it; filled by run().
            if os.path.lexists(layer.work_dir):
                shutil.rmtree(layer.work_dir)
            os.mkdir(layer.work_dir, 0o755)

    def release(self) -> None:
        for fd in self.locks:
            os.close(fd)
        self.locks.clear()

    def run(
        self,
        record: Callable[[int, bytes, int], None],
        finish: Callable[[int], None],
        fail: Callable[[str], None],
        progress: Callable[[], None],
        stop: threading.Event,
    ) -> None:
        """Stream every layer, the top one first (it decides the most lookups
        and is usually the smallest). *record* (position, path, mtime_ns) hears
        of each entry once it is whole; *finish* of each layer that is stored."""
        try:
            for position in reversed(range(len(self.layers))):
                self._one(self.layers[position], position, record, progress, stop)
                finish(position)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if not stop.is_set():
                log.error("streaming a layer failed: %s", reason)
            fail(reason)
            for layer in self.layers:  # what never arrived leaves nothing behind
                shutil.rmtree(layer.work_dir, ignore_errors=True)
        finally:
            self.release()

    def _one(
        self,
        layer: StreamedLayer,
        position: int,
        record: Callable[[int, bytes, int], None],
        progress: Callable[[], None],
        stop: threading.Event,
    ) -> None:
        store, blob = self.store, layer.blob
        arrivals = _Arrivals(progress)
        errors: list[BaseException] = []

        def download() -> None:
            # A registry that goes away is tried again until the mount ends:
            # lookups that wait meanwhile fail after the mount's timeout.
            delay, said = 0.5, False
            while True:
                try:
                    self.client.fetch_blob(store, self.repository, blob, arrivals)
                    return
                except RegistryAway as exc:
                    if not said:
                        log.warning("%s; trying again until it answers", exc)
                        said = True
                    if stop.wait(delay):
                        errors.append(exc)
                        return
                    delay = min(delay * 2, 5.0)
                except BaseException as exc:
                    errors.append(exc)
                    return

        # A daemon: a mount that ends mid-stream leaves the partial blob for
        # the next pull to resume, instead of waiting for the download.
        fetcher = threading.Thread(
            target=download, name=f"download {blob.digest[7:19]}", daemon=True
        )
        if store.has_blob(blob.digest):
            source: io.RawIOBase = open(store.blob_path(blob.digest), "rb", buffering=0)  # noqa: SIM115
        else:
            fetcher.start()
            source = GrowingBlob(
                store.partial_path(blob.digest), blob.size, arrivals, fetcher, errors, stop
            )
        try:
            reader = io.BufferedReader(source, 1 << 20)
            store.unpack_from(
                blob,
                layer.diff_id,
                reader,
                lambda rel, mtime: record(position, rel, mtime),
                streamed=True,
            )
        finally:
            source.close()
            if fetcher.ident is not None and not stop.is_set():
                fetcher.join()
        if errors:  # the content was right (its DiffID), the blob was not
            raise errors[0]
        log.info("streamed layer %s in whole", layer.diff_id)
