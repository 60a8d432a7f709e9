"""Rootless: a dedicated user (uid 1000) in its own user namespace (`unshare
-r`, one uid mapped) imports, mounts, changes and remounts an image. The
store keeps what the user cannot set (other owners, devices) in user xattrs,
so root-owned files show as root and devices as devices inside.

/dev/fuse is 0600 on this machine (Debian's default is 0666): the test gives
the user a private mount namespace where /dev/fuse is a 0666 node made in its
scratch directory; the host's /dev is not touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.images import build_busybox

USER = 1000
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rootless_probe.py")


def test_rootless_store_mount_and_remount(scratch: str) -> None:
    os.chmod(scratch, 0o711)
    layout, tag = build_busybox(f"{scratch}/image")
    subprocess.run(["chmod", "-R", "a+rX", f"{scratch}/image"], check=True)
    work = f"{scratch}/user"
    os.makedirs(work)
    shutil.chown(work, USER, USER)
    fuse = f"{scratch}/fuse"
    os.mknod(fuse, 0o666 | 0o020000, os.makedev(10, 229))
    os.chmod(fuse, 0o666)
    env = {"PATH": os.environ["PATH"], "HOME": work, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    inner = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
             "unshare", "--user", "--map-root-user", "--mount",
             sys.executable, PROBE, f"oci:{layout}:{tag}", work]  # fmt: skip
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$0" /dev/fuse && exec "$@"', fuse, *inner],
        capture_output=True, text=True, env=env, timeout=600, cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["euid"] == 0 and report["fstype"] == ["fuse.strata"]
    before, after = report["before"], report["after"]
    assert before == after  # the same tree after a remount
    # What the image has as root's shows as root inside, with setuid and devices.
    assert after["bin/busybox"][1:3] == [0, 0]
    assert after["bin/su"][0] == "-rwsr-x---"
    assert after["dev/null"][:4] == ["crw-rw-rw-", 0, 0, os.makedev(1, 3)]
    assert after["dev/fifo"][0] == "prw-r-----"
    assert after["etc/passwd"][4] > 0 and "etc/xattr-file" not in after
    # An owner the namespace does not map (gid 42) shows as the overflow id.
    assert after["etc/shadow"][1:3] == [0, 65534]
    assert "opt/moved/fresh" in after and "opt/old" not in after
    assert report["new-file"] == "new\n"
    # The deletion is a whiteout in UPPER (a 0/0 device: the kernel lets a user
    # namespace make those, or a .wh. file where it does not).
    assert "etc/xattr-file" in report["upper-whiteouts"]
    # On the host the store belongs to the user; the owners are in xattrs.
    layer_files = [
        os.path.join(top, name)
        for top, _, names in os.walk(f"{work}/store/layers")
        for name in names
    ]
    assert layer_files and all(os.lstat(path).st_uid == USER for path in layer_files)
