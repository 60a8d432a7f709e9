"""A stack of layers and its chain identity, indexed on first use.

Chain ids follow OCI's ChainID idea: chain(L0) = H(L0), chain(L0..n) =
H(chain(L0..n-1) + Ln), where a directory layer's identity hashes its path and
its fingerprint. A stack whose lower part was indexed before only merges the
layers above that part.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import xxhash

from ..errors import StrataError
from .index import Index
from .layer import fingerprint, layer_identity
from .merge import LayerMerger, Presets
from .records import Entry

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class IndexedStack:
    """The result of preparing a stack: its merged root and its layers."""

    chain_id: bytes
    root: Entry
    # Layer paths by the layer numbers that entries refer to.
    layers: dict[int, str]
    # Layers merged by this call (0 when the whole chain was in the index).
    merged_layers: int
    merged_files: int
    seconds: float


def check_layer_dir(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise StrataError(f"layer {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise StrataError(f"layer {path} is not a directory")
    return os.path.realpath(path)


def chain_ids(identities: Sequence[bytes]) -> list[bytes]:
    ids: list[bytes] = []
    for identity in identities:
        previous = ids[-1] if ids else b"strata-chain"
        ids.append(xxhash.xxh3_128_digest(previous + b"\0" + identity))
    return ids


def _fingerprints(paths: Sequence[bytes]) -> list[bytes]:
    def one(path: bytes) -> bytes:
        try:
            return fingerprint(path)
        except OSError as exc:
            raise StrataError(
                f"cannot read layer {os.fsdecode(path)}: {exc.strerror}"
                f" ({os.fsdecode(exc.filename or path)})"
            ) from exc

    if len(paths) == 1:
        return [one(paths[0])]
    # lstat releases the GIL: walking layers side by side uses both cores.
    with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:
        return list(pool.map(one, paths))


def layer_numbers(index: Index, paths: Sequence[str], known_ids: Sequence[bytes]) -> list[int]:
    """The index's numbers of stored layers (by DiffID) that are still to
    arrive at *paths*; prepare_stack keeps them when it indexes the layers."""
    numbers = []
    with index.write() as txn:
        for path, known in zip(paths, known_ids, strict=True):
            identity = layer_identity(b"known", known)
            number = index.layer_number(txn, identity)
            if number is None:
                number = index.add_layer(txn, identity, os.fsencode(os.path.abspath(path)))
            numbers.append(number)
    return numbers


def prepare_stack(
    index: Index,
    layer_paths: Sequence[str],
    progress: Progress | None = None,
    known_ids: Sequence[bytes] | None = None,
    presets: Presets | None = None,
) -> IndexedStack:
    """Find or build the merged view of *layer_paths* (lowest layer first).

    *known_ids* names layers that never change (an image store's, by DiffID),
    which spares the walk that fingerprints a layer directory. *presets*
    are inode numbers a mount showed while some layers streamed in.
    """
    if not layer_paths:
        raise StrataError("no layers given")
    started = time.monotonic()
    real = [os.fsencode(check_layer_dir(path)) for path in layer_paths]
    if known_ids is not None:
        if len(known_ids) != len(real):
            raise ValueError("one known id per layer")
        identities = [layer_identity(b"known", known) for known in known_ids]
    else:
        digests = _fingerprints(real)
        identities = [
            layer_identity(path, digest) for path, digest in zip(real, digests, strict=True)
        ]
    chains = chain_ids(identities)
    numbers: dict[int, str] = {}
    merged_layers = merged_files = 0
    root: Entry | None = None
    with index.read() as txn:
        known = [index.layer_number(txn, identity) for identity in identities]
        top = len(chains)  # the longest prefix of the stack already indexed
        while top > 0 and root is None:
            root = index.chain_root(txn, chains[top - 1])
            if root is None:
                top -= 1
    for position in range(top):
        number = known[position]
        assert number is not None, "a chain in the index implies its layers are too"
        numbers[number] = os.fsdecode(real[position])
    for position in range(top, len(chains)):
        if progress is not None:
            progress(f"indexing layer {position + 1}/{len(chains)}: {os.fsdecode(real[position])}")
        with index.write() as txn:
            found = index.chain_root(txn, chains[position])  # another process may have won
            number = index.layer_number(txn, identities[position])
            if number is None:
                number = index.add_layer(txn, identities[position], real[position])
            if found is None:
                merger = LayerMerger(index, txn, real[position], number, presets)
                try:
                    found = merger.merge(root)
                except OSError as exc:
                    raise StrataError(
                        f"cannot index layer {os.fsdecode(real[position])}: {exc.strerror}"
                        f" ({os.fsdecode(exc.filename or b'')})"
                    ) from exc
                index.put_chain(txn, chains[position], found)
                merged_layers += 1
                merged_files += merger.files
        root = found
        numbers[number] = os.fsdecode(real[position])
    assert root is not None
    return IndexedStack(
        chain_id=chains[-1],
        root=root,
        layers=numbers,
        merged_layers=merged_layers,
        merged_files=merged_files,
        seconds=time.monotonic() - started,
    )
