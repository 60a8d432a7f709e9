"""Run inside a user namespace as its root (one uid mapped): import an image,
mount it with a container layer, change it, remount, and print what was seen
as JSON. tests/test_rootless.py starts it and judges the output."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

STRATA = [sys.executable, "-m", "unionfs"]


def strata(*args: str) -> None:
    result = subprocess.run([*STRATA, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"strata {' '.join(args)}: {result.stderr.strip()}")


def look(mnt: str) -> dict[str, object]:
    seen: dict[str, object] = {}
    for top, dirs, files in os.walk(mnt):
        for name in sorted(dirs + files):
            path = os.path.join(top, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, mnt)
            seen[rel] = [stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_rdev,
                         st.st_size if stat.S_ISREG(st.st_mode) else 0]  # fmt: skip
    return seen


def main() -> None:
    layout, work = sys.argv[1], sys.argv[2]
    os.environ["STRATA_ROOT"] = f"{work}/store"
    os.environ["XDG_RUNTIME_DIR"] = f"{work}/run"
    mnt = f"{work}/mnt"
    os.makedirs(mnt, exist_ok=True)
    report: dict[str, object] = {"euid": os.geteuid()}
    strata("import", layout, "busybox")
    strata("mount", "busybox", mnt, "--name", "box")
    try:
        with open("/proc/self/mounts") as mounts:
            report["fstype"] = [line.split()[2] for line in mounts if line.split()[1] == mnt]
        with open(f"{mnt}/etc/passwd", "a") as handle:
            handle.write("added:x:1001:1001::/:/bin/sh\n")
        with open(f"{mnt}/home/new-file", "w") as handle:
            handle.write("new\n")
        # (Files of ids the namespace does not map cannot be deleted: the
        # kernel refuses with EOVERFLOW, as on any filesystem in a user namespace.)
        os.unlink(f"{mnt}/etc/xattr-file")
        os.rename(f"{mnt}/opt/old", f"{mnt}/opt/moved")
        os.chmod(f"{mnt}/bin/su", 0o4750)
        # (No mknod of devices here: the kernel allows it only to real root.)
        os.mkfifo(f"{mnt}/dev/fifo", 0o640)
        before = look(mnt)
    finally:
        strata("umount", mnt)
    strata("mount", "busybox", mnt, "--name", "box")
    try:
        after = look(mnt)
        with open(f"{mnt}/home/new-file") as handle:
            report["new-file"] = handle.read()
    finally:
        strata("umount", mnt)
    report["before"], report["after"] = before, after
    upper = f"{work}/store/containers/box/upper"
    whiteouts = []
    for top, _, files in os.walk(upper):
        for name in files:
            st = os.lstat(os.path.join(top, name))
            rel = os.path.relpath(os.path.join(top, name.removeprefix(".wh.")), upper)
            if name.startswith(".wh.") or (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                whiteouts.append(rel)
    report["upper-whiteouts"] = sorted(whiteouts)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
