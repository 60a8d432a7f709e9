"""Building small layer directories by hand for tests."""

from __future__ import annotations

import os
import stat


def write(path: str, data: bytes | str = b"", mode: int | None = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(path, mode)
    return path


def whiteout(layer: str, rel: str, style: str) -> None:
    """Hide *rel* of the layers below, as OCI (`.wh.`) or overlayfs (0/0 device)."""
    parent, _, name = rel.rpartition("/")
    directory = os.path.join(layer, parent)
    os.makedirs(directory, exist_ok=True)
    if style == "oci":
        write(os.path.join(directory, ".wh." + name))
    else:
        os.mknod(os.path.join(directory, name), stat.S_IFCHR | 0o600, 0)


def opaque(layer: str, rel: str, style: str) -> None:
    directory = os.path.join(layer, rel)
    os.makedirs(directory, exist_ok=True)
    if style == "oci":
        write(os.path.join(directory, ".wh..wh..opq"))
    elif style == "user":
        os.setxattr(directory, "user.overlay.opaque", b"y")
    else:
        os.setxattr(directory, "trusted.overlay.opaque", b"y")
