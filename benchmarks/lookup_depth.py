"""Lookup cost against stack depth: strata beside overlayfs and fuse-overlayfs.

For stacks of 1, 8, 32 and 128 layers (200 files per layer, all in one
directory that every layer has, as /usr/lib is in real images: a peer that
probes layers top-down pays for each layer above the one holding the file),
each system is mounted,
caches are dropped, and every file is stat'ed cold, then again warm, then a
name that does not exist in each directory (negative lookup). Prints µs per
stat. Then the mount readiness of a 50,000-file stack: first mount (indexing
rate) and a mount of the already indexed stack.

    bash tools/run bench lookup_depth [--depths 1,8,32,128] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from peers import SYSTEMS, available, drop_caches, mounted

FILES_PER_LAYER = 200


def build_stack(top: str, depth: int, files_per_layer: int) -> list[str]:
    layers = []
    for number in range(depth):
        layer = os.path.join(top, str(number))
        directory = os.path.join(layer, "usr", "lib")
        os.makedirs(directory)
        for index in range(files_per_layer):
            with open(os.path.join(directory, f"l{number}-f{index}"), "wb") as handle:
                handle.write(b"x")
        layers.append(layer)
    return layers


def stat_all(paths: list[str]) -> float:
    """Mean µs per lstat over *paths*."""
    started = time.perf_counter_ns()
    for path in paths:
        os.lstat(path)
    return (time.perf_counter_ns() - started) / len(paths) / 1000


def stat_missing(paths: list[str]) -> float:
    started = time.perf_counter_ns()
    for path in paths:
        try:
            os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            raise AssertionError(f"{path} should not exist")
    return (time.perf_counter_ns() - started) / len(paths) / 1000


def measure(system: str, layers: list[str], scratch: str, store: str) -> dict[str, float]:
    mountpoint = os.path.join(scratch, f"mnt-{system}")
    depth = len(layers)
    with mounted(system, layers, mountpoint, store) as seconds:
        if system == "strata" and seconds > 2:
            print(f"  (strata indexed {depth} layers on first mount: {seconds:.1f} s)")
        files = [
            os.path.join(mountpoint, "usr", "lib", f"l{n}-f{i}")
            for n in range(depth)
            for i in range(FILES_PER_LAYER)
        ]
        missing = [os.path.join(mountpoint, "usr", "lib", f"missing{i}") for i in range(2000)]
        drop_caches()
        cold = stat_all(files)
        warm = min(stat_all(files) for _ in range(3))
        negative = stat_missing(missing)
    return {"cold": cold, "warm": warm, "negative": negative}


def mount_readiness(scratch: str, store: str) -> None:
    top = os.path.join(scratch, "big")
    layers = []
    for number in range(10):  # 10 layers x 5,000 files
        layer = os.path.join(top, str(number))
        for sub in range(50):
            directory = os.path.join(layer, "usr", "share", f"l{number}", f"d{sub}")
            os.makedirs(directory)
            for index in range(100):
                with open(os.path.join(directory, f"f{index}"), "wb") as handle:
                    handle.write(b"y")
        layers.append(layer)
    files = 10 * 50 * 100
    mountpoint = os.path.join(scratch, "mnt-big")
    with mounted("strata", layers, mountpoint, store) as first:
        pass
    seconds = []
    for _ in range(3):
        with mounted("strata", layers, mountpoint, store) as again:
            seconds.append(again)
    print(f"\nmount readiness, {files:,} files in 10 layers (strata)")
    print(f"  first mount, indexing:  {first:6.2f} s   ({files / first:,.0f} files/s)")
    print(f"  mount, already indexed: {statistics.median(seconds):6.2f} s   (median of 3)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1,8,32,128")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--skip-readiness", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("lookup_depth: needs root (mounts, drop_caches)", file=sys.stderr)
        return 2
    depths = [int(d) for d in args.depths.split(",")]
    systems = [s for s in args.systems.split(",") if available(s)]
    # Short paths: the kernel takes at most one page of mount options.
    scratch = tempfile.mkdtemp(prefix="sb", dir="/tmp")
    results: dict[tuple[str, int], dict[str, float]] = {}
    try:
        store = os.path.join(scratch, "store")
        if not drop_caches():
            print("warning: cannot drop caches; 'cold' figures are warm", file=sys.stderr)
        for depth in depths:
            layers = build_stack(os.path.join(scratch, f"d{depth}"), depth, FILES_PER_LAYER)
            for system in systems:
                rounds = []
                for _ in range(args.rounds):
                    rounds.append(measure(system, layers, scratch, store))
                results[system, depth] = {
                    key: statistics.median(r[key] for r in rounds) for key in rounds[0]
                }
                figures = results[system, depth]
                print(
                    f"{system:>15} {depth:>4} layers: cold {figures['cold']:8.1f}"
                    f"  warm {figures['warm']:6.2f}  negative {figures['negative']:8.1f} µs/stat",
                    flush=True,
                )
        print("\nµs per stat (cold / warm / negative)")
        print(f"{'layers':>7} " + " ".join(f"{s:>28}" for s in systems))
        for depth in depths:
            cells = []
            for system in systems:
                f = results[system, depth]
                cells.append(f"{f['cold']:>9.1f} /{f['warm']:>6.2f} /{f['negative']:>8.1f}")
            print(f"{depth:>7} " + " ".join(f"{c:>28}" for c in cells))
        if "strata" in systems and len(depths) > 1:
            low, high = min(depths), max(depths)
            cold_ratio = results["strata", high]["cold"] / results["strata", low]["cold"]
            print(f"\nstrata cold {high} layers / {low} layer: {cold_ratio:.2f}x (target <= 1.2x)")
            if "overlayfs" in systems:
                for depth in depths:
                    ratio = results["strata", depth]["warm"] / results["overlayfs", depth]["warm"]
                    print(f"strata/overlayfs warm, {depth} layers: {ratio:.2f}x (target <= 1.5x)")
        if not args.skip_readiness:
            mount_readiness(scratch, store)
    finally:
        shutil.rmtree(scratch, ignore_errors=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
