"""Lazy pulling from a real docker-registry: an image converted by `strata
convert --estargz` mounts from its TOCs, a read fetches just its file's
chunks (counted through a proxy), bad chunks are EIO and never kept, a
registry that goes away makes reads of missing data fail after the timeout
and work again when it is back, the background fetch completes and checks
every layer, and a container on a lazy mount commits and pushes."""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator

import pytest
import requests

from tests.hostile import (
    LayoutLayer,
    Misbehaviour,
    file_entry,
    layer_tar,
    misbehaving_proxy,
    special_entry,
    write_layout,
)
from tests.images import build_busybox, run, umoci_rootfs
from tests.mounts import daemon_logs, strata, unmount
from tests.registry import PASSWORD, USER, Registry, run_registry
from tests.trees import differences, snapshot
from unionfs.errors import StrataError
from unionfs.image.layertar import unpack_skeleton
from unionfs.lazy import estargz
from unionfs.lazy.layers import toc_members

TLS = "--tls-verify=false"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """busybox converted to eStargz in a store; returns (store, reference tree)."""
    top = str(tmp_path_factory.mktemp("lazy-source"))
    layout, tag = build_busybox(f"{top}/image")
    store = f"{top}/store"
    strata(store, "import", f"oci:{layout}:{tag}", "busybox")
    with open(f"{top}/prefetch", "w") as handle:
        handle.write("etc/passwd\n")
    strata(store, "convert", "--estargz", "busybox", "busybox:esgz", "--prefetch",
           f"{top}/prefetch")  # fmt: skip
    return store, umoci_rootfs(layout, tag, f"{top}/reference")


@contextlib.contextmanager
def pushed(source: tuple[str, str], top: str, port: int | None = None) -> Iterator[Registry]:
    with run_registry(f"{top}/registry", port=port) as registry:
        if port is None:
            strata(source[0], "push", TLS, "busybox:esgz", f"{registry.host}/esgz:latest")
        yield registry


@contextlib.contextmanager
def lazy_mount(store: str, image: str, mnt: str, *flags: str) -> Iterator[str]:
    os.makedirs(mnt, exist_ok=True)
    strata(store, "mount", "--lazy", TLS, *flags, image, mnt, "--name", "c")
    try:
        yield mnt
    finally:
        unmount(store, mnt)


def read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def local_fraction(store: str) -> float:
    listed = json.loads(strata(store, "images", "--json").stdout)
    return float(listed[0]["local"])


def fetched(plan: Misbehaviour) -> int:
    total = 0
    for text in plan.seen_ranges:
        start, _, end = text.removeprefix("bytes=").partition("-")
        total += int(end) - int(start) + 1
    return total


def blob_sizes(store: str) -> int:
    info = json.loads(strata(store, "inspect", "busybox:esgz").stdout)
    return sum(layer["size"] for layer in info["manifest"]["layers"])


def test_reads_fetch_only_their_chunks(scratch: str, source: tuple[str, str]) -> None:
    store = f"{scratch}/store"
    plan = Misbehaviour(latency=0.02, rate=12.5e6)  # a 100 Mbit/s link, 20 ms away
    with pushed(source, scratch) as registry, misbehaving_proxy(registry.host, plan) as proxy:
        image = f"{proxy}/esgz:latest"
        with lazy_mount(store, image, f"{scratch}/mnt", "--no-background-fetch") as mnt:
            # Ready with footers and TOCs only: two ranges per layer.
            assert len(plan.seen_ranges) == 6
            at_mount = fetched(plan)
            assert at_mount < 0.05 * blob_sizes(source[0])
            busybox = os.stat(f"{mnt}/bin/busybox")
            assert busybox.st_size == os.stat(f"{source[1]}/bin/busybox").st_size
            assert busybox.st_blocks * 512 >= busybox.st_size  # du counts it before it comes
            assert sorted(os.listdir(mnt)) == sorted(os.listdir(source[1]))
            assert fetched(plan) == at_mount  # metadata needs no data
            assert read(f"{mnt}/etc/passwd") == read(f"{source[1]}/etc/passwd")
            small = fetched(plan) - at_mount
            assert 0 < small < 4096
            assert local_fraction(store) < 0.5
            # Every file's data, fetched as read, is the image's.
            assert differences(snapshot(source[1]), snapshot(mnt), times=False) == []
            assert fetched(plan) < 1.2 * blob_sizes(source[0])
    # What was fetched stays: with the registry gone, the image still mounts and reads.
    again = f"{scratch}/again"
    os.makedirs(again)
    strata(store, "mount", "--read-only", "--lazy-timeout", "1", image, again)
    try:
        assert differences(snapshot(source[1]), snapshot(again), times=False) == []
    finally:
        unmount(store, again)
    # rm, rmi and prune leave nothing of it.
    strata(store, "rm", "c")
    strata(store, "rmi", image)
    strata(store, "prune")
    assert os.listdir(f"{store}/layers") == [] and os.listdir(f"{store}/lazy") == []


def test_background_fetch_completes_and_checks_layers(
    scratch: str, source: tuple[str, str]
) -> None:
    store = f"{scratch}/store"
    with pushed(source, scratch) as registry:
        image = f"{registry.host}/esgz:latest"
        with lazy_mount(store, image, f"{scratch}/mnt") as mnt:
            deadline = time.monotonic() + 60
            while local_fraction(store) < 1.0:
                assert time.monotonic() < deadline, "the background fetch did not finish"
                time.sleep(0.2)
            assert differences(snapshot(source[1]), snapshot(mnt), times=False) == []
    states = glob.glob(f"{store}/lazy/*")
    assert len(states) == 3 and all(os.path.exists(f"{state}/complete") for state in states)
    # Now an ordinary image: it mounts without a registry and exports.
    with_mount = f"{scratch}/again"
    os.makedirs(with_mount)
    strata(store, "mount", "--read-only", image, with_mount)
    try:
        assert differences(snapshot(source[1]), snapshot(with_mount), times=False) == []
    finally:
        unmount(store, with_mount)
    strata(store, "export", image, f"oci:{scratch}/out:esgz")
    run("skopeo", "inspect", f"oci:{scratch}/out:esgz")


def test_a_tampered_chunk_is_eio_and_nothing_is_kept(scratch: str, source: tuple[str, str]) -> None:
    store = f"{scratch}/store"
    info = json.loads(strata(source[0], "inspect", "busybox:esgz").stdout)
    first = info["manifest"]["layers"][0]["digest"][7:]
    with open(f"{source[0]}/blobs/sha256/{first}", "rb") as handle:
        blob = handle.read()
    offset = estargz.parse_footer(blob[-51:], "t")
    toc = json.loads(estargz.toc_bytes(blob[offset:-51], "t"))
    entry = next(e for e in toc["entries"] if e["name"] == "bin/busybox")
    with pushed(source, scratch) as registry:
        (stored,) = glob.glob(f"{scratch}/registry/data/**/{first}/data", recursive=True)
        with open(stored, "r+b") as handle:  # one byte inside busybox's first chunk
            handle.seek(entry["offset"] + 2000)
            byte = handle.read(1)
            handle.seek(entry["offset"] + 2000)
            handle.write(bytes([byte[0] ^ 0xFF]))
        image = f"{registry.host}/esgz:latest"
        with lazy_mount(store, image, f"{scratch}/mnt", "--no-background-fetch") as mnt:
            for _ in range(2):  # refused again: bad data is never kept
                with pytest.raises(OSError) as caught, open(f"{mnt}/bin/busybox", "rb") as f:
                    f.read()
                assert caught.value.errno == errno.EIO
            with open(f"{mnt}/etc/passwd") as handle:  # other files are fine
                assert handle.read().startswith("root:")
        # The background fetch finds the whole blob wrong and gives up on it.
        with lazy_mount(store, image, f"{scratch}/mnt") as mnt:
            deadline = time.monotonic() + 60
            while "the background fetch stops" not in daemon_logs(store):
                assert time.monotonic() < deadline, "the bad blob was not noticed"
                time.sleep(0.2)
            with pytest.raises(OSError) as caught:
                read(f"{mnt}/bin/busybox")
            assert caught.value.errno == errno.EIO
        assert not glob.glob(f"{store}/blobs/sha256/{first}")  # nothing of it kept
    (layer,) = [path for path in glob.glob(f"{store}/layers/*") if os.path.exists(
        f"{path}/bin/busybox")]  # fmt: skip
    with open(f"{layer}/bin/busybox", "rb") as handle:
        assert not handle.read().strip(b"\x00")  # still the sparse placeholder
    assert not os.path.exists(f"{store}/lazy/{os.path.basename(layer)}/complete")
    done = glob.glob(f"{store}/lazy/{os.path.basename(layer)}/done")
    assert not done or b"bin/busybox" not in read(done[0])


def test_registry_away_and_back(scratch: str, source: tuple[str, str]) -> None:
    store = f"{scratch}/store"
    mnt = f"{scratch}/mnt"
    os.makedirs(mnt)
    with pushed(source, scratch) as registry:
        image = f"{registry.host}/esgz:latest"
        port = int(registry.host.rsplit(":", 1)[1])
        strata(store, "mount", "--lazy", TLS, "--no-background-fetch", "--lazy-timeout", "2",
               image, mnt, "--name", "c")  # fmt: skip
        with open(f"{mnt}/etc/passwd") as handle:
            passwd = handle.read()
    try:
        started = time.monotonic()
        with pytest.raises(OSError) as caught:  # the registry is gone
            read(f"{mnt}/bin/busybox")
        assert caught.value.errno == errno.EIO
        assert time.monotonic() - started >= 2  # it waited --lazy-timeout for the registry
        with open(f"{mnt}/etc/passwd") as handle:  # what is local keeps working
            assert handle.read() == passwd
        with pushed(source, scratch, port=port):
            assert read(f"{mnt}/bin/busybox") == read(f"{source[1]}/bin/busybox")
            unmount(store, mnt)
            strata(store, "pull", TLS, image)  # a later pull completes the image
            assert local_fraction(store) == 1.0
    finally:
        if os.path.ismount(mnt):
            unmount(store, mnt)


def test_commit_and_push_a_container_of_a_lazy_mount(scratch: str, source: tuple[str, str]) -> None:
    store = f"{scratch}/store"
    with pushed(source, scratch) as registry:
        image = f"{registry.host}/esgz:latest"
        with lazy_mount(store, image, f"{scratch}/mnt", "--no-background-fetch") as mnt:
            with open(f"{mnt}/etc/added", "w") as handle:
                handle.write("added\n")
            with open(f"{mnt}/etc/passwd", "a") as handle:  # a copy-up of lazy data
                handle.write("more:x:2:2::/:/bin/sh\n")
        strata(store, "commit", "c", "committed:v1")
        strata(store, "export", image, f"oci:{scratch}/exported:v1")  # fetches what it lacks
        run("skopeo", "inspect", f"oci:{scratch}/exported:v1")
        strata(store, "push", TLS, "committed:v1", f"{registry.host}/committed:v1")
        run("skopeo", "copy", "--quiet", "--src-tls-verify=false",
            f"docker://{registry.host}/committed:v1", f"oci:{scratch}/copied:v1")  # fmt: skip
    rootfs = umoci_rootfs(f"{scratch}/copied", "v1", f"{scratch}/unpacked")
    assert read(f"{rootfs}/etc/added") == b"added\n"
    passwd = read(f"{rootfs}/etc/passwd")
    assert passwd == read(f"{source[1]}/etc/passwd") + b"more:x:2:2::/:/bin/sh\n"
    assert read(f"{rootfs}/bin/busybox") == read(f"{source[1]}/bin/busybox")


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([{"name": "../evil", "type": "reg", "size": 0}], "outside the layer"),
        ([{"name": "/etc/evil", "type": "reg", "size": 0}], "absolute path"),
        (
            [
                {"name": "link", "type": "symlink", "linkName": "/etc"},
                {"name": "link/passwd", "type": "reg", "size": 0},
            ],
            "not a directory",
        ),
        ([{"name": "big", "type": "reg", "size": 1 << 50}], "bad size"),
        ([{"name": "x", "type": "socket"}], "unknown"),
        ([{"name": "l", "type": "hardlink", "linkName": "missing"}], "not a file of this layer"),
    ],
)
def test_hostile_tocs_lay_nothing_out(
    scratch: str, entries: list[dict[str, object]], reason: str
) -> None:
    toc = {"version": 1, "entries": [{"mode": 0o644, **entry} for entry in entries]}
    target = f"{scratch}/tree"
    os.mkdir(target)
    with pytest.raises(StrataError, match=reason):
        unpack_skeleton(toc_members(toc, "layer"), target, label="layer")
    assert not os.path.lexists("/etc/evil") and not os.path.lexists(f"{scratch}/evil")


def test_umount_stops_the_fetcher_and_keeps_what_it_fetched(
    scratch: str, source: tuple[str, str]
) -> None:
    store = f"{scratch}/store"
    plan = Misbehaviour(rate=1e6)  # slow enough that the blob is still coming
    with pushed(source, scratch) as registry, misbehaving_proxy(registry.host, plan) as proxy:
        image = f"{proxy}/esgz:latest"
        with lazy_mount(store, image, f"{scratch}/mnt") as mnt:
            assert read(f"{mnt}/etc/passwd") == read(f"{source[1]}/etc/passwd")
        assert not os.path.ismount(f"{scratch}/mnt")
        stopped = plan.sent_bytes
        time.sleep(1.5)
        assert plan.sent_bytes == stopped  # nothing fetched after the unmount
        assert 0 < local_fraction(store) < 1.0
        # What was fetched stays; a new mount goes on from there.
        plan.rate = 0
        with lazy_mount(store, image, f"{scratch}/mnt") as mnt:
            deadline = time.monotonic() + 60
            while local_fraction(store) < 1.0:
                assert time.monotonic() < deadline, "the background fetch did not finish"
                time.sleep(0.2)


def test_a_large_file_arrives_chunk_by_chunk(scratch: str) -> None:
    """A file of three chunks: each fetched by its own range and checked; the
    data read through the mount is the file's."""
    big = os.urandom(10 << 20)
    layer = LayoutLayer.estargz(layer_tar(file_entry("data/big", big), file_entry("small", b"s")))
    layout = write_layout(f"{scratch}/layout", [layer])
    store = f"{scratch}/store"
    plan = Misbehaviour()
    with run_registry(f"{scratch}/registry") as registry:
        image = f"{registry.host}/big:v1"
        run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", layout, f"docker://{image}")
        with (
            misbehaving_proxy(registry.host, plan) as proxy,
            lazy_mount(store, f"{proxy}/big:v1", f"{scratch}/mnt", "--no-background-fetch") as mnt,
        ):
            before = len(plan.seen_ranges)
            with open(f"{mnt}/data/big", "rb") as handle:
                handle.seek(5 << 20)
                assert handle.read(4096) == big[5 << 20 : (5 << 20) + 4096]
                handle.seek(0)
                assert handle.read() == big
            assert len(plan.seen_ranges) - before == 3  # one range per chunk


def unpadded(tar: bytes) -> bytes:
    """*tar* ending with just the two zero blocks the format asks for."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        last = archive.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    return tar[:end] + b"\x00" * 1024


def test_zstd_chunked_images_mount_lazily(scratch: str) -> None:
    """zstd:chunked as skopeo writes it: the manifest is fetched and checked,
    each file's chunks come as read, and the background check of the whole
    blob (zstd) completes the layers."""
    with open("/bin/busybox", "rb") as handle:
        busybox = handle.read()
    big = os.urandom(3 << 20)
    first = layer_tar(
        special_entry("bin/", tarfile.DIRTYPE),
        file_entry("bin/busybox", busybox, mode=0o755),
        special_entry("bin/sh", tarfile.SYMTYPE, "busybox"),
        file_entry("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        file_entry("data/big", big),
    )
    second = layer_tar(file_entry("etc/added", b"added\n", uid=1000, gid=1000))
    # skopeo's zstd:chunked writer ends a tar with two zero blocks; Python's
    # tarfile pads it to 10 KiB: unpadded, the DiffIDs stay those of the stream.
    layers = [LayoutLayer(unpadded(first)), LayoutLayer(unpadded(second))]
    layout = write_layout(f"{scratch}/layout", layers)
    store = f"{scratch}/store"
    plan = Misbehaviour()
    with run_registry(f"{scratch}/registry") as registry:
        run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-compress-format",
            "zstd:chunked", layout, f"docker://{registry.host}/zc:v1")  # fmt: skip
        with misbehaving_proxy(registry.host, plan) as proxy:
            image = f"{proxy}/zc:v1"
            with lazy_mount(store, image, f"{scratch}/mnt", "--no-background-fetch") as mnt:
                assert len(plan.seen_ranges) == 2  # one manifest per layer
                assert read(f"{mnt}/etc/passwd") == b"root:x:0:0::/root:/bin/sh\n"
                assert local_fraction(store) < 0.5
                assert read(f"{mnt}/bin/busybox") == busybox
                assert read(f"{mnt}/data/big") == big
                assert os.stat(f"{mnt}/etc/added").st_uid == 1000
            with lazy_mount(store, image, f"{scratch}/mnt") as mnt:
                deadline = time.monotonic() + 60
                while local_fraction(store) < 1.0:
                    assert time.monotonic() < deadline, "the background fetch did not finish"
                    time.sleep(0.2)
    assert len(glob.glob(f"{store}/lazy/*/complete")) == 2  # blobs and DiffIDs checked


def test_an_expired_token_is_renewed_during_a_lazy_mount(
    scratch: str, source: tuple[str, str]
) -> None:
    """Tokens that live 3 seconds: a read long after the mount authenticates again."""
    store = f"{scratch}/store"
    creds = f"--creds={USER}:{PASSWORD}"
    with run_registry(f"{scratch}/registry", tokens=True, token_lifetime=3) as registry:
        image = f"{registry.host}/esgz:latest"
        strata(source[0], "push", TLS, creds, "busybox:esgz", image)
        with lazy_mount(store, image, f"{scratch}/mnt", "--no-background-fetch", creds) as mnt:
            assert read(f"{mnt}/etc/passwd") == read(f"{source[1]}/etc/passwd")
            # A token of this service is refused by the registry after 3 s ...
            url = f"http://{registry.host}/v2/"
            challenge = requests.get(url, timeout=10)
            fields = dict(
                part.split("=", 1) for part in challenge.headers["WWW-Authenticate"][7:].split(",")
            )
            token = requests.get(
                fields["realm"].strip('"'),
                params={"service": fields["service"].strip('"')},
                auth=(USER, PASSWORD),
                timeout=10,
            ).json()["token"]
            headers = {"Authorization": f"Bearer {token}"}
            assert requests.get(url, headers=headers, timeout=10).status_code == 200
            time.sleep(4)
            assert requests.get(url, headers=headers, timeout=10).status_code == 401
            # ... and the mount's reads go on.
            assert read(f"{mnt}/bin/busybox") == read(f"{source[1]}/bin/busybox")
