"""SIGKILL the daemon in the middle of writes, copy-ups and renames.

After each kill: the mount is cleared, a new mount serves the same UPPER,
no file shows a partial copy-up, everything fsync'd before the kill is there,
and `strata fsck` finds nothing left to repair.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

from tests.layers import write
from tests.mounts import force_unmount, strata
from unionfs.mount import find_mount, pid_file

TRIALS = 20
BIG = 4 << 20  # each lower file: large enough that a kill lands inside a copy-up
PATTERN = bytes(range(256)) * (BIG // 256)


def _workload(mount: str, trial: int, durable: dict[str, bytes], stop: threading.Event) -> None:
    """Write, copy up, rename and fsync until the mount goes away."""
    rng = random.Random(trial)
    step = 0
    try:
        os.makedirs(os.path.join(mount, "durable"), exist_ok=True)
        while not stop.is_set():
            step += 1
            choice = rng.randrange(4)
            if choice == 0:  # copy-up with data: a 4-byte mark at the start
                name = f"big{rng.randrange(4)}"
                fd = os.open(os.path.join(mount, "lower", name), os.O_WRONLY)
                os.pwrite(fd, b"MARK", 0)
                os.close(fd)
            elif choice == 1:  # metadata-only copy-up
                os.chmod(os.path.join(mount, "lower", f"big{rng.randrange(4)}"), 0o600)
            elif choice == 2:  # rename a directory back and forth
                a, b = os.path.join(mount, "tree"), os.path.join(mount, "tree2")
                os.rename(a, b) if os.path.exists(a) else os.rename(b, a)
            else:  # new data, fsync'd: must survive the kill
                data = os.urandom(rng.randrange(1, 20000))
                name = f"t{trial}-{step}"
                fd = os.open(os.path.join(mount, "durable", name), os.O_CREAT | os.O_WRONLY, 0o644)
                os.write(fd, data)
                os.fsync(fd)
                os.close(fd)
                durable[name] = data
    except OSError:
        return  # the daemon is gone


def test_sigkill_during_writes_leaves_a_consistent_upper(scratch: str) -> None:
    lower, upper, work = (os.path.join(scratch, name) for name in ("lower", "upper", "work"))
    for index in range(4):
        write(f"{lower}/lower/big{index}", "")
        with open(f"{lower}/lower/big{index}", "wb") as handle:
            handle.write(PATTERN)
    for index in range(50):
        write(f"{lower}/tree/sub/f{index}", f"file {index}\n")
    os.makedirs(upper)
    store, mount = os.path.join(scratch, "store"), os.path.join(scratch, "mnt")
    os.makedirs(mount)
    args = ("mount", "--layer", lower, "--upper", upper, "--work", work, mount)
    durable: dict[str, bytes] = {}
    rng = random.Random(0)
    for trial in range(TRIALS):
        strata(store, *args)
        with open(pid_file(os.path.realpath(mount))) as handle:
            pid = int(handle.read())
        stop = threading.Event()
        worker = threading.Thread(target=_workload, args=(mount, trial, durable, stop))
        worker.start()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        stop.set()
        worker.join(timeout=60)
        assert not worker.is_alive(), "a request hung after the daemon died"
        if strata(store, "umount", mount, check=False).returncode != 0:
            force_unmount(mount)
        assert find_mount(mount) is None
    strata(store, *args)
    try:
        for index in range(4):
            with open(f"{mount}/lower/big{index}", "rb") as handle:
                data = handle.read()
            assert len(data) == BIG, f"big{index}: a partial copy is visible"
            assert data[4:] == PATTERN[4:] and data[:4] in (b"MARK", PATTERN[:4])
        assert sorted(
            os.listdir(f"{mount}/tree" if os.path.exists(f"{mount}/tree") else f"{mount}/tree2")
        ) == ["sub"]
        for name, data in durable.items():
            with open(f"{mount}/durable/{name}", "rb") as handle:
                assert handle.read() == data, f"fsync'd file {name} lost data"
    finally:
        strata(store, "umount", mount)
    assert durable, "the workload should have fsync'd some files"
    result = strata(store, "fsck", "--layer", lower, "--upper", upper, "--work", work, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 problems" in result.stdout or "0 left" in result.stdout


CHUNKED = 6 << 20  # copied up chunk by chunk


def _lower_data(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)


def _kill_workload(mount: str, seed: int, log: list[tuple[str, str, int, bytes]]) -> None:
    """Chunked writes, hard-link copy-ups and populated directory renames
    until the daemon dies. *log* gets ("start" | "done", file, offset, data)."""
    rng = random.Random(seed)
    try:
        while True:
            choice = rng.randrange(3)
            if choice in (0, 1):
                if choice == 0:
                    name = f"big{rng.randrange(2)}"
                else:
                    name = rng.choice(["links/a", "links/b"])
                size = CHUNKED if choice == 0 else 1 << 20
                offset = rng.randrange(size - 16)
                data = b"W%07d" % rng.randrange(10**7)
                log.append(("start", name, offset, data))
                fd = os.open(os.path.join(mount, name), os.O_WRONLY)
                try:
                    os.pwrite(fd, data, offset)
                finally:
                    os.close(fd)
                log.append(("done", name, offset, data))
            else:
                a, b = os.path.join(mount, "tree"), os.path.join(mount, "tree2")
                os.rename(a, b) if os.path.exists(a) else os.rename(b, a)
    except OSError:
        return  # the daemon is gone


GROUPS = {"big0": "big0", "big1": "big1", "links/a": "links", "links/b": "links"}


def _applied(lower: bytes, writes: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(lower)
    for offset, piece in writes:
        data[offset : offset + len(piece)] = piece
    return bytes(data)


def test_sigkill_inside_copy_ups_leaves_a_tree_the_operations_allow(
    scratch: str, runslow: bool
) -> None:
    """SIGKILL at random points inside chunked copy-ups, hard-link group
    copy-ups and renames of populated directories. After each kill: a new
    mount shows every write that returned (and the one in flight, whole or
    not at all), both names of the hardlinked file alike, the tree under
    exactly one of its names, whole; then fsck finds nothing."""
    lower, upper, work = (os.path.join(scratch, name) for name in ("lower", "upper", "work"))
    lowers = {f"big{index}": _lower_data(f"big{index}", CHUNKED) for index in range(2)}
    lowers["links"] = _lower_data("links", 1 << 20)
    for name in ("big0", "big1"):
        write(f"{lower}/{name}", lowers[name])
    write(f"{lower}/links/a", lowers["links"])
    os.link(f"{lower}/links/a", f"{lower}/links/b")
    tree = {f"sub{n // 40}/f{n}": f"tree file {n}\n".encode() for n in range(200)}
    for rel, data in tree.items():
        write(f"{lower}/tree/{rel}", data)
    os.makedirs(upper)
    store, mount = os.path.join(scratch, "store"), os.path.join(scratch, "mnt")
    os.makedirs(mount)
    args = ("mount", "--layer", lower, "--upper", upper, "--work", work, mount)
    rng = random.Random(1)
    happened: dict[str, list[tuple[int, bytes]]] = {group: [] for group in lowers}
    finished = 0
    for trial in range(100 if runslow else 10):
        strata(store, *args)
        with open(pid_file(os.path.realpath(mount))) as handle:
            pid = int(handle.read())
        log: list[tuple[str, str, int, bytes]] = []
        worker = threading.Thread(target=_kill_workload, args=(mount, trial, log))
        worker.start()
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(pid, signal.SIGKILL)
        worker.join(timeout=60)
        assert not worker.is_alive(), "a request hung after the daemon died"
        if strata(store, "umount", mount, check=False).returncode != 0:
            force_unmount(mount)
        assert find_mount(mount) is None
        done = [(GROUPS[n], o, d) for kind, n, o, d in log if kind == "done"]
        finished += len(done)
        in_flight = [(GROUPS[n], o, d) for kind, n, o, d in log if kind == "start"][len(done) :]
        for group, offset, data in done:
            happened[group].append((offset, data))
        strata(store, *args)
        try:
            for group, data in lowers.items():
                name = "links/a" if group == "links" else group
                with open(f"{mount}/{name}", "rb") as handle:
                    seen = handle.read()
                if seen != _applied(data, happened[group]):
                    # Only the write in flight at the kill may show, whole.
                    maybe = [(o, d) for g, o, d in in_flight if g == group]
                    assert maybe, f"trial {trial}: {name} lost a write that returned"
                    happened[group].append(maybe[0])
                    assert seen == _applied(data, happened[group]), f"trial {trial}: {name}"
            assert os.stat(f"{mount}/links/a").st_ino == os.stat(f"{mount}/links/b").st_ino
            with open(f"{mount}/links/b", "rb") as handle:
                assert handle.read() == _applied(lowers["links"], happened["links"])
            names = [top for top in ("tree", "tree2") if os.path.exists(f"{mount}/{top}")]
            assert len(names) == 1, f"trial {trial}: the tree shows as {names}"
            for rel, data in tree.items():
                with open(f"{mount}/{names[0]}/{rel}", "rb") as handle:
                    assert handle.read() == data, f"trial {trial}: {rel}"
        finally:
            strata(store, "umount", mount)
        result = strata(store, "fsck", "--layer", lower, "--upper", upper, "--work", work,
                        check=False)  # fmt: skip
        assert result.returncode == 0, f"trial {trial}: " + result.stdout + result.stderr
    assert finished, "no write returned before the kills"
