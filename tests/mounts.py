"""Real mounts for tests: strata through its CLI, the kernel's overlayfs as oracle.

Every helper unmounts exactly the mountpoint it created, also when the test
fails; a FUSE connection that will not go away is aborted through its own
entry in /sys/fs/fuse/connections, never anyone else's.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence

from unionfs.mount import find_mount

STRATA = [sys.executable, "-m", "unionfs"]


def strata(root: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*STRATA, "--root", root, *args], capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"strata {' '.join(args)} failed: {result.stderr}")
    return result


def force_unmount(mountpoint: str) -> None:
    """Last resort for a mount this test created and could not unmount."""
    info = find_mount(mountpoint)
    if info is None:
        return
    if info.fstype.startswith("fuse"):
        minor = info.device.split(":")[1]
        abort = f"/sys/fs/fuse/connections/{minor}/abort"
        if os.path.exists(abort):
            with open(abort, "w") as handle:
                handle.write("1")
    subprocess.run(["umount", mountpoint], capture_output=True)
    if find_mount(mountpoint) is not None:
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def unmount(root: str, mountpoint: str) -> None:
    """`strata umount`; the last resort if the mount is still there after it."""
    result = strata(root, "umount", mountpoint, check=False)
    if result.returncode != 0 or find_mount(mountpoint) is not None:
        force_unmount(mountpoint)


@contextlib.contextmanager
def strata_mount(root: str, layers: Sequence[str], mountpoint: str, *options: str) -> Iterator[str]:
    """Mount *layers* (lowest first) with `strata mount`; unmount after."""
    os.makedirs(mountpoint, exist_ok=True)
    layer_args = [arg for layer in layers for arg in ("--layer", layer)]
    strata(root, "mount", *layer_args, *options, mountpoint)
    try:
        yield mountpoint
    finally:
        unmount(root, mountpoint)


_PATCHED_DAEMON = """
import sys
from unionfs.mount import MountRequest, WritableLayer, mount

root, lower, upper, work, mountpoint, patch, passthrough = sys.argv[1:8]
exec(patch)
mount(MountRequest(root, [lower], mountpoint, foreground=True,
                   writable=WritableLayer(upper, work) if upper else None,
                   passthrough=passthrough))
"""


@contextlib.contextmanager
def patched_mount(
    scratch: str,
    lower: str,
    patch: str,
    log_path: str,
    *,
    passthrough: str = "off",
    writable: bool = True,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A strata mount of *lower* (writable unless told) served by a child Python that runs
    *patch* (source that wraps or breaks part of strata) before the real mount
    code; its output goes to *log_path*. Yields the mountpoint and the daemon,
    which has exited when the block ends. The patches watch the daemon's own
    reads and writes: passthrough (which leaves them to the kernel) is off
    unless asked for. The daemon runs strata's Python modules, not their
    compiled build (unionfs.native): a compiled module's calls to its own
    functions cannot be patched."""
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    if writable:
        os.makedirs(upper, exist_ok=True)
    else:
        upper = work = ""
    root, mountpoint = os.path.join(scratch, "store"), os.path.join(scratch, "mnt")
    os.makedirs(mountpoint, exist_ok=True)
    with open(log_path, "wb") as log:
        arguments = [root, lower, upper, work, mountpoint, patch, passthrough]
        daemon = subprocess.Popen(
            [sys.executable, "-c", _PATCHED_DAEMON, *arguments],
            stdout=log,
            stderr=log,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            env={**os.environ, "STRATA_NATIVE": "0"},
        )
    try:
        deadline = time.monotonic() + 60
        while find_mount(mountpoint) is None:
            assert daemon.poll() is None, "the daemon exited before mounting"
            assert time.monotonic() < deadline, "the mount did not appear"
            time.sleep(0.05)
        yield mountpoint, daemon
    finally:
        # umount(8), not `strata umount`: that waits for the daemon's pid to
        # go, and a child of this test stays a zombie until it is waited for.
        subprocess.run(["umount", mountpoint], capture_output=True)
        if find_mount(mountpoint) is not None:
            force_unmount(mountpoint)
        daemon.wait(timeout=60)


# What makes the kernel's directory renames and hardlinks behave as strata's do.
WRITABLE_OVERLAY = "redirect_dir=on,index=on"


@contextlib.contextmanager
def overlay_mount(
    layers: Sequence[str],
    mountpoint: str,
    *,
    options: str = "",
    upper: str | None = None,
    work: str | None = None,
) -> Iterator[str]:
    """The kernel's overlayfs over the same *layers* (lowest first); writable with *upper*."""
    os.makedirs(mountpoint, exist_ok=True)
    lowerdir = ":".join(reversed(list(layers)))
    opts = f"lowerdir={lowerdir}"
    if upper is not None:
        assert work is not None
        os.makedirs(work, exist_ok=True)
        opts += f",upperdir={upper},workdir={work}"
    opts += f",{options}" if options else ""
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mountpoint], check=True)
    try:
        yield mountpoint
    finally:
        for _ in range(50):
            if find_mount(mountpoint) is None:
                break
            if subprocess.run(["umount", mountpoint], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            force_unmount(mountpoint)


@contextlib.contextmanager
def writable_mount(system: str, scratch: str, layers: Sequence[str]) -> Iterator[str]:
    """A writable mount of *layers* by "strata" or "overlayfs", with an UPPER of
    its own under *scratch* (the same one each time, so a second call remounts)."""
    upper, work = os.path.join(scratch, f"{system}-upper"), os.path.join(scratch, f"{system}-w")
    os.makedirs(upper, exist_ok=True)
    mountpoint = os.path.join(scratch, f"{system}-mnt")
    if system == "overlayfs":
        with overlay_mount(layers, mountpoint, options=WRITABLE_OVERLAY, upper=upper, work=work):
            yield mountpoint
    else:
        store = os.path.join(scratch, "store")
        with strata_mount(store, layers, mountpoint, "--upper", upper, "--work", work):
            yield mountpoint


def on_both(
    scratch: str,
    layers: Sequence[str],
    change: Callable[[str], object],
    look: Callable[[str], object],
) -> dict[str, tuple[object, object, object]]:
    """Run *change* on a writable overlayfs and on strata over *layers*, then
    *look*; *look* again after a remount. By system: (change's result, look, look again)."""
    seen: dict[str, tuple[object, object, object]] = {}
    for system in ("overlayfs", "strata"):
        with writable_mount(system, scratch, layers) as mountpoint:
            changed, looked = change(mountpoint), look(mountpoint)
        with writable_mount(system, scratch, layers) as mountpoint:
            seen[system] = (changed, looked, look(mountpoint))
    return seen


def daemon_logs(root: str) -> str:
    """What the mount daemons of store *root* logged."""
    text = []
    for path in sorted(glob.glob(f"{root}/logs/*.log")):
        with open(path) as handle:
            text.append(handle.read())
    return "".join(text)


@contextlib.contextmanager
def tmpfs(mountpoint: str, options: str) -> Iterator[str]:
    """A tmpfs of the test's own at *mountpoint* (a small UPPER: `size=`,
    `nr_inodes=`); unmounted after, also when the test fails."""
    os.makedirs(mountpoint, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", mountpoint], check=True)
    try:
        yield mountpoint
    finally:
        if find_mount(mountpoint) is not None:
            force_unmount(mountpoint)


# Logs the name of every function the daemon runs in a worker thread.
LOG_WORKER_CALLS = """
import trio
import unionfs.fuse
_in_worker = unionfs.fuse.in_worker
_run_sync = trio.to_thread.run_sync
async def _logged(function, *args, **kwargs):
    print("worker:", getattr(function, "__name__", repr(function)), flush=True)
    return await _in_worker(function, *args, **kwargs)
async def _logged_abandonable(function, *args, **kwargs):
    print("worker:", getattr(function, "__name__", repr(function)), flush=True)
    return await _run_sync(function, *args, **kwargs)
unionfs.fuse.in_worker = _logged
trio.to_thread.run_sync = _logged_abandonable
import unionfs.kernel_sync
_sync = unionfs.kernel_sync.KernelSync.sync
async def _logged_sync(self, fd, datasync):
    print("worker: kernel sync", flush=True)
    return await _sync(self, fd, datasync)
unionfs.kernel_sync.KernelSync.sync = _logged_sync
"""

# fsync through worker threads, as where the kernel takes no AIO fsync.
NO_KERNEL_SYNC = """
import unionfs.kernel_sync
unionfs.kernel_sync.open_kernel_sync = lambda quiet_wait=None: None
"""


class WorkerCalls:
    def __init__(self, log_path: str) -> None:
        self.log_path, self.seen = log_path, 0

    def since_last(self) -> list[str]:
        """The worker-thread calls logged since the last look."""
        with open(self.log_path, "rb") as log:
            log.seek(self.seen)
            text = log.read()
        self.seen += len(text)
        lines = text.decode(errors="replace").splitlines()
        return [line.split(":", 1)[1].strip() for line in lines if line.startswith("worker:")]


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD, _AT_STATX_FORCE_SYNC, _STATX_BASIC_STATS = -100, 0x2000, 0x7FF


def forced_getattr(path: str) -> None:
    """statx with AT_STATX_FORCE_SYNC: the kernel asks the daemon (a GETATTR)."""
    buffer = ctypes.create_string_buffer(256)
    flags = _AT_STATX_FORCE_SYNC
    if _libc.statx(_AT_FDCWD, os.fsencode(path), flags, _STATX_BASIC_STATS, buffer) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), path)


def drop_caches(mount: str | None = None) -> None:
    """Drop the host's page, dentry and inode caches (dirty pages written
    first, or they stay). With *mount*, one round trip to its daemon after:
    the kernel sends its FORGETs ahead of it, so none is left queued."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as caches:
        caches.write("3\n")
    if mount is not None:
        forced_getattr(mount)


def overlay_oracle(scratch: str, lower: str) -> contextlib.AbstractContextManager[str]:
    """The kernel's overlayfs over *lower*, writable with a fresh upper in
    *scratch* (k-upper, k-work): the oracle the differential tests compare with."""
    os.makedirs(os.path.join(scratch, "k-upper"), exist_ok=True)
    return overlay_mount(
        [lower],
        os.path.join(scratch, "overlay"),
        options=WRITABLE_OVERLAY,
        upper=os.path.join(scratch, "k-upper"),
        work=os.path.join(scratch, "k-work"),
    )
