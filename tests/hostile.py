"""Material for the hostile-input tests: hand-made OCI layouts whose layers
break the rules, and a proxy that makes a real registry misbehave."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import requests


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


Entry = Callable[[tarfile.TarFile], None]


def file_entry(name: str, data: bytes = b"data\n", **extra: object) -> Entry:
    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
        for key, value in extra.items():
            setattr(info, key, value)
        archive.addfile(info, io.BytesIO(data))

    return add


def special_entry(name: str, kind: bytes, linkname: str = "", **extra: object) -> Entry:
    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mtime = kind, linkname, 1_600_000_000
        info.mode = 0o755
        for key, value in extra.items():
            setattr(info, key, value)
        archive.addfile(info)

    return add


def layer_tar(*entries: Entry) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            entry(archive)
    return buffer.getvalue()


@dataclass
class LayoutLayer:
    tar: bytes
    blob: bytes | None = None  # what is stored (default: gzip of tar)
    diff_id: str | None = None  # what the config claims (default: the truth)
    stored_as: bytes | None = None  # content put under the blob's digest (a mismatch)
    media_type: str = "application/vnd.oci.image.layer.v1.tar+gzip"
    size_error: int = 0  # added to the size the descriptor gives (a mismatch)
    annotations: dict[str, str] | None = None

    def compressed(self) -> bytes:
        return self.blob if self.blob is not None else gzip.compress(self.tar, mtime=0)

    @classmethod
    def estargz(cls, tar: bytes) -> LayoutLayer:
        """*tar*'s entries as an eStargz layer, with its TOC digest annotation."""
        from unionfs.lazy.estargz import convert_tar

        target = io.BytesIO()
        converted = convert_tar(io.BytesIO(tar), target)
        blob = target.getvalue()
        return cls(gzip.decompress(blob), blob, annotations=converted.annotations())


def _put(blobs: str, data: bytes, stored: bytes | None = None) -> str:
    digest = digest_of(data)
    with open(f"{blobs}/{digest[7:]}", "wb") as handle:
        handle.write(stored if stored is not None else data)
    return digest


def _image(
    blobs: str, layers: list[LayoutLayer], platform: str = "linux/amd64"
) -> dict[str, object]:
    """Store an image's blobs; return its manifest descriptor."""
    descriptors = []
    diff_ids = []
    for layer in layers:
        blob = layer.compressed()
        descriptors.append(
            {"mediaType": layer.media_type, "digest": _put(blobs, blob, layer.stored_as),
             "size": len(blob) + layer.size_error}
        )  # fmt: skip
        if layer.annotations:
            descriptors[-1]["annotations"] = layer.annotations
        diff_ids.append(layer.diff_id or digest_of(layer.tar))
    os_name, architecture = platform.split("/")[:2]
    config = json.dumps(
        {
            "architecture": architecture,
            "os": os_name,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _put(blobs, config),
                "size": len(config),
            },
            "layers": descriptors,
        }
    ).encode()
    return {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": _put(blobs, manifest),
        "size": len(manifest),
        "platform": {"os": os_name, "architecture": architecture},
    }


def _finish_layout(path: str, descriptor: dict[str, object], tag: str) -> str:
    index = {
        "schemaVersion": 2,
        "manifests": [{**descriptor, "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }
    with open(f"{path}/index.json", "w") as handle:
        json.dump(index, handle)
    with open(f"{path}/oci-layout", "w") as handle:
        handle.write('{"imageLayoutVersion":"1.0.0"}')
    return f"oci:{path}:{tag}"


def write_layout(path: str, layers: list[LayoutLayer], tag: str = "v1") -> str:
    """An OCI layout holding one image; returns its `oci:PATH:TAG` name."""
    blobs = f"{path}/blobs/sha256"
    os.makedirs(blobs, exist_ok=True)
    return _finish_layout(path, _image(blobs, layers), tag)


def write_multi_platform(path: str, images: dict[str, list[LayoutLayer]], tag: str = "v1") -> str:
    """An OCI layout whose TAG is an image index with one image per platform."""
    blobs = f"{path}/blobs/sha256"
    os.makedirs(blobs, exist_ok=True)
    manifests = [_image(blobs, layers, platform) for platform, layers in images.items()]
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }
    ).encode()
    descriptor = {
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": _put(blobs, index),
        "size": len(index),
    }
    return _finish_layout(path, descriptor, tag)


# A misbehaving registry ----------------------------------------------------------


@dataclass
class Misbehaviour:
    cut_blobs: int = 0  # how many blob replies to cut off halfway
    corrupt_blobs: bool = False  # flip a byte in every blob
    manifest_errors: int = 0  # how many manifest requests answer 503
    wrong_digest_header: bool = False
    manifest_body: bytes | None = None  # replace every manifest with this
    seen_ranges: list[str] = field(default_factory=list)
    # A slow link: every request waits *latency* seconds, and blob bytes share
    # one link of *rate* bytes/s (0: unlimited). sent_bytes counts blob bytes.
    latency: float = 0.0
    rate: float = 0.0
    sent_bytes: int = 0
    # A registry gone away: while set, transfers under way break off and new
    # requests are dropped without an answer.
    away: bool = False
    away_after_cut: bool = False  # go away right after cutting a blob reply


@contextlib.contextmanager
def misbehaving_proxy(upstream: str, plan: Misbehaviour) -> Iterator[str]:
    """An HTTP proxy for the registry at *upstream* (plain http) that follows *plan*."""
    lock = threading.Lock()
    link_free = [0.0]  # when the throttled link is next free (monotonic)

    def paced_write(wfile: Any, body: bytes) -> None:
        piece = 64 << 10
        for start in range(0, len(body), piece):
            data = body[start : start + piece]
            with lock:
                begin = max(time.monotonic(), link_free[0])
                link_free[0] = begin + len(data) / plan.rate
                done = link_free[0]
            if plan.away:
                raise ConnectionAbortedError("the registry went away")
            wfile.write(data)
            time.sleep(max(0.0, done - time.monotonic()))

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.forward()

        def do_HEAD(self) -> None:
            self.forward()

        def forward(self) -> None:
            if plan.away:
                self.close_connection = True
                return
            headers = {
                key: value
                for key, value in self.headers.items()
                if key.lower() in ("accept", "range", "authorization")
            }
            if "Range" in self.headers:
                plan.seen_ranges.append(self.headers["Range"])
            if plan.latency:
                time.sleep(plan.latency)
            is_manifest = "/manifests/" in self.path
            is_blob = "/blobs/" in self.path and self.command == "GET"
            if is_manifest:
                with lock:
                    failing = plan.manifest_errors > 0
                    plan.manifest_errors -= failing
                if failing:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            reply = requests.request(
                self.command, f"http://{upstream}{self.path}", headers=headers, timeout=30
            )
            body = reply.content
            if is_manifest and plan.manifest_body is not None:
                body = plan.manifest_body
            if is_blob and plan.corrupt_blobs and body:
                body = body[:-1] + bytes([body[-1] ^ 0xFF])
            self.send_response(reply.status_code)
            for key, value in reply.headers.items():
                if key.lower() in ("content-type", "docker-content-digest", "content-range"):
                    if key.lower() == "docker-content-digest":
                        if is_manifest and plan.manifest_body is not None:
                            continue  # a registry that sends junk sends no digest either
                        if plan.wrong_digest_header:
                            value = "sha256:" + "0" * 64
                    self.send_header(key, value)
            if self.command == "HEAD":  # the size a GET would send (containerd checks it)
                self.send_header("Content-Length", reply.headers.get("Content-Length", "0"))
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with lock:
                cutting = is_blob and plan.cut_blobs > 0 and len(body) > 1
                plan.cut_blobs -= cutting
            if cutting:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                plan.away = plan.away or plan.away_after_cut
                return
            if is_blob:
                with lock:
                    plan.sent_bytes += len(body)
            if is_blob and plan.rate:
                try:
                    paced_write(self.wfile, body)
                except ConnectionAbortedError:
                    self.close_connection = True
            else:
                self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
