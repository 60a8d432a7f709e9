"""The snapshotter's logic: containerd's snapshots requests over the catalog,
the views and the remote layers, with no gRPC in it (server.py carries it).

Mounts returned, by kind:
  active, no parent     bind of its own directory (containerd unpacks a base layer into it)
  active, parent P      overlay: lowerdir = the view of P's chain, upperdir/workdir its own
                        (--writable fuse: a bind of its own writable strata mount of the chain)
  view, parent P        read-only bind of the view of P's chain
  view, no parent       read-only bind of its own (empty) directory
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import StrataError
from ..image.registry import RegistryOptions
from ..image.store import Store
from ..lazy.layers import filled_in_place, is_incomplete
from . import api
from .catalog import Catalog, Snapshot, SnapshotError, usage
from .filters import matcher
from .remote import REMOTE_MARK, RemoteLayers, remote_source
from .views import ViewLayer, Views

# Infos per List response: containerd reads a stream of them.
_LIST_BATCH = 100


class Snapshotter:
    """containerd's snapshots requests over the catalog, the views and the remote layers."""

    def __init__(
        self,
        root: str,
        passthrough: str = "auto",
        registry_options: Callable[[str], RegistryOptions] | None = None,
        view_idle: float = 60.0,
        writable: str = "overlay",
    ) -> None:
        self.root = root
        # Containers' layers: kernel overlay mounts over the views, or ("fuse")
        # strata's own writable mounts, where overlayfs cannot be used.
        self.writable = writable
        # A view nothing uses stays mounted this long (seconds): the next
        # container on the same image starts without mounting it again.
        self.view_idle = view_idle
        self._idle: dict[str, float] = {}  # view (its top's id) -> when it became unused
        self.catalog = Catalog(root)
        self.views = Views(root, passthrough)
        self.store = Store(self.views.store)
        self.registry_options = registry_options or (lambda host: RegistryOptions())
        self.remote = RemoteLayers(self.store, self.registry_options)
        self.lock = threading.Lock()

    # Mounts ------------------------------------------------------------------

    def _view_of(self, parent: str) -> str:
        chain = self.catalog.chain(parent)
        self._idle.pop(chain[-1].id, None)
        return self.views.ensure(chain[-1].id, self._layers(chain))

    def _layers(self, chain: list[Snapshot]) -> list[ViewLayer]:
        layers = []
        for layer in chain:
            fs, known = self.catalog.fs(layer), self._known_id(layer)
            if layer.diff_id and filled_in_place(self.store, layer.diff_id):
                registry = self._registry_of(layer.diff_id)
                layers.append(ViewLayer(fs, known, layer.diff_id, registry))
            else:
                layers.append(ViewLayer(fs, known))
        return layers

    def _registry_of(self, diff_id: str) -> dict[str, Any]:
        """How a view reaches the registry a lazy layer's data comes from: the
        options (TLS, credentials) the snapshotter has for that host."""
        with open(os.path.join(self.store.lazy_state_dir(diff_id), "source.json")) as handle:
            host = json.load(handle)["registry"]
        options = self.registry_options(host)
        return {
            "tls_verify": options.tls_verify,
            "ca_cert": options.ca_cert,
            "username": options.username,
            "password": options.password,
        }

    def _known_id(self, layer: Snapshot) -> str:
        """What the views' index knows a committed layer by: it never changes,
        so no mount walks it to fingerprint it (a snapshot's id is never
        reused; a remote layer is the store's, known as the store knows it)."""
        if layer.diff_id:
            return self.store.layer_known_id(layer.diff_id).hex()
        return f"strata-snapshot/{layer.id}"

    def mounts(self, snapshot: Snapshot) -> list[Any]:
        fs = self.catalog.fs(snapshot)
        if snapshot.kind == api.ACTIVE:
            if not snapshot.parent:
                return [api.Mount(type="bind", source=fs, options=["rw", "rbind"])]
            if self.writable == "fuse":
                layers = self._layers(self.catalog.chain(snapshot.parent))
                work = self.catalog.work(snapshot)
                path = self.views.ensure_container(snapshot.id, layers, fs, work)
                return [api.Mount(type="bind", source=path, options=["rw", "rbind"])]
            options = [
                f"workdir={self.catalog.work(snapshot)}",
                f"upperdir={fs}",
                f"lowerdir={self._view_of(snapshot.parent)}",
            ]
            return [api.Mount(type="overlay", source="overlay", options=options)]
        if snapshot.kind == api.VIEW:
            source = self._view_of(snapshot.parent) if snapshot.parent else fs
            return [api.Mount(type="bind", source=source, options=["ro", "rbind"])]
        raise SnapshotError("FAILED_PRECONDITION", f"snapshot {snapshot.name} is committed")

    # Requests ----------------------------------------------------------------

    def create(self, key: str, parent: str, labels: dict[str, str], kind: int) -> list[Any]:
        source = remote_source(labels) if kind == api.ACTIVE else None
        if source is not None:
            self._serve_remotely(parent, labels, *source)
        snapshot = self.catalog.create(key, parent, kind, labels)
        try:
            return self.mounts(snapshot)
        except BaseException:
            self._drop(self.catalog.remove(key))
            raise

    def fetch_remote(self, labels: dict[str, str]) -> None:
        """Lay out the layer a Prepare's labels name, if it can be read lazily
        (without the service's lock; create() then finds it laid out)."""
        source = remote_source(labels)
        if source is None or source[0] in self.catalog.snapshots:
            return
        with contextlib.suppress(StrataError, OSError):  # create() tries again, and says why
            self.remote.lay_out(source[1], source[2])

    def _serve_remotely(
        self, parent: str, labels: dict[str, str], chain: str, reference: str, digest: str
    ) -> None:
        """Commit the layer being unpacked as snapshot *chain* read lazily, and
        answer ALREADY_EXISTS (containerd then finds it by its labels and never
        fetches the blob); return where it cannot be (containerd unpacks it)."""
        if chain in self.catalog.snapshots:
            raise SnapshotError("ALREADY_EXISTS", f"snapshot {chain}: already exists")
        try:
            diff_id = self.remote.lay_out(reference, digest)
        except (StrataError, OSError) as exc:
            print(f"strata snapshotter: {digest[:19]} of {reference} is pulled whole: {exc}",
                  file=sys.stderr, flush=True)  # fmt: skip
            return
        if diff_id is None:
            return
        marked = {**labels, REMOTE_MARK: "remote snapshot"}
        self.catalog.add_remote(chain, parent, marked, self.store.layer_path(diff_id), diff_id)
        print(f"strata snapshotter: {chain} served lazily ({digest[:19]} of {reference})",
              file=sys.stderr, flush=True)  # fmt: skip
        raise SnapshotError("ALREADY_EXISTS", f"snapshot {chain}: already exists (remote)")

    def mounts_of(self, key: str) -> list[Any]:
        return self.mounts(self.catalog.get(key))

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        active = self.catalog.get(key)
        if active.kind == api.ACTIVE and not self.views.release_container(active.id):
            raise SnapshotError("FAILED_PRECONDITION", f"snapshot {key} is still mounted")
        committed = self.catalog.commit(name, key, labels)
        # An unpack leaves each layer's parent view unused once the layer is
        # in: no container runs on a chain below the image's top, so it goes now.
        if committed.parent and not self._uses_view(committed.parent):
            self.views.release(self.catalog.get(committed.parent).id)
        # The new chain's view is the next layer's parent, or the image's a
        # container starts on: mounted meanwhile, and let go when left idle.
        if self.view_idle > 0:
            self.views.mount_soon(committed.id, self._layers(self.catalog.chain(name)))
            self._unused(committed.id)

    def remove(self, key: str) -> None:
        snapshot = self.catalog.remove(key)
        self._drop(snapshot)

    def _drop(self, snapshot: Snapshot) -> None:
        """Free what a removed snapshot held: its view if it was a chain's top,
        the view of its parent once nothing else uses it, its directory."""
        self.views.release(snapshot.id)
        self.views.release_container(snapshot.id)
        self._idle.pop(snapshot.id, None)
        if snapshot.parent and not self._uses_view(snapshot.parent):
            self._unused(self.catalog.get(snapshot.parent).id)
        shutil.rmtree(os.path.join(self.catalog.dirs, snapshot.id), ignore_errors=True)
        if snapshot.diff_id and not any(
            other.diff_id == snapshot.diff_id for other in self.catalog
        ):  # the store's copy of a remote layer, once no snapshot is on it
            with self.store.exclusive():
                self.store.remove_layer(snapshot.diff_id)

    def _uses_view(self, parent: str) -> bool:
        return any(child.kind != api.COMMITTED for child in self.catalog.children(parent))

    def _unused(self, view: str) -> None:
        """The view of chain top *view* has no user now: unmount it once it
        has stayed unused for `view_idle` seconds (now, if that is 0)."""
        if self.view_idle <= 0:
            self.views.release(view)
        else:
            self._idle.setdefault(view, time.monotonic())

    def _needed_views(self) -> set[str]:
        return {
            self.catalog.get(snapshot.parent).id
            for snapshot in self.catalog
            if snapshot.kind != api.COMMITTED and snapshot.parent
        }

    def release_unneeded(self) -> None:
        """Unmount every view no container or view uses (at shutdown: those in
        use keep serving their containers)."""
        needed = self._needed_views()
        for view in self.views.mounted():
            if view not in needed:
                self.views.release(view)
        self._idle.clear()

    def release_idle(self) -> None:
        """Unmount the views unused for longer than `view_idle`."""
        now, needed = time.monotonic(), self._needed_views()
        for view, since in list(self._idle.items()):
            if view in needed:
                del self._idle[view]
            elif now - since >= self.view_idle:
                del self._idle[view]
                self.views.release(view)

    def usage(self, key: str) -> tuple[int, int]:
        """Bytes and inodes of a snapshot's own files: an active one's now, a
        committed one's once (its files never change), a remote layer's each
        time until all its data is here."""
        snapshot = self.catalog.get(key)
        if snapshot.kind != api.COMMITTED:
            return usage(self.catalog.fs(snapshot))
        if snapshot.diff_id and is_incomplete(self.store, snapshot.diff_id):
            return usage(self.catalog.fs(snapshot))
        if snapshot.size < 0:
            snapshot.size, snapshot.inodes = usage(self.catalog.fs(snapshot))
            self.catalog.save()
        return snapshot.size, snapshot.inodes

    def cleanup(self) -> None:
        """Unmount views of chains that are gone, let those nothing uses go
        once idle, and remove directories no snapshot owns."""
        needed = self._needed_views()
        chains = {snapshot.id for snapshot in self.catalog}
        for view in self.views.mounted():
            if view not in chains:
                self.views.release(view)
            elif view not in needed:
                self._unused(view)
        self.release_idle()
        for path in self.catalog.unused_dirs():
            shutil.rmtree(path, ignore_errors=True)

    def info(self, snapshot: Snapshot) -> Any:
        info = api.Info(
            name=snapshot.name, parent=snapshot.parent, kind=snapshot.kind, labels=snapshot.labels
        )
        info.created_at.FromNanoseconds(snapshot.created_ns)
        info.updated_at.FromNanoseconds(snapshot.updated_ns)
        return info

    def list(self, filters: list[str]) -> Iterator[Any]:
        selected = matcher(filters)
        batch: list[Any] = []
        for snapshot in self.catalog:
            if selected(snapshot):
                batch.append(self.info(snapshot))
            if len(batch) == _LIST_BATCH:
                yield api.ListSnapshotsResponse(info=batch)
                batch = []
        if batch:
            yield api.ListSnapshotsResponse(info=batch)
