"""Merged read-only views of committed chains: one strata mount per chain,
shared by every snapshot on it (the single `lowerdir` of their overlay mounts).

Each view is a read-only strata mount of the chain's layer directories
(mount_view.py), indexed in the store under the snapshotter's root like any
image: by identities that never change, so no mount walks a layer, and a
chain's index extends its parent's. Its daemon
is a process of its own: a snapshotter that stops or restarts leaves running
containers' views serving, and finds them mounted again.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

from .catalog import SnapshotError


@dataclass(frozen=True)
class ViewLayer:
    path: str
    known: str  # the identity the index knows it by (catalog.known_id)
    lazy: str = ""  # the DiffID of a layer whose data comes on demand


def _state(path: str) -> str:
    """ "mounted", "dead" (a FUSE mount whose daemon is gone) or "absent"."""
    try:
        if os.path.ismount(path):
            return "mounted"
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return "dead"
        return "absent"
    return "mounted" if os.path.ismount(path) else "absent"


class Views:
    def __init__(self, root: str, passthrough: str = "auto") -> None:
        self.dir = os.path.join(root, "views")
        self.containers = os.path.join(root, "containers")
        self.store = os.path.join(root, "store")
        self.passthrough = passthrough
        os.makedirs(self.dir, mode=0o711, exist_ok=True)
        os.makedirs(self.containers, mode=0o711, exist_ok=True)
        os.makedirs(self.store, mode=0o700, exist_ok=True)

    def mountpoint(self, top_id: str) -> str:
        return os.path.join(self.dir, top_id)

    def container_mountpoint(self, snapshot_id: str) -> str:
        return os.path.join(self.containers, snapshot_id)

    def ensure(self, top_id: str, layers: list[ViewLayer]) -> str:
        """The view of *layers* (lowest first) whose top is snapshot *top_id*, mounted."""
        return self._ensure(self.mountpoint(top_id), layers, None, f"view of snapshot {top_id}")

    def ensure_container(
        self, snapshot_id: str, layers: list[ViewLayer], upper: str, work: str
    ) -> str:
        """A container's writable strata mount of *layers*, its changes in *upper*
        (overlayfs's format, so it commits as a layer: no metadata-only copies)."""
        path = self.container_mountpoint(snapshot_id)
        return self._ensure(path, layers, (upper, work), f"snapshot {snapshot_id}")

    def _ensure(
        self, path: str, layers: list[ViewLayer], writable: tuple[str, str] | None, label: str
    ) -> str:
        state = _state(path)
        if state == "mounted":
            return path
        if state == "dead":
            # Its daemon died: mounts over it hold it busy, so detach it.
            subprocess.run(["umount", "-l", path], capture_output=True)
        os.makedirs(path, exist_ok=True)
        spec = {
            "store": self.store,
            "mountpoint": path,
            "passthrough": self.passthrough,
            "layers": [asdict(layer) for layer in layers],
            "writable": writable,
        }
        done = subprocess.run(
            [sys.executable, "-m", "unionfs.snapshot.mount_view"],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["strata mount failed"])[-1]
            raise SnapshotError("UNAVAILABLE", f"{label}: {why}")
        return path

    def release(self, top_id: str) -> bool:
        """Unmount the view of *top_id* if it is mounted and nothing holds it;
        False if it is still busy (a container's overlay mount uses it)."""
        return _release(self.mountpoint(top_id), wait=False)

    def release_container(self, snapshot_id: str) -> bool:
        """Unmount a container's writable mount and wait for its daemon: it
        finishes the copy-ups in flight, so its upper is whole (a commit's layer)."""
        return _release(self.container_mountpoint(snapshot_id), wait=True)

    def mounted(self) -> list[str]:
        """The ids of the views mounted now."""
        return [name for name in os.listdir(self.dir) if _state(self.mountpoint(name)) != "absent"]


def _release(path: str, *, wait: bool) -> bool:
    state = _state(path)
    if state == "mounted":
        if wait:
            command = [sys.executable, "-m", "unionfs", "umount", path]
        else:
            # umount(8) alone: its daemon exits by itself, and containerd's
            # garbage collection, which waits for this, holds its database.
            command = ["umount", path] if os.geteuid() == 0 else ["fusermount3", "-u", path]
        if subprocess.run(command, capture_output=True).returncode != 0:
            return False
    elif state == "dead":
        subprocess.run(["umount", "-l", path], capture_output=True)
    if os.path.isdir(path) and not os.path.ismount(path):
        os.rmdir(path)
    return True
