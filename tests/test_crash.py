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
