"""A private containerd and a strata snapshotter for tests: each with its own
config, root, state and socket under the test's scratch directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from unionfs.snapshot import api

# containerd 1.6 keeps these under /run/containerd whatever its `state` says.
_SHARED_RUN = ("/run/containerd/s", "/run/containerd/runc", "/run/containerd/fifo")


def _wait_for_socket(path: str, process: subprocess.Popen[bytes], log: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if process.poll() is not None:
            with open(log) as handle:
                raise AssertionError(f"{path}: the server exited: {handle.read()[-2000:]}")
        assert time.monotonic() < deadline, f"no socket {path}"
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Snapshotter:
    address: str
    root: str
    process: subprocess.Popen[bytes]
    log: str

    def call(self, method: str, **fields: Any) -> Any:
        """One request to the snapshots service; streams are read whole."""
        request_class, response_class, streaming = api.METHODS[method]
        with grpc.insecure_channel(f"unix://{self.address}") as channel:
            make = channel.unary_stream if streaming else channel.unary_unary
            stub: Callable[..., Any] = make(
                f"/{api.SERVICE}/{method}",
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            answer = stub(request_class(**fields), timeout=60)
            return list(answer) if streaming else answer


def start_snapshotter(top: str, *extra: str) -> Snapshotter:
    """`strata snapshotter` serving on TOP/strata.sock with its root in TOP/root."""
    address, root, log = f"{top}/strata.sock", f"{top}/root", f"{top}/snapshotter.log"
    os.makedirs(top, exist_ok=True)
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "unionfs", "snapshotter", "--address", address,
             "--root", root, *extra],
            stdout=output,
            stderr=output,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )  # fmt: skip
    _wait_for_socket(address, process, log)
    return Snapshotter(address, root, process, log)


@contextlib.contextmanager
def snapshotter(top: str, *extra: str) -> Iterator[Snapshotter]:
    running = start_snapshotter(top, *extra)
    try:
        yield running
    finally:
        stop(running.process)


@dataclass
class Containerd:
    address: str
    process: subprocess.Popen[bytes]
    log: str
    run_before: set[str]
    namespace: str = "strata-test"

    def ctr(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["ctr", "-a", self.address, "-n", self.namespace, *arguments],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"ctr {' '.join(arguments)}: {done.stderr.strip()}")
        return done


def _shared_run_entries() -> set[str]:
    found: set[str] = set()
    for directory in _SHARED_RUN:
        if os.path.isdir(directory):
            found.update(os.path.join(directory, name) for name in os.listdir(directory))
    return found


@contextlib.contextmanager
def containerd(
    top: str,
    snapshotter_address: str,
    *,
    leave_running: bool = False,
    since: set[str] | None = None,
) -> Iterator[Containerd]:
    """containerd with strata as proxy plugin `strata`, CRI off. Its tasks and
    containers are removed when it stops, unless *leave_running* (a containerd
    started again on the same TOP finds them; pass it the first one's
    `run_before` as *since*, so what the first left in /run/containerd goes)."""
    os.makedirs(top, exist_ok=True)
    address, log, config = f"{top}/containerd.sock", f"{top}/containerd.log", f"{top}/config.toml"
    with open(config, "w") as handle:
        handle.write(
            f'version = 2\nroot = "{top}/root"\nstate = "{top}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{address}"\n'
            f'[ttrpc]\n  address = "{address}.ttrpc"\n'
            f'[proxy_plugins.strata]\n  type = "snapshot"\n  address = "{snapshotter_address}"\n'
        )
    before = _shared_run_entries() if since is None else since
    with open(log, "ab") as output:
        process = subprocess.Popen(["containerd", "-c", config], stdout=output, stderr=output)
    daemon = Containerd(address, process, log, before)
    try:
        _wait_for_socket(address, process, log)
        yield daemon
    except BaseException:
        leave_running = False  # a failed test leaves nothing running
        raise
    finally:
        if not leave_running:
            _remove_containers(daemon)
        stop(process)
        if not leave_running:
            for entry in _shared_run_entries() - before:
                if os.path.isdir(entry) and not os.path.islink(entry):
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry)


def _remove_containers(daemon: Containerd) -> None:
    tasks = daemon.ctr("tasks", "ls", "-q", check=False).stdout.split()
    for task in tasks:
        daemon.ctr("tasks", "kill", "-s", "KILL", task, check=False)
        daemon.ctr("tasks", "rm", "-f", task, check=False)
    for container in daemon.ctr("containers", "ls", "-q", check=False).stdout.split():
        daemon.ctr("containers", "rm", container, check=False)
