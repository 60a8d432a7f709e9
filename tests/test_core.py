"""The union core, used directly: no FUSE, no mount."""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Any

import pytest

from tests.counting import count_scans
from tests.layers import opaque, whiteout, write
from unionfs import native
from unionfs.core.index import ROOT_INO, Index
from unionfs.core.layer import fingerprint
from unionfs.core.nodes import FsError, NodeMore
from unionfs.core.paths import open_beneath
from unionfs.core.records import Entry
from unionfs.core.stack import IndexedStack, prepare_stack
from unionfs.core.view import UnionView
from unionfs.errors import StrataError


class Stack:
    """Index a stack and resolve paths in its merged view."""

    def __init__(self, root: str, layers: list[str]) -> None:
        self.index = Index(os.path.join(root, "index"))
        self.prepared: IndexedStack = prepare_stack(self.index, layers)
        self.view = UnionView(self.index, self.prepared.root, self.prepared.layers)

    def close(self) -> None:
        self.view.close()
        self.index.close()

    def resolve(self, path: str) -> Entry | None:
        ino = ROOT_INO
        for name in filter(None, path.split("/")):
            node = self.view.lookup(ino, name.encode())
            if node is None:
                return None
            ino = node.ino
        return self.view.getattr(ino)

    def names(self, path: str = "") -> list[bytes]:
        entry = self.resolve(path)
        assert entry is not None
        return sorted(
            name for _, name, _ in self.view.listdir(entry.ino) if name not in (b".", b"..")
        )

    def read(self, path: str) -> bytes:
        entry = self.resolve(path)
        assert entry is not None
        fd = self.view.open_data(entry.ino)
        try:
            return os.pread(fd, 1 << 20, 0)
        finally:
            os.close(fd)


@pytest.fixture
def layers(scratch: str) -> list[str]:
    paths = [os.path.join(scratch, f"L{n}") for n in range(4)]
    for path in paths:
        os.mkdir(path)
    return paths


def open_stack(scratch: str, layers: list[str]) -> Stack:
    return Stack(os.path.join(scratch, "store"), layers)


def test_topmost_layer_wins_and_directories_merge(scratch: str, layers: list[str]) -> None:
    l0, l1 = layers[:2]
    write(f"{l0}/etc/a", "a0")
    write(f"{l0}/etc/b", "b0")
    write(f"{l1}/etc/b", "b1")
    write(f"{l1}/etc/c", "c1")
    stack = open_stack(scratch, [l0, l1])
    assert stack.names("etc") == [b"a", b"b", b"c"]
    assert stack.read("etc/a") == b"a0"
    assert stack.read("etc/b") == b"b1"
    assert stack.resolve("etc/missing") is None
    etc = stack.resolve("etc")
    assert etc is not None and etc.nlink == 2
    stack.close()


@pytest.mark.parametrize("style", ["oci", "overlay"])
def test_whiteouts_hide_lower_entries_and_never_show(
    scratch: str, layers: list[str], style: str
) -> None:
    l0, l1, l2 = layers[:3]
    write(f"{l0}/dir/gone", "x")
    write(f"{l0}/dir/kept", "x")
    write(f"{l0}/tree/deep/file", "x")
    whiteout(l1, "dir/gone", style)
    whiteout(l1, "tree", style)
    write(f"{l2}/dir/gone", "back")  # a higher layer may bring the name back
    stack = open_stack(scratch, [l0, l1])
    assert stack.names() == [b"dir"]
    assert stack.names("dir") == [b"kept"]
    assert stack.resolve("tree/deep/file") is None
    stack.close()
    stack = open_stack(scratch, [l0, l1, l2])
    assert stack.names("dir") == [b"gone", b"kept"]
    assert stack.read("dir/gone") == b"back"
    stack.close()


@pytest.mark.parametrize("style", ["oci", "trusted", "user"])
def test_opaque_directory_hides_everything_below(
    scratch: str, layers: list[str], style: str
) -> None:
    l0, l1, l2 = layers[:3]
    write(f"{l0}/app/old", "x")
    write(f"{l0}/app/sub/deeper", "x")
    opaque(l1, "app", style)
    write(f"{l1}/app/new", "x")
    write(f"{l2}/app/newest", "x")
    stack = open_stack(scratch, [l0, l1, l2])
    assert stack.names("app") == [b"new", b"newest"]
    app = stack.resolve("app")
    assert app is not None
    assert stack.view.listxattr(app.ino) == []  # the opaque mark is bookkeeping
    stack.close()


def test_type_changes_hide_in_both_directions(scratch: str, layers: list[str]) -> None:
    l0, l1 = layers[:2]
    write(f"{l0}/was-dir/inside", "x")
    write(f"{l0}/was-file", "x")
    write(f"{l1}/was-dir", "now a file")
    write(f"{l1}/was-file/inside-new", "x")
    stack = open_stack(scratch, [l0, l1])
    was_dir = stack.resolve("was-dir")
    assert was_dir is not None and stat.S_ISREG(was_dir.mode)
    assert stack.read("was-dir") == b"now a file"
    assert stack.names("was-file") == [b"inside-new"]
    stack.close()


def test_every_file_type_and_attribute_is_kept(scratch: str, layers: list[str]) -> None:
    l0 = layers[0]
    write(f"{l0}/setuid", "x", 0o4755)
    os.chown(f"{l0}/setuid", 1000, 1001)
    os.chmod(f"{l0}/setuid", 0o4755)
    os.utime(f"{l0}/setuid", ns=(123456789123456789, 987654321987654321))
    os.setxattr(f"{l0}/setuid", "user.note", b"hello")
    os.setxattr(f"{l0}/setuid", "trusted.overlay.redirect", b"hidden")
    os.symlink("target/path", f"{l0}/link")
    os.mkfifo(f"{l0}/fifo")
    os.mknod(f"{l0}/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(f"{l0}/disk", stat.S_IFBLK | 0o660, os.makedev(8, 1))
    os.makedirs(f"{l0}/sticky")
    os.chmod(f"{l0}/sticky", 0o1777)
    stack = open_stack(scratch, [l0])
    entry = stack.resolve("setuid")
    assert entry is not None
    assert stat.S_IMODE(entry.mode) == 0o4755 and (entry.uid, entry.gid) == (1000, 1001)
    assert entry.mtime_ns == 987654321987654321
    assert stack.view.listxattr(entry.ino) == [b"user.note"]
    assert stack.view.getxattr(entry.ino, b"user.note") == b"hello"
    with pytest.raises(FsError) as missing:
        stack.view.getxattr(entry.ino, b"trusted.overlay.redirect")
    assert missing.value.errno == errno.ENODATA
    link = stack.resolve("link")
    assert link is not None and stack.view.readlink(link.ino) == b"target/path"
    fifo, null, disk, sticky = (stack.resolve(n) for n in ("fifo", "null", "disk", "sticky"))
    assert fifo is not None and stat.S_ISFIFO(fifo.mode)
    assert null is not None and stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
    assert disk is not None and stat.S_ISBLK(disk.mode) and disk.rdev == os.makedev(8, 1)
    assert sticky is not None and stat.S_IMODE(sticky.mode) == 0o1777
    stack.close()


def test_hardlinks_share_one_inode(scratch: str, layers: list[str]) -> None:
    l0 = layers[0]
    write(f"{l0}/a/one", "shared")
    os.makedirs(f"{l0}/b")
    os.link(f"{l0}/a/one", f"{l0}/b/two")
    stack = open_stack(scratch, [l0])
    one, two = stack.resolve("a/one"), stack.resolve("b/two")
    assert one is not None and two is not None
    assert one.ino == two.ino and one.nlink == 2
    stack.close()


def test_inode_numbers_are_stable_across_reopen(scratch: str, layers: list[str]) -> None:
    l0, l1 = layers[:2]
    write(f"{l0}/d/f", "x")
    write(f"{l1}/d/g", "y")
    first = open_stack(scratch, [l0, l1])
    before = {p: first.resolve(p) for p in ("d", "d/f", "d/g")}
    first.close()
    second = open_stack(scratch, [l0, l1])
    assert second.prepared.merged_layers == 0
    after = {p: second.resolve(p) for p in ("d", "d/f", "d/g")}
    assert {p: e.ino for p, e in before.items() if e} == {p: e.ino for p, e in after.items() if e}
    inos = [e.ino for e in after.values() if e]
    assert len(set(inos)) == 3 and ROOT_INO not in inos
    second.close()


def test_a_stack_reuses_the_chain_of_its_lower_part(scratch: str, layers: list[str]) -> None:
    for number, layer in enumerate(layers):
        write(f"{layer}/f{number}", str(number))
    stack = open_stack(scratch, layers[:3])
    assert stack.prepared.merged_layers == 3
    stack.close()
    stack = open_stack(scratch, layers)
    assert stack.prepared.merged_layers == 1  # only the new top layer
    assert stack.names() == [b"f0", b"f1", b"f2", b"f3"]
    stack.close()
    stack = open_stack(scratch, layers[:2])
    assert stack.prepared.merged_layers == 0  # a prefix of an indexed stack
    stack.close()


def test_a_changed_layer_is_reindexed_not_served_stale(scratch: str, layers: list[str]) -> None:
    l0, l1 = layers[:2]
    write(f"{l0}/f", "old")
    write(f"{l1}/g", "x")
    stack = open_stack(scratch, [l0, l1])
    stack.close()
    write(f"{l0}/f", "new data")  # content and size change in place
    os.chmod(f"{l1}/g", 0o600)  # metadata only
    stack = open_stack(scratch, [l0, l1])
    assert stack.prepared.merged_layers == 2
    f, g = stack.resolve("f"), stack.resolve("g")
    assert f is not None and f.size == 8 and stack.read("f") == b"new data"
    assert g is not None and stat.S_IMODE(g.mode) == 0o600
    stack.close()


def test_fingerprint_sees_renames_and_new_files(layers: list[str]) -> None:
    l0 = layers[0]
    write(f"{l0}/d/f", "x")
    base = fingerprint(os.fsencode(l0))
    assert fingerprint(os.fsencode(l0)) == base
    os.rename(f"{l0}/d/f", f"{l0}/d/g")
    renamed = fingerprint(os.fsencode(l0))
    assert renamed != base
    write(f"{l0}/d/h")
    assert fingerprint(os.fsencode(l0)) != renamed


def test_long_names_and_deep_paths_keep_keys_small(scratch: str, layers: list[str]) -> None:
    l0 = layers[0]
    name = "n" * 255
    deep = "/".join(["d" * 200] * 17)  # with the name: a 3,700-byte path
    write(f"{l0}/{name}", "long")
    os.makedirs(f"{l0}/{deep}")
    write(f"{l0}/{deep}/{name}", "deep")
    stack = open_stack(scratch, [l0])
    assert stack.read(name) == b"long"
    assert stack.read(f"{deep}/{name}") == b"deep"
    stack.close()


def test_listing_offsets_resume_exactly(scratch: str, layers: list[str]) -> None:
    l0, l1 = layers[:2]
    for n in range(300):
        write(f"{(l0, l1)[n % 2]}/big/f{n:03}")
    stack = open_stack(scratch, [l0, l1])
    big = stack.resolve("big")
    assert big is not None
    full = list(stack.view.listdir(big.ino))
    assert [name for _, name, _ in full[:2]] == [b".", b".."]
    offsets = [offset for offset, _, _ in full]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert len(full) == 302
    for cut in (0, 1, 2, 57, 301):
        resumed = list(stack.view.listdir(big.ino, full[cut][0]))
        assert [name for _, name, _ in resumed] == [name for _, name, _ in full[cut + 1 :]]
    stack.close()


def test_a_listing_resumed_after_its_last_entry_reads_nothing(
    scratch: str, layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel asks once more after a listing's last entry; for a merged
    directory that meant a second scan of its UPPER directory for nothing.
    The last entry's offset says it is the last: resuming there lists
    nothing and scans nothing."""
    from unionfs.core.nodes import Caller

    for n in range(40):
        write(f"{layers[0]}/dir/f{n:02}")
    index, view, _ = _writable_view(scratch, layers[0])
    store = view.store
    assert store is not None
    directory = view.lookup(ROOT_INO, b"dir")
    assert directory is not None
    fd = view.create(directory.ino, b"new", 0o644, os.O_WRONLY, Caller(0, 0))[1]
    os.close(fd)
    view.unlink(directory.ino, b"f07")
    scans = count_scans(monkeypatch, store.root)
    list(view.listdir_with_attributes(directory.ino))  # (link counts are counted once)
    scans.clear()
    listed = list(view.listdir_with_attributes(directory.ino))
    names = [name for _, name, _, _ in listed]
    assert sorted(names) == sorted(
        [b".", b"..", b"new"] + [b"f%02d" % n for n in range(40) if n != 7]
    )
    assert scans == [b"dir"]
    last = listed[-1][0]
    assert last == max(offset for offset, _, _, _ in listed)
    assert list(view.listdir_with_attributes(directory.ino, last)) == []
    assert scans == [b"dir"]  # the end is known without a second scan
    for cut in (0, 1, 2, 20, len(listed) - 2):  # every other offset resumes as before
        resumed = [
            name for _, name, _, _ in view.listdir_with_attributes(directory.ino, listed[cut][0])
        ]
        assert resumed == names[cut + 1 :]
    view.close()
    index.close()


def test_lookup_counts_keep_nodes_until_forgotten(scratch: str, layers: list[str]) -> None:
    write(f"{layers[0]}/f", "x")
    stack = open_stack(scratch, [layers[0]])
    node = stack.view.lookup(ROOT_INO, b"f")
    assert node is not None
    entry = stack.view.getattr(node.ino)
    stack.view.lookup(ROOT_INO, b"f")
    stack.view.forget(node.ino, 1)
    assert stack.view.getattr(node.ino) == entry
    stack.view.forget(node.ino, 1)
    with pytest.raises(FsError):
        stack.view.getattr(node.ino)
    stack.view.forget(ROOT_INO, 5)
    assert stack.view.getattr(ROOT_INO).is_dir
    stack.close()


def test_opening_never_follows_a_symlink_inside_a_layer(scratch: str, layers: list[str]) -> None:
    l0 = layers[0]
    secret = write(os.path.join(scratch, "outside", "secret"), "host data")
    os.symlink(os.path.dirname(secret), f"{l0}/etc")
    os.makedirs(f"{l0}/x")
    os.symlink("../../outside", f"{l0}/x/up")
    fd = os.open(l0, os.O_PATH | os.O_DIRECTORY)
    try:
        os.stat(secret)  # in the dentry cache: a cached-only open would not refuse for that
        for rel in (b"etc/secret", b"x/up/secret", b"../outside/secret", b"/etc/passwd"):
            for cached_only in (False, True):
                with pytest.raises(OSError) as refused:
                    os.close(open_beneath(fd, rel, cached_only=cached_only))
                assert refused.value.errno in (
                    errno.ELOOP, errno.EXDEV, errno.ENOENT, errno.EINVAL, errno.EAGAIN
                )  # fmt: skip
    finally:
        os.close(fd)


def test_a_cached_open_reads_what_a_worker_thread_would(scratch: str, layers: list[str]) -> None:
    """The request thread opens a lower file itself only when no disk read can
    be needed; the file, its checks and its data are those of the slow path."""
    write(f"{layers[0]}/shared/file", "lower data")
    write(f"{layers[1]}/shared/other", "other")
    stack = open_stack(scratch, layers)
    try:
        entry = stack.resolve("shared/file")
        assert entry is not None
        slow = stack.view.open_data(entry.ino)  # the path is in the dentry cache after this
        fast = stack.view.open_cached(entry.ino)
        assert fast is not None
        try:
            assert os.fstat(fast).st_ino == os.fstat(slow).st_ino
            assert os.pread(fast, 100, 0) == os.pread(slow, 100, 0)
        finally:
            os.close(fast)
            os.close(slow)
        directory = stack.resolve("shared")
        assert directory is not None
        assert stack.view.open_cached(directory.ino) is None  # only regular files
    finally:
        stack.close()


def test_bad_layers_are_refused_with_a_message(scratch: str, layers: list[str]) -> None:
    index = Index(os.path.join(scratch, "store", "index"))
    with pytest.raises(StrataError, match="No such file"):
        prepare_stack(index, [os.path.join(scratch, "nope")])
    with pytest.raises(StrataError, match="not a directory"):
        prepare_stack(index, [write(os.path.join(scratch, "file"))])
    with pytest.raises(StrataError, match="no layers"):
        prepare_stack(index, [])
    index.close()


def test_nodes_of_lower_files_keep_no_entry(scratch: str, layers: list[str]) -> None:
    """Memory that stays small as images grow: a node per inode the kernel
    holds, but a file only in the lower layers keeps no entry (counted: the
    entries alive after more lookups than are kept at hand are those few)."""
    import gc

    from unionfs.core.reading import LOWER_ENTRIES_KEPT

    files = LOWER_ENTRIES_KEPT + 4000
    dirs = -(-files // 500)
    for index in range(files):
        write(f"{layers[index % 2]}/d{index // 500}/f{index}", b"x" * (index % 7))
    stack = open_stack(scratch, layers[:2])
    for index in range(files):
        assert stack.resolve(f"d{index // 500}/f{index}") is not None
    assert len(stack.view.nodes) == files + dirs + 1
    gc.collect()
    alive = sum(1 for thing in gc.get_objects() if isinstance(thing, Entry))
    assert alive <= LOWER_ENTRIES_KEPT + dirs + 1 + 64, alive
    # A plain file's node is one small object: its flags in one int, no
    # NodeMore (only the directories have one, for their lower path). Compiled
    # (unionfs.native), it holds a vtable pointer more and its ints unboxed.
    limit = 104 if "unionfs.core.nodes" in native.compiled() else 96
    assert max(sys.getsizeof(node) for node in stack.view.nodes.values()) <= limit
    more = sum(1 for thing in gc.get_objects() if isinstance(thing, NodeMore))
    assert more <= dirs + 1, more
    # Each node still finds its own entry, also past the ones kept at hand.
    for index in range(files):
        directory = stack.view.lookup(ROOT_INO, f"d{index // 500}".encode())
        assert directory is not None
        node = stack.view.lookup(directory.ino, f"f{index}".encode())
        assert node is not None and node.lower is not None
        assert node.lower.size == index % 7
    stack.close()


def test_a_node_that_moves_keeps_its_lower_entry(scratch: str, layers: list[str]) -> None:
    """A node found by its name must hold its entry before its name changes:
    after an unlink (open files keep the data) or a rename of it."""
    from unionfs.core.upper import UpperStore, probe_format

    write(f"{layers[0]}/dir/gone", "gone data")
    write(f"{layers[0]}/dir/moved", "moved data")
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    os.makedirs(work)
    index = Index(os.path.join(scratch, "index"))
    prepared = prepare_stack(index, [layers[0]])
    store = UpperStore(upper, work, probe_format(os.fsencode(work)), index.store_id())
    store.recover()
    view = UnionView(index, prepared.root, prepared.layers, store)
    directory = view.lookup(ROOT_INO, b"dir")
    assert directory is not None
    gone, moved = view.lookup(directory.ino, b"gone"), view.lookup(directory.ino, b"moved")
    assert gone is not None and moved is not None
    fd = view.open_data(gone.ino)
    view.unlink(directory.ino, b"gone")
    view._lower_entries.clear()  # nothing at hand: the node must hold it
    with pytest.raises(FsError) as nameless:
        view.getattr(gone.ino)  # no name finds it: what is open answers for it
    assert nameless.value.errno == errno.ESTALE
    last = view.last_attributes(gone.ino)
    assert last is not None and (last.size, last.nlink) == (len("gone data"), 0)
    assert os.pread(fd, 100, 0) == b"gone data"
    os.close(fd)
    view.rename(directory.ino, b"moved", ROOT_INO, b"elsewhere", 0)
    view._lower_entries.clear()
    assert view.getattr(moved.ino).size == len("moved data")
    fd = view.open_data(moved.ino)
    assert os.pread(fd, 100, 0) == b"moved data"
    os.close(fd)
    view.close()
    index.close()


def _writable_view(scratch: str, lower: str) -> tuple[Index, UnionView, str]:
    from unionfs.core.upper import UpperStore, probe_format

    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    os.makedirs(work)
    index = Index(os.path.join(scratch, "index"))
    prepared = prepare_stack(index, [lower])
    store = UpperStore(upper, work, probe_format(os.fsencode(work)), index.store_id())
    store.recover()
    return index, UnionView(index, prepared.root, prepared.layers, store), upper


def test_new_files_are_built_unnamed_in_place_unless_they_replace_a_whiteout(
    scratch: str, layers: list[str]
) -> None:
    """Where nothing below has the name, a new regular file is made unnamed in
    its directory and linked there (no temporary in WORK, no rename);
    directories, symlinks and whatever replaces a whiteout are built in WORK
    and moved in. Either way each is numbered, owned and chmod'd before it
    has its name, so a crash leaves nothing half-made."""
    from unionfs.core.nodes import Caller

    write(f"{layers[0]}/etc/old", "old")
    os.mkdir(f"{layers[0]}/etc/olddir")
    index, view, upper = _writable_view(scratch, layers[0])
    store = view.store
    assert store is not None
    caller = Caller(1234, 5678)
    etc = view.lookup(ROOT_INO, b"etc")
    assert etc is not None
    view.setattr(etc.ino, mode=0o755)  # the directory's copy-up is built in WORK

    def temporaries(start: int = store._serial) -> int:
        """Temporaries named in WORK since now (temp_path numbers them)."""
        return store._serial - start

    node, fd = view.create(etc.ino, b"new", 0o640, os.O_WRONLY, caller)
    os.write(fd, b"fresh")
    os.close(fd)
    directory = view.mkdir(etc.ino, b"newdir", 0o750, caller)
    link = view.symlink(etc.ino, b"newlink", b"target", caller)
    assert view.link(node.ino, etc.ino, b"hardlink") is node  # a second name, in place
    made_in_work = temporaries()
    for made, name, mode in (
        (node, "new", 0o640),
        (directory, "newdir", 0o750),
        (link, "newlink", None),
    ):
        st = os.lstat(f"{upper}/etc/{name}")
        assert (st.st_uid, st.st_gid) == (1234, 5678), name
        if mode is not None:
            assert stat.S_IMODE(st.st_mode) == mode, name
            assert store.stored_ino(os.fsencode(f"{upper}/etc/{name}")) == made.ino
    assert view.getattr(node.ino).size == 5

    view.unlink(etc.ino, b"old")  # a whiteout now hides the lower file
    view.rmdir(etc.ino, b"olddir")
    again, fd = view.create(etc.ino, b"old", 0o600, os.O_WRONLY, caller)
    os.close(fd)
    opaque = view.mkdir(etc.ino, b"olddir", 0o700, caller)
    assert made_in_work == 2  # the directory and the symlink, not the file nor its link
    # Two whiteouts, then the two objects that replace them.
    assert temporaries() == made_in_work + 4
    assert view.getattr(again.ino).size == 0
    view.unlink(etc.ino, b"old")  # the whiteout again, replaced by a hard link this time
    assert view.link(node.ino, etc.ino, b"old") is node
    assert temporaries() == made_in_work + 6
    assert os.lstat(f"{upper}/etc/old").st_ino == os.lstat(f"{upper}/etc/new").st_ino
    assert view.getattr(node.ino).nlink == 3
    assert opaque.opaque and store.is_opaque(b"etc/olddir")
    names = ["hardlink", "new", "newdir", "newlink", "old", "olddir"]
    assert sorted(os.listdir(f"{upper}/etc")) == names
    assert os.listdir(store.tmp) == []
    view.close()
    index.close()


def test_a_new_object_that_cannot_be_finished_is_not_left_half_made(
    scratch: str, layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built in place, an object whose numbering fails (EIO, a full UPPER)
    is removed again: the name stays free, in UPPER as in the view."""
    from unionfs.core.nodes import Caller

    os.mkdir(f"{layers[0]}/etc")
    index, view, upper = _writable_view(scratch, layers[0])
    store = view.store
    assert store is not None
    etc = view.lookup(ROOT_INO, b"etc")
    assert etc is not None
    view.setattr(etc.ino, mode=0o755)  # copied up before the faults begin

    real_setxattr = os.setxattr

    def failing(target: Any, name: str, *args: Any, **kwargs: Any) -> None:
        if os.fsencode(name) == store.ino_xattr:  # the object's number
            raise OSError(errno.EIO, "injected")
        real_setxattr(target, name, *args, **kwargs)

    monkeypatch.setattr(os, "setxattr", failing)
    with pytest.raises(OSError):
        view.create(etc.ino, b"file", 0o644, os.O_WRONLY, Caller(0, 0))
    with pytest.raises(OSError):
        view.mkdir(etc.ino, b"dir", 0o755, Caller(0, 0))
    assert os.listdir(f"{upper}/etc") == []
    assert view.lookup(etc.ino, b"file") is None and view.lookup(etc.ino, b"dir") is None
    view.close()
    index.close()


def _count_lstats(monkeypatch: pytest.MonkeyPatch, *, whole_paths: bool = False) -> list[bytes]:
    """The paths lstat'ed from now on (until monkeypatch.undo): by os.lstat,
    and (unless *whole_paths*) by os.stat of a name in a directory descriptor."""
    calls: list[bytes] = []
    real_lstat, real_stat = os.lstat, os.stat

    def counting_lstat(path: bytes, *args: object, **kwargs: object) -> os.stat_result:
        calls.append(os.fsencode(path))
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    def counting_stat(path: bytes | int, *args: object, **kwargs: object) -> os.stat_result:
        dir_fd = kwargs.get("dir_fd")
        if isinstance(dir_fd, int) and kwargs.get("follow_symlinks") is False:
            directory = os.readlink(f"/proc/self/fd/{dir_fd}").encode()
            calls.append(directory + b"/" + os.fsencode(path))  # type: ignore[arg-type]
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "lstat", counting_lstat)
    if not whole_paths:
        monkeypatch.setattr(os, "stat", counting_stat)
    return calls


def _count_xattr_reads(monkeypatch: pytest.MonkeyPatch, *, listings: bool = False) -> list[str]:
    """The xattr names os.getxattr reads from now on (until monkeypatch.undo),
    and with *listings* a "listxattr" for each os.listxattr."""
    calls: list[str] = []
    real_getxattr, real_listxattr = os.getxattr, os.listxattr

    def counting_getxattr(path: bytes, name: str, *args: object, **kwargs: object) -> bytes:
        calls.append(name)
        return real_getxattr(path, name, *args, **kwargs)  # type: ignore[arg-type]

    def counting_listxattr(*args: object, **kwargs: object) -> list[str]:
        calls.append("listxattr")
        return real_listxattr(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "getxattr", counting_getxattr)
    if listings:
        monkeypatch.setattr(os, "listxattr", counting_listxattr)
    return calls


def test_a_lookup_of_an_upper_name_takes_one_lstat_of_it(
    scratch: str, layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attributes a lookup answers with come from the lstat that found
    the name in UPPER, not from a second one."""
    from unionfs.core.nodes import Caller

    os.mkdir(f"{layers[0]}/etc")
    index, view, upper = _writable_view(scratch, layers[0])
    etc = view.lookup(ROOT_INO, b"etc")
    assert etc is not None
    node, fd = view.create(etc.ino, b"file", 0o644, os.O_WRONLY, Caller(0, 0))
    os.write(fd, b"twelve bytes")
    os.close(fd)
    view.forget(node.ino, 1)
    assert node.ino not in view.nodes
    calls = _count_lstats(monkeypatch)
    found = view.lookup_with_attributes(etc.ino, b"file")
    monkeypatch.undo()
    assert found is not None
    again, entry = found
    assert again.ino == node.ino and entry.size == 12 and entry.ino == node.ino
    assert [path for path in calls if path.endswith(b"/file")] == [os.fsencode(f"{upper}/etc/file")]
    view.close()
    index.close()


def test_a_name_resolved_again_to_its_upper_file_reads_no_xattr(
    scratch: str, layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup (or the peek of a rename or unlink, or a listing) of an upper
    name whose node the view holds answers from the node when the lstat finds
    the same host file there: its markers and number are not read again. A
    file that replaced the name (a host inode number may be reused) is
    resolved anew."""
    from unionfs.core.nodes import Caller

    os.mkdir(f"{layers[0]}/etc")
    write(f"{layers[0]}/etc/lower", "lower")
    index, view, upper = _writable_view(scratch, layers[0])
    etc = view.lookup(ROOT_INO, b"etc")
    assert etc is not None
    made, fd = view.create(etc.ino, b"made", 0o644, os.O_WRONLY, Caller(0, 0))
    os.close(fd)
    copied = view.lookup(etc.ino, b"lower")
    assert copied is not None
    view.setattr(copied.ino, mode=0o600)  # copied up: known by a later lookup
    assert view.lookup(etc.ino, b"lower") is copied
    sub = view.mkdir(etc.ino, b"sub", 0o755, Caller(0, 0))
    read = _count_xattr_reads(monkeypatch, listings=True)
    for name, node in ((b"made", made), (b"lower", copied), (b"sub", sub)):
        found = view.lookup_with_attributes(etc.ino, name)
        assert found is not None and found[0] is node
        assert found[1].ino == node.ino
        assert view.peek(etc.ino, name) is node
    listed = {name: node for _, name, node, _ in view.listdir_with_attributes(etc.ino)}
    assert (listed[b"made"], listed[b"lower"], listed[b"sub"]) == (made, copied, sub)
    assert read == []
    monkeypatch.undo()
    # The name given to another file: a new node, whatever its host number.
    view.unlink(etc.ino, b"made")
    again, fd = view.create(etc.ino, b"made", 0o644, os.O_WRONLY, Caller(0, 0))
    os.close(fd)
    assert again.ino != made.ino
    found = view.lookup_with_attributes(etc.ino, b"made")
    assert found is not None and found[0] is again
    # Renamed over: the name shows the moved file's node.
    view.rename(etc.ino, b"lower", etc.ino, b"made", 0)
    found = view.lookup_with_attributes(etc.ino, b"made")
    assert found is not None and found[0] is copied
    assert view.lookup(etc.ino, b"lower") is None
    with open(f"{upper}/etc/made", "rb") as data:
        assert data.read() == b"lower"
    view.close()
    index.close()


def test_names_are_found_in_upper_directories_by_their_descriptors(
    scratch: str, layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup in an upper directory lstats the name relative to a
    descriptor of that directory, not by a host path from UPPER's root, and
    a directory's attributes come from an fstat of it. The descriptor is the
    node's own directory: renamed, it finds the names there; a directory made
    where a removed one was is another node, with its own; a removed directory
    the kernel still holds finds nothing, not what lower layers had there."""
    from unionfs.core.nodes import Caller

    write(f"{layers[0]}/etc/old/lower", "lower")
    index, view, upper = _writable_view(scratch, layers[0])
    etc = view.lookup(ROOT_INO, b"etc")
    old = view.lookup(etc.ino, b"old") if etc is not None else None
    assert etc is not None and old is not None
    _, fd = view.create(old.ino, b"new", 0o644, os.O_WRONLY, Caller(0, 0))  # copies old up
    os.close(fd)
    assert view.lookup(old.ino, b"new") is not None
    paths = _count_lstats(monkeypatch, whole_paths=True)
    for name in (b"new", b"lower", b"missing"):
        view.lookup(old.ino, name)
    assert view.getattr(old.ino).ino == old.ino
    monkeypatch.undo()
    assert paths == []
    view.rename(etc.ino, b"old", ROOT_INO, b"moved", 0)
    found = view.lookup_with_attributes(old.ino, b"new")
    assert found is not None and found[1].size == 0
    lower = view.lookup(old.ino, b"lower")
    assert lower is not None
    view.unlink(old.ino, b"new")
    view.unlink(old.ino, b"lower")
    view.rmdir(ROOT_INO, b"moved")  # the kernel still holds old
    with pytest.raises(FsError) as caught:
        view.lookup(old.ino, b"lower")
    assert caught.value.errno == errno.ENOENT
    again = view.mkdir(ROOT_INO, b"moved", 0o755, Caller(0, 0))
    assert again.ino != old.ino
    _, fd = view.create(again.ino, b"other", 0o644, os.O_WRONLY, Caller(0, 0))
    os.write(fd, b"other")
    os.close(fd)
    found = view.lookup_with_attributes(again.ino, b"other")
    assert found is not None and found[1].size == 5
    assert os.listdir(f"{upper}/moved") == ["other"]
    view.close()
    index.close()


def test_a_listing_answers_with_the_stats_it_took_of_upper(
    scratch: str, layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """readdirplus: the attributes of an upper entry come from the stat the
    listing of the upper directory took, not from an lstat per entry."""
    from unionfs.core.nodes import Caller

    write(f"{layers[0]}/etc/lower", "lower")
    index, view, _ = _writable_view(scratch, layers[0])
    etc = view.lookup(ROOT_INO, b"etc")
    assert etc is not None
    for name in (b"a", b"b", b"c"):
        _, fd = view.create(etc.ino, name, 0o644, os.O_WRONLY, Caller(0, 0))
        os.write(fd, name * 3)
        os.close(fd)
    calls = _count_lstats(monkeypatch)
    listed = {name: entry for _, name, _, entry in view.listdir_with_attributes(etc.ino)}
    monkeypatch.undo()
    assert sorted(listed) == [b".", b"..", b"a", b"b", b"c", b"lower"]
    assert [listed[name].size for name in (b"a", b"b", b"c", b"lower")] == [3, 3, 3, 5]
    assert not [path for path in calls if path.rsplit(b"/", 1)[-1] in (b"a", b"b", b"c")]
    view.close()
    index.close()


def test_a_missing_file_capability_is_asked_of_the_host_once(
    scratch: str, layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel asks for security.capability before each write through
    passthrough. An upper file's answer is kept (a new file has none; one
    found without stays so) until an xattr of it changes through the view:
    the capability set, then removed, is seen each time."""
    from unionfs.core.nodes import Caller

    capability = bytes.fromhex("0100000200040000000000000000000000000000")
    write(f"{layers[0]}/etc/lower", "lower")
    index, view, upper = _writable_view(scratch, layers[0])
    etc = view.lookup(ROOT_INO, b"etc")
    lower = view.lookup(etc.ino, b"lower") if etc is not None else None
    assert etc is not None and lower is not None
    new, fd = view.create(etc.ino, b"new", 0o644, os.O_WRONLY, Caller(0, 0))
    os.close(fd)
    view.setattr(lower.ino, mode=0o600)  # copied up: nothing known of its xattrs yet
    asked = _count_xattr_reads(monkeypatch)
    for _ in range(3):
        assert view.find_xattr(new.ino, b"security.capability") is None
        assert view.find_xattr(lower.ino, b"security.capability") is None
    assert asked == ["security.capability"]  # the copied-up file's, once
    for node in (new, lower):
        view.setxattr(node.ino, b"security.capability", capability)
        assert view.find_xattr(node.ino, b"security.capability") == capability
        path = f"{upper}/etc/{node.name.decode()}"
        assert os.getxattr(path, "security.capability") == capability
        view.removexattr(node.ino, b"security.capability")
        assert view.find_xattr(node.ino, b"security.capability") is None
        assert view.find_xattr(node.ino, b"user.other") is None  # other names still asked
    monkeypatch.undo()
    view.close()
    index.close()


def test_a_directory_is_asked_for_its_default_acl_and_setgid_bit_once(
    scratch: str, layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each create asks its directory for a default ACL and the set-group-ID
    bit. Where the upper directory has neither, that is kept (and a directory
    made here knows it at once), until its xattrs or mode change through the
    view: the ACL and the bit set afterwards are each seen by the next create."""
    from unionfs.core import acl
    from unionfs.core.acl import GROUP_OBJ, OTHER, USER_OBJ, AclEntry
    from unionfs.core.nodes import Caller

    os.mkdir(f"{layers[0]}/etc")
    index, view, upper = _writable_view(scratch, layers[0])
    etc = view.lookup(ROOT_INO, b"etc")
    assert etc is not None
    asked = _count_xattr_reads(monkeypatch)
    lstats = _count_lstats(monkeypatch)
    made = view.mkdir(etc.ino, b"made", 0o755, Caller(0, 0))
    lstats.clear()  # (those of making it: etc's copy-up and its own placing)
    for number in range(3):
        for directory in (etc, made):
            _, fd = view.create(directory.ino, b"f%d" % number, 0o644, os.O_WRONLY, Caller(0, 0))
            os.close(fd)
    parents = (os.fsencode(f"{upper}/etc"), os.fsencode(f"{upper}/etc/made"))
    assert asked == [acl.DEFAULT.decode()]  # the copied-up etc's, once (by the mkdir)
    assert not [path for path in lstats if path in parents]
    monkeypatch.undo()
    default = acl.encode([AclEntry(USER_OBJ, 7), AclEntry(GROUP_OBJ, 5), AclEntry(OTHER, 0)])
    view.setxattr(etc.ino, acl.DEFAULT, default)
    _, fd = view.create(etc.ino, b"masked", 0o666, os.O_WRONLY, Caller(0, 0, umask=0))
    os.close(fd)
    assert stat.S_IMODE(os.lstat(f"{upper}/etc/masked").st_mode) == 0o640
    view.setattr(made.ino, mode=0o2775)
    _, fd = view.create(made.ino, b"grouped", 0o644, os.O_WRONLY, Caller(0, 4242))
    os.close(fd)
    assert os.lstat(f"{upper}/etc/made/grouped").st_gid == os.lstat(f"{upper}/etc/made").st_gid
    assert os.lstat(f"{upper}/etc/made/grouped").st_gid != 4242
    view.removexattr(etc.ino, acl.DEFAULT)
    _, fd = view.create(etc.ino, b"plain", 0o666, os.O_WRONLY, Caller(0, 0, umask=0o22))
    os.close(fd)
    assert stat.S_IMODE(os.lstat(f"{upper}/etc/plain").st_mode) == 0o644
    view.close()
    index.close()


def test_a_setattr_of_one_time_keeps_the_other_from_the_lstat_it_took(
    scratch: str, layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """touch -a keeps the mtime and touch -m the atime, read from the lstat
    that confirmed the file's name (two lstats a setattr: that one and the
    answer's); after a truncation in the same setattr, the mtime it set."""
    from unionfs.core.nodes import Caller

    os.mkdir(f"{layers[0]}/etc")
    index, view, upper = _writable_view(scratch, layers[0])
    etc = view.lookup(ROOT_INO, b"etc")
    assert etc is not None
    node, fd = view.create(etc.ino, b"file", 0o644, os.O_WRONLY, Caller(0, 0))
    os.write(fd, b"data")
    os.close(fd)
    second = 1_000_000_000
    view.setattr(node.ino, atime_ns=10 * second, mtime_ns=20 * second)
    calls = _count_lstats(monkeypatch)
    entry = view.setattr(node.ino, atime_ns=30 * second)
    assert (entry.atime_ns, entry.mtime_ns) == (30 * second, 20 * second)
    entry = view.setattr(node.ino, mtime_ns=40 * second)
    assert (entry.atime_ns, entry.mtime_ns) == (30 * second, 40 * second)
    assert len(calls) == 4, calls
    monkeypatch.undo()
    entry = view.setattr(node.ino, size=2, atime_ns=50 * second)
    st = os.lstat(f"{upper}/etc/file")
    assert (entry.size, entry.atime_ns) == (2, 50 * second)
    assert entry.mtime_ns == st.st_mtime_ns > 40 * second  # the truncation's
    view.close()
    index.close()


def test_entries_round_trip_through_the_index_encoding_and_stay_immutable(scratch: str) -> None:
    """An entry made from an lstat carries its fields in order (Entry is a
    named tuple built positionally), survives the index's encoding whole,
    and cannot be changed in place: _replace makes a changed copy."""
    from unionfs.core.records import entry_from_stat, pack_group, unpack_group

    path = os.path.join(scratch, "file")
    write(path, "twelve bytes")
    st = os.lstat(path)
    entry = entry_from_stat(7, st, 3, nlink=5, path=b"a/file", xattrs=((b"user.k", b"v"),))
    assert (entry.ino, entry.mode, entry.nlink, entry.uid, entry.gid) == (
        7, st.st_mode, 5, st.st_uid, st.st_gid,
    )  # fmt: skip
    assert (entry.size, entry.blocks, entry.layer, entry.path) == (12, st.st_blocks, 3, b"a/file")
    assert (entry.atime_ns, entry.mtime_ns, entry.ctime_ns) == (
        st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
    )  # fmt: skip
    assert (entry.listing, entry.host_ino, entry.target) == (0, 0, b"")
    assert unpack_group(pack_group([(b"file", entry)])) == [(b"file", entry)]
    with pytest.raises(AttributeError):
        entry.size = 0  # type: ignore[misc]
    changed = entry._replace(size=0)
    assert changed.size == 0 and entry.size == 12 and not entry.is_dir


def test_a_merged_directorys_link_count_reads_only_what_upper_holds(
    scratch: str, layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """st_nlink of a directory UPPER holds over lower ones counts its merged
    subdirectories from the lower listing's count (the index's) and UPPER's
    own names, whatever was made, removed or replaced: as a listing counts
    them, after a remount too, with no scan of the lower listing."""
    from unionfs.core.nodes import Caller
    from unionfs.core.upper import UpperStore, probe_format

    l0, l1 = layers[:2]
    for sub in ("kept", "replaced", "opaqued", "lowonly"):
        os.makedirs(f"{l0}/d/{sub}/inner")
    os.makedirs(f"{l0}/d/gone")
    write(f"{l0}/d/file", "x")
    write(f"{l0}/d/becomes_dir", "x")
    os.makedirs(f"{l1}/d/second")
    whiteout(l1, "d/lowonly", "oci")
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    os.makedirs(work)

    def open_view() -> tuple[Index, UnionView]:
        index = Index(os.path.join(scratch, "index"))
        prepared = prepare_stack(index, [l0, l1])
        store = UpperStore(upper, work, probe_format(os.fsencode(work)), index.store_id())
        store.recover()
        return index, UnionView(index, prepared.root, prepared.layers, store)

    def listed_subdirs(view: UnionView, ino: int) -> int:
        return sum(
            1
            for _, name, node in view.listdir(ino)
            if name not in (b".", b"..") and stat.S_ISDIR(node.mode)
        )

    index, view = open_view()
    d = view.lookup(ROOT_INO, b"d")
    assert d is not None
    caller = Caller(0, 0)
    gone = view.lookup(d.ino, b"gone")
    assert gone is not None
    view.rmdir(d.ino, b"gone")  # a lower subdirectory whited out
    for emptied in (b"replaced", b"opaqued"):
        sub_node = view.lookup(d.ino, emptied)
        assert sub_node is not None and view.lookup(sub_node.ino, b"inner") is not None
        view.rmdir(sub_node.ino, b"inner")
    view.rmdir(d.ino, b"replaced")
    os.close(view.create(d.ino, b"replaced", 0o644, os.O_WRONLY, caller)[1])  # dir -> file
    view.rmdir(d.ino, b"opaqued")
    view.mkdir(d.ino, b"opaqued", 0o755, caller)  # removed, made again: opaque
    view.unlink(d.ino, b"becomes_dir")
    view.mkdir(d.ino, b"becomes_dir", 0o755, caller)  # file -> dir
    view.mkdir(d.ino, b"new", 0o755, caller)  # only in UPPER
    os.close(view.create(d.ino, b"newfile", 0o644, os.O_WRONLY, caller)[1])
    expected = listed_subdirs(view, d.ino)
    assert expected == 5  # kept, opaqued, second, becomes_dir, new
    assert view.getattr(d.ino).nlink == 2 + expected
    view.close()
    index.close()

    index, view = open_view()  # a remount: nothing counted yet
    scans: list[int] = []
    real_scan = Index.scan

    def counted_scan(self: Index, *args: object, **kwargs: object) -> object:
        scans.append(1)
        return real_scan(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Index, "scan", counted_scan)
    d = view.lookup(ROOT_INO, b"d")
    assert d is not None
    assert view.getattr(d.ino).nlink == 2 + expected
    assert scans == []
    assert listed_subdirs(view, d.ino) == expected
    view.close()
    index.close()


def test_a_chown_lstats_the_file_once_before_the_change(
    scratch: str, layers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chown of an upper file takes the owner and mode it keeps from the
    lstat that found the file under its name (dpkg chowns each file it
    unpacks), then lstats it once more for the attributes it answers."""
    from unionfs.core.nodes import Caller

    os.mkdir(f"{layers[0]}/etc")
    index, view, _ = _writable_view(scratch, layers[0])
    etc = view.lookup(ROOT_INO, b"etc")
    assert etc is not None
    node, fd = view.create(etc.ino, b"file", 0o755, os.O_WRONLY, Caller(0, 0))
    os.close(fd)
    calls = _count_lstats(monkeypatch)
    entry = view.setattr(node.ino, uid=1000)
    monkeypatch.undo()
    assert len(calls) == 2, calls
    assert (entry.uid, entry.gid, stat.S_IMODE(entry.mode)) == (1000, 0, 0o755)
    assert view.setattr(node.ino, gid=50).gid == 50 and view.getattr(node.ino).uid == 1000
    view.close()
    index.close()


@pytest.mark.parametrize("removal", ["unlink", "rename over it"])
@pytest.mark.parametrize("made", ["in a lower layer", "in UPPER, before a remount"])
def test_a_file_keeps_its_attributes_when_the_one_name_the_kernel_knows_goes(
    scratch: str, layers: list[str], made: str, removal: str
) -> None:
    """A hard-linked file loses the one name the kernel looked up while it
    still holds the inode (an open file): its other names keep it, so it
    shows its remaining link count and opens by them, not as a file whose
    every name went (nlink 0, which made the kernel refuse to link it with
    ENOENT, and ENOENT for its other names)."""
    from unionfs.core.nodes import Caller
    from unionfs.core.upper import UpperStore, probe_format

    os.makedirs(f"{layers[0]}/a")
    os.makedirs(f"{layers[0]}/b")
    if made == "in a lower layer":
        write(f"{layers[0]}/a/x", "data\n")
        os.link(f"{layers[0]}/a/x", f"{layers[0]}/b/y")
    index, view, upper = _writable_view(scratch, layers[0])
    if made != "in a lower layer":
        a, b = view.lookup(ROOT_INO, b"a"), view.lookup(ROOT_INO, b"b")
        assert a is not None and b is not None
        node, fd = view.create(a.ino, b"x", 0o644, os.O_WRONLY, Caller(0, 0))
        os.write(fd, b"data\n")
        os.close(fd)
        view.link(node.ino, b.ino, b"y")
        view.close()
        index.close()
        index = Index(os.path.join(scratch, "index"))  # a remount: no name known
        prepared = prepare_stack(index, [layers[0]])
        work = os.path.join(scratch, "work")
        store = UpperStore(upper, work, probe_format(os.fsencode(work)), index.store_id())
        view = UnionView(index, prepared.root, prepared.layers, store)
    a, b = view.lookup(ROOT_INO, b"a"), view.lookup(ROOT_INO, b"b")
    assert a is not None and b is not None
    x = view.lookup(a.ino, b"x")  # the only name the kernel knows
    assert x is not None and view.getattr(x.ino).nlink == 2
    if removal == "unlink":
        view.unlink(a.ino, b"x")
    else:
        _, fd = view.create(a.ino, b"other", 0o644, os.O_WRONLY, Caller(0, 0))
        os.close(fd)
        view.rename(a.ino, b"other", a.ino, b"x", 0)
    assert view.getattr(x.ino).nlink == 1  # as fstat of a descriptor open on it shows
    y = view.lookup(b.ino, b"y")
    assert y is not None and y.ino == x.ino
    assert view.getattr(y.ino).nlink == 1
    view.link(y.ino, b.ino, b"z")
    assert view.getattr(y.ino).nlink == 2
    fd = view.open_data(y.ino)
    try:
        assert os.read(fd, 100) == b"data\n"
    finally:
        os.close(fd)
    view.close()
    index.close()


def test_a_hardlinked_file_changed_by_a_name_under_a_renamed_directory_keeps_that_name_in_upper(
    scratch: str, layers: list[str]
) -> None:
    """UPPER alone must hold what changed, so it can be stacked as a lower
    layer without its WORK. The shared copy of a hardlinked lower file is
    linked at every lower path the view still shows; a name reached through
    a renamed directory is at none, and a change made by it was found only
    in WORK's shared copy (UPPER stacked below a fresh one showed the file's
    old set-uid mode again). The name a change comes by, the one the file
    was last looked up by, is linked too, as overlayfs copies that name up."""
    write(f"{layers[0]}/old/f", "shared")
    os.chmod(f"{layers[0]}/old/f", 0o4755)
    os.link(f"{layers[0]}/old/f", f"{layers[0]}/other")
    os.link(f"{layers[0]}/old/f", f"{layers[0]}/old/g")
    _index, view, upper = _writable_view(scratch, layers[0])
    view.rename(ROOT_INO, b"old", ROOT_INO, b"new", 0)  # a redirect, no copy of the tree
    new = view.lookup(ROOT_INO, b"new")
    assert new is not None
    assert view.lookup(new.ino, b"g") is not None  # known, not changed by
    node = view.lookup(new.ino, b"f")
    assert node is not None and node.lower is not None and node.lower.nlink == 3
    view.setattr(node.ino, mode=0o755)
    st = os.lstat(f"{upper}/new/f")
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_ino == os.lstat(f"{upper}/other").st_ino  # one file for its names
    assert not os.path.lexists(f"{upper}/new/g")  # as overlayfs: only the name used
    with open(f"{upper}/new/f") as data:
        assert data.read() == "shared"

    # A change by a name looked up after the copy links that name too.
    view.forget(node.ino, 2)
    g = view.lookup(new.ino, b"g")
    assert g is not None and g.linked
    view.setattr(g.ino, uid=1000)
    assert os.lstat(f"{upper}/new/g").st_ino == st.st_ino
    assert os.lstat(f"{upper}/new/f").st_uid == 1000


def test_the_index_lock_file_has_blocks_for_every_page(scratch: str) -> None:
    """LMDB writes its reader table through a mapping of a sparse lock file:
    a reader slot first used on a new page of it while the disk is full
    would kill the daemon with SIGBUS. The index backs every page when it opens,
    a sparse lock file left by an older strata too."""
    path = os.path.join(scratch, "index")
    for _ in range(2):
        index = Index(path)
        index.close()
        lock = os.path.join(path, "lock.mdb")
        st = os.stat(lock)
        assert st.st_size >= 32896  # the reader table LMDB asks for 512 readers
        with open(lock, "rb") as handle:
            assert os.lseek(handle.fileno(), 0, os.SEEK_HOLE) == st.st_size
        os.truncate(lock, 0)
        os.truncate(lock, st.st_size)  # sparse again, as LMDB alone leaves it


def test_a_claim_on_upper_waits_for_a_holder_that_finishes_and_refuses_one_that_serves(
    scratch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One mount at a time on an UPPER (core/claim.py): a holder that serves
    is refused (after a grace for an unmount it has not seen yet), one that
    says it is finishing is waited for, and one that finishes for longer is
    refused as such."""
    import threading

    from unionfs.core import claim

    monkeypatch.setattr(claim, "SEEING_UNMOUNT", 0.2)
    monkeypatch.setattr(claim, "FINISHING", 1.0)
    work = os.path.join(scratch, "work")
    os.makedirs(work)
    held = claim.claim(work)
    with pytest.raises(claim.Claimed) as refused:
        claim.claim(work)
    assert not refused.value.finishing
    assert claim.is_claimed(work)
    held.finishing()
    with pytest.raises(claim.Claimed) as refused:
        claim.claim(work)
    assert refused.value.finishing
    timer = threading.Timer(0.3, held.release)
    timer.start()
    try:
        mine = claim.claim(work)  # waits for the release
    finally:
        timer.join()
    assert claim.is_claimed(work)
    mine.release()
    assert not claim.is_claimed(work)
