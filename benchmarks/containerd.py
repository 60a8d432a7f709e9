"""containerd on strata beside containerd's own overlayfs snapshotter, in one run.

Snapshotters: `overlayfs` (containerd's), `strata` (`strata snapshotter`:
containers' layers as overlay over the image's strata view) and `strata-fuse`
(`--writable fuse`: strata's own writable mounts). One private containerd
serves all three.

  start     `ctr run --rm` of a small busybox image: the first start after
            the import (strata mounts the image's view then) and the starts
            after it (medians of 10 per round)
  lazy      the first start of Debian 12 minbase + python3 running
            `python3 -c 'import json'`, behind a proxy that shares 100 Mbit/s
            among all blob bytes and adds 20 ms to each request:
            `ctr-remote images rpull` through strata (eStargz, the files the
            command opens first) against `ctr images pull` + overlayfs
  realwork  W9's steps (dpkg -i, venv + pip, configure && make, git, a cold
            python3, find, du) chrooted into a container layer each
            snapshotter prepares over W9's Debian rootfs, as W9 does on mounts

Usage: bash tools/run bench containerd [--rounds 3] [--only start,lazy,realwork]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import realwork
from drivers import drop_caches

from tests.containerd import Containerd, containerd, snapshotter
from tests.hostile import Misbehaviour, misbehaving_proxy
from tests.images import build_busybox, debootstrap_image, run
from tests.registry import run_registry

STRATA = [sys.executable, "-m", "unionfs"]
SNAPSHOTTERS = ("overlayfs", "strata", "strata-fuse")
RATE = 100e6 / 8  # 100 Mbit/s
LATENCY = 0.020
Samples = dict[str, dict[str, list[float]]]  # metric -> snapshotter -> values


def strata(store: str, *args: str) -> None:
    subprocess.run([*STRATA, "--root", store, *args], check=True, capture_output=True)


def _start(ctr: Containerd, snapshotter_name: str, image: str, container: str) -> float:
    """Seconds for one `ctr run --rm` of *image* on *snapshotter_name*."""
    started = time.perf_counter()
    ctr.ctr("run", "--rm", "--snapshotter", snapshotter_name, image, container, "/bin/echo")
    return time.perf_counter() - started


def bench_start(ctr: Containerd, top: str, rounds: int, samples: Samples) -> None:
    layout, tag = build_busybox(f"{top}/busybox")
    archive = f"{top}/busybox.tar"
    image = "strata.bench/busybox:v1"
    run("skopeo", "copy", "-q", f"oci:{layout}:{tag}", f"docker-archive:{archive}:{image}")
    for number in range(rounds):
        order = SNAPSHOTTERS[number % 3 :] + SNAPSHOTTERS[: number % 3]
        for name in order:
            ctr.ctr("images", "import", "--snapshotter", name, archive)

            first = _start(ctr, name, image, f"first-{name}")
            later = [_start(ctr, name, image, f"c{i}-{name}") for i in range(10)]
            samples.setdefault("start: first after import (s)", {}).setdefault(name, []).append(
                first
            )
            samples.setdefault("start: later, median of 10 (s)", {}).setdefault(name, []).append(
                statistics.median(later)
            )
            ctr.ctr("images", "rm", "--sync", image)


def bench_lazy(ctr: Containerd, top: str, rounds: int, samples: Samples) -> None:
    print("building Debian with python3 (debootstrap) ...", file=sys.stderr)
    layout, bundle = debootstrap_image(f"{top}/debian", "py", include=["python3"])
    shutil.rmtree(bundle)
    source = f"{top}/source"
    strata(source, "import", f"oci:{layout}:py", "debian:py")
    recording, reads = f"{top}/record", f"{top}/reads"
    os.makedirs(recording)
    strata(source, "mount", "--read-only", "--record-reads", reads, "debian:py", recording)
    try:
        subprocess.run(["chroot", recording, "python3", "-c", "import json"], check=True)
    finally:
        strata(source, "umount", recording)
    strata(source, "convert", "--estargz", "--quiet", "debian:py", "debian:esgz",
           "--prefetch", reads)  # fmt: skip
    with run_registry(f"{top}/registry") as registry:
        strata(source, "push", "--quiet", "--tls-verify=false", "debian:esgz",
               f"{registry.host}/debian:esgz")  # fmt: skip
        plan = Misbehaviour(latency=LATENCY, rate=RATE)
        with misbehaving_proxy(registry.host, plan) as proxy:
            image = f"{proxy}/debian:esgz"
            command = ["python3", "-c", "import json"]
            for number in range(rounds):
                for name in ("overlayfs", "strata") if number % 2 == 0 else ("strata", "overlayfs"):
                    drop_caches()
                    plan.sent_bytes = 0
                    started = time.perf_counter()
                    if name == "strata":
                        subprocess.run(
                            ["ctr-remote", "-a", ctr.address, "-n", ctr.namespace, "images",
                             "rpull", "--plain-http", "--snapshotter", "strata", image],
                            check=True, capture_output=True,
                        )  # fmt: skip
                    else:
                        ctr.ctr("images", "pull", "--plain-http", "--snapshotter", name, image)
                    ctr.ctr("run", "--rm", "--snapshotter", name, image, f"py-{name}", *command)
                    elapsed = time.perf_counter() - started
                    samples.setdefault("lazy: pull + first python3 start (s)", {}).setdefault(
                        name, []
                    ).append(elapsed)
                    samples.setdefault("lazy: MiB over the link by then", {}).setdefault(
                        name, []
                    ).append(plan.sent_bytes / 2**20)
                    ctr.ctr("images", "rm", "--sync", image)


def _rootfs_archive(top: str) -> tuple[str, str]:
    """W9's Debian rootfs as a one-layer image archive (made once, cached)."""
    tree = realwork.rootfs(False)
    image = "strata.bench/w9:v1"
    archive = os.path.join(realwork.cache_root(), f"w9-image-{os.stat(tree).st_mtime_ns}.tar")
    if not os.path.exists(archive):
        layout, bundle = f"{top}/w9-layout", f"{top}/w9-bundle"
        run("umoci", "init", "--layout", layout)
        run("umoci", "new", "--image", f"{layout}:v1")
        run("umoci", "unpack", "--image", f"{layout}:v1", bundle)
        realwork._copy_tree(tree, ["."], f"{bundle}/rootfs", [])
        run("umoci", "repack", "--image", f"{layout}:v1", bundle)
        run("skopeo", "copy", "-q", f"oci:{layout}:v1", f"docker-archive:{archive}.tmp:{image}")
        os.rename(f"{archive}.tmp", archive)
        shutil.rmtree(layout)
        shutil.rmtree(bundle)
    return archive, image


def bench_realwork(ctr: Containerd, top: str, rounds: int, samples: Samples) -> None:
    archive, image = _rootfs_archive(top)
    inputs = realwork.inputs(False)
    steps = realwork.steps(False)
    for name in SNAPSHOTTERS:
        ctr.ctr("images", "import", "--snapshotter", name, archive)
    chain = ctr.chain_id(image)
    for number in range(rounds):
        for name in SNAPSHOTTERS[number % 3 :] + SNAPSHOTTERS[: number % 3]:
            key, target = f"w9-{name}-{number}", f"{top}/w9-{name}-{number}"
            os.makedirs(target)
            ctr.ctr("snapshots", "--snapshotter", name, "prepare", key, chain)
            mounting = ctr.ctr("snapshots", "--snapshotter", name, "mounts", target, key).stdout
            subprocess.run(mounting, shell=True, check=True)
            try:
                drop_caches()
                total = 0.0
                for step in steps:
                    if step.cold:
                        drop_caches()
                    started = time.perf_counter()
                    realwork.in_container(target, inputs, step.command)
                    took = time.perf_counter() - started
                    total += took
                    samples.setdefault(f"realwork: {step.name} (s)", {}).setdefault(
                        name, []
                    ).append(took)
                samples.setdefault("realwork: all steps (s)", {}).setdefault(name, []).append(total)
            finally:
                subprocess.run(["umount", target], check=True)
                ctr.ctr("snapshots", "--snapshotter", name, "rm", key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="start,lazy,realwork")
    args = parser.parse_args()
    chosen = [part.strip() for part in args.only.split(",") if part.strip()]
    top = tempfile.mkdtemp(prefix="strata-bench-containerd-")
    samples: Samples = {}
    try:
        with (
            snapshotter(f"{top}/strata", "--tls-verify", "false") as plain,
            snapshotter(
                f"{top}/strata-fuse", "--tls-verify", "false", "--writable", "fuse"
            ) as fuse,
            containerd(
                f"{top}/containerd", plain.address, more_snapshotters={"strata-fuse": fuse.address}
            ) as ctr,  # fmt: skip
        ):
            benches = {"start": bench_start, "lazy": bench_lazy, "realwork": bench_realwork}
            for part in chosen:
                print(f"containerd bench: {part}", file=sys.stderr)
                benches[part](ctr, f"{top}/{part}", args.rounds, samples)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(f"{args.rounds} rounds, medians (min-max); ratios against containerd's overlayfs")
    print("| metric | overlayfs | strata | strata-fuse | strata / overlayfs |"
          " strata-fuse / overlayfs |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for metric, by_name in samples.items():
        cells, medians = [], {}
        for name in SNAPSHOTTERS:
            values = by_name.get(name)
            if not values:
                cells.append("-")
                continue
            medians[name] = statistics.median(values)
            cells.append(f"{medians[name]:.3g} ({min(values):.3g}-{max(values):.3g})")
        ratios = [
            f"{medians[name] / medians['overlayfs']:.2f}x"
            if name in medians and medians.get("overlayfs")
            else "-"
            for name in ("strata", "strata-fuse")
        ]
        print(f"| {metric} | {' | '.join(cells)} | {' | '.join(ratios)} |")


if __name__ == "__main__":
    main()
