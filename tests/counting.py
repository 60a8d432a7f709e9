"""Work the core does, counted where it meets the host: at the os calls it
makes. Counted there, not by patching strata's own methods, which code
compiled with mypyc (unionfs.native) calls directly."""

from __future__ import annotations

import os
from typing import Any

import pytest


def count_scans(monkeypatch: pytest.MonkeyPatch, top: bytes) -> list[bytes]:
    """The directories under *top* listed by descriptor from now on (each
    os.scandir of one, as UPPER's listings are read), by their paths
    relative to *top*, in order; until monkeypatch.undo."""
    scans: list[bytes] = []
    real_scandir = os.scandir

    def counting_scandir(path: Any = None) -> Any:
        if isinstance(path, int):
            listed = os.path.relpath(os.fsencode(os.readlink(f"/proc/self/fd/{path}")), top)
            if not listed.startswith(b".."):
                scans.append(b"" if listed == b"." else listed)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    return scans
