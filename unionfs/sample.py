"""The built-in sample image: four small layers that use every union feature.

`strata demo` builds it once under the store root, mounts it with the real
`strata mount`, prints the merged tree and unmounts.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import time

from .errors import StrataError

SAMPLE_VERSION = "1"


def _write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)


def build_sample(dest: str) -> list[str]:
    """Create the sample layers under *dest* (lowest first) unless present."""
    layers = [os.path.join(dest, name) for name in ("0-base", "1-update", "2-config", "3-overlay")]
    done = os.path.join(dest, "complete")
    if os.path.exists(done):
        return layers
    base, update, config, overlay = layers
    # base: a tiny system
    _write(f"{base}/etc/os-release", 'NAME="strata sample"\nVERSION="1"\n')
    _write(f"{base}/etc/hostname", "sample\n")
    _write(f"{base}/bin/busybox", "#!/bin/sh\necho busybox\n", 0o755)
    os.symlink("busybox", f"{base}/bin/sh")
    _write(f"{base}/usr/share/doc/readme.txt", "read me\n")
    _write(f"{base}/opt/app/config.json", '{"debug": false}\n')
    _write(f"{base}/opt/app/old.txt", "obsolete\n")
    os.makedirs(f"{base}/tmp")
    os.chmod(f"{base}/tmp", 0o1777)
    # update: OCI whiteout, a setuid binary with a hardlink, a changed file
    _write(f"{update}/etc/os-release", 'NAME="strata sample"\nVERSION="2"\n')
    _write(f"{update}/opt/app/.wh.old.txt", "")
    _write(f"{update}/usr/local/bin/tool", "#!/bin/sh\necho tool\n", 0o4755)
    os.link(f"{update}/usr/local/bin/tool", f"{update}/usr/local/bin/tool-link")
    # config: an OCI opaque directory and a fifo
    _write(f"{config}/opt/app/.wh..wh..opq", "")
    _write(f"{config}/opt/app/config.yaml", "debug: true\n")
    os.makedirs(f"{config}/run")
    os.mkfifo(f"{config}/run/control")
    # overlay: overlayfs-format whiteout (0/0 char device) where allowed
    _write(f"{overlay}/etc/motd", "Welcome to the strata sample image.\n")
    os.makedirs(f"{overlay}/usr/share/doc")
    try:
        os.mknod(f"{overlay}/usr/share/doc/readme.txt", stat.S_IFCHR | 0o600, 0)
    except PermissionError:
        _write(f"{overlay}/usr/share/doc/.wh.readme.txt", "")
    with open(done, "w") as handle:
        handle.write(SAMPLE_VERSION + "\n")
    return layers


def describe_tree(top: str) -> list[str]:
    """An `ls -l`-like listing of every path under *top*, sorted."""
    lines: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            shown = "/" + os.path.relpath(path, top)
            if stat.S_ISLNK(st.st_mode):
                shown += " -> " + os.readlink(path)
            lines.append(
                (
                    shown,
                    f"{stat.filemode(st.st_mode)} {st.st_nlink:>2} {st.st_uid:>4} {st.st_gid:>4}"
                    f" {st.st_size:>6} {shown}",
                )
            )
    return [line for _, line in sorted(lines)]


def run_demo(root: str) -> None:
    layers = build_sample(os.path.join(root, "sample", SAMPLE_VERSION))
    command = [sys.executable, "-m", "unionfs", "--root", root]
    scratch = tempfile.mkdtemp(prefix="strata-demo-")
    mountpoint = os.path.join(scratch, "rootfs")
    os.mkdir(mountpoint)
    layer_args = [arg for layer in layers for arg in ("--layer", layer)]
    print(f"$ strata mount {' '.join(layer_args)} {mountpoint}", flush=True)
    started = time.monotonic()
    if subprocess.run([*command, "mount", *layer_args, mountpoint]).returncode != 0:
        os.rmdir(mountpoint)
        os.rmdir(scratch)
        raise StrataError("the sample image did not mount")
    mount_seconds = time.monotonic() - started
    try:
        listing = describe_tree(mountpoint)
        with open(os.path.join(mountpoint, "etc/os-release")) as handle:
            release = handle.read()
    finally:
        # Unmount before anything else can fail, and never clean up a live mount.
        subprocess.run([*command, "umount", mountpoint], check=False)
    print(f"mounted {len(layers)} layers in {mount_seconds:.2f} s\n")
    print("\n".join(listing))
    print("\n/etc/os-release:\n" + release, end="")
    print(f"\n$ strata umount {mountpoint}")
    if not os.path.ismount(mountpoint):
        os.rmdir(mountpoint)
        os.rmdir(scratch)
