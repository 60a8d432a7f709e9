"""Small-file metadata work, strata beside the kernel's overlayfs and fuse-overlayfs.

For each system, on the same lower layer with a fresh upper directory:
  create   create + write 4 KiB + close of N files in one new directory (files/s),
           and the rate of the last tenth alone (flat when the cost does not
           grow with the directory)
  unlink   unlink of those N files (files/s)
  rm -rf   removal of 5,000 lower files in 50 directories (s)
  read     every byte of 5,000 lower files of 4-32 KiB, caches dropped first
           (cold), then again in the same mount (warm) (s)

Systems run in rotated order each round; medians of the rounds, and the
ratio of strata's cost to fuse-overlayfs's (> 1: strata is slower).
Usage: tools/run bench small_files [--files 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from peers import SYSTEMS, available, drop_caches, mounted

DATA = b"x" * 4096


def _build_lower(top: str) -> None:
    for directory in range(50):
        os.makedirs(os.path.join(top, "tree", f"d{directory}"))
        os.makedirs(os.path.join(top, "read", f"d{directory}"))
        for index in range(100):
            with open(os.path.join(top, "tree", f"d{directory}", f"f{index}"), "wb") as handle:
                handle.write(b"lower")
            with open(os.path.join(top, "read", f"d{directory}", f"f{index}"), "wb") as handle:
                handle.write(os.urandom(4096 * (1 + index % 8)))


def _read_all(top: str) -> float:
    started = time.perf_counter()
    for where, _, names in os.walk(top):
        for name in names:
            with open(os.path.join(where, name), "rb") as handle:
                while handle.read(1 << 20):
                    pass
    return time.perf_counter() - started


def _round(system: str, lower: str, scratch: str, files: int) -> dict[str, float]:
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    point = os.path.join(scratch, "mnt")
    out: dict[str, float] = {}
    with mounted(system, [lower], point, os.path.join(scratch, "store"), upper, work):
        directory = os.path.join(point, "new")
        os.mkdir(directory)
        tenth = max(files // 10, 1)
        started = time.perf_counter()
        last_tenth = started
        for index in range(files):
            if index == files - tenth:
                last_tenth = time.perf_counter()
            with open(os.path.join(directory, f"f{index}"), "wb") as handle:
                handle.write(DATA)
        ended = time.perf_counter()
        out["create files/s"] = files / (ended - started)
        out["create files/s, last tenth"] = tenth / (ended - last_tenth)
        started = time.perf_counter()
        for index in range(files):
            os.unlink(os.path.join(directory, f"f{index}"))
        out["unlink files/s"] = files / (time.perf_counter() - started)
        started = time.perf_counter()
        subprocess.run(["rm", "-rf", os.path.join(point, "tree")], check=True)
        out["rm -rf 5,000 lower files (s)"] = time.perf_counter() - started
        drop_caches()
        out["read 5,000 lower files, cold (s)"] = _read_all(os.path.join(point, "read"))
        out["read them again, warm (s)"] = _read_all(os.path.join(point, "read"))
    shutil.rmtree(scratch)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    top = tempfile.mkdtemp(prefix="strata-bench-small-")
    try:
        lower = os.path.join(top, "lower")
        _build_lower(lower)
        systems = [system for system in SYSTEMS if available(system)]
        samples: dict[str, list[dict[str, float]]] = {system: [] for system in systems}
        for number in range(args.rounds):
            order = systems[number % len(systems) :] + systems[: number % len(systems)]
            for system in order:
                scratch = os.path.join(top, f"{system}-{number}")
                samples[system].append(_round(system, lower, scratch, args.files))
        keys = list(samples[systems[0]][0])
        print(f"| workload ({args.files} files, medians of {args.rounds}) | "
              + " | ".join(systems) + " | strata / fuse-overlayfs |")  # fmt: skip
        print("|---" * (len(systems) + 2) + "|")
        for key in keys:
            medians = {s: statistics.median(run[key] for run in samples[s]) for s in systems}
            ratio = ""
            if "strata" in medians and "fuse-overlayfs" in medians:
                cost = medians["strata"] / medians["fuse-overlayfs"]
                ratio = f"{cost if key.endswith('(s)') else 1 / cost:.2f}x"
            cells = " | ".join(
                f"{medians[s]:,.{2 if key.endswith('(s)') else 0}f}" for s in systems
            )
            print(f"| {key} | {cells} | {ratio} |")
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
