"""A real registry for tests: Debian's docker-registry on 127.0.0.1, plain or
with TLS (a CA made here with openssl) and htpasswd logins."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
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


@contextlib.contextmanager
def run_registry(top: str, *, tls: bool = False, logins: bool = False) -> Iterator[Registry]:
    os.makedirs(top, exist_ok=True)
    port = free_port()
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
    config = f"{top}/config.yml"
    with open(config, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    log = open(f"{top}/registry.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        ["docker-registry", "serve", config], stdout=log, stderr=subprocess.STDOUT
    )
    registry = Registry(f"127.0.0.1:{port}", ca, logins)
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
