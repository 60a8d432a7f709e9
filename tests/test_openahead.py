"""Opening ahead (core/openahead.py): a reader going through a directory's
lower files in listing order finds them warm; other readers warm nothing."""

from __future__ import annotations

import contextlib
import os
import re
import threading

import pytest

from tests.layers import write
from tests.mounts import daemon_logs, drop_caches, strata_mount
from unionfs.core import openahead
from unionfs.core.index import ROOT_INO, Index
from unionfs.core.openahead import LISTINGS_AFTER, WINDOW, OpenAhead
from unionfs.core.stack import prepare_stack
from unionfs.core.view import UnionView

FILES = 100


@pytest.fixture
def lower(scratch: str) -> str:
    path = os.path.join(scratch, "lower")
    for directory in ("d", "e"):
        for number in range(FILES):
            write(f"{path}/{directory}/f{number:03}", f"{directory}{number}" * 100)
        os.makedirs(f"{path}/{directory}/sub")
        os.symlink("f000", f"{path}/{directory}/link")
    for number in range(10):
        write(f"{path}/walk/x{number}/f0", "x")
    return path


class Queued:
    """The layer paths a view's open-ahead queues, in order (the thread warms
    nothing: the test counts what it was asked to do)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[bytes] = []
        monkeypatch.setattr(OpenAhead, "_put", lambda _, job: self.paths.append(job.path))


def _view(scratch: str, lower: str) -> UnionView:
    index = Index(os.path.join(scratch, "index"))
    stack = prepare_stack(index, [lower])
    return UnionView(index, stack.root, stack.layers)


def _files_in_listing_order(view: UnionView, directory: bytes) -> list[bytes]:
    """The directory's regular files as a reader's readdir lists them."""
    node = view.lookup(ROOT_INO, directory)
    assert node is not None
    names = [name for _, name, _ in view.listdir(node.ino)]
    return [name for name in names if name.startswith(b"f")]


def _open(view: UnionView, directory: bytes, name: bytes, *, cold: bool) -> None:
    """What the adapter tells the view when it opens a file for its data."""
    parent = view.lookup(ROOT_INO, directory)
    assert parent is not None
    node = view.lookup(parent.ino, name)
    assert node is not None
    view.opened_lower(node.ino, cold=cold)


def test_a_reader_in_listing_order_gets_the_files_after_it_warmed_a_window_at_a_time(
    scratch: str, lower: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queued = Queued(monkeypatch)
    view = _view(scratch, lower)
    order = _files_in_listing_order(view, b"d")
    assert len(order) == FILES

    _open(view, b"d", order[0], cold=True)
    assert queued.paths == []  # one cold open says nothing of what comes next
    _open(view, b"d", order[1], cold=True)
    expected = [b"d/" + name for name in order[2 : 2 + WINDOW]]
    assert queued.paths == expected  # never the directory, the symlink or a file twice

    # The reader finds them warm; at the window's middle the next is queued.
    middle = 2 + WINDOW // 2
    for name in order[2:middle]:
        _open(view, b"d", name, cold=False)
    assert len(queued.paths) == WINDOW
    _open(view, b"d", order[middle], cold=False)
    assert queued.paths == [b"d/" + name for name in order[2 : 2 + 2 * WINDOW]]


def test_opens_in_another_order_warm_nothing(
    scratch: str, lower: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interpreter's imports, a build's headers: cold opens of files far
    apart in the listing and by name start no window."""
    queued = Queued(monkeypatch)
    view = _view(scratch, lower)
    order = _files_in_listing_order(view, b"d")
    by_name = sorted(order)

    def near(first: bytes, second: bytes, names: list[bytes]) -> bool:
        return 0 < names.index(second) - names.index(first) <= 8

    jumps = [by_name[0]]
    for name in order[::3] + by_name[::-3]:
        if not near(jumps[-1], name, order) and not near(jumps[-1], name, by_name):
            jumps.append(name)
    assert len(jumps) > 30
    for name in jumps:
        _open(view, b"d", name, cold=True)
    assert queued.paths == []


def test_a_reader_in_name_order_gets_the_files_after_it_warmed(
    scratch: str, lower: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """git add, rsync, tar --sort=name: the files by name, not as listed."""
    queued = Queued(monkeypatch)
    view = _view(scratch, lower)
    by_name = sorted(_files_in_listing_order(view, b"d"))
    assert by_name != _files_in_listing_order(view, b"d")
    _open(view, b"d", by_name[0], cold=True)
    _open(view, b"d", by_name[1], cold=True)
    assert queued.paths == [b"d/" + name for name in by_name[2 : 2 + WINDOW]]
    for name in by_name[2 : 3 + WINDOW // 2]:
        _open(view, b"d", name, cold=False)
    assert queued.paths == [b"d/" + name for name in by_name[2 : 2 + 2 * WINDOW]]


def test_the_next_directory_listed_is_warmed_only_while_a_reader_goes_in_order(
    scratch: str, lower: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queued = Queued(monkeypatch)
    view = _view(scratch, lower)
    e = view.lookup(ROOT_INO, b"e")
    assert e is not None
    list(view.listdir(e.ino))  # find, du: listings and no opens
    assert queued.paths == []

    order = _files_in_listing_order(view, b"d")
    for name in order[:3]:  # a reader in order through d (the third is in a window)
        _open(view, b"d", name, cold=True)
    before = len(queued.paths)
    list(view.listdir(e.ino))
    assert queued.paths[before:] == [
        b"e/" + name for name in _files_in_listing_order(view, b"e")[:WINDOW]
    ]


def test_the_thread_warms_what_is_queued_and_stops_with_the_view(
    scratch: str, lower: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    warmed: list[bytes] = []
    real_warm = openahead._warm

    def counting(layer_fd: int, job: openahead._Job) -> bool:
        warmed.append(job.path)
        return real_warm(layer_fd, job)

    monkeypatch.setattr(openahead, "_warm", counting)
    view = _view(scratch, lower)
    order = _files_in_listing_order(view, b"d")
    _open(view, b"d", order[0], cold=True)
    _open(view, b"d", order[1], cold=True)
    ahead = view.open_ahead
    thread = ahead._thread
    assert thread is not None
    for _ in range(1000):
        if ahead.warmed == WINDOW:
            break
        threading.Event().wait(0.01)
    assert ahead.warmed == WINDOW
    assert warmed == [b"d/" + name for name in order[2 : 2 + WINDOW]]
    assert _open_on(lower) > len(view.layer_fds)  # the thread's own copies of the roots
    view.close()
    assert not thread.is_alive()
    assert _open_on(lower) == 0  # and it closed them


def _open_on(path: str) -> int:
    """How many of this process's descriptors are open on *path*."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed
            count += os.readlink(f"/proc/self/fd/{fd}") == path
    return count


def _counts(root: str) -> tuple[int, int, int]:
    """What the daemon's line at unmount says: cold opens, opens, files warmed."""
    lines = re.findall(r"open-ahead: (\d+) of (\d+) lower opens .*; (\d+) files warmed",
                       daemon_logs(root))  # fmt: skip
    assert len(lines) == 1, lines
    cold, opens, warmed = (int(number) for number in lines[0])
    return cold, opens, warmed


@pytest.mark.parametrize("writable", [False, True], ids=["read-only", "writable"])
def test_reading_a_tree_in_listing_order_after_the_caches_dropped_mostly_finds_it_warm(
    scratch: str, lower: str, writable: bool
) -> None:
    """tar's way through a tree: a listing, then each file read whole, in
    order. Without opening ahead every open after drop_caches waits for the
    disk (the dentry is gone); with it, only the first few of the first
    directory do."""
    root = os.path.join(scratch, "root")
    options = []
    if writable:
        options = ["--upper", f"{scratch}/upper", "--work", f"{scratch}/work"]
        for made in options[1::2]:
            os.makedirs(made)
    mountpoint = os.path.join(scratch, "mnt")
    with strata_mount(root, [lower], mountpoint, *options):
        drop_caches(mountpoint)
        read = 0
        for directory in ("d", "e"):
            for entry in os.scandir(f"{mountpoint}/{directory}"):
                if entry.is_file(follow_symlinks=False):
                    with open(entry.path, "rb") as handle:
                        assert handle.read().startswith(directory.encode())
                    read += 1
                    threading.Event().wait(0.002)  # a reader that does something with it
    cold, opens, warmed = _counts(root)
    print(f"{cold} of {opens} opens cold, {warmed} files warmed")
    if opens and cold == 0:
        pytest.skip("the layer's filesystem keeps every dentry (tmpfs): no open waits here")
    assert opens == read == 2 * FILES
    assert warmed >= 2 * FILES - 2 * WINDOW
    assert cold <= opens // 4, (cold, opens)


def test_a_walk_after_a_reader_in_order_warms_only_the_first_directories_it_lists(
    scratch: str, lower: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """find right after tar: its listings stop warming once no open follows."""
    queued = Queued(monkeypatch)
    view = _view(scratch, lower)
    for name in _files_in_listing_order(view, b"d")[:3]:
        _open(view, b"d", name, cold=True)
    before = len(queued.paths)
    walk = view.lookup(ROOT_INO, b"walk")
    assert walk is not None
    for number in range(10):
        directory = view.lookup(walk.ino, f"x{number}".encode())
        assert directory is not None
        list(view.listdir(directory.ino))
    assert len(queued.paths) - before == LISTINGS_AFTER
