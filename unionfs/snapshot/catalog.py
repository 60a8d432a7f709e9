"""The snapshots a snapshotter holds, with containerd's rules: keys, parents,
kinds, labels, and the errors containerd expects. Knows nothing of gRPC or mounts.

The catalog is one JSON file under the snapshotter's root, replaced whole
(written beside, fsynced, renamed) at each change: containerd holds at most a
few thousand snapshots, and a crash leaves the old catalog or the new one.
Each snapshot has a directory `snapshots/ID` with `fs` (its files: for a
committed snapshot, a layer in overlayfs's format) and, while active, `work`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from ..errors import StrataError
from . import api

# containerd's limit for one label (key and value together).
LABEL_MAX = 4096


class SnapshotError(Exception):
    """A request containerd made that the rules refuse; *code* names the gRPC status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def not_found(key: str) -> SnapshotError:
    return SnapshotError("NOT_FOUND", f"snapshot {key}: not found")


@dataclass
class Snapshot:
    id: str
    name: str
    parent: str
    kind: int
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    # Committed: the size and inode count of its files, taken when first asked
    # (Usage) and kept: a commit walks no tree. -1: not yet taken.
    size: int = -1
    inodes: int = -1
    # A remote snapshot's layer: its directory in the views' store and its DiffID
    # (the data comes on demand); else the snapshot's own `fs`.
    layer_dir: str = ""
    diff_id: str = ""


class Catalog:
    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, "snapshots.json")
        self.dirs = os.path.join(root, "snapshots")
        os.makedirs(self.dirs, mode=0o711, exist_ok=True)
        self.snapshots: dict[str, Snapshot] = {}
        self.next_id = 1
        if os.path.exists(self.path):
            try:
                with open(self.path) as handle:
                    saved = json.load(handle)
                self.next_id = int(saved["next_id"])
                for raw in saved["snapshots"]:
                    snapshot = Snapshot(**raw)
                    self.snapshots[snapshot.name] = snapshot
            except (ValueError, KeyError, TypeError) as exc:
                raise StrataError(f"{self.path} is not a snapshot catalog: {exc}") from None

    def save(self) -> None:
        saved = {
            "next_id": self.next_id,
            "snapshots": [asdict(snapshot) for snapshot in self.snapshots.values()],
        }
        temp = self.path + ".tmp"
        with open(temp, "w") as handle:
            json.dump(saved, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temp, self.path)

    # Places ------------------------------------------------------------------

    def fs(self, snapshot: Snapshot) -> str:
        return snapshot.layer_dir or os.path.join(self.dirs, snapshot.id, "fs")

    def work(self, snapshot: Snapshot) -> str:
        return os.path.join(self.dirs, snapshot.id, "work")

    def chain(self, name: str) -> list[Snapshot]:
        """The committed snapshot *name* and its ancestors, lowest first."""
        chain: list[Snapshot] = []
        while name:
            snapshot = self.get(name)
            chain.append(snapshot)
            name = snapshot.parent
        return chain[::-1]

    # Queries -----------------------------------------------------------------

    def get(self, key: str) -> Snapshot:
        snapshot = self.snapshots.get(key)
        if snapshot is None:
            raise not_found(key)
        return snapshot

    def children(self, name: str) -> list[Snapshot]:
        return [snapshot for snapshot in self.snapshots.values() if snapshot.parent == name]

    def __iter__(self) -> Iterator[Snapshot]:
        return iter(list(self.snapshots.values()))

    # Changes -----------------------------------------------------------------

    def create(self, key: str, parent: str, kind: int, labels: dict[str, str]) -> Snapshot:
        """A new active snapshot or view of *parent* (a committed one, or none)."""
        if not key:
            raise SnapshotError("INVALID_ARGUMENT", "a snapshot needs a key")
        check_labels(labels)
        if key in self.snapshots:
            raise SnapshotError("ALREADY_EXISTS", f"snapshot {key}: already exists")
        if parent:
            if parent not in self.snapshots:
                raise SnapshotError("NOT_FOUND", f"parent snapshot {parent}: not found")
            if self.snapshots[parent].kind != api.COMMITTED:
                raise SnapshotError(
                    "INVALID_ARGUMENT", f"parent {parent} is not a committed snapshot"
                )
        now = time.time_ns()
        snapshot = Snapshot(str(self.next_id), key, parent, kind, now, now, dict(labels))
        self.next_id += 1
        base = os.path.join(self.dirs, snapshot.id)
        shutil.rmtree(base, ignore_errors=True)  # a leftover of a crash before save
        os.makedirs(self.fs(snapshot), mode=0o755)
        if kind == api.ACTIVE and parent:
            os.makedirs(self.work(snapshot), mode=0o700)
        self.snapshots[key] = snapshot
        self.save()
        return snapshot

    def add_remote(
        self, name: str, parent: str, labels: dict[str, str], layer_dir: str, diff_id: str
    ) -> Snapshot:
        """A committed snapshot whose files are a lazily read layer of the store."""
        check_labels(labels)
        if name in self.snapshots:
            raise SnapshotError("ALREADY_EXISTS", f"snapshot {name}: already exists")
        if parent and self.get(parent).kind != api.COMMITTED:
            raise SnapshotError("INVALID_ARGUMENT", f"parent {parent} is not a committed snapshot")
        now = time.time_ns()
        snapshot = Snapshot(str(self.next_id), name, parent, api.COMMITTED, now, now,
                            dict(labels), layer_dir=layer_dir, diff_id=diff_id)  # fmt: skip
        self.next_id += 1
        self.snapshots[name] = snapshot
        self.save()
        return snapshot

    def commit(self, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        """The active snapshot *key* becomes the committed snapshot *name*."""
        check_labels(labels)
        active = self.get(key)
        if active.kind != api.ACTIVE:
            raise SnapshotError("FAILED_PRECONDITION", f"snapshot {key} is not active")
        if name in self.snapshots:
            raise SnapshotError("ALREADY_EXISTS", f"snapshot {name}: already exists")
        shutil.rmtree(self.work(active), ignore_errors=True)
        now = time.time_ns()
        committed = Snapshot(active.id, name, active.parent, api.COMMITTED, now, now, dict(labels))
        del self.snapshots[key]
        self.snapshots[name] = committed
        self.save()
        return committed

    def remove(self, key: str) -> Snapshot:
        """Forget *key* (its directory is the caller's to remove, once unmounted)."""
        snapshot = self.get(key)
        if self.children(key):
            raise SnapshotError("FAILED_PRECONDITION", f"snapshot {key} has children")
        del self.snapshots[key]
        self.save()
        return snapshot

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """Change labels, the one mutable part: all of them without *paths*,
        else those named `labels` (all) or `labels.KEY`."""
        snapshot = self.get(key)
        new = dict(snapshot.labels)
        if not paths:
            new = dict(labels)
        for path in paths:
            if path == "labels":
                new = dict(labels)
            elif path.startswith("labels."):
                label = path[len("labels.") :]
                if label in labels:
                    new[label] = labels[label]
                else:
                    new.pop(label, None)
            else:
                raise SnapshotError("INVALID_ARGUMENT", f"cannot update field {path!r}")
        check_labels(new)
        snapshot.labels = new
        snapshot.updated_ns = time.time_ns()
        self.save()
        return snapshot

    def unused_dirs(self) -> list[str]:
        """Directories under `snapshots/` no snapshot owns (a crash, or a remove
        whose directory could not go)."""
        owned = {snapshot.id for snapshot in self.snapshots.values()}
        return [
            os.path.join(self.dirs, name) for name in os.listdir(self.dirs) if name not in owned
        ]


def check_labels(labels: dict[str, str]) -> None:
    for key, value in labels.items():
        if len(key.encode()) + len(value.encode()) > LABEL_MAX:
            raise SnapshotError("INVALID_ARGUMENT", f"label {key[:64]!r} is over 4,096 bytes")


def usage(path: str) -> tuple[int, int]:
    """Bytes of disk and inodes under *path*, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for top, dirs, files in os.walk(path):
        for name in [top, *(os.path.join(top, entry) for entry in dirs + files)]:
            st = os.lstat(name)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
    return size, len(seen)
