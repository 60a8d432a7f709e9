"""`strata snapshotter`: containerd's snapshots service on a unix socket (a
proxy plugin): gRPC around service.py's Snapshotter.

Requests change the catalog one at a time (a lock); the registry part of a
remote snapshot runs before it, so pulls of several images proceed side by
side. One instance per socket and per root.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from ..errors import StrataError
from ..image.registry import RegistryOptions
from . import api
from .catalog import SnapshotError
from .service import Snapshotter

# The requests that change something, one log line each.
_LOGGED = frozenset({"Prepare", "View", "Commit", "Remove", "Cleanup"})


def _labels(message: Any) -> dict[str, str]:
    return dict(message.labels)


def _handlers(service: Snapshotter) -> dict[str, Callable[[Any], Any]]:
    def prepare(request: Any) -> Any:
        mounts = service.create(request.key, request.parent, _labels(request), api.ACTIVE)
        return api.PrepareSnapshotResponse(mounts=mounts)

    def view(request: Any) -> Any:
        mounts = service.create(request.key, request.parent, _labels(request), api.VIEW)
        return api.ViewSnapshotResponse(mounts=mounts)

    def update(request: Any) -> Any:
        labels = _labels(request.info)
        snapshot = service.catalog.update(
            request.info.name, labels, list(request.update_mask.paths)
        )
        return api.UpdateSnapshotResponse(info=service.info(snapshot))

    def usage_of(request: Any) -> Any:
        size, inodes = service.usage(request.key)
        return api.UsageResponse(size=size, inodes=inodes)

    def commit(request: Any) -> Any:
        service.commit(request.name, request.key, _labels(request))
        return api.Empty()

    def remove(request: Any) -> Any:
        service.remove(request.key)
        return api.Empty()

    def cleanup(request: Any) -> Any:
        service.cleanup()
        return api.Empty()

    return {
        "Prepare": prepare,
        "View": view,
        "Mounts": lambda request: api.MountsResponse(mounts=service.mounts_of(request.key)),
        "Commit": commit,
        "Remove": remove,
        "Stat": lambda request: api.StatSnapshotResponse(
            info=service.info(service.catalog.get(request.key))
        ),
        "Update": update,
        "List": lambda request: service.list(list(request.filters)),
        "Usage": usage_of,
        "Cleanup": cleanup,
    }


def _rpc(
    service: Snapshotter, name: str, handler: Callable[[Any], Any], streaming: bool
) -> Callable[[Any, grpc.ServicerContext], Any]:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            if name == "Prepare":
                # The registry part of a remote snapshot, before the lock:
                # pulls of several images run side by side.
                service.fetch_remote(dict(request.labels))
            with service.lock:
                if name in _LOGGED:
                    key = getattr(request, "key", "") or ""
                    print(f"strata snapshotter: {name} {key}".rstrip(), file=sys.stderr, flush=True)
                answer = handler(request)
                # A stream is read whole under the lock: the catalog may change after.
                return iter(list(answer)) if streaming else answer
        except SnapshotError as exc:
            if name in _LOGGED:
                print(f"strata snapshotter: {name}: {exc}", file=sys.stderr, flush=True)
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        except OSError as exc:
            print(f"strata snapshotter: {name}: {exc}", file=sys.stderr, flush=True)
            context.abort(grpc.StatusCode.INTERNAL, f"{name}: {exc}")

    return call


def generic_handler(service: Snapshotter) -> grpc.GenericRpcHandler:
    methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for name, handler in _handlers(service).items():
        request_class, response_class, streaming = api.METHODS[name]
        make = (
            grpc.unary_stream_rpc_method_handler
            if streaming
            else grpc.unary_unary_rpc_method_handler
        )
        methods[name] = make(
            _rpc(service, name, handler, streaming),
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(api.SERVICE, methods)


@contextlib.contextmanager
def _single_instance(root: str, address: str) -> Iterator[None]:
    """One snapshotter per root and per socket: a second one on either would
    leave containerd talking to the first while the second changes the state."""
    handles = []
    try:
        for path in (os.path.join(root, "lock"), address + ".lock"):
            handle = open(path, "a")  # noqa: SIM115 (held until the server stops)
            handles.append(handle)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StrataError(f"another strata snapshotter is using {path[:-5]}") from None
        yield
    finally:
        for handle in handles:
            handle.close()


def serve(
    address: str,
    root: str,
    passthrough: str = "auto",
    registry_options: Callable[[str], RegistryOptions] | None = None,
    view_idle: float = 60.0,
    writable: str = "overlay",
) -> None:
    """Serve until SIGTERM or SIGINT; *registry_options* gives the options
    (TLS, credentials) for a registry host, for remote snapshots."""
    address = os.path.abspath(address)
    os.makedirs(root, mode=0o711, exist_ok=True)
    os.makedirs(os.path.dirname(address), exist_ok=True)
    with _single_instance(root, address):
        try:
            if not stat.S_ISSOCK(os.lstat(address).st_mode):
                raise StrataError(f"{address} exists and is not a socket")
            os.unlink(address)  # a socket a stopped instance left
        except FileNotFoundError:
            pass
        service = Snapshotter(root, passthrough, registry_options, view_idle, writable)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((generic_handler(service),))
        if server.add_insecure_port(f"unix://{address}") == 0:
            raise StrataError(f"cannot listen on {address}")
        server.start()
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        print(f"strata snapshotter: serving on {address}", file=sys.stderr, flush=True)
        while not stop.wait(min(1.0, max(view_idle, 0.1))):
            with service.lock:
                service.release_idle()
        server.stop(grace=5).wait()
        with service.lock:
            service.release_unneeded()
        service.views.mounter.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
