"""The snapshotter's mounter: a process that has strata's mount code loaded
and forks one child per mount it is asked for, so a view or a container's
layer mounts without a Python start and its imports (about 150 ms of each).

Requests and answers are JSON lines on its standard input and output:
  {"id": N, "spec": {store, mountpoint, passthrough, layers: [{path, known,
   lazy, registry}] lowest first, writable: [upper, work] or null}}
  {"id": N, "error": ""}            (or the one-line reason it failed)
A child answers once its mount serves; the mount's daemon is a process of its
own, so neither the mounter nor the snapshotter stopping ends a mount. The
mounter is single-threaded: a fork copies it whole, and the gRPC threads of
the snapshotter never reach a mount daemon.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from ..errors import StrataError
from ..image.registry import RegistryOptions
from ..image.store import Store
from ..lazy.layers import DEFAULT_TIMEOUT, LazyLayer, range_fetcher
from ..mount import MountRequest, WritableLayer, mount


def mount_spec(spec: dict[str, Any]) -> None:
    store = Store(spec["store"])
    layers = spec["layers"]
    lazy = [
        LazyLayer(
            store,
            layer["lazy"],
            range_fetcher(store, layer["lazy"], _options(layer)),
            DEFAULT_TIMEOUT,
        )
        for layer in layers
        if layer["lazy"]
    ]
    writable = WritableLayer(*spec["writable"]) if spec.get("writable") else None
    mount(
        MountRequest(
            spec["store"],
            [layer["path"] for layer in layers],
            spec["mountpoint"],
            writable=writable,
            known_ids=[layer["known"].encode() for layer in layers],
            # Whole copy-ups: a container's upper is committed as a layer of its own.
            metacopy=False,
            lazy=lazy,
            passthrough=spec["passthrough"],
        )
    )


def _options(layer: dict[str, Any]) -> RegistryOptions | None:
    """The registry options the snapshotter gave for a lazy layer (None: as
    the layer was pulled, with the credentials of the usual auth files)."""
    given = layer.get("registry")
    return None if not given else RegistryOptions(progress=False, **given)


def _answer(number: int, error: str) -> None:
    line = json.dumps({"id": number, "error": error[:2000]}) + "\n"
    os.write(1, line.encode())  # one write, under PIPE_BUF: lines never interleave


def _preload() -> None:
    """Import here what a mount daemon imports when it starts serving, so each
    fork has it (about 85 of a view's 100 ms to ready were these imports)."""
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    from .. import fuse, passthrough  # noqa: F401
    from ..core import index, stack, view  # noqa: F401


def serve() -> None:
    _preload()
    for line in sys.stdin:
        request = json.loads(line)
        while True:  # children that answered
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        if os.fork() == 0:
            error = ""
            try:
                mount_spec(request["spec"])
            except StrataError as exc:
                error = str(exc)
            except BaseException as exc:  # answer, never leave the snapshotter waiting
                error = f"mount failed: {exc!r}"
            _answer(request["id"], error)
            os._exit(0)


if __name__ == "__main__":
    serve()
