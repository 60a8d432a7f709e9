"""Many processes at once on one mount, as a container's do, and a kill among them.

Processes apply random operations (tests/ops.py: creates, writes, renames of
files and directories, links, unlinks, attributes, xattrs, ACLs, some as an
unprivileged user) to the same names of a generated stack, so that they meet
in the same directories and hardlink groups. Afterwards the tree must stay
exactly as it was through an unmount and a remount, fsck must find nothing,
and the kernel's overlayfs must show the same tree with UPPER stacked as the
top lower layer (what strata's UPPER means to the tools that read it). The
second test kills the daemon with SIGKILL in the middle of it all; the next
mount recovers, and the same checks follow.

Link counts of files are left out of the overlayfs comparison: a hardlinked
file copied up keeps its shared copy in WORK while any of its names is left,
which the host's st_nlink counts.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from dataclasses import replace
from typing import Any

import pytest

from tests.mounts import force_unmount, overlay_mount, strata, strata_mount
from tests.ops import apply, choose, tree_paths
from tests.stackgen import generate, render
from tests.trees import Snapshot, differences, snapshot
from unionfs.mount import find_mount, pid_file

WORKERS = 4


def _seconds(runslow: bool) -> float:
    return 60.0 if runslow else 8.0


def _seeds(runslow: bool) -> range:
    return range(6 if runslow else 1)


def _work(mount: str, seed: int, deadline: float, done: Any) -> None:
    """One process's operations until *deadline* (run in a child)."""
    rng = random.Random(seed)
    count = 0
    problems: list[str] = []
    while time.time() < deadline:
        paths, dirs = tree_paths(mount)
        for _ in range(10):
            op = choose(rng, paths, dirs)
            try:
                apply(mount, op)  # every OSError comes back as its errno
            except Exception as exc:  # anything else is a finding
                problems.append(f"{op}: {exc!r}")
            count += 1
    done.put((count, problems))


def _together(mount: str, seed: int, seconds: float) -> tuple[list[multiprocessing.Process], Any]:
    """WORKERS processes at work on *mount* for *seconds*; and where they report."""
    done: Any = multiprocessing.Queue()
    deadline = time.time() + seconds
    workers = [
        multiprocessing.Process(target=_work, args=(mount, seed * 100 + index, deadline, done))
        for index in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    return workers, done


def _finish(workers: list[multiprocessing.Process], done: Any, seconds: float) -> int:
    """Wait for the workers; how many operations they ran (none may have raised)."""
    results = [done.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join()
    problems = [problem for _, found in results for problem in found]
    assert problems == [], "\n".join(problems[:20])
    return sum(count for count, _ in results)


def _files_unlinked(tree: Snapshot) -> Snapshot:
    nodes = {path: replace(node, nlink=0) if node.kind != "d" else node
             for path, node in tree.nodes.items()}  # fmt: skip
    return replace(tree, nodes=nodes, hardlink_groups=set())


def _check(
    scratch: str, store: str, layers: list[str], writable: tuple[str, ...], since: int,
    before: Snapshot,
) -> None:  # fmt: skip
    """fsck, a remount that shows *before* again, and overlayfs over UPPER."""
    layer_args = [arg for layer in layers for arg in ("--layer", layer)]
    result = strata(store, "fsck", *layer_args, *writable, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    window = (since - 2_000_000_000, time.time_ns() + 2_000_000_000)
    with strata_mount(store, layers, os.path.join(scratch, "mnt"), *writable) as mine:
        after = snapshot(mine)
    found = differences(before, after, changed_between=window)
    assert found == [], "the remount changed the tree:\n" + "\n".join(found[:20])
    upper = writable[1]
    with overlay_mount(
        [*layers, upper], os.path.join(scratch, "ovl"), options="redirect_dir=follow,metacopy=on"
    ) as oracle:
        found = differences(
            _files_unlinked(snapshot(oracle)), _files_unlinked(after), changed_between=window
        )
    assert found == [], "UPPER stacked on overlayfs differs:\n" + "\n".join(found[:20])


def _stack(scratch: str, seed: int) -> tuple[list[str], tuple[str, ...], str]:
    layers = render(generate(seed), os.path.join(scratch, "layers"), for_kernel=True)
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    os.makedirs(upper)
    return layers, ("--upper", upper, "--work", work), os.path.join(scratch, "store")


def test_processes_at_once_leave_a_tree_that_remounts_and_stacks_the_same(
    scratch: str, runslow: bool
) -> None:
    for seed in _seeds(runslow):
        top = os.path.join(scratch, str(seed))
        layers, writable, store = _stack(top, seed)
        since = time.time_ns()
        seconds = _seconds(runslow)
        with strata_mount(store, layers, os.path.join(top, "mnt"), *writable) as mine:
            workers, done = _together(mine, seed, seconds)
            assert _finish(workers, done, seconds) > 1000, f"seed {seed}: too few operations ran"
            before = snapshot(mine)
        _check(top, store, layers, writable, since, before)


@pytest.mark.parametrize("kill_after", [0.4, 0.9])
def test_a_daemon_killed_among_them_recovers_to_a_tree_that_stacks_the_same(
    scratch: str, runslow: bool, kill_after: float
) -> None:
    for seed in _seeds(runslow):
        top = os.path.join(scratch, str(seed))
        layers, writable, store = _stack(top, seed + 50)
        mount = os.path.join(top, "mnt")
        os.makedirs(mount)
        since = time.time_ns()
        seconds = _seconds(runslow)
        strata(store, "mount", *[a for layer in layers for a in ("--layer", layer)], *writable,
               mount)  # fmt: skip
        try:
            with open(pid_file(mount)) as handle:
                daemon = int(handle.read())
            workers, _ = _together(mount, seed, seconds)
            time.sleep(seconds * kill_after)
            os.kill(daemon, signal.SIGKILL)
            for worker in workers:
                worker.kill()  # those in a request get ENOTCONN; none finish
                worker.join()
        finally:
            force_unmount(mount)
        assert find_mount(mount) is None
        with strata_mount(store, layers, mount, *writable) as mine:
            before = snapshot(mine)
        _check(top, store, layers, writable, since, before)
