"""`strata convert --estargz`: an image of the store rewritten with eStargz
layers. The files are the same; the blobs and DiffIDs are new (the TOC and
the landmark are entries of each layer's tar, which a mount hides), so the
config's DiffIDs and the manifest's layer descriptors are replaced and the
history is kept. Other tools read the result as an ordinary gzip image.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

from ..errors import StrataError
from ..image.layertar import decompressed
from ..image.store import (
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    OCI_LAYER_GZIP,
    Image,
    Store,
)
from .estargz import TOC_DIGEST_ANNOTATION, convert_tar


def read_prefetch_list(path: str) -> list[str]:
    """One path per line, as `strata mount --record-reads` writes them."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            return [line.strip() for line in handle if line.strip()]
    except OSError as exc:
        raise StrataError(f"cannot read the prefetch list {path}: {exc.strerror}") from None


def convert_to_estargz(
    store: Store,
    image: Image,
    names: list[str],
    prefetch: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> Image:
    """Write every layer of *image* again as eStargz and record the new image
    under *names*."""
    layers = []
    diff_ids = []
    docker = image.media_type == DOCKER_MANIFEST
    work = tempfile.mkdtemp(prefix="convert-", dir=store.tmp)
    try:
        for number, layer in enumerate(image.layers, 1):
            if progress is not None:
                progress(f"layer {number}/{len(image.layers)}: {layer.digest[:19]}")
            plain = os.path.join(work, "layer.tar")
            with open(store.blob_path(layer.digest), "rb") as blob, open(plain, "wb") as tar:
                shutil.copyfileobj(decompressed(blob), tar, 1 << 20)
            writer = store.blob_writer()
            try:
                with open(plain, "rb") as tar:
                    converted = convert_tar(
                        tar,
                        writer,
                        prefetch,
                        skip_format_entries=TOC_DIGEST_ANNOTATION in layer.annotations,
                    )
                digest = writer.commit()
            except BaseException:
                writer.abort()
                raise
            assert digest == converted.digest
            layers.append(
                {
                    "mediaType": DOCKER_LAYER if docker else OCI_LAYER_GZIP,
                    "digest": converted.digest,
                    "size": converted.size,
                    "annotations": converted.annotations(),
                }
            )
            diff_ids.append(converted.diff_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = copy.deepcopy(image.config)
    config.setdefault("rootfs", {"type": "layers"})["diff_ids"] = diff_ids
    config_data = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
    config_digest = store.put_blob(config_data)
    manifest = copy.deepcopy(image.manifest)
    manifest["config"] = {**manifest["config"], "digest": config_digest, "size": len(config_data)}
    manifest["layers"] = layers
    data = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    return store.add_image(data, names, progress)
