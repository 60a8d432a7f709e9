"""The LMDB index: merged directory listings, chains of layers, counters.

Tables (LMDB named databases):
  meta     counters and the format version
  dents    (listing id, name hash) -> the entries of that name bucket
  chains   chain id -> root entry of the merged view of that chain
  layers   layer identity -> layer number; b"#" + number -> layer path
  aliases  inode number -> every layer path of a hardlinked file

Listings are immutable once written: a chain that adds a layer writes new
listings only for the directories that layer contains and shares every other
listing with the chain below it (path copying). Keys are 16 bytes whatever the
depth or the name length, far below LMDB's 511-byte limit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Iterator

import lmdb
import xxhash

from ..errors import StrataError
from .data import NOT_SUPPORTED
from .records import Entry, pack_entry, pack_group, unpack_entry, unpack_group
from .syscalls import fallocate

FORMAT = b"strata-index-3"
ROOT_INO = 1

_KEY = struct.Struct(">QQ")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
# Name hashes are 55 bits so that a readdir offset (hash << 8 | position in the
# bucket) fits a signed 64-bit off_t; 0 is never a hash so offsets 1 and 2 stay
# free for "." and "..".
HASH_BITS = 55


# LMDB's lock file for 512 readers (a 128-byte header, 64 bytes a reader)
# is 32,896 bytes; whole pages of it, with room to spare.
_LOCK_FILE_SIZE = 40960

# Bucket 0 of a listing holds its summary (the number of subdirectories).
_SUMMARY = 0


def name_hash(name: bytes) -> int:
    return (xxhash.xxh3_64_intdigest(name) >> (64 - HASH_BITS)) or 1


def dent_key(listing: int, hashed: int) -> bytes:
    return _KEY.pack(listing, hashed)


def _back_lock_file(path: str) -> None:
    """Give LMDB's lock file (its reader table, which it maps and writes
    through the mapping) real blocks for every page. LMDB makes it sparse:
    a page first touched on a full disk would kill the process with SIGBUS
    (a daemon whose new reader slot lands on a new page, or any command
    opening a new store), where fallocate fails here with ENOSPC. Larger
    than LMDB asks for 512 readers, so its size never changes after this."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        st = os.fstat(fd)
        size = max(st.st_size, _LOCK_FILE_SIZE)
        if st.st_blocks * 512 < size:
            try:
                # Not glibc's posix_fallocate: where the filesystem cannot
                # allocate, it writes zeros, over reader slots in use.
                fallocate(fd, 0, 0, size)
            except OSError as exc:
                # A lock file an older strata left sparse, on a disk now
                # full: its first page (the header and the first 62 readers)
                # is there, so it opens as it did before.
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT) and st.st_blocks > 0
                if exc.errno not in NOT_SUPPORTED and not full:
                    raise
    finally:
        os.close(fd)


def _nearly_full(path: str) -> bool:
    """Whether the filesystem of *path* has less room than one of LMDB's
    writes takes (it writes up to 64 pages at once)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bfree * st.f_frsize < 1 << 20


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class Index:
    """An LMDB environment shared by every mount that uses the same store."""

    def __init__(self, path: str, *, map_size: int = 1 << 38) -> None:
        self.path = path
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            _back_lock_file(os.path.join(path, "lock.mdb"))
            self.env = lmdb.open(path, map_size=map_size, max_dbs=8, max_readers=512, meminit=False)
        except (OSError, lmdb.Error) as exc:
            raise StrataError(f"cannot open the index at {path}: {_reason(exc)}") from exc
        try:
            # Naming a table the first time writes too.
            self.meta = self.env.open_db(b"meta")
            self.dents = self.env.open_db(b"dents")
            self.chains = self.env.open_db(b"chains")
            self.layers = self.env.open_db(b"layers")
            self.aliases = self.env.open_db(b"aliases")
            with self.write() as txn:
                stored = txn.get(b"format", db=self.meta)
                if stored is None:
                    txn.put(b"format", FORMAT, db=self.meta)
        except (OSError, lmdb.Error) as exc:
            self.env.close()
            raise StrataError(f"cannot open the index at {path}: {_reason(exc)}") from exc
        if stored is not None and bytes(stored) != FORMAT:
            self.env.close()
            raise StrataError(
                f"the index at {path} has format {bytes(stored).decode(errors='replace')},"
                f" this strata reads {FORMAT.decode()}; remove it to rebuild"
            )

    def close(self) -> None:
        self.env.close()

    def store_id(self) -> bytes:
        """8 random bytes naming this index; upper files carry it with their st_ino."""
        with self.env.begin() as txn:
            found = txn.get(b"store_id", db=self.meta)
        if found is not None:
            return bytes(found)
        with self.write() as txn:
            won = txn.get(b"store_id", db=self.meta)  # another process may have won
            if won is not None:
                return bytes(won)
            made = os.urandom(8)
            txn.put(b"store_id", made, db=self.meta)
        return made

    def read(self) -> lmdb.Transaction:
        return self.env.begin(buffers=True)

    @contextlib.contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """A write transaction, committed when the block ends. A disk error
        (a full disk above all: the index lives beside UPPER) comes as the
        OSError any other write there gives, so a request fails with ENOSPC
        and a command says so in one line, not EIO and a traceback."""
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.Error as exc:
            code = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else 0
            code = code if code > 0 else errno.EIO  # else one of LMDB's own codes
            if code == errno.EIO and _nearly_full(self.path):
                code = errno.ENOSPC  # LMDB's word for a short write: the disk filled
            raise OSError(code, os.strerror(code), self.path) from exc

    # Counters -------------------------------------------------------------

    def counter(self, txn: lmdb.Transaction, name: bytes) -> int:
        """The next free number of a counter; numbers are never handed out twice."""
        raw = txn.get(name, db=self.meta)
        # 1 is the root's inode number in every chain.
        return _U64.unpack(bytes(raw))[0] if raw is not None else ROOT_INO + 1

    def set_counter(self, txn: lmdb.Transaction, name: bytes, value: int) -> None:
        txn.put(name, _U64.pack(value), db=self.meta)

    def allocate(self, txn: lmdb.Transaction, name: bytes, count: int = 1) -> int:
        first = self.counter(txn, name)
        self.set_counter(txn, name, first + count)
        return first

    # Layers ---------------------------------------------------------------

    def layer_number(self, txn: lmdb.Transaction, identity: bytes) -> int | None:
        raw = txn.get(identity, db=self.layers)
        return None if raw is None else _U32.unpack(bytes(raw))[0]

    def add_layer(self, txn: lmdb.Transaction, identity: bytes, path: bytes) -> int:
        number = self.allocate(txn, b"next_layer")
        txn.put(identity, _U32.pack(number), db=self.layers)
        txn.put(b"#" + _U32.pack(number), path, db=self.layers)
        return number

    def put_aliases(self, txn: lmdb.Transaction, ino: int, paths: list[bytes]) -> None:
        txn.put(_U64.pack(ino), b"\0".join(paths), db=self.aliases)

    def aliases_of(self, txn: lmdb.Transaction, ino: int) -> list[bytes]:
        raw = txn.get(_U64.pack(ino), db=self.aliases)
        return [] if raw is None else bytes(raw).split(b"\0")

    # Chains ---------------------------------------------------------------

    def chain_root(self, txn: lmdb.Transaction, chain_id: bytes) -> Entry | None:
        raw = txn.get(chain_id, db=self.chains)
        return None if raw is None else unpack_entry(raw)[0]

    def put_chain(self, txn: lmdb.Transaction, chain_id: bytes, root: Entry) -> None:
        txn.put(chain_id, pack_entry(root), db=self.chains)

    # Listings -------------------------------------------------------------

    def lookup(self, txn: lmdb.Transaction, listing: int, name: bytes) -> Entry | None:
        raw = txn.get(dent_key(listing, name_hash(name)), db=self.dents)
        if raw is None:
            return None
        for found, entry in unpack_group(raw):
            if found == name:
                return entry
        return None

    def lookup_path(self, txn: lmdb.Transaction, root: Entry, path: bytes) -> Entry | None:
        """Resolve a slash-separated *path* from the directory *root*."""
        entry: Entry | None = root
        for part in path.split(b"/"):
            if not part:
                continue
            if entry is None or not entry.is_dir:
                return None
            entry = self.lookup(txn, entry.listing, part)
        return entry

    def _raw(
        self, txn: lmdb.Transaction, listing: int, from_hash: int
    ) -> Iterator[tuple[int, bytes | memoryview]]:
        prefix = _U64.pack(listing)
        with txn.cursor(db=self.dents) as cursor:
            if not cursor.set_range(dent_key(listing, max(from_hash, 1))):
                return
            for key, value in cursor:
                if bytes(key[:8]) != prefix:
                    return
                yield _KEY.unpack(bytes(key))[1], value

    def scan(
        self, txn: lmdb.Transaction, listing: int, from_hash: int = 0
    ) -> Iterator[tuple[int, list[tuple[bytes, Entry]]]]:
        """Yield (hash, bucket) of a listing in hash order, from *from_hash* on."""
        for hashed, value in self._raw(txn, listing, from_hash):
            yield hashed, unpack_group(value)

    def load_buckets(self, txn: lmdb.Transaction, listing: int) -> dict[int, bytes]:
        """A listing's buckets, still encoded: merging copies most of them as they are."""
        return {hashed: bytes(value) for hashed, value in self._raw(txn, listing, 1)}

    def subdirectories(self, txn: lmdb.Transaction, listing: int) -> int:
        raw = txn.get(dent_key(listing, _SUMMARY), db=self.dents)
        return 0 if raw is None else _U64.unpack(bytes(raw))[0]

    def write_listing(
        self,
        txn: lmdb.Transaction,
        encoded: dict[int, bytes],
        decoded: dict[int, list[tuple[bytes, Entry]]],
        subdirectories: int,
    ) -> int:
        """Store a new listing from encoded and decoded buckets; return its id."""
        listing = self.allocate(txn, b"next_listing")
        items = [(dent_key(listing, _SUMMARY), _U64.pack(subdirectories))]
        items += [(dent_key(listing, hashed), value) for hashed, value in encoded.items()]
        items += [
            (dent_key(listing, hashed), pack_group(group))
            for hashed, group in decoded.items()
            if group
        ]
        items.sort()
        with txn.cursor(db=self.dents) as cursor:
            cursor.putmulti(items, append=True)
        return listing


class InodeBatches:
    """Inode numbers no inode of this store ever had, reserved from the
    index in batches (one write per batch, not per number). Each user keeps
    its own: an instance is not shared between threads."""

    BATCH = 1024

    def __init__(self, index: Index) -> None:
        self.index = index
        self._next = self._last = 0

    def allocate(self) -> int:
        if self._next >= self._last:
            with self.index.write() as txn:
                self._next = self.index.allocate(txn, b"next_ino", self.BATCH)
            self._last = self._next + self.BATCH
        ino = self._next
        self._next += 1
        return ino
