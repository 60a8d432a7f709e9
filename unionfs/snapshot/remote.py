"""Remote snapshots: layers containerd need not fetch. When a Prepare says
which image and layer it unpacks (stargz's or CRI's labels) and that layer is
eStargz or zstd:chunked, strata lays it out in its store from the layer's
table of contents, as `strata pull --lazy` does; file data comes on first read,
checked against the TOC's digests. containerd is then told the snapshot
already exists, and never fetches the blob.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import StrataError
from ..image.reference import parse_reference
from ..image.registry import ProgressLine, RegistryOptions, open_manifest
from ..image.store import Store, parse_config, parse_manifest
from ..lazy.layers import lay_out, lazy_format

SNAPSHOT_REF = "containerd.io/snapshot.ref"
# Set on the snapshots served remotely (stargz-snapshotter's label, which its
# tools look for).
REMOTE_MARK = "containerd.io/snapshot/remote"
_REFERENCE_LABELS = (
    "containerd.io/snapshot/remote/stargz.reference",
    "containerd.io/snapshot/cri.image-ref",
)
_DIGEST_LABELS = (
    "containerd.io/snapshot/remote/stargz.digest",
    "containerd.io/snapshot/cri.layer-digest",
)
# A manifest answers every layer of one pull: kept this long.
_MANIFEST_TTL = 300.0


def remote_source(labels: dict[str, str]) -> tuple[str, str, str] | None:
    """(chain id, image reference, layer digest) a Prepare's labels name, if all."""
    chain = labels.get(SNAPSHOT_REF)
    reference = next((labels[name] for name in _REFERENCE_LABELS if labels.get(name)), None)
    digest = next((labels[name] for name in _DIGEST_LABELS if labels.get(name)), None)
    if not (chain and reference and digest):
        return None
    return chain, reference, digest


@dataclasses.dataclass
class _Manifest:
    client: Any
    repository: str
    layers: list[Any]
    diff_ids: list[str]
    fetched: float


class RemoteLayers:
    """Lays out lazily readable layers in *store* (the views' store)."""

    def __init__(self, store: Store, options_for: Callable[[str], RegistryOptions]) -> None:
        self.store = store
        self.options_for = options_for
        self._manifests: dict[str, _Manifest] = {}
        self._lock = threading.Lock()  # the manifests (calls come from several threads)

    def _manifest(self, text: str) -> _Manifest:
        with self._lock:
            known = self._manifests.get(text)
        if known is not None and time.monotonic() - known.fetched < _MANIFEST_TTL:
            return known
        reference = parse_reference(text, remote=True)
        options = dataclasses.replace(self.options_for(reference.registry), progress=False)
        client, data, digest = open_manifest(reference, options)
        _, config, layers = parse_manifest(data, digest)
        client.fetch_blob(self.store, reference.repository, config, ProgressLine(False, ""))
        _, diff_ids = parse_config(self.store.read_blob(config.digest), config.digest, len(layers))
        found = _Manifest(client, reference.repository, layers, diff_ids, time.monotonic())
        with self._lock:
            self._manifests[text] = found
        return found

    def lay_out(self, reference: str, digest: str) -> str | None:
        """The DiffID of layer *digest* of image *reference*, laid out in the
        store to be read lazily (or already there); None if its format is not
        lazily readable. StrataError if the registry cannot tell."""
        manifest = self._manifest(reference)
        for layer, diff_id in zip(manifest.layers, manifest.diff_ids, strict=True):
            if layer.digest != digest:
                continue
            if lazy_format(layer) is None:
                return None
            with self.store.exclusive():
                if not os.path.isdir(self.store.layer_path(diff_id)):
                    lay_out(self.store, manifest.client, manifest.repository, layer, diff_id)
            return diff_id
        raise StrataError(f"{reference} has no layer {digest}")
