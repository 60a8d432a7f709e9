"""An OCI distribution API v2 client: pull into the store, push from it.

Auth follows the registry's WWW-Authenticate challenge (Basic, or Bearer with
a token from the realm it names). Requests are retried with backoff on
connection errors and 429/5xx; a broken blob download resumes with a Range
request from what the store already holds in tmp/.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, TypeVar
from urllib.parse import urlencode, urljoin

import requests
import urllib3

from ..errors import StrataError
from .reference import Reference
from .store import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Image,
    Store,
    choose_platform,
    parse_config,
    parse_json,
    parse_manifest,
    sha256_digest,
)

T = TypeVar("T")
R = TypeVar("R")
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))
MANIFEST_LIMIT = 4 << 20
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(slots=True)
class RegistryOptions:
    tls_verify: bool = True
    ca_cert: str | None = None
    username: str | None = None
    password: str | None = None
    platform: str = "linux/amd64"
    retries: int = 4
    backoff: float = 0.5
    jobs: int = 4
    # Blobs larger than this go up in PATCH chunks of this size; 0: one PUT.
    chunk_size: int = 0
    progress: bool = field(default_factory=lambda: sys.stderr.isatty())


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {
        match.group(1).lower(): match.group(2) if match.group(2) is not None else match.group(3)
        for match in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def _registry_message(response: requests.Response) -> str:
    try:
        errors = response.json().get("errors") or []
        if errors:
            first = errors[0]
            return f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except (ValueError, AttributeError):
        pass
    return response.reason or f"HTTP {response.status_code}"


class ProgressLine:
    """One status line on a terminal (nothing otherwise): bytes of all transfers."""

    def __init__(self, enabled: bool, verb: str) -> None:
        self.enabled = enabled
        self.verb = verb
        self.lock = threading.Lock()
        self.total = 0
        self.done = 0
        self.blobs = 0
        self.finished = 0
        self.shown = 0.0

    def add(self, size: int) -> None:
        with self.lock:
            self.total += size
            self.blobs += 1

    def advance(self, count: int, finished: bool = False) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.done += count
            self.finished += finished
            now = time.monotonic()
            if finished or now - self.shown > 0.1:
                self.shown = now
                width = 30
                filled = int(width * self.done / max(self.total, 1))
                bar = "#" * min(filled, width) + "-" * max(width - filled, 0)
                sys.stderr.write(
                    f"\r{self.verb} [{bar}] {self.done / 2**20:.1f}/{self.total / 2**20:.1f} MiB,"
                    f" {self.finished}/{self.blobs} blobs"
                )
                sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.blobs:
            sys.stderr.write("\n")


class RegistryClient:
    def __init__(self, host: str, options: RegistryOptions) -> None:
        self.host = host
        self.options = options
        self.scheme = "https"
        self.local = threading.local()
        # Passed on every request: requests lets REQUESTS_CA_BUNDLE override a
        # session's setting, and --ca-cert must win.
        self.verify: bool | str = False if not options.tls_verify else options.ca_cert or True
        self.auth_lock = threading.Lock()
        self.basic: str | None = None
        self.tokens: dict[str, str] = {}
        if options.username is not None:
            raw = f"{options.username}:{options.password or ''}".encode()
            self.credentials: str | None = "Basic " + base64.b64encode(raw).decode()
        else:
            self.credentials = None

    # Transport ----------------------------------------------------------------

    @property
    def session(self) -> requests.Session:
        session: requests.Session | None = getattr(self.local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = "strata"
            self.local.session = session
        return session

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}{path}"

    def request(
        self,
        method: str,
        path_or_url: str,
        scope: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | Callable[[], IO[bytes]] | None = None,
        stream: bool = False,
    ) -> requests.Response:
        """One request with auth and retries; the caller judges the status."""
        attempt = 0
        authenticated = False
        while True:
            url = path_or_url if "://" in path_or_url else self.url(path_or_url)
            sent = dict(headers or {})
            authorization = self._authorization(scope)
            if authorization:
                sent["Authorization"] = authorization
            data = body() if callable(body) else body
            try:
                response = self.session.request(
                    method,
                    url,
                    headers=sent,
                    data=data,
                    stream=stream,
                    timeout=(15, 120),
                    verify=self.verify,
                )
            except requests.exceptions.SSLError as exc:
                if not self.options.tls_verify and url.startswith("https://"):
                    self.scheme = "http"  # --tls-verify=false also allows plain http
                    path_or_url = "http://" + url[len("https://") :]
                    continue
                raise StrataError(f"{self.host}: TLS failed: {_reason(exc)}") from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                if attempt < self.options.retries:
                    attempt += 1
                    time.sleep(self.options.backoff * 2 ** (attempt - 1))
                    continue
                raise RegistryAway(
                    f"{self.host}: cannot reach the registry: {_reason(exc)}"
                ) from None
            finally:
                if hasattr(data, "close"):
                    data.close()  # type: ignore[union-attr]
            if response.status_code == 401 and not authenticated:
                authenticated = True
                self._authenticate(response, scope)
                response.close()
                continue
            if response.status_code == 401:
                response.close()
                raise StrataError(f"{self.host}: access denied ({_registry_message(response)})")
            if response.status_code in RETRY_STATUS and attempt < self.options.retries:
                response.close()
                attempt += 1
                time.sleep(self.options.backoff * 2 ** (attempt - 1))
                continue
            return response

    def _authorization(self, scope: str) -> str | None:
        with self.auth_lock:
            return self.tokens.get(scope) or self.basic

    def _authenticate(self, response: requests.Response, scope: str) -> None:
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if self.credentials is None:
                raise StrataError(
                    f"{self.host}: the registry wants a login (give --creds USER:PASS)"
                )
            with self.auth_lock:
                self.basic = self.credentials
            return
        if scheme != "bearer" or "realm" not in params:
            raise StrataError(f"{self.host}: unsupported authentication {scheme or 'challenge'!r}")
        query = {"service": params.get("service", "")}
        wanted = scope.split()  # one scope parameter each, as the spec's token API wants
        for item in params.get("scope", "").split():
            if item not in wanted:
                wanted.append(item)
        query_items = [(k, v) for k, v in query.items() if v] + [("scope", s) for s in wanted]
        realm = params["realm"]
        headers = {"Authorization": self.credentials} if self.credentials else {}
        try:
            reply = self.session.get(
                realm + ("&" if "?" in realm else "?") + urlencode(query_items),
                headers=headers,
                timeout=(15, 60),
                verify=self.verify,
            )
        except requests.exceptions.RequestException as exc:
            raise StrataError(
                f"{self.host}: token service {realm} failed: {_reason(exc)}"
            ) from None
        if reply.status_code != 200:
            raise StrataError(f"{self.host}: token service refused ({reply.status_code})")
        try:
            body = reply.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise StrataError(f"{self.host}: token service gave no token")
        with self.auth_lock:
            self.tokens[scope] = "Bearer " + token

    def ping(self) -> None:
        """Settle http or https before transfers run in parallel."""
        self.request("GET", "/v2/", "").close()

    # Manifests ----------------------------------------------------------------

    def get_manifest(self, repository: str, ref: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest by tag or digest, verified."""
        scope = f"repository:{repository}:pull"
        response = self.request(
            "GET",
            f"/v2/{repository}/manifests/{ref}",
            scope,
            headers={"Accept": MANIFEST_ACCEPT},
            stream=True,
        )
        with response:
            if response.status_code == 404:
                raise StrataError(f"{self.host}/{repository}:{ref}: no such image in the registry")
            if response.status_code != 200:
                raise StrataError(f"{self.host}/{repository}:{ref}: {_registry_message(response)}")
            data = response.raw.read(MANIFEST_LIMIT + 1, decode_content=True)
            if len(data) > MANIFEST_LIMIT:
                raise StrataError(f"{self.host}/{repository}:{ref}: manifest larger than 4 MiB")
            digest = sha256_digest(data)
            announced = response.headers.get("Docker-Content-Digest")
            if ref.startswith("sha256:") and digest != ref:
                raise StrataError(f"manifest {ref}: content has digest {digest}")
            if announced and announced.startswith("sha256:") and announced != digest:
                raise StrataError(
                    f"{self.host}/{repository}:{ref}: manifest digest {digest} differs from"
                    f" the registry's {announced}"
                )
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        declared = parse_json(data, f"manifest {digest}").get("mediaType")
        return data, str(declared or media_type or OCI_MANIFEST), digest

    # Blobs --------------------------------------------------------------------

    def fetch_blob(
        self, store: Store, repository: str, blob: Descriptor, progress: ProgressLine
    ) -> None:
        if store.has_blob(blob.digest):
            progress.advance(blob.size, finished=True)
            return
        with store.blob_lock(blob.digest):
            if store.has_blob(blob.digest):  # another pull brought it meanwhile
                progress.advance(blob.size, finished=True)
                return
            self._download(store, repository, blob, progress)

    def _download(
        self, store: Store, repository: str, blob: Descriptor, progress: ProgressLine
    ) -> None:
        scope = f"repository:{repository}:pull"
        writer = store.blob_writer(blob.digest, resume=True)
        progress.advance(writer.size)
        breaks = 0
        try:
            while writer.size < blob.size:
                headers = {"Range": f"bytes={writer.size}-"} if writer.size else {}
                response = self.request(
                    "GET",
                    f"/v2/{repository}/blobs/{blob.digest}",
                    scope,
                    headers=headers,
                    stream=True,
                )
                with response:
                    if response.status_code == 404:
                        raise StrataError(f"blob {blob.digest}: not in {self.host}/{repository}")
                    if response.status_code == 200 and writer.size:
                        # The server ignored the Range: start over.
                        progress.advance(-writer.size)
                        writer.abort()
                        writer = store.blob_writer(blob.digest, resume=True)
                    elif response.status_code not in (200, 206):
                        raise StrataError(
                            f"blob {blob.digest}: {response.status_code}"
                            f" {_registry_message(response)}"
                        )
                    try:
                        # read1 hands over what has arrived, so a connection that
                        # breaks keeps every byte before the break for the resume.
                        raw = response.raw
                        while chunk := raw.read1(1 << 20):
                            writer.write(chunk)
                            progress.advance(len(chunk))
                            if writer.size > blob.size:
                                raise StrataError(
                                    f"blob {blob.digest}: registry sent more than its"
                                    f" {blob.size} bytes"
                                )
                    except (
                        requests.exceptions.ChunkedEncodingError,
                        requests.exceptions.ConnectionError,
                        urllib3.exceptions.HTTPError,
                        OSError,
                    ):
                        pass  # resumed below from what arrived
                if writer.size < blob.size:
                    breaks += 1
                    if breaks > self.options.retries:
                        raise _Resumable(
                            f"blob {blob.digest}: the download broke {breaks} times at"
                            f" {writer.size} of {blob.size} bytes; pull again to resume"
                        )
                    time.sleep(self.options.backoff * breaks)
        except RegistryAway:  # what arrived is kept: the next try resumes from it
            writer.abort(keep=True)
            raise
        except StrataError:
            writer.abort(keep=False)
            raise
        except BaseException:
            writer.abort(keep=True)  # interrupted: the next pull resumes
            raise
        if writer.size != blob.size:
            writer.abort(keep=False)
            raise StrataError(
                f"blob {blob.digest}: got {writer.size} bytes, the manifest says {blob.size}"
            )
        writer.commit()
        progress.advance(0, finished=True)

    def fetch_range(self, repository: str, digest: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a blob (an HTTP Range request)."""
        response = self.request(
            "GET",
            f"/v2/{repository}/blobs/{digest}",
            f"repository:{repository}:pull",
            headers={"Range": f"bytes={start}-{end - 1}"},
            stream=True,
        )
        with response:
            if response.status_code not in (200, 206):
                raise StrataError(
                    f"blob {digest}: {response.status_code} {_registry_message(response)}"
                )
            try:
                if response.status_code == 200:  # the whole blob: skip to the range
                    skip = start
                    while skip and (chunk := response.raw.read(min(skip, 1 << 20))):
                        skip -= len(chunk)
                data = response.raw.read(end - start)
            except (
                requests.exceptions.ConnectionError,
                urllib3.exceptions.HTTPError,
                OSError,
            ) as exc:
                raise StrataError(f"blob {digest}: the transfer broke: {_reason(exc)}") from None
        if len(data) != end - start:
            raise StrataError(f"blob {digest}: got {len(data)} of {end - start} bytes asked")
        return data

    def blob_exists(self, repository: str, digest: str) -> bool:
        response = self.request(
            "HEAD", f"/v2/{repository}/blobs/{digest}", f"repository:{repository}:push,pull"
        )
        response.close()
        return response.status_code == 200

    def upload_blob(
        self,
        store: Store,
        repository: str,
        blob: Descriptor,
        mount_from: list[str],
        progress: ProgressLine,
    ) -> str:
        """Upload unless the registry has it; returns how: exists, mounted, uploaded."""
        scope = f"repository:{repository}:push,pull"
        if self.blob_exists(repository, blob.digest):
            progress.advance(blob.size, finished=True)
            return "exists"
        start = f"/v2/{repository}/blobs/uploads/"
        for source in mount_from:
            if source == repository:
                continue
            response = self.request(
                "POST",
                start + "?" + urlencode({"mount": blob.digest, "from": source}),
                f"{scope} repository:{source}:pull",
            )
            response.close()
            if response.status_code == 201:
                progress.advance(blob.size, finished=True)
                return "mounted"
            if response.status_code == 202:
                return self._send(store, repository, blob, response, progress)
        response = self.request("POST", start, scope)
        response.close()
        if response.status_code != 202:
            raise StrataError(
                f"{self.host}/{repository}: cannot start upload: {_registry_message(response)}"
            )
        return self._send(store, repository, blob, response, progress)

    def _send(
        self,
        store: Store,
        repository: str,
        blob: Descriptor,
        started: requests.Response,
        progress: ProgressLine,
    ) -> str:
        scope = f"repository:{repository}:push,pull"
        location = self._location(started)
        path = store.blob_path(blob.digest)
        chunk = self.options.chunk_size
        if chunk and blob.size > chunk:
            offset = 0
            with open(path, "rb") as source:
                while offset < blob.size:
                    data = source.read(chunk)
                    response = self.request(
                        "PATCH",
                        location,
                        scope,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Range": f"{offset}-{offset + len(data) - 1}",
                            "Content-Length": str(len(data)),
                        },
                        body=data,
                    )
                    response.close()
                    if response.status_code != 202:
                        raise StrataError(
                            f"blob {blob.digest}: chunk upload failed:"
                            f" {_registry_message(response)}"
                        )
                    location = self._location(response)
                    offset += len(data)
                    progress.advance(len(data))
            body: bytes | Callable[[], IO[bytes]] = b""
        else:

            def body() -> IO[bytes]:
                return open(path, "rb")

        separator = "&" if "?" in location else "?"
        response = self.request(
            "PUT",
            location + separator + urlencode({"digest": blob.digest}),
            scope,
            headers={"Content-Type": "application/octet-stream"},
            body=body,
        )
        response.close()
        if response.status_code != 201:
            raise StrataError(f"blob {blob.digest}: upload failed: {_registry_message(response)}")
        if not chunk or blob.size <= chunk:
            progress.advance(blob.size)
        progress.advance(0, finished=True)
        return "uploaded"

    def _location(self, response: requests.Response) -> str:
        location = response.headers.get("Location")
        if not location:
            raise StrataError(f"{self.host}: upload reply has no Location")
        return urljoin(self.url("/"), location)

    def put_manifest(self, repository: str, tag: str, data: bytes, media_type: str) -> None:
        response = self.request(
            "PUT",
            f"/v2/{repository}/manifests/{tag}",
            f"repository:{repository}:push,pull",
            headers={"Content-Type": media_type},
            body=data,
        )
        response.close()
        if response.status_code != 201:
            raise StrataError(
                f"{self.host}/{repository}:{tag}: manifest refused: {_registry_message(response)}"
            )


class RegistryAway(StrataError):
    """The registry could not be reached, or a download kept breaking: a later
    try may work (a pull resumes; a streaming mount tries again)."""


class _Resumable(RegistryAway):
    """A download broke too often; what arrived is kept for the next pull."""


def _reason(exc: BaseException) -> str:
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)|(certificate verify failed[^'\"(]*)", text)
    if match:
        return (match.group(1) or match.group(2)).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _parallel(jobs: int, work: Callable[[T], R], items: list[T]) -> list[R]:
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(work, items))


def open_manifest(
    reference: Reference, options: RegistryOptions
) -> tuple[RegistryClient, bytes, str]:
    """A client for the reference's registry, and the image manifest it names
    (from an index, the one of options.platform) with its digest."""
    client = RegistryClient(reference.registry, options)
    client.ping()
    ref = reference.digest or reference.tag
    data, media_type, digest = client.get_manifest(reference.repository, ref)
    if media_type in INDEX_TYPES:
        chosen = choose_platform(
            parse_json(data, f"index {digest}"), options.platform, str(reference)
        )
        data, media_type, digest = client.get_manifest(reference.repository, chosen.digest)
    return client, data, digest


def pull(
    store: Store,
    reference: Reference,
    options: RegistryOptions,
    note: Callable[[str], None],
    unpacked: Callable[[str], None] | None = None,
) -> Image:
    """Pull the image whole; *unpacked* is told each layer's DiffID once its
    blob is in the store (lazy/layers.py completes a layer pulled lazily before)."""
    client, data, digest = open_manifest(reference, options)
    _, config, layers = parse_manifest(data, digest)
    progress = ProgressLine(options.progress, f"pulling {reference.repository}")
    blobs = [config, *layers]
    for blob in blobs:
        progress.add(blob.size)
    try:
        # The config first: its DiffIDs let each layer unpack as soon as its
        # blob is complete, while the others still download.
        client.fetch_blob(store, reference.repository, config, progress)
        _, diff_ids = parse_config(store.read_blob(config.digest), config.digest, len(layers))

        def fetch_and_unpack(pair: tuple[Descriptor, str]) -> None:
            client.fetch_blob(store, reference.repository, pair[0], progress)
            store.unpack(*pair)
            if unpacked is not None:
                unpacked(pair[1])

        _parallel(options.jobs, fetch_and_unpack, list(zip(layers, diff_ids, strict=True)))
    finally:
        progress.close()
    store.note_sources([blob.digest for blob in blobs], reference.registry, reference.repository)
    name = reference.name if not reference.digest else f"{reference.repo}@{digest}"
    image = store.add_image(data, [name], note)
    return image


def push(
    store: Store,
    image: Image,
    reference: Reference,
    options: RegistryOptions,
    note: Callable[[str], None],
) -> str:
    """Push *image* as *reference*; returns the manifest digest."""
    client = RegistryClient(reference.registry, options)
    client.ping()
    progress = ProgressLine(options.progress, f"pushing {reference.repository}")
    blobs = [*image.layers, image.config_descriptor]
    for blob in blobs:
        progress.add(blob.size)

    def one(blob: Descriptor) -> str:
        sources = store.sources(blob.digest, reference.registry)
        return client.upload_blob(store, reference.repository, blob, sources, progress)

    try:
        outcomes = _parallel(options.jobs, one, blobs)
    finally:
        progress.close()
    store.note_sources([blob.digest for blob in blobs], reference.registry, reference.repository)
    counts = {kind: outcomes.count(kind) for kind in ("uploaded", "mounted", "exists")}
    note(
        f"blobs: {counts['uploaded']} uploaded, {counts['mounted']} mounted from another"
        f" repository, {counts['exists']} already there"
    )
    manifest = store.read_blob(image.digest)
    client.put_manifest(
        reference.repository, reference.tag or image.digest, manifest, image.media_type
    )
    return image.digest


def load_credentials(
    text: str | None, authfile: str | None, host: str
) -> tuple[str | None, str | None]:
    """USER[:PASS] from --creds, else the host's entry of an auth file
    (containers' auth.json or docker's config.json)."""
    if text:
        user, _, password = text.partition(":")
        return user, password
    candidates = [authfile] if authfile else []
    if not authfile:
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        candidates += [
            os.environ.get("REGISTRY_AUTH_FILE") or "",
            os.path.join(runtime, "containers", "auth.json"),
            os.path.expanduser("~/.docker/config.json"),
        ]
    for path in candidates:
        if not path:
            continue
        try:
            with open(path) as handle:
                auths = json.load(handle).get("auths", {})
        except FileNotFoundError:
            continue
        except (OSError, ValueError, AttributeError) as exc:
            raise StrataError(f"cannot read auth file {path}: {exc}") from None
        entry = auths.get(host) or auths.get(f"https://{host}") or {}
        encoded = entry.get("auth")
        if encoded:
            try:
                user, _, password = base64.b64decode(encoded).decode().partition(":")
            except (ValueError, UnicodeError):
                raise StrataError(f"auth file {path}: bad entry for {host}") from None
            return user, password
    return None, None
