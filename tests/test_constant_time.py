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

from tests.counting import count_scans
from tests.layers import write
from unionfs.core.index import ROOT_INO, Index
from unionfs.core.nodes import Caller
from unionfs.core.stack import prepare_stack
from unionfs.core.upper import UpperStore, probe_format
from unionfs.core.view import UnionView

ROOT = Caller(0, 0)


def _view(
    scratch: str, lower_entries: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[UnionView, Index, list[bytes]]:
    """A view of a lower directory `d` of *lower_entries* files, and the
    directories of UPPER it lists from now on (rmdir lists the one it
    removes), in order."""
    lower = os.path.join(scratch, "lower")
    for number in range(lower_entries):
        write(f"{lower}/d/lower{number}", "x")
    os.makedirs(f"{lower}/d/sub", exist_ok=True)
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    os.makedirs(work)
    index = Index(os.path.join(scratch, "index"))
    stack = prepare_stack(index, [lower])
    store = UpperStore(upper, work, probe_format(os.fsencode(work)), index.store_id())
    store.recover()
    listed = count_scans(monkeypatch, os.fsencode(upper))
    return UnionView(index, stack.root, stack.layers, store), index, listed


def _changes(
    view: UnionView, directory: int, listed: list[bytes], rounds: int, whiteouts: bool = True
) -> int:
    """Create, mkdir, rename, link, unlink and rmdir *rounds* times, with the
    parent's getattr after each as the kernel sends it; its listings read."""
    rel = view.rel(view.node(directory))
    before = listed.count(rel)
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
    return listed.count(rel) - before


@pytest.mark.parametrize("size", [100, 3000])
def test_changes_never_list_the_directory_again(
    scratch: str, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    view, index, listed = _view(scratch, size, monkeypatch)
    try:
        directory = view.lookup(ROOT_INO, b"d")
        assert directory is not None
        view.mkdir(directory.ino, b"first", 0o755, ROOT)  # the directory is in UPPER now
        first = listed.count(b"d")
        nlink = view.getattr(directory.ino).nlink
        assert listed.count(b"d") - first == 1  # its first st_nlink lists it once
        assert nlink == 2 + 2  # sub and first
        assert _changes(view, directory.ino, listed, 50) == 0
        # The count kept through the changes is the one a fresh listing gives.
        view.nodes[directory.ino].subdirs = None
        assert view.getattr(directory.ino).nlink == nlink
        assert stat.S_ISDIR(view.getattr(directory.ino).mode)
    finally:
        view.close()
        index.close()


def test_a_directory_of_upper_alone_is_never_listed_for_its_link_count(
    scratch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its count is the host directory's, as overlayfs reports it."""
    view, index, listed = _view(scratch, 10, monkeypatch)
    try:
        made = view.mkdir(ROOT_INO, b"made", 0o755, ROOT)
        for number in range(5):
            view.mkdir(made.ino, b"sub%d" % number, 0o755, ROOT)
        assert view.getattr(made.ino).nlink == 2 + 5
        assert _changes(view, made.ino, listed, 20, whiteouts=False) == 0
        assert view.getattr(made.ino).nlink == 2 + 5
        assert listed.count(b"made") == 0
    finally:
        view.close()
        index.close()
