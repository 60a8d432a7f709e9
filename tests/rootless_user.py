"""An unprivileged user made for one test, as rootless container tools expect
one: a name in /etc/passwd, subordinate uid and gid ranges for newuidmap and
newgidmap, a home and an XDG_RUNTIME_DIR of its own. The user and every
process left running as it (podman's pause process) are gone afterwards.

/dev/fuse is 0600 on this machine (Debian's default is 0666): commands run in
a private mount namespace where /dev/fuse is a 0666 node of the test's own;
the host's /dev is not touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

SUBORDINATE_COUNT = 65536


@dataclass(frozen=True)
class RootlessUser:
    name: str
    uid: int
    gid: int
    home: str
    runtime_dir: str
    fuse_node: str

    def command(self, *argv: str) -> list[str]:
        """*argv* as the user, with a clean environment."""
        inner = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                 "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", f"HOME={self.home}",
                 f"USER={self.name}", f"LOGNAME={self.name}",
                 f"XDG_RUNTIME_DIR={self.runtime_dir}", *argv]  # fmt: skip
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /dev/fuse && exec "$@"', self.fuse_node, *inner]  # fmt: skip

    def run(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*argv), capture_output=True, text=True, timeout=timeout, cwd=self.home
        )

    def write(self, rel: str, text: str) -> str:
        """A file in the user's home, owned by the user."""
        path = os.path.join(self.home, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)
        subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", self.home], check=True)
        return path


def _free_subordinate_start() -> int:
    """The first id after every range in /etc/subuid and /etc/subgid (at least
    200000, clear of the ranges useradd hands out by default)."""
    end = 200_000
    for table in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(FileNotFoundError), open(table) as handle:
            for line in handle:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                    end = max(end, int(fields[1]) + int(fields[2]))
    return end


def _processes_of(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                for line in status:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            found.append(int(entry))
                        break
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def _stop_processes_of(uid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _processes_of(uid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while _processes_of(uid) and time.monotonic() < deadline:
            time.sleep(0.05)


@contextlib.contextmanager
def rootless_user(top: str) -> Iterator[RootlessUser]:
    """A new user whose home, runtime directory and fuse node live in *top*."""
    for tool in ("useradd", "userdel", "usermod", "newuidmap", "newgidmap", "setpriv", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (packages passwd, uidmap, util-linux)")
    if os.geteuid() != 0:
        pytest.skip("making a test user needs root")
    os.chmod(top, 0o711)  # the user passes through to its own directories
    name = f"strata-{secrets.token_hex(4)}"
    home, runtime_dir = f"{top}/home", f"{top}/run"
    subprocess.run(
        ["useradd", "--no-create-home", "--home-dir", home, "--shell", "/bin/sh",
         "--key", "SUB_UID_COUNT=0", "--key", "SUB_GID_COUNT=0", name],
        check=True, capture_output=True,
    )  # fmt: skip
    uid = int(subprocess.run(["id", "-u", name], capture_output=True, text=True).stdout)
    try:
        start = _free_subordinate_start()
        span = f"{start}-{start + SUBORDINATE_COUNT - 1}"
        subprocess.run(["usermod", "--add-subuids", span, "--add-subgids", span, name],
                       check=True, capture_output=True)  # fmt: skip
        gid = int(subprocess.run(["id", "-g", name], capture_output=True, text=True).stdout)
        for directory, mode in ((home, 0o755), (runtime_dir, 0o700)):
            os.makedirs(directory)
            os.chown(directory, uid, gid)
            os.chmod(directory, mode)
        fuse_node = f"{top}/fuse"
        os.mknod(fuse_node, 0o666 | 0o020000, os.makedev(10, 229))
        os.chmod(fuse_node, 0o666)
        yield RootlessUser(name, uid, gid, home, runtime_dir, fuse_node)
    finally:
        _stop_processes_of(uid)
        # containers/storage keeps a runtime directory of the uid in /tmp.
        for leftover in (f"/tmp/containers-user-{uid}", f"/tmp/podman-run-{uid}"):
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(leftover).st_uid == uid:
                    shutil.rmtree(leftover)
        subprocess.run(["userdel", name], capture_output=True)
        # userdel drops the subordinate ranges where shadow was built to; make sure.
        for table in ("/etc/subuid", "/etc/subgid"):
            subprocess.run(["sed", "-i", f"/^{name}:/d", table], capture_output=True)
