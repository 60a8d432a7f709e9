"""Reads of lower files: a cold open reads a small file whole (one worker
thread call for open and data); what the handle then answers is what pread
on the file answers, and a copy-up through another handle is seen at once."""

from __future__ import annotations

import os

from tests.layers import write
from tests.mounts import drop_caches, strata_mount
from unionfs.fuse import PREFETCH_MAX


def test_cold_opens_read_what_the_files_hold(scratch: str) -> None:
    lower = os.path.join(scratch, "lower")
    sizes = {"empty": 0, "one": 1, "small": 5000, "edge": PREFETCH_MAX, "over": PREFETCH_MAX + 1}
    data = {name: os.urandom(size) for name, size in sizes.items()}
    for name, content in data.items():
        write(f"{lower}/{name}", content)
    write(f"{lower}/changed", "lower data")
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    root, mount = os.path.join(scratch, "store"), os.path.join(scratch, "mnt")
    os.makedirs(upper)
    with strata_mount(root, [lower], mount, "--upper", upper, "--work", work):
        drop_caches()
        for name, content in data.items():
            fd = os.open(f"{mount}/{name}", os.O_RDONLY)
            try:
                # Pieces out of order, past the end, then the whole.
                for offset, size in ((3, 10), (0, 1), (len(content), 10), (0, len(content) + 1)):
                    assert os.pread(fd, size, offset) == content[offset : offset + size], name
            finally:
                os.close(fd)
        drop_caches()
        reader = os.open(f"{mount}/changed", os.O_RDONLY)  # cold: its data is read ahead
        try:
            writer = os.open(f"{mount}/changed", os.O_WRONLY)
            os.pwrite(writer, b"UPPER", 0)
            os.close(writer)
            assert os.pread(reader, 100, 0) == b"UPPER data"
        finally:
            os.close(reader)
