"""A private containerd and a strata snapshotter for tests: each with its own
config, root, state and socket under the test's scratch directory."""

from __future__ import annotations

import contextlib
import hashlib
import json
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

    def collect_garbage(self) -> None:
        """A garbage collection that follows every deletion made so far, waited
        for (a lease made and removed with --sync). containerd's scheduler
        drops the note of a deletion made while a collection runs: what it
        freed waits for the next change, which a test may never make."""
        lease = self.ctr("leases", "create").stdout.split()[0]
        self.ctr("leases", "rm", "--sync", lease)

    def manifest_digest(self, image: str) -> str:
        for line in self.ctr("images", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields[0] == image:
                return next(field for field in fields if field.startswith("sha256:"))
        raise AssertionError(f"{image} not in ctr images ls")

    def chain_id(self, image: str) -> str:
        """The chain id of *image*'s top layer (the snapshot containerd unpacked it to)."""
        manifest = json.loads(self.ctr("content", "get", self.manifest_digest(image)).stdout)
        config = json.loads(self.ctr("content", "get", manifest["config"]["digest"]).stdout)
        chain = ""
        for diff_id in config["rootfs"]["diff_ids"]:
            if chain:
                chain = "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
            else:
                chain = diff_id
        return chain


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
    cri_registry: str = "",
    more_snapshotters: dict[str, str] | None = None,
) -> Iterator[Containerd]:
    """containerd with strata as proxy plugin `strata`, CRI off. Its tasks and
    containers are removed when it stops, unless *leave_running* (a containerd
    started again on the same TOP finds them; pass it the first one's
    `run_before` as *since*, so what the first left in /run/containerd goes).
    With *cri_registry* (HOST:PORT, plain http) the CRI plugin serves, with
    strata as its snapshotter, pulling from there, its sandbox image
    HOST:PORT/pause:v1. *more_snapshotters* are further proxy plugins
    (name: socket)."""
    os.makedirs(top, exist_ok=True)
    address, log, config = f"{top}/containerd.sock", f"{top}/containerd.log", f"{top}/config.toml"
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    lines = [
        "version = 2",
        f'root = "{top}/root"',
        f'state = "{top}/state"',
        "[grpc]",
        f'  address = "{address}"',
        "[ttrpc]",
        f'  address = "{address}.ttrpc"',
        "[proxy_plugins.strata]",
        '  type = "snapshot"',
        f'  address = "{snapshotter_address}"',
    ]
    for name, socket in (more_snapshotters or {}).items():
        lines += [f"[proxy_plugins.{name}]", '  type = "snapshot"', f'  address = "{socket}"']
    if cri_registry:
        os.makedirs(f"{top}/cni", exist_ok=True)
        lines += [
            cri,
            f'  sandbox_image = "{cri_registry}/pause:v1"',
            # No CAP_SYS_RESOURCE here: without this every sandbox fails in runc.
            "  restrict_oom_score_adj = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            f"{cri[:-1]}.containerd]",
            '  snapshotter = "strata"',
            "  disable_snapshot_annotations = false",  # the labels remote snapshots need
            f"{cri[:-1]}.cni]",
            f'  conf_dir = "{top}/cni"',
            f'{cri[:-1]}.registry.mirrors."{cri_registry}"]',
            f'  endpoint = ["http://{cri_registry}"]',
        ]
    else:
        lines.insert(0, 'disabled_plugins = ["io.containerd.grpc.v1.cri"]')
    with open(config, "w") as handle:
        handle.write("\n".join(lines) + "\n")
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
    """Every task killed and every container removed, in every namespace (the
    CRI plugin's is k8s.io)."""
    listed = subprocess.run(["ctr", "-a", daemon.address, "namespaces", "ls", "-q"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    for namespace in listed.stdout.split():

        def ctr(*arguments: str, namespace: str = namespace) -> str:
            return subprocess.run(["ctr", "-a", daemon.address, "-n", namespace, *arguments],
                                  capture_output=True, text=True, timeout=120).stdout  # fmt: skip

        for task in ctr("tasks", "ls", "-q").split():
            ctr("tasks", "kill", "-s", "KILL", task)
            ctr("tasks", "rm", "-f", task)
        for container in ctr("containers", "ls", "-q").split():
            ctr("containers", "rm", container)
