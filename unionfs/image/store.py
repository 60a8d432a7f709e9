"""The image store: content-addressed blobs, unpacked layers, names, containers.

    ROOT/blobs/sha256/HEX      manifests, configs and layer blobs, verified on write
    ROOT/layers/HEX            each layer unpacked once, by DiffID, shared read-only
    ROOT/refs.json             image names (`repo:tag`) -> manifest digest
    ROOT/containers/NAME/      a container: container.json, upper/, work/
    ROOT/index                 the merged-view index (cached by ChainID)
    ROOT/tmp                   partial downloads (resumed) and unfinished unpacks

Commands that add or read hold ROOT/store.lock shared; those that delete
(rmi, rm, prune) hold it exclusive, so nothing is pruned from under a pull.
Small metadata updates (refs, container records) go through ROOT/refs.lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO

import xxhash

from ..core.claim import is_claimed
from ..errors import StrataError
from .reference import Reference, check_digest, parse_reference

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
LAYER_TYPES = (
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    DOCKER_LAYER,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)
_CONTAINER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CHUNK = 1 << 20


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI ChainIDs of a layer list, lowest first."""
    chains: list[str] = []
    for diff_id in diff_ids:
        chains.append(diff_id if not chains else sha256_digest(f"{chains[-1]} {diff_id}".encode()))
    return chains


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    # Kept as given: an eStargz layer's TOC digest lives here.
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Any, what: str) -> Descriptor:
        try:
            annotations = raw.get("annotations") or {}
            if not isinstance(annotations, dict) or not all(
                isinstance(key, str) and isinstance(value, str)
                for key, value in annotations.items()
            ):
                raise ValueError("annotations are not a map of strings")
            descriptor = cls(
                str(raw["mediaType"]),
                check_digest(str(raw["digest"])),
                int(raw["size"]),
                dict(annotations),
            )
        except (KeyError, TypeError, ValueError, AttributeError, StrataError) as exc:
            raise StrataError(f"{what}: bad descriptor ({exc})") from None
        if descriptor.size < 0:
            raise StrataError(f"{what}: negative size in descriptor")
        return descriptor

    def to_json(self) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            raw["annotations"] = dict(self.annotations)
        return raw


@dataclass(frozen=True, slots=True)
class Image:
    digest: str  # of the manifest
    manifest: dict[str, Any]
    media_type: str
    config_descriptor: Descriptor
    config: dict[str, Any]
    layers: list[Descriptor]
    diff_ids: list[str]

    @property
    def id(self) -> str:
        return self.config_descriptor.digest

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeError) as exc:
        raise StrataError(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise StrataError(f"{what} is not a JSON object")
    return value


def parse_manifest(data: bytes, digest: str) -> tuple[str, Descriptor, list[Descriptor]]:
    """(media type, config, layers) of an image manifest."""
    manifest = parse_json(data, f"manifest {digest}")
    media_type = manifest.get("mediaType") or OCI_MANIFEST
    if media_type in INDEX_TYPES:
        raise StrataError(f"manifest {digest} is an index, not an image manifest")
    if media_type not in MANIFEST_TYPES or manifest.get("schemaVersion") != 2:
        raise StrataError(f"manifest {digest}: unsupported manifest type {media_type!r}")
    config = Descriptor.parse(manifest.get("config"), f"manifest {digest} config")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise StrataError(f"manifest {digest} lists no layers")
    layers = [Descriptor.parse(layer, f"manifest {digest} layer") for layer in raw_layers]
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise StrataError(f"manifest {digest}: unsupported layer type {layer.media_type!r}")
    return media_type, config, layers


def parse_config(data: bytes, digest: str, layers: int) -> tuple[dict[str, Any], list[str]]:
    config = parse_json(data, f"image config {digest}")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(item, str) for item in diff_ids):
        raise StrataError(f"image config {digest} has no rootfs.diff_ids")
    for item in diff_ids:
        check_digest(item)
    if len(diff_ids) != layers:
        raise StrataError(
            f"image config {digest} lists {len(diff_ids)} diff_ids for {layers} layers"
        )
    return config, diff_ids


def choose_platform(index: dict[str, Any], platform: str, what: str) -> Descriptor:
    """The manifest of *platform* (`os/arch[/variant]`) in an OCI index or Docker list."""
    want = platform.split("/")
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise StrataError(f"{what}: the index lists no manifests")
    offered = []
    for raw in manifests:
        entry = raw.get("platform") or {}
        have = [entry.get("os", ""), entry.get("architecture", "")]
        if entry.get("variant"):
            have.append(entry["variant"])
        offered.append("/".join(have))
        if have[:2] == want[:2] and (len(want) < 3 or have[2:3] == want[2:3]):
            return Descriptor.parse(raw, what)
    raise StrataError(f"{what} has no image for {platform} (it has {', '.join(offered)})")


class BlobWriter:
    """A blob being written into tmp; kept only if its digest is what was asked."""

    def __init__(
        self, store: Store, expected: str | None, resume: bool, size: int | None = None
    ) -> None:
        self.store = store
        self.expected = expected
        self.expected_size = size  # a descriptor's size: content of another length is invalid
        self.digest = hashlib.sha256()
        if expected is not None and resume:
            self.path = store.partial_path(expected)
            mode = "ab" if os.path.exists(self.path) else "wb"
        else:
            self.path = os.path.join(store.tmp, f"blob-{os.getpid()}-{secrets.token_hex(6)}")
            mode = "wb"
        self.file: IO[bytes] = open(self.path, mode)  # noqa: SIM115 - closed in commit/abort
        if mode == "ab":
            with open(self.path, "rb") as done:
                while chunk := done.read(CHUNK):
                    self.digest.update(chunk)
        self.size = self.file.tell()

    def _size_error(self) -> StrataError:
        found = f"{self.size} bytes"
        if self.expected_size is not None and self.size > self.expected_size:
            found = f"more than {self.expected_size} bytes"  # stopped reading there
        return StrataError(
            f"blob {self.expected}: content is {found}, the descriptor says"
            f" {self.expected_size}; nothing kept"
        )

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)
        if self.expected_size is not None and self.size > self.expected_size:
            self.abort()  # no need to read the rest of something invalid
            raise self._size_error()

    def commit(self) -> str:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.expected_size is not None and self.size != self.expected_size:
            os.unlink(self.path)
            raise self._size_error()
        digest = "sha256:" + self.digest.hexdigest()
        if self.expected is not None and digest != self.expected:
            os.unlink(self.path)
            raise StrataError(f"blob {self.expected}: content has digest {digest}; nothing kept")
        os.replace(self.path, self.store.blob_path(digest))
        return digest

    def abort(self, keep: bool = False) -> None:
        """Drop the partial blob, or keep it for a later resume."""
        self.file.close()
        if not keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


# No layer of a real image comes near this; a zip bomb does. `--max-layer-size`
# or STRATA_MAX_LAYER_SIZE change it.
DEFAULT_LAYER_LIMIT = 64 << 30


class Store:
    def __init__(self, root: str, *, layer_limit: int = DEFAULT_LAYER_LIMIT) -> None:
        self.root = os.path.abspath(root)
        self.blobs = os.path.join(self.root, "blobs", "sha256")
        self.layers_dir = os.path.join(self.root, "layers")
        self.layer_ids = os.path.join(self.root, "layer-ids")  # layer_known_id's tokens
        self.containers_dir = os.path.join(self.root, "containers")
        self.tmp = os.path.join(self.root, "tmp")
        self.locks = os.path.join(self.root, "locks")
        self.index_path = os.path.join(self.root, "index")
        self.layer_limit = layer_limit
        try:
            for path in (self.blobs, self.layers_dir, self.containers_dir, self.tmp, self.locks):
                os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StrataError(f"cannot use store {self.root}: {exc.strerror}") from None

    # Locks --------------------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self, name: str, mode: int, wait: float = 120.0) -> Iterator[None]:
        fd = os.open(os.path.join(self.root, name), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StrataError(
                            f"store {self.root} is busy (another strata command holds {name})"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def try_lock(self, name: str) -> int | None:
        """The descriptor holding lock *name* (under locks/), or None if another
        process holds it. The lock lasts while the descriptor is open."""
        fd = os.open(os.path.join(self.locks, name), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _in_use(self, tmp_name: str) -> bool:
        """Whether a running command still writes *tmp_name* (under tmp/)."""
        lock = _tmp_lock(tmp_name)
        return lock is not None and self._busy(lock)

    def _busy(self, name: str) -> bool:
        """Whether another process holds lock *name* (under locks/) now."""
        fd = self.try_lock(name)
        if fd is None:
            return True
        os.close(fd)
        return False

    def shared(self) -> contextlib.AbstractContextManager[None]:
        return self._flock("store.lock", fcntl.LOCK_SH)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return self._flock("store.lock", fcntl.LOCK_EX)

    def _records(self) -> contextlib.AbstractContextManager[None]:
        return self._flock("refs.lock", fcntl.LOCK_EX)

    # Blobs --------------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.blobs, check_digest(digest)[len("sha256:") :])

    def partial_path(self, digest: str) -> str:
        return os.path.join(self.tmp, check_digest(digest)[len("sha256:") :] + ".partial")

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def read_blob(self, digest: str) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise StrataError(f"blob {digest} is not in the store") from None

    def blob_lock(self, digest: str) -> contextlib.AbstractContextManager[None]:
        """Held while a blob downloads: two pulls never write one partial file."""
        return self._flock(f"locks/blob-{check_digest(digest)[7:]}", fcntl.LOCK_EX, wait=3600)

    def blob_writer(
        self, expected: str | None = None, *, resume: bool = False, size: int | None = None
    ) -> BlobWriter:
        return BlobWriter(self, expected, resume, size)

    def put_blob(self, data: bytes, expected: str | None = None) -> str:
        digest = sha256_digest(data)
        if expected is not None and digest != expected:
            raise StrataError(f"blob {expected}: content has digest {digest}; nothing kept")
        if not self.has_blob(digest):
            writer = self.blob_writer()
            writer.write(data)
            writer.commit()
        return digest

    def copy_blob_in(self, source: IO[bytes], expected: str, size: int | None = None) -> str:
        """Copy a blob from an open file, verifying its digest and the *size* its
        descriptor gives (no copy if already stored)."""
        if self.has_blob(expected):
            stored = os.path.getsize(self.blob_path(expected))
            if size is not None and stored != size:
                raise StrataError(
                    f"blob {expected}: content is {stored} bytes, the descriptor says {size}"
                )
            return expected
        writer = self.blob_writer(expected, size=size)
        try:
            while chunk := source.read(CHUNK):
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    # Layers -------------------------------------------------------------------

    def layer_path(self, diff_id: str) -> str:
        return os.path.join(self.layers_dir, check_digest(diff_id)[len("sha256:") :])

    def layer_known_id(self, diff_id: str) -> bytes:
        """The core's identity of a stored layer, which never changes while it
        is stored: its DiffID and a token of this copy of it. A layer removed
        and unpacked again is a new directory whose files have other inode
        numbers: the index must not take it for the one it saw (its reads
        failed with ESTALE). The token is made at first use, and goes with
        the layer (remove_layer)."""
        path = os.path.join(self.layer_ids, check_digest(diff_id)[len("sha256:") :])
        try:
            with open(path, "rb") as handle:
                token = handle.read()
        except FileNotFoundError:
            os.makedirs(self.layer_ids, mode=0o700, exist_ok=True)
            temp = f"{path}.{os.getpid()}.{threading.get_ident()}"
            with open(temp, "wb") as handle:
                handle.write(os.urandom(16).hex().encode())
            try:
                os.link(temp, path)  # the first one made wins
            except FileExistsError:
                pass
            finally:
                os.unlink(temp)
            with open(path, "rb") as handle:
                token = handle.read()
        return xxhash.xxh3_128_digest(b"oci-layer\0" + diff_id.encode() + b"\0" + token)

    def remove_layer(self, diff_id: str) -> None:
        """Remove a layer's directory, its lazy state and its token. Call with
        the store exclusive."""
        hex_id = check_digest(diff_id)[len("sha256:") :]
        for path in (self.layer_path(diff_id), self.lazy_state_dir(diff_id)):
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.layer_ids, hex_id))

    def lazy_state_dir(self, diff_id: str) -> str:
        """Where a lazily pulled layer keeps its TOC and what is in place (lazy/layers.py)."""
        return os.path.join(self.root, "lazy", check_digest(diff_id)[len("sha256:") :])

    def unpack(self, layer: Descriptor, diff_id: str) -> str:
        """The directory of layer *diff_id*, unpacked from its blob if not yet."""
        target = self.layer_path(diff_id)
        if os.path.isdir(target):
            return target
        if not self.has_blob(layer.digest):
            raise StrataError(
                f"layer {layer.digest} is not in the store (a streaming mount that"
                " ended early?); pull the image again"
            )
        with open(self.blob_path(layer.digest), "rb") as blob:
            return self.unpack_from(layer, diff_id, blob)

    def stream_work_dir(self, diff_id: str) -> str:
        """Where a layer unpacks before it takes its place in layers/."""
        return os.path.join(self.tmp, f"layer-{check_digest(diff_id)[len('sha256:') :]}")

    def unpack_from(
        self,
        layer: Descriptor,
        diff_id: str,
        blob: BinaryIO,
        on_entry: Callable[[bytes, int], None] | None = None,
        *,
        streamed: bool = False,
    ) -> str:
        """Unpack layer *diff_id* from *blob* (its blob, or the stream of a
        download still running) and check its DiffID. *streamed*: a mount
        already serves the empty work directory, and holds the layer's lock
        (try_lock) while it streams the layer in."""
        target = self.layer_path(diff_id)
        hex_id = diff_id[len("sha256:") :]
        lock = self._flock(f"locks/{hex_id}", fcntl.LOCK_EX, wait=3600)
        with contextlib.nullcontext() if streamed else lock:
            if os.path.isdir(target):  # another command unpacked it meanwhile
                return target
            work = self.stream_work_dir(diff_id)
            if not streamed:
                if os.path.lexists(work):  # left by an interrupted unpack
                    shutil.rmtree(work)
                os.mkdir(work, 0o755)
            # Here, not at the top: a mount daemon forked from the CLI keeps
            # every module the CLI loaded, and tar code is no mount's business.
            from .layertar import ESTARGZ_ENTRIES, TOC_DIGEST_ANNOTATION, unpack_layer

            label = f"layer {layer.digest}"
            try:
                hidden = ESTARGZ_ENTRIES if TOC_DIGEST_ANNOTATION in layer.annotations else None
                result = unpack_layer(
                    blob,
                    work,
                    limit=self.layer_limit,
                    label=label,
                    hidden=hidden or frozenset(),
                    on_entry=on_entry,
                )
                if result.diff_id != diff_id:
                    raise StrataError(
                        f"{label}: its content has DiffID {result.diff_id},"
                        f" the image config says {diff_id}"
                    )
                os.rename(work, target)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        return target

    # Images -------------------------------------------------------------------

    def _refs_path(self) -> str:
        return os.path.join(self.root, "refs.json")

    def refs(self) -> dict[str, str]:
        try:
            with open(self._refs_path(), "rb") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise StrataError(f"store {self.root}: refs.json is damaged ({exc})") from None
        return {str(name): str(digest) for name, digest in data.items()}

    def _write_json(self, path: str, value: Any) -> None:
        temp = f"{path}.{os.getpid()}.tmp"
        with open(temp, "w") as handle:
            json.dump(value, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)

    def load_image(self, digest: str) -> Image:
        data = self.read_blob(digest)
        media_type, config_descriptor, layers = parse_manifest(data, digest)
        config_data = self.read_blob(config_descriptor.digest)
        config, diff_ids = parse_config(config_data, config_descriptor.digest, len(layers))
        return Image(
            digest, json.loads(data), media_type, config_descriptor, config, layers, diff_ids
        )

    def add_image(
        self,
        manifest: bytes,
        names: list[str],
        progress: Callable[[str], None] | None = None,
        *,
        coming: int = 0,
    ) -> Image:
        """Record an image whose blobs are all stored: unpack and index its layers
        (refusing layers that do not stack safely), then name it. The top
        *coming* layers are still to stream in; a mount checks them once here."""
        digest = self.put_blob(manifest)
        image = self.load_image(digest)
        here = len(image.layers) - coming
        for layer, diff_id in list(zip(image.layers, image.diff_ids, strict=True))[:here]:
            lazy = os.path.isdir(self.lazy_state_dir(diff_id))  # its data comes later
            if not self.has_blob(layer.digest) and not lazy:
                raise StrataError(f"layer {layer.digest} is not in the store")
        below = dataclasses.replace(
            image, layers=image.layers[:here], diff_ids=image.diff_ids[:here]
        )
        paths = self.unpack_all(below, progress)
        self.index_layers(paths, below.diff_ids)
        if names:
            with self._records():
                refs = self.refs()
                for name in names:
                    refs[name] = digest
                self._write_json(self._refs_path(), refs)
        return image

    def unpack_all(self, image: Image, progress: Callable[[str], None] | None = None) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        def one(pair: tuple[Descriptor, str]) -> str:
            path = self.unpack(*pair)
            if progress is not None:
                progress(f"unpacked {pair[0].digest[7:19]}")
            return path

        pairs = list(zip(image.layers, image.diff_ids, strict=True))
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(one, pairs))

    def index_layers(self, paths: list[str], diff_ids: list[str]) -> None:
        """Index the stack now (cached by chain); a bad combination is refused here."""
        if not paths:
            return
        from ..core.index import Index
        from ..core.stack import prepare_stack

        index = Index(self.index_path)
        try:
            prepare_stack(index, paths, known_ids=[self.layer_known_id(item) for item in diff_ids])
        finally:
            index.close()

    def resolve(self, text: str) -> tuple[str, Image]:
        """The image a user means: a full name, a short one (`busybox` for
        `127.0.0.1:5000/busybox:latest` when only one matches), or an id prefix."""
        refs = self.refs()
        if text.startswith("sha256:") or re.fullmatch(r"[0-9a-f]{6,64}", text):
            hex_part = text.removeprefix("sha256:")
            found = {
                digest
                for digest in set(refs.values())
                if self.load_image(digest).id[7:].startswith(hex_part)
                or digest[7:].startswith(hex_part)
            }
            if len(found) == 1:
                digest = found.pop()
                return digest, self.load_image(digest)
            if len(found) > 1:
                raise StrataError(f"image id {text} is ambiguous")
        reference = parse_reference(text)
        if reference.digest:
            if reference.digest in refs.values():
                return reference.digest, self.load_image(reference.digest)
            raise StrataError(f"no image {text} in the store")
        name = reference.name
        if name in refs:
            return name, self.load_image(refs[name])
        suffix = "/" + name
        matches = sorted(known for known in refs if known.endswith(suffix))
        if len(matches) == 1:
            return matches[0], self.load_image(refs[matches[0]])
        if matches:
            raise StrataError(f"{text} is ambiguous: {', '.join(matches)}")
        raise StrataError(f"no image {text} in the store (see `strata images`)")

    def images(self) -> list[tuple[list[str], Image]]:
        by_digest: dict[str, list[str]] = {}
        for name, digest in sorted(self.refs().items()):
            by_digest.setdefault(digest, []).append(name)
        return [(names, self.load_image(digest)) for digest, names in by_digest.items()]

    def untag(self, name: str) -> str:
        with self._records():
            refs = self.refs()
            digest = refs.pop(name)
            self._write_json(self._refs_path(), refs)
        return digest

    # Where blobs live remotely, so a push can mount them across repositories.

    def _sources_path(self) -> str:
        return os.path.join(self.root, "sources.json")

    def _load_sources(self) -> dict[str, list[str]]:
        try:
            with open(self._sources_path()) as handle:
                data = json.load(handle)
        except (FileNotFoundError, ValueError):
            return {}
        return {str(key): [str(item) for item in value] for key, value in data.items()}

    def note_sources(self, digests: list[str], registry: str, repository: str) -> None:
        """Record that *repository* of *registry* holds these blobs (one write)."""
        entry = f"{registry}/{repository}"
        with self._records():
            sources = self._load_sources()
            added = False
            for digest in digests:
                known = sources.setdefault(digest, [])
                if entry not in known:
                    known.append(entry)
                    added = True
            if added:
                self._write_json(self._sources_path(), sources)

    def sources(self, digest: str, registry: str) -> list[str]:
        """Repositories of *registry* known to hold blob *digest*."""
        prefix = registry + "/"
        return [
            item[len(prefix) :]
            for item in self._load_sources().get(digest, [])
            if item.startswith(prefix)
        ]

    # Containers ---------------------------------------------------------------

    def container_dir(self, name: str) -> str:
        if not _CONTAINER_NAME.match(name):
            raise StrataError(f"bad container name {name!r} (letters, digits, _ . -)")
        return os.path.join(self.containers_dir, name)

    def container(self, name: str) -> dict[str, Any]:
        path = os.path.join(self.container_dir(name), "container.json")
        try:
            with open(path) as handle:
                record: dict[str, Any] = json.load(handle)
        except FileNotFoundError:
            raise StrataError(f"no container {name} in the store") from None
        except ValueError as exc:
            raise StrataError(f"container {name}: damaged record ({exc})") from None
        return record

    def containers(self) -> list[dict[str, Any]]:
        found = []
        for name in sorted(os.listdir(self.containers_dir)):
            with contextlib.suppress(StrataError):
                found.append(self.container(name))
        return found

    def create_container(self, name: str | None, image_name: str, image: Image) -> dict[str, Any]:
        if name is None:
            base = re.sub(r"[^A-Za-z0-9_.-]", "-", image_name.rsplit("/", 1)[-1].split(":")[0])
            name = f"{base}-{secrets.token_hex(3)}"
        directory = self.container_dir(name)
        with self._records():
            if os.path.exists(directory):
                raise StrataError(f"container {name} already exists")
            os.mkdir(directory, 0o700)
            upper = os.path.join(directory, "upper")
            os.mkdir(upper, 0o755)
            os.mkdir(os.path.join(directory, "work"), 0o700)
            self._inherit_root(image, upper)
            record = {
                "name": name,
                "image": image_name,
                "manifest": image.digest,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "mountpoint": "",
            }
            self._write_json(os.path.join(directory, "container.json"), record)
        return record

    def _inherit_root(self, image: Image, upper: str) -> None:
        """Give UPPER's root the image root's owner, mode and times: the
        container's `/` then looks as the image's does."""
        from ..core.layer import is_implicit, read_xattrs

        for diff_id in reversed(image.diff_ids):
            layer = self.layer_path(diff_id)
            if not os.path.isdir(layer) or is_implicit(read_xattrs(os.fsencode(layer))):
                continue
            st = os.stat(layer)
            os.chown(upper, st.st_uid, st.st_gid)
            os.chmod(upper, stat.S_IMODE(st.st_mode))
            os.utime(upper, ns=(st.st_atime_ns, st.st_mtime_ns))
            return

    def update_container(self, name: str, **changes: Any) -> None:
        with self._records():
            record = self.container(name)
            record.update(changes)
            self._write_json(os.path.join(self.container_dir(name), "container.json"), record)

    def container_in_use(self, name: str) -> bool:
        """Whether a strata daemon has the container's layer mounted (one
        finishing after its unmount is waited for)."""
        return is_claimed(os.path.join(self.container_dir(name), "work"))

    def remove_container(self, name: str) -> None:
        directory = self.container_dir(name)
        self.container(name)
        if self.container_in_use(name):
            raise StrataError(f"container {name} is mounted; unmount it first")
        with self._records():
            trash = os.path.join(self.tmp, f"removed-{name}-{secrets.token_hex(4)}")
            os.rename(directory, trash)  # gone at once; the tree is deleted after
        shutil.rmtree(trash)

    # Garbage ------------------------------------------------------------------

    def prune(self, *, leftovers: bool = True) -> tuple[int, int, int]:
        """Remove blobs and layers no name or container uses, and (with
        *leftovers*) what interrupted commands left in tmp; returns the three
        counts. Call with the store exclusive."""
        keep_blobs: set[str] = set()
        keep_layers: set[str] = set()
        digests = set(self.refs().values())
        digests.update(record["manifest"] for record in self.containers())
        for digest in digests:
            try:
                image = self.load_image(digest)
            except StrataError:
                continue
            keep_blobs.update({digest, image.id, *(layer.digest for layer in image.layers)})
            keep_layers.update(image.diff_ids)
        blobs = layers = left = 0
        for name in os.listdir(self.blobs):
            if "sha256:" + name not in keep_blobs:
                os.unlink(os.path.join(self.blobs, name))
                blobs += 1
        for name in os.listdir(self.layers_dir):
            if "sha256:" + name not in keep_layers:
                self.remove_layer("sha256:" + name)
                layers += 1
        for name in os.listdir(self.layer_ids) if os.path.isdir(self.layer_ids) else ():
            if "sha256:" + name not in keep_layers and "." not in name:
                os.unlink(os.path.join(self.layer_ids, name))  # of a layer never unpacked
        for name in os.listdir(self.locks):
            # A lock a running command holds stays: a new file would not exclude it.
            if "sha256:" + name not in keep_layers and not self._busy(name):
                os.unlink(os.path.join(self.locks, name))
        lazy = os.path.join(self.root, "lazy")
        for name in os.listdir(lazy) if os.path.isdir(lazy) else ():
            if "sha256:" + name not in keep_layers:
                shutil.rmtree(os.path.join(lazy, name))
        for name in os.listdir(self.tmp) if leftovers else ():
            path = os.path.join(self.tmp, name)
            if self._in_use(name):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            left += 1
        return blobs, layers, left


def _tmp_lock(name: str) -> str | None:
    """The lock a streaming mount holds on a file of tmp it still writes."""
    if name.startswith("layer-"):
        return name[len("layer-") :]  # a layer unpacking
    if name.endswith(".partial"):
        return "blob-" + name[: -len(".partial")]  # a blob downloading
    return None


def open_store(root: str, layer_limit: int | None = None) -> Store:
    limit = layer_limit
    if limit is None:
        env = os.environ.get("STRATA_MAX_LAYER_SIZE")
        try:
            limit = int(env) if env else DEFAULT_LAYER_LIMIT
        except ValueError:
            raise StrataError(f"STRATA_MAX_LAYER_SIZE={env!r} is not a number of bytes") from None
    try:
        return Store(root, layer_limit=limit)
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise StrataError(f"cannot use store {root}: permission denied") from None
        raise


__all__ = ["Image", "Reference", "Store", "open_store"]
