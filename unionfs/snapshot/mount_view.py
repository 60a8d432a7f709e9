"""`python -m unionfs.snapshot.mount_view`: mount one chain's view (or a
container's writable mount of it), as the snapshotter asks on standard input
(JSON: store, mountpoint, passthrough, layers lowest first as {path, known,
lazy}, writable: [upper, work] or null); returns once it serves. A
process of its own: the mount daemon it leaves must not share the
snapshotter's gRPC threads (a fork copies only the forking thread)."""

from __future__ import annotations

import json
import sys

from ..errors import StrataError, error_line


def main() -> int:
    from ..image.lazy import DEFAULT_TIMEOUT, LazyLayer, range_fetcher
    from ..image.store import Store
    from ..mount import MountRequest, WritableLayer, mount

    try:
        spec = json.load(sys.stdin)
        store = Store(spec["store"])
        layers = spec["layers"]
        lazy = [
            LazyLayer(
                store, layer["lazy"], range_fetcher(store, layer["lazy"], None), DEFAULT_TIMEOUT
            )
            for layer in layers
            if layer["lazy"]
        ]
        writable = None
        if spec.get("writable"):
            upper, work = spec["writable"]
            writable = WritableLayer(upper, work)
        mount(
            MountRequest(
                spec["store"],
                [layer["path"] for layer in layers],
                spec["mountpoint"],
                writable=writable,
                known_ids=[layer["known"].encode() for layer in layers],
                # Whole copy-ups: the upper is committed as a layer of its own.
                metacopy=False,
                lazy=lazy,
                passthrough=spec["passthrough"],
            )
        )
    except StrataError as exc:
        print(error_line("strata", exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
