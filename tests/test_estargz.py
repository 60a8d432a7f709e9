"""`strata convert --estargz`: the layers are eStargz as stargz-snapshotter
reads it (checked here with Python's own gzip and tarfile, not with strata's
reader), the image mounts as the original did, and skopeo and umoci read it
as an ordinary gzip image. Hostile TOCs are refused by the reader."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import zlib
from typing import Any

import pytest

from tests.hostile import file_entry, layer_tar, special_entry
from tests.images import build_busybox, run, umoci_rootfs
from tests.mounts import strata
from tests.registry import run_registry
from tests.test_images import Mounted
from tests.trees import differences, snapshot
from unionfs.errors import StrataError
from unionfs.lazy import estargz

ANNOTATION = estargz.TOC_DIGEST_ANNOTATION


def member_data(blob: bytes, offset: int, size: int) -> bytes:
    """*size* bytes of the gzip member that starts at *offset* (one member only)."""
    return zlib.decompressobj(31).decompress(blob[offset:], size)


def toc_of(blob: bytes) -> tuple[int, dict[str, Any]]:
    """The TOC's offset and content, read as any gzip and tar reader would."""
    tail = blob[-estargz.FOOTER_SIZE :]
    assert tail[12:14] == b"SG" and tail[32:38] == b"STARGZ"
    offset = int(tail[16:32], 16)
    assert gzip.decompress(tail) == b""  # the footer is an empty gzip member
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob[offset:-51]))) as tar:
        names = tar.getnames()
        assert names == [estargz.TOC_NAME]
        handle = tar.extractfile(names[0])
        assert handle is not None
        return offset, json.loads(handle.read())


def check_layer(blob: bytes, diff_id: str, toc_digest: str) -> dict[str, bytes]:
    """Checks one converted layer; returns its regular files' data by name."""
    plain = gzip.decompress(blob)
    assert "sha256:" + hashlib.sha256(plain).hexdigest() == diff_id
    offset, toc = toc_of(blob)
    with tarfile.open(fileobj=io.BytesIO(blob[offset:-51]), mode="r:gz") as tar:
        toc_bytes = tar.extractfile(estargz.TOC_NAME).read()  # type: ignore[union-attr]
    assert "sha256:" + hashlib.sha256(toc_bytes).hexdigest() == toc_digest
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        members = tar.getmembers()
        assert members[-1].name == estargz.TOC_NAME
        for member in members:
            if member.isreg():
                files[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    # Every regular file's data, chunk by chunk, from its own gzip member.
    rebuilt: dict[str, bytearray] = {}
    for entry in toc["entries"]:
        if entry["type"] not in ("reg", "chunk") or (entry["type"] == "reg" and not entry["size"]):
            continue
        data = files[entry["name"]]
        start = entry.get("chunkOffset", 0)
        size = entry["chunkSize"] or len(data) - start
        chunk = member_data(blob, entry["offset"], size)
        assert chunk == data[start : start + size]
        assert entry["chunkDigest"] == "sha256:" + hashlib.sha256(chunk).hexdigest()
        rebuilt.setdefault(entry["name"], bytearray()).extend(chunk)
        if entry["type"] == "reg":
            assert entry["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert {name: bytes(data) for name, data in rebuilt.items()} == {
        name: data for name, data in files.items() if data and name != estargz.TOC_NAME
    }
    return files


@pytest.fixture
def converted(scratch: str) -> tuple[str, str]:
    """busybox imported, and converted with a prefetch list; returns (store, layout)."""
    layout, tag = build_busybox(f"{scratch}/image")
    store = f"{scratch}/store"
    strata(store, "import", f"oci:{layout}:{tag}", "busybox")
    with open(f"{scratch}/prefetch", "w") as handle:
        handle.write("bin/busybox\n/etc/passwd\nnot/there\n")
    strata(store, "convert", "--estargz", "busybox", "busybox:esgz", "--prefetch",
           f"{scratch}/prefetch")  # fmt: skip
    return store, layout


def test_converted_layers_are_estargz(scratch: str, converted: tuple[str, str]) -> None:
    store, _ = converted
    info = json.loads(strata(store, "inspect", "busybox:esgz").stdout)
    config = json.loads(strata(store, "inspect", "busybox").stdout)
    layers = info["manifest"]["layers"]
    diff_ids = info["config"]["rootfs"]["diff_ids"]
    assert (
        len(layers) == len(config["manifest"]["layers"])
        and diff_ids != (config["config"]["rootfs"]["diff_ids"])
    )
    assert info["config"]["history"] == config["config"]["history"]
    for layer, diff_id in zip(layers, diff_ids, strict=True):
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        with open(f"{store}/blobs/sha256/{layer['digest'][7:]}", "rb") as handle:
            blob = handle.read()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
        check_layer(blob, diff_id, layer["annotations"][ANNOTATION])
        uncompressed = int(layer["annotations"][estargz.UNCOMPRESSED_SIZE_ANNOTATION])
        assert uncompressed == len(gzip.decompress(blob))
    # The first layer holds the prefetched files, before the landmark.
    with open(f"{store}/blobs/sha256/{layers[0]['digest'][7:]}", "rb") as handle:
        names = [entry["name"] for entry in toc_of(handle.read())[1]["entries"]]
    landmark = names.index(estargz.PREFETCH_LANDMARK)
    assert names.index("bin/busybox") < landmark and names.index("etc/passwd") < landmark
    assert names.index("bin/") < names.index("bin/busybox")
    assert estargz.NO_PREFETCH_LANDMARK not in names and "not/there" not in names
    # Layers without any listed file start with the no-prefetch landmark.
    with open(f"{store}/blobs/sha256/{layers[1]['digest'][7:]}", "rb") as handle:
        names = [entry["name"] for entry in toc_of(handle.read())[1]["entries"]]
    assert names[0] == estargz.NO_PREFETCH_LANDMARK


def test_converted_image_mounts_as_the_original(scratch: str, converted: tuple[str, str]) -> None:
    store, _ = converted
    with Mounted(store, f"{scratch}/a", "busybox", "--read-only") as original:
        expected = snapshot(original)
    with Mounted(store, f"{scratch}/b", "busybox:esgz", "--read-only") as mnt:
        assert not set(os.listdir(mnt)) & estargz.FORMAT_ENTRIES
        assert differences(expected, snapshot(mnt)) == []


def test_other_tools_read_the_converted_image(scratch: str, converted: tuple[str, str]) -> None:
    """Pushed to a registry, skopeo copies it (checking every digest) and umoci
    unpacks what the original held, plus the format's own entries."""
    store, layout = converted
    with run_registry(f"{scratch}/registry") as registry:
        image = f"{registry.host}/esgz:latest"
        strata(store, "push", "--tls-verify=false", "busybox:esgz", image)
        raw = run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{image}")
        assert all(ANNOTATION in layer["annotations"] for layer in json.loads(raw)["layers"])
        run("skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{image}",
            f"oci:{scratch}/copied:esgz")  # fmt: skip
    ours = snapshot(umoci_rootfs(f"{scratch}/copied", "esgz", f"{scratch}/ours"))
    theirs = snapshot(umoci_rootfs(layout, "v1", f"{scratch}/theirs"))
    format_entries = {os.fsencode(name) for name in estargz.FORMAT_ENTRIES}
    assert format_entries <= set(ours.nodes)  # one layer has a prefetch list, two do not
    for name in format_entries:
        ours.nodes.pop(name, None)
    ours.listings[b""] = [name for name in ours.listings[b""] if name not in format_entries]
    assert differences(theirs, ours, times=False) == []


def test_large_files_are_chunked() -> None:
    big = os.urandom(300_000)
    source = layer_tar(
        special_entry("data/", tarfile.DIRTYPE),
        file_entry("data/big", big),
        file_entry("data/empty", b""),
        special_entry("data/link", tarfile.LNKTYPE, "data/big"),
    )
    target = io.BytesIO()
    result = estargz.convert_tar(io.BytesIO(source), target, chunk_size=64 << 10)
    blob = target.getvalue()
    files = check_layer(blob, result.diff_id, result.toc_digest)
    assert files["data/big"] == big
    _, toc = toc_of(blob)
    chunks = [e for e in toc["entries"] if e["name"] == "data/big"]
    assert [e["type"] for e in chunks] == ["reg"] + ["chunk"] * 4
    assert [e["chunkSize"] for e in chunks] == [65536] * 4 + [0]  # the last one says 0
    # strata's reader agrees and checks every chunk.
    offset = estargz.parse_footer(blob[-51:], "test")
    read = estargz.parse_toc(estargz.toc_bytes(blob[offset:-51], "test"), result.toc_digest, "test")
    found = estargz.file_chunks(read, offset, "test")
    data = b"".join(
        estargz.verified_chunk(blob[c.offset : c.end], c, "test") for c in found["data/big"]
    )
    assert data == big and found["data/empty"] == []


def test_hostile_tocs_are_refused() -> None:
    source = layer_tar(file_entry("a", b"a" * 1000), file_entry("b", b"b" * 1000))
    target = io.BytesIO()
    result = estargz.convert_tar(io.BytesIO(source), target)
    blob = target.getvalue()
    offset = estargz.parse_footer(blob[-51:], "layer")
    toc = estargz.parse_toc(
        estargz.toc_bytes(blob[offset:-51], "layer"), result.toc_digest, "layer"
    )
    with pytest.raises(StrataError, match="does not match the digest"):
        estargz.parse_toc(
            estargz.toc_bytes(blob[offset:-51], "layer"), "sha256:" + "0" * 64, "layer"
        )
    with pytest.raises(StrataError, match="no eStargz footer"):
        estargz.parse_footer(b"\x1f\x8b" + b"\x00" * 49, "layer")

    def variant(name: str, **changes: Any) -> dict[str, Any]:
        entries = [dict(entry) for entry in toc["entries"]]
        for entry in entries:
            if entry["name"] == name:
                entry.update(changes)
        return {"version": 1, "entries": entries}

    a = next(e for e in toc["entries"] if e["name"] == "a")
    b = next(e for e in toc["entries"] if e["name"] == "b")
    for bad, reason in (
        (variant("a", offset=offset + 10), "outside the blob"),
        (variant("a", offset=-1), "outside the blob"),
        (variant("b", offset=a["offset"]), "share one offset"),
        (variant("a", size=1 << 50), "absurd size"),
        (variant("a", chunkDigest="md5:x"), "sha256 chunkDigest"),
        (variant("a", chunkSize=5000), "past its file's end"),
        (variant("b", chunkOffset=10), "overlap or leave a gap"),
    ):
        with pytest.raises(StrataError, match=reason):
            estargz.file_chunks(bad, offset, "layer")
    # A chunk whose bytes were changed in the registry is refused, never served.
    found = estargz.file_chunks(toc, offset, "layer")
    chunk = found["b"][0]
    assert b["offset"] == chunk.offset
    tampered = bytearray(blob[chunk.offset : chunk.end])
    good = estargz.verified_chunk(bytes(tampered), chunk, "layer")
    assert good == b"b" * 1000
    other = zlib.compressobj(6, zlib.DEFLATED, 31)
    forged = other.compress(b"B" * 1000) + other.flush()
    with pytest.raises(StrataError, match="does not match its digest"):
        estargz.verified_chunk(forged, chunk, "layer")
    tampered[len(tampered) // 2] ^= 0xFF
    with pytest.raises(StrataError):
        estargz.verified_chunk(bytes(tampered), chunk, "layer")


def test_convert_refuses_bad_input(scratch: str, converted: tuple[str, str]) -> None:
    store, _ = converted
    before = sorted(os.listdir(f"{store}/blobs/sha256"))
    for args, message in (
        (["busybox", "x:y", "--prefetch", f"{scratch}/missing"], "cannot read the prefetch list"),
        (["nothing:here", "x:y"], "no image"),
    ):
        result = strata(store, "convert", "--estargz", *args, check=False)
        assert result.returncode == 1 and result.stderr.startswith("strata: error:"), result
        assert message in result.stderr and result.stderr.count("\n") == 1
    assert sorted(os.listdir(f"{store}/blobs/sha256")) == before


def test_record_reads_gives_a_prefetch_list(scratch: str, converted: tuple[str, str]) -> None:
    """`strata mount --record-reads` lists the image files opened, first
    opened first; `convert --prefetch` puts them before the landmark."""
    store, _ = converted
    record = f"{scratch}/reads"
    with Mounted(
        store, f"{scratch}/mnt", "busybox", "--read-only", "--record-reads", record
    ) as mnt:
        for name in ("etc/passwd", "bin/busybox", "etc/passwd"):
            with open(f"{mnt}/{name}", "rb") as handle:
                handle.read(1)
        os.listdir(f"{mnt}/etc")  # listings and stats are not reads
        os.stat(f"{mnt}/bin/sh", follow_symlinks=False)
    with open(record) as handle:
        assert handle.read().splitlines() == ["etc/passwd", "bin/busybox"]
    strata(store, "convert", "--estargz", "busybox", "busybox:recorded", "--prefetch", record)
    info = json.loads(strata(store, "inspect", "busybox:recorded").stdout)
    first = info["manifest"]["layers"][0]["digest"][7:]
    with open(f"{store}/blobs/sha256/{first}", "rb") as handle:
        names = [entry["name"] for entry in toc_of(handle.read())[1]["entries"]]
    landmark = names.index(estargz.PREFETCH_LANDMARK)
    assert names.index("etc/passwd") < names.index("bin/busybox") < landmark


# A second chunk that starts past where the first one ends.
GAP = {"type": "chunk", "name": "a", "offset": 15, "chunkOffset": 5, "chunkSize": 3,
       "chunkDigest": "sha256:" + "b" * 64}  # fmt: skip


def test_hostile_zstd_chunked_manifests_are_refused() -> None:
    from unionfs.lazy import zstdchunked

    def reg(name: str, offset: int, end: int, size: int, **extra: object) -> dict[str, object]:
        return {"type": "reg", "name": name, "size": size, "offset": offset, "endOffset": end,
                "digest": "sha256:" + "a" * 64, **extra}  # fmt: skip

    good = {"version": 1, "entries": [reg("a", 10, 20, 5), reg("b", 20, 30, 5)]}
    assert [c.offset for c in zstdchunked.file_chunks(good, 100, "l")["b"]] == [20]
    for entries, reason in (
        ([reg("a", 10, 200, 5)], "outside the blob"),
        ([reg("a", 10, 25, 5), reg("b", 20, 30, 5)], "overlap"),
        ([reg("a", 10, 20, 5, chunkSize=2)], "do not cover"),
        ([reg("a", 10, 20, 8, chunkSize=4), GAP], "gap"),
        ([reg("a", 10, 20, 5, digest="md5:x")], "sha256 digest"),
        ([reg("a", 10, 20, 1 << 50)], "bad size"),
        ([{"type": "chunk", "name": "z", "offset": 1}], "before its file"),
    ):
        with pytest.raises(StrataError, match=reason):
            zstdchunked.file_chunks({"version": 1, "entries": entries}, 100, "l")
    for text in ("1:2:3", "a:b:c:1", "1:2:3:2", "1:2:99999999999:1"):
        with pytest.raises(StrataError):
            zstdchunked.parse_position(text, "l")
    with pytest.raises(StrataError, match="does not match the digest"):
        zstdchunked.read_manifest(b"junk", "sha256:" + "0" * 64, 10, "l")
