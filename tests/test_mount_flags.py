"""nodev, nosuid and noexec are the kernel's mount flags on strata's mount,
through `strata mount` and through strata-overlayfs (containers-storage's
mountopt): each is checked beside a mount without it, where the same act works."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys

import pytest

from tests.mounts import STRATA, force_unmount, strata_mount

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _lower(scratch: str) -> str:
    os.chmod(scratch, 0o755)  # nobody walks to the mount
    lower = os.path.join(scratch, "lower")
    os.makedirs(f"{lower}/bin")
    os.makedirs(f"{lower}/dev")
    shutil.copy2("/usr/bin/id", f"{lower}/bin/id")
    os.chown(f"{lower}/bin/id", 0, 0)
    os.chmod(f"{lower}/bin/id", 0o4755)
    shutil.copy2("/bin/true", f"{lower}/bin/true")
    os.mknod(f"{lower}/dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return lower


def _effects(mount: str) -> dict[str, object]:
    """What each flag stops: the euid a setuid-root binary gets, opening a
    device node, running a program."""
    euid = subprocess.run([*NOBODY, f"{mount}/bin/id", "-u"], capture_output=True, text=True)
    seen: dict[str, object] = {"setuid euid": euid.stdout.strip()}
    try:
        os.close(os.open(f"{mount}/dev/null", os.O_RDONLY))
        seen["open device"] = "ok"
    except OSError as exc:
        seen["open device"] = errno.errorcode[exc.errno or 0]
    try:
        seen["exec"] = subprocess.run([f"{mount}/bin/true"]).returncode
    except PermissionError:
        seen["exec"] = "EACCES"
    return seen


UNRESTRICTED = {"setuid euid": "0", "open device": "ok", "exec": 0}
# What each flag alone changes (noexec also stops the setuid binary from running).
STOPPED = {
    "nosuid": {"setuid euid": "65534"},
    "nodev": {"open device": "EACCES"},
    "noexec": {"exec": "EACCES", "setuid euid": ""},
}
STATVFS_FLAG = {"nosuid": os.ST_NOSUID, "nodev": os.ST_NODEV, "noexec": os.ST_NOEXEC}


@pytest.fixture(autouse=True)
def _needs_setpriv() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing")


def test_strata_mount_flags(scratch: str) -> None:
    lower = _lower(scratch)
    root = os.path.join(scratch, "store")
    with strata_mount(root, [lower], os.path.join(scratch, "plain")) as mount:
        assert _effects(mount) == UNRESTRICTED
        assert not os.statvfs(mount).f_flag & (os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC)
    for flag, stopped in STOPPED.items():
        where = os.path.join(scratch, flag)
        with strata_mount(root, [lower], where, f"--{flag}") as mount:
            assert os.statvfs(mount).f_flag & STATVFS_FLAG[flag], flag
            assert _effects(mount) == {**UNRESTRICTED, **stopped}, flag


def test_strata_overlayfs_mount_flags(scratch: str) -> None:
    lower = _lower(scratch)
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    mount = os.path.join(scratch, "mnt")
    os.makedirs(mount)
    command = [sys.executable, "-c", "from unionfs.overlayfs_cli import main; main()"]
    options = f"lowerdir={lower},upperdir={upper},workdir={work},nodev,nosuid"
    env = {**os.environ, "STRATA_ROOT": os.path.join(scratch, "store")}
    subprocess.run([*command, "-o", options, mount], check=True, env=env)
    try:
        assert _effects(mount) == {**UNRESTRICTED, **STOPPED["nosuid"], **STOPPED["nodev"]}
    finally:
        subprocess.run([*STRATA, "umount", mount], capture_output=True)
        force_unmount(mount)
