"""Copy-up costs, strata beside the kernel's overlayfs and fuse-overlayfs, in one run.

For each system, on the same lower layer with a fresh upper directory:
  write4k   first 4 KiB write into a 256 MiB lower file (the data copy-up)
  chmod     chmod of a 512 MiB lower file, and the bytes that put in UPPER
  rename    rename of a lower directory with 10,000 entries
  stat p99  latency of stats of other files, from another process, while a
            1 GiB lower file is copied up

overlayfs is mounted with redirect_dir=on,index=on,metacopy=on, its best case.
Usage: tools/run bench copy_up [--scale 0.25]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from peers import SYSTEMS, available, drop_caches, mounted

MIB = 1 << 20


def _make_file(path: str, size: int) -> None:
    chunk = os.urandom(MIB)
    with open(path, "wb") as handle:
        for _ in range(size // MIB):
            handle.write(chunk)


def _build_lower(top: str, scale: float) -> dict[str, int]:
    sizes = {"f256": int(256 * scale) * MIB, "f512": int(512 * scale) * MIB,
             "f1g": int(1024 * scale) * MIB}  # fmt: skip
    os.makedirs(os.path.join(top, "big10k"))
    for name, size in sizes.items():
        _make_file(os.path.join(top, name), size)
    for index in range(10_000):
        with open(os.path.join(top, "big10k", f"e{index}"), "w") as handle:
            handle.write("x")
    os.makedirs(os.path.join(top, "probe"))
    for index in range(5_000):
        with open(os.path.join(top, "probe", f"p{index}"), "w") as handle:
            handle.write("p")
    return sizes


def _bytes_in(upper: str) -> int:
    total = 0
    for top, _, files in os.walk(upper):
        for name in files:
            total += os.lstat(os.path.join(top, name)).st_blocks * 512
    return total


_PROBE = """
import os, sys, time
root = sys.argv[1]
lat = []
for index in range(5000):
    started = time.perf_counter()
    os.stat(os.path.join(root, "probe", f"p{index}"))
    lat.append(time.perf_counter() - started)
    if os.path.exists(sys.argv[2]):
        break
lat.sort()
print(len(lat), lat[int(len(lat) * 0.99) - 1] if lat else 0, lat[len(lat) // 2] if lat else 0)
"""


def _measure(system: str, lower: str, scratch: str) -> dict[str, str]:
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    point = os.path.join(scratch, "mnt")
    store = os.path.join(scratch, "store")
    out: dict[str, str] = {}
    with mounted(system, [lower], point, store, upper, work):
        started = time.perf_counter()
        fd = os.open(os.path.join(point, "f256"), os.O_WRONLY)
        os.pwrite(fd, b"w" * 4096, 0)
        os.close(fd)
        out["write4k"] = f"{(time.perf_counter() - started) * 1000:.1f} ms"

        before = _bytes_in(upper)
        started = time.perf_counter()
        os.chmod(os.path.join(point, "f512"), 0o600)
        out["chmod"] = f"{(time.perf_counter() - started) * 1000:.1f} ms"
        out["chmod bytes"] = f"{_bytes_in(upper) - before}"

        started = time.perf_counter()
        try:
            os.rename(os.path.join(point, "big10k"), os.path.join(point, "moved10k"))
            out["rename"] = f"{(time.perf_counter() - started) * 1000:.1f} ms"
        except OSError as exc:
            out["rename"] = os.strerror(exc.errno or 0)

        drop_caches()
        done = os.path.join(scratch, "copy-done")
        probe = subprocess.Popen(
            [sys.executable, "-c", _PROBE, point, done], stdout=subprocess.PIPE, text=True
        )
        time.sleep(0.05)
        started = time.perf_counter()
        fd = os.open(os.path.join(point, "f1g"), os.O_WRONLY)
        os.pwrite(fd, b"w", 0)
        os.close(fd)
        copy_seconds = time.perf_counter() - started
        open(done, "w").close()
        stats, p99, median = probe.communicate()[0].split()
        out["1G copy-up"] = f"{copy_seconds:.2f} s"
        out["stat p99"] = (
            f"{float(p99) * 1000:.2f} ms ({stats} stats, median {float(median) * 1e6:.0f} µs)"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the file sizes")
    args = parser.parse_args()
    top = tempfile.mkdtemp(prefix="strata-bench-copy-")
    try:
        lower = os.path.join(top, "lower")
        _build_lower(lower, args.scale)
        results: dict[str, dict[str, str]] = {}
        for system in SYSTEMS:
            if not available(system):
                continue
            scratch = os.path.join(top, system)
            os.makedirs(scratch)
            results[system] = _measure(system, lower, scratch)
        keys = list(next(iter(results.values())))
        print(f"{'':12}" + "".join(f"{system:>40}" for system in results))
        for key in keys:
            print(f"{key:12}" + "".join(f"{results[s][key]:>40}" for s in results))
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
