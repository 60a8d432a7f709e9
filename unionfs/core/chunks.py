"""Copy-up chunk by chunk: a write into a large lower file copies only the
chunks it touches, and the rest is read from the lower file until a
background fill has copied it too.

The upper file is a metadata-only copy (sparse, full size) while partial.
Which chunks it holds is kept in an xattr on it (PREFIX.strata.chunks), set
after each chunk's data is written, so a daemon killed half-way leaves a file
the next mount reads correctly: chunks marked present from the upper file,
the others from the lower one. The space its data will take is reserved
when the copy starts (data.reserve_space), so the background fill cannot be the
first to find the disk full.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterator

from .data import data_segments, data_written_unseen, write_all

CHUNK = 1 << 20
# Smaller files are copied whole at the first write: that costs about as much
# as copying a chunk, and leaves nothing partial behind.
CHUNKED_MIN = 4 * CHUNK
_HEADER = struct.Struct("<IQ")  # chunk size, lower size


class PartialCopy:
    """The copy-up of one lower file in progress. Thread-safe: chunk copies,
    writes and reads run in worker threads; one lock orders them, so a chunk
    is copied once and never over data written after it."""

    def __init__(
        self,
        lower_fd: int,
        upper_fd: int,
        size: int,
        present: bytearray,
        save: Callable[[bytes], None],
        chunk: int = CHUNK,
    ) -> None:
        self.lower_fd = lower_fd
        self.upper_fd = upper_fd
        self.size = size  # the lower file's: chunks beyond it have nothing to copy
        self.chunk = chunk
        self.present = present
        self._save = save
        self.lock = threading.Lock()
        self.closed = False
        self.copied = 0  # chunks this copy has filled (a count for tests)

    @staticmethod
    def encode(chunk: int, size: int, present: bytes) -> bytes:
        return _HEADER.pack(chunk, size) + present

    @staticmethod
    def decode(raw: bytes) -> tuple[int, int, bytearray] | None:
        """(chunk size, lower size, bitmap), or None if *raw* is not a chunk map."""
        if len(raw) < _HEADER.size:
            return None
        chunk, size = _HEADER.unpack_from(raw)
        present = bytearray(raw[_HEADER.size :])
        if chunk <= 0 or len(present) != _bitmap_bytes(size, chunk):
            return None
        return chunk, size, present

    @classmethod
    def empty_map(cls, size: int, chunk: int = CHUNK) -> bytes:
        return cls.encode(chunk, size, bytes(_bitmap_bytes(size, chunk)))

    @property
    def chunks(self) -> int:
        return (self.size + self.chunk - 1) // self.chunk

    def has(self, index: int) -> bool:
        return index >= self.chunks or bool(self.present[index >> 3] & (1 << (index & 7)))

    def missing(self) -> Iterator[int]:
        return (index for index in range(self.chunks) if not self.has(index))

    def _fill(self, index: int) -> None:
        """Copy chunk *index* from the lower file (lock held)."""
        start = index * self.chunk
        end = min(start + self.chunk, self.size)
        # Only the lower file's data: its holes stay holes, outside the space
        # reserved for the copy (data.reserve_space).
        with data_written_unseen(self.upper_fd):
            for offset, stop in data_segments(self.lower_fd, start, end):
                while offset < stop:
                    data = os.pread(self.lower_fd, stop - offset, offset)
                    if not data:
                        break  # the lower file is shorter than indexed: the rest stays a hole
                    write_all(self.upper_fd, data, offset)
                    offset += len(data)
        self.present[index >> 3] |= 1 << (index & 7)
        self._save(self.encode(self.chunk, self.size, bytes(self.present)))
        self.copied += 1

    def _ensure(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first, last = offset // self.chunk, (offset + length - 1) // self.chunk
        for index in range(first, min(last + 1, self.chunks)):
            if not self.has(index):
                self._fill(index)

    def write(self, offset: int, data: bytes) -> int | None:
        """Write through, the chunks touched copied first; None once the copy
        is complete or dropped (write to the file itself then). Blocking."""
        with self.lock:
            if self.closed:
                return None
            self._ensure(offset, len(data))
            return os.pwrite(self.upper_fd, data, offset)

    def read(self, offset: int, size: int) -> bytes | None:
        """Each chunk from where its data is now; None once the copy is
        complete or dropped (read the file itself then). Blocking."""
        with self.lock:
            if self.closed:
                return None
            end = min(offset + size, os.fstat(self.upper_fd).st_size)
            parts = []
            while offset < end:
                index = offset // self.chunk
                stop = min(end, (index + 1) * self.chunk)
                if self.has(index):
                    data = os.pread(self.upper_fd, stop - offset, offset)
                else:
                    data = os.pread(self.lower_fd, stop - offset, offset)
                    data += bytes(stop - offset - len(data))  # past the lower data: a hole
                parts.append(data)
                offset = stop
            return b"".join(parts)

    def fill_next(self) -> bool:
        """Copy one missing chunk; False once none is left (or the copy was
        dropped). Blocking; the lock is taken per chunk, so writes interleave."""
        with self.lock:
            if self.closed:
                return False
            index = next(self.missing(), None)
            if index is None:
                return False
            self._fill(index)
            return True

    @property
    def complete(self) -> bool:
        return next(self.missing(), None) is None

    def close(self) -> None:
        """Stop: no chunk is copied after this returns."""
        with self.lock:
            if not self.closed:
                self.closed = True
                os.close(self.lower_fd)
                os.close(self.upper_fd)


def _bitmap_bytes(size: int, chunk: int) -> int:
    chunks = (size + chunk - 1) // chunk
    return (chunks + 7) // 8
