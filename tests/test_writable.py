"""The writable layer against the kernel's overlayfs: same operations, same results.

Both mount the same random stack with an empty upper directory of their own;
a seeded sequence of operations runs on both, each result (value or errno)
must match, and the full trees must match every 50 operations, after a
remount of both, and when each upper is mounted by the other implementation.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import replace

from tests.layers import write
from tests.mounts import WRITABLE_OVERLAY, on_both, overlay_mount, strata, strata_mount
from tests.ops import (
    KEEP_SIZE,
    KINDS,
    PUNCH_HOLE,
    ZERO_RANGE,
    Op,
    apply,
    choose,
    fallocate,
    tree_paths,
)
from tests.stackgen import generate, render
from tests.trees import Snapshot, differences, snapshot
from unionfs.mount import pid_file

DEFAULT_SEEDS = 70
OPERATIONS = 500
CHECK_EVERY = 50
# A file capability (cap_net_bind_service, effective), as setcap writes it.
CAPABILITY = bytes.fromhex("0100000200040000000000000000000000000000")


def _tree_differences(oracle: str, ours: str, since: int) -> list[str]:
    """Differences, mtimes included but those an operation set to when it ran
    (between *since* and now, with a margin for the kernel's coarse clock)."""
    window = (since - 2_000_000_000, time.time_ns() + 2_000_000_000)
    return differences(snapshot(oracle), snapshot(ours), changed_between=window)


def _without_hardlink_data(tree: Snapshot, other: Snapshot) -> Snapshot:
    """The tree with only the kind of each hardlinked file left.

    overlayfs (index=on) finds the names of a hardlinked lower file that it
    never copied up through its own index of file handles in WORK/index,
    which strata does not read: strata shows such names with the lower data.
    """
    linked = {path for t in (tree, other) for group in t.hardlink_groups for path in group}
    linked |= {path for t in (tree, other) for path, node in t.nodes.items() if node.nlink > 1}
    nodes = {
        path: replace(node, content=None, size=None, nlink=0, mode=0, uid=0, gid=0, xattrs=())
        if node.kind != "d" and path in linked
        else node
        for path, node in tree.nodes.items()
    }
    return replace(tree, nodes=nodes, hardlink_groups=set())


def _differences_but_hardlinks(expected: Snapshot, actual: Snapshot) -> list[str]:
    return differences(
        _without_hardlink_data(expected, actual),
        _without_hardlink_data(actual, expected),
        times=False,
    )


def test_operations_match_overlayfs(scratch: str, seed: int) -> None:
    """Random operations on strata and on overlayfs over the same layers give
    the same results and trees: with passthrough (upper files backed) for even
    seeds, without it for odd ones."""
    layers = render(generate(seed), os.path.join(scratch, "layers"), for_kernel=True)
    before = snapshot(os.path.join(scratch, "layers"))
    store = os.path.join(scratch, "store")
    kernel_upper, kernel_work = (os.path.join(scratch, name) for name in ("k-upper", "k-work"))
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(kernel_upper)
    os.makedirs(upper)
    overlay_point, strata_point = os.path.join(scratch, "overlay"), os.path.join(scratch, "strata")
    passthrough = "off" if seed % 2 else "auto"
    ours_args = ("--upper", upper, "--work", work)
    mount_args = (*ours_args, "--passthrough", passthrough)
    rng = random.Random(seed)
    log: list[str] = []
    since = time.time_ns()
    with (
        overlay_mount(
            layers, overlay_point, options=WRITABLE_OVERLAY, upper=kernel_upper, work=kernel_work
        ) as oracle,
        strata_mount(store, layers, strata_point, *mount_args) as ours,
    ):
        for step in range(1, OPERATIONS + 1):
            paths, dirs = tree_paths(oracle)
            op = choose(rng, paths, dirs)
            want = apply(oracle, op)
            if want == ("errno", "EXDEV"):
                # overlayfs cannot do this rename; strata can (README), so the
                # trees would part: the step is left out on both.
                continue
            got = apply(ours, op)
            log.append(f"{step}: {op} -> {want}")
            assert got == want, (
                f"seed {seed} step {step}: {op}\n oracle {want}\n ours   {got}\n"
                + "\n".join(log[-15:])
            )
            if step % CHECK_EVERY == 0:
                found = _tree_differences(oracle, ours, since)
                assert found == [], f"seed {seed} after step {step}:\n" + "\n".join(
                    [*log[-15:], "differences:", *found]
                )
    with (
        overlay_mount(
            layers, overlay_point, options=WRITABLE_OVERLAY, upper=kernel_upper, work=kernel_work
        ) as oracle,
        strata_mount(store, layers, strata_point, *mount_args) as ours,
    ):
        assert _tree_differences(oracle, ours, since) == [], "after remounting both"
        expected = snapshot(oracle)
    # An UPPER only strata wrote checks clean after a clean unmount.
    checked = strata(store, "fsck", *(f"--layer={layer}" for layer in layers), *ours_args,
                     check=False)  # fmt: skip
    assert checked.returncode == 0, f"seed {seed}: {checked.stdout}{checked.stderr}"
    # Each upper read by the other implementation shows the same tree.
    swapped = os.path.join(scratch, "swapped")
    with overlay_mount(
        layers,
        swapped,
        options="redirect_dir=on,metacopy=on",
        upper=upper,
        work=os.path.join(scratch, "w2"),
    ) as kernel_reads_ours:
        # Without its own index overlayfs counts a copied-up file's links in
        # UPPER alone; strata links every visible name there, so the data agrees.
        assert _differences_but_hardlinks(expected, snapshot(kernel_reads_ours)) == []
    with strata_mount(
        store, layers, swapped, "--upper", kernel_upper, "--work", os.path.join(scratch, "w3")
    ) as we_read_kernel:
        assert _differences_but_hardlinks(expected, snapshot(we_read_kernel)) == []
    assert differences(before, snapshot(os.path.join(scratch, "layers"))) == []
    assert not os.path.lexists("/nonexistent"), "an operation followed a layer's symlink out"


def test_operations_never_follow_a_symlink_out(scratch: str) -> None:
    """Every kind of operation on `link -> outside file` leaves that file alone
    (an earlier version wrote through a layer's `-> /etc/passwd`)."""
    outside = os.path.join(scratch, "outside")
    with open(outside, "wb") as handle:
        handle.write(b"host data\n")
    os.chmod(outside, 0o644)
    before = os.lstat(outside)
    tree = os.path.join(scratch, "tree")
    os.makedirs(tree)
    os.symlink(outside, os.path.join(tree, "link"))
    for kind in KINDS:
        for data in (b"", b"z"):
            apply(tree, Op(kind, "link", "other", 3, data))
    after = os.lstat(outside)
    with open(outside, "rb") as handle:
        assert handle.read() == b"host data\n"
    assert (after.st_mode, after.st_size, after.st_mtime_ns) == (
        before.st_mode,
        before.st_size,
        before.st_mtime_ns,
    )


def test_a_file_capability_survives_the_data_copy_of_a_metadata_only_copy(scratch: str) -> None:
    """chmod or link makes a metadata-only copy; a rename then copies its data
    in place, and the host kernel strips security.capability from any file
    written to: strata puts it back, and the file shows what overlayfs shows."""
    lower = os.path.join(scratch, "lower")
    os.makedirs(f"{lower}/d")
    for name in ("chmodded", "linked", "written"):
        path = write(f"{lower}/c/{name}", "x" * 300)
        os.setxattr(path, "security.capability", CAPABILITY)
        os.setxattr(path, "user.kept", b"yes")

    def change(mount: str) -> None:
        os.chmod(f"{mount}/c/chmodded", 0o700)
        os.rename(f"{mount}/c/chmodded", f"{mount}/d/chmodded")
        os.link(f"{mount}/c/linked", f"{mount}/d/link")
        os.rename(f"{mount}/c/linked", f"{mount}/d/linked")
        with open(f"{mount}/c/written", "r+") as handle:
            handle.write("y")  # a write strips it, on overlayfs as on any filesystem

    def look(mount: str) -> dict[str, list[str]]:
        names = ("d/chmodded", "d/linked", "d/link", "c/written")
        return {name: sorted(os.listxattr(f"{mount}/{name}")) for name in names}

    seen = on_both(scratch, [lower], change, look)
    print("OVERLAY", seen["overlayfs"])
    print("STRATA", seen["strata"])
    assert seen["strata"] == seen["overlayfs"]
    _, looked, _ = seen["strata"]
    assert looked == {
        "d/chmodded": ["security.capability", "user.kept"],
        "d/linked": ["security.capability", "user.kept"],
        "d/link": ["security.capability", "user.kept"],
        "c/written": ["user.kept"],
    }


def test_what_an_open_descriptor_shows_of_a_removed_or_replaced_directory(scratch: str) -> None:
    """fstat of a descriptor open on a directory that rmdir removed, or a
    rename replaced, shows st_nlink 0 and nothing of the directory that has
    its name now; the same for files, whose data still reads. overlayfs
    agrees for what the mount made; for what came from a lower layer it
    shows the lower inode's count, and strata keeps to POSIX (xfstests 035).
    A chmod through such a descriptor never reaches what has the name now."""
    lower = os.path.join(scratch, "lower")
    for name in ("lowa/inside", "lowb", "lowc"):
        os.makedirs(os.path.join(lower, name))
    write(f"{lower}/lowfile", b"lower file\n")
    write(f"{lower}/unread", b"never read before\n")

    def change(mount: str) -> dict[str, object]:
        seen: dict[str, object] = {}
        for base in ("new", "low"):  # made in the mount, or from the lower layer
            a, b, c = (f"{mount}/{base}{letter}" for letter in "abc")
            if base == "new":
                for path in (a, f"{a}/inside", b, c):
                    os.mkdir(path)
            fd = os.open(b, os.O_RDONLY | os.O_DIRECTORY)
            before = os.fstat(fd)
            os.rename(a, b)
            st = os.fstat(fd)
            seen[f"{base}: replaced"] = (st.st_nlink, st.st_mode, st.st_ino == before.st_ino)
            with contextlib.suppress(OSError):  # overlayfs changes the orphan, strata refuses
                os.fchmod(fd, 0o700)
            os.close(fd)
            seen[f"{base}: in its place"] = (sorted(os.listdir(b)), os.stat(b).st_mode & 0o7777)
            fd = os.open(c, os.O_RDONLY | os.O_DIRECTORY)
            os.rmdir(c)
            st = os.fstat(fd)
            seen[f"{base}: removed"] = (st.st_nlink, st.st_mode)
            os.close(fd)
        write(f"{mount}/newfile", b"new file\n")
        fd = os.open(f"{mount}/lowfile", os.O_RDONLY)
        os.rename(f"{mount}/newfile", f"{mount}/lowfile")
        seen["low: file replaced"] = (os.fstat(fd).st_nlink, os.read(fd, 100))
        os.close(fd)
        fd = os.open(f"{mount}/unread", os.O_RDONLY)  # its first read reaches the daemon
        os.unlink(f"{mount}/unread")
        seen["low: file removed"] = (os.fstat(fd).st_nlink, os.read(fd, 100))
        os.close(fd)
        return seen

    def look(mount: str) -> list[str]:
        return sorted(os.listdir(mount))

    seen = on_both(scratch, [lower], change, look)
    ours, theirs = seen["strata"], seen["overlayfs"]
    assert ours[1:] == theirs[1:]
    assert isinstance(ours[0], dict) and isinstance(theirs[0], dict)
    for key in ("new: replaced", "new: in its place", "new: removed"):
        assert ours[0][key] == theirs[0][key], key
    # overlayfs's chmod of the replaced lower directory copies it up to its old
    # place, over the one moved there, whose lower contents vanish from view.
    assert ours[0]["low: in its place"] == (["inside"], 0o755)
    assert ours[0]["new: replaced"][0] == ours[0]["new: removed"][0] == 0
    assert ours[0]["low: replaced"] == (0, theirs[0]["low: replaced"][1], True)
    assert ours[0]["low: removed"] == (0, theirs[0]["low: removed"][1])
    assert ours[0]["low: file replaced"] == (0, b"lower file\n")
    assert ours[0]["low: file removed"] == (0, b"never read before\n")


def test_a_file_open_after_its_last_name_went_takes_changes_as_on_overlayfs(
    scratch: str,
) -> None:
    """A file opened, then unlinked (or replaced by a rename), is changed
    through its descriptor as any file: fchown, fsetxattr, fgetxattr, a
    reopen through /proc. strata answered ESTALE to these (fchmod, futimens
    and ftruncate worked), for files the mount made and files copied up."""
    lower = os.path.join(scratch, "lower")
    write(f"{lower}/low", b"lower data\n")
    write(f"{lower}/lowreplaced", b"lower, replaced\n")

    def attempt(step: object) -> object:
        try:
            assert callable(step)
            return step()
        except OSError as error:
            return errno.errorcode[error.errno or 0]

    def reread(fd: int) -> bytes:
        again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            data = os.read(again, 100)
            os.write(again, b"+")
            return data
        finally:
            os.close(again)

    def changes(fd: int) -> list[object]:
        return [
            attempt(lambda: os.fchmod(fd, 0o640)),
            attempt(lambda: os.fchown(fd, 1234, 5678)),
            attempt(lambda: os.utime(fd, ns=(1_000_000_000, 2_000_000_000))),
            attempt(lambda: os.setxattr(fd, "user.note", b"kept")),
            attempt(lambda: os.getxattr(fd, "user.note")),
            attempt(lambda: sorted(os.listxattr(fd))),
            attempt(lambda: os.removexattr(fd, "user.note")),
            attempt(lambda: reread(fd)),
            attempt(lambda: os.ftruncate(fd, 4)),
        ]

    def change(mount: str) -> dict[str, object]:
        write(f"{mount}/new", b"new data\n")
        write(f"{mount}/newer", b"replaces\n")
        seen: dict[str, object] = {}
        removals: list[tuple[str, Callable[[], None]]] = [
            ("new", lambda: os.unlink(f"{mount}/new")),
            ("low", lambda: os.unlink(f"{mount}/low")),  # copied up by the open
            ("lowreplaced", lambda: os.rename(f"{mount}/newer", f"{mount}/lowreplaced")),
        ]
        for name, remove in removals:
            fd = os.open(f"{mount}/{name}", os.O_RDWR)
            remove()
            seen[name] = changes(fd)
            st = os.fstat(fd)
            seen[f"{name}: fstat"] = (oct(st.st_mode), st.st_uid, st.st_gid, st.st_size,
                                      st.st_nlink)  # fmt: skip
            os.close(fd)
        return seen

    def look(mount: str) -> list[tuple[str, bytes]]:
        return [(name, open(f"{mount}/{name}", "rb").read()) for name in sorted(os.listdir(mount))]

    seen = on_both(scratch, [lower], change, look)
    ours, theirs = seen["strata"], seen["overlayfs"]
    assert isinstance(theirs[0], dict)
    assert theirs[0]["new"][1:4] == [None, None, None]  # the oracle agrees it can be done
    assert ours == theirs


def test_files_open_by_no_name_hold_no_descriptor_once_forgotten(scratch: str) -> None:
    """What keeps a file open by no name (an anchor: an O_PATH descriptor in
    the daemon) goes when the kernel forgets the file: the daemon ends a
    workload of unlinked open files and unnamed O_TMPFILE files with the
    descriptors it began with."""
    lower, upper, work = (os.path.join(scratch, name) for name in ("lower", "upper", "work"))
    os.makedirs(lower)
    os.makedirs(upper)
    store, mount = os.path.join(scratch, "store"), os.path.join(scratch, "mnt")
    with strata_mount(store, [lower], mount, "--upper", upper, "--work", work):
        with open(pid_file(os.path.realpath(mount))) as handle:
            daemon = int(handle.read())

        def descriptors() -> int:
            return len(os.listdir(f"/proc/{daemon}/fd"))

        before = descriptors()
        for number in range(100):
            write(f"{mount}/f{number}", b"x")
            fd = os.open(f"{mount}/f{number}", os.O_RDWR)
            os.unlink(f"{mount}/f{number}")
            os.fchown(fd, 5, 5)  # through the anchor
            unnamed = os.open(mount, os.O_TMPFILE | os.O_RDWR, 0o600)
            os.fchown(unnamed, 6, 6)
            os.close(unnamed)
            os.close(fd)
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("2")  # the kernel forgets what it still held
        deadline = time.monotonic() + 10
        while descriptors() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert descriptors() == before
        assert os.listdir(mount) == []


def test_fallocate_in_every_mode_as_on_overlayfs(scratch: str) -> None:
    """Allocation, KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE on a new file, a lower
    file and a lower file large enough to be copied up chunk by chunk: the
    same answers, sizes and bytes as overlayfs, before and after a remount (a
    punched range of a chunked copy never reads the lower data again)."""
    lower = os.path.join(scratch, "lower")
    small, large = os.urandom(100_000), os.urandom(12 << 20)
    write(f"{lower}/small", small)
    write(f"{lower}/large", large)
    steps = [
        (0, 0, 200_000),  # allocate, growing the file
        (KEEP_SIZE, 190_000, 500_000),  # allocate past the end, size kept
        (PUNCH_HOLE | KEEP_SIZE, 4096, 3 * 4096),
        (PUNCH_HOLE | KEEP_SIZE, 6 << 20, 1 << 20),  # inside the large file's chunks
        (ZERO_RANGE, 50_000, 10_000),
        (ZERO_RANGE | KEEP_SIZE, 8 << 20, 100_000),
        (PUNCH_HOLE, 0, 4096),  # without KEEP_SIZE: refused
    ]

    def change(mount: str) -> list[object]:
        write(f"{mount}/new", b"n" * 30_000)
        answers: list[object] = []
        for name in ("new", "small", "large"):
            fd = os.open(f"{mount}/{name}", os.O_RDWR)
            try:
                for mode, offset, length in steps:
                    answers.append((name, mode, fallocate(fd, mode, offset, length)))
                answers.append(
                    (
                        name,
                        os.fstat(fd).st_size,
                        hashlib.sha256(os.pread(fd, 20 << 20, 0)).hexdigest(),
                    )
                )
            finally:
                os.close(fd)
        return answers

    def look(mount: str) -> dict[str, tuple[int, str]]:
        seen = {}
        for name in ("new", "small", "large"):
            with open(f"{mount}/{name}", "rb") as handle:
                data = handle.read()
            seen[name] = (len(data), hashlib.sha256(data).hexdigest())
        return seen

    results = on_both(scratch, [lower], change, look)
    assert results["strata"] == results["overlayfs"]
    answers = results["strata"][0]
    assert isinstance(answers, list)
    assert ("large", PUNCH_HOLE | KEEP_SIZE, "ok") in answers  # supported where tested
