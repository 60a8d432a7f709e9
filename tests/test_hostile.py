"""Hostile and broken input: each refused with one line, nothing written
outside the store, and the store still usable after."""

from __future__ import annotations

import errno
import gzip
import json
import os
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
    special_entry,
    write_layout,
)
from tests.images import run
from tests.mounts import daemon_logs, strata
from tests.registry import Registry, run_registry
from tests.test_images import Mounted

GOOD = LayoutLayer(layer_tar(file_entry("etc/ok", b"fine\n")))


def refused(store: str, *args: str, expect: str) -> None:
    result = strata(store, *args, check=False)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("strata: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert expect in lines[0], lines[0]


def assert_store_usable(scratch: str, store: str) -> None:
    """Nothing named, nothing half-made left; a good image still imports and mounts."""
    assert json.loads(strata(store, "images", "--json").stdout) == []
    strata(store, "prune")
    assert os.listdir(f"{store}/layers") == [] and os.listdir(f"{store}/tmp") == []
    good = write_layout(f"{scratch}/good", [GOOD])
    strata(store, "import", good, "good")
    with (
        Mounted(store, f"{scratch}/check", "--read-only", "good") as mnt,
        open(f"{mnt}/etc/ok") as handle,
    ):
        assert handle.read() == "fine\n"


def outside_tree(scratch: str) -> list[str]:
    """Everything under scratch but the store and the layouts: must not change."""
    found = []
    for top, dirs, files in os.walk(scratch):
        dirs[:] = [d for d in dirs if top != scratch or d not in ("store", "layout", "good")]
        found += [os.path.join(top, name) for name in dirs + files]
    return sorted(found)


def layer_cases(scratch: str) -> dict[str, tuple[list[LayoutLayer], str]]:
    outside = f"{scratch}/outside"
    tar_of = layer_tar
    zeros = layer_tar(file_entry("big", b"\0" * (4 << 20)))
    good_gzip = gzip.compress(layer_tar(file_entry("a", b"x" * 200_000)), mtime=0)
    corrupt = bytearray(good_gzip)
    corrupt[len(corrupt) // 2] ^= 0xFF
    flipped = bytearray(gzip.compress(layer_tar(file_entry("a")), mtime=0))
    flipped[len(flipped) // 2] ^= 0xFF
    return {
        "absolute": ([LayoutLayer(tar_of(file_entry(f"{outside}/abs")))], "absolute path"),
        "dotdot": ([LayoutLayer(tar_of(file_entry("../../../../escape")))], "'..'"),
        "symlink same layer": (
            [
                LayoutLayer(
                    tar_of(
                        special_entry("link", tarfile.SYMTYPE, outside),
                        file_entry("link/pwned"),
                    )
                )
            ],
            "not a directory",
        ),
        "symlink lower layer": (
            [
                LayoutLayer(tar_of(special_entry("link", tarfile.SYMTYPE, outside))),
                LayoutLayer(tar_of(file_entry("link/pwned"))),
            ],
            "a lower layer has a symlink there",
        ),
        "hardlink outside": (
            [LayoutLayer(tar_of(special_entry("hard", tarfile.LNKTYPE, "../../../etc/passwd")))],
            "'..'",
        ),
        "hardlink to a lower layer": (
            [
                LayoutLayer(tar_of(file_entry("etc/passwd"))),
                LayoutLayer(tar_of(special_entry("hard", tarfile.LNKTYPE, "etc/passwd"))),
            ],
            "not a file of this layer",
        ),
        "whiteout of ..": ([LayoutLayer(tar_of(file_entry("etc/.wh...")))], "names '..'"),
        "whiteout of .": ([LayoutLayer(tar_of(file_entry(".wh..")))], "names '.'"),
        "reserved xattr": (
            [
                LayoutLayer(
                    tar_of(
                        file_entry("x", pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"})
                    )
                )
            ],
            "reserved xattr",
        ),
        "whiteout device": (
            [LayoutLayer(tar_of(special_entry("dev0", tarfile.CHRTYPE)))],
            "reads as a whiteout",
        ),
        "truncated gzip": (
            [LayoutLayer(b"", blob=good_gzip[: len(good_gzip) // 2])],
            "corrupt or truncated",
        ),
        "corrupt gzip": ([LayoutLayer(b"", blob=bytes(corrupt))], "corrupt or truncated"),
        "not a tar": ([LayoutLayer(b"", blob=gzip.compress(b"hello " * 1000))], "corrupt"),
        "too large": ([LayoutLayer(zeros)], "larger than the limit"),
        "diff_id mismatch": (
            [LayoutLayer(tar_of(file_entry("a")), diff_id="sha256:" + "1" * 64)],
            "the image config says",
        ),
        "blob larger than its descriptor": (
            [LayoutLayer(tar_of(file_entry("a")), size_error=-1)],
            "the descriptor says",
        ),
        "blob smaller than its descriptor": (
            [LayoutLayer(tar_of(file_entry("a")), size_error=+7)],
            "the descriptor says",
        ),
        "blob digest mismatch": (
            # The same length as the true blob, so only the digest tells them apart.
            [LayoutLayer(tar_of(file_entry("a")), stored_as=bytes(flipped))],
            "content has digest",
        ),
    }


CASES = [
    "absolute",
    "dotdot",
    "symlink same layer",
    "symlink lower layer",
    "hardlink outside",
    "hardlink to a lower layer",
    "whiteout of ..",
    "whiteout of .",
    "reserved xattr",
    "whiteout device",
    "truncated gzip",
    "corrupt gzip",
    "not a tar",
    "too large",
    "diff_id mismatch",
    "blob digest mismatch",
    "blob larger than its descriptor",
    "blob smaller than its descriptor",
]


@pytest.mark.parametrize("case", CASES)
def test_hostile_layer_is_refused(scratch: str, case: str) -> None:
    os.makedirs(f"{scratch}/outside")
    layers, message = layer_cases(scratch)[case]
    layout = write_layout(f"{scratch}/layout", layers)
    store = f"{scratch}/store"
    before = outside_tree(scratch)
    refused(store, "import", layout, "bad", "--max-layer-size=1M", expect=message)
    assert outside_tree(scratch) == before
    assert_store_usable(scratch, store)


# What a layer's entries say, not how its blob is packed: the same in eStargz.
TAR_CASES = CASES[:10]


@pytest.mark.parametrize("case", TAR_CASES)
def test_hostile_estargz_layer_is_refused_lazily(
    scratch: str, plain_registry: Registry, case: str
) -> None:
    """`pull --lazy` lays a layer out from its TOC alone: the TOC is checked
    as the tar would be, and nothing is left of a refused image."""
    os.makedirs(f"{scratch}/outside")
    layers, message = layer_cases(scratch)[case]
    converted = [LayoutLayer.estargz(layer.tar) for layer in layers]
    layout = write_layout(f"{scratch}/layout", converted)
    image = f"{plain_registry.host}/hostile-{TAR_CASES.index(case)}:v1"
    run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", layout, f"docker://{image}")
    store = f"{scratch}/store"
    before = outside_tree(scratch)
    refused(store, "pull", "--lazy", "--tls-verify=false", image, expect=message)
    assert outside_tree(scratch) == before
    assert_store_usable(scratch, store)


@pytest.mark.parametrize("case", TAR_CASES)
def test_hostile_layer_is_refused_while_it_streams(
    scratch: str, plain_registry: Registry, case: str
) -> None:
    """`mount --lazy` of a plain image serves before its layers are checked
    whole: a hostile one is refused as it arrives (or when the stack is
    indexed), what waits gets EIO, the log says why, and nothing is kept."""
    os.makedirs(f"{scratch}/outside")
    layers, message = layer_cases(scratch)[case]
    layout = write_layout(f"{scratch}/layout", layers)
    image = f"{plain_registry.host}/hostile-stream-{TAR_CASES.index(case)}:v1"
    run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", layout, f"docker://{image}")
    store, mnt = f"{scratch}/store", f"{scratch}/mnt"
    os.makedirs(mnt)
    before = outside_tree(scratch)
    strata(store, "mount", "--lazy", "--read-only", "--tls-verify=false", image, mnt)
    try:
        deadline = time.monotonic() + 60
        while message not in daemon_logs(store):  # refused as it arrived, or once indexed
            assert time.monotonic() < deadline, daemon_logs(store)
            time.sleep(0.05)
        for attempt in (lambda: os.listdir(mnt), lambda: os.stat(f"{mnt}/etc")):
            with pytest.raises(OSError) as caught:
                attempt()
            assert caught.value.errno == errno.EIO
    finally:
        strata(store, "umount", mnt)
    assert outside_tree(scratch) == before
    strata(store, "rmi", image)
    assert_store_usable(scratch, store)


def test_manifest_that_does_not_match_its_digest_is_refused(scratch: str) -> None:
    """The manifest a tag of index.json names is verified like every blob."""
    os.makedirs(f"{scratch}/outside")
    layout = write_layout(f"{scratch}/layout", [GOOD])
    with open(f"{scratch}/layout/index.json") as handle:
        digest = json.load(handle)["manifests"][0]["digest"]
    blob = f"{scratch}/layout/blobs/sha256/{digest[len('sha256:') :]}"
    with open(blob, "rb") as handle:
        original = handle.read()
    changed = original.replace(b"config.v1+json", b"config.v1+jsoN")  # same size
    assert changed != original
    with open(blob, "wb") as handle:
        handle.write(changed)
    store = f"{scratch}/store"
    before = outside_tree(scratch)
    refused(store, "import", layout, "bad", expect="content has digest")
    assert outside_tree(scratch) == before
    assert_store_usable(scratch, store)


def test_bad_paths_and_names_are_one_line_errors(scratch: str) -> None:
    store = f"{scratch}/store"
    refused(store, "import", f"oci:{scratch}/missing", expect="not an OCI image layout")
    refused(store, "import", f"docker-archive:{scratch}/missing.tar", expect="no such file")
    refused(store, "import", "tarball:/x", expect="write oci:DIR")
    refused(store, "pull", "busybox", expect="names no registry")
    refused(store, "pull", "127.0.0.1:1/Bad_Name", expect="bad repository name")
    refused(store, "mount", "busybox", f"{scratch}/nowhere", expect="nowhere")
    refused(store, "diff", "nothing", expect="no container nothing")
    refused(store, "rm", "../etc", expect="bad container name")
    os.makedirs(f"{scratch}/layout")
    with open(f"{scratch}/layout/oci-layout", "w") as handle:
        handle.write("{}")
    with open(f"{scratch}/layout/index.json", "w") as handle:
        handle.write("{not json")
    refused(store, "import", f"oci:{scratch}/layout", expect="not valid JSON")
    good = write_layout(f"{scratch}/good", [GOOD])
    strata(store, "import", good, "good")
    with open(f"{scratch}/a-file", "w") as handle:
        handle.write("x")
    refused(store, "export", "good", f"oci:{scratch}/a-file/sub", expect="Not a directory")
    refused(store, "export", "good", f"docker-archive:{scratch}/nodir/x.tar", expect="No such")


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(str(tmp_path_factory.mktemp("registry"))) as running:
        yield running


def seeded(scratch: str, registry: Registry, repository: str) -> str:
    """A two-layer image pushed with strata itself into the real registry."""
    layers = [
        LayoutLayer(layer_tar(file_entry("data/one", os.urandom(300_000)))),
        LayoutLayer(layer_tar(file_entry("data/two", os.urandom(300_000)))),
    ]
    seed_store = f"{scratch}/seed"
    strata(seed_store, "import", write_layout(f"{scratch}/seed-layout", layers), "seed")
    strata(seed_store, "push", "seed", f"{registry.host}/{repository}", "--tls-verify=false")
    return repository


def test_broken_download_resumes_with_range(scratch: str, plain_registry: Registry) -> None:
    repository = seeded(scratch, plain_registry, "resume/image")
    store = f"{scratch}/store"
    plan = Misbehaviour(cut_blobs=100)  # every blob reply breaks halfway
    with misbehaving_proxy(plain_registry.host, plan) as proxy:
        refused(
            store,
            "pull",
            f"{proxy}/{repository}",
            "--tls-verify=false",
            "--retries=1",
            "--jobs=1",
            expect="pull again to resume",
        )
        assert json.loads(strata(store, "images", "--json").stdout) == []
        partial = [name for name in os.listdir(f"{store}/tmp") if name.endswith(".partial")]
        assert partial, "what arrived is kept for the next pull"
        plan.cut_blobs = 1  # the network recovers after one more break
        plan.seen_ranges.clear()
        strata(store, "pull", f"{proxy}/{repository}", "--tls-verify=false", "--jobs=1")
    assert any(value != "bytes=0-" for value in plan.seen_ranges), plan.seen_ranges
    assert [name for name in os.listdir(f"{store}/tmp") if name.endswith(".partial")] == []
    with Mounted(store, f"{scratch}/mnt", "--read-only", f"{proxy}/{repository}") as mnt:
        assert os.path.getsize(f"{mnt}/data/one") == 300_000


def test_a_registry_gone_mid_download_keeps_what_arrived(
    scratch: str, plain_registry: Registry
) -> None:
    repository = seeded(scratch, plain_registry, "gone/image")
    store = f"{scratch}/store"
    plan = Misbehaviour(cut_blobs=1, away_after_cut=True)
    with misbehaving_proxy(plain_registry.host, plan) as proxy:
        refused(
            store,
            "pull",
            f"{proxy}/{repository}",
            "--tls-verify=false",
            "--retries=1",
            "--jobs=1",
            expect="cannot reach the registry",
        )
        partial = [name for name in os.listdir(f"{store}/tmp") if name.endswith(".partial")]
        assert partial, "what arrived is kept for the next pull"
        plan.away = False
        plan.seen_ranges.clear()
        strata(store, "pull", f"{proxy}/{repository}", "--tls-verify=false", "--jobs=1")
    assert any(value != "bytes=0-" for value in plan.seen_ranges), plan.seen_ranges


@pytest.mark.parametrize(
    ("plan", "expect"),
    [
        (Misbehaviour(corrupt_blobs=True), "content has digest"),
        (Misbehaviour(wrong_digest_header=True), "differs from the registry's"),
        (Misbehaviour(manifest_body=b"{not json"), "not valid JSON"),
        (Misbehaviour(manifest_body=b"{" + b" " * (5 << 20) + b"}"), "larger than 4 MiB"),
        (Misbehaviour(manifest_body=b'{"schemaVersion": 1}'), "unsupported manifest type"),
    ],
    ids=["corrupt blob", "wrong digest header", "garbage manifest", "huge manifest", "schema 1"],
)
def test_bad_registry_replies_are_refused(
    scratch: str, plain_registry: Registry, plan: Misbehaviour, expect: str
) -> None:
    repository = seeded(scratch, plain_registry, "bad/replies")
    store = f"{scratch}/store"
    with misbehaving_proxy(plain_registry.host, plan) as proxy:
        refused(store, "pull", f"{proxy}/{repository}", "--tls-verify=false", expect=expect)
    assert [name for name in os.listdir(f"{store}/tmp") if name.endswith(".partial")] == []
    assert_store_usable(scratch, store)


def test_transient_server_errors_are_retried(scratch: str, plain_registry: Registry) -> None:
    repository = seeded(scratch, plain_registry, "flaky/image")
    store = f"{scratch}/store"
    plan = Misbehaviour(manifest_errors=2)
    with misbehaving_proxy(plain_registry.host, plan) as proxy:
        strata(store, "pull", f"{proxy}/{repository}", "--tls-verify=false")
    assert plan.manifest_errors == 0
    assert len(json.loads(strata(store, "images", "--json").stdout)) == 1


def test_unreachable_registry_is_one_line(scratch: str) -> None:
    refused(
        f"{scratch}/store",
        "pull",
        "127.0.0.1:9/nothing",
        "--tls-verify=false",
        "--retries=0",
        expect="cannot reach the registry",
    )


def test_long_names_and_paths_are_shortened_in_error_lines(scratch: str) -> None:
    """A 256-byte name or a 4,000-byte path keeps its start and end; no error
    line passes 200 characters."""
    store = f"{scratch}/store"
    long_name = "n" * 250 + "-tail"
    long_path = scratch + "".join(f"/{index:03d}" + "p" * 196 for index in range(20))
    cases = [
        (["mount", "--layer", f"{scratch}/{long_name}", f"{scratch}/mnt"], "-tail"),
        (["mount", "--layer", scratch, long_path], long_path[-20:]),
        (["import", f"oci:{long_path}"], "not an OCI image layout"),
        (["rm", long_name], "-tail"),
    ]
    os.makedirs(f"{scratch}/mnt")
    for args, expect in cases:
        result = strata(store, *args, check=False)
        assert result.returncode == 1
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("strata: error: "), result.stderr
        assert len(lines[0]) <= 200 and "..." in lines[0], lines[0]
        assert expect in lines[0], lines[0]
