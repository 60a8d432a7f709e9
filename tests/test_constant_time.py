"""Metadata changes cost the same in a small and in a large directory.

Counted, not timed: the core is driven directly (as the kernel drives it:
a getattr of the parent after every change) and the directory listings it
reads are counted. A directory is listed once, for its first st_nlink, and
never again however many entries it has or how often it changes.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import ClassVar

import pytest

from tests.layers import write
from unionfs.core.index import ROOT_INO, Index
from unionfs.core.nodes import Caller
from unionfs.core.stack import prepare_stack
from unionfs.core.upper import UpperNames, UpperStore, probe_format
from unionfs.core.view import UnionView

ROOT = Caller(0, 0)


class CountingStore(UpperStore):
    """UPPER with the directories it listed, in order."""

    listed: ClassVar[list[bytes]] = []

    @contextlib.contextmanager
    def scan_dir(self, rel: bytes) -> Iterator[UpperNames]:  # every listing reads through it
        CountingStore.listed.append(rel)
        with super().scan_dir(rel) as names:
            yield names


def _listings(of: bytes) -> int:
    """How often the directory *of* was listed (rmdir lists the one it removes)."""
    return CountingStore.listed.count(of)


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


def _changes(view: UnionView, directory: int, rounds: int, whiteouts: bool = True) -> int:
    """Create, mkdir, rename, link, unlink and rmdir *rounds* times, with the
    parent's getattr after each as the kernel sends it; its listings read."""
    rel = view.rel(view.node(directory))
    before = _listings(rel)
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
        if whiteouts:
            view.unlink(directory, b"lower%d" % number)  # a whiteout of a lower file
            view.getattr(directory)
    return _listings(rel) - before


@pytest.mark.parametrize("size", [100, 3000])
def test_changes_never_list_the_directory_again(scratch: str, size: int) -> None:
    view, index = _view(scratch, size)
    try:
        directory = view.lookup(ROOT_INO, b"d")
        assert directory is not None
        view.mkdir(directory.ino, b"first", 0o755, ROOT)  # the directory is in UPPER now
        first = _listings(b"d")
        nlink = view.getattr(directory.ino).nlink
        assert _listings(b"d") - first == 1  # its first st_nlink lists it once
        assert nlink == 2 + 2  # sub and first
        assert _changes(view, directory.ino, 50) == 0
        # The count kept through the changes is the one a fresh listing gives.
        view.nodes[directory.ino].subdirs = None
        assert view.getattr(directory.ino).nlink == nlink
        assert stat.S_ISDIR(view.getattr(directory.ino).mode)
    finally:
        view.close()
        index.close()


def test_a_directory_of_upper_alone_is_never_listed_for_its_link_count(scratch: str) -> None:
    """Its count is the host directory's, as overlayfs reports it."""
    view, index = _view(scratch, 10)
    try:
        made = view.mkdir(ROOT_INO, b"made", 0o755, ROOT)
        for number in range(5):
            view.mkdir(made.ino, b"sub%d" % number, 0o755, ROOT)
        assert view.getattr(made.ino).nlink == 2 + 5
        assert _changes(view, made.ino, 20, whiteouts=False) == 0
        assert view.getattr(made.ino).nlink == 2 + 5
        assert _listings(b"made") == 0
    finally:
        view.close()
        index.close()
