"""Streaming mounts of plain layers from a real docker-registry: `strata
mount --lazy` of an image without TOCs serves at once, answers lookups of
what has arrived while the pull still runs, waits for the rest, and ends as
an ordinary stored image with the same inode numbers."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator

import pytest

from tests.hostile import (
    LayoutLayer,
    Misbehaviour,
    file_entry,
    layer_tar,
    misbehaving_proxy,
    write_layout,
)
from tests.images import build_busybox, umoci_rootfs
from tests.mounts import STRATA, daemon_logs, strata, unmount
from tests.registry import run_registry
from tests.trees import differences, snapshot
from unionfs.mount import pid_file

TLS = "--tls-verify=false"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The three-layer busybox image in a store; returns (store, reference tree)."""
    top = str(tmp_path_factory.mktemp("stream-source"))
    layout, tag = build_busybox(f"{top}/image")
    store = f"{top}/store"
    strata(store, "import", f"oci:{layout}:{tag}", "busybox")
    return store, umoci_rootfs(layout, tag, f"{top}/reference")


def layer_blobs(store: str, image: str) -> list[tuple[str, int]]:
    info = json.loads(strata(store, "inspect", image).stdout)
    return [(layer["digest"], layer["size"]) for layer in info["manifest"]["layers"]]


def first_file(store: str, digest: str) -> str:
    """The first regular file of a stored layer blob, in tar order."""
    with tarfile.open(f"{store}/blobs/sha256/{digest[7:]}", "r|*") as tar:
        for member in tar:
            if member.isreg() and not os.path.basename(member.name).startswith(".wh."):
                return member.name.removeprefix("./")
    raise AssertionError("no regular file in the layer")


def stored_layers(store: str) -> list[str]:
    return os.listdir(f"{store}/layers")


@contextlib.contextmanager
def slow_registry(
    scratch: str, source: tuple[str, str], seconds: float = 6
) -> Iterator[tuple[str, Misbehaviour]]:
    """The busybox image in a real registry, behind a link on which its pull
    takes about *seconds*: yields (the image's name there, the link's plan)."""
    total = sum(size for _, size in layer_blobs(source[0], "busybox"))
    plan = Misbehaviour(latency=0.02, rate=total / seconds)
    with run_registry(f"{scratch}/registry") as registry:
        strata(source[0], "push", TLS, "busybox", f"{registry.host}/plain:latest")
        with misbehaving_proxy(registry.host, plan) as proxy:
            yield f"{proxy}/plain:latest", plan


def test_a_plain_image_serves_while_it_streams_in(scratch: str, source: tuple[str, str]) -> None:
    blobs = layer_blobs(source[0], "busybox")
    total = sum(size for _, size in blobs)
    early = first_file(source[0], blobs[-1][0])  # the top layer streams in first
    store, mnt, ordinary = f"{scratch}/store", f"{scratch}/mnt", f"{scratch}/ordinary"
    os.makedirs(mnt)
    os.makedirs(ordinary)
    strata(source[0], "mount", "--read-only", "busybox", ordinary)
    with contextlib.ExitStack() as stack:
        stack.callback(unmount, source[0], ordinary)
        # A link slow enough that the pull takes seconds.
        with slow_registry(scratch, source) as (image, plan):
            started = time.monotonic()
            strata(store, "mount", "--lazy", TLS, image, mnt, "--name", "c")
            try:
                ready = time.monotonic() - started
                # Served before any layer is whole: a name that has arrived.
                with open(f"{mnt}/{early}", "rb") as handle:
                    data = handle.read()
                early_ino = os.stat(f"{mnt}/{early}").st_ino
                assert len(stored_layers(store)) < len(blobs), "the pull had ended already"
                with open(f"{source[1]}/{early}", "rb") as handle:
                    assert data == handle.read()
                # A name that is nowhere is missing once every layer's stream
                # has passed its place (they are in path order).
                assert not os.path.lexists(f"{mnt}/no/such/name")
                # The root's listing waits for every layer; then the tree is
                # the image's.
                os.listdir(mnt)
                assert len(stored_layers(store)) == len(blobs)
                assert differences(snapshot(source[1]), snapshot(mnt), times=False) == []
                # And to the attribute, what a mount of the image pulled whole
                # shows (but the root, which is the container's own directory).
                found = differences(snapshot(ordinary), snapshot(mnt))
                assert [line for line in found if not line.startswith("b'': ")] == []
                assert os.stat(f"{mnt}/{early}").st_ino == early_ino
                assert float(json.loads(strata(store, "images", "--json").stdout)[0]["local"]) == 1
                # Changes, made after the streams, land in the container.
                with open(f"{mnt}/etc/motd", "a") as handle:
                    handle.write("changed\n")
            finally:
                unmount(store, mnt)
    assert ready < 0.5 * total / plan.rate, f"ready after {ready:.1f} s"
    # An ordinary stored image now: mounts with no registry, same inode numbers.
    strata(store, "mount", image, mnt, "--name", "c")
    try:
        assert os.stat(f"{mnt}/{early}").st_ino == early_ino
        with open(f"{mnt}/etc/motd") as handle:
            assert handle.read().endswith("changed\n")
    finally:
        unmount(store, mnt)
    strata(store, "rm", "c")
    strata(store, "rmi", image)
    strata(store, "prune")
    assert stored_layers(store) == [] and glob.glob(f"{store}/tmp/layer-*") == []


def _command_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return ""


def test_a_command_starts_before_the_pull_ends(scratch: str, source: tuple[str, str]) -> None:
    """busybox is static: its exec needs only the names on its path (what it
    looks up after, /proc here, is nowhere in the image, so it waits)."""
    blobs = layer_blobs(source[0], "busybox")
    store, mnt = f"{scratch}/store", f"{scratch}/mnt"
    os.makedirs(mnt)
    with slow_registry(scratch, source) as (image, _):
        strata(store, "mount", "--lazy", "--read-only", TLS, image, mnt)
        try:
            command = subprocess.Popen(
                ["chroot", mnt, "/bin/busybox", "echo", "started"],
                stdout=subprocess.PIPE,
                text=True,
            )
            # It has started once its exec is done: the process is busybox.
            deadline = time.monotonic() + 120
            while _command_name(command.pid) != "busybox":
                assert command.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            layers_then = len(stored_layers(store))
            # statfs still answers, though the layers stored so far have moved.
            assert layers_then > 0 and os.statvfs(mnt).f_blocks > 0
            out, _ = command.communicate(timeout=120)
            assert command.returncode == 0 and out == "started\n"
            assert layers_then < len(blobs), "the pull had ended before the command started"
        finally:
            unmount(store, mnt)


def test_a_tampered_layer_is_eio_and_keeps_nothing(scratch: str, source: tuple[str, str]) -> None:
    """A plain layer is checked only whole: a stream whose data is wrong fails
    at the end (or where it stops making sense), and nothing of it is stored."""
    blobs = layer_blobs(source[0], "busybox")
    top = blobs[-1][0][7:]
    store, mnt = f"{scratch}/store", f"{scratch}/mnt"
    os.makedirs(mnt)
    with run_registry(f"{scratch}/registry") as registry:
        strata(source[0], "push", TLS, "busybox", f"{registry.host}/plain:latest")
        (stored,) = glob.glob(f"{scratch}/registry/data/**/{top}/data", recursive=True)
        with open(stored, "r+b") as handle:  # one byte near the end of the top layer
            handle.seek(-12, os.SEEK_END)
            byte = handle.read(1)
            handle.seek(-12, os.SEEK_END)
            handle.write(bytes([byte[0] ^ 0xFF]))
        strata(store, "mount", "--lazy", "--read-only", TLS, f"{registry.host}/plain:latest", mnt)
        try:
            with pytest.raises(OSError) as listing:
                os.listdir(mnt)
            assert listing.value.errno == errno.EIO
            with pytest.raises(OSError) as lookup:
                os.stat(f"{mnt}/no/such/name")
            assert lookup.value.errno == errno.EIO
            assert "streaming a layer failed" in daemon_logs(store)
        finally:
            unmount(store, mnt)
    assert stored_layers(store) == []
    assert not os.path.exists(f"{store}/blobs/sha256/{top}")
    assert glob.glob(f"{store}/tmp/layer-*") == []


def test_a_registry_away_mid_stream_and_back(scratch: str, source: tuple[str, str]) -> None:
    """What waits fails after --lazy-timeout while nothing arrives; what has
    arrived keeps working; the stream goes on once the registry is back."""
    blobs = layer_blobs(source[0], "busybox")
    early = first_file(source[0], blobs[-1][0])
    store, mnt = f"{scratch}/store", f"{scratch}/mnt"
    os.makedirs(mnt)
    with slow_registry(scratch, source) as (image, plan):
        strata(store, "mount", "--lazy", "--read-only", "--lazy-timeout", "2", TLS,
               image, mnt)  # fmt: skip
        try:
            with open(f"{mnt}/{early}", "rb") as handle:
                data = handle.read()
            plan.away = True
            started = time.monotonic()
            for attempt in (lambda: os.stat(f"{mnt}/zzz"), lambda: os.listdir(mnt)):
                with pytest.raises(OSError) as caught:
                    attempt()
                assert caught.value.errno == errno.EIO
            # It waited --lazy-timeout from the last bytes that came.
            assert time.monotonic() - started >= 1.5
            with open(f"{mnt}/{early}", "rb") as handle:  # what arrived still reads
                assert handle.read() == data
            assert len(stored_layers(store)) < len(blobs)
            # Away until the download has given up once and waits to try again.
            deadline = time.monotonic() + 60
            while "trying again until it answers" not in daemon_logs(store):
                assert time.monotonic() < deadline, "the download never gave up"
                time.sleep(0.2)
            plan.away = False
            deadline = time.monotonic() + 120
            while len(stored_layers(store)) < len(blobs):
                assert time.monotonic() < deadline, "the stream did not go on"
                time.sleep(0.2)
            assert differences(snapshot(source[1]), snapshot(mnt), times=False) == []
        finally:
            unmount(store, mnt)


def test_umount_mid_stream_leaves_a_pull_to_finish(scratch: str, source: tuple[str, str]) -> None:
    blobs = layer_blobs(source[0], "busybox")
    store, mnt = f"{scratch}/store", f"{scratch}/mnt"
    os.makedirs(mnt)
    with slow_registry(scratch, source, 10) as (image, plan):
        strata(store, "mount", "--lazy", "--read-only", TLS, image, mnt)
        started = time.monotonic()
        unmount(store, mnt)
        assert time.monotonic() - started < 10, "umount waited for the stream"
        assert len(stored_layers(store)) < len(blobs)
        assert glob.glob(f"{store}/tmp/layer-*") == []
        listed = json.loads(strata(store, "images", "--json").stdout)
        assert float(listed[0]["local"]) < 1
        # Not a traceback: the image is incomplete, and says how to finish it.
        refused = strata(store, "mount", "--read-only", image, mnt, check=False)
        assert refused.returncode != 0
        assert refused.stderr.count("\n") == 1 and "pull the image again" in refused.stderr
        plan.rate = 0  # no need to wait for the slow link any more
        strata(store, "pull", TLS, image)
    assert len(stored_layers(store)) == len(blobs)
    strata(store, "mount", "--read-only", image, mnt)
    try:
        assert differences(snapshot(source[1]), snapshot(mnt), times=False) == []
    finally:
        unmount(store, mnt)


def test_umount_while_the_streamed_stack_is_indexed(scratch: str) -> None:
    """The daemon waits for the indexing under way, then closes the index
    (it once closed it under that thread's write and hung)."""
    files = [file_entry(f"many/f{number:05d}", b"x") for number in range(20_000)]
    layout = write_layout(f"{scratch}/layout", [LayoutLayer(layer_tar(*files))])
    seed, store, mnt = f"{scratch}/seed", f"{scratch}/store", f"{scratch}/mnt"
    os.makedirs(mnt)
    strata(seed, "import", layout, "many")
    with run_registry(f"{scratch}/registry") as registry:
        image = f"{registry.host}/many:latest"
        strata(seed, "push", TLS, "many", image)
        strata(store, "mount", "--lazy", "--read-only", TLS, image, mnt)
        try:
            deadline = time.monotonic() + 60
            while not stored_layers(store):  # stored: the indexing starts now
                assert time.monotonic() < deadline
                time.sleep(0.005)
        finally:
            with open(pid_file(os.path.realpath(mnt))) as handle:
                daemon = int(handle.read())
            # Within a minute (the daemon had hung for good), and cleanly.
            try:
                ended = subprocess.run(
                    [*STRATA, "--root", store, "umount", mnt], capture_output=True, timeout=60
                )
            except subprocess.TimeoutExpired:
                os.kill(daemon, signal.SIGKILL)  # the one this test started
                raise
            if ended.returncode != 0:
                unmount(store, mnt)
    assert ended.returncode == 0, ended.stderr
    # The next mount serves it, indexed then if not before.
    strata(store, "mount", "--read-only", image, mnt)
    try:
        assert len(os.listdir(f"{mnt}/many")) == 20_000
    finally:
        unmount(store, mnt)


def test_prune_and_a_second_mount_while_a_layer_streams(
    scratch: str, source: tuple[str, str]
) -> None:
    """The streaming mount holds its layers' locks: prune leaves its work,
    and a second mount of the image waits for the layers instead of
    unpacking them into the same place."""
    blobs = layer_blobs(source[0], "busybox")
    store, first, second = f"{scratch}/store", f"{scratch}/first", f"{scratch}/second"
    os.makedirs(first)
    os.makedirs(second)
    with slow_registry(scratch, source) as (image, _):
        strata(store, "mount", "--lazy", "--read-only", TLS, image, first)
        try:
            strata(store, "prune")
            assert glob.glob(f"{store}/tmp/layer-*"), "prune took a streaming layer's work"
            assert len(stored_layers(store)) < len(blobs)
            strata(store, "mount", "--lazy", "--read-only", TLS, image, second)
            try:
                assert len(stored_layers(store)) == len(blobs)  # it waited for them
                for mnt in (first, second):
                    found = differences(snapshot(source[1]), snapshot(mnt), times=False)
                    assert found == []
            finally:
                unmount(store, second)
        finally:
            unmount(store, first)
    assert "streaming a layer failed" not in daemon_logs(store)
