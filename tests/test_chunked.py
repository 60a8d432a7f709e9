"""Copy-up chunk by chunk: a write into a large lower file copies the chunks
it touches, reads take each chunk from where its data is, and the file is
whole after the fill, after a remount and after a daemon is killed.

The core is driven directly where work is counted (chunks copied, blocks
allocated); mounted tests compare with the kernel's overlayfs.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
import threading
import time

from tests.layers import write
from tests.mounts import force_unmount, on_both, patched_mount, strata, strata_mount
from unionfs.core.chunks import CHUNK, CHUNKED_MIN, PartialCopy
from unionfs.core.index import ROOT_INO, Index
from unionfs.core.nodes import Node
from unionfs.core.stack import prepare_stack
from unionfs.core.upper import UpperStore, probe_format
from unionfs.core.view import UnionView
from unionfs.mount import find_mount

SIZE = CHUNKED_MIN * 4  # 16 chunks


def _lower_data() -> bytes:
    return bytes(range(256)) * (SIZE // 256)


def _lower(scratch: str) -> str:
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/big", _lower_data())
    write(f"{lower}/dir/small", "small")
    return lower


def _view(scratch: str, lower: str, index: Index | None = None) -> UnionView:
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    index = index if index is not None else Index(os.path.join(scratch, "index"))
    stack = prepare_stack(index, [lower])
    store = UpperStore(upper, work, probe_format(os.fsencode(work)), index.store_id())
    store.recover()
    return UnionView(index, stack.root, stack.layers, store)


def _started(scratch: str) -> tuple[str, UnionView, Node, PartialCopy]:
    """A view over the test's lower layer whose "big" file became a partial copy."""
    lower = _lower(scratch)
    view = _view(scratch, lower)
    node = view.lookup(ROOT_INO, b"big")
    assert node is not None and view.start_partial(node.ino)
    partial = view.partial(node.ino)
    assert partial is not None
    return lower, view, node, partial


def test_a_write_copies_only_the_chunks_it_touches(scratch: str) -> None:
    _, view, node, partial = _started(scratch)
    expected = bytearray(_lower_data())
    # Straddling two chunks: both are copied, no other.
    offset = 5 * CHUNK - 100
    assert partial.write(offset, b"W" * 200) == 200
    expected[offset : offset + 200] = b"W" * 200
    assert partial.copied == 2
    upper = os.path.join(scratch, "upper", "big")
    with open(upper, "rb") as handle:
        raw = handle.read()
    copied = {
        index for index in range(SIZE // CHUNK) if any(raw[index * CHUNK : (index + 1) * CHUNK])
    }
    assert copied == {4, 5}
    # The space of the chunks still to come is reserved (the fill cannot run
    # out of it), but holds no data yet.
    assert os.stat(upper).st_blocks * 512 >= SIZE
    assert partial.read(0, SIZE) == bytes(expected)
    # The same chunks again: nothing more is copied.
    assert partial.write(offset + 10, b"X") == 1
    expected[offset + 10] = ord("X")
    assert partial.copied == 2
    # The fill copies the rest, and the metadata-only marks go.
    job = view.prepare_copy(node)
    view.fill(job)
    view.finish_copy(job)
    assert partial.copied == SIZE // CHUNK
    assert view.partial(node.ino) is None and not node.metacopy
    with open(upper, "rb") as handle:
        assert handle.read() == bytes(expected)
    assert not [name for name in os.listxattr(upper) if "chunks" in name or "metacopy" in name]


def test_a_stopped_copy_is_read_right_and_finished_by_the_next_view(scratch: str) -> None:
    lower, view, _, partial = _started(scratch)
    expected = bytearray(_lower_data())
    partial.write(3 * CHUNK, b"kept")
    expected[3 * CHUNK : 3 * CHUNK + 4] = b"kept"
    partial.close()  # as a killed daemon leaves it: nothing else filled
    view.index.close()

    again = _view(scratch, lower)
    found = again.lookup(ROOT_INO, b"big")
    assert found is not None and found.metacopy
    resumed = again.partial(found.ino)
    assert resumed is not None and resumed.read(0, SIZE) == bytes(expected)
    again.complete_partials()
    assert again.partial(found.ino) is None
    with open(os.path.join(scratch, "upper", "big"), "rb") as handle:
        assert handle.read() == bytes(expected)


def test_a_reader_outside_the_mount_sees_the_data_and_writes_nothing(scratch: str) -> None:
    """diff and commit read a container through a view of their own, maybe
    while the mount fills the same copy: they get its data as it stands and
    never write UPPER."""
    lower, view, _, partial = _started(scratch)
    partial.write(2 * CHUNK + 5, b"changed")
    expected = bytearray(_lower_data())
    expected[2 * CHUNK + 5 : 2 * CHUNK + 12] = b"changed"
    upper = os.path.join(scratch, "upper", "big")
    before = (os.stat(upper).st_blocks, os.getxattr(upper, "trusted.overlay.strata.chunks"))

    reader = _view(scratch, lower, view.index)  # as `strata diff` beside a mount
    found = reader.lookup(ROOT_INO, b"big")
    assert found is not None
    fd = reader.open_data(found.ino)
    try:
        assert os.pread(fd, SIZE + 1, 0) == bytes(expected)
    finally:
        os.close(fd)
    reader.close()
    assert (os.stat(upper).st_blocks, os.getxattr(upper, "trusted.overlay.strata.chunks")) == before
    view.close()


def test_truncating_drops_the_partial_copy(scratch: str) -> None:
    _, view, node, partial = _started(scratch)
    partial.write(0, b"x")
    view.setattr(node.ino, size=0)
    assert view.partial(node.ino) is None and partial.closed
    assert not partial.fill_next()  # a fill still running copies nothing more
    assert os.stat(os.path.join(scratch, "upper", "big")).st_size == 0


def _digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_large_files_change_as_on_overlayfs(scratch: str) -> None:
    """Writes, O_APPEND, mmap, a reader opened before the copy, truncation up
    and down, rename and link of files whose copy is partial."""
    lower = os.path.join(scratch, "lower")
    for name in ("written", "appended", "mapped", "grown", "shrunk", "moved", "linked"):
        write(f"{lower}/{name}", _lower_data())

    def change(mount: str) -> dict[str, object]:
        seen: dict[str, object] = {}
        reader = os.open(f"{mount}/written", os.O_RDONLY)
        try:
            fd = os.open(f"{mount}/written", os.O_WRONLY)
            os.pwrite(fd, b"first", 7 * CHUNK + 3)
            os.pwrite(fd, b"last", SIZE - 2)  # past the end: the file grows by 2
            os.close(fd)
            seen["reader"] = os.pread(reader, 16, 7 * CHUNK)
        finally:
            os.close(reader)
        with open(f"{mount}/appended", "ab") as handle:
            handle.write(b"appended")
        with open(f"{mount}/mapped", "r+b") as handle:
            mapped = mmap.mmap(handle.fileno(), 0)
            mapped[CHUNK : CHUNK + 6] = b"mapped"
            mapped.flush()
            mapped.close()
        for name, size in (("grown", SIZE + CHUNK + 5), ("shrunk", 2 * CHUNK + 7)):
            with open(f"{mount}/{name}", "r+b") as handle:
                handle.write(b"head")
                handle.truncate(size)
        with open(f"{mount}/moved", "r+b") as handle:
            handle.seek(9 * CHUNK)
            handle.write(b"before the move")
            os.rename(f"{mount}/moved", f"{mount}/dir-moved")
            handle.write(b" and after")
        with open(f"{mount}/linked", "r+b") as handle:
            handle.write(b"before the link")
            os.link(f"{mount}/linked", f"{mount}/link2")
        return seen

    def look(mount: str) -> dict[str, tuple[int, str]]:
        return {
            name: (os.stat(f"{mount}/{name}").st_size, _digest(f"{mount}/{name}"))
            for name in sorted(os.listdir(mount))
        }

    seen = on_both(scratch, [lower], change, look)
    assert seen["strata"] == seen["overlayfs"]
    # And UPPER holds whole files after the unmount: overlayfs reads them the same.
    upper = os.path.join(scratch, "strata-upper")
    for name in os.listdir(upper):
        assert not [x for x in os.listxattr(f"{upper}/{name}") if "chunks" in x], name


_NO_BACKGROUND_FILL = """
import unionfs.fuse as fuse

async def no_fill(self, ino):
    return None
fuse.StrataOperations._fill_in_background = no_fill
"""


def test_a_killed_daemon_leaves_a_file_the_next_mount_reads_whole(scratch: str) -> None:
    lower = _lower(scratch)
    expected = bytearray(_lower_data())
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _NO_BACKGROUND_FILL, log_path) as (mount, daemon):
        with open(f"{mount}/big", "r+b") as handle:
            handle.seek(6 * CHUNK)
            handle.write(b"survives the kill")
        expected[6 * CHUNK : 6 * CHUNK + 17] = b"survives the kill"
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=60)
        force_unmount(mount)
    assert find_mount(mount) is None
    root = os.path.join(scratch, "store")
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    found = strata(root, "fsck", "--layer", lower, "--upper", upper, "--work", work, check=False)
    assert "big: copy-up in progress; mount it once to finish" in found.stdout, found.stdout
    with (
        strata_mount(root, [lower], mount, "--upper", upper, "--work", work),
        open(f"{mount}/big", "rb") as handle,
    ):
        assert handle.read() == bytes(expected)
    with open(f"{upper}/big", "rb") as handle:
        assert handle.read() == bytes(expected)
    result = strata(root, "fsck", "--layer", lower, "--upper", upper, "--work", work, check=False)
    assert result.returncode == 0, result.stdout


def test_concurrent_writers_and_the_fill_lose_nothing(scratch: str) -> None:
    *_, partial = _started(scratch)
    expected = bytearray(_lower_data())
    writes = [(index * CHUNK + index * 7, bytes([65 + index]) * 300) for index in range(16)]
    for offset, data in writes:
        expected[offset : offset + len(data)] = data

    def writer(part: list[tuple[int, bytes]]) -> None:
        for offset, data in part:
            partial.write(offset, data)

    threads = [threading.Thread(target=writer, args=(writes[n::2],)) for n in range(2)]
    filler = threading.Thread(target=lambda: [None for _ in iter(partial.fill_next, False)])
    for thread in (*threads, filler):
        thread.start()
    for thread in (*threads, filler):
        thread.join()
    assert partial.read(0, SIZE) == bytes(expected)
    assert partial.copied == SIZE // CHUNK  # each chunk once


_SLOW_FILL_AT_UNMOUNT = """
import time
import unionfs.fuse as fuse
from unionfs.core.chunks import PartialCopy

async def no_fill(self, ino):
    return None
fuse.StrataOperations._fill_in_background = no_fill

original_fill_next = PartialCopy.fill_next
def slow_fill_next(self):
    time.sleep(0.05)
    return original_fill_next(self)
PartialCopy.fill_next = slow_fill_next
"""


def test_strata_umount_returns_once_upper_holds_whole_files(scratch: str) -> None:
    lower = _lower(scratch)
    expected = bytearray(_lower_data())
    log_path = os.path.join(scratch, "daemon.log")
    upper = os.path.join(scratch, "upper")
    with patched_mount(scratch, lower, _SLOW_FILL_AT_UNMOUNT, log_path) as (mount, daemon):
        with open(f"{mount}/big", "r+b") as handle:
            handle.seek(CHUNK * 9)
            handle.write(b"at unmount")
        expected[CHUNK * 9 : CHUNK * 9 + 10] = b"at unmount"
        assert [x for x in os.listxattr(f"{upper}/big") if "chunks" in x]  # still partial
        strata(os.path.join(scratch, "store"), "umount", mount)
        # The daemon filled the copy before it exited, and umount waited for it.
        assert not [x for x in os.listxattr(f"{upper}/big") if "chunks" in x]
        with open(f"{upper}/big", "rb") as handle:
            assert handle.read() == bytes(expected)
    assert daemon.returncode == 0


_SLOW_REOPEN = """
import time
import unionfs.fuse as fuse
import unionfs.core.view as view

async def no_fill(self, ino):
    return None
fuse.StrataOperations._fill_in_background = no_fill

original_open_data = view.UnionView.open_data
def slow_open_data(self, ino, write=False):
    time.sleep(0.1)  # a wide window for reads in flight while a handle reopens
    return original_open_data(self, ino, write)
view.UnionView.open_data = slow_open_data
"""


def test_reads_in_flight_while_a_copy_up_ends_read_the_right_bytes(scratch: str) -> None:
    """Concurrent reads of one open file when its copy-up finished: each saw
    the data move and reopened it, and one closed the descriptor another was
    still reading (EBADF, or a number reused by another file: wrong bytes)."""
    lower = _lower(scratch)
    expected = _lower_data()
    log_path = os.path.join(scratch, "daemon.log")
    errors: list[BaseException] = []
    with patched_mount(scratch, lower, _SLOW_REOPEN, log_path) as (mount, daemon):
        writer = os.open(f"{mount}/big", os.O_WRONLY)  # a partial copy, not filled
        reader = os.open(f"{mount}/big", os.O_RDONLY | os.O_DIRECT)
        stop = threading.Event()

        def read_loop(start: int) -> None:
            offset = start
            try:
                while not stop.is_set():
                    data = os.pread(reader, CHUNK, offset)
                    assert data == expected[offset : offset + CHUNK], offset
                    offset = (offset + 3 * CHUNK) % SIZE
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=read_loop, args=(n * CHUNK,)) for n in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        os.rename(f"{mount}/big", f"{mount}/moved")  # needs the whole data: the copy ends
        time.sleep(1.5)
        stop.set()
        for thread in threads:
            thread.join()
        os.close(reader)
        os.close(writer)
    assert daemon.returncode == 0
    assert errors == []
