"""Image references: `[registry/]repository[:tag][@digest]`, tag defaulting to latest."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import StrataError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?$")


def check_digest(digest: str) -> str:
    if not _DIGEST.match(digest):
        raise StrataError(f"{digest!r} is not a sha256 digest")
    return digest


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str  # "" for a name of the local store
    repository: str
    tag: str = "latest"
    digest: str = ""

    @property
    def name(self) -> str:
        """`registry/repository:tag`: how the store names the image."""
        repo = f"{self.registry}/{self.repository}" if self.registry else self.repository
        return f"{repo}:{self.tag}"

    @property
    def repo(self) -> str:
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    def __str__(self) -> str:
        text = self.repo
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str, *, remote: bool = False) -> Reference:
    """Parse an image name. With *remote*, the first component must be a registry
    host (`127.0.0.1:5000/busybox`), as strata pulls from no default registry."""
    original = text
    digest = ""
    if "@" in text:
        text, digest = text.split("@", 1)
        check_digest(digest)
    registry = ""
    first, _, rest = text.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.match(first):
            raise StrataError(f"{original!r}: bad registry host {first!r}")
        registry, text = first, rest
    elif remote:
        raise StrataError(
            f"{original!r} names no registry; write it as HOST[:PORT]/REPOSITORY[:TAG]"
        )
    tag = ""
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.match(tag):
            raise StrataError(f"{original!r}: bad tag {tag!r}")
    if not _REPOSITORY.match(text):
        raise StrataError(
            f"{original!r}: bad repository name {text!r} (lowercase letters, digits, . _ - /)"
        )
    if not tag and not digest:
        tag = "latest"
    return Reference(registry, text, tag, digest)
