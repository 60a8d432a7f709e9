"""The image store end to end: images built with umoci, moved with skopeo
through a real docker-registry, pulled, mounted, changed, committed, pushed
and read back with skopeo and umoci."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from tests.images import build_busybox, run, umoci_rootfs
from tests.mounts import STRATA, strata, unmount
from tests.registry import Registry, run_registry
from tests.trees import Node, Snapshot, differences, snapshot

# Directories layer 3 only implies: umoci gives them the time it unpacked
# them, strata keeps the lower layer's (or its own unpack time).
IMPLIED = {b"usr", b"usr/share", b"var", b"var/cache"}


@pytest.fixture(scope="session")
def session_dir() -> Iterator[str]:
    top = tempfile.mkdtemp(prefix="strata-images-")
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="session")
def busybox(session_dir: str) -> tuple[str, str]:
    return build_busybox(f"{session_dir}/busybox")


@pytest.fixture(scope="session")
def busybox_reference(session_dir: str, busybox: tuple[str, str]) -> Snapshot:
    return snapshot(umoci_rootfs(*busybox, f"{session_dir}/busybox-ref"))


@pytest.fixture(scope="session")
def registry(session_dir: str) -> Iterator[Registry]:
    with run_registry(f"{session_dir}/registry") as running:
        yield running


@pytest.fixture(scope="session")
def secure_registry(session_dir: str) -> Iterator[Registry]:
    with run_registry(f"{session_dir}/secure-registry", tls=True, logins=True) as running:
        yield running


def skopeo_copy(source: str, dest: str, *flags: str) -> None:
    run("skopeo", "copy", "--quiet", *flags, source, dest)


def seed_registry(registry: Registry, busybox: tuple[str, str], repository: str) -> str:
    layout, tag = busybox
    image = f"{registry.host}/{repository}:latest"
    skopeo_copy(f"oci:{layout}:{tag}", f"docker://{image}", *registry.skopeo_flags("dest"))
    return image


def without_times(tree: Snapshot, paths: set[bytes]) -> Snapshot:
    nodes = {
        rel: Node(**{**node.__dict__, "mtime_ns": 0}) if rel in paths else node
        for rel, node in tree.nodes.items()
    }
    return Snapshot(nodes, tree.hardlink_groups, tree.listings, tree.phantoms)


def images_without_implied_times(first: Snapshot, second: Snapshot) -> tuple[Snapshot, Snapshot]:
    return without_times(first, IMPLIED), without_times(second, IMPLIED)


def whole_seconds(tree: Snapshot) -> Snapshot:
    """Layer tars keep whole seconds."""
    nodes = {
        rel: Node(**{**node.__dict__, "mtime_ns": node.mtime_ns // 10**9 * 10**9})
        for rel, node in tree.nodes.items()
    }
    return Snapshot(nodes, tree.hardlink_groups, tree.listings, tree.phantoms)


class Mounted:
    """`strata mount` of an image, unmounted (exactly this mountpoint) after."""

    def __init__(self, root: str, mountpoint: str, *args: str) -> None:
        self.root, self.mountpoint, self.args = root, mountpoint, args

    def __enter__(self) -> str:
        os.makedirs(self.mountpoint, exist_ok=True)
        strata(self.root, "mount", *self.args, self.mountpoint)
        return self.mountpoint

    def __exit__(self, *exc: object) -> None:
        unmount(self.root, self.mountpoint)


def test_imported_oci_layout_mounts_as_umoci_unpacks_it(
    scratch: str, busybox: tuple[str, str], busybox_reference: Snapshot
) -> None:
    layout, tag = busybox
    store = f"{scratch}/store"
    strata(store, "import", f"oci:{layout}:{tag}", "busybox")
    with Mounted(store, f"{scratch}/mnt", "--read-only", "busybox") as mnt:
        mounted = snapshot(mnt)
    assert (
        differences(without_times(busybox_reference, IMPLIED), without_times(mounted, IMPLIED))
        == []
    )
    # The features the image was built to hold are really there.
    nodes = mounted.nodes
    assert nodes[b"bin/su"].mode & 0o4000
    assert nodes[b"tmp/fifo"].kind == "p" and nodes[b"dev/null"].kind == "c"
    assert frozenset({b"bin/busybox", b"bin/ls", b"bin/cat"}) in mounted.hardlink_groups
    assert (b"etc/motd" not in nodes) and (b"var/lib/data" not in nodes)
    assert nodes[b"srv/swap"].kind == "d" and nodes[b"lib/was-dir"].kind == "l"
    assert mounted.listings[b"opt/old"] == [b"fresh"]
    assert ("user.origin", b"hand") in nodes[b"etc/xattr-file"].xattrs
    assert nodes[b"var/cache/implied.txt"].uid == 1000


def test_pull_from_registry_and_mount_by_short_name(
    scratch: str, registry: Registry, busybox: tuple[str, str], busybox_reference: Snapshot
) -> None:
    image = seed_registry(registry, busybox, "pulled/busybox")
    store = f"{scratch}/store"
    digest = strata(store, "pull", image.removesuffix(":latest"), *registry.strata_flags()).stdout
    listed = json.loads(strata(store, "images", "--json").stdout)
    assert listed[0]["names"] == [image] and listed[0]["digest"] == digest.strip()
    assert listed[0]["layers"] == 3
    with Mounted(store, f"{scratch}/mnt", "busybox", "--name", "box") as mnt:
        mounted = snapshot(mnt)
    assert (
        differences(without_times(busybox_reference, IMPLIED), without_times(mounted, IMPLIED))
        == []
    )
    # A second pull finds every blob and layer already there.
    layers_before = sorted(os.listdir(f"{store}/layers"))
    strata(store, "pull", image, *registry.strata_flags())
    assert sorted(os.listdir(f"{store}/layers")) == layers_before


def test_tls_and_login_registry(
    scratch: str, secure_registry: Registry, busybox: tuple[str, str]
) -> None:
    image = seed_registry(secure_registry, busybox, "secure/busybox")
    store = f"{scratch}/store"
    flags = secure_registry.strata_flags()
    ca_flag = [flag for flag in flags if flag.startswith("--ca-cert")]

    refused = strata(store, "pull", image, *ca_flag, check=False)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "wants a login" in refused.stderr
    untrusted = strata(store, "pull", image, f"--creds=strata:{'s3cret-pass'}", check=False)
    assert untrusted.returncode == 1 and "TLS failed" in untrusted.stderr
    assert untrusted.stderr.count("\n") == 1
    wrong = strata(store, "pull", image, *ca_flag, "--creds=strata:wrong", check=False)
    assert wrong.returncode == 1 and "access denied" in wrong.stderr
    assert json.loads(strata(store, "images", "--json").stdout) == []

    strata(store, "pull", image, *flags)
    pushed = f"{secure_registry.host}/secure/copy:v2"
    strata(store, "push", image, pushed, *flags, "--chunk-size=64K")
    inspect = ["skopeo", "inspect", f"--cert-dir={os.path.dirname(secure_registry.ca_cert or '')}",
               "--creds=strata:s3cret-pass"]  # fmt: skip
    ours = json.loads(run(*inspect, f"docker://{pushed}"))
    theirs = json.loads(run(*inspect, f"docker://{image}"))
    assert ours["Layers"] == theirs["Layers"] and ours["Digest"] == theirs["Digest"]


def change_container(mnt: str) -> None:
    """Every kind of change a container makes."""
    with open(f"{mnt}/etc/passwd", "a") as handle:  # lower file changed
        handle.write("added:x:1001:1001::/:/bin/sh\n")
    with open(f"{mnt}/home/user/notes", "w") as handle:  # new file in a lower dir
        handle.write("notes\n")
    os.chmod(f"{mnt}/etc/shadow", 0o600)  # metadata only
    os.unlink(f"{mnt}/bin/echo")  # deletion
    shutil.rmtree(f"{mnt}/srv/swap")  # directory deletion
    os.rename(f"{mnt}/opt/old", f"{mnt}/opt/renamed")  # directory rename
    os.makedirs(f"{mnt}/new/deep/dir")
    with open(f"{mnt}/new/deep/dir/file", "w") as handle:
        handle.write("deep\n")
    os.symlink("../etc/passwd", f"{mnt}/new/link")
    os.link(f"{mnt}/new/deep/dir/file", f"{mnt}/new/hard")
    os.mkfifo(f"{mnt}/new/fifo")
    os.setxattr(f"{mnt}/new/deep/dir/file", "user.tag", b"v")
    shutil.rmtree(f"{mnt}/usr/share")  # replaced by a file of the same name
    with open(f"{mnt}/usr/share", "w") as handle:
        handle.write("was a directory\n")


def test_commit_push_pull_round_trip(
    scratch: str, registry: Registry, busybox: tuple[str, str]
) -> None:
    image = seed_registry(registry, busybox, "trip/busybox")
    store, fresh = f"{scratch}/store", f"{scratch}/fresh"
    strata(store, "pull", image, *registry.strata_flags())
    with Mounted(store, f"{scratch}/mnt", "busybox", "--name", "work") as mnt:
        change_container(mnt)
        changed = whole_seconds(snapshot(mnt))
        lines = strata(store, "diff", mnt).stdout.splitlines()
        strata(store, "commit", mnt, "mybox:v2")
    assert "D /bin/echo" in lines and "A /opt/renamed" in lines and "D /opt/old" in lines
    assert "C /etc/passwd" in lines and "A /new/deep/dir/file" in lines
    pushed = f"{registry.host}/trip/mybox:v2"
    strata(store, "push", "mybox:v2", pushed, *registry.strata_flags())
    strata(fresh, "pull", pushed, *registry.strata_flags())
    with Mounted(fresh, f"{scratch}/mnt2", "--read-only", "mybox:v2") as mnt:
        assert differences(changed, snapshot(mnt)) == []
    # Real tools read what strata pushed.
    copied = f"{scratch}/copied"
    skopeo_copy(f"docker://{pushed}", f"oci:{copied}:v2", *registry.skopeo_flags("src"))
    rootfs = umoci_rootfs(copied, "v2", f"{scratch}/unpacked")
    assert (
        differences(without_times(changed, IMPLIED), without_times(snapshot(rootfs), IMPLIED)) == []
    )


def test_same_changes_and_timestamp_give_the_same_digest(
    scratch: str, busybox: tuple[str, str]
) -> None:
    layout, tag = busybox
    store = f"{scratch}/store"
    strata(store, "import", f"oci:{layout}:{tag}", "busybox")
    digests = []
    for name in ("one", "two"):
        with Mounted(store, f"{scratch}/{name}", "busybox", "--name", name) as mnt:
            change_container(mnt)
        out = strata(store, "commit", name, f"box:{name}", "--timestamp", "2024-01-02T03:04:05Z")
        digests.append(out.stdout.strip())
    assert digests[0] == digests[1]
    config = json.loads(strata(store, "inspect", "box:one").stdout)["config"]
    assert config["created"] == "2024-01-02T03:04:05Z"
    assert config["history"][-1]["created_by"] == "strata commit"


def test_diff_lists_exactly_the_changes(scratch: str, busybox: tuple[str, str]) -> None:
    layout, tag = busybox
    store = f"{scratch}/store"
    strata(store, "import", f"oci:{layout}:{tag}", "busybox")
    with Mounted(store, f"{scratch}/mnt", "busybox", "--name", "c") as mnt:
        os.unlink(f"{mnt}/bin/sh")
        with open(f"{mnt}/etc/new", "w") as handle:
            handle.write("x")
        os.rename(f"{mnt}/opt/old", f"{mnt}/opt/moved")
    assert strata(store, "diff", "c").stdout.splitlines() == [
        "C /bin",
        "D /bin/sh",
        "C /etc",
        "A /etc/new",
        "C /opt",
        "A /opt/moved",
        "A /opt/moved/fresh",
        "D /opt/old",
    ]


def test_container_layer_outlives_unmount_until_rm(scratch: str, busybox: tuple[str, str]) -> None:
    layout, tag = busybox
    store = f"{scratch}/store"
    strata(store, "import", f"oci:{layout}:{tag}", "busybox")
    with Mounted(store, f"{scratch}/mnt", "busybox", "--name", "keep") as mnt:
        with open(f"{mnt}/kept", "w") as handle:
            handle.write("still here\n")
        busy = strata(store, "rm", "keep", check=False)
        assert busy.returncode == 1 and "mounted" in busy.stderr
    with (
        Mounted(store, f"{scratch}/mnt", "busybox", "--name", "keep") as mnt,
        open(f"{mnt}/kept") as handle,
    ):
        assert handle.read() == "still here\n"
    used = strata(store, "rmi", "busybox", check=False)
    assert used.returncode == 1 and "keep" in used.stderr
    strata(store, "rm", "keep")
    assert "keep" not in strata(store, "ps").stdout
    strata(store, "rmi", "busybox")
    assert os.listdir(f"{store}/layers") == [] and os.listdir(f"{store}/blobs/sha256") == []


def test_docker_archive_export_and_import(scratch: str, busybox: tuple[str, str]) -> None:
    layout, tag = busybox
    store, other = f"{scratch}/store", f"{scratch}/other"
    strata(store, "import", f"oci:{layout}:{tag}", "busybox")
    archive = f"{scratch}/busybox.tar"
    strata(store, "export", "busybox", f"docker-archive:{archive}")
    # skopeo reads it as `docker load` would.
    inspected = json.loads(run("skopeo", "inspect", f"docker-archive:{archive}"))
    assert len(inspected["Layers"]) == 3
    strata(other, "import", f"docker-archive:{archive}")
    oci_copy = f"{scratch}/oci-copy"
    strata(store, "export", "busybox", f"oci:{oci_copy}:exported")
    with (
        Mounted(store, f"{scratch}/a", "--read-only", "busybox") as first,
        Mounted(other, f"{scratch}/b", "--read-only", "busybox") as second,
    ):
        assert differences(snapshot(first), snapshot(second)) == []
    assert run("umoci", "ls", "--layout", oci_copy).split() == ["exported"]


def test_store_lists_inspects_and_prunes(scratch: str, busybox: tuple[str, str]) -> None:
    layout, tag = busybox
    store = f"{scratch}/store"
    strata(store, "import", f"oci:{layout}:{tag}", "a/busybox:one")
    strata(store, "import", f"oci:{layout}:{tag}", "b/busybox:two")
    layers = os.listdir(f"{store}/layers")
    assert len(layers) == 3  # shared by both names, unpacked once
    ambiguous = strata(store, "inspect", "busybox:one", check=False)
    assert ambiguous.returncode == 0
    info = json.loads(ambiguous.stdout)
    assert sorted(info["names"]) == ["a/busybox:one", "b/busybox:two"]
    assert strata(store, "inspect", info["id"][7:19]).returncode == 0
    strata(store, "rmi", "a/busybox:one")
    assert len(os.listdir(f"{store}/layers")) == 3  # still named b/busybox:two
    os.makedirs(f"{store}/tmp/layer-leftover")
    assert "1 leftovers" in strata(store, "prune").stdout
    missing = strata(store, "mount", "nothing:here", f"{scratch}", check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("strata: error: no image")


def test_an_image_removed_and_imported_again_reads(scratch: str, busybox: tuple[str, str]) -> None:
    """rmi drops the layers; imported again, they are new directories whose
    files have other inode numbers, and the index must not take them for the
    ones it saw (every read of a lower file failed with ESTALE)."""
    layout, tag = busybox
    store, reference = f"{scratch}/store", umoci_rootfs(layout, tag, f"{scratch}/reference")
    strata(store, "import", f"oci:{layout}:{tag}", "busybox")
    with Mounted(store, f"{scratch}/mnt", "--read-only", "busybox") as mnt:
        first = snapshot(mnt)
    strata(store, "rmi", "busybox")
    assert os.listdir(f"{store}/layers") == []
    filler = f"{scratch}/filler"  # the inode numbers the old files had are taken
    os.makedirs(filler)
    for number in range(64):
        with open(f"{filler}/{number}", "w"):
            pass
    strata(store, "import", f"oci:{layout}:{tag}", "busybox")
    with Mounted(store, f"{scratch}/mnt", "--read-only", "busybox") as mnt:
        assert differences(first, snapshot(mnt)) == []
    assert differences(snapshot(reference), first, times=False) == []


def test_debian_image_mounts_as_umoci_unpacks_it(
    scratch: str, registry: Registry, debian_image: tuple[str, str]
) -> None:
    layout, tag = debian_image
    image = f"{registry.host}/debian:bookworm"
    skopeo_copy(f"oci:{layout}:{tag}", f"docker://{image}", *registry.skopeo_flags("dest"))
    reference = snapshot(umoci_rootfs(layout, tag, f"{scratch}/ref"))
    store = f"{scratch}/store"
    strata(store, "pull", image, *registry.strata_flags())
    with Mounted(store, f"{scratch}/mnt", "debian:bookworm", "--name", "deb") as mnt:
        assert differences(reference, snapshot(mnt)) == []
        # The image works as a root filesystem.
        out = subprocess.run(
            ["chroot", mnt, "/usr/bin/dpkg-query", "-W", "-f=${Package}\n", "dpkg"],
            capture_output=True,
            text=True,
        )
        assert out.stdout == "dpkg\n", out.stderr
        assert not os.path.exists(f"{mnt}/usr/share/doc")


def test_bearer_token_registry(scratch: str, busybox: tuple[str, str]) -> None:
    """docker-registry with `auth: token`: strata follows the Bearer challenge
    to the token service, with the login, for pull and for push."""
    with run_registry(f"{scratch}/registry", tokens=True) as tokens:
        image = seed_registry(tokens, busybox, "tokens/busybox")
        store = f"{scratch}/store"
        anonymous = strata(store, "pull", image, "--tls-verify=false", check=False)
        assert anonymous.returncode == 1 and "token service refused" in anonymous.stderr
        strata(store, "pull", image, *tokens.strata_flags())
        pushed = f"{tokens.host}/tokens/again:v1"
        summary = strata(store, "push", image, pushed, *tokens.strata_flags()).stderr
        # The blobs were pulled from tokens/busybox: the registry links them over.
        assert "0 uploaded, 4 mounted from another repository" in summary
        out = run("skopeo", "inspect", "--tls-verify=false", "--creds=strata:s3cret-pass",
                  f"docker://{pushed}")  # fmt: skip
        assert len(json.loads(out)["Layers"]) == 3


def test_layer_compressions_and_platform_choice(scratch: str, registry: Registry) -> None:
    """gzip, zstd and plain layers; an index with two platforms, imported and
    pulled (OCI index through the registry, and a Docker v2 manifest list)."""
    import zstandard

    from tests.hostile import LayoutLayer, file_entry, layer_tar, write_multi_platform

    plain = layer_tar(file_entry("etc/plain", b"plain\n"))
    zstd = layer_tar(file_entry("etc/zstd", b"zstd\n"))
    amd64 = [
        LayoutLayer(layer_tar(file_entry("etc/arch", b"amd64\n"))),
        LayoutLayer(plain, blob=plain, media_type="application/vnd.oci.image.layer.v1.tar"),
        LayoutLayer(
            zstd,
            blob=zstandard.ZstdCompressor().compress(zstd),
            media_type="application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    ]
    arm64 = [LayoutLayer(layer_tar(file_entry("etc/arch", b"arm64\n")))]
    layout = write_multi_platform(f"{scratch}/multi", {"linux/amd64": amd64, "linux/arm64": arm64})
    store = f"{scratch}/store"
    strata(store, "import", layout, "multi:amd")
    strata(store, "import", layout, "multi:arm", "--platform", "linux/arm64")
    missing = strata(store, "import", layout, "multi:s390", "--platform=linux/s390x", check=False)
    assert missing.returncode == 1 and "linux/amd64, linux/arm64" in missing.stderr
    with Mounted(store, f"{scratch}/amd", "--read-only", "multi:amd") as mnt:
        for name, text in (("arch", "amd64\n"), ("plain", "plain\n"), ("zstd", "zstd\n")):
            with open(f"{mnt}/etc/{name}") as handle:
                assert handle.read() == text
    # Through the registry: skopeo copies the whole index, or converts to Docker v2.
    skopeo_copy(layout, f"docker://{registry.host}/multi/oci:v1", "--all",
                *registry.skopeo_flags("dest"))  # fmt: skip
    pulled = f"{scratch}/pulled"
    strata(pulled, "pull", f"{registry.host}/multi/oci:v1", "--platform=linux/arm64",
           *registry.strata_flags())  # fmt: skip
    with (
        Mounted(pulled, f"{scratch}/arm", "--read-only", "multi/oci:v1") as mnt,
        open(f"{mnt}/etc/arch") as handle,
    ):
        assert handle.read() == "arm64\n"
    # Docker v2 has no zstd: the arm64 image (gzip) goes over as schema 2.
    skopeo_copy(layout, f"docker://{registry.host}/multi/docker:v1", "--format=v2s2",
                "--override-arch=arm64", *registry.skopeo_flags("dest"))  # fmt: skip
    strata(pulled, "pull", f"{registry.host}/multi/docker:v1", *registry.strata_flags())
    info = json.loads(strata(pulled, "inspect", "multi/docker:v1").stdout)
    assert info["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"


def test_concurrent_pulls_share_one_unpack(
    scratch: str, registry: Registry, busybox: tuple[str, str]
) -> None:
    """Pulls of one image into one store at once: each blob is downloaded
    under its own lock (two once wrote the same partial file) and each layer
    unpacked once."""
    image = seed_registry(registry, busybox, "together/busybox")
    for round_number in range(3):
        store = f"{scratch}/store-{round_number}"
        command = [*STRATA, "--root", store, "pull", image, *registry.strata_flags()]
        pulls = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(4)]
        for process in pulls:
            _, err = process.communicate(timeout=300)
            assert process.returncode == 0, err
        assert len(os.listdir(f"{store}/layers")) == 3
        assert os.listdir(f"{store}/tmp") == []
        assert len(json.loads(strata(store, "images", "--json").stdout)) == 1
