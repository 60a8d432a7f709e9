"""A real registry for tests: Debian's docker-registry on 127.0.0.1, plain or
with TLS (a CA made here with openssl) and htpasswd logins."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import requests

USER, PASSWORD = "strata", "s3cret-pass"


@dataclass(frozen=True)
class Registry:
    host: str  # 127.0.0.1:PORT
    ca_cert: str | None  # set when it speaks TLS
    logins: bool  # htpasswd

    @property
    def tls(self) -> bool:
        return self.ca_cert is not None

    def skopeo_flags(self, side: str) -> list[str]:
        """skopeo copy flags for the --src or --dest side."""
        flags = [f"--{side}-tls-verify={'true' if self.tls else 'false'}"]
        if self.tls:
            flags.append(f"--{side}-cert-dir={os.path.dirname(self.ca_cert or '')}")
        if self.logins:
            flags.append(f"--{side}-creds={USER}:{PASSWORD}")
        return flags

    def strata_flags(self) -> list[str]:
        flags = [f"--ca-cert={self.ca_cert}"] if self.tls else ["--tls-verify=false"]
        if self.logins:
            flags.append(f"--creds={USER}:{PASSWORD}")
        return flags


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_tls(directory: str) -> tuple[str, str, str]:
    """A CA and a server certificate for 127.0.0.1; returns (ca, cert, key)."""
    os.makedirs(f"{directory}/ca", exist_ok=True)  # alone, as skopeo's --cert-dir wants
    ca_key, ca = f"{directory}/ca.key", f"{directory}/ca/ca.crt"
    key, csr, cert = (
        f"{directory}/server.key",
        f"{directory}/server.csr",
        f"{directory}/server.cert",
    )
    ext = f"{directory}/ext.cnf"
    with open(ext, "w") as handle:
        handle.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
            "-days", "2", "-subj", "/CN=strata test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
            "-subj", "/CN=127.0.0.1")  # fmt: skip
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", ext)  # fmt: skip
    for leftover in (csr, ext, ca_key, f"{directory}/ca/ca.srl"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    return ca, cert, key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# docker-registry accepts a token this long after it expires (clock skew): a
# token meant to live N seconds says it expires N - TOKEN_LEEWAY from now.
TOKEN_LEEWAY = 60


@contextlib.contextmanager
def token_service(top: str, lifetime: int = 300) -> Iterator[tuple[str, str]]:
    """A bearer-token service as docker-registry's `auth: token` expects: it
    checks the Basic login and signs an RS256 JWT (openssl) granting what was
    asked. Yields (realm URL, certificate the registry trusts)."""
    os.makedirs(top, exist_ok=True)
    key, cert = f"{top}/token.key", f"{top}/token.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
         "-out", cert, "-days", "2", "-subj", "/CN=strata token issuer"],
        check=True, capture_output=True,
    )  # fmt: skip
    der = subprocess.run(
        ["openssl", "x509", "-in", cert, "-outform", "DER"], check=True, capture_output=True
    ).stdout
    login = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.headers.get("Authorization") != login:
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
            access = []
            for scope in query.get("scope", []):
                kind, name, actions = scope.split(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
            now = int(time.time())
            header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
            expires = now + lifetime - TOKEN_LEEWAY
            claims = {
                "iss": TOKEN_ISSUER, "sub": USER, "aud": TOKEN_SERVICE, "exp": expires,
                "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access,
            }  # fmt: skip
            signing_input = (
                _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
            )
            signature = subprocess.run(
                ["openssl", "dgst", "-sha256", "-sign", key],
                input=signing_input.encode(), check=True, capture_output=True,
            ).stdout  # fmt: skip
            token = signing_input + "." + _b64url(signature)
            body = json.dumps({"token": token, "expires_in": lifetime}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token", cert
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


TOKEN_SERVICE = "strata-test-registry"
TOKEN_ISSUER = "strata-test-issuer"


@contextlib.contextmanager
def run_registry(
    top: str,
    *,
    tls: bool = False,
    logins: bool = False,
    tokens: bool = False,
    token_lifetime: int = 300,
    port: int | None = None,
) -> Iterator[Registry]:
    """docker-registry on 127.0.0.1 with its data in *top* (on *port*: the
    same registry again after a stop)."""
    os.makedirs(top, exist_ok=True)
    port = port or free_port()
    lines = [
        "version: 0.1",
        "log:",
        "  level: error",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {top}/data",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
    ]
    ca = None
    if tls:
        ca, cert, key = make_tls(f"{top}/certs")
        lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
    if logins:
        htpasswd = subprocess.run(
            ["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True
        ).stdout
        with open(f"{top}/htpasswd", "w") as handle:
            handle.write(htpasswd)
        lines += ["auth:", "  htpasswd:", "    realm: strata-test", f"    path: {top}/htpasswd"]
    services = contextlib.ExitStack()
    if tokens:
        realm, token_cert = services.enter_context(token_service(f"{top}/tokens", token_lifetime))
        lines += ["auth:", "  token:", f"    realm: {realm}", f"    service: {TOKEN_SERVICE}",
                  f"    issuer: {TOKEN_ISSUER}", f"    rootcertbundle: {token_cert}"]  # fmt: skip
    config = f"{top}/config.yml"
    with open(config, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    log = open(f"{top}/registry.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        ["docker-registry", "serve", config], stdout=log, stderr=subprocess.STDOUT
    )
    registry = Registry(f"127.0.0.1:{port}", ca, logins or tokens)
    try:
        url = f"{'https' if tls else 'http'}://{registry.host}/v2/"
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url, verify=ca or False, timeout=2)
                break
            except requests.exceptions.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    with open(f"{top}/registry.log") as failed:
                        raise RuntimeError(
                            f"docker-registry did not start: {failed.read()}"
                        ) from None
                time.sleep(0.1)
        yield registry
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        services.close()
