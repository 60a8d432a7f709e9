"""Merging one layer onto the view of the layers below it.

The result is a new set of listings for the directories this layer contains;
every directory the layer does not touch keeps the listing of the chain below.
"""

from __future__ import annotations

import dataclasses
import os
import stat

import lmdb

from ..errors import StrataError
from . import overrides
from .index import ROOT_INO, Index, name_hash
from .layer import (
    is_implicit,
    is_opaque,
    open_layer_dir,
    overlay_value,
    read_layer_dir,
    read_xattrs,
    visible_xattrs,
)
from .paths import fd_path
from .records import Entry, entry_from_stat, unpack_group
from .upper import join, redirect_target


@dataclasses.dataclass(frozen=True, slots=True)
class Presets:
    """Inode numbers the merge must keep (a mount showed them while the layer
    streamed in): directories by merged path, files by their host inode
    (st_dev, st_ino), which hardlinks share."""

    dirs: dict[bytes, int]
    files: dict[tuple[int, int], int]


def layer_entry(
    ino: int,
    st: os.stat_result,
    layer: int,
    rel: bytes,
    xattrs: tuple[tuple[bytes, bytes], ...],
    *,
    listing: int = 0,
    nlink: int | None = None,
    target: bytes = b"",
) -> Entry:
    """The entry of a layer's file at *rel*: its stat, its visible xattrs,
    and the stat override a rootless layer keeps in an xattr."""
    entry = entry_from_stat(
        ino,
        st,
        layer,
        nlink=nlink,
        listing=listing,
        host_ino=st.st_ino,
        path=rel if stat.S_ISREG(st.st_mode) else b"",
        target=target,
        xattrs=visible_xattrs(xattrs),
    )
    override = overrides.from_xattrs(xattrs)
    return entry if override is None else override.apply(entry)


class LayerMerger:
    """Writes the merged listings of one layer on top of a base view."""

    def __init__(
        self,
        index: Index,
        txn: lmdb.Transaction,
        root: bytes,
        number: int,
        presets: Presets | None = None,
    ) -> None:
        self.index = index
        # Inode numbers a mount already showed for this layer while it streamed.
        self.presets = presets if presets is not None else Presets({}, {})
        self.txn = txn
        self.root = root
        self.number = number
        # One inode number per hardlinked file of this layer.
        self.hardlinks: dict[tuple[int, int], int] = {}
        # Every path of each hardlinked file, so a copy-up can link them all.
        self.aliases: dict[int, list[bytes]] = {}
        self.files = 0
        self.next_ino = index.counter(txn, b"next_ino")
        self.base_root: Entry | None = None  # the root of the layers below

    def _below(self, path: bytes) -> Entry | None:
        """What the layers below show at *path* (from their root)."""
        if self.base_root is None:
            return None
        return self.index.lookup_path(self.txn, self.base_root, path)

    def merge(self, base_root: Entry | None) -> Entry:
        st = os.lstat(self.root)
        xattrs = read_xattrs(self.root)
        # overlayfs ignores an opaque mark on a layer's root; so do we.
        base = base_root.listing if base_root is not None else 0
        self.base_root = base_root
        fd = open_layer_dir(self.root)
        try:
            lower_path = b"" if base_root is not None else None
            listing, nlink = self._merge_dir(base, b"", False, fd, lower_path)
        finally:
            os.close(fd)
        self.index.set_counter(self.txn, b"next_ino", self.next_ino)
        for ino, paths in self.aliases.items():
            self.index.put_aliases(self.txn, ino, paths)
        if base_root is not None and is_implicit(xattrs):
            return base_root._replace(listing=listing, nlink=nlink)
        return layer_entry(ROOT_INO, st, self.number, b"", xattrs, listing=listing, nlink=nlink)

    def _new_ino(self) -> int:
        ino = self.next_ino
        self.next_ino += 1
        return ino

    def _with_lower_data(
        self,
        entry: Entry,
        xattrs: tuple[tuple[bytes, bytes], ...],
        lower: Entry | None,
        lower_path: bytes | None,
    ) -> Entry:
        """A metadata-only copy: its own attributes, the data of the lower file
        it was copied from (named by its redirect, else the one it replaced)."""
        redirect = overlay_value(xattrs, b"redirect")
        data = self._below(redirect_target(lower_path, redirect)) if redirect else lower
        if data is None or not stat.S_ISREG(data.mode):
            return entry  # the data is gone: the sparse copy is all there is
        return entry._replace(
            size=data.size,
            blocks=data.blocks,
            layer=data.layer,
            path=data.path,
            host_ino=data.host_ino,
            ctime_ns=data.ctime_ns,
        )

    def _merge_dir(
        self, base: int, rel: bytes, opaque: bool, fd: int, lower_path: bytes | None
    ) -> tuple[int, int]:
        """Merge this layer's directory *rel* (open as *fd*) onto listing *base*,
        which the layers below show at *lower_path*; return (listing, nlink).

        Buckets of the base listing this layer does not touch are copied still
        encoded; only the names the layer adds, replaces or whites out are decoded.
        Directories are reached by descriptor, so any depth is read. A layer
        that was an overlayfs UPPER is read as the kernel reads it: a directory
        with a redirect merges the lower directory it names, a metadata-only
        copy takes its data from the lower file (at its redirect, else below it).
        """
        layer_dir = read_layer_dir(fd)
        if layer_dir.opaque:
            opaque = True
        index, txn = self.index, self.txn
        merge_onto = base and not opaque
        encoded = index.load_buckets(txn, base) if merge_onto else {}
        subdirs = index.subdirectories(txn, base) if merge_onto else 0
        decoded: dict[int, list[tuple[bytes, Entry]]] = {}

        def bucket(name: bytes) -> list[tuple[bytes, Entry]]:
            hashed = name_hash(name)
            group = decoded.get(hashed)
            if group is None:
                raw = encoded.pop(hashed, None)
                group = decoded[hashed] = unpack_group(raw) if raw is not None else []
            return group

        def take(name: bytes) -> Entry | None:
            """Remove *name* from the listing being built; return what it was."""
            nonlocal subdirs
            group = bucket(name)
            for position, (found, entry) in enumerate(group):
                if found == name:
                    del group[position]
                    if entry.is_dir:
                        subdirs -= 1
                    return entry
            return None

        # Whiteouts hide what lies below, never this layer's own entries.
        for name in layer_dir.whiteouts:
            take(name)
        for name, st in layer_dir.entries:
            self.files += 1
            child_rel = rel + b"/" + name if rel else name
            xattrs = read_xattrs(fd_path(fd, name))
            lower = take(name)
            if stat.S_ISDIR(st.st_mode):
                implicit = is_implicit(xattrs)
                if implicit and lower is not None and not lower.is_dir:
                    # The tar put files beneath a name that is a symlink or a
                    # file below: following it could lead anywhere.
                    raise StrataError(
                        f"layer {os.fsdecode(self.root)}: {os.fsdecode(child_rel)!r} is a"
                        " directory only by implication, but a lower layer has a"
                        f" {_kind(lower.mode)} there"
                    )
                child_opaque = is_opaque(xattrs)
                redirect = overlay_value(xattrs, b"redirect")
                child_lower: bytes | None = None
                if child_opaque:
                    lower_dir = None
                elif redirect:  # a directory renamed in an UPPER
                    child_lower = redirect_target(lower_path, redirect)
                    lower_dir = self._below(child_lower)
                else:
                    lower_dir = lower
                    if lower_path is not None:
                        child_lower = join(lower_path, name)
                if lower_dir is None or not lower_dir.is_dir:
                    lower_dir, child_lower = None, None
                child_base = lower_dir.listing if lower_dir is not None else 0
                child_fd = open_layer_dir(name, fd)
                try:
                    listing, nlink = self._merge_dir(
                        child_base, child_rel, child_opaque, child_fd, child_lower
                    )
                finally:
                    os.close(child_fd)
                ino = self.presets.dirs.get(child_rel) or (
                    lower_dir.ino if lower_dir is not None else self._new_ino()
                )
                if implicit and lower is not None:  # a directory, checked above
                    entry = lower._replace(ino=ino, listing=listing, nlink=nlink)
                else:
                    entry = layer_entry(
                        ino, st, self.number, child_rel, xattrs, listing=listing, nlink=nlink
                    )
                subdirs += 1
            else:
                preset = self.presets.files.get((st.st_dev, st.st_ino))
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    ino = self.hardlinks.get(key) or preset or self._new_ino()
                    self.hardlinks[key] = ino
                    self.aliases.setdefault(ino, []).append(child_rel)
                else:
                    ino = preset or self._new_ino()
                target = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else b""
                entry = layer_entry(ino, st, self.number, child_rel, xattrs, target=target)
                if stat.S_ISREG(st.st_mode) and overlay_value(xattrs, b"metacopy") is not None:
                    entry = self._with_lower_data(entry, xattrs, lower, lower_path)
            bucket(name).append((name, entry))
        return index.write_listing(txn, encoded, decoded, subdirs), 2 + subdirs


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    return "special file"
