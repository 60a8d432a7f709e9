"""Memory that stays small as images grow: the daemon keeps a node for each
inode the kernel holds, and gives it back when the kernel forgets it.
Counted in nodes, not bytes (`strata bench` W7 has the bytes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.layers import write
from tests.mounts import patched_mount

# The daemon answers "how many nodes?" through files beside UPPER: the test
# writes count.ask, a thread of the daemon writes count.
_COUNT_NODES = """
import os, threading, time
import unionfs.core.view as view

_views = []
_init = view.UnionView.__init__
def _remember(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    _views.append(self)
view.UnionView.__init__ = _remember

_count = os.path.join(os.path.dirname(os.path.abspath(upper)), "count")
def _answer():
    while True:
        if os.path.exists(_count + ".ask") and _views:
            os.unlink(_count + ".ask")
            with open(_count + ".tmp", "w") as handle:
                handle.write(str(len(_views[-1].nodes)))
            os.rename(_count + ".tmp", _count)
        time.sleep(0.02)
threading.Thread(target=_answer, daemon=True).start()
"""


def _nodes(scratch: str) -> int:
    count = os.path.join(scratch, "count")
    if os.path.exists(count):
        os.unlink(count)
    write(count + ".ask")
    deadline = time.monotonic() + 10
    while not os.path.exists(count):
        assert time.monotonic() < deadline, "the daemon did not answer"
        time.sleep(0.02)
    with open(count) as handle:
        return int(handle.read())


def test_forget_gives_the_nodes_back(scratch: str) -> None:
    lower = os.path.join(scratch, "lower")
    for index in range(3000):
        write(f"{lower}/d{index // 100}/f{index}", "x")
    log_path = os.path.join(scratch, "daemon.log")
    with patched_mount(scratch, lower, _COUNT_NODES, log_path) as (mount, daemon):
        for index in range(3000):
            os.stat(f"{mount}/d{index // 100}/f{index}")
        held = _nodes(scratch)
        assert held >= 3000 + 30
        # The kernel drops the dentries and inodes nothing uses, and forgets them.
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("2\n")
        deadline = time.monotonic() + 20
        while (left := _nodes(scratch)) > 50:
            assert time.monotonic() < deadline, f"{left} of {held} nodes kept after forget"
            time.sleep(0.1)
        # What is looked up again is served as before.
        assert os.stat(f"{mount}/d7/f777").st_size == 1
    assert daemon.returncode == 0


# Modules a mount daemon never uses: tar and zstd code (image import and
# export), and what importlib.metadata loads (email, csv, zipfile). The
# daemon is forked from the CLI and keeps every module the CLI loaded: these
# cost 2.5 MiB of each daemon's 48.
_NOT_IN_A_DAEMON = (
    "tarfile",
    "zstandard",
    "email",
    "csv",
    "importlib.metadata",
    "unionfs.image.store",
    "unionfs.image.layertar",
)


def test_the_cli_loads_nothing_a_mount_daemon_does_not_use() -> None:
    # A fresh interpreter, as `strata mount` and strata-overlayfs start: what
    # it holds when it forks is what the daemon keeps.
    code = (
        "import sys\n"
        "import unionfs.cli, unionfs.overlayfs_cli, unionfs.mount, unionfs.fuse, pyfuse3\n"
        "unionfs.cli.build_parser()\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    assert "unionfs.fuse" in loaded  # the probe itself works
    assert [name for name in _NOT_IN_A_DAEMON if name in loaded] == []
