"""Checking a writable layer against the lower layers' index (`strata fsck`).

UPPER is the truth and everything strata keeps about it is derived, so a check
looks for what a crash or a hand edit can leave behind and a repair removes or
rebuilds that derived state; it never invents user data.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .chunks import PartialCopy
from .index import Index
from .layer import WHITEOUT_PREFIX, is_whiteout_device, open_layer_root
from .paths import open_beneath
from .records import Entry
from .upper import UpperStore, join, redirect_target


@dataclass(frozen=True, slots=True)
class Finding:
    path: str
    problem: str
    repaired: bool


class UpperChecker:
    def __init__(
        self,
        index: Index,
        lower_root: Entry,
        store: UpperStore,
        allocate: Callable[[], int],
        layers: dict[int, str] | None = None,
    ) -> None:
        self.index = index
        self.lower_root = lower_root
        self.store = store
        self.allocate = allocate
        self.layers = layers or {}  # layer number -> its directory: where lower data is
        self.findings: list[Finding] = []
        self._inos: dict[int, int] = {}  # strata inode number -> host inode holding it

    def _report(self, path: bytes, problem: str, repaired: bool) -> None:
        self.findings.append(Finding(os.fsdecode(path) or "/", problem, repaired))

    def _lower_at(self, path: bytes) -> Entry | None:
        with self.index.read() as txn:
            return self.index.lookup_path(txn, self.lower_root, path)

    def check(self, repair: bool) -> list[Finding]:
        store = self.store
        if os.path.isdir(store.tmp):
            for name in sorted(os.listdir(store.tmp)):
                self._report(join(b"WORK/strata-tmp", name), "unfinished copy", repair)
            if repair:
                store.recover()
        self._walk(b"", b"", repair)
        if os.path.isdir(store.links):
            for name, ino in store.unused_links():
                self._report(join(b"WORK/strata-links", name), "copy no name uses", repair)
                if repair:
                    store.drop_link(ino)
        return self.findings

    def _walk(self, rel: bytes, lower_path: bytes | None, repair: bool) -> None:
        store = self.store
        listing = store.read_dir(rel)
        for hidden in sorted(listing.stale_markers):
            marker = join(rel, WHITEOUT_PREFIX + hidden)
            self._report(marker, "whiteout beside the name it hides", repair)
            if repair:
                os.unlink(store.path(marker))
        for name, st in sorted(listing.entries.items()):
            child = join(rel, name)
            path = store.path(child)
            child_lower = join(lower_path, name) if lower_path is not None else None
            if stat.S_ISDIR(st.st_mode):
                redirect = store.redirect(child)
                if redirect is not None:
                    target = redirect_target(lower_path, redirect)
                    found = self._lower_at(target)
                    if found is None or not found.is_dir:
                        self._report(child, "redirect to a missing lower directory", repair)
                        if repair:
                            store.clear_markers(path, store.redirect_xattrs)
                        child_lower = None
                    else:
                        child_lower = target
                if store.is_opaque(child):
                    child_lower = None
                self._check_ino(child, path, st, repair)
                self._walk(child, child_lower, repair)
                continue
            if is_whiteout_device(st):
                continue
            self._check_ino(child, path, st, repair)
            if stat.S_ISREG(st.st_mode) and store.is_metacopy(child):
                redirect = store.redirect(child)
                if redirect is not None:
                    child_lower = redirect_target(lower_path, redirect)
                lower = self._lower_at(child_lower) if child_lower is not None else None
                if lower is None or not stat.S_ISREG(lower.mode):
                    # The data is lost; keeping the file shows what is left.
                    self._report(child, "metadata-only copy whose lower data is gone", False)
                elif (raw := store.chunk_map(path)) is not None:
                    # A daemon stopped while it copied the file chunk by chunk
                    # (or could not finish it): the next mount that uses it
                    # reads it right and fills the rest; a repair fills it now.
                    finished = repair and self._finish_copy(path, lower, raw)
                    self._report(child, "copy-up in progress; mount it once to finish", finished)

    def _finish_copy(self, path: bytes, lower: Entry, raw: bytes) -> bool:
        """Copy the chunks a partial copy lacks from its lower file and drop
        its marks; False if the lower data cannot be read here."""
        decoded = PartialCopy.decode(raw)
        layer = self.layers.get(lower.layer)
        if decoded is None or decoded[1] != lower.size or layer is None:
            return False
        chunk, _, present = decoded
        root = open_layer_root(layer)
        try:
            lower_fd = open_beneath(root, lower.path, os.O_RDONLY)
        except OSError:
            return False  # a lazily pulled layer without this data, or gone
        finally:
            os.close(root)
        try:
            upper_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            os.close(lower_fd)
            raise
        store = self.store

        def save(value: bytes) -> None:
            store.set_chunk_map(upper_fd, value)

        partial = PartialCopy(lower_fd, upper_fd, lower.size, present, save, chunk)
        try:
            while partial.fill_next():
                pass
            os.fdatasync(upper_fd)
            for names in (store.metacopy_xattrs, store.redirect_xattrs, (store.chunks_xattr,)):
                store.clear_markers(path, names)
        finally:
            partial.close()
        return True

    def _check_ino(self, rel: bytes, path: bytes, st: os.stat_result, repair: bool) -> None:
        ino = self.store.stored_ino(path)
        if ino is None:
            return  # a file overlayfs wrote: strata numbers it when it first sees it
        holder = self._inos.setdefault(ino, st.st_ino)
        if holder != st.st_ino:
            self._report(rel, f"inode number {ino} also used by another file", repair)
            if repair:
                self.store.set_ino(path, self.allocate())
