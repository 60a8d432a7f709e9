"""The snapshotter's mounts. A committed chain's view: one read-only strata
mount of its layer directories, shared by every snapshot on it (the single
`lowerdir` of their overlay mounts). With --writable fuse, a container's
layer: a writable strata mount of its chain, its changes in its own upper.

Each is indexed in the store under the snapshotter's root like any image, by
identities that never change, so no mount walks a layer and a chain's index
extends its parent's. Every mount's daemon is a process of its own (forked by
the mounter, mounter.py): a snapshotter that stops or restarts leaves running
containers' mounts serving, and finds them mounted again.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any

from .catalog import SnapshotError


@dataclass(frozen=True)
class ViewLayer:
    path: str
    known: str  # the identity the index knows it by (Snapshotter._known_id)
    lazy: str = ""  # the DiffID of a layer whose data comes on demand
    # For a lazy layer: how to reach its registry (tls_verify, ca_cert,
    # username, password), as the snapshotter was told for that host.
    registry: dict[str, Any] | None = None


# What a FUSE mount answers once its daemon is gone (the kernel's choice varies).
_DEAD = (errno.ENOTCONN, errno.ECONNABORTED)


def _state(path: str) -> str:
    """ "mounted", "dead" (a FUSE mount whose daemon is gone) or "absent".
    statfs asks the daemon itself: lookups and attributes may be the
    kernel's cached answers."""
    try:
        if not os.path.ismount(path):
            os.stat(path)  # ENOTCONN from a dead mount ismount() took for none
            return "absent"
        os.statvfs(path)
    except OSError as exc:
        return "dead" if exc.errno in _DEAD else "absent"
    return "mounted"


class Views:
    def __init__(self, root: str, passthrough: str = "auto") -> None:
        self.dir = os.path.join(root, "views")
        self.containers = os.path.join(root, "containers")
        self.store = os.path.join(root, "store")
        self.passthrough = passthrough
        os.makedirs(self.dir, mode=0o711, exist_ok=True)
        os.makedirs(self.containers, mode=0o711, exist_ok=True)
        self.mounter = Mounter()
        # Views being mounted in the background (mount_soon), by mountpoint.
        self._mounting: dict[str, threading.Thread] = {}
        self._mounting_lock = threading.Lock()
        os.makedirs(self.store, mode=0o700, exist_ok=True)

    def mountpoint(self, top_id: str) -> str:
        return os.path.join(self.dir, top_id)

    def container_mountpoint(self, snapshot_id: str) -> str:
        return os.path.join(self.containers, snapshot_id)

    def ensure(self, top_id: str, layers: list[ViewLayer]) -> str:
        """The view of *layers* (lowest first) whose top is snapshot *top_id*, mounted."""
        self._wait_for(self.mountpoint(top_id))
        return self._ensure(self.mountpoint(top_id), layers, None, f"view of snapshot {top_id}")

    def mount_soon(self, top_id: str, layers: list[ViewLayer]) -> None:
        """Mount the view in the background: a chain just committed is the
        next unpack's parent, or the image a container starts on next."""
        path = self.mountpoint(top_id)

        def mount() -> None:
            try:
                self._ensure(path, layers, None, f"view of snapshot {top_id}")
            except (SnapshotError, OSError) as exc:  # the next ensure() says it again
                print(f"strata snapshotter: {exc}", file=sys.stderr, flush=True)
            finally:
                with self._mounting_lock:
                    self._mounting.pop(path, None)

        with self._mounting_lock:
            if path in self._mounting:
                return
            thread = threading.Thread(target=mount, name=f"mount {top_id}", daemon=True)
            self._mounting[path] = thread
        thread.start()

    def _wait_for(self, path: str) -> None:
        with self._mounting_lock:
            thread = self._mounting.get(path)
        if thread is not None:
            thread.join()

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
        error = self.mounter.mount(spec)
        if error:
            raise SnapshotError("UNAVAILABLE", f"{label}: {error}")
        return path

    def release(self, top_id: str) -> bool:
        """Unmount the view of *top_id* if it is mounted and nothing holds it;
        False if it is still busy (a container's overlay mount uses it)."""
        self._wait_for(self.mountpoint(top_id))
        return _release(self.mountpoint(top_id), wait=False)

    def release_container(self, snapshot_id: str) -> bool:
        """Unmount a container's writable mount and wait for its daemon: it
        finishes the copy-ups in flight, so its upper is whole (a commit's layer)."""
        return _release(self.container_mountpoint(snapshot_id), wait=True)

    def mounted(self) -> list[str]:
        """The ids of the views mounted now."""
        return [name for name in os.listdir(self.dir) if _state(self.mountpoint(name)) != "absent"]


class Mounter:
    """The mounter process (mounter.py), started when first needed and again
    if it died; calls from any thread."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        # Requests answered by now, by number: the process asked, the event, the answer.
        self._waiting: dict[int, tuple[subprocess.Popen[bytes], threading.Event, list[str]]] = {}
        self._serial = 0

    def mount(self, spec: dict[str, Any]) -> str:
        """Mount as *spec* says; "" once it serves, else why not (one line)."""
        done, answer = threading.Event(), [""]
        with self._lock:
            process = self._running()
            self._serial += 1
            number = self._serial
            self._waiting[number] = (process, done, answer)
            assert process.stdin is not None
            try:
                process.stdin.write((json.dumps({"id": number, "spec": spec}) + "\n").encode())
                process.stdin.flush()
            except OSError:
                answer[0] = "the mounter is gone"
                done.set()
        done.wait()
        return answer[0]

    def _running(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "unionfs.snapshot.mounter"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            threading.Thread(
                target=self._read, args=(self._process,), name="mounter answers", daemon=True
            ).start()
        return self._process

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            reply = json.loads(line)
            with self._lock:
                waiting = self._waiting.pop(reply["id"], None)
            if waiting is not None:
                waiting[2][0] = reply["error"]
                waiting[1].set()
        with self._lock:  # it died: nobody that asked it waits forever
            for number, (asked, done, answer) in list(self._waiting.items()):
                if asked is process:
                    answer[0] = "the mounter exited"
                    done.set()
                    del self._waiting[number]

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()  # it ends at the end of its input
            self._process.wait(timeout=30)


def _release(path: str, *, wait: bool) -> bool:
    state = _state(path)
    if state == "mounted":
        if wait:
            from ..errors import StrataError
            from ..mount import unmount

            try:
                unmount(path)
            except StrataError:
                return False
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
