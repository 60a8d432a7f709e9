"""Names of 255 bytes and paths of PATH_MAX and beyond, against the kernel's overlayfs.

Every operation that makes a name runs with a 255-byte name, in a shallow
directory and at the end of a chain of 255-byte directories whose merged path
is 4095 bytes (the lower layer's chain goes deeper still, past PATH_MAX, and
its last file must be served too). Deep places are reached by directory
descriptors, as a program would with openat(2).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

from tests.layers import write
from tests.mounts import on_both

CHAIN = [bytes([ord("a") + index]) * 255 for index in range(17)]  # 17 x 256 > PATH_MAX
DEPTH = 15  # 15 directories + a 255-byte name: 4095 bytes, the longest merged path


def name(letter: str) -> bytes:
    return letter.encode() * 255


def _walk(top: str, parts: list[bytes], make: bool = False) -> int:
    """A descriptor of top/parts..., made on the way if *make*."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for part in parts:
        if make:
            os.mkdir(part, 0o755, dir_fd=fd)
        deeper = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = deeper
    return fd


def _lower(scratch: str) -> str:
    lower = os.path.join(scratch, "lower")
    write(os.path.join(lower, "d", os.fsdecode(name("l"))), "shallow lower")
    fd = _walk(lower, CHAIN, make=True)
    try:
        for directory in (fd,):
            made = os.open(b"end", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=directory)
            os.write(made, b"beyond PATH_MAX")
            os.close(made)
    finally:
        os.close(fd)
    fd = _walk(lower, CHAIN[:DEPTH])
    try:
        made = os.open(name("l"), os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(made, b"deep lower")
        os.close(made)
    finally:
        os.close(fd)
    return lower


def _result(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _stat_view(d: int, entry: bytes) -> tuple[int, int, int]:
    st = os.stat(entry, dir_fd=d, follow_symlinks=False)
    size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
    return (st.st_mode, size, 0 if stat.S_ISDIR(st.st_mode) else st.st_nlink)


def _create(d: int, entry: bytes, flags: int) -> tuple[int, int, int]:
    fd = os.open(entry, flags | os.O_WRONLY, 0o644, dir_fd=d)
    os.write(fd, b"data")
    os.close(fd)
    return _stat_view(d, entry)


def _operations(d: int) -> list[tuple[str, Any]]:
    """Every operation that makes, moves or removes a 255-byte name in *d*."""
    at = f"/proc/self/fd/{d}/".encode()
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("create", lambda: _create(d, name("c"), os.O_CREAT)),
        ("open O_CREAT|O_EXCL", lambda: _create(d, name("o"), os.O_CREAT | os.O_EXCL)),
        ("mkdir", lambda: os.mkdir(name("m"), 0o755, dir_fd=d)),
        ("mknod", lambda: os.mknod(name("k"), stat.S_IFCHR | 0o600, os.makedev(1, 3), dir_fd=d)),
        ("mkfifo", lambda: os.mkfifo(name("f"), 0o640, dir_fd=d)),
        ("symlink", lambda: os.symlink(b"target", name("s"), dir_fd=d)),
        ("link", lambda: os.link(name("c"), name("h"), src_dir_fd=d, dst_dir_fd=d)),
        ("rename", lambda: os.rename(name("h"), name("r"), src_dir_fd=d, dst_dir_fd=d)),
        ("rename lower", lambda: os.rename(name("l"), name("n"), src_dir_fd=d, dst_dir_fd=d)),
        ("rename dir", lambda: os.rename(name("m"), name("q"), src_dir_fd=d, dst_dir_fd=d)),
        ("chmod", lambda: os.chmod(name("n"), 0o600, dir_fd=d)),
        ("setxattr", lambda: os.setxattr(at + name("c"), "user.tag", b"v")),
        ("getxattr", lambda: os.getxattr(at + name("c"), "user.tag")),
        ("read", lambda: _read(d, name("n"))),
        ("unlink", lambda: os.unlink(name("o"), dir_fd=d)),
        ("rmdir", lambda: os.rmdir(name("q"), dir_fd=d)),
        ("unlink fifo", lambda: os.unlink(name("f"), dir_fd=d)),
    ]
    return [(label, _result(call)) for label, call in steps]


def _read(d: int, entry: bytes) -> bytes:
    fd = os.open(entry, os.O_RDONLY, dir_fd=d)
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def _state(d: int) -> list[tuple[bytes, Any]]:
    return [(entry, _stat_view(d, entry)) for entry in sorted(map(os.fsencode, os.listdir(d)))]


def _run(mount: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for where, parts in (("shallow", [b"d"]), ("deep", CHAIN[:DEPTH])):
        fd = _walk(mount, parts)
        try:
            seen[where] = _operations(fd)
            seen[where + " state"] = _state(fd)
        finally:
            os.close(fd)
    fd = _walk(mount, CHAIN)
    try:
        seen["beyond PATH_MAX"] = _read(fd, b"end")
    finally:
        os.close(fd)
    return seen


def _after_remount(mount: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for where, parts in (("shallow", [b"d"]), ("deep", CHAIN[:DEPTH])):
        fd = _walk(mount, parts)
        try:
            seen[where] = (_state(fd), _read(fd, name("c")), _read(fd, name("n")))
        finally:
            os.close(fd)
    return seen


def test_long_names_and_paths_match_overlayfs(scratch: str) -> None:
    seen = on_both(scratch, [_lower(scratch)], _run, _after_remount)
    kernel, ours = seen["overlayfs"], seen["strata"]
    live = kernel[0]
    assert isinstance(live, dict) and live["beyond PATH_MAX"] == b"beyond PATH_MAX"
    assert all(not isinstance(result, str) for _, result in live["deep"]), live["deep"]
    assert ours == kernel


def test_a_layer_tar_deeper_than_path_max_unpacks_and_mounts(scratch: str) -> None:
    """Its entries are written by descriptor; the mounted image serves them."""
    from tests.hostile import LayoutLayer, file_entry, layer_tar, write_layout
    from tests.mounts import strata
    from tests.test_images import Mounted

    deep = "/".join(os.fsdecode(part) for part in CHAIN)
    layer = layer_tar(
        file_entry(f"{deep}/end", b"beyond PATH_MAX"),
        file_entry(f"{deep}/{'x' * 255}", b"long name, deep"),
    )
    store = os.path.join(scratch, "store")
    strata(store, "import", write_layout(os.path.join(scratch, "layout"), [LayoutLayer(layer)]))
    with Mounted(store, os.path.join(scratch, "mnt"), "--read-only", "layout:v1") as mount:
        fd = _walk(mount, CHAIN)
        try:
            assert _read(fd, b"end") == b"beyond PATH_MAX"
            assert _read(fd, b"x" * 255) == b"long name, deep"
        finally:
            os.close(fd)
