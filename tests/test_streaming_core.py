"""The provisional view of layers that stream in (core/streaming.py), without
mounting: an answer comes only once nothing still to arrive can change it,
and the index that replaces the view keeps every inode number it showed."""

from __future__ import annotations

import os
import threading

import pytest

from tests.layers import write
from unionfs.core.index import ROOT_INO, Index
from unionfs.core.nodes import FsError
from unionfs.core.records import Entry
from unionfs.core.stack import layer_numbers, prepare_stack
from unionfs.core.streaming import UNKNOWN, StreamedLayers, StreamTree
from unionfs.core.view import UnionView

KNOWN = [b"base", b"middle", b"top"]
Streams = tuple[Index, list[str], StreamedLayers, list[StreamTree]]


@pytest.fixture
def stack(scratch: str) -> Streams:
    """A base layer, indexed, and two layers (middle, top) still to arrive."""
    paths = [os.path.join(scratch, name) for name in ("base", "middle", "top")]
    for path in paths:
        os.mkdir(path)
    write(f"{paths[0]}/etc/passwd", "base passwd\n")
    write(f"{paths[0]}/etc/hosts", "base hosts\n")
    write(f"{paths[0]}/opt/old/a", "old a\n")
    index = Index(os.path.join(scratch, "index"))
    base = prepare_stack(index, paths[:1], known_ids=KNOWN[:1])
    numbers = layer_numbers(index, paths[1:], KNOWN[1:])
    trees = [StreamTree(n, os.fsencode(p)) for n, p in zip(numbers, paths[1:], strict=True)]
    return index, paths, StreamedLayers(index, base.root, trees[::-1]), trees


def arrive(streaming: StreamedLayers, tree: StreamTree, rel: str, data: str = "") -> None:
    """What the unpacker does: the entry on disk, then recorded."""
    path = os.path.join(os.fsdecode(tree.root), rel)
    if rel.endswith("/"):
        os.makedirs(path, exist_ok=True)
    else:
        write(path, data)
    streaming.record(tree, rel.rstrip("/").encode(), 1_700_000_000 * 10**9)


def test_answers_wait_for_what_could_still_change_them(stack: Streams) -> None:
    _, _, streaming, (middle, top) = stack
    # Nothing has arrived: a name of the base may still be replaced or hidden.
    assert streaming.child(b"etc", b"passwd", wait=False) is UNKNOWN
    arrive(streaming, top, "etc/passwd", "top passwd\n")
    found = streaming.child(b"etc", b"passwd", wait=False)
    assert isinstance(found, Entry) and found.layer == top.number
    # The top layer hides a base file: known before the middle layer is.
    arrive(streaming, top, "etc/.wh.hosts")
    assert streaming.child(b"etc", b"hosts", wait=False) is None
    # opt is implied by top's opt/new (no entry of its own): a directory at
    # once, its attributes those of the base's opt once the middle is done.
    arrive(streaming, top, "opt/new", "new\n")
    implied = streaming.child(b"", b"opt", wait=False)
    assert isinstance(implied, Entry) and implied.is_dir
    # A name only the base has waits for the top and the middle layer.
    assert streaming.child(b"opt/old", b"a", wait=False) is UNKNOWN
    streaming.finish(top)
    assert streaming.child(b"opt/old", b"a", wait=False) is UNKNOWN
    # A waiting lookup (another thread) is answered once the middle is done.
    answers: list[object] = []
    waiter = threading.Thread(target=lambda: answers.append(streaming.child(b"opt/old", b"a")))
    waiter.start()
    arrive(streaming, middle, "opt/old/b", "middle b\n")
    streaming.finish(middle)
    waiter.join(timeout=10)
    assert len(answers) == 1 and answers[0] is not None and answers[0] is not UNKNOWN
    assert streaming.child(b"", b"missing", wait=False) is None
    below = streaming.child(b"", b"opt", wait=False)
    assert isinstance(below, Entry)
    assert below.ino == implied.ino  # a number shown stays


def test_a_lost_stream_is_eio_for_what_waits(stack: Streams) -> None:
    _, _, streaming, _ = stack
    streaming.fail("the registry went away")
    with pytest.raises(FsError) as caught:
        streaming.child(b"etc", b"passwd")
    assert caught.value.errno == 5


def test_the_index_keeps_the_numbers_the_stream_showed(stack: Streams) -> None:
    index, paths, streaming, (middle, top) = stack
    arrive(streaming, middle, "usr/bin/", "")
    arrive(streaming, middle, "usr/bin/tool", "tool\n")
    arrive(streaming, top, "etc/passwd", "top passwd\n")
    view = UnionView(index, streaming.root, {}, streaming=streaming)
    try:
        view.layer_fds.update(
            {tree.number: os.open(tree.root, os.O_PATH) for tree in (middle, top)}
        )
        streaming.finish(top)
        usr = view.lookup(ROOT_INO, b"usr")
        assert usr is not None
        usr_bin = view.lookup(usr.ino, b"bin")
        assert usr_bin is not None
        tool = view.lookup(usr_bin.ino, b"tool")
        assert tool is not None and view.getattr(tool.ino).nlink == 1
        os.link(f"{paths[1]}/usr/bin/tool", f"{paths[1]}/usr/bin/alias")
        streaming.record(middle, b"usr/bin/alias", 0)
        streaming.finish(middle)
        shown = {}
        for path in ("usr", "usr/bin", "usr/bin/tool", "usr/bin/alias", "etc", "etc/passwd"):
            ino = ROOT_INO
            for name in path.split("/"):
                node = view.lookup(ino, name.encode())
                assert node is not None, path
                ino = node.ino
            shown[path] = ino
        assert shown["usr/bin/tool"] == shown["usr/bin/alias"]  # a hardlink, one inode
        # The name looked up first counts the later one, before the switch too.
        assert view.getattr(tool.ino).nlink == 2
        fd = view.open_data(shown["etc/passwd"])
        try:
            assert os.pread(fd, 100, 0) == b"top passwd\n"
        finally:
            os.close(fd)
        final = prepare_stack(index, paths, known_ids=KNOWN, presets=streaming.presets())
        view.switch_to_index(final.root, final.layers)
        with index.read() as txn:
            for path, ino in shown.items():
                entry = index.lookup_path(txn, final.root, path.encode())
                assert entry is not None and entry.ino == ino, path
        listed = {name for _, name, _ in view.listdir(shown["usr/bin"])}
        assert listed == {b".", b"..", b"tool", b"alias"}
    finally:
        view.close()


def test_an_ordered_stream_answers_misses_before_its_end(
    stack: Streams, caplog: pytest.LogCaptureFixture
) -> None:
    """A layer tar in path order (what docker, buildkit, umoci write) has
    passed a name's place once a later path arrived: a miss is known then."""
    _, _, streaming, (middle, top) = stack
    streaming.finish(middle)  # nothing in it
    for rel in ("etc/", "etc/a", "etc/c", "usr/", "usr/x"):
        arrive(streaming, top, rel)
    assert streaming.child(b"etc", b"b", wait=False) is None  # its place is passed
    assert streaming.child(b"etc", b"passwd", wait=False) is not UNKNOWN  # the base's
    assert streaming.child(b"usr", b"y", wait=False) is UNKNOWN  # may still come
    assert streaming.child(b"", b"var", wait=False) is UNKNOWN
    # The stream has left etc: its listing is final (with the base's names).
    listing = streaming.listing(b"etc", wait=False)
    assert isinstance(listing, list)
    names = sorted(name for _, group in listing for name, _ in group)
    assert names == [b"a", b"c", b"hosts", b"passwd"]
    assert [hashed for hashed, _ in listing] == sorted(hashed for hashed, _ in listing)
    assert streaming.listing(b"usr", wait=False) is UNKNOWN
    assert streaming.listing(b"", wait=False) is UNKNOWN  # the root: only at the end
    # A path out of order: said in the log (once), and misses wait for the end again.
    assert "not in path order" not in caplog.text
    arrive(streaming, top, "etc/b")
    arrive(streaming, top, "etc/a2")
    assert caplog.text.count("not in path order") == 1
    assert streaming.child(b"etc", b"d", wait=False) is UNKNOWN
    streaming.finish(top)
    assert streaming.child(b"etc", b"d", wait=False) is None


def test_entries_deeper_than_path_max_arrive(stack: Streams) -> None:
    _, _, streaming, (_, top) = stack
    names = [bytes([ord("a") + depth % 26]) * 250 for depth in range(20)]  # 5,020 bytes
    fd = os.open(top.root, os.O_PATH | os.O_DIRECTORY)
    try:
        rel = b""
        for name in names:
            os.mkdir(name, dir_fd=fd)
            deeper = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = deeper
            rel = rel + b"/" + name if rel else name
            streaming.record(top, rel, 0)
        with open(os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as leaf:
            leaf.write(b"deep\n")
        streaming.record(top, rel + b"/leaf", 0)
    finally:
        os.close(fd)
    found = streaming.child(rel, b"leaf", wait=False)
    assert isinstance(found, Entry) and found.size == 5 and found.path == rel + b"/leaf"
