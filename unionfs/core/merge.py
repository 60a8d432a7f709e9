"""Merging one layer onto the view of the layers below it.

The result is a new set of listings for the directories this layer contains;
every directory the layer does not touch keeps the listing of the chain below.
"""

from __future__ import annotations

import os
import stat

import lmdb

from .index import ROOT_INO, Index
from .layer import is_opaque, read_layer_dir, read_xattrs, visible_xattrs
from .records import Entry


class LayerMerger:
    """Writes the merged listings of one layer on top of a base view."""

    def __init__(self, index: Index, txn: lmdb.Transaction, root: bytes, number: int) -> None:
        self.index = index
        self.txn = txn
        self.root = root
        self.number = number
        # One inode number per hardlinked file of this layer.
        self.hardlinks: dict[tuple[int, int], int] = {}
        self.files = 0
        self.next_ino = index.counter(txn, b"next_ino")

    def merge(self, base_root: Entry | None) -> Entry:
        st = os.lstat(self.root)
        xattrs = read_xattrs(self.root)
        # overlayfs ignores an opaque mark on a layer's root; so do we.
        base = base_root.listing if base_root is not None else 0
        listing, nlink = self._merge_dir(base, b"", False)
        self.index.set_counter(self.txn, b"next_ino", self.next_ino)
        return self._entry(ROOT_INO, st, b"", xattrs, listing=listing, nlink=nlink)

    def _new_ino(self) -> int:
        ino = self.next_ino
        self.next_ino += 1
        return ino

    def _entry(
        self,
        ino: int,
        st: os.stat_result,
        rel: bytes,
        xattrs: tuple[tuple[bytes, bytes], ...],
        *,
        listing: int = 0,
        nlink: int | None = None,
        target: bytes = b"",
    ) -> Entry:
        return Entry(
            ino=ino,
            mode=st.st_mode,
            nlink=st.st_nlink if nlink is None else nlink,
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=st.st_rdev,
            size=st.st_size,
            blocks=st.st_blocks,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            layer=self.number,
            listing=listing,
            host_ino=st.st_ino,
            path=rel if stat.S_ISREG(st.st_mode) else b"",
            target=target,
            xattrs=visible_xattrs(xattrs),
        )

    def _merge_dir(self, base: int, rel: bytes, opaque: bool) -> tuple[int, int]:
        """Merge this layer's directory *rel* onto listing *base*; return (listing, nlink)."""
        path = self.root + b"/" + rel if rel else self.root
        layer_dir = read_layer_dir(path)
        if layer_dir.opaque:
            opaque = True
        merged = {} if opaque or not base else self.index.load_listing(self.txn, base)
        # Whiteouts hide what lies below, never this layer's own entries.
        for name in layer_dir.whiteouts:
            merged.pop(name, None)
        for name, st in layer_dir.entries:
            self.files += 1
            child_rel = rel + b"/" + name if rel else name
            child_path = path + b"/" + name
            xattrs = read_xattrs(child_path)
            lower = merged.get(name)
            if stat.S_ISDIR(st.st_mode):
                child_opaque = is_opaque(xattrs)
                lower_dir = lower is not None and lower.is_dir and not child_opaque
                child_base = lower.listing if lower is not None and lower_dir else 0
                listing, nlink = self._merge_dir(child_base, child_rel, child_opaque)
                ino = lower.ino if lower is not None and lower_dir else self._new_ino()
                merged[name] = self._entry(ino, st, child_rel, xattrs, listing=listing, nlink=nlink)
                continue
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                ino = self.hardlinks.get(key) or self._new_ino()
                self.hardlinks[key] = ino
            else:
                ino = self._new_ino()
            target = os.readlink(child_path) if stat.S_ISLNK(st.st_mode) else b""
            merged[name] = self._entry(ino, st, child_rel, xattrs, target=target)
        subdirs = sum(1 for entry in merged.values() if entry.is_dir)
        return self.index.write_listing(self.txn, merged), 2 + subdirs
