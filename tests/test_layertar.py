"""Layer tars without mounting: unpacking rules and reproducible writing."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile

from tests.hostile import file_entry, layer_tar, special_entry
from unionfs.core.layer import IMPLICIT_XATTRS
from unionfs.image.layertar import LayerWriter, tar_info, unpack_layer


def unpack(target: str, tar: bytes) -> list[str]:
    os.makedirs(target)
    result = unpack_layer(io.BytesIO(gzip.compress(tar)), target, limit=1 << 30, label="test")
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    return result.implicit


def test_a_later_entry_replaces_an_earlier_one(scratch: str) -> None:
    tar = layer_tar(
        file_entry("x", b"first"),
        special_entry("x/", tarfile.DIRTYPE),  # the file becomes a directory
        file_entry("x/inside", b"in"),
        special_entry("d/", tarfile.DIRTYPE),
        file_entry("d/child", b"child"),
        file_entry("d", b"now a file"),  # the directory and its child go
        file_entry("same", b"one"),
        file_entry("same", b"two"),
    )
    unpack(f"{scratch}/layer", tar)
    root = f"{scratch}/layer"
    assert sorted(os.listdir(root)) == ["d", "same", "x"]
    with open(f"{root}/x/inside") as handle:
        assert handle.read() == "in"
    with open(f"{root}/d") as handle:
        assert handle.read() == "now a file"
    with open(f"{root}/same") as handle:
        assert handle.read() == "two"


def test_implied_directories_are_marked_and_timed(scratch: str) -> None:
    tar = layer_tar(file_entry("a/b/file", b"x", mtime=1_500_000_000))
    implicit = unpack(f"{scratch}/layer", tar)
    assert implicit == ["", "a", "a/b"]  # the root too: the tar has no ./ entry
    names = {os.fsdecode(name) for name in IMPLICIT_XATTRS}
    for rel in ("a", "a/b"):
        path = f"{scratch}/layer/{rel}"
        assert names & set(os.listxattr(path))
        assert os.stat(path).st_mtime == 1_500_000_000  # the implying entry's time


def test_whiteouts_beneath_a_replacing_symlink_are_skipped(scratch: str) -> None:
    """umoci writes them after the symlink that replaced a directory."""
    tar = layer_tar(
        special_entry("lib/was-dir", tarfile.SYMTYPE, "/srv"),
        file_entry("lib/was-dir/.wh.inner", b""),
    )
    unpack(f"{scratch}/layer", tar)
    assert os.readlink(f"{scratch}/layer/lib/was-dir") == "/srv"
    assert os.listdir(f"{scratch}/layer/lib") == ["was-dir"]


def test_written_layers_are_reproducible_and_unpack_again(scratch: str) -> None:
    def write() -> tuple[str, str]:
        buffer = io.BytesIO()
        writer = LayerWriter(buffer)
        writer.add(tar_info("dir", kind=tarfile.DIRTYPE, mode=0o755, uid=0, gid=0, mtime=5))
        data = b"content"
        info = tar_info("dir/file", kind=tarfile.REGTYPE, mode=0o4755, uid=1, gid=2, mtime=7)
        info.size = len(data)
        writer.add(info, io.BytesIO(data), xattrs=[(b"user.k", b"\xff\x00binary")])
        link = tar_info("dir/link", kind=tarfile.LNKTYPE, mode=0o4755, uid=1, gid=2, mtime=7)
        link.linkname = "dir/file"
        writer.add(link)
        written = writer.close()
        with open(f"{scratch}/blob", "wb") as handle:
            handle.write(buffer.getvalue())
        return written.digest, written.diff_id

    first, second = write(), write()
    assert first == second
    os.makedirs(f"{scratch}/layer")
    with open(f"{scratch}/blob", "rb") as blob:
        result = unpack_layer(blob, f"{scratch}/layer", limit=1 << 20, label="test")
    assert result.diff_id == first[1]
    st = os.stat(f"{scratch}/layer/dir/file")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_nlink) == (0o4755, 1, 2, 2)
    assert os.getxattr(f"{scratch}/layer/dir/file", "user.k") == b"\xff\x00binary"
