"""Pull and unpack of a Debian image from a local registry: strata beside
`skopeo copy` + `umoci unpack`, in one run.

The image is a debootstrap minbase Debian 12 in two layers (as the tests
build it), pushed by skopeo into Debian's docker-registry on 127.0.0.1. Each
round starts from an empty store and an empty layout, with the page cache
dropped, and alternates the two tools:

  strata   `strata --root STORE pull HOST/debian:bookworm`: download, verify,
           unpack every layer and index the merged view (ready to mount)
  peers    `skopeo copy docker://... oci:DIR:bookworm`, then
           `umoci unpack --image DIR:bookworm BUNDLE`: download, verify, unpack

A second strata figure, `mount`, is the time from the pulled store to a
mount that answers (`strata mount --read-only`): the index is already built.

Usage: tools/run bench pull [--rounds 5]
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

from drivers import drop_caches

from tests.images import build_debian
from tests.registry import run_registry

STRATA = [sys.executable, "-m", "unionfs"]


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return elapsed


def tree_size(path: str) -> tuple[int, int]:
    files = total = 0
    for top, dirs, names in os.walk(path):
        for name in dirs + names:
            files += 1
            total += os.lstat(os.path.join(top, name)).st_size
    return files, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    top = tempfile.mkdtemp(prefix="strata-bench-pull-")
    try:
        print("building the Debian image with debootstrap ...", file=sys.stderr)
        layout, tag = build_debian(f"{top}/image")
        with run_registry(f"{top}/registry") as registry:
            image = f"{registry.host}/debian:{tag}"
            subprocess.run(
                ["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                 f"oci:{layout}:{tag}", f"docker://{image}"],
                check=True,
            )  # fmt: skip
            results: dict[str, list[float]] = {"strata": [], "skopeo+umoci": [], "mount": []}
            files = 0
            for round_number in range(args.rounds):
                store = f"{top}/store-{round_number}"
                drop_caches()
                results["strata"].append(
                    timed(
                        [*STRATA, "--root", store, "pull", "--quiet", "--tls-verify=false", image]
                    )
                )
                peer = f"{top}/peer-{round_number}"
                os.makedirs(peer)
                drop_caches()
                copy = timed(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                              f"docker://{image}", f"oci:{peer}/layout:{tag}"])  # fmt: skip
                unpack = timed(["umoci", "unpack", "--image", f"{peer}/layout:{tag}",
                                f"{peer}/bundle"])  # fmt: skip
                results["skopeo+umoci"].append(copy + unpack)
                files, _ = tree_size(f"{peer}/bundle/rootfs")
                mountpoint = f"{top}/mnt-{round_number}"
                os.makedirs(mountpoint)
                drop_caches()
                started = time.perf_counter()
                subprocess.run(
                    [*STRATA, "--root", store, "mount", "--read-only", f"debian:{tag}", mountpoint],
                    check=True,
                )
                try:
                    os.stat(f"{mountpoint}/etc/os-release")
                    results["mount"].append(time.perf_counter() - started)
                finally:
                    subprocess.run([*STRATA, "umount", mountpoint], check=True)
                shutil.rmtree(store)
                shutil.rmtree(peer)
        print(f"Debian 12 minbase, 2 layers, {files} entries; {args.rounds} rounds, medians")
        print(f"{'system':16} {'median s':>9} {'min s':>7} {'max s':>7}")
        for name, values in results.items():
            print(
                f"{name:16} {statistics.median(values):9.2f} {min(values):7.2f} {max(values):7.2f}"
            )
        ratio = statistics.median(results["strata"]) / statistics.median(results["skopeo+umoci"])
        print(f"strata pull / (skopeo copy + umoci unpack) = {ratio:.2f}")
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
