"""Metadata changes cost the same in a small and in a large directory.

Counted, not timed: the core is driven directly (as the kernel drives it:
a getattr of the parent after every change) and the directory listings it
reads are counted. A directory is listed once, for its first st_nlink, and
never again however many entries it has or how often it changes.
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.layers import write
from unionfs.core.index import ROOT_INO, Index
from unionfs.core.stack import prepare_stack
from unionfs.core.upper import UpperDir, UpperStore, probe_format
from unionfs.core.view import Caller, UnionView

ROOT = Caller(0, 0)


class CountingStore(UpperStore):
    """UPPER with a count of the listings read of its directory `d`."""

    listings = 0

    def read_dir(self, rel: bytes) -> UpperDir:
        if rel == b"d":  # not the directories made inside it (rmdir checks those)
            CountingStore.listings += 1
        return super().read_dir(rel)


def _view(scratch: str, lower_entries: int) -> tuple[UnionView, Index]:
    lower = os.path.join(scratch, "lower")
    for number in range(lower_entries):
        write(f"{lower}/d/lower{number}", "x")
    os.makedirs(f"{lower}/d/sub", exist_ok=True)
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    os.makedirs(work)
    index = Index(os.path.join(scratch, "index"))
    stack = prepare_stack(index, [lower])
    store = CountingStore(upper, work, probe_format(os.fsencode(work)), index.store_id())
    store.recover()
    return UnionView(index, stack.root, stack.layers, store), index


def _changes(view: UnionView, directory: int, rounds: int) -> int:
    """Create, mkdir, rename, link, unlink and rmdir *rounds* times, with the
    parent's getattr after each as the kernel sends it; the listings read."""
    before = CountingStore.listings
    for number in range(rounds):
        name = b"new%d" % number
        node, fd = view.create(directory, name, 0o644, os.O_WRONLY, ROOT)
        os.close(fd)
        view.getattr(directory)
        view.mkdir(directory, name + b".d", 0o755, ROOT)
        view.getattr(directory)
        view.rename(directory, name + b".d", directory, name + b".moved", 0)
        view.getattr(directory)
        view.link(node.ino, directory, name + b".link")
        view.getattr(directory)
        view.unlink(directory, name)
        view.unlink(directory, name + b".link")
        view.getattr(directory)
        view.rmdir(directory, name + b".moved")
        view.getattr(directory)
        view.unlink(directory, b"lower%d" % number)  # a whiteout of a lower file
        view.getattr(directory)
    return CountingStore.listings - before


@pytest.mark.parametrize("size", [100, 3000])
def test_changes_never_list_the_directory_again(scratch: str, size: int) -> None:
    view, index = _view(scratch, size)
    try:
        directory = view.lookup(ROOT_INO, b"d")
        assert directory is not None
        view.mkdir(directory.ino, b"first", 0o755, ROOT)  # the directory is in UPPER now
        first = CountingStore.listings
        nlink = view.getattr(directory.ino).nlink
        assert CountingStore.listings - first == 1  # its first st_nlink lists it once
        assert nlink == 2 + 2  # sub and first
        assert _changes(view, directory.ino, 50) == 0
        # The count kept through the changes is the one a fresh listing gives.
        view.nodes[directory.ino].subdirs = None
        assert view.getattr(directory.ino).nlink == nlink
        assert stat.S_ISDIR(view.getattr(directory.ino).mode)
    finally:
        view.close()
        index.close()
