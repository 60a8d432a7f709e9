"""`strata snapshotter`: containerd's snapshots API, spoken to directly over
gRPC and through a real containerd (ctr, runc), beside containerd's own
overlayfs snapshotter as the oracle."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import glob
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.containerd import (
    Containerd,
    Snapshotter,
    containerd,
    snapshotter,
    start_snapshotter,
    stop,
)
from tests.cri import CRI, CriClient, host_network_pod
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
from tests.layers import write
from tests.mounts import strata
from tests.registry import PASSWORD, USER, run_registry
from tests.trees import differences, snapshot
from unionfs.lazy import estargz
from unionfs.mount import find_mount, pid_file
from unionfs.snapshot import api
from unionfs.snapshot.remote import REMOTE_MARK

REF_LABEL = "containerd.io/snapshot.ref"


def _code(snap: Snapshotter, method: str, **fields: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failed:
        snap.call(method, **fields)
    code: grpc.StatusCode = failed.value.code()
    return code


def _names(infos: list[object]) -> set[str]:
    return {info.name for response in infos for info in response.info}  # type: ignore[attr-defined]


@pytest.fixture
def snap(scratch: str) -> Iterator[Snapshotter]:
    # Views unmounted as soon as nothing uses them: the test sees each release.
    with snapshotter(f"{scratch}/snapshotter", "--view-idle", "0") as running:
        yield running


def _mount(mounts: list[object], target: str) -> str:
    """Mount what a snapshotter answered, as containerd would."""
    (only,) = mounts
    os.makedirs(target, exist_ok=True)
    options = ",".join(only.options)  # type: ignore[attr-defined]
    kind = only.type  # type: ignore[attr-defined]
    if kind == "bind":
        run("mount", "--bind", only.source, target)  # type: ignore[attr-defined]
        if "ro" in only.options:  # type: ignore[attr-defined]
            run("mount", "-o", "remount,bind,ro", target)
    else:
        run("mount", "-t", kind, "-o", options, only.source, target)  # type: ignore[attr-defined]
    return target


def test_rules_status_codes_and_mounts(scratch: str, snap: Snapshotter) -> None:
    """Keys, parents, kinds and labels with containerd's status codes; an active
    snapshot over a chain mounts as overlay over the chain's strata view."""
    base = snap.call("Prepare", key="ns/1/base", labels={"stage": "unpack"}).mounts
    assert [(m.type, list(m.options)) for m in base] == [("bind", ["rw", "rbind"])]
    write(f"{base[0].source}/etc/motd", "from the base layer\n")
    write(f"{base[0].source}/etc/gone", "deleted above\n")
    snap.call("Commit", name="ns/layer1", key="ns/1/base", labels={REF_LABEL: "chain1"})
    (layer1,) = [raw for raw in _catalog(snap) if raw["name"] == "ns/layer1"]
    assert layer1["inodes"] == -1  # a commit walks no tree: Usage counts when asked

    assert _code(snap, "Prepare", key="ns/layer1") == grpc.StatusCode.ALREADY_EXISTS
    assert _code(snap, "Prepare", key="ns/x", parent="ns/nope") == grpc.StatusCode.NOT_FOUND
    assert _code(snap, "Prepare", key="") == grpc.StatusCode.INVALID_ARGUMENT
    big = {"k": "v" * 4096}
    assert _code(snap, "Prepare", key="ns/big", labels=big) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(snap, "Mounts", key="ns/nope") == grpc.StatusCode.NOT_FOUND
    assert _code(snap, "Mounts", key="ns/layer1") == grpc.StatusCode.FAILED_PRECONDITION
    assert _code(snap, "Commit", name="n", key="ns/layer1") == grpc.StatusCode.FAILED_PRECONDITION
    assert _code(snap, "Commit", name="n", key="ns/nope") == grpc.StatusCode.NOT_FOUND
    assert _code(snap, "Stat", key="ns/nope") == grpc.StatusCode.NOT_FOUND
    assert _code(snap, "Remove", key="ns/nope") == grpc.StatusCode.NOT_FOUND

    # An unpack of a second layer: overlay over the view of the first.
    second = snap.call("Prepare", key="ns/2/extract", parent="ns/layer1").mounts
    assert second[0].type == "overlay"
    options = dict(option.split("=", 1) for option in second[0].options)
    view = options["lowerdir"]
    assert find_mount(view) is not None and find_mount(view).fstype == "fuse.strata"  # type: ignore[union-attr]
    assert _code(snap, "Prepare", key="ns/y", parent="ns/2/extract") == (
        grpc.StatusCode.INVALID_ARGUMENT
    )  # the parent must be committed
    upper = options["upperdir"]
    os.makedirs(f"{upper}/etc")
    write(f"{upper}/etc/added", "second layer\n")
    os.mknod(f"{upper}/etc/gone", 0o020000, 0)  # an overlay whiteout, as containerd unpacks
    snap.call("Commit", name="ns/layer2", key="ns/2/extract")
    assert find_mount(view) is None, "the first layer's view stays mounted after the unpack"
    assert _code(snap, "Remove", key="ns/layer1") == grpc.StatusCode.FAILED_PRECONDITION

    # A container's layer and a view over the two-layer chain.
    active = _mount(snap.call("Prepare", key="ns/c1", parent="ns/layer2").mounts, f"{scratch}/c1")
    shown = _mount(snap.call("View", key="ns/v1", parent="ns/layer2").mounts, f"{scratch}/v1")
    try:
        for root in (active, shown):
            assert sorted(os.listdir(f"{root}/etc")) == ["added", "motd"]
            with open(f"{root}/etc/motd") as handle:
                assert handle.read() == "from the base layer\n"
        write(f"{active}/etc/motd", "changed in the container\n")
        with pytest.raises(OSError):
            write(f"{shown}/etc/new", "a view is read-only")
        with open(f"{shown}/etc/motd") as handle:
            assert handle.read() == "from the base layer\n"
        c1 = snap.call("Mounts", key="ns/c1").mounts
        c1_upper = dict(o.split("=", 1) for o in c1[0].options if "=" in o)["upperdir"]
        with open(f"{c1_upper}/etc/motd") as handle:
            assert handle.read() == "changed in the container\n"
        usage = snap.call("Usage", key="ns/c1")
        assert usage.inodes >= 3 and usage.size > 0
    finally:
        run("umount", active)
        run("umount", shown)

    # Stat, Update and List.
    info = snap.call("Stat", key="ns/layer2").info
    assert (info.name, info.parent, info.kind) == ("ns/layer2", "ns/layer1", api.COMMITTED)
    assert info.created_at.ToNanoseconds() > 0
    info.labels["note"] = "kept"
    info.labels["other"] = "not asked for"
    mask = {"paths": ["labels.note"]}
    updated = snap.call("Update", info=info, update_mask=mask).info
    assert dict(updated.labels) == {"note": "kept"}
    bad_mask = {"paths": ["parent"]}
    code = _code(snap, "Update", info=info, update_mask=bad_mask)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert _names(snap.call("List")) == {"ns/layer1", "ns/layer2", "ns/c1", "ns/v1"}
    assert _names(snap.call("List", filters=["parent==ns/layer2"])) == {"ns/c1", "ns/v1"}
    assert _names(snap.call("List", filters=["kind==committed"])) == {"ns/layer1", "ns/layer2"}
    ref = f'labels."{REF_LABEL}"==chain1'
    assert _names(snap.call("List", filters=[ref])) == {"ns/layer1"}
    assert _names(snap.call("List", filters=[ref, "kind==view"])) == {"ns/layer1", "ns/v1"}
    assert _names(snap.call("List", filters=["kind==active,name~=^ns/c"])) == {"ns/c1"}
    assert _names(snap.call("List", filters=["labels.note"])) == {"ns/layer2"}
    assert _code(snap, "List", filters=['labels."unclosed']) == grpc.StatusCode.INVALID_ARGUMENT
    assert snap.call("Usage", key="ns/layer1").inodes == 4  # fs, etc, motd, gone
    (layer1,) = [raw for raw in _catalog(snap) if raw["name"] == "ns/layer1"]
    assert layer1["inodes"] == 4  # and kept

    # Removing frees everything: views unmounted, directories gone.
    for key in ("ns/c1", "ns/v1", "ns/layer2", "ns/layer1"):
        snap.call("Remove", key=key)
    snap.call("Cleanup")
    assert _names(snap.call("List")) == set()
    root = f"{snap.root}"
    assert os.listdir(f"{root}/snapshots") == []
    assert os.listdir(f"{root}/views") == []


def test_one_snapshotter_per_socket(scratch: str, snap: Snapshotter) -> None:
    """A second snapshotter on the same socket, or one whose catalog is not one,
    stops with one line."""
    second = subprocess.run(
        [sys.executable, "-m", "unionfs", "snapshotter", "--address", snap.address,
         "--root", f"{scratch}/other"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 1
    assert second.stderr.count("\n") == 1 and "another strata snapshotter" in second.stderr
    assert snap.call("List") == []  # the first one still answers
    os.makedirs(f"{scratch}/broken")
    write(f"{scratch}/broken/snapshots.json", "{not json")
    broken = subprocess.run(
        [sys.executable, "-m", "unionfs", "snapshotter", "--address", f"{scratch}/broken.sock",
         "--root", f"{scratch}/broken"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert broken.returncode == 1 and broken.stderr.count("\n") == 1
    assert "is not a snapshot catalog" in broken.stderr
    kept = write(f"{scratch}/a-file", "not a socket")
    refused = subprocess.run(
        [sys.executable, "-m", "unionfs", "snapshotter", "--address", kept,
         "--root", f"{scratch}/third"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1 and "is not a socket" in refused.stderr
    with open(kept) as handle:
        assert handle.read() == "not a socket"


@pytest.fixture
def busybox_archive(scratch: str) -> str:
    layout, tag = build_busybox(f"{scratch}/image")
    archive = f"{scratch}/busybox.tar"
    run("skopeo", "copy", "-q", f"oci:{layout}:{tag}", f"docker-archive:{archive}:{IMAGE}")
    return archive


IMAGE = "strata.test/busybox:v1"


@pytest.mark.parametrize("writable", ["overlay", "fuse"])
def test_containerd_unpacks_and_runs_on_strata(
    scratch: str, busybox_archive: str, writable: str
) -> None:
    """`ctr images import` unpacks through strata; a container's layer over the
    image shows the tree containerd's overlayfs snapshotter shows; a container
    runs on it, its writes land in its own layer only, and removing it frees
    its mounts. Container layers as overlay mounts over the image's view, or as
    strata's own writable mounts (--writable fuse)."""
    with (
        snapshotter(f"{scratch}/snapshotter", "--view-idle", "0", "--writable", writable) as snap,
        containerd(f"{scratch}/containerd", snap.address) as ctr,
    ):
        trees = {}
        unpacked_from = time.time_ns()  # directories the unpacks touched show their time
        for name in ("overlayfs", "strata"):
            ctr.ctr("images", "import", "--snapshotter", name, busybox_archive)
            chain = ctr.chain_id(IMAGE)
            key = f"tree-{name}"
            ctr.ctr("snapshots", "--snapshotter", name, "prepare", key, chain)
            target = f"{scratch}/tree-{name}"
            os.makedirs(target)
            command = ctr.ctr("snapshots", "--snapshotter", name, "mounts", target, key).stdout
            subprocess.run(command, shell=True, check=True)
            try:
                trees[name] = snapshot(target)
            finally:
                run("umount", target)
            ctr.ctr("snapshots", "--snapshotter", name, "rm", key)
        window = (unpacked_from, time.time_ns())
        found = differences(trees["overlayfs"], trees["strata"], changed_between=window)
        assert found == [], "\n".join(found)
        assert b"etc/motd" not in trees["strata"].nodes  # a whiteout of layer 2
        assert set(trees["strata"].listings[b"opt/old"]) == {b"fresh"}  # opaque in layer 3

        layers_before = _layer_sums(snap)
        script = (
            "cat /usr/bin/hello && echo written > /etc/new && rm /etc/passwd "
            "&& echo appended >> /usr/bin/hello && ls /etc"
        )
        ctr.ctr("run", "--snapshotter", "strata", IMAGE, "c1", "/bin/sh", "-c", script)
        out = ctr.ctr("tasks", "ls").stdout
        assert "c1" not in out or "STOPPED" in out
        upper = _container_upper(snap, "c1")
        with open(f"{upper}/etc/new") as handle:
            assert handle.read() == "written\n"
        gone = os.lstat(f"{upper}/etc/passwd")
        assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0  # a whiteout
        assert _layer_sums(snap) == layers_before, "a committed layer changed"
        # The container's layer commits as a layer (as `nerdctl commit` does):
        # a new container on it sees its changes.
        ctr.ctr("snapshots", "--snapshotter", "strata", "commit", "c1-layer", "c1")
        ctr.ctr("snapshots", "--snapshotter", "strata", "prepare", "on-c1", "c1-layer")
        target = f"{scratch}/on-c1"
        os.makedirs(target)
        mounting = ctr.ctr("snapshots", "--snapshotter", "strata", "mounts", target, "on-c1")
        subprocess.run(mounting.stdout, shell=True, check=True)
        try:
            assert not os.path.lexists(f"{target}/etc/passwd")
            with open(f"{target}/etc/new") as handle, open(f"{target}/usr/bin/hello") as hello:
                assert (handle.read(), hello.read()) == (
                    "written\n",
                    "#!/bin/sh\necho hello\nappended\n",
                )
        finally:
            run("umount", target)
        ctr.ctr("snapshots", "--snapshotter", "strata", "rm", "on-c1")
        ctr.ctr("snapshots", "--snapshotter", "strata", "rm", "c1-layer")
        ctr.ctr("containers", "rm", "c1")
        # --rm: the container's snapshot and its chain's view go with it.
        ran = ctr.ctr("run", "--rm", "--snapshotter", "strata", IMAGE, "c2", "/bin/cat", "/etc/new",
                      check=False)  # fmt: skip
        assert ran.returncode != 0  # c1's write is not in the image
        # containerd removes snapshots in its garbage collection.
        ctr.collect_garbage()
        assert _views_mounted(snap) == [], _logs(ctr.log, snap.log)
        assert ctr.ctr("snapshots", "--snapshotter", "strata", "ls").stdout.count("Active") == 0


def _catalog(snap: Snapshotter) -> list[dict[str, object]]:
    with open(f"{snap.root}/snapshots.json") as handle:
        return list(json.load(handle)["snapshots"])


def _layer_sums(snap: Snapshotter) -> dict[object, str]:
    """A digest of each committed layer's whole tree (data, metadata, xattrs)."""
    sums = {}
    for raw in _catalog(snap):
        if raw["kind"] == api.COMMITTED:
            tree = snapshot(f"{snap.root}/snapshots/{raw['id']}/fs")
            flat = repr(sorted(tree.nodes.items())).encode()
            sums[raw["name"]] = hashlib.sha256(flat).hexdigest()
    return sums


def _container_upper(snap: Snapshotter, container: str) -> str:
    (found,) = [raw for raw in _catalog(snap) if str(raw["name"]).endswith("/" + container)]
    return f"{snap.root}/snapshots/{found['id']}/fs"


def _views_mounted(snap: Snapshotter) -> list[str]:
    views = f"{snap.root}/views"
    return [name for name in os.listdir(views) if find_mount(f"{views}/{name}") is not None]


def test_restarts_of_the_snapshotter_and_of_containerd(scratch: str, busybox_archive: str) -> None:
    """A running container keeps its files while the snapshotter is down (the
    views are daemons of their own); a new snapshotter finds its snapshots and
    views, and containerd restarted on the same state keeps working with it."""
    top = f"{scratch}/snapshotter"
    snap = start_snapshotter(top)
    try:
        with containerd(f"{scratch}/containerd", snap.address, leave_running=True) as first:
            ctr = first
            ctr.ctr("images", "import", "--snapshotter", "strata", busybox_archive)
            ctr.ctr("run", "-d", "--snapshotter", "strata", IMAGE, "long",
                    "/bin/busybox", "sleep", "600")  # fmt: skip
            views = _views_mounted(snap)
            assert len(views) == 1
            stop(snap.process)
            assert snap.process.returncode == 0
            hello = ctr.ctr(
                "tasks", "exec", "--exec-id", "e1", "long", "/bin/cat", "/usr/bin/hello"
            )
            assert hello.stdout == "#!/bin/sh\necho hello\n"
            down = ctr.ctr("run", "--rm", "--snapshotter", "strata", IMAGE, "while-down",
                           "/bin/true", check=False)  # fmt: skip
            assert down.returncode != 0

            snap = start_snapshotter(top)
            assert _views_mounted(snap) == views  # found, not mounted again
            # containerd dials again with a backoff of at most 3 s.
            deadline = time.monotonic() + 15
            while True:
                ran = ctr.ctr("run", "--rm", "--snapshotter", "strata", IMAGE, "after",
                              "/bin/cat", "/etc/passwd", check=False)  # fmt: skip
                if "unavailable" not in ran.stderr or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert ran.stdout.startswith("root:x:0:0"), ran.stderr
        # containerd stopped, its container still running under its shim; again:
        with containerd(f"{scratch}/containerd", snap.address, since=first.run_before) as ctr:
            listed = ctr.ctr("snapshots", "--snapshotter", "strata", "ls").stdout
            assert listed.count("Committed") == 3 and listed.count("Active") == 1
            assert "RUNNING" in ctr.ctr("tasks", "ls").stdout
            hello = ctr.ctr("tasks", "exec", "--exec-id", "e2", "long", "/bin/cat", "/etc/passwd")
            assert hello.stdout.startswith("root:x:0:0")
            ctr.ctr("tasks", "kill", "-s", "KILL", "long")
            deadline = time.monotonic() + 20
            while "RUNNING" in ctr.ctr("tasks", "ls").stdout and time.monotonic() < deadline:
                time.sleep(0.1)
            ctr.ctr("tasks", "rm", "long")
            ctr.ctr("containers", "rm", "long")
            ran = ctr.ctr("run", "--rm", "--snapshotter", "strata", IMAGE, "again", "/bin/cat",
                          "/etc/passwd")  # fmt: skip
            assert ran.stdout.startswith("root:x:0:0")
            ctr.ctr("images", "rm", "--sync", IMAGE)  # returns after the garbage collection
            left = _names(snap.call("List"))
            assert left == set(), _logs(ctr.log, snap.log)  # containerd's GC removed them all
        assert _views_mounted(snap) == []
        assert os.listdir(f"{snap.root}/snapshots") == []
    finally:
        stop(snap.process)


def _logs(*paths: str) -> str:
    """The last lines of the daemons' logs, for a failure's message."""
    tails = []
    for path in paths:
        with open(path, errors="replace") as handle:
            tails.append(f"--- {path}\n" + "".join(handle.readlines()[-40:]))
    return "\n".join(tails)


@pytest.fixture(scope="module")
def esgz_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """busybox converted to eStargz in a strata store; returns (store, reference tree)."""
    top = str(tmp_path_factory.mktemp("esgz-source"))
    layout, tag = build_busybox(f"{top}/image")
    store = f"{top}/store"
    strata(store, "import", f"oci:{layout}:{tag}", "busybox")
    strata(store, "convert", "--estargz", "busybox", "busybox:esgz")
    return store, umoci_rootfs(layout, tag, f"{top}/reference")


def _blob_digests(store: str) -> tuple[list[str], int]:
    info = json.loads(strata(store, "inspect", "busybox:esgz").stdout)
    layers = info["manifest"]["layers"]
    return [layer["digest"] for layer in layers], sum(layer["size"] for layer in layers)


@contextlib.contextmanager
def _view_tree(ctr: Containerd, chain: str, target: str) -> Iterator[str]:
    """A view of *chain* mounted at *target*. A snapshot ctr makes belongs to
    no lease, so containerd's garbage collection (after a container's
    removal) may take it before it is mounted: then it is made again."""
    os.makedirs(target)
    for _ in range(5):
        ctr.ctr("snapshots", "--snapshotter", "strata", "view", "look", chain)
        mounts = ctr.ctr("snapshots", "--snapshotter", "strata", "mounts", target, "look",
                         check=False)  # fmt: skip
        if mounts.returncode == 0 and subprocess.run(mounts.stdout, shell=True).returncode == 0:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no view of {chain}: {mounts.stderr}")
    try:
        yield target
    finally:
        run("umount", target)
        ctr.ctr("snapshots", "--snapshotter", "strata", "rm", "look", check=False)


def _rpull(ctr: Containerd, image: str, *flags: str) -> None:
    done = subprocess.run(
        ["ctr-remote", "-a", ctr.address, "-n", ctr.namespace, "images", "rpull",
         "--plain-http", "--snapshotter", "strata", *flags, image],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_ctr_remote_pulls_lazily(scratch: str, esgz_source: tuple[str, str]) -> None:
    """`ctr-remote images rpull` through strata: every eStargz layer becomes a
    remote snapshot from its TOC, containerd's content store never holds a
    layer blob, the registry sees only small ranged reads until a container
    runs, and the container and a view read the image's files."""
    store, reference = esgz_source
    digests, total = _blob_digests(store)
    plan = Misbehaviour()
    with (
        run_registry(f"{scratch}/registry") as registry,
        misbehaving_proxy(registry.host, plan) as proxy,
        snapshotter(f"{scratch}/snapshotter", "--tls-verify", "false") as snap,
        containerd(f"{scratch}/containerd", snap.address) as ctr,
    ):
        strata(store, "push", "--tls-verify=false", "busybox:esgz", f"{registry.host}/esgz:v1")
        image = f"{proxy}/esgz:v1"
        _rpull(ctr, image)
        content = ctr.ctr("content", "ls", "-q").stdout.split()
        assert not set(digests) & set(content), "a layer blob reached containerd"
        listed = snap.call("List", filters=[f'labels."{REMOTE_MARK}"'])
        assert len(_names(listed)) == 3
        assert all(raw["diff_id"] for raw in _catalog(snap))  # each a store layer, read lazily
        before_run = plan.sent_bytes
        assert 0 < before_run < 0.05 * total, (before_run, total)
        assert all(text.startswith("bytes=") for text in plan.seen_ranges)

        ran = ctr.ctr("run", "--rm", "--snapshotter", "strata", image, "c1", "/bin/cat",
                      "/etc/passwd")  # fmt: skip
        with open(f"{reference}/etc/passwd") as handle:
            assert ran.stdout == handle.read()
        chain = ctr.chain_id(image)
        with _view_tree(ctr, chain, f"{scratch}/look") as tree:
            assert differences(snapshot(reference), snapshot(tree), times=False) == []
        ctr.ctr("images", "rm", "--sync", image)
        assert snap.call("List") == []
        assert os.listdir(f"{snap.root}/store/layers") == []  # the lazy layers went too


def test_a_tampered_remote_chunk_is_eio(scratch: str, esgz_source: tuple[str, str]) -> None:
    """A chunk whose bytes do not match the TOC's digest is EIO in a view
    (never wrong bytes); the image's other files read right."""
    store, reference = esgz_source
    info = json.loads(strata(store, "inspect", "busybox:esgz").stdout)
    first = info["manifest"]["layers"][0]["digest"][7:]
    with open(f"{store}/blobs/sha256/{first}", "rb") as handle:
        blob = handle.read()
    offset = estargz.parse_footer(blob[-51:], "t")
    toc = json.loads(estargz.toc_bytes(blob[offset:-51], "t"))
    entry = next(e for e in toc["entries"] if e["name"] == "bin/busybox")
    with (
        run_registry(f"{scratch}/registry") as registry,
        snapshotter(f"{scratch}/snapshotter", "--tls-verify", "false") as snap,
        containerd(f"{scratch}/containerd", snap.address) as ctr,
    ):
        strata(store, "push", "--tls-verify=false", "busybox:esgz", f"{registry.host}/esgz:v1")
        (stored,) = glob.glob(f"{scratch}/registry/data/**/{first}/data", recursive=True)
        with open(stored, "r+b") as handle:  # one byte inside busybox's first chunk
            handle.seek(entry["offset"] + 2000)
            byte = handle.read(1)
            handle.seek(entry["offset"] + 2000)
            handle.write(bytes([byte[0] ^ 0xFF]))
        image = f"{registry.host}/esgz:v1"
        _rpull(ctr, image)
        with _view_tree(ctr, ctr.chain_id(image), f"{scratch}/look") as tree:
            for _ in range(2):  # refused again: bad data is never kept
                with pytest.raises(OSError) as caught, open(f"{tree}/bin/busybox", "rb") as f:
                    f.read()
                assert caught.value.errno == errno.EIO
            with open(f"{tree}/etc/passwd") as handle, open(f"{reference}/etc/passwd") as want:
                assert handle.read() == want.read()


def _mount_id(path: str) -> str | None:
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            if fields[4] == path:
                return fields[0]
    return None


def test_an_unused_view_stays_mounted_for_a_while(scratch: str, busybox_archive: str) -> None:
    """The next container on an image starts on the view the last one left
    (not mounted again) while it is younger than --view-idle; then it goes,
    and so does an idle view when the snapshotter stops."""
    with (
        snapshotter(f"{scratch}/snapshotter", "--view-idle", "3") as snap,
        containerd(f"{scratch}/containerd", snap.address) as ctr,
    ):
        ctr.ctr("images", "import", "--snapshotter", "strata", busybox_archive)
        ctr.ctr("run", "--rm", "--snapshotter", "strata", IMAGE, "first", "/bin/echo")
        (view,) = _views_mounted(snap)
        first = _mount_id(f"{snap.root}/views/{view}")
        ctr.ctr("run", "--rm", "--snapshotter", "strata", IMAGE, "second", "/bin/echo")
        assert _mount_id(f"{snap.root}/views/{view}") == first  # the same mount
        ctr.collect_garbage()  # the view's last user goes
        deadline = time.monotonic() + 15
        while _views_mounted(snap) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _views_mounted(snap) == []
        ctr.ctr("run", "--rm", "--snapshotter", "strata", IMAGE, "third", "/bin/echo")
        assert len(_views_mounted(snap)) == 1
        ctr.collect_garbage()  # it removes the container's snapshot
        assert _names(snap.call("List", filters=["kind==active"])) == set()
    # A snapshotter that stops unmounts the views no container uses.
    assert _views_mounted(snap) == []


def test_a_kubernetes_pod_runs_on_strata(scratch: str, esgz_source: tuple[str, str]) -> None:
    """The CRI plugin with strata as its snapshotter, driven as a kubelet
    drives it: an eStargz image pulled lazily (remote snapshots, from CRI's
    labels), a host-network pod sandbox, containers as root and as a
    non-root user, exec in them, then stop and remove all of it."""
    store, reference = esgz_source
    layout = f"{scratch}/pause"
    with (
        run_registry(f"{scratch}/registry") as registry,
        snapshotter(f"{scratch}/snapshotter", "--tls-verify", "false") as snap,
    ):
        # The pod's sandbox image: busybox sleeping, as pause would.
        built, tag = build_busybox(layout)
        run("umoci", "config", "--image", f"{built}:{tag}", "--tag", "pause",
            "--config.entrypoint", "/bin/busybox", "--config.cmd", "sleep",
            "--config.cmd", "100000")  # fmt: skip
        run("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{built}:pause",
            f"docker://{registry.host}/pause:v1")  # fmt: skip
        strata(store, "push", "--tls-verify=false", "busybox:esgz", f"{registry.host}/esgz:v1")
        with containerd(f"{scratch}/containerd", snap.address, cri_registry=registry.host) as ctd:
            cri = CriClient(ctd.address)
            try:
                image = f"{registry.host}/esgz:v1"
                pulled = cri.call("PullImage", image=CRI["ImageSpec"](image=image))
                assert pulled.image_ref.startswith("sha256:")
                remote = _names(snap.call("List", filters=[f'labels."{REMOTE_MARK}"']))
                assert len(remote) == 3, remote
                content = subprocess.run(
                    ["ctr", "-a", ctd.address, "-n", "k8s.io", "content", "ls", "-q"],
                    capture_output=True, text=True, check=True,
                ).stdout.split()  # fmt: skip
                digests, _ = _blob_digests(store)
                assert not set(digests) & set(content), "a layer blob reached containerd"

                pod_config = host_network_pod("strata-pod", f"{scratch}/logs")
                pod = cri.call("RunPodSandbox", config=pod_config).pod_sandbox_id
                users = {"as-root": None, "as-user": 1000}
                containers = {}
                for name, uid in users.items():
                    security = CRI["LinuxContainerSecurityContext"](
                        run_as_user=CRI["Int64Value"](value=uid) if uid is not None else None
                    )
                    config = CRI["ContainerConfig"](
                        metadata=CRI["ContainerMetadata"](name=name),
                        image=CRI["ImageSpec"](image=image),
                        command=["/bin/busybox", "sleep", "100000"],
                        log_path=f"{name}.log",
                        linux=CRI["LinuxContainerConfig"](security_context=security),
                    )
                    created = cri.call("CreateContainer", pod_sandbox_id=pod, config=config,
                                       sandbox_config=pod_config)  # fmt: skip
                    containers[name] = created.container_id
                    cri.call("StartContainer", container_id=created.container_id)

                def execute(name: str, *command: str) -> Any:
                    return cri.call("ExecSync", container_id=containers[name], cmd=list(command),
                                    timeout=60)  # fmt: skip

                with open(f"{reference}/etc/passwd", "rb") as handle:
                    passwd = handle.read()
                for name in users:
                    done = execute(name, "/bin/cat", "/etc/passwd")
                    assert (done.exit_code, done.stdout) == (0, passwd)
                assert execute("as-root", "/bin/busybox", "id", "-u").stdout == b"0\n"
                assert execute("as-user", "/bin/busybox", "id", "-u").stdout == b"1000\n"
                assert execute("as-user", "/bin/cat", "/etc/shadow").exit_code != 0  # 0640 root
                assert execute("as-root", "/bin/cat", "/etc/shadow").exit_code == 0
                wrote = execute("as-root", "/bin/sh", "-c", "echo pod > /etc/written")
                assert wrote.exit_code == 0
                assert (
                    execute("as-user", "/bin/cat", "/etc/written").exit_code != 0
                )  # its own layer

                for container in containers.values():
                    cri.call("StopContainer", container_id=container, timeout=1)
                    cri.call("RemoveContainer", container_id=container)
                cri.call("StopPodSandbox", pod_sandbox_id=pod)
                cri.call("RemovePodSandbox", pod_sandbox_id=pod)
                cri.call("RemoveImage", image=CRI["ImageSpec"](image=image))
                active = snap.call("List", filters=["kind==active"])
                assert _names(active) == set()
            finally:
                cri.close()


def test_ctr_remote_pulls_zstd_chunked_lazily(scratch: str) -> None:
    """zstd:chunked layers (as skopeo writes them) become remote snapshots
    too: containerd holds no layer blob, and a container reads every file."""
    with open("/bin/busybox", "rb") as handle:
        busybox = handle.read()
    first = layer_tar(
        special_entry("bin/", tarfile.DIRTYPE),
        file_entry("bin/busybox", busybox, mode=0o755),
        special_entry("bin/sh", tarfile.SYMTYPE, "busybox"),
        file_entry("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    )
    second = layer_tar(file_entry("etc/added", b"added\n", uid=1000, gid=1000))
    layout = write_layout(f"{scratch}/layout", [LayoutLayer(first), LayoutLayer(second)])
    plan = Misbehaviour()
    with (
        run_registry(f"{scratch}/registry") as registry,
        misbehaving_proxy(registry.host, plan) as proxy,
        snapshotter(f"{scratch}/snapshotter", "--tls-verify", "false") as snap,
        containerd(f"{scratch}/containerd", snap.address) as ctr,
    ):
        run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-compress-format",
            "zstd:chunked", layout, f"docker://{registry.host}/zc:v1")  # fmt: skip
        image = f"{proxy}/zc:v1"
        _rpull(ctr, image)
        assert len(_names(snap.call("List", filters=[f'labels."{REMOTE_MARK}"']))) == 2
        manifest = json.loads(ctr.ctr("content", "get", ctr.manifest_digest(image)).stdout)
        content = set(ctr.ctr("content", "ls", "-q").stdout.split())
        assert not {layer["digest"] for layer in manifest["layers"]} & content
        assert plan.sent_bytes < len(busybox) // 4  # manifests of the layers, no data
        ran = ctr.ctr("run", "--rm", "--snapshotter", "strata", image, "zc", "/bin/sh", "-c",
                      "cat /etc/passwd /etc/added && busybox stat -c %u /etc/added")  # fmt: skip
        assert ran.stdout == "root:x:0:0::/root:/bin/sh\nadded\n1000\n"


def test_concurrent_pulls_and_starts(scratch: str, busybox_archive: str) -> None:
    """Containers started side by side on one image (one view, shared) while
    another image unpacks: each sees its own writes only, and nothing is left."""
    with (
        snapshotter(f"{scratch}/snapshotter", "--view-idle", "0") as snap,
        containerd(f"{scratch}/containerd", snap.address) as ctr,
    ):
        ctr.ctr("images", "import", "--snapshotter", "strata", busybox_archive)
        # Another image, with layers of its own, unpacks meanwhile.
        files = [file_entry(f"data/{number}", os.urandom(4096)) for number in range(200)]
        layout = write_layout(
            f"{scratch}/other",
            [LayoutLayer(layer_tar(*files[:100])), LayoutLayer(layer_tar(*files[100:]))],
        )
        other = f"{scratch}/other.tar"
        run("skopeo", "copy", "-q", layout, f"docker-archive:{other}:strata.test/other:v1")

        def start(number: int) -> str:
            script = f"echo {number} > /tmp/mine && busybox sleep 0.5 && cat /tmp/mine && ls /tmp"
            return ctr.ctr("run", "--rm", "--snapshotter", "strata", IMAGE, f"c{number}",
                           "/bin/sh", "-c", script).stdout  # fmt: skip

        with concurrent.futures.ThreadPoolExecutor(max_workers=7) as pool:
            runs = [pool.submit(start, number) for number in range(6)]
            imported = pool.submit(ctr.ctr, "images", "import", "--snapshotter", "strata", other)
            outputs = [done.result() for done in runs]
            imported.result()
        for number, output in enumerate(outputs):
            assert output.split() == [str(number), "fifo", "mine"]
        assert len(_names(snap.call("List", filters=["kind==committed"]))) == 5
        ctr.collect_garbage()
        active = _names(snap.call("List", filters=["kind==active"]))
        assert active == set(), _logs(ctr.log, snap.log)
        assert _views_mounted(snap) == []


def test_a_view_whose_daemon_died_is_mounted_again(scratch: str, busybox_archive: str) -> None:
    """A view's daemon killed: the next container on the image gets a new
    view (the dead mount detached), and runs."""
    with (
        snapshotter(f"{scratch}/snapshotter") as snap,
        containerd(f"{scratch}/containerd", snap.address) as ctr,
    ):
        ctr.ctr("images", "import", "--snapshotter", "strata", busybox_archive)
        ctr.ctr("run", "--rm", "--snapshotter", "strata", IMAGE, "first", "/bin/echo")
        (view,) = _views_mounted(snap)
        path = f"{snap.root}/views/{view}"
        _kill_view(path)
        ran = ctr.ctr("run", "--rm", "--snapshotter", "strata", IMAGE, "second", "/bin/cat",
                      "/usr/bin/hello")  # fmt: skip
        assert ran.stdout == "#!/bin/sh\necho hello\n"
        assert os.listdir(path)  # a live view again
        # The mounter killed, then the view again: the next mount starts a mounter.
        (mounter,) = [pid for pid in _children(snap.process.pid) if b"mounter" in _cmdline(pid)]
        os.kill(mounter, signal.SIGKILL)
        _kill_view(path)
        ctr.ctr("run", "--rm", "--snapshotter", "strata", IMAGE, "third", "/bin/echo")
        (again,) = [pid for pid in _children(snap.process.pid) if b"mounter" in _cmdline(pid)]
        assert again != mounter


def _kill_view(path: str) -> None:
    """SIGKILL a view's daemon, and wait until the mount answers as dead."""
    with open(pid_file(path)) as handle:
        os.kill(int(handle.read()), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        try:
            os.statvfs(path)  # asks the daemon (attributes may be cached)
        except OSError as exc:
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            return
        assert time.monotonic() < deadline, "the view still answers"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found += [int(child) for child in handle.read().split()]
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return b""


def test_remote_layers_from_a_registry_with_logins(
    scratch: str, esgz_source: tuple[str, str]
) -> None:
    """The snapshotter's --creds reach the views' on-demand reads too: a
    registry that wants a login serves the file data a container reads."""
    store, reference = esgz_source
    with (
        run_registry(f"{scratch}/registry", logins=True) as registry,
        snapshotter(
            f"{scratch}/snapshotter", "--tls-verify", "false", "--creds", f"{USER}:{PASSWORD}"
        ) as snap,  # fmt: skip
        containerd(f"{scratch}/containerd", snap.address) as ctr,
    ):
        strata(store, "push", "--tls-verify=false", "--creds", f"{USER}:{PASSWORD}",
               "busybox:esgz", f"{registry.host}/esgz:v1")  # fmt: skip
        image = f"{registry.host}/esgz:v1"
        _rpull(ctr, image, "--user", f"{USER}:{PASSWORD}")
        assert len(_names(snap.call("List", filters=[f'labels."{REMOTE_MARK}"']))) == 3
        ran = ctr.ctr("run", "--rm", "--snapshotter", "strata", image, "c1", "/bin/cat",
                      "/usr/bin/hello", "/etc/passwd")  # fmt: skip
        with open(f"{reference}/usr/bin/hello") as hello, open(f"{reference}/etc/passwd") as pw:
            assert ran.stdout == hello.read() + pw.read()


def test_a_snapshotter_killed_mid_unpack(scratch: str, busybox_archive: str) -> None:
    """SIGKILL at points inside an unpack: a snapshotter started again serves
    the import again and a container on it, and once the image is removed
    nothing of it is left (directories, views, the store's layers)."""
    top = f"{scratch}/snapshotter"
    snap = start_snapshotter(top)
    try:
        with containerd(f"{scratch}/containerd", snap.address) as ctr:
            for delay in (0.02, 0.1, 0.2, 0.4):
                importing = subprocess.Popen(
                    ["ctr", "-a", ctr.address, "-n", ctr.namespace, "images", "import",
                     "--snapshotter", "strata", busybox_archive],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(delay)
                snap.process.kill()
                snap.process.wait()
                importing.wait(timeout=120)
                snap = start_snapshotter(top)
                deadline = time.monotonic() + 30  # containerd dials again within 3 s
                while True:
                    done = ctr.ctr("images", "import", "--snapshotter", "strata",
                                   busybox_archive, check=False)  # fmt: skip
                    if done.returncode == 0 or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                assert done.returncode == 0, done.stderr
                ran = ctr.ctr("run", "--rm", "--snapshotter", "strata", IMAGE, f"c{delay}",
                              "/bin/cat", "/usr/bin/hello")  # fmt: skip
                assert ran.stdout == "#!/bin/sh\necho hello\n"
                ctr.ctr("images", "rm", "--sync", IMAGE)
                left = _names(snap.call("List"))
                assert left == set(), (delay, left, _logs(ctr.log, snap.log))
                snap.call("Cleanup")
                assert os.listdir(f"{snap.root}/snapshots") == []
                assert _views_mounted(snap) == []
    finally:
        stop(snap.process)
