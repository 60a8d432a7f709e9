"""A container's changes, read from its writable layer: `diff` lines and the
layer `commit` writes.

Only what UPPER holds is visited (its entries, whiteouts and opaque marks);
the merged view is asked for attributes and data, so metadata-only copies get
their lower data and a renamed directory (a redirect) is written whole at its
new path. Nothing walks the image's unchanged tree.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import stat
import tarfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..core.index import ROOT_INO, Index
from ..core.layer import OPAQUE_MARKER, WHITEOUT_PREFIX
from ..core.nodes import FsError, Node
from ..core.reading import LazyData
from ..core.stack import prepare_stack
from ..core.upper import UpperStore, join, probe_format
from ..core.view import UnionView
from ..errors import StrataError
from .layertar import LayerWriter, tar_info
from .store import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Image,
    Store,
)


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # "A" added, "C" changed, "D" deleted, "O" opaque mark, as in a layer
    path: bytes
    node: Node | None = None  # the merged view's node (A and C)


@contextlib.contextmanager
def container_view(
    store: Store, record: dict[str, Any], lazy: Mapping[str, LazyData] | None = None
) -> Iterator[UnionView]:
    """A read-only look at a container through the core (mounted or not);
    *lazy* are its image's layers whose data comes on demand, by directory
    (lazy/layers.py's open_lazy_layers)."""
    image = store.load_image(record["manifest"])
    paths = [store.layer_path(diff_id) for diff_id in image.diff_ids]
    directory = store.container_dir(record["name"])
    upper = os.path.join(directory, "upper")
    work = os.path.join(directory, "work")
    index = Index(store.index_path)
    try:
        stack = prepare_stack(
            index, paths, known_ids=[store.layer_known_id(diff_id) for diff_id in image.diff_ids]
        )
        fmt = probe_format(os.fsencode(work))
        view = UnionView(
            index,
            stack.root,
            stack.layers,
            UpperStore(upper, work, fmt, index.store_id()),
            lazy=lazy,
        )
        try:
            yield view
        finally:
            view.close()
    finally:
        index.close()


def changes(view: UnionView) -> Iterator[Change]:
    """The container's changes in layer order: parents first, names sorted."""
    assert view.store is not None
    root = view.node(ROOT_INO)
    now, before = view.attributes(root), view.lower_root
    if (now.mode, now.uid, now.gid, now.mtime_ns // 10**9) != (
        before.mode, before.uid, before.gid, before.mtime_ns // 10**9
    ):  # fmt: skip
        yield Change("C", b"", root)
    yield from _upper_dir(view, root, b"")


def _upper_dir(view: UnionView, directory: Node, rel: bytes) -> Iterator[Change]:
    store = view.store
    assert store is not None
    listing = store.read_dir(rel)
    items: list[tuple[bytes, str, bytes]] = []
    has_lower = directory.lower is not None and not directory.opaque
    if listing.opaque and rel:
        items.append((OPAQUE_MARKER, "opaque", b""))
    if has_lower:
        for name in listing.whiteouts:
            if view.lower_entry(directory, name) is not None:
                items.append((WHITEOUT_PREFIX + name, "whiteout", name))
    items.extend((name, "entry", name) for name in listing.entries)
    items.sort()
    for _, what, name in items:
        child_rel = join(rel, name)
        if what == "opaque":
            yield Change("O", rel)
            continue
        if what == "whiteout":
            yield Change("D", child_rel)
            continue
        node = view.lookup(directory.ino, name)
        if node is None:  # changed under us (a mounted container)
            continue
        existed = has_lower and view.lower_entry(directory, name) is not None
        redirected = node.is_dir and store.redirect(child_rel) is not None
        yield Change("C" if existed and not redirected else "A", child_rel, node)
        if node.is_dir:
            if redirected:
                yield Change("O", child_rel)
                yield from _merged_dir(view, node, child_rel)
            else:
                yield from _upper_dir(view, node, child_rel)


def _merged_dir(view: UnionView, directory: Node, rel: bytes) -> Iterator[Change]:
    """Everything a renamed directory shows: it is new at its path."""
    children = sorted(
        (name, node) for _, name, node in view.listdir(directory.ino) if name not in (b".", b"..")
    )
    for name, node in children:
        view.remember(node)  # reachable by number, as after a lookup
        child_rel = join(rel, name)
        yield Change("A", child_rel, node)
        if node.is_dir:
            yield from _merged_dir(view, node, child_rel)


def diff_lines(view: UnionView) -> list[str]:
    """`docker diff` lines, sorted by path."""
    found = [
        (change.path, change.kind)
        for change in changes(view)
        if change.kind in ("A", "C", "D") and change.path
    ]
    return [f"{kind} /{os.fsdecode(path)}" for path, kind in sorted(found)]


@dataclass(frozen=True, slots=True)
class CommitResult:
    image: Image
    layer_digest: str
    layer_size: int


def parse_timestamp(text: str) -> int:
    """Seconds since the epoch, given as a number or as RFC 3339 (UTC)."""
    if text.isdigit():
        return int(text)
    import datetime

    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise StrataError(f"--timestamp {text!r}: give seconds since 1970 or RFC 3339") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp())


def _rfc3339(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def write_layer(view: UnionView, writer: LayerWriter, clamp: int | None) -> int:
    """Write the container's changes as layer entries; returns how many."""
    first_path: dict[int, str] = {}
    count = 0
    for change in changes(view):
        name = os.fsdecode(change.path) or "."
        count += 1
        if change.kind == "D":
            parent, _, base = name.rpartition("/")
            info = tar_info(
                f"{parent}/.wh.{base}" if parent else f".wh.{base}",
                kind=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=clamp or 0,
            )  # fmt: skip
            writer.add(info)
            continue
        if change.kind == "O":
            marker = os.fsdecode(OPAQUE_MARKER)
            info = tar_info(
                f"{name}/{marker}" if name else marker,
                kind=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=clamp or 0,
            )  # fmt: skip
            writer.add(info)
            continue
        node = change.node
        assert node is not None
        attrs = view.attributes(node)
        mtime = attrs.mtime_ns // 1_000_000_000
        if clamp is not None:
            mtime = min(mtime, clamp)
        mode = attrs.mode
        xattrs = [(key, view.getxattr(node.ino, key)) for key in sorted(view.listxattr(node.ino))]
        info = tar_info(name, kind=tarfile.REGTYPE, mode=mode, uid=attrs.uid, gid=attrs.gid,
                        mtime=mtime)  # fmt: skip
        if stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
            writer.add(info, xattrs=xattrs)
        elif stat.S_ISREG(mode):
            if attrs.nlink > 1 and node.ino in first_path:
                info.type = tarfile.LNKTYPE
                info.linkname = first_path[node.ino]
                writer.add(info)
                continue
            first_path[node.ino] = name
            fd = view.open_data(node.ino)
            with os.fdopen(fd, "rb") as data:
                info.size = os.fstat(fd).st_size
                writer.add(info, data, xattrs=xattrs)
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.fsdecode(view.readlink(node.ino))
            writer.add(info, xattrs=xattrs)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(attrs.rdev), os.minor(attrs.rdev)
            writer.add(info, xattrs=xattrs)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
            writer.add(info, xattrs=xattrs)
        else:
            count -= 1  # sockets: a tar cannot hold them (docker leaves them out too)
    return count


def commit(
    store: Store,
    record: dict[str, Any],
    names: list[str],
    *,
    timestamp: int | None = None,
    message: str = "",
    lazy: Mapping[str, LazyData] | None = None,
) -> CommitResult:
    base = store.load_image(record["manifest"])
    created = timestamp if timestamp is not None else int(time.time())
    writer_file = store.blob_writer()
    writer = LayerWriter(writer_file)  # type: ignore[arg-type]
    try:
        with container_view(store, record, lazy) as view:
            write_layer(view, writer, timestamp)
        written = writer.close()
    except FsError as exc:
        writer.discard()
        writer_file.abort()
        raise StrataError(
            f"container {record['name']}: cannot read a changed file: {os.strerror(exc.errno)}"
        ) from None
    except BaseException:
        writer.discard()
        writer_file.abort()
        raise
    layer_digest = writer_file.commit()
    docker = base.media_type == DOCKER_MANIFEST
    config = copy.deepcopy(base.config)
    config["created"] = _rfc3339(created)
    config.setdefault("rootfs", {"type": "layers"})["diff_ids"] = [*base.diff_ids, written.diff_id]
    history = list(config.get("history") or [])
    entry = {"created": _rfc3339(created), "created_by": "strata commit"}
    if message:
        entry["comment"] = message
    history.append(entry)
    config["history"] = history
    config_data = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
    config_digest = store.put_blob(config_data)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": {
            "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
            "digest": config_digest,
            "size": len(config_data),
        },
        "layers": [
            *(layer.to_json() for layer in base.layers),
            {
                "mediaType": DOCKER_LAYER if docker else OCI_LAYER_GZIP,
                "digest": layer_digest,
                "size": written.size,
            },
        ],
    }
    data = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    image = store.add_image(data, names)
    return CommitResult(image, layer_digest, written.size)
