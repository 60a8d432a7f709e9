"""Mounting the same layers with strata and with its peers, for benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from unionfs.mount import find_mount  # noqa: E402

STRATA = [sys.executable, "-m", "unionfs"]
SYSTEMS = ("strata", "overlayfs", "fuse-overlayfs")


def available(system: str) -> bool:
    if system == "fuse-overlayfs":
        return shutil.which("fuse-overlayfs") is not None
    return True


def drop_caches() -> bool:
    """Drop the page, dentry and inode caches; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError:
        return False
    return True


def _unmount(mountpoint: str) -> None:
    for _ in range(100):
        if find_mount(mountpoint) is None:
            return
        if subprocess.run(["umount", mountpoint], capture_output=True).returncode == 0:
            continue
        time.sleep(0.1)
    subprocess.run(["umount", "-l", mountpoint], capture_output=True)


@contextlib.contextmanager
def mounted(
    system: str,
    layers: Sequence[str],
    mountpoint: str,
    store: str,
    upper: str | None = None,
    work: str | None = None,
) -> Iterator[float]:
    """Mount *layers* (lowest first) with *system*, writable with *upper*;
    yield the seconds mounting took."""
    os.makedirs(mountpoint, exist_ok=True)
    lowers = list(reversed(list(layers)))
    if len(lowers) == 1 and system == "overlayfs" and upper is None:
        # overlayfs wants two lower layers when there is no upper one: add an empty one.
        empty = mountpoint + ".empty"
        os.makedirs(empty, exist_ok=True)
        lowers.append(empty)
    options = f"lowerdir={':'.join(lowers)}"
    if upper is not None:
        assert work is not None
        os.makedirs(work, exist_ok=True)
        options += f",upperdir={upper},workdir={work}"
    started = time.perf_counter()
    if system == "strata":
        args = [arg for layer in layers for arg in ("--layer", layer)]
        if upper is not None:
            args += ["--upper", upper, "--work", str(work)]
        subprocess.run([*STRATA, "--root", store, "mount", *args, mountpoint], check=True)
    elif system == "overlayfs":
        if upper is not None:
            options += ",redirect_dir=on,index=on,metacopy=on"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, mountpoint], check=True)
    elif system == "fuse-overlayfs":
        subprocess.run(["fuse-overlayfs", "-o", options, mountpoint], check=True)
    else:
        raise ValueError(system)
    elapsed = time.perf_counter() - started
    try:
        yield elapsed
    finally:
        if system == "strata":
            subprocess.run([*STRATA, "--root", store, "umount", mountpoint], check=False)
        _unmount(mountpoint)
