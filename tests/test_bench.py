"""`strata bench --quick` runs every workload on every driver of this machine
and writes what it promises: all samples in JSON, the table, the plots.

This keeps the suite working; it asserts nothing about speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import realwork
from drivers import DRIVERS, missing
from workloads import WORKLOADS, copied_whole


def test_the_quick_suite_writes_every_workload_for_every_driver(scratch: str) -> None:
    out = os.path.join(scratch, "results")
    result = subprocess.run(
        [sys.executable, "-m", "unionfs", "bench", "--quick", "--out", out],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as handle:
        results = json.load(handle)
    runnable = [driver for driver in DRIVERS if missing(driver) is None]
    assert results["arguments"]["drivers"] == runnable
    assert "strata" in runnable and "overlay" in runnable
    skipped = [driver for driver in DRIVERS if driver not in runnable]
    assert len(results["notes"]) >= len(skipped)
    assert results["machine"]["kernel"] == os.uname().release
    assert list(results["workloads"]) == [workload.id for workload in WORKLOADS]
    drivers_of = {workload.id: workload.drivers for workload in WORKLOADS}
    for workload_id, workload in results["workloads"].items():
        assert workload["samples"], workload_id
        for metric, by_driver in workload["samples"].items():
            expected = [d for d in runnable if d in drivers_of[workload_id]]
            if workload_id == "W7":  # a copy is not a mount; only daemons have a resident size
                expected = [d for d in expected if d != "native"]
                if "memory" in metric:
                    expected = [d for d in expected if d != "overlay"]
            if workload_id == "W9" and ": " in metric:  # a daemon's CPU and requests
                expected = [d for d in expected if d in realwork.FUSE_DRIVERS]
                if ": requests, " in metric:  # an opcode one daemon may never get
                    assert by_driver and set(by_driver) <= set(expected), metric
                    continue
            assert sorted(by_driver) == sorted(expected), (workload_id, metric)
            for driver, samples in by_driver.items():
                assert len(samples) == 1 and samples[0] > 0, (workload_id, metric, driver)
    with open(os.path.join(out, "results.md")) as handle:
        table = handle.read()
    lookup_drivers = [d for d in runnable if d in drivers_of["W1"]]
    assert "| metric | " + " | ".join(lookup_drivers) + " | strata / overlay |" in table
    assert "| strata / passthrough |" in table  # W8: the floor of a Python daemon
    for workload in WORKLOADS:
        assert f"### {workload.id} {workload.title}" in table
    # W9 counts each FUSE daemon's requests by opcode, the same way for both.
    for driver in (d for d in realwork.FUSE_DRIVERS if d in runnable):
        steps = results["workloads"]["W9"]["samples"]
        assert steps["[1 layer] all steps: requests"][driver][0] > 100, driver
        assert steps["[1 layer] dpkg -i of less: requests, CREATE"][driver][0] > 0, driver
    for plot in ("lookup-depth.png", "copy-up.png", "small-files.png"):
        with open(os.path.join(out, plot), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", plot


def test_w5_waits_for_a_chunked_copy_to_be_whole_not_for_its_blocks(scratch: str) -> None:
    """strata allocates a chunked copy-up's space before it copies: W5 took
    the blocks for the end of the copy, so its lookups "during the copy-up"
    and its write "right after" it ran while strata still copied."""
    copy = os.path.join(scratch, "copy")
    size = 4 << 20
    with open(copy, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, size)
    os.setxattr(copy, "trusted.overlay.strata.chunks", b"\x01")
    assert os.stat(copy).st_blocks * 512 >= size
    assert not copied_whole(copy, size)
    os.removexattr(copy, "trusted.overlay.strata.chunks")
    os.setxattr(copy, "trusted.overlay.metacopy", b"")
    assert not copied_whole(copy, size)
    os.removexattr(copy, "trusted.overlay.metacopy")
    assert copied_whole(copy, size)
    assert not copied_whole(os.path.join(scratch, "absent"), size)
