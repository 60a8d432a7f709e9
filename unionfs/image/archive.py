"""Images on disk: OCI image layouts (`oci:DIR[:TAG]`) and `docker save`
archives (`docker-archive:FILE.tar`), imported into the store and exported."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from ..errors import StrataError
from .layertar import compression_of, decompressed
from .reference import parse_reference
from .store import (
    INDEX_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Image,
    Store,
    choose_platform,
    parse_json,
    sha256_digest,
)

REF_ANNOTATION = "org.opencontainers.image.ref.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Location:
    transport: str  # "oci" or "docker-archive"
    path: str
    tag: str  # oci: the ref name in index.json; docker-archive: a RepoTag or ""


def parse_location(text: str) -> Location:
    transport, sep, rest = text.partition(":")
    if not sep or transport not in ("oci", "docker-archive") or not rest:
        raise StrataError(f"{text!r}: write oci:DIR[:TAG] or docker-archive:FILE.tar[:NAME:TAG]")
    if transport == "oci":
        path, _, tag = rest.partition(":")
        return Location(transport, path, tag)
    path, _, tag = rest.partition(":")
    return Location(transport, path, tag)


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


# OCI layout -----------------------------------------------------------------------


def _layout_blob(root: str, digest: str) -> str:
    return os.path.join(root, "blobs", "sha256", digest.removeprefix("sha256:"))


def _copy_layout_blob(store: Store, root: str, descriptor: Descriptor) -> None:
    try:
        with open(_layout_blob(root, descriptor.digest), "rb") as source:
            store.copy_blob_in(source, descriptor.digest, descriptor.size)
    except FileNotFoundError:
        raise StrataError(f"oci:{root}: blob {descriptor.digest} is missing") from None


def import_oci(
    store: Store, location: Location, names: list[str], platform: str, progress: Progress
) -> Image:
    root = location.path
    if not os.path.isfile(os.path.join(root, "oci-layout")):
        raise StrataError(f"oci:{root} is not an OCI image layout (no oci-layout file)")
    try:
        with open(os.path.join(root, "index.json"), "rb") as handle:
            index = parse_json(handle.read(), f"oci:{root}/index.json")
    except OSError as exc:
        raise StrataError(f"oci:{root}: cannot read index.json: {exc.strerror}") from None
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise StrataError(f"oci:{root} holds no images")
    if location.tag:
        chosen = [
            raw
            for raw in manifests
            if (raw.get("annotations") or {}).get(REF_ANNOTATION) == location.tag
        ]
        if not chosen:
            raise StrataError(f"oci:{root} has no image tagged {location.tag!r}")
    elif len(manifests) == 1:
        chosen = manifests
    else:
        tags = [(raw.get("annotations") or {}).get(REF_ANNOTATION, "?") for raw in manifests]
        raise StrataError(f"oci:{root} holds {len(manifests)} images; name one: {', '.join(tags)}")
    descriptor = Descriptor.parse(chosen[0], f"oci:{root}/index.json")
    if descriptor.media_type in INDEX_TYPES:
        _copy_layout_blob(store, root, descriptor)
        nested = parse_json(store.read_blob(descriptor.digest), f"index {descriptor.digest}")
        descriptor = choose_platform(nested, platform, f"oci:{root}")
    _copy_layout_blob(store, root, descriptor)
    manifest = store.read_blob(descriptor.digest)
    from .store import parse_manifest

    _, config, layers = parse_manifest(manifest, descriptor.digest)
    for blob in (config, *layers):
        _copy_layout_blob(store, root, blob)
        progress(f"copied {blob.digest[7:19]}")
    if not names:
        tag = location.tag or "latest"
        base = os.path.basename(os.path.abspath(root)).lower()
        names = [parse_reference(f"{base}:{tag}").name]
    return store.add_image(manifest, names, progress)


def export_oci(store: Store, image: Image, location: Location, name: str) -> None:
    root = location.path
    tag = location.tag or name.rsplit(":", 1)[-1]
    os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
    layout = os.path.join(root, "oci-layout")
    if not os.path.exists(layout):
        with open(layout, "wb") as handle:
            handle.write(OCI_LAYOUT)
    manifest = Descriptor(image.media_type, image.digest, len(store.read_blob(image.digest)))
    for descriptor in (
        manifest,
        image.config_descriptor,
        *image.layers,
    ):
        target = _layout_blob(root, descriptor.digest)
        if not os.path.exists(target):
            temp = f"{target}.{secrets.token_hex(4)}.tmp"
            shutil.copyfile(store.blob_path(descriptor.digest), temp)
            os.replace(temp, target)
    index_path = os.path.join(root, "index.json")
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if os.path.exists(index_path):
        with open(index_path, "rb") as handle:
            index = parse_json(handle.read(), f"oci:{root}/index.json")
    kept = [
        raw
        for raw in index.get("manifests", [])
        if (raw.get("annotations") or {}).get(REF_ANNOTATION) != tag
    ]
    kept.append({**manifest.to_json(), "annotations": {REF_ANNOTATION: tag}})
    index["manifests"] = kept
    temp = f"{index_path}.tmp"
    with open(temp, "wb") as handle:
        handle.write(canonical_json(index))
    os.replace(temp, index_path)


# docker-archive -------------------------------------------------------------------


def _archive_member(archive: tarfile.TarFile, name: str, what: str) -> tarfile.TarInfo:
    """A file of the archive, following the relative symlinks `docker save` uses
    for repeated layers; never a path outside the archive."""
    seen = 0
    while True:
        clean = posixpath.normpath(name)
        if clean.startswith(("/", "..")):
            raise StrataError(f"{what}: {name!r} points outside the archive")
        try:
            member = archive.getmember(clean)
        except KeyError:
            raise StrataError(f"{what}: {name!r} is not in the archive") from None
        if member.issym() and seen < 8:
            seen += 1
            name = posixpath.join(posixpath.dirname(clean), member.linkname)
            continue
        if not member.isfile():
            raise StrataError(f"{what}: {name!r} is not a file")
        return member


def import_docker_archive(
    store: Store, location: Location, names: list[str], progress: Progress
) -> Image:
    what = f"docker-archive:{location.path}"
    try:
        archive = tarfile.open(location.path, "r:")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise StrataError(f"{what}: no such file") from None
    except (tarfile.TarError, OSError) as exc:
        raise StrataError(f"{what}: not a tar archive ({exc})") from None
    with archive:
        manifest_file = archive.extractfile(_archive_member(archive, "manifest.json", what))
        assert manifest_file is not None
        try:
            entries = json.loads(manifest_file.read())
        except ValueError as exc:
            raise StrataError(f"{what}: manifest.json is not valid JSON ({exc})") from None
        if not isinstance(entries, list) or not entries:
            raise StrataError(f"{what}: manifest.json lists no images")
        if location.tag:
            entries = [e for e in entries if location.tag in (e.get("RepoTags") or [])]
            if not entries:
                raise StrataError(f"{what} has no image tagged {location.tag}")
        elif len(entries) > 1:
            tags = [", ".join(e.get("RepoTags") or ["?"]) for e in entries]
            raise StrataError(f"{what} holds {len(entries)} images; name one: {'; '.join(tags)}")
        entry = entries[0]
        try:
            config_name = str(entry["Config"])
            layer_names = [str(item) for item in entry["Layers"]]
        except (KeyError, TypeError):
            raise StrataError(f"{what}: manifest.json entry lacks Config or Layers") from None
        config_file = archive.extractfile(_archive_member(archive, config_name, what))
        assert config_file is not None
        config_data = config_file.read()
        config_digest = store.put_blob(config_data)
        layers: list[dict[str, Any]] = []
        for layer_name in layer_names:
            member = _archive_member(archive, layer_name, what)
            source = archive.extractfile(member)
            assert source is not None
            head = source.read(4)
            media_type = {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}.get(
                compression_of(head), OCI_LAYER
            )
            writer = store.blob_writer()
            try:
                writer.write(head)
                while chunk := source.read(1 << 20):
                    writer.write(chunk)
            except BaseException:
                writer.abort()
                raise
            digest = writer.commit()
            layers.append({"mediaType": media_type, "digest": digest, "size": member.size})
            progress(f"copied {digest[7:19]}")
        repo_tags = [str(tag) for tag in entry.get("RepoTags") or []]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_data)},
        "layers": layers,
    }
    if not names:
        names = [parse_reference(tag).name for tag in repo_tags[:1]]
        if not names:
            base = os.path.splitext(os.path.basename(location.path))[0].lower()
            names = [parse_reference(base).name]
    return store.add_image(canonical_json(manifest), names, progress)


def export_docker_archive(store: Store, image: Image, location: Location, name: str) -> None:
    """Write a `docker load`-able archive: config, uncompressed layers, manifest.json."""
    target = location.path
    temp = f"{target}.{secrets.token_hex(4)}.tmp"
    config_name = image.id[7:] + ".json"
    layer_names = [f"{diff_id[7:]}/layer.tar" for diff_id in image.diff_ids]
    try:
        with tarfile.open(temp, "w", format=tarfile.PAX_FORMAT) as archive:
            _add_bytes(archive, config_name, store.read_blob(image.id))
            written: set[str] = set()
            for layer, layer_name in zip(image.layers, layer_names, strict=True):
                if layer_name in written:
                    continue
                written.add(layer_name)
                with (
                    open(store.blob_path(layer.digest), "rb") as blob,
                    _spooled(store) as plain,
                ):
                    shutil.copyfileobj(decompressed(blob), plain, 1 << 20)
                    size = plain.tell()
                    plain.seek(0)
                    info = tarfile.TarInfo(layer_name)
                    info.size, info.mode = size, 0o644
                    archive.addfile(info, plain)
            manifest = [{"Config": config_name, "RepoTags": [name], "Layers": layer_names}]
            _add_bytes(archive, "manifest.json", canonical_json(manifest))
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


@contextlib.contextmanager
def _spooled(store: Store) -> Any:
    path = os.path.join(store.tmp, f"export-{os.getpid()}-{secrets.token_hex(4)}")
    handle: IO[bytes] = open(path, "w+b")  # noqa: SIM115
    try:
        os.unlink(path)
        yield handle
    finally:
        handle.close()


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    archive.addfile(info, io.BytesIO(data))


__all__ = ["Location", "export_docker_archive", "export_oci", "import_docker_archive",
           "import_oci", "parse_location", "sha256_digest"]  # fmt: skip
