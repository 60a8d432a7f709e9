"""The systems a benchmark compares: strata and its peers on the same layers.

strata, strata-no-passthrough (strata with `--passthrough off`: every byte
through the daemon, so the gain of passthrough shows beside it),
strata-python (strata running its request path as Python, not the build
setup compiled with mypyc: unionfs/native.py; so the gain of that shows),
overlay (the kernel's overlayfs), fuse-overlayfs, unionfs-fuse,
native (no union: the layers copied into one plain directory, the floor), and
passthrough (a minimal pyfuse3 filesystem over one layer: the floor of a
Python FUSE daemon, benchmarks/passthrough.py).
A peer missing on the machine is skipped with a note, never an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from unionfs.mount import find_mount, pid_file  # noqa: E402

STRATA = [sys.executable, "-m", "unionfs"]
_libc = ctypes.CDLL(None, use_errno=True)
DRIVERS = (
    "strata",
    "strata-no-passthrough",
    "strata-python",
    "overlay",
    "fuse-overlayfs",
    "unionfs-fuse",
    "native",
    "passthrough",
)
STRATA_DRIVERS = ("strata", "strata-no-passthrough", "strata-python")
# What every ratio is taken against, when it ran.
PEERS = (
    "overlay",
    "fuse-overlayfs",
    "unionfs-fuse",
    "native",
    "passthrough",
    "strata-no-passthrough",
    "strata-python",
)
PASSTHROUGH = os.path.join(REPO, "benchmarks", "passthrough.py")


def missing(driver: str) -> str | None:
    """Why *driver* cannot run here, or None."""
    if driver not in DRIVERS:
        return f"unknown driver (known: {', '.join(DRIVERS)})"
    command = {"fuse-overlayfs": "fuse-overlayfs", "unionfs-fuse": "unionfs"}.get(driver)
    if command is not None and shutil.which(command) is None:
        return f"{command} is not installed (Debian package {driver})"
    if driver == "overlay" and not _kernel_has_overlay():
        return "the kernel has no overlay filesystem"
    return None


def _kernel_has_overlay() -> bool:
    with open("/proc/filesystems") as handle:
        if any(line.split()[-1] == "overlay" for line in handle if line.strip()):
            return True
    return subprocess.run(["modprobe", "overlay"], capture_output=True).returncode == 0


def drop_caches() -> bool:
    """Drop the page, dentry and inode caches; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError:
        return False
    return True


@dataclass
class Mounted:
    """A mounted driver: where, how long mounting took, the daemon if any."""

    path: str
    seconds: float
    pid: int | None

    def cpu_seconds(self) -> float:
        """The daemon's CPU time so far, all its threads (and those ended), to
        the nanosecond: its process CPU clock."""
        assert self.pid is not None
        clock = ctypes.c_int()
        if _libc.clock_getcpuclockid(self.pid, ctypes.byref(clock)) != 0:
            raise OSError(f"no CPU clock for process {self.pid}")
        return time.clock_gettime(clock.value)

    def rss_mib(self, field: str = "VmRSS") -> float | None:
        """The daemon's resident memory: all of it (VmRSS), or *field* of
        /proc/PID/status (RssAnon: its own, without the mapped files)."""
        if self.pid is None:
            return None
        with open(f"/proc/{self.pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        return None


def _unmount(mountpoint: str) -> None:
    for _ in range(100):
        if find_mount(mountpoint) is None:
            return
        if subprocess.run(["umount", mountpoint], capture_output=True).returncode == 0:
            continue
        time.sleep(0.1)
    subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def _wait_for(mountpoint: str, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600
    while find_mount(mountpoint) is None:
        if daemon.poll() is not None:
            raise RuntimeError(f"{daemon.args!r} exited with {daemon.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mountpoint} did not appear")
        time.sleep(0.002)


def _native_copy(layers: Sequence[str], target: str) -> None:
    os.makedirs(target, exist_ok=True)
    for layer in layers:
        subprocess.run(["cp", "-a", f"{layer}/.", target], check=True)


@contextlib.contextmanager
def mounted(
    driver: str, layers: Sequence[str], mountpoint: str, scratch: str, *, writable: bool = False
) -> Iterator[Mounted]:
    """Mount *layers* (lowest first) with *driver*, writable with a fresh
    upper under *scratch* if asked; unmount (or remove) after."""
    os.makedirs(mountpoint, exist_ok=True)
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    if writable:
        os.makedirs(upper)
        os.makedirs(work)
    lowers = list(reversed(list(layers)))
    daemon: subprocess.Popen[bytes] | None = None
    # Beside the round's scratch, so later rounds mount an already indexed stack.
    store = os.path.join(os.path.dirname(os.path.abspath(scratch)), "strata-store")
    started = time.perf_counter()
    if driver == "native":
        _native_copy(layers, mountpoint)
    elif driver in STRATA_DRIVERS:
        args = [arg for layer in layers for arg in ("--layer", layer)]
        if writable:
            args += ["--upper", upper, "--work", work]
        if driver == "strata-no-passthrough":
            args += ["--passthrough", "off"]
        env = {**os.environ, "STRATA_NATIVE": "0"} if driver == "strata-python" else None
        command = [*STRATA, "--root", store, "mount", *args, mountpoint]
        subprocess.run(command, check=True, env=env)
    elif driver == "overlay":
        if len(lowers) == 1 and not writable:
            # overlayfs wants two lower layers when there is no upper one.
            empty = os.path.join(scratch, "empty")
            os.makedirs(empty, exist_ok=True)
            lowers.append(empty)
        options = f"lowerdir={':'.join(lowers)}"
        if writable:
            options += f",upperdir={upper},workdir={work},redirect_dir=on,index=on,metacopy=on"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, mountpoint], check=True)
    elif driver == "fuse-overlayfs":
        fuse_options = f"lowerdir={':'.join(lowers)}"
        if writable:
            fuse_options += f",upperdir={upper},workdir={work}"
        daemon = subprocess.Popen(["fuse-overlayfs", "-f", "-o", fuse_options, mountpoint],
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        _wait_for(mountpoint, daemon)
    elif driver == "passthrough":
        if len(layers) != 1 or writable:
            raise ValueError("passthrough serves one layer, read-only")
        daemon = subprocess.Popen([sys.executable, PASSTHROUGH, layers[0], mountpoint])
        _wait_for(mountpoint, daemon)
    elif driver == "unionfs-fuse":
        branches = [f"{layer}=RO" for layer in lowers]
        if writable:
            branches.insert(0, f"{upper}=RW")
        flags = "cow,allow_other,use_ino,suid,dev" if writable else "use_ino"
        daemon = subprocess.Popen(["unionfs", "-f", "-o", flags, ":".join(branches), mountpoint],
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        _wait_for(mountpoint, daemon)
    else:
        raise ValueError(driver)
    seconds = time.perf_counter() - started
    pid = daemon.pid if daemon is not None else None
    if driver in STRATA_DRIVERS:
        with open(pid_file(os.path.abspath(mountpoint))) as handle:
            pid = int(handle.read())
    try:
        yield Mounted(mountpoint, seconds, pid)
    finally:
        if driver == "native":
            shutil.rmtree(mountpoint)
        elif driver in STRATA_DRIVERS:
            subprocess.run([*STRATA, "--root", store, "umount", mountpoint], check=False)
        _unmount(mountpoint)
        if daemon is not None:
            daemon.wait(timeout=60)
